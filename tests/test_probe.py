import json

import pytest
import torch

from prism.models.probe import Probe, load_probe, pool, save_probe
from prism.objectives.probe import fgsm_perturbation, probe_term, robust_probe_loss


def _hidden_and_masks():
    B, T, D = 2, 5, 3
    hidden = torch.arange(B * T * D, dtype=torch.float32).view(B, T, D)
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 1, 1]])
    return hidden, right, left


def test_pool_last_is_last_real_token_under_right_and_left_padding():
    hidden, right, left = _hidden_and_masks()
    torch.testing.assert_close(pool(hidden, right, "last"), torch.stack([hidden[0, 2], hidden[1, 4]]))
    torch.testing.assert_close(pool(hidden, left, "last"), torch.stack([hidden[0, 4], hidden[1, 4]]))
    assert not torch.equal(pool(hidden, right, "last")[0], hidden[0, -1])  # never the pad at the end


def test_pool_mean_ignores_pads():
    hidden, right, left = _hidden_and_masks()
    torch.testing.assert_close(pool(hidden, right, "mean"), torch.stack([hidden[0, :3].mean(0), hidden[1].mean(0)]))
    torch.testing.assert_close(pool(hidden, left, "mean"), torch.stack([hidden[0, 2:].mean(0), hidden[1, 1:].mean(0)]))
    with pytest.raises(ValueError):
        pool(hidden, right, "max")


def test_pool_same_features_for_left_and_right_padded_model_inputs(tiny_model, tiny_tokenizer):
    texts = ["Alva Quint was born in 1822 in Morrowick", "Bero Tansk"]
    feats = {}
    for side in ("right", "left"):
        tiny_tokenizer.padding_side = side
        enc = tiny_tokenizer(texts, return_tensors="pt", padding=True)
        with torch.no_grad():
            hs = tiny_model(**enc, output_hidden_states=True).hidden_states[1]
        feats[side] = {m: pool(hs, enc["attention_mask"], m) for m in ("mean", "last")}
    tiny_tokenizer.padding_side = "right"
    for m in ("mean", "last"):
        torch.testing.assert_close(feats["right"][m], feats["left"][m], atol=1e-4, rtol=1e-4)


def _toy(n: int, d: int, seed: int):
    """Feature 0: robust but noisy; feature 1: perfectly separable with a tiny margin (non-robust)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    s = (2 * y - 1).float()
    z = 0.5 * torch.randn(n, d, generator=g)
    z[:, 0] = 1.0 * s + 0.5 * torch.randn(n, generator=g)
    z[:, 1] = 0.1 * s + 0.01 * torch.randn(n, generator=g)
    return z, y


@pytest.fixture()
def one_thread():
    """Hundreds of tiny steps: intra-op threads only add contention (seconds -> tens of seconds on a busy box)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _train(alpha: float, eps: float, d: int = 8, steps: int = 250) -> Probe:
    torch.manual_seed(0)
    z, y = _toy(256, d, seed=1)
    probe = Probe(d, kind="mlp")
    opt = torch.optim.Adam(probe.parameters(), lr=1e-2)
    for _ in range(steps):
        loss, parts = robust_probe_loss(probe, z, y, eps=eps, alpha=alpha, l1=1e-4)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert set(parts) == {"clean", "adv", "l1", "total"}
    return probe


def _accuracy(probe: Probe, z, y, eps: float = 0.0) -> float:
    if eps:
        z = z + fgsm_perturbation(probe, z, y, eps)
    with torch.no_grad():
        return (probe(z).argmax(-1) == y).float().mean().item()


def test_adversarial_training_beats_clean_training_under_fgsm(one_thread):
    eps = 0.3
    clean_probe, robust_probe = _train(alpha=0.0, eps=eps), _train(alpha=0.4, eps=eps)
    z, y = _toy(512, 8, seed=2)
    assert _accuracy(clean_probe, z, y) > 0.9 and _accuracy(robust_probe, z, y) > 0.9
    adv_clean, adv_robust = _accuracy(clean_probe, z, y, eps), _accuracy(robust_probe, z, y, eps)
    assert adv_robust > adv_clean + 0.15, (adv_clean, adv_robust)


def test_fgsm_is_linf_eps_and_leaves_no_param_grads():
    torch.manual_seed(0)
    probe = Probe(6)
    z, y = torch.randn(10, 6), torch.randint(0, 2, (10,))
    delta = fgsm_perturbation(probe, z, y, eps=0.05)
    assert torch.allclose(delta.abs(), torch.full_like(delta, 0.05))
    assert all(p.grad is None for p in probe.parameters())
    # it increases the loss (first-order ascent direction)
    ce = torch.nn.functional.cross_entropy
    assert ce(probe(z + delta), y) > ce(probe(z), y)


def test_fgsm_ball_is_in_standardised_space():
    torch.manual_seed(0)
    probe = Probe(4, kind="linear")
    std = torch.tensor([1.0, 10.0, 0.1, 2.0])
    probe.set_standardization(torch.zeros(4), std)
    z, y = torch.randn(5, 4), torch.randint(0, 2, (5,))
    delta = fgsm_perturbation(probe, z, y, eps=0.01)
    torch.testing.assert_close(delta.abs(), (0.01 * std).expand_as(delta))


def test_probe_term_moves_forget_features_to_harmless(one_thread):
    torch.manual_seed(0)
    z, y = _toy(256, 8, seed=3)
    probe = Probe(8, kind="linear")
    with torch.no_grad():  # a probe that reads "harmful" off feature 0
        probe.net[0].weight.zero_()
        probe.net[0].bias.zero_()
        probe.net[0].weight[1, 0], probe.net[0].weight[0, 0] = 3.0, -3.0
    probe.requires_grad_(False)
    feats = z[y == 1].clone().requires_grad_(True)
    assert (probe(feats).argmax(-1) == 1).float().mean() > 0.9  # the probe calls them harmful
    opt = torch.optim.SGD([feats], lr=0.5)
    for _ in range(100):
        loss = probe_term(probe, feats, target=0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(p.grad is None for p in probe.parameters())
    assert (probe(feats).argmax(-1) == 0).float().mean() > 0.95


def test_save_load_roundtrip(tmp_path):
    torch.manual_seed(0)
    for kind in ("mlp", "linear"):
        probe = Probe(7, kind=kind)
        probe.set_standardization(torch.randn(7), torch.rand(7) + 0.5)
        meta = {"layer": 3, "pooling": "mean", "val_acc_clean": 0.9, "val_acc_adv": 0.8}
        out = tmp_path / f"probe-{kind}"
        save_probe(out, probe, meta)
        loaded, got = load_probe(out)
        z = torch.randn(4, 7)
        assert torch.equal(loaded(z), probe(z))
        assert got["layer"] == 3 and got["kind"] == kind and got["in_dim"] == 7 and got["normalisation"] == "standardize"
        assert json.loads((out / "probe.json").read_text())["val_acc_adv"] == 0.8
        assert not list(tmp_path.glob(".*tmp"))  # atomic: no temp dir left behind
    with pytest.raises(Exception):
        load_probe(tmp_path / "missing")
