"""Offline frames from ROS bags (rosbag2 sqlite3 / MCAP of Humble or Jazzy, and ROS 1 ``.bag``).

:class:`BagSource` is a FrameSource: it yields :class:`~recon_slam.io.frame.Frame` objects
built from a colour (or left) image topic, optionally a depth topic registered to it and
a right image topic of a rectified stereo pair, synchronised by header stamps with
:class:`~recon_slam.io.sync.StampSynchronizer`. Frames stream lazily: the bag is read
message by message, never held in memory. Ground truth comes from ``/tf`` (or
``/tf_static``) transforms ``gt_parent -> gt_child`` (``T_world_cam``).

Topic auto-detection (for topics not given):

1. our convention (what ``recon-slam convert`` writes): ``/camera/image``,
   ``/camera/depth``, ``/camera/camera_info``, ``/camera/right/image``,
   ``/camera/right/camera_info``, and their ``/compressed`` and ``/compressedDepth``
   variants;
2. otherwise by message type and name: image topics whose name contains ``depth`` are
   depth, ``right`` the right camera, and ``left``/``color``/``rgb`` are preferred for the
   main image; CameraInfo topics are paired with images by namespace.

Give a topic as ``''`` to switch that input off (e.g. ``depth_topic=''`` for monocular).
"""

from __future__ import annotations

import struct
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

import numpy as np

from recon_slam.errors import CalibrationError, EncodingError, InputError, ReconSlamError
from recon_slam.geometry.camera import PinholeCamera
from recon_slam.geometry.transforms import invert_pose
from recon_slam.io.frame import Frame
from recon_slam.io.messages import (
    camera_info_baseline,
    camera_info_to_camera,
    depth_msg_to_metres,
    image_msg_to_rgb,
    ns_to_sec,
    stamp_to_ns,
    transform_to_matrix,
)
from recon_slam.io.sync import StampSynchronizer

IMAGE_TYPE = "sensor_msgs/msg/Image"
COMPRESSED_IMAGE_TYPE = "sensor_msgs/msg/CompressedImage"
CAMERA_INFO_TYPE = "sensor_msgs/msg/CameraInfo"
TF_TYPES = ("tf2_msgs/msg/TFMessage", "tf/msg/tfMessage")  # ROS 2 / ROS 1
IMAGE_TYPES = (IMAGE_TYPE, COMPRESSED_IMAGE_TYPE)

#: Our own topic names (what :func:`recon_slam.io.bag_writer.write_source_to_bag` writes).
CONVENTION_TOPICS = {
    "image": ("/camera/image", "/camera/image/compressed"),
    "depth": ("/camera/depth", "/camera/depth/compressedDepth"),
    "camera_info": ("/camera/camera_info",),
    "right_image": ("/camera/right/image", "/camera/right/image/compressed"),
    "right_camera_info": ("/camera/right/camera_info",),
}

_ROLE_FLAGS = {
    "image": "--image-topic",
    "depth": "--depth-topic",
    "camera_info": "--camera-info-topic",
    "right_image": "--right-image-topic",
    "right_camera_info": "--right-camera-info-topic",
}
_ROLE_TYPES = {
    "image": IMAGE_TYPES,
    "depth": IMAGE_TYPES,
    "camera_info": (CAMERA_INFO_TYPE,),
    "right_image": IMAGE_TYPES,
    "right_camera_info": (CAMERA_INFO_TYPE,),
}

_SYNC_QUEUE = 100_000  # offline: queues hold (ordinal, stamp) pairs only


# --------------------------------------------------------------------------- topic detection

def _segments(topic: str) -> list[str]:
    return [p for p in topic.split("/") if p]


def _image_base(topic: str) -> str:
    """Topic without its image_transport suffix (``/a/image/compressed`` -> ``/a/image``)."""
    for suffix in ("/compressedDepth", "/compressed", "/theora", "/zstd"):
        if topic.endswith(suffix):
            return topic[: -len(suffix)]
    return topic


def _is_depth(topic: str) -> bool:
    return "depth" in topic.lower()


def _is_right(topic: str) -> bool:
    return "right" in topic.lower()


def _camera_info_for(image_topic: str, infos: list[str]) -> Optional[str]:
    """CameraInfo topic of ``image_topic``: ``<namespace>/camera_info``, else the closest namespace."""
    if not infos:
        return None
    base = _image_base(image_topic)
    ns = base.rsplit("/", 1)[0]
    if f"{ns}/camera_info" in infos:
        return f"{ns}/camera_info"
    pool = [
        i
        for i in infos
        if _is_depth(i) == _is_depth(image_topic) and _is_right(i) == _is_right(image_topic)
    ] or (infos if len(infos) == 1 else [])
    if not pool:
        return None
    seg = _segments(base)

    def common(i: str) -> int:
        n = 0
        for a, b in zip(_segments(i), seg):
            if a != b:
                break
            n += 1
        return n

    return max(sorted(pool), key=lambda i: (common(i), -len(i)))


def _rank_colour(topic: str, msgtype: str) -> tuple:
    low = topic.lower()
    score = 0
    if any(k in low for k in ("color", "colour", "rgb", "left")):
        score += 4
    if any(k in _segments(low) for k in ("ir", "infra", "infra1", "infra2", "mono")) or "infra" in low:
        score -= 3
    if msgtype == IMAGE_TYPE:
        score += 1
    return (-score, len(topic), topic)


def _rank_depth(topic: str, msgtype: str) -> tuple:
    low = topic.lower()
    score = 0
    if any(k in low for k in ("aligned", "registered")):
        score += 4
    if msgtype == IMAGE_TYPE:
        score += 1
    elif low.endswith("compresseddepth"):
        score += 0
    else:
        score -= 5  # e.g. a jpeg-compressed colourised depth view
    return (-score, len(topic), topic)


def detect_topics(topics: Mapping[str, str]) -> dict[str, Optional[str]]:
    """Guess the roles of the topics of a bag.

    Args:
        topics: topic name -> message type (``'sensor_msgs/msg/Image'`` ...).

    Returns:
        ``{'image', 'depth', 'camera_info', 'right_image', 'right_camera_info'}`` -> topic
        or None (see the module docstring for the rules).
    """
    roles: dict[str, Optional[str]] = dict.fromkeys(CONVENTION_TOPICS)

    def pick(role: str) -> Optional[str]:
        return next((t for t in CONVENTION_TOPICS[role] if topics.get(t) in _ROLE_TYPES[role]), None)

    if pick("image"):
        for role in CONVENTION_TOPICS:
            roles[role] = pick(role)
        if roles["camera_info"] is None:
            infos = [t for t, m in topics.items() if m == CAMERA_INFO_TYPE]
            roles["camera_info"] = _camera_info_for(roles["image"], infos)
        return roles

    images = [t for t, m in topics.items() if m in IMAGE_TYPES]
    infos = [t for t, m in topics.items() if m == CAMERA_INFO_TYPE]
    depth = [t for t in images if _is_depth(t)]
    right = [t for t in images if not _is_depth(t) and _is_right(t)]
    colour = [t for t in images if not _is_depth(t) and not _is_right(t)]
    if colour:
        roles["image"] = min(colour, key=lambda t: _rank_colour(t, topics[t]))
    if depth:
        roles["depth"] = min(depth, key=lambda t: _rank_depth(t, topics[t]))
    if right and roles["image"]:
        twin = roles["image"].replace("left", "right")
        roles["right_image"] = twin if twin in right else min(right, key=lambda t: _rank_colour(t, topics[t]))
    if roles["image"]:
        roles["camera_info"] = _camera_info_for(roles["image"], infos)
    if roles["right_image"]:
        roles["right_camera_info"] = _camera_info_for(roles["right_image"], infos)
    return roles


# --------------------------------------------------------------------------- raw stamps

def _raw_header_stamp_ns(raw: Any, ros2: bool) -> Optional[int]:
    """Header stamp (ns) of a serialised message whose first field is a ``std_msgs/Header``."""
    try:
        if ros2:  # CDR: 4-byte encapsulation (byte 1: 1 = little endian), then Time{int32, uint32}
            endian = "<" if raw[1] == 1 else ">"
            sec, nsec = struct.unpack_from(endian + "iI", raw, 4)
        else:  # ROS 1: uint32 seq, then time{uint32 sec, uint32 nsec}
            sec, nsec = struct.unpack_from("<II", raw, 4)
    except (struct.error, IndexError):
        return None
    ns = int(sec) * 1_000_000_000 + int(nsec)
    return ns if ns > 0 else None


def _default_typestore() -> Any:
    from rosbags.typesys import Stores, get_typestore

    return get_typestore(Stores.ROS2_HUMBLE)


# --------------------------------------------------------------------------- the source

class BagSource:
    """Frames from a ROS bag (a FrameSource).

    Args:
        path: rosbag2 folder (with ``metadata.yaml``), one of its ``.mcap``/``.db3`` files,
            or a ROS 1 ``.bag`` file.
        image_topic, depth_topic, camera_info_topic, right_image_topic,
        right_camera_info_topic: topics; None = auto-detect, ``''`` = do not use.
        calib: calibration YAML path or :class:`PinholeCamera`; overrides CameraInfo.
        tolerance: largest stamp difference (s) between synchronised messages, also used
            to match ground-truth transforms to frames.
        stride: keep every ``stride``-th synchronised frame.
        max_frames: stop after this many frames (after ``stride``).
        gt_parent, gt_child: TF frames of the ground truth ``T_gt_parent_gt_child``.
        undistort: remove lens distortion from monocular/RGB-D images (the yielded
            ``camera`` then has none); stereo and ``*rect*`` topics are taken as rectified
            and use the intrinsics of ``P``.
        baseline_m: stereo baseline when the right CameraInfo does not give one.

    Raises:
        InputError: bag missing/unreadable, topic missing (the message lists the topics).
        CalibrationError: no CameraInfo and no ``calib``; stereo baseline unknown.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        image_topic: Optional[str] = None,
        depth_topic: Optional[str] = None,
        camera_info_topic: Optional[str] = None,
        right_image_topic: Optional[str] = None,
        right_camera_info_topic: Optional[str] = None,
        calib: Any = None,
        tolerance: float = 0.02,
        stride: int = 1,
        max_frames: Optional[int] = None,
        gt_parent: str = "world",
        gt_child: str = "camera_gt",
        undistort: bool = True,
        baseline_m: Optional[float] = None,
    ) -> None:
        if stride < 1:
            raise InputError(f"stride must be >= 1, got {stride}")
        if max_frames is not None and max_frames < 0:
            raise InputError(f"max_frames must be >= 0, got {max_frames}")
        if tolerance < 0:
            raise InputError(f"tolerance must be >= 0 seconds, got {tolerance}")
        self.path = Path(path)
        self.tolerance = float(tolerance)
        self.stride = int(stride)
        self.max_frames = max_frames
        self.gt_parent = gt_parent.strip("/")
        self.gt_child = gt_child.strip("/")
        self._bag_path = self._resolve_path(self.path)
        self._index_cache: Optional[list[tuple[int, tuple[int, ...]]]] = None
        self._gt_cache: Any = ...
        self._gt_result: Any = ...
        #: synchronisation drop counts per reason of the last index pass
        self.sync_drops: dict[str, int] = {}

        given = {
            "image": image_topic,
            "depth": depth_topic,
            "camera_info": camera_info_topic,
            "right_image": right_image_topic,
            "right_camera_info": right_camera_info_topic,
        }
        self._first_cache: dict[str, Any] = {}
        with self._open_reader() as reader:
            self._ros2 = bool(reader.is2)
            self._topic_info = {
                name: (info.msgtype or "?", int(info.msgcount)) for name, info in reader.topics.items()
            }
            #: role -> topic actually used (None when absent)
            self.topics: dict[str, Optional[str]] = self._resolve_roles(given)
            # the first CameraInfo messages, read in the same opening of the bag
            wanted = [t for t in (self.topics["camera_info"], self.topics["right_camera_info"]) if t]
            for conn, _, raw in self._iter_raw(reader, wanted):
                if conn.topic not in self._first_cache:
                    self._first_cache[conn.topic] = self._deserialize(reader, raw, conn)
                if len(self._first_cache) == len(set(wanted)):
                    break
        roles = self.topics
        self._streams = [r for r in ("image", "depth", "right_image") if roles[r]]
        self._rectified = bool(roles["right_image"]) or "rect" in roles["image"].lower()

        self._camera_raw = self._load_camera(calib)
        self.baseline_m: Optional[float] = None
        if roles["right_image"]:
            self.baseline_m = self._load_baseline(baseline_m)
        self._maps = None
        self.camera: PinholeCamera = self._camera_raw
        if undistort and not self._rectified and self._camera_raw.has_distortion:
            map_x, map_y, self.camera = self._camera_raw.undistortion_maps()
            self._maps = (map_x, map_y)

    def _resolve_roles(self, given: dict[str, Optional[str]]) -> dict[str, Optional[str]]:
        """Topics per role from the explicit ones (checked) and auto-detection."""
        types = {name: t for name, (t, _) in self._topic_info.items()}
        infos = [t for t, m in types.items() if m == CAMERA_INFO_TYPE]
        for role, topic in given.items():
            if topic:
                self._check_topic(role, topic)
        auto = detect_topics(types)
        roles: dict[str, Optional[str]] = {}
        for role, topic in given.items():
            roles[role] = (topic or None) if topic is not None else auto[role]
        if given["image"] and given["camera_info"] is None:
            roles["camera_info"] = _camera_info_for(given["image"], infos)
        if given["right_image"] and given["right_camera_info"] is None:
            roles["right_camera_info"] = _camera_info_for(given["right_image"], infos)
        if not roles["right_image"]:
            roles["right_camera_info"] = None
        if roles["image"] is None:
            raise InputError(
                f"bag {self.path}: no image topic found (sensor_msgs/msg/Image or CompressedImage); "
                f"topics present: {self._topic_listing()}; give --image-topic"
            )
        for role in ("image", "depth", "right_image"):
            t = roles[role]
            if t and self._topic_info[t][1] == 0:
                raise InputError(
                    f"bag {self.path}: {role.replace('_', ' ')} topic {t} has no messages; "
                    f"topics present: {self._topic_listing()}"
                )
        return roles

    # ------------------------------------------------------------------ properties
    @property
    def name(self) -> str:
        """Name of the sequence: the bag folder (or file stem)."""
        return self.path.name if self.path.is_dir() else self.path.stem

    @property
    def has_depth(self) -> bool:
        """True when frames carry (H, W) float32 depth in metres."""
        return self.topics["depth"] is not None

    @property
    def has_stereo(self) -> bool:
        """True when frames carry a rectified right image and ``baseline_m``."""
        return self.topics["right_image"] is not None

    @property
    def has_ground_truth(self) -> bool:
        """True when ``/tf`` holds ``gt_parent -> gt_child`` transforms matching some frames."""
        return self.ground_truth() is not None

    def __len__(self) -> int:
        """Number of synchronised frames (after ``stride`` / ``max_frames``); may read the stamps once."""
        return len(self._index())

    def frame_stamps(self) -> np.ndarray:
        """(N,) float64 stamps (s) of the frames that iteration yields."""
        return np.array([ns_to_sec(ns) for ns, _ in self._index()], dtype=np.float64)

    # ------------------------------------------------------------------ reading
    @staticmethod
    def _resolve_path(path: Path) -> Path:
        if not path.exists():
            raise InputError(
                f"bag {path} not found: give a rosbag2 folder (with metadata.yaml), its .mcap/.db3 file, "
                "or a ROS 1 .bag file"
            )
        if path.is_file() and path.suffix in (".mcap", ".db3") and (path.parent / "metadata.yaml").is_file():
            return path.parent  # read every file of the bag, with its metadata
        if path.is_dir() and path.suffix == ".bag":
            raise InputError(
                f"bag folder {path} ends in '.bag', which rosbags takes for a ROS 1 bag: rename the folder"
            )
        if path.is_dir() and not (path / "metadata.yaml").is_file():
            raise InputError(f"{path} is a folder without metadata.yaml: it is not a rosbag2 bag")
        return path

    @contextmanager
    def _open_reader(self) -> Iterator[Any]:
        from rosbags.highlevel import AnyReader

        try:
            reader = AnyReader([self._bag_path], default_typestore=_default_typestore())
            reader.open()
        except ReconSlamError:
            raise
        except Exception as exc:  # rosbags, sqlite3, mcap, yaml and OS errors alike
            raise InputError(
                f"cannot read bag {self.path}: {exc or type(exc).__name__} "
                "(is it a complete rosbag2 folder or .bag file? a bag whose recording was killed may "
                "need 'ros2 bag reindex')"
            ) from exc
        try:
            yield reader
        finally:
            try:
                reader.close()
            except Exception:  # noqa: BLE001 - closing a broken reader must not hide the real error
                pass

    def _iter_raw(self, reader: Any, topics: list[str]) -> Iterator[tuple[Any, int, Any]]:
        conns = [c for c in reader.connections if c.topic in topics]
        if not conns:
            return
        it = reader.messages(connections=conns)
        while True:
            try:
                item = next(it)
            except StopIteration:
                return
            except ReconSlamError:
                raise
            except Exception as exc:
                raise InputError(
                    f"bag {self.path} is corrupt or truncated ({exc or type(exc).__name__}): "
                    "try 'ros2 bag reindex' or re-record it"
                ) from exc
            yield item

    def _deserialize(self, reader: Any, raw: Any, conn: Any) -> Any:
        try:
            return reader.deserialize(raw, conn.msgtype)
        except Exception as exc:
            raise InputError(
                f"bag {self.path}: cannot decode a {conn.msgtype} message on {conn.topic} ({exc})"
            ) from exc

    def _first_message(self, topic: str) -> Optional[Any]:
        if topic in self._first_cache:
            return self._first_cache[topic]
        with self._open_reader() as reader:
            for conn, _, raw in self._iter_raw(reader, [topic]):
                return self._deserialize(reader, raw, conn)
        return None

    def _topic_listing(self) -> str:
        if not self._topic_info:
            return "(none: the bag is empty)"
        return ", ".join(f"{n} [{t}, {c} msgs]" for n, (t, c) in sorted(self._topic_info.items()))

    def _check_topic(self, role: str, topic: str) -> None:
        what = role.replace("_", " ")
        if topic not in self._topic_info:
            raise InputError(
                f"{what} topic {topic} is not in bag {self.path}; topics present: {self._topic_listing()}; "
                f"give {_ROLE_FLAGS[role]} with one of them"
            )
        msgtype = self._topic_info[topic][0]
        if msgtype not in _ROLE_TYPES[role]:
            raise InputError(
                f"{what} topic {topic} has type {msgtype}, expected {' or '.join(_ROLE_TYPES[role])}; "
                f"topics present: {self._topic_listing()}"
            )

    # ------------------------------------------------------------------ calibration
    def _image_size(self) -> Optional[tuple[int, int]]:
        msg = self._first_message(self.topics["image"])
        if msg is None:
            return None
        if hasattr(msg, "width") and int(msg.width) > 0:
            return int(msg.width), int(msg.height)
        h, w = image_msg_to_rgb(msg).shape[:2]
        return w, h

    def _load_camera(self, calib: Any) -> PinholeCamera:
        if calib is not None:
            if isinstance(calib, PinholeCamera):
                return calib
            return PinholeCamera.from_yaml(calib)
        topic = self.topics["camera_info"]
        fix = "give --calib FILE (YAML with width, height, fx, fy, cx, cy[, distortion]) or --camera-info-topic"
        if topic is None:
            raise CalibrationError(
                f"bag {self.path} has no sensor_msgs/msg/CameraInfo topic for {self.topics['image']}: {fix}"
            )
        msg = self._first_message(topic)
        if msg is None:
            raise CalibrationError(f"camera info topic {topic} in bag {self.path} has no messages: {fix}")
        size = None
        if int(msg.width) <= 0 or int(msg.height) <= 0:
            size = self._image_size()
        try:
            return camera_info_to_camera(msg, use_projection=self._rectified, image_size=size)
        except (CalibrationError, EncodingError) as exc:
            raise type(exc)(f"camera info topic {topic}: {exc}") from None

    def _load_baseline(self, baseline_m: Optional[float]) -> float:
        topic = self.topics["right_camera_info"]
        baseline = None
        if topic:
            msg = self._first_message(topic)
            if msg is not None:
                baseline = camera_info_baseline(msg)
        if baseline is None:
            baseline = baseline_m
        if baseline is None:
            where = f"right camera info {topic} has P[0,3] = 0" if topic else "the bag has no right CameraInfo"
            raise CalibrationError(
                f"stereo baseline unknown for bag {self.path}: {where}; give baseline_m (--baseline METRES)"
            )
        if not np.isfinite(baseline) or baseline <= 0:
            raise CalibrationError(
                f"stereo baseline {baseline} m is invalid (the right camera must be at +x of the left); "
                "check the right CameraInfo P[0,3] = -fx * baseline or give baseline_m"
            )
        return float(baseline)

    # ------------------------------------------------------------------ synchronisation index
    def _index(self) -> list[tuple[int, tuple[int, ...]]]:
        """(reference stamp ns, per-stream message ordinal) of every frame to yield.

        One pass over the image/depth/right topics (header stamps only, nothing decoded)
        and the TF topics (ground truth), cached.
        """
        if self._index_cache is not None:
            return self._index_cache
        topics = [self.topics[r] for r in self._streams]
        tf_topics = [t for t in ("/tf", "/tf_static") if self._topic_info.get(t, ("",))[0] in TF_TYPES]
        stream_of = {t: i for i, t in enumerate(topics)}
        sync = StampSynchronizer(len(topics), self.tolerance, queue_size=_SYNC_QUEUE)
        counts = [0] * len(topics)
        matches = []
        gt_stamps: list[int] = []
        gt_poses: list[np.ndarray] = []
        with self._open_reader() as reader:
            for conn, t_log, raw in self._iter_raw(reader, topics + tf_topics):
                s = stream_of.get(conn.topic)
                if s is None:
                    self._collect_gt(self._deserialize(reader, raw, conn), gt_stamps, gt_poses)
                    continue
                ns = _raw_header_stamp_ns(raw, self._ros2) or int(t_log)
                matches.extend(sync.add(s, ns * 1e-9, (counts[s], ns)))
                counts[s] += 1
        matches.extend(sync.flush())
        self.sync_drops = dict(sync.drops)
        if gt_stamps:
            order = np.argsort(np.asarray(gt_stamps, dtype=np.int64), kind="stable")
            self._gt_cache = (np.asarray(gt_stamps, dtype=np.int64)[order], np.asarray(gt_poses)[order])
        else:
            self._gt_cache = None
        if counts[0] and not matches:
            raise InputError(
                f"bag {self.path}: no {' + '.join(topics)} messages have header stamps within "
                f"{self.tolerance} s of each other; raise the tolerance (--tolerance) or check the topics"
            )
        frames = [(m.items[0][1], tuple(it[0] for it in m.items)) for m in matches]
        frames = frames[:: self.stride]
        if self.max_frames is not None:
            frames = frames[: self.max_frames]
        self._index_cache = frames
        return frames

    # ------------------------------------------------------------------ ground truth
    def _collect_gt(self, msg: Any, stamps: list[int], poses: list[np.ndarray]) -> None:
        """Append the ``gt_parent -> gt_child`` transforms of one TFMessage (either direction)."""
        for tr in msg.transforms:
            parent = str(tr.header.frame_id).strip("/")
            child = str(tr.child_frame_id).strip("/")
            if parent == self.gt_parent and child == self.gt_child:
                T = transform_to_matrix(tr)
            elif parent == self.gt_child and child == self.gt_parent:
                T = invert_pose(transform_to_matrix(tr))
            else:
                continue
            stamps.append(stamp_to_ns(tr.header.stamp))
            poses.append(T)

    def _gt_samples(self) -> Optional[tuple[np.ndarray, np.ndarray]]:
        """Sorted ground-truth stamps (M,) ns and poses (M, 4, 4) of the bag, or None."""
        if self._gt_cache is ...:
            self._index()
        return self._gt_cache

    def _gt_for(self, ns: int) -> Optional[np.ndarray]:
        samples = self._gt_samples()
        if samples is None:
            return None
        stamps, poses = samples
        i = int(np.searchsorted(stamps, ns))
        best = None
        for j in (i - 1, i):
            if 0 <= j < len(stamps) and (best is None or abs(stamps[j] - ns) < abs(stamps[best] - ns)):
                best = j
        if best is None or abs(int(stamps[best]) - ns) > self.tolerance * 1e9:
            return None
        return poses[best].copy()

    def ground_truth(self) -> Optional[tuple[np.ndarray, np.ndarray]]:
        """Ground truth at the frames: ``(stamps (N,) s, T_world_cam (N, 4, 4))`` or None.

        Transforms ``gt_parent -> gt_child`` from ``/tf`` or ``/tf_static``, each frame
        taking the one nearest its stamp within ``tolerance``; frames without one are left
        out. None when the bag has no such transform near any frame.
        """
        if self._gt_result is not ...:
            return self._gt_result
        result = None
        if self._gt_samples() is not None:
            stamps, poses = [], []
            for ns, _ in self._index():
                T = self._gt_for(ns)
                if T is not None:
                    stamps.append(ns_to_sec(ns))
                    poses.append(T)
            if stamps:
                result = (np.asarray(stamps, dtype=np.float64), np.asarray(poses, dtype=np.float64))
        self._gt_result = result
        return result

    # ------------------------------------------------------------------ frames
    def _decode(self, role: str, msg: Any, topic: str) -> np.ndarray:
        try:
            if role == "depth":
                return depth_msg_to_metres(msg)
            return image_msg_to_rgb(msg)
        except EncodingError as exc:
            raise EncodingError(f"topic {topic}: {exc}") from None

    def _undistort(self, image: np.ndarray, nearest: bool) -> np.ndarray:
        if self._maps is None:
            return image
        import cv2

        interp = cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR
        return cv2.remap(image, self._maps[0], self._maps[1], interp, borderMode=cv2.BORDER_CONSTANT)

    def _make_frame(self, index: int, ns: int, parts: dict[str, tuple[Any, np.ndarray]]) -> Frame:
        frame_id, image = parts["image"]
        cam = self._camera_raw
        if image.shape[:2] != (cam.height, cam.width):
            raise CalibrationError(
                f"images on {self.topics['image']} are {image.shape[1]}x{image.shape[0]} but the calibration "
                f"is {cam.width}x{cam.height}: use the CameraInfo of this image topic or a matching --calib"
            )
        depth = right = None
        if "depth" in parts:
            depth = parts["depth"][1]
            if depth.shape != image.shape[:2]:
                raise InputError(
                    f"depth on {self.topics['depth']} is {depth.shape[1]}x{depth.shape[0]} but images are "
                    f"{image.shape[1]}x{image.shape[0]}: use a depth topic registered to the colour image "
                    "(e.g. aligned_depth_to_color)"
                )
            depth = self._undistort(depth, nearest=True)
        if "right_image" in parts:
            right = parts["right_image"][1]
            if right.shape != image.shape:
                raise InputError(
                    f"right images on {self.topics['right_image']} are {right.shape[1]}x{right.shape[0]} but "
                    f"left images are {image.shape[1]}x{image.shape[0]}: stereo needs a rectified pair"
                )
        frame_id = frame_id.lstrip("/") or "camera_optical_frame"
        return Frame(
            index=index,
            stamp=ns_to_sec(ns),
            image=self._undistort(image, nearest=False),
            camera=self.camera,
            depth=depth,
            right_image=right,
            baseline_m=self.baseline_m if right is not None else None,
            T_world_cam_gt=self._gt_for(ns),
            frame_id=frame_id,
        )

    def __iter__(self) -> Iterator[Frame]:
        """Yield the synchronised frames in stamp order, reading the bag lazily."""
        index = self._index()
        if not index:
            return
        topics = [self.topics[r] for r in self._streams]
        stream_of = {t: i for i, t in enumerate(topics)}
        wanted: list[dict[int, int]] = [{} for _ in topics]
        for fi, (_, ordinals) in enumerate(index):
            for s, o in enumerate(ordinals):
                wanted[s][o] = fi
        pending: dict[int, dict[str, tuple[Any, np.ndarray]]] = {}
        counts = [0] * len(topics)
        next_fi = 0
        with self._open_reader() as reader:
            for conn, _, raw in self._iter_raw(reader, topics):
                s = stream_of[conn.topic]
                fi = wanted[s].pop(counts[s], None)
                counts[s] += 1
                if fi is None:
                    continue
                role = self._streams[s]
                msg = self._deserialize(reader, raw, conn)
                frame_id = str(getattr(getattr(msg, "header", None), "frame_id", "") or "")
                pending.setdefault(fi, {})[role] = (frame_id, self._decode(role, msg, conn.topic))
                del msg
                while next_fi in pending and len(pending[next_fi]) == len(topics):
                    yield self._make_frame(next_fi, index[next_fi][0], pending.pop(next_fi))
                    next_fi += 1
                if next_fi >= len(index):
                    return
        if next_fi < len(index):
            raise InputError(
                f"bag {self.path} changed while reading: frame {next_fi} of {len(index)} is incomplete"
            )

    def __repr__(self) -> str:
        used = ", ".join(f"{k}={v}" for k, v in self.topics.items() if v)
        return f"BagSource({str(self.path)!r}, {used})"


__all__ = ["BagSource", "detect_topics", "CONVENTION_TOPICS"]
