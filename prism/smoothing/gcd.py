"""Gradient-conflict decoupling (DESIGN §1, stage 2 step 5).

g_f⊥ = g_f − (⟨g_f, g_r⟩ / (‖g_r‖² + eps))·g_r, so the forget update has no component along the retain
gradient. Dots and norms are over the WHOLE model (reduce.py all-reduces sharded gradients).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from prism.smoothing.reduce import dot, dot_per_tensor, local, sq_norm, sq_norm_per_tensor

MODES = ("always", "conflict", "off")
SCOPES = ("global", "per_tensor")


def _coef(d: torch.Tensor, rr: torch.Tensor, mode: str, eps: float) -> torch.Tensor:
    """Projection coefficient; 0 when nothing is removed. Branch-free (no host sync): conflict = ⟨g_f,g_r⟩ < 0."""
    c = d / (rr + eps)
    if mode == "conflict":
        c = torch.where(d < 0, c, torch.zeros_like(c))
    return c


@torch.no_grad()
def decouple(
    g_f: Sequence[torch.Tensor | None],
    g_r: Sequence[torch.Tensor | None],
    mode: str = "always",
    scope: str = "global",
    eps: float = 1e-12,
) -> tuple[list[torch.Tensor | None], dict[str, torch.Tensor]]:
    """Project the retain gradient out of the forget gradient, IN PLACE on the g_f tensors.

    mode: "always" (the paper's formula), "conflict" (only when ⟨g_f, g_r⟩ < 0), "off" (g_f returned as is).
    scope: "global" (one flattened whole-model vector, the paper's formula) or "per_tensor" (each parameter
    tensor projected on its own retain gradient; "conflict" is then decided per tensor).
    Entries: None in g_f stays None; None in g_r counts as a zero retain gradient (g_f unchanged).
    A zero g_r leaves g_f unchanged (coefficient 0/(0+eps) = 0).

    Memory: no extra gradient-sized buffer — g_f is updated in place (addcmul with a scalar) and g_r is only
    read; every temporary is a scalar. Returns (g_f list, stats) with 0-dim float32 tensors: dot, cos_before,
    cos_after (measured on the result, not derived), norm_f, norm_r, norm_f_after, coef (global scope) or
    conflict_frac (per_tensor scope), conflict (1.0 if the global ⟨g_f, g_r⟩ < 0).
    """
    if mode not in MODES:
        raise ValueError(f"decouple mode must be one of {MODES}, got {mode!r}")
    if scope not in SCOPES:
        raise ValueError(f"decouple scope must be one of {SCOPES}, got {scope!r}")
    g_f, g_r = list(g_f), list(g_r)
    if len(g_f) != len(g_r):
        raise ValueError(f"g_f and g_r have different lengths ({len(g_f)} vs {len(g_r)})")
    # where g_f is None nothing can be returned, so g_r there is left out of ⟨·,·⟩ and ‖g_r‖ alike
    g_r = [r if f is not None else None for f, r in zip(g_f, g_r)]

    ff, rr = sq_norm(g_f), sq_norm(g_r)
    stats: dict[str, torch.Tensor] = {"norm_f": ff.sqrt(), "norm_r": rr.sqrt()}

    if scope == "global" or mode == "off":
        d = dot(g_f, g_r)
        if mode != "off":
            c = _coef(d, rr, mode, eps)
            stats["coef"] = c
            for f, r in zip(g_f, g_r):
                if f is not None and r is not None:
                    f_local = local(f)
                    f_local.addcmul_(local(r).to(f_local.dtype), (-c).to(f_local.dtype))
    else:
        dots = dot_per_tensor(g_f, g_r)
        rrs = sq_norm_per_tensor(g_r)
        conflicts = []
        for f, r, d_i, rr_i in zip(g_f, g_r, dots, rrs):
            if f is None or r is None:
                continue
            c_i = _coef(d_i, rr_i, mode, eps)
            f_local = local(f)
            f_local.addcmul_(local(r).to(f_local.dtype), (-c_i).to(f_local.dtype))
            conflicts.append((d_i < 0).float())
        stats["conflict_frac"] = torch.stack(conflicts).mean() if conflicts else ff.new_zeros(())
        d = torch.stack([x for x in dots if x is not None]).sum() if conflicts else ff.new_zeros(())

    if mode == "off":
        d_after, ff_after = d, ff
    else:
        d_after, ff_after = dot(g_f, g_r), sq_norm(g_f)
    norm_r = stats["norm_r"]
    stats.update(
        dot=d,
        conflict=(d < 0).float(),
        cos_before=d / (stats["norm_f"] * norm_r + eps),
        cos_after=d_after / (ff_after.sqrt() * norm_r + eps),
        norm_f_after=ff_after.sqrt(),
    )
    return g_f, stats
