"""Batched camera-pose solvers in torch: P3P (minimal), projection and Gauss-Newton PnP.

Everything works on arbitrary batches of problems at once, on CPU or CUDA, in the dtype of
the inputs (use float64 for the minimal solver; the callers in :mod:`recon_slam.reloc`
do). Nothing loops over batch elements, and nothing reads device values back to the host
(no ``.item()``, no boolean indexing, no ``linalg`` error checks), so a whole RANSAC round
runs as a fixed sequence of kernels; only the functions that take ``K`` as a tensor read
its four numbers once (keep ``K`` on the CPU to make that free).

Conventions: poses here are ``T_cam_world`` (world point ``X`` -> camera point
``R X + t``, optical frame, z forward); pixels are OpenCV's (centre of the top-left
pixel at ``(0, 0)``); ``K`` is a (3, 3) pinhole matrix (``fx != fy`` and any principal
point are fine). Internally, observations are normalised image coordinates
``xn = ((u - cx) / fx, (v - cy) / fy)`` and errors are converted back to pixels with
``f2 = (fx, fy)``.

P3P follows Grunert's classic formulation (as reviewed by Haralick et al., IJCV 1994):
the ratios of the three unknown ray lengths satisfy a quartic, solved here in closed
form in real arithmetic (Ferrari: the largest root of the resolvent cubic, taken with a
data-independent choice between Cardano's and the trigonometric formula, splits the
quartic into two real quadratics) and polished by Newton steps; the pose follows from
the two congruent triangles.
"""

from __future__ import annotations

import torch

__all__ = [
    "solve_quartic",
    "p3p",
    "p3p4",
    "p3p4_normalised",
    "project",
    "reprojection_errors",
    "squared_errors",
    "refine_pnp",
    "refine_normalised",
    "invert_pose",
    "intrinsics",
    "focal_pair",
    "normalise_pixels",
]

# Smallest positive depth (camera z, metres) of a point that counts as "in front".
MIN_DEPTH = 0.1

_CONSTANTS: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def _constants(device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cached constant matrices on ``device`` (built once per device and dtype).

    Returns:
        C (8, 12), c0 (12,): the Gauss-Newton Jacobian ``J (2, 6)`` (flattened) of the
        normalised projection is ``[iz, x iz, y iz, x y, x^2, y^2, x, y] @ C + c0``;
        G (3, 9): ``hat(v)`` (flattened 3x3 cross-product matrix) is ``v @ G``.
    """
    key = (str(device), dtype)
    if key not in _CONSTANTS:
        C = torch.zeros(8, 12, dtype=torch.float64)
        c0 = torch.zeros(12, dtype=torch.float64)
        # row u: [iz, 0, -x iz, -x y, 1 + x^2, -y]
        C[0, 0], C[1, 2], C[3, 3], C[4, 4], C[7, 5] = 1, -1, -1, 1, -1
        c0[4] = 1
        # row v: [0, iz, -y iz, -(1 + y^2), x y, x]
        C[0, 7], C[2, 8], C[5, 9], C[3, 10], C[6, 11] = 1, -1, -1, 1, 1
        c0[9] = -1
        G = torch.zeros(3, 9, dtype=torch.float64)
        G[0, 5], G[0, 7], G[1, 2], G[1, 6], G[2, 1], G[2, 3] = -1, 1, 1, -1, -1, 1
        _CONSTANTS[key] = tuple(x.to(device=device, dtype=dtype) for x in (C, c0, G))  # type: ignore[assignment]
    return _CONSTANTS[key]


def intrinsics(K: torch.Tensor) -> tuple[float, float, float, float]:
    """``(fx, fy, cx, cy)`` of a (3, 3) ``K`` as Python floats (a host read if ``K`` is on a GPU)."""
    k = K.detach().to(device="cpu", dtype=torch.float64).reshape(-1).tolist()
    return k[0], k[4], k[2], k[5]


def focal_pair(fx: float, fy: float, like: torch.Tensor) -> torch.Tensor:
    """(2,) tensor ``(fx, fy)`` on ``like``'s device, built with fills (no host-to-device copy)."""
    full = lambda v: torch.full((1,), float(v), dtype=like.dtype, device=like.device)  # noqa: E731
    return torch.cat((full(fx), full(fy)))  # (item assignment would copy from the host)


def normalise_pixels(
    uv: torch.Tensor, fx: float, fy: float, cx: float, cy: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixels (..., 2) -> normalised coordinates ``xn`` (..., 2) and unit bearing rays (..., 3)
    (camera frame, z forward)."""
    xn = torch.stack(((uv[..., 0] - cx) / fx, (uv[..., 1] - cy) / fy), -1)
    rays = torch.cat((xn, torch.ones_like(xn[..., :1])), -1)
    return xn, rays / rays.norm(dim=-1, keepdim=True)


def invert_pose(T: torch.Tensor) -> torch.Tensor:
    """Inverse of rigid transforms (..., 4, 4)."""
    R = T[..., :3, :3]
    t = T[..., :3, 3:]
    Ri = R.transpose(-1, -2)
    out = torch.zeros_like(T)
    out[..., :3, :3] = Ri
    out[..., :3, 3:] = -Ri @ t
    out[..., 3, 3] = 1.0
    return out


def solve_quartic(coeffs: torch.Tensor, newton_steps: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Real roots of quartics ``a4 x^4 + a3 x^3 + a2 x^2 + a1 x + a0``.

    Ferrari's method in real arithmetic: with the depressed quartic
    ``y^4 + p y^2 + q y + r`` and ``m`` the largest real root of the resolvent cubic
    ``m^3 + p m^2 + (p^2/4 - r) m - q^2/8`` (positive when ``q != 0``), the quartic is
    the product of ``y^2 -+ s y + (p/2 + m +- s q / (4 m))`` with ``s = sqrt(2 m)``.

    Args:
        coeffs: (..., 5) real coefficients ``(a4, a3, a2, a1, a0)``; ``a4`` must be nonzero
            (problems with ``|a4|`` tiny relative to the others are reported as no roots).
        newton_steps: Newton iterations polishing each real root.

    Returns:
        roots (..., 4) real parts of the four roots, and valid (..., 4) bool, True where
        the root is real (imaginary part below ``1e-3 (1 + |x|)``) and finite.
    """
    dtype = coeffs.dtype
    a4 = coeffs[..., 0]
    scale = coeffs.abs().amax(-1).clamp_min(torch.finfo(dtype).tiny)
    ok = a4.abs() > 1e-12 * scale
    n = coeffs[..., 1:] / torch.where(ok, a4, 1.0).unsqueeze(-1)
    b, c, d, e = n.unbind(-1)
    bb = b * b
    # depressed quartic y^4 + p y^2 + q y + r, x = y - b/4
    p = c - 0.375 * bb
    q = d - 0.5 * b * c + 0.125 * b * bb
    r = e - 0.25 * b * d + 0.0625 * bb * c - (3.0 / 256.0) * bb * bb
    # resolvent cubic m^3 + ca m^2 + cb m + cc, depressed: m = tau - ca/3, tau^3 + P tau + Q
    ca, cb, cc = p, 0.25 * p * p - r, -0.125 * q * q
    P = cb - ca * ca / 3.0
    Q = (2.0 / 27.0) * ca * ca * ca - ca * cb / 3.0 + cc
    D = 0.25 * Q * Q + P * P * P / 27.0
    # D > 0: one real root (Cardano, larger-magnitude cube root for accuracy)
    w = -0.5 * Q - torch.copysign(D.clamp_min(0.0).sqrt(), Q)
    u = torch.copysign(w.abs().pow(1.0 / 3.0), w)
    u_ok = u != 0
    tau1 = torch.where(u_ok, u - P / (3.0 * torch.where(u_ok, u, 1.0)), 0.0)
    # D <= 0: three real roots, the largest by the trigonometric formula
    rt = (-P.clamp_max(0.0) / 3.0).sqrt()
    rt3 = rt * rt * rt
    arg = (-0.5 * Q / torch.where(rt3 > 0, rt3, 1.0)).clamp(-1.0, 1.0)
    tau3 = 2.0 * rt * torch.cos(torch.acos(arg) / 3.0)
    m = torch.where(D > 0, tau1, tau3) - ca / 3.0
    ca2 = 2.0 * ca
    for _ in range(2):  # Newton polishing of the resolvent root
        f = torch.addcmul(cc, torch.addcmul(cb, m + ca, m), m)
        df = torch.addcmul(cb, 3.0 * m + ca2, m)
        m = m - torch.where(df != 0, f / df, 0.0)
    m_ok = m > 0
    m_safe = torch.where(m_ok, m, 1.0)
    s = (2.0 * m_safe).sqrt()
    h = s * q / (4.0 * m_safe)
    base = 0.5 * p + m_safe
    # y^2 - s y + (base + h) = 0 and y^2 + s y + (base - h) = 0: y = (sB +- sqrt(sB^2 - 4 C)) / 2
    sB = torch.stack((s, -s), -1)
    disc = sB * sB - 4.0 * torch.stack((base + h, base - h), -1)
    root = disc.clamp_min(0.0).sqrt()
    y = 0.5 * torch.cat((sB + root, sB - root), -1)
    im = 0.5 * (-disc).clamp_min(0.0).sqrt()
    imag = torch.cat((im, im), -1)
    xr = y - 0.25 * b.unsqueeze(-1)
    real = imag <= 1e-3 * (1.0 + xr.abs())
    # Newton polishing on the original polynomial (Horner with fused multiply-adds)
    A = [a.unsqueeze(-1) for a in coeffs.unbind(-1)]
    dA = [4.0 * A[0], 3.0 * A[1], 2.0 * A[2]]
    for _ in range(newton_steps):
        f = torch.addcmul(A[4], torch.addcmul(A[3], torch.addcmul(A[2], torch.addcmul(A[1], A[0], xr), xr), xr), xr)
        df = torch.addcmul(A[3], torch.addcmul(dA[2], torch.addcmul(dA[1], dA[0], xr), xr), xr)
        xr = xr - torch.where(df != 0, f / df, 0.0)
    valid = real & torch.isfinite(xr) & (ok & m_ok).unsqueeze(-1)
    return torch.where(valid, xr, 0.0), valid


def _frame(p1: torch.Tensor, p2: torch.Tensor, p3: torch.Tensor) -> torch.Tensor:
    """Orthonormal frame (..., 3, 3) (columns e1, e2, e3) of a triangle."""
    e1 = p2 - p1
    e1 = e1 / e1.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    n = torch.linalg.cross(e1, p3 - p1)
    e3 = n / n.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    e2 = torch.linalg.cross(e3, e1)
    return torch.stack((e1, e2, e3), dim=-1)


def p3p(bearings: torch.Tensor, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All poses (up to 4) that see three world points along three rays.

    Args:
        bearings: (..., 3, 3) unit rays in the camera frame (row ``i`` for point ``i``).
        points: (..., 3, 3) world points (row ``i``).

    Returns:
        R (..., 4, 3, 3), t (..., 4, 3) of ``T_cam_world`` candidates and valid (..., 4)
        (False for complex roots, negative ray lengths or degenerate triangles; those
        candidates are the identity).
    """
    j1, j2, j3 = bearings.unbind(-2)
    X1, X2, X3 = points.unbind(-2)
    a2 = (X2 - X3).square().sum(-1)
    b2 = (X1 - X3).square().sum(-1)
    c2 = (X1 - X2).square().sum(-1)
    ca = (j2 * j3).sum(-1)
    cb = (j1 * j3).sum(-1)
    cg = (j1 * j2).sum(-1)
    ib2 = 1.0 / b2.clamp_min(1e-18)
    amcb = (a2 - c2) * ib2
    apcb = (a2 + c2) * ib2
    bmcb = (b2 - c2) * ib2
    bmab = (b2 - a2) * ib2
    c2b = c2 * ib2
    a2b = a2 * ib2
    ca2, cg2, cacg = ca * ca, cg * cg, ca * cg
    A4 = (amcb - 1.0) ** 2 - 4.0 * c2b * ca2
    A3 = 4.0 * (amcb * (1.0 - amcb) * cb - (1.0 - apcb) * cacg + 2.0 * c2b * ca2 * cb)
    A2 = 2.0 * (amcb**2 - 1.0 + 2.0 * amcb**2 * cb**2 + 2.0 * bmcb * ca2
                - 4.0 * apcb * cacg * cb + 2.0 * bmab * cg2)
    A1 = 4.0 * (-amcb * (1.0 + amcb) * cb + 2.0 * a2b * cg2 * cb - (1.0 - apcb) * cacg)
    A0 = (1.0 + amcb) ** 2 - 4.0 * a2b * cg2
    v, valid = solve_quartic(torch.stack((A4, A3, A2, A1, A0), -1))
    ca_, cb_, cg_, amcb_, c2_ = (x.unsqueeze(-1) for x in (ca, cb, cg, amcb, c2))
    den = 2.0 * (cg_ - v * ca_)
    num = ((amcb_ - 1.0) * v - 2.0 * amcb_ * cb_) * v + 1.0 + amcb_
    den_ok = den.abs() > 1e-12
    u = num / torch.where(den_ok, den, 1.0)
    s1sq = c2_ / ((u - 2.0 * cg_) * u + 1.0)
    valid = valid & den_ok & (v > 0) & (u > 0) & (s1sq > 0) & torch.isfinite(s1sq)
    s1 = torch.sqrt(torch.where(valid, s1sq, 1.0))
    # points in the camera frame: (..., 4 roots, 3 points, 3)
    Pc = torch.stack((s1, u * s1, v * s1), -1).unsqueeze(-1) * bearings.unsqueeze(-3)
    P1, P2, P3 = Pc.unbind(-2)
    Fc = _frame(P1, P2, P3)  # (..., 4, 3, 3)
    Fw = _frame(X1, X2, X3).unsqueeze(-3)  # (..., 1, 3, 3)
    R = Fc @ Fw.transpose(-1, -2)
    t = P1 - (R @ X1.unsqueeze(-2).unsqueeze(-1)).squeeze(-1)
    valid = valid & torch.isfinite(R).flatten(-2).all(-1) & torch.isfinite(t).all(-1)
    eye = torch.eye(3, dtype=R.dtype, device=R.device)
    R = torch.where(valid[..., None, None], R, eye)
    t = torch.where(valid[..., None], t, 0.0)
    return R, t, valid


def project(K: torch.Tensor, R: torch.Tensor, t: torch.Tensor, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Project world points with ``T_cam_world = [R | t]``.

    Args:
        K: (3, 3) or (..., 3, 3) intrinsics.
        R: (..., 3, 3), t: (..., 3) pose(s).
        X: (..., N, 3) world points (broadcast against the pose batch).

    Returns:
        uv (..., N, 2) pixels and z (..., N) camera depths.
    """
    Xc = X @ R.transpose(-1, -2) + t.unsqueeze(-2)
    z = Xc[..., 2]
    zs = torch.where(z.abs() > 1e-9, z, torch.full_like(z, 1e-9))
    fx, fy = K[..., 0, 0].unsqueeze(-1), K[..., 1, 1].unsqueeze(-1)
    cx, cy = K[..., 0, 2].unsqueeze(-1), K[..., 1, 2].unsqueeze(-1)
    u = fx * Xc[..., 0] / zs + cx
    v = fy * Xc[..., 1] / zs + cy
    return torch.stack((u, v), -1), z


def reprojection_errors(
    K: torch.Tensor, R: torch.Tensor, t: torch.Tensor, X: torch.Tensor, uv: torch.Tensor, max_error: float = 100.0
) -> torch.Tensor:
    """Pixel distance between projected ``X`` (..., N, 3) and observed ``uv`` (..., N, 2).

    Points closer than :data:`MIN_DEPTH` in front of the camera get ``max_error``; all
    errors are clamped to ``max_error``. Returns (..., N).
    """
    proj, z = project(K, R, t, X)
    e = (proj - uv).norm(dim=-1)
    e = torch.where(z > MIN_DEPTH, e, torch.full_like(e, max_error))
    return e.clamp(max=max_error)


def squared_errors(Xc: torch.Tensor, xn: torch.Tensor, f2: torch.Tensor) -> torch.Tensor:
    """Squared pixel errors (...) of camera points Xc (..., 3) against normalised xn (..., 2).

    ``f2`` is the (2,) tensor ``(fx, fy)``; points nearer than :data:`MIN_DEPTH` (or behind
    the camera) get ``inf``.
    """
    z = Xc[..., 2]
    front = z > MIN_DEPTH
    d = (Xc[..., :2] / torch.where(front, z, 1.0).unsqueeze(-1) - xn) * f2
    return torch.where(front, d.square().sum(-1), float("inf"))


def p3p4_normalised(
    rays: torch.Tensor, X: torch.Tensor, xn: torch.Tensor, f2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`p3p4` on unit rays (..., 4, 3), world points (..., 4, 3) and normalised
    observations (..., 4, 2), with ``f2 = (fx, fy)`` (2,) to measure errors in pixels.

    Returns R (..., 3, 3), t (..., 3) and the largest pixel error (...,) of the 4 points
    (inf where no root is valid).
    """
    R, t, valid = p3p(rays[..., :3, :], X[..., :3, :])  # (..., 4, 3, 3), (..., 4, 3), (..., 4)
    Xc = X.unsqueeze(-3) @ R.transpose(-1, -2) + t.unsqueeze(-2)  # (..., 4 roots, 4 points, 3)
    e2 = squared_errors(Xc, xn.unsqueeze(-3), f2)  # (..., 4, 4)
    e4 = torch.where(valid, e2[..., 3], float("inf"))
    best = e4.argmin(-1, keepdim=True)  # (..., 1)
    Rb = torch.take_along_dim(R, best[..., None, None], dim=-3).squeeze(-3)
    tb = torch.take_along_dim(t, best[..., None], dim=-2).squeeze(-2)
    emax = torch.take_along_dim(e2.amax(-1), best, dim=-1).squeeze(-1)
    vb = torch.take_along_dim(valid, best, dim=-1).squeeze(-1)
    return Rb, tb, torch.where(vb, emax.sqrt(), float("inf"))


def p3p4(K: torch.Tensor, uv: torch.Tensor, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Minimal-set poses from 4 correspondences: P3P on the first 3, the 4th picks the root.

    Args:
        K: (3, 3) intrinsics.
        uv: (..., 4, 2) pixels; X: (..., 4, 3) world points.

    Returns:
        R (..., 3, 3), t (..., 3) of ``T_cam_world``, and err (...,) the largest
        reprojection error of the 4 points (inf where no root is valid).
    """
    fx, fy, cx, cy = intrinsics(K)
    xn, rays = normalise_pixels(uv, fx, fy, cx, cy)
    return p3p4_normalised(rays, X, xn, focal_pair(fx, fy, X))


def refine_normalised(
    T: torch.Tensor,
    Xh: torch.Tensor,
    xn: torch.Tensor,
    f2: torch.Tensor,
    threshold: float,
    iterations: int,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gauss-Newton PnP of a batch of poses on normalised observations (see :func:`refine_pnp`).

    Args:
        T: (B, 3, 4) ``[R | t]`` initial ``T_cam_world``.
        Xh: (N, 4) homogeneous world points ``(X, 1)``; xn: (N, 2) normalised
            observations; f2: (2,) ``(fx, fy)``.
        threshold: inlier threshold in pixels; iterations: Gauss-Newton steps.
        weights: optional (N,) per-point weights (0 ignores a point).

    Returns:
        T (B, 3, 4) refined and e2 (B, N) squared pixel errors at the refined poses (inf
        for points nearer than :data:`MIN_DEPTH`).

    Each step re-selects the inliers (error below ``threshold``, in front), solves the
    damped normal equations ``(J^T W J + lambda) delta = -J^T W r`` of the pixel residuals
    for ``delta = (rho, phi)`` (left perturbation ``Xc -> Xc + rho + phi x Xc``), and
    updates ``R <- R(phi) R``, ``t <- R(phi) t + rho`` with ``R(phi)`` the rotation of the
    quaternion ``(1, phi / 2)`` (exact to first order, always orthonormal). Steps with
    fewer than 6 inliers or a singular system are skipped.
    """
    B, N = T.shape[0], Xh.shape[0]
    dtype, device = T.dtype, T.device
    C, c0, G = _constants(device, dtype)
    eye3 = torch.eye(3, dtype=dtype, device=device)
    # adds a vector to the translation column (built with kernels: no host copy, CUDA-graph safe)
    tcol = (torch.arange(4, device=device) == 3).to(dtype).view(1, 1, 4)
    thr2 = float(threshold) ** 2
    T = T.clone()
    for _ in range(iterations):
        Xc = Xh @ T.transpose(-1, -2)  # (B, N, 3)
        z = Xc[..., 2]
        front = z > MIN_DEPTH
        iz = torch.where(front, z, 1.0).reciprocal()
        p = Xc[..., :2] * iz.unsqueeze(-1)
        r = (p - xn) * f2  # (B, N, 2) pixel residuals
        w = ((r.square().sum(-1) < thr2) & front).to(dtype)
        if weights is not None:
            w = w * weights
        x, y = p.unbind(-1)
        comps = torch.stack((iz, x * iz, y * iz, x * y, x * x, y * y, x, y), -1)
        J = torch.addmm(c0, comps.view(-1, 8), C).view(B, N, 2, 6) * f2.unsqueeze(-1)
        A = torch.cat((J, r.unsqueeze(-1)), -1)  # (B, N, 2, 7): [J | r] per residual row
        M = (A * w[:, :, None, None]).view(B, 2 * N, 7).transpose(1, 2) @ A.view(B, 2 * N, 7)  # (B, 7, 7)
        # damping (in place on the fresh M): H + 1e-6 diag(H) + 1e-9 I
        M.diagonal(dim1=-2, dim2=-1)[:, :6].mul_(1.0 + 1e-6).add_(1e-9)
        # Cholesky and two triangular solves: unlike linalg.solve(_ex), no host reads inside
        L, info = torch.linalg.cholesky_ex(M[:, :6, :6])
        y = torch.linalg.solve_triangular(L, M[:, :6, 6:], upper=False)
        delta = torch.linalg.solve_triangular(L.transpose(-1, -2), y, upper=True).squeeze(-1)
        good = (info == 0) & (w.sum(-1) >= 6)
        delta = torch.where(good.unsqueeze(-1), delta, 0.0).neg_()
        v = 0.5 * delta[:, 3:]
        Kv = (v @ G).view(B, 3, 3)
        Rd = torch.baddbmm(Kv, Kv, Kv).mul_((2.0 / (1.0 + v.square().sum(-1)))[:, None, None]).add_(eye3)
        T = torch.baddbmm(delta[:, :3, None] * tcol, Rd, T)
    e2 = squared_errors(Xh @ T.transpose(-1, -2), xn, f2)
    return T, e2


def refine_pnp(
    K: torch.Tensor,
    R: torch.Tensor,
    t: torch.Tensor,
    X: torch.Tensor,
    uv: torch.Tensor,
    threshold: float,
    iterations: int = 10,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Iterative Gauss-Newton PnP over the inliers of each pose.

    Every iteration selects the points reprojecting within ``threshold`` pixels (in front
    of the camera) and takes one damped Gauss-Newton step on their squared reprojection
    error (left perturbation); the inlier set is re-selected at each step, so it can grow
    as the pose improves (see :func:`refine_normalised`).

    Args:
        K: (3, 3) intrinsics.
        R: (B, 3, 3), t: (B, 3) initial ``T_cam_world``.
        X: (N, 3) world points; uv: (N, 2) pixels.
        threshold: inlier threshold in pixels.
        iterations: Gauss-Newton steps.
        weights: optional (N,) per-point weights (e.g. 0 for invalid predictions).

    Returns:
        R (B, 3, 3), t (B, 3) refined, and inliers (B,) final (weighted) inlier counts.
    """
    dtype = R.dtype
    fx, fy, cx, cy = intrinsics(K)
    xn, _ = normalise_pixels(uv.to(dtype), fx, fy, cx, cy)
    X = X.to(dtype)
    Xh = torch.cat((X, torch.ones_like(X[:, :1])), -1)
    w = None if weights is None else weights.to(dtype)
    T = torch.cat((R, t.unsqueeze(-1)), -1)
    T, e2 = refine_normalised(T, Xh, xn, focal_pair(fx, fy, X), threshold, iterations, w)
    inl = (e2 < float(threshold) ** 2).to(dtype)
    if w is not None:
        inl = inl * w
    return T[:, :, :3], T[:, :, 3], inl.sum(-1)
