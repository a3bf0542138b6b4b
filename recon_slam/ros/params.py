"""Parameters of the SLAM node, validated without rclpy.

The node declares two groups of ROS parameters:

* every field of the engine's :class:`~recon_slam.config.SlamConfig`, under its dotted
  name (``mode``, ``device``, ``tracking.huber_k``, ``predictor.width``, ...), and
* the node's own settings, :data:`NODE_PARAMETERS` (topics, synchronisation, frames, TF,
  map path, output rates, where the engine runs).

:func:`engine_config_from_params` and :func:`node_settings_from_params` turn plain
``{name: value}`` mappings into validated objects and raise
:class:`~recon_slam.config.ConfigError` naming the parameter and the fix, so the node, the
``recon-slam replay`` command and the tests share one validation. :func:`read_params_file`
reads a ROS 2 ``--params-file`` YAML (``/**: ros__parameters: ...``) or a plain engine
YAML into such a mapping.

This module never imports rclpy (the node module does).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from recon_slam.config import ConfigError, SlamConfig, load_config
from recon_slam.geometry.transforms import pose_from_quat
from recon_slam.io.ros_outputs import NODE_NAME, FrameNames, OutputPolicy

__all__ = [
    "NODE_PARAMETERS",
    "ARRAY_PARAMETERS",
    "READ_ONLY_PARAMETERS",
    "NodeSettings",
    "engine_parameter_defaults",
    "engine_config_from_params",
    "node_settings_from_params",
    "split_params",
    "read_params_file",
    "extrinsic_from_values",
]

#: the node's own parameters: name -> (default, description)
NODE_PARAMETERS: dict[str, tuple[Any, str]] = {
    "image_transport": ("raw", "colour/left (and right) images: 'raw' (sensor_msgs/Image on image) or "
                        "'compressed' (sensor_msgs/CompressedImage on image/compressed)"),
    "depth_transport": ("raw", "depth: 'raw' (16UC1 mm or 32FC1 m on depth) or 'compressedDepth' "
                        "(on depth/compressedDepth)"),
    "sync_tolerance": (0.02, "largest stamp difference (s) between image and depth / left and right"),
    "sync_queue_size": (10, "messages kept per input while waiting for their partner"),
    "input_qos_reliability": ("best_effort", "input subscriptions: 'best_effort' (matches every publisher; "
                              "sensor-data QoS) or 'reliable'"),
    "input_qos_depth": (5, "input subscription queue depth"),
    "map_frame": ("map", "global frame of pose, path, cloud and markers"),
    "odom_frame": ("odom", "odometry frame (REP-105)"),
    "base_frame": ("base_link", "robot body frame"),
    "camera_frame": ("", "camera optical frame; '' = the images' header.frame_id"),
    "publish_tf": (True, "publish map -> odom on /tf (needs tf2_msgs)"),
    "publish_odom_tf": (False, "also publish odom -> base_link from visual odometry (robots without other "
                        "odometry); when false odom -> base_link is looked up in /tf"),
    "use_tf_extrinsic": (True, "take base_link -> camera from /tf_static when it is there"),
    "extrinsic_wait": (2.0, "seconds to wait for base_link -> camera on /tf_static before falling back to "
                       "the extrinsic parameter (or to 'the camera is base_link')"),
    "stereo_baseline": (0.0, "stereo baseline (m) when the right camera_info has none; 0 = from camera_info"),
    "map_path": ("~/.ros/recon_slam/map", "folder of ~/save_map and ~/load_map"),
    "load_map_at_start": (False, "load map_path when the first frame arrives (localise in a saved map)"),
    "path_period": (0.2, "~/path at most this often (s of stream time)"),
    "markers_period": (1.0, "~/keyframes at most this often (s), when keyframes changed"),
    "cloud_period": (2.0, "~/map_cloud at most this often (s), when keyframes changed"),
    "cloud_voxel": (0.02, "voxel size (m) of ~/map_cloud"),
    "cloud_max_points": (200000, "~/map_cloud is subsampled to at most this many points"),
    "frustum_scale": (0.1, "depth (m) of the keyframe frustum markers"),
    "odom_jump_translation": (0.3, "a pose step larger than this (m) is a jump kept out of odom (goes into map -> odom)"),
    "odom_jump_rotation": (0.5, "a pose step larger than this (rad) is a jump kept out of odom"),
    "max_frame_age": (0.0, "drop a frame that waited longer than this (s) for the engine; 0 = never "
                      "(only the newest frame is ever kept waiting)"),
    "no_data_timeout": (5.0, "warn when no input arrives for this long (s)"),
    "engine_process": (True, "run the engine in a process of its own (fed the newest frame through shared memory; "
                       "the node and the engine do not share Python's interpreter lock); false = in a thread of "
                       "the node (one process, for debugging and profiling); read-only"),
    "engine_command_timeout": (30.0, "seconds to wait for the engine process to answer a service (reset, save_map, "
                               "load_map) or a map snapshot before reporting it busy or stuck"),
    "diagnostics_period": (1.0, "/diagnostics period (s)"),
}

#: array parameters without a default: name -> description
ARRAY_PARAMETERS: dict[str, str] = {
    "extrinsic": "T_base_cam of the camera optical frame in base_frame: [x, y, z, qx, qy, qz, qw] or "
                 "[x, y, z, roll, pitch, yaw] (m, rad); unset = from TF, else the camera is base_link",
}

#: parameters fixed at start-up (they choose subscriptions); change them with a restart
READ_ONLY_PARAMETERS = ("mode", "image_transport", "depth_transport", "input_qos_reliability", "input_qos_depth",
                        "engine_process")

_CHOICES = {
    "image_transport": ("raw", "compressed"),
    "depth_transport": ("raw", "compressedDepth"),
    "input_qos_reliability": ("best_effort", "reliable"),
}
_NON_NEGATIVE = ("sync_tolerance", "extrinsic_wait", "stereo_baseline", "max_frame_age", "cloud_voxel",
                 "odom_jump_translation", "odom_jump_rotation")
_POSITIVE = ("sync_queue_size", "input_qos_depth", "path_period", "markers_period", "cloud_period",
             "cloud_max_points", "frustum_scale", "no_data_timeout", "diagnostics_period", "engine_command_timeout")

MONO_MESSAGE = (
    "mode 'mono' needs the MASt3R network weights: set the parameter mono.checkpoint to the released "
    "MASt3R_ViTLarge_BaseDecoder_512_catmlpdpt_metric.pth (CC BY-NC-SA 4.0, non-commercial; you obtain it "
    "yourself, nothing is downloaded), or use mode 'rgbd' (RGB-D camera) or 'stereo' (rectified stereo pair)"
)


@dataclass
class NodeSettings:
    """Validated node settings (see :data:`NODE_PARAMETERS` for the meaning of each)."""

    image_transport: str = "raw"
    depth_transport: str = "raw"
    sync_tolerance: float = 0.02
    sync_queue_size: int = 10
    input_qos_reliability: str = "best_effort"
    input_qos_depth: int = 5
    frames: FrameNames = None  # type: ignore[assignment]
    camera_frame: str = ""
    publish_tf: bool = True
    publish_odom_tf: bool = False
    use_tf_extrinsic: bool = True
    extrinsic_wait: float = 2.0
    #: (4, 4) T_base_cam from the ``extrinsic`` parameter, or None when unset
    extrinsic: Optional[np.ndarray] = None
    stereo_baseline: float = 0.0
    map_path: str = "~/.ros/recon_slam/map"
    load_map_at_start: bool = False
    policy: OutputPolicy = None  # type: ignore[assignment]
    max_frame_age: float = 0.0
    no_data_timeout: float = 5.0
    diagnostics_period: float = 1.0
    #: engine in its own process (True) or in a worker thread of the node (False)
    engine_process: bool = True
    engine_command_timeout: float = 30.0

    def __post_init__(self) -> None:
        if self.frames is None:
            self.frames = FrameNames()
        if self.policy is None:
            self.policy = OutputPolicy()


def engine_parameter_defaults() -> dict[str, Any]:
    """Dotted engine parameter names -> default values (``SlamConfig().flatten()``)."""
    return SlamConfig().flatten()


def split_params(values: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """Split flat parameters into (engine, node, unknown names)."""
    engine_keys = set(engine_parameter_defaults())
    node_keys = set(NODE_PARAMETERS) | set(ARRAY_PARAMETERS)
    engine, node, unknown = {}, {}, []
    for k, v in values.items():
        if k in engine_keys:
            engine[k] = v
        elif k in node_keys:
            node[k] = v
        elif k not in ("use_sim_time", "start_type_description_service") and not k.startswith("qos_overrides."):
            unknown.append(k)
    return engine, node, unknown


def engine_config_from_params(values: Mapping[str, Any]) -> SlamConfig:
    """Engine configuration from dotted parameters (missing ones keep their defaults).

    Raises:
        ConfigError: unknown mode (with the 'mono' explanation), wrong type or invalid value;
            the message names the parameter.
    """
    values = {k: v for k, v in values.items() if v is not None}
    mode = values.get("mode", "rgbd")
    if mode == "mono" and not values.get("mono.checkpoint"):
        raise ConfigError(f"parameter 'mode': {MONO_MESSAGE}")
    if mode == "mono":
        from pathlib import Path

        if not Path(str(values["mono.checkpoint"])).expanduser().is_file():
            raise ConfigError(f"parameter 'mono.checkpoint': {values['mono.checkpoint']} is not a file. {MONO_MESSAGE}")
    try:
        return load_config(values)
    except ConfigError as exc:
        raise ConfigError(f"parameter error: {exc}".replace("config key", "parameter")) from None


def extrinsic_from_values(values: Any) -> Optional[np.ndarray]:
    """``[x, y, z, qx, qy, qz, qw]`` or ``[x, y, z, roll, pitch, yaw]`` -> (4, 4) ``T_base_cam``; None when empty.

    Raises:
        ConfigError: wrong length, non-finite values or a zero quaternion.
    """
    if values is None:
        return None
    v = [float(x) for x in values]
    if not v:
        return None
    if not all(math.isfinite(x) for x in v):
        raise ConfigError("parameter 'extrinsic' has non-finite values")
    if len(v) == 7:
        q = np.asarray(v[3:], dtype=np.float64)
        n = np.linalg.norm(q)
        if n < 1e-9:
            raise ConfigError("parameter 'extrinsic': the quaternion [qx, qy, qz, qw] is zero")
        return pose_from_quat(np.asarray(v[:3]), q / n)
    if len(v) == 6:
        from scipy.spatial.transform import Rotation

        T = np.eye(4)
        T[:3, :3] = Rotation.from_euler("xyz", v[3:]).as_matrix()
        T[:3, 3] = v[:3]
        return T
    raise ConfigError(
        f"parameter 'extrinsic' needs 7 values [x, y, z, qx, qy, qz, qw] or 6 [x, y, z, roll, pitch, yaw], got {len(v)}"
    )


def typed_value(name: str, value: Any, default: Any) -> Any:
    """``value`` of parameter ``name`` checked against the type of its ``default``.

    Integers are accepted for float parameters (and made floats, finite only); bools are
    never taken for numbers. Raises :class:`ConfigError` naming the parameter.
    """
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = float(value)
            if not math.isfinite(value):
                raise ConfigError(f"parameter {name!r} must be finite, got {value}")
            return value
    elif isinstance(default, str):
        if isinstance(value, str):
            return value
    raise ConfigError(f"parameter {name!r} expects {type(default).__name__}, got {type(value).__name__} ({value!r})")


def checked_values(values: Mapping[str, Any], parameters: Mapping[str, tuple], choices: Mapping[str, Sequence[str]],
                   non_negative: Sequence[str], positive: Sequence[str]) -> dict[str, Any]:
    """Parameter values over their defaults, type-, choice- and range-checked (every node).

    Args:
        values: ``{name: value}`` given (None and unknown names are ignored).
        parameters: ``{name: (default, description)}``; choices: ``{name: allowed values}``;
        non_negative, positive: names that must be >= 0 / > 0.

    Raises:
        ConfigError: naming the parameter.
    """
    v = {name: default for name, (default, _) in parameters.items()}
    for name, value in values.items():
        if name in parameters and value is not None:
            v[name] = typed_value(name, value, parameters[name][0])
    for name, allowed in choices.items():
        if v[name] not in allowed:
            raise ConfigError(f"parameter {name!r}: {v[name]!r} is not one of {', '.join(allowed)}")
    for name in non_negative:
        if v[name] < 0:
            raise ConfigError(f"parameter {name!r} must be >= 0 (got {v[name]!r})")
    for name in positive:
        if not v[name] > 0:
            raise ConfigError(f"parameter {name!r} must be > 0 (got {v[name]!r})")
    return v


def node_settings_from_params(values: Mapping[str, Any]) -> NodeSettings:
    """Node settings from parameters (missing ones keep :data:`NODE_PARAMETERS` defaults).

    Raises:
        ConfigError: unknown choice, wrong type or out-of-range value (names the parameter).
    """
    v = checked_values(values, NODE_PARAMETERS, _CHOICES, _NON_NEGATIVE, _POSITIVE)
    frames = FrameNames(
        map=v["map_frame"].strip("/"), odom=v["odom_frame"].strip("/"), base=v["base_frame"].strip("/"),
        camera=v["camera_frame"].strip("/") or "camera_optical_frame",
    )
    for key, name in (("map_frame", frames.map), ("odom_frame", frames.odom), ("base_frame", frames.base)):
        if not name:
            raise ConfigError(f"parameter {key!r} must not be empty")
    if len({frames.map, frames.odom, frames.base}) != 3:
        raise ConfigError(
            f"parameters map_frame, odom_frame and base_frame must differ (got {frames.map!r}, {frames.odom!r}, "
            f"{frames.base!r})"
        )
    policy = OutputPolicy(
        path_period_s=v["path_period"],
        markers_period_s=v["markers_period"],
        cloud_period_s=v["cloud_period"],
        cloud_voxel_m=v["cloud_voxel"],
        cloud_max_points=v["cloud_max_points"],
        frustum_scale_m=v["frustum_scale"],
        odom_jump_m=v["odom_jump_translation"],
        odom_jump_rad=v["odom_jump_rotation"],
    )
    return NodeSettings(
        image_transport=v["image_transport"],
        depth_transport=v["depth_transport"],
        sync_tolerance=v["sync_tolerance"],
        sync_queue_size=v["sync_queue_size"],
        input_qos_reliability=v["input_qos_reliability"],
        input_qos_depth=v["input_qos_depth"],
        frames=frames,
        camera_frame=v["camera_frame"].strip("/"),
        publish_tf=v["publish_tf"],
        publish_odom_tf=v["publish_odom_tf"],
        use_tf_extrinsic=v["use_tf_extrinsic"],
        extrinsic_wait=v["extrinsic_wait"],
        extrinsic=extrinsic_from_values(values.get("extrinsic")),
        stereo_baseline=v["stereo_baseline"],
        map_path=v["map_path"],
        load_map_at_start=v["load_map_at_start"],
        policy=policy,
        max_frame_age=v["max_frame_age"],
        no_data_timeout=v["no_data_timeout"],
        diagnostics_period=v["diagnostics_period"],
        engine_process=v["engine_process"],
        engine_command_timeout=v["engine_command_timeout"],
    )


def _flatten(prefix: str, data: Any, out: dict[str, Any]) -> None:
    if isinstance(data, Mapping):
        for k, val in data.items():
            _flatten(f"{prefix}{k}.", val, out)
    else:
        out[prefix[:-1]] = data


def read_params_file(path: str | Path, node_name: str = NODE_NAME) -> dict[str, Any]:
    """Flat ``{dotted name: value}`` from a ROS 2 params YAML or a plain engine YAML.

    A ROS 2 file (``/**:`` / ``<node>:`` / ``/<node>:`` sections with ``ros__parameters``)
    contributes the sections matching every node (``/**``) and ``node_name``, in file order;
    any other YAML mapping is read as nested parameters directly.

    Raises:
        ConfigError: missing file, invalid YAML, not a mapping.
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"parameter file {path} not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: expected a mapping of parameters")
    out: dict[str, Any] = {}
    ros_sections = [k for k, v in data.items() if isinstance(v, Mapping) and "ros__parameters" in v]
    if ros_sections:
        for key in ros_sections:
            name = str(key).strip("/")
            if name in ("**", node_name) or name.endswith("/" + node_name):
                _flatten("", data[key]["ros__parameters"], out)
    else:
        _flatten("", data, out)
    return out
