"""Batched greedy generation = one prompt at a time (shared-prefix cache too), order restored, stop strings."""

import pytest
import torch

from prism.evaluation.generation import (
    StopOnStrings,
    cut_at_stop,
    generate,
    generate_ids,
)

PROMPTS = [
    "Question: Where",
    "Alva Quint was born in 1822 in Morrowick and worked as",
    "The quick",
    "Bero Tansk was born in 1790 in Hessel Fold",
    "0123",
]


@pytest.fixture()
def varied_model(tiny_model):
    """The tiny random model with larger weights, so greedy outputs vary by prompt instead of repeating a token."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in tiny_model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    return tiny_model


def test_batched_equals_one_at_a_time(varied_model, tiny_tokenizer):
    batched = generate_ids(varied_model, tiny_tokenizer, PROMPTS, 12, batch_size=5, stop=None)
    mixed = generate_ids(varied_model, tiny_tokenizer, PROMPTS, 12, batch_size=2, stop=None)
    single = [generate_ids(varied_model, tiny_tokenizer, [p], 12, batch_size=1, stop=None)[0] for p in PROMPTS]
    assert batched == single
    assert mixed == single
    assert len({tuple(x) for x in single}) > 1  # outputs differ by prompt, so order restoring is tested
    assert all(len(x) == 12 for x in single)  # no eos in this random model: full length


def test_one_generate_call_per_batch(varied_model, tiny_tokenizer, monkeypatch):
    calls = []
    real = varied_model.generate

    def spy(*args, **kwargs):
        calls.append(kwargs["input_ids"].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(varied_model, "generate", spy)
    generate(varied_model, tiny_tokenizer, PROMPTS, 3, batch_size=2)
    assert len(calls) == 3
    # Longest prompts first, each batch padded only to its own longest prompt.
    lengths = sorted((len(tiny_tokenizer(p)["input_ids"]) for p in PROMPTS), reverse=True)
    assert [c[1] for c in calls] == [lengths[0], lengths[2], lengths[4]]


def test_text_is_new_tokens_cut_at_stop(varied_model, tiny_tokenizer):
    full = generate(varied_model, tiny_tokenizer, PROMPTS, 12, batch_size=5, stop=None)
    ids = generate_ids(varied_model, tiny_tokenizer, PROMPTS, 12, batch_size=5, stop=None)
    assert full == [tiny_tokenizer.decode(x, skip_special_tokens=True) for x in ids]
    # Use a piece of the first output as a stop string: that output is cut before it.
    text = full[0]
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    assert stop and stop in text
    cut = generate(varied_model, tiny_tokenizer, PROMPTS[:1], 12, stop=(stop,))
    assert cut == [text[: text.find(stop)]]


def test_padding_side_and_mode_restored(tiny_model, tiny_tokenizer):
    tiny_tokenizer.padding_side = "right"
    tiny_model.train()
    generate(tiny_model, tiny_tokenizer, PROMPTS[:2], 2)
    assert tiny_tokenizer.padding_side == "right"
    assert tiny_model.training
    assert generate(tiny_model, tiny_tokenizer, [], 2) == []


def test_cut_at_stop_and_criteria(tiny_tokenizer):
    assert cut_at_stop("abc\n\ndef\nQuestion", ("\n\n", "\nQuestion")) == "abc"
    assert cut_at_stop("abc", None) == "abc"
    prompt = tiny_tokenizer("Alva")["input_ids"]
    done_ids = prompt + tiny_tokenizer(" born\n\nQuestion", add_special_tokens=False)["input_ids"]
    open_ids = prompt + tiny_tokenizer(" born in", add_special_tokens=False)["input_ids"]
    width = max(len(done_ids), len(open_ids))
    pad = tiny_tokenizer.pad_token_id
    batch = torch.tensor([[pad] * (width - len(x)) + x for x in (done_ids, open_ids)])
    crit = StopOnStrings(tiny_tokenizer, ("\n\n",), prompt_len=width - (len(done_ids) - len(prompt)), eos_ids={tiny_tokenizer.eos_token_id})
    assert crit(batch, None).tolist() == [True, False]
    eos_batch = torch.cat([batch, torch.tensor([[pad], [tiny_tokenizer.eos_token_id]])], dim=1)
    assert crit(eos_batch, None).tolist() == [True, True]


SHOTS = [
    "Question: Where was Alva Quint born?\nAnswer: Morrowick\n\n",
    "Question: What did Bero Tansk do?\nAnswer: glassblower\n\n",
]
SUFFIXES = ["Question: Where?\nAnswer: ", "Question: What did Alva Quint do in 1822?\nAnswer: ",
            "Question: Bero\nAnswer: ", "Question: Where was Bero Tansk born in Hessel Fold?\nAnswer: "]


def _spy_forwards(model, monkeypatch):
    """Record the input_ids shape of every model forward and the prefix length of every cached-prefix call."""
    import prism.evaluation.generation as g

    shapes, prefixes = [], []
    model.register_forward_pre_hook(lambda m, args, kw: shapes.append(tuple(kw["input_ids"].shape)), with_kwargs=True)
    real = g._prefix_cache

    def spy(model, prefix_ids, batch):
        prefixes.append((prefix_ids.shape[1], batch))
        return real(model, prefix_ids, batch)

    monkeypatch.setattr(g, "_prefix_cache", spy)
    return shapes, prefixes


def test_shared_prefix_is_cached_and_equals_one_at_a_time(varied_model, tiny_tokenizer, monkeypatch):
    prompts = ["".join(SHOTS) + s for s in SUFFIXES]
    single = [generate_ids(varied_model, tiny_tokenizer, [p], 12, batch_size=1, stop=None)[0] for p in prompts]
    shapes, prefixes = _spy_forwards(varied_model, monkeypatch)
    batched = generate_ids(varied_model, tiny_tokenizer, prompts, 12, batch_size=4, stop=None)
    assert batched == single
    assert len({tuple(x) for x in single}) > 1  # outputs depend on the suffix, so a wrong cache or position shows
    ids = [tiny_tokenizer(p)["input_ids"] for p in prompts]
    shots_len = len(tiny_tokenizer("".join(SHOTS))["input_ids"])
    assert len(prefixes) == 1
    prefix_len, batch = prefixes[0]
    assert batch == 4 and prefix_len >= shots_len
    assert all(x[:prefix_len] == ids[0][:prefix_len] for x in ids)
    # The prefix runs once at batch 1; generate's prefill then covers only [padding][suffix], then one token a step.
    width = max(len(x) for x in ids)
    assert shapes[0] == (1, prefix_len)
    assert shapes[1] == (4, width - prefix_len)
    assert shapes[2:] == [(4, 1)] * 11
    # The same batch without the cache gives the same tokens.
    monkeypatch.setattr("prism.evaluation.generation.PREFIX_CACHE_MIN_TOKENS", 10**6)
    assert generate_ids(varied_model, tiny_tokenizer, prompts, 12, batch_size=4, stop=None) == single
    assert len(prefixes) == 1


def test_two_prefix_groups_batched_apart_in_input_order(varied_model, tiny_tokenizer, monkeypatch):
    # Interleaved so that input order differs from run order: each few-shot group must get its own batch, even
    # when the batch size would fit more (a batch straddling both groups would share no prefix).
    prompts = [SHOTS[i % 2] * 2 + SUFFIXES[i % 4] + "x" * (i // 4) for i in range(6)]
    single = [generate_ids(varied_model, tiny_tokenizer, [p], 8, batch_size=1, stop=None)[0] for p in prompts]
    _, prefixes = _spy_forwards(varied_model, monkeypatch)
    batched = generate(varied_model, tiny_tokenizer, prompts, 8, batch_size=4, stop=("\n\n",))
    assert [b for _, b in prefixes] == [3, 3]
    blocks = sorted(len(tiny_tokenizer(shot * 2)["input_ids"]) for shot in SHOTS)
    assert all(n >= block for (n, _), block in zip(sorted(prefixes), blocks))  # each batch caches its own block
    assert batched == [cut_at_stop(tiny_tokenizer.decode(x, skip_special_tokens=True), ("\n\n",)) for x in single]
    assert generate_ids(varied_model, tiny_tokenizer, prompts, 8, batch_size=3, stop=None) == single
