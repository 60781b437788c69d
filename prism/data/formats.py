"""Readers for every on-disk data format of DESIGN.md section 2, with schema validation.

Each reader returns plain Python objects (lists of dicts / strings) and raises ONE
`DataFormatError` naming the file, the record index and the field at the first problem,
so a user sees exactly what to fix instead of a KeyError deep inside training.

Rules shared by all formats:
- every string field must be a non-empty (non-whitespace) string;
- a file, split or list with no records is an error;
- extra fields in a record are allowed and kept (real datasets carry ids, metadata);
- `.jsonl` files are JSON lines (blank lines skipped, records numbered from 0 in file order);
  `.json` files are one JSON document.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from prism.errors import DataFormatError, UserError

PathLike = str | os.PathLike

# --------------------------------------------------------------------------- raw readers


def _read_text(path: PathLike) -> str:
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(path, "file not found" if not path.exists() else "not a regular file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataFormatError(path, f"not UTF-8 text ({e.reason} at byte {e.start})") from None


def read_json(path: PathLike) -> Any:
    """Parse one JSON document; syntax errors name the line and column."""
    text = _read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataFormatError(path, f"invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None


def read_jsonl(path: PathLike) -> list[Any]:
    """Parse JSON lines (blank lines skipped); a syntax error names the line and the record index."""
    records = []
    for lineno, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise DataFormatError(
                path, f"invalid JSON on line {lineno}, column {e.colno}: {e.msg}", index=len(records)
            ) from None
    return records


def _read_records(path: PathLike) -> list[Any]:
    """`.jsonl` -> JSON lines; anything else -> one JSON document that must be a list."""
    path = Path(path)
    data = read_jsonl(path) if path.suffix == ".jsonl" else read_json(path)
    return _check_list(path, data)


# --------------------------------------------------------------------------- schema helper
# A field spec is a callable value -> problem string (or None when the value is fine).
Spec = Callable[[Any], "str | None"]


def _tname(v: Any) -> str:
    return {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}.get(
        type(v), type(v).__name__
    )


def text(v: Any) -> str | None:
    """A non-empty string."""
    if not isinstance(v, str):
        return f"expected a string, got {_tname(v)}"
    if not v.strip():
        return "empty string"
    return None


def int_in(lo: int, hi: int) -> Spec:
    """An integer (not a bool) in [lo, hi]."""

    def check(v: Any) -> str | None:
        if not isinstance(v, int) or isinstance(v, bool):
            return f"expected an integer, got {_tname(v)}"
        if not lo <= v <= hi:
            return f"{v} is out of range {lo}..{hi}"
        return None

    return check


def one_of(*values: str) -> Spec:
    """One of a few fixed strings."""

    def check(v: Any) -> str | None:
        if v not in values:
            return f"expected one of {', '.join(map(repr, values))}, got {v!r}"
        return None

    return check


def list_of(item: Spec, n: int | None = None) -> Spec:
    """A non-empty list (of exactly n items when given) whose items all satisfy `item`."""

    def check(v: Any) -> str | None:
        if not isinstance(v, list):
            return f"expected a list, got {_tname(v)}"
        if n is not None and len(v) != n:
            return f"expected exactly {n} items, got {len(v)}"
        if not v:
            return "empty list"
        for j, x in enumerate(v):
            problem = item(x)
            if problem:
                return f"item {j}: {problem}"
        return None

    return check


def _check_record(path: PathLike, i: int, rec: Any, schema: dict[str, Spec]) -> dict:
    """Validate one record against `schema` (field -> spec); raise naming file, index and field."""
    if not isinstance(rec, dict):
        raise DataFormatError(path, f"expected an object, got {_tname(rec)}", index=i)
    for name, spec in schema.items():
        if name not in rec:
            raise DataFormatError(path, "missing field", index=i, field=name)
        problem = spec(rec[name])
        if problem:
            raise DataFormatError(path, problem, index=i, field=name)
    return rec


def _check_list(path: PathLike, data: Any, what: str = "records") -> list:
    if not isinstance(data, list):
        raise DataFormatError(path, f"expected a JSON list of {what}, got {_tname(data)}")
    if not data:
        raise DataFormatError(path, f"no {what}: the list is empty")
    return data


def _check_records(path: PathLike, data: Any, schema: dict[str, Spec]) -> list[dict]:
    return [_check_record(path, i, rec, schema) for i, rec in enumerate(_check_list(path, data))]


def _check_texts(path: PathLike, data: Any) -> list[str]:
    """A non-empty list of non-empty strings (raw passages, privleak sets)."""
    for i, v in enumerate(_check_list(path, data, "strings")):
        problem = text(v)
        if problem:
            raise DataFormatError(path, problem, index=i)
    return data


QA = {"question": text, "answer": text}

# --------------------------------------------------------------------------- MUSE

MUSE_RAW_REQUIRED = ("forget", "retain1", "holdout")
MUSE_RAW_OPTIONAL = ("retain2",)
MUSE_KNOWMEM = ("forget_qa", "retain_qa", "forget_qa_icl", "retain_qa_icl")
MUSE_PRIVLEAK = ("forget", "retain", "holdout")


@dataclass
class MuseBenchmark:
    """A MUSE-layout benchmark (News, Books, or the synthetic one) loaded and validated."""

    root: Path
    raw: dict[str, list[str]]  # forget, retain1, holdout (+ retain2 when present)
    verbmem_forget: list[dict]  # [{prompt, gt}]
    knowmem: dict[str, list[dict]]  # forget_qa, retain_qa, forget_qa_icl, retain_qa_icl: [{question, answer}]
    privleak: dict[str, list[str]] = field(default_factory=dict)  # forget, retain, holdout

    def counts(self) -> dict[str, int]:
        out = {f"raw/{k}": len(v) for k, v in self.raw.items()}
        out["verbmem/forget"] = len(self.verbmem_forget)
        out.update({f"knowmem/{k}": len(v) for k, v in self.knowmem.items()})
        out.update({f"privleak/{k}": len(v) for k, v in self.privleak.items()})
        return out


def read_passages_txt(path: PathLike) -> list[str]:
    """A `.txt` corpus: one passage per blank-line-separated paragraph (inner newlines kept)."""
    paras, cur = [], []
    for line in _read_text(path).splitlines():
        if line.strip():
            cur.append(line.rstrip())
        elif cur:
            paras.append("\n".join(cur))
            cur = []
    if cur:
        paras.append("\n".join(cur))
    if not paras:
        raise DataFormatError(path, "no passages: the file is empty")
    return paras


def _load_raw(root: Path, name: str, required: bool) -> list[str] | None:
    """raw/<name>.json (list of str) or, when absent, raw/<name>.txt (paragraphs)."""
    js, txt = root / "raw" / f"{name}.json", root / "raw" / f"{name}.txt"
    if js.exists():
        return _check_texts(js, read_json(js))
    if txt.exists():
        return read_passages_txt(txt)
    if required:
        raise DataFormatError(js, "file not found (a .txt with one passage per paragraph is also accepted)")
    return None


def load_muse(root: PathLike) -> MuseBenchmark:
    """Load and validate a MUSE-layout directory (raw/, verbmem/, knowmem/, privleak/)."""
    root = Path(root)
    if not root.is_dir():
        raise DataFormatError(root, "MUSE directory not found")
    raw = {name: _load_raw(root, name, True) for name in MUSE_RAW_REQUIRED}
    for name in MUSE_RAW_OPTIONAL:
        texts = _load_raw(root, name, False)
        if texts is not None:
            raw[name] = texts
    vpath = root / "verbmem" / "forget.json"
    verbmem = _check_records(vpath, read_json(vpath), {"prompt": text, "gt": text})
    knowmem = {}
    for name in MUSE_KNOWMEM:
        p = root / "knowmem" / f"{name}.json"
        knowmem[name] = _check_records(p, read_json(p), QA)
    privleak = {}
    for name in MUSE_PRIVLEAK:
        p = root / "privleak" / f"{name}.json"
        privleak[name] = _check_texts(p, read_json(p))
    return MuseBenchmark(root=root, raw=raw, verbmem_forget=verbmem, knowmem=knowmem, privleak=privleak)


# --------------------------------------------------------------------------- WMDP

MCQ = {"question": text, "choices": list_of(text, n=4), "answer": int_in(0, 3)}
CONV_QA = {"question": text, "generated_answer": text, "label": one_of("positive", "negative")}


def load_mcq(path: PathLike) -> list[dict]:
    """Multiple-choice questions, json or jsonl: [{question, choices: 4 strings, answer: 0..3}]."""
    return _check_records(path, _read_records(path), MCQ)


def load_corpus(path: PathLike) -> list[str]:
    """A forget/retain corpus: jsonl (or a json list) of records with a `text` field -> the texts."""
    return [rec["text"] for rec in _check_records(path, _read_records(path), {"text": text})]


def load_conversational_qa(path: PathLike) -> list[dict]:
    """Probe QA pairs: json [{question, generated_answer, label: positive|negative}]."""
    return _check_records(path, _read_records(path), CONV_QA)


def wmdp_kind(path: Path, records: list) -> str:
    """The WMDP rule: `corpus` in the file name -> corpus; else the first record's keys decide."""
    if "corpus" in path.name:
        return "corpus"
    first = records[0] if isinstance(records[0], dict) else {}
    for key, kind in (("choices", "mcq"), ("generated_answer", "qa"), ("text", "corpus")):
        if key in first:
            return kind
    raise DataFormatError(
        path, "cannot tell which WMDP file this is: expected 'corpus' in the file name, or records with "
        "'choices' (MCQ), 'generated_answer' (conversational QA) or 'text' (corpus)", index=0
    )


def _check_wmdp(path: Path) -> dict[str, int]:
    """Every *.json / *.jsonl directly in `path` (or `path` itself when a file) must be a WMDP file."""
    if not path.exists():
        raise DataFormatError(path, "WMDP directory not found")
    files = [path] if path.is_file() else sorted(
        p for p in path.glob("*") if p.suffix in (".json", ".jsonl") and p.is_file()
    )
    if not files:
        raise DataFormatError(path, "no WMDP files (*.json, *.jsonl) in this directory")
    loaders = {"mcq": load_mcq, "corpus": load_corpus, "qa": load_conversational_qa}
    return {p.name: len(loaders[wmdp_kind(p, _read_records(p))](p)) for p in files}


# --------------------------------------------------------------------------- TOFU

TOFU_FORGET = ("forget01", "forget05", "forget10")
TOFU_RETAIN = ("retain90", "retain95", "retain99")
TOFU_SPLITS = TOFU_FORGET + TOFU_RETAIN + ("holdout",)


def load_tofu(root: PathLike) -> dict[str, list[dict]]:
    """TOFU splits present under root as `<split>.jsonl` (or `<split>.json`, a JSON list).

    At least one forget and one retain split are required; returns split -> [{question, answer}].
    """
    root = Path(root)
    if not root.is_dir():
        raise DataFormatError(root, "TOFU directory not found")
    out = {}
    for split in TOFU_SPLITS:
        for p in (root / f"{split}.jsonl", root / f"{split}.json"):
            if p.is_file():
                out[split] = _check_records(p, _read_records(p), QA)
                break
    for kind, names in (("forget", TOFU_FORGET), ("retain", TOFU_RETAIN)):
        if not any(n in out for n in names):
            raise DataFormatError(root, f"no {kind} split: expected one of {', '.join(n + '.jsonl' for n in names)}")
    return out


# --------------------------------------------------------------------------- jailbreak

ROLES = ("system", "user", "assistant")


def _message(v: Any) -> str | None:
    if not isinstance(v, dict):
        return f"expected a message object, got {_tname(v)}"
    for key, spec in (("role", one_of(*ROLES)), ("content", text)):
        if key not in v:
            return f"missing '{key}'"
        problem = spec(v[key])
        if problem:
            return f"'{key}': {problem}"
    return None


def _prefill_messages(v: Any) -> str | None:
    problem = list_of(_message, n=2)(v)
    if problem:
        return problem
    if [m["role"] for m in v] != ["user", "assistant"]:
        return f"expected roles ['user', 'assistant'], got {[m['role'] for m in v]}"
    return None


def _conversation(v: Any) -> str | None:
    """Roles user/assistant (one optional leading system turn); at least one user turn; ends with user.

    The last user turn is the one whose answer the attack judges; assistant turns, when present,
    are the recorded replies that replay feeds back as context (consecutive user turns are allowed:
    human red-teaming logs often store only the attacker's side).
    """
    problem = list_of(_message)(v)
    if problem:
        return problem
    for j, m in enumerate(v):
        if m["role"] == "system" and j > 0:
            return f"item {j}: a system turn is only allowed first"
    if v[-1]["role"] != "user":
        return f"must end with a user turn (the one the attack is judged on), ends with {v[-1]['role']!r}"
    return None


def load_prefill(path: PathLike) -> list[dict]:
    """Prefill attack jsonl of {"messages": [user, assistant]} -> [{prompt, prefix}].

    `prefix` is the assistant text: the harmful start the model is forced to continue.
    """
    recs = _check_records(path, _read_records(path), {"messages": _prefill_messages})
    return [{"prompt": r["messages"][0]["content"], "prefix": r["messages"][1]["content"]} for r in recs]


def load_multi_turn(path: PathLike) -> list[dict]:
    """Multi-turn attack json [{objective, conversation: [{role, content}, ...]}] (see `_conversation`)."""
    return _check_records(path, _read_records(path), {"objective": text, "conversation": _conversation})


def load_autodan(path: PathLike) -> list[dict]:
    """AutoDAN test cases in HarmBench layout {behavior_id: [prompt, ...]} -> [{behavior, prompt}].

    The record index in errors is the behavior's position in the object; the field is its id.
    """
    data = read_json(path)
    if not isinstance(data, dict):
        raise DataFormatError(path, f"expected a JSON object mapping behavior ids to prompt lists, got {_tname(data)}")
    if not data:
        raise DataFormatError(path, "no behaviors: the object is empty")
    out = []
    for i, (behavior, prompts) in enumerate(data.items()):
        problem = list_of(text)(prompts)
        if problem:
            raise DataFormatError(path, problem, index=i, field=behavior)
        out += [{"behavior": behavior, "prompt": p} for p in prompts]
    return out


OVERREFUSAL_COLUMNS = ("id", "prompt", "type", "label")


def load_overrefusal(path: PathLike) -> list[dict]:
    """Over-refusal csv with columns id, prompt, type, label (safe|unsafe) and any extra columns.

    Returns one dict per row (all columns, as strings); record indices count data rows from 0.
    """
    lines = _read_text(path).splitlines(keepends=True)
    reader = csv.DictReader(lines)
    try:
        header = reader.fieldnames or []
        missing = [c for c in OVERREFUSAL_COLUMNS if c not in header]
        if missing:
            raise DataFormatError(path, f"missing column (header is {header})", field=missing[0])
        rows = []
        for i, row in enumerate(reader):
            if None in row:  # more cells than header columns
                raise DataFormatError(path, f"line {reader.line_num}: more cells than header columns", index=i)
            if any(row[c] is None for c in OVERREFUSAL_COLUMNS):
                raise DataFormatError(path, f"line {reader.line_num}: fewer cells than header columns", index=i)
            row["label"] = row["label"].strip().lower()
            rows.append(_check_record(path, i, row, {"id": text, "prompt": text, "type": text,
                                                      "label": one_of("safe", "unsafe")}))
    except csv.Error as e:
        raise DataFormatError(path, f"invalid CSV on line {reader.line_num}: {e}") from None
    if not rows:
        raise DataFormatError(path, "no rows: the file has only a header")
    return rows


def jailbreak_kind(path: PathLike) -> str:
    """Which jailbreak file this is: .csv -> overrefusal, .jsonl -> prefill, .json object -> autodan,
    .json list of records with `conversation` -> multi_turn."""
    path = Path(path)
    if path.suffix == ".csv":
        return "overrefusal"
    if path.suffix == ".jsonl":
        return "prefill"
    if path.suffix == ".json":
        data = read_json(path)
        if isinstance(data, dict):
            return "autodan"
        if isinstance(data, list) and data and isinstance(data[0], dict) and "conversation" in data[0]:
            return "multi_turn"
    raise DataFormatError(
        path, "cannot tell which jailbreak file this is: expected .csv (over-refusal), .jsonl (prefill), "
        ".json object (AutoDAN) or .json list of {objective, conversation} (multi-turn)"
    )


JAILBREAK_LOADERS = {
    "prefill": load_prefill,
    "multi_turn": load_multi_turn,
    "autodan": load_autodan,
    "overrefusal": load_overrefusal,
}


def _check_jailbreak(path: Path) -> dict[str, int]:
    if not path.exists():
        raise DataFormatError(path, "file not found")
    files = [path] if path.is_file() else sorted(
        p for p in path.glob("*") if p.suffix in (".csv", ".json", ".jsonl") and p.is_file()
    )
    if not files:
        raise DataFormatError(path, "no jailbreak files (*.csv, *.json, *.jsonl) in this directory")
    return {p.name: len(JAILBREAK_LOADERS[jailbreak_kind(p)](p)) for p in files}


# --------------------------------------------------------------------------- check

FORMATS = ("muse", "wmdp", "tofu", "jailbreak")


def check(fmt: str, path: PathLike) -> dict[str, int]:
    """Validate a dataset and return record counts per split or file.

    muse: a MUSE directory (keys like 'raw/forget', 'knowmem/retain_qa').
    tofu: a directory of split files (keys are split names).
    wmdp: a directory (or one file); every *.json/*.jsonl in it is validated as MCQ, corpus or
      conversational QA — 'corpus' in the name means corpus, otherwise the first record's keys
      ('choices', 'generated_answer', 'text') decide. Keys are file names.
    jailbreak: one file or a directory of them; the kind comes from the extension and shape
      (see `jailbreak_kind`). Keys are file names.
    """
    path = Path(path)
    if fmt == "muse":
        return load_muse(path).counts()
    if fmt == "tofu":
        return {k: len(v) for k, v in load_tofu(path).items()}
    if fmt == "wmdp":
        return _check_wmdp(path)
    if fmt == "jailbreak":
        return _check_jailbreak(path)
    raise UserError(f"unknown data format {fmt!r}: expected one of {', '.join(FORMATS)}")
