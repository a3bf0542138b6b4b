"""Batched camera-pose solvers in torch: P3P (minimal), projection and Gauss-Newton PnP.

Everything works on arbitrary batches of problems at once, on CPU or CUDA, in the dtype of
the inputs (use float64 for the minimal solver; the callers in :mod:`recon_slam.reloc`
do). Nothing loops over batch elements.

Conventions: poses here are ``T_cam_world`` (world point ``X`` -> camera point
``R X + t``, optical frame, z forward); pixels are OpenCV's (centre of the top-left
pixel at ``(0, 0)``); ``K`` is a (3, 3) pinhole matrix (``fx != fy`` and any principal
point are fine).

P3P follows Grunert's classic formulation (as reviewed by Haralick et al., IJCV 1994):
the ratios of the three unknown ray lengths satisfy a quartic, solved here in closed
form (Ferrari, with complex arithmetic so that no branch depends on the data) and
polished by Newton steps; the pose follows from the two congruent triangles.
"""

from __future__ import annotations

import torch

from recon_slam.geometry.lie import se3_exp

__all__ = [
    "solve_quartic",
    "p3p",
    "p3p4",
    "project",
    "reprojection_errors",
    "refine_pnp",
    "invert_pose",
]

# Smallest positive depth (camera z, metres) of a point that counts as "in front".
MIN_DEPTH = 0.1


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


def _cbrt_real_or_complex(z: torch.Tensor) -> torch.Tensor:
    """Principal complex cube root (z complex)."""
    r = torch.abs(z)
    ang = torch.angle(z)
    return torch.polar(r.pow(1.0 / 3.0), ang / 3.0)


def solve_quartic(coeffs: torch.Tensor, newton_steps: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Real roots of quartics ``a4 x^4 + a3 x^3 + a2 x^2 + a1 x + a0``.

    Args:
        coeffs: (..., 5) real coefficients ``(a4, a3, a2, a1, a0)``; ``a4`` must be nonzero
            (problems with ``|a4|`` tiny relative to the others are reported as no roots).
        newton_steps: Newton iterations polishing each real root.

    Returns:
        roots (..., 4) real parts of the four roots, and valid (..., 4) bool, True where
        the root is real (imaginary part small) and finite.
    """
    dtype = coeffs.dtype
    a4, a3, a2, a1, a0 = coeffs.unbind(-1)
    scale = coeffs.abs().amax(-1).clamp_min(torch.finfo(dtype).tiny)
    ok = a4.abs() > 1e-12 * scale
    a4s = torch.where(ok, a4, torch.ones_like(a4))
    b, c, d, e = a3 / a4s, a2 / a4s, a1 / a4s, a0 / a4s
    # depressed quartic y^4 + p y^2 + q y + r, x = y - b/4
    p = c - 3.0 * b * b / 8.0
    q = d - b * c / 2.0 + b**3 / 8.0
    r = e - b * d / 4.0 + b * b * c / 16.0 - 3.0 * b**4 / 256.0
    # resolvent cubic m^3 + p m^2 + (p^2/4 - r) m - q^2/8 = 0
    ca, cb, cc = p, p * p / 4.0 - r, -q * q / 8.0
    P = cb - ca * ca / 3.0
    Q = 2.0 * ca**3 / 27.0 - ca * cb / 3.0 + cc
    cplx = torch.complex128 if dtype == torch.float64 else torch.complex64
    Pc, Qc = P.to(cplx), Q.to(cplx)
    disc = torch.sqrt(Qc * Qc / 4.0 + Pc**3 / 27.0)
    w1, w2 = -Qc / 2.0 + disc, -Qc / 2.0 - disc
    w = torch.where(torch.abs(w1) >= torch.abs(w2), w1, w2)
    C = _cbrt_real_or_complex(w)
    omega = torch.polar(
        torch.ones((), dtype=dtype, device=coeffs.device),
        torch.full((), 2.0 * torch.pi / 3.0, dtype=dtype, device=coeffs.device),
    )
    best = None
    best_abs = None
    Cs = [C, C * omega, C * omega * omega]
    for Ck in Cs:
        safe = torch.where(torch.abs(Ck) > 0, Ck, torch.ones_like(Ck))
        t = torch.where(torch.abs(Ck) > 0, Ck - Pc / (3.0 * safe), torch.zeros_like(Ck))
        m = t - ca.to(cplx) / 3.0
        if best is None:
            best, best_abs = m, torch.abs(m)
        else:
            take = torch.abs(m) > best_abs
            best = torch.where(take, m, best)
            best_abs = torch.where(take, torch.abs(m), best_abs)
    m = best
    m_safe = torch.where(torch.abs(m) > 0, m, torch.ones_like(m))
    s = torch.sqrt(2.0 * m_safe)
    pc, qc = p.to(cplx), q.to(cplx)
    roots = []
    for sign in (1.0, -1.0):
        # y^2 - sign*s*y + (p/2 + m + sign*s*q/(4m)) = 0
        B = -sign * s
        Cq = pc / 2.0 + m_safe + sign * s * qc / (4.0 * m_safe)
        dq = torch.sqrt(B * B - 4.0 * Cq)
        roots.append((-B + dq) / 2.0)
        roots.append((-B - dq) / 2.0)
    y = torch.stack(roots, -1)
    x = y - (b / 4.0).to(cplx).unsqueeze(-1)
    xr = x.real
    mag = 1.0 + torch.abs(x)
    real = torch.abs(x.imag) <= 1e-3 * mag
    # Newton polishing on the original polynomial
    A = [a.unsqueeze(-1) for a in (a4, a3, a2, a1, a0)]
    for _ in range(newton_steps):
        f = (((A[0] * xr + A[1]) * xr + A[2]) * xr + A[3]) * xr + A[4]
        df = ((4.0 * A[0] * xr + 3.0 * A[1]) * xr + 2.0 * A[2]) * xr + A[3]
        step = f / torch.where(df.abs() > 0, df, torch.ones_like(df))
        xr = torch.where(df.abs() > 0, xr - step, xr)
    valid = real & torch.isfinite(xr) & ok.unsqueeze(-1) & (torch.abs(m) > 0).unsqueeze(-1)
    return torch.where(valid, xr, torch.zeros_like(xr)), valid


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
        (False for complex roots, negative ray lengths or degenerate triangles).
    """
    j1, j2, j3 = bearings.unbind(-2)
    X1, X2, X3 = points.unbind(-2)
    a2 = (X2 - X3).square().sum(-1)
    b2 = (X1 - X3).square().sum(-1)
    c2 = (X1 - X2).square().sum(-1)
    ca = (j2 * j3).sum(-1)
    cb = (j1 * j3).sum(-1)
    cg = (j1 * j2).sum(-1)
    b2s = b2.clamp_min(1e-18)
    amcb = (a2 - c2) / b2s
    apcb = (a2 + c2) / b2s
    bmcb = (b2 - c2) / b2s
    bmab = (b2 - a2) / b2s
    A4 = (amcb - 1.0) ** 2 - 4.0 * c2 / b2s * ca**2
    A3 = 4.0 * (amcb * (1.0 - amcb) * cb - (1.0 - apcb) * ca * cg + 2.0 * c2 / b2s * ca**2 * cb)
    A2 = 2.0 * (amcb**2 - 1.0 + 2.0 * amcb**2 * cb**2 + 2.0 * bmcb * ca**2
                - 4.0 * apcb * ca * cb * cg + 2.0 * bmab * cg**2)
    A1 = 4.0 * (-amcb * (1.0 + amcb) * cb + 2.0 * a2 / b2s * cg**2 * cb - (1.0 - apcb) * ca * cg)
    A0 = (1.0 + amcb) ** 2 - 4.0 * a2 / b2s * cg**2
    v, valid = solve_quartic(torch.stack((A4, A3, A2, A1, A0), -1))
    ca_, cb_, cg_, amcb_, c2_ = (x.unsqueeze(-1) for x in (ca, cb, cg, amcb, c2))
    den = 2.0 * (cg_ - v * ca_)
    num = (amcb_ - 1.0) * v * v - 2.0 * amcb_ * cb_ * v + 1.0 + amcb_
    den_ok = den.abs() > 1e-12
    u = num / torch.where(den_ok, den, torch.ones_like(den))
    s1sq = c2_ / (1.0 + u * u - 2.0 * u * cg_)
    valid = valid & den_ok & (v > 0) & (u > 0) & (s1sq > 0) & torch.isfinite(s1sq)
    s1 = torch.sqrt(torch.where(valid, s1sq, torch.ones_like(s1sq)))
    s2, s3 = u * s1, v * s1
    P1 = s1.unsqueeze(-1) * j1.unsqueeze(-2)
    P2 = s2.unsqueeze(-1) * j2.unsqueeze(-2)
    P3 = s3.unsqueeze(-1) * j3.unsqueeze(-2)
    Fc = _frame(P1, P2, P3)  # (..., 4, 3, 3)
    Fw = _frame(X1, X2, X3).unsqueeze(-3)  # (..., 1, 3, 3)
    R = Fc @ Fw.transpose(-1, -2)
    t = P1 - (R @ X1.unsqueeze(-2).unsqueeze(-1)).squeeze(-1)
    valid = valid & torch.isfinite(R).all(-1).all(-1) & torch.isfinite(t).all(-1)
    eye = torch.eye(3, dtype=R.dtype, device=R.device)
    R = torch.where(valid[..., None, None], R, eye)
    t = torch.where(valid[..., None], t, torch.zeros_like(t))
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


def p3p4(K: torch.Tensor, uv: torch.Tensor, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Minimal-set poses from 4 correspondences: P3P on the first 3, the 4th picks the root.

    Args:
        K: (3, 3) intrinsics.
        uv: (..., 4, 2) pixels; X: (..., 4, 3) world points.

    Returns:
        R (..., 3, 3), t (..., 3) of ``T_cam_world``, and err (...,) the largest
        reprojection error of the 4 points (inf where no root is valid).
    """
    Kinv = torch.linalg.inv(K)
    rays = torch.cat((uv, torch.ones_like(uv[..., :1])), -1) @ Kinv.transpose(-1, -2)
    rays = rays / rays.norm(dim=-1, keepdim=True)
    R, t, valid = p3p(rays[..., :3, :], X[..., :3, :])  # (..., 4, ...)
    e = reprojection_errors(K, R, t, X.unsqueeze(-3), uv.unsqueeze(-3), max_error=float("inf"))  # (..., 4, 4)
    e4 = torch.where(valid, e[..., 3], torch.full_like(e[..., 3], float("inf")))
    best = e4.argmin(-1)
    idx = best[..., None, None, None].expand(*best.shape, 1, 3, 3)
    Rb = torch.gather(R, -3, idx).squeeze(-3)
    tb = torch.gather(t, -2, best[..., None, None].expand(*best.shape, 1, 3)).squeeze(-2)
    emax = torch.gather(e.amax(-1), -1, best.unsqueeze(-1)).squeeze(-1)
    emax = torch.where(torch.gather(valid, -1, best.unsqueeze(-1)).squeeze(-1), emax, torch.full_like(emax, float("inf")))
    return Rb, tb, emax


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
    """Iterative Gauss-Newton PnP on SE(3) over the inliers of each pose.

    Every iteration selects the points reprojecting within ``threshold`` pixels (in front
    of the camera) and takes one damped Gauss-Newton step on their squared reprojection
    error (left perturbation ``T <- exp(delta) T``); the inlier set is re-selected at each
    step, so it can grow as the pose improves.

    Args:
        K: (3, 3) intrinsics.
        R: (B, 3, 3), t: (B, 3) initial ``T_cam_world``.
        X: (N, 3) world points; uv: (N, 2) pixels.
        threshold: inlier threshold in pixels.
        iterations: Gauss-Newton steps.
        weights: optional (N,) per-point weights (e.g. 0 for invalid predictions).

    Returns:
        R (B, 3, 3), t (B, 3) refined, and inliers (B,) final inlier counts.
    """
    dtype = R.dtype
    fx, fy = K[0, 0], K[1, 1]
    T = torch.zeros(R.shape[0], 4, 4, dtype=dtype, device=R.device)
    T[:, :3, :3], T[:, :3, 3], T[:, 3, 3] = R, t, 1.0
    eye6 = torch.eye(6, dtype=dtype, device=R.device)
    w_pts = torch.ones(X.shape[0], dtype=dtype, device=X.device) if weights is None else weights.to(dtype)
    for _ in range(iterations):
        Xc = X @ T[:, :3, :3].transpose(-1, -2) + T[:, None, :3, 3]  # (B, N, 3)
        z = Xc[..., 2]
        zs = torch.where(z > MIN_DEPTH, z, torch.ones_like(z))
        x, y = Xc[..., 0] / zs, Xc[..., 1] / zs
        ru = fx * x + K[0, 2] - uv[:, 0]
        rv = fy * y + K[1, 2] - uv[:, 1]
        e = torch.sqrt(ru * ru + rv * rv)
        w = ((e < threshold) & (z > MIN_DEPTH)).to(dtype) * w_pts
        iz = 1.0 / zs
        # d(u, v)/d(Xc) and d(Xc)/d(delta) = [I, -[Xc]x]
        zero = torch.zeros_like(x)
        Ju = torch.stack((fx * iz, zero, -fx * x * iz, -fx * x * y, fx * (1 + x * x), -fx * y), -1)
        Jv = torch.stack((zero, fy * iz, -fy * y * iz, -fy * (1 + y * y), fy * x * y, fy * x), -1)
        H = torch.einsum("bn,bni,bnj->bij", w, Ju, Ju) + torch.einsum("bn,bni,bnj->bij", w, Jv, Jv)
        g = torch.einsum("bn,bni->bi", w * ru, Ju) + torch.einsum("bn,bni->bi", w * rv, Jv)
        lam = 1e-6 * H.diagonal(dim1=-2, dim2=-1).amax(-1).clamp_min(1e-9)
        delta = -torch.linalg.solve(H + lam[:, None, None] * eye6, g.unsqueeze(-1)).squeeze(-1)
        enough = w.sum(-1) >= 6
        delta = torch.where(enough[:, None] & torch.isfinite(delta).all(-1, keepdim=True), delta, torch.zeros_like(delta))
        T = se3_exp(delta) @ T
    e = reprojection_errors(K, T[:, :3, :3], T[:, :3, 3], X, uv)
    inliers = ((e < threshold).to(dtype) * w_pts).sum(-1)
    return T[:, :3, :3], T[:, :3, 3], inliers
