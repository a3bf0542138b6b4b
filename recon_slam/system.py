"""The SLAM engine object shared by the command line, the ROS nodes and the tests.

:class:`SlamSystem` consumes :class:`~recon_slam.io.frame.Frame` objects one at a time:

1. the pointmap predictor (depth camera or stereo matcher) gives a pointmap + confidence
   at processing resolution;
2. the tracker estimates ``T_kf_frame`` against the current keyframe (initialised from the
   previous frame, optionally with constant velocity);
3. the frame is fused into the keyframe, and becomes a new keyframe when
   ``min(valid match fraction, unique keyframe pixel fraction) < threshold``;
4. new keyframes go to the backend (own thread, if enabled and available), which may move
   the keyframe poses at any time.

Live streams (``SlamSystem(..., live=True)``, the ROS node): the backend thread works only
while :meth:`SlamSystem.process` is idle (between frames, see
:mod:`recon_slam.backend.scheduling`), and ``process(frame, on_pose=...)`` hands the
frame's tracked pose to the caller before the map work of the frame (fusion, keyframe
decision, keyframe re-anchoring, hand-off to the backend), so it can be published at once.

Frame poses are stored relative to their keyframe, so :meth:`SlamSystem.trajectory`
follows every backend optimisation. Lost frames (empty/black input, too few valid matches,
failed solve) keep the last good pose; the following frames try to relocalise (backend hook
first, else the most recent keyframes) and continue in the same map.

This module never imports rclpy.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import torch

from recon_slam.backend.scheduling import FrontendGate
from recon_slam.config import SlamConfig, load_config
from recon_slam.frontend.keyframes import Keyframe, KeyframeMap, need_new_keyframe
from recon_slam.frontend.predictors import Prediction, make_predictor
from recon_slam.frontend.tracking import (SourceLevel, Tracker, TrackResult, source_levels,
                                         source_levels_graphed)
from recon_slam.geometry import lie
from recon_slam.geometry.camera import PinholeCamera
from recon_slam.io.frame import Frame

log = logging.getLogger(__name__)

#: frame states reported by :meth:`SlamSystem.process`
STATES = ("initialising", "tracking", "lost", "relocalised")


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda when available else cpu; otherwise ``torch.device(name)``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        from recon_slam.errors import ReconSlamError

        raise ReconSlamError(f"device {name!r} requested but CUDA is not available: use device 'auto' or 'cpu'")
    return dev


@dataclass
class FrameResult:
    """What :meth:`SlamSystem.process` reports for one frame.

    Attributes:
        index, stamp: of the frame.
        T_world_cam: (4, 4) float64 pose at the time of processing (later backend
            optimisations move it; :meth:`SlamSystem.trajectory` has the final one).
            ``T_world_cam`` maps camera (optical frame) coordinates into the world frame.
        state: 'initialising', 'tracking', 'lost' or 'relocalised'.
        is_keyframe: the frame became a keyframe; kf_id: its reference keyframe.
        n_valid, valid_fraction, unique_fraction: tracking match statistics.
        time_ms: processing time of the frame (for the early result given to ``on_pose``:
            the time until the pose was known).
        reason: why the frame is lost ('' otherwise).
        final: False for the early result given to ``process(..., on_pose=...)`` (its
            ``is_keyframe`` is not decided yet: False), True for the returned one.
    """

    index: int
    stamp: float
    T_world_cam: np.ndarray
    state: str
    is_keyframe: bool
    kf_id: int
    n_valid: int = 0
    valid_fraction: float = 0.0
    unique_fraction: float = 0.0
    time_ms: float = 0.0
    reason: str = ""
    final: bool = True


@dataclass
class _FrameRecord:
    index: int
    stamp: float
    kf_id: int
    T_kf_frame: np.ndarray
    state: str


def _load_backend_class():
    try:
        from recon_slam import backend as backend_pkg
    except ImportError:  # pragma: no cover
        return None
    return getattr(backend_pkg, "Backend", None)


def _rigid(T: np.ndarray) -> np.ndarray:
    """Drop the scale of a Sim(3) matrix (4, 4) -> SE(3)."""
    s = np.cbrt(np.linalg.det(T[:3, :3]))
    if abs(s - 1.0) < 1e-9:
        return T
    out = T.copy()
    out[:3, :3] /= s
    return out


def voxel_downsample(xyz: np.ndarray, rgb: np.ndarray, voxel: float) -> tuple[np.ndarray, np.ndarray]:
    """Average points (N, 3) and colours (N, 3) per voxel of size ``voxel`` (Open3D's
    ``voxel_down_sample``; a NumPy equivalent when Open3D is not installed)."""
    try:
        import open3d as o3d
    except ImportError:
        keys = np.floor(xyz / voxel).astype(np.int64)
        _, inv, counts = np.unique(keys, axis=0, return_inverse=True, return_counts=True)
        inv = inv.reshape(-1)
        out_xyz = np.zeros((len(counts), 3))
        out_rgb = np.zeros((len(counts), 3))
        np.add.at(out_xyz, inv, xyz)
        np.add.at(out_rgb, inv, rgb.astype(np.float64))
        return out_xyz / counts[:, None], np.clip(np.round(out_rgb / counts[:, None]), 0, 255)
    pcd = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(np.asarray(xyz, dtype=np.float64)))
    pcd.colors = o3d.utility.Vector3dVector(rgb.astype(np.float64) / 255.0)
    pcd = pcd.voxel_down_sample(voxel)
    return np.asarray(pcd.points), np.clip(np.round(np.asarray(pcd.colors) * 255.0), 0, 255)


class SlamSystem:
    """The SLAM engine.

    Args:
        config: a :class:`SlamConfig`, a mapping or a YAML path (see :func:`load_config`);
            ``None`` for the defaults.
        camera: intrinsics of the incoming frames (optional: each frame carries its own).
        backend: optional backend object to use instead of creating one (must offer
            ``add_keyframe``, ``relocalize``, ``wait_idle``, ``close``); ``False`` disables it.
        predictor: optional pointmap predictor to use instead of the one ``config.mode``
            selects (tests and benchmarks: e.g. the monocular
            :class:`~recon_slam.frontend.oracle.OraclePredictor`). A two-view predictor
            (``predictor.two_view``) runs the monocular path
            (:class:`~recon_slam.frontend.mono.MonoFrontend`): Sim(3) keyframe and frame
            poses, trajectory reported as their rigid part.
        live: frames come from a live stream (the ROS node): background work of this
            process (the backend thread; map snapshots that wait on :attr:`gate`) runs only
            while :meth:`process` is idle, so it never slows a frame down (see
            :mod:`recon_slam.backend.scheduling`). Offline runs (False, the default) let the
            backend run alongside the frames.
    """

    def __init__(self, config: SlamConfig | dict | str | None = None, camera: Optional[PinholeCamera] = None,
                 backend: Any = None, predictor: Any = None, live: bool = False) -> None:
        self.config = config if isinstance(config, SlamConfig) else load_config(config)
        self.config.validate()
        self.device = resolve_device(self.config.device)
        if self.config.cpu_threads > 0 and torch.get_num_threads() != self.config.cpu_threads:
            torch.set_num_threads(self.config.cpu_threads)
        self.camera = camera
        self.predictor = predictor if predictor is not None else make_predictor(
            self.config.mode, self.config.predictor, self.device, self.config.mono)
        self.tracker = Tracker(self.config.tracking, metric=self.predictor.metric)
        self._mono = None
        if getattr(self.predictor, "two_view", False):
            from recon_slam.frontend.mono import MonoFrontend

            self._mono = MonoFrontend(self)
        self.keyframe_map = KeyframeMap()
        self._lock = threading.RLock()
        #: frontend-first scheduling: :meth:`process` marks its frames busy on it; background
        #: threads (the backend, map snapshots) wait on it when ``live`` (see the module notes)
        self.gate = FrontendGate(enabled=live)
        self._pose_cb: Optional[Callable[[FrameResult], None]] = None
        self._pose_t0 = 0.0
        self._traj_cache: Optional[tuple] = None
        self.relocaliser = None  # a loaded map's scene-coordinate relocaliser (attach_relocaliser)
        self.backend = None
        if backend is False:
            self.backend = None
        elif backend is not None:
            self.backend = backend
        elif self.config.backend.enabled:
            cls = _load_backend_class()
            if cls is None:
                log.info("backend enabled but recon_slam.backend.Backend is not available: running frontend only")
            else:
                self.backend = cls(self.config.backend, self.keyframe_map, self.device)
        self._attach_backend()
        self._reset_state()

    def attach_relocaliser(self, relocaliser) -> None:
        """Use a map's scene-coordinate relocaliser when tracking is lost (None detaches).

        Args:
            relocaliser: :class:`recon_slam.reloc.Relocaliser` whose world frame is this
                engine's world frame (the map it was trained with is loaded), or None.
        """
        self.relocaliser = relocaliser

    @property
    def localize_only(self) -> bool:
        """The map is not extended (``reloc.localize_only``): no new keyframes, no fusion."""
        return bool(self.config.reloc.localize_only)

    def _attach_backend(self) -> None:
        """Share the frontend gate with the backend; monocular: the backend verifies keyframe
        pairs with the two-view predictor."""
        if self.backend is not None and hasattr(self.backend, "gate"):
            self.backend.gate = self.gate
        if self._mono is not None and self.backend is not None and hasattr(self.backend, "pair_verifier"):
            self.backend.pair_verifier = self._mono.verify_keyframe_pair

    # ------------------------------------------------------------------ state
    def _reset_state(self) -> None:
        self._records: list[_FrameRecord] = []
        self._kf_id: Optional[int] = None
        self._T_kf_last: Optional[np.ndarray] = None  # last good T_kf_frame (current kf)
        self._last_inlier_fraction = 1.0  # of the last tracked frame against its keyframe
        self._T_world_prev: Optional[np.ndarray] = None  # last two good world poses
        self._T_world_prev2: Optional[np.ndarray] = None
        self._t_prev: Optional[float] = None  # stamps of those poses (s)
        self._t_prev2: Optional[float] = None
        self._lost_since: Optional[int] = None
        self._n_lost = 0
        self._n_frames = 0
        self._n_reloc = 0
        self._time_s = 0.0
        self._stage_s: dict[str, float] = {}
        self._last_good_index: Optional[int] = None
        self._n_reloc_fail = 0
        if getattr(self, "_mono", None) is not None:
            self._mono.reset()

    def reset(self) -> None:
        """Forget the map and the trajectory (the backend, if any, is restarted)."""
        with self._lock:
            if self.backend is not None and hasattr(self.backend, "reset"):
                self.backend.reset()
            elif self.backend is not None:
                self.backend.close()
                cls = _load_backend_class()
                self.keyframe_map = KeyframeMap()
                self.backend = cls(self.config.backend, self.keyframe_map, self.device) if cls else None
                self._attach_backend()
            self.keyframe_map.clear()
            self.relocaliser = None  # it belonged to the forgotten map
            self._reset_state()

    def close(self) -> None:
        """Stop the backend thread and the predictor's helper threads (idempotent)."""
        closer = getattr(self.predictor, "close", None)
        if callable(closer):
            closer()
        if self.backend is not None:
            try:
                self.backend.close()
            finally:
                self.backend = None

    def prefetch(self, frame: Frame) -> None:
        """Let the predictor start on ``frame`` (the next one) while :meth:`process` works on
        the current frame: the MASt3R predictor runs its network in a background CUDA stream
        (``mono.pipeline``); other predictors ignore it. Call it before ``process(current)``.
        """
        fn = getattr(self.predictor, "prefetch", None)
        if fn is None:
            return
        kf = self.keyframe_map.get(self._kf_id) if self._kf_id is not None else None
        fn(frame, kf)

    def finish(self) -> None:
        """Wait until the backend has processed every queued keyframe."""
        if self.backend is not None and hasattr(self.backend, "wait_idle"):
            self.backend.wait_idle()

    def __enter__(self) -> "SlamSystem":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ helpers
    @property
    def num_keyframes(self) -> int:
        """Number of keyframes in the map."""
        return len(self.keyframe_map)

    @property
    def current_keyframe_id(self) -> Optional[int]:
        """Id of the keyframe frames are tracked against (None before the first one)."""
        return self._kf_id

    def _levels(self, pred: Prediction, geometry_only: bool = False) -> list[SourceLevel]:
        t = self.config.tracking
        graph = getattr(self, "_graph_levels", None)  # None: on CUDA with the graph loop
        if graph is None:
            graph = self.device.type == "cuda" and t.device_loop in ("graph", "auto")
        if graph:
            # fixed-size levels, one CUDA graph replay (static buffers, used within the frame)
            cache = self.__dict__.setdefault("_level_graphs", {})
            levels = source_levels_graphed(cache, pred.X_chw, pred.C, pred.image, pred.camera, t.pyramid,
                                           t.max_points, self.config.predictor.discontinuity_ratio,
                                           t.point_selection)
        else:
            levels = source_levels(pred.X_cam, pred.C, pred.image, pred.camera, t.pyramid, t.max_points,
                                   self.config.predictor.discontinuity_ratio, t.point_selection)
        if geometry_only:  # no usable intensities (black image): no photometric term
            for lv in levels:
                lv.intensity = None
        return levels

    def _track(self, kf: Keyframe, sources: list[SourceLevel], T_init: np.ndarray,
               extra: Optional[torch.Tensor] = None) -> TrackResult:
        refs = kf.references(self.config.tracking.pyramid, self.config.predictor.discontinuity_ratio,
                             max_age=self.config.keyframes.refresh_interval - 1)
        return self.tracker.track(sources, refs, T_init, extra=extra)

    def _is_blank(self, frame: Frame, pred: Prediction, check_valid: bool = True) -> str:
        """Why the frame cannot be tracked at all ('' when it can).

        ``check_valid=False`` skips the valid-depth test (its count is still on the device
        and is read with the tracking result, see :meth:`_process`).
        """
        if check_valid and pred.valid_fraction <= 0.01:
            return "no valid depth" if self.config.mode == "rgbd" else "no valid disparity"
        if self._image_is_black(pred):
            if self.config.tracking.lost_on_black_image:
                return "black image"
        return ""

    @staticmethod
    def _image_is_black(pred: Prediction) -> bool:
        img = pred.image
        if img.numel() == 0:
            return True
        m = getattr(pred, "image_max", None)  # host value when the predictor has it
        return (int(img.max()) if m is None else m) <= 2

    def _new_keyframe(self, frame: Frame, pred: Prediction, T_world_kf: np.ndarray) -> Keyframe:
        kf = Keyframe(
            id=self.keyframe_map.next_id(),
            frame_index=frame.index,
            stamp=float(frame.stamp),
            camera=pred.camera,
            image=pred.image,
            X=pred.X_cam.clone(),
            C=pred.C.clone(),
            metric=self.predictor.metric,
            D=pred.D,
            Q=pred.Q,
            calibrated=True,
        )
        self.keyframe_map.add(kf, T_world_kf)
        return kf

    def _pose_world(self, kf_id: int, T_kf_frame: np.ndarray) -> np.ndarray:
        return _rigid(self.keyframe_map.pose(kf_id) @ T_kf_frame)

    def _predict_init(self, kf_id: int, stamp: Optional[float] = None) -> np.ndarray:
        """Initial T_kf_frame: last pose, extrapolated with constant velocity if enabled.

        With stamps the velocity is scaled to the time since the last good frame (frames
        skipped by a node or dropped by a camera), ``exp(r log V)`` with
        ``r = dt_now / dt_last`` (clamped to [0, 5]).
        """
        T_last = self._T_kf_last if self._T_kf_last is not None else np.eye(4)
        if (self.config.tracking.constant_velocity and self._T_world_prev is not None
                and self._T_world_prev2 is not None):
            V = np.linalg.inv(self._T_world_prev2) @ self._T_world_prev
            t1, t2 = self._t_prev, self._t_prev2
            if stamp is not None and t1 is not None and t2 is not None and t1 - t2 > 1e-6:
                r = float(np.clip((float(stamp) - t1) / (t1 - t2), 0.0, 5.0))
                if abs(r - 1.0) > 1e-3:
                    V = _rigid(V)
                    xi = lie.se3_log(torch.as_tensor(V, dtype=torch.float64))
                    V = lie.se3_exp(xi * r).numpy()
            return T_last @ V
        return T_last

    def _push_good_pose(self, T_world: np.ndarray, reset_velocity: bool = False,
                        stamp: Optional[float] = None) -> None:
        self._T_world_prev2 = None if reset_velocity else self._T_world_prev
        self._T_world_prev = T_world
        self._t_prev2 = None if reset_velocity else self._t_prev
        self._t_prev = None if stamp is None else float(stamp)

    # ------------------------------------------------------------------ main entry
    def process(self, frame: Frame, on_pose: Optional[Callable[[FrameResult], None]] = None) -> FrameResult:
        """Track one frame and update the map.

        Args:
            frame: the next frame (RGB + depth for mode 'rgbd', rectified pair for 'stereo').
            on_pose: optional callback, called (in this thread, at most once) with an early
                :class:`FrameResult` (``final`` False) as soon as a tracked frame's pose is
                known, before the frame's map work (fusion, keyframe decision, re-anchoring
                on an existing keyframe, hand-off to the backend), so a live caller can
                publish the pose without waiting for that work. Its pose is the frame's pose
                tracked against the current keyframe; when the frame then re-anchors on an
                older keyframe, the returned result (and :meth:`trajectory`) has the pose
                measured against that one. Not called for frames that are not tracked
                (initialising, lost) nor by the monocular path: use the returned result.

        Returns:
            :class:`FrameResult` (pose ``T_world_cam`` (4, 4) float64 at processing time).
        """
        with self._lock, self.gate.frontend():
            t0 = time.perf_counter()
            self._pose_cb, self._pose_t0 = on_pose, t0
            try:
                res = self._process(frame)
            finally:
                self._pose_cb = None
            dt = time.perf_counter() - t0
            res.time_ms = dt * 1e3
            self._time_s += dt
            self._n_frames += 1
            if res.state == "lost":
                self._n_lost += 1
            return res

    def _tick(self, stage: str, t0: float) -> float:
        t = time.perf_counter()
        self._stage_s[stage] = self._stage_s.get(stage, 0.0) + (t - t0)
        return t

    def _record(self, frame: Frame, kf_id: int, T_kf_frame: np.ndarray, state: str) -> None:
        self._records.append(_FrameRecord(frame.index, float(frame.stamp), kf_id, T_kf_frame.copy(), state))

    def _process(self, frame: Frame) -> FrameResult:
        if self._mono is not None:  # monocular (two-view predictor) path
            return self._mono.process(frame)
        cfg = self.config
        t0 = time.perf_counter()
        pred = self.predictor.predict(frame)
        # the valid-pixel count of a device prediction is read with the tracking result
        # (one host synchronisation per frame) when the frame is going to be tracked
        defer = (isinstance(getattr(pred, "valid_count", None), torch.Tensor) and self._kf_id is not None
                 and self._lost_since is None)
        blank = self._is_blank(frame, pred, check_valid=not defer)
        if defer and blank:  # black image: the reason depends on the valid count too
            blank = self._is_blank(frame, pred)
        t0 = self._tick("predict", t0)

        # ---------------- first keyframe
        if self._kf_id is None:
            if blank:
                self._record(frame, -1, np.eye(4), "initialising")
                return FrameResult(frame.index, frame.stamp, np.eye(4), "initialising", False, -1, reason=blank)
            kf = self._new_keyframe(frame, pred, np.eye(4))
            self._kf_id = kf.id
            self._T_kf_last = np.eye(4)
            self._push_good_pose(np.eye(4), reset_velocity=True, stamp=frame.stamp)
            self._last_good_index = frame.index
            if self.backend is not None:
                self.backend.add_keyframe(kf, None, None)
            self._record(frame, kf.id, np.eye(4), "initialising")
            n = int((pred.C > 0).sum())
            return FrameResult(frame.index, frame.stamp, np.eye(4), "initialising", True, kf.id, n, 1.0, 1.0)

        # ---------------- blank input: lost right away
        if blank:
            return self._lost(frame, blank)

        sources = self._levels(pred, geometry_only=self._image_is_black(pred))
        t0 = self._tick("levels", t0)

        # ---------------- relocalisation after a loss
        if self._lost_since is not None:
            return self._relocalise(frame, pred, sources)

        kf = self.keyframe_map.get(self._kf_id)
        T_init = self._predict_init(kf.id, frame.stamp)
        tr = self._track(kf, sources, T_init, extra=pred.valid_count if defer else None)
        if defer:
            if tr.extra is not None:
                pred.valid_count = int(tr.extra[0])
            blank = self._is_blank(frame, pred)
            if blank:
                self._tick("track", t0)
                return self._lost(frame, blank)
        if cfg.tracking.constant_velocity and self._T_kf_last is not None and (
                not tr.success or tr.inlier_fraction < self._last_inlier_fraction - cfg.tracking.retry_inlier_drop):
            # failed, or suspicious (inliers fell sharply against the previous frame: a wrong
            # basin, e.g. after dropped frames): retry from the last pose without the motion
            # model and keep the better solve
            tr2 = self._track(kf, sources, self._T_kf_last)
            if tr2.success and (not tr.success or tr2.inlier_fraction > tr.inlier_fraction):
                tr = tr2
        t0 = self._tick("track", t0)
        if not tr.success:
            return self._lost(frame, tr.reason, tr)
        res = self._accept(frame, pred, kf, tr, "tracking", sources)
        self._tick("map", t0)
        return res

    def _emit_pose(self, frame: Frame, T_world: np.ndarray, state: str, kf_id: int, tr: TrackResult) -> None:
        """Give the caller's ``on_pose`` callback (see :meth:`process`) the tracked pose now."""
        cb, self._pose_cb = self._pose_cb, None
        if cb is None:
            return
        early = FrameResult(frame.index, frame.stamp, T_world.copy(), state, False, kf_id, tr.n_valid,
                            tr.valid_fraction, tr.unique_fraction,
                            time_ms=(time.perf_counter() - self._pose_t0) * 1e3, final=False)
        try:
            cb(early)
        except Exception as exc:  # the caller's publisher must not take the frontend down
            log.warning("on_pose callback failed: %s", exc)

    def _accept(self, frame: Frame, pred: Prediction, kf: Keyframe, tr: TrackResult, state: str,
                sources: Optional[list[SourceLevel]] = None) -> FrameResult:
        cfg = self.config
        T_kf_frame = tr.T_kf_frame
        # the pose is known: a live caller publishes it now, the map work below follows
        self._emit_pose(frame, self._pose_world(kf.id, T_kf_frame), state, kf.id, tr)
        # fusion into the keyframe (a saved map in localise-only mode stays as it is)
        if cfg.keyframes.fusion and not self.localize_only:
            self._fuse(kf, pred, T_kf_frame)
        is_kf = need_new_keyframe(tr.valid_fraction, tr.unique_fraction, cfg.keyframes.new_kf_match_threshold)
        T_world = self._pose_world(kf.id, T_kf_frame)
        kf_id = kf.id
        if is_kf:
            reuse = self._reuse_keyframe(pred, kf, T_world, sources)
            if reuse is not None:  # bounded map: an existing keyframe covers this view
                kf_id, tr_reuse = reuse
                self._report_reuse_loop(kf.id, T_kf_frame, kf_id, tr_reuse)
                tr = tr_reuse
                kf = self.keyframe_map.get(kf_id)
                T_kf_frame = tr.T_kf_frame
                T_world = self._pose_world(kf_id, T_kf_frame)
                self._kf_id = kf_id
                is_kf = False
        if is_kf and self.localize_only:  # never extend the map: keep the current keyframe
            is_kf = False
        if is_kf:
            T_world_new = self.keyframe_map.pose(kf.id) @ T_kf_frame
            new = self._new_keyframe(frame, pred, T_world_new)
            if self.backend is not None:
                self.backend.add_keyframe(new, T_kf_frame.copy(), tr.information.copy(), ref_id=kf.id)
            self._kf_id = kf_id = new.id
            T_kf_frame = np.eye(4)
        self._T_kf_last = T_kf_frame
        self._last_inlier_fraction = tr.inlier_fraction if not is_kf else 1.0
        self._push_good_pose(T_world, reset_velocity=(state == "relocalised"), stamp=frame.stamp)
        self._last_good_index = frame.index
        self._record(frame, kf_id, T_kf_frame, state)
        return FrameResult(frame.index, frame.stamp, T_world, state, is_kf, kf_id, tr.n_valid,
                           tr.valid_fraction, tr.unique_fraction)

    def _is_loop_keyframe(self, current_id: int, other_id: int) -> bool:
        """True when ``other_id`` is old enough that linking to it closes a loop."""
        return other_id <= current_id - max(int(self.config.backend.loop_min_keyframe_gap), 1)

    def _report_reuse_loop(self, current_id: int, T_cur_frame: np.ndarray, reused_id: int,
                           tr_reused: TrackResult) -> None:
        """Give the backend the loop edge measured when tracking re-anchors on an old keyframe.

        The same frame was tracked against the current keyframe (``T_cur_frame``) and against
        the reused one (``tr_reused.T_kf_frame``), so ``T_cur_reused = T_cur_frame @
        inv(T_reused_frame)`` links the two keyframes. Re-anchoring on a nearby (recent)
        keyframe adds nothing new; on an old one it closes a loop and the backend optimises.
        """
        b = self.backend
        if b is None or not hasattr(b, "add_edge") or not self._is_loop_keyframe(current_id, reused_id):
            return
        if tr_reused.inlier_fraction < self.config.backend.verify_min_inlier_fraction:
            return
        T_cur_reused = T_cur_frame @ np.linalg.inv(tr_reused.T_kf_frame)
        try:
            b.add_edge(current_id, reused_id, T_cur_reused, None)
        except Exception as exc:  # the backend must not take the frontend down
            log.warning("backend add_edge failed: %s", exc)

    def _reuse_keyframe(self, pred: Prediction, current: Keyframe, T_world: np.ndarray,
                        sources: Optional[list[SourceLevel]] = None):
        """(kf_id, TrackResult) of an existing keyframe covering the frame, or None.

        With loop closure disabled only recent keyframes (within ``loop_min_keyframe_gap``)
        may be reused: re-anchoring on an old keyframe is a loop closure.
        """
        b = self.backend
        if b is None or not self.config.backend.reuse_keyframes or not hasattr(b, "covering_keyframe"):
            return None
        exclude = [current.id]
        if not self.config.backend.loop_closure:
            exclude += [i for i in self.keyframe_map.ids() if self._is_loop_keyframe(current.id, i)]
        try:
            hit = b.covering_keyframe(pred.X_cam, pred.C, pred.camera, T_world, exclude_ids=exclude)
        except Exception as exc:  # the backend must not take the frontend down
            log.warning("backend covering_keyframe failed: %s", exc)
            return None
        if hit is None or hit[0] not in self.keyframe_map:
            return None
        kf_id, T_kf_frame = int(hit[0]), np.asarray(hit[1], dtype=np.float64)
        tr = self._track(self.keyframe_map.get(kf_id), sources or self._levels(pred), T_kf_frame)
        if not tr.success or need_new_keyframe(tr.valid_fraction, tr.unique_fraction,
                                               self.config.keyframes.new_kf_match_threshold):
            return None
        return kf_id, tr

    def _fuse(self, kf: Keyframe, pred: Prediction, T_kf_frame: np.ndarray) -> None:
        kf.fuse(pred.X_chw.reshape(3, -1), pred.C.reshape(-1), T_kf_frame,
                self.config.keyframes.fusion_max_distance, float(self.config.keyframes.max_fused_frames),
                count=False)

    def _lost(self, frame: Frame, reason: str, tr: Optional[TrackResult] = None) -> FrameResult:
        if self._lost_since is None:
            self._lost_since = frame.index
        T_kf = self._T_kf_last if self._T_kf_last is not None else np.eye(4)
        T_world = self._pose_world(self._kf_id, T_kf)
        self._record(frame, self._kf_id, T_kf, "lost")
        n = tr.n_valid if tr is not None else 0
        vf = tr.valid_fraction if tr is not None else 0.0
        return FrameResult(frame.index, frame.stamp, T_world, "lost", False, self._kf_id, n, vf, reason=reason)

    def _relocalise(self, frame: Frame, pred: Prediction, sources: list[SourceLevel]) -> FrameResult:
        """Try to link a frame after a loss to the map; 'relocalised' on success.

        Candidates: the backend's relocaliser (retrieval + verification) if attached, refined
        by the tracker; else the current and most recent keyframes, each initialised at the
        last good pose and at its constant-velocity extrapolation over the gap. The solve
        with the most inliers wins if it reaches ``keyframes.reloc_min_valid_fraction``.
        """
        cfg = self.config
        need = max(cfg.keyframes.reloc_min_valid_fraction, cfg.tracking.min_valid_fraction)
        T_world_last = self._pose_world(self._kf_id, self._T_kf_last if self._T_kf_last is not None else np.eye(4))
        best: Optional[tuple[Keyframe, TrackResult]] = None

        def consider(kf: Keyframe, T_init: np.ndarray) -> None:
            nonlocal best
            tr = self._track(kf, sources, T_init)
            if tr.success and tr.inlier_fraction >= need:
                if best is None or tr.inlier_fraction > best[1].inlier_fraction:
                    best = (kf, tr)

        # 0. the map's scene-coordinate relocaliser (a loaded map), refined by the tracker
        if self.relocaliser is not None and cfg.reloc.use_when_lost:
            hit = self._scene_coordinate_guess(frame)
            if hit is not None:
                consider(self.keyframe_map.get(hit[0]), hit[1])
        # 1. the backend's relocaliser (retrieval), refined by the tracker
        if best is None and self.backend is not None and hasattr(self.backend, "relocalize"):
            try:
                hit = self.backend.relocalize(pred)
            except Exception as exc:  # the backend must not take the frontend down
                log.warning("backend relocalisation failed: %s", exc)
                hit = None
            if hit is not None and hit[0] in self.keyframe_map:
                consider(self.keyframe_map.get(hit[0]), np.asarray(hit[1], dtype=np.float64))
        # 2. the most recent keyframes, from the last good pose (and its extrapolation)
        if best is None:
            guesses = [T_world_last]
            if self._T_world_prev is not None and self._T_world_prev2 is not None:
                V = np.linalg.inv(self._T_world_prev2) @ self._T_world_prev
                gap = frame.index - self._last_good_index if self._last_good_index is not None else 1
                if 1 <= gap <= 30:
                    guesses.insert(0, T_world_last @ np.linalg.matrix_power(V, int(gap)))
            ids = self.keyframe_map.ids()
            cands = [self._kf_id] + [i for i in reversed(ids) if i != self._kf_id][
                : max(cfg.keyframes.reloc_candidates - 1, 0)]
            for kf_id in cands:
                kf = self.keyframe_map.get(kf_id)
                T_w_kf_inv = np.linalg.inv(self.keyframe_map.pose(kf_id))
                for T_w in guesses:
                    consider(kf, T_w_kf_inv @ T_w)
                if best is not None and best[1].inlier_fraction >= 0.6:
                    break
        if best is None:
            self._n_reloc_fail += 1
            limit = cfg.keyframes.reinit_after_lost
            if limit > 0 and self._n_reloc_fail >= limit and not self.localize_only:
                return self._reinitialise(frame, pred, T_world_last)
            return self._lost(frame, "relocalisation failed")
        kf, tr = best
        self._kf_id = kf.id
        self._lost_since = None
        self._n_reloc_fail = 0
        self._n_reloc += 1
        return self._accept(frame, pred, kf, tr, "relocalised", sources)

    def _scene_coordinate_guess(self, frame: Frame) -> Optional[tuple[int, np.ndarray]]:
        """(keyframe id, T_kf_frame) from the relocaliser's pose of ``frame``, or None.

        The keyframe is the one whose optical centre is closest to the relocalised camera
        among those looking the same way (within 60 degrees).
        """
        try:
            res = self.relocaliser.localize(frame.image, frame.camera)
        except Exception as exc:  # the relocaliser must not take the frontend down
            log.warning("scene-coordinate relocalisation failed: %s", exc)
            return None
        if not res.ok or res.T_world_cam is None:
            return None
        ids, poses = self.keyframe_map.poses()
        if not ids:
            return None
        T = np.asarray(res.T_world_cam, dtype=np.float64)
        d = np.linalg.norm(poses[:, :3, 3] - T[:3, 3], axis=1)
        z = poses[:, :3, 2] / np.linalg.norm(poses[:, :3, 2], axis=1, keepdims=True)
        facing = z @ T[:3, 2] > 0.5
        d = np.where(facing, d, d + 1e3)
        k = int(np.argmin(d))
        return ids[k], np.linalg.inv(poses[k]) @ T

    def _reinitialise(self, frame: Frame, pred: Prediction, T_world_last: np.ndarray) -> FrameResult:
        """Give up relocalising: new keyframe at the last good pose (no edge to the old map)."""
        kf = self._new_keyframe(frame, pred, T_world_last)
        if self.backend is not None:
            self.backend.add_keyframe(kf, None, None)
        self._kf_id = kf.id
        self._lost_since = None
        self._n_reloc_fail = 0
        self._T_kf_last = np.eye(4)
        self._push_good_pose(T_world_last, reset_velocity=True, stamp=frame.stamp)
        self._last_good_index = frame.index
        self._record(frame, kf.id, np.eye(4), "initialising")
        n = int((pred.C > 0).sum())
        return FrameResult(frame.index, frame.stamp, T_world_last.copy(), "initialising", True, kf.id, n, 1.0, 1.0,
                           reason="relocalisation failed repeatedly: new keyframe at the last pose")

    def start_lost_at(self, kf_id: int, T_world_cam: np.ndarray) -> None:
        """Put the engine in the 'lost' state at pose ``T_world_cam`` (4, 4) near keyframe
        ``kf_id``: the next frame relocalises from there (e.g. after loading a saved map)."""
        with self._lock:
            T = np.asarray(T_world_cam, dtype=np.float64)
            self._kf_id = int(kf_id)
            self._T_kf_last = np.linalg.inv(self.keyframe_map.pose(kf_id)) @ T
            self._T_world_prev, self._T_world_prev2 = T, None
            self._last_good_index = None
            self._lost_since = 0

    # ------------------------------------------------------------------ outputs
    def trajectory(self) -> tuple[np.ndarray, np.ndarray]:
        """Poses of every processed frame with the current keyframe poses.

        Returns:
            stamps (N,) float64 seconds and T_world_cam (N, 4, 4) float64 (frames processed
            before the first keyframe get the identity).
        """
        stamps, kf_ids, T_kf_frame = self._trajectory_arrays()
        ids, poses = self.keyframe_map.poses()
        out = np.broadcast_to(np.eye(4), (len(stamps), 4, 4)).copy()
        if len(ids) and len(stamps):
            # vectorised (the ROS node asks for it several times a second, next to tracking)
            lut = np.full(max(int(max(ids)), int(kf_ids.max(initial=-1))) + 2, -1, dtype=np.int64)
            lut[np.asarray(ids, dtype=np.int64)] = np.arange(len(ids))
            slot = lut[np.where(kf_ids >= 0, kf_ids, -1)]
            known = slot >= 0
            T = poses[slot[known]] @ T_kf_frame[known]
            s = np.cbrt(np.linalg.det(T[:, :3, :3]))
            scaled = np.abs(s - 1.0) >= 1e-9  # drop the scale of Sim(3) poses (see _rigid)
            T[scaled, :3, :3] /= s[scaled, None, None]
            out[known] = T
        return stamps, out

    def _trajectory_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Frame records as arrays: stamps (N,) float64, keyframe ids (N,) int64, T_kf_frame
        (N, 4, 4) float64; cached and extended incrementally (records are only appended, a
        reset starts a new list)."""
        with self._lock:
            records = self._records
            n = len(records)
            cache = self._traj_cache
            if cache is None or cache[0] is not records or cache[1] > n:
                cache = (records, 0, np.zeros(0), np.zeros(0, np.int64), np.zeros((0, 4, 4)))
            _, m, st, ki, Tk = cache
            if m < n:
                new = records[m:n]
                st = np.concatenate([st, np.fromiter((r.stamp for r in new), np.float64, len(new))])
                ki = np.concatenate([ki, np.fromiter((r.kf_id for r in new), np.int64, len(new))])
                Tk = np.concatenate([Tk, np.stack([r.T_kf_frame for r in new])])
                self._traj_cache = (records, n, st, ki, Tk)
            return st, ki, Tk

    def frame_states(self) -> list[str]:
        """State of every processed frame, in order."""
        with self._lock:
            return [r.state for r in self._records]

    def keyframes(self) -> tuple[list[int], np.ndarray, np.ndarray]:
        """(ids, stamps (K,) float64, T_world_kf (K, 4, 4) float64) of all keyframes."""
        ids, poses = self.keyframe_map.poses()
        stamps = np.array([self.keyframe_map.get(i).stamp for i in ids], dtype=np.float64)
        return ids, stamps, np.stack([_rigid(T) for T in poses]) if len(ids) else poses

    def fused_cloud(self, voxel_size: Optional[float] = None) -> tuple[np.ndarray, np.ndarray]:
        """Coloured point cloud of all keyframe pointmaps in the world frame.

        Args:
            voxel_size: Open3D voxel downsampling size in metres (default
                ``config.output.voxel_size``; 0 disables it).

        Returns:
            xyz (N, 3) float32 world points and rgb (N, 3) uint8 colours.
        """
        o = self.config.output
        voxel = o.voxel_size if voxel_size is None else float(voxel_size)
        xyz_all, rgb_all = [], []
        for kf in self.keyframe_map.keyframes():
            X, C = kf.snapshot()
            T = self.keyframe_map.pose(kf.id)
            s = o.cloud_stride
            X, C, img = X[::s, ::s], C[::s, ::s], kf.image[::s, ::s]
            valid = C > 0
            if not bool(valid.any()):
                continue
            thr = o.cloud_min_confidence * float(C[valid].median())
            m = (C >= thr) & valid
            pts = X[m].double().cpu().numpy()
            xyz_all.append(pts @ T[:3, :3].T + T[:3, 3])
            rgb_all.append(img[m].cpu().numpy())
        if not xyz_all:
            return np.zeros((0, 3), np.float32), np.zeros((0, 3), np.uint8)
        xyz = np.concatenate(xyz_all)
        rgb = np.concatenate(rgb_all)
        if voxel > 0 and len(xyz):
            xyz, rgb = voxel_downsample(xyz, rgb, voxel)
        return xyz.astype(np.float32), rgb.astype(np.uint8)

    def stats(self) -> dict[str, Any]:
        """Counters: n_frames, n_keyframes, n_lost, n_relocalised, fps, mean_ms, memory, device."""
        n_kf = len(self.keyframe_map)
        mem = self.keyframe_map.memory_bytes()
        out = {
            "n_frames": self._n_frames,
            "n_keyframes": n_kf,
            "n_lost": self._n_lost,
            "n_relocalised": self._n_reloc,
            "fps": self._n_frames / self._time_s if self._time_s > 0 else 0.0,
            "mean_ms": 1e3 * self._time_s / max(self._n_frames, 1),
            "memory_bytes": mem,
            "memory_per_keyframe_bytes": mem / n_kf if n_kf else 0.0,
            "device": str(self.device),
            "backend": self.backend is not None,
            "stage_ms": {k: 1e3 * v / max(self._n_frames, 1) for k, v in self._stage_s.items()},
        }
        if self.backend is not None and hasattr(self.backend, "stats"):
            try:
                b = self.backend.stats()
                if isinstance(b, dict):
                    out.update({k: v for k, v in b.items() if k not in out})
            except Exception:  # pragma: no cover - diagnostics only
                pass
        return out
