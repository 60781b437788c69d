"""Stage `evaluate`: the benchmark's metrics for any local HF model, and the evaluator every stage reuses.

`prism evaluate test --config configs/<preset>/evaluate.yaml --model.path DIR` writes, under the run's log dir,
metrics.json (flat name → number, plus model and data paths) and generations.jsonl. Work is split across ranks
(each rank scores a strided shard) and the per-example records are gathered, so metrics equal the one-process ones.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Literal

import torch.distributed as dist
from lightning.pytorch import LightningDataModule, LightningModule
from torch.utils.data import DataLoader

from prism.errors import UserError
from prism.io import atomic_write_json, atomic_write_text
from prism.models.loading import load_model, load_tokenizer
from prism.stages.common import DTYPES

log = logging.getLogger(__name__)


class BenchmarkEvaluator:
    """The metrics of a local benchmark's format, for one model.

    muse: VerbMem, KnowMem forget/retain, PrivLeak (+ Unlearn Score against a target's metrics.json).
    tofu: ROUGE-L of greedy answers on the forget and retain splits (as knowmem_f / knowmem_r).
    wmdp: MCQ accuracy of every multiple-choice file in the directory (`mcq/<file stem>`).
    """

    def __init__(
        self,
        path: str,
        format: str = "muse",
        batch_size: int = 16,
        max_new_tokens_verbmem: int = 128,
        max_new_tokens_knowmem: int = 32,
        min_k: float = 0.4,
        auc_ref: float = 0.5,
        limit: int | None = None,
        target_metrics: str | None = None,
    ):
        from prism.data import formats

        self.path, self.format, self.limit, self.auc_ref = path, format, limit, auc_ref
        self.batch_size, self.max_new_tokens_knowmem = batch_size, max_new_tokens_knowmem
        if format == "muse":
            self.bench = formats.load_muse(path)
            self.muse_kwargs = dict(batch_size=batch_size, max_new_tokens_verbmem=max_new_tokens_verbmem,
                                    max_new_tokens_knowmem=max_new_tokens_knowmem, min_k=min_k, limit=limit)
        elif format == "tofu":
            splits = formats.load_tofu(path)
            pick = lambda names: next(splits[n] for n in names if n in splits)  # noqa: E731
            self.qa = {"knowmem_f": pick(formats.TOFU_FORGET), "knowmem_r": pick(formats.TOFU_RETAIN)}
        elif format == "wmdp":
            files = [p for p in sorted(Path(path).glob("*.json*"))
                     if formats.wmdp_kind(p, formats._read_records(p)) == "mcq"]
            if not files:
                raise UserError(f"{path}: no multiple-choice files (records with 'choices') to evaluate")
            self.mcq = {f"mcq/{p.stem}": formats.load_mcq(p) for p in files}
        else:
            raise UserError(f"unknown data format '{format}' (expected muse, tofu or wmdp)")
        self.target = None
        if target_metrics:
            p = Path(target_metrics)
            if not p.is_file():
                raise UserError(f"target_metrics: {p} not found (evaluate the target model first)")
            self.target = json.loads(p.read_text())

    def __call__(self, model, tokenizer, progress: bool = False) -> tuple[dict[str, float], list[dict]]:
        from prism.evaluation.metrics import unlearn_score

        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
        records = getattr(self, f"_{self.format}_records")(model, tokenizer, progress, rank, world)
        if world > 1:
            gathered = [None] * world
            dist.all_gather_object(gathered, records)
            records = [r for part in gathered for r in part]
        records.sort(key=lambda r: (r["task"], r["index"]))
        metrics = self._metrics(records)
        if self.target is not None and self.format == "muse":
            metrics["unlearn_score"] = unlearn_score(metrics, self.target)
        return metrics, records

    def _metrics(self, records):
        from prism.evaluation.muse import metrics_from_records

        metrics = metrics_from_records(records, self.auc_ref)
        for task in sorted({r["task"] for r in records if "correct" in r}):
            rows = [r["correct"] for r in records if r["task"] == task]
            metrics[task] = 100.0 * sum(rows) / len(rows)
        return metrics

    def _muse_records(self, model, tokenizer, progress, rank, world):
        from prism.evaluation.muse import evaluate_muse

        return evaluate_muse(model, tokenizer, self.bench, auc_ref=self.auc_ref, progress=progress, rank=rank,
                             world=world, **self.muse_kwargs)[1]

    def _take(self, items, rank, world):
        from prism.evaluation.muse import shard

        return shard(list(enumerate(items))[: self.limit], rank, world)

    def _tofu_records(self, model, tokenizer, progress, rank, world):
        from prism.evaluation.generation import generate
        from prism.evaluation.metrics import cut_answer, knowmem_prompt
        from prism.evaluation.muse import _generation_records

        records = []
        for task, qa in self.qa.items():
            items = self._take(qa, rank, world)
            prompts = [knowmem_prompt([], d["question"]) for _, d in items]
            outputs = [cut_answer(o) for o in generate(model, tokenizer, prompts, self.max_new_tokens_knowmem,
                                                      self.batch_size, progress=progress)]
            records += _generation_records(task, prompts, outputs, [d["answer"] for _, d in items],
                                           [i for i, _ in items])
        return records

    def _wmdp_records(self, model, tokenizer, progress, rank, world):
        from prism.evaluation.mcq import mcq_letter_logprobs

        records = []
        for task, mcq in self.mcq.items():
            items = self._take(mcq, rank, world)
            if not items:
                continue
            predicted = mcq_letter_logprobs(model, tokenizer, [d for _, d in items], self.batch_size, progress).argmax(-1)
            records += [{"task": task, "index": i, "correct": int(p == d["answer"])}
                        for (i, d), p in zip(items, predicted.tolist())]
        return records


def write_results(out_dir: Path, metrics: dict, records: list[dict], model: str, data: str, name: str | None = None):
    """metrics.json (flat) and generations.jsonl, each written atomically."""
    flat = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in metrics.items()}
    flat.update({"model": str(model), "data": str(data)})
    if name:
        flat["name"] = name
    atomic_write_json(out_dir / "metrics.json", flat)
    generations = [r for r in records if "output" in r]
    atomic_write_text(out_dir / "generations.jsonl", "".join(json.dumps(r) + "\n" for r in generations))


class EvaluationData(LightningDataModule):
    """One item per rank: the evaluator shards the benchmark itself, so the loop runs test_step once per rank."""

    def __init__(self, path: str, format: Literal["muse", "tofu", "wmdp"] = "muse", tokenizer: str = "smollm2"):
        super().__init__()
        self.save_hyperparameters(logger=False)

    def validate(self):
        """Check the benchmark's files (no model weights): the CLI calls this before any model loads."""
        from prism.data.formats import check

        check(self.hparams.format, self.hparams.path)

    def test_dataloader(self):
        return DataLoader([0], batch_size=1)


class EvaluateModule(LightningModule):
    def __init__(
        self,
        path: str = "smollm2",
        name: str | None = None,
        batch_size: int = 16,
        max_new_tokens_verbmem: int = 128,
        max_new_tokens_knowmem: int = 32,
        min_k: float = 0.4,
        auc_ref: float = 0.5,
        limit: int | None = None,
        target_metrics: str | None = None,
        output_dir: str | None = None,
        dtype: str = "float32",
        trust_remote_code: bool = False,
    ):
        """
        Args:
            path: model to evaluate (local HF directory, or 'smollm2').
            name: row name in reports (default: the model directory's name).
            output_dir: where metrics.json and generations.jsonl go (default: the run's log dir).
        """
        super().__init__()
        self.save_hyperparameters()
        self.model = load_model(path, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code)
        self.tokenizer = load_tokenizer(path)
        self.metrics = None

    def setup(self, stage=None):
        h = self.hparams
        data = self.trainer.datamodule.hparams
        self.evaluator = BenchmarkEvaluator(data.path, data.format, h.batch_size, h.max_new_tokens_verbmem,
                                            h.max_new_tokens_knowmem, h.min_k, h.auc_ref, h.limit, h.target_metrics)

    def test_step(self, batch, batch_idx):
        metrics, records = self.evaluator(self.model, self.tokenizer, progress=self.trainer.is_global_zero)
        for k, v in metrics.items():
            self.log(f"eval/{k}", float(v), rank_zero_only=True)
        self.metrics, self.records = metrics, records

    def on_test_end(self):
        if not self.trainer.is_global_zero:
            return
        h = self.hparams
        out = Path(h.output_dir or self.trainer.log_dir or ".")
        name = h.name or Path(str(h.path)).name
        write_results(out, self.metrics, self.records, h.path, self.trainer.datamodule.hparams.path, name)
        log.info("metrics of %s -> %s: %s", name, out / "metrics.json",
                 {k: round(v, 2) for k, v in self.metrics.items() if isinstance(v, float)})
