"""Writing rosbag2 bags (MCAP or sqlite3) that ROS 2 Humble and Jazzy can play.

Compatibility decision
----------------------
``distro='humble'`` (the default) writes rosbag2 metadata **version 8** with the ROS 2
Humble message definitions; ``distro='jazzy'`` writes version 9 with the Jazzy ones.
Why 8 for Humble: rosbags can write versions 8 and 9 only. Version 9 (Jazzy) changed the
serialisation of ``offered_qos_profiles`` from one YAML *string* to a YAML *list* with
named enums, while Humble's metadata parser expects the string form; version 8 keeps the
string and only adds keys (``custom_data``, ``type_description_hash``, ``ros_distro``)
that Humble's parser does not look at. Jazzy reads both. (There is no Humble install
here: this follows the rosbag2 format history, not a playback test on Humble.)
The message definitions of every type written here are identical in Humble and Jazzy
(same RIHS01 hashes), so either store yields bags both can decode.

Storage: ``'mcap'`` (default; Iron and later record MCAP by default; on Humble playing it
needs ``ros-humble-rosbag2-storage-mcap``) or ``'sqlite3'`` (Humble's default, readable
everywhere without extra packages).

A bag is written into a hidden temporary sibling folder and renamed to its final name on
a clean close, so a crash or an exception never leaves a half-written bag under the final
name. ``/tf_static`` is offered with transient-local durability so that
``ros2 bag play`` latches it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from recon_slam import __version__
from recon_slam.errors import CalibrationError, InputError, StampError
from recon_slam.geometry.camera import PinholeCamera
from recon_slam.io.messages import (
    RosbagsTypes,
    make_camera_info,
    make_compressed_depth,
    make_compressed_image,
    make_frustum_markers,
    make_image,
    make_odometry,
    make_path,
    make_pointcloud2,
    make_pose_stamped,
    make_tf_message,
    make_transform_stamped,
    sec_to_ns,
)

#: rosbag2 metadata version per target distro (see the module docstring).
BAG_VERSIONS = {"humble": 8, "jazzy": 9}
STORAGES = ("mcap", "sqlite3")

#: Topic and frame names of :func:`write_source_to_bag` (read back by BagSource).
TOPIC_IMAGE = "/camera/image"
TOPIC_DEPTH = "/camera/depth"
TOPIC_CAMERA_INFO = "/camera/camera_info"
TOPIC_RIGHT_IMAGE = "/camera/right/image"
TOPIC_RIGHT_CAMERA_INFO = "/camera/right/camera_info"
FRAME_CAMERA = "camera_optical_frame"
FRAME_RIGHT_CAMERA = "camera_right_optical_frame"
GT_PARENT = "world"
GT_CHILD = "camera_gt"


def _qos_profiles(topic: str) -> list:
    """Offered QoS stored for ``topic``: transient local for /tf_static, none (player default) otherwise."""
    if topic != "/tf_static":
        return []
    from rosbags.interfaces import (
        Qos,
        QosDurability,
        QosHistory,
        QosLiveliness,
        QosReliability,
        QosTime,
    )

    zero = QosTime(0, 0)
    return [
        Qos(
            QosHistory.KEEP_LAST,
            1,
            QosReliability.RELIABLE,
            QosDurability.TRANSIENT_LOCAL,
            zero,
            zero,
            QosLiveliness.AUTOMATIC,
            zero,
            False,
        )
    ]


class BagWriter:
    """rosbag2 writer for our message types (context manager).

    Args:
        path: bag folder to create.
        storage: ``'mcap'`` or ``'sqlite3'``.
        distro: ``'humble'`` (metadata version 8, Humble types) or ``'jazzy'`` (version 9).
        overwrite: replace an existing bag at ``path`` (only when the new one is complete).

    Every ``write_*`` helper takes the header stamp as float seconds (or a Time-like
    object) and also uses it as the bag receive time. Messages are built with
    :attr:`types` (a :class:`RosbagsTypes`); :meth:`write` takes any such message.
    """

    def __init__(
        self,
        path: str | Path,
        storage: str = "mcap",
        distro: str = "humble",
        *,
        overwrite: bool = False,
    ) -> None:
        if storage not in STORAGES:
            raise InputError(f"bag storage {storage!r} is not supported: use one of {', '.join(STORAGES)}")
        if distro not in BAG_VERSIONS:
            raise InputError(f"ROS distro {distro!r} is not supported: use one of {', '.join(BAG_VERSIONS)}")
        self.path = Path(path)
        if self.path.suffix == ".bag":
            raise InputError(
                f"output {self.path} ends in '.bag', the ROS 1 bag suffix: rosbag2 bags are folders, "
                "choose a name without it"
            )
        if self.path.exists() and not overwrite:
            raise InputError(f"{self.path} exists already: choose another output path or pass --overwrite")
        self.storage = storage
        self.distro = distro
        self.overwrite = overwrite
        self.types = RosbagsTypes(distro=distro)
        self._writer: Any = None
        self._tmp_root: Optional[Path] = None
        self._connections: dict[str, Any] = {}
        #: messages written per topic
        self.counts: dict[str, int] = {}

    # ------------------------------------------------------------------ lifecycle
    def open(self) -> "BagWriter":
        """Create the temporary bag; called by ``with``."""
        from rosbags.rosbag2 import StoragePlugin, Writer

        if self._writer is not None:
            raise InputError(f"bag {self.path} is already open")
        parent = self.path.parent
        parent.mkdir(parents=True, exist_ok=True)
        self._tmp_root = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.partial-", dir=parent))
        plugin = StoragePlugin.MCAP if self.storage == "mcap" else StoragePlugin.SQLITE3
        try:
            self._writer = Writer(
                self._tmp_root / self.path.name, version=BAG_VERSIONS[self.distro], storage_plugin=plugin
            )
            # a non-empty map: some rosbag2 versions choke on 'custom_data: null'
            self._writer.set_custom_data("recon_slam.version", __version__)
            self._writer.set_custom_data("recon_slam.target_distro", self.distro)
            self._writer.open()
        except Exception as exc:
            self._cleanup()
            raise InputError(f"cannot create bag {self.path}: {exc}") from exc
        return self

    def close(self) -> Path:
        """Finish the bag and move it to its final path; returns that path."""
        if self._writer is None:
            raise InputError(f"bag {self.path} is not open")
        writer, self._writer = self._writer, None
        try:
            writer.close()
            if self.path.exists() or self.path.is_symlink():
                if not self.overwrite:
                    raise InputError(
                        f"{self.path} appeared while writing: the new bag is left out; choose another output path"
                    )
                if self.path.is_dir() and not self.path.is_symlink():
                    shutil.rmtree(self.path)
                else:
                    self.path.unlink()
            os.replace(self._tmp_root / self.path.name, self.path)
        finally:
            self._cleanup()
        return self.path

    def abort(self) -> None:
        """Discard the bag being written (nothing appears under the final path)."""
        writer, self._writer = self._writer, None
        if writer is not None:
            try:
                writer.abort() if hasattr(writer, "abort") else writer.close()
            except Exception:  # noqa: BLE001 - discarding anyway
                pass
        self._cleanup()

    def _cleanup(self) -> None:
        if self._tmp_root is not None:
            shutil.rmtree(self._tmp_root, ignore_errors=True)
            self._tmp_root = None

    def __enter__(self) -> "BagWriter":
        return self.open()

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            self.close()
        else:
            self.abort()
        return False

    # ------------------------------------------------------------------ raw write
    def write(self, topic: str, msgtype: str, msg: Any, stamp_ns: int) -> None:
        """Write one message (a :attr:`types` message of ``msgtype``) at receive time ``stamp_ns``."""
        if self._writer is None:
            raise InputError(f"bag {self.path} is not open: use 'with BagWriter(...) as bag:'")
        conn = self._connections.get(topic)
        if conn is None:
            conn = self._writer.add_connection(
                topic, msgtype, typestore=self.types.typestore, offered_qos_profiles=_qos_profiles(topic)
            )
            self._connections[topic] = conn
            self.counts[topic] = 0
        elif conn.msgtype != msgtype:
            raise InputError(f"topic {topic} already holds {conn.msgtype}; cannot also write {msgtype} to it")
        data = self.types.typestore.serialize_cdr(msg, msgtype)
        self._writer.write(conn, int(stamp_ns), data)
        self.counts[topic] += 1

    @staticmethod
    def _ns(stamp: Any) -> int:
        if hasattr(stamp, "sec"):
            return int(stamp.sec) * 1_000_000_000 + int(getattr(stamp, "nanosec", 0))
        return sec_to_ns(stamp)

    # ------------------------------------------------------------------ typed helpers
    def write_image(self, topic: str, image: np.ndarray, encoding: str, stamp: Any, frame_id: str) -> None:
        """Raw ``sensor_msgs/Image``: (H, W, 3) uint8 RGB for colour encodings, (H, W) metres for 16UC1/32FC1."""
        msg = make_image(self.types, image, encoding, stamp, frame_id)
        self.write(topic, "sensor_msgs/msg/Image", msg, self._ns(stamp))

    def write_compressed_image(
        self, topic: str, rgb: np.ndarray, stamp: Any, frame_id: str, *, fmt: str = "jpeg", quality: int = 90
    ) -> None:
        """``sensor_msgs/CompressedImage`` (JPEG/PNG) of (H, W, 3) uint8 RGB; topic usually ends in ``/compressed``."""
        msg = make_compressed_image(self.types, rgb, stamp, frame_id, fmt=fmt, quality=quality)
        self.write(topic, "sensor_msgs/msg/CompressedImage", msg, self._ns(stamp))

    def write_depth(self, topic: str, depth_m: np.ndarray, stamp: Any, frame_id: str, encoding: str = "32FC1") -> None:
        """Raw depth ``sensor_msgs/Image`` of (H, W) metres (32FC1 metres or 16UC1 millimetres)."""
        self.write_image(topic, depth_m, encoding, stamp, frame_id)

    def write_compressed_depth(
        self, topic: str, depth_m: np.ndarray, stamp: Any, frame_id: str, encoding: str = "16UC1"
    ) -> None:
        """``compressedDepth`` CompressedImage of (H, W) metres; topic usually ends in ``/compressedDepth``."""
        msg = make_compressed_depth(self.types, depth_m, stamp, frame_id, encoding=encoding)
        self.write(topic, "sensor_msgs/msg/CompressedImage", msg, self._ns(stamp))

    def write_camera_info(
        self, topic: str, camera: PinholeCamera, stamp: Any, frame_id: str, *, baseline_m: Optional[float] = None
    ) -> None:
        """``sensor_msgs/CameraInfo`` of ``camera`` (right camera of a stereo pair: ``baseline_m``)."""
        msg = make_camera_info(self.types, camera, stamp, frame_id, baseline_m=baseline_m)
        self.write(topic, "sensor_msgs/msg/CameraInfo", msg, self._ns(stamp))

    def write_tf(
        self, transforms: Sequence[tuple[np.ndarray, str, str]], stamp: Any, *, static: bool = False
    ) -> None:
        """One ``tf2_msgs/TFMessage`` on ``/tf`` (or ``/tf_static``) of ``(T_parent_child (4, 4), parent, child)``."""
        msg = make_tf_message(
            self.types, [make_transform_stamped(self.types, T, stamp, p, c) for T, p, c in transforms]
        )
        self.write("/tf_static" if static else "/tf", "tf2_msgs/msg/TFMessage", msg, self._ns(stamp))

    def write_odometry(
        self,
        topic: str,
        T_odom_base: np.ndarray,
        stamp: Any,
        odom_frame: str = "odom",
        child_frame: str = "base_link",
        twist: Optional[Sequence[float]] = None,
        covariance: Optional[np.ndarray] = None,
    ) -> None:
        """``nav_msgs/Odometry`` of (4, 4) ``T_odom_base`` (twist (6,) in the child frame)."""
        msg = make_odometry(self.types, T_odom_base, stamp, odom_frame, child_frame, twist, covariance)
        self.write(topic, "nav_msgs/msg/Odometry", msg, self._ns(stamp))

    def write_pose(self, topic: str, T: np.ndarray, stamp: Any, frame_id: str) -> None:
        """``geometry_msgs/PoseStamped`` of (4, 4) ``T_frame_body``."""
        msg = make_pose_stamped(self.types, T, stamp, frame_id)
        self.write(topic, "geometry_msgs/msg/PoseStamped", msg, self._ns(stamp))

    def write_path(self, topic: str, stamps: Sequence[float], T_map_cams: np.ndarray, frame_id: str) -> None:
        """``nav_msgs/Path`` of (N, 4, 4) poses at ``stamps`` (N,) s; written at the last stamp."""
        msg = make_path(self.types, stamps, T_map_cams, frame_id)
        self.write(topic, "nav_msgs/msg/Path", msg, self._ns(msg.header.stamp))

    def write_pointcloud(
        self, topic: str, xyz: np.ndarray, rgb: Optional[np.ndarray], stamp: Any, frame_id: str
    ) -> None:
        """``sensor_msgs/PointCloud2`` of points (N, 3) with colours (N, 3) uint8 (x y z rgb layout)."""
        msg = make_pointcloud2(self.types, xyz, rgb, stamp, frame_id)
        self.write(topic, "sensor_msgs/msg/PointCloud2", msg, self._ns(stamp))

    def write_markers(
        self,
        topic: str,
        T_map_cams: np.ndarray,
        camera: PinholeCamera,
        stamp: Any,
        frame_id: str,
        edges: Optional[Sequence[tuple[int, int]]] = None,
        **kwargs: Any,
    ) -> None:
        """``visualization_msgs/MarkerArray`` of keyframe frustums (see :func:`make_frustum_markers`)."""
        msg = make_frustum_markers(self.types, T_map_cams, camera, stamp, frame_id, edges, **kwargs)
        self.write(topic, "visualization_msgs/msg/MarkerArray", msg, self._ns(stamp))


def write_source_to_bag(
    source: Any,
    out_path: str | Path,
    *,
    storage: str = "mcap",
    compressed: bool = False,
    progress: bool = True,
    distro: str = "humble",
    overwrite: bool = False,
) -> Path:
    """Write a FrameSource (dataset reader, synthetic sequence, bag) to a rosbag2 bag.

    Topics (header stamps = frame stamps; frames ``camera_optical_frame`` and
    ``camera_right_optical_frame``):

    * ``/camera/image`` rgb8, or ``/camera/image/compressed`` JPEG when ``compressed``;
    * ``/camera/depth`` 32FC1 metres, or ``/camera/depth/compressedDepth`` (16UC1 PNG,
      lossless at 1 mm) when ``compressed``;
    * ``/camera/camera_info`` per frame;
    * stereo: ``/camera/right/image`` (or ``.../compressed``) and
      ``/camera/right/camera_info`` with ``P[0,3] = -fx * baseline``;
    * ground truth: ``/tf`` ``world -> camera_gt`` = ``T_world_cam``, from
      ``source.ground_truth()`` when it has one (all its poses, in stamp order between
      the frames), else from each frame's ``T_world_cam_gt``.

    Returns:
        The path of the finished bag.
    """
    from tqdm import tqdm

    gt = None
    if hasattr(source, "ground_truth"):
        gt = source.ground_truth()
    gt_stamps: np.ndarray = np.zeros(0)
    gt_poses: np.ndarray = np.zeros((0, 4, 4))
    if gt is not None:
        gt_stamps = np.asarray(gt[0], dtype=np.float64).reshape(-1)
        gt_poses = np.asarray(gt[1], dtype=np.float64).reshape(-1, 4, 4)
        order = np.argsort(gt_stamps, kind="stable")
        gt_stamps, gt_poses = gt_stamps[order], gt_poses[order]
    try:
        total = len(source)
    except TypeError:
        total = None

    image_topic = TOPIC_IMAGE + "/compressed" if compressed else TOPIC_IMAGE
    right_topic = TOPIC_RIGHT_IMAGE + "/compressed" if compressed else TOPIC_RIGHT_IMAGE
    depth_topic = TOPIC_DEPTH + "/compressedDepth" if compressed else TOPIC_DEPTH
    g = 0
    n_frames = 0
    last_stamp = -np.inf
    with BagWriter(out_path, storage=storage, distro=distro, overwrite=overwrite) as bag:
        bar = tqdm(total=total, disable=not progress, unit="frame", desc=f"writing {Path(out_path).name}")
        try:
            for frame in source:
                t = float(frame.stamp)
                if t <= last_stamp:
                    raise StampError(
                        f"frame {frame.index} has stamp {t} after {last_stamp}: stamps must increase "
                        "to make a playable bag"
                    )
                last_stamp = t
                while g < len(gt_stamps) and gt_stamps[g] <= t:
                    bag.write_tf([(gt_poses[g], GT_PARENT, GT_CHILD)], float(gt_stamps[g]))
                    g += 1
                if gt is None and frame.T_world_cam_gt is not None:
                    bag.write_tf([(frame.T_world_cam_gt, GT_PARENT, GT_CHILD)], t)
                bag.write_camera_info(TOPIC_CAMERA_INFO, frame.camera, t, FRAME_CAMERA)
                if compressed:
                    bag.write_compressed_image(image_topic, frame.image, t, FRAME_CAMERA)
                else:
                    bag.write_image(image_topic, frame.image, "rgb8", t, FRAME_CAMERA)
                if frame.depth is not None:
                    if compressed:
                        bag.write_compressed_depth(depth_topic, frame.depth, t, FRAME_CAMERA, encoding="16UC1")
                    else:
                        bag.write_depth(depth_topic, frame.depth, t, FRAME_CAMERA, encoding="32FC1")
                if frame.right_image is not None:
                    if not frame.baseline_m:
                        raise CalibrationError(
                            f"frame {frame.index} has a right image but no stereo baseline: the source must set "
                            "Frame.baseline_m"
                        )
                    bag.write_camera_info(
                        TOPIC_RIGHT_CAMERA_INFO, frame.camera, t, FRAME_RIGHT_CAMERA, baseline_m=frame.baseline_m
                    )
                    if compressed:
                        bag.write_compressed_image(right_topic, frame.right_image, t, FRAME_RIGHT_CAMERA)
                    else:
                        bag.write_image(right_topic, frame.right_image, "rgb8", t, FRAME_RIGHT_CAMERA)
                n_frames += 1
                bar.update(1)
            while g < len(gt_stamps):
                bag.write_tf([(gt_poses[g], GT_PARENT, GT_CHILD)], float(gt_stamps[g]))
                g += 1
        finally:
            bar.close()
        if n_frames == 0:
            raise InputError(f"source {getattr(source, 'name', source)!r} yielded no frames: nothing to write")
    return Path(out_path)


__all__ = [
    "BAG_VERSIONS",
    "STORAGES",
    "BagWriter",
    "write_source_to_bag",
    "TOPIC_IMAGE",
    "TOPIC_DEPTH",
    "TOPIC_CAMERA_INFO",
    "TOPIC_RIGHT_IMAGE",
    "TOPIC_RIGHT_CAMERA_INFO",
    "FRAME_CAMERA",
    "FRAME_RIGHT_CAMERA",
]
