"""Oracle two-view predictor: MASt3R-shaped outputs from synthetic ground truth.

.. warning::
   **For tests and benchmarks only.** :class:`OraclePredictor` reads the ground-truth depth
   and pose of every frame (``Frame.depth``, ``Frame.T_world_cam_gt``, as
   :class:`recon_slam.synth.SyntheticSequence` provides them) to fake what the MASt3R
   network would predict. It lets the monocular engine be verified without network weights;
   it is not a SLAM input and is never chosen by configuration (pass it to
   ``SlamSystem(..., predictor=OraclePredictor(...))`` or ``run_slam(..., predictor=...)``).

For a pair (view 1 = frame ``i``, view 2 = keyframe ``j``) it returns, like a MASt3R decoder
pass, a :class:`~recon_slam.frontend.predictors.TwoViewPrediction`:

* ``X_cam``: view 1's points in view 1's camera; ``X_other``: view 2's points also in view
  1's camera; both multiplied by ONE unknown scale per pair, log-uniform in ``scale_range``;
* per-pixel noise growing with distance: multiplicative noise along the ray with relative
  sigma ``depth_noise[0] + depth_noise[1] * z`` and an isotropic part
  ``lateral_noise * |X|``; each view's rays are also bent by a small random focal error and
  radial term (what calibration removes), their depths by a smooth random tilt, and view 2
  is placed with a small random pose error relative to view 1;
* depth edges: points blend foreground and background (flying pixels) and get low point
  and descriptor confidence;
* ``C`` point confidence (``>= 1``, lower far away and at edges);
* ``D`` 24-d unit descriptors that identify surface points: random Fourier features of the
  world-space surface point (a fixed random projection, two length scales), plus a little
  noise, so the same surface point has nearly the same descriptor in every view; ``Q``
  descriptor confidence (below 1.5 at edges).

Everything is reproducible: the noise of a pair depends only on ``(seed, i, j)``.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional, Sequence

import cv2
import numpy as np
import torch

from recon_slam.config import PredictorConfig
from recon_slam.errors import InputError
from recon_slam.frontend.predictors import (
    PointmapPredictor,
    TwoViewPrediction,
    check_image,
    pixel_rays,
    resize_image,
)
from recon_slam.geometry.camera import PinholeCamera
from recon_slam.io.frame import Frame


@dataclass
class _Truth:
    """Ground truth of one frame at processing resolution."""

    P_cam: np.ndarray  # (H, W, 3) float64 points in the camera frame
    P_world: np.ndarray  # (H, W, 3) float32 points in the world frame
    T_world_cam: np.ndarray  # (4, 4)
    edge: np.ndarray  # (H, W) bool depth discontinuity (dilated)
    image: np.ndarray  # (H, W, 3) uint8
    camera: PinholeCamera


def _rotvec(v: np.ndarray) -> np.ndarray:
    th = float(np.linalg.norm(v))
    K = np.array([[0.0, -v[2], v[1]], [v[2], 0.0, -v[0]], [-v[1], v[0], 0.0]])
    if th < 1e-12:
        return np.eye(3) + K
    return np.eye(3) + math.sin(th) / th * K + (1 - math.cos(th)) / (th * th) * K @ K


class OraclePredictor(PointmapPredictor):
    """Ground-truth two-view predictor with MASt3R-like outputs (**tests and benchmarks only**).

    Args:
        config: predictor settings (processing ``width``/``height``; depth resized to it).
        device: torch device of the outputs.
        seed: seed of the descriptors and of every pair's noise.
        scale_range: (lo, hi) of the per-pair scale (log-uniform).
        depth_noise: (a, b): relative sigma ``a + b z`` of the multiplicative noise along rays.
        lateral_noise: isotropic per-pixel noise, as a fraction of the point's distance.
        focal_error: sigma of the relative focal error of each view's rays.
        radial_error: sigma of a radial ray distortion coefficient of each view.
        depth_warp: sigma of a smooth per-view depth distortion ``1 + a x + b y`` (x, y the
            normalised image coordinates): systematic, like a network's depth bias.
        pose_error: (degrees, fraction of the median depth) sigmas of view 2's placement error.
        edge_ratio: relative depth jump that marks a depth edge.
        descriptor_scales: length scales (metres) of the descriptor features (split evenly).
        descriptor_noise: sigma of the noise added to the unit descriptors.
        cache_frames: how many recent frames' ground truth are kept (keyframes are kept).
    """

    metric = False
    two_view = True
    descriptor_dim = 24

    def __init__(
        self,
        config: PredictorConfig,
        device: torch.device | str = "cpu",
        seed: int = 0,
        scale_range: tuple[float, float] = (0.5, 2.0),
        depth_noise: tuple[float, float] = (0.003, 0.003),
        lateral_noise: float = 0.001,
        focal_error: float = 0.006,
        radial_error: float = 0.004,
        depth_warp: float = 0.005,
        pose_error: tuple[float, float] = (0.05, 0.001),
        edge_ratio: float = 0.05,
        descriptor_scales: Sequence[float] = (0.04, 0.25),
        descriptor_noise: float = 0.02,
        cache_frames: int = 32,
    ) -> None:
        super().__init__(config, device)
        self.seed = int(seed)
        self.scale_range = (float(scale_range[0]), float(scale_range[1]))
        self.depth_noise = (float(depth_noise[0]), float(depth_noise[1]))
        self.lateral_noise = float(lateral_noise)
        self.focal_error = float(focal_error)
        self.radial_error = float(radial_error)
        self.depth_warp = float(depth_warp)
        self.pose_error = (float(pose_error[0]), float(pose_error[1]))
        self.edge_ratio = float(edge_ratio)
        self.descriptor_noise = float(descriptor_noise)
        self.cache_frames = int(cache_frames)
        rng = np.random.default_rng([self.seed, 7919])
        F = self.descriptor_dim
        scales = np.repeat(np.asarray(descriptor_scales, dtype=np.float64), int(math.ceil(F / len(descriptor_scales))))[:F]
        self._W = rng.normal(size=(F, 3)) / scales[:, None]  # random Fourier frequencies (1/m)
        self._b = rng.uniform(0.0, 2.0 * math.pi, size=F)
        self._W32 = self._W.astype(np.float32)
        self._b32 = self._b.astype(np.float32)
        self._truth: "OrderedDict[int, _Truth]" = OrderedDict()
        self._pinned: set[int] = set()
        self._lock = threading.Lock()
        self.n_pairs = 0

    # ------------------------------------------------------------------ ground truth cache
    def _ingest(self, frame: Frame) -> _Truth:
        if frame.depth is None or frame.T_world_cam_gt is None:
            raise InputError(
                f"frame {frame.index}: the oracle predictor needs ground-truth depth and pose "
                "(synthetic frames); it is for tests and benchmarks only"
            )
        with self._lock:
            t = self._truth.get(frame.index)
            if t is not None:
                return t
        img = check_image(frame)
        cam = self.processing_camera(frame.camera)
        depth = np.asarray(frame.depth, dtype=np.float32)
        if (cam.width, cam.height) != (depth.shape[1], depth.shape[0]):
            depth = cv2.resize(depth, (cam.width, cam.height), interpolation=cv2.INTER_NEAREST)
        img = resize_image(img, cam.width, cam.height)
        z = depth.astype(np.float64)
        valid = np.isfinite(z) & (z > 0)
        z = np.where(valid, z, 0.0)
        P = pixel_rays(cam).astype(np.float64) * z[..., None]
        T = np.asarray(frame.T_world_cam_gt, dtype=np.float64)
        Pw = (P @ T[:3, :3].T + T[:3, 3]).astype(np.float32)
        edge = np.zeros(z.shape, dtype=bool)
        r = self.edge_ratio
        jx = np.abs(z[:, 1:] - z[:, :-1]) > r * np.minimum(z[:, 1:], z[:, :-1])
        jy = np.abs(z[1:] - z[:-1]) > r * np.minimum(z[1:], z[:-1])
        edge[:, 1:] |= jx
        edge[:, :-1] |= jx
        edge[1:] |= jy
        edge[:-1] |= jy
        edge |= ~valid
        t = _Truth(P, Pw, T, edge, img, cam)
        with self._lock:
            self._truth[frame.index] = t
            self._evict()
        return t

    def _evict(self) -> None:
        unpinned = [k for k in self._truth if k not in self._pinned]
        for k in unpinned[: max(len(unpinned) - self.cache_frames, 0)]:
            del self._truth[k]

    def _get(self, index: int) -> _Truth:
        with self._lock:
            t = self._truth.get(index)
        if t is None:
            raise InputError(f"oracle: no ground truth cached for frame {index} (it was never predicted)")
        return t

    def on_keyframe(self, frame_index: int) -> None:
        """Keep the ground truth of a frame that became a keyframe (engine hook)."""
        with self._lock:
            self._pinned.add(int(frame_index))

    def cache_bytes(self, frame_index: int) -> int:
        """Bytes a keyframe costs in the predictor: 0 (the oracle's ground-truth cache is test
        scaffolding on the host; the network predictor reports its cached encoder tokens)."""
        return 0

    # ------------------------------------------------------------------ synthesis
    def descriptors(self, P_world: np.ndarray) -> np.ndarray:
        """(..., 24) float32 unit descriptors of world points (..., 3) (noise-free)."""
        f = np.asarray(P_world, dtype=np.float32) @ self._W32.T
        f += self._b32
        np.cos(f, out=f)
        f /= np.maximum(np.linalg.norm(f, axis=-1, keepdims=True), np.float32(1e-12))
        return f

    def _view(self, truth: _Truth, rng: np.random.Generator, T_1_v: np.ndarray):
        """Noisy points (H, W, 3) of a view's pixels in camera 1 (before the pair scale), C, D, Q."""
        f32 = np.float32
        P = truth.P_cam.astype(f32)
        z = P[..., 2]
        # bent rays: focal error and radial term in this view's own camera
        f_err = 1.0 + rng.normal(0.0, self.focal_error)
        k1 = rng.normal(0.0, self.radial_error)
        iz = 1.0 / np.maximum(z, f32(1e-9))
        r2 = (P[..., 0] * iz) ** 2 + (P[..., 1] * iz) ** 2
        bend = f32(f_err) * (f32(1.0) + f32(k1) * r2)
        P[..., 0] *= bend
        P[..., 1] *= bend
        a, b = rng.normal(0.0, self.depth_warp, size=2)
        P *= (f32(1.0) + f32(a) * P[..., 0] * iz + f32(b) * P[..., 1] * iz)[..., None]
        # flying pixels at depth edges: blend with the 3x3 neighbourhood
        if truth.edge.any():
            blur = cv2.blur(P, (3, 3), borderType=cv2.BORDER_REPLICATE)
            P = np.where(truth.edge[..., None], blur, P)
        dist = np.linalg.norm(P, axis=-1)
        sig = f32(self.depth_noise[0]) + f32(self.depth_noise[1]) * z
        P *= (1.0 + sig * rng.standard_normal(z.shape, dtype=f32))[..., None]
        P += (f32(self.lateral_noise) * dist)[..., None] * rng.standard_normal(P.shape, dtype=f32)
        P = P @ T_1_v[:3, :3].T.astype(f32) + T_1_v[:3, 3].astype(f32)
        # confidences: >= 1, lower far away and at edges
        g = 1.0 / (1.0 + (sig / f32(0.006)) ** 2)
        C = np.where(truth.edge, f32(1.05), 1.0 + 9.0 * g)
        Q = np.where(truth.edge, f32(1.0), 1.0 + 20.0 * g)
        D = self.descriptors(truth.P_world)
        if self.descriptor_noise > 0:
            D += f32(self.descriptor_noise) * rng.standard_normal(D.shape, dtype=f32)
            D /= np.maximum(np.linalg.norm(D, axis=-1, keepdims=True), f32(1e-12))
        return P, C, D, Q

    def _pair(self, t1: _Truth, t2: Optional[_Truth], i1: int, i2: int, stamp: float) -> TwoViewPrediction:
        rng = np.random.default_rng([self.seed, int(i1) + 1, int(i2) + 1])
        lo, hi = self.scale_range
        s = math.exp(rng.uniform(math.log(lo), math.log(hi)))
        P1, C1, D1, Q1 = self._view(t1, rng, np.eye(4))
        dev = self.device

        def tt(a, dtype=torch.float32):
            return torch.from_numpy(np.ascontiguousarray(a)).to(device=dev, dtype=dtype)

        out = TwoViewPrediction(
            X_cam=tt(P1 * np.float32(s)), C=tt(C1), camera=t1.camera, image=tt(t1.image, torch.uint8), D=tt(D1), Q=tt(Q1),
            index=int(i1), stamp=float(stamp),
        )
        if t2 is not None:
            T_1_2 = np.linalg.inv(t1.T_world_cam) @ t2.T_world_cam
            med = float(np.median(t1.P_cam[..., 2][t1.P_cam[..., 2] > 0])) if (t1.P_cam[..., 2] > 0).any() else 1.0
            E = np.eye(4)
            E[:3, :3] = _rotvec(np.radians(self.pose_error[0]) * rng.standard_normal(3))
            E[:3, 3] = self.pose_error[1] * med * rng.standard_normal(3)
            P2, C2, D2, Q2 = self._view(t2, rng, E @ T_1_2)
            out.X_other, out.C_other, out.D_other, out.Q_other = tt(P2 * np.float32(s)), tt(C2), tt(D2), tt(Q2)
            out.other_index = int(i2)
        self.n_pairs += 1
        return out

    # ------------------------------------------------------------------ predictor API
    def predict(self, frame: Frame, keyframe=None) -> TwoViewPrediction:
        """Pair prediction of (``frame``, ``keyframe``) (a single-view pass when ``keyframe`` is None).

        Args:
            frame: a synthetic frame with ``depth`` and ``T_world_cam_gt``.
            keyframe: the engine's :class:`~recon_slam.frontend.keyframes.Keyframe` (its
                ``frame_index`` names the frame whose ground truth is used) or None.

        Returns:
            :class:`TwoViewPrediction`: ``X_cam`` (H, W, 3) frame points in the frame camera,
            ``X_other`` (H, W, 3) keyframe points in the frame camera, one random scale for both.
        """
        t1 = self._ingest(frame)
        if keyframe is None:
            return self._pair(t1, None, frame.index, frame.index, frame.stamp)
        j = int(keyframe.frame_index)
        self.on_keyframe(j)
        t2 = t1 if j == frame.index else self._get(j)
        return self._pair(t1, t2, frame.index, j, frame.stamp)

    def predict_keyframes(self, kf_a, kf_b) -> TwoViewPrediction:
        """Pair prediction of two keyframes: view 1 = ``kf_a``, view 2 = ``kf_b`` (points in a's camera)."""
        ta, tb = self._get(int(kf_a.frame_index)), self._get(int(kf_b.frame_index))
        return self._pair(ta, tb, int(kf_a.frame_index), int(kf_b.frame_index), float(kf_a.stamp))
