"""A plain folder of images (``*.png``, ``*.jpg``, ``*.jpeg``) with a calibration file.

Calibration: the ``calib`` argument, else ``intrinsics.yaml`` / ``calibration.yaml`` /
``camera.yaml`` in the folder (keys ``width height fx fy cx cy [distortion]`` or ROS
camera_info YAML), else :class:`CalibrationError`.

Order and stamps: when every file name (without suffix) is a number, images are sorted by
that number and stamps come from it:

* names with a decimal point (``1311868164.363181.png``) are seconds;
* integer names are read by magnitude: >= 1e17 nanoseconds (EuRoC-style), >= 1e14
  microseconds, >= 1e11 milliseconds, >= 1e8 seconds (Unix time); smaller integers are
  frame numbers and give ``number / fps``.

Otherwise images are sorted by name (digit runs compared as numbers, ``img2`` < ``img10``)
and stamps are ``position / fps``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import numpy as np

from recon_slam.errors import CalibrationError, InputError, StampError
from recon_slam.io.datasets.base import CalibLike, FrameSource, list_images, load_calib, read_color
from recon_slam.io.frame import Frame

CALIB_FILE_NAMES = ("intrinsics.yaml", "calibration.yaml", "camera.yaml")

_NUMBER = re.compile(r"^\d+(\.\d+)?$")


def is_image_folder(path: Path) -> bool:
    """True for a folder containing at least one png/jpg image."""
    return path.is_dir() and bool(list_images(path))


def stamps_from_names(names: list[str], fps: float) -> Optional[np.ndarray]:
    """Stamps (N,) seconds from numeric file stems (see module docstring), or None if not all numeric."""
    if not names or not all(_NUMBER.match(n) for n in names):
        return None
    if any("." in n for n in names):
        return np.array([float(n) for n in names])
    values = [int(n) for n in names]
    top = max(values)
    if top >= 10**17:
        return np.array([v / 1e9 for v in values])
    if top >= 10**14:
        return np.array([v / 1e6 for v in values])
    if top >= 10**11:
        return np.array([v / 1e3 for v in values])
    if top >= 10**8:
        return np.array([float(v) for v in values])
    return np.array([v / fps for v in values])


def _natural_key(name: str):
    return [(0, int(tok), "") if tok.isdigit() else (1, 0, tok.lower()) for tok in re.split(r"(\d+)", name) if tok]


class ImageFolderSource(FrameSource):
    """Monocular frames from a folder of images.

    Args:
        path: the folder.
        calib: calibration YAML path (or camera / mapping); default: a calibration file in the folder.
        fps: frame rate for stamps when the file names are not stamps.
        stride, max_frames, undistort: see :mod:`recon_slam.io.datasets.base`.

    Frames: ``image`` (H, W, 3) uint8 RGB; no depth, stereo or ground truth.
    """

    layout = "image_folder"

    def __init__(
        self,
        path,
        *,
        calib: CalibLike = None,
        fps: float = 30.0,
        stride: int = 1,
        max_frames: Optional[int] = None,
        undistort: bool = True,
    ) -> None:
        super().__init__(stride=stride, max_frames=max_frames, undistort=undistort)
        self.root = Path(path)
        if not self.root.is_dir():
            raise InputError(f"image folder {self.root} not found: check the path")
        if not fps or fps <= 0:
            raise InputError(f"fps={fps!r} is invalid: give a positive frame rate")
        images = list_images(self.root)
        if not images:
            raise InputError(f"{self.root} holds no .png/.jpg/.jpeg images: check the path")
        self.name = self.root.resolve().name

        stems = [p.stem for p in images]
        stamps = stamps_from_names(stems, float(fps))
        if stamps is not None:
            order = np.argsort(stamps, kind="stable")
            self._paths = [images[i] for i in order]
            self._stamps = stamps[order]
            dup = np.nonzero(np.diff(self._stamps) <= 0)[0]
            if len(dup):
                a, b = self._paths[dup[0]], self._paths[dup[0] + 1]
                raise StampError(
                    f"images {a.name} and {b.name} in {self.root} have the same stamp {self._stamps[dup[0]]:.9f}: "
                    "remove the duplicate file"
                )
        else:
            self._paths = sorted(images, key=lambda p: _natural_key(p.name))
            self._stamps = np.arange(len(self._paths), dtype=np.float64) / float(fps)

        if calib is None:
            for name in CALIB_FILE_NAMES:
                if (self.root / name).is_file():
                    calib = self.root / name
                    break
        camera, _ = load_calib(calib)
        if camera is None:
            raise CalibrationError(
                f"no calibration for image folder {self.root}: put intrinsics.yaml (width, height, fx, fy, cx, cy, "
                "distortion) in the folder or give --calib intrinsics.yaml"
            )
        self._raw_camera = camera
        self._set_remapper(camera)

    # ------------------------------------------------------------------ FrameSource hooks
    def _raw_count(self) -> int:
        return len(self._paths)

    def _raw_stamp(self, raw: int) -> float:
        return float(self._stamps[raw])

    def _read_frame(self, raw: int, index: int) -> Frame:
        image = self._remap.image(read_color(self._paths[raw], self._raw_camera.size))
        return Frame(index=index, stamp=float(self._stamps[raw]), image=image, camera=self.camera)
