"""The :class:`FrameSource` base class and helpers shared by the dataset readers.

A frame source is an iterable of :class:`~recon_slam.io.frame.Frame` objects. Readers index
their sequence once when constructed (text files only) and decode images lazily, one frame
per iteration step, so a whole sequence is never held in memory.

Common constructor options of every reader:

* ``stride`` (int, >= 1): keep every ``stride``-th frame of the sequence.
* ``max_frames`` (int or None): stop after this many yielded frames.
* ``undistort`` (bool): remove lens distortion from images (bilinear) and depth
  (nearest-neighbour) with :meth:`PinholeCamera.undistortion_maps`; the source's ``camera``
  then has no distortion. With ``undistort=False`` images are yielded as stored and
  ``camera`` keeps the distortion coefficients.
* ``calib``: a calibration YAML path (or a :class:`PinholeCamera` / mapping) that provides
  or overrides the intrinsics of the stored images.

``Frame.index`` is the position of the frame in the *yielded* stream (0, 1, 2, ... after
``stride``), ``Frame.stamp`` its time in seconds.
"""

from __future__ import annotations

import abc
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence, Union

import cv2
import numpy as np
from scipy.spatial.transform import Rotation

from recon_slam.errors import CalibrationError, EncodingError, InputError, StampError
from recon_slam.geometry.camera import PinholeCamera
from recon_slam.io.frame import Frame

CalibLike = Union[str, os.PathLike, PinholeCamera, Mapping[str, Any], None]

#: Image file suffixes the readers accept (lower case).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


# ---------------------------------------------------------------------------------- base class
class FrameSource(abc.ABC):
    """Base class of every frame reader (datasets and bags).

    Subclasses fill ``name``, ``has_depth``, ``has_stereo``, ``has_ground_truth`` and the
    output camera (via :meth:`_set_remapper`), and implement :meth:`_raw_count`,
    :meth:`_raw_stamp`, :meth:`_raw_gt` and :meth:`_read_frame`. The base class applies
    ``stride`` / ``max_frames`` and builds :meth:`ground_truth`.
    """

    #: short layout name ("tum", "7scenes", "kitti", "euroc", "image_folder", ...).
    layout: str = "unknown"

    def __init__(self, *, stride: int = 1, max_frames: Optional[int] = None, undistort: bool = True) -> None:
        if isinstance(stride, bool) or not isinstance(stride, (int, np.integer)) or stride < 1:
            raise InputError(f"stride={stride!r} is invalid: give a whole number >= 1")
        if max_frames is not None and (
            isinstance(max_frames, bool) or not isinstance(max_frames, (int, np.integer)) or max_frames < 0
        ):
            raise InputError(f"max_frames={max_frames!r} is invalid: give a whole number >= 0 or leave it unset")
        self.stride = int(stride)
        self.max_frames = None if max_frames is None else int(max_frames)
        self.undistort = bool(undistort)
        self.name: str = ""
        self.has_depth: bool = False
        self.has_stereo: bool = False
        self.has_ground_truth: bool = False
        self._remap: Optional[Remapper] = None

    # ------------------------------------------------------------------ public API
    @property
    def camera(self) -> PinholeCamera:
        """Intrinsics of the yielded images (after undistortion / rectification)."""
        if self._remap is None:  # pragma: no cover - a subclass bug, not a user error
            raise RuntimeError(f"{type(self).__name__} did not set its camera")
        return self._remap.camera

    def indices(self) -> list[int]:
        """Raw sequence positions of the yielded frames, in order (after stride / max_frames)."""
        idx = list(range(0, self._raw_count(), self.stride))
        if self.max_frames is not None:
            idx = idx[: self.max_frames]
        return idx

    def __len__(self) -> int:
        """Number of frames :meth:`__iter__` yields."""
        return len(self.indices())

    def __iter__(self) -> Iterator[Frame]:
        """Yield the frames one by one, decoding each image when it is reached."""
        for out_index, raw in enumerate(self.indices()):
            yield self._read_frame(raw, out_index)

    def ground_truth(self) -> Optional[tuple[np.ndarray, np.ndarray]]:
        """Ground truth of the yielded frames that have one.

        Returns:
            ``(stamps (N,) float64 seconds, T_world_cam (N, 4, 4) float64)`` of the optical
            frame of the yielded camera (after rectification), at the frame stamps; ``None``
            when the source has no ground truth.
        """
        if not self.has_ground_truth:
            return None
        stamps, poses = [], []
        for raw in self.indices():
            T = self._raw_gt(raw)
            if T is not None:
                stamps.append(self._raw_stamp(raw))
                poses.append(T)
        if not poses:
            return np.zeros(0), np.zeros((0, 4, 4))
        return np.asarray(stamps, dtype=np.float64), np.stack(poses).astype(np.float64)

    def __repr__(self) -> str:
        cam = self.camera
        return (
            f"{type(self).__name__}(name={self.name!r}, frames={len(self)}, {cam.width}x{cam.height}, "
            f"depth={self.has_depth}, stereo={self.has_stereo}, gt={self.has_ground_truth})"
        )

    # ------------------------------------------------------------------ subclass hooks
    @abc.abstractmethod
    def _raw_count(self) -> int:
        """Number of frames in the whole sequence (before stride / max_frames)."""

    @abc.abstractmethod
    def _raw_stamp(self, raw: int) -> float:
        """Stamp in seconds of raw frame ``raw``."""

    def _raw_gt(self, raw: int) -> Optional[np.ndarray]:
        """(4, 4) T_world_cam of raw frame ``raw`` (yielded optical frame) or None."""
        return None

    @abc.abstractmethod
    def _read_frame(self, raw: int, index: int) -> Frame:
        """Decode raw frame ``raw`` and return it as the ``index``-th yielded frame."""

    def _set_remapper(self, camera: PinholeCamera) -> None:
        """Use ``camera`` (intrinsics of the stored images) and undistort if asked to."""
        self._remap = Remapper.for_camera(camera, self.undistort)


# ---------------------------------------------------------------------------------- remapping
@dataclass
class Remapper:
    """Pixel remapping of stored images into the yielded camera.

    Attributes:
        camera: intrinsics of the remapped (yielded) images.
        map_x, map_y: (H, W) float32 ``cv2.remap`` tables, or None for the identity.
        source_size: (width, height) of the stored images.
    """

    camera: PinholeCamera
    map_x: Optional[np.ndarray]
    map_y: Optional[np.ndarray]
    source_size: tuple[int, int]

    @classmethod
    def for_camera(cls, camera: PinholeCamera, undistort: bool) -> "Remapper":
        """Identity for undistorted cameras or ``undistort=False``, else undistortion maps."""
        if not undistort or not camera.has_distortion:
            return cls(camera, None, None, camera.size)
        map_x, map_y, out = camera.undistortion_maps()
        return cls(out, map_x, map_y, camera.size)

    def image(self, image: np.ndarray) -> np.ndarray:
        """Remap an (H, W[, C]) image bilinearly (border pixels without source become 0)."""
        if self.map_x is None:
            return image
        return cv2.remap(image, self.map_x, self.map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)

    def depth(self, depth: np.ndarray) -> np.ndarray:
        """Remap an (H, W) float32 depth map with nearest-neighbour (no mixed depths)."""
        if self.map_x is None:
            return depth
        return cv2.remap(depth, self.map_x, self.map_y, cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT)


# ---------------------------------------------------------------------------------- images
def _read_raw(path: Path) -> np.ndarray:
    """cv2.imread(IMREAD_UNCHANGED) with errors that name the file."""
    if not path.is_file():
        raise InputError(f"image {path} not found: the dataset is incomplete; re-download or re-extract it")
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise InputError(
            f"cannot decode image {path}: the file is truncated or not an image; re-download or re-extract it"
        )
    return img


def _check_size(img: np.ndarray, path: Path, size: Optional[tuple[int, int]]) -> None:
    if size is not None and (img.shape[1], img.shape[0]) != tuple(size):
        raise CalibrationError(
            f"image {path} is {img.shape[1]}x{img.shape[0]} but the calibration is for {size[0]}x{size[1]}: "
            "give --calib FILE with the intrinsics of these images"
        )


def read_color(path: Union[str, Path], size: Optional[tuple[int, int]] = None) -> np.ndarray:
    """Read a colour or grey image file as (H, W, 3) uint8 RGB.

    Grey images are replicated to 3 channels, alpha is dropped, 16-bit images are reduced
    to 8 bits (value >> 8). ``size`` = (width, height) the image must have, if given.
    """
    path = Path(path)
    img = _read_raw(path)
    _check_size(img, path, size)
    if img.dtype == np.uint16:
        img = (img >> 8).astype(np.uint8)
    elif img.dtype != np.uint8:
        raise EncodingError(f"image {path} has pixel type {img.dtype}; expected 8- or 16-bit integers")
    if img.ndim == 2:
        return np.repeat(img[:, :, None], 3, axis=2)
    channels = img.shape[2]
    if channels == 1:
        return np.repeat(img, 3, axis=2)
    if channels == 3:
        return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    if channels == 4:
        return cv2.cvtColor(img, cv2.COLOR_BGRA2RGB)
    raise EncodingError(f"image {path} has {channels} channels; expected 1 (grey), 3 (BGR) or 4 (BGRA)")


def read_depth(
    path: Union[str, Path],
    scale: float,
    invalid: Optional[int] = None,
    size: Optional[tuple[int, int]] = None,
) -> np.ndarray:
    """Read a 16-bit depth PNG as (H, W) float32 metres (value / ``scale``).

    ``0`` stays 0 (no reading); pixels equal to ``invalid`` (e.g. 65535) also become 0.
    Float depth images (e.g. 32-bit EXR/TIFF) are taken as metres; NaN/inf -> 0.
    """
    path = Path(path)
    raw = _read_raw(path)
    _check_size(raw, path, size)
    if raw.ndim == 3:
        if raw.shape[2] != 1:
            raise EncodingError(
                f"depth image {path} has {raw.shape[2]} channels; expected a single-channel 16-bit PNG"
            )
        raw = raw[:, :, 0]
    if raw.dtype in (np.float32, np.float64):
        depth = raw.astype(np.float32)
    elif raw.dtype == np.uint16:
        depth = raw.astype(np.float32) / np.float32(scale)
        if invalid is not None:
            depth[raw == invalid] = 0.0
    else:
        raise EncodingError(
            f"depth image {path} has pixel type {raw.dtype}; expected 16-bit integers (a depth PNG) "
            "— an 8-bit image is not a depth map"
        )
    depth[~np.isfinite(depth)] = 0.0
    depth[depth < 0] = 0.0
    return depth


def list_images(folder: Path) -> list[Path]:
    """Image files (png/jpg/jpeg) directly inside ``folder``, unsorted."""
    return [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]


# ---------------------------------------------------------------------------------- text files
def read_table(path: Path, min_cols: int, what: str) -> list[tuple[int, list[str]]]:
    """Rows of a whitespace or comma separated text file, skipping blanks and ``#`` comments.

    Returns ``[(line number, fields), ...]``; raises :class:`InputError` naming the file and
    line when a row has fewer than ``min_cols`` fields. ``what`` describes the expected row.
    """
    if not path.is_file():
        raise InputError(f"{path} not found: expected {what}")
    rows = []
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read {path} ({exc}): expected a text file with {what}") from None
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#") or line.startswith("%"):
            continue
        fields = line.replace(",", " ").split()
        if len(fields) < min_cols:
            raise InputError(f"{path}:{lineno}: expected {what}, got {line!r}")
        rows.append((lineno, fields))
    return rows


def parse_float(text: str, path: Path, lineno: int) -> float:
    """``float(text)`` with an :class:`InputError` naming the file and line."""
    try:
        value = float(text)
    except ValueError:
        raise InputError(f"{path}:{lineno}: {text!r} is not a number") from None
    if not math.isfinite(value):
        raise InputError(f"{path}:{lineno}: {text!r} is not a finite number")
    return value


def check_increasing(stamps: Sequence[float], path: Path, linenos: Sequence[int]) -> None:
    """Raise :class:`StampError` at the first stamp not strictly after its predecessor."""
    s = np.asarray(stamps, dtype=np.float64)
    if len(s) < 2:
        return
    bad = np.nonzero(np.diff(s) <= 0)[0]
    if len(bad):
        i = int(bad[0]) + 1
        verb = "goes backwards" if s[i] < s[i - 1] else "repeats"
        raise StampError(
            f"{path}:{linenos[i]}: stamp {s[i]:.9f} {verb} (previous {s[i - 1]:.9f} on line {linenos[i - 1]}); "
            "rows must be sorted by increasing time: sort the file or remove the duplicate row"
        )


# ---------------------------------------------------------------------------------- calibration
def load_calib(calib: CalibLike, source: str = "calibration") -> tuple[Optional[PinholeCamera], dict]:
    """Calibration from a YAML path, a :class:`PinholeCamera` or a mapping.

    Returns ``(camera or None, extra)`` where ``extra`` is the raw mapping (empty for a
    camera object), so readers can pick dataset keys such as ``depth_scale``.
    """
    if calib is None:
        return None, {}
    if isinstance(calib, PinholeCamera):
        return calib, {}
    if isinstance(calib, Mapping):
        return PinholeCamera.from_dict(calib, source=source), dict(calib)
    path = Path(calib)
    data = read_yaml(path, kind=CalibrationError)
    return PinholeCamera.from_dict(data, source=str(path)), dict(data)


def read_yaml(path: Path, kind: type = InputError) -> dict:
    """Parse a YAML mapping (OpenCV ``%YAML:1.0`` headers tolerated); errors name the file."""
    import yaml

    if not path.is_file():
        raise kind(f"{path} not found: check the path (a calibration YAML needs width, height, fx, fy, cx, cy)")
    text = "\n".join(line for line in path.read_text().splitlines() if not line.startswith("%"))
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise kind(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(data, Mapping):
        raise kind(f"{path}: expected a YAML mapping")
    return dict(data)


# ---------------------------------------------------------------------------------- stamps and poses
def associate_stamps(a: np.ndarray, b: np.ndarray, max_dt: float) -> list[tuple[int, int]]:
    """One-to-one association of two stamp lists by nearest time.

    Args:
        a: (N,) sorted stamps, b: (M,) sorted stamps (seconds).
        max_dt: largest accepted |a_i - b_j|.

    Returns:
        ``[(i, j), ...]`` sorted by ``i``; closest pairs win when two compete for a stamp.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if len(a) == 0 or len(b) == 0:
        return []
    pos = np.searchsorted(b, a)
    candidates = []
    for i, p in enumerate(pos):
        for j in (p - 1, p, p + 1):
            if 0 <= j < len(b):
                dt = abs(a[i] - b[j])
                if dt <= max_dt:
                    candidates.append((dt, i, int(j)))
    candidates.sort()
    used_a, used_b, pairs = set(), set(), []
    for _, i, j in candidates:
        if i not in used_a and j not in used_b:
            used_a.add(i)
            used_b.add(j)
            pairs.append((i, j))
    pairs.sort()
    return pairs


def interpolate_poses(
    query: np.ndarray, stamps: np.ndarray, poses: np.ndarray, max_dt: float, max_gap: float
) -> list[Optional[np.ndarray]]:
    """Poses at query stamps from a sampled trajectory.

    A query gets a pose when its nearest sample lies within ``max_dt``. When it lies between
    two samples at most ``max_gap`` apart, translation is interpolated linearly and rotation
    by slerp; otherwise the nearest sample is taken.

    Args:
        query: (Q,) stamps; stamps: (N,) increasing stamps; poses: (N, 4, 4).

    Returns:
        list of Q entries, each a (4, 4) float64 pose or None.
    """
    query = np.asarray(query, dtype=np.float64)
    stamps = np.asarray(stamps, dtype=np.float64)
    out: list[Optional[np.ndarray]] = [None] * len(query)
    if len(stamps) == 0:
        return out
    rots = Rotation.from_matrix(poses[:, :3, :3])
    hi = np.searchsorted(stamps, query)  # first sample >= query
    for q, (t, h) in enumerate(zip(query, hi)):
        lo = h - 1
        d_lo = t - stamps[lo] if lo >= 0 else np.inf
        d_hi = stamps[h] - t if h < len(stamps) else np.inf
        if min(d_lo, d_hi) > max_dt:
            continue
        if d_hi == 0.0 or (np.isfinite(d_hi) and not np.isfinite(d_lo)):
            out[q] = poses[h].copy()
        elif d_lo == 0.0 or not np.isfinite(d_hi):
            out[q] = poses[lo].copy()
        elif stamps[h] - stamps[lo] <= max_gap:
            a = d_lo / (stamps[h] - stamps[lo])
            r0 = rots[lo]
            rel = (r0.inv() * rots[h]).as_rotvec()
            T = np.eye(4)
            T[:3, :3] = (r0 * Rotation.from_rotvec(a * rel)).as_matrix()
            T[:3, 3] = (1 - a) * poses[lo, :3, 3] + a * poses[h, :3, 3]
            out[q] = T
        else:
            out[q] = poses[lo].copy() if d_lo <= d_hi else poses[h].copy()
    return out


def image_size(path: Union[str, Path]) -> tuple[int, int]:
    """(width, height) of an image file; reads only the header of PNGs, decodes others."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"image {path} not found: the dataset is incomplete; re-download or re-extract it")
    with open(path, "rb") as fh:
        head = fh.read(24)
    if head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR":
        return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    img = _read_raw(path)
    return img.shape[1], img.shape[0]
