"""Device-resident monocular tracking step (``mono.device_loop``): one host read per frame.

:meth:`~recon_slam.frontend.mono.MonoFrontend.track` on the host path matches a (frame,
keyframe) pair with :func:`~recon_slam.frontend.mono.match_pair` and solves the Sim(3) with
:func:`~recon_slam.frontend.mono.solve_sim3`; both read the device many times per frame
(early exits of the ray matcher, boolean compaction in the descriptor refinement,
``torch.unique``, one read per Gauss-Newton iteration, the median scale). This module
computes the same quantities with fixed shapes and every decision on the device:

* **matching** (:func:`ray_match_fixed`, :func:`refine_descriptors_fixed`): the per-point
  ray-space Levenberg-Marquardt with a fixed iteration count (converged points freeze, as
  on the host), the dilated-window descriptor refinement of every point (inactive points
  keep their pixel through ``torch.where``; descriptors optionally float16 for the gather),
  the validity tests as masks and the unique-cell count by a scatter into a fixed-size
  occupancy buffer;
* **Sim(3) solve** (:func:`solve_sim3_chains`): Levenberg-Marquardt with the residuals,
  weights, damping rule and stopping tests of ``solve_sim3``, run for a fixed number of
  iterations; a chain that meets a stopping test freezes (``torch.where``), so a solve
  that converges within the iteration budget gives the host's pose. The 7x7 damped system
  is solved by an unrolled Gauss-Jordan elimination (:func:`damped_solve7`), the pose
  updated by the host's left retraction (:func:`sim3_retract`). Two chains are solved as
  one batch: from the scale-corrected prior pose (median distances, on the device) and
  from the closed-form weighted Umeyama pose (:func:`umeyama_torch`, Horn's quaternion by
  repeated squaring, no SVD); the host's fallback rule (Umeyama chain when the prior chain
  fails or has fewer than half inliers and the Umeyama chain is better) picks one on the
  device;
* **one read** at the end (:class:`StepResult`): pose, 7x7 information, solve counts,
  match counts, cost, inlier fraction, frame validity count (and optional extras).

:class:`StepGraph` replays the whole step as one CUDA graph per shape key (static input
buffers, :func:`run_step`), with a fallback to the eager step when a capture fails
(logged once). The eager step runs on any device (tests run it on the CPU).

Frames: ``X1`` the frame's points (frame camera), ``X2`` the keyframe's pixels predicted in
the same pass (frame camera), ``Xk`` the keyframe's canonical pointmap (keyframe camera); the
solved pose is ``T_kf_frame`` (Sim(3)). Pixels: OpenCV convention, flat index ``v * W + u``.
"""

from __future__ import annotations

import logging
import math
import threading
import weakref
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from recon_slam.frontend import fused_ops
from recon_slam.frontend.tracking import huber_weights
from recon_slam.geometry.camera import PinholeCamera

__all__ = [
    "StepSpec",
    "StepResult",
    "StepGraph",
    "damped_solve7",
    "sim3_retract",
    "umeyama_torch",
    "ray_match_fixed",
    "refine_descriptors_fixed",
    "solve_sim3_chains",
    "mono_step",
    "run_step",
    "parse_step",
    "descriptor_dtype",
]

log = logging.getLogger(__name__)

#: squared ray distance above which a match is not refined (same as ``mono._MAX_RAY_COST``)
MAX_RAY_COST = 0.01
#: solve failure codes of :class:`StepResult` (``reason``)
REASONS = {0: "", 1: "only {n} valid matches", 2: "non-finite cost", 3: "singular normal equations",
           4: "non-finite pose"}
#: Horn quaternion: squarings of the shifted 4x4 matrix (power iteration to the 2^20; the
#: shift keeps the eigenvalue ratio below ~0.6 unless the points are nearly collinear)
_HORN_SQUARINGS = 20

# ---------------------------------------------------------------------------- constants
_CONSTS: dict = {}


def _const(name, dtype, device, build):
    """A small constant tensor made once per (name, dtype, device) (no uploads during a capture)."""
    key = (name, dtype, str(device))
    c = _CONSTS.get(key)
    if c is None:
        c = _CONSTS[key] = build().to(device=device, dtype=dtype)
    return c


def _hat_gen(dtype, device) -> torch.Tensor:
    """(9, 3): ``hat(phi).reshape(9) = gen @ phi``."""
    def build():
        gen = torch.zeros((3, 3, 3), dtype=torch.float64)
        for (i, j, k, s) in ((0, 1, 2, -1), (0, 2, 1, 1), (1, 0, 2, 1), (1, 2, 0, -1), (2, 0, 1, -1), (2, 1, 0, 1)):
            gen[i, j, k] = s
        return gen.reshape(9, 3)
    return _const("hat", dtype, device, build)


def _horn_matrix(dtype, device) -> torch.Tensor:
    """(16, 9): Horn's symmetric 4x4 matrix ``N.reshape(16) = C @ M.reshape(9)`` of ``M = sum w x y^T``."""
    def build():
        C = torch.zeros((4, 4, 3, 3), dtype=torch.float64)
        X, Y, Z = 0, 1, 2
        entries = {
            (0, 0): [((X, X), 1), ((Y, Y), 1), ((Z, Z), 1)],
            (0, 1): [((Y, Z), 1), ((Z, Y), -1)], (0, 2): [((Z, X), 1), ((X, Z), -1)],
            (0, 3): [((X, Y), 1), ((Y, X), -1)],
            (1, 1): [((X, X), 1), ((Y, Y), -1), ((Z, Z), -1)],
            (1, 2): [((X, Y), 1), ((Y, X), 1)], (1, 3): [((Z, X), 1), ((X, Z), 1)],
            (2, 2): [((X, X), -1), ((Y, Y), 1), ((Z, Z), -1)], (2, 3): [((Y, Z), 1), ((Z, Y), 1)],
            (3, 3): [((X, X), -1), ((Y, Y), -1), ((Z, Z), 1)],
        }
        for (i, j), terms in entries.items():
            for (a, b), s in terms:
                C[i, j, a, b] += s
                if i != j:
                    C[j, i, a, b] += s
        return C.reshape(16, 9)
    return _const("horn", dtype, device, build)


def _window_flat(radius: int, dil: int, width: int, device) -> torch.Tensor:
    """(K,) int32 flat offsets ``dil * (dv * width + du)`` of a (2 radius + 1)^2 window (dv outer)."""
    def build():
        r = torch.arange(-radius, radius + 1)
        dv, du = torch.meshgrid(r, r, indexing="ij")
        return (dil * (dv.reshape(-1) * width + du.reshape(-1)))
    return _const(("window", radius, dil, width), torch.int32, device, build)


def _block33() -> torch.Tensor:
    """(4, 4) bool: the 3x3 linear block of a homogeneous matrix."""
    m = torch.zeros((4, 4), dtype=torch.bool)
    m[:3, :3] = True
    return m


def descriptor_dtype(name: str, device) -> torch.dtype:
    """Dtype of the descriptor gather: 'auto' = float16 on CUDA, float32 elsewhere."""
    if name == "auto":
        return torch.float16 if torch.device(device).type == "cuda" else torch.float32
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


# ---------------------------------------------------------------------------- small algebra
def sim3_retract(T: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    """Left retraction ``T <- [e^sigma R(phi), rho] T`` of Sim(3) poses, batched (float64).

    Same as :func:`recon_slam.frontend.tracking.retract` (Rodrigues rotation, ``I + K + K^2/2``
    below 1e-8 rad), without host reads.

    Args:
        T: (..., 4, 4) Sim(3) matrices; dx: (..., 7) ``(rho, phi, sigma)``.

    Returns:
        (..., 4, 4) updated poses.
    """
    phi = dx[..., 3:6]
    K = (phi @ _hat_gen(dx.dtype, dx.device).T).reshape(*phi.shape[:-1], 3, 3)
    th2 = (phi * phi).sum(-1)
    th = th2.sqrt()
    small = th < 1e-8
    ths = torch.where(small, 1.0, th)
    a = torch.where(small, 1.0, ths.sin() / ths)
    b = torch.where(small, 0.5, (1.0 - ths.cos()) / (ths * ths))
    eye = _const("eye3", dx.dtype, dx.device, lambda: torch.eye(3))
    A = (eye + a[..., None, None] * K + b[..., None, None] * (K @ K)) * torch.exp(dx[..., 6])[..., None, None]
    top = torch.cat((A, dx[..., 0:3, None]), dim=-1)  # (..., 3, 4)
    bottom = _const("bottom", dx.dtype, dx.device, lambda: torch.tensor([[0.0, 0.0, 0.0, 1.0]]))
    A4 = torch.cat((top, bottom.expand(*top.shape[:-2], 1, 4)), dim=-2)
    return A4 @ T


def damped_solve7(H: torch.Tensor, g: torch.Tensor, lam: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Step ``dx = -(H + lam diag(H) + eps I)^-1 g`` of a batch of small SPD systems.

    Same system as :func:`recon_slam.frontend.tracking.solve_normal_equations` (``eps =
    1e-12 max |diag H|``); solved by Gauss-Jordan elimination without pivoting, unrolled over
    the rows (no linear-algebra library call: capturable in a CUDA graph). The system is
    solvable exactly when every pivot is positive (Cholesky succeeds).

    Args:
        H: (B, d, d) float64; g: (B, d); lam: (B,) damping.

    Returns:
        dx (B, d) (zero where not solvable), ok (B,) bool (all pivots positive, finite step).
    """
    d = H.shape[-1]
    eye = _const(("eye", d), H.dtype, H.device, lambda: torch.eye(d))
    rowmask = _const(("rowmask", d), torch.bool, H.device, lambda: torch.eye(d, dtype=torch.bool)[:, :, None])
    diag = torch.diagonal(H, dim1=-2, dim2=-1)
    eps = diag.abs().amax(-1, keepdim=True).clamp_min(1e-30) * 1e-12
    M = torch.cat((H + eye * torch.addcmul(eps, diag, lam[:, None])[:, None, :], -g[..., None]), dim=-1)  # (B, d, d+1)
    piv = []
    for k in range(d):
        pk = M[:, k, k]
        piv.append(pk)
        row = (M[:, k] / pk[:, None])[:, None, :]  # (B, 1, d+1)
        M = torch.where(rowmask[k], row, torch.addcmul(M, M[:, :, k:k + 1], row, value=-1.0))
    dx = M[..., d]
    ok = (torch.stack(piv, -1).amin(-1) > 0) & torch.isfinite(dx).all(-1)
    return torch.where(ok[:, None], dx, 0.0), ok


def _det3(A: torch.Tensor) -> torch.Tensor:
    """(...,) determinants of (..., 3, 3) matrices (closed form)."""
    return (A[..., 0, 0] * (A[..., 1, 1] * A[..., 2, 2] - A[..., 1, 2] * A[..., 2, 1])
            - A[..., 0, 1] * (A[..., 1, 0] * A[..., 2, 2] - A[..., 1, 2] * A[..., 2, 0])
            + A[..., 0, 2] * (A[..., 1, 0] * A[..., 2, 1] - A[..., 1, 1] * A[..., 2, 0]))


def umeyama_torch(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Weighted closed-form Sim(3) ``T`` minimising ``sum w |y - T x|^2``, on the device.

    Same optimum as :func:`recon_slam.frontend.mono.sim3_umeyama`; the rotation maximising
    ``tr(R^T S)`` comes from Horn's quaternion (top eigenvector of a 4x4 symmetric matrix,
    by repeated squaring of its shifted form), so there is no SVD and no host read.

    Args:
        x, y: (3, N) finite points (source, target); w: (N,) weights >= 0.

    Returns:
        (4, 4) float64 ``T_y_x`` (identity rotation when all weights are zero).
    """
    f64 = torch.float64
    x, y = x.to(f64), y.to(f64)
    w = w.to(f64).clamp_min(0)
    ws = w / w.sum().clamp_min(1e-300)
    mx = (x * ws).sum(1, keepdim=True)
    my = (y * ws).sum(1, keepdim=True)
    cx, cy = x - mx, y - my
    S = (cy * ws) @ cx.T  # (3, 3) sum w y x^T
    var = (ws * (cx * cx).sum(0)).sum()
    N = (_horn_matrix(f64, x.device) @ S.T.reshape(9)).reshape(4, 4)  # from M = S^T = sum w x y^T
    eye4 = _const("eye4", f64, x.device, lambda: torch.eye(4))
    P = N + eye4 * (N * N).sum().sqrt()  # PSD, top eigenvector unchanged
    P = P / torch.diagonal(P).sum().clamp_min(1e-300)
    for i in range(_HORN_SQUARINGS):
        P = P @ P
        if i % 5 == 4:  # trace >= 1/4 before: no underflow of the top eigenvalue in between
            P = P / torch.diagonal(P).sum().clamp_min(1e-300)
    dg = torch.diagonal(P)
    i = dg.argmax()
    qv = P.index_select(1, i.reshape(1))[:, 0]
    qv = qv / qv.norm().clamp_min(1e-300)
    qv = torch.where(torch.isfinite(qv).all() & (qv.norm() > 0.5), qv, eye4[0])
    qw, qx, qy, qz = qv[0], qv[1], qv[2], qv[3]
    R = torch.stack((
        torch.stack((1 - 2 * (qy * qy + qz * qz), 2 * (qx * qy - qw * qz), 2 * (qx * qz + qw * qy))),
        torch.stack((2 * (qx * qy + qw * qz), 1 - 2 * (qx * qx + qz * qz), 2 * (qy * qz - qw * qx))),
        torch.stack((2 * (qx * qz - qw * qy), 2 * (qy * qz + qw * qx), 1 - 2 * (qx * qx + qy * qy))),
    ))
    s = (R * S).sum() / var.clamp_min(1e-300)
    t = my[:, 0] - s * (R @ mx[:, 0])
    bottom = _const("bottom", f64, x.device, lambda: torch.tensor([[0.0, 0.0, 0.0, 1.0]]))
    return torch.cat((torch.cat((s * R, t[:, None]), 1), bottom), 0)


# ---------------------------------------------------------------------------- matching
def _ray_cost(flat: torch.Tensor, H: int, W: int, uv: torch.Tensor, target: torch.Tensor):
    """Ray distance of interpolated rays at ``uv`` (N, 2) to ``target`` (N, 3).

    Bilinear interpolation with the arithmetic of
    :func:`recon_slam.frontend.matching.sample_bilinear` (per element identical), both pixel
    axes processed together and the four corners gathered in one call.

    Returns:
        cost (N,), res (N, 3), Jt (N, 2, 3): the transposed Jacobian of the normalised ray.
    """
    dt, dev = uv.dtype, uv.device
    lo = _const(("lo",), dt, dev, lambda: torch.zeros(2))
    hi = _const(("hi", W, H), dt, dev, lambda: torch.tensor([W - 1.0, H - 1.0]))
    hi0 = _const(("hi0", W, H), dt, dev, lambda: torch.tensor([max(W - 2.0, 0.0), max(H - 2.0, 0.0)]))
    pitch = _const(("pitch", W), torch.int64, dev, lambda: torch.tensor([1, W]))
    corners = _const(("corners", W, H), torch.int64, dev,
                     lambda: torch.tensor([0, 1 if W > 1 else 0, W if H > 1 else 0,
                                           (1 if W > 1 else 0) + (W if H > 1 else 0)]))
    c = torch.clamp(uv, lo, hi)
    f0 = torch.minimum(c.floor(), hi0)
    ab = c - f0  # (a, b): offsets along u and v
    i0 = (f0.long() * pitch).sum(-1)
    f = flat.index_select(0, (i0[:, None] + corners).reshape(-1)).reshape(-1, 2, 2, flat.shape[1])  # [v][u]
    du = f[:, :, 1] - f[:, :, 0]  # (f01 - f00, f11 - f10)
    tb = f[:, :, 0] + ab[:, 0, None, None] * du  # (top, bot)
    b = ab[:, 1, None]
    gv = tb[:, 1] - tb[:, 0]
    r = tb[:, 0] + b * gv
    gu = (1 - b) * du[:, 0] + b * du[:, 1]
    norm = r.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    n = r / norm
    res = n - target
    cost = (res * res).sum(-1)
    G = torch.stack((gu, gv), 1)  # (N, 2, 3)
    nb = n[:, None]
    Jt = (G - nb * (nb * G).sum(-1, keepdim=True)) / norm[:, None]  # d normalise(r)/dr = (I - n n^T) / |r|
    return cost, res, Jt


def ray_match_fixed(rays: torch.Tensor, points: torch.Tensor, uv_init: torch.Tensor, n_iter: int,
                    lambda_init: float = 1e-8, tol: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`~recon_slam.frontend.matching.iterative_ray_match` with exactly ``n_iter`` iterations.

    Per-point LM on the continuous pixel minimising ``|normalise(ray(p)) - normalise(x)|^2``;
    points whose cost is below ``tol`` stop updating (a mask instead of the host's early
    exit), so the result is the host matcher's (up to float rounding).

    Args:
        rays: (H, W, 3) ray image of the frame (frame camera); points: (N, 3) in the frame
            camera; uv_init: (N, 2) initial pixels.

    Returns:
        uv (N, 2) pixels inside the image, cost (N,) final squared ray distance.
    """
    H, W, _ = rays.shape
    flat = rays.reshape(H * W, 3)
    target = torch.nn.functional.normalize(points, dim=-1)
    dt, dev = points.dtype, points.device
    lo = _const(("lo",), dt, dev, lambda: torch.zeros(2))
    hi = _const(("hi", W, H), dt, dev, lambda: torch.tensor([W - 1.0, H - 1.0]))
    uv = torch.clamp(uv_init.to(dt), lo, hi)
    lam = torch.full((uv.shape[0],), lambda_init, dtype=dt, device=dev)
    cost, res, Jt = _ray_cost(flat, H, W, uv, target)
    running = torch.ones_like(cost, dtype=torch.bool)
    for _ in range(n_iter):
        running = running & (cost > tol)
        A = Jt @ Jt.transpose(1, 2)  # (N, 2, 2)
        g = (Jt @ res[..., None])[..., 0]  # (N, 2)
        ad = torch.diagonal(A, dim1=1, dim2=2) + lam[:, None]  # (a, d)
        b = A[:, 0, 1]
        det = (ad[:, 0] * ad[:, 1] - b * b).clamp_min(1e-30)
        step = -(ad.flip(-1) * g - b[:, None] * g.flip(-1)) / det[:, None]
        cand = torch.clamp(uv + step, lo, hi)
        cost_new, res_new, Jt_new = _ray_cost(flat, H, W, cand, target)
        better = running & (cost_new < cost)
        uv = torch.where(better[:, None], cand, uv)
        cost = torch.where(better, cost_new, cost)
        res = torch.where(better[:, None], res_new, res)
        Jt = torch.where(better[:, None, None], Jt_new, Jt)
        lam = lam * torch.where(better, 0.1, torch.where(running, 10.0, 1.0))
    return uv, cost


def refine_descriptors_fixed(D_dst: torch.Tensor, d_src: torch.Tensor, p: torch.Tensor, active: torch.Tensor,
                             radius: int, dilations: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """:func:`~recon_slam.frontend.mono.refine_by_descriptors` of every point, no compaction.

    All N points are refined (coarse-to-fine dilated windows, best descriptor dot product,
    window shifted inside the image near the border); inactive points keep ``p``. On CUDA
    one Triton kernel does the whole search (:func:`~recon_slam.frontend.fused_ops.refine_descriptors`).

    Args:
        D_dst: (H, W, F) frame descriptors; d_src: (N, F) keyframe descriptors of the points;
        p: (N, 2) long frame pixels ``(u, v)``; active: (N,) bool.
        dtype: dtype of the gathered descriptors and scores (float16 halves the traffic).

    Returns:
        (N, 2) long refined pixels.
    """
    return fused_ops.refine_descriptors(D_dst, d_src, p, active, radius, dilations, dtype)


# ---------------------------------------------------------------------------- Sim(3) solve
# Jacobian rows wrt a LEFT perturbation (rho, phi, sigma) of q = T x are [g, q x g, g . q]
# for a residual row with gradient g = dr/dq (as tracking.jacobian_components); they are
# gathered, together with the residuals, from a small stack of per-point features (one
# index_select instead of a few dozen element-wise kernels).
def _ray_dist_layout(device) -> torch.Tensor:
    """(32,) feature rows of the uncalibrated block A (8, 4, M) = [J (7 comps); r] x 4 residual rows.

    Features: 0-8 ``Gr = (I - d d^T)/|q|`` (row-major, symmetric), 9-11 ``d = q/|q|``,
    12-14 ``-d``, 15 ``|q|``, 16 zero, 17-20 the residual ``[d - y/|y|, |q| - |y|]``.
    """
    def build():
        Z, D, ND, NQ = 16, 9, 12, 15
        hat = [[Z, ND + 2, D + 1], [D + 2, Z, ND + 0], [ND + 1, D + 0, Z]]  # hat(d)[j][i]
        idx = []
        for k in range(7):
            for i in range(4):
                if k < 3:
                    idx.append(k * 3 + i if i < 3 else D + k)
                elif k < 6:
                    idx.append(hat[k - 3][i] if i < 3 else Z)
                else:
                    idx.append(NQ if i == 3 else Z)
        idx += [17, 18, 19, 20]
        return torch.tensor(idx)
    return _const("ray_dist_layout", torch.int64, device, build)


def _pixel_depth_layout(fx: float, fy: float, dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(24,) feature rows and coefficients of the calibrated block A (8, 3, M).

    Features: 0 ``iz = 1/z``, 1-2 ``(u, v) iz``, 3 ``u v``, 4-5 ``1 + (u^2, v^2)``, 6-7
    ``(u, v)``, 8 one, 9 zero, 10-12 the residual ``[fx du, fy dv, log z - log z_y]``.
    """
    IZ, UIZ, VIZ, UV, U2, V2, U, V, ONE, Z = range(10)
    rows = [  # (feature, coefficient) of components 0..6, residual rows 0..2
        [(IZ, fx), (Z, 0.0), (Z, 0.0)],
        [(Z, 0.0), (IZ, fy), (Z, 0.0)],
        [(UIZ, -fx), (VIZ, -fy), (IZ, 1.0)],
        [(UV, -fx), (V2, -fy), (V, 1.0)],
        [(U2, fx), (UV, fy), (U, -1.0)],
        [(V, -fx), (U, fy), (Z, 0.0)],
        [(Z, 0.0), (Z, 0.0), (ONE, 1.0)],
    ]
    flat = [e for row in rows for e in row] + [(10, 1.0), (11, 1.0), (12, 1.0)]
    idx = _const(("pd_idx",), torch.int64, device, lambda: torch.tensor([f for f, _ in flat]))
    coef = _const(("pd_coef", fx, fy), dtype, device, lambda: torch.tensor([c for _, c in flat], dtype=torch.float64))
    return idx, coef[:, None]


def _target_terms(y: torch.Tensor, camera: Optional[PinholeCamera]) -> torch.Tensor:
    """Per-target constants of the residual: uncalibrated ``[y/|y|, |y|]`` (4, N), calibrated
    ``[x_y/z_y, y_y/z_y, 1/z_y]`` (3, N)."""
    if camera is None:
        ny = (y[0] * y[0] + y[1] * y[1] + y[2] * y[2]).sqrt().clamp_min(1e-12)
        return torch.cat((y / ny, ny[None]))
    izy = 1.0 / y[2].clamp_min(1e-9)
    return torch.cat((y[:2] * izy, izy[None]))


def _linearise(q: torch.Tensor, yt: torch.Tensor, camera: Optional[PinholeCamera]) -> torch.Tensor:
    """Residuals and Jacobians of points ``q`` (3, M) in the target camera: A (8, R, M) = [J (7); r].

    Uncalibrated ``r = [q/|q| - y/|y|, |q| - |y|]`` (R = 4); calibrated ``r = [fx (x/z - x_y/z_y),
    fy (y/z - y_y/z_y), log z - log z_y]`` (R = 3) (the residuals of
    :func:`~recon_slam.frontend.tracking.grad_ray_dist` / ``grad_pixel_depth``); ``yt`` from
    :func:`_target_terms` (repeated per chain).
    """
    M = q.shape[1]
    if camera is None:
        nq = (q * q).sum(0).sqrt().clamp_min(1e-12)
        inq = 1.0 / nq
        d = q * inq
        eye = _const("eye3", q.dtype, q.device, lambda: torch.eye(3))
        Gr = (eye[:, :, None] - d[:, None, :] * d[None, :, :]) * inq
        zero = _const("zero1", q.dtype, q.device, lambda: torch.zeros(1, 1))
        F = torch.cat((Gr.reshape(9, M), d, -d, nq[None], zero.expand(1, M), d - yt[:3], (nq - yt[3])[None]))
        return F.index_select(0, _ray_dist_layout(q.device)).reshape(8, 4, M)
    z = q[2].clamp_min(1e-9)
    iz = 1.0 / z
    uv = q[:2] * iz
    f = _const(("fxfy", camera.fx, camera.fy), q.dtype, q.device,
               lambda: torch.tensor([[camera.fx], [camera.fy]], dtype=torch.float64))
    consts = _const("one_zero", q.dtype, q.device, lambda: torch.tensor([[1.0], [0.0]]))
    F = torch.cat((iz[None], uv * iz, (uv[0] * uv[1])[None], 1.0 + uv * uv, uv, consts.expand(2, M),
                   f * (uv - yt[:2]), torch.log(z * yt[2])[None]))
    idx, coef = _pixel_depth_layout(camera.fx, camera.fy, q.dtype, q.device)
    return (F.index_select(0, idx) * coef).reshape(8, 3, M)


def _evaluate(T: torch.Tensor, x: torch.Tensor, yt: torch.Tensor, w0B: torch.Tensor, inv2: torch.Tensor,
              camera: Optional[PinholeCamera], k: float) -> torch.Tensor:
    """Linearise ``B`` poses at once (the evaluation of the host ``solve_sim3``, batched).

    Args:
        T: (B, 4, 4) float64; x: (3, N); yt: target terms (see :func:`_target_terms`) repeated
            per chain (., B N); w0B: (B N,) weights; inv2: (R, 1) inverse variances.

    Returns:
        (B, 59) float64 per chain: ``[robust cost, n_live, n_inlier, (H | g) (7 x 8)]``.
    """
    B = T.shape[0]
    N = x.shape[1]
    Tf = T.to(x.dtype)
    Rc = Tf[:, :3, :3].transpose(0, 1).reshape(3 * B, 3)  # rows (i, b)
    tc = Tf[:, :3, 3].transpose(0, 1).reshape(3 * B, 1)
    q = torch.addmm(tc, Rc, x).reshape(3, B * N)
    wv = w0B * (q[2] > 1e-6) if camera is not None else w0B
    A = _linearise(q, yt, camera)
    R_ = A.shape[1]
    live = wv > 0
    r = A[7] * live
    e = ((r * r * inv2).sum(0) * wv).sqrt()
    hw = huber_weights(e, k)
    rho = torch.where(e <= k, e * e, 2.0 * k * e - k * k)
    Wt = (wv * hw)[None] * inv2  # (R, B N)
    A = torch.cat((A[:7], r[None]))
    # (B, 7, 8) = sum over rows of [J W] [J; r]^T, chunked (one long product is slow on GPUs)
    JW = (A[:7] * Wt).reshape(7, R_, B, N).permute(2, 0, 1, 3).reshape(B, 7, R_ * N)
    Mt = fused_ops.gram_splitk(JW, A.reshape(8, R_, B, N).permute(2, 0, 1, 3).reshape(B, 8, R_ * N))
    sums = torch.stack((rho, live.to(rho.dtype), (live & (hw >= 0.999)).to(rho.dtype))).reshape(3, B, N).sum(-1)
    return torch.cat((sums.T, Mt.reshape(B, 56)), 1).double()


def solve_sim3_chains(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, T0: torch.Tensor, sigmas: Sequence[float],
                      huber_k: float, n_iter: int, tolerance: float, camera: Optional[PinholeCamera] = None,
                      min_matches: int = 20) -> dict:
    """Sim(3) ``T`` with ``y ~ T x`` from ``B`` initial poses at once, no host reads.

    The algorithm of :func:`recon_slam.frontend.mono.solve_sim3` (same residuals, whitening,
    Huber IRLS, damping 1e-6 x0.1 / x10, cost test, stopping tests on the relative decrease
    and the step norm, failure rules) with a fixed ``n_iter`` iterations: a chain stops
    changing once the host loop would have stopped.

    Args:
        x: (3, N) source points (frame camera); y: (3, N) targets (keyframe camera);
        w: (N,) weights (0 drops a match); T0: (B, 4, 4) float64 initial poses.
        sigmas: residual sigmas (3 calibrated: pixel, pixel, log-depth; 4 uncalibrated:
            ray x3, distance); camera: keyframe intrinsics for the calibrated residual.

    Returns:
        dict of device tensors, per chain (B,): ``T`` (B, 4, 4), ``H`` (B, 7, 7) information
        (left perturbations), ``success`` bool, ``n`` (matches of the result, as the host
        reports), ``inlier`` fraction, ``cost`` per match (inf on failure), ``iterations``,
        ``reason`` code (see :data:`REASONS`), ``n_valid`` (weighted matches).
    """
    B = T0.shape[0]
    dt = x.dtype
    inv2 = _const(("inv2", tuple(sigmas)), dt, x.device,
                  lambda: torch.tensor([1.0 / (s * s) for s in sigmas], dtype=torch.float64)[:, None])
    w0 = w.to(dt) * (torch.isfinite(x).all(0) & torch.isfinite(y).all(0))
    x = torch.nan_to_num(x)
    y = torch.nan_to_num(y)
    if camera is not None:
        w0 = w0 * (y[2] > 1e-6)
    n_valid = (w0 > 0).sum().double()
    yt = _target_terms(y, camera).repeat(1, B)
    w0B = w0.repeat(B)
    k = float(huber_k)
    T = T0
    lin = _evaluate(T, x, yt, w0B, inv2, camera, k)
    few = (n_valid < min_matches).expand(B)
    bad0 = ~torch.isfinite(lin[:, 0])
    pre_fail = few | bad0
    done = pre_fail
    fail = torch.zeros_like(done)
    lam = torch.full((B,), 1e-6, dtype=torch.float64, device=x.device)
    its = torch.zeros((B,), dtype=torch.float64, device=x.device)
    for _ in range(max(int(n_iter), 0)):
        active = ~done
        Hg = lin[:, 3:].reshape(B, 7, 8)
        dx, ok = damped_solve7(Hg[..., :7], Hg[..., 7], lam)
        T_new = sim3_retract(T, dx)
        lin_new = _evaluate(T_new, x, yt, w0B, inv2, camera, k)
        cost, c_new = lin[:, 0], lin_new[:, 0]
        go = active & ok
        acc = go & torch.isfinite(c_new) & (c_new <= cost)
        rel = (cost - c_new) / cost.clamp_min(1e-300)
        lam_rej = lam * 10.0
        small = dx.norm(dim=-1) < tolerance
        stop = go & (small | torch.where(acc, rel < tolerance, lam_rej > 1e4))
        T = torch.where(acc[:, None, None], T_new, T)
        lin = torch.where(acc[:, None], lin_new, lin)
        lam = torch.where(acc, (lam * 0.1).clamp_min(1e-9), torch.where(go, lam_rej, lam))
        its = its + active
        singular = active & ~ok
        fail = fail | singular
        done = done | stop | singular
    cost, n_live, n_inl = lin[:, 0], lin[:, 1], lin[:, 2]
    H = lin[:, 3:].reshape(B, 7, 8)[..., :7]
    good = ~pre_fail & ~fail
    success = good & torch.isfinite(T).flatten(1).all(-1) & (_det3(T[:, :3, :3]) > 0)
    reason = torch.where(few, 1.0, torch.where(bad0, 2.0, torch.where(fail, 3.0, torch.where(success, 0.0, 4.0))))
    return {
        "T": T,
        "H": torch.where(pre_fail[:, None, None], 0.0, H),
        "success": success,
        "n": torch.where(good, n_live, n_valid),
        "inlier": torch.where(good, n_inl / n_live.clamp_min(1), 0.0),
        "cost": torch.where(good, cost / n_live.clamp_min(1), float("inf")),
        "iterations": its,
        "reason": reason,
        "n_valid": n_valid,
    }


def _lower_median(values: torch.Tensor, mask: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Lower median (``torch.median``'s) of ``values[mask]`` without compaction (inf when empty)."""
    s = torch.where(mask, values, float("inf")).sort().values
    i = ((count - 1) // 2).clamp_min(0)
    return s.gather(0, i.reshape(1))[0]


# ---------------------------------------------------------------------------- the step
@dataclass(frozen=True)
class StepSpec:
    """Everything the device step depends on besides its input tensors (the graph key).

    Attributes:
        shape1: (H, W) frame maps; shape2: (H2, W2) keyframe maps; n: sampled points.
        feat: descriptor length (0: no descriptor refinement); has_q: descriptor
            confidences given; has_c2: view-2 confidence given.
        camera: keyframe intrinsics for the calibrated residual (None: uncalibrated).
        prior: solve from the prior pose plus the Umeyama fallback chain (False: Umeyama only).
        other fields: the ``mono`` settings used (see :class:`~recon_slam.config.MonoConfig`).
    """

    shape1: tuple
    shape2: tuple
    n: int
    feat: int
    has_q: bool
    has_c2: bool
    camera: Optional[PinholeCamera]
    prior: bool
    match_iterations: int
    refine_radius: int
    refine_dilations: tuple
    desc_dtype: torch.dtype
    match_max_distance: float
    match_max_angle_px: float
    min_descriptor_confidence: float
    stride: int
    sigmas: tuple
    huber_k: float
    lm_iterations: int
    tolerance: float
    n_extra: int = 0

    @staticmethod
    def build(cfg, shape1, shape2, n: int, feat: int, has_q: bool, has_c2: bool, camera: Optional[PinholeCamera],
              prior: bool, device, n_extra: int = 0) -> "StepSpec":
        """Spec from a :class:`~recon_slam.config.MonoConfig` and the shapes of a pair."""
        calibrated = camera is not None
        sig = ((cfg.sigma_pixel, cfg.sigma_pixel, cfg.sigma_depth) if calibrated
               else (cfg.sigma_ray,) * 3 + (cfg.sigma_dist,))
        refine = feat > 0 and cfg.refine_radius > 0 and len(cfg.refine_dilations) > 0
        return StepSpec(
            tuple(shape1), tuple(shape2), int(n), int(feat) if refine else 0, bool(has_q), bool(has_c2), camera,
            bool(prior), int(cfg.match_iterations), int(cfg.refine_radius), tuple(int(d) for d in cfg.refine_dilations),
            descriptor_dtype(getattr(cfg, "device_descriptor_dtype", "auto"), device), float(cfg.match_max_distance),
            float(cfg.match_max_angle_px), float(cfg.min_descriptor_confidence), int(cfg.match_stride),
            tuple(float(s) for s in sig), float(cfg.huber_k),
            min(int(getattr(cfg, "device_iterations", 8)), int(cfg.max_iterations)), float(cfg.tolerance),
            int(n_extra))

    def input_names(self) -> list[str]:
        """Names of :func:`mono_step`'s input tensors, in order."""
        names = ["X1", "C1", "X2", "Xk", "Ck", "src", "uv0", "T_in"]
        if self.camera is not None:
            names.append("rays1")
        if self.feat:
            names += ["D1", "D2"]
        if self.has_q:
            names += ["Q1", "Q2"]
        if self.has_c2:
            names.append("C2")
        if self.n_extra:
            names.append("extra")
        return names


#: layout of the packed read of :func:`mono_step`: T (16), H (49), then these scalars
SCALARS = ("success", "n_solve", "inlier", "cost", "iterations", "reason", "n_valid", "n_unique", "n_frame_valid",
           "chain")


def mono_step(spec: StepSpec, *inputs: torch.Tensor):
    """One device-resident tracking step of a (frame, keyframe) pair, fixed shapes, no host reads.

    Inputs (in :meth:`StepSpec.input_names` order): ``X1`` (H, W, 3) frame points (frame
    camera), ``C1`` (H, W), ``X2`` (H2, W2, 3) the keyframe's pixels in the frame camera,
    ``Xk`` (H2, W2, 3) the keyframe's canonical points (keyframe camera), ``Ck`` (H2, W2),
    ``src`` (N,) long sampled keyframe pixels, ``uv0`` (N, 2) initial frame pixels, ``T_in``
    (17,) float64: the prior ``T_kf_frame`` (4x4, row-major) and its scale ``max(s0, 1e-12)``
    (ignored without ``spec.prior``); optionally ``rays1`` (H, W, 3) unit frame rays
    (calibrated), ``D1`` (H, W, F) / ``D2`` (H2, W2, F) descriptors, ``Q1`` / ``Q2``
    descriptor confidences, ``C2``, ``extra`` (n_extra,) values appended to the read.

    Returns:
        ``(packed, uv, dst_idx, valid, q)``: packed (16 + 49 + len(SCALARS) + n_extra,)
        float64 (see :func:`parse_step`), uv (N, 2) continuous frame pixels (the next
        initialisation), dst_idx (N,) long matched frame pixels, valid (N,) bool, q (N,)
        match weights.
    """
    it = iter(inputs)
    X1, C1, X2, Xk, Ck, src, uv0, T_in = (next(it) for _ in range(8))
    rays1 = next(it) if spec.camera is not None else None
    D1, D2 = (next(it), next(it)) if spec.feat else (None, None)
    Q1, Q2 = (next(it), next(it)) if spec.has_q else (None, None)
    C2 = next(it) if spec.has_c2 else None
    extra = next(it) if spec.n_extra else None
    H, W = spec.shape1
    n = spec.n
    dt = X1.dtype
    # ---- matching (match_pair)
    pts = X2.reshape(-1, 3).index_select(0, src)
    rays = torch.nn.functional.normalize(X1, dim=-1)
    uv, cost = ray_match_fixed(rays, pts, uv0, spec.match_iterations)
    p = torch.stack((torch.round(uv[:, 0]).clamp(0, W - 1), torch.round(uv[:, 1]).clamp(0, H - 1)), -1).long()
    pn = pts.norm(dim=-1)
    ok_pts = torch.isfinite(pts).all(-1) & (pn > 1e-9) & (Ck.reshape(-1).index_select(0, src) > 0)
    if spec.feat:
        d_src = D2.reshape(-1, D2.shape[-1]).index_select(0, src)
        p = refine_descriptors_fixed(D1, d_src, p, ok_pts & (cost < MAX_RAY_COST), spec.refine_radius,
                                     spec.refine_dilations, spec.desc_dtype)
    dst = p[:, 1] * W + p[:, 0]
    Xd = X1.reshape(-1, 3).index_select(0, dst)
    valid = ok_pts & ((Xd - pts).norm(dim=-1) <= spec.match_max_distance * pn)
    # the matched ray must point at the point (pixel_angle of mono, on the device)
    h0, h1 = H // 4, max(H - H // 4, H // 4 + 1)
    ra = rays[h0:h1:2, W // 4: W - W // 4 - 1]
    rb = rays[h0:h1:2, W // 4 + 1: W - W // 4]
    if ra.numel():
        srt = torch.acos((ra * rb).sum(-1).clamp(-1.0, 1.0)).reshape(-1).sort().values
        med = torch.where(srt[-1].isnan(), srt[-1], srt[(srt.numel() - 1) // 2])  # torch.median (lower, NaN)
        ang = med.double() * spec.match_max_angle_px
        max_cost = 2.0 - 2.0 * torch.cos(ang.clamp_max(math.pi / 2))
        valid = valid & (cost <= max_cost)
    else:
        valid = valid & (cost <= 0.0)
    valid = valid & (C1.reshape(-1).index_select(0, dst) > 0)
    if C2 is not None:
        valid = valid & (C2.reshape(-1).index_select(0, src) > 0)
    if Q1 is not None:
        q1 = Q1.reshape(-1).index_select(0, dst)
        q2 = Q2.reshape(-1).index_select(0, src)
        thr = spec.min_descriptor_confidence
        valid = valid & (q1 > thr) & (q2 > thr)
        q = (q1 * q2).clamp_min(0).sqrt()
    else:
        q = torch.ones(n, dtype=dt, device=X1.device)
    n_valid = valid.sum()
    live_count = n_valid
    s = spec.stride
    ncol = W // s + 1
    n_cells = (H // s + 1) * ncol
    cells = torch.div(p[:, 1], s, rounding_mode="floor") * ncol + torch.div(p[:, 0], s, rounding_mode="floor")
    hit = torch.zeros(n_cells + 1, dtype=torch.uint8, device=X1.device)
    hit.index_fill_(0, torch.where(valid, cells, n_cells), 1)
    n_unique = hit[:-1].sum()
    # ---- Sim(3) (MonoFrontend.track + solve_sim3)
    Xf = rays1 * X1.norm(dim=-1, keepdim=True) if rays1 is not None else X1
    x = Xf.reshape(-1, 3).index_select(0, dst).T.contiguous()
    y = Xk.reshape(-1, 3).index_select(0, src).T.contiguous()
    w = q.sqrt() * valid
    fin = torch.isfinite(x).all(0) & torch.isfinite(y).all(0)
    T_u = umeyama_torch(torch.nan_to_num(x), torch.nan_to_num(y), torch.where(valid & fin, w, 0.0))
    if spec.prior:
        nx = _lower_median(x.norm(dim=0), valid, live_count).double()
        ny = _lower_median(y.norm(dim=0), valid, live_count).double()
        sc = ny / nx.clamp_min(1e-12) / T_in[16]
        T_p = T_in[:16].reshape(4, 4)
        block = _const("block33", torch.bool, X1.device, _block33)
        T0 = torch.stack((torch.where(block, T_p * sc, T_p), T_u))
    else:
        T0 = T_u[None]
    sol = solve_sim3_chains(x, y, w, T0, spec.sigmas, spec.huber_k, spec.lm_iterations, spec.tolerance,
                            spec.camera)
    ok = sol["success"]
    if spec.prior:  # the host's fallback rule: Umeyama chain when the prior one fails or has few inliers
        use2 = (~ok[0] | (sol["inlier"][0] < 0.5)) & ok[1] & (~ok[0] | (sol["cost"][1] < sol["cost"][0]))
        c = use2.long()
    else:
        c = torch.zeros((), dtype=torch.long, device=X1.device)

    def pick(t):
        return t.index_select(0, c.reshape(1))[0]

    scal = torch.stack((pick(ok.double()), pick(sol["n"]), pick(sol["inlier"]), pick(sol["cost"]),
                        pick(sol["iterations"]), pick(sol["reason"]), n_valid.double(), n_unique.double(),
                        (C1 > 0).sum().double(), c.double()))
    parts = [pick(sol["T"]).reshape(-1), pick(sol["H"]).reshape(-1), scal]
    if extra is not None:
        parts.append(extra.double().reshape(-1))
    return torch.cat(parts), uv, dst, valid, q


@dataclass
class StepResult:
    """Host values of one device step (read once).

    Attributes:
        T: (4, 4) float64 ``T_kf_frame``; information: (7, 7) float64 (left perturbations).
        success, n_solve, inlier_fraction, cost, iterations, reason: of the chosen Sim(3)
            chain (as :class:`~recon_slam.frontend.mono.SolveResult`).
        n_valid: valid matches; n_unique: distinct frame cells hit by valid matches;
        n_frame_valid: frame pixels with ``C > 0``; chain: 0 prior, 1 Umeyama.
        extra: the appended extra values.
    """

    T: np.ndarray
    information: np.ndarray
    success: bool
    n_solve: int
    inlier_fraction: float
    cost: float
    iterations: int
    reason: str
    n_valid: int
    n_unique: int
    n_frame_valid: int
    chain: int
    extra: np.ndarray


def parse_step(host: np.ndarray) -> StepResult:
    """:class:`StepResult` from the packed float64 read of :func:`mono_step`."""
    T = host[:16].reshape(4, 4).copy()
    Hm = host[16:65].reshape(7, 7).copy()
    v = dict(zip(SCALARS, host[65:65 + len(SCALARS)]))
    code = int(v["reason"])
    n_solve = int(v["n_solve"])
    reason = REASONS.get(code, "solve failed").format(n=n_solve)
    return StepResult(T, Hm, bool(v["success"] > 0.5), n_solve, float(v["inlier"]), float(v["cost"]),
                      int(v["iterations"]), reason, int(v["n_valid"]), int(v["n_unique"]), int(v["n_frame_valid"]),
                      int(v["chain"]), host[65 + len(SCALARS):].copy())


# ---------------------------------------------------------------------------- CUDA graph
class StepGraph:
    """:func:`mono_step` of one :class:`StepSpec` captured as a CUDA graph with static inputs.

    Two warm-up runs on a side stream (allocator, cached constants), then the capture. Each
    :meth:`run` copies the inputs into the static buffers (skipped for the same tensor
    object at the same version, e.g. the cached sample grid and identity initialisation),
    replays, and returns the static outputs (overwritten by the next run).
    """

    def __init__(self, spec: StepSpec, inputs: Sequence[torch.Tensor]) -> None:
        dev = inputs[0].device
        self.spec = spec
        self.static = [t.detach().clone() for t in inputs]
        # (weakref, version) of the tensor whose values each buffer holds (mono_step never
        # writes its inputs, so the buffers keep them)
        self._loaded: list = [(weakref.ref(t), t._version) for t in inputs]
        side = torch.cuda.Stream(device=dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for _ in range(2):
                mono_step(spec, *self.static)
        torch.cuda.current_stream(dev).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: the backend thread may use the GPU meanwhile (its own stream)
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.outputs = mono_step(spec, *self.static)

    def run(self, inputs: Sequence[torch.Tensor]):
        """Copy ``inputs`` in, replay; returns the static outputs of :func:`mono_step`."""
        for i, (buf, t) in enumerate(zip(self.static, inputs)):
            seen = self._loaded[i]
            if seen is not None and seen[0]() is t and seen[1] == t._version:
                continue
            buf.copy_(t)
            self._loaded[i] = (weakref.ref(t), t._version)
        self.graph.replay()
        return self.outputs


_GRAPH_LOCK = threading.Lock()
_MAX_GRAPHS = 8


def run_step(spec: StepSpec, inputs: Sequence[torch.Tensor], graphed: bool, cache: Optional[dict] = None):
    """:func:`mono_step` eagerly, or replayed as a cached :class:`StepGraph` (``graphed`` on CUDA).

    A failed capture is logged once and the cache then runs everything eagerly. Graph
    outputs are cloned (they outlive the next replay).

    Args:
        cache: dict holding the graphs (per owner, e.g. the frontend), keyed by ``spec`` and
            the input shapes and dtypes.

    Returns:
        the outputs of :func:`mono_step` (fresh tensors).
    """
    if not graphed or inputs[0].device.type != "cuda" or cache is None or cache.get("_failed"):
        return mono_step(spec, *inputs)
    key = (spec, tuple((tuple(t.shape), t.dtype) for t in inputs), str(inputs[0].device))
    with _GRAPH_LOCK:
        g = cache.get(key)
        if g is None:
            try:
                if len(cache) >= _MAX_GRAPHS:
                    cache.clear()
                g = cache[key] = StepGraph(spec, inputs)
            except Exception as exc:  # capture not supported here: eager from now on
                log.warning("CUDA graph capture of the monocular tracking step failed (%s): running eagerly", exc)
                cache.clear()
                cache["_failed"] = True
                return mono_step(spec, *inputs)
        return tuple(t.clone() for t in g.run(inputs))
