"""Batched Lie-group helpers for SO(3), SE(3) and Sim(3) in torch.

Every function works on arbitrary leading (batch) dimensions ``...``, in float32 or
float64, on CPU or CUDA; outputs take the dtype and device of the inputs. Nothing loops
over batch elements and nothing synchronises with the device (no ``.item()``), so the
functions can sit inside optimisation loops and be differentiated with autograd (small
angle branches use safe denominators, so gradients stay finite at zero rotation).

Representation:
    * rotations: ``(..., 3, 3)`` matrices.
    * SE(3): ``(..., 4, 4)`` matrices ``[[R, t], [0, 1]]``.
    * Sim(3): ``(..., 4, 4)`` matrices ``[[s R, t], [0, 1]]`` with ``s > 0``.
    * SE(3) tangent vectors ``xi = (rho, phi)`` ``(..., 6)``, translation first.
    * Sim(3) tangent vectors ``xi = (rho, phi, sigma)`` ``(..., 7)``, ``s = exp(sigma)``.

Frames follow the package convention: ``T_a_b`` maps coordinates in frame ``b`` into frame
``a``. Perturbations are LEFT perturbations, ``T_new = exp(delta) @ T``: ``delta`` is
expressed in the frame the pose maps *into* (frame ``a`` for ``T_a_b``).
"""

from __future__ import annotations

import torch

__all__ = [
    "hat",
    "vee",
    "so3_exp",
    "so3_log",
    "se3_exp",
    "se3_log",
    "se3_inverse",
    "se3_compose",
    "se3_act",
    "se3_adjoint",
    "sim3_exp",
    "sim3_log",
    "sim3_inverse",
    "sim3_act",
    "sim3_adjoint",
    "sim3_scale",
    "sim3_from_se3",
    "sim3_to_se3",
    "act_jacobian_se3",
    "act_jacobian_sim3",
    "se3_relative_residual",
    "se3_relative_residual_jacobians",
    "sim3_relative_residual",
    "sim3_relative_residual_jacobians",
]

# Below this rotation angle (radians) the closed-form coefficients are replaced by their
# Taylor series. The series are carried far enough (error < theta^6 / 5040) that they are
# accurate to float64 round-off at the threshold, while the closed forms above it lose
# at most ~eps / theta^2 relative precision in coefficients that multiply theta^2 terms,
# i.e. round-off level absolute error in the matrices.
_SMALL_ANGLE = 1e-2
# Below this |sigma| the Sim(3) moment integrals use their power series.
_SMALL_SIGMA = 1.0
_MOMENT_SERIES_TERMS = 20  # 1/20! < 1e-18


# ---------------------------------------------------------------------------- so(3)
def hat(v: torch.Tensor) -> torch.Tensor:
    """Skew-symmetric matrices: ``v (..., 3) -> (..., 3, 3)`` with ``hat(v) @ w == cross(v, w)``."""
    x, y, z = v.unbind(-1)
    zero = torch.zeros_like(x)
    return torch.stack(
        (
            torch.stack((zero, -z, y), dim=-1),
            torch.stack((z, zero, -x), dim=-1),
            torch.stack((-y, x, zero), dim=-1),
        ),
        dim=-2,
    )


def vee(M: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`hat`: ``(..., 3, 3) -> (..., 3)``.

    Uses the antisymmetric part, so it is also the least-squares ``vee`` of a matrix that is
    only approximately skew-symmetric.
    """
    return 0.5 * torch.stack(
        (M[..., 2, 1] - M[..., 1, 2], M[..., 0, 2] - M[..., 2, 0], M[..., 1, 0] - M[..., 0, 1]),
        dim=-1,
    )


def _eye(n: int, like: torch.Tensor) -> torch.Tensor:
    return torch.eye(n, dtype=like.dtype, device=like.device)


def _rotation_coefficients(phi: torch.Tensor):
    """Scalar coefficients of the SO(3) exponential and of its left Jacobian ``V``.

    Returns ``theta_sq``, ``a = sin(t)/t``, ``b = (1 - cos t)/t^2``, ``c = (t - sin t)/t^3``,
    each ``(...)``.
    """
    theta_sq = (phi * phi).sum(-1)
    small = theta_sq < _SMALL_ANGLE**2
    theta = torch.sqrt(torch.where(small, torch.ones_like(theta_sq), theta_sq))
    half_sin = torch.sin(0.5 * theta)
    sin_t = torch.sin(theta)
    t2, t4 = theta_sq, theta_sq * theta_sq
    a = torch.where(small, 1.0 - t2 / 6.0 + t4 / 120.0 - t2 * t4 / 5040.0, sin_t / theta)
    b = torch.where(
        small, 0.5 - t2 / 24.0 + t4 / 720.0 - t2 * t4 / 40320.0, 2.0 * half_sin * half_sin / (theta * theta)
    )
    c = torch.where(
        small, 1.0 / 6.0 - t2 / 120.0 + t4 / 5040.0 - t2 * t4 / 362880.0, (theta - sin_t) / (theta * theta * theta)
    )
    return theta_sq, a, b, c


def so3_exp(phi: torch.Tensor) -> torch.Tensor:
    """Rotation vectors ``phi (..., 3)`` (axis * angle, radians) -> rotation matrices ``(..., 3, 3)``."""
    _, a, b, _ = _rotation_coefficients(phi)
    K = hat(phi)
    return _eye(3, phi) + a[..., None, None] * K + b[..., None, None] * (K @ K)


def _quaternion_from_matrix(R: torch.Tensor) -> torch.Tensor:
    """Rotation matrices ``(..., 3, 3)`` -> unit quaternions ``(..., 4)`` as ``(w, x, y, z)`` with ``w >= 0``.

    Shepperd's method: each of the four standard formulas divides by one quaternion
    component; the one with the largest component is taken, so no division is ill-conditioned
    (this is what keeps the logarithm accurate near an angle of pi).
    """
    r00, r01, r02 = R[..., 0, 0], R[..., 0, 1], R[..., 0, 2]
    r10, r11, r12 = R[..., 1, 0], R[..., 1, 1], R[..., 1, 2]
    r20, r21, r22 = R[..., 2, 0], R[..., 2, 1], R[..., 2, 2]
    # 4 * (w^2, x^2, y^2, z^2) for a unit quaternion
    four_sq = torch.stack(
        (
            1.0 + r00 + r11 + r22,
            1.0 + r00 - r11 - r22,
            1.0 - r00 + r11 - r22,
            1.0 - r00 - r11 + r22,
        ),
        dim=-1,
    )
    # 2 * |largest component| under each hypothesis (clamped: unused candidates may be ~0)
    two_q = torch.sqrt(four_sq.clamp_min(1e-12))
    d21, d02, d10 = r21 - r12, r02 - r20, r10 - r01  # 4 w x, 4 w y, 4 w z
    s01, s02, s12 = r01 + r10, r02 + r20, r12 + r21  # 4 x y, 4 x z, 4 y z
    # candidate k (rows) holds 4 * q_k * (w, x, y, z); divided by 2 * (2 q_k)
    candidates = torch.stack(
        (
            torch.stack((four_sq[..., 0], d21, d02, d10), dim=-1),
            torch.stack((d21, four_sq[..., 1], s01, s02), dim=-1),
            torch.stack((d02, s01, four_sq[..., 2], s12), dim=-1),
            torch.stack((d10, s02, s12, four_sq[..., 3]), dim=-1),
        ),
        dim=-2,
    ) / (2.0 * two_q[..., :, None])
    best = four_sq.argmax(dim=-1)
    index = best[..., None, None].expand(best.shape + (1, 4))
    q = torch.take_along_dim(candidates, index, dim=-2).squeeze(-2)
    q = torch.nn.functional.normalize(q, dim=-1)
    return torch.where(q[..., :1] < 0, -q, q)


def so3_log(R: torch.Tensor) -> torch.Tensor:
    """Rotation matrices ``(..., 3, 3)`` -> rotation vectors ``(..., 3)`` with angle in ``[0, pi]``.

    Quaternion based (Shepperd + ``atan2``), accurate for angles down to 0 and up to pi.
    At exactly pi, ``phi`` and ``-phi`` describe the same rotation; either may be returned.
    Slightly non-orthogonal inputs are handled through quaternion normalisation.
    """
    q = _quaternion_from_matrix(R)
    w, v = q[..., 0], q[..., 1:]
    n_sq = (v * v).sum(-1)
    small = n_sq < 1e-6  # |v| < 1e-3, i.e. angle < 2e-3
    n = torch.sqrt(torch.where(small, torch.ones_like(n_sq), n_sq))
    w_safe = torch.where(small, w, torch.ones_like(w))  # w ~ 1 on the small branch
    ratio = n_sq / (w_safe * w_safe)
    # angle / |v| = 2 atan(|v| / w) / |v|, series in |v| / w
    series = (2.0 / w_safe) * (1.0 - ratio / 3.0 + ratio * ratio / 5.0 - ratio * ratio * ratio / 7.0)
    factor = torch.where(small, series, 2.0 * torch.atan2(n, w) / n)
    return factor[..., None] * v


# ---------------------------------------------------------------------------- SE(3)
def _make_homogeneous(M: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``M (..., 3, 3)``, ``t (..., 3)`` -> ``[[M, t], [0, 1]]`` ``(..., 4, 4)``."""
    batch = torch.broadcast_shapes(M.shape[:-2], t.shape[:-1])
    M = M.expand(batch + (3, 3))
    t = t.expand(batch + (3,))
    top = torch.cat((M, t[..., None]), dim=-1)
    bottom = torch.zeros(batch + (1, 4), dtype=M.dtype, device=M.device)
    bottom[..., 0, 3] = 1.0
    return torch.cat((top, bottom), dim=-2)


def se3_exp(xi: torch.Tensor) -> torch.Tensor:
    """Tangent vectors ``xi = (rho, phi) (..., 6)`` -> SE(3) matrices ``(..., 4, 4)``.

    ``R = so3_exp(phi)``, ``t = V(phi) rho`` with ``V`` the left Jacobian of SO(3).
    """
    rho, phi = xi[..., :3], xi[..., 3:6]
    _, a, b, c = _rotation_coefficients(phi)
    K = hat(phi)
    K2 = K @ K
    eye = _eye(3, xi)
    R = eye + a[..., None, None] * K + b[..., None, None] * K2
    V = eye + b[..., None, None] * K + c[..., None, None] * K2
    t = (V @ rho[..., None])[..., 0]
    return _make_homogeneous(R, t)


def _so3_left_jacobian_inverse(phi: torch.Tensor) -> torch.Tensor:
    """``V(phi)^-1 (..., 3, 3)``, valid for angles in ``[0, pi]``."""
    theta_sq = (phi * phi).sum(-1)
    small = theta_sq < _SMALL_ANGLE**2
    theta = torch.sqrt(torch.where(small, torch.ones_like(theta_sq), theta_sq))
    half = 0.5 * theta
    # (1 - (t/2) cot(t/2)) / t^2, finite up to t = pi (cot(pi/2) = 0)
    closed = (1.0 - half * torch.cos(half) / torch.sin(half)) / (theta * theta)
    t2 = theta_sq
    series = 1.0 / 12.0 + t2 / 720.0 + t2 * t2 / 30240.0 + t2 * t2 * t2 / 1209600.0
    d = torch.where(small, series, closed)
    K = hat(phi)
    return _eye(3, phi) - 0.5 * K + d[..., None, None] * (K @ K)


def se3_log(T: torch.Tensor) -> torch.Tensor:
    """SE(3) matrices ``(..., 4, 4)`` -> tangent vectors ``(rho, phi) (..., 6)``, rotation angle in ``[0, pi]``."""
    phi = so3_log(T[..., :3, :3])
    rho = (_so3_left_jacobian_inverse(phi) @ T[..., :3, 3:4])[..., 0]
    return torch.cat((rho, phi), dim=-1)


def se3_inverse(T: torch.Tensor) -> torch.Tensor:
    """Inverse of rigid transforms ``T_a_b (..., 4, 4) -> T_b_a`` (exact, no general matrix inverse)."""
    R_inv = T[..., :3, :3].transpose(-1, -2)
    t_inv = -(R_inv @ T[..., :3, 3:4])[..., 0]
    return _make_homogeneous(R_inv, t_inv)


def se3_compose(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``T_a_b (..., 4, 4)``, ``T_b_c (..., 4, 4)`` -> ``T_a_c = T_a_b @ T_b_c`` (batch dims broadcast)."""
    return A @ B


def se3_act(T: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Apply ``T_a_b (..., 4, 4)`` to points in frame ``b`` ``(..., N, 3)`` -> points in frame ``a`` ``(..., N, 3)``.

    Works for Sim(3) matrices too (the linear block is applied as is).
    """
    M = T[..., :3, :3]
    t = T[..., :3, 3]
    return points @ M.transpose(-1, -2) + t[..., None, :]


def se3_adjoint(T: torch.Tensor) -> torch.Tensor:
    """Adjoint ``(..., 6, 6)`` of ``T (..., 4, 4)``: ``T exp(x) T^-1 == exp(Ad_T x)`` for ``x = (rho, phi)``.

    ``Ad_T = [[R, hat(t) R], [0, R]]``. Moves a left perturbation of ``T_b_c`` expressed in frame
    ``b`` to frame ``a`` when ``T = T_a_b``.
    """
    R = T[..., :3, :3]
    t = T[..., :3, 3]
    top = torch.cat((R, hat(t) @ R), dim=-1)
    bottom = torch.cat((torch.zeros_like(R), R), dim=-1)
    return torch.cat((top, bottom), dim=-2)


def _se3_ad(xi: torch.Tensor) -> torch.Tensor:
    """Lie-algebra adjoint ``ad_xi (..., 6, 6)`` with ``ad_x y = vee([X, Y])``."""
    rho_hat, phi_hat = hat(xi[..., :3]), hat(xi[..., 3:6])
    top = torch.cat((phi_hat, rho_hat), dim=-1)
    bottom = torch.cat((torch.zeros_like(phi_hat), phi_hat), dim=-1)
    return torch.cat((top, bottom), dim=-2)


# ---------------------------------------------------------------------------- Sim(3)
def _exp_moments(sigma: torch.Tensor, kmax: int) -> list[torch.Tensor]:
    """``m_k(sigma) = integral_0^1 t^k exp(sigma t) dt`` for ``k = 0..kmax``, each ``(...)``.

    Power series for ``|sigma| < 1`` (no cancellation); the stable upward recurrence
    ``m_k = (e^sigma - k m_{k-1}) / sigma`` (error growth factor ``k / |sigma|``) otherwise.
    """
    small = sigma.abs() < _SMALL_SIGMA
    s_small = torch.where(small, sigma, torch.zeros_like(sigma))
    s_large = torch.where(small, torch.ones_like(sigma), sigma)
    # power series m_k = sum_j sigma^j / j! / (k + j + 1), as powers (..., J) @ coefficients (J, K)
    j = torch.arange(_MOMENT_SERIES_TERMS, dtype=sigma.dtype, device=sigma.device)
    k = torch.arange(kmax + 1, dtype=sigma.dtype, device=sigma.device)
    coefficients = torch.exp(-torch.lgamma(j + 1.0))[:, None] / (k[None, :] + j[:, None] + 1.0)
    powers = torch.cumprod(
        torch.cat((torch.ones_like(sigma)[..., None], s_small[..., None].expand(sigma.shape + (j.numel() - 1,))), -1),
        dim=-1,
    )
    series = (powers @ coefficients).unbind(-1)
    exp_s = torch.exp(s_large)
    recurrence = [torch.expm1(s_large) / s_large]
    for order in range(1, kmax + 1):
        recurrence.append((exp_s - order * recurrence[-1]) / s_large)
    return [torch.where(small, series[order], recurrence[order]) for order in range(kmax + 1)]


def _sim3_translation_coefficients(phi: torch.Tensor, sigma: torch.Tensor):
    """Scalars ``(theta^2, m0, b, c)`` of ``W = m0 I + b hat(phi) + c hat(phi)^2`` (see below)."""
    theta_sq = (phi * phi).sum(-1)
    small = theta_sq < _SMALL_ANGLE**2
    theta = torch.sqrt(torch.where(small, torch.ones_like(theta_sq), theta_sq))
    m = _exp_moments(sigma, 6)
    # small angle: expand sin / cos in theta under the integral
    t2, t4 = theta_sq, theta_sq * theta_sq
    b_series = m[1] - t2 * m[3] / 6.0 + t4 * m[5] / 120.0
    c_series = m[2] / 2.0 - t2 * m[4] / 24.0 + t4 * m[6] / 720.0
    # closed form: integral_0^1 e^((sigma + i theta) u) du = (p + i q) / (sigma + i theta)
    p = torch.expm1(sigma) * torch.cos(theta) - 2.0 * torch.sin(0.5 * theta) ** 2  # e^s cos(t) - 1
    q = torch.exp(sigma) * torch.sin(theta)  # e^s sin(t)
    denom = sigma * sigma + theta * theta
    integral_cos = (sigma * p + theta * q) / denom
    integral_sin = (sigma * q - theta * p) / denom
    b_closed = integral_sin / theta
    c_closed = (m[0] - integral_cos) / (theta * theta)
    b = torch.where(small, b_series, b_closed)
    c = torch.where(small, c_series, c_closed)
    return theta_sq, m[0], b, c


def _sim3_translation_jacobian(phi: torch.Tensor, sigma: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """``W (..., 3, 3)`` with ``t = W rho`` in ``sim3_exp`` (or ``W^-1`` when ``inverse``).

    ``W = integral_0^1 e^(sigma u) R(u phi) du = m0 I + b hat(phi) + c hat(phi)^2`` with
    ``m0 = (e^sigma - 1) / sigma``, ``b = integral e^(sigma u) sin(theta u) du / theta`` and
    ``c = integral e^(sigma u) (1 - cos(theta u)) du / theta^2``. Since ``hat^3 = -theta^2 hat``,
    ``W^-1 = I / m0 - (b / d) hat + (b^2 - a c) / (m0 d) hat^2`` with ``a = m0 - theta^2 c`` and
    ``d = a^2 + theta^2 b^2 > 0`` for angles up to pi: no division by the angle or the scale.
    """
    theta_sq, m0, b, c = _sim3_translation_coefficients(phi, sigma)
    if inverse:
        a = m0 - theta_sq * c
        d = a * a + theta_sq * b * b
        m0, b, c = 1.0 / m0, -b / d, (b * b - a * c) / (m0 * d)
    K = hat(phi)
    return m0[..., None, None] * _eye(3, phi) + b[..., None, None] * K + c[..., None, None] * (K @ K)


def sim3_exp(xi: torch.Tensor) -> torch.Tensor:
    """Tangent vectors ``xi = (rho, phi, sigma) (..., 7)`` -> Sim(3) matrices ``(..., 4, 4)``.

    Linear block ``exp(sigma) so3_exp(phi)``; translation ``W(phi, sigma) rho``.
    """
    rho, phi, sigma = xi[..., :3], xi[..., 3:6], xi[..., 6]
    sR = torch.exp(sigma)[..., None, None] * so3_exp(phi)
    t = (_sim3_translation_jacobian(phi, sigma) @ rho[..., None])[..., 0]
    return _make_homogeneous(sR, t)


def sim3_scale(T: torch.Tensor) -> torch.Tensor:
    """Scale ``s (...)`` of Sim(3) matrices ``(..., 4, 4)``: ``||sR||_F / sqrt(3)`` (exact for ``s R``)."""
    M = T[..., :3, :3]
    return torch.sqrt((M * M).sum((-1, -2)) / 3.0)


def sim3_log(T: torch.Tensor) -> torch.Tensor:
    """Sim(3) matrices ``(..., 4, 4)`` -> tangent vectors ``(rho, phi, sigma) (..., 7)``, angle in ``[0, pi]``."""
    s = sim3_scale(T)
    sigma = torch.log(s)
    phi = so3_log(T[..., :3, :3] / s[..., None, None])
    rho = (_sim3_translation_jacobian(phi, sigma, inverse=True) @ T[..., :3, 3:4])[..., 0]
    return torch.cat((rho, phi, sigma[..., None]), dim=-1)


def sim3_inverse(T: torch.Tensor) -> torch.Tensor:
    """Inverse of similarity transforms ``T_a_b (..., 4, 4) -> T_b_a``: ``[[R^T / s, -R^T t / s], [0, 1]]``."""
    M = T[..., :3, :3]
    s_sq = (M * M).sum((-1, -2)) / 3.0
    M_inv = M.transpose(-1, -2) / s_sq[..., None, None]
    t_inv = -(M_inv @ T[..., :3, 3:4])[..., 0]
    return _make_homogeneous(M_inv, t_inv)


def sim3_act(T: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Apply ``T_a_b (..., 4, 4)`` (Sim(3)) to points ``(..., N, 3)`` in frame ``b``: ``s R p + t`` in frame ``a``."""
    return se3_act(T, points)


def sim3_adjoint(T: torch.Tensor) -> torch.Tensor:
    """Adjoint ``(..., 7, 7)`` of a Sim(3) matrix: ``T exp(x) T^-1 == exp(Ad_T x)``, ``x = (rho, phi, sigma)``.

    ``Ad_T = [[s R, hat(t) R, -t], [0, R, 0], [0, 0, 1]]``.
    """
    sR = T[..., :3, :3]
    t = T[..., :3, 3]
    s = sim3_scale(T)
    R = sR / s[..., None, None]
    batch = T.shape[:-2]
    Ad = torch.zeros(batch + (7, 7), dtype=T.dtype, device=T.device)
    Ad[..., :3, :3] = sR
    Ad[..., :3, 3:6] = hat(t) @ R
    Ad[..., :3, 6] = -t
    Ad[..., 3:6, 3:6] = R
    Ad[..., 6, 6] = 1.0
    return Ad


def _sim3_ad(xi: torch.Tensor) -> torch.Tensor:
    """Lie-algebra adjoint ``ad_xi (..., 7, 7)`` of ``sim(3)`` with ``ad_x y = vee([X, Y])``."""
    rho, phi, sigma = xi[..., :3], xi[..., 3:6], xi[..., 6]
    batch = xi.shape[:-1]
    ad = torch.zeros(batch + (7, 7), dtype=xi.dtype, device=xi.device)
    phi_hat = hat(phi)
    ad[..., :3, :3] = phi_hat + sigma[..., None, None] * _eye(3, xi)
    ad[..., :3, 3:6] = hat(rho)
    ad[..., :3, 6] = -rho
    ad[..., 3:6, 3:6] = phi_hat
    return ad


def sim3_from_se3(T: torch.Tensor, s: torch.Tensor | float) -> torch.Tensor:
    """SE(3) ``T_a_b (..., 4, 4)`` and scale ``s`` (float or ``(...)``) -> Sim(3) ``[[s R, t], [0, 1]]``.

    The translation (origin of ``b`` in ``a``) is kept; frame ``b``'s unit length becomes ``s``
    units of frame ``a``.
    """
    if isinstance(s, torch.Tensor):
        s = s.to(T.dtype)[..., None, None]  # a Python number is used as is (no host-to-device copy)
    return _make_homogeneous(s * T[..., :3, :3], T[..., :3, 3])


def sim3_to_se3(T: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sim(3) ``(..., 4, 4)`` -> (SE(3) ``[[R, t], [0, 1]]`` ``(..., 4, 4)``, scale ``s (...)``).

    Inverse of :func:`sim3_from_se3`: the translation is kept, the rotation is unscaled.
    """
    s = sim3_scale(T)
    return _make_homogeneous(T[..., :3, :3] / s[..., None, None], T[..., :3, 3]), s


# ---------------------------------------------------------------------------- Jacobians
def act_jacobian_se3(q: torch.Tensor) -> torch.Tensor:
    """``d(exp(delta) q) / d delta`` at ``delta = 0``, ``delta = (rho, phi)``: ``[I, -hat(q)]`` ``(..., 3, 6)``.

    ``q (..., 3)`` is the already transformed point ``T p`` (in the frame ``T`` maps into).
    """
    eye = _eye(3, q).expand(q.shape[:-1] + (3, 3))
    return torch.cat((eye, -hat(q)), dim=-1)


def act_jacobian_sim3(q: torch.Tensor) -> torch.Tensor:
    """``d(exp(delta) q) / d delta`` at 0, ``delta = (rho, phi, sigma)``: ``[I, -hat(q), q]`` ``(..., 3, 7)``.

    ``q (..., 3)`` is the already transformed point ``T p``.
    """
    return torch.cat((act_jacobian_se3(q), q[..., None]), dim=-1)


def _left_jacobian_inverse_approx(ad: torch.Tensor) -> torch.Tensor:
    """``J_l(r)^-1 ~ I - ad_r / 2 + ad_r^2 / 12`` (Bernoulli series; the next term is O(|r|^4))."""
    eye = _eye(ad.shape[-1], ad)
    return eye - 0.5 * ad + (ad @ ad) / 12.0


def se3_relative_residual(T_w_i: torch.Tensor, T_w_j: torch.Tensor, T_i_j_meas: torch.Tensor) -> torch.Tensor:
    """Pose-graph edge residual ``log(T_i_j_meas^-1 @ T_w_i^-1 @ T_w_j)`` ``(..., 6)``.

    ``T_w_i``, ``T_w_j``: SE(3) poses of nodes ``i``, ``j`` in the world; ``T_i_j_meas``: measured
    pose of ``j`` in ``i``. All ``(..., 4, 4)``, batch dims broadcast. Zero when consistent.
    """
    error = se3_inverse(T_i_j_meas) @ se3_inverse(T_w_i) @ T_w_j
    return se3_log(error)


def se3_relative_residual_jacobians(
    T_w_i: torch.Tensor, T_w_j: torch.Tensor, T_i_j_meas: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Residual of :func:`se3_relative_residual` and its Jacobians ``(..., 6, 6)`` wrt left
    perturbations ``T_w_i <- exp(d_i) T_w_i`` and ``T_w_j <- exp(d_j) T_w_j`` (``d`` in world frame).

    With ``A = Ad((T_w_i T_i_j_meas)^-1)``: ``J_i = -J_l(r)^-1 A`` and ``J_j = J_l(r)^-1 A``.
    ``J_l(r)^-1`` is approximated by ``I - ad_r / 2 + ad_r^2 / 12``, exact at ``r = 0`` and with
    an error O(|r|^4) otherwise (the common ``J ~ I`` approximation errs by O(|r|)).

    Returns:
        residual ``(..., 6)``, J_i ``(..., 6, 6)``, J_j ``(..., 6, 6)``.
    """
    T_w_imeas = T_w_i @ T_i_j_meas
    T_imeas_w = se3_inverse(T_w_imeas)
    residual = se3_log(T_imeas_w @ T_w_j)
    A = _left_jacobian_inverse_approx(_se3_ad(residual)) @ se3_adjoint(T_imeas_w)
    return residual, -A, A


def sim3_relative_residual(T_w_i: torch.Tensor, T_w_j: torch.Tensor, T_i_j_meas: torch.Tensor) -> torch.Tensor:
    """Sim(3) pose-graph edge residual ``log(T_i_j_meas^-1 @ T_w_i^-1 @ T_w_j)`` ``(..., 7)``.

    Same frames as :func:`se3_relative_residual`, all poses Sim(3) ``(..., 4, 4)``.
    """
    error = sim3_inverse(T_i_j_meas) @ sim3_inverse(T_w_i) @ T_w_j
    return sim3_log(error)


def sim3_relative_residual_jacobians(
    T_w_i: torch.Tensor, T_w_j: torch.Tensor, T_i_j_meas: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Residual of :func:`sim3_relative_residual` and its Jacobians ``(..., 7, 7)`` wrt left
    perturbations ``T_w_i <- exp(d_i) T_w_i`` and ``T_w_j <- exp(d_j) T_w_j``.

    ``J_i = -J_l(r)^-1 Ad((T_w_i T_i_j_meas)^-1)``, ``J_j = -J_i``, with the same
    ``J_l(r)^-1 ~ I - ad_r / 2 + ad_r^2 / 12`` approximation as the SE(3) version.

    Returns:
        residual ``(..., 7)``, J_i ``(..., 7, 7)``, J_j ``(..., 7, 7)``.
    """
    T_w_imeas = T_w_i @ T_i_j_meas
    T_imeas_w = sim3_inverse(T_w_imeas)
    residual = sim3_log(T_imeas_w @ T_w_j)
    A = _left_jacobian_inverse_approx(_sim3_ad(residual)) @ sim3_adjoint(T_imeas_w)
    return residual, -A, A
