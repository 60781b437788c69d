"""Stage `finetune`: NLL fine-tuning. Makes the target model (it memorises forget and retain) and is the
relearning attack's training loop."""

from __future__ import annotations

from typing import Literal

import torch
from lightning.pytorch import LightningModule

from prism.models.loading import load_model, load_tokenizer
from prism.objectives import nll
from prism.stages.common import DTYPES, output_dir, save_hf_checkpoint
from prism.stages.parallel import apply_fsdp2, data_parallel_mesh, enable_activation_checkpointing, fused_adamw_ok


class FinetuneModule(LightningModule):
    def __init__(
        self,
        path: str = "smollm2",
        lr: float = 1e-4,
        loss_average: Literal["token", "sequence"] = "token",
        weight_decay: float = 0.0,
        output_dir: str | None = None,
        dtype: str = "float32",
        gradient_checkpointing: bool = False,
        trust_remote_code: bool = False,
    ):
        """
        Args:
            loss_average: "sequence" weighs every example alike (short QA answers learn as fast as passages).
        """
        super().__init__()
        self.save_hyperparameters()
        self.model = load_model(path, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code)
        self.model.train()  # from_pretrained returns eval mode; Lightning keeps whatever mode it finds
        self.tokenizer = load_tokenizer(path)
        if gradient_checkpointing:
            enable_activation_checkpointing(self.model)
        self.saved_to = None

    def training_step(self, batch, batch_idx):
        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = nll(logits, batch["labels"], self.hparams.loss_average)
        self.log("train/nll", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def configure_model(self):
        """FSDP2 under `--trainer.strategy=fsdp2` (ModelParallelStrategy); a no-op under every other strategy."""
        mesh = data_parallel_mesh(self)
        if mesh is not None:
            apply_fsdp2(self.model, mesh)

    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        fused = fused_adamw_ok(self.device)  # fused AdamW kernels on CUDA; foreach elsewhere
        return torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay,
                                 fused=fused or None)

    def on_train_end(self):
        self.saved_to = save_hf_checkpoint(self, self.model, self.tokenizer, output_dir(self, self.hparams.output_dir))
