"""Pure loss functions for unlearning (DESIGN §1). Tensors in, scalar tensors out; no modules, no state.

Conventions: labels use -100 where there is no loss; causal shift: logits[:, :-1] predict labels[:, 1:].
Log-probabilities are computed in float32 whatever the model dtype, as HF does for its own loss.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position log p(label) after the causal shift: (logp[B, T-1], mask[B, T-1]); logp is 0 where mask is False.

    Uses cross_entropy (fused log-softmax + gather) rather than materialising a [B, T, V] log-softmax.
    """
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    mask = shift_labels != IGNORE_INDEX
    nll = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view_as(shift_labels)
    return -nll, mask


def sequence_logprob(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log π(y|x) per sequence: the SUM of token log-probs over labelled tokens, shape [B] (what NPO needs)."""
    logp, _ = token_logprobs(logits, labels)
    return logp.sum(dim=-1)


def nll(logits: torch.Tensor, labels: torch.Tensor, average: str = "token") -> torch.Tensor:
    """NLL of the labelled tokens. average="token": the mean over all labelled tokens of the batch, HF's
    `model(..., labels=...).loss`. average="sequence": each sequence's token mean, then the mean over sequences with
    a label, so a 3-token QA answer weighs as much as a 90-token passage.

    A batch with no labelled token gives 0 (HF gives nan), so an empty retain batch cannot poison a step.
    """
    logp, mask = token_logprobs(logits, labels)
    if average == "token":
        return -logp.sum() / mask.sum().clamp_min(1)
    if average != "sequence":
        raise ValueError(f"nll: average must be 'token' or 'sequence', got {average!r}")
    count = mask.sum(dim=-1)
    per_sequence = -logp.sum(dim=-1) / count.clamp_min(1)
    return per_sequence.sum() / (count > 0).sum().clamp_min(1)


def ga(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Gradient ascent on the forget set: minimise the negative NLL."""
    return -nll(logits, labels)


def npo(logp: torch.Tensor, ref_logp: torch.Tensor, beta: float = 0.1) -> torch.Tensor:
    """NPO: −(2/β)·mean log σ(−β·(log π_θ − log π_ref)) on SEQUENCE log-likelihoods [B] (not raw logits).

    `ref_logp` is a constant (cached before training), so it is detached here.
    """
    ratio = logp - ref_logp.detach().to(logp.dtype)
    return -(2.0 / beta) * F.logsigmoid(-beta * ratio).mean()


def simnpo(logits: torch.Tensor, labels: torch.Tensor, beta: float = 2.5, gamma: float = 0.0) -> torch.Tensor:
    """SimNPO (Fan et al. 2024): NPO without a reference, on the length-normalised log-likelihood.

    loss = −(2/β)·mean log σ(−β·(log π_θ(y|x)/|y|) − γ) = −(2/β)·mean log σ(β·NLL_avg − γ):
    the length-normalised NLL (with margin γ) takes the place of the log-ratio inside the NPO sigmoid.
    """
    logp, mask = token_logprobs(logits, labels)
    avg_logp = logp.sum(-1) / mask.sum(-1).clamp_min(1)
    return -(2.0 / beta) * F.logsigmoid(-beta * avg_logp - gamma).mean()


def kl_to_reference(logits: torch.Tensor, ref_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """KL(p_ref ‖ p_θ) per predicted position, averaged over labelled positions (causal shift applied).

    Direction: expectation under the REFERENCE (frozen) distribution, as in the KL retain loss of
    TOFU/MUSE baselines; it penalises θ for dropping mass where the reference model puts it.
    """
    mask = labels[:, 1:] != IGNORE_INDEX
    logq = F.log_softmax(logits[:, :-1, :].float(), dim=-1)  # θ
    logp = F.log_softmax(ref_logits[:, :-1, :].detach().float(), dim=-1)  # reference
    kl = (logp.exp() * (logp - logq)).sum(-1)  # [B, T-1]
    return (kl * mask).sum() / mask.sum().clamp_min(1)


def _masked_mse(acts: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean squared error over the hidden dim and the masked (real-token) positions only."""
    sq = (acts.float() - target.float()).pow(2).mean(-1)  # [B, T]
    if mask is None:
        return sq.mean()
    m = mask.to(sq.dtype)
    return (sq * m).sum() / m.sum().clamp_min(1)


def rmu_forget(acts: torch.Tensor, control_vec: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """RMU forget term: MSE of forget-text activations [B, T, D] to the control vector c·u ([D], already scaled)."""
    return _masked_mse(acts, control_vec.to(acts.device).expand_as(acts), mask)


def rmu_retain(acts: torch.Tensor, frozen_acts: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """RMU retain term: MSE of retain-text activations to those of the frozen model (weight α applied by the caller)."""
    return _masked_mse(acts, frozen_acts.detach(), mask)


def random_unit_vector(dim: int, seed: int = 0, device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The fixed random direction u of RMU: uniform [0,1)^dim (as in the RMU reference code), unit ℓ2 norm.

    Deterministic in `seed` and independent of the global RNG, so every rank and every resume agrees.
    """
    gen = torch.Generator().manual_seed(seed)
    u = torch.rand(dim, generator=gen, dtype=torch.float64)
    return (u / u.norm()).to(device=device, dtype=dtype)


def lambda_schedule(progress: float, lam_max: float) -> float:
    """Probe-term weight λ_t = λ_max·exp(−5(1−p)²), p = training progress clamped to [0, 1]."""
    p = min(max(float(progress), 0.0), 1.0)
    return lam_max * math.exp(-5.0 * (1.0 - p) ** 2)
