"""Keyframes, the thread-safe keyframe map, pointmap fusion and the new-keyframe rule.

A :class:`Keyframe` keeps a canonical pointmap ``X`` (H, W, 3) in its own camera frame and
an accumulated confidence ``C`` (H, W); every tracked frame is fused into it with a
confidence-weighted running average ``X <- (C X + c T x) / (C + c)``, ``C <- C + c``.
Its pose ``T_world_kf`` lives in the :class:`KeyframeMap`, which the backend thread updates
after each optimisation (:meth:`KeyframeMap.set_poses`) while the frontend reads it.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

import numpy as np
import torch

from recon_slam.geometry.camera import PinholeCamera
from recon_slam.frontend.tracking import (
    ReferenceLevel,
    build_pyramid,
    project_pixels,
    reference_level,
)


@dataclass(eq=False)
class Keyframe:
    """One keyframe (tensors on the engine's device).

    Attributes:
        id: keyframe id (0, 1, 2, ... in creation order).
        frame_index: index of the frame it was made from; stamp: its time in seconds.
        camera: intrinsics at processing resolution.
        image: (H, W, 3) uint8 RGB.
        X: (H, W, 3) float32 canonical pointmap in the keyframe camera frame.
        C: (H, W) float32 accumulated confidence (0 = no point).
        n_fused: number of frames fused so far (1 = only its own prediction).
        metric: pointmap in metres (SE(3) edges) or up to scale (Sim(3)).
        D: optional (H, W, F) descriptors; Q: optional (H, W) descriptor confidence.
        calibrated: points are kept on the camera rays (fusion averages depth only).
    """

    id: int
    frame_index: int
    stamp: float
    camera: PinholeCamera
    image: torch.Tensor
    X: torch.Tensor
    C: torch.Tensor
    n_fused: int = 1
    metric: bool = True
    D: Optional[torch.Tensor] = None
    Q: Optional[torch.Tensor] = None
    calibrated: bool = True
    _version: int = field(default=0, repr=False)
    _pyr_cache: dict = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def shape(self) -> tuple[int, int]:
        """(H, W)."""
        return tuple(self.C.shape)  # type: ignore[return-value]

    @property
    def mean_confidence(self) -> torch.Tensor:
        """(H, W) confidence per fused frame ``C / n_fused``."""
        return self.C / max(self.n_fused, 1)

    def snapshot(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Consistent ``(X, C)`` pair (fusion replaces both together)."""
        with self._lock:
            return self.X, self.C

    def references(self, factors: Sequence[int], max_spread_ratio: float = 0.05,
                   max_age: int = 0) -> list[ReferenceLevel]:
        """Tracking reference levels for ``factors``.

        Cached; rebuilt when more than ``max_age`` fusions happened since the cached build
        (0: after every fusion).
        """
        key = tuple(int(f) for f in factors)
        with self._lock:
            cached = self._pyr_cache.get(key)
            if cached is not None and self._version - cached[0] <= max_age:
                return cached[1]
            X, C = self.X, self.C
            version = self._version
        refs = reference_levels(X, C, self.image, self.camera, key, max_spread_ratio)
        with self._lock:
            self._pyr_cache = {key: (version, refs)}
        return refs

    def set_pointmap(self, X: torch.Tensor, C: torch.Tensor, fused: int = 0) -> None:
        """Replace the pointmap and confidence (atomically for readers of :meth:`snapshot`)."""
        with self._lock:
            self.X, self.C = X, C
            self.n_fused += fused
            self._version += 1

    def fuse(
        self, points: torch.Tensor, conf: torch.Tensor, T_kf_frame: np.ndarray, max_distance: float,
        max_confidence_ratio: float = 50.0, count: bool = True,
    ) -> Optional[int]:
        """Fuse a frame's points into the pointmap (see :func:`fuse_depth` / :func:`fuse_pointmap`).

        Args:
            points: (3, N) frame points in the frame camera (channel-first); conf: (N,)
                confidences (0 = skip).
            T_kf_frame: (4, 4) pose of the frame in the keyframe.
            count: return the number of updated pixels (a host read); False returns None
                and fuses without any host synchronisation (calibrated keyframes).

        Returns:
            number of keyframe pixels updated (None when not ``count``).
        """
        from recon_slam.frontend.tracking_device import upload

        T = upload(np.asarray(T_kf_frame, dtype=np.float64).reshape(4, 4), points.device).to(points.dtype)
        X, C = self.snapshot()
        if self.calibrated and not count:
            # no host read: on CUDA one graph replay per frame (copies of its outputs are
            # the new maps); stored channel-first (X is an (H, W, 3) view)
            X2c, C2 = _fuse_calibrated(X[..., 2], C, points, conf, T, self.camera, max_distance,
                                       max_confidence_ratio)
            self.set_pointmap(X2c.permute(1, 2, 0), C2, fused=1)
            return None
        q = torch.addmm(T[:3, 3:4], T[:3, :3], points)
        if self.calibrated:
            Z, C2, n = fuse_depth(X[..., 2], C, q, conf, self.camera, max_distance, max_confidence_ratio,
                                  count=count)
            # stored channel-first (X is an (H, W, 3) view), like the predictors' pointmaps
            X2 = (_pixel_rays_chw(self.camera, X.dtype, X.device) * Z).permute(1, 2, 0)
        else:
            X2, C2, n = fuse_pointmap(X, C, q, conf, self.camera, max_distance, max_confidence_ratio, False)
        self.set_pointmap(X2, C2, fused=1)
        return n

    def memory_bytes(self) -> int:
        """Bytes held by the keyframe's tensors (image, pointmap, confidence, descriptors)."""
        total = 0
        for t in (self.image, self.X, self.C, self.D, self.Q):
            if t is not None:
                total += t.element_size() * t.numel()
        for _, refs in self._pyr_cache.values():
            for r in refs:
                total += r.geo.element_size() * r.geo.numel() + r.photo.element_size() * r.photo.numel()
        return total


_REF_GRAPHS: dict = {}


def reference_levels(X: torch.Tensor, C: torch.Tensor, image: torch.Tensor, camera: PinholeCamera,
                     factors: Sequence[int], max_spread_ratio: float = 0.05) -> list[ReferenceLevel]:
    """Tracking reference levels of a keyframe pointmap (no host synchronisation).

    On CUDA the pyramid and the flattened maps are one CUDA graph replay per rebuild
    (copies of its outputs: the levels are cached by the keyframe).

    Args:
        X: (H, W, 3) points; C: (H, W) confidence; image: (H, W, 3) uint8; camera: intrinsics;
            factors: pyramid factors.

    Returns:
        one :class:`ReferenceLevel` per factor.
    """
    if not X.is_cuda:
        return [reference_level(lv) for lv in build_pyramid(X, C, image, camera, factors, max_spread_ratio)]
    from recon_slam.frontend.tracking_device import graphed_call

    key = (camera, tuple(C.shape), X.dtype, tuple(int(f) for f in factors), float(max_spread_ratio), str(X.device))
    meta = _REF_GRAPHS.setdefault("_meta", {})

    def fn(X, C, image):
        refs = [reference_level(lv) for lv in build_pyramid(X, C, image, camera, factors, max_spread_ratio)]
        meta[key] = [(r.factor, r.camera) for r in refs]
        return [(r.geo, r.photo, r.valid_count) for r in refs]

    outs = graphed_call(_REF_GRAPHS, key, fn, [X, C, image], copy_outputs=True)
    return [ReferenceLevel(f, cam, geo, photo, n) for (f, cam), (geo, photo, n) in zip(meta[key], outs)]


class KeyframeMap:
    """Thread-safe store of keyframes and their poses ``T_world_kf`` (float64 numpy)."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._kfs: dict[int, Keyframe] = {}
        self._poses: dict[int, np.ndarray] = {}
        self._next_id = 0
        #: incremented by every :meth:`set_poses` (lets readers notice backend updates)
        self.pose_version = 0

    @property
    def lock(self) -> threading.RLock:
        """The map's re-entrant lock (hold it for several consistent reads)."""
        return self._lock

    def next_id(self) -> int:
        """Id the next added keyframe should take."""
        with self._lock:
            return self._next_id

    def add(self, kf: Keyframe, T_world_kf: np.ndarray) -> int:
        """Insert ``kf`` with pose (4, 4); returns its id."""
        with self._lock:
            if kf.id in self._kfs:
                raise ValueError(f"keyframe id {kf.id} already in the map")
            self._kfs[kf.id] = kf
            self._poses[kf.id] = np.array(T_world_kf, dtype=np.float64).reshape(4, 4)
            self._next_id = max(self._next_id, kf.id + 1)
            return kf.id

    def get(self, kf_id: int) -> Keyframe:
        """Keyframe by id (KeyError when absent)."""
        with self._lock:
            return self._kfs[kf_id]

    def __contains__(self, kf_id: int) -> bool:
        with self._lock:
            return kf_id in self._kfs

    def __len__(self) -> int:
        with self._lock:
            return len(self._kfs)

    def ids(self) -> list[int]:
        """Keyframe ids in creation order."""
        with self._lock:
            return sorted(self._kfs)

    def keyframes(self) -> list[Keyframe]:
        """Keyframes in id order."""
        with self._lock:
            return [self._kfs[i] for i in sorted(self._kfs)]

    def pose(self, kf_id: int) -> np.ndarray:
        """(4, 4) float64 copy of ``T_world_kf``."""
        with self._lock:
            return self._poses[kf_id].copy()

    def poses(self, ids: Optional[Iterable[int]] = None) -> tuple[list[int], np.ndarray]:
        """(ids, (N, 4, 4) float64 poses) of ``ids`` (default: all, in id order)."""
        with self._lock:
            ids = sorted(self._poses) if ids is None else list(ids)
            if not ids:
                return [], np.zeros((0, 4, 4))
            return ids, np.stack([self._poses[i] for i in ids]).copy()

    def set_poses(self, ids: Sequence[int], T_world_kf: np.ndarray) -> None:
        """Replace the poses of ``ids`` by ``T_world_kf`` (N, 4, 4) (backend optimisation)."""
        T = np.asarray(T_world_kf, dtype=np.float64).reshape(-1, 4, 4)
        if len(ids) != T.shape[0]:
            raise ValueError(f"set_poses: {len(ids)} ids but {T.shape[0]} poses")
        with self._lock:
            for i, Ti in zip(ids, T):
                if i not in self._poses:
                    raise KeyError(f"set_poses: unknown keyframe id {i}")
                self._poses[int(i)] = Ti.copy()
            self.pose_version += 1

    def clear(self) -> None:
        """Remove every keyframe."""
        with self._lock:
            self._kfs.clear()
            self._poses.clear()
            self._next_id = 0
            self.pose_version += 1

    def memory_bytes(self) -> int:
        """Total bytes of keyframe tensors."""
        with self._lock:
            return sum(kf.memory_bytes() for kf in self._kfs.values())


# ---------------------------------------------------------------------------- fusion
_RAYS: dict = {}


def _pixel_rays_chw(camera: PinholeCamera, dtype, device) -> torch.Tensor:
    """(3, H, W) rays (z = 1) of every pixel of ``camera`` (cached)."""
    key = ("chw", camera, dtype, str(device))
    rays = _RAYS.get(key)
    if rays is None:
        rays = _pixel_rays(camera, dtype, device).T.reshape(3, camera.height, camera.width).contiguous()
        _RAYS[key] = rays
    return rays


def _pixel_rays(camera: PinholeCamera, dtype, device) -> torch.Tensor:
    """(H*W, 3) rays (z = 1) of every pixel of ``camera`` (cached)."""
    key = (camera, dtype, str(device))
    rays = _RAYS.get(key)
    if rays is None:  # never evicted (a few cameras; captured graphs read these tensors)
        rays = camera.pixel_to_ray(camera.pixel_grid(dtype, device)).reshape(-1, 3)
        _RAYS[key] = rays
    return rays


def _camera_consts(camera: PinholeCamera, dtype, device) -> torch.Tensor:
    """(4, 2, 1): focal lengths, principal point, lowest and highest pixel (cached)."""
    key = ("consts", camera, dtype, str(device))
    k = _RAYS.get(key)
    if k is None:
        k = _RAYS[key] = torch.tensor(
            [[[camera.fx], [camera.fy]], [[camera.cx], [camera.cy]], [[0.0], [0.0]],
             [[camera.width - 1.0], [camera.height - 1.0]]], dtype=dtype, device=device)
    return k


_FUSE_GRAPHS: dict = {}


def _fuse_calibrated(Z: torch.Tensor, C: torch.Tensor, points: torch.Tensor, conf: torch.Tensor, T: torch.Tensor,
                     camera: PinholeCamera, max_distance: float, max_confidence_ratio: float
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`fuse_depth` of frame points at pose ``T`` (4, 4) -> new (3, H, W) points
    (on the pixel rays) and (H, W) confidence; no host sync (one CUDA graph on CUDA).

    Args:
        Z: (H, W) keyframe depth; C: (H, W) confidence; points: (3, N) frame points in the
            frame camera; conf: (N,); T: (4, 4) ``T_kf_frame`` (dtype of the points).
    """
    from recon_slam.frontend.tracking_device import graphed_call

    rays = _pixel_rays_chw(camera, Z.dtype, Z.device)
    if points.is_cuda:
        _camera_consts(camera, points.dtype, points.device)  # made before any capture

    def fn(Z, C, points, conf, T):
        q = torch.addmm(T[:3, 3:4], T[:3, :3], points)
        Z2, C2, _ = fuse_depth(Z, C, q, conf, camera, max_distance, max_confidence_ratio, count=False)
        return rays * Z2, C2

    key = (camera, tuple(C.shape), tuple(points.shape), points.dtype, float(max_distance),
           float(max_confidence_ratio), str(C.device))
    return graphed_call(_FUSE_GRAPHS, key, fn, [Z, C, points, conf, T], copy_outputs=True)


def fuse_depth(
    Z: torch.Tensor,
    C: torch.Tensor,
    points_kf: torch.Tensor,
    conf: torch.Tensor,
    camera: PinholeCamera,
    max_distance: float,
    max_confidence_ratio: float = 50.0,
    count: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, Optional[int]]:
    """Confidence-weighted depth fusion for calibrated keyframes (points stay on pixel rays).

    Each point goes to the keyframe pixel it projects to (nearest pixel). Where the keyframe
    has depth, the point is fused only when its depth is within ``max_distance``; a point
    further away is an occlusion and ignored; a point closer by more than ``max_distance``
    contradicts the keyframe depth and lowers its confidence by its own (a pixel whose
    confidence is used up starts over). Empty pixels are filled.
    ``z <- (C z + sum c z') / (C + sum c)``,
    ``C <- min(C + sum c, max_confidence_ratio * mean incoming c)``.

    Args:
        Z: (H, W) keyframe depth (0 where ``C == 0``); C: (H, W) confidence.
        points_kf: (3, N) points in the keyframe camera; conf: (N,) >= 0 (0 = skip).
        camera: keyframe intrinsics.

        count: also return the number of updated pixels (a host read); else None (no
            host synchronisation).

    Returns:
        (Z', C', number of updated pixels or None); the inputs are not modified.
    """
    H, W = C.shape
    pz = points_kf[2]
    k = _camera_consts(camera, points_kf.dtype, points_kf.device) if points_kf.is_cuda else None
    iz = pz.clamp_min(1e-6).reciprocal_()
    _, _, inside, idx = project_pixels(points_kf, iz, camera, k)
    inside &= (pz > 1e-6) & (conf > 0)
    Zf = Z.reshape(-1)
    Cf = C.reshape(-1)
    zk = torch.take(Zf, idx)
    ck = torch.take(Cf, idx)
    dz = pz - zk
    has = ck > 0
    # agreeing readings are fused; a reading in front of the keyframe surface by more than
    # max_distance contradicts it (seen through) and is evidence against the keyframe depth;
    # one behind it is an occlusion and says nothing
    agree = inside & (~has | (dz.abs() <= max_distance))
    conflict = inside & has & (dz < -max_distance)
    fa = agree.to(C.dtype)
    c = conf * fa
    vals = torch.stack((c, c * pz, fa, conf * conflict.to(C.dtype)))
    sums = torch.zeros((4, H * W), dtype=C.dtype, device=C.device).index_add_(1, idx, vals)
    csum, zsum, cnt, cneg = sums[0], sums[1], sums[2], sums[3]
    # conflicting evidence first lowers the keyframe confidence; once it is used up the
    # pixel starts over from the new readings
    Ck = (Cf - cneg).clamp_min_(0.0)
    Znew = (Ck * Zf + zsum) / (Ck + csum).clamp_min(1e-20)
    upd = csum > 0
    # cap: max_confidence_ratio x the mean incoming confidence (pixels without readings keep C)
    cap = (csum / cnt.clamp_min(1.0)).mul_(max_confidence_ratio).add_((~upd).to(C.dtype) * 1e30)
    Cnew = torch.minimum(Ck + csum, cap)
    n = int((upd | (cneg > 0)).sum()) if count else None
    return Znew.reshape(H, W), Cnew.reshape(H, W), n


def fuse_pointmap(
    X: torch.Tensor,
    C: torch.Tensor,
    points_kf: torch.Tensor,
    conf: torch.Tensor,
    camera: PinholeCamera,
    max_distance: float,
    max_confidence_ratio: float = 50.0,
    calibrated: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Confidence-weighted fusion of points into a keyframe pointmap.

    Each point is assigned to the keyframe pixel it projects to (nearest pixel); where the
    keyframe already has a point, the new one is fused only within ``max_distance`` of it
    (else it is an occlusion / outlier and ignored); empty keyframe pixels are filled.
    ``X <- (C X + sum c x) / (C + sum c)`` and ``C <- C + sum c``, with ``C`` capped at
    ``max_confidence_ratio`` times the incoming mean confidence of the pixel. When
    ``calibrated`` only the depth is averaged and points stay on the keyframe pixel rays.

    Args:
        X: (H, W, 3) keyframe pointmap; C: (H, W) its confidence.
        points_kf: (3, N) new points in the keyframe camera frame (channel-first);
            conf: (N,) > 0.
        camera: keyframe intrinsics (size (W, H)).

    Returns:
        (X', C', number of updated pixels); the inputs are not modified.
    """
    H, W = C.shape
    px, py, pz = points_kf[0], points_kf[1], points_kf[2]
    iz = 1.0 / pz.clamp_min(1e-6)
    ui = torch.round(camera.fx * px * iz + camera.cx)
    vi = torch.round(camera.fy * py * iz + camera.cy)
    ok = (ui >= 0) & (ui <= W - 1) & (vi >= 0) & (vi <= H - 1) & (pz > 1e-6) & (conf > 0)
    idx = (vi.clamp(0, H - 1) * W + ui.clamp(0, W - 1)).long()
    Xf = X.reshape(-1, 3)
    Cf = C.reshape(-1)
    has = torch.take(Cf, idx) > 0
    if calibrated:
        close = (pz - torch.take(Xf[:, 2].contiguous(), idx)).abs() <= max_distance
    else:
        Xk = Xf.index_select(0, idx).T
        d = points_kf - Xk
        close = (d * d).sum(0) <= max_distance * max_distance
    ok &= ~has | close
    c = conf * ok.to(conf.dtype)  # rejected points add nothing
    n_pix = H * W
    zeros = torch.zeros(n_pix, dtype=C.dtype, device=C.device)
    csum = zeros.index_add(0, idx, c)
    cnt = zeros.index_add(0, idx, ok.to(C.dtype))
    upd = csum > 0
    Cnew = Cf + csum
    invC = 1.0 / Cnew.clamp_min(1e-12)
    if calibrated:
        zsum = zeros.index_add(0, idx, c * pz)
        zk = torch.where(Cf > 0, Xf[:, 2], torch.zeros_like(Cf))
        znew = (Cf * zk + zsum) * invC
        rays = _pixel_rays(camera, X.dtype, X.device)
        Xnew = torch.where(upd[:, None], rays * znew[:, None], Xf)
    else:
        psum = torch.zeros(3, n_pix, dtype=X.dtype, device=X.device).index_add(1, idx, c * points_kf)
        Xk = torch.where((Cf > 0)[:, None], Xf, torch.zeros_like(Xf))
        Xnew = torch.where(upd[:, None], ((Cf[:, None] * Xk) + psum.T) * invC[:, None], Xf)
    cap = max_confidence_ratio * csum / cnt.clamp_min(1)
    Cnew = torch.where(upd, torch.minimum(Cnew, cap), Cf)
    return Xnew.reshape(H, W, 3), Cnew.reshape(H, W), int(upd.sum())


def need_new_keyframe(valid_fraction: float, unique_fraction: float, threshold: float) -> bool:
    """New-keyframe rule: ``min(valid match fraction, unique keyframe pixel fraction) < threshold``."""
    return min(valid_fraction, unique_fraction) < threshold
