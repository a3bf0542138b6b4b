"""The GPU forms of the tracking hot spots equal their torch references (recon_slam.frontend.fused_ops)."""

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from recon_slam.frontend import fused_ops as fo
from recon_slam.frontend import mono

HAS_TRITON = importlib.util.find_spec("triton") is not None
CUDA = torch.cuda.is_available()


@pytest.mark.parametrize("K", [100, 2048, 5000, 12289])
def test_gram_splitk_equals_the_direct_product(K):
    gen = torch.Generator().manual_seed(K)
    P = torch.randn(2, 7, K, generator=gen, dtype=torch.float64)
    Q = torch.randn(2, 8, K, generator=gen, dtype=torch.float64)
    out = fo.gram_splitk(P, Q, chunk=1024)
    assert out.shape == (2, 7, 8)
    torch.testing.assert_close(out, P @ Q.transpose(1, 2), rtol=1e-12, atol=1e-10)
    # strided inputs (as the tracking step passes them)
    Pt = P.transpose(0, 1).contiguous().transpose(0, 1)
    torch.testing.assert_close(fo.gram_splitk(Pt, Q, chunk=1000), P @ Q.transpose(1, 2), rtol=1e-12, atol=1e-10)


def _problem(seed=0, H=40, W=56, F=24, N=400):
    gen = torch.Generator().manual_seed(seed)
    D = torch.nn.functional.normalize(torch.randn(H, W, F, generator=gen), dim=-1)
    s = torch.nn.functional.normalize(torch.randn(N, F, generator=gen), dim=-1)
    p = torch.stack((torch.randint(0, W, (N,), generator=gen), torch.randint(0, H, (N,), generator=gen)), -1)
    active = torch.rand(N, generator=gen) > 0.25
    return D, s, p, active


def test_refine_torch_matches_the_host_refinement():
    """The fused module's torch search is the matcher's (compacting) refinement for every point."""
    D, s, p, active = _problem()
    out = fo.refine_descriptors(D, s, p, active, 3, (5, 4, 3, 2, 1), backend="torch")
    ref = mono.refine_by_descriptors(D, s, p, 3, (5, 4, 3, 2, 1), active=active)
    assert torch.equal(out, ref)
    assert (out != p).any(1).float().mean() > 0.5  # it does move points
    assert torch.equal(out[~active], p[~active])


def test_refine_moves_a_point_to_its_descriptor():
    """On a smooth descriptor field a point 7 px off its descriptor is moved onto it (coarse to fine)."""
    H, W, F = 40, 56, 16
    gen = torch.Generator().manual_seed(1)
    freq = torch.rand(F, 2, generator=gen) * 0.12 + 0.02
    phase = torch.rand(F, generator=gen) * 6.28
    v, u = torch.meshgrid(torch.arange(H, dtype=torch.float32), torch.arange(W, dtype=torch.float32), indexing="ij")
    D = torch.nn.functional.normalize(torch.sin(u[..., None] * freq[:, 0] + v[..., None] * freq[:, 1] + phase), dim=-1)
    s = D[22, 27][None].clone()  # the descriptor at (u=27, v=22)
    p = torch.tensor([[20, 18]])
    out = fo.refine_descriptors(D, s, p, torch.ones(1, dtype=torch.bool), 3, (3, 2, 1), backend="torch")
    assert out.tolist() == [[27, 22]]


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed (pip install triton)")
def test_refine_triton_kernel_matches_torch_in_the_interpreter():
    """The Triton kernel, run by Triton's CPU interpreter, gives the torch search's pixels."""
    code = textwrap.dedent("""
        import torch
        from recon_slam.frontend import fused_ops as fo
        for seed, (H, W, F, N, r, dils) in enumerate([(40, 56, 24, 300, 3, (5, 4, 3, 2, 1)),
                                                     (33, 47, 17, 129, 2, (9, 3, 1))]):
            gen = torch.Generator().manual_seed(seed)
            D = torch.nn.functional.normalize(torch.randn(H, W, F, generator=gen), dim=-1)
            s = torch.nn.functional.normalize(torch.randn(N, F, generator=gen), dim=-1)
            p = torch.stack((torch.randint(0, W, (N,), generator=gen), torch.randint(0, H, (N,), generator=gen)), -1)
            a = torch.rand(N, generator=gen) > 0.25
            ref = fo.refine_descriptors(D, s, p, a, r, dils, backend="torch")
            tri = fo.refine_descriptors(D, s, p, a, r, dils, backend="triton")
            assert torch.equal(ref, tri), (seed, (ref != tri).any(1).sum())
        print("ok")
    """)
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]


@pytest.mark.skipif(not (CUDA and HAS_TRITON), reason="needs a CUDA device and Triton")
def test_refine_triton_kernel_matches_torch_cuda():
    D, s, p, active = _problem(seed=3, H=96, W=128, N=5000)
    D, s, p, active = D.cuda(), s.cuda(), p.cuda(), active.cuda()
    ref = fo.refine_descriptors(D, s, p, active, 3, (5, 4, 3, 2, 1), backend="torch")
    tri = fo.refine_descriptors(D, s, p, active, 3, (5, 4, 3, 2, 1), backend="triton")
    assert torch.equal(ref, tri)
    # float16 descriptors (the device step's default on CUDA): nearly all the same pixels
    tri16 = fo.refine_descriptors(D, s, p, active, 3, (5, 4, 3, 2, 1), dtype=torch.float16, backend="triton")
    assert (tri16 == ref).all(1).float().mean() > 0.97


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_gram_splitk_cuda():
    P = torch.randn(2, 7, 196608, device="cuda")
    Q = torch.randn(2, 8, 196608, device="cuda")
    torch.testing.assert_close(fo.gram_splitk(P, Q), (P.double() @ Q.double().transpose(1, 2)).float(),
                               rtol=1e-4, atol=1e-2)
