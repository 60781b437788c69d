"""Whole-model reductions (squared norms, dot products) that are right when gradients are sharded.

- Plain tensors (single process, DDP): the gradient is the full, already all-reduced tensor: no collective.
- DTensor (FSDP2 `fully_shard`): each rank sums over its local shard (`to_local()`), then the partial sums are
  all-reduced (SUM) over the mesh dims on which the tensor is sharded (replicated dims hold copies: no sum).
  All per-tensor partials with the same (mesh, sharded dims) go in ONE all_reduce, whatever the tensor count.
- `plain_group`: for layouts whose plain-tensor grads are local shards (FSDP1 flat parameters), pass the
  sharding process group and plain partials are all-reduced over it too.

Every rank must pass lists with the same length and the same None pattern (true for DDP and FSDP2 grads).
Results are float32 scalars on the tensors' device, equal to the unsharded value on every rank.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

try:  # torch built without distributed support
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover
    DTensor = ()  # type: ignore[assignment,misc]

Tensors = Sequence[torch.Tensor | None]


def local(t: torch.Tensor) -> torch.Tensor:
    """The tensor this rank holds: the local shard of a DTensor (a view: in-place ops write through), else t."""
    return t.to_local() if isinstance(t, DTensor) else t


def _shard_key(t: torch.Tensor):
    """(mesh, mesh dims to sum over) for a DTensor; None for a plain tensor."""
    if not isinstance(t, DTensor):
        return None
    if any(p.is_partial() for p in t.placements):
        raise ValueError("cannot reduce a DTensor with Partial placement; redistribute it first")
    return (t.device_mesh, tuple(i for i, p in enumerate(t.placements) if p.is_shard()))


def _reduce_partials(partials: list[torch.Tensor | None], refs: list[torch.Tensor | None], plain_group) -> list[torch.Tensor | None]:
    """All-reduce local partial sums, batched per sharding layout; `refs` give each partial's layout."""
    groups: dict = {}
    for i, (val, ref) in enumerate(zip(partials, refs)):
        if val is None:
            continue
        key = _shard_key(ref)
        if key is None and plain_group is not None:
            key = ("plain",)
        if key is not None and key != ("plain",) and not key[1]:
            continue  # fully replicated DTensor: every rank already holds the full value
        if key is not None:
            groups.setdefault(key, []).append(i)
    out = list(partials)
    for key, idx in groups.items():
        buf = torch.stack([partials[i] for i in idx])
        if key == ("plain",):
            dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=plain_group)
        else:
            mesh, dims = key
            for d in dims:
                dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=mesh.get_group(d))
        for j, i in enumerate(idx):
            out[i] = buf[j]
    return out


def sq_norm_per_tensor(tensors: Tensors, plain_group=None) -> list[torch.Tensor | None]:
    """‖t‖² of each (whole, unsharded) tensor, None where the input is None."""
    tensors = list(tensors)
    partials = [None if t is None else torch.linalg.vector_norm(local(t), dtype=torch.float32).square() for t in tensors]
    return _reduce_partials(partials, tensors, plain_group)


def dot_per_tensor(a: Tensors, b: Tensors, plain_group=None) -> list[torch.Tensor | None]:
    """⟨a_i, b_i⟩ of each pair of (whole) tensors, None where either is None. a_i, b_i share a layout."""
    a, b = list(a), list(b)
    if len(a) != len(b):
        raise ValueError(f"dot of lists of different lengths ({len(a)} vs {len(b)})")
    partials = [
        None if x is None or y is None else torch.dot(local(x).reshape(-1).float(), local(y).reshape(-1).float())
        for x, y in zip(a, b)
    ]
    return _reduce_partials(partials, a, plain_group)


def _total(values: list[torch.Tensor | None], like: Tensors) -> torch.Tensor:
    present = [v for v in values if v is not None]
    if present:
        return torch.stack(present).sum()
    device = next((local(t).device for t in like if t is not None), None)
    return torch.zeros((), dtype=torch.float32, device=device)


def sq_norm(tensors: Tensors, plain_group=None) -> torch.Tensor:
    """‖·‖² of the concatenation of all tensors (Nones skipped), i.e. of the whole flattened model."""
    tensors = list(tensors)
    return _total(sq_norm_per_tensor(tensors, plain_group), tensors)


def dot(a: Tensors, b: Tensors, plain_group=None) -> torch.Tensor:
    """⟨a, b⟩ of the two flattened whole-model vectors (pairs with a None skipped)."""
    a = list(a)
    return _total(dot_per_tensor(a, b, plain_group), a)
