"""Tests of the batched torch Lie-group helpers (recon_slam.geometry.lie)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from recon_slam.geometry import lie
from recon_slam.geometry.transforms import rotation_angle_deg

DTYPES = (torch.float32, torch.float64)
# Round-off level tolerances for quantities of order one.
TOL = {torch.float32: 2e-5, torch.float64: 1e-11}

# Edge-case rotation angles: zero, tiny, around the Taylor-branch threshold, large, near pi.
EDGE_ANGLES = (0.0, 1e-8, 1e-4, 9.99e-3, 1.0001e-2, 0.7, 2.5, math.pi - 1e-3, math.pi - 1e-6)


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_unit(shape, dtype, gen) -> torch.Tensor:
    v = torch.randn(*shape, 3, generator=gen, dtype=torch.float64)
    return (v / v.norm(dim=-1, keepdim=True)).to(dtype)


def random_rotvec(shape, dtype, gen, max_angle=math.pi - 1e-3) -> torch.Tensor:
    """Rotation vectors with angles uniform in ``[0, max_angle]``."""
    angle = torch.rand(*shape, 1, generator=gen, dtype=torch.float64) * max_angle
    return (random_unit(shape, torch.float64, gen) * angle).to(dtype)


def random_se3_tangent(shape, dtype, gen, max_angle=math.pi - 1e-3) -> torch.Tensor:
    rho = torch.randn(*shape, 3, generator=gen, dtype=torch.float64)
    return torch.cat((rho, random_rotvec(shape, torch.float64, gen, max_angle)), dim=-1).to(dtype)


def random_sim3_tangent(shape, dtype, gen, max_angle=math.pi - 1e-3) -> torch.Tensor:
    sigma = torch.empty(*shape, 1, dtype=torch.float64).uniform_(-1.5, 1.5, generator=gen)
    return torch.cat((random_se3_tangent(shape, torch.float64, gen, max_angle), sigma), dim=-1).to(dtype)


def sim3_generator_matrix(xi: torch.Tensor) -> torch.Tensor:
    """4x4 Lie-algebra matrix of a sim(3) (or se(3), when 6 long) tangent vector."""
    G = torch.zeros(xi.shape[:-1] + (4, 4), dtype=xi.dtype)
    G[..., :3, :3] = lie.hat(xi[..., 3:6])
    if xi.shape[-1] == 7:
        G[..., :3, :3] += xi[..., 6, None, None] * torch.eye(3, dtype=xi.dtype)
    G[..., :3, 3] = xi[..., :3]
    return G


def numeric_jacobian(func, x0: torch.Tensor, step: float = 1e-6) -> torch.Tensor:
    """Central differences of ``func`` (vector -> (..., m)) at ``x0 (n,)``: ``(..., m, n)``."""
    columns = []
    for k in range(x0.shape[-1]):
        dx = torch.zeros_like(x0)
        dx[k] = step
        columns.append((func(x0 + dx) - func(x0 - dx)) / (2 * step))
    return torch.stack(columns, dim=-1)


def assert_close(actual, expected, tol):
    torch.testing.assert_close(actual, expected, atol=tol, rtol=0)


# ---------------------------------------------------------------------------- hat / vee
@pytest.mark.parametrize("dtype", DTYPES)
def test_hat_is_cross_product_and_vee_inverts_it(dtype):
    gen = generator(1)
    v = torch.randn(2, 5, 3, generator=gen).to(dtype)
    w = torch.randn(2, 5, 3, generator=gen).to(dtype)
    V = lie.hat(v)
    assert V.shape == (2, 5, 3, 3) and V.dtype == dtype
    assert_close((V @ w[..., None])[..., 0], torch.linalg.cross(v, w), TOL[dtype] * 10)
    assert_close(V.transpose(-1, -2), -V, 0.0)
    assert_close(lie.vee(V), v, 0.0)


# ---------------------------------------------------------------------------- SO(3)
@pytest.mark.parametrize("dtype", DTYPES)
def test_so3_exp_matches_scipy(dtype):
    gen = generator(2)
    phi = torch.cat(
        (
            random_rotvec((200,), torch.float64, gen),
            random_unit((len(EDGE_ANGLES),), torch.float64, gen) * torch.tensor(EDGE_ANGLES)[:, None],
        )
    )
    expected = torch.from_numpy(Rotation.from_rotvec(phi.numpy()).as_matrix())
    R = lie.so3_exp(phi.to(dtype))
    assert R.dtype == dtype
    assert_close(R.double(), expected, TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("angle", EDGE_ANGLES)
def test_so3_log_exp_round_trip_edge_angles(dtype, angle):
    axes = random_unit((64,), torch.float64, generator(3))
    phi = (axes * angle).to(dtype)
    R = lie.so3_exp(phi)
    back = lie.so3_log(R)
    assert back.dtype == dtype
    # float32 cannot place an angle near pi better than ~1e-7 rad; the rest is round-off.
    assert_close(back, phi, TOL[dtype])
    assert_close(lie.so3_exp(back), R, TOL[dtype])
    # tiny angles keep their relative precision (no absolute round-off floor)
    if 0 < angle < 1e-3:
        torch.testing.assert_close(back.norm(dim=-1), torch.full((64,), angle, dtype=dtype), rtol=1e-5, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_so3_log_at_exactly_pi(dtype):
    axes = torch.cat((torch.eye(3, dtype=torch.float64), random_unit((61,), torch.float64, generator(4))))
    # exact half-turn matrices 2 a a^T - I (no rounding of pi involved)
    R = (2 * axes[:, :, None] * axes[:, None, :] - torch.eye(3, dtype=torch.float64)).to(dtype)
    phi = lie.so3_log(R)
    assert torch.isfinite(phi).all()
    assert_close(phi.norm(dim=-1), torch.full((64,), math.pi, dtype=dtype), TOL[dtype])
    # the axis is only defined up to sign at pi
    alignment = (phi / phi.norm(dim=-1, keepdim=True) * axes.to(dtype)).sum(-1).abs()
    assert_close(alignment, torch.ones(64, dtype=dtype), TOL[dtype])
    assert_close(lie.so3_exp(phi), R, TOL[dtype])
    # and through so3_exp of a rotation vector of length pi
    R2 = lie.so3_exp((axes * math.pi).to(dtype))
    assert_close(lie.so3_exp(lie.so3_log(R2)), R2, TOL[dtype])


def test_so3_log_matches_scipy_on_random_rotations():
    R = Rotation.random(500, random_state=5)
    phi = lie.so3_log(torch.from_numpy(R.as_matrix()))
    assert_close(phi, torch.from_numpy(R.as_rotvec()), 1e-11)


def test_so3_log_tolerates_slightly_non_orthogonal_input():
    phi = random_rotvec((50,), torch.float64, generator(6))
    noise = 1e-7 * torch.randn(50, 3, 3, generator=generator(7), dtype=torch.float64)
    assert_close(lie.so3_log(lie.so3_exp(phi) + noise), phi, 1e-6)


def test_rotation_angle_deg_agrees_with_so3_log():
    angles = torch.tensor([0.0, 1e-9, 1e-5, 0.3, 2.0, math.pi - 1e-7, math.pi], dtype=torch.float64)
    phi = random_unit((len(angles),), torch.float64, generator(8)) * angles[:, None]
    R = lie.so3_exp(phi).numpy()
    np.testing.assert_allclose(rotation_angle_deg(R), np.degrees(angles.numpy()), rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------------------- SE(3)
@pytest.mark.parametrize("dtype", DTYPES)
def test_se3_exp_log_round_trip(dtype):
    gen = generator(10)
    edge = torch.cat(
        (
            torch.randn(len(EDGE_ANGLES), 3, generator=gen, dtype=torch.float64),
            random_unit((len(EDGE_ANGLES),), torch.float64, gen) * torch.tensor(EDGE_ANGLES)[:, None],
        ),
        dim=-1,
    )
    xi = torch.cat((random_se3_tangent((300,), torch.float64, gen), edge, torch.zeros(1, 6, dtype=torch.float64)))
    xi = xi.to(dtype)
    T = lie.se3_exp(xi)
    assert T.shape == (xi.shape[0], 4, 4) and T.dtype == dtype
    assert_close(T[:, 3], torch.tensor([0, 0, 0, 1], dtype=dtype).expand(xi.shape[0], 4), 0.0)
    # rho is amplified by up to ~1/(pi - angle) near pi: compare the poses there
    back = lie.se3_log(T)
    near_pi = xi[:, 3:].norm(dim=-1) > 3.0
    assert_close(back[~near_pi], xi[~near_pi], 5 * TOL[dtype])
    assert_close(lie.se3_exp(back), T, 20 * TOL[dtype])


def test_se3_exp_matches_matrix_exponential_and_scipy():
    gen = generator(11)
    xi = torch.cat((random_se3_tangent((200,), torch.float64, gen), torch.zeros(1, 6, dtype=torch.float64)))
    T = lie.se3_exp(xi)
    assert_close(T, torch.linalg.matrix_exp(sim3_generator_matrix(xi)), 1e-12)
    rotation = Rotation.from_rotvec(xi[:, 3:].numpy())
    assert_close(T[:, :3, :3], torch.from_numpy(rotation.as_matrix()), 1e-12)
    # the rotation part of the log is scipy's rotation vector
    assert_close(lie.se3_log(T)[:, 3:], torch.from_numpy(rotation.as_rotvec()), 1e-11)


@pytest.mark.parametrize("dtype", DTYPES)
def test_se3_inverse_compose_act_are_consistent(dtype):
    gen = generator(12)
    A = lie.se3_exp(random_se3_tangent((2, 5), dtype, gen))
    B = lie.se3_exp(random_se3_tangent((2, 5), dtype, gen))
    p = torch.randn(2, 5, 7, 3, generator=gen).to(dtype)
    eye = torch.eye(4, dtype=dtype).expand(2, 5, 4, 4)
    tol = 10 * TOL[dtype]
    assert_close(lie.se3_compose(A, lie.se3_inverse(A)), eye, tol)
    assert_close(lie.se3_inverse(A), torch.linalg.inv(A), tol)
    assert_close(lie.se3_compose(A, B), A @ B, 0.0)
    q = lie.se3_act(A, p)
    assert q.shape == (2, 5, 7, 3)
    homogeneous = torch.cat((p, torch.ones_like(p[..., :1])), dim=-1)
    assert_close(q, (homogeneous @ A.transpose(-1, -2))[..., :3], tol)
    assert_close(lie.se3_act(lie.se3_inverse(A), q), p, tol)
    assert_close(lie.se3_act(lie.se3_compose(A, B), p), lie.se3_act(A, lie.se3_act(B, p)), tol)
    # one pose broadcast over a batch of point sets
    assert lie.se3_act(A[0, 0], p).shape == (2, 5, 7, 3)


def test_se3_adjoint_identities():
    gen = generator(13)
    T = lie.se3_exp(random_se3_tangent((40,), torch.float64, gen))
    U = lie.se3_exp(random_se3_tangent((40,), torch.float64, gen))
    x = random_se3_tangent((40,), torch.float64, gen, max_angle=2.0)
    Ad = lie.se3_adjoint(T)
    assert Ad.shape == (40, 6, 6)
    lhs = T @ lie.se3_exp(x) @ lie.se3_inverse(T)
    assert_close(lie.se3_exp((Ad @ x[..., None])[..., 0]), lhs, 1e-11)
    assert_close(lie.se3_adjoint(T @ U), Ad @ lie.se3_adjoint(U), 1e-11)
    assert_close(lie.se3_adjoint(lie.se3_inverse(T)), torch.linalg.inv(Ad), 1e-11)


# ---------------------------------------------------------------------------- Sim(3)
@pytest.mark.parametrize("sigma", (0.0, 1e-12, 1e-6, 0.4, 0.999999, 1.000001, -1.0, -2.5, 3.0))
def test_sim3_exp_matches_matrix_exponential(sigma):
    """Covers every branch of the translation Jacobian (small / large scale and angle)."""
    gen = generator(20)
    angles = torch.tensor((0.0,) + EDGE_ANGLES + (math.pi,), dtype=torch.float64)
    n = len(angles)
    xi = torch.cat(
        (
            torch.randn(n, 3, generator=gen, dtype=torch.float64),
            random_unit((n,), torch.float64, gen) * angles[:, None],
            torch.full((n, 1), sigma, dtype=torch.float64),
        ),
        dim=-1,
    )
    T = lie.sim3_exp(xi)
    expected = torch.linalg.matrix_exp(sim3_generator_matrix(xi))
    torch.testing.assert_close(T, expected, rtol=1e-12, atol=1e-12)
    back = lie.sim3_log(T)
    assert_close(lie.sim3_exp(back), T, 1e-11 * math.exp(abs(sigma)))
    away_from_pi = angles < 3.0
    assert_close(back[away_from_pi], xi[away_from_pi], 1e-10)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sim3_exp_log_round_trip_and_scale(dtype):
    gen = generator(21)
    xi = random_sim3_tangent((2, 5), dtype, gen, max_angle=3.0)
    T = lie.sim3_exp(xi)
    assert T.shape == (2, 5, 4, 4) and T.dtype == dtype
    assert_close(lie.sim3_scale(T), torch.exp(xi[..., 6]), 10 * TOL[dtype])
    assert_close(lie.sim3_log(T), xi, 50 * TOL[dtype])
    # sigma = 0 reduces to SE(3)
    se3_part = xi[..., :6]
    zero_sigma = torch.cat((se3_part, torch.zeros_like(xi[..., 6:])), -1)
    assert_close(lie.sim3_exp(zero_sigma), lie.se3_exp(se3_part), 10 * TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_sim3_inverse_act_and_se3_conversion(dtype):
    gen = generator(22)
    T = lie.sim3_exp(random_sim3_tangent((2, 5), dtype, gen))
    p = torch.randn(2, 5, 4, 3, generator=gen).to(dtype)
    tol = 20 * TOL[dtype]
    assert_close(lie.sim3_inverse(T), torch.linalg.inv(T), tol)
    assert_close(T @ lie.sim3_inverse(T), torch.eye(4, dtype=dtype).expand(2, 5, 4, 4), tol)
    q = lie.sim3_act(T, p)
    pose, s = lie.sim3_to_se3(T)
    R, t = pose[..., :3, :3], pose[..., :3, 3]
    assert_close(R @ R.transpose(-1, -2), torch.eye(3, dtype=dtype).expand(2, 5, 3, 3), tol)
    assert_close(q, s[..., None, None] * (p @ R.transpose(-1, -2)) + t[..., None, :], tol)
    assert_close(lie.sim3_act(lie.sim3_inverse(T), q), p, tol)
    assert_close(lie.sim3_from_se3(pose, s), T, tol)
    # a scalar scale, and scale 1 gives back the SE(3) pose
    assert_close(lie.sim3_from_se3(pose, 1.0), pose, 0.0)
    assert_close(lie.sim3_scale(lie.sim3_from_se3(pose, 2.5)), torch.full((2, 5), 2.5, dtype=dtype), tol)


def test_sim3_adjoint_identities():
    gen = generator(23)
    T = lie.sim3_exp(random_sim3_tangent((40,), torch.float64, gen))
    U = lie.sim3_exp(random_sim3_tangent((40,), torch.float64, gen))
    x = random_sim3_tangent((40,), torch.float64, gen, max_angle=2.0)
    Ad = lie.sim3_adjoint(T)
    assert Ad.shape == (40, 7, 7)
    lhs = T @ lie.sim3_exp(x) @ lie.sim3_inverse(T)
    assert_close(lie.sim3_exp((Ad @ x[..., None])[..., 0]), lhs, 1e-10)
    assert_close(lie.sim3_adjoint(T @ U), Ad @ lie.sim3_adjoint(U), 1e-10)
    assert_close(lie.sim3_adjoint(lie.sim3_inverse(T)), torch.linalg.inv(Ad), 1e-10)


# ---------------------------------------------------------------------------- Jacobians
def test_act_jacobians_match_finite_differences():
    gen = generator(30)
    T = lie.sim3_exp(random_sim3_tangent((), torch.float64, gen))
    p = torch.randn(3, generator=gen, dtype=torch.float64)
    q = lie.sim3_act(T, p[None])[0]
    zero6, zero7 = torch.zeros(6, dtype=torch.float64), torch.zeros(7, dtype=torch.float64)
    numeric_se3 = numeric_jacobian(lambda d: lie.se3_act(lie.se3_exp(d) @ T, p[None])[0], zero6)
    numeric_sim3 = numeric_jacobian(lambda d: lie.sim3_act(lie.sim3_exp(d) @ T, p[None])[0], zero7)
    assert_close(lie.act_jacobian_se3(q), numeric_se3, 1e-8)
    assert_close(lie.act_jacobian_sim3(q), numeric_sim3, 1e-8)
    batch_q = torch.randn(2, 5, 3, generator=gen)
    assert lie.act_jacobian_se3(batch_q).shape == (2, 5, 3, 6)
    assert lie.act_jacobian_sim3(batch_q).shape == (2, 5, 3, 7)


def _pose_graph_edge(group: str, residual_size: float, seed: int):
    """Two node poses and a measurement that disagrees with them by ``residual_size``."""
    gen = generator(seed)
    if group == "se3":
        tangent, exp = random_se3_tangent, lie.se3_exp
    else:
        tangent, exp = random_sim3_tangent, lie.sim3_exp
    T_w_i = exp(tangent((), torch.float64, gen))
    T_w_j = exp(tangent((), torch.float64, gen))
    noise = tangent((), torch.float64, gen, max_angle=1.0)
    noise = residual_size * noise / noise.norm()
    T_i_j_meas = torch.linalg.inv(T_w_i) @ T_w_j @ exp(-noise)
    return T_w_i, T_w_j, T_i_j_meas, noise


@pytest.mark.parametrize("group", ("se3", "sim3"))
@pytest.mark.parametrize("residual_size,tol", ((0.0, 1e-8), (1e-3, 1e-8), (0.2, 1e-5)))
def test_relative_residual_jacobians_match_finite_differences(group, residual_size, tol):
    T_w_i, T_w_j, T_i_j_meas, expected_residual = _pose_graph_edge(group, residual_size, seed=31)
    if group == "se3":
        residual_fn, jacobian_fn = lie.se3_relative_residual, lie.se3_relative_residual_jacobians
        exp, dim = lie.se3_exp, 6
    else:
        residual_fn, jacobian_fn = lie.sim3_relative_residual, lie.sim3_relative_residual_jacobians
        exp, dim = lie.sim3_exp, 7
    residual, J_i, J_j = jacobian_fn(T_w_i, T_w_j, T_i_j_meas)
    assert residual.shape == (dim,) and J_i.shape == J_j.shape == (dim, dim)
    assert_close(residual, residual_fn(T_w_i, T_w_j, T_i_j_meas), 1e-12)
    assert_close(residual, expected_residual, 1e-10)
    zero = torch.zeros(dim, dtype=torch.float64)
    numeric_i = numeric_jacobian(lambda d: residual_fn(exp(d) @ T_w_i, T_w_j, T_i_j_meas), zero)
    numeric_j = numeric_jacobian(lambda d: residual_fn(T_w_i, exp(d) @ T_w_j, T_i_j_meas), zero)
    assert_close(J_i, numeric_i, tol)
    assert_close(J_j, numeric_j, tol)


@pytest.mark.parametrize("group", ("se3", "sim3"))
def test_relative_residual_batches_and_vanishes_when_consistent(group):
    gen = generator(32)
    if group == "se3":
        T_w = lie.se3_exp(random_se3_tangent((2, 5), torch.float64, gen))
        inverse, jacobian_fn, dim = lie.se3_inverse, lie.se3_relative_residual_jacobians, 6
    else:
        T_w = lie.sim3_exp(random_sim3_tangent((2, 5), torch.float64, gen))
        inverse, jacobian_fn, dim = lie.sim3_inverse, lie.sim3_relative_residual_jacobians, 7
    T_w_i, T_w_j = T_w[:, :-1], T_w[:, 1:]
    residual, J_i, J_j = jacobian_fn(T_w_i, T_w_j, inverse(T_w_i) @ T_w_j)
    assert residual.shape == (2, 4, dim) and J_i.shape == J_j.shape == (2, 4, dim, dim)
    assert_close(residual, torch.zeros_like(residual), 1e-10)
    assert_close(J_j, -J_i, 0.0)


# ---------------------------------------------------------------------------- autograd, batches, devices
def test_autograd_is_finite_at_identity_and_at_pi():
    for xi0 in (torch.zeros(7, dtype=torch.float64), torch.tensor([0.1, 0.2, 0.3, 0.0, 0.0, math.pi - 1e-9, 0.2])):
        xi = xi0.clone().requires_grad_(True)
        loss = (
            lie.sim3_log(lie.sim3_exp(xi)).sum()
            + lie.se3_log(lie.se3_exp(xi[:6])).sum()
            + lie.so3_log(lie.so3_exp(xi[3:6])).sum()
        )
        (grad,) = torch.autograd.grad(loss, xi)
        assert torch.isfinite(grad).all()
    # the derivative of log(exp(x)) is the identity
    xi = torch.zeros(6, dtype=torch.float64, requires_grad=True)
    jac = torch.autograd.functional.jacobian(lambda x: lie.se3_log(lie.se3_exp(x)), xi)
    assert_close(jac, torch.eye(6, dtype=torch.float64), 1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
def test_batch_shapes_and_dtypes(dtype):
    gen = generator(40)
    xi6 = random_se3_tangent((2, 5), dtype, gen)
    xi7 = random_sim3_tangent((2, 5), dtype, gen)
    T6, T7 = lie.se3_exp(xi6), lie.sim3_exp(xi7)
    p = torch.randn(2, 5, 11, 3, generator=gen).to(dtype)
    outputs = {
        "so3_exp": (lie.so3_exp(xi6[..., 3:]), (2, 5, 3, 3)),
        "so3_log": (lie.so3_log(T6[..., :3, :3]), (2, 5, 3)),
        "se3_exp": (T6, (2, 5, 4, 4)),
        "se3_log": (lie.se3_log(T6), (2, 5, 6)),
        "se3_inverse": (lie.se3_inverse(T6), (2, 5, 4, 4)),
        "se3_act": (lie.se3_act(T6, p), (2, 5, 11, 3)),
        "se3_adjoint": (lie.se3_adjoint(T6), (2, 5, 6, 6)),
        "sim3_exp": (T7, (2, 5, 4, 4)),
        "sim3_log": (lie.sim3_log(T7), (2, 5, 7)),
        "sim3_inverse": (lie.sim3_inverse(T7), (2, 5, 4, 4)),
        "sim3_act": (lie.sim3_act(T7, p), (2, 5, 11, 3)),
        "sim3_adjoint": (lie.sim3_adjoint(T7), (2, 5, 7, 7)),
        "sim3_scale": (lie.sim3_scale(T7), (2, 5)),
        "sim3_from_se3": (lie.sim3_from_se3(T6, lie.sim3_scale(T7)), (2, 5, 4, 4)),
        "act_jacobian_se3": (lie.act_jacobian_se3(p), (2, 5, 11, 3, 6)),
        "act_jacobian_sim3": (lie.act_jacobian_sim3(p), (2, 5, 11, 3, 7)),
        "se3_relative_residual": (lie.se3_relative_residual(T6, T6, T6), (2, 5, 6)),
        "sim3_relative_residual": (lie.sim3_relative_residual(T7, T7, T7), (2, 5, 7)),
    }
    for name, (value, shape) in outputs.items():
        assert value.shape == shape, name
        assert value.dtype == dtype, name
    # batched results equal per-element results
    assert_close(lie.sim3_log(T7)[1, 3], lie.sim3_log(T7[1, 3]), TOL[dtype])
    # empty batches pass through
    assert lie.se3_log(lie.se3_exp(torch.zeros(0, 6, dtype=dtype))).shape == (0, 6)
    assert lie.sim3_log(lie.sim3_exp(torch.zeros(0, 7, dtype=dtype))).shape == (0, 7)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")
@pytest.mark.filterwarnings("ignore:Synchronization debug mode is a prototype feature")
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_matches_cpu(dtype):
    """Same results on the GPU, with dtype and device following the inputs and no host syncs."""
    gen = generator(50)
    xi6 = random_se3_tangent((64,), dtype, gen)
    xi7 = random_sim3_tangent((64,), dtype, gen)
    p = torch.randn(64, 9, 3, generator=gen).to(dtype)
    T7 = lie.sim3_exp(xi7)

    def run(device):
        a, b, c, points = (x.to(device) for x in (xi6, xi7, T7, p))
        if device != "cpu":  # from here on, no host-device synchronisation is allowed
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        try:
            T6 = lie.se3_exp(a)
            r, J_i, J_j = lie.sim3_relative_residual_jacobians(c, lie.sim3_exp(b), c)
            r6, J6_i, _ = lie.se3_relative_residual_jacobians(T6, T6.flip(0), T6)
            return {
                "se3_log": lie.se3_log(T6),
                "sim3_log": lie.sim3_log(lie.sim3_exp(b)),
                "so3_log": lie.so3_log(lie.so3_exp(a[:, 3:])),
                "se3_inverse": lie.se3_inverse(T6),
                "sim3_inverse": lie.sim3_inverse(c),
                "act": lie.sim3_act(c, points),
                "act_jacobian": lie.act_jacobian_sim3(points),
                "adjoint": lie.sim3_adjoint(c),
                "from_se3": lie.sim3_from_se3(T6, 2.0) @ lie.sim3_from_se3(T6, lie.sim3_scale(c)),
                "residual": r,
                "J_i": J_i,
                "se3_residual": r6,
                "se3_J_i": J6_i,
            }
        finally:
            if device != "cpu":
                torch.cuda.set_sync_debug_mode("default")

    on_cpu, on_gpu = run("cpu"), run("cuda")
    for name, value in on_gpu.items():
        assert value.device.type == "cuda" and value.dtype == dtype, name
        torch.testing.assert_close(value.cpu(), on_cpu[name], atol=100 * TOL[dtype], rtol=100 * TOL[dtype])
