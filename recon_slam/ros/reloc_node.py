"""The localisation node: ``ros2 run recon_slam reloc_node``.

Localises single camera images against a saved map (like AMCL, but from images): each
processed image goes through the map's scene-coordinate relocaliser
(:meth:`recon_slam.reloc.Relocaliser.localize`); an accepted pose is published as
``~/pose`` (``geometry_msgs/PoseWithCovarianceStamped`` of ``base_link`` in ``map``,
stamped with the image stamp) and, with ``publish_tf``, as ``map -> odom`` on ``/tf``. A
rejected image publishes nothing: ``/diagnostics`` says ``not_localised`` with the reason
and a throttled log line repeats it.

Frames (REP-105)::

    map -> odom -> base_link -> camera optical frame

* The map's world frame is placed in ``map`` by the map's ``T_map_world`` (saved by the
  SLAM node; identity for maps without it), so ``T_map_cam = T_map_world @ T_world_cam``
  and ``T_map_base = T_map_cam @ inv(T_base_cam)``.
* ``T_base_cam`` (camera optical frame in base_link) comes, as in the SLAM node, from
  ``/tf_static`` (``use_tf_extrinsic``, waiting ``extrinsic_wait`` s for it), else from the
  ``extrinsic`` parameter, else base_link is placed at the camera with body axes
  (:func:`~recon_slam.io.ros_outputs.default_T_base_cam`).
* ``map -> odom`` (``publish_tf``): ``T_map_odom = T_map_base(t) @ inv(T_odom_base(t))`` at
  the image stamp ``t``, with ``T_odom_base`` looked up in the robot's own ``/tf``
  (:class:`~recon_slam.io.tf_buffer.TfBuffer`, the same way the SLAM node reads TF). The
  last ``map -> odom`` is re-published every ``1 / tf_publish_rate`` s, stamped
  ``max(now, image stamp) + transform_tolerance`` (never going back), so TF consumers keep
  working between fixes. When ``odom -> base_link`` is not in TF the node says so once and
  publishes ``map -> base_link`` at the image stamp instead only when
  ``publish_base_if_no_odom`` is true.

Covariance of ``~/pose`` (6x6, x y z rx ry rz, row-major; :func:`pose_covariance`)::

    k       = (cov_reference_inliers / max(inliers, 1)) / max(confidence, 0.01)
    S_cam   = cov_position_sigma^2 * k * diag(1, 1, cov_depth_factor^2)   # camera optical frame
    S_pos   = R_map_cam S_cam R_map_cam^T + cov_rotation_sigma^2 * k * |t_cam_base|^2 * I
    S_rot   = cov_rotation_sigma^2 * k * I

i.e. the standard deviations are ``cov_position_sigma`` / ``cov_rotation_sigma`` for a fix
with ``cov_reference_inliers`` inliers and confidence (inlier ratio) 1, shrink with the
square root of the inlier count (independent reprojection residuals) and grow with
1 / sqrt(confidence); the viewing direction is ``cov_depth_factor`` times less certain
than the image plane, and the rotation uncertainty moves base_link by its lever arm from
the camera. The result is symmetric positive definite.

Rate policy: the image callback only stores the newest image (a
:class:`~recon_slam.io.ros_inputs.LatestSlot`); a worker thread localises at most
``rate_limit_hz`` images per second (wall clock, start to start). While it is busy or
waiting for the next slot the newest image replaces older ones (counted as
``images_skipped``), so a backlog never builds up, however slow localisation is.

Services (std_srvs/Trigger): ``~/load_map`` reloads ``map_path`` (the new map is verified
and built before it replaces the old one; when it fails the old map stays in use) and
``~/relocalize`` (forgets the last fix and the re-published ``map -> odom``; the next
image is localised at once, globally; this node keeps no temporal filter). The map's
cloud, when it has one, is published once per map on ``~/map_cloud`` (latched).

``/diagnostics``: state (``waiting_for_map``, ``waiting_for_images``, ``localised``,
``not_localised``), reason, last inliers / cells / confidence, processing time, rate and
counters. Log lines: once per cause, plus state changes, plus at most one rejection line
per ``log_throttle`` s.
"""

from __future__ import annotations

import dataclasses
import math
import os
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

import numpy as np
from rcl_interfaces.msg import ParameterDescriptor, SetParametersResult
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.clock import Clock, ClockType
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy

from recon_slam.config import ConfigError
from recon_slam.errors import CalibrationError, ReconSlamError
from recon_slam.geometry.transforms import invert_pose
from recon_slam.io.messages import (
    RclpyTypes,
    image_msg_to_rgb,
    make_header,
    make_pointcloud2,
    make_pose_with_covariance_stamped,
    make_tf_message,
    make_transform_stamped,
    stamp_to_sec,
)
from recon_slam.io.ros_inputs import LatestSlot, camera_from_info
from recon_slam.io.ros_outputs import DIAG_ERROR, DIAG_OK, DIAG_WARN, FrameNames, default_T_base_cam
from recon_slam.io.tf_buffer import TfBuffer, TfLookupError
from recon_slam.ros.params import checked_values, extrinsic_from_values

__all__ = [
    "RELOC_NODE_NAME",
    "RELOC_OUTPUT_TOPICS",
    "RELOC_PARAMETERS",
    "RelocSettings",
    "RelocNode",
    "reloc_settings_from_params",
    "pose_covariance",
    "map_to_odom",
    "main",
]

try:  # not on PyPI; present on every ROS install
    from tf2_msgs.msg import TFMessage
except ImportError:  # pragma: no cover - depends on the environment
    TFMessage = None

#: default node name; ``~/pose`` resolves to ``/recon_slam_reloc/pose``.
RELOC_NODE_NAME = "recon_slam_reloc"

#: relative output topic -> message type (``~/`` = node namespace; plus ``/tf``, ``/tf_static`` with publish_tf)
RELOC_OUTPUT_TOPICS: dict[str, str] = {
    "~/pose": "geometry_msgs/msg/PoseWithCovarianceStamped",
    "~/map_cloud": "sensor_msgs/msg/PointCloud2",
    "/diagnostics": "diagnostic_msgs/msg/DiagnosticArray",
}

#: the node's parameters: name -> (default, description)
RELOC_PARAMETERS: dict[str, tuple[Any, str]] = {
    "map_path": ("", "map folder to localise in (written by the SLAM node's ~/save_map or `recon-slam map`); "
                 "required; ~/load_map reloads it"),
    "device": ("auto", "relocaliser device: auto (CUDA when available), cpu, cuda, cuda:N; used at the next map load"),
    "cpu_threads": (0, "torch CPU threads (0 = torch's default); 1 suits small shared CPUs; read-only"),
    "image_transport": ("raw", "'raw' (sensor_msgs/Image on image) or 'compressed' (CompressedImage on "
                        "image/compressed); read-only"),
    "input_qos_reliability": ("best_effort", "image and camera_info subscriptions: 'best_effort' (matches every "
                              "publisher) or 'reliable'; read-only"),
    "input_qos_depth": (5, "input subscription queue depth; read-only"),
    "rate_limit_hz": (5.0, "localise at most this many images per second (wall clock); the newest image wins, "
                      "older ones are skipped; 0 = as fast as localisation runs"),
    "min_inliers": (-1, "accept a pose only with at least this many inlier cells; -1 = the map's own setting"),
    "min_inlier_ratio": (-1.0, "accept a pose only when at least this fraction of the cells are inliers "
                         "(the confidence); -1 = the map's own setting"),
    "map_frame": ("map", "global frame of ~/pose and ~/map_cloud"),
    "odom_frame": ("odom", "odometry frame (REP-105)"),
    "base_frame": ("base_link", "robot body frame"),
    "camera_frame": ("", "camera optical frame; '' = the images' header.frame_id"),
    "use_tf_extrinsic": (True, "take base_link -> camera from /tf_static when it is there"),
    "extrinsic_wait": (2.0, "seconds to wait for base_link -> camera on /tf_static before falling back to the "
                       "extrinsic parameter (or to 'the camera is base_link')"),
    "publish_tf": (False, "publish map -> odom on /tf (needs tf2_msgs and the robot's odom -> base_link on /tf); "
                   "read-only"),
    "publish_base_if_no_odom": (False, "with publish_tf: when odom -> base_link is not in TF, publish map -> "
                                "base_link instead (robots without odometry)"),
    "tf_publish_rate": (10.0, "Hz: re-publish the last map -> odom this often between fixes; read-only"),
    "transform_tolerance": (0.1, "s added to the stamp of map -> odom (how long consumers may use it)"),
    "odom_tf_wait": (0.1, "s to wait for odom -> base_link at the image stamp to arrive on /tf"),
    "cov_position_sigma": (0.05, "m: position standard deviation of a fix with cov_reference_inliers inliers and "
                           "confidence 1 (scaled by sqrt(reference / inliers / confidence))"),
    "cov_rotation_sigma": (0.03, "rad: rotation standard deviation of such a fix (same scaling)"),
    "cov_reference_inliers": (100, "inlier count at which the sigmas above apply"),
    "cov_depth_factor": (2.0, "position sigma along the camera's viewing direction relative to across it"),
    "cloud_max_points": (200000, "~/map_cloud is subsampled to at most this many points"),
    "no_data_timeout": (5.0, "warn when no image arrives for this long (s)"),
    "log_throttle": (5.0, "at most one 'not localised' log line per this many seconds"),
    "diagnostics_period": (1.0, "/diagnostics period (s); read-only"),
}

#: array parameters without a default: name -> description
RELOC_ARRAY_PARAMETERS: dict[str, str] = {
    "extrinsic": "T_base_cam of the camera optical frame in base_frame: [x, y, z, qx, qy, qz, qw] or "
                 "[x, y, z, roll, pitch, yaw] (m, rad); unset = from TF, else the camera is base_link",
}

#: parameters fixed at start-up (they choose subscriptions and timers)
RELOC_READ_ONLY = ("image_transport", "input_qos_reliability", "input_qos_depth", "publish_tf", "tf_publish_rate",
                   "diagnostics_period", "cpu_threads")

_CHOICES = {"image_transport": ("raw", "compressed"), "input_qos_reliability": ("best_effort", "reliable")}
_NON_NEGATIVE = ("rate_limit_hz", "extrinsic_wait", "transform_tolerance", "odom_tf_wait", "cpu_threads")
_POSITIVE = ("input_qos_depth", "tf_publish_rate", "cov_position_sigma", "cov_rotation_sigma",
             "cov_reference_inliers", "cov_depth_factor", "cloud_max_points", "no_data_timeout", "log_throttle",
             "diagnostics_period")


@dataclass
class RelocSettings:
    """Validated node settings (see :data:`RELOC_PARAMETERS` for the meaning of each)."""

    map_path: str = ""
    device: str = "auto"
    cpu_threads: int = 0
    image_transport: str = "raw"
    input_qos_reliability: str = "best_effort"
    input_qos_depth: int = 5
    rate_limit_hz: float = 5.0
    min_inliers: int = -1
    min_inlier_ratio: float = -1.0
    frames: FrameNames = field(default_factory=FrameNames)
    camera_frame: str = ""
    use_tf_extrinsic: bool = True
    extrinsic_wait: float = 2.0
    #: (4, 4) T_base_cam from the ``extrinsic`` parameter, or None when unset
    extrinsic: Optional[np.ndarray] = None
    publish_tf: bool = False
    publish_base_if_no_odom: bool = False
    tf_publish_rate: float = 10.0
    transform_tolerance: float = 0.1
    odom_tf_wait: float = 0.1
    cov_position_sigma: float = 0.05
    cov_rotation_sigma: float = 0.03
    cov_reference_inliers: int = 100
    cov_depth_factor: float = 2.0
    cloud_max_points: int = 200000
    no_data_timeout: float = 5.0
    log_throttle: float = 5.0
    diagnostics_period: float = 1.0


def reloc_settings_from_params(values: Mapping[str, Any]) -> RelocSettings:
    """Node settings from ``{parameter: value}`` (missing ones keep :data:`RELOC_PARAMETERS` defaults).

    An empty ``map_path`` is valid here (the node then waits for a map and says so).

    Raises:
        ConfigError: wrong type, unknown choice, out-of-range value or equal frame names;
            the message names the parameter.
    """
    v = checked_values(values, RELOC_PARAMETERS, _CHOICES, _NON_NEGATIVE, _POSITIVE)
    if v["min_inliers"] < -1:
        raise ConfigError(f"parameter 'min_inliers' must be -1 (the map's setting) or >= 0 (got {v['min_inliers']})")
    if v["min_inlier_ratio"] != -1.0 and not 0.0 <= v["min_inlier_ratio"] <= 1.0:
        raise ConfigError("parameter 'min_inlier_ratio' must be -1 (the map's setting) or in [0, 1] "
                          f"(got {v['min_inlier_ratio']})")
    device = v["device"].strip().lower()
    if not (device in ("auto", "cpu", "cuda") or device.startswith("cuda:")):
        raise ConfigError(f"parameter 'device': {v['device']!r} is not auto, cpu, cuda or cuda:N")
    frames = FrameNames(map=v["map_frame"].strip("/"), odom=v["odom_frame"].strip("/"),
                        base=v["base_frame"].strip("/"),
                        camera=v["camera_frame"].strip("/") or "camera_optical_frame")
    for key, name in (("map_frame", frames.map), ("odom_frame", frames.odom), ("base_frame", frames.base)):
        if not name:
            raise ConfigError(f"parameter {key!r} must not be empty")
    if len({frames.map, frames.odom, frames.base}) != 3:
        raise ConfigError(f"parameters map_frame, odom_frame and base_frame must differ (got {frames.map!r}, "
                          f"{frames.odom!r}, {frames.base!r})")
    names = {f.name for f in dataclasses.fields(RelocSettings)}
    kwargs = {k: val for k, val in v.items() if k in names}
    kwargs.update(device=device, frames=frames, camera_frame=v["camera_frame"].strip("/"),
                  map_path=v["map_path"].strip(), extrinsic=extrinsic_from_values(values.get("extrinsic")))
    return RelocSettings(**kwargs)


# ------------------------------------------------------------------------------------------- maths
def pose_covariance(
    R_map_cam: np.ndarray,
    t_cam_base: np.ndarray,
    inliers: int,
    confidence: float,
    position_sigma: float = 0.05,
    rotation_sigma: float = 0.03,
    reference_inliers: int = 100,
    depth_factor: float = 2.0,
) -> np.ndarray:
    """(6, 6) covariance of a relocalised base_link pose in the map frame (x y z rx ry rz).

    Args:
        R_map_cam: (3, 3) rotation of the camera optical frame in map (its z axis is the
            viewing direction).
        t_cam_base: (3,) base_link origin in the camera frame (lever arm, metres).
        inliers: RANSAC inlier cells of the fix; confidence: inlier ratio in [0, 1].
        position_sigma (m), rotation_sigma (rad): standard deviations at ``reference_inliers``
            inliers and confidence 1.
        depth_factor: sigma along the viewing direction relative to across it.

    Returns:
        Symmetric positive definite (6, 6) float64 (formula in the module notes): variances
        scale with ``k = reference_inliers / inliers / confidence``.
    """
    k = (float(reference_inliers) / max(int(inliers), 1)) / max(float(confidence), 0.01)
    R = np.asarray(R_map_cam, dtype=np.float64).reshape(3, 3)
    var_p = position_sigma**2 * k
    var_r = rotation_sigma**2 * k
    S_cam = np.diag([var_p, var_p, var_p * depth_factor**2])
    lever = float(np.dot(np.asarray(t_cam_base, dtype=np.float64).reshape(3), np.asarray(t_cam_base).reshape(3)))
    cov = np.zeros((6, 6))
    cov[:3, :3] = R @ S_cam @ R.T + var_r * lever * np.eye(3)
    cov[3:, 3:] = var_r * np.eye(3)
    return 0.5 * (cov + cov.T)


def map_to_odom(T_map_base: np.ndarray, T_odom_base: np.ndarray) -> np.ndarray:
    """``T_map_odom = T_map_base @ inv(T_odom_base)`` ((4, 4) poses at the same stamp)."""
    return np.asarray(T_map_base, dtype=np.float64) @ invert_pose(np.asarray(T_odom_base, dtype=np.float64))


# ------------------------------------------------------------------------------------------- node
@dataclass
class _LoadedMap:
    """A map in use: its relocaliser and what the outputs need."""

    path: str
    relocaliser: Any
    T_map_world: np.ndarray  # (4, 4)
    cloud: Optional[tuple[np.ndarray, Optional[np.ndarray]]]  # (N, 3) float32 in map, (N, 3) uint8 or None
    device: str
    base_min_inliers: int
    base_min_inlier_ratio: float


@dataclass
class _Item:
    msg: Any
    arrival: float


def _plain(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    try:
        return list(value)
    except TypeError:
        return value


class RelocNode(Node):
    """rclpy node localising camera images in a saved map (see the module notes).

    Subscriptions (relative, remappable): ``image`` (or ``image/compressed``),
    ``camera_info``; ``/tf_static`` and ``/tf`` when tf2_msgs exists.
    Publications: ``~/pose`` (PoseWithCovarianceStamped, map), ``~/map_cloud`` (latched),
    ``/diagnostics``; ``/tf`` (map -> odom) and ``/tf_static`` (base_link -> camera when the
    extrinsic did not come from TF) with ``publish_tf``.
    Services (std_srvs/Trigger): ``~/load_map``, ``~/relocalize``.
    """

    def __init__(self, node_name: str = RELOC_NODE_NAME, **kwargs: Any) -> None:
        super().__init__(node_name, **kwargs)
        self._types = RclpyTypes()
        self._once: set[str] = set()
        self._once_lock = threading.Lock()
        self._steady = Clock(clock_type=ClockType.STEADY_TIME)
        self._start = time.monotonic()

        # ---------------- parameters
        for name, (default, text) in RELOC_PARAMETERS.items():
            self.declare_parameter(name, default, ParameterDescriptor(
                description=text, dynamic_typing=True, read_only=name in RELOC_READ_ONLY))
        for name, text in RELOC_ARRAY_PARAMETERS.items():
            self.declare_parameter(name, None, ParameterDescriptor(description=text, dynamic_typing=True))
        self._config_error = ""
        try:
            self._settings = reloc_settings_from_params(self._param_values())
        except ConfigError as exc:
            self._config_error = str(exc)
            self._settings = RelocSettings()
        self.add_on_set_parameters_callback(self._on_set_parameters)
        if self._settings.cpu_threads > 0:
            import torch

            torch.set_num_threads(self._settings.cpu_threads)

        # ---------------- state
        self._lock = threading.RLock()  # map swap, fix, status
        self._map: Optional[_LoadedMap] = None
        #: bumped by a map swap and by ~/relocalize: results of images taken before are dropped
        self._gen = 0
        self._gen_time = 0.0  # time.monotonic() of the last bump
        self._map_problem = ""  # why the map in use is missing / the last load failed
        self._slot = LatestSlot()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._info: Any = None
        self._tf_buffer = TfBuffer()
        self._extrinsics: dict[str, tuple[np.ndarray, str]] = {}
        self._first_image_time: Optional[float] = None
        self._next_due = 0.0
        self._state = "waiting_for_map"
        self._reason = "loading the map"
        self._level: Optional[int] = None
        self._last_state_logged = ""
        self._last_reject_log = -1e9
        self._last_fix_log = -1e9
        self._rejects_since_log = 0
        # last fix
        self._T_map_odom: Optional[np.ndarray] = None
        self._tf_stamp_last = -math.inf
        self._fix_stamp: Optional[float] = None
        self._fix_time: Optional[float] = None
        # last processed image
        self._last: dict[str, Any] = {}
        self._proc_ms: deque = deque(maxlen=100)
        self._proc_times: deque = deque(maxlen=30)
        self._counts = {"received": 0, "processed": 0, "localised": 0, "rejected": 0, "skipped_rate": 0,
                        "no_map": 0, "errors": 0}
        self._last_arrival: Optional[float] = None

        # ---------------- ROS interfaces
        self._cb_inputs = MutuallyExclusiveCallbackGroup()
        self._cb_services = MutuallyExclusiveCallbackGroup()
        self._cb_timers = MutuallyExclusiveCallbackGroup()
        self._create_publishers()
        self._create_subscriptions()
        from std_srvs.srv import Trigger

        self.create_service(Trigger, "~/load_map", self._srv_load_map, callback_group=self._cb_services)
        self.create_service(Trigger, "~/relocalize", self._srv_relocalize, callback_group=self._cb_services)
        s = self._settings
        self.create_timer(1.0, self._watchdog, callback_group=self._cb_timers, clock=self._steady)
        self.create_timer(s.diagnostics_period, self._publish_diagnostics, callback_group=self._cb_timers,
                          clock=self._steady)
        self.create_timer(1.0 / s.tf_publish_rate, self._republish_tf, callback_group=self._cb_timers,
                          clock=self._steady)
        if self._config_error:
            self._set_state("waiting_for_map", f"parameter error: {self._config_error}", DIAG_ERROR)
            self._log_once("config", "error", f"not localising: parameter error: {self._config_error}")

        self._worker = threading.Thread(target=self._work_loop, name="recon_slam_reloc", daemon=True)
        self._worker.start()
        self.get_logger().info(
            f"reloc node up: input {self._topics['image']} + {self._topics['camera_info']}; outputs ~/pose "
            f"~/map_cloud /diagnostics" + (" /tf" if self._tf_pub is not None else "")
            + f"; map {s.map_path or '(map_path not set)'}"
        )

    # ------------------------------------------------------------------ logging helpers
    def _log(self, level: str, text: str) -> None:
        logger = self.get_logger()
        if level == "error":
            logger.error(text)
        elif level == "warning":
            logger.warning(text)
        else:
            logger.info(text)

    def _log_once(self, key: str, level: str, text: str) -> bool:
        """Log ``text`` the first time ``key`` is seen; returns whether it was logged."""
        with self._once_lock:
            if key in self._once:
                return False
            self._once.add(key)
        self._log(level, text)
        return True

    def _forget_once(self, prefix: str) -> None:
        with self._once_lock:
            self._once = {k for k in self._once if not k.startswith(prefix)}

    def _set_state(self, state: str, reason: str, level: Optional[int] = None) -> None:
        with self._lock:
            self._state, self._reason, self._level = state, reason, level

    # ------------------------------------------------------------------ parameters
    def _param_values(self) -> dict[str, Any]:
        names = list(RELOC_PARAMETERS) + list(RELOC_ARRAY_PARAMETERS)
        return {n: _plain(self.get_parameter(n).value) for n in names}

    def _on_set_parameters(self, params: list) -> SetParametersResult:
        values = self._param_values()
        values.update({p.name: _plain(p.value) for p in params})
        try:
            settings = reloc_settings_from_params(values)
        except ConfigError as exc:
            self.get_logger().warning(f"parameter change rejected: {exc}")
            return SetParametersResult(successful=False, reason=str(exc))
        with self._lock:
            self._settings = settings
            if any(p.name in ("camera_frame", "base_frame", "extrinsic", "use_tf_extrinsic") for p in params):
                self._extrinsics.clear()
            if self._map is not None:
                self._apply_acceptance(self._map)
            if self._config_error:
                self._config_error = ""
                self._forget_once("config")
                self.get_logger().info("parameters are valid again")
                if self._map is None:
                    self._set_state("waiting_for_map", "parameters fixed: call ~/load_map")
        return SetParametersResult(successful=True)

    def _apply_acceptance(self, m: _LoadedMap) -> None:
        """Acceptance thresholds of the relocaliser: the parameters, else the map's own."""
        s = self._settings
        cfg = m.relocaliser.config
        m.relocaliser.config = dataclasses.replace(
            cfg,
            min_inliers=m.base_min_inliers if s.min_inliers < 0 else int(s.min_inliers),
            min_inlier_ratio=m.base_min_inlier_ratio if s.min_inlier_ratio < 0 else float(s.min_inlier_ratio),
        )

    # ------------------------------------------------------------------ interfaces
    def _create_publishers(self) -> None:
        from diagnostic_msgs.msg import DiagnosticArray
        from geometry_msgs.msg import PoseWithCovarianceStamped
        from sensor_msgs.msg import PointCloud2

        reliable = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.VOLATILE)
        latched = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE,
                             durability=DurabilityPolicy.TRANSIENT_LOCAL, history=HistoryPolicy.KEEP_LAST)
        self._pose_pub = self.create_publisher(PoseWithCovarianceStamped, "~/pose", reliable)
        self._cloud_pub = self.create_publisher(PointCloud2, "~/map_cloud", latched)
        self._diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", reliable)
        self._tf_pub = self._tf_static_pub = None
        if TFMessage is None:
            self._log_once(
                "tf:missing", "warning",
                "tf2_msgs is not installed: /tf is not read (no odom -> base_link, no extrinsic from /tf_static) "
                "and map -> odom is NOT published" + (" although publish_tf is true" if self._settings.publish_tf
                                                      else "") + "; install ros-$ROS_DISTRO-tf2-msgs. ~/pose, "
                "~/map_cloud and /diagnostics are published as usual.",
            )
        elif self._settings.publish_tf:
            self._tf_pub = self.create_publisher(TFMessage, "/tf", QoSProfile(depth=100,
                                                                              reliability=ReliabilityPolicy.RELIABLE))
            self._tf_static_pub = self.create_publisher(TFMessage, "/tf_static", latched)

    def _resolve(self, name: str) -> str:
        try:
            return self.resolve_topic_name(name)
        except Exception:  # noqa: BLE001 - older rclpy
            return name

    def _create_subscriptions(self) -> None:
        try:
            from rclpy.event_handler import SubscriptionEventCallbacks
        except ImportError:  # Humble
            from rclpy.qos_event import SubscriptionEventCallbacks
        from sensor_msgs.msg import CameraInfo, CompressedImage, Image

        s = self._settings
        rel = ReliabilityPolicy.RELIABLE if s.input_qos_reliability == "reliable" else ReliabilityPolicy.BEST_EFFORT
        qos = QoSProfile(depth=s.input_qos_depth, reliability=rel, durability=DurabilityPolicy.VOLATILE,
                         history=HistoryPolicy.KEEP_LAST)
        compressed = s.image_transport == "compressed"
        self._topics = {"image": self._resolve("image") + ("/compressed" if compressed else ""),
                        "camera_info": self._resolve("camera_info")}

        def events(kind: str) -> Any:
            return SubscriptionEventCallbacks(incompatible_qos=lambda ev, k=kind: self._on_incompatible_qos(k, ev))

        self.create_subscription(CompressedImage if compressed else Image, self._topics["image"], self._on_image,
                                 qos, callback_group=self._cb_inputs, event_callbacks=events("image"))
        self.create_subscription(CameraInfo, self._topics["camera_info"], self._on_camera_info, qos,
                                 callback_group=self._cb_inputs, event_callbacks=events("camera_info"))
        if TFMessage is not None:
            latched = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE,
                                 durability=DurabilityPolicy.TRANSIENT_LOCAL)
            self.create_subscription(TFMessage, "/tf_static", lambda m: self._tf_buffer.add_message(m, static=True),
                                     latched, callback_group=self._cb_inputs)
            self.create_subscription(TFMessage, "/tf", lambda m: self._tf_buffer.add_message(m, static=False),
                                     QoSProfile(depth=100), callback_group=self._cb_inputs)

    # ------------------------------------------------------------------ callbacks (executor thread)
    def _on_incompatible_qos(self, kind: str, event: Any) -> None:
        topic = self._topics.get(kind, kind)
        policy = getattr(getattr(event, "last_policy_kind", None), "name", str(getattr(event, "last_policy_kind", "")))
        self._log_once(
            f"qos:{kind}", "error",
            f"{topic}: a publisher's QoS is incompatible with this subscription (policy {policy}); this node "
            f"subscribes {self._settings.input_qos_reliability}/volatile: set input_qos_reliability:=best_effort "
            f"or check `ros2 topic info -v {topic}`",
        )

    def _on_camera_info(self, msg: Any) -> None:
        self._info = msg

    def _on_image(self, msg: Any) -> None:
        now = time.monotonic()
        self._counts["received"] += 1
        self._last_arrival = now
        self._slot.put(_Item(msg, now))

    # ------------------------------------------------------------------ map loading
    def _load(self, path: str) -> _LoadedMap:
        """Load and verify the map at ``path`` and build its relocaliser (raises ReconSlamError / OSError)."""
        from recon_slam.maps import MapError, load_map, load_relocaliser

        if not path:
            raise MapError("parameter map_path is empty: set it to a map folder (ros2 param set "
                           f"{self.get_fully_qualified_name()} map_path /maps/lab) and call ~/load_map, or "
                           "start with map_path:=/maps/lab")
        device = self._settings.device
        if device.startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                raise MapError(f"device {device!r} requested but torch sees no CUDA GPU: use device:=auto or cpu")
        data = load_map(path, with_cloud=True)
        reloc = load_relocaliser(data, device)
        if data.metadata.get("warning"):
            self._log("warning", data.metadata["warning"])
        T = np.asarray(data.T_map_world, dtype=np.float64)
        if T.shape != (4, 4) or not np.all(np.isfinite(T)):
            raise MapError(f"{path}: T_map_world in metadata.json is not a finite 4x4 pose: the map is damaged")
        cloud = None
        if data.cloud is not None and len(data.cloud[0]):
            xyz = np.asarray(data.cloud[0], dtype=np.float64).reshape(-1, 3)
            rgb = None if data.cloud[1] is None else np.asarray(data.cloud[1], dtype=np.uint8).reshape(-1, 3)
            n_max = self._settings.cloud_max_points
            if len(xyz) > n_max:
                step = int(math.ceil(len(xyz) / n_max))
                xyz, rgb = xyz[::step], None if rgb is None else rgb[::step]
            cloud = ((xyz @ T[:3, :3].T + T[:3, 3]).astype(np.float32), rgb)
        cam = data.camera
        if cam is not None:  # warm up (first inference allocates; do it before the map is in use)
            reloc.localize(np.zeros((cam.height, cam.width, 3), np.uint8), cam)
        m = _LoadedMap(path=path, relocaliser=reloc, T_map_world=T, cloud=cloud, device=str(reloc.device),
                       base_min_inliers=int(reloc.config.min_inliers),
                       base_min_inlier_ratio=float(reloc.config.min_inlier_ratio))
        self._apply_acceptance(m)
        return m

    def _swap_in(self, m: _LoadedMap) -> None:
        """Make ``m`` the map in use (atomic for the worker), forget the fix, publish its cloud."""
        with self._lock:
            self._bump_gen()
            self._map = m
            self._map_problem = ""
            self._forget_fix()
            self._set_state("waiting_for_images" if self._counts["processed"] == 0 else "not_localised",
                            "map loaded: waiting for the next image")
        self._forget_once("map:")
        self._publish_cloud(m)

    def _publish_cloud(self, m: _LoadedMap) -> None:
        s = self._settings
        if m.cloud is None:
            xyz, rgb = np.zeros((0, 3), np.float32), np.zeros((0, 3), np.uint8)  # replaces an older map's cloud
        else:
            xyz, rgb = m.cloud
        stamp = self.get_clock().now().nanoseconds * 1e-9
        self._cloud_pub.publish(make_pointcloud2(self._types, xyz, rgb, stamp, s.frames.map))

    def _describe(self, m: _LoadedMap) -> str:
        cfg = m.relocaliser.config
        pts = 0 if m.cloud is None else len(m.cloud[0])
        return (f"map {m.path} on {m.device} (processing {cfg.short_side} px, accepts >= {cfg.min_inliers} inliers "
                f"and inlier ratio >= {cfg.min_inlier_ratio}; cloud {pts} points)")

    def _initial_load(self) -> None:
        if self._config_error:
            return
        path = os.path.expanduser(self._settings.map_path)
        try:
            m = self._load(path)
        except (ReconSlamError, OSError) as exc:
            text = f"no map: {exc}"
            with self._lock:
                self._map_problem = text
            self._set_state("waiting_for_map", text, DIAG_ERROR)
            self._log_once(f"map:{text[:100]}", "error", f"{text}; the node keeps running (fix it, then call "
                           "~/load_map)")
            return
        except Exception as exc:  # noqa: BLE001 - a bug: keep the node alive, say why
            text = f"loading the map failed ({type(exc).__name__}: {exc})"
            self._set_state("waiting_for_map", text, DIAG_ERROR)
            self._log_once("map:bug", "error", f"{text}:\n{traceback.format_exc()}")
            return
        self._swap_in(m)
        self.get_logger().info(f"localising in {self._describe(m)}")

    def _srv_load_map(self, request: Any, response: Any) -> Any:
        path = os.path.expanduser(self._settings.map_path)
        try:
            if self._config_error:
                raise ConfigError(f"parameter error: {self._config_error}")
            m = self._load(path)
        except (ReconSlamError, OSError) as exc:
            with self._lock:
                old = self._map
            response.success = False
            response.message = (f"load_map failed: {exc}; " + (f"still localising in {old.path}" if old is not None
                                                               else "no map in use"))
            self.get_logger().error(response.message)
            if old is None:
                with self._lock:
                    self._map_problem = f"no map: {exc}"
                self._set_state("waiting_for_map", f"no map: {exc}", DIAG_ERROR)
            return response
        self._swap_in(m)
        response.success = True
        response.message = f"loaded {self._describe(m)}; relocalising"
        self.get_logger().info(response.message)
        return response

    def _srv_relocalize(self, request: Any, response: Any) -> Any:
        with self._lock:
            m = self._map
            self._bump_gen()
            self._forget_fix()
            if m is None:
                response.success = False
                response.message = f"nothing to relocalise in: {self._map_problem or 'no map loaded'}"
            else:
                self._set_state("not_localised", "relocalisation requested: waiting for the next image")
                response.success = True
                response.message = "last fix forgotten: the next image is localised globally"
        self._slot.clear()  # the fix must come from an image taken after the request
        self._next_due = 0.0
        self._wake.set()
        self._log("info" if response.success else "warning", f"relocalize: {response.message}")
        return response

    def _bump_gen(self) -> None:
        with self._lock:
            self._gen += 1
            self._gen_time = time.monotonic()

    def _forget_fix(self) -> None:
        with self._lock:
            self._T_map_odom = None
            self._fix_stamp = None
            self._fix_time = None
            self._last_state_logged = ""

    # ------------------------------------------------------------------ worker
    def _work_loop(self) -> None:
        self._initial_load()
        while not self._stop.is_set():
            item = self._slot.take(timeout=0.1)
            if item is None:
                continue
            wait = self._next_due - time.monotonic()
            if wait > 0:  # rate limit: hold it, then take whatever is newest by then
                self._wake.wait(wait)
                self._wake.clear()
                if self._stop.is_set():
                    break
                newer = self._slot.take(timeout=0)
                if newer is not None:
                    self._counts["skipped_rate"] += 1
                    item = newer
            if item.arrival < self._gen_time:
                continue  # taken before ~/relocalize or a map swap
            rate = self._settings.rate_limit_hz
            started = time.monotonic()
            self._next_due = started + (1.0 / rate if rate > 0 else 0.0)
            try:
                self._process(item)
            except Exception as exc:  # noqa: BLE001 - the node must keep running and say why
                if not self.context.ok() or self._stop.is_set():
                    break
                self._counts["errors"] += 1
                self._set_state(self._state, f"internal error: {type(exc).__name__}: {exc}", DIAG_ERROR)
                self._log_once(f"bug:{type(exc).__name__}", "error",
                               f"localisation failed on an image ({type(exc).__name__}: {exc}); the node keeps "
                               f"running:\n{traceback.format_exc()}")

    def _input_problem(self, key: str, text: str) -> None:
        """An image could not be used: state and reason, logged once per cause."""
        state = "waiting_for_images" if self._counts["processed"] == 0 else self._state
        self._set_state(state, text, DIAG_WARN)
        self._log_once(f"input:{key}", "warning", text)

    def _process(self, item: _Item) -> None:
        s = self._settings
        with self._lock:
            m, gen = self._map, self._gen
        if m is None:
            self._counts["no_map"] += 1
            return
        if self._first_image_time is None:
            self._first_image_time = time.monotonic()
        msg = item.msg
        try:
            stamp = stamp_to_sec(msg.header.stamp)
        except Exception:  # noqa: BLE001 - malformed header
            self._input_problem("stamp", f"{self._topics['image']}: message without a valid stamp: ignored")
            return
        info = self._info
        if info is None:
            self._input_problem("noinfo", f"images arrive but no camera_info on {self._topics['camera_info']}: the "
                                "intrinsics are required; remap camera_info to your driver's CameraInfo topic")
            return
        try:
            image = image_msg_to_rgb(msg)
        except ReconSlamError as exc:
            self._input_problem(f"decode:{str(exc)[:60]}", f"{self._topics['image']}: {exc}")
            return
        h, w = image.shape[:2]
        try:
            camera = camera_from_info(info, "rgbd", image_size=(w, h))
            if (camera.width, camera.height) != (w, h):
                raise CalibrationError(
                    f"{self._topics['image']} is {w}x{h} but camera_info says {camera.width}x{camera.height}: remap "
                    "camera_info to the CameraInfo of this image topic")
        except ReconSlamError as exc:
            self._input_problem(f"calib:{str(exc)[:60]}", f"camera_info: {exc}" if "camera_info" not in str(exc)
                                else str(exc))
            return
        camera_frame = s.camera_frame or str(msg.header.frame_id).lstrip("/") or "camera_optical_frame"
        ext = self._extrinsic(camera_frame, stamp)
        if ext is None:
            return  # waiting for /tf_static (state says so)
        T_base_cam = ext
        self._forget_once("input:")

        res = m.relocaliser.localize(image, camera)
        done = time.monotonic()
        with self._lock:
            if gen != self._gen:
                return  # map swapped / ~/relocalize meanwhile: this result is from before
            self._counts["processed"] += 1
            self._proc_ms.append(float(res.time_ms))
            self._proc_times.append(done)
            self._last = {"inliers": int(res.inliers), "cells": int(res.cells),
                          "confidence": float(res.confidence), "ms": float(res.time_ms), "stamp": stamp}
        if res.ok and res.T_world_cam is not None:
            self._on_fix(m, stamp, np.asarray(res.T_world_cam, dtype=np.float64), T_base_cam, res)
        else:
            self._on_reject(res.reason or "rejected")

    def _on_fix(self, m: _LoadedMap, stamp: float, T_world_cam: np.ndarray, T_base_cam: np.ndarray, res: Any) -> None:
        s = self._settings
        T_map_cam = m.T_map_world @ T_world_cam
        T_cam_base = invert_pose(T_base_cam)
        T_map_base = T_map_cam @ T_cam_base
        cov = pose_covariance(T_map_cam[:3, :3], T_cam_base[:3, 3], res.inliers, res.confidence,
                              s.cov_position_sigma, s.cov_rotation_sigma, s.cov_reference_inliers,
                              s.cov_depth_factor)
        self._pose_pub.publish(make_pose_with_covariance_stamped(self._types, T_map_base, stamp, s.frames.map, cov))
        self._counts["localised"] += 1
        transforms = self._transforms_for_fix(stamp, T_map_base) if self._tf_pub is not None else []
        now = time.monotonic()
        with self._lock:
            self._fix_stamp = stamp
            self._fix_time = now
            self._set_state("localised", "")
            # state changes are logged, at most one 'localised' line per log_throttle s (no flapping spam)
            log = self._last_state_logged != "localised" and now - self._last_fix_log >= s.log_throttle
            if log:
                self._last_state_logged = "localised"
                self._last_fix_log = now
        if transforms and self._tf_pub is not None:
            self._tf_pub.publish(make_tf_message(self._types, transforms))
        if log:
            t = T_map_base[:3, 3]
            self.get_logger().info(f"localised: base_link at ({t[0]:.2f}, {t[1]:.2f}, {t[2]:.2f}) m in "
                                   f"{s.frames.map}, {res.inliers}/{res.cells} inliers, confidence "
                                   f"{res.confidence:.2f}")

    def _on_reject(self, reason: str) -> None:
        self._counts["rejected"] += 1
        self._rejects_since_log += 1
        with self._lock:
            self._set_state("not_localised", reason)
            self._last_state_logged = "not_localised"
        now = time.monotonic()
        if now - self._last_reject_log >= self._settings.log_throttle:  # throttled: at most one line per period
            n = self._rejects_since_log
            self.get_logger().warning(f"not localised: {reason}" + (f" ({n} images rejected since the last line)"
                                                                    if n > 1 else ""))
            self._last_reject_log = now
            self._rejects_since_log = 0

    # ------------------------------------------------------------------ extrinsic and TF
    def _extrinsic(self, camera_frame: str, stamp: float) -> Optional[np.ndarray]:
        """(4, 4) ``T_base_cam`` for ``camera_frame``, or None while still waiting for /tf_static."""
        with self._lock:
            known = self._extrinsics.get(camera_frame)
        if known is not None:
            return known[0]
        s = self._settings
        base = s.frames.base
        T, source = None, ""
        if camera_frame == base:
            T, source = np.eye(4), "identity (camera frame is the base frame)"
        elif s.use_tf_extrinsic and TFMessage is not None:
            try:
                T, source = self._tf_buffer.lookup(base, camera_frame, static_only=True), "tf"
            except TfLookupError as exc:
                waited = time.monotonic() - (self._first_image_time or time.monotonic())
                if s.extrinsic is None and waited < s.extrinsic_wait:
                    self._set_state("waiting_for_images", f"waiting for TF {base} -> {camera_frame} on /tf_static",
                                    DIAG_WARN)
                    return None
                self._log_once(
                    "tf:extrinsic", "warning",
                    f"TF lookup {base} -> {camera_frame} failed ({exc}); using "
                    + ("the extrinsic parameter" if s.extrinsic is not None else
                       f"no extrinsic: the camera is {base} (placed at the camera, x forward, z up)"))
        if T is None:
            T, source = ((s.extrinsic, "parameter") if s.extrinsic is not None
                         else (default_T_base_cam(), "default (camera is base_link)"))
        with self._lock:
            self._extrinsics[camera_frame] = (T, source)
        self.get_logger().info(f"camera {camera_frame} in {base}: extrinsic from {source}")
        if source != "tf" and self._tf_static_pub is not None and camera_frame != base:
            self._tf_static_pub.publish(make_tf_message(
                self._types, [make_transform_stamped(self._types, T, stamp, base, camera_frame)]))
        return T

    def _lookup_odom(self, stamp: float) -> tuple[Optional[np.ndarray], str]:
        """(4, 4) ``T_odom_base`` at ``stamp`` from /tf (waiting up to ``odom_tf_wait`` s), or (None, why)."""
        s = self._settings
        end = time.monotonic() + s.odom_tf_wait
        while True:
            try:
                return self._tf_buffer.lookup(s.frames.odom, s.frames.base, stamp), ""
            except TfLookupError as exc:
                if time.monotonic() >= end or self._stop.is_set():
                    return None, str(exc)
            time.sleep(0.01)

    def _transforms_for_fix(self, stamp: float, T_map_base: np.ndarray) -> list:
        """``TransformStamped`` list for ``/tf`` after a fix of (4, 4) ``T_map_base`` at image ``stamp``.

        ``map -> odom`` from the robot's odometry at ``stamp`` (also kept for re-publication);
        without odometry ``map -> base_link`` at ``stamp`` when ``publish_base_if_no_odom``, else none.
        """
        s = self._settings
        T_odom_base, why = self._lookup_odom(stamp)
        if T_odom_base is None:
            self._log_once(
                "tf:odom", "warning",
                f"TF lookup {s.frames.odom} -> {s.frames.base} at the image stamp failed ({why}): map -> "
                f"{s.frames.odom} cannot be computed; publish the robot's odometry on /tf"
                + (f"; publishing {s.frames.map} -> {s.frames.base} instead (publish_base_if_no_odom)"
                   if s.publish_base_if_no_odom else
                   f", or set publish_base_if_no_odom:=true to publish {s.frames.map} -> {s.frames.base}"))
            if s.publish_base_if_no_odom:
                return [make_transform_stamped(self._types, T_map_base, stamp, s.frames.map, s.frames.base)]
            return []
        T_map_odom = map_to_odom(T_map_base, T_odom_base)
        with self._lock:
            self._T_map_odom = T_map_odom
        return [self._map_odom_transform(T_map_odom, stamp)]

    def _map_odom_transform(self, T_map_odom: np.ndarray, fix_stamp: Optional[float], new_fix: bool = True) -> Any:
        """``map -> odom`` ((4, 4) ``T_map_odom``) stamped ``max(now, fix_stamp) + transform_tolerance``.

        Stamps never go back (tf2 would drop or warn about them) unless a clock jumped back by
        more than a second (bag loop); a re-publication (``new_fix`` False) whose stamp would not
        advance returns None (nothing to send: the clock stands still, e.g. a paused bag).
        """
        s = self._settings
        now = self.get_clock().now().nanoseconds * 1e-9
        stamp = max(now, fix_stamp if fix_stamp is not None else -math.inf) + s.transform_tolerance
        with self._lock:
            last = self._tf_stamp_last
            if stamp <= last and last - stamp < 1.0:
                if not new_fix:
                    return None
                stamp = last + 1e-6
            self._tf_stamp_last = stamp
        return make_transform_stamped(self._types, T_map_odom, stamp, s.frames.map, s.frames.odom)

    def _republish_tf(self) -> None:
        if self._tf_pub is None:
            return
        with self._lock:
            T, fix_stamp = self._T_map_odom, self._fix_stamp
        if T is not None:
            tf = self._map_odom_transform(T, fix_stamp, new_fix=False)
            if tf is not None:
                self._tf_pub.publish(make_tf_message(self._types, [tf]))

    # ------------------------------------------------------------------ watchdog and diagnostics
    def _watchdog(self) -> None:
        s = self._settings
        now = time.monotonic()
        if now - self._start < s.no_data_timeout or self._map is None:
            return
        topic = self._topics["image"]
        if self._last_arrival is None:
            n_pub = self.count_publishers(topic)
            if n_pub == 0:
                text = (f"no images on {topic}: nobody publishes it; check the topic name and remapping "
                        "(ros2 topic list; e.g. image:=/your/camera/image_raw)")
            else:
                text = (f"no images on {topic} yet although {n_pub} publisher(s) exist: if they publish, the QoS "
                        f"does not match (this node subscribes {s.input_qos_reliability}, volatile); check "
                        f"`ros2 topic info -v {topic}`")
            self._set_state("waiting_for_images", text, DIAG_WARN)
            self._log_once("nodata", "warning", text)
        elif now - self._last_arrival > s.no_data_timeout:
            text = f"no images on {topic} for {now - self._last_arrival:.0f} s (the camera stopped?)"
            with self._lock:
                state = self._state
            self._set_state(state, text, DIAG_WARN)
            self._log_once(f"stopped:{int(self._last_arrival)}", "warning", text)

    def diagnostics_values(self) -> dict[str, str]:
        """Key/values of ``/diagnostics`` (also handy in tests)."""
        with self._lock:
            m = self._map
            last = dict(self._last)
            times = list(self._proc_times)
            ms = list(self._proc_ms)
            fix_time = self._fix_time
            state, reason = self._state, self._reason
        rate = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 and times[-1] > times[0] else 0.0
        if times and time.monotonic() - times[-1] > 3.0:
            rate = 0.0
        c = self._counts
        with self._lock:
            ext = ", ".join(f"{k}: {v[1]}" for k, v in self._extrinsics.items()) or "not decided yet"
        if self._tf_pub is not None:
            tf = "map -> odom published" if self._T_map_odom is not None else "publish_tf: no map -> odom yet"
        else:
            tf = ("not published: tf2_msgs missing" if TFMessage is None and self._settings.publish_tf
                  else "not published (publish_tf false)")
        return {
            "state": state,
            "reason": reason,
            "map_path": m.path if m is not None else self._settings.map_path,
            "map": self._describe(m) if m is not None else (self._map_problem or "none"),
            "device": m.device if m is not None else self._settings.device,
            "inliers": str(last.get("inliers", "nan")),
            "cells": str(last.get("cells", "nan")),
            "confidence": f"{last['confidence']:.3f}" if "confidence" in last else "nan",
            "last_image_stamp": f"{last['stamp']:.6f}" if "stamp" in last else "nan",
            "processing_ms": f"{last['ms']:.1f}" if "ms" in last else "nan",
            "processing_ms_p50": f"{np.percentile(ms, 50):.1f}" if ms else "nan",
            "rate_hz": f"{rate:.2f}",
            "rate_limit_hz": f"{self._settings.rate_limit_hz:g}",
            "images_received": str(c["received"]),
            "images_processed": str(c["processed"]),
            "images_skipped": str(self._slot.dropped + c["skipped_rate"]),
            "poses_published": str(c["localised"]),
            "rejected": str(c["rejected"]),
            "last_fix_age_s": f"{time.monotonic() - fix_time:.2f}" if fix_time is not None else "nan",
            "camera_info": "received" if self._info is not None else "missing",
            "extrinsic": ext,
            "tf": tf,
        }

    def _publish_diagnostics(self) -> None:
        values = self.diagnostics_values()
        with self._lock:
            state, reason, level = self._state, self._reason, self._level
        if level is None:
            level = DIAG_OK if state == "localised" and not reason else DIAG_WARN
        types = self._types
        kv = [types.new("diagnostic_msgs/msg/KeyValue", key=k, value=v) for k, v in values.items()]
        diag = types.new("diagnostic_msgs/msg/DiagnosticStatus", name=f"{self.get_name()}: localisation",
                         message=f"{state}: {reason}" if reason else state,
                         hardware_id=self._settings.frames.camera, values=kv)
        diag.level = bytes([int(level)]) if isinstance(diag.level, (bytes, bytearray)) else int(level)
        now = self.get_clock().now().nanoseconds * 1e-9
        self._diag_pub.publish(types.new("diagnostic_msgs/msg/DiagnosticArray", header=make_header(types, now, ""),
                                         status=[diag]))

    # ------------------------------------------------------------------ shutdown
    def shutdown(self) -> None:
        """Stop the worker thread (idempotent)."""
        self._stop.set()
        self._wake.set()
        t = self._worker
        if t is not None and t.is_alive() and t is not threading.current_thread():
            t.join(timeout=10.0)

    def destroy_node(self) -> None:  # noqa: D401 - rclpy API
        """Stop the worker, then destroy the ROS entities."""
        self.shutdown()
        super().destroy_node()


def main(args: Optional[list[str]] = None) -> None:
    """Entry point of ``ros2 run recon_slam reloc_node``."""
    from recon_slam.ros.spin import spin_node

    spin_node(RelocNode, args)


if __name__ == "__main__":
    main()
