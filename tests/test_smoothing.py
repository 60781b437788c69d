import pytest
import torch
from torch import nn

from prism.smoothing import decouple, dot, dot_per_tensor, sam_ascent, sam_restore, sq_norm, sq_norm_per_tensor


def _model_with_grads(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(7, 13), nn.Tanh(), nn.Linear(13, 5), nn.Linear(5, 3))
    model[3].weight.requires_grad_(False)  # a frozen parameter: no grad, must stay untouched
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.randn_like(p)
    return model


def _flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors if t is not None])


def test_reductions_match_flattened_vector():
    torch.manual_seed(1)
    a = [torch.randn(3, 4), None, torch.randn(5)]
    b = [torch.randn(3, 4), torch.randn(2), torch.randn(5)]
    fa = _flat(a)
    torch.testing.assert_close(sq_norm(a), fa.pow(2).sum())
    torch.testing.assert_close(dot(a, b), fa @ torch.cat([b[0].reshape(-1), b[2]]))
    per = sq_norm_per_tensor(a)
    assert per[1] is None
    torch.testing.assert_close(per[2], a[2].pow(2).sum())
    torch.testing.assert_close(dot_per_tensor(a, b)[0], (a[0] * b[0]).sum())
    assert sq_norm([None]).item() == 0.0


def test_sam_perturbation_has_global_norm_rho_and_restore_is_bit_exact():
    model = _model_with_grads()
    params = list(model.parameters())
    original = [p.detach().clone() for p in params]
    grads = [p.grad for p in params]
    rho = 0.01
    saved, gnorm = sam_ascent(params, rho)
    torch.testing.assert_close(gnorm, _flat(grads).norm())
    assert saved[4] is None and torch.equal(params[4], original[4])  # frozen: not moved
    e = [p.detach() - o for p, o in zip(params, original)]
    assert _flat(e).norm().item() == pytest.approx(rho, rel=1e-4)
    # e ∝ g with one global scale (not per tensor)
    for ei, g in zip(e, grads):
        if g is not None:
            torch.testing.assert_close(ei, g * (rho / _flat(grads).norm()), atol=1e-7, rtol=1e-3)
    sam_restore(params, saved)
    assert all(torch.equal(p, o) for p, o in zip(params, original))


def test_sam_restore_bit_exact_where_subtraction_is_not():
    # θ + e − e differs from θ in float32 here; the restore must not.
    p = nn.Parameter(torch.tensor([1.0, 3.0, 1e-3, 123.456]))
    p.grad = torch.tensor([0.3, -0.7, 1.0, 0.1])
    orig = p.detach().clone()
    saved, _ = sam_ascent([p], rho=0.1)
    naive = p.detach() - p.grad * (0.1 / p.grad.norm())
    sam_restore([p], saved)
    assert torch.equal(p.detach(), orig)
    assert not torch.equal(naive, orig)  # the case is a real one


def _grads(seed):
    torch.manual_seed(seed)
    return [torch.randn(4, 3), torch.randn(6), torch.randn(2, 2, 2)]


def test_decouple_global_makes_forget_orthogonal_to_retain():
    g_f, g_r = _grads(0), _grads(1)
    before = [t.clone() for t in g_f]
    c = (_flat(before) @ _flat(g_r)) / _flat(g_r).pow(2).sum()
    out, stats = decouple(g_f, g_r, mode="always", scope="global")
    assert out[0] is g_f[0]  # in place
    assert abs((_flat(out) @ _flat(g_r)).item()) < 1e-5
    torch.testing.assert_close(_flat(out), _flat(before) - c * _flat(g_r))
    assert abs(stats["cos_after"].item()) < 1e-6
    torch.testing.assert_close(stats["dot"], _flat(before) @ _flat(g_r))


def test_decouple_per_tensor_orthogonal_per_tensor():
    g_f, g_r = _grads(2), _grads(3)
    out, stats = decouple(g_f, g_r, mode="always", scope="per_tensor")
    for f, r in zip(out, g_r):
        assert abs((f * r).sum().item()) < 1e-5
    assert 0.0 <= stats["conflict_frac"].item() <= 1.0


def test_decouple_conflict_mode():
    g_r = _grads(4)
    aligned = [r * 2 + 0.1 * torch.randn_like(r) for r in g_r]  # ⟨g_f, g_r⟩ > 0
    before = [t.clone() for t in aligned]
    out, stats = decouple(aligned, g_r, mode="conflict")
    assert all(torch.equal(a, b) for a, b in zip(out, before))
    assert stats["conflict"].item() == 0.0
    opposed = [-r + 0.1 * torch.randn_like(r) for r in g_r]  # ⟨g_f, g_r⟩ < 0: projected
    out, stats = decouple(opposed, g_r, mode="conflict")
    assert stats["conflict"].item() == 1.0 and abs((_flat(out) @ _flat(g_r)).item()) < 1e-5


def test_decouple_zero_retain_off_and_none_entries():
    g_f = _grads(5)
    before = [t.clone() for t in g_f]
    out, _ = decouple(g_f, [torch.zeros_like(t) for t in g_f], mode="always")
    assert all(torch.equal(a, b) for a, b in zip(out, before))
    for scope in ("global", "per_tensor"):
        out, stats = decouple(g_f, _grads(6), mode="off", scope=scope)
        assert all(torch.equal(a, b) for a, b in zip(out, before))
        assert "cos_before" in stats
    g_r = _grads(7)
    g_f_none = [None, g_f[1].clone(), g_f[2].clone()]
    out, _ = decouple(g_f_none, [g_r[0], None, g_r[2]], mode="always", scope="per_tensor")
    assert out[0] is None and torch.equal(out[1], before[1])
    with pytest.raises(ValueError):
        decouple(g_f, g_r, mode="sometimes")
