"""Distributed correctness on CPU: 2 processes, gloo, Lightning's own strategies (DDP; FSDP2 = ModelParallelStrategy).

One launch of 2 worker processes (this file run as a script, LOCAL_RANK in the environment, so Lightning treats them
as externally launched ranks) runs, in order:
  1. per-rank data: a recorder module under DDP, 2 epochs, shuffled forget and retain loaders;
  2. PRISM (NPO + probe term + SAM + global decoupling, retain NLL) under DDP, 2 ranks x batch 2, 3 steps;
  3. the same under FSDP2 (`--trainer.strategy=fsdp2`: parameters and gradients sharded as DTensors), global scope;
  4. the same under FSDP2 with per-tensor decoupling;
  5. RMU under FSDP2 (a frozen copy of the model, sharded too; one trainable tensor).
The pytest process runs the single-process references (1 process x batch 4) meanwhile and compares.

Why the equality is exact up to float rounding: every loss is a mean over examples of equal weight. NPO and the probe
CE are means over sequences; the retain NLL is a token mean, so every example is given the same number of labelled
tokens (raw passages, all longer than max_length, truncated to it: no padding, no prompt). Then the DDP/FSDP average
of two rank gradients (batch 2 each) IS the gradient of the batch-4 loss, and Lightning's DistributedSampler with
shuffle off gives rank r the examples r, r+2, ... so the two ranks' batches together are the single process's batch.
The single-process tests at the end cover what the strategies change in the step itself (DeepSpeed's summed-loss
step, activation checkpointing, the refusals).
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


def _prism(paths: dict, out: Path, scope: str = "global", **kw):
    from prism.objectives.terms import NLL, NPO
    from prism.stages.unlearn import UnlearnModule

    return UnlearnModule(path=paths["model"], forget_objective=NPO(beta=0.1), retain_objective=NLL(),
                         probe=paths["probe"], lambda_max=0.5, sam_rho=0.05, decoupling="always",
                         decoupling_scope=scope, lr=1e-3, output_dir=str(out), **kw)


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
        params = list(module.model.parameters())
        out[name] = {"stats": stats.stats, "strategy": type(trainer.strategy).__name__,
                     "dtensor": type(params[0]).__name__}
    module = _rmu(paths, root / "fsdp2_rmu")
    _fit(module, _datamodule(paths, BATCH, shuffle=False), FSDP2Strategy(), WORLD)
    out["fsdp2_rmu"] = {"frozen_dtensor": type(next(module.frozen_model.parameters())).__name__}
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
    _fit(_prism(paths, root / "ref_half"), _datamodule(paths, BATCH, shuffle=False), "auto", 1)
    _fit(_rmu(paths, root / "ref_rmu"), _datamodule(paths, WORLD * BATCH, shuffle=False), "auto", 1)
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


def _max_diff(a: dict, b: dict) -> float:
    """Largest |a - b| over b's tensors. The FSDP2 full state dict also carries the tied lm_head (equal to the
    embeddings), which save_pretrained cannot recognise as tied once gathered: allowed only as an exact copy."""
    extra = set(a) - set(b)
    assert extra <= {"lm_head.weight"} and set(b) <= set(a), (extra, set(b) - set(a))
    for k in extra:
        assert torch.equal(a[k], a["model.embed_tokens.weight"])
    return max((a[k] - b[k]).abs().max().item() for k in b)


WEIGHT_TOL = 1e-5  # 3 AdamW steps at lr 1e-3 move weights by ~3e-3; all-reduce rounding stays ~1e-7


def _check_steps(dist_ranks: list[list[dict]], ref: list[dict]):
    """Per step: global statistics equal the single process's on every rank; the ranks' local losses average to the
    single process's loss (each rank's loss is over its half of the batch)."""
    assert len(ref) == STEPS and all(len(r) == STEPS for r in dist_ranks)
    for step, b in enumerate(ref):
        per_rank = [r[step] for r in dist_ranks]
        assert sorted(i for a in per_rank for i in a["forget_index"]) == sorted(b["forget_index"])
        assert sorted(i for a in per_rank for i in a["retain_index"]) == sorted(b["retain_index"])
        for a in per_rank:
            assert a["sam_norm"] == pytest.approx(b["sam_norm"]) and a["sam_norm"] > 0
            assert abs(a["cos_after"]) < 1e-4 < abs(a["cos_before"])  # decoupling removed a real conflict
            for k in ("cos_before", "grad_norm"):
                assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), (step, k)
        for k in ("forget_loss", "retain_loss"):
            mean = sum(a[k] for a in per_rank) / len(per_rank)
            assert mean == pytest.approx(b[k], rel=1e-5, abs=1e-6), (step, k)


def test_ddp_two_ranks_equal_one_process_double_batch(runs):
    root, init = runs["root"], _weights(Path(runs["paths"]["model"]))
    assert runs["ranks"][0]["ddp"]["strategy"] == "DDPStrategy"
    _check_steps([r["ddp"]["stats"] for r in runs["ranks"]], runs["refs"]["global"])
    ref = _weights(root / "ref_global")
    moved = _max_diff(ref, init)
    worst = _max_diff(_weights(root / "ddp"), ref)
    assert worst < WEIGHT_TOL < moved / 100, f"max |dw| {worst:.3g} vs single process (weights moved {moved:.3g})"
    # the check has teeth: one process with batch b instead of 2b ends far outside the tolerance
    assert _max_diff(_weights(root / "ref_half"), ref) > 100 * WEIGHT_TOL


@pytest.mark.parametrize("name,ref", [("fsdp2", "global"), ("fsdp2_per_tensor", "per_tensor")])
def test_fsdp2_prism_step_equals_single_process(runs, name, ref):
    root = runs["root"]
    info = runs["ranks"][0][name]
    assert info["strategy"] == "FSDP2Strategy" and info["dtensor"] == "DTensor"
    _check_steps([r[name]["stats"] for r in runs["ranks"]], runs["refs"][ref])
    worst = _max_diff(_weights(root / name), _weights(root / f"ref_{ref}"))
    assert worst < WEIGHT_TOL, f"max |dw| {worst:.3g} vs single process"


def test_fsdp2_rmu_with_sharded_frozen_copy_equals_single_process(runs):
    """KL / RMU need a frozen copy of the model: under FSDP2 it is made before sharding and sharded the same way."""
    root, init = runs["root"], _weights(Path(runs["paths"]["model"]))
    assert runs["ranks"][0]["fsdp2_rmu"]["frozen_dtensor"] == "DTensor"
    ref = _weights(root / "ref_rmu")
    changed = {k for k in ref if not torch.equal(ref[k], init[k])}
    assert changed == {"model.layers.0.mlp.down_proj.weight"}
    assert _max_diff(_weights(root / "fsdp2_rmu"), ref) < WEIGHT_TOL < _max_diff(ref, init) / 100


# --- single process: what the strategies change in the step ------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("single")
    return root, _prepare(root)


def _rmu(paths: dict, out: Path):
    """RMU: a frozen copy of the model (sharded too under FSDP2) and only one tensor trainable."""
    from prism.objectives.terms import RMUForget, RMURetain
    from prism.stages.unlearn import UnlearnModule

    return UnlearnModule(path=paths["model"], forget_objective=RMUForget(layer=1, steering_coef=20.0),
                         retain_objective=RMURetain(layer=1), retain_weight=100.0, trainable=[r"layers\.0\.mlp\.down_proj"],
                         lr=1e-3, output_dir=str(out))


def _gd(paths, out, cls=None):
    from prism.objectives.terms import GA, NLL
    from prism.stages.unlearn import UnlearnModule

    return (cls or UnlearnModule)(path=paths["model"], forget_objective=GA(), retain_objective=NLL(), retain_weight=2.5,
                                  lr=1e-3, output_dir=str(out))


def test_summed_loss_step_for_deepspeed_equals_the_two_backward_step(tiny):
    """Under DeepSpeed the step is one backward of c_f·l_f + c_r·l_r; same weights as the surgery path's c_f·g_f + c_r·g_r."""
    from prism.stages.unlearn import UnlearnModule

    class Owned(UnlearnModule):
        strategy_owns_gradients = True  # what DeepSpeed reports; the step then never reads .grad

    root, paths = tiny
    _fit(_gd(paths, root / "gd_plain"), _datamodule(paths, 4, shuffle=False), "auto", 1)
    _fit(_gd(paths, root / "gd_owned", Owned), _datamodule(paths, 4, shuffle=False), "auto", 1)
    init = _weights(Path(paths["model"]))
    ref = _weights(root / "gd_plain")
    assert _max_diff(ref, init) > 100 * WEIGHT_TOL
    assert _max_diff(_weights(root / "gd_owned"), ref) < WEIGHT_TOL


def test_activation_checkpointing_gives_the_same_prism_steps(tiny):
    """Non-reentrant checkpointing recomputes each layer inside the same backward, before SAM moves θ: same result."""
    root, paths = tiny
    stats = {}
    for ckpt in (False, True):
        module = _prism(paths, root / f"ckpt_{ckpt}", gradient_checkpointing=ckpt)
        assert any(getattr(m, "gradient_checkpointing", False) for m in module.model.modules()) == ckpt
        rec = _StepStats()
        _fit(module, _datamodule(paths, 4, shuffle=False), "auto", 1, [rec.callback])
        stats[ckpt] = rec.stats
    for a, b in zip(stats[True], stats[False]):
        assert a["sam_norm"] > 0 and a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    assert _max_diff(_weights(root / "ckpt_True"), _weights(root / "ckpt_False")) < WEIGHT_TOL


def test_unlearn_refuses_what_it_would_get_wrong(tiny):
    from types import SimpleNamespace

    from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy

    from prism.errors import UserError

    _, paths = tiny
    prism = _prism(paths, "unused")
    cases = [
        (FSDPStrategy(), "32-true", "FSDP1"),
        (object.__new__(DeepSpeedStrategy), "bf16-mixed", "DeepSpeed owns the gradients"),
        (DDPStrategy(gradient_as_bucket_view=True), "32-true", "gradient_as_bucket_view"),
        (DDPStrategy(), "16-mixed", "16-mixed"),
    ]
    for strategy, precision, message in cases:
        prism._trainer = SimpleNamespace(strategy=strategy, precision=precision)
        with pytest.raises(UserError, match=message):
            prism._check_strategy()
    prism._trainer = SimpleNamespace(strategy=DDPStrategy(), precision="bf16-mixed")
    prism._check_strategy()  # PRISM under DDP: fine
    gd = _gd(paths, "unused")
    gd._trainer = SimpleNamespace(strategy=object.__new__(DeepSpeedStrategy), precision="bf16-mixed")
    gd._check_strategy()  # no SAM, no decoupling: runs as the summed-loss step
    assert gd.strategy_owns_gradients


if __name__ == "__main__":
    _worker(Path(os.environ["PRISM_DIST_TEST_ROOT"]))
