"""Metric definitions: ROUGE-L, KnowMem prompt/cut, AUROC convention, PrivLeak, Unlearn Score, MIA scores."""

import math
import zlib
from types import SimpleNamespace

import pytest
import torch

from prism.evaluation.metrics import cut_answer, knowmem_prompt, privleak, rouge_l, unlearn_score
from prism.evaluation.mia import TokenStats, auroc, min_k_score, mia_scores, scores_from_stats, token_logprobs_batched
from prism.evaluation.muse import evaluate_muse, metrics_from_records, shard


def test_rouge_l_identical_disjoint_and_partial():
    out = rouge_l(["the cat sat on the mat", "alpha beta", "the cat sat"], ["the cat sat on the mat", "gamma delta", "the cat sat on the mat"])
    assert out["f1"][0] == pytest.approx(1.0) and out["recall"][0] == pytest.approx(1.0)
    assert out["f1"][1] == 0.0 and out["recall"][1] == 0.0
    # LCS = 3 tokens: precision 3/3, recall 3/6, F1 = 2·1·0.5/1.5.
    assert out["recall"][2] == pytest.approx(0.5)
    assert out["f1"][2] == pytest.approx(2 / 3)


def test_rouge_l_length_mismatch_and_empty():
    with pytest.raises(ValueError):
        rouge_l(["a"], [])
    assert rouge_l([""], ["some answer"])["f1"] == [0.0]


def test_knowmem_prompt_exact():
    icl = [{"question": "Q1?", "answer": "A1"}, {"question": "Q2?", "answer": "A2"}]
    assert knowmem_prompt(icl, "Q3?") == "Question: Q1?\nAnswer: A1\n\nQuestion: Q2?\nAnswer: A2\n\nQuestion: Q3?\nAnswer: "
    assert knowmem_prompt([], "Q?") == "Question: Q?\nAnswer: "


@pytest.mark.parametrize(
    "text, expected",
    [
        (" Morrowick\n\nQuestion: next", "Morrowick"),
        ("Morrowick\nQuestion: next", "Morrowick"),
        ("Morrowick Question: x", "Morrowick"),
        ("  in 1822  ", "in 1822"),
        ("line one\nline two\n\nmore", "line one\nline two"),
        ("Question: at once", ""),
    ],
)
def test_cut_answer(text, expected):
    assert cut_answer(text) == expected


def test_auroc_muse_convention():
    low, high = [0.1, 0.2, 0.3], [5.0, 6.0, 7.0]
    # Memorised forget set: forget texts have LOW loss-like scores -> AUC 0 (MUSE target models: ~0).
    assert auroc(low, high) == pytest.approx(0.0)
    assert auroc(high, low) == pytest.approx(1.0)
    assert auroc([1.0, 2.0, 3.0], [1.0, 2.0, 3.0]) == pytest.approx(0.5)
    # One of four pairs has the forget score higher.
    assert auroc([1.0, 3.0], [2.0, 4.0]) == pytest.approx(0.25)
    # Large losses must not saturate into ties.
    assert auroc([40.0, 41.0], [50.0, 51.0]) == pytest.approx(0.0)
    # Non-finite scores are dropped.
    assert auroc([1.0, math.nan], [2.0]) == pytest.approx(0.0)


def test_privleak_sign():
    assert privleak(0.006, 0.4772) < -98  # memorised: strongly negative, like MUSE News target (-98.7)
    assert privleak(0.4772, 0.4772) == 0.0
    assert privleak(0.75, 0.5) == pytest.approx(50.0)
    with pytest.raises(ValueError):
        privleak(0.5, 0.0)


TARGET = {"verbmem_f": 58.3, "knowmem_f": 62.9, "knowmem_r": 54.3, "privleak": -98.7}


def test_unlearn_score_perfect_and_failures():
    perfect = {"verbmem_f": 0.0, "knowmem_f": 0.0, "knowmem_r": 54.3, "privleak": 0.0}
    assert unlearn_score(perfect, TARGET) == pytest.approx(1.0)
    assert unlearn_score(dict(perfect, knowmem_r=80.0), TARGET) == pytest.approx(1.0)  # utility clipped at 1
    assert unlearn_score(TARGET, TARGET) == 0.0  # nothing unlearned
    for key, bad in [("knowmem_r", 0.0), ("knowmem_f", 62.9), ("verbmem_f", 70.0), ("privleak", 100.0), ("privleak", -150.0)]:
        assert unlearn_score(dict(perfect, **{key: bad}), TARGET) == 0.0, key


def test_unlearn_score_formula():
    m = {"verbmem_f": 29.15, "knowmem_f": 31.45, "knowmem_r": 27.15, "privleak": -50.0}
    expected = (0.5 * math.sqrt(0.5 * 0.5) * 0.5) ** (1 / 3)
    assert unlearn_score(m, TARGET) == pytest.approx(expected)
    better = dict(m, knowmem_r=40.0)
    assert unlearn_score(better, TARGET) > unlearn_score(m, TARGET)


def test_min_k_on_hand_made_logprobs():
    logp = torch.tensor([-0.1, -5.0, -0.2, -3.0, -0.3])
    # 40% of 5 tokens = 2 lowest: -5 and -3 -> score 4.
    assert min_k_score(logp, 0.4) == pytest.approx(4.0)
    # Fewer than one token still uses one.
    assert min_k_score(logp, 0.01) == pytest.approx(5.0)
    assert min_k_score(logp, 1.0) == pytest.approx(1.72)
    assert math.isnan(min_k_score(torch.tensor([]), 0.4))


def test_scores_from_stats():
    logp = torch.tensor([-1.0, -2.0, -3.0, -4.0])
    mu = torch.tensor([-1.0, -1.0, -1.0, -1.0])
    sigma = torch.tensor([1.0, 1.0, 2.0, 0.5])
    s = scores_from_stats([TokenStats(logp, mu, sigma)], ["hello hello"], k=0.5)
    assert s["loss"][0] == pytest.approx(2.5)
    assert s["zlib"][0] == pytest.approx(2.5 / len(zlib.compress(b"hello hello")))
    assert s["min_k"][0] == pytest.approx(3.5)
    # z = [0, -1, -1, -6]; lowest 2 = -6, -1.
    assert s["min_k_pp"][0] == pytest.approx(3.5)


def test_token_stats_batched_match_single_and_definition(tiny_model, tiny_tokenizer):
    texts = ["Alva Quint was born in 1822 in Morrowick.", "The quick brown fox", "Bero Tansk"]
    batched = token_logprobs_batched(tiny_model, tiny_tokenizer, texts, batch_size=3)
    single = [token_logprobs_batched(tiny_model, tiny_tokenizer, [t], batch_size=1)[0] for t in texts]
    for b, s, t in zip(batched, single, texts):
        n = len(tiny_tokenizer(t)["input_ids"])
        assert b.logp.shape == (n - 1,)
        torch.testing.assert_close(b.logp, s.logp, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(b.mu, s.mu, atol=1e-5, rtol=1e-5)
    # mu/sigma are the mean/std of log p under the model's own distribution.
    ids = torch.tensor([tiny_tokenizer(texts[0])["input_ids"]])
    with torch.no_grad():
        lp = torch.log_softmax(tiny_model(ids).logits[0, :-1], -1)
    p = lp.exp()
    mu = (p * lp).sum(-1)
    sd = ((p * (lp - mu[:, None]) ** 2).sum(-1)).sqrt()
    torch.testing.assert_close(batched[0].mu, mu, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(batched[0].sigma, sd, atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(batched[0].logp, lp.gather(-1, ids[0, 1:, None]).squeeze(-1), atol=1e-5, rtol=1e-5)
    assert tiny_tokenizer.padding_side == "right" and tiny_model.training


def test_mia_scores_rank_trained_text_as_member(tiny_model, tiny_tokenizer):
    """After fitting a few texts, their loss-like scores drop below unseen texts: AUC (MUSE) near 0."""
    members = ["Alva Quint was born in 1822 in Morrowick.", "Bero Tansk was a glassblower in Hessel Fold."]
    others = ["The quick brown fox jumps over the lazy dog.", "0123456789 0123456789"]
    torch.manual_seed(0)
    opt = torch.optim.Adam(tiny_model.parameters(), lr=1e-2)
    enc = tiny_tokenizer(members, return_tensors="pt", padding=True)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    tiny_model.train()
    for _ in range(30):
        loss = tiny_model(**enc, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    s_mem = mia_scores(tiny_model, tiny_tokenizer, members, batch_size=2)
    s_oth = mia_scores(tiny_model, tiny_tokenizer, others, batch_size=2)
    for name in ("loss", "zlib", "min_k", "min_k_pp"):
        assert s_mem[name].shape == (2,)
        assert auroc(s_mem[name], s_oth[name]) == pytest.approx(0.0), name


def test_shard_partitions():
    items = list(range(10))
    parts = [shard(items, r, 3) for r in range(3)]
    assert sorted(sum(parts, [])) == items
    with pytest.raises(ValueError):
        shard(items, 3, 3)


def _bench():
    return SimpleNamespace(
        verbmem_forget=[
            {"prompt": "Alva Quint was born", "gt": " in 1822 in Morrowick and worked as a lamplighter."},
            {"prompt": "The quick brown", "gt": " fox jumps over the lazy dog."},
            {"prompt": "Bero Tansk", "gt": " was born in 1790."},
        ],
        knowmem={
            "forget_qa": [{"question": "Where was Alva Quint born?", "answer": "Morrowick"}] * 2,
            "retain_qa": [{"question": "What did Bero Tansk do?", "answer": "glassblower"}] * 3,
            "forget_qa_icl": [{"question": "What did Bero Tansk do?", "answer": "glassblower"}],
            "retain_qa_icl": [{"question": "Where was Alva Quint born?", "answer": "Morrowick"}],
        },
        privleak={
            "forget": ["Alva Quint was born in 1822.", "Morrowick lamplighter", "Quint 1822"],
            "holdout": ["The quick brown fox.", "0123456789", "lazy dog"],
        },
    )


def test_evaluate_muse_keys_and_sharding(tiny_model, tiny_tokenizer):
    bench = _bench()
    kw = dict(batch_size=2, max_new_tokens_verbmem=6, max_new_tokens_knowmem=4)
    metrics, records = evaluate_muse(tiny_model, tiny_tokenizer, bench, **kw)
    for key in ("verbmem_f", "knowmem_f", "knowmem_r", "knowmem_f_recall", "knowmem_r_recall", "auc", "privleak",
                "auc_loss", "auc_zlib", "auc_min_k_pp"):
        assert isinstance(metrics[key], float), key
    assert metrics["privleak"] == pytest.approx(privleak(metrics["auc"], 0.5))
    gens = [r for r in records if r["task"] == "verbmem_f"]
    assert len(gens) == 3 and set(gens[0]) >= {"task", "prompt", "output", "reference", "rouge_f1", "rouge_recall"}
    # VerbMem reference is the gt cut to max_new_tokens_verbmem tokens.
    assert len(tiny_tokenizer(gens[0]["reference"], add_special_tokens=False)["input_ids"]) <= 6
    # Two shards gathered give the same metrics as one pass.
    shards = [evaluate_muse(tiny_model, tiny_tokenizer, bench, rank=r, world=2, **kw)[1] for r in range(2)]
    merged = metrics_from_records(shards[0] + shards[1])
    assert merged.keys() == metrics.keys()
    for k in metrics:
        assert merged[k] == pytest.approx(metrics[k], abs=1e-6), k
    # limit keeps the first examples of each list.
    m1, r1 = evaluate_muse(tiny_model, tiny_tokenizer, bench, limit=1, **kw)
    assert sum(r["task"] == "knowmem_r" for r in r1) == 1 and "auc" in m1
