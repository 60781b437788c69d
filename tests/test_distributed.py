"""Distributed correctness on CPU: 2 processes, gloo, Lightning's own strategies (DDP, FSDP2 via ModelParallelStrategy).

One launch of 2 worker processes (this file run as a script, LOCAL_RANK in the environment, so Lightning treats them
as externally launched ranks) runs, in order:
  1. per-rank data: a recorder module under DDP, 2 epochs, shuffled forget and retain loaders;
  2. PRISM (NPO + probe term + SAM + global decoupling, retain NLL) under DDP, 2 ranks x batch 2, 3 steps;
  3. the same under FSDP2 (`--trainer.strategy=fsdp2`, parameters and gradients sharded as DTensors), global scope;
  4. the same under FSDP2 with per-tensor decoupling.
The pytest process runs the single-process references (1 process x batch 4) and compares.

Why the equality is exact up to float rounding: every loss is a mean over examples of equal weight. NPO and the probe
CE are means over sequences; the retain NLL is a token mean, so every example is given the same number of labelled
tokens (raw passages, all longer than max_length, truncated to it: no padding, no prompt). Then the DDP average of two
rank gradients (batch 2 each) IS the gradient of the batch-4 loss, and Lightning's DistributedSampler with shuffle off
gives rank r the examples r, r+2, ... so the two ranks' batches together are the single process's batch.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORLD = 2
STEPS = 3
BATCH = 2  # per rank; the single-process reference uses WORLD * BATCH
MAX_LENGTH = 20


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- shared set-up (pytest process and workers) ------------------------------------------------------------------
def _prepare(root: Path) -> dict:
    from prism.data.synth import synthesize
    from prism.models.commands import tiny_from_benchmark
    from prism.models.probe import Probe, save_probe

    data = synthesize(root / "data", seed=3, n_forget=8, n_retain=12, n_holdout=2)
    model = tiny_from_benchmark(data, root / "model", layers=2, hidden=32, heads=2, vocab_size=512)
    torch.manual_seed(0)
    probe = Probe(32, kind="mlp")
    save_probe(root / "probe", probe, {"layer": 1, "pooling": "mean"})
    return {"data": str(data), "model": str(model), "probe": str(root / "probe")}


def _datamodule(paths: dict, batch_size: int, shuffle: bool):
    from prism.data.datamodule import BenchmarkData

    return BenchmarkData(paths["data"], tokenizer=paths["model"], forget_sources=["raw"], retain_sources=["raw"],
                         batch_size=batch_size, max_length=MAX_LENGTH, shuffle=shuffle)


def _prism(paths: dict, out: Path, scope: str = "global"):
    from prism.objectives.terms import NLL, NPO
    from prism.stages.unlearn import UnlearnModule

    return UnlearnModule(path=paths["model"], forget_objective=NPO(beta=0.1), retain_objective=NLL(),
                         probe=paths["probe"], lambda_max=0.5, sam_rho=0.05, decoupling="always",
                         decoupling_scope=scope, lr=1e-3, output_dir=str(out))


class _StepStats:
    """Keeps the logged per-step statistics (cos before/after decoupling, SAM norm) of every step."""

    def __init__(self):
        from lightning.pytorch import Callback

        stats = self.stats = []

        class _CB(Callback):
            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                keys = ("cos_before", "cos_after", "sam_norm", "forget_loss", "retain_loss", "grad_norm")
                stats.append({k: float(trainer.callback_metrics[f"unlearn/{k}"]) for k in keys}
                             | {f"{k}_index": batch[k]["index"].tolist() for k in ("forget", "retain")})

        self.callback = _CB()


def _fit(module, data, strategy, devices: int, callbacks=(), max_steps=STEPS, max_epochs=None):
    from lightning.pytorch import Trainer

    trainer = Trainer(accelerator="cpu", devices=devices, strategy=strategy, max_steps=max_steps, max_epochs=max_epochs,
                      logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      num_sanity_val_steps=0, callbacks=list(callbacks))
    trainer.fit(module, datamodule=data)
    return trainer


def _recorder():
    from lightning.pytorch import LightningModule

    class Recorder(LightningModule):
        """Records which forget and retain examples each step sees (one tiny backward so DDP has work to sync)."""

        def __init__(self):
            super().__init__()
            self.automatic_optimization = False
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.seen = []

        def training_step(self, batch, batch_idx):
            self.seen.append({"epoch": self.current_epoch, "forget": batch["forget"]["index"].tolist(),
                              "retain": batch["retain"]["index"].tolist()})
            self.manual_backward(self.w.sum() * 0)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    return Recorder()


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(model_dir) / "model.safetensors"))


# --- worker (one per rank) ---------------------------------------------------------------------------------------
def _worker(root: Path) -> None:
    from lightning.pytorch.strategies import DDPStrategy

    from prism.stages.parallel import FSDP2Strategy

    rank = int(os.environ["LOCAL_RANK"])
    paths = json.loads((root / "paths.json").read_text())
    out = {}

    rec = _recorder()
    _fit(rec, _datamodule(paths, BATCH, shuffle=True), DDPStrategy(), WORLD, max_steps=-1, max_epochs=2)
    out["seen"] = rec.seen

    for name, strategy, scope in (("ddp", DDPStrategy(), "global"), ("fsdp2", FSDP2Strategy(), "global"),
                                  ("fsdp2_per_tensor", FSDP2Strategy(), "per_tensor")):
        stats = _StepStats()
        module = _prism(paths, root / name, scope)
        trainer = _fit(module, _datamodule(paths, BATCH, shuffle=False), strategy, WORLD, [stats.callback])
        grads = [p for p in module.model.parameters()]
        out[name] = {"stats": stats.stats, "strategy": type(trainer.strategy).__name__,
                     "dtensor": type(grads[0]).__name__}
    (root / f"rank{rank}.json").write_text(json.dumps(out))
    print(f"RANK {rank} OK", flush=True)


# --- pytest side -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    root = tmp_path_factory.mktemp("dist")
    paths = _prepare(root)
    (root / "paths.json").write_text(json.dumps(paths))
    port = _free_port()
    procs = []
    for rank in range(WORLD):
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "GROUP_RANK")}
        env.update(LOCAL_RANK=str(rank), NODE_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   OMP_NUM_THREADS="1", PRISM_DIST_TEST_ROOT=str(root))
        log = open(root / f"rank{rank}.log", "w")
        procs.append((subprocess.Popen([sys.executable, __file__], env=env, stdout=log, stderr=subprocess.STDOUT,
                                       cwd=root), log))
    # the single-process references run while the workers do (2 cores)
    refs = {}
    for name, scope in (("global", "global"), ("per_tensor", "per_tensor")):
        stats = _StepStats()
        _fit(_prism(paths, root / f"ref_{name}", scope), _datamodule(paths, WORLD * BATCH, shuffle=False), "auto", 1,
             [stats.callback])
        refs[name] = stats.stats
    rec = _recorder()
    _fit(rec, _datamodule(paths, WORLD * BATCH, shuffle=True), "auto", 1, max_steps=-1, max_epochs=2)
    codes = []
    for proc, log in procs:
        try:
            codes.append(proc.wait(timeout=240))
        except subprocess.TimeoutExpired:
            for p, _ in procs:
                p.kill()
            raise
        finally:
            log.close()
    logs = {r: (root / f"rank{r}.log").read_text() for r in range(WORLD)}
    assert codes == [0] * WORLD, "\n".join(f"--- rank {r} ---\n{t[-4000:]}" for r, t in logs.items())
    ranks = [json.loads((root / f"rank{r}.json").read_text()) for r in range(WORLD)]
    return {"root": root, "paths": paths, "ranks": ranks, "refs": refs, "single_seen": rec.seen}


def test_each_rank_draws_different_forget_and_retain_examples(runs):
    from prism.data.datamodule import BenchmarkData

    seen = [r["seen"] for r in runs["ranks"]]
    dm = BenchmarkData(runs["paths"]["data"], tokenizer=runs["paths"]["model"], forget_sources=["raw"],
                       retain_sources=["raw"])
    dm.setup("fit")
    n = {"forget": len(dm.forget), "retain": len(dm.retain)}
    assert len(seen[0]) == len(seen[1]) > 0
    for a, b in zip(*seen):
        for key in ("forget", "retain"):
            assert len(a[key]) == len(b[key]) == BATCH
            assert not set(a[key]) & set(b[key]), f"ranks drew the same {key} example in one step: {a[key]} {b[key]}"
    for epoch in (0, 1):
        steps = [[s for s in rank if s["epoch"] == epoch] for rank in seen]
        single = [s for s in runs["single_seen"] if s["epoch"] == epoch]
        # retain is the longer set: each example exactly once per epoch over all ranks, as in one process
        union = sorted(i for rank in steps for s in rank for i in s["retain"])
        assert union == list(range(n["retain"])) == sorted(i for s in single for i in s["retain"])
        # forget cycles (max_size_cycle) within the epoch: every example is reached, as in one process
        assert {i for rank in steps for s in rank for i in s["forget"]} == set(range(n["forget"]))
        assert {i for s in single for i in s["forget"]} == set(range(n["forget"]))
        assert sum(len(s["retain"]) for rank in steps for s in rank) == sum(len(s["retain"]) for s in single)
    # shuffled per epoch, on every rank, for both loaders
    for rank in seen:
        for key in ("forget", "retain"):
            epoch0 = [i for s in rank if s["epoch"] == 0 for i in s[key]]
            epoch1 = [i for s in rank if s["epoch"] == 1 for i in s[key]]
            assert epoch0 != epoch1


def _assert_same_weights(dist_dir: Path, ref_dir: Path, init_dir: str):
    got, ref, init = _weights(dist_dir), _weights(ref_dir), _weights(Path(init_dir))
    assert got.keys() == ref.keys()
    moved = max((ref[k] - init[k]).abs().max().item() for k in ref)
    worst = max((got[k] - ref[k]).abs().max().item() for k in ref)
    # 3 AdamW steps at lr 1e-3 move weights by ~3e-3; float rounding of the gradient all-reduce stays far below
    assert moved > 1e-3, moved
    assert worst < 1e-5 * 300 * 1e-3 / 1e-3 * 1e-2 + 2e-6, f"max |Δw| {worst:.3g} vs single process (moved {moved:.3g})"
    return worst, moved


def test_ddp_two_ranks_equal_one_process_double_batch(runs):
    root = runs["root"]
    worst, moved = _assert_same_weights(root / "ddp", root / "ref_global", runs["paths"]["model"])
    dist_stats, ref_stats = runs["ranks"][0]["ddp"]["stats"], runs["refs"]["global"]
    assert runs["ranks"][0]["ddp"]["strategy"] == "DDPStrategy"
    for a, b in zip(dist_stats, ref_stats):  # SAM on, decoupling removed the conflict, same statistics per step
        assert a["sam_norm"] > 0 and abs(a["cos_after"]) < 1e-4
        for k in ("cos_before", "forget_loss", "retain_loss", "grad_norm"):
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), k
    # guard: half of the batch (what one rank sees) gives clearly different weights, so the check has teeth
    assert moved > 100 * worst


@pytest.mark.parametrize("name,ref", [("fsdp2", "global"), ("fsdp2_per_tensor", "per_tensor")])
def test_fsdp2_prism_step_equals_single_process(runs, name, ref):
    root = runs["root"]
    info = runs["ranks"][0][name]
    assert info["strategy"] == "FSDP2Strategy" and info["dtensor"] == "DTensor"
    _assert_same_weights(root / name, root / f"ref_{ref}", runs["paths"]["model"])
    for rank in runs["ranks"]:
        for a, b in zip(rank[name]["stats"], runs["refs"][ref]):
            assert a["sam_norm"] > 0
            for k in ("cos_before", "cos_after", "forget_loss", "retain_loss", "grad_norm"):
                assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), k


if __name__ == "__main__":
    _worker(Path(os.environ["PRISM_DIST_TEST_ROOT"]))
