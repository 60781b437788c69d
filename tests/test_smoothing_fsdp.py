"""Sharded reductions under FSDP2 (`fully_shard`): 2 CPU processes with gloo must reproduce the single-process,
unsharded values of sq_norm, dot, the SAM perturbation and decouple.

The test launches this file as a script in 2 processes (plain subprocesses with RANK/WORLD_SIZE env, no torchrun);
each rank checks its results against an unsharded copy of the model computed in the same process.
"""

import copy
import os
import socket
import subprocess
import sys

import pytest
import torch

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    # uneven dim-0 sizes (13, 5, 1) so shards differ in size and one rank holds empty shards
    return torch.nn.Sequential(torch.nn.Linear(7, 13), torch.nn.Tanh(), torch.nn.Linear(13, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1))


def _grads_for(model, x, y):
    model.zero_grad(set_to_none=True)
    torch.nn.functional.mse_loss(model(x), y).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return grads


def _full(t):
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _worker() -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from prism.smoothing import decouple, dot, sam_ascent, sam_restore, sq_norm

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(1)
    x_f, y_f, x_r, y_r = torch.randn(8, 7), torch.randn(8, 1), torch.randn(8, 7), torch.randn(8, 1)

    ref = _model()
    sharded = copy.deepcopy(ref)
    mesh = init_device_mesh("cpu", (WORLD,))
    for i in (0, 2, 4):
        fully_shard(sharded[i], mesh=mesh)
    fully_shard(sharded, mesh=mesh)

    # same data on every rank: FSDP2's averaged reduce-scatter gives the unsharded gradient, sharded
    gf_ref, gr_ref = _grads_for(ref, x_f, y_f), _grads_for(ref, x_r, y_r)
    gf, gr = _grads_for(sharded, x_f, y_f), _grads_for(sharded, x_r, y_r)
    assert all(isinstance(g, DTensor) for g in gf), "fully_shard did not produce DTensor gradients"
    assert any(g.to_local().numel() == 0 for g in gf) or rank == 0, "expected an empty local shard on rank 1"
    for a, b in zip(gf, gf_ref):
        torch.testing.assert_close(_full(a), b)

    close = dict(rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(sq_norm(gf), sq_norm(gf_ref), **close)
    torch.testing.assert_close(dot(gf, gr), dot(gf_ref, gr_ref), **close)
    # the naive local sum is NOT the answer (guards against a test that passes without any reduction)
    local_only = sum(g.to_local().pow(2).sum() for g in gf)
    assert not torch.allclose(local_only, sq_norm(gf_ref))

    # SAM: same perturbation as unsharded, ‖e‖ = ρ, restore bit-exact
    rho = 0.01
    params, params_ref = list(sharded.parameters()), list(ref.parameters())
    original = [_full(p.detach()).clone() for p in params]
    for p, g in zip(params, gf):
        p.grad = g
    for p, g in zip(params_ref, gf_ref):
        p.grad = g
    saved, gnorm = sam_ascent(params, rho)
    saved_ref, gnorm_ref = sam_ascent(params_ref, rho)
    torch.testing.assert_close(gnorm, gnorm_ref, **close)
    e = [_full(p.detach()) - o for p, o in zip(params, original)]
    e_norm = torch.cat([t.reshape(-1) for t in e]).norm()
    assert abs(e_norm.item() - rho) < 1e-4 * rho, e_norm.item()
    for p, pr in zip(params, params_ref):
        torch.testing.assert_close(_full(p.detach()), pr.detach(), rtol=0, atol=1e-7)
    sam_restore(params, saved)
    sam_restore(params_ref, saved_ref)
    assert all(torch.equal(_full(p.detach()), o) for p, o in zip(params, original))

    # decouple: both scopes, element-wise equal to the unsharded result, and stats equal
    for scope in ("global", "per_tensor"):
        f_sh, f_ref = [g.clone() for g in gf], [g.clone() for g in gf_ref]
        out, stats = decouple(f_sh, gr, mode="always", scope=scope)
        out_ref, stats_ref = decouple(f_ref, gr_ref, mode="always", scope=scope)
        for a, b in zip(out, out_ref):
            torch.testing.assert_close(_full(a), b, rtol=1e-5, atol=1e-7)
        for k in ("dot", "cos_before", "norm_f", "norm_r", "norm_f_after"):
            torch.testing.assert_close(stats[k], stats_ref[k], **close)
        assert abs(stats["cos_after"].item()) < 1e-5
    dist.barrier()
    dist.destroy_process_group()
    if rank == 0:
        print("FSDP2 CHECKS OK")


def test_reductions_under_fsdp2_match_unsharded(tmp_path):
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    port = _free_port()
    procs = []
    for rank in range(WORLD):
        env = {
            **os.environ,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(WORLD),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
        }
        log = open(tmp_path / f"rank{rank}.log", "w")
        procs.append((subprocess.Popen([sys.executable, __file__], env=env, stdout=log, stderr=subprocess.STDOUT), log))
    codes = []
    for proc, log in procs:
        try:
            codes.append(proc.wait(timeout=120))
        except subprocess.TimeoutExpired:
            for p, _ in procs:
                p.kill()
            raise
        finally:
            log.close()
    logs = {r: (tmp_path / f"rank{r}.log").read_text() for r in range(WORLD)}
    assert codes == [0] * WORLD, "\n".join(f"--- rank {r} ---\n{t[-3000:]}" for r, t in logs.items())
    assert "FSDP2 CHECKS OK" in logs[0]


if __name__ == "__main__":
    _worker()
