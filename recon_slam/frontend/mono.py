"""Monocular frontend: two-view pointmaps up to scale, matching in ray space, Sim(3) tracking.

The monocular path of :class:`~recon_slam.system.SlamSystem` (``mode: mono``), in the style
of MASt3R-SLAM. For every frame a two-view predictor (the MASt3R network, or the test oracle)
gives a :class:`~recon_slam.frontend.predictors.TwoViewPrediction` of the pair (frame,
current keyframe): the frame's points ``X_f^f`` and the keyframe's points ``X_k^f``, both in
the frame's camera and up to one unknown scale per pair. Then:

1. **Matching** (:func:`match_pair`): every ``match_stride``-th keyframe pixel ``j`` has a
   point ``X_k^f(j)`` in the frame's camera; the frame pixel whose ray (from the frame's own
   pointmap, no intrinsics needed) points at it is found by per-point Levenberg-Marquardt in
   ray space (:func:`~recon_slam.frontend.matching.iterative_ray_match`, initialised from the
   previous frame's matches or the identity), then refined by descriptor similarity in a
   dilated local window (:func:`refine_by_descriptors`). Matches whose two points disagree
   in 3D (occlusion) or whose descriptor confidences are low are invalid.
2. **Tracking** (:func:`solve_sim3`): the Sim(3) ``T_kf_frame`` that maps the frame's points
   ``X_f^f(p)`` onto the keyframe's canonical (fused) pointmap ``X_kf(j)``, by Gauss-Newton
   with Huber IRLS on the uncalibrated residual (ray direction (3) + distance (1)) or, when
   the intrinsics are used (``mono.calibrated``), the calibrated residual (pixel (2) +
   log-depth (1)) with all points snapped onto the known camera rays.
3. **Fusion**: the keyframe's points predicted in this pair, moved into the keyframe with
   ``T_kf_frame``, update its canonical pointmap by a confidence-weighted running average.
4. **New keyframe** when ``min(valid match fraction, unique match fraction)`` falls below
   ``keyframes.new_kf_match_threshold``; the backend receives it with the Sim(3) edge.
   **Bounded map** (``backend.reuse_keyframes``): before creating it, existing keyframes near
   the frame's pose (gates relative to the scene distance: map units are arbitrary) are
   tried with a pair prediction (frame, candidate) and Sim(3) tracking; one whose match
   fractions pass the rule with a margin becomes the reference instead, so revisits do not
   add keyframes. Re-anchoring on an old keyframe closes a loop: the keyframe pair is
   verified like a backend loop candidate and the edge handed to the backend.
5. **Relocalisation** after a loss: retrieved and recent keyframes are tried with a pair
   prediction each; the first whose match fraction reaches ``backend.reloc_min_inlier_fraction``
   and whose Sim(3) solve succeeds gives the pose.

Device step (``mono.device_loop``): on CUDA, matching, validity tests and the Sim(3) solve of
steps 1-2 run as one fixed-shape step with every decision on the device and one host read per
frame, replayed as a CUDA graph (:mod:`~recon_slam.frontend.mono_device`); same results as the
host loops (``'host'``, the default off CUDA).

Memory: keyframes are :class:`CompactKeyframe` objects (float16 points or float32 ray
distances, float16 confidence, uint8 image, no descriptors); :func:`keyframe_bytes` counts a
keyframe's bytes including the encoder tokens the predictor caches for it (about 3.6 MiB
uncalibrated, 3.2 MiB calibrated at 512x384; ``SlamSystem.stats()["memory_per_keyframe_bytes"]``).

The backend verifies loop candidates with :meth:`MonoFrontend.verify_keyframe_pair`: a
symmetric prediction of the keyframe pair, matching both ways, and a Sim(3) from the two
canonical pointmaps. Keyframe poses ``T_world_kf`` and frame poses ``T_kf_frame`` are Sim(3)
matrices; the reported trajectory is their rigid part (the map's scale).

Pixel convention: OpenCV's (centres at integer ``(u, v)``); flat pixel index ``v * W + u``.
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional

import numpy as np
import torch

from recon_slam.config import MonoConfig
from recon_slam.frontend.keyframes import Keyframe, need_new_keyframe
from recon_slam.frontend.matching import iterative_ray_match
from recon_slam.frontend.predictors import TwoViewPrediction
from recon_slam.frontend import fused_ops, mono_device
from recon_slam.frontend.tracking import (
    TrackResult,
    grad_pixel_depth,
    grad_ray_dist,
    huber_weights,
    jacobian_components,
    retract,
    solve_normal_equations,
)
from recon_slam.frontend.tracking_device import upload
from recon_slam.geometry.camera import PinholeCamera

if TYPE_CHECKING:  # pragma: no cover
    from recon_slam.system import FrameResult, SlamSystem

log = logging.getLogger(__name__)

__all__ = [
    "PairMatches",
    "SolveResult",
    "MonoFrontend",
    "CompactKeyframe",
    "keyframe_bytes",
    "estimate_camera",
    "fuse_keyframe",
    "match_pair",
    "refine_by_descriptors",
    "sample_grid",
    "sim3_umeyama",
    "snap_to_rays",
    "solve_sim3",
    "unit_rays",
]


# ---------------------------------------------------------------------------- helpers
def sample_grid(height: int, width: int, stride: int, device=None) -> torch.Tensor:
    """(N,) long flat indices ``v * width + u`` of every ``stride``-th pixel (offset ``stride // 2``)."""
    o = stride // 2
    v = torch.arange(o, height, stride, device=device)
    u = torch.arange(o, width, stride, device=device)
    return (v[:, None] * width + u[None, :]).reshape(-1)


_RAYS: dict = {}


def unit_rays(camera: PinholeCamera, dtype=torch.float32, device=None) -> torch.Tensor:
    """(H, W, 3) unit viewing rays of every pixel of ``camera`` in its camera frame (cached)."""
    key = (camera, dtype, str(device))
    r = _RAYS.get(key)
    if r is None:
        if len(_RAYS) > 16:
            _RAYS.clear()
        r = camera.pixel_to_ray(camera.pixel_grid(dtype, device), normalize=True).contiguous()
        _RAYS[key] = r
    return r


def snap_to_rays(X: torch.Tensor, rays: torch.Tensor) -> torch.Tensor:
    """Points (..., 3) moved onto the unit ``rays`` (..., 3) at their own distance ``|X|``."""
    return rays * X.norm(dim=-1, keepdim=True)


def estimate_camera(X: torch.Tensor, C: Optional[torch.Tensor] = None) -> PinholeCamera:
    """Pinhole intrinsics implied by a pointmap (uncalibrated keyframes; display and diagnostics).

    The principal point is the image centre and the focal length the confidence-weighted
    least-squares fit of ``u - cx = f x / z``, ``v - cy = f y / z`` over the valid pixels.

    Args:
        X: (H, W, 3) points in the camera frame; C: optional (H, W) confidence (> 0 valid).
    """
    H, W = X.shape[:2]
    cx, cy = (W - 1) / 2.0, (H - 1) / 2.0
    z = X[..., 2]
    ok = torch.isfinite(X).all(-1) & (z > 1e-6)
    w = (C if C is not None else torch.ones_like(z)).clamp_min(0) * ok
    v, u = torch.meshgrid(torch.arange(H, dtype=X.dtype, device=X.device),
                          torch.arange(W, dtype=X.dtype, device=X.device), indexing="ij")
    iz = 1.0 / z.clamp_min(1e-6)
    a, b = X[..., 0] * iz, X[..., 1] * iz
    num = (w * ((u - cx) * a + (v - cy) * b)).sum()
    den = (w * (a * a + b * b)).sum()
    ratio, den_h = (float(t) for t in torch.stack((num / den, den)).cpu())  # one device read
    f = ratio if den_h > 0 else float(max(W, H))
    if not math.isfinite(f) or f <= 0:
        f = float(max(W, H))
    return PinholeCamera(W, H, f, f, cx, cy)


def sim3_umeyama(x: torch.Tensor, y: torch.Tensor, w: Optional[torch.Tensor] = None) -> np.ndarray:
    """Closed-form weighted Sim(3) ``T`` minimising ``sum w |y - T x|^2`` (Umeyama).

    Args:
        x, y: (3, N) corresponding points (``x`` in the source frame, ``y`` in the target).
        w: (N,) non-negative weights (uniform when None).

    Returns:
        (4, 4) float64 Sim(3) ``T_y_x``.
    """
    x = x.double()
    y = y.double()
    w = torch.ones_like(x[0]) if w is None else w.double().clamp_min(0)
    ws = w / w.sum().clamp_min(1e-300)
    mx = (x * ws).sum(1, keepdim=True)
    my = (y * ws).sum(1, keepdim=True)
    cx, cy = x - mx, y - my
    S = (cy * ws) @ cx.T
    var = (ws * (cx * cx).sum(0)).sum()
    # the 3x3 part on the host: one device read (any device), numpy SVD
    host = torch.cat((S.reshape(-1), mx.reshape(-1), my.reshape(-1), var.reshape(1))).cpu().numpy()
    S_np, mx_np, my_np, var_f = host[:9].reshape(3, 3), host[9:12], host[12:15], float(host[15])
    U, D, Vh = np.linalg.svd(S_np)
    sign = 1.0 if np.linalg.det(U) * np.linalg.det(Vh) >= 0 else -1.0
    F = np.diag([1.0, 1.0, sign])
    R = U @ F @ Vh
    s = float((D * F.diagonal()).sum()) / max(var_f, 1e-300)
    T = np.eye(4)
    T[:3, :3] = s * R
    T[:3, 3] = my_np - s * (R @ mx_np)
    return T


def _scale_of(T: np.ndarray) -> float:
    return float(np.cbrt(np.linalg.det(T[:3, :3])))


def sim3_adjoint_np(T: np.ndarray) -> np.ndarray:
    """(7, 7) adjoint of a Sim(3) matrix (4, 4), ``(rho, phi, sigma)`` order (see :mod:`recon_slam.geometry.lie`)."""
    from recon_slam.geometry import lie

    return lie.sim3_adjoint(torch.as_tensor(T, dtype=torch.float64)).numpy()


# ---------------------------------------------------------------------------- matching
@dataclass
class PairMatches:
    """Matches of sampled view-2 (keyframe) pixels to view-1 (frame) pixels of one pair.

    Attributes:
        src_idx: (N,) long flat pixel index in view 2 (the sampled keyframe pixels ``j``).
        dst_idx: (N,) long flat pixel index in view 1 (the matched frame pixel ``p``).
        uv: (N, 2) continuous view-1 pixel from the ray-space matcher (next initialisation).
        valid: (N,) bool usable matches.
        q: (N,) match weight ``sqrt(Q_1(p) Q_2(j))`` (1 when there are no descriptor confidences).
        valid_fraction: valid matches over N.
        unique_fraction: distinct view-1 cells (``stride x stride``) hit by valid matches, over N.
        valid_count: number of valid matches when already known on the host (None: counted
            from ``valid`` when asked, a device read).
    """

    src_idx: torch.Tensor
    dst_idx: torch.Tensor
    uv: torch.Tensor
    valid: torch.Tensor
    q: torch.Tensor
    valid_fraction: float
    unique_fraction: float
    valid_count: Optional[int] = None

    @property
    def n_valid(self) -> int:
        """Number of valid matches."""
        if self.valid_count is None:
            self.valid_count = int(self.valid.sum())
        return self.valid_count


#: squared ray distance (2 - 2 cos) above which a ray-space match is not refined (~0.1 rad)
_MAX_RAY_COST = 0.01


def refine_by_descriptors(
    D_dst: torch.Tensor, d_src: torch.Tensor, p: torch.Tensor, radius: int = 3, dilations=(5, 4, 3, 2, 1),
    active: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Move matches to the best descriptor score in a dilated local window, coarse to fine.

    For each dilation ``d`` the ``(2 radius + 1)^2`` pixels ``p + d (du, dv)`` are scored by
    the dot product of their descriptor with the source descriptor, and the match moves to
    the best one (the window is re-centred there for the next dilation). Near the border
    the window is shifted inwards so that it stays inside the image (it still contains ``p``).

    Args:
        D_dst: (H, W, F) unit descriptors of the destination view.
        d_src: (N, F) unit descriptors of the source points.
        p: (N, 2) long integer destination pixels ``(u, v)`` (inside the image).
        active: optional (N,) bool; inactive matches are left as they are.

    Returns:
        (N, 2) long refined pixels.
    """
    if D_dst.is_cuda and fused_ops.triton_available():  # one kernel, no compaction (no host sync)
        act = torch.ones(p.shape[0], dtype=torch.bool, device=p.device) if active is None else active
        return fused_ops.refine_descriptors(D_dst, d_src, p, act, radius, dilations)
    idx_act = None if active is None else active.nonzero()[:, 0]  # only the active points
    q = p if idx_act is None else p.index_select(0, idx_act)
    if q.shape[0] == 0:
        return p
    d = d_src if idx_act is None else d_src.index_select(0, idx_act)
    u, v = fused_ops.refine_descriptors_torch(D_dst, d, q[:, 0], q[:, 1], radius, dilations)
    out = torch.stack((u, v), -1).long()
    if idx_act is None:
        return out
    p_all = p.clone()
    p_all[idx_act] = out
    return p_all


def pixel_angle(rays: torch.Tensor) -> float:
    """Median angle (radians) between horizontally adjacent unit rays (H, W, 3) near the image centre."""
    H, W = rays.shape[:2]
    h0, h1 = H // 4, max(H - H // 4, H // 4 + 1)
    a = rays[h0:h1:2, W // 4: W - W // 4 - 1]
    b = rays[h0:h1:2, W // 4 + 1: W - W // 4]
    c = (a * b).sum(-1).clamp(-1.0, 1.0)
    return float(torch.acos(c).median()) if c.numel() else 0.0


def match_pair(
    pred: TwoViewPrediction, src_idx: torch.Tensor, cfg: MonoConfig, uv_init: Optional[torch.Tensor] = None,
    src_valid: Optional[torch.Tensor] = None, stride: Optional[int] = None,
) -> PairMatches:
    """Match view-2 (keyframe) pixels of a pair prediction to view-1 (frame) pixels.

    Iterative projective matching in ray space against the rays of view 1's own pointmap,
    descriptor refinement, then the validity tests: the ray-space solution within
    ``cfg.match_max_angle_px`` pixel angles of the point (out-of-view points end on the
    border), 3D agreement within ``cfg.match_max_distance`` of the point's distance
    (occlusion), positive confidences, descriptor confidences above
    ``cfg.min_descriptor_confidence``.

    Args:
        pred: two-view prediction; ``X_cam`` (H, W, 3) view 1 in its camera, ``X_other``
            (H2, W2, 3) view 2's points in view 1's camera.
        src_idx: (N,) flat view-2 pixel indices to match.
        uv_init: (N, 2) initial view-1 pixels (default: the same pixel position, scaled).
        src_valid: optional (N,) bool extra validity of the sources (e.g. keyframe ``C > 0``).
        stride: cell size of the unique fraction (default ``cfg.match_stride``).

    Returns:
        :class:`PairMatches`.
    """
    X1 = pred.X_cam
    H, W = X1.shape[:2]
    X2 = pred.X_other
    H2, W2 = X2.shape[:2]
    pts = X2.reshape(-1, 3).index_select(0, src_idx)  # (N, 3) in view 1's camera
    n = int(src_idx.numel())
    if uv_init is None:
        us = (src_idx % W2).to(X1.dtype)
        vs = torch.div(src_idx, W2, rounding_mode="floor").to(X1.dtype)
        uv_init = torch.stack(((us + 0.5) * (W / W2) - 0.5, (vs + 0.5) * (H / H2) - 0.5), -1)
    rays = torch.nn.functional.normalize(X1, dim=-1)
    uv, cost = iterative_ray_match(rays, pts, uv_init, max_iter=cfg.match_iterations)
    p = torch.stack((torch.round(uv[:, 0]).clamp(0, W - 1), torch.round(uv[:, 1]).clamp(0, H - 1)), -1).long()
    ok_pts = torch.isfinite(pts).all(-1) & (pts.norm(dim=-1) > 1e-9)
    if src_valid is not None:
        ok_pts &= src_valid
    if pred.D is not None and pred.D_other is not None and cfg.refine_radius > 0 and cfg.refine_dilations:
        # refine only points that landed near their ray (outside the view they end on the border)
        near = ok_pts & (cost < _MAX_RAY_COST)
        d_src = pred.D_other.reshape(-1, pred.D_other.shape[-1]).index_select(0, src_idx)
        p = refine_by_descriptors(pred.D, d_src, p, cfg.refine_radius, cfg.refine_dilations, active=near)
    dst_idx = p[:, 1] * W + p[:, 0]
    Xd = X1.reshape(-1, 3).index_select(0, dst_idx)
    dist = (Xd - pts).norm(dim=-1)
    valid = ok_pts & (dist <= cfg.match_max_distance * pts.norm(dim=-1))
    # the matched ray must point at the point: out-of-view points end on the border, away from it
    ang = pixel_angle(rays) * cfg.match_max_angle_px
    valid &= cost <= 2.0 - 2.0 * math.cos(min(ang, math.pi / 2))
    valid &= pred.C.reshape(-1).index_select(0, dst_idx) > 0
    if pred.C_other is not None:
        valid &= pred.C_other.reshape(-1).index_select(0, src_idx) > 0
    q = torch.ones(n, dtype=X1.dtype, device=X1.device)
    if pred.Q is not None and pred.Q_other is not None:
        q1 = pred.Q.reshape(-1).index_select(0, dst_idx)
        q2 = pred.Q_other.reshape(-1).index_select(0, src_idx)
        thr = cfg.min_descriptor_confidence
        valid &= (q1 > thr) & (q2 > thr)
        q = (q1 * q2).clamp_min(0).sqrt()
    n_valid = int(valid.sum())
    s = int(stride or cfg.match_stride)
    cells = torch.div(p[:, 1], s, rounding_mode="floor") * (W // s + 1) + torch.div(p[:, 0], s, rounding_mode="floor")
    n_unique = int(torch.unique(cells[valid]).numel()) if n_valid else 0
    return PairMatches(src_idx, dst_idx, uv, valid, q, n_valid / max(n, 1), n_unique / max(n, 1), n_valid)


# ---------------------------------------------------------------------------- Sim(3) solve
@dataclass
class SolveResult:
    """Outcome of :func:`solve_sim3`.

    Attributes:
        T: (4, 4) float64 Sim(3) ``T_y_x`` (e.g. ``T_kf_frame``).
        information: (7, 7) float64 Gauss-Newton Hessian for LEFT perturbations of ``T``.
        success: converged to a finite pose with enough matches.
        n_valid: matches with positive weight; inlier_fraction: of those, Huber weight 1 at the end.
        cost: final robust cost per valid match; iterations: Gauss-Newton iterations.
        reason: why it failed ('' on success).
    """

    T: np.ndarray
    information: np.ndarray
    success: bool
    n_valid: int = 0
    inlier_fraction: float = 0.0
    cost: float = float("inf")
    iterations: int = 0
    reason: str = ""


def solve_sim3(
    x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, T_init: np.ndarray, cfg: MonoConfig,
    camera: Optional[PinholeCamera] = None, min_matches: int = 20,
) -> SolveResult:
    """Sim(3) ``T`` with ``y ~ T x`` from fixed matches (Gauss-Newton, Huber IRLS, damping).

    Residuals: with ``camera`` (calibrated; ``x``, ``y`` snapped onto their camera rays) the
    pixel ``pi(T x) - pi(y)`` (2, sigma ``cfg.sigma_pixel``) and ``log z(T x) - log z(y)``
    (1, ``cfg.sigma_depth``); without, the ray direction ``Tx/|Tx| - y/|y|`` (3,
    ``cfg.sigma_ray``) and distance ``|Tx| - |y|`` (1, ``cfg.sigma_dist``). Each match's block
    is whitened, weighted by ``w`` and Huber-weighted on its norm. Steps raising the robust
    cost are undone with ten times the damping. Stops after ``cfg.max_iterations`` or when
    the relative cost decrease or the step norm is below ``cfg.tolerance``.

    Args:
        x: (3, N) source points (e.g. the frame's, frame camera); y: (3, N) matched target
            points (e.g. the keyframe's canonical pointmap, keyframe camera).
        w: (N,) weights (``sqrt(q)``; 0 drops a match).
        T_init: (4, 4) initial Sim(3).
        camera: target intrinsics for the calibrated residual (None: uncalibrated).

    Returns:
        :class:`SolveResult`.
    """
    calibrated = camera is not None
    if calibrated:
        sig = [cfg.sigma_pixel, cfg.sigma_pixel, cfg.sigma_depth]
    else:
        sig = [cfg.sigma_ray] * 3 + [cfg.sigma_dist]
    inv2 = torch.tensor([1.0 / (s * s) for s in sig], dtype=x.dtype, device=x.device)[:, None]
    w0 = w.to(x.dtype) * torch.isfinite(x).all(0) * torch.isfinite(y).all(0)
    x = torch.nan_to_num(x)
    y = torch.nan_to_num(y)
    if calibrated:
        w0 = w0 * (y[2] > 1e-6)
    n_valid = int((w0 > 0).sum())
    T = np.array(T_init, dtype=np.float64).reshape(4, 4)
    if n_valid < min_matches:
        return SolveResult(T, np.zeros((7, 7)), False, n_valid, reason=f"only {n_valid} valid matches")
    k = float(cfg.huber_k)

    def evaluate(Tm: np.ndarray):
        Tt = torch.from_numpy(Tm).to(x)
        q = torch.addmm(Tt[:3, 3:4], Tt[:3, :3], x)
        if calibrated:
            r, G = grad_pixel_depth(q, y, camera)
            wv = w0 * (q[2] > 1e-6)
        else:
            r, G = grad_ray_dist(q, y)
            wv = w0
        r = r * (wv > 0)
        e = ((r * r * inv2).sum(0) * wv).sqrt()
        hw = huber_weights(e, k)
        cost_t = torch.where(e <= k, e * e, 2.0 * k * e - k * k).sum()
        Wt = (wv * hw)[None] * inv2  # (R, N)
        J = jacobian_components(G, q, True).reshape(7, -1)
        Jw = J * Wt.reshape(1, -1)
        # one device read per evaluation: cost, H (7x7), g (7)
        Mt = fused_ops.gram_splitk(Jw[None], torch.cat((J, r.reshape(1, -1)))[None])[0]  # (7, 8) [H | g]
        host = torch.cat((cost_t.reshape(1), Mt.reshape(-1))).double().cpu().numpy()
        Mh = host[1:57].reshape(7, 8)
        return float(host[0]), Mh[:, :7].copy(), Mh[:, 7].copy(), hw, wv

    cost, Hm, g, hw, wv = evaluate(T)
    if not math.isfinite(cost):
        return SolveResult(T, np.zeros((7, 7)), False, n_valid, reason="non-finite cost")
    lam = 1e-6
    it = 0
    for it in range(1, max(int(cfg.max_iterations), 0) + 1):
        dx = solve_normal_equations(Hm, g, lam)
        if dx is None:
            return SolveResult(T, Hm, False, n_valid, reason="singular normal equations", iterations=it)
        T_new = retract(T, dx)
        cost_new, H_new, g_new, hw_new, wv_new = evaluate(T_new)
        step = float(np.linalg.norm(dx))
        if math.isfinite(cost_new) and cost_new <= cost:
            rel = (cost - cost_new) / max(cost, 1e-300)
            T, cost, Hm, g, hw, wv = T_new, cost_new, H_new, g_new, hw_new, wv_new
            lam = max(lam * 0.1, 1e-9)
            if rel < cfg.tolerance or step < cfg.tolerance:
                break
        else:
            lam *= 10.0
            if lam > 1e4 or step < cfg.tolerance:
                break
    live = wv > 0
    n_live = int(live.sum())
    inl = int((live & (hw >= 0.999)).sum()) / max(n_live, 1)
    ok = bool(np.all(np.isfinite(T))) and _scale_of(T) > 0
    return SolveResult(T, Hm, ok, n_live, inl, cost / max(n_live, 1), it, "" if ok else "non-finite pose")


# ---------------------------------------------------------------------------- fusion
def fuse_keyframe(
    X: torch.Tensor, C: torch.Tensor, X_new: torch.Tensor, C_new: torch.Tensor, max_relative_distance: float,
    rays: Optional[torch.Tensor] = None, max_confidence_ratio: float = 50.0, count: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, Optional[int]]:
    """Confidence-weighted running average of a keyframe's canonical pointmap, per pixel.

    ``X <- (C X + c x) / (C + c)``, ``C <- min(C + c, max_confidence_ratio * c)``, for pixels
    where the new point ``x`` (already in the keyframe camera) agrees with the current one
    within ``max_relative_distance`` of its distance (else it is an occlusion or an outlier
    and ignored) or where the keyframe has no point yet. With ``rays`` (calibrated) only the
    distance along the known ray is averaged.

    Args:
        X: (H, W, 3) keyframe pointmap (keyframe camera); C: (H, W) accumulated confidence.
        X_new: (H, W, 3) the keyframe's pixels as predicted by a new pair, moved into the
            keyframe camera; C_new: (H, W) their confidence (0 = skip).
        rays: optional (H, W, 3) unit rays of the keyframe camera.
        count: count the updated pixels (a device read); False returns None for it.

    Returns:
        (X', C', number of updated pixels or None); the inputs are not modified.
    """
    ok = torch.isfinite(X_new).all(-1) & (C_new > 0)
    has = C > 0
    d = (X_new - X).norm(dim=-1)
    ok &= ~has | (d <= max_relative_distance * X.norm(dim=-1))
    c = torch.where(ok, C_new, torch.zeros_like(C_new))
    Ck = torch.where(has, C, torch.zeros_like(C))
    tot = (Ck + c).clamp_min(1e-12)
    if rays is not None:
        r_old = torch.where(has, X.norm(dim=-1), torch.zeros_like(C))
        r_new = torch.where(ok, X_new.norm(dim=-1), torch.zeros_like(C))
        dist = (Ck * r_old + c * r_new) / tot
        X_out = torch.where(ok[..., None], rays * dist[..., None], X)
    else:
        Xn = torch.where(ok[..., None], X_new, torch.zeros_like(X_new))
        Xo = torch.where(has[..., None], X, torch.zeros_like(X))
        X_out = torch.where(ok[..., None], (Ck[..., None] * Xo + c[..., None] * Xn) / tot[..., None], X)
    C_out = torch.where(ok, torch.minimum(Ck + c, max_confidence_ratio * c), C)
    return X_out, C_out, (int(ok.sum()) if count else None)


# ---------------------------------------------------------------------------- compact keyframes
# Module defaults of the keyframe storage and of the bounded map. The proposed configuration
# key of each is in brackets; they are read with ``getattr(config.mono, key, default)``, so
# adding the key to :class:`~recon_slam.config.MonoConfig` takes over.

#: [mono.compact_keyframes] keep keyframe pointmaps compactly (:class:`CompactKeyframe`)
COMPACT_KEYFRAMES = True
#: [mono.reuse_max_distance_ratio] an existing keyframe is a reuse candidate when its centre is
#: within this fraction of the current keyframe's median scene distance from the frame (the
#: map's units are arbitrary in monocular mode) ...
REUSE_MAX_DISTANCE_RATIO = 0.5
#: ... and its optical axis within ``backend.cover_max_angle_deg`` of the frame's.
#: [mono.reuse_max_candidates] pair predictions tried at most per would-be new keyframe
REUSE_MAX_CANDIDATES = 3
#: [mono.reuse_margin] a candidate is reused when ``min(valid, unique match fraction)`` reaches
#: ``keyframes.new_kf_match_threshold`` plus this margin (hysteresis: a candidate barely above
#: the threshold would fire the new-keyframe rule again a few frames later)
REUSE_MARGIN = 0.1
#: [mono.loop_edges_per_reuse] re-anchoring on an old keyframe closes a loop: the current
#: keyframe is verified against the reused one and its neighbours (ids +-1), at most this many
#: pairs, one loop edge each
LOOP_EDGES_PER_REUSE = 3
#: [mono.uv_cache_size] keyframes whose last matches are kept to initialise the matcher (the
#: cache would otherwise grow by (H W / stride^2) x 2 floats per keyframe)
UV_CACHE_SIZE = 4

_HALF_MAX = 65000.0


def _mono_option(cfg: MonoConfig, key: str, default):
    return getattr(cfg, key, default)


def _hash_uniform(n: int, salt: int, device) -> torch.Tensor:
    """(n,) deterministic pseudo-random numbers in [0, 1) (integer hash of index and ``salt``)."""
    x = (torch.arange(n, device=device, dtype=torch.int64) + (int(salt) * 0x9E3779B1)) & 0xFFFFFFFF
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & 0xFFFFFFFF
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & 0xFFFFFFFF
    x = x ^ (x >> 16)
    return (x & 0xFFFFFF).to(torch.float32) * (1.0 / 16777216.0)


def to_half_stochastic(x: torch.Tensor, salt: int = 0) -> torch.Tensor:
    """float32 -> float16 with stochastic rounding (unbiased; values clamped to +-65000).

    Each value is rounded to one of its two neighbouring float16 values with probabilities
    that make the result exact on average. A running average stored in float16 then keeps
    averaging when its increments fall below float16's resolution (round-to-nearest would
    freeze it). The random numbers are a hash of the element index and ``salt``
    (reproducible, device-independent).
    """
    x = x.float().clamp(-_HALF_MAX, _HALF_MAX)
    h = x.half()
    hf = h.float()
    r = x - hf  # exact; |r| <= half the spacing on r's side
    inf = torch.full_like(h, float("inf"))
    other = torch.nextafter(h, torch.where(r > 0, inf, -inf))
    gap = (other.float() - hf).abs().clamp_min(1e-30)
    u = _hash_uniform(x.numel(), salt, x.device).reshape(x.shape)
    return torch.where(u < r.abs() / gap, other, h)


class CompactKeyframe(Keyframe):
    """Monocular keyframe with a compact pointmap (see :func:`keyframe_bytes` for the budget).

    Storage, per pixel: uncalibrated ``X`` as float16 (H, W, 3) written with stochastic
    rounding (:func:`to_half_stochastic`: the confidence-weighted running average of fusion
    stays unbiased); calibrated only the distance along the known unit ray (H, W) float32
    (the points are on the rays by construction); ``C`` float16 (clamped to 65000); the
    image uint8. ``X`` and ``C`` read as float32 tensors decoded on the fly, so tracking and
    fusion compute in float32 and every reader (:meth:`snapshot`, backend, export, map
    saving) is unchanged. No descriptors are kept: every tracking step decodes (frame,
    keyframe) and gets the keyframe's descriptors from that pass (view 2).

    Args:
        *args, **kwargs: the :class:`~recon_slam.frontend.keyframes.Keyframe` fields.
        extra_bytes: optional callable returning bytes held elsewhere for this keyframe
            (the predictor's cached encoder tokens); counted by :meth:`memory_bytes`.
    """

    def __init__(self, *args, extra_bytes: Optional[Callable[[], int]] = None, **kwargs) -> None:
        d = self.__dict__
        d["_ready"] = False
        d["_extra_bytes"] = extra_bytes
        super().__init__(*args, **kwargs)
        d["_ready"] = True
        self.X, self.C = d.pop("_Xraw"), d.pop("_Craw")

    # X and C: float32 views of the compact storage
    @property  # type: ignore[override]
    def X(self) -> torch.Tensor:
        d = self.__dict__
        if not d["_ready"]:
            return d["_Xraw"]
        s = d["_Xs"]
        if s.dim() == 2:  # distance along the unit rays
            return unit_rays(self.camera, torch.float32, s.device) * s[..., None]
        return s.float()

    @X.setter
    def X(self, value: torch.Tensor) -> None:
        d = self.__dict__
        if not d["_ready"]:
            d["_Xraw"] = value
            return
        if self.calibrated and tuple(value.shape[:2]) == (self.camera.height, self.camera.width):
            d["_Xs"] = value.float().norm(dim=-1)
        else:
            d["_Xs"] = to_half_stochastic(value, salt=self.id * 1000003 + self._version)

    @property  # type: ignore[override]
    def C(self) -> torch.Tensor:
        d = self.__dict__
        return d["_Cs"].float() if d["_ready"] else d["_Craw"]

    @C.setter
    def C(self, value: torch.Tensor) -> None:
        d = self.__dict__
        if not d["_ready"]:
            d["_Craw"] = value
            return
        d["_Cs"] = value.float().clamp(max=_HALF_MAX).half()

    @property
    def shape(self) -> tuple[int, int]:
        """(H, W)."""
        return tuple(self.__dict__["_Cs"].shape)  # type: ignore[return-value]

    def stored_tensors(self) -> dict[str, Optional[torch.Tensor]]:
        """The tensors actually held (compact forms), by part."""
        d = self.__dict__
        return {"image": self.image, "points": d["_Xs"], "confidence": d["_Cs"], "D": self.D, "Q": self.Q}

    def memory_bytes(self) -> int:
        """Bytes of everything held for this keyframe, cached encoder tokens included."""
        return keyframe_bytes(self)["total"]


def _nbytes(t: Optional[torch.Tensor]) -> int:
    return 0 if t is None else int(t.element_size() * t.numel())


def keyframe_bytes(kf: Keyframe, predictor: Any = None) -> dict[str, int]:
    """Bytes held for one keyframe, by part.

    Counts every tensor the keyframe holds (in its stored form: float16 / distance-only
    pointmaps of a :class:`CompactKeyframe`), the tracking pyramid cache if any, and the
    encoder tokens of its frame cached by the predictor (``predictor.cache_bytes(frame_index)``,
    or the keyframe's own ``extra_bytes`` hook when ``predictor`` is None).

    Returns:
        ``{"image", "points", "confidence", "descriptors", "pyramid", "tokens", "total"}``.
    """
    if isinstance(kf, CompactKeyframe):
        st = kf.stored_tensors()
    else:
        st = {"image": kf.image, "points": kf.X, "confidence": kf.C, "D": kf.D, "Q": kf.Q}
    out = {"image": _nbytes(st["image"]), "points": _nbytes(st["points"]), "confidence": _nbytes(st["confidence"]),
           "descriptors": _nbytes(st["D"]) + _nbytes(st["Q"])}
    pyr = 0
    for _, refs in list(kf._pyr_cache.values()):
        for r in refs:
            pyr += _nbytes(r.geo) + _nbytes(r.photo)
    out["pyramid"] = pyr
    tok = 0
    if predictor is not None and hasattr(predictor, "cache_bytes"):
        tok = int(predictor.cache_bytes(kf.frame_index))
    else:
        fn = kf.__dict__.get("_extra_bytes")
        if fn is not None:
            tok = int(fn())
    out["tokens"] = tok
    out["total"] = sum(out.values())
    return out


# ---------------------------------------------------------------------------- frontend
class MonoFrontend:
    """The monocular per-frame logic of a :class:`~recon_slam.system.SlamSystem` (see module doc).

    It uses the system's keyframe map, backend, frame records and pose bookkeeping; the
    system calls :meth:`process` for every frame when its predictor is two-view.

    Args:
        system: the owning engine.
    """

    def __init__(self, system: "SlamSystem") -> None:
        self.system = system
        self.config = system.config
        self.mono: MonoConfig = system.config.mono
        self.predictor = system.predictor
        self.reset()

    def reset(self) -> None:
        """Forget the per-keyframe match caches and the relocalisation counters."""
        self._uv_cache: "OrderedDict[int, torch.Tensor]" = OrderedDict()
        self._samples: dict[tuple, torch.Tensor] = {}
        self._uv_default: dict[tuple, torch.Tensor] = {}
        self._step_graphs: dict = {}  # CUDA graphs of the device step (mono_device.run_step)
        self._deferred_blank = ""  # why the last frame tracked with a deferred blank test is blank
        self.n_reloc_attempts = 0
        #: would-be new keyframes replaced by an existing keyframe (bounded map)
        self.n_reused = 0
        #: pair predictions made to test reuse candidates
        self.n_reuse_attempts = 0
        #: loop edges reported to the backend when re-anchoring on an old keyframe
        self.n_loop_edges = 0
        self._loop_pairs: dict[tuple[int, int], bool] = {}  # keyframe pairs tried: verified or not

    # ------------------------------------------------------------------ small helpers
    @property
    def calibrated(self) -> bool:
        """Whether the known intrinsics are used (``mono.calibrated``)."""
        return bool(self.mono.calibrated)

    def _cache_uv(self, kf_id: int, uv: torch.Tensor) -> None:
        """Remember a keyframe's last matches (a small LRU: not a per-keyframe cost)."""
        self._uv_cache[kf_id] = uv
        self._uv_cache.move_to_end(kf_id)
        limit = max(int(_mono_option(self.mono, "uv_cache_size", UV_CACHE_SIZE)), 1)
        while len(self._uv_cache) > limit:
            self._uv_cache.popitem(last=False)

    def _sample_idx(self, H: int, W: int, device) -> torch.Tensor:
        key = (H, W, str(device))
        s = self._samples.get(key)
        if s is None:
            s = self._samples[key] = sample_grid(H, W, self.mono.match_stride, device)
        return s

    def device_loop(self, device) -> str:
        """The tracking step used on ``device``: 'host', 'device' or 'graph' (``mono.device_loop``)."""
        mode = str(_mono_option(self.mono, "device_loop", "auto"))
        if mode == "auto":  # H200, 512x384 (bench_mono_engine.py): graph 9.6 ms, host 29 ms per frame
            return "graph" if torch.device(device).type == "cuda" else "host"
        return mode

    def _default_uv(self, src: torch.Tensor, shape1: tuple, shape2: tuple, dtype) -> torch.Tensor:
        """(N, 2) identity initialisation of the matcher (as :func:`match_pair`), cached per shape."""
        key = (tuple(shape1), tuple(shape2), int(src.numel()), dtype, str(src.device), int(self.mono.match_stride))
        uv = self._uv_default.get(key)
        if uv is None:
            (H, W), (H2, W2) = shape1, shape2
            us = (src % W2).to(dtype)
            vs = torch.div(src, W2, rounding_mode="floor").to(dtype)
            uv = torch.stack(((us + 0.5) * (W / W2) - 0.5, (vs + 0.5) * (H / H2) - 0.5), -1)
            if len(self._uv_default) > 8:
                self._uv_default.clear()
            self._uv_default[key] = uv
        return uv

    def _frame_points(self, pred: TwoViewPrediction) -> torch.Tensor:
        """(H, W, 3) frame pointmap of a prediction, snapped onto the camera rays when calibrated."""
        if self.calibrated:
            return snap_to_rays(pred.X_cam, unit_rays(pred.camera, pred.X_cam.dtype, pred.X_cam.device))
        return pred.X_cam

    def _blank(self, pred: TwoViewPrediction) -> str:
        if pred.valid_fraction <= 0.01:
            return "no valid points"
        if self.config.tracking.lost_on_black_image:
            img = pred.image
            if img.numel() == 0:
                return "black image"
            m = pred.image_max  # host value when known (the device step reads it with its result)
            if (int(img.max()) if m is None else m) <= 2:
                return "black image"
        return ""

    def _new_keyframe(self, frame, pred: TwoViewPrediction, T_world_kf: np.ndarray) -> Keyframe:
        sysm = self.system
        cam = pred.camera if self.calibrated else estimate_camera(pred.X_cam, pred.C)
        fields = dict(id=sysm.keyframe_map.next_id(), frame_index=frame.index, stamp=float(frame.stamp), camera=cam,
                      image=pred.image, metric=False, D=None, Q=None, calibrated=self.calibrated)
        if _mono_option(self.mono, "compact_keyframes", COMPACT_KEYFRAMES):
            fn = getattr(self.predictor, "cache_bytes", None)
            index = int(frame.index)
            extra = (lambda: int(fn(index))) if fn is not None else None
            # the compact storage copies (float16 / distances): no clone needed
            kf = CompactKeyframe(X=self._frame_points(pred), C=pred.C, extra_bytes=extra, **fields)
        else:
            kf = Keyframe(X=self._frame_points(pred).clone(), C=pred.C.clone(), **fields)
        sysm.keyframe_map.add(kf, T_world_kf)
        hook = getattr(self.predictor, "on_keyframe", None)
        if hook is not None:
            hook(frame.index)
        return kf

    # ------------------------------------------------------------------ tracking
    def track(self, pred: TwoViewPrediction, kf: Keyframe, T_init: Optional[np.ndarray],
              use_cache: bool = True, min_fraction: Optional[float] = None,
              blank_check: bool = False) -> tuple[TrackResult, PairMatches]:
        """Estimate ``T_kf_frame`` (Sim(3)) of a frame from its pair prediction with ``kf``.

        ``mono.device_loop`` selects the host loops or the device step
        (:mod:`~recon_slam.frontend.mono_device`, one host read); both give the same result.

        Args:
            pred: prediction of the pair (frame, ``kf``).
            kf: the keyframe (its canonical pointmap is the target).
            T_init: (4, 4) initial ``T_kf_frame`` (its scale is re-estimated from the matched
                distances); None for a closed-form (Umeyama) initialisation.
            use_cache: initialise the matcher from the previous frame's matches to ``kf``.
            min_fraction: valid-match fraction needed (default ``mono.min_valid_fraction``).
            blank_check: device step only: the blank-frame test (:meth:`_blank`) was deferred
                to this step's read; a blank frame returns a failure and sets
                ``_deferred_blank`` to the reason.

        Returns:
            (:class:`~recon_slam.frontend.tracking.TrackResult` with a (7, 7) information,
            :class:`PairMatches`).
        """
        m_cfg = self.mono
        Xk, Ck = kf.snapshot()
        mode = self.device_loop(Ck.device)
        if mode != "host":
            return self._track_device(pred, kf, Xk, Ck, T_init, use_cache, min_fraction, mode == "graph", blank_check)
        Hk, Wk = Ck.shape
        src = self._sample_idx(Hk, Wk, Ck.device)
        uv0 = self._uv_cache.get(kf.id) if use_cache else None
        if uv0 is not None and uv0.shape[0] != src.shape[0]:
            uv0 = None
        kf_valid = Ck.reshape(-1).index_select(0, src) > 0
        m = match_pair(pred, src, m_cfg, uv_init=uv0, src_valid=kf_valid)
        need = m_cfg.min_valid_fraction if min_fraction is None else min_fraction
        if m.valid_fraction < need:
            if use_cache:  # a stale initialisation can cause a loss: retry from the identity once
                self._uv_cache.pop(kf.id, None)
                if uv0 is not None:
                    return self.track(pred, kf, T_init, use_cache=False, min_fraction=min_fraction)
            return TrackResult(np.eye(4) if T_init is None else T_init, False, m.n_valid, m.valid_fraction,
                               m.unique_fraction, np.zeros((7, 7)),
                               reason=f"valid match fraction {m.valid_fraction:.3f} below {need}"), m
        self._cache_uv(kf.id, m.uv)
        Xf = self._frame_points(pred)
        x = Xf.reshape(-1, 3).index_select(0, m.dst_idx).T.contiguous()
        y = Xk.reshape(-1, 3).index_select(0, m.src_idx).T.contiguous()
        w = m.q.sqrt() * m.valid
        cam = kf.camera if self.calibrated else None
        live = m.valid
        if T_init is None:
            T0 = sim3_umeyama(x[:, live], y[:, live], w[live])
        else:
            T0 = np.array(T_init, dtype=np.float64)
            s0 = _scale_of(T0)
            nx = float(x[:, live].norm(dim=0).median())
            ny = float(y[:, live].norm(dim=0).median())
            s = ny / max(nx, 1e-12)
            T0[:3, :3] *= s / max(s0, 1e-12)
        sol = solve_sim3(x, y, w, T0, m_cfg, camera=cam)
        if T_init is not None and (not sol.success or sol.inlier_fraction < 0.5):
            sol2 = solve_sim3(x, y, w, sim3_umeyama(x[:, live], y[:, live], w[live]), m_cfg, camera=cam)
            if sol2.success and (not sol.success or sol2.cost < sol.cost):
                sol = sol2
        tr = TrackResult(sol.T, sol.success, m.n_valid, m.valid_fraction, m.unique_fraction, sol.information,
                         sol.cost, sol.iterations, sol.reason, inlier_fraction=sol.inlier_fraction * m.valid_fraction)
        return tr, m

    def _track_device(self, pred: TwoViewPrediction, kf: Keyframe, Xk: torch.Tensor, Ck: torch.Tensor,
                      T_init: Optional[np.ndarray], use_cache: bool, min_fraction: Optional[float], graphed: bool,
                      blank_check: bool = False) -> tuple[TrackResult, PairMatches]:
        """:meth:`track` with the device step (:func:`~recon_slam.frontend.mono_device.mono_step`).

        Matching, validity tests, the scale-corrected prior and Umeyama initialisations, both
        Sim(3) solves and the fallback choice run on the device; one host read gives the pose,
        information and counts. The retry from the identity initialisation after a stale
        cached one (valid fraction below the threshold) is a second step.
        """
        m_cfg = self.mono
        dev = Ck.device
        Hk, Wk = Ck.shape
        src = self._sample_idx(Hk, Wk, dev)
        X1 = pred.X_cam
        shape1, shape2 = tuple(X1.shape[:2]), tuple(pred.X_other.shape[:2])
        uv0 = self._uv_cache.get(kf.id) if use_cache else None
        if uv0 is not None and uv0.shape[0] != src.shape[0]:
            uv0 = None
        cached = uv0 is not None
        if uv0 is None:
            uv0 = self._default_uv(src, shape1, shape2, X1.dtype)
        if T_init is not None:
            T0 = np.array(T_init, dtype=np.float64).reshape(4, 4)
            T_in = np.append(T0.reshape(-1), max(_scale_of(T0), 1e-12))
        else:
            T_in = np.append(np.eye(4).reshape(-1), 1.0)
        feat = pred.D.shape[-1] if (pred.D is not None and pred.D_other is not None) else 0
        has_q = pred.Q is not None and pred.Q_other is not None
        extra = None
        if blank_check and pred.image_max is None and pred.image.numel() > 0:
            extra = pred.image.max().reshape(1)
        cam = kf.camera if self.calibrated else None
        spec = mono_device.StepSpec.build(m_cfg, shape1, shape2, src.numel(), feat, has_q, pred.C_other is not None,
                                          cam, T_init is not None, dev, n_extra=0 if extra is None else 1)
        inputs = [X1, pred.C, pred.X_other, Xk, Ck, src, uv0, upload(T_in, dev)]
        if cam is not None:
            inputs.append(unit_rays(pred.camera, X1.dtype, dev))
        if spec.feat:
            inputs += [pred.D, pred.D_other]
        if has_q:
            inputs += [pred.Q, pred.Q_other]
        if pred.C_other is not None:
            inputs.append(pred.C_other)
        if extra is not None:
            inputs.append(extra)
        packed, uv, dst, valid, q = mono_device.run_step(spec, inputs, graphed, self._step_graphs)
        r = mono_device.parse_step(packed.cpu().numpy())  # the one host read of the frame
        n = max(int(src.numel()), 1)
        vf, uf = r.n_valid / n, r.n_unique / n
        m = PairMatches(src, dst, uv, valid, q, vf, uf, r.n_valid)
        T_fail = np.eye(4) if T_init is None else T_init
        if blank_check:
            pred.valid_count = r.n_frame_valid
            if extra is not None:
                pred.image_max = int(r.extra[0])
            blank = self._blank(pred)
            if blank:
                self._deferred_blank = blank
                return TrackResult(T_fail, False, r.n_valid, vf, uf, np.zeros((7, 7)), reason=blank), m
        need = m_cfg.min_valid_fraction if min_fraction is None else min_fraction
        if vf < need:
            if use_cache:  # a stale initialisation can cause a loss: retry from the identity once
                self._uv_cache.pop(kf.id, None)
                if cached:
                    return self._track_device(pred, kf, Xk, Ck, T_init, False, min_fraction, graphed)
            return TrackResult(T_fail, False, r.n_valid, vf, uf, np.zeros((7, 7)),
                               reason=f"valid match fraction {vf:.3f} below {need}"), m
        self._cache_uv(kf.id, uv)
        tr = TrackResult(r.T, r.success, r.n_valid, vf, uf, r.information, r.cost, r.iterations, r.reason,
                         inlier_fraction=r.inlier_fraction * vf)
        return tr, m

    # ------------------------------------------------------------------ main entry
    def process(self, frame) -> "FrameResult":
        """Track one frame (monocular); see :meth:`recon_slam.system.SlamSystem.process`."""
        from recon_slam.system import FrameResult

        sysm = self.system
        t0 = time.perf_counter()
        kf = sysm.keyframe_map.get(sysm._kf_id) if sysm._kf_id is not None else None
        pred = self.predictor.predict(frame, kf)
        # device step: the blank-frame test (valid count, image maximum) is read with the
        # tracking result, no extra host synchronisation
        defer = (kf is not None and sysm._lost_since is None and pred.X_other is not None
                 and self.device_loop(pred.X_cam.device) != "host")
        blank = "" if defer else self._blank(pred)
        t0 = sysm._tick("predict", t0)
        if kf is None:  # first keyframe
            if blank:
                sysm._record(frame, -1, np.eye(4), "initialising")
                return FrameResult(frame.index, frame.stamp, np.eye(4), "initialising", False, -1, reason=blank)
            new = self._new_keyframe(frame, pred, np.eye(4))
            sysm._kf_id = new.id
            sysm._T_kf_last = np.eye(4)
            sysm._push_good_pose(np.eye(4), reset_velocity=True)
            sysm._last_good_index = frame.index
            if sysm.backend is not None:
                sysm.backend.add_keyframe(new, None, None)
            sysm._record(frame, new.id, np.eye(4), "initialising")
            n = int((pred.C > 0).sum())
            return FrameResult(frame.index, frame.stamp, np.eye(4), "initialising", True, new.id, n, 1.0, 1.0)
        if blank:
            return sysm._lost(frame, blank)
        if sysm._lost_since is not None:
            return self._relocalise(frame, pred)
        T_init = sysm._T_kf_last if sysm._T_kf_last is not None else np.eye(4)
        self._deferred_blank = ""
        tr, m = self.track(pred, kf, T_init, blank_check=defer)
        t0 = sysm._tick("track", t0)
        if self._deferred_blank:
            return sysm._lost(frame, self._deferred_blank)
        if not tr.success:
            return sysm._lost(frame, tr.reason, tr)
        res = self._accept(frame, pred, kf, tr, "tracking")
        sysm._tick("map", t0)
        return res

    def _accept(self, frame, pred: TwoViewPrediction, kf: Keyframe, tr: TrackResult, state: str) -> "FrameResult":
        from recon_slam.system import FrameResult

        sysm = self.system
        cfg = self.config
        T_kf_frame = tr.T_kf_frame
        if cfg.keyframes.fusion and pred.X_other is not None and pred.other_index == kf.frame_index:
            self._fuse(kf, pred, T_kf_frame)
        is_kf = need_new_keyframe(tr.valid_fraction, tr.unique_fraction, cfg.keyframes.new_kf_match_threshold)
        kf_id = kf.id
        if is_kf:
            reuse = self._reuse_keyframe(frame, kf, T_kf_frame)
            if reuse is not None:  # bounded map: an existing keyframe covers this view
                kf_old, kf, tr = kf, reuse[0], reuse[1]
                self._report_loop(kf_old, T_kf_frame, kf, tr)
                T_kf_frame = tr.T_kf_frame
                sysm._kf_id = kf_id = kf.id
                is_kf = False
                self.n_reused += 1
        if is_kf:
            T_world_new = sysm.keyframe_map.pose(kf.id) @ T_kf_frame
            new = self._new_keyframe(frame, pred, T_world_new)
            if sysm.backend is not None:
                sysm.backend.add_keyframe(new, T_kf_frame.copy(), tr.information.copy(), ref_id=kf.id)
            sysm._kf_id = kf_id = new.id
            T_kf_frame = np.eye(4)
        sysm._T_kf_last = T_kf_frame
        T_world = sysm._pose_world(kf_id, T_kf_frame)
        sysm._push_good_pose(T_world, reset_velocity=(state == "relocalised"))
        sysm._last_good_index = frame.index
        sysm._record(frame, kf_id, T_kf_frame, state)
        return FrameResult(frame.index, frame.stamp, T_world, state, is_kf, kf_id, tr.n_valid,
                           tr.valid_fraction, tr.unique_fraction)

    # ------------------------------------------------------------------ bounded map
    def _reuse_candidates(self, current: Keyframe, T_world_frame: np.ndarray) -> list[int]:
        """Keyframes near the frame (pose gates relative to the scene distance), nearest first."""
        sysm = self.system
        cfg = self.config
        ids, poses = sysm.keyframe_map.poses()
        if len(ids) < 2:
            return []
        exclude = {current.id}
        if not cfg.backend.loop_closure:  # re-anchoring on an old keyframe is a loop closure
            exclude |= {i for i in ids if sysm._is_loop_keyframe(current.id, i)}
        # scene distance of the current keyframe in map units (Sim(3): its scale times its points')
        X, C = current.snapshot()
        ok = (C > 0) & torch.isfinite(X).all(-1)
        if not bool(ok.any()):
            return []
        d_scene = float(X[ok].norm(dim=-1).median()) * _scale_of(sysm.keyframe_map.pose(current.id))
        s_f = _scale_of(T_world_frame)
        if not (d_scene > 0 and math.isfinite(d_scene) and s_f > 0):
            return []
        d = np.linalg.norm(poses[:, :3, 3] - T_world_frame[:3, 3], axis=1) / d_scene
        z_kf = poses[:, :3, 2] / np.linalg.norm(poses[:, :3, 2], axis=1, keepdims=True)
        z_f = T_world_frame[:3, 2] / s_f
        ang = np.degrees(np.arccos(np.clip(z_kf @ z_f, -1.0, 1.0)))
        max_d = float(_mono_option(self.mono, "reuse_max_distance_ratio", REUSE_MAX_DISTANCE_RATIO))
        max_a = float(getattr(cfg.backend, "cover_max_angle_deg", 35.0))
        order = np.argsort(d + ang / max(max_a, 1e-9) * max_d)
        k_max = max(int(_mono_option(self.mono, "reuse_max_candidates", REUSE_MAX_CANDIDATES)), 0)
        return [ids[i] for i in order if d[i] <= max_d and ang[i] <= max_a and ids[i] not in exclude][:k_max]

    def _report_loop(self, current: Keyframe, T_cur_frame: np.ndarray, reused: Keyframe, tr: TrackResult) -> None:
        """Give the backend the loop edge when tracking re-anchors on an old keyframe.

        Re-anchoring on a recent keyframe adds nothing; on an old one (``backend.
        loop_min_keyframe_gap``) it closes a loop. The edge is measured like the backend's
        loop edges (:meth:`verify_keyframe_pair`: symmetric pair prediction of the two
        keyframes, their fused pointmaps): chaining the frame's two tracking results (what
        the RGB-D path does) is several times less accurate with two-view predictions, and
        one loop edge is all a revisit gives a bounded map. When the pair does not verify,
        the chained edge is reported (:meth:`~recon_slam.system.SlamSystem._report_reuse_loop`).
        """
        sysm = self.system
        b = sysm.backend
        if b is None or not hasattr(b, "add_edge") or not sysm._is_loop_keyframe(current.id, reused.id):
            return
        n_max = max(int(_mono_option(self.mono, "loop_edges_per_reuse", LOOP_EDGES_PER_REUSE)), 1)
        pairs = [(reused.id, current.id)] + [
            (i, j) for i, j in ((reused.id, current.id - 1), (reused.id + 1, current.id), (reused.id - 1, current.id))
            if i in sysm.keyframe_map and j in sysm.keyframe_map and sysm._is_loop_keyframe(j, i)]
        n_ok = 0
        for i, j in pairs[:n_max]:
            if (i, j) in self._loop_pairs:  # tried before (e.g. the previous lap): no duplicate edge
                n_ok += int(self._loop_pairs[(i, j)])
                continue
            self._loop_pairs[(i, j)] = False
            a, c = sysm.keyframe_map.get(i), sysm.keyframe_map.get(j)
            try:
                res = self.verify_keyframe_pair(a, c, float(self.config.backend.verify_min_inlier_fraction))
            except Exception as exc:  # the backend edge must not take the frontend down
                log.warning("loop edge verification %d-%d failed: %s", i, j, exc)
                continue
            log.debug("loop edge %d-%d: %s %.3f %s", i, j, res.success, res.inlier_fraction, res.reason)
            if not res.success:
                continue
            T = res.T_a_b.numpy().astype(np.float64)
            Ad_inv = np.linalg.inv(sim3_adjoint_np(T))
            info_left = Ad_inv.T @ res.information.numpy() @ Ad_inv  # add_edge takes a LEFT-perturbation Hessian
            try:
                b.add_edge(i, j, T, 0.5 * (info_left + info_left.T))
                self._loop_pairs[(i, j)] = True
                n_ok += 1
                self.n_loop_edges += 1
            except Exception as exc:  # the backend must not take the frontend down
                log.warning("backend add_edge failed: %s", exc)
        if n_ok == 0:
            sysm._report_reuse_loop(current.id, T_cur_frame, reused.id, tr)
            self.n_loop_edges += int(tr.inlier_fraction >= self.config.backend.verify_min_inlier_fraction)

    def _reuse_keyframe(self, frame, current: Keyframe, T_cur_frame: np.ndarray):
        """(keyframe, TrackResult) of an existing keyframe that covers the frame, or None.

        Called when the new-keyframe rule fires. Keyframes near the frame's pose are tried
        with a pair prediction each (frame, candidate) and the Sim(3) tracking initialised
        from the map poses; a candidate is accepted when its match fractions pass the
        new-keyframe rule with a margin (``min(valid, unique) >= new_kf_match_threshold +
        REUSE_MARGIN``); the best one wins. Honours ``backend.reuse_keyframes``; without
        loop closure only recent keyframes (within ``backend.loop_min_keyframe_gap``) qualify.
        """
        sysm = self.system
        cfg = self.config
        if not bool(getattr(cfg.backend, "reuse_keyframes", True)):
            return None
        T_world_frame = sysm.keyframe_map.pose(current.id) @ T_cur_frame
        need = float(cfg.keyframes.new_kf_match_threshold) + float(
            _mono_option(self.mono, "reuse_margin", REUSE_MARGIN))
        best = None
        for kf_id in self._reuse_candidates(current, T_world_frame):
            try:
                cand = sysm.keyframe_map.get(kf_id)
                T_init = np.linalg.inv(sysm.keyframe_map.pose(kf_id)) @ T_world_frame
                p = self.predictor.predict(frame, cand)
            except Exception as exc:  # e.g. no cached tokens: not a reason to stop tracking
                log.debug("reuse candidate %d skipped: %s", kf_id, exc)
                continue
            self.n_reuse_attempts += 1
            tr, _ = self.track(p, cand, T_init, use_cache=False)
            f = min(tr.valid_fraction, tr.unique_fraction)
            if tr.success and f >= need and (best is None or f > best[2]):
                if best is not None:
                    self._uv_cache.pop(best[0].id, None)
                best = (cand, tr, f)
            else:  # its matches of this frame would be a stale initialisation later
                self._uv_cache.pop(kf_id, None)
        return None if best is None else (best[0], best[1])

    def _fuse(self, kf: Keyframe, pred: TwoViewPrediction, T_kf_frame: np.ndarray) -> None:
        """Fuse the keyframe points predicted by this pair (moved into the keyframe) into it."""
        X, C = kf.snapshot()
        if pred.X_other.shape != X.shape:
            return
        # non-blocking upload (a pageable copy would wait for the device); no count read back
        T = upload(np.asarray(T_kf_frame, dtype=np.float64).reshape(4, 4), X.device).to(X.dtype)
        Xn = (pred.X_other.reshape(-1, 3) @ T[:3, :3].T + T[:3, 3]).reshape(X.shape)
        rays = unit_rays(kf.camera, X.dtype, X.device) if self.calibrated else None
        Cn = pred.C_other if pred.C_other is not None else torch.ones_like(C)
        X2, C2, _ = fuse_keyframe(X, C, Xn, Cn, self.mono.fusion_max_distance, rays,
                                  float(self.config.keyframes.max_fused_frames), count=False)
        kf.set_pointmap(X2, C2, fused=1)

    # ------------------------------------------------------------------ relocalisation
    def _reloc_candidates(self, pred: TwoViewPrediction) -> list[int]:
        sysm = self.system
        cfg = self.config
        ids: list[int] = []
        b = sysm.backend
        if b is not None and getattr(b, "retrieval", None) is not None:
            try:
                hits = b.retrieval.query(pred.image, top_k=max(int(cfg.backend.retrieval_top_k), 1),
                                         min_score=float(cfg.backend.retrieval_min_score))
                ids += [int(i) for i, _ in hits]
            except Exception as exc:  # the backend must not take the frontend down
                log.warning("retrieval query failed: %s", exc)
        recent = [sysm._kf_id] + [i for i in reversed(sysm.keyframe_map.ids()) if i != sysm._kf_id]
        ids += recent[: max(int(cfg.keyframes.reloc_candidates), 1)]
        out: list[int] = []
        for i in ids:
            if i not in out and i in sysm.keyframe_map:
                out.append(i)
        return out

    def _relocalise(self, frame, pred: TwoViewPrediction) -> "FrameResult":
        """Link a frame after a loss to a retrieved or recent keyframe; 'relocalised' on success."""
        sysm = self.system
        cfg = self.config
        need = float(cfg.backend.reloc_min_inlier_fraction)
        best = None
        for kf_id in self._reloc_candidates(pred):
            kf = sysm.keyframe_map.get(kf_id)
            p = pred if pred.other_index == kf.frame_index else self.predictor.predict(frame, kf)
            tr, m = self.track(p, kf, None, use_cache=False, min_fraction=need)
            self.n_reloc_attempts += 1
            if tr.success and tr.valid_fraction >= need and (best is None or tr.valid_fraction > best[2].valid_fraction):
                best = (kf, p, tr)
                if tr.valid_fraction >= 0.6:
                    break
        if best is None:
            sysm._n_reloc_fail += 1
            limit = cfg.keyframes.reinit_after_lost
            if limit > 0 and sysm._n_reloc_fail >= limit:
                return self._reinitialise(frame, pred)
            return sysm._lost(frame, "relocalisation failed")
        kf, p, tr = best
        sysm._kf_id = kf.id
        sysm._lost_since = None
        sysm._n_reloc_fail = 0
        sysm._n_reloc += 1
        self._uv_cache.pop(kf.id, None)
        return self._accept(frame, p, kf, tr, "relocalised")

    def _reinitialise(self, frame, pred: TwoViewPrediction) -> "FrameResult":
        """Give up relocalising: new keyframe at the last good pose (no edge to the old map)."""
        from recon_slam.system import FrameResult

        sysm = self.system
        T_kf = sysm._T_kf_last if sysm._T_kf_last is not None else np.eye(4)
        T_world_last = sysm.keyframe_map.pose(sysm._kf_id) @ T_kf  # Sim(3): keeps the local scale
        kf = self._new_keyframe(frame, pred, T_world_last)
        if sysm.backend is not None:
            sysm.backend.add_keyframe(kf, None, None)
        sysm._kf_id = kf.id
        sysm._lost_since = None
        sysm._n_reloc_fail = 0
        sysm._T_kf_last = np.eye(4)
        T_rigid = sysm._pose_world(kf.id, np.eye(4))
        sysm._push_good_pose(T_rigid, reset_velocity=True)
        sysm._last_good_index = frame.index
        sysm._record(frame, kf.id, np.eye(4), "initialising")
        n = int((pred.C > 0).sum())
        return FrameResult(frame.index, frame.stamp, T_rigid, "initialising", True, kf.id, n, 1.0, 1.0,
                           reason="relocalisation failed repeatedly: new keyframe at the last pose")

    # ------------------------------------------------------------------ backend edges
    def verify_keyframe_pair(self, kf_a: Keyframe, kf_b: Keyframe, min_fraction: float = 0.1):
        """Test and measure the edge between two keyframes (runs in the backend thread).

        A symmetric prediction of the pair, (a, b) and (b, a), is matched both ways; the edge
        is kept when the lower valid-match fraction reaches ``min_fraction``. ``T_a_b`` is
        then solved (Umeyama initialisation, Sim(3) Gauss-Newton) from the matched points of
        the two canonical pointmaps.

        Args:
            kf_a, kf_b: the keyframes (``T_a_b`` maps b's coordinates into a's).
            min_fraction: required lower match fraction.

        Returns:
            :class:`~recon_slam.backend.verification.VerificationResult` with ``T_a_b`` (4, 4)
            float64 and the (7, 7) information in the right-perturbation tangent of ``T_a_b``.
        """
        from recon_slam.backend.verification import VerificationResult

        eye = torch.eye(4, dtype=torch.float64)
        zero = torch.zeros(7, 7, dtype=torch.float64)
        fn = getattr(self.predictor, "predict_keyframes", None)
        if fn is None:
            return VerificationResult(False, eye, information=zero, reason="predictor has no pair prediction")
        p_ab = fn(kf_a, kf_b)  # view 1 = a: b's pixels matched into a
        p_ba = fn(kf_b, kf_a)
        Xa, Ca = kf_a.snapshot()
        Xb, Cb = kf_b.snapshot()
        src_b = self._sample_idx(*Cb.shape, Cb.device)
        src_a = self._sample_idx(*Ca.shape, Ca.device)
        m_ab = match_pair(p_ab, src_b, self.mono, src_valid=Cb.reshape(-1).index_select(0, src_b) > 0)
        m_ba = match_pair(p_ba, src_a, self.mono, src_valid=Ca.reshape(-1).index_select(0, src_a) > 0)
        frac = min(m_ab.valid_fraction, m_ba.valid_fraction)
        if frac < min_fraction:
            return VerificationResult(False, eye, frac, zero, reason=f"match fraction {frac:.3f} < {min_fraction}")
        Xa_f, Xb_f = Xa.reshape(-1, 3), Xb.reshape(-1, 3)
        y = torch.cat((Xa_f.index_select(0, m_ab.dst_idx), Xa_f.index_select(0, m_ba.src_idx))).T.contiguous()
        x = torch.cat((Xb_f.index_select(0, m_ab.src_idx), Xb_f.index_select(0, m_ba.dst_idx))).T.contiguous()
        valid = torch.cat((m_ab.valid, m_ba.valid))
        w = torch.cat((m_ab.q, m_ba.q)).sqrt() * valid
        T0 = sim3_umeyama(x[:, valid], y[:, valid], w[valid])
        sol = solve_sim3(x, y, w, T0, self.mono, camera=kf_a.camera if self.calibrated else None)
        s = _scale_of(sol.T) if sol.success else 0.0
        T_t = torch.as_tensor(sol.T, dtype=torch.float64)
        if not sol.success or not (1.0 / 3.0 < s < 3.0):
            return VerificationResult(False, T_t, frac, zero, reason=sol.reason or f"implausible scale {s:.3f}")
        Ad = sim3_adjoint_np(sol.T)
        info = Ad.T @ sol.information @ Ad
        info = 0.5 * (info + info.T)
        return VerificationResult(True, T_t, inlier_fraction=frac, information=torch.as_tensor(info), scale=s)
