"""Duck-typed conversions between ROS 2 messages and NumPy arrays.

Every reader here only *accesses fields*, so it works on messages decoded by ``rosbags``
(dataclasses holding NumPy arrays), on real ``rclpy`` messages (``array.array`` sequences)
and, where the field names agree, on ROS 1 messages decoded by ``rosbags``.

Writers build messages through a small *type provider* so that the same code makes
either kind of message:

* :class:`RosbagsTypes` wraps a ``rosbags`` typestore (default: ROS 2 Humble); its
  messages can be serialised to CDR and written to a bag.
* :class:`RclpyTypes` imports ``sensor_msgs.msg`` etc. lazily and makes real ``rclpy``
  messages for publishing.

Both expose ``.new('pkg/msg/Type', **fields)``; fields left out get their ROS default
values, NumPy arrays and NumPy scalars are converted to what each backend wants.

Conventions (see ``shared/design/ros_interface.md``): poses ``T_a_b`` map frame ``b`` to
frame ``a``; stamps are float seconds; depth is float32 metres with 0 for "no reading";
colour images are (H, W, 3) uint8 RGB; PointCloud2 colour is ``x y z rgb`` FLOAT32 at
offsets 0/4/8/12 with ``rgb`` holding the bits of the uint32 ``0x00RRGGBB``.
"""

from __future__ import annotations

import array
import importlib
import math
import struct
from typing import Any, Iterable, Optional, Sequence

import numpy as np

from recon_slam.errors import CalibrationError, EncodingError, InputError
from recon_slam.geometry.camera import PinholeCamera
from recon_slam.geometry.transforms import pose_from_quat, quat_from_pose

# --------------------------------------------------------------------------- constants

#: Raw image encodings understood by :func:`image_to_numpy` / :func:`make_image`.
SUPPORTED_IMAGE_ENCODINGS: tuple[str, ...] = (
    "rgb8",
    "bgr8",
    "rgba8",
    "bgra8",
    "mono8",
    "mono16",
    "16UC1",
    "32FC1",
)
#: Encodings holding depth (16UC1/mono16 in millimetres, 32FC1 in metres).
DEPTH_ENCODINGS: tuple[str, ...] = ("16UC1", "mono16", "32FC1")
#: Encodings :func:`image_to_rgb` turns into RGB.
COLOUR_ENCODINGS: tuple[str, ...] = ("rgb8", "bgr8", "rgba8", "bgra8", "mono8", "mono16")

# encoding -> (dtype, channels)
_ENCODING_LAYOUT: dict[str, tuple[np.dtype, int]] = {
    "rgb8": (np.dtype(np.uint8), 3),
    "bgr8": (np.dtype(np.uint8), 3),
    "rgba8": (np.dtype(np.uint8), 4),
    "bgra8": (np.dtype(np.uint8), 4),
    "mono8": (np.dtype(np.uint8), 1),
    "mono16": (np.dtype(np.uint16), 1),
    "16UC1": (np.dtype(np.uint16), 1),
    "32FC1": (np.dtype(np.float32), 1),
}
_ENCODING_ALIASES = {e.lower(): e for e in SUPPORTED_IMAGE_ENCODINGS}
_ENCODING_ALIASES["8uc1"] = "mono8"

#: sensor_msgs/PointField datatypes.
POINTFIELD_INT8, POINTFIELD_UINT8, POINTFIELD_INT16, POINTFIELD_UINT16 = 1, 2, 3, 4
POINTFIELD_INT32, POINTFIELD_UINT32, POINTFIELD_FLOAT32, POINTFIELD_FLOAT64 = 5, 6, 7, 8
_POINTFIELD_DTYPES = {
    POINTFIELD_INT8: "i1",
    POINTFIELD_UINT8: "u1",
    POINTFIELD_INT16: "i2",
    POINTFIELD_UINT16: "u2",
    POINTFIELD_INT32: "i4",
    POINTFIELD_UINT32: "u4",
    POINTFIELD_FLOAT32: "f4",
    POINTFIELD_FLOAT64: "f8",
}

#: visualization_msgs/Marker constants used here.
MARKER_LINE_LIST = 5
MARKER_ADD = 0
MARKER_DELETEALL = 3

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: compressed_depth_image_transport header: int32 format, float32 depthParam[2].
_COMPRESSED_DEPTH_HEADER = struct.Struct("<iff")

SUPPORTED_DISTORTION_MODELS: tuple[str, ...] = ("plumb_bob", "rational_polynomial")


# --------------------------------------------------------------------------- type providers

def _base_dtype(name: str) -> Optional[np.dtype]:
    """NumPy dtype of a ROS primitive type name (rosbags or rosidl spelling); None for strings."""
    table = {
        "bool": np.bool_,
        "boolean": np.bool_,
        "byte": np.uint8,
        "octet": np.uint8,
        "char": np.uint8,
        "uint8": np.uint8,
        "int8": np.int8,
        "uint16": np.uint16,
        "int16": np.int16,
        "uint32": np.uint32,
        "int32": np.int32,
        "uint64": np.uint64,
        "int64": np.int64,
        "float32": np.float32,
        "float": np.float32,
        "float64": np.float64,
        "double": np.float64,
    }
    dt = table.get(name)
    return None if dt is None else np.dtype(dt)


def _py_scalar(value: Any) -> Any:
    """NumPy scalar -> Python scalar (other values unchanged)."""
    return value.item() if isinstance(value, np.generic) else value


class RosbagsTypes:
    """Message factory over a ``rosbags`` typestore (messages serialisable to CDR).

    Args:
        typestore: a ``rosbags.typesys`` typestore; default: the one of ``distro``.
        distro: ``'humble'`` (default) or ``'jazzy'``; used when ``typestore`` is None.
    """

    def __init__(self, typestore: Any = None, distro: str = "humble") -> None:
        if typestore is None:
            from rosbags.typesys import Stores, get_typestore

            stores = {"humble": Stores.ROS2_HUMBLE, "jazzy": Stores.ROS2_JAZZY}
            if distro not in stores:
                raise InputError(f"ROS distro {distro!r} is not supported: use one of {sorted(stores)}")
            typestore = get_typestore(stores[distro])
        self.typestore = typestore
        self.distro = distro

    def _fielddefs(self, msgtype: str) -> list:
        try:
            return self.typestore.fielddefs[msgtype][1]
        except KeyError:
            raise EncodingError(f"message type {msgtype} is not known to the rosbags typestore") from None

    def _default(self, desc: tuple) -> Any:
        from rosbags.interfaces import Nodetype

        kind, payload = desc
        if kind == Nodetype.BASE:
            dt = _base_dtype(payload[0])
            if dt is None:
                return ""
            if dt == np.bool_:
                return False
            return 0.0 if dt.kind == "f" else 0
        if kind == Nodetype.NAME:
            return self.new(payload)
        sub, num = payload
        if sub[0] == Nodetype.BASE and _base_dtype(sub[1][0]) is not None:
            return np.zeros(num if kind == Nodetype.ARRAY else 0, dtype=_base_dtype(sub[1][0]))
        if kind == Nodetype.ARRAY:
            return [self._default(sub) for _ in range(num)]
        return []

    def _convert(self, desc: tuple, value: Any) -> Any:
        from rosbags.interfaces import Nodetype

        kind, payload = desc
        if kind == Nodetype.BASE:
            value = _py_scalar(value)
            dt = _base_dtype(payload[0])
            if dt is not None and dt.kind == "f":
                return float(value)
            if dt is not None and dt.kind in "iu":
                return int(value)
            return value
        if kind in (Nodetype.ARRAY, Nodetype.SEQUENCE):
            sub = payload[0]
            if sub[0] == Nodetype.BASE and _base_dtype(sub[1][0]) is not None:
                dt = _base_dtype(sub[1][0])
                if isinstance(value, (bytes, bytearray, memoryview)) and dt == np.uint8:
                    return np.frombuffer(bytes(value), dtype=np.uint8).copy()
                return np.ascontiguousarray(np.asarray(value).reshape(-1), dtype=dt)
            return list(value)
        return value

    def new(self, msgtype: str, **fields: Any) -> Any:
        """Message ``msgtype`` (e.g. ``'sensor_msgs/msg/Image'``); missing fields get ROS defaults."""
        defs = self._fielddefs(msgtype)
        cls = self.typestore.types[msgtype]
        known = {name for name, _ in defs}
        unknown = set(fields) - known
        if unknown:
            raise TypeError(f"{msgtype} has no field(s) {sorted(unknown)}")
        values = {}
        for name, desc in defs:
            values[name] = self._convert(desc, fields[name]) if name in fields else self._default(desc)
        return cls(**values)

    def serialize(self, msg: Any, msgtype: Optional[str] = None) -> bytes:
        """CDR bytes of ``msg`` (little endian)."""
        return bytes(self.typestore.serialize_cdr(msg, msgtype or msg.__msgtype__))

    def deserialize(self, data: bytes, msgtype: str) -> Any:
        """Message from CDR bytes."""
        return self.typestore.deserialize_cdr(data, msgtype)


_ARRAY_TYPECODES = {
    "boolean": None,
    "octet": "B",
    "char": "B",
    "uint8": "B",
    "int8": "b",
    "uint16": "H",
    "int16": "h",
    "uint32": "I",
    "int32": "i",
    "uint64": "Q",
    "int64": "q",
    "float": "f",
    "double": "d",
}


class RclpyTypes:
    """Message factory making real ``rclpy`` messages (imports message packages lazily).

    Args:
        check_fields: pass ``check_fields=True`` to the constructors (Jazzy's rosidl
            then type-checks every field like Humble always does; Humble's constructors
            do not accept the argument, so leave it False there).
    """

    def __init__(self, check_fields: bool = False) -> None:
        self.check_fields = check_fields
        self._classes: dict[str, type] = {}

    def message_class(self, msgtype: str) -> type:
        """The rclpy class of ``msgtype`` (``'sensor_msgs/msg/Image'`` -> ``sensor_msgs.msg.Image``)."""
        cls = self._classes.get(msgtype)
        if cls is None:
            try:
                pkg, kind, name = msgtype.split("/")
            except ValueError:
                raise EncodingError(f"message type {msgtype!r} is not of the form pkg/msg/Type") from None
            try:
                module = importlib.import_module(f"{pkg}.{kind}")
            except ImportError:
                raise EncodingError(
                    f"ROS message package {pkg} is not installed: install ros-$ROS_DISTRO-{pkg.replace('_', '-')}"
                ) from None
            try:
                cls = getattr(module, name)
            except AttributeError:
                raise EncodingError(f"message type {msgtype} not found in {pkg}.{kind}") from None
            self._classes[msgtype] = cls
        return cls

    @staticmethod
    def _convert(ftype: str, value: Any) -> Any:
        if ftype.startswith("sequence<") or ftype.endswith("]"):
            inner = ftype[len("sequence<"):-1] if ftype.startswith("sequence<") else ftype[: ftype.index("[")]
            inner = inner.split(",")[0].strip()
            dt = _base_dtype(inner)
            if dt is None:
                return list(value)
            if ftype.endswith("]") and not ftype.startswith("sequence<"):
                # fixed-size arrays are numpy arrays in rclpy
                return np.ascontiguousarray(np.asarray(value).reshape(-1), dtype=dt)
            code = _ARRAY_TYPECODES.get(inner)
            if code is None:
                return [bool(v) for v in np.asarray(value).reshape(-1)]
            if isinstance(value, array.array) and value.typecode == code:
                return value
            if isinstance(value, (bytes, bytearray, memoryview)) and code == "B":
                return array.array("B", bytes(value))
            arr = np.ascontiguousarray(np.asarray(value).reshape(-1), dtype=dt)
            return array.array(code, arr.tobytes())
        value = _py_scalar(value)
        if ftype in ("byte", "octet"):
            # rclpy's byte/octet fields take a bytes object of length one; an int is accepted
            # by Jazzy but serialised wrongly.
            return value if isinstance(value, bytes) else bytes([int(value) & 0xFF])
        dt = _base_dtype(ftype)
        if dt is not None:
            if dt == np.bool_:
                return bool(value)
            if dt.kind == "f":
                return float(value)
            return int(value)
        return value

    def new(self, msgtype: str, **fields: Any) -> Any:
        """rclpy message ``msgtype``; missing fields keep the rclpy defaults."""
        cls = self.message_class(msgtype)
        ftypes = cls.get_fields_and_field_types()
        unknown = set(fields) - set(ftypes)
        if unknown:
            raise TypeError(f"{msgtype} has no field(s) {sorted(unknown)}")
        values = {k: self._convert(ftypes[k], v) for k, v in fields.items()}
        if self.check_fields:
            values["check_fields"] = True
        return cls(**values)


# --------------------------------------------------------------------------- stamps

def sec_to_stamp_parts(t: float) -> tuple[int, int]:
    """Float seconds -> ``(sec, nanosec)`` with ``0 <= nanosec < 1e9``."""
    ns = sec_to_ns(t)
    return ns // 1_000_000_000, ns % 1_000_000_000


def sec_to_ns(t: float) -> int:
    """Float seconds -> integer nanoseconds (rounded to the nearest)."""
    t = float(t)
    if not math.isfinite(t):
        raise InputError(f"stamp {t} is not finite")
    sec = math.floor(t)
    return int(sec) * 1_000_000_000 + int(round((t - sec) * 1e9))


def ns_to_sec(ns: int) -> float:
    """Integer nanoseconds -> float seconds."""
    ns = int(ns)
    return ns // 1_000_000_000 + (ns % 1_000_000_000) * 1e-9


def stamp_to_sec(stamp: Any) -> float:
    """``builtin_interfaces/Time`` (fields ``sec``, ``nanosec``) -> float seconds."""
    nsec = getattr(stamp, "nanosec", None)
    if nsec is None:  # ROS 1 style
        nsec = getattr(stamp, "nsec", 0)
    return float(stamp.sec) + int(nsec) * 1e-9


def stamp_to_ns(stamp: Any) -> int:
    """``builtin_interfaces/Time`` -> integer nanoseconds."""
    nsec = getattr(stamp, "nanosec", None)
    if nsec is None:
        nsec = getattr(stamp, "nsec", 0)
    return int(stamp.sec) * 1_000_000_000 + int(nsec)


def _make_time(types: Any, stamp: Any) -> Any:
    if hasattr(stamp, "sec"):
        nsec = getattr(stamp, "nanosec", None)
        nsec = getattr(stamp, "nsec", 0) if nsec is None else nsec
        return types.new("builtin_interfaces/msg/Time", sec=int(stamp.sec), nanosec=int(nsec))
    sec, nsec = sec_to_stamp_parts(stamp)
    return types.new("builtin_interfaces/msg/Time", sec=sec, nanosec=nsec)


def make_header(types: Any, stamp: Any, frame_id: str) -> Any:
    """``std_msgs/Header`` at ``stamp`` (float seconds or a Time-like object) in ``frame_id``."""
    return types.new("std_msgs/msg/Header", stamp=_make_time(types, stamp), frame_id=str(frame_id))


# --------------------------------------------------------------------------- images (read)

def _canonical_encoding(encoding: str) -> str:
    enc = _ENCODING_ALIASES.get(str(encoding).strip().lower())
    if enc is None:
        raise EncodingError(
            f"image encoding {encoding!r} is not supported; supported: {', '.join(SUPPORTED_IMAGE_ENCODINGS)}"
        )
    return enc


def _as_bytes_array(data: Any) -> np.ndarray:
    """Message byte sequence (ndarray, array.array, bytes, list) -> 1-D uint8 array (no copy when possible)."""
    if isinstance(data, np.ndarray):
        return data.reshape(-1).view(np.uint8) if data.dtype.itemsize == 1 else np.frombuffer(data.tobytes(), np.uint8)
    if isinstance(data, (bytes, bytearray, memoryview, array.array)):
        return np.frombuffer(data, dtype=np.uint8)
    return np.asarray(list(data), dtype=np.uint8)


def image_to_array(msg: Any) -> np.ndarray:
    """``sensor_msgs/Image`` -> array in the message's own layout.

    Returns (H, W) for one channel or (H, W, C), with the encoding's dtype (uint8, uint16,
    float32) in native byte order; ``step`` padding and ``is_bigendian`` are handled.
    """
    enc = _canonical_encoding(msg.encoding)
    dtype, channels = _ENCODING_LAYOUT[enc]
    h, w = int(msg.height), int(msg.width)
    if h <= 0 or w <= 0:
        raise InputError(f"image message has size {w}x{h}: the image is empty")
    row_bytes = w * channels * dtype.itemsize
    step = int(msg.step) or row_bytes
    if step < row_bytes:
        raise EncodingError(f"image step {step} is smaller than width*bytes_per_pixel = {row_bytes} ({enc})")
    buf = _as_bytes_array(msg.data)
    needed = (h - 1) * step + row_bytes
    if buf.size < needed:
        raise EncodingError(
            f"image data has {buf.size} bytes, expected {h * step} for {w}x{h} {enc} with step {step}"
        )
    if buf.size < h * step:
        buf = np.concatenate([buf, np.zeros(h * step - buf.size, np.uint8)])
    rows = buf[: h * step].reshape(h, step)[:, :row_bytes]
    order = ">" if int(msg.is_bigendian) else "<"
    arr = np.ascontiguousarray(rows).view(dtype.newbyteorder(order)).astype(dtype, copy=False)
    if np.may_share_memory(arr, buf):  # never hand out a view of the message buffer
        arr = arr.copy()
    return arr.reshape(h, w, channels) if channels > 1 else arr.reshape(h, w)


def image_to_numpy(msg: Any) -> np.ndarray:
    """``sensor_msgs/Image`` -> NumPy.

    Colour and grey encodings (rgb8, bgr8, rgba8, bgra8, mono8, mono16) give (H, W, 3)
    uint8 RGB (mono16 keeps its upper 8 bits). Depth encodings give the raw values:
    16UC1 -> (H, W) uint16 (millimetres by convention), 32FC1 -> (H, W) float32; use
    :func:`depth_to_metres` for metric depth.
    """
    enc = _canonical_encoding(msg.encoding)
    arr = image_to_array(msg)
    if enc in ("16UC1", "32FC1"):
        return arr
    return _to_rgb(arr, enc)


def _to_rgb(arr: np.ndarray, enc: str) -> np.ndarray:
    if enc == "rgb8":
        return np.ascontiguousarray(arr)
    if enc == "bgr8":
        return np.ascontiguousarray(arr[..., ::-1])
    if enc == "rgba8":
        return np.ascontiguousarray(arr[..., :3])
    if enc == "bgra8":
        return np.ascontiguousarray(arr[..., 2::-1])
    if enc == "mono16":
        arr = (arr >> 8).astype(np.uint8)
    if arr.ndim == 2:
        return np.repeat(arr[..., None], 3, axis=2)
    raise EncodingError(f"image encoding {enc} cannot be shown as RGB")


def image_to_rgb(msg: Any) -> np.ndarray:
    """Colour ``sensor_msgs/Image`` -> (H, W, 3) uint8 RGB; depth encodings -> EncodingError."""
    enc = _canonical_encoding(msg.encoding)
    if enc not in COLOUR_ENCODINGS:
        raise EncodingError(
            f"image encoding {enc} holds depth, not colour: colour topics need one of {', '.join(COLOUR_ENCODINGS)}"
        )
    return _to_rgb(image_to_array(msg), enc)


def _clean_depth(depth: np.ndarray) -> np.ndarray:
    depth = np.asarray(depth, dtype=np.float32)
    bad = ~np.isfinite(depth) | (depth < 0)
    if bad.any():
        depth = depth.copy()
        depth[bad] = 0.0
    return depth


def depth_to_metres(msg: Any) -> np.ndarray:
    """Depth ``sensor_msgs/Image`` -> (H, W) float32 metres (z), 0 = no reading.

    16UC1 and mono16 hold millimetres, 32FC1 metres; NaN, inf and negative values become 0.
    """
    enc = _canonical_encoding(msg.encoding)
    if enc not in DEPTH_ENCODINGS:
        raise EncodingError(
            f"image encoding {enc} is not a depth encoding; depth images need one of {', '.join(DEPTH_ENCODINGS)}"
        )
    arr = image_to_array(msg)
    if enc == "32FC1":
        return _clean_depth(arr)
    return arr.astype(np.float32) * np.float32(0.001)


# --------------------------------------------------------------------------- compressed (read)

def _decode(data: np.ndarray, what: str) -> np.ndarray:
    import cv2

    if data.size == 0:
        raise EncodingError(f"{what}: the compressed data is empty")
    img = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if img is None:
        raise EncodingError(f"{what}: OpenCV could not decode the data (corrupt or not JPEG/PNG)")
    return img


def compressed_image_to_numpy(msg: Any) -> np.ndarray:
    """``sensor_msgs/CompressedImage`` (JPEG or PNG) -> (H, W, 3) uint8 RGB.

    ``format`` is image_transport's ``'<enc>; jpeg compressed <enc>'``, or plain
    ``'jpeg'``/``'png'``. The compressed file stores the usual colour order, so the decoded
    BGR is swapped to RGB whatever the format string names. 16-bit PNGs keep their upper
    8 bits. ``compressedDepth`` messages -> EncodingError (use
    :func:`compressed_depth_to_metres`).
    """
    fmt = str(msg.format).lower()
    if "compresseddepth" in fmt:
        raise EncodingError(
            f"compressed image format {msg.format!r} holds depth: read it with compressed_depth_to_metres"
        )
    if fmt.strip() and not any(k in fmt for k in ("jpeg", "jpg", "png")):
        raise EncodingError(f"compressed image format {msg.format!r} is not supported; supported: jpeg, png")
    img = _decode(_as_bytes_array(msg.data), f"compressed image ({msg.format!r})")
    if img.dtype == np.uint16:
        img = (img >> 8).astype(np.uint8)
    if img.dtype != np.uint8:
        raise EncodingError(f"compressed image decodes to {img.dtype}, expected 8-bit colour")
    if img.ndim == 2:
        return np.repeat(img[..., None], 3, axis=2)
    if img.shape[2] == 4:
        return np.ascontiguousarray(img[..., 2::-1])
    if img.shape[2] == 3:
        return np.ascontiguousarray(img[..., ::-1])
    return np.repeat(img[..., :1], 3, axis=2)


def compressed_depth_to_metres(msg: Any) -> np.ndarray:
    """``compressedDepth`` ``sensor_msgs/CompressedImage`` -> (H, W) float32 metres, 0 = no reading.

    ``format`` is ``'16UC1; compressedDepth[ png]'`` (PNG of millimetres) or
    ``'32FC1; compressedDepth[ png]'`` (PNG of quantised inverse depth ``v``, decoded as
    ``depth = a / (v - b)`` with ``a, b`` from the 12-byte header; ``v = 0`` is no reading).
    The header (int32 format, float32 depthParam[2], little endian) precedes the PNG; data
    without the header is accepted too. RVL compression -> EncodingError.
    """
    fmt = str(msg.format)
    low = fmt.lower()
    supported = "'16UC1; compressedDepth png', '32FC1; compressedDepth png'"
    if "compresseddepth" not in low:
        raise EncodingError(f"compressed depth format {fmt!r} is not compressedDepth; supported: {supported}")
    if "rvl" in low:
        raise EncodingError(f"compressed depth format {fmt!r} (RVL) is not supported; supported: {supported}")
    enc = _canonical_encoding(fmt.split(";")[0])
    if enc not in DEPTH_ENCODINGS:
        raise EncodingError(f"compressed depth encoding {enc} is not supported; supported: {supported}")
    data = _as_bytes_array(msg.data)
    raw = data[:20].tobytes()
    header = None
    if raw[:8] == _PNG_SIGNATURE:
        payload = data
    elif len(raw) >= 20 and raw[12:20] == _PNG_SIGNATURE:
        header = _COMPRESSED_DEPTH_HEADER.unpack(raw[:12])
        payload = data[12:]
    else:
        raise EncodingError(f"compressed depth ({fmt!r}): no PNG data found after the 12-byte header")
    img = _decode(payload, f"compressed depth ({fmt!r})")
    if img.ndim != 2 or img.dtype != np.uint16:
        raise EncodingError(f"compressed depth ({fmt!r}) decodes to {img.dtype} {img.shape}, expected 16-bit grey")
    if enc in ("16UC1", "mono16"):
        return img.astype(np.float32) * np.float32(0.001)
    if header is None:
        raise EncodingError(f"compressed depth ({fmt!r}): 32FC1 needs the 12-byte header with the quantisation")
    a, b = np.float32(header[1]), np.float32(header[2])
    v = img.astype(np.float32)
    denom = v - b
    valid = (img > 0) & (denom > 0)
    depth = np.zeros(img.shape, np.float32)
    depth[valid] = a / denom[valid]
    return _clean_depth(depth)


def image_msg_to_rgb(msg: Any) -> np.ndarray:
    """``sensor_msgs/Image`` or ``CompressedImage`` -> (H, W, 3) uint8 RGB."""
    if hasattr(msg, "format") and not hasattr(msg, "encoding"):
        return compressed_image_to_numpy(msg)
    return image_to_rgb(msg)


def depth_msg_to_metres(msg: Any) -> np.ndarray:
    """Depth ``sensor_msgs/Image`` or ``compressedDepth`` ``CompressedImage`` -> (H, W) float32 metres."""
    if hasattr(msg, "format") and not hasattr(msg, "encoding"):
        return compressed_depth_to_metres(msg)
    return depth_to_metres(msg)


# --------------------------------------------------------------------------- images (write)

def _u8(arr: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(arr).reshape(-1).view(np.uint8)


def _rgb_input(array_: np.ndarray, encoding: str) -> np.ndarray:
    a = np.asarray(array_)
    if a.dtype != np.uint8:
        raise EncodingError(f"encoding {encoding} needs a uint8 RGB (H, W, 3) or grey (H, W) array, got {a.dtype}")
    if a.ndim == 2:
        return np.repeat(a[..., None], 3, axis=2)
    if a.ndim == 3 and a.shape[2] in (3, 4):
        return a[..., :3]
    raise EncodingError(f"encoding {encoding} needs an (H, W, 3) RGB or (H, W) grey array, got shape {a.shape}")


def _encode_pixels(array_: np.ndarray, encoding: str) -> np.ndarray:
    """Input array -> (H, W[, C]) array in ``encoding``'s layout and dtype."""
    a = np.asarray(array_)
    if encoding in ("rgb8", "bgr8", "rgba8", "bgra8"):
        if encoding in ("rgba8", "bgra8") and a.ndim == 3 and a.shape[2] == 4 and a.dtype == np.uint8:
            rgba = a
        else:
            rgb = _rgb_input(a, encoding)
            rgba = np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 255, np.uint8)], axis=2)
        if encoding == "rgb8":
            return rgba[..., :3]
        if encoding == "bgr8":
            return rgba[..., 2::-1]
        if encoding == "rgba8":
            return rgba
        return rgba[..., [2, 1, 0, 3]]
    if encoding == "mono8":
        if a.ndim == 2 and a.dtype == np.uint8:
            return a
        import cv2

        return cv2.cvtColor(np.ascontiguousarray(_rgb_input(a, encoding)), cv2.COLOR_RGB2GRAY)
    if a.ndim != 2:
        raise EncodingError(f"encoding {encoding} needs an (H, W) array, got shape {a.shape}")
    if encoding == "mono16":
        if a.dtype != np.uint16:
            raise EncodingError(f"encoding mono16 needs a uint16 (H, W) array, got {a.dtype}")
        return a
    if encoding == "16UC1":
        if a.dtype == np.uint16:
            return a
        return metres_to_millimetres(a)
    # 32FC1: metres
    return _clean_depth(a)


def metres_to_millimetres(depth_m: np.ndarray) -> np.ndarray:
    """(H, W) depth in metres -> uint16 millimetres (rounded; invalid or out of range -> 0)."""
    d = _clean_depth(depth_m).astype(np.float64) * 1000.0
    mm = np.rint(d)
    mm[(mm > 65535) | (mm < 0)] = 0
    return mm.astype(np.uint16)


def make_image(
    types: Any,
    image: np.ndarray,
    encoding: str,
    stamp: Any,
    frame_id: str,
    *,
    step: Optional[int] = None,
    is_bigendian: bool = False,
) -> Any:
    """``sensor_msgs/Image`` from an array.

    Args:
        image: (H, W, 3) uint8 RGB (or (H, W) grey) for rgb8/bgr8/rgba8/bgra8/mono8
            (rgba8/bgra8 also take (H, W, 4) RGBA); (H, W) uint16 for mono16; (H, W) depth
            for 16UC1 (float metres -> millimetres, or uint16 millimetres as is) and 32FC1
            (float metres).
        encoding: one of :data:`SUPPORTED_IMAGE_ENCODINGS`.
        stamp: float seconds or Time-like; frame_id: optical frame of the camera.
        step: row length in bytes (>= width * bytes per pixel; extra bytes are padding).
        is_bigendian: write multi-byte pixels big endian.
    """
    enc = _canonical_encoding(encoding)
    pixels = _encode_pixels(image, enc)
    h, w = pixels.shape[:2]
    dtype, _ = _ENCODING_LAYOUT[enc]
    order = ">" if is_bigendian else "<"
    pixels = np.ascontiguousarray(pixels, dtype=dtype.newbyteorder(order))
    if h == 0 or w == 0:
        raise InputError(f"cannot make an image message of size {w}x{h}")
    row_bytes = w * pixels.itemsize * (pixels.shape[2] if pixels.ndim == 3 else 1)
    rows = pixels.reshape(h, -1).view(np.uint8).reshape(h, row_bytes)
    step = row_bytes if step is None else int(step)
    if step < row_bytes:
        raise EncodingError(f"step {step} is smaller than the row size {row_bytes} of {w}x{h} {enc}")
    if step > row_bytes:
        padded = np.zeros((h, step), np.uint8)
        padded[:, :row_bytes] = rows
        rows = padded
    return types.new(
        "sensor_msgs/msg/Image",
        header=make_header(types, stamp, frame_id),
        height=h,
        width=w,
        encoding=enc,
        is_bigendian=1 if is_bigendian else 0,
        step=step,
        data=_u8(rows),
    )


def make_compressed_image(
    types: Any,
    rgb: np.ndarray,
    stamp: Any,
    frame_id: str,
    *,
    fmt: str = "jpeg",
    quality: int = 90,
) -> Any:
    """``sensor_msgs/CompressedImage`` (JPEG or PNG) from (H, W, 3) uint8 RGB or (H, W) grey.

    ``format`` follows image_transport: ``'rgb8; jpeg compressed bgr8'`` (colour) or
    ``'mono8; png compressed mono8'`` (grey).
    """
    import cv2

    fmt = fmt.lower()
    if fmt in ("jpg", "jpeg"):
        ext, params, name = ".jpg", [cv2.IMWRITE_JPEG_QUALITY, int(quality)], "jpeg"
    elif fmt == "png":
        ext, params, name = ".png", [cv2.IMWRITE_PNG_COMPRESSION, 3], "png"
    else:
        raise EncodingError(f"compressed image format {fmt!r} is not supported; supported: jpeg, png")
    a = np.asarray(rgb)
    if a.ndim == 2 and a.dtype == np.uint8:
        img, format_str = a, f"mono8; {name} compressed mono8"
    else:
        img, format_str = np.ascontiguousarray(_rgb_input(a, "rgb8")[..., ::-1]), f"rgb8; {name} compressed bgr8"
    ok, buf = cv2.imencode(ext, img, params)
    if not ok:
        raise EncodingError(f"OpenCV could not encode the image as {name}")
    return types.new(
        "sensor_msgs/msg/CompressedImage",
        header=make_header(types, stamp, frame_id),
        format=format_str,
        data=buf.reshape(-1),
    )


def make_compressed_depth(
    types: Any,
    depth_m: np.ndarray,
    stamp: Any,
    frame_id: str,
    *,
    encoding: str = "16UC1",
    depth_max: float = 10.0,
    depth_quantization: float = 100.0,
    png_level: int = 3,
) -> Any:
    """``compressedDepth`` ``sensor_msgs/CompressedImage`` from (H, W) depth in metres.

    16UC1: PNG of millimetres (lossless at 1 mm up to 65.535 m). 32FC1: PNG of the
    quantised inverse depth ``v = a / depth + b`` with ``a = q (q + 1)``,
    ``b = 1 - a / depth_max`` (q = ``depth_quantization``); depths >= ``depth_max`` and
    depths too close for 16 bits (about ``a / 65535`` m) are lost. Both are prefixed by the
    12-byte header (int32 format 0, float32 a, float32 b).
    """
    import cv2

    enc = _canonical_encoding(encoding)
    if enc not in ("16UC1", "32FC1"):
        raise EncodingError(f"compressedDepth encoding {enc} is not supported; supported: 16UC1, 32FC1")
    d = np.asarray(depth_m)
    if d.ndim != 2:
        raise EncodingError(f"compressed depth needs an (H, W) array, got shape {d.shape}")
    if enc == "16UC1":
        png = d if d.dtype == np.uint16 else metres_to_millimetres(d)
        header = _COMPRESSED_DEPTH_HEADER.pack(0, 0.0, 0.0)
    else:
        q = float(depth_quantization)
        a = np.float32(q * (q + 1.0))
        b = np.float32(1.0 - float(a) / float(depth_max))
        d = _clean_depth(d)
        valid = (d > 0) & (d < depth_max)
        v = np.zeros(d.shape, np.float64)
        v[valid] = float(a) / d[valid].astype(np.float64) + float(b)
        png = np.clip(np.rint(v), 0, 65535).astype(np.uint16)
        header = _COMPRESSED_DEPTH_HEADER.pack(0, float(a), float(b))
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(png), [cv2.IMWRITE_PNG_COMPRESSION, int(png_level)])
    if not ok:
        raise EncodingError("OpenCV could not encode the depth PNG")
    data = np.concatenate([np.frombuffer(header, np.uint8), buf.reshape(-1)])
    return types.new(
        "sensor_msgs/msg/CompressedImage",
        header=make_header(types, stamp, frame_id),
        format=f"{enc}; compressedDepth png",
        data=data,
    )


# --------------------------------------------------------------------------- camera info

def _field(msg: Any, *names: str) -> Any:
    for n in names:
        if hasattr(msg, n):
            return getattr(msg, n)
    raise InputError(f"message {type(msg).__name__} has none of the fields {names}")


def camera_info_to_camera(
    msg: Any,
    *,
    use_projection: bool = False,
    image_size: Optional[tuple[int, int]] = None,
) -> PinholeCamera:
    """``sensor_msgs/CameraInfo`` -> :class:`PinholeCamera`.

    Args:
        use_projection: take fx, fy, cx, cy from ``P`` with no distortion (the camera of
            rectified images, ``image_rect`` topics and stereo pairs); otherwise from ``K``
            with ``D`` as distortion.
        image_size: (width, height) to use when the message leaves them 0.

    Distortion models: plumb_bob (k1 k2 p1 p2 k3), rational_polynomial (k1..k6 with
    p1 p2), or none; equidistant/fisheye -> EncodingError.
    """
    width, height = int(msg.width), int(msg.height)
    if (width <= 0 or height <= 0) and image_size is not None:
        width, height = int(image_size[0]), int(image_size[1])
    K = np.asarray(_field(msg, "k", "K"), dtype=np.float64).reshape(-1)
    P = np.asarray(_field(msg, "p", "P"), dtype=np.float64).reshape(-1)
    D = np.asarray(_field(msg, "d", "D"), dtype=np.float64).reshape(-1)
    model = str(msg.distortion_model).strip().lower()
    if use_projection and P.size == 12 and P[0] > 0:
        return PinholeCamera(width, height, P[0], P[5], P[2], P[6])
    if K.size != 9 or not np.any(K):
        raise CalibrationError(
            "CameraInfo has no intrinsics (K is all zero): the camera is uncalibrated; give --calib FILE"
        )
    if model in ("", "none") or not np.any(D):
        dist: tuple[float, ...] = ()
    elif model == "plumb_bob":
        if D.size < 4:
            raise CalibrationError(f"plumb_bob distortion needs 4 or 5 coefficients, got {D.size}")
        if D.size > 5 and np.any(D[5:]):
            raise CalibrationError(f"plumb_bob distortion has {D.size} coefficients, expected 5")
        dist = tuple(D[:5])
    elif model == "rational_polynomial":
        if D.size < 8:
            dist = tuple(np.concatenate([D, np.zeros(8 - D.size)]))
        else:
            if np.any(D[8:]):
                raise CalibrationError(
                    f"rational_polynomial distortion has {D.size} coefficients with non-zero extras; "
                    "only 8 are supported"
                )
            dist = tuple(D[:8])
    else:
        raise EncodingError(
            f"distortion model {msg.distortion_model!r} is not supported; supported: "
            f"{', '.join(SUPPORTED_DISTORTION_MODELS)} (rectify the images first or give --calib)"
        )
    return PinholeCamera(width, height, K[0], K[4], K[2], K[5], dist)


def camera_info_baseline(msg: Any) -> Optional[float]:
    """Stereo baseline in metres from a right ``CameraInfo`` (``P[0,3] = -fx * B``); None if 0."""
    P = np.asarray(_field(msg, "p", "P"), dtype=np.float64).reshape(-1)
    if P.size != 12 or P[0] <= 0 or P[3] == 0:
        return None
    return float(-P[3] / P[0])


def make_camera_info(
    types: Any,
    camera: PinholeCamera,
    stamp: Any,
    frame_id: str,
    *,
    baseline_m: Optional[float] = None,
) -> Any:
    """``sensor_msgs/CameraInfo`` of ``camera``.

    ``K`` and ``D`` (plumb_bob with 5 coefficients, rational_polynomial with 8), ``R = I``
    and ``P = [K | t]`` with ``t = (-fx * baseline_m, 0, 0)`` for the right camera of a
    rectified stereo pair (``baseline_m`` None or 0 for the left/mono camera).
    """
    dist = list(camera.distortion)
    if len(dist) <= 5:
        model = "plumb_bob"
        dist = dist + [0.0] * (5 - len(dist))
    else:
        model = "rational_polynomial"
    P = np.zeros(12)
    P[[0, 2, 5, 6, 10]] = [camera.fx, camera.cx, camera.fy, camera.cy, 1.0]
    if baseline_m:
        P[3] = -camera.fx * float(baseline_m)
    return types.new(
        "sensor_msgs/msg/CameraInfo",
        header=make_header(types, stamp, frame_id),
        height=camera.height,
        width=camera.width,
        distortion_model=model,
        d=np.asarray(dist, np.float64),
        k=camera.K.reshape(-1),
        r=np.eye(3).reshape(-1),
        p=P,
    )


# --------------------------------------------------------------------------- geometry

def _quat_matrix(t: Sequence[float], q: Sequence[float]) -> np.ndarray:
    q = np.asarray(q, dtype=np.float64)
    n = np.linalg.norm(q)
    if not np.isfinite(n) or n < 1e-12:
        raise InputError(f"quaternion {tuple(q)} has zero length: the transform/pose is invalid")
    return pose_from_quat(np.asarray(t, dtype=np.float64), q / n)


def transform_to_matrix(transform: Any) -> np.ndarray:
    """``geometry_msgs/Transform`` (or ``TransformStamped``) -> (4, 4) float64 ``T_parent_child``."""
    if hasattr(transform, "transform"):
        transform = transform.transform
    tr, r = transform.translation, transform.rotation
    return _quat_matrix((tr.x, tr.y, tr.z), (r.x, r.y, r.z, r.w))


def pose_to_matrix(pose: Any) -> np.ndarray:
    """``geometry_msgs/Pose`` (or PoseStamped / PoseWithCovariance[Stamped]) -> (4, 4) float64."""
    while not hasattr(pose, "position") and hasattr(pose, "pose"):
        pose = pose.pose
    p, o = pose.position, pose.orientation
    return _quat_matrix((p.x, p.y, p.z), (o.x, o.y, o.z, o.w))


def _check_pose(T: np.ndarray) -> np.ndarray:
    T = np.asarray(T, dtype=np.float64)
    if T.shape != (4, 4) or not np.all(np.isfinite(T)):
        raise InputError(f"pose must be a finite (4, 4) matrix, got shape {T.shape}")
    return T


def _vector3(types: Any, v: Sequence[float]) -> Any:
    return types.new("geometry_msgs/msg/Vector3", x=float(v[0]), y=float(v[1]), z=float(v[2]))


def _quaternion(types: Any, q: Sequence[float]) -> Any:
    return types.new("geometry_msgs/msg/Quaternion", x=float(q[0]), y=float(q[1]), z=float(q[2]), w=float(q[3]))


def _point(types: Any, p: Sequence[float]) -> Any:
    return types.new("geometry_msgs/msg/Point", x=float(p[0]), y=float(p[1]), z=float(p[2]))


def make_pose(types: Any, T: np.ndarray) -> Any:
    """``geometry_msgs/Pose`` of a (4, 4) pose."""
    t, q = quat_from_pose(_check_pose(T))
    return types.new("geometry_msgs/msg/Pose", position=_point(types, t), orientation=_quaternion(types, q))


def make_transform_stamped(types: Any, T_parent_child: np.ndarray, stamp: Any, parent: str, child: str) -> Any:
    """``geometry_msgs/TransformStamped`` ``parent -> child`` holding (4, 4) ``T_parent_child``."""
    t, q = quat_from_pose(_check_pose(T_parent_child))
    return types.new(
        "geometry_msgs/msg/TransformStamped",
        header=make_header(types, stamp, parent),
        child_frame_id=str(child),
        transform=types.new(
            "geometry_msgs/msg/Transform", translation=_vector3(types, t), rotation=_quaternion(types, q)
        ),
    )


def make_tf_message(types: Any, transforms: Iterable[Any]) -> Any:
    """``tf2_msgs/TFMessage`` holding ``TransformStamped`` messages (for /tf and /tf_static)."""
    return types.new("tf2_msgs/msg/TFMessage", transforms=list(transforms))


def _covariance(cov: Optional[np.ndarray], what: str) -> np.ndarray:
    if cov is None:
        return np.zeros(36)
    c = np.asarray(cov, dtype=np.float64)
    if c.size != 36:
        raise InputError(f"{what} covariance must be 6x6 (x y z rx ry rz, row-major), got shape {c.shape}")
    return c.reshape(-1)


def make_odometry(
    types: Any,
    T_odom_base: np.ndarray,
    stamp: Any,
    odom_frame: str,
    child_frame: str,
    twist: Optional[Sequence[float]] = None,
    covariance: Optional[np.ndarray] = None,
    twist_covariance: Optional[np.ndarray] = None,
) -> Any:
    """``nav_msgs/Odometry``: pose (4, 4) ``T_odom_base`` in ``odom_frame``, child ``child_frame``.

    Args:
        twist: (6,) ``vx vy vz wx wy wz`` in ``child_frame`` (m/s, rad/s); zeros when None.
        covariance, twist_covariance: (6, 6) or (36,) row-major over x y z rx ry rz.
    """
    tw = np.zeros(6) if twist is None else np.asarray(twist, dtype=np.float64).reshape(-1)
    if tw.size != 6:
        raise InputError(f"twist must have 6 values (vx vy vz wx wy wz), got {tw.size}")
    return types.new(
        "nav_msgs/msg/Odometry",
        header=make_header(types, stamp, odom_frame),
        child_frame_id=str(child_frame),
        pose=types.new(
            "geometry_msgs/msg/PoseWithCovariance",
            pose=make_pose(types, T_odom_base),
            covariance=_covariance(covariance, "pose"),
        ),
        twist=types.new(
            "geometry_msgs/msg/TwistWithCovariance",
            twist=types.new(
                "geometry_msgs/msg/Twist", linear=_vector3(types, tw[:3]), angular=_vector3(types, tw[3:])
            ),
            covariance=_covariance(twist_covariance, "twist"),
        ),
    )


def make_pose_stamped(types: Any, T: np.ndarray, stamp: Any, frame_id: str) -> Any:
    """``geometry_msgs/PoseStamped`` of (4, 4) ``T_frame_body`` in ``frame_id``."""
    return types.new(
        "geometry_msgs/msg/PoseStamped", header=make_header(types, stamp, frame_id), pose=make_pose(types, T)
    )


def make_pose_with_covariance_stamped(
    types: Any, T: np.ndarray, stamp: Any, frame_id: str, covariance: Optional[np.ndarray] = None
) -> Any:
    """``geometry_msgs/PoseWithCovarianceStamped``; covariance (6, 6) over x y z rx ry rz."""
    return types.new(
        "geometry_msgs/msg/PoseWithCovarianceStamped",
        header=make_header(types, stamp, frame_id),
        pose=types.new(
            "geometry_msgs/msg/PoseWithCovariance",
            pose=make_pose(types, T),
            covariance=_covariance(covariance, "pose"),
        ),
    )


def make_path(types: Any, stamps: Sequence[float], T_map_cams: np.ndarray, frame_id: str) -> Any:
    """``nav_msgs/Path`` of poses (N, 4, 4) ``T_map_cam`` at ``stamps`` (N,) seconds.

    The header carries the last stamp (0 for an empty path).
    """
    T_all = np.asarray(T_map_cams, dtype=np.float64).reshape(-1, 4, 4)
    stamps = list(stamps)
    if len(stamps) != len(T_all):
        raise InputError(f"path has {len(stamps)} stamps but {len(T_all)} poses")
    poses = [make_pose_stamped(types, T, s, frame_id) for s, T in zip(stamps, T_all)]
    return types.new(
        "nav_msgs/msg/Path",
        header=make_header(types, stamps[-1] if stamps else 0.0, frame_id),
        poses=poses,
    )


# --------------------------------------------------------------------------- point clouds

def make_pointcloud2(
    types: Any,
    xyz: np.ndarray,
    rgb: Optional[np.ndarray],
    stamp: Any,
    frame_id: str,
) -> Any:
    """``sensor_msgs/PointCloud2`` (height 1) from points (N, 3) and colours (N, 3) uint8.

    Layout: x, y, z, rgb FLOAT32 at offsets 0/4/8/12, point_step 16, little endian; ``rgb``
    holds the bits of the uint32 ``0x00RRGGBB`` (RViz convention). Without ``rgb`` the
    cloud has x, y, z only (point_step 12).
    """
    xyz = np.asarray(xyz, dtype=np.float32).reshape(-1, 3)
    n = len(xyz)
    names = ["x", "y", "z"]
    formats = ["<f4", "<f4", "<f4"]
    if rgb is not None:
        rgb = np.asarray(rgb)
        if rgb.shape != (n, 3):
            raise InputError(f"point colours must be ({n}, 3) uint8, got shape {rgb.shape}")
        names.append("rgb")
        formats.append("<u4")
    rec = np.empty(n, dtype=np.dtype({"names": names, "formats": formats}))
    rec["x"], rec["y"], rec["z"] = xyz[:, 0], xyz[:, 1], xyz[:, 2]
    if rgb is not None:
        c = rgb.astype(np.uint32)
        rec["rgb"] = (c[:, 0] << 16) | (c[:, 1] << 8) | c[:, 2]
    step = rec.dtype.itemsize
    fields = [
        types.new("sensor_msgs/msg/PointField", name=nm, offset=4 * i, datatype=POINTFIELD_FLOAT32, count=1)
        for i, nm in enumerate(names)
    ]
    return types.new(
        "sensor_msgs/msg/PointCloud2",
        header=make_header(types, stamp, frame_id),
        height=1,
        width=n,
        fields=fields,
        is_bigendian=False,
        point_step=step,
        row_step=step * n,
        data=_u8(rec),
        is_dense=bool(np.all(np.isfinite(xyz))),
    )


def pointcloud2_to_numpy(msg: Any) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """``sensor_msgs/PointCloud2`` -> ``(xyz (N, 3) float32, rgb (N, 3) uint8 or None)``.

    Reads any layout with x, y, z fields (FLOAT32/FLOAT64) and an optional ``rgb``/``rgba``
    field (packed ``0x00RRGGBB`` bits, FLOAT32 or UINT32); handles ``row_step`` padding,
    ``height > 1`` and big-endian data. Points are returned in order, NaNs included.
    """
    fields = {str(f.name): f for f in msg.fields}
    missing = [n for n in ("x", "y", "z") if n not in fields]
    if missing:
        raise EncodingError(
            f"PointCloud2 lacks field(s) {missing}; it has {sorted(fields)} (need x, y, z [, rgb])"
        )
    order = ">" if bool(msg.is_bigendian) else "<"
    names, formats, offsets = [], [], []
    for n in ("x", "y", "z"):
        f = fields[n]
        dt = _POINTFIELD_DTYPES.get(int(f.datatype))
        if dt not in ("f4", "f8"):
            raise EncodingError(f"PointCloud2 field {n} has datatype {int(f.datatype)}; expected FLOAT32 or FLOAT64")
        names.append(n)
        formats.append(order + dt)
        offsets.append(int(f.offset))
    colour = next((fields[n] for n in ("rgb", "rgba") if n in fields), None)
    if colour is not None:
        names.append("rgb")
        formats.append(order + "u4")
        offsets.append(int(colour.offset))
    point_step = int(msg.point_step)
    h, w = int(msg.height), int(msg.width)
    row_step = int(msg.row_step) or point_step * w
    if any(o + np.dtype(f).itemsize > point_step for o, f in zip(offsets, formats)):
        raise EncodingError(f"PointCloud2 fields overrun point_step {point_step}")
    dtype = np.dtype({"names": names, "formats": formats, "offsets": offsets, "itemsize": point_step})
    buf = _as_bytes_array(msg.data)
    if h * w and buf.size < (h - 1) * row_step + w * point_step:
        raise EncodingError(f"PointCloud2 data has {buf.size} bytes, expected {h * row_step}")
    if h * w == 0:
        return np.zeros((0, 3), np.float32), (np.zeros((0, 3), np.uint8) if colour is not None else None)
    if buf.size < h * row_step:
        buf = np.concatenate([buf, np.zeros(h * row_step - buf.size, np.uint8)])
    rows = buf[: h * row_step].reshape(h, row_step)[:, : w * point_step]
    rec = np.ascontiguousarray(rows).reshape(-1).view(dtype)
    xyz = np.stack([rec["x"], rec["y"], rec["z"]], axis=1).astype(np.float32)
    rgb = None
    if colour is not None:
        v = rec["rgb"].astype(np.uint32)
        rgb = np.stack([(v >> 16) & 255, (v >> 8) & 255, v & 255], axis=1).astype(np.uint8)
    return xyz, rgb


# --------------------------------------------------------------------------- markers

def _color(types: Any, rgba: Sequence[float]) -> Any:
    return types.new(
        "std_msgs/msg/ColorRGBA", r=float(rgba[0]), g=float(rgba[1]), b=float(rgba[2]), a=float(rgba[3])
    )


def frustum_lines(T_map_cam: np.ndarray, camera: PinholeCamera, scale: float) -> np.ndarray:
    """(16, 3) end points of the 8 segments of a camera frustum of depth ``scale`` m, in the map frame."""
    u1, v1 = camera.width - 0.5, camera.height - 0.5
    corners_px = np.array([[-0.5, -0.5], [u1, -0.5], [u1, v1], [-0.5, v1]])
    rays = np.column_stack(
        [(corners_px[:, 0] - camera.cx) / camera.fx, (corners_px[:, 1] - camera.cy) / camera.fy, np.ones(4)]
    )
    pts_cam = np.vstack([np.zeros(3), rays * scale])  # apex, 4 corners
    T = np.asarray(T_map_cam, dtype=np.float64)
    pts = pts_cam @ T[:3, :3].T + T[:3, 3]
    segs = [(0, 1), (0, 2), (0, 3), (0, 4), (1, 2), (2, 3), (3, 4), (4, 1)]
    return np.array([pts[i] for s in segs for i in s])


def make_frustum_markers(
    types: Any,
    T_map_cams: np.ndarray,
    camera: PinholeCamera,
    stamp: Any,
    frame_id: str,
    edges: Optional[Sequence[tuple[int, int]]] = None,
    *,
    ids: Optional[Sequence[int]] = None,
    scale: float = 0.1,
    line_width: float = 0.005,
    color: Sequence[float] = (0.1, 0.8, 0.2, 1.0),
    edge_color: Sequence[float] = (1.0, 0.6, 0.0, 1.0),
    namespace: str = "keyframes",
) -> Any:
    """``visualization_msgs/MarkerArray`` of keyframe frustums.

    Markers: a ``DELETEALL`` first (clears earlier ones), then one ``LINE_LIST`` per
    keyframe (namespace ``namespace``, id = ``ids[k]`` or ``k``) drawn from (K, 4, 4)
    ``T_map_cam`` with depth ``scale`` m, then, when ``edges`` (pairs of indices into
    ``T_map_cams``) is non-empty, one ``LINE_LIST`` (namespace ``<namespace>_edges``, id 0)
    joining the camera centres of each edge. All points are in ``frame_id``.
    """
    T_all = np.asarray(T_map_cams, dtype=np.float64).reshape(-1, 4, 4)
    ids = list(range(len(T_all))) if ids is None else [int(i) for i in ids]
    if len(ids) != len(T_all):
        raise InputError(f"{len(ids)} marker ids for {len(T_all)} keyframes")
    header = make_header(types, stamp, frame_id)
    identity = types.new(
        "geometry_msgs/msg/Pose", position=_point(types, (0, 0, 0)), orientation=_quaternion(types, (0, 0, 0, 1))
    )

    def line_list(ns: str, mid: int, pts: np.ndarray, rgba: Sequence[float]) -> Any:
        return types.new(
            "visualization_msgs/msg/Marker",
            header=make_header(types, stamp, frame_id),
            ns=ns,
            id=int(mid),
            type=MARKER_LINE_LIST,
            action=MARKER_ADD,
            pose=identity,
            scale=_vector3(types, (line_width, 0.0, 0.0)),
            color=_color(types, rgba),
            points=[_point(types, p) for p in pts],
        )

    markers = [
        types.new(
            "visualization_msgs/msg/Marker",
            header=header,
            ns="",
            id=0,
            action=MARKER_DELETEALL,
            pose=identity,
        )
    ]
    for mid, T in zip(ids, T_all):
        markers.append(line_list(namespace, mid, frustum_lines(T, camera, scale), color))
    if edges:
        pts = []
        for i, j in edges:
            if not (0 <= int(i) < len(T_all) and 0 <= int(j) < len(T_all)):
                raise InputError(f"graph edge ({i}, {j}) refers to a keyframe outside 0..{len(T_all) - 1}")
            pts.extend([T_all[int(i)][:3, 3], T_all[int(j)][:3, 3]])
        markers.append(line_list(f"{namespace}_edges", 0, np.asarray(pts), edge_color))
    return types.new("visualization_msgs/msg/MarkerArray", markers=markers)


__all__ = [
    "SUPPORTED_IMAGE_ENCODINGS",
    "DEPTH_ENCODINGS",
    "COLOUR_ENCODINGS",
    "SUPPORTED_DISTORTION_MODELS",
    "RosbagsTypes",
    "RclpyTypes",
    "sec_to_ns",
    "ns_to_sec",
    "sec_to_stamp_parts",
    "stamp_to_sec",
    "stamp_to_ns",
    "make_header",
    "image_to_array",
    "image_to_numpy",
    "image_to_rgb",
    "depth_to_metres",
    "compressed_image_to_numpy",
    "compressed_depth_to_metres",
    "image_msg_to_rgb",
    "depth_msg_to_metres",
    "metres_to_millimetres",
    "make_image",
    "make_compressed_image",
    "make_compressed_depth",
    "camera_info_to_camera",
    "camera_info_baseline",
    "make_camera_info",
    "transform_to_matrix",
    "pose_to_matrix",
    "make_pose",
    "make_transform_stamped",
    "make_tf_message",
    "make_odometry",
    "make_pose_stamped",
    "make_pose_with_covariance_stamped",
    "make_path",
    "make_pointcloud2",
    "pointcloud2_to_numpy",
    "frustum_lines",
    "make_frustum_markers",
]
