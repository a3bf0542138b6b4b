"""DSAC*-style RANSAC over 2D-3D correspondences, batched in torch (CPU or CUDA).

1. Draw minimal sets of 4 correspondences (``hypotheses x oversample`` per round, up to
   ``max_rounds`` rounds), solve P3P on the first 3 and keep the root that best explains
   the 4th; a set passes only when all 4 points reproject within the inlier threshold.
   The first ``hypotheses`` passing sets (in drawing order) become the hypotheses. On an
   accelerator all rounds are drawn and solved as one batch (no host round trip decides
   whether another round is needed); on the CPU rounds stop as soon as enough sets pass.
   Both give the same hypotheses for the same random sets.
2. Score every hypothesis by its soft inlier count over all correspondences,
   ``sum(sigmoid(beta (tau - e)))`` with ``beta = 5 / tau`` and errors clamped at
   ``max_error`` (points behind the camera count as ``max_error``).
3. Refine the ``refine_top`` best hypotheses with iterative Gauss-Newton PnP on their
   inliers (:func:`recon_slam.reloc.pnp.refine_normalised`) and return the one with the
   most inliers.

Everything stays on the device; the result (pose and counts) comes back to the host in
one transfer at the end.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from recon_slam.reloc.pnp import (
    focal_pair,
    normalise_pixels,
    intrinsics,
    invert_pose,
    p3p4_normalised,
    refine_normalised,
    squared_errors,
)


@dataclass(frozen=True)
class RansacConfig:
    """Settings of :func:`ransac_pnp`.

    Attributes:
        hypotheses: pose hypotheses scored (64 in DSAC*/ACE).
        oversample: minimal sets drawn per hypothesis and round (those failing the 4-point
            check are dropped).
        max_rounds: drawing rounds at most, until ``hypotheses`` sets pass the check.
        max_error_px: reprojection errors are clamped here (pixels).
        refine_top: best-scoring hypotheses refined (the most inliers after refinement wins).
        refine_iterations: Gauss-Newton steps of the refinement.
    """

    hypotheses: int = 64
    oversample: int = 4
    max_error_px: float = 100.0
    refine_top: int = 4
    refine_iterations: int = 12
    max_rounds: int = 8


@dataclass
class RansacResult:
    """Outcome of :func:`ransac_pnp`.

    Attributes:
        T_cam_world: (4, 4) float64 CPU tensor, or None when no hypothesis survived.
        inliers: correspondences reprojecting within the threshold (0 when failed).
        inlier_mask: (N,) bool tensor on the input's device (all False when failed).
        score: soft inlier count of the chosen hypothesis before refinement.
        hypotheses: hypotheses that passed the 4-point check (at most ``hypotheses``).
    """

    T_cam_world: Optional[torch.Tensor]
    inliers: int
    inlier_mask: torch.Tensor
    score: float
    hypotheses: int


def ransac_pnp(
    uv: torch.Tensor,
    X: torch.Tensor,
    K: torch.Tensor,
    threshold: float,
    config: RansacConfig = RansacConfig(),
    valid: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
    early_exit: Optional[bool] = None,
) -> RansacResult:
    """Camera pose from noisy 2D-3D correspondences.

    Args:
        uv: (N, 2) pixels of the query image (OpenCV convention).
        X: (N, 3) world points (metres), one per pixel (non-finite ones are ignored).
        K: (3, 3) intrinsics of the pixel frame of ``uv`` (best on the CPU: its four
            numbers are read on the host).
        threshold: inlier threshold ``tau`` in pixels.
        config: see :class:`RansacConfig`.
        valid: optional (N,) bool, False for correspondences to ignore entirely.
        generator: torch generator on ``uv``'s device for reproducible sampling.
        early_exit: solve the drawing rounds one by one and stop once ``hypotheses`` sets
            passed (one host read per round); None: only on the CPU. Either way the
            result is the same for the same random sets.

    Returns:
        :class:`RansacResult` with ``T_cam_world`` (world -> camera, optical frame).
    """
    fx, fy, cx, cy = intrinsics(K)
    n = int(uv.shape[0])
    H = int(config.hypotheses)
    if n < 4 or H < 1:
        return RansacResult(None, 0, torch.zeros(n, dtype=torch.bool, device=uv.device), 0.0, 0)
    sets = draw_sets(n, config, uv.device, generator)
    on_host = uv.device.type == "cpu" if early_exit is None else bool(early_exit)
    summary, mask = ransac_on_device(uv, X, (fx, fy, cx, cy), threshold, config, sets, valid, on_host)
    return parse_summary(summary.cpu(), mask, config)  # the one device -> host transfer


def draw_sets(n: int, config: RansacConfig, device, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """(hypotheses x oversample x max_rounds, 4) int64 random minimal sets of indices < ``n``."""
    total = int(config.hypotheses) * max(int(config.oversample), 1) * max(int(config.max_rounds), 1)
    return torch.randint(0, n, (total, 4), device=device, generator=generator)


def ransac_on_device(
    uv: torch.Tensor,
    X: torch.Tensor,
    intrinsics_: tuple[float, float, float, float],
    threshold: float,
    config: RansacConfig,
    sets: torch.Tensor,
    valid: Optional[torch.Tensor] = None,
    early_exit: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Steps 1-3 of :func:`ransac_pnp` for given minimal ``sets`` (:func:`draw_sets`), no host reads
    unless ``early_exit`` (then one per drawing round): a fixed sequence of kernels that a
    CUDA graph can capture.

    Args:
        uv (N, 2), X (N, 3), threshold, config, valid: as :func:`ransac_pnp` (N >= 4);
        intrinsics_: ``(fx, fy, cx, cy)`` of the pixel frame of ``uv``.

    Returns:
        summary (16,) float64 on the device (:func:`parse_summary` reads it: the best
        refined ``T_cam_world`` rows (12), inliers, soft score, passing sets, valid flag)
        and the (N,) bool inlier mask of the best pose.
    """
    device = uv.device
    dt = torch.float64
    fx, fy, cx, cy = intrinsics_
    H = int(config.hypotheses)
    uv = uv.to(dt)
    X = X.to(device=device, dtype=dt)
    ok_pts = torch.isfinite(X).all(-1) & torch.isfinite(uv).all(-1)
    if valid is not None:
        ok_pts = ok_pts & valid.to(device)
    X = torch.where(ok_pts.unsqueeze(-1), X, 0.0)
    uv = torch.where(ok_pts.unsqueeze(-1), uv, 0.0)
    xn, rays = normalise_pixels(uv, fx, fy, cx, cy)
    Xh = torch.cat((X, torch.ones_like(X[:, :1])), -1)
    f2 = focal_pair(fx, fy, X)

    # 1. minimal sets -> hypotheses (first H passing sets in drawing order)
    total = int(sets.shape[0])
    chunk = H * max(int(config.oversample), 1) if early_exit else total
    Rs, ts, oks = [], [], []
    n_pass = 0
    for s0 in range(0, total, chunk):
        s = sets[s0 : s0 + chunk]
        R_c, t_c, emax = p3p4_normalised(rays[s], X[s], xn[s], f2)
        ok_c = (emax < threshold) & ok_pts[s].all(-1)
        Rs.append(R_c)
        ts.append(t_c)
        oks.append(ok_c)
        if early_exit:
            n_pass += int(ok_c.sum())  # a host read: free on the CPU
            if n_pass >= H:
                break
    R = Rs[0] if len(Rs) == 1 else torch.cat(Rs)
    t = ts[0] if len(ts) == 1 else torch.cat(ts)
    ok = oks[0] if len(oks) == 1 else torch.cat(oks)
    m = int(ok.shape[0])
    order = torch.arange(m, device=device)
    sel = torch.topk(torch.where(ok, order, order + m), min(H, m), largest=False).indices
    hyp_ok = ok[sel]
    T = torch.cat((R[sel], t[sel].unsqueeze(-1)), -1)  # (H, 3, 4)

    # 2. soft inlier scores
    max_e = float(config.max_error_px)
    e2 = squared_errors(Xh @ T.transpose(-1, -2), xn, f2)  # (H, n)
    e = torch.where(ok_pts, e2.clamp_max(max_e * max_e).sqrt(), max_e)
    beta = 5.0 / threshold
    score = torch.sigmoid(beta * (threshold - e)).sum(-1)
    score = torch.where(hyp_ok, score, float("-inf"))

    # 3. refine the best few, keep the one with the most inliers
    top = torch.topk(score, min(int(config.refine_top), int(score.shape[0]))).indices
    Tr, e2r = refine_normalised(T[top], Xh, xn, f2, threshold, int(config.refine_iterations), ok_pts.to(dt))
    inl_mask = (e2r < float(threshold) ** 2) & ok_pts  # (k, n)
    inl = torch.where(hyp_ok[top], inl_mask.sum(-1), -1)
    best = torch.argmax(inl).view(1)  # (1,): indexing with a 0-d tensor would read it on the host
    mask = inl_mask[best][0]
    top_best = top[best]
    stats = torch.cat((mask.sum().to(dt).view(1), score[top_best], ok.sum().to(dt).view(1), hyp_ok[top_best].to(dt)))
    return torch.cat((Tr[best].reshape(12), stats)), mask


def parse_summary(host: torch.Tensor, mask: torch.Tensor, config: RansacConfig) -> RansacResult:
    """:class:`RansacResult` from the (16,) CPU summary of :func:`ransac_on_device` and its inlier mask."""
    vals = host.tolist()
    if vals[15] < 0.5:
        return RansacResult(None, 0, torch.zeros_like(mask), 0.0, 0)
    T_out = torch.eye(4, dtype=torch.float64)
    T_out[:3] = host[:12].view(3, 4).double()
    return RansacResult(T_out, int(vals[12]), mask, float(vals[13]), min(int(vals[14]), int(config.hypotheses)))


def pose_world_cam(result: RansacResult) -> Optional[torch.Tensor]:
    """``T_world_cam`` (4, 4) of a successful result (inverse of ``T_cam_world``), else None."""
    return None if result.T_cam_world is None else invert_pose(result.T_cam_world)
