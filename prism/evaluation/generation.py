"""Batched greedy generation with left padding: one `model.generate` call per batch, never per prompt.

Prompts are sorted by token length so each batch pads to a similar length (less wasted compute), each batch is
padded only to its own longest prompt, and outputs are restored to input order. Generation of a batch stops early
once every sequence has produced eos or one of the stop strings; the returned text is cut at the first stop string.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm
from transformers import StoppingCriteria, StoppingCriteriaList

DEFAULT_STOP: tuple[str, ...] = ("\n\n", "\nQuestion", "Question:")


def cut_at_stop(text: str, stop: Sequence[str] | None) -> str:
    """Cut `text` at the earliest occurrence of any stop string (no stripping)."""
    if not stop:
        return text
    cut = len(text)
    for s in stop:
        i = text.find(s)
        if i != -1:
            cut = min(cut, i)
    return text[:cut]


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


@contextlib.contextmanager
def _padding(tokenizer, side: str):
    """Temporarily set the padding side (and a pad token, eos when missing); restore both afterwards."""
    old_side, old_pad = tokenizer.padding_side, tokenizer.pad_token
    tokenizer.padding_side = side
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    try:
        yield tokenizer
    finally:
        tokenizer.padding_side = old_side
        if old_pad is None:
            tokenizer.pad_token = None


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
    was_training = model.training
    model.eval()
    out: list[list[int] | None] = [None] * len(prompts)
    with _padding(tokenizer, "left"), torch.inference_mode():
        lengths = [len(ids) for ids in tokenizer(prompts)["input_ids"]]
        # Longest first: an out-of-memory batch shows up at once, not at the end of a long run.
        order = sorted(range(len(prompts)), key=lambda i: -lengths[i])
        batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        trunc = {"truncation": True, "max_length": max_prompt_tokens} if max_prompt_tokens else {}
        old_trunc_side = tokenizer.truncation_side
        tokenizer.truncation_side = "left"  # keep the end of a long prompt: it is what the continuation follows
        try:
            for idx in tqdm(batches, desc="generate", disable=not progress, leave=False):
                enc = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True, **trunc).to(device)
                prompt_len = enc["input_ids"].shape[1]
                criteria = StoppingCriteriaList(
                    [StopOnStrings(tokenizer, stop, prompt_len, eos_ids)] if stop else []
                )
                gen = model.generate(
                    **enc,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    num_beams=1,
                    temperature=None,
                    top_p=None,
                    top_k=None,
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=sorted(eos_ids) or None,
                    stopping_criteria=criteria,
                )
                for row, i in zip(gen[:, prompt_len:].tolist(), idx):
                    cut = next((j for j, t in enumerate(row) if t in eos_ids), len(row))
                    out[i] = row[:cut]
        finally:
            tokenizer.truncation_side = old_trunc_side
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
