"""Stage `relearn`: the relearning attack (DESIGN.md section 3) — fine-tune an unlearned model on a subset of the
forget set and re-evaluate it at given step counts, all in one run.

`prism relearn fit --config configs/<preset>/relearn.yaml --model.path DIR`

- Training is the finetune stage's NLL step, unchanged (RelearnModule subclasses FinetuneModule). The data is the
  ordinary BenchmarkData with `pairing: joint`, `retain_sources: []` (forget only) and `forget_limit` (subset size);
  lr and batch size are the usual `model.lr` / `data.batch_size`.
- RelearnCurve (a callback the module adds itself) runs the benchmark's evaluator (prism.stages.evaluate.
  BenchmarkEvaluator: MUSE metrics for MUSE data, KnowMem-style ROUGE for TOFU, MCQ accuracy for WMDP) at every
  step in `model.eval_steps`, step 0 before any update included; `trainer.max_steps` defaults to the last of them.
- Outputs in `output_dir` (default: the run's log dir), rewritten atomically after every point so an interrupted
  run keeps its partial curve: relearn.json (the step list and, per step, VerbMem, KnowMem forget / retain and every
  other metric of the evaluator), relearn.png (those three against steps); TensorBoard scalars `relearn/<metric>`
  at each step. `save_model: true` also writes the relearned checkpoint to `<output_dir>/model`.
In-loop evaluation works single-process and under DDP (the evaluator shards and gathers); not under FSDP.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Literal

from lightning.pytorch import Callback

from prism.errors import UserError
from prism.io import atomic_save_figure, atomic_write_json
from prism.stages.common import save_hf_checkpoint
from prism.stages.finetune import FinetuneModule

log = logging.getLogger(__name__)

CURVE_METRICS: tuple[str, ...] = ("verbmem_f", "knowmem_f", "knowmem_r")
LABELS = {"verbmem_f": "VerbMem (forget)", "knowmem_f": "KnowMem (forget)", "knowmem_r": "KnowMem (retain)"}


def curve_keys(points: list[dict]) -> list[str]:
    """The curve's metrics: VerbMem and KnowMem forget/retain (MUSE; TOFU has the KnowMem pair), else every
    metric of the evaluator (WMDP: MCQ accuracy per file)."""
    present = set().union(*(p.keys() for p in points)) if points else set()
    keys = [k for k in CURVE_METRICS if k in present]
    return keys or sorted(k for k in present if k != "step")


def curve_figure(points: list[dict], title: str):
    """PNG of VerbMem and KnowMem forget/retain against relearning steps."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure  # no pyplot: no global state, no display

    fig = Figure(figsize=(6, 4), dpi=100)
    ax = fig.add_subplot()
    steps = [p["step"] for p in points]
    keys = curve_keys(points)
    for key in keys:
        ys = [math.nan if p.get(key) is None else p[key] for p in points]
        ax.plot(steps, ys, marker="o", label=LABELS.get(key, key))
    ax.set_xlabel("relearning steps")
    ax.set_ylabel("ROUGE-L F1 ×100" if set(keys) <= set(CURVE_METRICS) else "score ×100")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


class RelearnCurve(Callback):
    """Evaluates the model being relearned at fixed optimiser steps (0 = before any update) and writes the curve."""

    def __init__(self, steps: list[int], evaluator_kwargs: dict, output_dir: str | None = None,
                 meta: dict | None = None):
        if not steps or any(int(s) < 0 for s in steps):
            raise UserError(f"eval_steps must be a non-empty list of steps >= 0, got {steps}")
        self.steps = sorted({int(s) for s in steps})
        self.evaluator_kwargs = evaluator_kwargs
        self.configured_output = output_dir
        self.meta = dict(meta or {})
        self.points: list[dict] = []
        self.evaluator = None

    # --- set-up ------------------------------------------------------------------------------------------------
    def setup(self, trainer, pl_module, stage):
        if stage != "fit" or self.evaluator is not None:
            return
        from prism.stages.evaluate import BenchmarkEvaluator

        data = trainer.datamodule
        if data is None or not hasattr(data.hparams, "path"):
            raise UserError("relearn needs a benchmark DataModule (prism.data.datamodule.BenchmarkData)")
        self.evaluator = BenchmarkEvaluator(data.hparams.path, getattr(data.hparams, "format", "muse"),
                                            **self.evaluator_kwargs)
        last = self.steps[-1]
        if trainer.max_steps == -1:
            trainer.fit_loop.epoch_loop.max_steps = last
            log.info("relearn: trainer.max_steps set to %d, the last evaluation step", last)
        elif trainer.max_steps < last:
            raise UserError(f"trainer.max_steps={trainer.max_steps} < the last eval step {last}: raise max_steps")
        h = data.hparams
        self.meta.update(data=str(h.path), format=h.format, batch_size=h.batch_size, forget_limit=h.forget_limit,
                         forget_sources=list(h.forget_sources))

    def output_dir(self, trainer) -> Path:
        return Path(self.configured_output or trainer.log_dir or trainer.default_root_dir)

    # --- evaluation points -------------------------------------------------------------------------------------
    def on_train_start(self, trainer, pl_module):
        data = trainer.datamodule
        self.meta["n_forget_examples"] = len(data.forget) if hasattr(data, "forget") else None
        if 0 in self.steps and not any(p["step"] == 0 for p in self.points):
            self._evaluate(trainer, pl_module, 0)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step in self.steps and not any(p["step"] == step for p in self.points):
            self._evaluate(trainer, pl_module, step)

    def on_train_end(self, trainer, pl_module):
        missing = [s for s in self.steps if not any(p["step"] == s for p in self.points)]
        if missing:
            log.warning("relearn: training ended at step %d before eval steps %s", trainer.global_step, missing)

    def _evaluate(self, trainer, pl_module, step: int):
        metrics, _ = self.evaluator(pl_module.model, pl_module.tokenizer)
        clean = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in metrics.items()}
        point = {"step": step, **clean}
        self.points.append(point)
        self.points.sort(key=lambda p: p["step"])
        if not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            logger.log_metrics({f"relearn/{k}": float(v) for k, v in point.items() if k != "step" and v is not None},
                               step=step)
        shown = {k: round(point[k], 2) for k in curve_keys([point]) if point.get(k) is not None}
        log.info("relearn step %d: %s", step, shown)
        self.write(trainer)

    def result(self) -> dict:
        return {
            **self.meta,
            "steps": [p["step"] for p in self.points],
            **{k: [p.get(k) for p in self.points] for k in curve_keys(self.points)},
            "points": self.points,
            "planned_steps": self.steps,
        }

    def write(self, trainer) -> None:
        out = self.output_dir(trainer)
        atomic_write_json(out / "relearn.json", self.result())
        title = f"relearning {self.meta.get('name', '')}".strip()
        atomic_save_figure(curve_figure(self.points, title), out / "relearn.png")


class RelearnModule(FinetuneModule):
    """The finetune stage's NLL training on the forget subset, plus the RelearnCurve callback."""

    def __init__(
        self,
        path: str = "smollm2",
        lr: float = 1e-5,
        loss_average: Literal["token", "sequence"] = "token",
        weight_decay: float = 0.0,
        eval_steps: list[int] = [0, 25, 50, 75, 100],
        eval_batch_size: int = 16,
        max_new_tokens_verbmem: int = 128,
        max_new_tokens_knowmem: int = 32,
        eval_limit: int | None = None,
        min_k: float = 0.4,
        auc_ref: float = 0.5,
        save_model: bool = False,
        name: str | None = None,
        output_dir: str | None = None,
        dtype: str = "float32",
        gradient_checkpointing: bool = False,
        trust_remote_code: bool = False,
    ):
        """
        Args:
            path: the unlearned model to attack (local HF directory).
            lr: relearning learning rate (MUSE: 1e-5).
            eval_steps: optimiser steps at which to evaluate; 0 is before any update.
            eval_batch_size: generation batch size of the evaluator.
            eval_limit: evaluate only the first N examples of each list (quick curves).
            auc_ref: AUROC of the retrained reference, for PrivLeak.
            save_model: also save the relearned model to <output_dir>/model at the end.
            name: the model's name in the outputs (default: the model directory's name).
            output_dir: where relearn.json / relearn.png go (default: the run's log dir).
        """
        super().__init__(path=path, lr=lr, loss_average=loss_average, weight_decay=weight_decay,
                         output_dir=output_dir, dtype=dtype, gradient_checkpointing=gradient_checkpointing,
                         trust_remote_code=trust_remote_code)
        self.save_hyperparameters()
        self.curve = RelearnCurve(
            eval_steps,
            dict(batch_size=eval_batch_size, max_new_tokens_verbmem=max_new_tokens_verbmem,
                 max_new_tokens_knowmem=max_new_tokens_knowmem, min_k=min_k, auc_ref=auc_ref, limit=eval_limit),
            output_dir,
            meta={"model": str(path), "name": name or Path(str(path)).name, "lr": lr, "weight_decay": weight_decay},
        )

    def configure_callbacks(self):
        return [self.curve]

    def on_train_end(self):
        # Not FinetuneModule's: its output_dir is a model directory, here it holds the curve.
        if self.hparams.save_model:
            out = self.curve.output_dir(self.trainer) / "model"
            self.saved_to = save_hf_checkpoint(self, self.model, self.tokenizer, out)
