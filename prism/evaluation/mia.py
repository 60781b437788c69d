"""Membership-inference scores (LOSS, zlib, Min-K%, Min-K%++) and MUSE's AUROC convention for PrivLeak.

Sign convention: every score is loss-like — HIGHER score = more likely a NON-member (the model finds the text less
likely). A model that memorised a text gives it a low score.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torchmetrics.functional.classification import binary_auroc
from tqdm.auto import tqdm

SCORE_NAMES: tuple[str, ...] = ("loss", "zlib", "min_k", "min_k_pp")


@dataclass
class TokenStats:
    """Per predicted token of one text (length T−1 for T tokens): log p(x_t), and μ_t, σ_t of log p under the
    model's own next-token distribution at that position (what Min-K%++ normalises by)."""

    logp: torch.Tensor
    mu: torch.Tensor
    sigma: torch.Tensor


def token_logprobs_batched(
    model, tokenizer, texts: Sequence[str], batch_size: int = 8, max_length: int = 2048, progress: bool = False
) -> list[TokenStats]:
    """One forward per batch (right padding, truncated to `max_length` tokens); stats moved to CPU as float32.

    μ_t = Σ_v p_v log p_v and σ_t = sqrt(Σ_v p_v (log p_v)² − μ_t²) over the vocabulary at each position.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    old_side, old_pad = tokenizer.padding_side, tokenizer.pad_token
    tokenizer.padding_side = "right"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    out: list[TokenStats] = []
    try:
        with torch.inference_mode():
            starts = range(0, len(texts), batch_size)
            for s in tqdm(starts, desc="mia", disable=not progress, leave=False):
                chunk = list(texts[s : s + batch_size])
                enc = tokenizer(chunk, return_tensors="pt", padding=True, truncation=True, max_length=max_length)
                enc = enc.to(device)
                logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
                lengths = enc["attention_mask"].sum(dim=1).tolist()
                for i, n in enumerate(lengths):
                    # Per row: keeps the float32 vocab-sized temporaries to one sequence at a time.
                    logp_all = torch.log_softmax(logits[i, : n - 1].float(), dim=-1)
                    target = enc["input_ids"][i, 1:n]
                    logp = logp_all.gather(-1, target[:, None]).squeeze(-1)
                    p = logp_all.exp()
                    mu = (p * logp_all).sum(-1)
                    var = (p * logp_all.square()).sum(-1) - mu.square()
                    out.append(TokenStats(logp.cpu(), mu.cpu(), var.clamp_min(0).sqrt().cpu()))
    finally:
        tokenizer.padding_side = old_side
        if old_pad is None:
            tokenizer.pad_token = None
        model.train(was_training)
    return out


def min_k_score(values: torch.Tensor, k: float = 0.4) -> float:
    """−mean of the lowest `k` fraction of per-token values (at least one token); nan for an empty tensor."""
    if values.numel() == 0:
        return math.nan
    n = max(1, int(values.numel() * k))
    return -float(torch.topk(values.float(), n, largest=False).values.mean())


def scores_from_stats(stats: Sequence[TokenStats], texts: Sequence[str], k: float = 0.4) -> dict[str, torch.Tensor]:
    """LOSS (mean NLL), zlib (loss / zlib-compressed UTF-8 byte length), Min-K% and Min-K%++; all loss-like."""
    rows: dict[str, list[float]] = {name: [] for name in SCORE_NAMES}
    for st, text in zip(stats, texts, strict=True):
        loss = -float(st.logp.mean()) if st.logp.numel() else math.nan
        rows["loss"].append(loss)
        rows["zlib"].append(loss / len(zlib.compress(text.encode("utf-8"))))
        rows["min_k"].append(min_k_score(st.logp, k))
        rows["min_k_pp"].append(min_k_score((st.logp - st.mu) / st.sigma.clamp_min(1e-6), k))
    return {name: torch.tensor(v, dtype=torch.float64) for name, v in rows.items()}


def mia_scores(
    model, tokenizer, texts: Sequence[str], batch_size: int = 8, max_length: int = 2048, k: float = 0.4,
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """Scores name -> Tensor[N] for `texts` (loss, zlib, min_k, min_k_pp); higher = more likely a non-member."""
    stats = token_logprobs_batched(model, tokenizer, texts, batch_size, max_length, progress)
    return scores_from_stats(stats, texts, k)


def auroc(forget_scores: torch.Tensor | Sequence[float], holdout_scores: torch.Tensor | Sequence[float]) -> float:
    """AUROC in MUSE's convention: the probability that a FORGET text gets the higher (more non-member) score than
    a holdout text (ties count ½).

    MUSE labels forget 0 and holdout 1 and ranks by −score; with loss-like scores that is the same as labelling
    forget 1 on the scores themselves. So a model that memorised the forget set (low forget scores) has AUC near 0
    (MUSE News target: 0.006 → PrivLeak −98.7), a model that never saw it ≈ 0.5 (retrained News: 0.477), and a
    model pushed past "never seen" has AUC above the reference. Non-finite scores are dropped.
    """
    f = torch.as_tensor(forget_scores, dtype=torch.float64).flatten()
    h = torch.as_tensor(holdout_scores, dtype=torch.float64).flatten()
    f, h = f[torch.isfinite(f)], h[torch.isfinite(h)]
    if f.numel() == 0 or h.numel() == 0:
        raise ValueError("auroc needs at least one finite forget score and one finite holdout score")
    scores = torch.cat([f, h])
    # binary_auroc squashes scores outside [0, 1] with a sigmoid, which saturates (ties) for large losses: pass
    # dense ranks scaled to [0, 1] instead — same order, same ties, same AUC.
    uniq, ranks = torch.unique(scores, sorted=True, return_inverse=True)
    preds = ranks.double() / max(1, uniq.numel() - 1)
    target = torch.cat([torch.ones_like(f, dtype=torch.long), torch.zeros_like(h, dtype=torch.long)])
    return float(binary_auroc(preds, target))
