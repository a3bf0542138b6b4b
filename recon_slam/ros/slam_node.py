"""The SLAM node: ``ros2 run recon_slam slam_node``.

The engine (:class:`~recon_slam.system.SlamSystem`) runs, by parameter ``engine_process``:

* ``true`` (default): in a process of its own (:mod:`recon_slam.ros.engine_process`). The
  node and the engine then do not share an interpreter lock, so message handling and the
  map outputs do not slow tracking down (measured: the engine ran 2-3x slower inside the
  node on 2 cores, see ``benchmarks/bench_node_latency.py``).
* ``false``: in a worker thread of the node (one process; easier to debug and profile).

Threads of the node, engine in its own process:

* the executor thread: subscription callbacks timestamp the message and hand it to a
  :class:`~recon_slam.io.sync.StampSynchronizer`; a complete set is copied (raw bytes) into
  the one-slot newest-frame channel in shared memory
  (:class:`~recon_slam.ros.engine_process.FrameChannel`): a newer frame replaces one the
  engine has not taken yet and is counted as skipped, so frames never queue up. Services,
  parameters and timers run there too; services are forwarded to the engine process as
  commands with replies and timeouts.
* the result reader: receives each processed frame's result (pose, state, keyframe id,
  stats) and publishes odometry, pose and ``/tf`` at once; it also reports engine errors
  (``/diagnostics`` + log) and the engine process ending (restarted after a back-off).
* the map publisher: asks the engine process for path, keyframes and cloud snapshots at
  their throttled rates (:meth:`RosOutputs.due`) and builds those slow messages, off the
  path of the per-frame outputs.

Engine in a worker thread: the executor thread puts complete sets into a
:class:`~recon_slam.io.ros_inputs.LatestSlot` (same newest-frame policy); the worker decodes,
runs :meth:`SlamSystem.process` and publishes; the map publisher reads the engine directly.

Every message is built by :class:`~recon_slam.io.ros_outputs.RosOutputs` (the same code
``recon-slam replay`` uses). Topics, parameters and frames: see ``README_on_a_robot`` and
:mod:`recon_slam.ros.params`. ``/diagnostics`` reports the node's own latency (image arrival
-> odometry published) and pose age (at each image arrival, how long ago the image of the
newest published pose arrived).
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
from rcl_interfaces.msg import ParameterDescriptor, SetParametersResult
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.clock import Clock, ClockType
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy

from recon_slam.config import ConfigError, SlamConfig
from recon_slam.errors import ReconSlamError
from recon_slam.io.messages import RclpyTypes, make_header, make_pose_stamped, stamp_to_sec
from recon_slam.io.ros_inputs import LatestSlot, frame_from_messages
from recon_slam.io.ros_outputs import NODE_NAME, NodeStatus, RosOutputs, graph_edges
from recon_slam.io.sync import StampSynchronizer
from recon_slam.io.tf_buffer import TfBuffer, TfLookupError
from recon_slam.ros.engine_process import (EngineClient, EngineUnavailable, LiveCloudCache, freeze_heap, pack_frame,
                                           warm_up_torch)
from recon_slam.ros.params import (
    ARRAY_PARAMETERS,
    NODE_PARAMETERS,
    READ_ONLY_PARAMETERS,
    NodeSettings,
    engine_config_from_params,
    engine_parameter_defaults,
    node_settings_from_params,
)

__all__ = ["SlamNode", "main", "MAP_OUTPUT_CPU_SHARE"]

#: the slow map outputs (path, keyframe markers, cloud) are rebuilt at their parameter periods, but
#: never so often that building one takes more than this share of the time since its last build
#: (the path gains a pose per frame: on a long run it would otherwise take a core next to the engine)
MAP_OUTPUT_CPU_SHARE = 0.15

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


class PathBuilder:
    """``~/path`` messages built incrementally (what :meth:`RosOutputs.path_msg` builds, same content).

    One ``PoseStamped`` costs ~0.1 ms of Python to build: a 900-frame path took 60-130 ms on
    a 2-core CPU, every few hundred ms, holding the interpreter lock next to the per-frame work
    (image callbacks, odometry publication, the engine thread). Between two backend
    optimisations only the frames added since the last build change, so only their poses are
    built; the others are reused (messages are immutable once built). After a loop closure
    every pose changes: they are rebuilt in chunks of ``chunk`` poses with ``wait()`` called
    between chunks (the engine gate's ``wait_idle`` when the engine runs in this process).
    """

    def __init__(self, chunk: int = 64) -> None:
        self.chunk = int(chunk)
        self.n_built = 0  # poses built by the last call (statistics, tests)
        self._key: Optional[tuple] = None  # map origin, extrinsic and frame the cache holds
        self._stamps = np.zeros(0)
        self._T = np.zeros((0, 4, 4))
        self._poses: list = []

    def build(self, outputs: RosOutputs, stamp: float, stamps: Any, T_world_cams: Any,
              wait: Optional[Any] = None) -> Any:
        """``nav_msgs/Path`` of base_link in map for engine poses (N, 4, 4) ``T_world_cam`` at ``stamps`` (N,)
        (non-finite poses left out), header stamp ``stamp``; ``wait``: called between chunks of poses."""
        T = np.asarray(T_world_cams, dtype=np.float64).reshape(-1, 4, 4)
        st = np.asarray(stamps, dtype=np.float64).reshape(-1)
        ok = np.all(np.isfinite(T.reshape(len(T), -1)), axis=1) if len(T) else np.zeros(0, bool)
        T_map_base = outputs.T_map_world @ T[ok] @ outputs.T_cam_base
        st = st[ok]
        frame = outputs.frames.map
        key = (outputs.T_map_world.tobytes(), outputs.T_cam_base.tobytes(), frame)
        if key != self._key:
            self._key, self._stamps, self._T, self._poses = key, np.zeros(0), np.zeros((0, 4, 4)), []
        n, m = len(st), min(len(st), len(self._stamps))
        same = (self._stamps[:m] == st[:m]) & np.all(self._T[:m] == T_map_base[:m], axis=(1, 2))
        todo = np.concatenate([np.flatnonzero(~same), np.arange(m, n)])
        poses = self._poses[:n] + [None] * max(0, n - len(self._poses))
        for k in range(0, len(todo), self.chunk):
            if k and wait is not None:
                wait()
            for i in todo[k:k + self.chunk]:
                poses[i] = make_pose_stamped(outputs.types, T_map_base[i], float(st[i]), frame)
        self._stamps, self._T, self._poses = st, T_map_base, poses
        self.n_built = len(todo)
        return outputs.types.new("nav_msgs/msg/Path", header=make_header(outputs.types, stamp, frame), poses=list(poses))


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
    Services (std_srvs/Trigger): ``~/reset``, ``~/save_map``, ``~/load_map`` (forwarded to the engine
    process when ``engine_process`` is true).
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
        self._engine_ms: deque = deque(maxlen=300)  # engine time until the pose was known (published then)
        self._engine_total_ms: deque = deque(maxlen=300)  # engine time of the whole frame (with its map work)
        self._wait_ms: deque = deque(maxlen=300)  # image arrival -> taken by the worker / engine process
        self._pose_ages: deque = deque(maxlen=300)  # at each image arrival: now - arrival of the newest published pose
        self._last_pub_arrival: Optional[float] = None
        self._frame_index = 0
        # ---- engine process (parameter engine_process)
        self._process_mode = bool(s.engine_process)
        self._client: Optional[EngineClient] = None
        self._out_lock = threading.RLock()  # per-frame outputs vs. reset / map load / map publishing
        self._epoch = 0  # bumped when the outputs restart (reset, map load, engine restart)
        self._engine_ready = False  # the engine process has built its engine (processed a frame)
        self._extrinsic_ready = False
        self._sent_config: Optional[SlamConfig] = None
        self._engine_restarts = 0
        self._restart_at: Optional[float] = None
        self._restart_streak = 0
        self._engine_down = ""  # why the engine process is not running
        self._engine_info: dict = {}
        self._engine_stale = 0
        self._dropped_engine_down = 0
        self._last_submit = 0.0
        self._last_result = 0.0
        self._seq = 0
        #: engine process: decode (in the engine process), result -> node, node -> published (ms)
        self._stage_ms: dict[str, deque] = {k: deque(maxlen=300) for k in ("decode", "to_node", "publish")}
        self._held: Optional[_Input] = None  # a set waiting for its camera_info (engine process only)
        self._tf_buffer = TfBuffer()
        self._stop = threading.Event()
        self._map_request: dict[str, float] = {}
        self._map_cost: dict[str, float] = {}  # last build time (s) of each map output
        self._map_last: dict[str, float] = {}  # when it was last built
        self._map_throttled: dict[str, int] = {}  # due but skipped to stay within MAP_OUTPUT_CPU_SHARE
        self._map_cv = threading.Condition()
        self._cloud_cache: Optional[LiveCloudCache] = None  # replaced (not mutated) on reset / load
        self._path_builder = PathBuilder()  # map publisher thread only

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

        self._worker: Optional[threading.Thread] = None
        if self._process_mode:
            if self._config is not None:
                self._start_engine_process()
        else:
            self._worker = threading.Thread(target=self._work_loop, name="recon_slam_engine", daemon=True)
            self._worker.start()
        self._map_thread = threading.Thread(target=self._map_loop, name="recon_slam_map", daemon=True)
        self._map_thread.start()
        self.get_logger().info(
            f"recon_slam node up: mode {self._mode}, inputs {', '.join(self._topics.values())}; "
            f"outputs ~/odometry ~/pose ~/path ~/map_cloud ~/keyframes /diagnostics"
            + (" /tf" if self._tf_pub is not None else "")
            + f"; engine in {'its own process' if self._process_mode else 'a worker thread'}"
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
                self._config = config
                if self._process_mode:
                    if not self._engine_ready:
                        self._push_config()  # no engine built yet: the next frame uses it
                    else:
                        self.get_logger().info("engine parameters changed: they take effect at the next ~/reset")
                elif self._engine is not None and not had_error:
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
        if self._held is not None:
            self._submit_held()

    def _on_right_camera_info(self, msg: Any) -> None:
        self._counters.received["right_camera_info"] += 1
        self._right_info = msg
        if self._held is not None:
            self._submit_held()

    def _on_image(self, kind: str, msg: Any) -> None:
        now = time.monotonic()
        c = self._counters
        c.received[kind] += 1
        c.last_arrival[kind] = now
        if kind == "image" and self._last_pub_arrival is not None:
            self._pose_ages.append(now - self._last_pub_arrival)
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
            item = _Input(
                image=image,
                depth=parts["depth"][0] if "depth" in parts else None,
                right=parts["right"][0] if "right" in parts else None,
                arrival=arrival,
                stamp=m.stamp,
            )
            if self._process_mode:
                self._submit(item)
            else:
                self._slot.put(item)

    # ------------------------------------------------------------------ engine worker
    def _work_loop(self) -> None:
        warm_up_torch()
        freeze_heap()  # after the engine's imports: no long garbage-collector pauses next to tracking
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
        self._report_frame_error(isinstance(exc, ReconSlamError), type(exc).__name__, str(exc),
                                 traceback.format_exc())

    def _report_frame_error(self, is_input: bool, type_name: str, text: str, tb: str = "") -> None:
        """A frame was not processed: input/configuration problem (``is_input``) or a bug in the engine.

        Both go to ``/diagnostics`` (state and reason) and to the log, once per cause.
        """
        if is_input:
            self._input_problem = text
            self._set_status("waiting_for_data" if self._counters.processed == 0 else "not_tracking", text)
            self._log_once(f"input:{type_name}:{text[:80]}", "error", f"not tracking: {text}")
        else:  # a bug: keep the node alive, say why
            self._set_status("error", f"internal error: {text}")
            self._log_once(f"bug:{type_name}", "error",
                           f"engine failed on a frame ({type_name}: {text}); the node keeps running:\n{tb}")

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

    def _apply_extrinsic(self, T: np.ndarray, source: str, camera_frame: str, stamp: float) -> None:
        """Use (4, 4) ``T_base_cam`` from ``source`` for the outputs; publish it on /tf_static unless it came from TF."""
        self._outputs.set_extrinsic(T)
        self._outputs.frames.camera = camera_frame
        self._extrinsic_source = source
        self.get_logger().info(f"camera {camera_frame} in {self._settings.frames.base}: extrinsic from {source}")
        if source != "tf" and self._tf_static_pub is not None:
            statics = self._outputs.static_transforms(stamp, camera_frame)
            if statics:
                self._tf_static_pub.publish(self._outputs.tf_message(statics))

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

        self._apply_extrinsic(T, source, camera_frame, frame.stamp)
        self._engine = SlamSystem(self._config, frame.camera, live=True)  # backend works between frames
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
            published: list = []

            def on_pose(r: Any) -> None:  # the pose first, the frame's map work (keyframes, fusion) after it
                published.append((r, self._publish_frame_outputs(frame.stamp, r.T_world_cam, r.state)))
                self._last_pub_arrival = item.arrival

            result = engine.process(frame, on_pose=on_pose)
            if not published:
                on_pose(result)
            early, done = published[0]
            n_kf = engine.num_keyframes
            due = {name: frame.stamp for name in ("path", "markers", "cloud")
                   if self._outputs.due(name, frame.stamp, n_kf)}
        # bookkeeping outside the lock
        self._engine_total_ms.append(float(result.time_ms))
        self._after_frame(item.arrival, done, float(early.time_ms), result.state, result.reason, n_kf, due)

    def _publish_frame_outputs(self, stamp: float, T_world_cam: np.ndarray, state: str) -> float:
        """Odometry, pose and ``/tf`` of one processed frame ((4, 4) engine pose ``T_world_cam`` at
        image ``stamp``); returns the time.monotonic() of publication."""
        s = self._settings
        T_odom_ext = None
        if not s.publish_odom_tf and TFMessage is not None:
            try:
                T_odom_ext = self._tf_buffer.lookup(s.frames.odom, s.frames.base, stamp)
            except TfLookupError as exc:
                self._log_once(
                    "tf:odom", "warning",
                    f"TF lookup {s.frames.odom} -> {s.frames.base} at the image stamp failed ({exc}): map -> "
                    f"{s.frames.odom} cannot be computed; publish the robot's odometry on /tf, or set "
                    "publish_odom_tf:=true when this robot has no other odometry",
                )
        outs = self._outputs.frame_outputs(stamp, T_world_cam, state, T_odom_ext)
        if outs.odometry is not None:
            self._odom_pub.publish(outs.odometry)
        if outs.pose is not None:
            self._pose_pub.publish(outs.pose)
        if outs.transforms and self._tf_pub is not None:
            self._tf_pub.publish(self._outputs.tf_message(outs.transforms))
        return time.monotonic()

    def _after_frame(self, arrival: float, done: float, engine_ms: float, state: str, reason: str, n_kf: int,
                     due: dict[str, float]) -> None:
        """Counters, latency (image arrival -> odometry published), state log and map output requests."""
        latency = done - arrival
        self._latencies.append(latency)
        self._engine_ms.append(engine_ms)
        self._proc_times.append(done)
        self._last_pub_arrival = arrival
        c = self._counters
        c.processed += 1
        self._input_problem = ""
        self._forget_once("input:")
        st = self._status
        st.state = state
        st.reason = reason if state == "lost" else ""
        st.latency_ms = latency * 1e3
        st.n_keyframes = n_kf
        if state != self._last_state:
            msg = f"state: {state}" + (f" ({reason})" if reason else "")
            self._log("warning" if state == "lost" else "info", msg)
            self._last_state = state
        if due:
            with self._map_cv:
                self._map_request.update(due)
                self._map_cv.notify()

    # ------------------------------------------------------------------ engine process (engine_process: true)
    def _start_engine_process(self) -> None:
        """Spawn the engine process with the current configuration (returns at once)."""
        assert self._config is not None
        client = EngineClient(self._config, self._mode, self._on_engine_message, self._on_engine_exit,
                              cpu_threads=self._config.cpu_threads)
        try:
            client.start()
        except Exception as exc:  # noqa: BLE001 - e.g. no /dev/shm, process limits: say so, retry later
            self._engine_down = f"the engine process could not be started ({type(exc).__name__}: {exc})"
            self._restart_at = time.monotonic() + 30.0
            self._set_status("error", self._engine_down + "; retrying in 30 s (engine_process:=false runs the "
                                                          "engine in a thread of the node instead)")
            self._log_once(f"engine:start:{type(exc).__name__}", "error", self._status.reason)
            return
        self._client = client
        self._sent_config = self._config
        self._engine_ready = False
        self._engine_down = ""
        self._last_result = time.monotonic()

    def _push_config(self) -> None:
        """Give the engine process the current configuration (its engine is rebuilt at the next frame)."""
        client = self._client
        if client is None or not client.alive() or self._config is None or self._config is self._sent_config:
            return
        self._sent_config = self._config
        self._engine_ready = False
        client.command_async("reset", {"config": self._config})

    def _engine_settings(self) -> dict:
        s = self._settings
        return {"camera_frame": s.camera_frame, "baseline_m": s.stereo_baseline or None, "topics": self._topics,
                "max_frame_age": s.max_frame_age, "load_map_at_start": s.load_map_at_start, "map_path": s.map_path}

    def _submit(self, item: _Input) -> None:
        """Executor thread: hand a synchronised set to the engine process (newest-frame slot)."""
        if self._reset_requested:
            self._reset_requested = False
            self._reset_process(wait=False, reset_sync=False)
        if self._config_error:
            self._set_status("error", self._config_error)
            return
        client = self._client
        if client is None and self._config is not None and self._restart_at is None:
            self._start_engine_process()  # the configuration became valid
            client = self._client
        if client is None or not client.alive():
            self._dropped_engine_down += 1
            return
        if self._calibration_missing() and self._held is None:
            # camera_info usually arrives with the images, its callback may just run after theirs: keep this set
            # until it comes (or the next set arrives: then send it anyway and the engine says what is missing)
            self._held = item
            return
        self._held = None
        if self._info is None:
            self._counters.no_camera_info += 1
        if not self._extrinsic_ready:
            if self._first_frame_time is None:
                self._first_frame_time = time.monotonic()
            frame_id = str(item.image.header.frame_id).lstrip("/") or "camera_optical_frame"
            camera_frame = self._settings.camera_frame or frame_id
            T, source = self._resolve_extrinsic(camera_frame)
            if T is None:
                return  # waiting for /tf_static (status says so)
            with self._out_lock:
                self._apply_extrinsic(T, source, camera_frame, item.stamp)
            self._extrinsic_ready = True
        self._seq += 1
        try:
            meta, parts = pack_frame(item.image, self._info, depth=item.depth, right=item.right,
                                     right_info=self._right_info, seq=self._seq, arrival=item.arrival,
                                     settings=self._engine_settings())
            client.submit(meta, parts)
            self._last_submit = time.monotonic()
        except EngineUnavailable:
            self._dropped_engine_down += 1

    def _calibration_missing(self) -> bool:
        return self._info is None or (self._mode == "stereo" and self._right_info is None
                                      and not self._settings.stereo_baseline)

    def _submit_held(self) -> None:
        """Executor thread: a camera_info arrived; send the set that waited for it."""
        if self._held is not None and not self._calibration_missing():
            item, self._held = self._held, None
            self._submit(item)

    def _on_engine_message(self, msg: tuple) -> None:
        """Result reader thread: one message of the engine process (see :mod:`recon_slam.ros.engine_process`)."""
        if self._stop.is_set():
            return
        kind = msg[0]
        if kind == "result":
            self._handle_result(msg[1])
        elif kind == "error":
            d = msg[1]
            self._last_result = time.monotonic()
            self._handle_events(d.get("events") or [])
            self._report_frame_error(bool(d.get("input")), d.get("type", "Error"), d.get("message", ""),
                                     d.get("traceback", ""))
        elif kind == "done":  # a frame whose pose came early: its total engine time
            self._engine_total_ms.append(float(msg[1].get("time_ms", float("nan"))))
        elif kind == "stale":
            self._engine_stale = int(msg[1].get("count", 0))
        elif kind == "log":
            self._log(msg[1], msg[2])
        elif kind == "ready":
            self._engine_info = dict(msg[1])
            client = self._client
            took = time.monotonic() - client.started_at if client is not None else float("nan")
            self.get_logger().info(f"engine process up: pid {msg[1].get('pid')}, torch threads "
                                   f"{msg[1].get('torch_threads')}, started in {took:.1f} s")

    def _handle_events(self, events: list) -> None:
        for kind, payload in events:
            if kind == "map_loaded":
                self._apply_map_loaded(payload)
            elif kind == "map_error":
                self._log_once("map:start", "error", payload)

    def _handle_result(self, d: dict) -> None:
        """Result reader thread: publish odometry / pose / TF of a processed frame at once."""
        received = time.monotonic()
        r = d["result"]
        stamp = float(d["stamp"])
        self._last_result = received
        with self._out_lock:
            self._handle_events(d.get("events") or [])
            done = self._publish_frame_outputs(stamp, r.T_world_cam, r.state)
            n_kf = int(d["n_keyframes"])
            due = {name: stamp for name in ("path", "markers", "cloud") if self._outputs.due(name, stamp, n_kf)}
        self._engine_ready = True
        self._restart_streak = 0
        self._wait_ms.append((float(d["taken"]) - float(d["arrival"])) * 1e3)
        st = self._stage_ms
        st["decode"].append((float(d.get("decoded", d["taken"])) - float(d["taken"])) * 1e3)
        st["to_node"].append((received - float(d["done"])) * 1e3)
        st["publish"].append((done - received) * 1e3)
        if getattr(r, "final", True):  # else its total time comes with a "done" message
            self._engine_total_ms.append(float(r.time_ms))
        self._after_frame(float(d["arrival"]), done, float(r.time_ms), r.state, r.reason, n_kf, due)

    def _apply_map_loaded(self, d: dict) -> None:
        """The engine restored a saved map: restart the outputs in the map's frame (``T_map_world`` (4, 4))."""
        with self._out_lock:
            self._epoch += 1
            self._outputs.reset()
            self._outputs.set_map_origin(np.asarray(d["T_map_world"], dtype=np.float64))
            self._last_state = ""
        if d.get("warning"):
            self.get_logger().warning(d["warning"])
        stamp = self._last_ref_stamp or 0.0
        with self._map_cv:
            self._map_request.update({"markers": stamp, "cloud": stamp, "path": stamp})
            self._map_last.clear()  # the new map is shown at once, whatever the budget says
            self._map_cv.notify()

    def _on_engine_exit(self, description: str) -> None:
        """Result reader thread: the engine process ended without being asked to."""
        if self._stop.is_set():
            return
        client = self._client
        lived = time.monotonic() - client.started_at if client is not None else 0.0
        self._restart_streak = self._restart_streak + 1 if lived < 30.0 else 1
        backoff = min(30.0, 2.0 ** (self._restart_streak - 1))
        self._engine_ready = False
        self._engine_down = description
        self._restart_at = time.monotonic() + backoff
        text = (f"{description}: no poses until it is restarted (in {backoff:.0f} s); the map is lost "
                "(see the lines above for its last words)")
        self._set_status("error", text)
        self.get_logger().error(text)

    def _restart_engine(self) -> None:
        """Watchdog: start a new engine process after a crash; the outputs start over."""
        self._restart_at = None
        old, self._client = self._client, None
        if old is not None:
            old.stop(timeout=2.0)
        if self._config is None:
            return
        with self._out_lock:
            self._epoch += 1
            self._outputs.reset()
            self._outputs.set_extrinsic(self._outputs.T_base_cam)  # the map origin of a loaded map is gone too
            self._last_state = ""
        self._engine_restarts += 1
        why = self._engine_down or "a crash"
        self._start_engine_process()
        if self._client is None:
            return  # could not start it (reported); retried later
        self._set_status("initialising", f"engine process restarted after: {why}")
        self.get_logger().warning(f"engine process restarted (restart {self._engine_restarts}); mapping starts over")

    def _publish_empty_map(self) -> None:
        stamp = self._last_ref_stamp or 0.0
        self._path_pub.publish(self._outputs.path_msg(stamp, [], np.zeros((0, 4, 4))))
        self._markers_pub.publish(self._types.new("visualization_msgs/msg/MarkerArray", markers=[
            self._types.new("visualization_msgs/msg/Marker", header=make_header(self._types, stamp, self._settings.frames.map),
                            action=3)]))
        self._cloud_pub.publish(self._outputs.cloud_msg(stamp, np.zeros((0, 3)), np.zeros((0, 3), np.uint8)))

    def _apply_reset(self, _reply: Optional[dict] = None) -> None:
        """Outputs start over (runs in the result reader when the engine confirms its reset, so results
        before and after the reset are told apart by their order on the pipe)."""
        with self._out_lock:
            self._epoch += 1
            self._outputs.reset()
            self._last_state = ""
            self._publish_empty_map()

    def _reset_process(self, wait: bool, reset_sync: bool = True) -> None:
        """Reset the engine process's map and the outputs (with the new configuration, if it changed).

        Raises:
            EngineUnavailable: ``wait`` and the engine did not confirm in time / is not running.
        """
        if reset_sync:
            with self._sync_lock:
                self._sync.reset()
        client = self._client
        if client is None or not client.alive():
            self._apply_reset()
            if wait and self._config is not None and self._restart_at is not None:
                raise EngineUnavailable(f"the engine process is not running ({self._engine_down}); it is restarted "
                                        "automatically")
            return
        client.clear_frames()
        config = self._config if self._config is not None and self._config is not self._sent_config else None
        fut = client.command_async("reset", {"config": config}, on_reply=self._apply_reset)
        if config is not None:
            self._sent_config = config
            self._engine_ready = False
        if wait:
            reply = fut.wait(self._settings.engine_command_timeout)
            if not reply.get("ok"):
                raise EngineUnavailable(reply.get("message", "reset failed"))

    # ------------------------------------------------------------------ map publisher thread
    def _map_loop(self) -> None:
        while not self._stop.is_set():
            with self._map_cv:
                self._map_cv.wait_for(lambda: bool(self._map_request) or self._stop.is_set(), timeout=0.5)
                request, self._map_request = self._map_request, {}
            request, deferred = self._within_budget(request)
            if deferred:
                # over budget now: keep them pending (a newer request wins) and retry when the
                # budget allows, so the last state is always published, even after the stream stops
                with self._map_cv:
                    for name, stamp in deferred.items():
                        self._map_request.setdefault(name, stamp)
            if not request:
                if deferred:
                    self._stop.wait(min(self._budget_wait(deferred), 0.5))
                continue
            try:
                if self._process_mode:
                    self._publish_map_outputs_remote(request)
                else:
                    engine = self._engine
                    if engine is not None:
                        self._publish_map_outputs(engine, request)
            except Exception as exc:  # noqa: BLE001 - e.g. a reset raced with us; try again next time
                if not self.context.ok() or self._stop.is_set():
                    break
                self._log_once(f"mapout:{type(exc).__name__}", "warning", f"map outputs skipped once: {exc}")

    def _cloud_params(self) -> tuple[float, float, int]:
        """(voxel m, min_confidence, stride) of the map cloud."""
        o = self._config.output if self._config is not None else None
        return (self._settings.policy.cloud_voxel_m, o.cloud_min_confidence if o is not None else 0.5,
                o.cloud_stride if o is not None else 1)

    def _new_cloud_cache(self) -> None:
        """A fresh map cloud cache (engine thread: built from the engine; engine process: the node's copy of the
        keyframes' local clouds, updated with the ones that changed)."""
        self._cloud_cache = LiveCloudCache(*self._cloud_params())

    def _within_budget(self, request: dict[str, float]) -> tuple[dict[str, float], dict[str, float]]:
        """Split due map outputs into those to build now and those deferred: an output whose last
        build cost more than :data:`MAP_OUTPUT_CPU_SHARE` of the time since waits.

        The path grows with every frame (a PoseStamped each), the cloud with the map: without this
        bound a long run would spend a whole core rebuilding them, next to the engine.

        Returns:
            ``(now, deferred)``: ``{output name: header stamp}`` each.
        """
        now = time.monotonic()
        keep, deferred = {}, {}
        for name, stamp in request.items():
            last = self._map_last.get(name)
            if last is not None and now - last < self._map_cost.get(name, 0.0) / MAP_OUTPUT_CPU_SHARE:
                self._map_throttled[name] = self._map_throttled.get(name, 0) + 1
                deferred[name] = stamp
            else:
                keep[name] = stamp
        return keep, deferred

    def _budget_wait(self, deferred: dict[str, float]) -> float:
        """Seconds until the first deferred output fits in the budget again."""
        now = time.monotonic()
        return max(0.0, min(self._map_last.get(n, now) + self._map_cost.get(n, 0.0) / MAP_OUTPUT_CPU_SHARE - now
                            for n in deferred))

    def _account(self, name: str, seconds: float) -> None:
        self._map_cost[name] = seconds
        self._map_last[name] = time.monotonic()

    def _publish_map_outputs_remote(self, request: dict[str, float]) -> None:
        """Map publisher thread: path / keyframe markers / cloud from a snapshot of the engine process.

        ``request`` maps each due output to its header stamp. The messages are built here, off the
        per-frame path, and published only if no reset or map load happened meanwhile.
        """
        client = self._client
        if client is None or not client.alive() or not self._engine_ready:
            return
        epoch = self._epoch
        params = self._cloud_params()
        cache = self._cloud_cache
        if cache is None or (cache.voxel, cache.min_confidence, cache.stride) != params:
            self._new_cloud_cache()
            cache = self._cloud_cache
        # the cloud: only the keyframes whose local cloud changed since our copy travel (the engine process
        # computes them one keyframe at a time between frames); the world cloud is composed here
        data = client.map_data({"path": "path" in request, "markers": "markers" in request,
                                "cloud_parts": "cloud" in request, "cloud_params": params,
                                "cloud_known": cache.versions(), "cloud_generation": cache.generation},
                               timeout=self._settings.engine_command_timeout)
        if "error" in data:
            raise RuntimeError(data["error"])
        out = self._outputs
        cost = dict(data.get("cost") or {})  # seconds the engine process spent on each item
        if "cloud_parts" in data:
            parts = data["cloud_parts"]
            t0 = time.perf_counter()
            cache.merge(parts["generation"], parts["entries"], parts["ids"])
            data["cloud"] = cache.compose(parts["ids"], parts["poses"])
            cost["cloud"] = cost.get("cloud", 0.0) + time.perf_counter() - t0
        msgs = []
        for name, pub in (("path", self._path_pub), ("markers", self._markers_pub), ("cloud", self._cloud_pub)):
            if name not in data:
                continue
            t0 = time.perf_counter()
            if name == "path":
                stamps, T = data["path"]
                msg = self._path_builder.build(out, request["path"], stamps, T)
            elif name == "markers":
                ids, T_kf, camera, edges = data["markers"]
                msg = out.markers_msg(request["markers"], T_kf, camera, ids=ids, edges=edges)
            else:
                xyz, rgb = data["cloud"]
                msg = out.cloud_msg(request["cloud"], xyz, rgb)
            msgs.append((pub, msg))
            self._account(name, cost.get(name, 0.0) + time.perf_counter() - t0)
        with self._out_lock:
            if epoch != self._epoch:
                return  # a reset / map load happened meanwhile: this snapshot is outdated
            for pub, msg in msgs:
                pub.publish(msg)

    def _publish_map_outputs(self, engine: Any, request: dict[str, float]) -> None:
        """Map publisher thread, engine in a worker thread: path / keyframe markers / cloud.

        Each step (engine snapshot, message building) waits until the engine has finished the
        frame it is processing (its gate: the engine is live), so these slow outputs use the idle
        time between frames instead of competing with tracking for the interpreter lock.
        """
        out = self._outputs
        gate = engine.gate

        def step(fn: Any, *args: Any) -> tuple[Any, float]:  # (result, seconds of work, waits excluded)
            gate.wait_idle()
            t0 = time.perf_counter()
            return fn(*args), time.perf_counter() - t0

        if "path" in request:
            (stamps, T), c1 = step(engine.trajectory)
            msg, c2 = step(self._path_builder.build, out, request["path"], stamps, T, gate.wait_idle)
            self._path_pub.publish(msg)
            self._account("path", c1 + c2)
        if "markers" in request:
            (ids, _, T_kf), c1 = step(engine.keyframes)
            c2 = 0.0
            if len(ids):
                camera = engine.keyframe_map.get(ids[0]).camera
                edges = graph_edges(engine, ids)
                msg, c2 = step(lambda: out.markers_msg(request["markers"], T_kf, camera, ids=ids, edges=edges))
                self._markers_pub.publish(msg)
            self._account("markers", c1 + c2)
        cache = self._cloud_cache
        if "cloud" in request and cache is not None:
            (ids, poses), c1 = step(cache.refresh, engine, gate.wait_idle)  # one keyframe per step
            (xyz, rgb), c2 = step(cache.compose, ids, poses)
            msg, c3 = step(out.cloud_msg, request["cloud"], xyz, rgb)
            self._cloud_pub.publish(msg)
            self._account("cloud", c1 + c2 + c3)

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
        if self._process_mode:
            try:
                self._reset_process(wait=True)
            except EngineUnavailable as exc:
                response.success = False
                response.message = f"reset failed: {exc}"
                self.get_logger().error(response.message)
                return response
            self._set_status("initialising", "reset: waiting for the next frame")
            response.success = True
            response.message = "reset: map and trajectory cleared"
            self.get_logger().info(response.message)
            return response
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
        if self._process_mode:
            try:
                if self._client is None:
                    raise EngineUnavailable(self._config_error or "the engine process is not running")
                reply = self._client.command("save_map", {"path": path, "T_map_world": self._outputs.T_map_world},
                                             timeout=self._settings.engine_command_timeout)
                response.success = bool(reply.get("ok"))
                response.message = str(reply.get("message", ""))
            except EngineUnavailable as exc:
                response.success = False
                response.message = f"save_map failed: {exc}"
            self._log("info" if response.success else "error", response.message)
            return response
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
            self._map_last.clear()  # the new map is shown at once, whatever the budget says
            self._map_cv.notify()
        return n

    def _srv_load_map(self, request: Any, response: Any) -> Any:
        from recon_slam.maps import MapError, load_map

        path = self._map_path()
        if self._process_mode:
            def on_reply(reply: dict) -> None:  # in step with the results: outputs switch to the map here
                if reply.get("ok") and not reply.get("pending"):
                    self._apply_map_loaded(reply)

            try:
                if self._client is None:
                    raise EngineUnavailable(self._config_error or "the engine process is not running")
                reply = self._client.command("load_map", {"path": path}, timeout=self._settings.engine_command_timeout,
                                             on_reply=on_reply)
                response.success = bool(reply.get("ok"))
                response.message = str(reply.get("message", ""))
            except EngineUnavailable as exc:
                response.success = False
                response.message = f"load_map failed: {exc}"
            self._log("info" if response.success else "error", response.message)
            if response.success:
                self._set_status("initialising", "map loaded: relocalising")
            return response
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
        if self._process_mode:
            self._watch_engine_process(now)
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
        if problems and (not self._has_engine() or now - (self._proc_times[-1] if self._proc_times else 0) > 2.0):
            self._set_status("waiting_for_data" if c.processed == 0 else "not_tracking", "; ".join(problems))
        elif self._input_problem and (not self._proc_times or now - self._proc_times[-1] > 2.0):
            self._set_status(self._status.state, self._input_problem)

    _unmatched_at_check = 0
    _matched_at_check = 0

    def _has_engine(self) -> bool:
        return self._engine_ready if self._process_mode else self._engine is not None

    def _watch_engine_process(self, now: float) -> None:
        """Restart a crashed engine process when its back-off ran out; report one that stopped answering."""
        if self._restart_at is not None:
            if now >= self._restart_at and not self._stop.is_set():
                self._restart_engine()
            return
        client = self._client
        if client is None or not client.alive():
            return
        since = now - max(self._last_result, client.started_at)
        waiting = client.channel is not None and len(client.channel) > 0  # a frame waits, the engine does not take it
        if waiting and since > max(10.0, 2 * self._settings.no_data_timeout):
            text = (f"the engine process (pid {client.pid}) has not returned a frame for {since:.0f} s although "
                    f"frames arrive (last sent: {self._seq}): busy (relocalising in a large map?) or stuck")
            self._set_status("error", text)
            self._log_once(f"engine:silent:{int(self._last_result)}", "warning", text)

    def status(self) -> NodeStatus:
        """Current :class:`NodeStatus` (counters refreshed)."""
        st = self._status
        c = self._counters
        st.frames_received = c.received["image"]
        st.frames_processed = c.processed
        channel = self._client.channel if self._client is not None else None
        skipped = (channel.skipped if channel is not None else 0) if self._process_mode else self._slot.dropped
        stale = self._engine_stale if self._process_mode else c.stale
        st.frames_dropped = skipped + stale + self._dropped_engine_down
        times = list(self._proc_times)
        st.fps = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 and times[-1] > times[0] else 0.0
        if times and time.monotonic() - times[-1] > 3.0:
            st.fps = 0.0
        lat = np.array(self._latencies) * 1e3 if self._latencies else np.zeros(0)
        with self._sync_lock:
            sync_drops = dict(self._sync.drops)
        ages = np.array(self._pose_ages) * 1e3 if self._pose_ages else np.zeros(0)
        if self._process_mode:
            client = self._client
            if client is not None and client.alive():
                engine = f"process (pid {client.pid})"
            else:
                engine = f"process, not running: {self._engine_down or self._config_error or 'not started'}"
        else:
            engine = "thread"
        st.extra = {
            "mode": self._mode,
            "engine": engine,
            "engine_pid": str(self._client.pid if self._client is not None and self._client.alive() else ""),
            "engine_restarts": str(self._engine_restarts),
            "latency_p50_ms": f"{np.percentile(lat, 50):.1f}" if len(lat) else "nan",
            "latency_p90_ms": f"{np.percentile(lat, 90):.1f}" if len(lat) else "nan",
            "latency_max_ms": f"{lat.max():.1f}" if len(lat) else "nan",
            "pose_age_ms_p50": f"{np.percentile(ages, 50):.1f}" if len(ages) else "nan",
            "pose_age_ms_p90": f"{np.percentile(ages, 90):.1f}" if len(ages) else "nan",
            "pose_age_ms_max": f"{ages.max():.1f}" if len(ages) else "nan",
            "engine_ms_p50": f"{np.percentile(list(self._engine_ms), 50):.1f}" if self._engine_ms else "nan",
            "engine_ms_max": f"{max(self._engine_ms):.1f}" if self._engine_ms else "nan",
            "engine_total_ms_p50": (f"{np.percentile(list(self._engine_total_ms), 50):.1f}" if self._engine_total_ms
                                    else "nan"),
            "engine_total_ms_max": f"{max(self._engine_total_ms):.1f}" if self._engine_total_ms else "nan",
            "queue_wait_ms_p50": f"{np.percentile(list(self._wait_ms), 50):.1f}" if self._wait_ms else "nan",
            "queue_wait_ms_max": f"{max(self._wait_ms):.1f}" if self._wait_ms else "nan",
            **({f"{k}_ms_p50": f"{np.percentile(list(v), 50):.1f}" for k, v in self._stage_ms.items() if v}
               if self._process_mode else {}),
            "map_outputs_throttled": ", ".join(f"{k}={v}" for k, v in sorted(self._map_throttled.items())) or "none",
            "dropped_by_policy": str(skipped),
            "dropped_stale": str(stale),
            "dropped_engine_down": str(self._dropped_engine_down),
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
        """Stop the worker threads and the engine (process) (idempotent)."""
        self._stop.set()
        with self._map_cv:
            self._map_cv.notify_all()
        client, self._client = self._client, None
        if client is not None:
            client.stop(timeout=10.0)
        for t in (self._worker, self._map_thread):
            if t is not None and t.is_alive() and t is not threading.current_thread():
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
    process, or thread with ``engine_process:=false``), and on a small CPU a multi-threaded
    executor's extra Python threads compete for the interpreter lock.
    """
    from recon_slam.ros.spin import spin_node

    spin_node(SlamNode, args)


if __name__ == "__main__":
    main()
