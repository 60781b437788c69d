"""SAM ascent and exact restore in parameter space (DESIGN §1, stage 2 steps 2–3).

e = ρ·g/‖g‖₂ with ‖g‖ the GLOBAL norm over all trainable parameters (sharded-aware via reduce.py);
θ ← θ + e; later θ is restored EXACTLY. θ + e − e is not bit-exact in floating point, so the ascent keeps
a copy of the original parameter data and the restore copies it back.
Memory cost: one extra copy of every parameter that has a gradient (only the local shard under FSDP2) —
the same size a stored e would take, and freed when the caller drops the returned list after restore.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from prism.smoothing.reduce import local, sq_norm


@torch.no_grad()
def sam_ascent(params: Iterable[torch.Tensor], rho: float, eps: float = 1e-12) -> tuple[list[torch.Tensor | None], torch.Tensor]:
    """Move θ to θ + ρ·g/‖g‖ in place, g = the current .grad of each parameter. Returns (saved, ‖g‖).

    `saved` is aligned with `params`: the original data of each perturbed parameter (None where .grad is
    None, that parameter is not moved). Hand it unchanged to `sam_restore`. The perturbation of a parameter
    is its current data minus its saved entry; its global norm is ρ (0 if every gradient is zero).
    """
    params = list(params)
    grads = [p.grad for p in params]
    grad_norm = sq_norm(grads).sqrt()
    scale = rho / (grad_norm + eps)
    saved: list[torch.Tensor | None] = []
    for p, g in zip(params, grads):
        if g is None:
            saved.append(None)
            continue
        p_local, g_local = local(p), local(g)
        saved.append(p_local.detach().clone())
        p_local.add_(g_local.to(p_local.dtype) * scale.to(p_local.dtype))
    return saved, grad_norm


@torch.no_grad()
def sam_restore(params: Iterable[torch.Tensor], saved: Sequence[torch.Tensor | None]) -> None:
    """θ ← θ − e, bit for bit: copy back the data saved by `sam_ascent` (same params, same order)."""
    params = list(params)
    if len(params) != len(saved):
        raise ValueError(f"sam_restore got {len(params)} params but {len(saved)} saved entries")
    for p, s in zip(params, saved):
        if s is not None:
            local(p).copy_(s)
