"""MCQ accuracy: letter log-likelihood at the last real position, any padding side; chance vs fitted."""

import pytest
import torch

from prism.evaluation.mcq import letter_tokens, mcq_accuracy, mcq_letter_logprobs, mcq_prompt

NAMES = ["Alva Quint", "Bero Tansk", "Morrowick", "Hessel Fold", "the lamplighter", "the glassblower", "the fox", "the dog"]


def _items(n: int) -> list[dict]:
    """Short, distinct questions (so a 2-layer model can memorise them fast); gold letters balanced A-D."""
    return [
        {"question": f"{NAMES[i % len(NAMES)]} {i}?", "choices": ["Morrowick", "Hessel", "glass", "1822"], "answer": i % 4}
        for i in range(n)
    ]


def test_prompt_format():
    assert mcq_prompt("Q?", ["w", "x", "y", "z"]) == "Question: Q?\nA. w\nB. x\nC. y\nD. z\nAnswer:"
    with pytest.raises(ValueError):
        mcq_prompt("Q?", ["a", "b"])


def test_padding_side_does_not_matter(tiny_model, tiny_tokenizer):
    items = _items(6)
    tiny_tokenizer.padding_side = "right"
    right = mcq_letter_logprobs(tiny_model, tiny_tokenizer, items, batch_size=6)
    tiny_tokenizer.padding_side = "left"
    left = mcq_letter_logprobs(tiny_model, tiny_tokenizer, items, batch_size=6)
    tiny_tokenizer.padding_side = "right"
    single = torch.cat([mcq_letter_logprobs(tiny_model, tiny_tokenizer, [it], batch_size=1) for it in items])
    assert right.shape == (6, 4)
    torch.testing.assert_close(right, single, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(left, single, atol=1e-4, rtol=1e-4)


def test_random_model_near_chance(tiny_model, tiny_tokenizer):
    acc = mcq_accuracy(tiny_model, tiny_tokenizer, _items(40), batch_size=16)
    assert 0.05 <= acc <= 0.5


def test_fitted_model_scores_one(tiny_model, tiny_tokenizer):
    items = _items(8)
    prefix, letters = letter_tokens(tiny_tokenizer)
    seqs = [tiny_tokenizer(mcq_prompt(it["question"], it["choices"]))["input_ids"] + prefix + [letters[it["answer"]]]
            for it in items]
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), tiny_tokenizer.pad_token_id)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, s in enumerate(seqs):
        ids[i, : len(s)], mask[i, : len(s)] = torch.tensor(s), 1
        labels[i, len(s) - 1] = s[-1]  # loss only on the answer letter
    torch.manual_seed(0)
    opt = torch.optim.Adam(tiny_model.parameters(), lr=1e-2)
    tiny_model.train()
    for _ in range(120):
        loss = tiny_model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert mcq_accuracy(tiny_model, tiny_tokenizer, items, batch_size=3) == 1.0
    assert tiny_model.training  # mode restored
