"""Forget and retain objectives of the unlearning stage, chosen in config by class_path.

Each is a thin callable around a pure loss of prism.objectives.losses: it picks the inputs that loss needs
(logits, labels, cached reference log-probs, hidden states, a frozen copy) from the step. A new method is a
new small class here (or none) plus a YAML file.
"""

from __future__ import annotations

import torch

from prism.objectives import losses


class Objective:
    """Loss on one batch. `hidden_layer` asks the forward pass for that hidden state (index into hidden_states)."""

    hidden_layer: int | None = None
    needs_reference_logprobs = False
    needs_frozen_model = False

    def __call__(self, out, batch, stage) -> torch.Tensor:
        raise NotImplementedError


class GA(Objective):
    """Gradient ascent on the forget set: minimise −NLL."""

    def __call__(self, out, batch, stage):
        return losses.ga(out.logits, batch["labels"])


class NLL(Objective):
    """Plain NLL: the retain term of GD/NPO+GD/PRISM, and the forget-set fine-tuning of the task vector."""

    def __call__(self, out, batch, stage):
        return losses.nll(out.logits, batch["labels"])


class NPO(Objective):
    """NPO on sequence log-likelihoods against log-probs of the initial model, cached before training."""

    needs_reference_logprobs = True

    def __init__(self, beta: float = 0.1):
        self.beta = beta

    def __call__(self, out, batch, stage):
        logp = losses.sequence_logprob(out.logits, batch["labels"])
        return losses.npo(logp, stage.reference_logprobs(batch["index"]), self.beta)


class SimNPO(Objective):
    """Reference-free NPO on length-normalised log-likelihood with margin γ."""

    def __init__(self, beta: float = 2.5, gamma: float = 0.0):
        self.beta, self.gamma = beta, gamma

    def __call__(self, out, batch, stage):
        return losses.simnpo(out.logits, batch["labels"], self.beta, self.gamma)


class KL(Objective):
    """KL to the frozen initial model on retain text (keeps a reference model resident)."""

    needs_frozen_model = True

    def __call__(self, out, batch, stage):
        with torch.no_grad():
            ref = stage.frozen_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return losses.kl_to_reference(out.logits, ref, batch["labels"])


class RMUForget(Objective):
    """RMU: push layer activations of forget text to c·u, u a fixed random unit vector."""

    def __init__(self, layer: int = 7, steering_coef: float = 6.5, seed: int = 0):
        self.hidden_layer, self.steering_coef, self.seed = layer, steering_coef, seed
        self._control = None

    def __call__(self, out, batch, stage):
        acts = out.hidden_states[self.hidden_layer]
        if self._control is None:
            u = losses.random_unit_vector(acts.shape[-1], self.seed)
            self._control = (self.steering_coef * u).to(acts)
        return losses.rmu_forget(acts, self._control, batch["attention_mask"])


class RMURetain(Objective):
    """RMU: keep layer activations of retain text equal to the frozen model's."""

    needs_frozen_model = True

    def __init__(self, layer: int = 7):
        self.hidden_layer = layer

    def __call__(self, out, batch, stage):
        with torch.no_grad():
            frozen = stage.frozen_model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True
            ).hidden_states[self.hidden_layer]
        return losses.rmu_retain(out.hidden_states[self.hidden_layer], frozen, batch["attention_mask"])
