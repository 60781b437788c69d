"""What the training stages need from Lightning's strategies (no home-made distribution): FSDP2 sharding of a HF
causal LM, the `fsdp2` strategy name, activation checkpointing, and which strategies allow gradient surgery.

Strategies, as `--trainer.strategy=...` (or the overlays in configs/strategy/):
- `ddp` (DDPStrategy): every manual_backward all-reduces (Lightning calls DDP's prepare_for_backward for manual
  optimisation), so each .grad is the full, globally averaged gradient: whole-model norms and dots need no
  collective. `gradient_as_bucket_view` must stay off: the unlearn step keeps g_f while g_r is computed, and bucket
  views would make the second backward overwrite g_f.
- `fsdp2` (FSDP2Strategy below = Lightning's ModelParallelStrategy as pure FSDP2): `configure_model` applies
  `fully_shard` to each decoder layer and to the whole LM; parameters and gradients are DTensors, so
  prism.smoothing reduces the per-shard partial sums over the mesh. Tested on 2 CPU ranks (gloo).
- `fsdp` (Lightning's FSDPStrategy, FSDP1, GPU only): fine for the finetune/relearn stages (automatic
  optimisation). The unlearn stage refuses it: with `use_orig_params=True` (Lightning's default) FSDP1 zeroes a
  parameter's segment of the flat gradient IN PLACE when its .grad is reset, so g_f cannot be held while g_r is
  computed, and shards leave ranks with different None-patterns of .grad. Use `fsdp2`.
- `deepspeed_stage_2`: DeepSpeed owns the gradients (ZeRO moves them into its own partitioned buffers; .grad is not
  the gradient), so no gradient surgery is possible: the unlearn stage refuses SAM and decoupling under DeepSpeed and
  runs the other methods as one backward of c_f·ℓ_f + c_r·ℓ_r (the same gradient). Finetune/relearn run as usual.
"""

from __future__ import annotations

from datetime import timedelta

import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.strategies import ModelParallelStrategy, StrategyRegistry

from prism.errors import UserError


class FSDP2Strategy(ModelParallelStrategy):
    """Lightning's ModelParallelStrategy with every process a data-parallel rank (no tensor parallelism).

    ModelParallelStrategy's "auto" sizes give tensor_parallel = devices per node; prism shards with FSDP2 only, so the
    data-parallel size is the world size. The full (unsharded) state dict is assembled on rank 0 when saving by default,
    so checkpoints and the exported HF model are single files.
    """

    strategy_name = "fsdp2"

    def __init__(self, save_distributed_checkpoint: bool = False, process_group_backend: str | None = None,
                 timeout: timedelta = default_pg_timeout):
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1,
                         save_distributed_checkpoint=save_distributed_checkpoint,
                         process_group_backend=process_group_backend, timeout=timeout)

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        self._tensor_parallel_size = 1
        super().setup_environment()


if "fsdp2" not in StrategyRegistry:
    StrategyRegistry.register("fsdp2", FSDP2Strategy, description="FSDP2 (fully_shard) over all processes")


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks of a HF model (classes named in `_no_split_modules`, e.g. LlamaDecoderLayer)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise UserError(f"{type(model).__name__}: no decoder layers found to shard (_no_split_modules={sorted(names)})")
    return layers


def apply_fsdp2(model: torch.nn.Module, mesh) -> torch.nn.Module:
    """fully_shard each decoder layer, then the whole model (embeddings, final norm, head), on a 1-D data-parallel
    mesh. Gradients are reduce-scattered with averaging: the same gradient as DDP, sharded."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    if isinstance(model, FSDPModule):
        return model  # configure_model runs again for each trainer.fit/test call
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh)
    # The root too reshards after forward (FSDP2 keeps it unsharded by default): after a no-grad forward (the NPO
    # reference cache, evaluation) an unsharded root would leave model.parameters() returning the unsharded
    # tensors and zero_grad missing the sharded grads, which then accumulate into the next step's gradient.
    fully_shard(model, mesh=mesh, reshard_after_forward=True)
    return model


def data_parallel_mesh(module) -> object | None:
    """The data-parallel mesh under ModelParallelStrategy (None under any other strategy)."""
    mesh = getattr(module, "_device_mesh", None)
    if mesh is None:
        return None
    names = mesh.mesh_dim_names or ()
    if "tensor_parallel" in names and mesh["tensor_parallel"].size() > 1:
        raise UserError(
            "prism shards models with FSDP2 only (no tensor parallelism): use --trainer.strategy=fsdp2 "
            "(configs/strategy/fsdp.yaml), or ModelParallelStrategy with tensor_parallel_size=1"
        )
    return mesh["data_parallel"] if "data_parallel" in names else mesh


def enable_activation_checkpointing(model) -> None:
    """Recompute each decoder layer's activations in backward (non-reentrant: works with manual optimisation,
    several backward passes per step, DDP and FSDP2; the recompute happens in the same backward, before SAM moves θ)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def fused_adamw_ok(device: torch.device) -> bool:
    """Fused AdamW kernels exist for CUDA (and recent torch on a few other accelerators); CPU uses foreach."""
    return device.type == "cuda"


def strategy_kind(strategy) -> str:
    """'ddp', 'fsdp2', 'fsdp1', 'deepspeed' or 'single' for a Lightning strategy."""
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

    try:
        from lightning.pytorch.strategies import DeepSpeedStrategy
    except ImportError:  # pragma: no cover
        DeepSpeedStrategy = ()  # type: ignore[assignment,misc]
    if isinstance(strategy, DeepSpeedStrategy):
        return "deepspeed"
    if isinstance(strategy, FSDPStrategy):
        return "fsdp1"
    if isinstance(strategy, ModelParallelStrategy):
        return "fsdp2"
    if isinstance(strategy, DDPStrategy):
        return "ddp"
    return "single"
