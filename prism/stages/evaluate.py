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

import torch
import torch.distributed as dist
from lightning.pytorch import LightningDataModule, LightningModule
from torch.utils.data import DataLoader

from prism.errors import UserError
from prism.io import atomic_write_json, atomic_write_text
from prism.models.loading import load_model, load_tokenizer
from prism.stages.common import DTYPES

log = logging.getLogger(__name__)


class MuseEvaluator:
    """MUSE metrics (VerbMem, KnowMem forget/retain, PrivLeak, Unlearn Score) of a model on a local benchmark."""

    def __init__(
        self,
        path: str,
        batch_size: int = 16,
        max_new_tokens_verbmem: int = 128,
        max_new_tokens_knowmem: int = 32,
        min_k: float = 0.4,
        auc_ref: float = 0.5,
        limit: int | None = None,
        target_metrics: str | None = None,
    ):
        """
        Args:
            path: benchmark root in the MUSE layout.
            auc_ref: AUROC of a model retrained without the forget set (MUSE News 0.4772, Books 0.5393; 0.5 unknown).
            limit: score only the first N examples of each list (quick checks during training).
            target_metrics: metrics.json of the target model; adds `unlearn_score` relative to it.
        """
        from prism.data.formats import load_muse

        self.bench = load_muse(path)
        self.path = path
        self.kwargs = dict(batch_size=batch_size, max_new_tokens_verbmem=max_new_tokens_verbmem,
                           max_new_tokens_knowmem=max_new_tokens_knowmem, min_k=min_k, limit=limit)
        self.auc_ref = auc_ref
        self.target = None
        if target_metrics:
            p = Path(target_metrics)
            if not p.is_file():
                raise UserError(f"target_metrics: {p} not found (evaluate the target model first)")
            self.target = json.loads(p.read_text())

    def __call__(self, model, tokenizer, progress: bool = False) -> tuple[dict[str, float], list[dict]]:
        from prism.evaluation.metrics import unlearn_score
        from prism.evaluation.muse import evaluate_muse, metrics_from_records

        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
        _, records = evaluate_muse(model, tokenizer, self.bench, auc_ref=self.auc_ref, progress=progress,
                                   rank=rank, world=world, **self.kwargs)
        if world > 1:
            gathered = [None] * world
            dist.all_gather_object(gathered, records)
            records = [r for part in gathered for r in part]
        records.sort(key=lambda r: (r["task"], r["index"]))
        metrics = metrics_from_records(records, self.auc_ref)
        if self.target is not None:
            metrics["unlearn_score"] = unlearn_score(metrics, self.target)
        return metrics, records


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

    def __init__(self, path: str, tokenizer: str = "smollm2"):
        super().__init__()
        self.save_hyperparameters(logger=False)

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
        self.evaluator = MuseEvaluator(self.trainer.datamodule.hparams.path, h.batch_size, h.max_new_tokens_verbmem,
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
