"""Correspondences between pointmaps by matching in ray space.

Given points ``x`` (N, 3) expressed in the camera frame of a *target* view, find the pixel
``p`` of the target image whose viewing ray points at them. For a calibrated pinhole target
this is the projection (:func:`projective_match`); for an uncalibrated target whose rays
are only known through its own pointmap (monocular MASt3R path) it is found by a per-point
Levenberg-Marquardt on the continuous pixel minimising
``|| normalise(ray(p)) - normalise(x) ||^2`` with bilinear interpolation of the ray image
(:func:`iterative_ray_match`). Matches are then rejected when the target has no valid point
there or when the two 3D points are further apart than an occlusion distance.

Pixel convention: OpenCV's (pixel centres at integer ``(u, v)``, ``u`` along the width).
All functions are vectorised over points and run on the tensors' device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from recon_slam.geometry.camera import PinholeCamera


@dataclass
class Matches:
    """Correspondences from N source points to the target image.

    Attributes:
        uv: (N, 2) continuous target pixel of each source point.
        idx: (N,) long flat index ``v * W + u`` of the nearest target pixel (clamped into
            the image; meaningful only where ``valid``).
        valid: (N,) bool, the match is usable.
    """

    uv: torch.Tensor
    idx: torch.Tensor
    valid: torch.Tensor

    @property
    def n_valid(self) -> int:
        """Number of valid matches."""
        return int(self.valid.sum())

    def valid_fraction(self, n_source: Optional[int] = None) -> float:
        """Valid matches over ``n_source`` (default: all N points)."""
        n = self.valid.numel() if n_source is None else n_source
        return float(self.n_valid) / max(int(n), 1)


# ---------------------------------------------------------------------------- sampling
def sample_bilinear(
    image: torch.Tensor, uv: torch.Tensor, with_grad: bool = False
) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Bilinear interpolation of a (H, W, C) map at continuous pixels.

    Args:
        image: (H, W, C) tensor (or (H, W), treated as C = 1).
        uv: (N, 2) pixels; clamped into ``[0, W-1] x [0, H-1]``.
        with_grad: also return the derivatives of the interpolant along ``u`` and ``v``.

    Returns:
        values (N, C), and when ``with_grad`` d/du (N, C) and d/dv (N, C), else None, None.
    """
    if image.dim() == 2:
        image = image[..., None]
    H, W, C = image.shape
    flat = image.reshape(H * W, C)
    u = uv[:, 0].clamp(0, W - 1)
    v = uv[:, 1].clamp(0, H - 1)
    u0 = u.floor().clamp(max=W - 2) if W > 1 else u.floor()
    v0 = v.floor().clamp(max=H - 2) if H > 1 else v.floor()
    a = (u - u0)[:, None]
    b = (v - v0)[:, None]
    i0 = v0.long() * W + u0.long()
    du = 1 if W > 1 else 0
    dv = W if H > 1 else 0
    f00 = flat[i0]
    f01 = flat[i0 + du]
    f10 = flat[i0 + dv]
    f11 = flat[i0 + du + dv]
    top = f00 + a * (f01 - f00)
    bot = f10 + a * (f11 - f10)
    val = top + b * (bot - top)
    if not with_grad:
        return val, None, None
    gu = (1 - b) * (f01 - f00) + b * (f11 - f10)
    gv = bot - top
    return val, gu, gv


def pixel_index(uv: torch.Tensor, width: int, height: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest pixel of continuous pixels (N, 2): flat index (N,) long (clamped) and in-image (N,) bool."""
    ui = torch.round(uv[:, 0])
    vi = torch.round(uv[:, 1])
    inside = (ui >= 0) & (ui <= width - 1) & (vi >= 0) & (vi <= height - 1)
    idx = vi.clamp(0, height - 1).long() * width + ui.clamp(0, width - 1).long()
    return idx, inside


def occlusion_mask(x: torch.Tensor, y: torch.Tensor, max_distance: float) -> torch.Tensor:
    """(N,) bool: True where the matched points x, y (N, 3) are within ``max_distance`` (not occluded)."""
    return (x - y).norm(dim=-1) <= max_distance


# ---------------------------------------------------------------------------- projective
def projective_match(
    points: torch.Tensor,
    camera: PinholeCamera,
    target_valid: Optional[torch.Tensor] = None,
    target_X: Optional[torch.Tensor] = None,
    occlusion_distance: Optional[float] = None,
    min_depth: float = 1e-6,
) -> Matches:
    """Match points to the pixels of a calibrated pinhole target by projection.

    Args:
        points: (N, 3) points in the target camera frame.
        camera: target intrinsics (no distortion), size (W, H) of the target maps.
        target_valid: optional (H, W) bool validity of the target pixels.
        target_X: optional (H, W, 3) target pointmap (target camera frame) for the occlusion
            test ``|| X[p] - x || <= occlusion_distance``.
        occlusion_distance: see ``target_X``.
        min_depth: points with ``z <= min_depth`` do not match.

    Returns:
        :class:`Matches` with the projection as ``uv`` and its nearest pixel as ``idx``.
    """
    uv, z = camera.project(points)
    idx, inside = pixel_index(uv, camera.width, camera.height)
    valid = inside & (z > min_depth)
    if target_valid is not None:
        valid &= target_valid.reshape(-1)[idx]
    if target_X is not None and occlusion_distance is not None:
        valid &= occlusion_mask(points, target_X.reshape(-1, 3)[idx], occlusion_distance)
    return Matches(uv=uv, idx=idx, valid=valid)


# ---------------------------------------------------------------------------- ray space
def ray_image(X: torch.Tensor) -> torch.Tensor:
    """(H, W, 3) unit rays of a pointmap (its points normalised); zero points stay zero."""
    return torch.nn.functional.normalize(X, dim=-1)


def _ray_cost(rays: torch.Tensor, uv: torch.Tensor, target: torch.Tensor, with_jac: bool):
    r, gu, gv = sample_bilinear(rays, uv, with_grad=with_jac)
    norm = r.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    n = r / norm
    res = n - target
    cost = (res * res).sum(-1)
    if not with_jac:
        return cost, res, None
    # d normalise(r) / dr = (I - n n^T) / |r|
    def proj(g):
        return (g - n * (n * g).sum(-1, keepdim=True)) / norm

    J = torch.stack((proj(gu), proj(gv)), dim=-1)  # (N, 3, 2)
    return cost, res, J


def iterative_ray_match(
    rays: torch.Tensor,
    points: torch.Tensor,
    uv_init: torch.Tensor,
    max_iter: int = 10,
    lambda_init: float = 1e-8,
    tol: float = 1e-6,
    active: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Continuous pixels whose interpolated rays point at ``points`` (per-point LM).

    Minimises ``|| normalise(ray(p)) - normalise(x) ||^2`` over ``p`` for every point in
    parallel: bilinear interpolation of the ray image and of its derivatives, a 2x2 damped
    Gauss-Newton step per point, damping x0.1 after an accepted step and x10 after a
    rejected one, at most ``max_iter`` iterations, points stop once their cost is below
    ``tol``.

    Args:
        rays: (H, W, 3) ray image of the target (unit or not; e.g. its pointmap, or the
            calibrated rays ``camera.pixel_to_ray(grid)``), in the target camera frame.
        points: (N, 3) points in the target camera frame.
        uv_init: (N, 2) initial pixels (identity mapping, previous matches, projections).
        active: optional (N,) bool; inactive points keep ``uv_init``.

    Returns:
        uv: (N, 2) refined pixels (inside ``[0, W-1] x [0, H-1]``).
        cost: (N,) final squared ray distance (``2 - 2 cos(angle)``).
    """
    H, W, _ = rays.shape
    target = torch.nn.functional.normalize(points, dim=-1)
    uv = uv_init.clone().to(points.dtype)
    uv[:, 0] = uv[:, 0].clamp(0, W - 1)
    uv[:, 1] = uv[:, 1].clamp(0, H - 1)
    lam = torch.full((uv.shape[0],), lambda_init, dtype=points.dtype, device=points.device)
    cost, res, J = _ray_cost(rays, uv, target, with_jac=True)
    running = torch.ones_like(cost, dtype=torch.bool) if active is None else active.clone()
    lo = torch.zeros(2, dtype=uv.dtype, device=uv.device)
    hi = torch.tensor([W - 1, H - 1], dtype=uv.dtype, device=uv.device)
    for _ in range(max_iter):
        running &= cost > tol
        if not bool(running.any()):
            break
        Jt = J.transpose(1, 2)  # (N, 2, 3)
        A = Jt @ J  # (N, 2, 2)
        g = (Jt @ res[..., None])[..., 0]  # (N, 2)
        a = A[:, 0, 0] + lam
        b = A[:, 0, 1]
        d = A[:, 1, 1] + lam
        det = (a * d - b * b).clamp_min(1e-30)
        step = -torch.stack((d * g[:, 0] - b * g[:, 1], a * g[:, 1] - b * g[:, 0]), dim=-1) / det[:, None]
        cand = torch.maximum(torch.minimum(uv + step, hi), lo)
        cost_new, res_new, J_new = _ray_cost(rays, cand, target, with_jac=True)
        better = running & (cost_new < cost)
        uv = torch.where(better[:, None], cand, uv)
        cost = torch.where(better, cost_new, cost)
        res = torch.where(better[:, None], res_new, res)
        J = torch.where(better[:, None, None], J_new, J)
        lam = torch.where(better, lam * 0.1, torch.where(running, lam * 10.0, lam))
    return uv, cost


def ray_match(
    points: torch.Tensor,
    target_X: torch.Tensor,
    uv_init: torch.Tensor,
    target_valid: Optional[torch.Tensor] = None,
    occlusion_distance: Optional[float] = 0.1,
    max_angle_rad: float = 0.05,
    max_iter: int = 10,
    rays: Optional[torch.Tensor] = None,
) -> Matches:
    """Uncalibrated matching: rays of the target come from its own pointmap.

    Args:
        points: (N, 3) source points expressed in the target camera frame.
        target_X: (H, W, 3) target pointmap (target camera frame).
        uv_init: (N, 2) initial pixels.
        target_valid: optional (H, W) bool validity of the target pixels.
        occlusion_distance: reject when ``|| X[p] - x ||`` exceeds it (None: no test).
        max_angle_rad: reject when the final ray angle exceeds it.
        rays: optional precomputed (H, W, 3) unit ray image (default: ``ray_image(target_X)``).

    Returns:
        :class:`Matches` (``uv`` the refined continuous pixel, ``idx`` its nearest pixel).
    """
    H, W, _ = target_X.shape
    R = ray_image(target_X) if rays is None else rays
    uv, cost = iterative_ray_match(R, points, uv_init, max_iter=max_iter)
    idx, inside = pixel_index(uv, W, H)
    max_cost = 2.0 - 2.0 * torch.cos(torch.tensor(max_angle_rad, dtype=cost.dtype))
    valid = inside & (cost <= max_cost) & torch.isfinite(points).all(-1)
    if target_valid is not None:
        valid &= target_valid.reshape(-1)[idx]
    if occlusion_distance is not None:
        valid &= occlusion_mask(points, target_X.reshape(-1, 3)[idx], occlusion_distance)
    return Matches(uv=uv, idx=idx, valid=valid)


def unique_count(idx: torch.Tensor, valid: torch.Tensor, n_pixels: int) -> torch.Tensor:
    """() long device tensor: target pixels hit by at least one valid match.

    A scatter into a (n_pixels + 1) buffer whose last slot takes the invalid matches: no
    boolean-mask compaction, so no host synchronisation.

    Args:
        idx: (N,) flat target pixel indices in ``[0, n_pixels)``; valid: (N,) bool.
    """
    hit = torch.zeros(int(n_pixels) + 1, dtype=torch.uint8, device=idx.device)
    hit.index_fill_(0, torch.where(valid, idx, int(n_pixels)), 1)
    return hit[:-1].sum()


def unique_fraction(idx: torch.Tensor, valid: torch.Tensor, n_pixels: int, n_target_valid: Optional[int] = None) -> float:
    """Fraction of the target's valid pixels hit by at least one valid match.

    Args:
        idx: (N,) flat target pixel indices in ``[0, n_pixels)``.
        valid: (N,) bool.
        n_pixels: H * W of the target.
        n_target_valid: number of valid target pixels (default ``n_pixels``).
    """
    denom = n_pixels if n_target_valid is None else n_target_valid
    if denom <= 0:
        return 0.0
    return float(unique_count(idx, valid, n_pixels)) / float(denom)
