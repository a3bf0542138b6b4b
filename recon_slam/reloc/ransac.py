"""DSAC*-style RANSAC over 2D-3D correspondences, batched in torch (CPU or CUDA).

1. Draw minimal sets of 4 correspondences (several times more than needed), solve P3P on
   the first 3 and keep the root that best explains the 4th; a hypothesis survives only
   when all 4 points reproject within the inlier threshold. Rounds of draws repeat (up to
   ``max_rounds``) until ``hypotheses`` sets survive; the first ``hypotheses`` are used.
2. Score every hypothesis by its soft inlier count over all correspondences,
   ``sum(sigmoid(beta (tau - e)))`` with ``beta = 5 / tau`` and errors clamped at
   ``max_error`` (points behind the camera count as ``max_error``).
3. Refine the ``refine_top`` best hypotheses with iterative Gauss-Newton PnP on their
   inliers (:func:`recon_slam.reloc.pnp.refine_pnp`) and return the one with the most
   inliers.

All hypotheses are processed as one batch; only the final result is moved to the host.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from recon_slam.reloc.pnp import invert_pose, p3p4, refine_pnp, reprojection_errors


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
        T_cam_world: (4, 4) float64 tensor, or None when no hypothesis survived.
        inliers: correspondences reprojecting within the threshold (0 when failed).
        inlier_mask: (N,) bool tensor (all False when failed).
        score: soft inlier count of the chosen hypothesis before refinement.
        hypotheses: hypotheses that passed the 4-point check.
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
) -> RansacResult:
    """Camera pose from noisy 2D-3D correspondences.

    Args:
        uv: (N, 2) pixels of the query image (OpenCV convention).
        X: (N, 3) world points (metres), one per pixel.
        K: (3, 3) intrinsics of the pixel frame of ``uv``.
        threshold: inlier threshold ``tau`` in pixels.
        config: see :class:`RansacConfig`.
        valid: optional (N,) bool, False for correspondences to ignore entirely.
        generator: torch generator on ``uv``'s device for reproducible sampling.

    Returns:
        :class:`RansacResult` with ``T_cam_world`` (world -> camera, optical frame).
    """
    device = uv.device
    dt = torch.float64
    uv = uv.to(dt)
    X = X.to(dt)
    K = K.to(device=device, dtype=dt)
    n_all = uv.shape[0]
    if valid is None:
        valid = torch.isfinite(X).all(-1) & torch.isfinite(uv).all(-1)
    else:
        valid = valid & torch.isfinite(X).all(-1) & torch.isfinite(uv).all(-1)
    idx_valid = torch.nonzero(valid).squeeze(-1)
    n = int(idx_valid.numel())
    empty = torch.zeros(n_all, dtype=torch.bool, device=device)
    if n < 4:
        return RansacResult(None, 0, empty, 0.0, 0)
    uv_v, X_v = uv[idx_valid], X[idx_valid]
    n_draw = config.hypotheses * config.oversample
    Rs, ts = [], []
    n_ok = 0
    for _ in range(config.max_rounds):
        sets = torch.randint(0, n, (n_draw, 4), device=device, generator=generator)
        R, t, emax = p3p4(K, uv_v[sets], X_v[sets])
        ok = emax < threshold
        Rs.append(R[ok])
        ts.append(t[ok])
        n_ok += int(ok.sum())
        if n_ok >= config.hypotheses:
            break
    if n_ok == 0:
        return RansacResult(None, 0, empty, 0.0, 0)
    R = torch.cat(Rs)[: config.hypotheses]
    t = torch.cat(ts)[: config.hypotheses]
    e = reprojection_errors(K, R, t, X_v, uv_v, max_error=config.max_error_px)  # (M, n)
    beta = 5.0 / threshold
    score = torch.sigmoid(beta * (threshold - e)).sum(-1)
    top = torch.topk(score, min(config.refine_top, score.numel())).indices
    Rr, tr, inl = refine_pnp(K, R[top], t[top], X_v, uv_v, threshold, iterations=config.refine_iterations)
    best = int(torch.argmax(inl))
    T = torch.eye(4, dtype=dt, device=device)
    T[:3, :3], T[:3, 3] = Rr[best], tr[best]
    e_best = reprojection_errors(K, Rr[best], tr[best], X_v, uv_v, max_error=config.max_error_px)
    mask = empty.clone()
    mask[idx_valid] = e_best < threshold
    return RansacResult(T, int(mask.sum()), mask, float(score[top[best]]), int(R.shape[0]))


def pose_world_cam(result: RansacResult) -> Optional[torch.Tensor]:
    """``T_world_cam`` (4, 4) of a successful result (inverse of ``T_cam_world``), else None."""
    return None if result.T_cam_world is None else invert_pose(result.T_cam_world)
