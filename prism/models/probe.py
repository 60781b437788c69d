"""The representation-space probe of PRISM stage 1, and the pooling shared by stage 1 and stage 2.

One `pool` function serves both stages, so the probe is always applied to the features it was trained on
(the authors' code trained on mean-pooled features and applied the probe to the last position, a pad token).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prism.errors import UserError
from prism.io import atomic_dir, atomic_write_json

POOLING_MODES = ("mean", "last")
PROBE_KINDS = ("mlp", "linear")
WEIGHTS_FILE = "probe.safetensors"
META_FILE = "probe.json"


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, mode: str = "mean") -> torch.Tensor:
    """Pool hidden states [B, T, D] over real tokens into features [B, D] (float32).

    mean: average over positions with attention_mask == 1.
    last: the last position with attention_mask == 1 — right for right AND left padding (never hidden[:, -1]).
    Gradients flow back into `hidden` (stage 2 trains through the pooled feature).
    """
    if mode not in POOLING_MODES:
        raise ValueError(f"pooling mode must be one of {POOLING_MODES}, got {mode!r}")
    if hidden.dim() != 3 or attention_mask.shape != hidden.shape[:2]:
        raise ValueError(f"expected hidden [B,T,D] and attention_mask [B,T], got {tuple(hidden.shape)} and {tuple(attention_mask.shape)}")
    mask = attention_mask.to(device=hidden.device) != 0
    h = hidden.float()
    if mode == "mean":
        m = mask.to(h.dtype).unsqueeze(-1)
        return (h * m).sum(1) / m.sum(1).clamp_min(1.0)
    positions = torch.arange(mask.size(1), device=mask.device).expand_as(mask)
    last = torch.where(mask, positions, torch.zeros_like(positions)).max(dim=1).values  # [B]
    return h[torch.arange(h.size(0), device=h.device), last]


class Probe(nn.Module):
    """Binary probe p_φ on pooled features: forget = 1 ("harmful"), retain = 0 ("harmless").

    kind "mlp": d→64→32→2 with ReLU (default); "linear": d→2. Optional feature standardisation
    (z − mean)/std is applied inside forward; mean/std are buffers, saved with the weights, identity by default.
    """

    def __init__(self, in_dim: int, kind: str = "mlp", hidden: tuple[int, ...] = (64, 32), num_classes: int = 2):
        super().__init__()
        if kind not in PROBE_KINDS:
            raise ValueError(f"probe kind must be one of {PROBE_KINDS}, got {kind!r}")
        self.in_dim, self.kind, self.num_classes = int(in_dim), kind, int(num_classes)
        self.hidden = tuple(int(h) for h in hidden) if kind == "mlp" else ()
        dims = (self.in_dim, *self.hidden)
        layers: list[nn.Module] = []
        for a, b in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        layers.append(nn.Linear(dims[-1], self.num_classes))
        self.net = nn.Sequential(*layers)
        self.register_buffer("mean", torch.zeros(self.in_dim))
        self.register_buffer("std", torch.ones(self.in_dim))

    @torch.no_grad()
    def set_standardization(self, mean: torch.Tensor, std: torch.Tensor, min_std: float = 1e-6) -> None:
        """Store feature statistics (from the training split) so ε means the same at every layer."""
        self.mean.copy_(mean.detach().reshape(-1).to(self.mean))
        self.std.copy_(std.detach().reshape(-1).to(self.std).clamp_min(min_std))

    @property
    def standardize(self) -> bool:
        """Whether non-identity statistics are set (identity buffers make `normalize` an exact no-op)."""
        return bool((self.mean != 0).any() or (self.std != 1).any())

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """(z − mean)/std in the probe's dtype; with the default buffers this returns z unchanged, bit for bit."""
        return (z.to(self.mean.dtype) - self.mean) / self.std

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(z))

    def architecture(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "in_dim": self.in_dim,
            "hidden": list(self.hidden),
            "num_classes": self.num_classes,
            "normalisation": "standardize" if self.standardize else "none",
        }


def save_probe(directory: str | os.PathLike, probe: Probe, meta: dict[str, Any]) -> Path:
    """Write `probe.safetensors` + `probe.json` atomically (the directory appears whole or not at all).

    `meta` should carry layer, pooling and validation accuracies (clean, adversarial), ε, ...; the probe's
    architecture (kind, dims, normalisation) is added from the probe itself and wins over `meta`.
    """
    from safetensors.torch import save_file

    info = {**meta, **probe.architecture()}
    json.dumps(info)  # fail before touching the disk if meta is not JSON-serialisable
    state = {k: v.detach().cpu().contiguous().clone() for k, v in probe.state_dict().items()}
    with atomic_dir(directory) as tmp:
        save_file(state, str(Path(tmp) / WEIGHTS_FILE))
        atomic_write_json(Path(tmp) / META_FILE, info)
    return Path(directory)


def load_probe(directory: str | os.PathLike, map_location: str | torch.device = "cpu") -> tuple[Probe, dict[str, Any]]:
    """Load a probe saved by `save_probe` (safetensors only, no pickle). Returns (probe in eval mode, metadata)."""
    from safetensors.torch import load_file

    d = Path(directory)
    if not (d / META_FILE).is_file() or not (d / WEIGHTS_FILE).is_file():
        raise UserError(f"'{d}' is not a probe directory (expected {META_FILE} and {WEIGHTS_FILE}); run the probe stage first")
    meta = json.loads((d / META_FILE).read_text(encoding="utf-8"))
    probe = Probe(meta["in_dim"], kind=meta["kind"], hidden=tuple(meta.get("hidden") or (64, 32)), num_classes=meta.get("num_classes", 2))
    probe.load_state_dict(load_file(str(d / WEIGHTS_FILE)), strict=True)
    return probe.to(map_location).eval(), meta
