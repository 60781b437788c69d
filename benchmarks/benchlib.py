"""Shared pieces of the benchmarks: the benchmark data, the unlearning methods as the smollm2 preset configures them,
a step timer, and NPO with a resident reference model (the memory comparison's baseline).

Everything runs on the embedded SmolLM2-135M-Instruct and a synthesized fictitious benchmark written under
logs/bench/work (nothing is downloaded at run time).
"""

from __future__ import annotations

import importlib
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parent.parent
WORK = REPO / "logs" / "bench" / "work"
METHOD_CONFIGS = REPO / "configs" / "smollm2" / "unlearn"
# 1, 2 and 3 forward+backward passes per step; `--methods all` times every configs/smollm2/unlearn/*.yaml
MAIN_METHODS = ("ga", "gd", "npo_gd", "sam_npo", "prism")


def all_methods() -> list[str]:
    return sorted(p.stem for p in METHOD_CONFIGS.glob("*.yaml"))


def prepare_data(n_forget: int = 24, n_retain: int = 24) -> Path:
    """The synthetic MUSE-layout benchmark (deterministic; written once)."""
    from prism.data.synth import synthesize

    out = WORK / f"data-{n_forget}-{n_retain}"
    if not (out / "meta.json").exists():
        synthesize(out, seed=0, n_forget=n_forget, n_retain=n_retain, n_holdout=8)
    return out


def prepare_probe(model_path: str = "smollm2") -> Path:
    """A random stage-1 probe for the model (timing and memory do not depend on its weights)."""
    from transformers import AutoConfig

    from prism.models.loading import resolve_model_dir
    from prism.models.probe import Probe, save_probe

    out = WORK / "probe"
    if not (out / "probe.json").exists():
        config = AutoConfig.from_pretrained(resolve_model_dir(model_path))
        torch.manual_seed(0)
        save_probe(out, Probe(config.hidden_size), {"layer": config.num_hidden_layers // 2, "pooling": "mean"})
    return out


def datamodule(data: Path, batch: int, seq: int, model_path: str = "smollm2"):
    """Raw passages only, every one longer than `seq` tokens, so every example is exactly `seq` tokens: each method
    sees the same number of tokens per step."""
    from prism.data.datamodule import BenchmarkData

    return BenchmarkData(str(data), tokenizer=model_path, forget_sources=["raw"], retain_sources=["raw"],
                         batch_size=batch, max_length=seq, shuffle=False)


def _instantiate(spec):
    if not isinstance(spec, dict) or "class_path" not in spec:
        return spec
    module, name = spec["class_path"].rsplit(".", 1)
    return getattr(importlib.import_module(module), name)(**spec.get("init_args", {}))


def method_kwargs(method: str, out: Path, model_path: str = "smollm2") -> dict:
    """UnlearnModule arguments of a method, read from configs/smollm2/unlearn/<method>.yaml (so the benchmark times
    what the study runs), with the model, probe and output directory replaced."""
    cfg = yaml.safe_load((METHOD_CONFIGS / f"{method}.yaml").read_text())["model"]
    kwargs = {k: _instantiate(v) for k, v in cfg.items()}
    kwargs.update(path=model_path, output_dir=str(out))
    if kwargs.get("probe"):
        kwargs["probe"] = str(prepare_probe(model_path))
    return kwargs


def clock() -> float:
    """The step clock. On a GPU: wall time (after a synchronize). On a CPU: CPU time of this process (user + system,
    all threads), which other processes sharing the machine do not inflate; wall time is kept alongside."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        return time.perf_counter()
    return time.process_time()


CLOCK = "wall seconds" if torch.cuda.is_available() else "CPU seconds (user+system, all threads)"


class StepTimer:
    """Time of each optimiser step (one training batch = one step in the unlearn stage) by `clock`, its wall time, and
    the part spent in optimizer.step (the same for every method: it dilutes the ratios of the passes)."""

    def __init__(self):
        from lightning.pytorch import Callback

        times, wall, opt_times = self.times, self.wall, self.opt_times = [], [], []

        class _Timer(Callback):
            def on_train_start(self, trainer, pl_module):
                optimizer = trainer.optimizers[0]
                inner = optimizer.step

                def timed_step(*args, **kwargs):
                    t0 = clock()
                    out = inner(*args, **kwargs)
                    opt_times[-1] += clock() - t0
                    return out

                optimizer.step = timed_step

            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                opt_times.append(0.0)
                self.t0, self.w0 = clock(), time.perf_counter()

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                times.append(clock() - self.t0)
                wall.append(time.perf_counter() - self.w0)

        self.callback = _Timer()


def trainer(max_steps: int, precision: str = "32-true", callbacks=()):
    from lightning.pytorch import Trainer

    return Trainer(accelerator="cpu" if not torch.cuda.is_available() else "auto", devices=1, max_steps=max_steps,
                   precision=precision, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, num_sanity_val_steps=0, callbacks=list(callbacks))


def run_method(kwargs: dict, data: Path, batch: int, seq: int, warmup: int, steps: int, precision: str = "32-true",
               save: bool = False) -> dict:
    """Fit `warmup + steps` steps; seconds of each timed step (the warm-up steps are dropped)."""
    from prism.stages.unlearn import UnlearnModule

    class NoSave(UnlearnModule):
        def on_train_end(self):  # the benchmark's weights are not a result
            if save:
                super().on_train_end()

    timer = StepTimer()
    module = NoSave(**kwargs)
    dm = datamodule(data, batch, seq)
    trainer(warmup + steps, precision, [timer.callback]).fit(module, datamodule=dm)
    timed = timer.times[warmup:]
    return {"step_seconds": timed, "optimizer_seconds": timer.opt_times[warmup:], "wall_seconds": timer.wall[warmup:],
            "warmup_seconds": timer.times[:warmup], "mean_step_seconds": sum(timed) / len(timed),
            "tokens_per_step": 2 * batch * seq}


class NPOResidentReference:
    """NPO the way the authors' code runs it: log π_ref from a reference model kept in memory (a forward per step)."""

    hidden_layer = None
    needs_reference_logprobs = False
    needs_frozen_model = True

    def __init__(self, beta: float = 0.1):
        self.beta = beta

    def __call__(self, out, batch, stage):
        from prism.objectives import losses

        with torch.no_grad():
            ref = stage.frozen_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        ref_logp = losses.sequence_logprob(ref.float(), batch["labels"])
        return losses.npo(losses.sequence_logprob(out.logits, batch["labels"]), ref_logp, self.beta)


def bf16_support() -> dict:
    """Whether bf16 autocast runs here, and whether the CPU has native bf16 instructions (else it is emulated)."""
    info = {"device": "cuda" if torch.cuda.is_available() else "cpu"}
    if torch.cuda.is_available():
        info["native"] = bool(torch.cuda.is_bf16_supported())
        return info
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            torch.ones(2, 2) @ torch.ones(2, 2)
        info["autocast"] = True
    except RuntimeError:
        info["autocast"] = False
    flags = ""
    try:
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        pass
    info["cpu_flags"] = sorted({f for f in flags.split() if f in ("avx512_bf16", "amx_bf16", "amx_tile")})
    info["native"] = bool(info["cpu_flags"])
    return info
