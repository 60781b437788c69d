"""Atomic outputs: a writer SIGKILLed in the middle of writing leaves the previous version (or nothing), never a
truncated file, and its leftovers are cleaned up by the next write."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def _start(script: str, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(script), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _kill_at(proc: subprocess.Popen, marker: str, timeout: float = 120) -> None:
    """Wait until the child prints `marker` (it is then blocked mid-write), then SIGKILL it."""
    import select

    buffer = ""
    while marker not in buffer:
        ready, _, _ = select.select([proc.stdout], [], [], timeout)
        line = proc.stdout.readline() if ready else ""
        if not line:
            proc.kill()
            pytest.fail(f"child never reached {marker!r}: {proc.stderr.read()[-3000:]}")
        buffer += line
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL


def _temps(path: Path) -> list[Path]:
    return sorted(path.parent.glob(f".{path.name}.*.tmp"))


def test_killed_text_write_leaves_old_file(tmp_path):
    """metrics.json / reports: the child dies after writing half of the new content."""
    from prism.io import atomic_write_json

    target = tmp_path / "metrics.json"
    atomic_write_json(target, {"version": "old"})
    child = _start("""
        import os, sys, time
        real_fdopen = os.fdopen

        class HalfThenHang:
            def __init__(self, f): self.f = f
            def __enter__(self): return self
            def __exit__(self, *exc): return self.f.__exit__(*exc)
            def __getattr__(self, name): return getattr(self.f, name)
            def write(self, data):
                self.f.write(data[: len(data) // 2]); self.f.flush()
                print("HALF WRITTEN", flush=True); time.sleep(300)

        os.fdopen = lambda *a, **k: HalfThenHang(real_fdopen(*a, **k))
        from prism.io import atomic_write_json
        atomic_write_json(sys.argv[1], {"version": "new", "payload": "x" * 100000})
    """, str(target))
    _kill_at(child, "HALF WRITTEN")
    assert json.loads(target.read_text()) == {"version": "old"}  # the old file, whole
    (leftover,) = _temps(target)
    assert 0 < leftover.stat().st_size < 100000  # the half-written temporary, never the target
    atomic_write_json(target, {"version": "newer"})
    assert json.loads(target.read_text()) == {"version": "newer"} and _temps(target) == []


def test_killed_checkpoint_write_leaves_old_checkpoint(tmp_path, tiny_model_dir):
    """An HF checkpoint (save_hf_checkpoint): the child dies after the weights, before the tokenizer is written."""
    from prism.io import atomic_dir
    from prism.models.loading import load_model, load_tokenizer

    out = tmp_path / "unlearned"
    with atomic_dir(out) as tmp:  # the previous checkpoint: a copy of the tiny model
        load_model(tiny_model_dir).save_pretrained(tmp)
        load_tokenizer(tiny_model_dir).save_pretrained(tmp)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    child = _start("""
        import sys, time, torch
        from lightning.pytorch import LightningModule
        from prism.models.loading import load_model, load_tokenizer
        from prism.stages.common import save_hf_checkpoint

        class Holder(LightningModule):
            def __init__(self):
                super().__init__()
                self.model = load_model(sys.argv[1])

        holder, tokenizer = Holder(), load_tokenizer(sys.argv[1])
        with torch.no_grad():
            for p in holder.model.parameters():
                p.add_(1.0)  # a different model, so a partial swap would show
        def hang(directory, *a, **k):
            print("WEIGHTS WRITTEN", flush=True); time.sleep(300)
        tokenizer.save_pretrained = hang
        save_hf_checkpoint(holder, holder.model, tokenizer, sys.argv[2])
    """, str(tiny_model_dir), str(out))
    _kill_at(child, "WEIGHTS WRITTEN")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    reference = load_model(tiny_model_dir).state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in load_model(out).state_dict().items())
    (leftover,) = _temps(out)
    assert (leftover / "model.safetensors").is_file() and not (leftover / "tokenizer.json").exists()
    with atomic_dir(out) as tmp:  # the next write removes the dead writer's directory
        (tmp / "done").write_text("1")
    assert _temps(out) == [] and (out / "done").is_file()


def test_kill_between_the_two_renames_keeps_a_whole_version(tmp_path):
    """Replacing a directory is two renames; a kill between them leaves no target (never a mixed one), the old
    version whole under .<name>.old, and the next write puts it back before replacing it."""
    from prism.io import atomic_dir

    out = tmp_path / "probe"
    with atomic_dir(out) as tmp:
        (tmp / "probe.json").write_text('{"version": "old"}')
    child = _start("""
        import os, sys, time
        real_replace, calls = os.replace, []
        def replace(src, dst):
            real_replace(src, dst); calls.append(dst)
            if len(calls) == 1:
                print("OLD MOVED ASIDE", flush=True); time.sleep(300)
        os.replace = replace
        from pathlib import Path
        from prism.io import atomic_dir
        with atomic_dir(sys.argv[1]) as tmp:
            (Path(tmp) / "probe.json").write_text('{"version": "new"}')
    """, str(out))
    _kill_at(child, "OLD MOVED ASIDE")
    assert not out.exists()
    assert (tmp_path / ".probe.old" / "probe.json").read_text() == '{"version": "old"}'
    with atomic_dir(out) as tmp:
        assert (out / "probe.json").read_text() == '{"version": "old"}'  # put back before the new swap
        (tmp / "probe.json").write_text('{"version": "newer"}')
    assert (out / "probe.json").read_text() == '{"version": "newer"}'
    assert not (tmp_path / ".probe.old").exists() and _temps(out) == []
