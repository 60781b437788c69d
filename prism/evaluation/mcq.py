"""Multiple-choice accuracy (WMDP, MMLU format): argmax of the answer letter's next-token log-likelihood."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from tqdm.auto import tqdm

LETTERS: tuple[str, ...] = ("A", "B", "C", "D")


def mcq_prompt(question: str, choices: Sequence[str]) -> str:
    """`Question: q\\nA. c0\\nB. c1\\nC. c2\\nD. c3\\nAnswer:` — the letter follows as ` A` … ` D`."""
    if len(choices) != len(LETTERS):
        raise ValueError(f"expected {len(LETTERS)} choices, got {len(choices)}")
    lines = [f"Question: {question}"] + [f"{letter}. {c}" for letter, c in zip(LETTERS, choices)]
    return "\n".join(lines) + "\nAnswer:"


def letter_tokens(tokenizer) -> tuple[list[int], list[int]]:
    """(shared prefix ids, one distinguishing id per letter) for " A" … " D".

    Most tokenizers encode " A" as one token (empty prefix). If a tokenizer splits off the space, the shared
    prefix is appended to the prompt and the letters are compared at the first token where they differ.
    """
    encs = [tokenizer(f" {letter}", add_special_tokens=False)["input_ids"] for letter in LETTERS]
    p = 0
    while all(len(e) > p for e in encs) and len({e[p] for e in encs}) == 1:
        p += 1
    if any(len(e) <= p for e in encs):
        raise ValueError("the tokenizer cannot tell the answer letters A-D apart")
    firsts = [e[p] for e in encs]
    if len(set(firsts)) != len(LETTERS):
        raise ValueError("the tokenizer cannot tell the answer letters A-D apart by one token")
    return list(encs[0][:p]), firsts


def mcq_letter_logprobs(model, tokenizer, items: Sequence[Mapping], batch_size: int = 16, progress: bool = False) -> torch.Tensor:
    """Tensor[N, 4] of log p(letter | prompt) (normalised over the vocabulary), one batched forward per batch."""
    prefix, letter_ids = letter_tokens(tokenizer)
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    left = tokenizer.padding_side == "left"
    was_training = model.training
    model.eval()
    rows: list[torch.Tensor] = []
    try:
        with torch.inference_mode():
            for s in tqdm(range(0, len(items), batch_size), desc="mcq", disable=not progress, leave=False):
                chunk = items[s : s + batch_size]
                seqs = [tokenizer(mcq_prompt(it["question"], it["choices"]))["input_ids"] + prefix for it in chunk]
                width = max(len(x) for x in seqs)
                ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
                mask = torch.zeros((len(seqs), width), dtype=torch.long)
                for i, x in enumerate(seqs):
                    sl = slice(width - len(x), width) if left else slice(0, len(x))
                    ids[i, sl], mask[i, sl] = torch.tensor(x), 1
                ids, mask = ids.to(device), mask.to(device)
                positions = (mask.cumsum(1) - 1).clamp_min(0)
                logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
                # The last real token is the highest position with mask 1, whatever the padding side.
                last = (mask * torch.arange(width, device=device)).argmax(dim=1)
                logp = torch.log_softmax(logits[torch.arange(len(seqs), device=device), last].float(), dim=-1)
                rows.append(logp[:, letter_ids].cpu())
    finally:
        model.train(was_training)
    return torch.cat(rows) if rows else torch.empty(0, len(LETTERS))


def mcq_accuracy(model, tokenizer, items: Sequence[Mapping], batch_size: int = 16, progress: bool = False) -> float:
    """Fraction of items whose gold letter (`answer`: int index 0-3) has the highest log-likelihood."""
    if not items:
        raise ValueError("mcq_accuracy needs at least one item")
    logp = mcq_letter_logprobs(model, tokenizer, items, batch_size, progress)
    gold = torch.tensor([int(it["answer"]) for it in items])
    return float((logp.argmax(dim=1) == gold).float().mean())
