"""Resume: an unlearning run SIGKILLed mid-way and resumed with `--ckpt_path last` ends with the weights of an
uninterrupted run (same seed): optimiser state, global step (λ_t progress), data order and position, RNG states and
the cached NPO reference log-probs all come back from the step checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).parent / "fixtures"
sys.path.insert(0, str(FIXTURES))  # faults (class_path targets) and runcli


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread here and in the subprocess: faster on a shared CPU, and the same reduction order."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from prism.data.synth import synthesize
    from prism.models.commands import tiny_from_benchmark
    from prism.models.probe import Probe, save_probe

    root = tmp_path_factory.mktemp("resume")
    data = synthesize(root / "data", seed=1, n_forget=4, n_retain=4, n_holdout=4)
    model = tiny_from_benchmark(data, root / "model", layers=2, hidden=32, heads=2, vocab_size=512)
    torch.manual_seed(0)
    save_probe(root / "probe", Probe(32), {"layer": 1, "pooling": "mean"})
    return root, Path(data), Path(model)


def _args(root: Path, data: Path, model: Path, run: str) -> list[str]:
    """The tiny preset's PRISM method (NPO + probe term + SAM + decoupling, retain NLL), shortened to 6 steps with a
    checkpoint every 3, on the raw passages: forget has 4 batches per epoch and retain 2 (so it cycles twice), so the
    checkpoint at step 3 is mid-epoch for forget and mid-pass for retain, and the resumed run crosses an epoch end."""
    return ["unlearn", "fit", f"--config={ROOT / 'configs/tiny/unlearn/prism.yaml'}",
            f"--model.path={model}", f"--data.path={data}", f"--model.probe={root / 'probe'}",
            f"--model.output_dir={root / run / 'model'}", "--data.forget_sources=[raw]", "--data.retain_sources=[raw]",
            "--data.batch_size=1", "--data.retain_batch_size=3", "--data.max_length=128", "--trainer.max_steps=6",
            "--trainer.enable_checkpointing=true", "--checkpoint.every_n_train_steps=3",
            f"--trainer.default_root_dir={root / run}", f"--trainer.logger.init_args.save_dir={root / run / 'logs'}",
            "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--seed_everything=0"]


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(directory / "model.safetensors")


def test_killed_and_resumed_run_matches_uninterrupted(tiny, monkeypatch):
    from prism.cli import main

    root, data, model = tiny
    monkeypatch.chdir(root)
    assert main(_args(root, data, model, "full")) == 0

    # The same run, SIGKILLed right after optimiser step 5 (its last checkpoint is step 3's).
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(FIXTURES), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": str(torch.get_num_threads())}
    kill = '--trainer.callbacks+={"class_path": "faults.KillAfterStep", "init_args": {"step": 5}}'
    done = subprocess.run([sys.executable, "-m", "prism", *_args(root, data, model, "killed"), kill],
                          cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == -signal.SIGKILL, done.stderr[-3000:]
    run_dir = root / "killed" / "logs" / "unlearn" / "version_0"
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)  # loadable without unpickling code
    assert ckpt["global_step"] == 3 and not (root / "killed" / "model").exists()
    assert ckpt["optimizer_states"][0]["state"], "optimiser moments are checkpointed"
    assert ckpt["prism_ref_logprobs"].shape == (4,)  # θ₀'s reference log-probs, not recomputed on resume
    assert ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"epoch": 0, "batches": 3}] * 2
    assert "ResumeRNG" in ckpt["callbacks"]

    # Resume: `last` finds the killed run's version directory (the same configuration) and finishes it.
    assert main(_args(root, data, model, "killed") + ["--ckpt_path=last"]) == 0
    assert sorted(p.name for p in (root / "killed" / "logs" / "unlearn").iterdir()) == ["version_0"]
    full, resumed = _weights(root / "full" / "model"), _weights(root / "killed" / "model")
    initial = _weights(model)
    diff = max((full[k] - resumed[k]).abs().max().item() for k in full)
    moved = max((full[k] - initial[k]).abs().max().item() for k in full)
    print(f"\nresume: max |w_uninterrupted - w_resumed| = {diff:.3g} (weights moved by up to {moved:.3g})")
    assert moved > 1e-3  # the run did change the model, so equality is not trivial
    assert diff <= 1e-6


def test_last_ignores_checkpoints_of_another_configuration(tiny, monkeypatch, capsys):
    """`--ckpt_path last` never resumes a run whose model/data config differs (e.g. another method's)."""
    import logging

    from prism.cli import main

    root, data, model = tiny
    monkeypatch.chdir(root)
    other = root / "other"
    ckpt_dir = other / "logs" / "unlearn" / "version_0" / "checkpoints"
    ckpt_dir.mkdir(parents=True)
    (ckpt_dir / "last.ckpt").write_bytes(b"not a checkpoint of this run")
    (ckpt_dir.parent / "config.yaml").write_text("model:\n  lr: 0.5\ndata:\n  path: elsewhere\n")
    args = _args(root, data, model, "other") + ["--ckpt_path=last", "--trainer.max_steps=2"]
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("prism").addHandler(handler)
    try:
        assert main(args) == 0
    finally:
        logging.getLogger("prism").removeHandler(handler)
    assert any("no checkpoint under" in r.getMessage() and "starting from the beginning" in r.getMessage()
               for r in records)
    assert (other / "logs" / "unlearn" / "version_1" / "checkpoints" / "last.ckpt").is_file()


# --- numerical guard ------------------------------------------------------------------------------------------------

def _guard_args(root: Path, data: Path, model: Path, run: str, objective: dict) -> list[str]:
    return ["unlearn", "fit", f"--model.path={model}", f"--data.path={data}",
            f"--model.output_dir={root / run / 'model'}",
            f"--model.forget_objective={json.dumps(objective)}", "--model.retain_objective=prism.objectives.terms.NLL",
            "--model.lr=1e-3", "--model.max_nonfinite_steps=3", "--data.forget_sources=[raw]",
            "--data.retain_sources=[raw]", "--data.batch_size=1", "--data.max_length=64", "--trainer.max_steps=4",
            "--checkpoint.every_n_train_steps=1", f"--trainer.default_root_dir={root / run}", "--trainer.logger=false",
            "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


def test_nonfinite_loss_aborts_after_max_steps_keeping_last_good_checkpoint(tiny, monkeypatch, capsys):
    """NaN forget loss from step 2 on: three skipped updates, then exit 1 with a clear message; last.ckpt is the
    one of step 2."""
    from runcli import run_cli

    root, data, model = tiny
    monkeypatch.chdir(root)
    objective = {"class_path": "faults.NonFiniteFrom", "init_args": {"start": 2, "kind": "loss"}}
    code, err = run_cli(_guard_args(root, data, model, "nan", objective), capsys)
    assert code == 1, err[-3000:]
    assert err.count("update skipped") == 3 and "(3 in a row)" in err
    assert "prism: aborted: unlearning aborted: 3 consecutive steps with a non-finite loss or gradient " \
           "(max_nonfinite_steps=3)" in err
    assert "last good checkpoint is kept" in err and "last.ckpt" in err
    assert "Traceback" not in err and "internal error" not in err
    ckpt = torch.load(root / "nan" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())
    assert not (root / "nan" / "model").exists()  # no HF checkpoint from an aborted run


def test_nonfinite_gradient_skips_the_update_and_training_goes_on(tiny, monkeypatch, capsys):
    """One step whose loss is finite but whose gradient is NaN: that update is skipped (θ unchanged, step not
    counted), the next steps train normally and the run ends with finite weights."""
    from faults import ParamTrace
    from runcli import run_cli

    root, data, model = tiny
    monkeypatch.chdir(root)
    ParamTrace.records.clear()
    objective = {"class_path": "faults.NonFiniteFrom", "init_args": {"start": 1, "count": 1, "kind": "grad"}}
    code, err = run_cli(_guard_args(root, data, model, "grad", objective)
                        + ["--trainer.callbacks+=faults.ParamTrace"], capsys)
    assert code == 0, err[-3000:]
    assert err.count("update skipped") == 1 and "non-finite loss or gradient at step 1" in err
    steps = [s for s, _ in ParamTrace.records]
    sums = [t for _, t in ParamTrace.records]
    assert steps == [1, 1, 2, 3, 4]  # five batches for four updates: the second batch's update was skipped
    assert sums[1] == sums[0] and sums[2] != sums[1]  # θ untouched by the skipped step, changed by the next
    weights = _weights(root / "grad" / "model")
    assert all(torch.isfinite(v).all() for v in weights.values())
