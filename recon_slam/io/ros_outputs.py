"""Every ROS output of the SLAM engine, built in one place (no rclpy import).

The ROS node (:mod:`recon_slam.ros.slam_node`, with :class:`~recon_slam.io.messages.RclpyTypes`)
and ``recon-slam replay`` (:mod:`recon_slam.replay`, with
:class:`~recon_slam.io.messages.RosbagsTypes`) both turn engine results into messages
through :class:`RosOutputs`, so the two publish the same topics, frames and content.

Frames (REP-105 / REP-103)::

    map -> odom -> base_link -> camera optical frame

* The engine's ``world`` frame is the optical frame of the first camera pose. The ``map``
  frame is placed at the first *base* pose: ``T_map_world = T_base_cam`` (constant), so
  ``T_map_base = T_map_world @ T_world_cam @ inv(T_base_cam)`` is the identity at the
  first frame and ``map`` keeps REP-103 axes when the extrinsic does.
* ``T_base_cam`` (camera optical frame in base_link) comes from the TF tree, else from
  parameters, else :func:`default_T_base_cam`: base_link sits at the camera with body
  axes (x forward, y left, z up), i.e. the camera *is* base_link up to the fixed optical
  rotation ``(x, y, z, w) = (-0.5, 0.5, -0.5, 0.5)``.
* ``map -> odom`` is always published: ``T_map_odom = T_map_base @ inv(T_odom_base)``.
  ``T_odom_base`` is either the robot's own odometry (looked up in TF at the image
  stamp) or, with ``publish_odom_tf``, our visual odometry (:class:`VisualOdometry`):
  frame-to-frame increments of the SLAM pose, which stays continuous when the SLAM pose
  jumps (relocalisation, large loop-closure corrections); the jump goes into
  ``map -> odom`` instead.

Topics (relative to the node, ``~/x`` = ``/recon_slam/x`` with the default node name):
see :data:`OUTPUT_TOPICS`. Stamps are the image stamps (float seconds).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np
from scipy.spatial.transform import Rotation

from recon_slam.geometry.camera import PinholeCamera
from recon_slam.geometry.transforms import invert_pose, pose_from_quat
from recon_slam.io.messages import (
    make_frustum_markers,
    make_header,
    make_odometry,
    make_path,
    make_pointcloud2,
    make_pose_stamped,
    make_tf_message,
    make_transform_stamped,
)

__all__ = [
    "NODE_NAME",
    "OUTPUT_TOPICS",
    "TF_TOPICS",
    "OPTICAL_QUAT_IN_LINK",
    "FrameNames",
    "OutputPolicy",
    "NodeStatus",
    "FrameOutputs",
    "VisualOdometry",
    "RosOutputs",
    "default_T_base_cam",
    "graph_edges",
    "MapCloudCache",
    "voxel_downsample",
    "output_topics",
    "DIAG_OK",
    "DIAG_WARN",
    "DIAG_ERROR",
]

#: default node name; ``~/odometry`` resolves to ``/recon_slam/odometry``.
NODE_NAME = "recon_slam"

#: relative output topic -> message type (``~/`` = node namespace; ``/diagnostics`` absolute)
OUTPUT_TOPICS: dict[str, str] = {
    "~/odometry": "nav_msgs/msg/Odometry",
    "~/pose": "geometry_msgs/msg/PoseStamped",
    "~/path": "nav_msgs/msg/Path",
    "~/map_cloud": "sensor_msgs/msg/PointCloud2",
    "~/keyframes": "visualization_msgs/msg/MarkerArray",
    "/diagnostics": "diagnostic_msgs/msg/DiagnosticArray",
}
#: TF topics (tf2_msgs/msg/TFMessage)
TF_TOPICS: dict[str, str] = {"/tf": "tf2_msgs/msg/TFMessage", "/tf_static": "tf2_msgs/msg/TFMessage"}

#: camera_link -> camera optical frame rotation (x, y, z, w) (REP-103: z forward, x right, y down)
OPTICAL_QUAT_IN_LINK = (-0.5, 0.5, -0.5, 0.5)

#: diagnostic_msgs/DiagnosticStatus levels
DIAG_OK, DIAG_WARN, DIAG_ERROR, DIAG_STALE = 0, 1, 2, 3


def output_topics(node_name: str = NODE_NAME, namespace: str = "/") -> dict[str, str]:
    """Absolute output topic -> message type for a node called ``node_name`` in ``namespace``.

    Includes ``/tf`` and ``/tf_static``.
    """
    ns = "/" + namespace.strip("/")
    prefix = (ns.rstrip("/") + "/" + node_name).replace("//", "/")
    out = {}
    for rel, msgtype in OUTPUT_TOPICS.items():
        out[prefix + rel[1:] if rel.startswith("~/") else rel] = msgtype
    out.update(TF_TOPICS)
    return out


def default_T_base_cam() -> np.ndarray:
    """(4, 4) ``T_base_cam`` when no extrinsic is known: base_link at the camera, body axes.

    The rotation maps optical axes (z forward, x right, y down) onto body axes (x forward,
    y left, z up); the translation is zero.
    """
    return pose_from_quat(np.zeros(3), np.asarray(OPTICAL_QUAT_IN_LINK))


@dataclass
class FrameNames:
    """TF frame names (parameters of the node; ``camera`` empty = the image's ``frame_id``)."""

    map: str = "map"
    odom: str = "odom"
    base: str = "base_link"
    camera: str = "camera_optical_frame"


@dataclass
class OutputPolicy:
    """How often the heavier outputs are produced, in stream time (image stamps).

    Attributes:
        path_period_s: ``~/path`` at most this often (it is also re-sent after a new keyframe).
        markers_period_s: ``~/keyframes`` at most this often, and only when keyframes changed.
        cloud_period_s: ``~/map_cloud`` at most this often, and only when keyframes changed.
        cloud_voxel_m: voxel size of the published map cloud (metres).
        cloud_max_points: a larger cloud is subsampled (regular stride) to this many points.
        frustum_scale_m: depth of the keyframe frustum markers.
        odom_jump_m, odom_jump_rad: a SLAM pose step larger than this between two frames is
            a jump (relocalisation / correction): the visual odometry holds still and the
            step goes into ``map -> odom``.
        position_sigma_m, rotation_sigma_rad: nominal 1-sigma of the published pose
            covariance (diagonal; the engine has no per-frame covariance yet).
    """

    path_period_s: float = 0.2
    markers_period_s: float = 1.0
    cloud_period_s: float = 2.0
    cloud_voxel_m: float = 0.02
    cloud_max_points: int = 200_000
    frustum_scale_m: float = 0.1
    odom_jump_m: float = 0.3
    odom_jump_rad: float = 0.5
    position_sigma_m: float = 0.01
    rotation_sigma_rad: float = 0.01


@dataclass
class NodeStatus:
    """What ``/diagnostics`` reports (also the node's answer to "why is it not tracking?").

    Attributes:
        state: engine state ('initialising', 'tracking', 'lost', 'relocalised') or the
            node's waiting state ('waiting_for_data', 'error').
        reason: human-readable cause when not tracking ('' otherwise).
        level: DIAG_OK / DIAG_WARN / DIAG_ERROR; derived from ``state`` when None.
        fps: frames processed per second (recent average).
        n_keyframes, frames_received, frames_processed, frames_dropped: counters.
        latency_ms: image arrival -> odometry publication of the last frame.
        extra: more key/values shown in the diagnostics (strings).
    """

    state: str = "waiting_for_data"
    reason: str = ""
    level: Optional[int] = None
    fps: float = 0.0
    n_keyframes: int = 0
    frames_received: int = 0
    frames_processed: int = 0
    frames_dropped: int = 0
    latency_ms: float = float("nan")
    extra: dict = field(default_factory=dict)

    def resolved_level(self) -> int:
        """The diagnostic level: given, or OK when tracking/relocalised, ERROR on 'error', else WARN."""
        if self.level is not None:
            return int(self.level)
        if self.state in ("tracking", "relocalised"):
            return DIAG_OK
        if self.state == "error":
            return DIAG_ERROR
        return DIAG_WARN

    def message(self) -> str:
        """One line: the state, plus the reason when there is one."""
        return f"{self.state}: {self.reason}" if self.reason else self.state


@dataclass
class FrameOutputs:
    """Messages of one processed frame, plus the poses they hold.

    Attributes:
        odometry: nav_msgs/Odometry (our visual odometry; odom frame, child base_link) or None (no pose).
        pose: geometry_msgs/PoseStamped of base_link in map, or None.
        transforms: TransformStamped list for ``/tf`` (map->odom [, odom->base_link]).
        T_map_base, T_odom_base, T_map_odom: (4, 4) poses (None when unknown).
    """

    odometry: Any = None
    pose: Any = None
    transforms: list = field(default_factory=list)
    T_map_base: Optional[np.ndarray] = None
    T_odom_base: Optional[np.ndarray] = None
    T_map_odom: Optional[np.ndarray] = None


def _rotation_angle(R: np.ndarray) -> float:
    return float(np.linalg.norm(Rotation.from_matrix(R).as_rotvec()))


class VisualOdometry:
    """Continuous ``T_odom_base`` from SLAM poses ``T_map_base`` (see the module notes).

    Args:
        jump_m, jump_rad: a step between consecutive SLAM poses larger than this, or any
            step into the 'relocalised' state, is a jump: odometry holds its last pose.
    """

    def __init__(self, jump_m: float = 0.3, jump_rad: float = 0.5) -> None:
        self.jump_m = float(jump_m)
        self.jump_rad = float(jump_rad)
        self.reset()

    def reset(self) -> None:
        """Forget the history (the next pose starts odometry again at ``T_odom_base = T_map_base``)."""
        self.T_odom_base: Optional[np.ndarray] = None
        self._T_map_base_prev: Optional[np.ndarray] = None
        self._stamp_prev: Optional[float] = None
        self.twist = np.zeros(6)
        self.n_jumps = 0

    def update(self, stamp: float, T_map_base: np.ndarray, state: str) -> np.ndarray:
        """New SLAM pose (4, 4) at ``stamp`` -> (4, 4) ``T_odom_base``; sets :attr:`twist` (6,) in base_link."""
        T_map_base = np.asarray(T_map_base, dtype=np.float64)
        if self.T_odom_base is None or self._T_map_base_prev is None:
            self.T_odom_base = T_map_base.copy()
            self.twist = np.zeros(6)
        else:
            step = invert_pose(self._T_map_base_prev) @ T_map_base  # T_prev_cur in base frame
            jump = (
                state == "relocalised"
                or np.linalg.norm(step[:3, 3]) > self.jump_m
                or _rotation_angle(step[:3, :3]) > self.jump_rad
            )
            dt = stamp - self._stamp_prev if self._stamp_prev is not None else 0.0
            if jump:
                self.n_jumps += 1
                self.twist = np.zeros(6)
            else:
                self.T_odom_base = self.T_odom_base @ step
                if dt > 1e-6:
                    self.twist = np.concatenate(
                        [step[:3, 3] / dt, Rotation.from_matrix(step[:3, :3]).as_rotvec() / dt]
                    )
        self._T_map_base_prev = T_map_base.copy()
        self._stamp_prev = float(stamp)
        return self.T_odom_base.copy()


def _finite_pose(T: Any) -> Optional[np.ndarray]:
    if T is None:
        return None
    T = np.asarray(T, dtype=np.float64)
    if T.shape != (4, 4) or not np.all(np.isfinite(T)):
        return None
    return T


class RosOutputs:
    """Builds every output message of the SLAM node from engine results.

    Args:
        types: message factory (``RclpyTypes()`` in the node, ``RosbagsTypes()`` offline).
        frames: TF frame names.
        T_base_cam: (4, 4) camera optical frame in base_link (None: :func:`default_T_base_cam`).
        policy: output rates and sizes.
        publish_odom_tf: publish ``odom -> base_link`` from our visual odometry; when False
            the robot's own odometry must be passed to :meth:`frame_outputs`.
    """

    def __init__(
        self,
        types: Any,
        frames: FrameNames | None = None,
        T_base_cam: Optional[np.ndarray] = None,
        policy: OutputPolicy | None = None,
        publish_odom_tf: bool = True,
    ) -> None:
        self.types = types
        self.frames = frames or FrameNames()
        self.policy = policy or OutputPolicy()
        self.publish_odom_tf = bool(publish_odom_tf)
        self.odometry = VisualOdometry(self.policy.odom_jump_m, self.policy.odom_jump_rad)
        self.set_extrinsic(default_T_base_cam() if T_base_cam is None else T_base_cam)
        self.reset()

    # ------------------------------------------------------------------ state
    def set_extrinsic(self, T_base_cam: np.ndarray) -> None:
        """Use (4, 4) ``T_base_cam`` from now on (also defines ``T_map_world = T_base_cam``)."""
        T = _finite_pose(T_base_cam)
        if T is None:
            raise ValueError("T_base_cam must be a finite (4, 4) pose")
        self.T_base_cam = T
        self.T_cam_base = invert_pose(T)
        self.T_map_world = T.copy()

    def set_map_origin(self, T_map_world: np.ndarray) -> None:
        """Place the engine world in the map frame with (4, 4) ``T_map_world`` (e.g. from a loaded map)."""
        T = _finite_pose(T_map_world)
        if T is None:
            raise ValueError("T_map_world must be a finite (4, 4) pose")
        self.T_map_world = T.copy()

    def reset(self) -> None:
        """Forget odometry, the last map->odom and the output schedule (after an engine reset)."""
        self.odometry.reset()
        self.T_map_odom: Optional[np.ndarray] = None
        self._last_due: dict[str, float] = {}
        self._last_kf_count: dict[str, int] = {}

    # ------------------------------------------------------------------ poses
    def map_base_from_world_cam(self, T_world_cam: np.ndarray) -> np.ndarray:
        """Engine pose (4, 4) ``T_world_cam`` -> (4, 4) ``T_map_base``."""
        return self.T_map_world @ np.asarray(T_world_cam, dtype=np.float64) @ self.T_cam_base

    def map_cam_from_world_cam(self, T_world_cam: np.ndarray) -> np.ndarray:
        """Engine poses (..., 4, 4) ``T_world_cam`` -> (..., 4, 4) ``T_map_cam``."""
        return self.T_map_world @ np.asarray(T_world_cam, dtype=np.float64)

    def world_cam_from_map_base(self, T_map_base: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`map_base_from_world_cam`: (..., 4, 4) ``T_map_base`` -> ``T_world_cam``."""
        return invert_pose(self.T_map_world) @ np.asarray(T_map_base, dtype=np.float64) @ self.T_base_cam

    def _covariance(self) -> np.ndarray:
        p = self.policy
        return np.diag([p.position_sigma_m**2] * 3 + [p.rotation_sigma_rad**2] * 3)

    # ------------------------------------------------------------------ per frame
    def frame_outputs(
        self,
        stamp: float,
        T_world_cam: Optional[np.ndarray],
        state: str,
        T_odom_base_external: Optional[np.ndarray] = None,
    ) -> FrameOutputs:
        """Odometry, pose and ``/tf`` transforms of one processed frame.

        Args:
            stamp: image stamp (s).
            T_world_cam: (4, 4) engine pose of the frame, or None / non-finite when the
                engine has none (lost): then no odometry/pose; ``map -> odom`` is re-sent
                with its last value (keeps the TF tree alive).

        The Odometry message always holds our visual odometry (:class:`VisualOdometry`,
        continuous, in ``odom``); with ``publish_odom_tf`` it is also ``odom -> base_link``
        on ``/tf``, otherwise the robot's odometry (``T_odom_base_external``) defines
        ``odom`` and ``map -> odom`` is computed from it (kept at its last value when the
        look-up failed).
            state: engine state ('initialising', 'tracking', 'lost', 'relocalised').
            T_odom_base_external: (4, 4) robot odometry at ``stamp`` (used when
                ``publish_odom_tf`` is False); None when it could not be looked up.
        """
        out = FrameOutputs()
        types, fr = self.types, self.frames
        T_wc = _finite_pose(T_world_cam)
        if T_wc is not None and state != "lost":
            T_map_base = self.map_base_from_world_cam(T_wc)
            T_vo = self.odometry.update(stamp, T_map_base, state)
            out.odometry = make_odometry(
                types, T_vo, stamp, fr.odom, fr.base, twist=self.odometry.twist, covariance=self._covariance()
            )
            out.pose = make_pose_stamped(types, T_map_base, stamp, fr.map)
            out.T_map_base = T_map_base
            T_odom_base = T_vo if self.publish_odom_tf else _finite_pose(T_odom_base_external)
            out.T_odom_base = T_odom_base
            if T_odom_base is not None:
                self.T_map_odom = T_map_base @ invert_pose(T_odom_base)
            if self.publish_odom_tf:
                out.transforms.append(make_transform_stamped(types, T_vo, stamp, fr.odom, fr.base))
        elif self.publish_odom_tf and self.odometry.T_odom_base is not None:
            # lost: odometry holds still; keep odom -> base_link fresh
            out.T_odom_base = self.odometry.T_odom_base.copy()
            out.transforms.append(make_transform_stamped(types, out.T_odom_base, stamp, fr.odom, fr.base))
        if self.T_map_odom is not None:
            out.T_map_odom = self.T_map_odom.copy()
            out.transforms.insert(0, make_transform_stamped(types, self.T_map_odom, stamp, fr.map, fr.odom))
        return out

    def static_transforms(self, stamp: float, camera_frame: Optional[str] = None) -> list:
        """``/tf_static`` transforms we own: ``base_link -> camera`` (T_base_cam).

        Only publish these when the extrinsic did not come from the TF tree (else someone
        else already publishes it).
        """
        cam = camera_frame or self.frames.camera
        if cam == self.frames.base:
            return []
        return [make_transform_stamped(self.types, self.T_base_cam, stamp, self.frames.base, cam)]

    def tf_message(self, transforms: Sequence[Any]) -> Any:
        """``tf2_msgs/TFMessage`` of ``transforms`` (the type must be available to the factory)."""
        return make_tf_message(self.types, transforms)

    # ------------------------------------------------------------------ schedule
    def due(self, name: str, stamp: float, n_keyframes: Optional[int] = None, force: bool = False) -> bool:
        """Whether output ``name`` ('path', 'markers', 'cloud') is due at ``stamp``; marks it sent if so.

        'path' is due every ``path_period_s`` or when a keyframe was added; 'markers' and
        'cloud' every ``markers_period_s`` / ``cloud_period_s`` but only when the keyframe
        count changed since they were last sent. ``force`` sends now (after a reset, a
        map load or at the end of a replay).
        """
        period = {
            "path": self.policy.path_period_s,
            "markers": self.policy.markers_period_s,
            "cloud": self.policy.cloud_period_s,
        }[name]
        last = self._last_due.get(name)
        kf_changed = n_keyframes is not None and self._last_kf_count.get(name) != n_keyframes
        if force:
            ok = True
        elif name == "path":
            ok = last is None or stamp - last >= period or stamp < last or kf_changed
        else:
            ok = kf_changed and (last is None or stamp - last >= period or stamp < last)
        if ok:
            self._last_due[name] = float(stamp)
            if n_keyframes is not None:
                self._last_kf_count[name] = int(n_keyframes)
        return ok

    # ------------------------------------------------------------------ heavier outputs
    def path_msg(self, stamp: float, stamps: Sequence[float], T_world_cams: np.ndarray) -> Any:
        """``nav_msgs/Path`` of base_link in map from the engine trajectory ((N,), (N, 4, 4) ``T_world_cam``).

        The poses are the engine's current (loop-corrected) estimates; the header carries ``stamp``.
        """
        T = np.asarray(T_world_cams, dtype=np.float64).reshape(-1, 4, 4)
        st = np.asarray(stamps, dtype=np.float64).reshape(-1)
        ok = np.all(np.isfinite(T.reshape(len(T), -1)), axis=1) if len(T) else np.zeros(0, bool)
        T_map_base = self.T_map_world @ T[ok] @ self.T_cam_base
        msg = make_path(self.types, st[ok].tolist(), T_map_base, self.frames.map)
        msg.header = make_header(self.types, stamp, self.frames.map)
        return msg

    def cloud_msg(self, stamp: float, xyz_world: np.ndarray, rgb: Optional[np.ndarray]) -> Any:
        """``sensor_msgs/PointCloud2`` (x y z rgb, map frame) from world points (N, 3) and colours (N, 3) uint8.

        Clouds above ``cloud_max_points`` are subsampled with a regular stride.
        """
        xyz = np.asarray(xyz_world, dtype=np.float64).reshape(-1, 3)
        col = None if rgb is None else np.asarray(rgb, dtype=np.uint8).reshape(-1, 3)
        n_max = max(1, int(self.policy.cloud_max_points))
        if len(xyz) > n_max:
            step = int(math.ceil(len(xyz) / n_max))
            xyz = xyz[::step]
            col = None if col is None else col[::step]
        T = self.T_map_world
        xyz_map = xyz @ T[:3, :3].T + T[:3, 3]
        return make_pointcloud2(self.types, xyz_map.astype(np.float32), col, stamp, self.frames.map)

    def markers_msg(
        self,
        stamp: float,
        T_world_kfs: np.ndarray,
        camera: PinholeCamera,
        ids: Optional[Sequence[int]] = None,
        edges: Optional[Sequence[tuple[int, int]]] = None,
    ) -> Any:
        """``visualization_msgs/MarkerArray``: keyframe frustums (one LINE_LIST per keyframe id) and graph edges.

        Args:
            T_world_kfs: (K, 4, 4) keyframe poses ``T_world_cam``.
            camera: intrinsics drawn by the frustums.
            ids: (K,) keyframe ids (marker ids); default 0..K-1.
            edges: pairs of *indices* into ``T_world_kfs``; default consecutive keyframes.
        """
        T = self.map_cam_from_world_cam(np.asarray(T_world_kfs, dtype=np.float64).reshape(-1, 4, 4))
        if edges is None:
            edges = [(k, k + 1) for k in range(len(T) - 1)]
        return make_frustum_markers(
            self.types, T, camera, stamp, self.frames.map, list(edges), ids=ids, scale=self.policy.frustum_scale_m
        )

    def diagnostics_msg(self, stamp: float, status: NodeStatus, name: str = "recon_slam: SLAM", hardware_id: str = "") -> Any:
        """``diagnostic_msgs/DiagnosticArray`` with one status: state, reason, fps, keyframes, counters."""
        types = self.types
        values = {
            "state": status.state,
            "reason": status.reason,
            "fps": f"{status.fps:.2f}",
            "keyframes": str(int(status.n_keyframes)),
            "frames_received": str(int(status.frames_received)),
            "frames_processed": str(int(status.frames_processed)),
            "frames_dropped": str(int(status.frames_dropped)),
            "latency_ms": "nan" if not math.isfinite(status.latency_ms) else f"{status.latency_ms:.1f}",
        }
        values.update({str(k): str(v) for k, v in status.extra.items()})
        kv = [types.new("diagnostic_msgs/msg/KeyValue", key=k, value=v) for k, v in values.items()]
        diag = types.new(
            "diagnostic_msgs/msg/DiagnosticStatus",
            name=name,
            message=status.message(),
            hardware_id=hardware_id or self.frames.camera,
            values=kv,
        )
        level = status.resolved_level()
        # `level` is a ROS `byte`: rclpy wants bytes (an int would serialise wrongly), rosbags an int
        diag.level = bytes([level]) if isinstance(diag.level, (bytes, bytearray)) else level
        return types.new(
            "diagnostic_msgs/msg/DiagnosticArray", header=make_header(types, stamp, ""), status=[diag]
        )


def graph_edges(engine: Any, ids: Sequence[int]) -> Optional[list[tuple[int, int]]]:
    """Keyframe graph edges of ``engine`` as index pairs into ``ids`` (for :meth:`RosOutputs.markers_msg`).

    Uses ``engine.graph_edges()`` or the backend's ``edges()`` (objects with ``i``/``j``
    keyframe ids, or pairs); None when the engine has no graph (markers then join
    consecutive keyframes).
    """
    get = getattr(engine, "graph_edges", None)
    backend = getattr(engine, "backend", None)
    if get is None and backend is not None:
        get = getattr(backend, "graph_edges", None) or getattr(backend, "edges", None)
    if not callable(get):
        return None
    try:
        pairs = list(get())
    except Exception:  # noqa: BLE001 - markers only
        return None
    index = {int(k): n for n, k in enumerate(ids)}
    out = []
    for p in pairs:
        i, j = (int(p.i), int(p.j)) if hasattr(p, "i") else (int(p[0]), int(p[1]))
        if i in index and j in index:
            out.append((index[i], index[j]))
    return out


def voxel_downsample(xyz: np.ndarray, rgb: Optional[np.ndarray], voxel: float) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Keep the first point of every ``voxel``-sized cell: (N, 3) points [+ (N, 3) colours] -> (M, 3) [+ (M, 3)].

    Pure NumPy (one sort); cells are indexed within +-2^20 voxels of the origin.
    """
    xyz = np.asarray(xyz)
    if voxel <= 0 or len(xyz) == 0:
        return xyz, rgb
    k = np.floor(xyz / voxel).astype(np.int64) + (1 << 20)
    key = (k[:, 0] << 42) | (k[:, 1] << 21) | k[:, 2]
    _, first = np.unique(key, return_index=True)
    first.sort()
    return xyz[first], (None if rgb is None else rgb[first])


class MapCloudCache:
    """The map cloud, built incrementally from keyframe pointmaps (what ``~/map_cloud`` shows).

    Each keyframe's confident points are voxel-downsampled once in its own camera frame and
    cached by ``(id, n_fused)`` (only the keyframe being fused changes between calls); a
    call transforms the cached points with the current, possibly loop-corrected, keyframe
    poses and removes duplicates across keyframes with a second voxel pass. Much cheaper
    than re-fusing every keyframe each time, which matters on a CPU shared with tracking.

    Args:
        voxel: voxel size in metres.
        min_confidence: points below this fraction of their keyframe's median confidence are
            left out (the engine's ``output.cloud_min_confidence``).
        stride: use every ``stride``-th pixel along each axis (``output.cloud_stride``).
    """

    def __init__(self, voxel: float, min_confidence: float = 0.5, stride: int = 1) -> None:
        self.voxel = float(voxel)
        self.min_confidence = float(min_confidence)
        self.stride = max(1, int(stride))
        self._cache: dict[int, tuple[int, np.ndarray, np.ndarray]] = {}

    def clear(self) -> None:
        """Forget every cached keyframe (after a reset or a map load)."""
        self._cache.clear()

    def _local(self, kf: Any) -> tuple[np.ndarray, np.ndarray]:
        X, C = kf.snapshot()
        s = self.stride
        X = X[::s, ::s].detach().cpu().numpy() if hasattr(X, "detach") else np.asarray(X)[::s, ::s]
        C = C[::s, ::s].detach().cpu().numpy() if hasattr(C, "detach") else np.asarray(C)[::s, ::s]
        img = kf.image[::s, ::s]
        img = img.detach().cpu().numpy() if hasattr(img, "detach") else np.asarray(img)
        valid = C > 0
        if not valid.any():
            return np.zeros((0, 3), np.float32), np.zeros((0, 3), np.uint8)
        m = valid & (C >= self.min_confidence * float(np.median(C[valid])))
        return voxel_downsample(X[m].astype(np.float32), img[m].astype(np.uint8), self.voxel)

    def cloud(self, engine: Any) -> tuple[np.ndarray, np.ndarray]:
        """World-frame cloud of ``engine``'s keyframes: xyz (N, 3) float32, rgb (N, 3) uint8."""
        kmap = engine.keyframe_map
        kfs = kmap.keyframes()
        ids, poses = kmap.poses([k.id for k in kfs]) if kfs else ([], np.zeros((0, 4, 4)))
        present = set()
        xyz_all, rgb_all = [], []
        for kf, T in zip(kfs, poses):
            present.add(kf.id)
            entry = self._cache.get(kf.id)
            if entry is None or entry[0] != kf.n_fused:
                pts, col = self._local(kf)
                entry = (kf.n_fused, pts, col)
                self._cache[kf.id] = entry
            _, pts, col = entry
            if len(pts):
                xyz_all.append(pts.astype(np.float64) @ T[:3, :3].T + T[:3, 3])
                rgb_all.append(col)
        for k in list(self._cache):
            if k not in present:
                del self._cache[k]
        if not xyz_all:
            return np.zeros((0, 3), np.float32), np.zeros((0, 3), np.uint8)
        xyz, rgb = voxel_downsample(np.concatenate(xyz_all), np.concatenate(rgb_all), self.voxel)
        return xyz.astype(np.float32), rgb
