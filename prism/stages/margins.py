"""Stage `margins`: representation margins and parameter sharpness of a model on its forget set (DESIGN.md 3).

`prism margins test --config configs/<preset>/margins.yaml --model.path DIR --model.probe PROBE_DIR`

Representation margin: pooled forget features of the model (the probe's layer and pooling, the same `pool` as
stage 1) and, per example, the smallest ℓ2 / ℓ∞ perturbation of the feature that makes the frozen stage-1 probe say
harmful (prism.evaluation.margins: exact for a linear probe, binary search along the probe's gradient otherwise).
Reported: median and 10th percentile (plus mean, counts, the fraction the probe already calls harmful).

Parameter sharpness: the rise of the forget objective under one ρ-ball ascent step,
    S(ρ) = ℓ_f(θ + ρ·g/‖g‖₂) − ℓ_f(θ),  g = ∇ℓ_f(θ) over the whole forget set (global norm, prism.smoothing.sam),
θ restored exactly afterwards. ℓ_f is, by default (`sharpness_objective: npo`), PRISM's own forget loss, NPO on
sequence log-likelihoods, whose ascent direction is the direction that raises the forget likelihood, i.e. the
relearning direction: a small S means a flat, relearning-robust minimum, which is what SAM in stage 2 minimises. The
NPO reference log-probs are the `reference` model's (the target, as in stage 2) or, without one, the evaluated
model's own (then ℓ_f(θ) = (2/β)·log 2 and S measures only the slope/curvature around θ). `ga` uses ℓ_f = −NLL.
Also reported: forget NLL before and after the ascent.
Output: margins.json in `output_dir` (default: the run's log dir). Every rank computes the same numbers (the set is
small and the ascent needs whole-model gradients); rank 0 writes.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Literal

import torch
from lightning.pytorch import LightningDataModule, LightningModule
from torch.utils.data import DataLoader

from prism.data.datamodule import Source, TokenizedExamples, benchmark_examples, collate
from prism.errors import UserError
from prism.evaluation.margins import probe_margins, summarize
from prism.io import atomic_write_json
from prism.models.loading import load_model, load_tokenizer
from prism.models.probe import load_probe, pool
from prism.objectives.losses import npo, token_logprobs
from prism.smoothing.sam import sam_ascent, sam_restore
from prism.stages.common import DTYPES

log = logging.getLogger(__name__)


class MarginsData(LightningDataModule):
    """The tokenised forget (and optionally retain) texts; the loop itself runs one test_step per rank."""

    def __init__(
        self,
        path: str,
        tokenizer: str = "smollm2",
        format: Literal["muse", "tofu", "wmdp"] = "muse",
        forget_sources: list[Source] = ["raw", "qa"],
        retain_sources: list[Source] = [],
        limit: int | None = None,
        max_length: int = 128,
        batch_size: int = 8,
    ):
        """
        Args:
            forget_sources: forget texts whose features are measured (the probe's stage-1 sources by default).
            retain_sources: also report margins of retain texts (harmless by label), for comparison; [] for none.
            limit: use only the first N forget (and retain) examples.
        """
        super().__init__()
        self.save_hyperparameters(logger=False)
        self.forget = None

    def validate(self):
        """Read and tokenise the texts (no model weights): the CLI calls this before any model loads."""
        self.setup()

    def setup(self, stage=None):
        if self.forget is not None:
            return
        h = self.hparams
        self.tokenizer = load_tokenizer(h.tokenizer, padding_side="right")
        forget = benchmark_examples(h.format, h.path, "forget", h.forget_sources)[: h.limit]
        self.forget = TokenizedExamples(forget, self.tokenizer, h.max_length, f"{h.path} forget")
        retain = benchmark_examples(h.format, h.path, "retain", h.retain_sources)[: h.limit] if h.retain_sources else []
        self.retain = TokenizedExamples(retain, self.tokenizer, h.max_length, f"{h.path} retain")

    def batches(self, dataset, device) -> list[dict[str, torch.Tensor]]:
        """Right-padded batches of a dataset, on `device`, in order."""
        pad, size = self.tokenizer.pad_token_id, self.hparams.batch_size
        out = []
        for s in range(0, len(dataset), size):
            b = collate([dataset[i] for i in range(s, min(s + size, len(dataset)))], pad)
            out.append({k: v.to(device) for k, v in b.items()})
        return out

    def test_dataloader(self):
        return DataLoader([0], batch_size=1)


class MarginsModule(LightningModule):
    def __init__(
        self,
        path: str = "smollm2",
        probe: str = "probe",
        norms: list[Literal["l2", "linf"]] = ["l2", "linf"],
        space: Literal["raw", "standardized"] = "raw",
        method: Literal["auto", "exact", "search"] = "auto",
        search_steps: int = 50,
        max_radius: float = 1e6,
        sharpness_rho: list[float] = [0.01],
        sharpness_objective: Literal["npo", "ga"] = "npo",
        npo_beta: float = 0.1,
        reference: str | None = None,
        name: str | None = None,
        output_dir: str | None = None,
        dtype: str = "float32",
        trust_remote_code: bool = False,
    ):
        """
        Args:
            path: the model to measure (typically an unlearned one).
            probe: a stage-1 probe directory (probe.json + probe.safetensors).
            norms: margins to report, ℓ2 and/or ℓ∞.
            space: perturb the raw pooled feature, or the probe's standardised feature (where stage 1's ε lives).
            method: auto (exact for a linear probe, binary search otherwise), exact (linear only) or search.
            search_steps: bisection steps of the search.
            max_radius: give up (margin inf, reported as not flipped) beyond this radius.
            sharpness_rho: the ascent radii ρ; [] skips the sharpness measurement.
            sharpness_objective: npo (PRISM's forget loss) or ga (−NLL), see the module docstring.
            reference: model whose log-probs are the NPO reference (the target); default: the evaluated model.
            output_dir: where margins.json goes (default: the run's log dir).
        """
        super().__init__()
        self.save_hyperparameters()
        self.model = load_model(path, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code)
        self.tokenizer = load_tokenizer(path)
        self.probe, self.probe_meta = load_probe(probe)
        self.probe.requires_grad_(False)
        hidden, layers = self.model.config.hidden_size, self.model.config.num_hidden_layers
        if self.probe_meta["in_dim"] != hidden:
            raise UserError(f"probe {probe}: input dim {self.probe_meta['in_dim']} != model hidden size {hidden}")
        if not 0 <= self.probe_meta["layer"] <= layers:
            raise UserError(f"probe {probe}: layer {self.probe_meta['layer']} not in 0..{layers} of the model")
        if method == "exact" and self.probe_meta["kind"] != "linear":
            raise UserError("method 'exact' needs a linear probe; use auto or search")
        self.result = None

    # --- representation margins --------------------------------------------------------------------------------
    @torch.no_grad()
    def features(self, batches) -> torch.Tensor:
        """Pooled features at the probe's layer with the probe's pooling: the exact input stage 1 trained on."""
        layer, mode = self.probe_meta["layer"], self.probe_meta["pooling"]
        self.model.eval()
        out = []
        for b in batches:
            hidden = self.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                                output_hidden_states=True).hidden_states[layer]
            out.append(pool(hidden, b["attention_mask"], mode).float())
        return torch.cat(out)

    def margins(self, z: torch.Tensor) -> dict:
        h = self.hparams
        with torch.no_grad():
            harmful = (self.probe(z).argmax(-1) == 1).float()
        out = {"n": len(z), "probe_harmful_rate": float(harmful.mean())}
        for norm in h.norms:
            m = probe_margins(self.probe, z, norm, h.space, h.method, h.search_steps, h.max_radius)
            out[norm] = summarize(m)
        return out

    # --- parameter sharpness -----------------------------------------------------------------------------------
    def _seq_logprobs(self, model, batches) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([self._logp(model, b)[0] for b in batches])

    @staticmethod
    def _logp(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(sequence log-probs [B], number of labelled tokens []) of a batch."""
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logp, mask = token_logprobs(logits, batch["labels"])
        return logp.sum(-1), mask.sum()

    def _objective(self, batches, ref: torch.Tensor, backward: bool) -> tuple[float, float]:
        """(ℓ_f over the whole set, forget token NLL); with backward, accumulates ∇ℓ_f into .grad."""
        h = self.hparams
        n_seq = sum(len(b["input_ids"]) for b in batches)
        n_tok = float(sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches))
        if n_tok == 0:
            raise UserError("sharpness: no forget token carries a label (prompts longer than data.max_length?)")
        total, nll_sum, start = 0.0, 0.0, 0
        for b in batches:
            with torch.set_grad_enabled(backward):
                logp, _ = self._logp(self.model, b)
                if h.sharpness_objective == "npo":
                    loss = npo(logp, ref[start : start + len(logp)], h.npo_beta) * (len(logp) / n_seq)
                else:
                    loss = logp.sum() / n_tok  # −NLL, token-weighted over the whole set
            if backward:
                loss.backward()
            total += float(loss.detach())
            nll_sum -= float(logp.detach().sum())
            start += len(logp)
        return total, nll_sum / n_tok

    def sharpness(self, batches) -> dict:
        h = self.hparams
        params = [p for p in self.model.parameters() if p.requires_grad]
        if h.reference and h.sharpness_objective == "npo":
            ref_model = load_model(h.reference, dtype=DTYPES[h.dtype], trust_remote_code=h.trust_remote_code)
            ref = self._seq_logprobs(ref_model.to(self.device).eval(), batches)
            del ref_model
        else:
            ref = self._seq_logprobs(self.model, batches)
        for p in params:
            p.grad = None
        loss0, nll0 = self._objective(batches, ref, backward=True)
        rows = []
        for rho in h.sharpness_rho:
            saved, grad_norm = sam_ascent(params, rho)
            with torch.no_grad():
                loss1, nll1 = self._objective(batches, ref, backward=False)
            sam_restore(params, saved)
            del saved
            rows.append({"rho": rho, "loss": loss0, "loss_perturbed": loss1, "sharpness": loss1 - loss0,
                         "forget_nll": nll0, "forget_nll_perturbed": nll1, "grad_norm": float(grad_norm)})
        for p in params:
            p.grad = None
        return {"objective": h.sharpness_objective, "reference": h.reference or "self", "by_rho": rows}

    # --- the loop ----------------------------------------------------------------------------------------------
    def test_step(self, batch, batch_idx):
        data = self.trainer.datamodule
        # Lightning tests under inference_mode; the ascent needs autograd, so leave it for this step.
        with torch.inference_mode(False), torch.enable_grad():
            was_training = self.model.training
            self.model.eval()
            forget = data.batches(data.forget, self.device)
            result = {"forget": self.margins(self.features(forget))}
            if len(data.retain):
                result["retain"] = self.margins(self.features(data.batches(data.retain, self.device)))
            if self.hparams.sharpness_rho:
                result["sharpness"] = self.sharpness(forget)
            self.model.train(was_training)
        self.result = result

    def on_test_end(self):
        if not self.trainer.is_global_zero:
            return
        h = self.hparams
        meta = {k: self.probe_meta.get(k) for k in ("layer", "pooling", "kind", "normalisation", "val_accuracy")}
        out = {"model": str(h.path), "name": h.name or Path(str(h.path)).name,
               "data": str(self.trainer.datamodule.hparams.path), "probe": str(h.probe), "probe_meta": meta,
               "space": h.space, "method": h.method, **self.result}
        flat = {f"margins/forget_{norm}_{s}": out["forget"][norm][s] for norm in h.norms for s in ("median", "p10")}
        for row in out.get("sharpness", {}).get("by_rho", []):
            flat[f"margins/sharpness_rho{row['rho']}"] = row["sharpness"]
        for logger in self.trainer.loggers:
            logger.log_metrics({k: float(v) for k, v in flat.items() if v is not None and math.isfinite(v)}, step=0)
        path = Path(h.output_dir or self.trainer.log_dir or ".") / "margins.json"
        atomic_write_json(path, out)
        log.info("margins of %s -> %s: %s", out["name"], path, flat)
