import math

import pytest
import torch
import torch.nn.functional as F

from prism.objectives import (
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


def _hand_example():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 5)
    labels = torch.tensor([[-100, 3, 1, -100], [-100, -100, 4, 2]])
    return logits, labels


def test_sequence_logprob_matches_gathered_log_softmax():
    logits, labels = _hand_example()
    lsm = torch.log_softmax(logits, dim=-1)
    # logits[:, t] predicts labels[:, t+1]
    expected0 = lsm[0, 0, 3] + lsm[0, 1, 1]
    expected1 = lsm[1, 1, 4] + lsm[1, 2, 2]
    got = sequence_logprob(logits, labels)
    torch.testing.assert_close(got, torch.stack([expected0, expected1]))
    logp, mask = token_logprobs(logits, labels)
    assert mask.tolist() == [[True, True, False], [False, True, True]]
    assert logp[0, 2] == 0 and logp[1, 0] == 0


def test_nll_equals_hf_loss_and_ga_is_its_negative(tiny_model, tiny_tokenizer):
    enc = tiny_tokenizer(["Alva Quint was born in 1822", "Bero Tansk"], return_tensors="pt", padding=True)
    labels = enc["input_ids"].clone()
    labels[enc["attention_mask"] == 0] = -100
    labels[:, :2] = -100  # a prompt part without loss
    out = tiny_model(**enc, labels=labels)
    torch.testing.assert_close(nll(out.logits, labels), out.loss)
    torch.testing.assert_close(ga(out.logits, labels), -out.loss)


def test_sequence_averaged_nll_weighs_every_example_alike():
    logits, labels = _hand_example()
    labels_one_token = labels.clone()
    labels_one_token[1, 2] = -100  # row 1 keeps one labelled token, row 0 two
    logp, _ = token_logprobs(logits, labels_one_token)
    row0, row1 = -(logp[0, 0] + logp[0, 1]) / 2, -logp[1, 2]
    torch.testing.assert_close(nll(logits, labels_one_token, "sequence"), (row0 + row1) / 2)
    torch.testing.assert_close(nll(logits, labels_one_token), -logp.sum() / 3)  # token mean: row 0 counts double
    unlabelled = torch.full_like(labels, -100)
    unlabelled[0] = labels[0]  # a row without labels does not dilute the mean
    torch.testing.assert_close(nll(logits, unlabelled, "sequence"), nll(logits[:1], labels[:1], "sequence"))
    with pytest.raises(ValueError, match="average"):
        nll(logits, labels, "tokens")


def test_npo_closed_form_and_equal_case():
    beta = 0.1
    logp = torch.tensor([-10.0, -3.0])
    ref = torch.tensor([-8.0, -5.0])
    # hand-computed: log σ(x) = -log(1 + e^{-x})
    x = [-beta * (-10.0 + 8.0), -beta * (-3.0 + 5.0)]  # [0.2, -0.2]
    expected = -(2 / beta) * 0.5 * sum(-math.log1p(math.exp(-v)) for v in x)
    assert npo(logp, ref, beta) == pytest.approx(expected, rel=1e-6)
    same = torch.tensor([-4.0, -7.5, -1.0])
    assert npo(same, same.clone(), beta) == pytest.approx(2 / beta * math.log(2), rel=1e-6)


def test_npo_gradient_pushes_likelihood_down():
    logp = torch.tensor([-2.0, -3.0], requires_grad=True)
    npo(logp, torch.tensor([-2.0, -3.0])).backward()
    assert (logp.grad > 0).all()  # descending the loss lowers log π


def test_simnpo_uses_length_normalised_logprob():
    logits, labels = _hand_example()
    beta, gamma = 2.5, 0.3
    logp, mask = token_logprobs(logits, labels)
    avg = logp.sum(-1) / mask.sum(-1)
    expected = -(2 / beta) * torch.stack([F.logsigmoid(-beta * a - gamma) for a in avg]).mean()
    torch.testing.assert_close(simnpo(logits, labels, beta, gamma), expected)
    # no reference: doubling the length of a sequence with the same per-token log-prob leaves it unchanged
    long_labels = torch.tensor([[-100, 3, 3, 3, 3]])
    short_labels = torch.tensor([[-100, 3, 3, -100, -100]])
    flat = torch.zeros(1, 5, 5)
    torch.testing.assert_close(simnpo(flat, long_labels, beta, gamma), simnpo(flat, short_labels, beta, gamma))


def test_kl_to_reference_direction_and_mask():
    logits, labels = _hand_example()
    assert kl_to_reference(logits, logits.clone(), labels).abs() < 1e-6
    ref = torch.randn_like(logits)
    p = torch.softmax(ref[:, :-1], -1)
    kl = (p * (torch.log_softmax(ref[:, :-1], -1) - torch.log_softmax(logits[:, :-1], -1))).sum(-1)
    mask = (labels[:, 1:] != -100).float()
    torch.testing.assert_close(kl_to_reference(logits, ref, labels), (kl * mask).sum() / mask.sum())


def test_rmu_terms():
    u = random_unit_vector(8, seed=3)
    assert torch.equal(u, random_unit_vector(8, seed=3))
    assert u.norm().item() == pytest.approx(1.0, abs=1e-6)
    c = 6.5
    acts = torch.randn(2, 3, 8)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    acts_on_target = acts.clone()
    acts_on_target[mask.bool()] = c * u  # only masked positions count
    assert rmu_forget(acts_on_target, c * u, mask) == pytest.approx(0.0, abs=1e-10)
    expected = ((acts - c * u) ** 2).mean(-1)[mask.bool()].mean()
    torch.testing.assert_close(rmu_forget(acts, c * u, mask), expected)
    frozen = acts + 1.0
    assert rmu_retain(acts, frozen, mask) == pytest.approx(1.0)


@pytest.mark.parametrize("p", [0.0, 0.5, 1.0, -0.3, 1.7])
def test_lambda_schedule(p):
    lam_max = 0.07
    q = min(max(p, 0.0), 1.0)
    assert lambda_schedule(p, lam_max) == pytest.approx(lam_max * math.exp(-5 * (1 - q) ** 2))


def test_lambda_schedule_endpoints_and_monotone():
    assert lambda_schedule(1.0, 0.05) == pytest.approx(0.05)
    assert lambda_schedule(0.0, 0.05) == pytest.approx(0.05 * math.exp(-5))
    vals = [lambda_schedule(i / 10, 0.08) for i in range(11)]
    assert all(a < b for a, b in zip(vals, vals[1:]))
