"""Parameter-space smoothing: SAM ascent/restore and gradient-conflict decoupling, sharding-aware."""

from prism.smoothing.gcd import decouple
from prism.smoothing.reduce import dot, dot_per_tensor, local, sq_norm, sq_norm_per_tensor
from prism.smoothing.sam import sam_ascent, sam_restore

__all__ = ["decouple", "dot", "dot_per_tensor", "local", "sam_ascent", "sam_restore", "sq_norm", "sq_norm_per_tensor"]
