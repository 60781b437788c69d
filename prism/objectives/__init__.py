"""Pure loss functions of PRISM and its baselines (DESIGN §1)."""

from prism.objectives.losses import (
    IGNORE_INDEX,
    ga,
    kl_to_reference,
    lambda_schedule,
    nll,
    npo,
    random_unit_vector,
    rmu_forget,
    rmu_retain,
    sequence_logprob,
    simnpo,
    token_logprobs,
)
from prism.objectives.probe import HARMFUL, HARMLESS, fgsm_perturbation, l1_norm, probe_term, robust_probe_loss

__all__ = [
    "HARMFUL",
    "HARMLESS",
    "IGNORE_INDEX",
    "fgsm_perturbation",
    "ga",
    "kl_to_reference",
    "l1_norm",
    "lambda_schedule",
    "nll",
    "npo",
    "probe_term",
    "random_unit_vector",
    "rmu_forget",
    "rmu_retain",
    "robust_probe_loss",
    "sequence_logprob",
    "simnpo",
    "token_logprobs",
]
