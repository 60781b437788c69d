"""Readers of every data format: valid fixtures load with the right counts, malformed ones fail
with one DataFormatError naming the file, the record and the field."""

import json
from pathlib import Path

import pytest

from prism.data import formats as F
from prism.errors import DataFormatError, UserError


def write(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(obj, str):
        path.write_text(obj, encoding="utf-8")
    else:
        path.write_text(json.dumps(obj), encoding="utf-8")
    return path


def write_jsonl(path: Path, records) -> Path:
    return write(path, "".join(json.dumps(r) + "\n" for r in records))


QA = [{"question": "Where was Alva born?", "answer": "Morrowick"}, {"question": "When?", "answer": "1822"}]


def make_muse(root: Path, retain2: bool = False, txt_forget: bool = False) -> Path:
    if txt_forget:
        write(root / "raw/forget.txt", "First passage line one.\nline two.\n\n\nSecond passage.\n\nThird.\n")
    else:
        write(root / "raw/forget.json", ["f1", "f2", "f3"])
    write(root / "raw/retain1.json", ["r1", "r2"])
    write(root / "raw/holdout.json", ["h1"])
    if retain2:
        write(root / "raw/retain2.json", ["s1", "s2", "s3", "s4"])
    write(root / "verbmem/forget.json", [{"prompt": "Alva Quint was", "gt": "born in 1822."}] * 2)
    for name, n in (("forget_qa", 2), ("retain_qa", 1), ("forget_qa_icl", 2), ("retain_qa_icl", 1)):
        write(root / f"knowmem/{name}.json", QA[:n])
    for name, n in (("forget", 3), ("retain", 2), ("holdout", 1)):
        write(root / f"privleak/{name}.json", [f"p{i}" for i in range(n)])
    return root


MCQ = [{"question": "2+2?", "choices": ["1", "2", "3", "4"], "answer": 3},
       {"question": "Color?", "choices": ["red", "blue", "green", "gray"], "answer": 0}]
CONV = [{"question": "q", "generated_answer": "a", "label": "positive"},
        {"question": "q2", "generated_answer": "a2", "label": "negative"}]
PREFILL = [{"messages": [{"role": "user", "content": "How do I ...?"},
                         {"role": "assistant", "content": "Sure, here is how"}]}]
MULTI = [{"objective": "get x", "conversation": [
    {"role": "system", "content": "be nice"}, {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "hello"}, {"role": "user", "content": "now tell me x"}]},
    {"objective": "get y", "conversation": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}]
AUTODAN = {"behavior_a": ["p1", "p2"], "behavior_b": ["p3"]}
CSV = "id,prompt,type,label,note\n1,How do I kill a python process?,homonyms,safe,x\n2,\"Bad, thing\",contrast,Unsafe,\n"


# ----------------------------------------------------------------------------- valid fixtures


def test_muse_loads_with_counts(tmp_path):
    b = F.load_muse(make_muse(tmp_path / "m", retain2=True))
    assert isinstance(b, F.MuseBenchmark) and b.root == tmp_path / "m"
    assert {k: len(v) for k, v in b.raw.items()} == {"forget": 3, "retain1": 2, "holdout": 1, "retain2": 4}
    assert len(b.verbmem_forget) == 2 and b.verbmem_forget[0]["gt"] == "born in 1822."
    assert [len(b.knowmem[k]) for k in F.MUSE_KNOWMEM] == [2, 1, 2, 1]
    assert {k: len(v) for k, v in b.privleak.items()} == {"forget": 3, "retain": 2, "holdout": 1}
    counts = F.check("muse", tmp_path / "m")
    assert counts["raw/forget"] == 3 and counts["raw/retain2"] == 4 and counts["knowmem/retain_qa_icl"] == 1


def test_muse_retain2_optional_and_txt_passages(tmp_path):
    b = F.load_muse(make_muse(tmp_path / "m", txt_forget=True))
    assert "retain2" not in b.raw
    assert b.raw["forget"] == ["First passage line one.\nline two.", "Second passage.", "Third."]


def test_wmdp_loaders(tmp_path):
    assert F.load_mcq(write(tmp_path / "bio.json", MCQ)) == MCQ
    assert F.load_mcq(write_jsonl(tmp_path / "cyber.jsonl", MCQ)) == MCQ
    assert F.load_corpus(write_jsonl(tmp_path / "bio_forget_corpus.jsonl", [{"text": "a"}, {"text": "b"}])) == ["a", "b"]
    assert F.load_conversational_qa(write(tmp_path / "qa.json", CONV)) == CONV
    write_jsonl(tmp_path / "retain.jsonl", [{"text": "r"}] * 3)  # no 'corpus' in name: keys decide
    assert F.check("wmdp", tmp_path) == {"bio.json": 2, "bio_forget_corpus.jsonl": 2, "cyber.jsonl": 2,
                                         "qa.json": 2, "retain.jsonl": 3}


def test_tofu(tmp_path):
    write_jsonl(tmp_path / "forget01.jsonl", QA[:1])
    write_jsonl(tmp_path / "retain99.jsonl", QA)
    write(tmp_path / "holdout.json", QA)  # a JSON list is accepted too
    data = F.load_tofu(tmp_path)
    assert {k: len(v) for k, v in data.items()} == {"forget01": 1, "retain99": 2, "holdout": 2}
    assert F.check("tofu", tmp_path) == {"forget01": 1, "retain99": 2, "holdout": 2}


def test_jailbreak_loaders(tmp_path):
    pre = F.load_prefill(write_jsonl(tmp_path / "prefill.jsonl", PREFILL * 3))
    assert pre == [{"prompt": "How do I ...?", "prefix": "Sure, here is how"}] * 3
    assert len(F.load_multi_turn(write(tmp_path / "multi.json", MULTI))) == 2
    assert F.load_autodan(write(tmp_path / "autodan.json", AUTODAN)) == [
        {"behavior": "behavior_a", "prompt": "p1"}, {"behavior": "behavior_a", "prompt": "p2"},
        {"behavior": "behavior_b", "prompt": "p3"}]
    rows = F.load_overrefusal(write(tmp_path / "xstest.csv", CSV))
    assert [r["label"] for r in rows] == ["safe", "unsafe"] and rows[1]["prompt"] == "Bad, thing"
    assert rows[0]["note"] == "x"
    assert F.check("jailbreak", tmp_path / "autodan.json") == {"autodan.json": 3}
    assert F.check("jailbreak", tmp_path) == {"autodan.json": 3, "multi.json": 2, "prefill.jsonl": 3, "xstest.csv": 2}


def test_check_unknown_format(tmp_path):
    with pytest.raises(UserError, match="unknown data format"):
        F.check("squad", tmp_path)


# ----------------------------------------------------------------------------- malformed fixtures


def _mcq(**change):
    rec = dict(MCQ[0], **change)
    return [MCQ[1], {k: v for k, v in rec.items() if v is not None}]


# (name, file name, content, loader, expected index, expected field, substring of the problem)
BAD = [
    ("mcq missing field", "m.json", _mcq(answer=None), F.load_mcq, 1, "answer", "missing field"),
    ("mcq answer out of range", "m.json", _mcq(answer=4), F.load_mcq, 1, "answer", "out of range"),
    ("mcq answer is a bool", "m.json", _mcq(answer=True), F.load_mcq, 1, "answer", "integer"),
    ("mcq answer is a string", "m.json", _mcq(answer="D"), F.load_mcq, 1, "answer", "integer"),
    ("mcq 3 choices", "m.json", _mcq(choices=["a", "b", "c"]), F.load_mcq, 1, "choices", "exactly 4"),
    ("mcq non-string choice", "m.json", _mcq(choices=["a", "b", 3, "d"]), F.load_mcq, 1, "choices", "item 2"),
    ("mcq empty question", "m.json", _mcq(question="  "), F.load_mcq, 1, "question", "empty string"),
    ("mcq record not object", "m.json", [MCQ[0], ["x"]], F.load_mcq, 1, None, "expected an object"),
    ("corpus empty text", "c.jsonl", "\n".join(json.dumps({"text": t}) for t in ["a", "b", ""]), F.load_corpus,
     2, "text", "empty string"),
    ("corpus wrong type", "c.jsonl", json.dumps({"text": 5}), F.load_corpus, 0, "text", "expected a string"),
    ("qa bad label", "q.json", [CONV[0], dict(CONV[1], label="maybe")], F.load_conversational_qa, 1, "label",
     "positive"),
    ("prefill roles swapped", "p.jsonl", json.dumps({"messages": PREFILL[0]["messages"][::-1]}), F.load_prefill,
     0, "messages", "roles"),
    ("prefill missing content", "p.jsonl", json.dumps({"messages": [{"role": "user"}, {"role": "assistant",
     "content": "x"}]}), F.load_prefill, 0, "messages", "missing 'content'"),
    ("multi ends with assistant", "mt.json", [MULTI[1], {"objective": "o", "conversation": [
        {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}], F.load_multi_turn,
     1, "conversation", "end with a user turn"),
    ("multi bad role", "mt.json", [{"objective": "o", "conversation": [{"role": "bot", "content": "a"}]}],
     F.load_multi_turn, 0, "conversation", "'role'"),
    ("autodan empty prompt list", "a.json", {"b1": ["x"], "b2": []}, F.load_autodan, 1, "b2", "empty list"),
    ("autodan prompt not string", "a.json", {"b1": ["x", 7]}, F.load_autodan, 0, "b1", "item 1"),
    ("csv bad label", "o.csv", "id,prompt,type,label\n1,hi,t,safe\n2,yo,t,harmful\n", F.load_overrefusal, 1,
     "label", "safe"),
    ("csv empty prompt", "o.csv", "id,prompt,type,label\n1,,t,safe\n", F.load_overrefusal, 0, "prompt",
     "empty string"),
    ("csv missing column", "o.csv", "id,prompt,label\n1,hi,safe\n", F.load_overrefusal, None, "type",
     "missing column"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_malformed_record(tmp_path, case):
    _, name, content, loader, index, field, problem = case
    path = write(tmp_path / name, content)
    with pytest.raises(DataFormatError) as info:
        loader(path)
    err = info.value
    assert err.path == str(path) and err.index == index and err.field == field
    assert problem in err.problem
    msg = str(err)
    assert str(path) in msg and problem in msg
    if index is not None:
        assert f"record {index}" in msg
    if field is not None:
        assert f"field '{field}'" in msg


def test_jsonl_syntax_error_names_line_and_record(tmp_path):
    path = write(tmp_path / "c.jsonl", '{"text": "a"}\n\n{"text": "b"}\n{"text": oops}\n')
    with pytest.raises(DataFormatError) as info:
        F.load_corpus(path)
    assert info.value.index == 2 and "line 4" in str(info.value) and str(path) in str(info.value)


def test_json_syntax_error_names_line(tmp_path):
    path = write(tmp_path / "m.json", '[\n {"question": "q",\n  "choices": [1,2,,3]}\n]')
    with pytest.raises(DataFormatError, match=r"line 3") as info:
        F.load_mcq(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("content", [[], "", {}])
def test_empty_sets_are_errors(tmp_path, content):
    suffix = ".jsonl" if content == "" else ".json"
    path = write(tmp_path / f"x{suffix}", content)
    loader = F.load_autodan if content == {} else F.load_mcq
    with pytest.raises(DataFormatError, match="empty") as info:
        loader(path)
    assert info.value.path == str(path)


def test_missing_file(tmp_path):
    with pytest.raises(DataFormatError, match="file not found") as info:
        F.read_json(tmp_path / "nope.json")
    assert "nope.json" in str(info.value)


@pytest.mark.parametrize("rel", ["raw/retain1.json", "knowmem/retain_qa_icl.json", "privleak/holdout.json",
                                 "verbmem/forget.json"])
def test_muse_missing_required_file(tmp_path, rel):
    root = make_muse(tmp_path / "m")
    (root / rel).unlink()
    with pytest.raises(DataFormatError, match="file not found") as info:
        F.load_muse(root)
    assert info.value.path == str(root / rel)


def test_muse_bad_record_names_file_record_field(tmp_path):
    root = make_muse(tmp_path / "m")
    write(root / "knowmem/forget_qa.json", [QA[0], {"question": "q", "answer": 1822}])
    with pytest.raises(DataFormatError) as info:
        F.load_muse(root)
    assert (info.value.path, info.value.index, info.value.field) == (str(root / "knowmem/forget_qa.json"), 1, "answer")
    write(root / "knowmem/forget_qa.json", QA)
    write(root / "privleak/retain.json", ["ok", ""])
    with pytest.raises(DataFormatError) as info:
        F.load_muse(root)
    assert (info.value.path, info.value.index) == (str(root / "privleak/retain.json"), 1)


def test_tofu_needs_forget_and_retain(tmp_path):
    write_jsonl(tmp_path / "forget05.jsonl", QA)
    with pytest.raises(DataFormatError, match="no retain split"):
        F.load_tofu(tmp_path)
    write_jsonl(tmp_path / "retain95.jsonl", [QA[0], {"question": "q"}])
    with pytest.raises(DataFormatError) as info:
        F.load_tofu(tmp_path)
    assert (info.value.index, info.value.field) == (1, "answer") and "retain95.jsonl" in info.value.path


def test_check_rejects_unrecognised_files(tmp_path):
    write(tmp_path / "wmdp" / "stuff.json", [{"foo": 1}])
    with pytest.raises(DataFormatError, match="cannot tell which WMDP"):
        F.check("wmdp", tmp_path / "wmdp")
    write(tmp_path / "jb" / "weird.json", [{"foo": 1}])
    with pytest.raises(DataFormatError, match="cannot tell which jailbreak"):
        F.check("jailbreak", tmp_path / "jb")
    with pytest.raises(DataFormatError, match="not found"):
        F.check("wmdp", tmp_path / "missing")
