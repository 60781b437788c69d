"""Batched greedy generation with left padding: one `model.generate` call per batch, never per prompt.

Prompts are tokenised unpadded; those sharing a start (e.g. KnowMem's few-shot block) are batched only with each
other, batches run longest first, each is padded only to its own longest prompt, and outputs come back in input order.
When a batch's prompts share a prefix of at least PREFIX_CACHE_MIN_TOKENS tokens, that prefix is run once and its
KV cache repeated to the batch; generate then sees rows [prefix][padding][suffix], with the same positions and
outputs as plain left padding. A batch stops early once every sequence has produced eos or a stop string; the
returned text is cut at the first stop string.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm
from transformers import StoppingCriteria, StoppingCriteriaList

from prism.evaluation.metrics import KNOWMEM_STOP as DEFAULT_STOP
from prism.evaluation.metrics import cut_at_stop

# A batch whose prompts share at least this many leading tokens computes that prefix once (see _prefix_cache);
# below it the extra forward call is not worth it.
PREFIX_CACHE_MIN_TOKENS = 8


class StopOnStrings(StoppingCriteria):
    """Marks a sequence done when its new tokens contain a stop string or eos; generation ends when all are done.

    Only the tail of each sequence is decoded per step (stop strings are a few tokens long), and sequences already
    done are not decoded again, so the check costs little next to a forward pass.
    """

    def __init__(self, tokenizer, stop: Sequence[str], prompt_len: int, eos_ids: set[int], tail_tokens: int = 16):
        self.tokenizer, self.stop, self.prompt_len, self.eos_ids = tokenizer, tuple(stop), prompt_len, eos_ids
        self.tail_tokens = tail_tokens
        self.done: torch.Tensor | None = None

    def __call__(self, input_ids: torch.LongTensor, scores=None, **kwargs) -> torch.BoolTensor:
        if self.done is None:
            self.done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        new = input_ids[:, self.prompt_len :]
        for i in torch.nonzero(~self.done).flatten().tolist():
            if new.shape[1] and int(new[i, -1]) in self.eos_ids:
                self.done[i] = True
                continue
            tail = self.tokenizer.decode(new[i, -self.tail_tokens :], skip_special_tokens=True)
            if any(s in tail for s in self.stop):
                self.done[i] = True
        return self.done.clone()


def _eos_ids(model, tokenizer) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), getattr(model, "config", None), tokenizer):
        eos = getattr(source, "eos_token_id", None)
        if eos is None:
            continue
        ids.update(eos if isinstance(eos, (list, tuple)) else [eos])
    return {int(i) for i in ids}


def _prompt_ids(tokenizer, prompts: list[str], max_prompt_tokens: int | None) -> list[list[int]]:
    """Unpadded token ids per prompt, cut from the left to `max_prompt_tokens` (the tokenizer keeps special tokens)."""
    trunc = {"truncation": True, "max_length": max_prompt_tokens} if max_prompt_tokens else {}
    old_side = tokenizer.truncation_side
    tokenizer.truncation_side = "left"  # keep the end of a long prompt: it is what the continuation follows
    try:
        return tokenizer(prompts, **trunc)["input_ids"]
    finally:
        tokenizer.truncation_side = old_side


def _batches(rows: list[list[int]], batch_size: int) -> list[list[int]]:
    """Prompt indices per batch. Prompts sharing their first PREFIX_CACHE_MIN_TOKENS ids (a few-shot block) are
    batched only with each other, so every such batch shares a cached prefix (a batch straddling two blocks would
    prefill all its prompts in full); the other prompts are batched together. Batches run longest prompt first (an
    out-of-memory batch shows up at once, not at the end of a long run), and prompts inside a batch are of similar
    length (less padding)."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, r in enumerate(rows):
        groups.setdefault(tuple(r[:PREFIX_CACHE_MIN_TOKENS]), []).append(i)
    shared = [g for g in groups.values() if len(g) > 1]
    rest = [i for g in groups.values() if len(g) == 1 for i in g]
    batches = []
    for group in [*shared, rest]:
        group = sorted(group, key=lambda i: -len(rows[i]))
        batches += [group[j : j + batch_size] for j in range(0, len(group), batch_size)]
    return sorted(batches, key=lambda b: -len(rows[b[0]]))


def _shared_prefix_len(rows: list[list[int]]) -> int:
    """Length of the prefix to cache for a batch: the longest common prefix, leaving every row at least one token
    (its last prompt token must go through `generate` to give the first new token's logits); 0 when below
    PREFIX_CACHE_MIN_TOKENS or for a single prompt, where splitting the prefill saves nothing."""
    if len(rows) < 2:
        return 0
    n, first = min(len(r) for r in rows) - 1, rows[0]
    k = next((j for j in range(n) if any(r[j] != first[j] for r in rows)), n)
    return k if k >= PREFIX_CACHE_MIN_TOKENS else 0


def _batch_tensors(rows: list[list[int]], prefix_len: int, pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Input ids laid out [prefix][left padding][suffix] per row, and the attention mask (0 on the padding).

    With prefix_len 0 this is plain left padding. generate derives position ids from the mask's cumsum, so each
    suffix gets the positions it has unpadded, and the cached prefix sits at positions 0..prefix_len-1 in every row.
    """
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, r in enumerate(rows):
        start = width - (len(r) - prefix_len)
        ids[b, :prefix_len], ids[b, start:] = torch.tensor(r[:prefix_len]), torch.tensor(r[prefix_len:])
        mask[b, :prefix_len], mask[b, start:] = 1, 1
    return ids.to(device), mask.to(device)


def _prefix_cache(model, prefix_ids: torch.Tensor, batch: int):
    """KV cache of a prefix every row of the batch shares: one batch-1 forward, repeated to `batch` rows.

    generate, given this cache and the full input rows, feeds the model only the ids after the cached length.
    """
    cache = model(input_ids=prefix_ids, use_cache=True, logits_to_keep=1).cache
    cache.batch_repeat_interleave(batch)
    return cache


def generate_ids(
    model,
    tokenizer,
    prompts: list[str],
    max_new_tokens: int,
    batch_size: int = 16,
    stop: Sequence[str] | None = DEFAULT_STOP,
    progress: bool = False,
    max_prompt_tokens: int | None = None,
) -> list[list[int]]:
    """Greedy new-token ids per prompt, in input order, cut before the first eos (stop strings are not cut here)."""
    if not prompts:
        return []
    device = next(model.parameters()).device
    eos_ids = _eos_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    out: list[list[int] | None] = [None] * len(prompts)
    rows = _prompt_ids(tokenizer, prompts, max_prompt_tokens)
    batches = _batches(rows, batch_size)
    with torch.inference_mode():
        for idx in tqdm(batches, desc="generate", disable=not progress, leave=False):
            batch_rows = [rows[i] for i in idx]
            prefix_len = _shared_prefix_len(batch_rows)
            ids, mask = _batch_tensors(batch_rows, prefix_len, pad_id, device)
            prompt_len = ids.shape[1]  # generate returns the full input rows, cached prefix included
            cache = {"cache": _prefix_cache(model, ids[:1, :prefix_len], len(idx))} if prefix_len else {}
            criteria = StoppingCriteriaList([StopOnStrings(tokenizer, stop, prompt_len, eos_ids)] if stop else [])
            gen = model.generate(
                input_ids=ids,
                attention_mask=mask,
                **cache,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,
                temperature=None,
                top_p=None,
                top_k=None,
                pad_token_id=pad_id,
                eos_token_id=sorted(eos_ids) or None,
                stopping_criteria=criteria,
            )
            for row, i in zip(gen[:, prompt_len:].tolist(), idx):
                cut = next((j for j, t in enumerate(row) if t in eos_ids), len(row))
                out[i] = row[:cut]
    model.train(was_training)
    return out  # type: ignore[return-value]


def generate(
    model,
    tokenizer,
    prompts: list[str],
    max_new_tokens: int,
    batch_size: int = 16,
    stop: Sequence[str] | None = DEFAULT_STOP,
    progress: bool = False,
    max_prompt_tokens: int | None = None,
) -> list[str]:
    """Greedy continuations of `prompts` (new text only, cut at the first stop string), in input order."""
    ids = generate_ids(model, tokenizer, prompts, max_new_tokens, batch_size, stop, progress, max_prompt_tokens)
    return [cut_at_stop(tokenizer.decode(row, skip_special_tokens=True), stop) for row in ids]
