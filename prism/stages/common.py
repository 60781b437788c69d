"""What every stage shares: loading the LM from config, writing it back as an HF checkpoint."""

from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule

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
    """save_pretrained of the full (unsharded) model (safetensors), written atomically by rank 0: a kill during the
    write leaves the previous checkpoint (or none), never a half-written one."""
    trainer = module._trainer  # None outside a Trainer (module.trainer would raise)
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


def rng_states() -> dict:
    """Python, NumPy, torch (and CUDA) RNG states as tensors and plain values (loadable with weights_only=True)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_states(state: dict) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class ResumeRNG(Callback):
    """Writes the RNG states into every checkpoint and puts them back when training resumes (at the start of the
    training loop, after data loaders are built), so the steps after `--ckpt_path` draw the same random numbers as
    an uninterrupted run would. Lightning's own checkpoint holds weights, optimiser and loop state but no RNG."""

    def __init__(self):
        self._pending: dict | None = None

    def state_dict(self) -> dict:
        return rng_states()

    def load_state_dict(self, state_dict: dict) -> None:
        self._pending = state_dict or None

    def on_train_start(self, trainer, pl_module) -> None:
        if self._pending is not None:
            set_rng_states(self._pending)
            self._pending = None
