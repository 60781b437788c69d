"""The synthetic fictitious-knowledge benchmark: deterministic, disjoint by entity, answerable
from its passages, and readable by the real MUSE loader."""

import json
import re
from pathlib import Path

import pytest

from prism.data.formats import check, load_muse
from prism.data.synth import synthesize
from prism.errors import UserError

SPLITS = ("forget", "retain", "holdout", "forget_icl", "retain_icl")
INVENTED = ("first", "last", "town", "artefact", "companion")


def files_of(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    return synthesize(tmp_path_factory.mktemp("synth") / "bench", seed=3, n_forget=6, n_retain=5, n_holdout=4, n_icl=2)


def entities(root: Path) -> dict[str, list[dict]]:
    return json.loads((root / "entities.json").read_text())


def test_same_seed_byte_identical_different_seed_differs(tmp_path):
    a = files_of(synthesize(tmp_path / "a", seed=7))
    b = files_of(synthesize(tmp_path / "b", seed=7))
    c = files_of(synthesize(tmp_path / "c", seed=8))
    assert a == b and len(a) >= 12
    assert a.keys() == c.keys()
    assert a["raw/forget.json"] != c["raw/forget.json"] and a["knowmem/retain_qa.json"] != c["knowmem/retain_qa.json"]


def test_roundtrip_and_counts(bench):
    b = load_muse(bench)
    assert [len(b.raw[k]) for k in ("forget", "retain1", "holdout")] == [6, 5, 4]
    assert "retain2" not in b.raw
    assert b.privleak == {"forget": b.raw["forget"], "retain": b.raw["retain1"], "holdout": b.raw["holdout"]}
    assert len(b.knowmem["forget_qa_icl"]) == len(b.knowmem["retain_qa_icl"]) == 2
    assert 2 * 6 <= len(b.knowmem["forget_qa"]) <= 3 * 6 and 2 * 5 <= len(b.knowmem["retain_qa"]) <= 3 * 5
    counts = check("muse", bench)
    assert counts == b.counts()
    assert counts["raw/forget"] == 6 and counts["verbmem/forget"] == 6 and counts["privleak/holdout"] == 4
    meta = json.loads((bench / "meta.json").read_text())
    assert meta["seed"] == 3 and meta["counts"]["knowmem/forget_qa"] == counts["knowmem/forget_qa"]


def test_verbmem_splits_each_forget_passage(bench):
    b = load_muse(bench)
    for passage, v in zip(b.raw["forget"], b.verbmem_forget, strict=True):
        assert v["prompt"] + " " + v["gt"] == passage
        n, k = len(passage.split()), len(v["prompt"].split())
        assert abs(k - n / 2) <= 1


def test_passages_state_all_facts(bench):
    b = load_muse(bench)
    ents = entities(bench)
    for split, raw in (("forget", "forget"), ("retain", "retain1"), ("holdout", "holdout")):
        assert len(ents[split]) == len(b.raw[raw])
        for e, passage in zip(ents[split], b.raw[raw], strict=True):
            for key in ("name", "year", "town", "profession", "artefact", "companion"):
                if key in e:
                    assert e[key] in passage, (key, e[key], passage)
            sentences = re.findall(r"[.!?](?:\s|$)", passage)
            assert 2 <= len(sentences) <= 4 and 35 <= len(passage.split()) <= 80


def test_knowmem_answers_are_short_and_in_the_passage(bench):
    b = load_muse(bench)
    ents = entities(bench)
    for split, qa in (("forget", b.knowmem["forget_qa"]), ("retain", b.knowmem["retain_qa"])):
        by_name = {e["name"]: passage for e, passage in zip(ents[split], b.raw["forget" if split == "forget" else "retain1"])}
        for pair in qa:
            assert 1 <= len(pair["answer"].split()) <= 3
            (name,) = [n for n in by_name if n in pair["question"]]
            assert pair["answer"] in by_name[name]
    for split in ("forget", "retain"):
        icl = b.knowmem[f"{split}_qa_icl"]
        for pair, e in zip(icl, ents[f"{split}_icl"], strict=True):
            assert e["name"] in pair["question"] and pair["answer"] in {e.get(k) for k in e}


def test_splits_share_no_entity_or_invented_name(bench):
    ents = entities(bench)
    b = load_muse(bench)
    words = {s: {e[k].lower() for e in ents[s] for k in INVENTED if k in e} for s in SPLITS}
    assert sum(len(ents[s]) for s in SPLITS) == 6 + 5 + 4 + 2 + 2
    for i, s in enumerate(SPLITS):
        for t in SPLITS[i + 1:]:
            assert not words[s] & words[t], (s, t)
    text = {"forget": " ".join(b.raw["forget"]), "retain": " ".join(b.raw["retain1"]),
            "holdout": " ".join(b.raw["holdout"])}
    for s in SPLITS:
        for t, body in text.items():
            if s != t:
                assert not any(w in body.lower() for w in words[s]), (s, t)


def test_refuses_to_replace_foreign_directory(tmp_path):
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "thesis.tex").write_text("x")
    with pytest.raises(UserError, match="refusing"):
        synthesize(tmp_path / "precious")
    assert (tmp_path / "precious" / "thesis.tex").read_text() == "x"
    out = synthesize(tmp_path / "bench", seed=0, n_forget=2, n_retain=2, n_holdout=2, n_icl=1)
    first = files_of(out)
    synthesize(out, seed=1, n_forget=2, n_retain=2, n_holdout=2, n_icl=1)  # our own output: replaced whole
    assert files_of(out) != first and not list(tmp_path.glob(".bench*"))
