"""The SLAM node: ``ros2 run recon_slam slam_node``.

Threads (the executor's callbacks never wait for the engine):

* the executor thread: subscription callbacks only timestamp the message and hand it to
  a :class:`~recon_slam.io.sync.StampSynchronizer`; a complete set goes into a
  :class:`~recon_slam.io.ros_inputs.LatestSlot` (one frame; a newer frame replaces an
  untaken one and is counted as dropped). Services, parameters and timers run there too
  (callback groups are set, so a multi-threaded executor can serve the node as well).
* the engine worker: takes the newest frame, decodes it, runs
  :meth:`SlamSystem.process` and publishes odometry, pose and ``/tf`` at once.
* the map publisher: builds path, keyframe markers and the map cloud (the slow outputs)
  when :meth:`RosOutputs.due` says so, without holding up the worker.

Every message is built by :class:`~recon_slam.io.ros_outputs.RosOutputs` (the same code
``recon-slam replay`` uses). Topics, parameters and frames: see ``README_on_a_robot`` and
:mod:`recon_slam.ros.params`.
"""

from __future__ import annotations

import os
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import rclpy
from rcl_interfaces.msg import ParameterDescriptor, SetParametersResult
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.clock import Clock, ClockType
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy

from recon_slam.config import ConfigError, SlamConfig
from recon_slam.errors import ReconSlamError
from recon_slam.io.messages import RclpyTypes, make_header, stamp_to_sec
from recon_slam.io.ros_inputs import LatestSlot, frame_from_messages
from recon_slam.io.ros_outputs import NODE_NAME, MapCloudCache, NodeStatus, RosOutputs, graph_edges
from recon_slam.io.sync import StampSynchronizer
from recon_slam.io.tf_buffer import TfBuffer, TfLookupError
from recon_slam.ros.params import (
    ARRAY_PARAMETERS,
    NODE_PARAMETERS,
    READ_ONLY_PARAMETERS,
    NodeSettings,
    engine_config_from_params,
    engine_parameter_defaults,
    node_settings_from_params,
)

__all__ = ["SlamNode", "main"]

try:  # not on PyPI; present on every ROS install
    from tf2_msgs.msg import TFMessage
except ImportError:  # pragma: no cover - depends on the environment
    TFMessage = None


@dataclass
class _Input:
    """One synchronised set of input messages waiting for the engine."""

    image: Any
    depth: Any = None
    right: Any = None
    arrival: float = 0.0  # time.monotonic() when the colour/left image arrived
    stamp: float = 0.0


@dataclass
class _Counters:
    received: dict = field(default_factory=lambda: {"image": 0, "depth": 0, "right": 0, "camera_info": 0,
                                                    "right_camera_info": 0})
    last_arrival: dict = field(default_factory=dict)
    matched: int = 0
    processed: int = 0
    stale: int = 0
    no_camera_info: int = 0


def _plain(value: Any) -> Any:
    """rclpy parameter value -> plain Python (arrays -> lists)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    try:
        return list(value)
    except TypeError:
        return value


class SlamNode(Node):
    """rclpy node wrapping :class:`~recon_slam.system.SlamSystem` (see the module notes).

    Subscriptions (relative, remappable): ``image`` (or ``image/compressed``), ``depth``
    (or ``depth/compressedDepth``), ``camera_info``, ``right/image``, ``right/camera_info``;
    ``/tf_static`` (and ``/tf`` when odometry comes from the robot) when tf2_msgs exists.
    Publications: ``~/odometry``, ``~/pose``, ``~/path``, ``~/map_cloud`` (latched),
    ``~/keyframes`` (latched), ``/diagnostics``, ``/tf``, ``/tf_static``.
    Services (std_srvs/Trigger): ``~/reset``, ``~/save_map``, ``~/load_map``.
    """

    def __init__(self, node_name: str = NODE_NAME, **kwargs: Any) -> None:
        super().__init__(node_name, **kwargs)
        self._types = RclpyTypes()
        self._once: set[str] = set()
        self._once_lock = threading.Lock()
        self._steady = Clock(clock_type=ClockType.STEADY_TIME)
        self._start = time.monotonic()

        # ---------------- parameters
        self._engine_keys = list(engine_parameter_defaults())
        self._declare_parameters()
        self._config_error = ""
        self._settings = NodeSettings()
        self._config: Optional[SlamConfig] = None
        values = self._param_values()
        try:
            self._settings = node_settings_from_params(values)
        except ConfigError as exc:
            self._config_error = str(exc)
        self._mode = str(values.get("mode") or "rgbd")
        try:
            self._config = engine_config_from_params({k: values[k] for k in self._engine_keys})
        except ConfigError as exc:
            self._config_error = self._config_error or str(exc)
        if self._config_error:
            self._log_once("config", "error", f"not tracking: {self._config_error}")
        self.add_on_set_parameters_callback(self._on_set_parameters)

        # ---------------- state
        s = self._settings
        self._outputs = RosOutputs(self._types, s.frames, s.extrinsic, s.policy, s.publish_odom_tf)
        self._engine: Any = None
        self._engine_lock = threading.RLock()
        self._pending_map: Any = None
        self._extrinsic_source = ""
        self._first_frame_time: Optional[float] = None
        self._slot = LatestSlot()
        self._sync_lock = threading.Lock()
        streams = ["image", "right"] if self._mode == "stereo" else ["image", "depth"]
        if self._mode not in ("rgbd", "stereo"):
            streams = ["image"]
        self._sync = StampSynchronizer(streams, tolerance=s.sync_tolerance, queue_size=s.sync_queue_size)
        self._info: Any = None
        self._right_info: Any = None
        self._counters = _Counters()
        self._last_ref_stamp: Optional[float] = None
        self._reset_requested = False
        self._status = NodeStatus(state="error" if self._config_error else "waiting_for_data",
                                  reason=self._config_error or "no frames received yet")
        self._input_problem = ""
        self._last_state = ""
        self._proc_times: deque = deque(maxlen=30)
        self._latencies: deque = deque(maxlen=300)
        self._engine_ms: deque = deque(maxlen=300)
        self._wait_ms: deque = deque(maxlen=300)  # image arrival -> taken by the worker
        self._frame_index = 0
        self._tf_buffer = TfBuffer()
        self._stop = threading.Event()
        self._map_request: dict[str, float] = {}
        self._map_cv = threading.Condition()
        self._cloud_cache: Optional[MapCloudCache] = None  # replaced (not mutated) on reset / load

        # ---------------- ROS interfaces
        self._cb_inputs = MutuallyExclusiveCallbackGroup()
        self._cb_services = MutuallyExclusiveCallbackGroup()
        self._cb_timers = MutuallyExclusiveCallbackGroup()
        self._create_publishers()
        self._create_subscriptions()
        self._create_services()
        self._watchdog_timer = self.create_timer(1.0, self._watchdog, callback_group=self._cb_timers, clock=self._steady)
        self._diag_timer = self.create_timer(
            s.diagnostics_period, self._publish_diagnostics, callback_group=self._cb_timers, clock=self._steady
        )

        self._worker = threading.Thread(target=self._work_loop, name="recon_slam_engine", daemon=True)
        self._map_thread = threading.Thread(target=self._map_loop, name="recon_slam_map", daemon=True)
        self._worker.start()
        self._map_thread.start()
        self.get_logger().info(
            f"recon_slam node up: mode {self._mode}, inputs {', '.join(self._topics.values())}; "
            f"outputs ~/odometry ~/pose ~/path ~/map_cloud ~/keyframes /diagnostics"
            + (" /tf" if self._tf_pub is not None else "")
        )

    # ------------------------------------------------------------------ logging helpers
    def _log_once(self, key: str, level: str, text: str) -> bool:
        """Log ``text`` the first time ``key`` is seen; returns whether it was logged."""
        with self._once_lock:
            if key in self._once:
                return False
            self._once.add(key)
        self._log(level, text)
        return True

    def _log(self, level: str, text: str) -> None:
        # rclpy ties one severity to each call site: one line per level
        logger = self.get_logger()
        if level == "error":
            logger.error(text)
        elif level == "warning":
            logger.warning(text)
        else:
            logger.info(text)

    def _forget_once(self, prefix: str) -> None:
        with self._once_lock:
            self._once = {k for k in self._once if not k.startswith(prefix)}

    # ------------------------------------------------------------------ parameters
    def _declare_parameters(self) -> None:
        for name, default in engine_parameter_defaults().items():
            desc = ParameterDescriptor(
                description=f"engine configuration key {name} (see recon_slam/config.py)",
                dynamic_typing=True,
                read_only=name in READ_ONLY_PARAMETERS,
            )
            self.declare_parameter(name, default, desc)
        for name, (default, text) in NODE_PARAMETERS.items():
            self.declare_parameter(
                name, default, ParameterDescriptor(description=text, dynamic_typing=True,
                                                   read_only=name in READ_ONLY_PARAMETERS)
            )
        for name, text in ARRAY_PARAMETERS.items():
            self.declare_parameter(name, None, ParameterDescriptor(description=text, dynamic_typing=True))

    def _param_values(self) -> dict[str, Any]:
        names = self._engine_keys + list(NODE_PARAMETERS) + list(ARRAY_PARAMETERS)
        return {n: _plain(self.get_parameter(n).value) for n in names}

    def _on_set_parameters(self, params: list) -> SetParametersResult:
        values = self._param_values()
        changed = {p.name: _plain(p.value) for p in params}
        values.update(changed)
        try:
            settings = node_settings_from_params(values)
            config = engine_config_from_params({k: values[k] for k in self._engine_keys})
        except ConfigError as exc:
            self.get_logger().warning(f"parameter change rejected: {exc}")
            return SetParametersResult(successful=False, reason=str(exc))
        engine_changed = any(k in self._engine_keys for k in changed)
        with self._engine_lock:
            self._settings = settings
            self._outputs.policy = settings.policy
            self._outputs.odometry.jump_m = settings.policy.odom_jump_m
            self._outputs.odometry.jump_rad = settings.policy.odom_jump_rad
            self._outputs.frames.map = settings.frames.map
            self._outputs.frames.odom = settings.frames.odom
            self._outputs.frames.base = settings.frames.base
            self._outputs.publish_odom_tf = settings.publish_odom_tf
            with self._sync_lock:
                self._sync.tolerance = settings.sync_tolerance
            if self._cloud_cache is not None and self._cloud_cache.voxel != settings.policy.cloud_voxel_m:
                self._new_cloud_cache()
            had_error = bool(self._config_error)
            self._config_error = ""
            if engine_changed:
                if self._engine is None or had_error:
                    self._config = config
                else:
                    self._config = config
                    self.get_logger().info("engine parameters changed: they take effect at the next ~/reset")
            if had_error:
                self._forget_once("config")
                self._set_status("waiting_for_data", "configuration fixed; waiting for frames")
                self.get_logger().info("configuration is valid again")
        return SetParametersResult(successful=True)

    # ------------------------------------------------------------------ interfaces
    def _create_publishers(self) -> None:
        from diagnostic_msgs.msg import DiagnosticArray
        from geometry_msgs.msg import PoseStamped
        from nav_msgs.msg import Odometry, Path
        from sensor_msgs.msg import PointCloud2
        from visualization_msgs.msg import MarkerArray

        reliable = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.VOLATILE)
        latched = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE,
                             durability=DurabilityPolicy.TRANSIENT_LOCAL, history=HistoryPolicy.KEEP_LAST)
        self._odom_pub = self.create_publisher(Odometry, "~/odometry", reliable)
        self._pose_pub = self.create_publisher(PoseStamped, "~/pose", reliable)
        self._path_pub = self.create_publisher(Path, "~/path", QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE))
        self._cloud_pub = self.create_publisher(PointCloud2, "~/map_cloud", latched)
        self._markers_pub = self.create_publisher(MarkerArray, "~/keyframes", latched)
        self._diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", reliable)
        self._tf_pub = self._tf_static_pub = None
        if TFMessage is None:
            self._log_once(
                "tf:missing", "warning",
                "tf2_msgs is not installed: /tf and /tf_static are NOT published (map -> odom, odom -> base_link, "
                "base_link -> camera) and the extrinsic cannot be read from TF; install ros-$ROS_DISTRO-tf2-msgs. "
                "Odometry, pose, path, cloud and markers are published as usual.",
            )
        elif self._settings.publish_tf:
            self._tf_pub = self.create_publisher(TFMessage, "/tf", QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE))
            self._tf_static_pub = self.create_publisher(TFMessage, "/tf_static", latched)

    def _input_qos(self) -> QoSProfile:
        s = self._settings
        rel = ReliabilityPolicy.RELIABLE if s.input_qos_reliability == "reliable" else ReliabilityPolicy.BEST_EFFORT
        return QoSProfile(depth=s.input_qos_depth, reliability=rel, durability=DurabilityPolicy.VOLATILE,
                          history=HistoryPolicy.KEEP_LAST)

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
        qos = self._input_qos()
        self._topics: dict[str, str] = {}

        def events(topic_key: str) -> SubscriptionEventCallbacks:
            return SubscriptionEventCallbacks(incompatible_qos=lambda ev, k=topic_key: self._on_incompatible_qos(k, ev))

        def sub(kind: str, msg_type: Any, base: str, suffix: str, callback: Any) -> None:
            topic = self._resolve(base) + suffix
            self._topics[kind] = topic
            self.create_subscription(msg_type, topic, callback, qos, callback_group=self._cb_inputs,
                                     event_callbacks=events(kind))

        compressed = s.image_transport == "compressed"
        img_type, img_suffix = (CompressedImage, "/compressed") if compressed else (Image, "")
        sub("image", img_type, "image", img_suffix, lambda m: self._on_image("image", m))
        sub("camera_info", CameraInfo, "camera_info", "", self._on_camera_info)
        if self._mode == "rgbd":
            cd = s.depth_transport == "compressedDepth"
            sub("depth", CompressedImage if cd else Image, "depth", "/compressedDepth" if cd else "",
                lambda m: self._on_image("depth", m))
        elif self._mode == "stereo":
            sub("right", img_type, "right/image", img_suffix, lambda m: self._on_image("right", m))
            sub("right_camera_info", CameraInfo, "right/camera_info", "", self._on_right_camera_info)
        elif self._mode == "mono":
            pass
        if TFMessage is not None:
            latched = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE,
                                 durability=DurabilityPolicy.TRANSIENT_LOCAL)
            self.create_subscription(TFMessage, "/tf_static", lambda m: self._tf_buffer.add_message(m, static=True),
                                     latched, callback_group=self._cb_inputs)
            if not s.publish_odom_tf:
                self.create_subscription(TFMessage, "/tf", self._on_tf, QoSProfile(depth=100),
                                         callback_group=self._cb_inputs)

    def _create_services(self) -> None:
        from std_srvs.srv import Trigger

        self.create_service(Trigger, "~/reset", self._srv_reset, callback_group=self._cb_services)
        self.create_service(Trigger, "~/save_map", self._srv_save_map, callback_group=self._cb_services)
        self.create_service(Trigger, "~/load_map", self._srv_load_map, callback_group=self._cb_services)

    # ------------------------------------------------------------------ callbacks (executor threads)
    def _on_incompatible_qos(self, kind: str, event: Any) -> None:
        topic = self._topics.get(kind, kind)
        policy = getattr(getattr(event, "last_policy_kind", None), "name", str(getattr(event, "last_policy_kind", "")))
        self._input_problem = f"QoS of the publisher on {topic} is incompatible ({policy})"
        self._log_once(
            f"qos:{kind}", "error",
            f"{topic}: a publisher's QoS is incompatible with this subscription (policy {policy}); this node "
            f"subscribes {self._settings.input_qos_reliability}/volatile, depth {self._settings.input_qos_depth}: "
            "set input_qos_reliability:=best_effort (matches every publisher) or check `ros2 topic info -v " + topic + "`",
        )

    def _on_tf(self, msg: Any) -> None:
        self._tf_buffer.add_message(msg, static=False)

    def _on_camera_info(self, msg: Any) -> None:
        self._counters.received["camera_info"] += 1
        self._info = msg

    def _on_right_camera_info(self, msg: Any) -> None:
        self._counters.received["right_camera_info"] += 1
        self._right_info = msg

    def _on_image(self, kind: str, msg: Any) -> None:
        now = time.monotonic()
        c = self._counters
        c.received[kind] += 1
        c.last_arrival[kind] = now
        try:
            stamp = stamp_to_sec(msg.header.stamp)
        except Exception:  # noqa: BLE001 - malformed header
            self._log_once(f"stamp:{kind}", "warning", f"{self._topics.get(kind)}: message without a valid stamp: ignored")
            return
        with self._sync_lock:
            if kind == "image":
                if self._last_ref_stamp is not None and stamp < self._last_ref_stamp - 1.0:
                    self.get_logger().warning(
                        f"image stamps jumped back by {self._last_ref_stamp - stamp:.1f} s (bag loop or clock reset): "
                        "resetting the synchroniser and the map"
                    )
                    self._sync.reset()
                    self._tf_buffer.clear()
                    self._reset_requested = True
                self._last_ref_stamp = stamp
            matches = self._sync.add(kind, stamp, (msg, now))
        for m in matches:
            c.matched += 1
            parts = dict(zip(self._sync.names, m.items))
            image, arrival = parts["image"]
            self._slot.put(
                _Input(
                    image=image,
                    depth=parts["depth"][0] if "depth" in parts else None,
                    right=parts["right"][0] if "right" in parts else None,
                    arrival=arrival,
                    stamp=m.stamp,
                )
            )

    # ------------------------------------------------------------------ engine worker
    def _work_loop(self) -> None:
        while not self._stop.is_set():
            item = self._slot.take(timeout=0.1)
            if item is None:
                continue
            age = time.monotonic() - item.arrival
            self._wait_ms.append(age * 1e3)
            if self._settings.max_frame_age > 0 and age > self._settings.max_frame_age:
                self._counters.stale += 1
                continue
            try:
                self._process(item)
            except Exception as exc:  # noqa: BLE001 - the node must keep running and say why
                if not self.context.ok() or self._stop.is_set():
                    break  # shutting down: publishers are gone
                self._handle_worker_error(exc)

    def _handle_worker_error(self, exc: Exception) -> None:
        """Record why a frame was not processed; log it once per cause."""
        if isinstance(exc, ReconSlamError):
            self._input_problem = str(exc)
            self._set_status("waiting_for_data" if self._counters.processed == 0 else "not_tracking", str(exc))
            self._log_once(f"input:{type(exc).__name__}:{str(exc)[:80]}", "error", f"not tracking: {exc}")
        else:  # a bug: keep the node alive, say why
            self._set_status("error", f"internal error: {exc}")
            self._log_once(f"bug:{type(exc).__name__}", "error",
                           f"engine failed on a frame ({exc}); the node keeps running:\n{traceback.format_exc()}")

    def _set_status(self, state: str, reason: str) -> None:
        self._status.state = state
        self._status.reason = reason

    def _resolve_extrinsic(self, camera_frame: str) -> tuple[Optional[np.ndarray], str]:
        """(T_base_cam, source) or (None, '') while still waiting for TF."""
        s = self._settings
        base = s.frames.base
        if camera_frame == base:
            return np.eye(4), "identity (camera frame is the base frame)"
        if s.use_tf_extrinsic and TFMessage is not None:
            try:
                T = self._tf_buffer.lookup(base, camera_frame, static_only=True)
                return T, "tf"
            except TfLookupError as exc:
                waited = time.monotonic() - (self._first_frame_time or time.monotonic())
                if s.extrinsic is None and waited < s.extrinsic_wait:
                    self._set_status("waiting_for_data", f"waiting for TF {base} -> {camera_frame} on /tf_static")
                    return None, ""
                self._log_once(
                    "tf:extrinsic", "warning",
                    f"TF lookup {base} -> {camera_frame} failed ({exc}); using "
                    + ("the extrinsic parameter" if s.extrinsic is not None else
                       f"no extrinsic: the camera is {base} (placed at the camera, x forward, z up)"),
                )
        if s.extrinsic is not None:
            return s.extrinsic, "parameter"
        return _default_T(), "default (camera is base_link)"

    def _ensure_engine(self, frame: Any) -> Any:
        if self._engine is not None:
            return self._engine
        if self._config is None:
            return None
        if self._first_frame_time is None:
            self._first_frame_time = time.monotonic()
        camera_frame = self._settings.camera_frame or frame.frame_id
        T, source = self._resolve_extrinsic(camera_frame)
        if T is None:
            return None
        from recon_slam.system import SlamSystem

        self._outputs.set_extrinsic(T)
        self._outputs.frames.camera = camera_frame
        self._extrinsic_source = source
        self.get_logger().info(f"camera {camera_frame} in {self._settings.frames.base}: extrinsic from {source}")
        if source != "tf" and self._tf_static_pub is not None:
            statics = self._outputs.static_transforms(frame.stamp, camera_frame)
            if statics:
                self._tf_static_pub.publish(self._outputs.tf_message(statics))
        self._engine = SlamSystem(self._config, frame.camera)
        self._new_cloud_cache()
        if self._pending_map is not None or self._settings.load_map_at_start:
            data, self._pending_map = self._pending_map, None
            try:
                self._restore_map(data)
            except ReconSlamError as exc:
                self._log_once("map:start", "error", f"could not load the map at start: {exc}")
        return self._engine

    def _process(self, item: _Input) -> None:
        s = self._settings
        with self._engine_lock:
            if self._reset_requested:
                self._reset_requested = False
                self._reset_locked()
            if self._config_error:
                self._set_status("error", self._config_error)
                return
            info = self._info
            if info is None:
                self._counters.no_camera_info += 1
            frame = frame_from_messages(
                self._frame_index, self._mode, item.image, info,
                depth_msg=item.depth, right_msg=item.right, right_info_msg=self._right_info,
                camera_frame=s.camera_frame, baseline_m=s.stereo_baseline or None, topics=self._topics,
            )
            engine = self._ensure_engine(frame)
            if engine is None:
                return
            self._frame_index += 1
            result = engine.process(frame)
            T_odom_ext = None
            if not s.publish_odom_tf and TFMessage is not None:
                try:
                    T_odom_ext = self._tf_buffer.lookup(s.frames.odom, s.frames.base, frame.stamp)
                except TfLookupError as exc:
                    self._log_once(
                        "tf:odom", "warning",
                        f"TF lookup {s.frames.odom} -> {s.frames.base} at the image stamp failed ({exc}): map -> "
                        f"{s.frames.odom} cannot be computed; publish the robot's odometry on /tf, or set "
                        "publish_odom_tf:=true when this robot has no other odometry",
                    )
            outs = self._outputs.frame_outputs(frame.stamp, result.T_world_cam, result.state, T_odom_ext)
            if outs.odometry is not None:
                self._odom_pub.publish(outs.odometry)
            if outs.pose is not None:
                self._pose_pub.publish(outs.pose)
            if outs.transforms and self._tf_pub is not None:
                self._tf_pub.publish(self._outputs.tf_message(outs.transforms))
            done = time.monotonic()
            n_kf = engine.num_keyframes
            due = {name: frame.stamp for name in ("path", "markers", "cloud")
                   if self._outputs.due(name, frame.stamp, n_kf)}
        # bookkeeping outside the lock
        latency = done - item.arrival
        self._latencies.append(latency)
        self._engine_ms.append(float(result.time_ms))
        self._proc_times.append(done)
        c = self._counters
        c.processed += 1
        self._input_problem = ""
        self._forget_once("input:")
        st = self._status
        st.state = result.state
        st.reason = result.reason if result.state == "lost" else ""
        st.latency_ms = latency * 1e3
        st.n_keyframes = n_kf
        if result.state != self._last_state:
            msg = f"state: {result.state}" + (f" ({result.reason})" if result.reason else "")
            self._log("warning" if result.state == "lost" else "info", msg)
            self._last_state = result.state
        if due:
            with self._map_cv:
                self._map_request.update(due)
                self._map_cv.notify()

    # ------------------------------------------------------------------ map publisher thread
    def _map_loop(self) -> None:
        while not self._stop.is_set():
            with self._map_cv:
                self._map_cv.wait_for(lambda: bool(self._map_request) or self._stop.is_set(), timeout=0.5)
                request, self._map_request = self._map_request, {}
            engine = self._engine
            if not request or engine is None:
                continue
            try:
                self._publish_map_outputs(engine, request)
            except Exception as exc:  # noqa: BLE001 - e.g. a reset raced with us; try again next time
                if not self.context.ok() or self._stop.is_set():
                    break
                self._log_once(f"mapout:{type(exc).__name__}", "warning", f"map outputs skipped once: {exc}")

    def _new_cloud_cache(self) -> None:
        o = self._config.output if self._config is not None else None
        self._cloud_cache = MapCloudCache(
            self._settings.policy.cloud_voxel_m,
            o.cloud_min_confidence if o is not None else 0.5,
            o.cloud_stride if o is not None else 1,
        )

    def _publish_map_outputs(self, engine: Any, request: dict[str, float]) -> None:
        out = self._outputs
        if "path" in request:
            stamps, T = engine.trajectory()
            self._path_pub.publish(out.path_msg(request["path"], stamps, T))
        if "markers" in request:
            ids, _, T_kf = engine.keyframes()
            if len(ids):
                camera = engine.keyframe_map.get(ids[0]).camera
                edges = graph_edges(engine, ids)
                self._markers_pub.publish(out.markers_msg(request["markers"], T_kf, camera, ids=ids, edges=edges))
        cache = self._cloud_cache
        if "cloud" in request and cache is not None:
            xyz, rgb = cache.cloud(engine)
            self._cloud_pub.publish(out.cloud_msg(request["cloud"], xyz, rgb))

    # ------------------------------------------------------------------ services
    def _reset_locked(self) -> None:
        if self._engine is not None:
            self._engine.reset()
        self._new_cloud_cache()
        self._outputs.reset()
        self._frame_index = 0
        self._last_state = ""
        with self._sync_lock:
            self._sync.reset()
        self._slot.clear()
        stamp = self._last_ref_stamp or 0.0
        self._path_pub.publish(self._outputs.path_msg(stamp, [], np.zeros((0, 4, 4))))
        self._markers_pub.publish(self._types.new("visualization_msgs/msg/MarkerArray", markers=[
            self._types.new("visualization_msgs/msg/Marker", header=make_header(self._types, stamp, self._settings.frames.map),
                            action=3)]))
        self._cloud_pub.publish(self._outputs.cloud_msg(stamp, np.zeros((0, 3)), np.zeros((0, 3), np.uint8)))

    def _srv_reset(self, request: Any, response: Any) -> Any:
        with self._engine_lock:
            if self._config is not None and self._engine is not None and self._engine.config is not self._config:
                self._engine.close()
                self._engine = None  # recreated with the new configuration at the next frame
            self._reset_locked()
        self._set_status("initialising", "reset: waiting for the next frame")
        response.success = True
        response.message = "reset: map and trajectory cleared"
        self.get_logger().info(response.message)
        return response

    def _map_path(self) -> str:
        return os.path.expanduser(self._settings.map_path)

    def _srv_save_map(self, request: Any, response: Any) -> Any:
        from recon_slam.maps import MapError, save_system_map

        path = self._map_path()
        with self._engine_lock:
            engine = self._engine
            if engine is None or engine.num_keyframes == 0:
                response.success = False
                response.message = "nothing to save yet: no keyframes (is the node tracking? see /diagnostics)"
            else:
                try:
                    save_system_map(engine, path, T_map_world=self._outputs.T_map_world)
                    response.success = True
                    response.message = f"saved {engine.num_keyframes} keyframes to {path}"
                except (MapError, OSError) as exc:
                    response.success = False
                    response.message = f"save_map failed: {exc}"
        self._log("info" if response.success else "error", response.message)
        return response

    def _restore_map(self, data: Any) -> int:
        from recon_slam.maps import load_map, restore_into_system

        if data is None:
            data = load_map(self._map_path())
        n = restore_into_system(self._engine, data)
        self._new_cloud_cache()
        self._outputs.reset()
        self._outputs.set_map_origin(data.T_map_world)
        self._last_state = ""
        if data.metadata.get("warning"):
            self.get_logger().warning(data.metadata["warning"])
        stamp = self._last_ref_stamp or 0.0
        with self._map_cv:
            self._map_request.update({"markers": stamp, "cloud": stamp, "path": stamp})
            self._map_cv.notify()
        return n

    def _srv_load_map(self, request: Any, response: Any) -> Any:
        from recon_slam.maps import MapError, load_map

        path = self._map_path()
        with self._engine_lock:
            try:
                data = load_map(path)
                if data.mode != self._mode:
                    raise MapError(f"the map at {path} was built in mode {data.mode!r}, this node runs {self._mode!r}")
                if self._engine is None:
                    self._pending_map = data
                    response.message = (f"map {path} ({len(data.keyframes)} keyframes) verified; it is loaded when "
                                        "the first frame arrives")
                else:
                    n = self._restore_map(data)
                    response.message = f"loaded {n} keyframes from {path}; relocalising in it"
                response.success = True
            except (ReconSlamError, OSError) as exc:
                response.success = False
                response.message = f"load_map failed: {exc}"
        self._log("info" if response.success else "error", response.message)
        if response.success:
            self._set_status("initialising", "map loaded: relocalising")
        return response

    # ------------------------------------------------------------------ watchdog and diagnostics
    def _watchdog(self) -> None:
        s = self._settings
        now = time.monotonic()
        if now - self._start < s.no_data_timeout or self._config_error:
            return
        c = self._counters
        reliability = s.input_qos_reliability.replace("_", " ")
        required = ["image"] + (["depth"] if self._mode == "rgbd" else ["right"] if self._mode == "stereo" else [])
        problems = []
        for kind in required:
            topic = self._topics.get(kind, kind)
            last = c.last_arrival.get(kind)
            if last is None:
                n_pub = self.count_publishers(topic)
                if n_pub == 0:
                    text = (f"no messages on {topic}: nobody publishes it; check the topic name and remapping "
                            f"(ros2 topic list; e.g. {kind if kind != 'right' else 'right/image'}:=/your/topic)")
                else:
                    text = (f"no messages on {topic} yet although {n_pub} publisher(s) exist: if they publish, the QoS "
                            f"does not match: this node subscribes {reliability}, volatile, depth {s.input_qos_depth}; "
                            f"check `ros2 topic info -v {topic}` (best-effort publishers need "
                            "input_qos_reliability:=best_effort)")
                problems.append(text)
                self._log_once(f"nodata:{kind}", "warning", text)
            elif now - last > s.no_data_timeout:
                text = f"no messages on {topic} for {now - last:.0f} s (the driver stopped?)"
                problems.append(text)
                self._log_once(f"stopped:{kind}:{int(last)}", "warning", text)
        if c.received["image"] and self._mode in ("rgbd", "stereo") and self._info is None:
            text = (f"images arrive but no camera_info on {self._topics.get('camera_info')}: modes rgbd/stereo need "
                    "it; remap camera_info to your driver's CameraInfo topic")
            problems.append(text)
            self._log_once("noinfo", "warning", text)
        with self._sync_lock:
            unmatched = self._sync.drops.get("unmatched", 0)
            last = {n: self._sync.last_stamp(n) for n in self._sync.names}
        new_unmatched = unmatched - self._unmatched_at_check
        if (len(last) > 1 and new_unmatched > 0 and c.matched == self._matched_at_check
                and all(v is not None for v in last.values())):
            other = self._sync.names[1]
            diff = abs(last[other] - last["image"])
            text = (f"image and {other} stamps are out of sync: last stamps {last['image']:.3f} and {last[other]:.3f} "
                    f"differ by {diff:.3f} s > sync_tolerance {s.sync_tolerance} s; raise sync_tolerance or fix the "
                    "driver's stamps (clocks, use_sim_time)")
            problems.append(text)
            self._log_once("sync", "warning", text)
        self._unmatched_at_check = unmatched
        self._matched_at_check = c.matched
        if problems and (self._engine is None or now - (self._proc_times[-1] if self._proc_times else 0) > 2.0):
            self._set_status("waiting_for_data" if c.processed == 0 else "not_tracking", "; ".join(problems))
        elif self._input_problem and (not self._proc_times or now - self._proc_times[-1] > 2.0):
            self._set_status(self._status.state, self._input_problem)

    _unmatched_at_check = 0
    _matched_at_check = 0

    def status(self) -> NodeStatus:
        """Current :class:`NodeStatus` (counters refreshed)."""
        st = self._status
        c = self._counters
        st.frames_received = c.received["image"]
        st.frames_processed = c.processed
        st.frames_dropped = self._slot.dropped + c.stale
        times = list(self._proc_times)
        st.fps = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 and times[-1] > times[0] else 0.0
        if times and time.monotonic() - times[-1] > 3.0:
            st.fps = 0.0
        lat = np.array(self._latencies) * 1e3 if self._latencies else np.zeros(0)
        with self._sync_lock:
            sync_drops = dict(self._sync.drops)
        st.extra = {
            "mode": self._mode,
            "latency_p50_ms": f"{np.percentile(lat, 50):.1f}" if len(lat) else "nan",
            "latency_max_ms": f"{lat.max():.1f}" if len(lat) else "nan",
            "engine_ms_p50": f"{np.percentile(list(self._engine_ms), 50):.1f}" if self._engine_ms else "nan",
            "engine_ms_max": f"{max(self._engine_ms):.1f}" if self._engine_ms else "nan",
            "queue_wait_ms_p50": f"{np.percentile(list(self._wait_ms), 50):.1f}" if self._wait_ms else "nan",
            "queue_wait_ms_max": f"{max(self._wait_ms):.1f}" if self._wait_ms else "nan",
            "dropped_by_policy": str(self._slot.dropped),
            "dropped_stale": str(c.stale),
            "sync_drops": ", ".join(f"{k}={v}" for k, v in sorted(sync_drops.items())) or "none",
            "camera_info": "received" if self._info is not None else "missing",
            "extrinsic": self._extrinsic_source or "not decided yet",
            "tf": "published" if self._tf_pub is not None else "not published (tf2_msgs missing or publish_tf false)",
        }
        return st

    def _publish_diagnostics(self) -> None:
        st = self.status()
        now = self.get_clock().now().nanoseconds * 1e-9
        self._diag_pub.publish(self._outputs.diagnostics_msg(now, st, name=f"{self.get_name()}: SLAM"))

    # ------------------------------------------------------------------ shutdown
    def shutdown(self) -> None:
        """Stop the worker threads and the engine (idempotent)."""
        self._stop.set()
        with self._map_cv:
            self._map_cv.notify_all()
        for t in (self._worker, self._map_thread):
            if t.is_alive() and t is not threading.current_thread():
                t.join(timeout=10.0)
        with self._engine_lock:
            if self._engine is not None:
                self._engine.close()
                self._engine = None

    def destroy_node(self) -> None:  # noqa: D401 - rclpy API
        """Stop the threads, then destroy the ROS entities."""
        self.shutdown()
        super().destroy_node()


def _default_T() -> np.ndarray:
    from recon_slam.io.ros_outputs import default_T_base_cam

    return default_T_base_cam()


def main(args: Optional[list[str]] = None) -> None:
    """Entry point of ``ros2 run recon_slam slam_node``.

    One executor thread serves every callback: they are short (the engine runs in its own
    thread), and on a small CPU a multi-threaded executor's extra Python threads compete
    with the engine for the interpreter lock (measured: the engine ran 1.5-2x slower).
    """
    rclpy.init(args=args)
    node = SlamNode()
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    try:
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        executor.shutdown()
        node.destroy_node()
        rclpy.try_shutdown()


if __name__ == "__main__":
    main()
