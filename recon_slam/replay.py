"""Offline replay of a bag through the engine, writing the node's outputs into a new bag.

``recon-slam replay IN_BAG --out OUT_BAG [--config YAML]`` runs the engine as fast as
possible on the bag's camera topics (read by :class:`~recon_slam.io.bag_reader.BagSource`,
exactly as ``recon-slam run`` reads them) and writes what the ROS node would publish, built
by the same :class:`~recon_slam.io.ros_outputs.RosOutputs`:

* ``/recon_slam/odometry`` (nav_msgs/Odometry, odom -> base_link), ``/recon_slam/pose``
  (PoseStamped, map), ``/recon_slam/path`` (Path, map, corrected), ``/recon_slam/map_cloud``
  (PointCloud2 x y z rgb, map), ``/recon_slam/keyframes`` (MarkerArray), ``/diagnostics``;
* ``/tf``: ``map -> odom`` and ``odom -> base_link`` at every frame stamp (replay plays the
  role of a robot without other odometry, i.e. the node with ``publish_odom_tf:=true``);
* ``/tf_static``: ``base_link -> camera``: the bag's own static transforms when they hold
  that extrinsic, else the one from the parameters / the default (camera is base_link).

Message receive times are the image stamps, so ``ros2 bag play OUT_BAG --clock`` replays
them at the camera's rate. Path, markers and cloud follow the node's schedule (in stream
time) and are written once more at the end with the final, optimised poses.

No rclpy is needed (messages are built with rosbags).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np

from recon_slam.config import SlamConfig, load_config
from recon_slam.errors import InputError
from recon_slam.io.ros_outputs import NODE_NAME, MapCloudCache, NodeStatus, RosOutputs, graph_edges, output_topics
from recon_slam.io.tf_buffer import TfBuffer, TfLookupError

__all__ = ["replay_bag", "add_replay_parser", "cmd_replay", "resolve_replay_config"]


def resolve_replay_config(
    config: SlamConfig | Mapping[str, Any] | str | Path | None,
    node_params: Optional[Mapping[str, Any]] = None,
) -> tuple[SlamConfig, Any]:
    """(engine config, node settings) from a config object, mapping or YAML file.

    The YAML may be an engine configuration (``config/*.yaml`` of ``recon-slam run``) or a
    ROS 2 parameter file of the node (``/**: ros__parameters: ...``); node parameters in it
    (frames, extrinsic, output rates) apply too. ``node_params`` overrides them.
    """
    from recon_slam.ros.params import (
        engine_config_from_params,
        node_settings_from_params,
        read_params_file,
        split_params,
    )

    node: dict[str, Any] = {}
    if config is None:
        cfg = load_config()
    elif isinstance(config, SlamConfig):
        cfg = load_config(config)
    elif isinstance(config, (str, Path)):
        flat = read_params_file(config)
        engine, node, unknown = split_params(flat)
        if unknown:
            from recon_slam.config import ConfigError

            raise ConfigError(f"{config}: unknown parameter(s) {', '.join(sorted(unknown))}")
        cfg = engine_config_from_params(engine)
    else:
        engine, node, unknown = split_params(dict(config))
        if unknown:  # nested mappings: let load_config name the key
            cfg = load_config(config)
        else:
            cfg = engine_config_from_params(engine)
    node.update(node_params or {})
    return cfg, node_settings_from_params(node)


def _read_static_tf(source: Any) -> TfBuffer:
    """Every ``/tf_static`` transform of the bag of ``source`` (a BagSource), in a :class:`TfBuffer`."""
    buf = TfBuffer()
    try:
        with source._open_reader() as reader:  # noqa: SLF001 - same package
            conns = [c for c in reader.connections if c.topic.rstrip("/").endswith("tf_static")]
            if conns:
                for conn, _, raw in reader.messages(connections=conns):
                    buf.add_message(reader.deserialize(raw, conn.msgtype), static=True)
    except Exception:  # noqa: BLE001 - a bag without usable static TF is a normal case
        pass
    return buf


def replay_bag(
    in_bag: str | Path,
    out_bag: str | Path,
    config: SlamConfig | Mapping[str, Any] | str | Path | None = None,
    storage: str = "mcap",
    progress: bool = True,
    *,
    distro: str = "humble",
    node_params: Optional[Mapping[str, Any]] = None,
    publish_odom_tf: bool = True,
    overwrite: bool = False,
    **source_kwargs: Any,
) -> dict[str, Any]:
    """Run the engine on ``in_bag`` and write the node's output topics to ``out_bag``.

    Args:
        in_bag: rosbag2 folder or file (sqlite3 / MCAP) with image (+ depth | right image)
            and camera_info topics.
        out_bag: new bag folder (written atomically by :class:`BagWriter`).
        config: engine config (object, mapping, engine YAML or node parameter YAML).
        storage: 'mcap' (default) or 'sqlite3'.
        progress: show a progress bar.
        distro: message definitions / metadata version of the output ('humble' or 'jazzy').
        node_params: node parameters (frame names, ``extrinsic``, output periods, ...).
        publish_odom_tf: write ``odom -> base_link`` (visual odometry) on ``/tf``.
        overwrite: replace an existing ``out_bag``.
        **source_kwargs: passed to :class:`~recon_slam.io.bag_reader.BagSource`
            (``image_topic``, ``depth_topic``, ``max_frames``, ``tolerance``, ...).

    Returns:
        Summary: ``n_frames``, ``n_keyframes``, ``states`` (count per state), ``fps``,
        ``topics`` (messages written per topic), ``out_bag``, ``extrinsic``; and, under
        private keys, ``_stamps`` (N,) and ``_T_world_cam`` (N, 4, 4) (final trajectory),
        ``_T_map_world`` (4, 4).
    """
    from tqdm import tqdm

    from recon_slam.io.bag_reader import BagSource
    from recon_slam.io.bag_writer import BagWriter
    from recon_slam.io.messages import sec_to_ns
    from recon_slam.system import SlamSystem

    cfg, settings = resolve_replay_config(config, node_params)
    source_kwargs.setdefault("tolerance", settings.sync_tolerance)
    if cfg.mode == "stereo":
        source_kwargs.setdefault("depth_topic", "")
    else:
        source_kwargs.setdefault("right_image_topic", "")
    source = BagSource(in_bag, **source_kwargs)
    if cfg.mode == "rgbd" and not source.has_depth:
        raise InputError(f"{in_bag} has no depth topic: give --depth-topic, or use a stereo config for a stereo bag")
    if cfg.mode == "stereo" and not source.has_stereo:
        raise InputError(f"{in_bag} has no right image topic: give --right-image-topic, or use an RGB-D config")

    msgtype = output_topics(NODE_NAME)
    prefix = f"/{NODE_NAME}/"
    topic = {name: prefix + name for name in ("odometry", "pose", "path", "map_cloud", "keyframes")}
    topic.update(diagnostics="/diagnostics", tf="/tf", tf_static="/tf_static")

    system = SlamSystem(cfg, source.camera)
    cloud_cache = MapCloudCache(settings.policy.cloud_voxel_m, cfg.output.cloud_min_confidence, cfg.output.cloud_stride)
    states: dict[str, int] = {}
    n = 0
    t0 = time.perf_counter()
    extrinsic_source = ""
    last_stamp = 0.0
    diag_next = -math.inf
    writer = BagWriter(out_bag, storage=storage, distro=distro, overwrite=overwrite)
    try:
        with writer as bag:
            outputs = RosOutputs(bag.types, settings.frames, None, settings.policy, publish_odom_tf)

            def write(name: str, msg: Any, stamp: float) -> None:
                bag.write(topic[name], msgtype[topic[name]], msg, sec_to_ns(stamp))

            def status(state: str, reason: str = "") -> NodeStatus:
                elapsed = time.perf_counter() - t0
                return NodeStatus(state=state, reason=reason, fps=n / elapsed if elapsed > 0 else 0.0,
                                  n_keyframes=system.num_keyframes, frames_received=n, frames_processed=n,
                                  extra={"mode": cfg.mode, "extrinsic": extrinsic_source, "source": "recon-slam replay"})

            def map_outputs(stamp: float, force: bool = False) -> None:
                n_kf = system.num_keyframes
                if outputs.due("path", stamp, n_kf, force=force):
                    stamps, T = system.trajectory()
                    write("path", outputs.path_msg(stamp, stamps, T), stamp)
                if outputs.due("markers", stamp, n_kf, force=force) and n_kf:
                    ids, _, T_kf = system.keyframes()
                    camera = system.keyframe_map.get(ids[0]).camera
                    edges = graph_edges(system, ids)
                    write("keyframes", outputs.markers_msg(stamp, T_kf, camera, ids=ids, edges=edges), stamp)
                if outputs.due("cloud", stamp, n_kf, force=force) and n_kf:
                    xyz, rgb = cloud_cache.cloud(system)
                    write("map_cloud", outputs.cloud_msg(stamp, xyz, rgb), stamp)

            bar = tqdm(total=len(source), disable=not progress, unit="frame", desc="replay", dynamic_ncols=True)
            try:
                for frame in source:
                    stamp = float(frame.stamp)
                    if n == 0:
                        cam_frame = settings.camera_frame or frame.frame_id
                        outputs.frames.camera = cam_frame
                        statics = None
                        if settings.frames.base == cam_frame:
                            outputs.set_extrinsic(np.eye(4))
                            extrinsic_source = "identity (camera frame is the base frame)"
                        else:
                            tf = _read_static_tf(source) if settings.use_tf_extrinsic else TfBuffer()
                            try:
                                outputs.set_extrinsic(tf.lookup(settings.frames.base, cam_frame, static_only=True))
                                extrinsic_source = "tf"
                                statics = tf
                            except TfLookupError:
                                if settings.extrinsic is not None:
                                    outputs.set_extrinsic(settings.extrinsic)
                                    extrinsic_source = "parameter"
                                else:
                                    extrinsic_source = "default (camera is base_link)"
                        if statics is not None:
                            # the bag's own chain base -> ... -> camera, re-written at our start
                            msgs = _static_chain(bag.types, statics, settings.frames.base, cam_frame, stamp)
                        else:
                            msgs = outputs.static_transforms(stamp, cam_frame)
                        if msgs:
                            write("tf_static", outputs.tf_message(msgs), stamp)
                    result = system.process(frame)
                    n += 1
                    states[result.state] = states.get(result.state, 0) + 1
                    outs = outputs.frame_outputs(stamp, result.T_world_cam, result.state)
                    if outs.odometry is not None:
                        write("odometry", outs.odometry, stamp)
                    if outs.pose is not None:
                        write("pose", outs.pose, stamp)
                    if outs.transforms:
                        write("tf", outputs.tf_message(outs.transforms), stamp)
                    map_outputs(stamp)
                    if stamp >= diag_next:
                        write("diagnostics", outputs.diagnostics_msg(stamp, status(result.state, result.reason)), stamp)
                        diag_next = stamp + settings.diagnostics_period
                    last_stamp = stamp
                    bar.update(1)
                    if n % 10 == 0:
                        bar.set_postfix(state=result.state, kf=system.num_keyframes, refresh=False)
            finally:
                bar.close()
            if n == 0:
                raise InputError(f"{in_bag}: no synchronised frames to replay")
            tracking_s = time.perf_counter() - t0
            system.finish()
            end = last_stamp + 1e-3
            map_outputs(end, force=True)
            write("diagnostics", outputs.diagnostics_msg(end, status("finished")), end)
            counts = dict(bag.counts)
            stamps, T_world_cam = system.trajectory()
            T_map_world = outputs.T_map_world.copy()
    finally:
        system.close()
    return {
        "in_bag": str(in_bag),
        "out_bag": str(out_bag),
        "storage": storage,
        "mode": cfg.mode,
        "n_frames": n,
        "n_keyframes": int(len(system.keyframe_map)),
        "states": states,
        "fps": n / tracking_s if tracking_s > 0 else 0.0,
        "topics": counts,
        "extrinsic": extrinsic_source,
        "_stamps": stamps,
        "_T_world_cam": T_world_cam,
        "_T_map_world": T_map_world,
    }


def _static_chain(types: Any, tf: TfBuffer, base: str, camera: str, stamp: float) -> list:
    """TransformStamped messages of the static edges joining ``base`` and ``camera`` in ``tf``."""
    from recon_slam.io.messages import make_transform_stamped

    # walk from camera up to base through the buffer's parent links
    out = []
    child = camera
    seen = set()
    while child != base and child not in seen:
        seen.add(child)
        parent = tf._parent.get(child)  # noqa: SLF001 - same package
        if parent is None:
            break
        out.append(make_transform_stamped(types, tf.lookup(parent, child, static_only=True), stamp, parent, child))
        child = parent
    return out[::-1]


# ----------------------------------------------------------------------------- command line
def cmd_replay(args: argparse.Namespace) -> int:
    """``recon-slam replay``: run the engine on a bag and write the node's outputs to a new bag."""
    kwargs: dict[str, Any] = {}
    for name in ("image_topic", "depth_topic", "camera_info_topic", "right_image_topic", "max_frames"):
        value = getattr(args, name, None)
        if value is not None:
            kwargs[name] = value
    summary = replay_bag(
        args.in_bag, args.out, args.config, storage=args.storage, progress=not args.quiet,
        distro=args.distro, overwrite=args.overwrite, **kwargs,
    )
    topics = ", ".join(f"{t} ({c})" for t, c in sorted(summary["topics"].items()))
    print(
        f"replayed {summary['n_frames']} frames ({summary['mode']}, {summary['n_keyframes']} keyframes, "
        f"{summary['fps']:.1f} frames/s) -> {summary['out_bag']} ({summary['storage']})"
    )
    print(f"topics: {topics}")
    print(f"play it: ros2 bag play {summary['out_bag']} --clock   (RViz: rviz2 -d rviz/recon_slam.rviz)")
    return 0


def add_replay_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the ``replay`` sub-command on ``subparsers`` (``set_defaults(func=cmd_replay)``)."""
    p = subparsers.add_parser(
        "replay",
        help="run SLAM on a bag as fast as possible and write the ROS node's outputs into a new bag",
        description=(
            "Run the engine on the camera topics of IN_BAG and write odometry, pose, path, map cloud, keyframe "
            "markers, diagnostics and /tf (map -> odom -> base_link -> camera) into OUT_BAG, as the ROS node "
            "would publish them; play it with `ros2 bag play OUT_BAG --clock` into RViz, or open it in Foxglove."
        ),
    )
    p.add_argument("in_bag", type=Path, metavar="IN_BAG", help="input rosbag2 (folder, .mcap or .db3)")
    p.add_argument("--out", type=Path, required=True, metavar="OUT_BAG", help="output bag folder (must not exist)")
    p.add_argument("--config", type=Path, metavar="YAML",
                   help="engine configuration YAML or the node's ROS parameter file (config/*.yaml)")
    p.add_argument("--storage", choices=("mcap", "sqlite3"), default="mcap", help="output storage (default mcap)")
    p.add_argument("--distro", choices=("humble", "jazzy"), default="humble",
                   help="message definitions of the output (default humble; Jazzy reads it too)")
    p.add_argument("--image-topic", help="colour/left image topic (default: auto-detect)")
    p.add_argument("--depth-topic", help="depth topic (default: auto-detect)")
    p.add_argument("--camera-info-topic", help="CameraInfo topic (default: auto-detect)")
    p.add_argument("--right-image-topic", help="right image topic for stereo (default: auto-detect)")
    p.add_argument("--max-frames", type=int, help="stop after this many frames")
    p.add_argument("--overwrite", action="store_true", help="replace OUT_BAG if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_replay)
    return p
