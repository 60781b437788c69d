"""Stage `unlearn`: PRISM and every baseline, as configurations of one manual-optimisation step.

One step (DESIGN.md section 1, stage 2), top to bottom in `training_step`:
  1. ℓ_f = L_forget + λ_t·L_probe on the forget batch (probe term from the same forward's hidden states)
  2. SAM ascent: e = ρ·g/‖g‖ (global norm), θ ← θ + e                      [if sam_rho]
  3. g_f = ∇ℓ_f(θ + e), then θ restored exactly                            [if sam_rho]
  4. g_r = ∇L_retain(θ) on the retain batch
  5. g_f ← g_f − (⟨g_f,g_r⟩/‖g_r‖²)·g_r                                    [decoupling mode/scope]
  6. grad = c_f·g_f + c_r·g_r, optimiser step
Three forward+backward passes (forget, perturbed forget, retain), no reference forward (NPO's log π_ref is cached).
Gradient-sized buffers per trainable parameter: at most 2 at any time, because the projection needs g_f and g_r at
once. Timeline: after pass 1, g and SAM's saved copy of θ (for a bit-exact restore; an e buffer would be the same
size); g is freed before pass 2, which makes g_f next to the saved θ; the saved θ is freed before pass 3, which makes
g_r next to g_f. Decoupling and the combination are in place on g_f and g_r (scalar temporaries only), so the .grad
the optimiser reads is g_r's buffer. Under DDP add the reducer's own bucket copy; under FSDP2 every buffer is a
1/world shard. Strategies: prism/stages/parallel.py (ddp, fsdp2; DeepSpeed without SAM/decoupling).
"""

from __future__ import annotations

import copy
import logging
import math
import re
from typing import Literal

import torch
from jsonargparse import lazy_instance
from lightning.pytorch import LightningModule

from prism.errors import TrainingAborted, UserError
from prism.models.loading import check_probe_dir, load_model, load_tokenizer
from prism.models.probe import load_probe, pool
from prism.objectives.losses import lambda_schedule, sequence_logprob
from prism.objectives.probe import probe_term
from prism.objectives.terms import NLL, NPO, Objective
from prism.smoothing.gcd import decouple
from prism.smoothing.reduce import local, sq_norm
from prism.smoothing.sam import sam_ascent, sam_restore
from prism.stages.common import DTYPES, output_dir, save_hf_checkpoint
from prism.stages.parallel import (apply_fsdp2, data_parallel_mesh, enable_activation_checkpointing, fused_adamw_ok,
                                   strategy_kind)

log = logging.getLogger(__name__)


class UnlearnModule(LightningModule):
    def __init__(
        self,
        path: str = "smollm2",
        forget_objective: Objective = lazy_instance(NPO, beta=0.1),
        retain_objective: Objective | None = lazy_instance(NLL),
        forget_weight: float = 1.0,
        retain_weight: float = 1.0,
        probe: str | None = None,
        lambda_max: float = 0.07,
        sam_rho: float | None = None,
        decoupling: Literal["always", "conflict", "off"] = "off",
        decoupling_scope: Literal["global", "per_tensor"] = "global",
        lr: float = 1e-5,
        weight_decay: float = 0.0,
        gradient_clip: float | None = None,
        trainable: list[str] | None = None,
        task_vector_alpha: float | None = None,
        max_nonfinite_steps: int = 5,
        validation: dict | None = None,
        output_dir: str | None = None,
        dtype: str = "float32",
        gradient_checkpointing: bool = False,
        trust_remote_code: bool = False,
    ):
        """
        Args:
            path: model to unlearn (local HF directory, or 'smollm2' for the embedded default).
            forget_objective: loss minimised on the forget batch (GA, NPO, SimNPO, RMUForget, NLL for task vectors).
            retain_objective: loss minimised on the retain batch (NLL, KL, RMURetain), or null for none.
            forget_weight: c_f, weight of the (decoupled) forget gradient.
            retain_weight: c_r, weight of the retain gradient.
            probe: directory of a stage-1 probe: adds λ_t·CE(probe(z), harmless) (representation smoothing).
            lambda_max: λ_max of the schedule λ_t = λ_max·exp(−5(1−p)²).
            sam_rho: radius of the SAM ascent on the forget loss (parameter smoothing); null turns it off.
            decoupling: project g_f off g_r always, only on conflict (⟨g_f,g_r⟩<0), or off.
            decoupling_scope: one flattened vector (global) or each tensor on its own.
            trainable: regexes of parameter names to update (default all), e.g. RMU's MLP down-projections.
            task_vector_alpha: after training, θ ← θ₀ − α(θ − θ₀) (task-vector negation).
            max_nonfinite_steps: abort after this many consecutive steps with a non-finite loss or gradient.
            validation: run the benchmark's metrics as Lightning validation (every `trainer.val_check_interval`
                steps), with these BenchmarkEvaluator arguments, e.g. {limit: 16, target_metrics: .../metrics.json};
                logged as val/<metric> (keep the best with --checkpoint.monitor=val/unlearn_score --checkpoint.mode=max).
            output_dir: where the unlearned HF checkpoint goes (default: <log dir>/model).
        """
        super().__init__()
        self.save_hyperparameters(ignore=["forget_objective", "retain_objective"])
        self.automatic_optimization = False
        self.forget_objective, self.retain_objective = forget_objective, retain_objective
        self.model = load_model(path, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code)
        self.model.train()  # from_pretrained returns eval mode; Lightning keeps whatever mode it finds
        self.tokenizer = load_tokenizer(path)
        if gradient_checkpointing:
            enable_activation_checkpointing(self.model)
        self.probe, self.probe_meta = None, None
        if probe is not None:
            check_probe_dir(probe, path)
            self.probe, self.probe_meta = load_probe(probe)
            self.probe.requires_grad_(False).eval()
        self._select_trainable(trainable)
        self.ref_logprobs: torch.Tensor | None = None
        self._theta0 = None
        self._nonfinite = 0
        self.saved_to = None

    # --- set-up ------------------------------------------------------------------------------------------------
    def _select_trainable(self, patterns):
        names = [n for n, _ in self.model.named_parameters()]
        keep = set(names) if not patterns else {n for n in names if any(re.search(p, n) for p in patterns)}
        if not keep:
            raise UserError(f"trainable patterns {patterns} match no parameter of the model")
        for n, p in self.model.named_parameters():
            p.requires_grad_(n in keep)

    @property
    def trainable_params(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    @property
    def frozen_model(self):
        """A frozen copy of the initial model, made only for objectives that need one (KL, RMU retain)."""
        return self.__dict__["_frozen"]

    # --- strategies (see prism/stages/parallel.py) ------------------------------------------------------------
    def _needs_frozen_model(self) -> bool:
        return any(o is not None and o.needs_frozen_model for o in (self.forget_objective, self.retain_objective))

    def configure_model(self):
        """FSDP2 under `--trainer.strategy=fsdp2` (ModelParallelStrategy): shard the LM, and the frozen copy that
        KL / RMU need, made before sharding and sharded the same way. A no-op under every other strategy."""
        mesh = data_parallel_mesh(self)
        if mesh is None:
            return
        if self._needs_frozen_model() and "_frozen" not in self.__dict__:
            self.__dict__["_frozen"] = apply_fsdp2(copy.deepcopy(self.model).eval().requires_grad_(False), mesh)
        apply_fsdp2(self.model, mesh)

    @property
    def strategy_owns_gradients(self) -> bool:
        """True under DeepSpeed: ZeRO keeps gradients in its own buffers, .grad is not the gradient."""
        return self._trainer is not None and strategy_kind(self.trainer.strategy) == "deepspeed"

    def _check_strategy(self):
        """Refuse what would be silently wrong rather than run it."""
        h, strategy = self.hparams, self.trainer.strategy
        kind = strategy_kind(strategy)
        if kind == "fsdp1":
            raise UserError(
                "the unlearn stage does not run under FSDPStrategy (FSDP1): resetting .grad zeroes FSDP1's flat gradient "
                "in place, so g_f cannot be kept while g_r is computed. Use --trainer.strategy=fsdp2 (FSDP2, "
                "configs/strategy/fsdp.yaml)."
            )
        if kind == "deepspeed" and (h.sam_rho or h.decoupling != "off" or h.gradient_clip):
            raise UserError(
                "DeepSpeed owns the gradients (ZeRO partitions them into its own buffers), so SAM (sam_rho), "
                "gradient-conflict decoupling and gradient_clip cannot be applied under it: use --trainer.strategy=ddp "
                "or fsdp2 for PRISM; under DeepSpeed set gradient clipping in the DeepSpeed config."
            )
        if kind == "ddp" and getattr(strategy, "_ddp_kwargs", {}).get("gradient_as_bucket_view"):
            raise UserError("the unlearn stage needs DDP's gradient_as_bucket_view=False: it keeps g_f while g_r is computed")
        if str(self.trainer.precision) in ("16-mixed", "16"):
            raise UserError("precision 16-mixed (fp16 loss scaling) is not supported by the unlearn stage: use bf16-mixed, "
                            "bf16-true or 32-true")

    def on_fit_start(self):
        self._check_strategy()
        if self._needs_frozen_model() and "_frozen" not in self.__dict__:
            # Kept out of the module tree: never trained, saved or sharded by Lightning.
            self.__dict__["_frozen"] = copy.deepcopy(self.model).eval().requires_grad_(False)
        if "_frozen" in self.__dict__:  # made in configure_model under FSDP2: before the move to device / precision
            dtype = next(self.model.parameters()).dtype
            self.__dict__["_frozen"].to(device=self.device, dtype=dtype)
        if self.forget_objective.needs_reference_logprobs and self.ref_logprobs is None:
            data = self.trainer.datamodule
            self.ref_logprobs = self.compute_reference_logprobs(data.forget, data.tokenizer.pad_token_id,
                                                                data.hparams.batch_size)
        if self.hparams.task_vector_alpha is not None and self._theta0 is None:
            self._theta0 = [p.detach().clone() for p in self.trainable_params]

    @torch.no_grad()
    def compute_reference_logprobs(self, dataset, pad_id: int, batch_size: int) -> torch.Tensor:
        """log π_ref(y|x) of every forget example under the initial model, once, so no reference stays resident."""
        from prism.data.datamodule import collate

        was_training = self.model.training
        self.model.eval()
        out = torch.empty(len(dataset), dtype=torch.float32)
        for start in range(0, len(dataset), batch_size):
            batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))], pad_id)
            batch = {k: v.to(self.device) for k, v in batch.items()}
            logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            out[batch["index"].cpu()] = sequence_logprob(logits.float(), batch["labels"]).cpu()
        self.model.train(was_training)
        return out

    def reference_logprobs(self, index: torch.Tensor) -> torch.Tensor:
        return self.ref_logprobs.to(self.device)[index]

    # --- validation: the unlearning dynamics curve -------------------------------------------------------------
    def validation_step(self, batch, batch_idx):
        from prism.stages.evaluate import BenchmarkEvaluator

        if self.hparams.validation is None:
            return

        if not hasattr(self, "evaluator"):
            data = self.trainer.datamodule.hparams
            self.evaluator = BenchmarkEvaluator(data.path, data.format, **self.hparams.validation)
        metrics, _ = self.evaluator(self.model, self.tokenizer)
        self.log_dict({f"val/{k}": float(v) for k, v in metrics.items()}, batch_size=1)

    # --- the step ----------------------------------------------------------------------------------------------
    def progress(self) -> float:
        total = self.trainer.estimated_stepping_batches if self._trainer is not None else 0
        return self.global_step / total if total and math.isfinite(total) else 0.0

    def _forward(self, batch, objective: Objective | None, probe: bool):
        hidden = probe or (objective is not None and objective.hidden_layer is not None)
        return self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          output_hidden_states=hidden)

    def forget_loss(self, batch, lam: float):
        """ℓ_f = L_forget + λ_t·L_probe, both from one forward pass."""
        out = self._forward(batch, self.forget_objective, self.probe is not None)
        loss = self.forget_objective(out, batch, self)
        terms = {"forget_loss": loss.detach()}
        if self.probe is not None:
            z = pool(out.hidden_states[self.probe_meta["layer"]], batch["attention_mask"], self.probe_meta["pooling"])
            probe_loss = probe_term(self.probe, z.float(), target=0)
            terms["probe_loss"] = probe_loss.detach()
            loss = loss + lam * probe_loss
        return loss, terms

    def retain_loss(self, batch):
        out = self._forward(batch, self.retain_objective, False)
        return self.retain_objective(out, batch, self)

    def training_step(self, batch, batch_idx):
        if self.strategy_owns_gradients:
            return self._summed_loss_step(batch)
        h = self.hparams
        opt = self.optimizers()
        params = self.trainable_params
        forget, retain = batch["forget"], batch.get("retain")
        lam = lambda_schedule(self.progress(), h.lambda_max) if self.probe is not None else 0.0
        logs = {"lambda": lam}

        # 1-3: forget gradient, at the SAM-perturbed point when parameter smoothing is on.
        opt.zero_grad(set_to_none=True)
        loss_f, terms = self.forget_loss(forget, lam)
        logs.update(terms)
        self.manual_backward(loss_f)
        if h.sam_rho:
            saved, grad_norm = sam_ascent(params, h.sam_rho)
            logs["sam_norm"] = h.sam_rho * (grad_norm > 0).float()  # ‖e‖ = ρ whenever g ≠ 0 (tests measure it)
            opt.zero_grad(set_to_none=True)
            loss_f_adv, _ = self.forget_loss(forget, lam)
            logs["forget_loss_perturbed"] = loss_f_adv.detach()
            self.manual_backward(loss_f_adv)
            sam_restore(params, saved)
            del saved
        g_f = [p.grad for p in params]
        logs["grad_norm_forget"] = sq_norm(g_f).sqrt()

        # 4: retain gradient at the restored θ.
        g_r = None
        if self.retain_objective is not None and retain is not None:
            for p in params:
                p.grad = None
            loss_r = self.retain_loss(retain)
            logs["retain_loss"] = loss_r.detach()
            self.manual_backward(loss_r)
            g_r = [p.grad for p in params]
            logs["grad_norm_retain"] = sq_norm(g_r).sqrt()
            # 5: decoupling (in place on g_f).
            g_f, stats = decouple(g_f, g_r, mode=h.decoupling, scope=h.decoupling_scope)
            logs.update({k: v for k, v in stats.items() if k in ("cos_before", "cos_after")})

        # 6: combine into .grad and step, unless something is not finite.
        for i, p in enumerate(params):
            gf = g_f[i]
            gr = g_r[i] if g_r is not None else None
            if gf is None and gr is None:
                p.grad = None
            elif gr is None:
                p.grad = gf.mul_(h.forget_weight)
            else:
                p.grad = gr.mul_(h.retain_weight)
                if gf is not None:
                    p.grad.add_(gf, alpha=h.forget_weight)
        total = sq_norm([p.grad for p in params]).sqrt()
        logs["grad_norm"] = total
        if not (torch.isfinite(loss_f) and torch.isfinite(total)):
            self._skip_nonfinite(opt)
        else:
            self._nonfinite = 0
            if h.gradient_clip:  # by the whole-model norm above (sharding-aware); clip_grad_norm_'s rule
                coef = (h.gradient_clip / (total + 1e-6)).clamp(max=1.0)
                for g in (p.grad for p in params if p.grad is not None):
                    local(g).mul_(coef.to(local(g).dtype))
            opt.step()
        opt.zero_grad(set_to_none=True)
        self.log_dict({f"unlearn/{k}": float(v) for k, v in logs.items()}, prog_bar=False,
                      batch_size=forget["input_ids"].shape[0])
        self.log("forget_loss", float(terms["forget_loss"]), prog_bar=True, logger=False)

    def _summed_loss_step(self, batch):
        """For strategies that own the gradients (DeepSpeed): one backward of c_f·ℓ_f + c_r·ℓ_r, the same gradient
        as steps 1, 4 and 6 above when SAM and decoupling are off (_check_strategy refuses them there)."""
        h, opt = self.hparams, self.optimizers()
        forget, retain = batch["forget"], batch.get("retain")
        lam = lambda_schedule(self.progress(), h.lambda_max) if self.probe is not None else 0.0
        loss_f, logs = self.forget_loss(forget, lam)
        loss = h.forget_weight * loss_f
        if self.retain_objective is not None and retain is not None:
            loss_r = self.retain_loss(retain)
            logs["retain_loss"] = loss_r.detach()
            loss = loss + h.retain_weight * loss_r
        opt.zero_grad()
        if not torch.isfinite(loss):
            self._skip_nonfinite(opt)
        else:
            self._nonfinite = 0
            self.manual_backward(loss)
            opt.step()
            opt.zero_grad()
        self.log_dict({f"unlearn/{k}": float(v) for k, v in {"lambda": lam, **logs}.items()}, prog_bar=False,
                      batch_size=forget["input_ids"].shape[0])
        self.log("forget_loss", float(logs["forget_loss"]), prog_bar=True, logger=False)

    def _skip_nonfinite(self, opt):
        self._nonfinite += 1
        self.log("unlearn/skipped_nonfinite", float(self._nonfinite))
        log.warning("non-finite loss or gradient at step %d: update skipped (%d in a row)",
                    self.global_step, self._nonfinite)
        if self._nonfinite >= self.hparams.max_nonfinite_steps:
            ckpt = getattr(self.trainer.checkpoint_callback, "last_model_path", "") or "none written yet"
            raise TrainingAborted(
                f"unlearning aborted: {self._nonfinite} consecutive steps with a non-finite loss or gradient "
                f"(max_nonfinite_steps={self.hparams.max_nonfinite_steps}); lower the learning rate or sam_rho. "
                f"The last good checkpoint is kept ({ckpt})."
            )

    def configure_optimizers(self):
        h = self.hparams
        fused = fused_adamw_ok(self.device)  # fused AdamW kernels on CUDA; foreach elsewhere
        return torch.optim.AdamW(self.trainable_params, lr=h.lr, weight_decay=h.weight_decay, fused=fused or None)

    # --- end and resume ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def on_train_end(self):
        if self._theta0 is not None:
            alpha = self.hparams.task_vector_alpha
            for p, p0 in zip(self.trainable_params, self._theta0):
                p.copy_(p0 - alpha * (p - p0))
        self.saved_to = save_hf_checkpoint(self, self.model, self.tokenizer, output_dir(self, self.hparams.output_dir))

    def on_save_checkpoint(self, checkpoint):
        # The reference log-probs belong to θ₀: a resumed run must not recompute them from a half-unlearned model.
        checkpoint["prism_ref_logprobs"] = self.ref_logprobs
        checkpoint["prism_theta0"] = self._theta0

    def on_load_checkpoint(self, checkpoint):
        self.ref_logprobs = checkpoint.get("prism_ref_logprobs")
        self._theta0 = checkpoint.get("prism_theta0")
