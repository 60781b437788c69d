"""Stage `probe`: a robust forget/retain probe on pooled hidden states of the frozen LLM (DESIGN.md 1, stage 1).

ProbeData runs the frozen LLM once over forget (label 1, harmful) and retain (label 0, harmless) texts and pools
every candidate layer from the same forward; ProbeModule trains one probe per candidate layer side by side
(independent parameters, so one summed loss trains each exactly as alone) with the FGSM min-max objective,
scores them on the held-out split, and saves the best layer's probe.
"""

from __future__ import annotations

import logging
from typing import Literal

import torch
from lightning.pytorch import LightningDataModule, LightningModule
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

from prism.data.datamodule import Source, TokenizedExamples, benchmark_examples, collate, resumable_loader
from prism.errors import UserError
from prism.models.loading import load_model, load_tokenizer, model_dims
from prism.models.probe import Probe, pool, save_probe
from prism.objectives.probe import fgsm_perturbation, robust_probe_loss
from prism.stages.common import output_dir

log = logging.getLogger(__name__)


@torch.no_grad()
def extract_features(model, loader, layers: list[int], pooling: str, device="cpu") -> dict[int, torch.Tensor]:
    """Pooled features of every batch at every candidate layer, one forward per batch."""
    feats: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    model.eval().to(device)
    for batch in tqdm(loader, desc="features", leave=False):
        mask = batch["attention_mask"].to(device)
        hidden = model(input_ids=batch["input_ids"].to(device), attention_mask=mask, output_hidden_states=True).hidden_states
        for layer in layers:
            feats[layer].append(pool(hidden[layer], mask, pooling).float().cpu())
    return {layer: torch.cat(v) for layer, v in feats.items()}


class ProbeData(LightningDataModule):
    """Pooled features with labels (forget 1, retain 0), split train/val with a fixed seed."""

    def __init__(
        self,
        path: str,
        tokenizer: str = "smollm2",
        format: Literal["muse", "tofu", "wmdp"] = "muse",
        forget_sources: list[Source] = ["raw", "qa"],
        retain_sources: list[Source] = ["raw", "qa"],
        layers: list[int] | None = None,
        pooling: Literal["mean", "last"] = "mean",
        max_length: int = 128,
        extract_batch_size: int = 8,
        batch_size: int = 16,
        val_fraction: float = 0.2,
        seed: int = 0,
    ):
        """
        Args:
            tokenizer: the LLM whose features are probed (linked from model.path).
            layers: candidate layers (indices into hidden_states, 1..L); default: every layer.
            pooling: mean over non-pad tokens, or the last non-pad token.
        """
        super().__init__()
        self.save_hyperparameters(logger=False)  # the config file records them; `path` would clash with model.path
        self.features = None

    def validate(self):
        """Files, tokenisation and candidate layers, without model weights (the CLI calls this before any load)."""
        if getattr(self, "texts", None) is not None:
            return
        h = self.hparams
        forget = benchmark_examples(h.format, h.path, "forget", h.forget_sources)
        retain = benchmark_examples(h.format, h.path, "retain", h.retain_sources)
        self.tokenizer = load_tokenizer(h.tokenizer)
        n_layers = model_dims(h.tokenizer)[1]
        self.layers = list(h.layers) if h.layers else list(range(1, n_layers + 1))
        bad = [layer for layer in self.layers if not 0 <= layer <= n_layers]
        if bad:
            raise UserError(f"data.layers {bad} out of range: the model has hidden states 0..{n_layers}")
        self.counts = (len(forget), len(retain))
        self.texts = TokenizedExamples(forget + retain, self.tokenizer, h.max_length, f"{h.path} probe texts")

    def setup(self, stage=None):
        if self.features is not None:
            return
        self.validate()
        h, tokenizer, texts = self.hparams, self.tokenizer, self.texts
        forget, retain = self.counts
        model = load_model(h.tokenizer)
        loader = DataLoader(texts, batch_size=h.extract_batch_size, collate_fn=lambda b: collate(b, tokenizer.pad_token_id))
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.features = extract_features(model, loader, self.layers, h.pooling, device)
        del model
        self.labels = torch.cat([torch.ones(forget), torch.zeros(retain)]).long()
        order = torch.randperm(len(self.labels), generator=torch.Generator().manual_seed(h.seed))
        n_val = max(1, int(round(h.val_fraction * len(order))))
        self.val_idx, self.train_idx = order[:n_val], order[n_val:]

    def _dataset(self, idx):
        return TensorDataset(torch.stack([self.features[layer][idx] for layer in self.layers], 1), self.labels[idx])

    def train_dataloader(self):
        # seeded per epoch and checkpointed: `--ckpt_path last` resumes on the same batches
        return resumable_loader(self, self._dataset(self.train_idx), self.hparams.batch_size, True, self.hparams.seed)

    def val_dataloader(self):
        return DataLoader(self._dataset(self.val_idx), batch_size=len(self.val_idx))


class ProbeModule(LightningModule):
    """Batches are (features [B, n_layers, D], labels [B]); probe i sees layer i's features."""

    def __init__(
        self,
        path: str = "smollm2",
        kind: Literal["mlp", "linear"] = "mlp",
        eps: float = 1e-2,
        alpha: float = 0.4,
        l1: float = 1e-4,
        lr: float = 1e-4,
        standardize: bool = True,
        output_dir: str | None = None,
    ):
        """
        Args:
            path: the LLM the features come from (recorded in the probe's metadata).
            eps: FGSM radius (ℓ∞) in (standardised) feature space.
            alpha: weight of the adversarial CE.
            l1: λ₁, weight of ‖φ‖₁.
            output_dir: where the probe goes (default: <log dir>/probe).
        """
        super().__init__()
        self.save_hyperparameters()
        self.probes = torch.nn.ModuleList()
        self.saved_to = None

    def setup(self, stage=None):
        if len(self.probes):
            return
        data = self.trainer.datamodule
        self.layers = data.layers
        for layer in self.layers:
            probe = Probe(data.features[layer].shape[1], kind=self.hparams.kind)
            if self.hparams.standardize:
                train = data.features[layer][data.train_idx]
                probe.set_standardization(train.mean(0), train.std(0))
            self.probes.append(probe)
        self.best = {}

    def training_step(self, batch, batch_idx):
        z, y = batch
        h = self.hparams
        total = 0.0
        for i, probe in enumerate(self.probes):
            loss, parts = robust_probe_loss(probe, z[:, i], y, eps=h.eps, alpha=h.alpha, l1=h.l1)
            total = total + loss
        self.log("probe/loss", total / len(self.probes), prog_bar=True, batch_size=len(y))
        for key, value in parts.items():
            self.log(f"probe/last_layer_{key}", float(value), batch_size=len(y))
        return total

    def validation_step(self, batch, batch_idx):
        z, y = batch
        self.val_scores = {}
        for i, (layer, probe) in enumerate(zip(self.layers, self.probes)):
            with torch.enable_grad():
                delta = fgsm_perturbation(probe, z[:, i], y, self.hparams.eps)
            with torch.no_grad():
                clean = (probe(z[:, i]).argmax(-1) == y).float().mean().item()
                adv = (probe(z[:, i] + delta).argmax(-1) == y).float().mean().item()
            self.val_scores[layer] = (clean, adv)
            self.log(f"probe_val/acc_layer_{layer}", clean, batch_size=len(y))
            self.log(f"probe_val/adv_acc_layer_{layer}", adv, batch_size=len(y))
        best = max(self.val_scores, key=lambda layer: self.val_scores[layer])
        self.log("probe_val/best_acc", self.val_scores[best][0], prog_bar=True, batch_size=len(y))

    def configure_optimizers(self):
        return torch.optim.Adam(self.probes.parameters(), lr=self.hparams.lr)

    def on_fit_start(self):
        # Probes are tiny MLPs: one thread beats several that mostly synchronise (probe tests on a busy 2-core
        # machine: about 1 s single-threaded against 20 s with two threads).
        self._threads = torch.get_num_threads()
        torch.set_num_threads(1)

    def on_fit_end(self):
        torch.set_num_threads(self._threads)
        self._save_best()

    def _save_best(self):
        """Keep the layer with the best held-out (clean, then adversarial) accuracy after the last epoch."""
        if not self.trainer.is_global_zero:
            return
        data = self.trainer.datamodule
        best = max(self.val_scores, key=lambda layer: self.val_scores[layer])
        clean, adv = self.val_scores[best]
        meta = {
            "layer": best,
            "pooling": data.hparams.pooling,
            "model": self.hparams.path,
            "eps": self.hparams.eps,
            "alpha": self.hparams.alpha,
            "l1": self.hparams.l1,
            "val_accuracy": clean,
            "val_adversarial_accuracy": adv,
            "val_accuracy_by_layer": {str(k): v[0] for k, v in self.val_scores.items()},
            "n_train": len(data.train_idx),
            "n_val": len(data.val_idx),
        }
        probe = self.probes[self.layers.index(best)]
        self.saved_to = save_probe(output_dir(self, self.hparams.output_dir, "probe"), probe.cpu(), meta)
        log.info("probe: layer %d, val accuracy %.3f (adversarial %.3f) -> %s", best, clean, adv, self.saved_to)
