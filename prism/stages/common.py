"""What every stage shares: loading the LM from config, writing it back as an HF checkpoint."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from lightning.pytorch import LightningModule

from prism.io import atomic_dir

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def output_dir(module: LightningModule, configured: str | None, name: str = "model") -> Path:
    """The configured output directory, or `<run log dir>/<name>`."""
    if configured:
        return Path(configured)
    trainer = module.trainer
    base = trainer.log_dir if trainer.logger is not None else trainer.default_root_dir
    return Path(base) / name


def save_hf_checkpoint(module: LightningModule, model, tokenizer, out: Path) -> Path | None:
    """save_pretrained of the full (unsharded) model, written atomically by rank 0."""
    trainer = module.trainer
    # The strategy gathers the full state dict (FSDP/DeepSpeed shards) and returns it on rank 0.
    full = trainer.strategy.lightning_module_state_dict() if trainer is not None else module.state_dict()
    prefix = next(name for name, child in module.named_children() if child is model) + "."
    state = {k[len(prefix):]: v for k, v in full.items() if k.startswith(prefix)}
    if trainer is not None and not trainer.is_global_zero:
        return None
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, state_dict=state)
        tokenizer.save_pretrained(tmp)
    log.info("saved HF checkpoint to %s", out)
    return out
