"""Probe objectives: the robust (FGSM min-max) probe loss of stage 1 and the probe term of stage 2 (DESIGN §1)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

HARMLESS, HARMFUL = 0, 1  # retain = 0, forget = 1


def fgsm_perturbation(probe: nn.Module, z: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    """δ = ε·sign(∇_z CE(p_φ(z), y)): the worst case in the ℓ∞ ball of radius ε (one FGSM step), detached.

    The gradient is taken w.r.t. a detached copy of z with autograd.grad, so nothing is accumulated in the
    probe's parameters (.grad) nor in z's graph. If the probe standardises features, the ball is measured in
    the standardised space (δ is returned in raw units, ε·std·sign), so ε means the same at every layer;
    with identity statistics this is exactly ε·sign(∇_z CE).
    """
    with torch.enable_grad():
        z_ = z.detach().requires_grad_(True)
        loss = F.cross_entropy(probe(z_), y)
        (grad,) = torch.autograd.grad(loss, z_)
    delta = eps * grad.sign()
    std = getattr(probe, "std", None)
    if isinstance(std, torch.Tensor):
        delta = delta * std.to(delta)
    return delta.detach()


def l1_norm(module: nn.Module) -> torch.Tensor:
    """‖φ‖₁ over all trainable parameters (weights and biases)."""
    return sum(p.abs().sum() for p in module.parameters() if p.requires_grad)


def robust_probe_loss(
    probe: nn.Module,
    z: torch.Tensor,
    y: torch.Tensor,
    eps: float = 1e-2,
    alpha: float = 0.4,
    l1: float = 1e-4,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Stage-1 min-max loss: CE(p_φ(z), y) + α·CE(p_φ(z+δ), y) + λ₁·‖φ‖₁ with δ = FGSM(z).

    z are features of the frozen LLM (treated as constants). Returns (total, parts) with parts detached:
    clean, adv, l1, total.
    """
    z = z.detach()
    clean = F.cross_entropy(probe(z), y)
    if alpha != 0:
        delta = fgsm_perturbation(probe, z, y, eps)
        adv = F.cross_entropy(probe(z + delta), y)
    else:
        adv = clean.new_zeros(())
    reg = l1_norm(probe) if l1 != 0 else clean.new_zeros(())
    total = clean + alpha * adv + l1 * reg
    parts = {"clean": clean.detach(), "adv": adv.detach(), "l1": torch.as_tensor(reg).detach(), "total": total.detach()}
    return total, parts


def probe_term(probe: nn.Module, z: torch.Tensor, target: int = HARMLESS) -> torch.Tensor:
    """Stage-2 L_probe = CE(p_φ*(z_θ(x_f)), target): pushes forget representations into the harmless region.

    The probe must be frozen by the caller (requires_grad_(False)); the gradient flows into z, i.e. into θ.
    """
    logits = probe(z)
    y = torch.full((logits.size(0),), int(target), dtype=torch.long, device=logits.device)
    return F.cross_entropy(logits, y)
