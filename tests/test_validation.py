"""Every bad input ends with one clear message and exit code 2 (warnings and exit 0 where the run can go on), before
any model weights load; an internal failure ends with exit 1, a short line and the traceback.

Table-driven: each case breaks one thing in a copy of a tiny benchmark / model / probe and runs `prism <stage> ...`
in-process through prism.cli.main, the same entry point as the console script.
"""

from __future__ import annotations

import io
import json
import logging
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

sys.path.insert(0, str(Path(__file__).parent / "fixtures"))

from runcli import run_cli  # noqa: E402


@pytest.fixture(autouse=True)
def one_thread():
    """A busy 2-core box: intra-op threads only add contention for a tiny model."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny MUSE-layout benchmark, a tiny Llama (hidden 32, 2 layers) and a probe that fits it."""
    import torch

    from prism.data.synth import synthesize
    from prism.models.commands import tiny_from_benchmark
    from prism.models.probe import Probe, save_probe

    root = tmp_path_factory.mktemp("validation")
    data = synthesize(root / "data", seed=3, n_forget=3, n_retain=3, n_holdout=3)
    model = tiny_from_benchmark(data, root / "model", layers=2, hidden=32, heads=2, vocab_size=512)
    torch.manual_seed(0)
    save_probe(root / "probe", Probe(32), {"layer": 1, "pooling": "mean"})
    return {"data": Path(data), "model": Path(model), "probe": root / "probe"}


@dataclass
class Case:
    name: str
    make: Callable[[Path, dict], list[str]]  # (tmp dir, asset copies) -> extra CLI args
    code: int
    words: list[str]
    stage: str = "unlearn"
    loads_model: bool = False  # exit-0 cases run one step; error cases must fail before any weights load
    lines: list[str] = field(default_factory=list)


def _write(path: Path, obj) -> None:
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    _write(path, edit(data))


def _set(records: list, i: int, key: str, value):
    records[i][key] = value
    return records


def _tofu(t: Path, a: dict) -> list[str]:
    root = t / "tofu"
    root.mkdir()
    good = json.dumps({"question": "Who is Alva Quint?", "answer": "A lamplighter."})
    (root / "forget01.jsonl").write_text(good + "\n" + '{"question": "Where?", "answer": \n' + good + "\n")
    (root / "retain90.jsonl").write_text(good + "\n")
    return [f"--data.path={root}", "--data.format=tofu"]


def _no_pad_token(t: Path, a: dict) -> list[str]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(a["model"])
    tok.pad_token = None
    tok.save_pretrained(a["model"])
    return ["--data.forget_sources=[raw]", "--data.retain_sources=[raw]"]


def _no_pad_no_eos(t: Path, a: dict) -> list[str]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(a["model"])
    tok.pad_token = None
    tok.eos_token = None
    tok.save_pretrained(a["model"])
    return []


def _overlap(t: Path, a: dict) -> list[str]:
    forget = json.loads((a["data"] / "raw" / "forget.json").read_text())
    _edit_json(a["data"] / "raw" / "retain1.json", lambda r: r + forget[:2])
    return ["--data.forget_sources=[raw]", "--data.retain_sources=[raw]"]


def _probe(in_dim: int, layer: int):
    def make(t: Path, a: dict) -> list[str]:
        from prism.models.probe import Probe, save_probe

        save_probe(t / "bad_probe", Probe(in_dim), {"layer": layer, "pooling": "mean"})
        return [f"--model.probe={t / 'bad_probe'}"]

    return make


def _truncated_weights(t: Path, a: dict) -> list[str]:
    f = a["model"] / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return []


def _drop_tensor(t: Path, a: dict) -> list[str]:
    from safetensors.torch import load_file, save_file

    state = load_file(a["model"] / "model.safetensors")
    del state[next(k for k in state if "layers.1.mlp.up_proj" in k)]
    save_file(state, a["model"] / "model.safetensors", metadata={"format": "pt"})
    return []


def _unknown_key_in_yaml(t: Path, a: dict) -> list[str]:
    (t / "bad.yaml").write_text("model:\n  lr: 1.0e-3\n  lerning_rate: 0.1\n")
    return [f"--config={t / 'bad.yaml'}"]


CASES = [
    Case("missing data directory", lambda t, a: [f"--data.path={t / 'nowhere'}"], 2,
         ["nowhere", "MUSE directory not found"]),
    Case("missing file", lambda t, a: (a["data"] / "knowmem" / "retain_qa.json").unlink() or [], 2,
         ["knowmem/retain_qa.json", "file not found"]),
    Case("JSON syntax", lambda t, a: _write(a["data"] / "knowmem" / "forget_qa.json",
                                            '[{"question": "q", "answer": "a"},\n  {"question": }]') or [], 2,
         ["knowmem/forget_qa.json", "invalid JSON at line 2"]),
    Case("JSONL syntax", _tofu, 2, ["forget01.jsonl, record 1", "invalid JSON on line 2"]),
    Case("wrong field type", lambda t, a: _edit_json(a["data"] / "knowmem" / "retain_qa.json",
                                                     lambda r: _set(r, 1, "answer", 42)) or [], 2,
         ["retain_qa.json, record 1, field 'answer'", "expected a string, got int"]),
    Case("missing field", lambda t, a: _edit_json(a["data"] / "verbmem" / "forget.json",
                                                  lambda r: [{"prompt": x["prompt"]} for x in r]) or [], 2,
         ["verbmem/forget.json, record 0, field 'gt'", "missing field"]),
    Case("list expected", lambda t, a: _write(a["data"] / "raw" / "holdout.json", {"text": "x"}) or [], 2,
         ["raw/holdout.json", "expected a JSON list of strings, got object"]),
    Case("empty forget set", lambda t, a: _write(a["data"] / "raw" / "forget.json", []) or [], 2,
         ["raw/forget.json", "the list is empty"]),
    Case("empty retain set", lambda t, a: _write(a["data"] / "raw" / "retain1.json", []) or [], 2,
         ["raw/retain1.json", "the list is empty"]),
    Case("empty forget after limit", lambda t, a: ["--data.forget_limit=0"], 2,
         ["data.forget_limit must be at least 1"]),
    Case("forget/retain overlap", _overlap, 0, ["2 examples are in both the forget and the retain set"],
         loads_model=True),
    Case("texts longer than max_length", lambda t, a: ["--data.max_length=24", "--data.forget_sources=[raw]",
                                                       "--data.retain_sources=[raw]"], 0,
         ["longer than max_length=24 tokens and were truncated"], loads_model=True),
    Case("tokenizer without pad token", _no_pad_token, 0, ["has no pad token: using eos"], loads_model=True),
    Case("tokenizer without pad or eos", _no_pad_no_eos, 2, ["neither a pad nor an eos token"]),
    Case("probe hidden size mismatch", _probe(16, 1), 2, ["model.probe", "features of size 16", "hidden size 32"]),
    Case("probe layer out of range", _probe(32, 5), 2, ["model.probe", "reads layer 5", "hidden states 0..2"]),
    Case("probe directory missing", lambda t, a: [f"--model.probe={t / 'no_probe'}"], 2,
         ["model.probe", "run the probe stage first"]),
    Case("unknown config key (flag)", lambda t, a: ["--model.lerning_rate=0.1"], 2, ["lerning_rate"]),
    Case("unknown config key (yaml)", _unknown_key_in_yaml, 2, ["lerning_rate"]),
    Case("model directory without weights", lambda t, a: (a["model"] / "model.safetensors").unlink() or [], 2,
         ["model.path", "has no weights"]),
    Case("truncated weights", _truncated_weights, 2, ["model.path", "unreadable or truncated"]),
    Case("weights missing a tensor", _drop_tensor, 2, ["lack 1 parameters", "up_proj", "incomplete checkpoint"],
         loads_model=True),
    Case("corrupt tokenizer file", lambda t, a: _write(a["model"] / "tokenizer.json", '{"version": ') or [], 2,
         ["cannot load the tokenizer of", "model"]),
    Case("hub id instead of a directory", lambda t, a: ["--model.path=HuggingFaceTB/SmolLM2-135M"], 2,
         ["model.path", "does not exist", "never downloads from a hub"]),
    Case("non-positive max_length", lambda t, a: ["--data.max_length=0"], 2, ["data.max_length must be at least 1"]),
    Case("checkpoint file missing", lambda t, a: [f"--ckpt_path={t / 'gone.ckpt'}"], 2,
         ["ckpt_path", "gone.ckpt' is not a file"]),
    Case("truncated checkpoint", lambda t, a: _write(t / "half.ckpt", "PK\x03\x04 truncated") or
         [f"--ckpt_path={t / 'half.ckpt'}"], 2, ["ckpt_path", "truncated or not a checkpoint"]),
    Case("probe stage: layer out of range", lambda t, a: ["--data.layers=[7]"], 2,
         ["data.layers [7] out of range", "0..2"], stage="probe"),
    Case("evaluate stage: bad data", lambda t, a: (a["data"] / "privleak" / "holdout.json").unlink() or [], 2,
         ["privleak/holdout.json", "file not found"], stage="evaluate"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(case: Case, assets, tmp_path, monkeypatch, capsys):
    import prism.models.loading as loading

    monkeypatch.chdir(tmp_path)
    a = {k: tmp_path / k for k in assets}
    for k, src in assets.items():
        shutil.copytree(src, a[k])
    extra = case.make(tmp_path, a)
    if not case.loads_model:
        class NoLoad:
            @staticmethod
            def from_pretrained(*args, **kwargs):
                raise AssertionError("model weights loaded before the inputs were validated")

        monkeypatch.setattr(loading, "AutoModelForCausalLM", NoLoad)
    argv = [case.stage, "test" if case.stage == "evaluate" else "fit", f"--model.path={a['model']}",
            f"--data.path={a['data']}", "--trainer.logger=false", f"--trainer.default_root_dir={tmp_path / 'logs'}",
            "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--seed_everything=0"]
    if case.stage == "unlearn":
        argv += ["--trainer.max_steps=1", "--data.batch_size=4", "--data.max_length=256",
                 f"--model.output_dir={tmp_path / 'out'}", "--trainer.enable_checkpointing=false"]
    code, err = run_cli(argv + extra, capsys)
    key = [ln for ln in err.splitlines() if ln.startswith(("prism: error:", "error:")) or "WARNING" in ln]
    print(f"[{case.name}] exit {code}: {' | '.join(key)[:400]}")  # `pytest -s` shows how each case ends
    assert code == case.code, err[-3000:]
    for words in case.words:
        assert words in err, f"{words!r} not in:\n{err[-3000:]}"
    if case.code == 2:
        assert "Traceback" not in err and "internal error" not in err, err
        assert [ln for ln in err.splitlines() if ln.startswith(("prism: error:", "error:"))], err[-2000:]
    if case.code == 0:
        assert (tmp_path / "out" / "model.safetensors").is_file()


def test_truncation_count_is_exact(assets):
    """The reported number of truncated texts is the number whose tokens (+ eos) exceed max_length."""
    from transformers import AutoTokenizer

    from prism.data.datamodule import BenchmarkData

    texts = json.loads((assets["data"] / "raw" / "forget.json").read_text())
    tok = AutoTokenizer.from_pretrained(assets["model"])
    lengths = sorted(len(tok(t, add_special_tokens=False).input_ids) + 1 for t in texts)
    max_length = lengths[len(lengths) // 2]  # some texts fit, some do not
    longer = sum(n > max_length for n in lengths)
    log = io.StringIO()
    handler = logging.StreamHandler(log)
    logging.getLogger("prism.data").addHandler(handler)
    try:
        dm = BenchmarkData(str(assets["data"]), tokenizer=str(assets["model"]), max_length=max_length,
                           forget_sources=["raw"], retain_sources=["raw"])
        dm.validate()
    finally:
        logging.getLogger("prism.data").removeHandler(handler)
    assert 0 < longer < len(texts) and dm.forget.truncated == longer
    assert f"forget: {longer} of {len(texts)} texts are longer than max_length={max_length}" in log.getvalue()
    assert all(len(x["input_ids"]) <= max_length for x in dm.forget)


def test_internal_error_exits_1_with_traceback(assets, tmp_path, monkeypatch, capsys):
    """A bug (here an objective that raises) is not a user error: exit 1, one 'internal error' line, the traceback."""
    monkeypatch.chdir(tmp_path)
    code, err = run_cli(["unlearn", "fit", f"--model.path={assets['model']}", f"--data.path={assets['data']}",
                         "--model.forget_objective=faults.Crash", "--model.retain_objective=null",
                         "--trainer.logger=false", "--trainer.enable_checkpointing=false",
                         f"--trainer.default_root_dir={tmp_path}", "--trainer.max_steps=1",
                         "--trainer.enable_progress_bar=false", "--data.max_length=64"], capsys)
    assert code == 1
    assert "prism: internal error: ZeroDivisionError: injected bug" in err
    assert "Traceback (most recent call last)" in err and "faults.py" in err
