"""Representation margins of a frozen probe (DESIGN.md section 3), as pure functions.

The margin of a feature z is the smallest perturbation ‖δ‖ (ℓ2 or ℓ∞) such that the probe says "harmful" at z + δ.
PRISM's probe term pushes forget representations into the harmless region; how far they sit from the harmful region
is the representation-space robustness the method claims, so larger margins on the forget set are better.

Conventions:
- decision score f(z) = logit_harmful − logit_harmless; the probe says harmful iff f(z) > 0 (argmax ties go to the
  harmless class, as `torch.argmax` returns the first maximum). A feature already classified harmful has margin 0.
- space "raw": δ perturbs the pooled feature z itself (the probe's standardisation is part of the probe);
  space "standardized": δ perturbs u = (z − mean)/std, the space in which stage 1's FGSM radius ε is measured.
- linear probe: f is affine in z, f(z) = a·z + c, so the margin is exact: max(0, −f(z)) / ‖a‖_*, with the dual norm
  ‖·‖_* (ℓ2 → ℓ2, ℓ∞ → ℓ1).
- any probe: a binary search of the radius t along the steepest-ascent direction d of f at z for the chosen norm
  (ℓ2: ∇f/‖∇f‖₂, ℓ∞: sign ∇f; ‖t·d‖ = t in both cases). It returns the smallest radius found to flip the probe
  along that one direction: an upper bound of the true margin, exact for a linear probe. `inf` where no flip is
  found within `max_radius`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal

import torch

HARMLESS, HARMFUL = 0, 1
NORMS: tuple[str, ...] = ("l2", "linf")
Norm = Literal["l2", "linf"]
Space = Literal["raw", "standardized"]


def _check_norm(norm: str) -> None:
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")


def decision_score(logits: torch.Tensor) -> torch.Tensor:
    """f = logit_harmful − (largest other logit), shape [B]; the probe says harmful iff f > 0."""
    others = torch.cat([logits[:, :HARMFUL], logits[:, HARMFUL + 1 :]], dim=1)
    return logits[:, HARMFUL] - others.max(dim=1).values


def score_fn(probe, space: Space = "raw") -> Callable[[torch.Tensor], torch.Tensor]:
    """f as a function of the perturbed vector: z in raw space, u = (z − mean)/std in standardized space."""
    if space == "raw":
        return lambda z: decision_score(probe(z))
    if space == "standardized":
        return lambda u: decision_score(probe.net(u))
    raise ValueError(f"space must be 'raw' or 'standardized', got {space!r}")


def to_space(probe, z: torch.Tensor, space: Space = "raw") -> torch.Tensor:
    """The vector the margin perturbs: z itself, or the probe's standardised u."""
    return z.float() if space == "raw" else probe.normalize(z.float())


def linear_coefficients(probe, space: Space = "raw") -> tuple[torch.Tensor, torch.Tensor]:
    """(a [D], c []) with f(x) = a·x + c exactly, for a linear two-class probe (x = z or u, see `space`)."""
    if getattr(probe, "kind", None) != "linear" or getattr(probe, "num_classes", 2) != 2:
        raise ValueError("linear_coefficients needs a linear two-class probe")
    layer = probe.net[-1]
    w = (layer.weight[HARMFUL] - layer.weight[HARMLESS]).detach().double()
    b = (layer.bias[HARMFUL] - layer.bias[HARMLESS]).detach().double()
    if space == "standardized":
        return w, b
    # f(z) = w·(z − m)/s + b = (w/s)·z + (b − (w/s)·m)
    a = w / probe.std.detach().double()
    return a, b - (a * probe.mean.detach().double()).sum()


def linear_margin(x: torch.Tensor, a: torch.Tensor, c: torch.Tensor | float, norm: Norm = "l2") -> torch.Tensor:
    """Exact distance from each row of x [B, D] to {f > 0} for f(x) = a·x + c: max(0, −f)/‖a‖_* (float64, [B]).

    ‖a‖_* is the dual norm of `norm`: ℓ2 for ℓ2, ℓ1 for ℓ∞ (the ℓ∞-smallest step moves every coordinate by t along
    sign(a), raising f by t·‖a‖₁). inf when a = 0 and f ≤ 0 (nothing can flip the probe).
    """
    _check_norm(norm)
    a = a.double()
    f = x.double() @ a + torch.as_tensor(c, dtype=torch.float64)
    dual = a.norm(p=2) if norm == "l2" else a.abs().sum()
    need = (-f).clamp_min(0.0)
    if float(dual) == 0.0:
        return torch.where(need > 0, torch.full_like(need, math.inf), torch.zeros_like(need))
    return need / dual


def search_margin(
    score: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    norm: Norm = "l2",
    steps: int = 50,
    max_radius: float = 1e6,
) -> torch.Tensor:
    """Smallest radius t that flips f(x + t·d) > 0 along the steepest-ascent direction d of f at x, per row [B].

    Bracketing starts from the first-order estimate −f/‖∇f‖_* and doubles until the probe flips (or t > max_radius:
    inf); then `steps` bisections. Returns the upper end of the final bracket (a radius that does flip), so
    returned margins are achievable perturbations; 0 where f(x) > 0 already.
    """
    _check_norm(norm)
    x = x.detach().float()
    with torch.enable_grad():
        x_ = x.clone().requires_grad_(True)
        f0 = score(x_)
        (g,) = torch.autograd.grad(f0.sum(), x_)
    f0 = f0.detach()
    if norm == "l2":
        gnorm = g.norm(dim=1, keepdim=True)
        d = torch.where(gnorm > 0, g / gnorm.clamp_min(1e-30), torch.zeros_like(g))
        dual = gnorm.squeeze(1)
    else:
        d, dual = g.sign(), g.abs().sum(dim=1)

    @torch.no_grad()
    def flips(t: torch.Tensor) -> torch.Tensor:
        return score(x + t[:, None] * d) > 0

    done = f0 > 0
    lo = torch.zeros_like(f0)
    hi = torch.where(dual > 0, (-f0).clamp_min(0) / dual.clamp_min(1e-30), torch.ones_like(f0))
    hi = hi.clamp(min=1e-12, max=max_radius)
    ok = done | flips(hi)
    while not bool(ok.all()):
        grow = ~ok & (hi < max_radius)
        if not bool(grow.any()):
            break
        lo = torch.where(grow, hi, lo)
        hi = torch.where(grow, (hi * 2).clamp(max=max_radius), hi)
        ok = ok | (grow & flips(hi))
    for _ in range(steps):
        mid = (lo + hi) / 2
        f_mid = flips(mid)
        hi = torch.where(f_mid, mid, hi)
        lo = torch.where(f_mid, lo, mid)
    out = torch.where(ok, hi, torch.full_like(hi, math.inf))
    return torch.where(done, torch.zeros_like(out), out).double()


def probe_margins(
    probe,
    z: torch.Tensor,
    norm: Norm = "l2",
    space: Space = "raw",
    method: Literal["auto", "exact", "search"] = "auto",
    steps: int = 50,
    max_radius: float = 1e6,
) -> torch.Tensor:
    """Margins [B] of pooled features z [B, D] under the frozen probe: exact for a linear probe (method auto/exact),
    binary search otherwise."""
    x = to_space(probe, z.detach(), space)
    if method == "exact" or (method == "auto" and getattr(probe, "kind", None) == "linear"):
        a, c = linear_coefficients(probe, space)
        return linear_margin(x, a, c, norm)
    if method not in ("auto", "search"):
        raise ValueError(f"method must be auto, exact or search, got {method!r}")
    return search_margin(score_fn(probe, space), x, norm, steps, max_radius)


def quantile(values: Sequence[float] | torch.Tensor, q: float) -> float:
    """Linear-interpolation quantile that tolerates inf (an inf neighbour with positive weight gives inf)."""
    v = sorted(float(x) for x in (values.tolist() if isinstance(values, torch.Tensor) else values))
    if not v:
        return math.nan
    pos = q * (len(v) - 1)
    i, w = int(math.floor(pos)), pos - math.floor(pos)
    if w == 0 or i + 1 >= len(v) or v[i] == v[i + 1]:
        return v[i]
    return v[i] + w * (v[i + 1] - v[i])


def summarize(margins: torch.Tensor) -> dict[str, float | int | None]:
    """median, p10 (the paper's pair), mean over finite values, and counts; inf (no flip found) becomes None."""
    m = margins.double().flatten()
    finite = m[torch.isfinite(m)]

    def js(x: float) -> float | None:
        return None if not math.isfinite(x) else float(x)

    return {
        "median": js(quantile(m, 0.5)),
        "p10": js(quantile(m, 0.1)),
        "mean_finite": js(float(finite.mean())) if len(finite) else None,
        "min": js(float(m.min())) if len(m) else None,
        "n": int(len(m)),
        "n_already_harmful": int((m == 0).sum()),
        "n_not_flipped": int((~torch.isfinite(m)).sum()),
    }
