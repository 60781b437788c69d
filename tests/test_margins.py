import json
import math

import pytest
import torch

from prism.evaluation.margins import (
    decision_score,
    linear_coefficients,
    linear_margin,
    probe_margins,
    quantile,
    search_margin,
    summarize,
)
from prism.models.probe import Probe, pool, save_probe


def _linear_probe(d: int = 8, seed: int = 0, standardize: bool = True) -> Probe:
    torch.manual_seed(seed)
    probe = Probe(d, kind="linear")
    if standardize:
        probe.set_standardization(torch.randn(d), torch.rand(d) + 0.5)
    return probe.eval()


def _harmless_features(probe: Probe, n: int, d: int, seed: int = 1) -> torch.Tensor:
    """Random features, each moved (if needed) into the harmless region so margins are positive."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, d, generator=g) * 3
    with torch.no_grad():
        harmful = decision_score(probe(z)) > 0
    a, _ = linear_coefficients(probe)
    z[harmful] -= 20 * (a / a.norm()).float()  # far across the boundary
    return z


def test_linear_closed_form_is_the_distance_to_the_boundary():
    d = 8
    probe = _linear_probe(d)
    z = _harmless_features(probe, 32, d)
    a, c = linear_coefficients(probe)
    # The affine form reproduces the probe's own decision score.
    f = decision_score(probe(z)).double()
    torch.testing.assert_close(z.double() @ a + c, f, rtol=1e-5, atol=1e-5)
    assert (f < 0).all()
    for norm, direction in (("l2", a / a.norm()), ("linf", a.sign())):
        m = linear_margin(z, a, c, norm)
        dual = a.norm() if norm == "l2" else a.abs().sum()
        torch.testing.assert_close(m, -f.detach() / dual, rtol=1e-5, atol=1e-6)
        # The step of that size (norm = m exactly) lands on the boundary: a hair less stays harmless, more flips.
        step = direction[None, :] * m[:, None]
        assert torch.allclose(step.norm(dim=1) if norm == "l2" else step.abs().amax(dim=1), m)
        with torch.no_grad():
            assert (decision_score(probe((z + 1.001 * step).float())) > 0).all()
            assert (decision_score(probe((z + 0.999 * step).float())) < 0).all()


@pytest.mark.parametrize("space", ["raw", "standardized"])
@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_search_margin_is_exact_for_a_linear_probe(norm, space):
    d = 8
    probe = _linear_probe(d)
    z = _harmless_features(probe, 16, d)
    exact = probe_margins(probe, z, norm, space, method="exact")
    searched = probe_margins(probe, z, norm, space, method="search", steps=60)
    assert (exact > 0).all()
    torch.testing.assert_close(searched, exact, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(probe_margins(probe, z, norm, space, method="auto"), exact)


def test_already_harmful_has_zero_margin_and_unreachable_is_inf():
    probe = _linear_probe(4, standardize=False)
    a, c = linear_coefficients(probe)
    z_harmful = (a / a.norm() * 50).float()[None]
    assert float(probe_margins(probe, z_harmful, "l2", method="search")[0]) == 0.0
    assert float(probe_margins(probe, z_harmful, "l2")[0]) == 0.0
    # A probe whose harmful logit can never win: constant score −1.
    never = search_margin(lambda x: -torch.ones(len(x)) + 0 * x.sum(1), torch.zeros(3, 4), "l2", max_radius=10.0)
    assert torch.isinf(never).all()


def test_search_margin_flips_an_mlp_probe_at_the_returned_radius():
    torch.manual_seed(0)
    probe = Probe(6, kind="mlp").eval()
    z = torch.randn(64, 6)
    score = lambda x: decision_score(probe(x))  # noqa: E731
    with torch.no_grad():  # centre the score so about half the points are harmful
        probe.net[-1].bias[1] -= score(z).median()
    m = search_margin(score, z, "l2", steps=50)
    ok = torch.isfinite(m) & (m > 0)
    assert ok.sum() > 0
    x = z[ok].requires_grad_(True)
    (g,) = torch.autograd.grad(score(x).sum(), x)
    d = g / g.norm(dim=1, keepdim=True)
    with torch.no_grad():
        # Bisection keeps a non-flipping and a flipping radius around the returned one: it sits on the boundary.
        assert score(z[ok] + m[ok].float()[:, None] * d).abs().max() < 1e-4
        assert (score(z[ok] + 0.5 * m[ok].float()[:, None] * d) < 0).float().mean() > 0.9
    with torch.no_grad():
        harmful = score(z) > 0
    assert (m[harmful] == 0).all() and (m[~harmful] > 0).all()


def test_summary_median_p10_and_inf():
    s = summarize(torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0]))
    assert s["median"] == 5.0 and s["p10"] == pytest.approx(1.0) and s["n_already_harmful"] == 1
    s = summarize(torch.tensor([1.0, 2.0, math.inf]))
    assert s["median"] == 2.0 and s["n_not_flipped"] == 1 and s["mean_finite"] == 1.5
    assert quantile([1.0, math.inf], 0.5) == math.inf and quantile([1.0, math.inf], 0.0) == 1.0
    assert summarize(torch.tensor([math.inf]))["median"] is None  # JSON-safe


@pytest.fixture()
def one_thread():
    """A busy 2-core box: intra-op threads only add contention for a tiny model."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def test_margins_stage_exact_margins_and_sharpness(tmp_path, monkeypatch, one_thread):
    """The stage's margins equal the closed form on the model's own pooled features; the ascent is undone exactly."""
    from prism.data.datamodule import TokenizedExamples, benchmark_examples, collate
    from prism.cli import run_stage
    from prism.data.synth import synthesize
    from prism.models.commands import tiny_from_benchmark
    from prism.models.loading import load_model, load_tokenizer

    monkeypatch.chdir(tmp_path)
    data = synthesize(tmp_path / "data", n_forget=3, n_retain=3, n_holdout=2)
    tiny_model_dir = tiny_from_benchmark(data, tmp_path / "model", layers=2, hidden=32, heads=2, vocab_size=512)
    model = load_model(tiny_model_dir)
    torch.manual_seed(0)
    probe = Probe(model.config.hidden_size, kind="linear")
    with torch.no_grad():
        probe.net[0].bias.copy_(torch.tensor([4.0, -4.0]))  # harmless everywhere near the features: margins > 0
    probe.set_standardization(torch.zeros(model.config.hidden_size), torch.full((model.config.hidden_size,), 0.5))
    save_probe(tmp_path / "probe", probe, {"layer": 1, "pooling": "mean"})

    cli = run_stage("margins", [
        "test", f"--model.path={tiny_model_dir}", f"--model.probe={tmp_path / 'probe'}", f"--data.path={data}",
        "--data.forget_sources=[qa]", "--data.limit=5", "--model.sharpness_rho=[0.01,0.05]",
        f"--model.output_dir={tmp_path / 'out'}", "--trainer.enable_progress_bar=false",
    ])
    out = json.loads((tmp_path / "out" / "margins.json").read_text())

    tok = load_tokenizer(tiny_model_dir)
    ds = TokenizedExamples(benchmark_examples("muse", data, "forget", ["qa"])[:5], tok, 128, "f")
    batch = collate([ds[i] for i in range(len(ds))], tok.pad_token_id)
    with torch.no_grad():
        hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       output_hidden_states=True).hidden_states[1]
    z = pool(hidden, batch["attention_mask"], "mean")
    a, c = linear_coefficients(probe)
    for norm in ("l2", "linf"):
        m = linear_margin(z, a, c, norm)
        assert out["forget"][norm]["n"] == 5 and out["forget"][norm]["n_already_harmful"] == 0
        assert out["forget"][norm]["median"] == pytest.approx(float(m.median()), rel=1e-4)
        assert out["forget"][norm]["p10"] == pytest.approx(quantile(m, 0.1), rel=1e-4)
    assert out["forget"]["probe_harmful_rate"] == 0.0

    rows = out["sharpness"]["by_rho"]
    assert [r["rho"] for r in rows] == [0.01, 0.05]
    for r in rows:  # self-referenced NPO: ℓ_f(θ) = (2/β)·log 2; the ascent raises it and lowers the forget NLL
        assert r["loss"] == pytest.approx(2 / 0.1 * math.log(2), rel=1e-5)
        assert r["sharpness"] > 0 and r["forget_nll_perturbed"] < r["forget_nll"]
    assert rows[1]["sharpness"] > rows[0]["sharpness"]
    # θ is restored bit for bit after the ascent steps.
    for (name, p), p0 in zip(cli.model.model.named_parameters(), model.parameters()):
        assert torch.equal(p.detach().cpu(), p0), name
