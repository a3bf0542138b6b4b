"""Dataset readers: every reader is a :class:`FrameSource` yielding :class:`~recon_slam.io.frame.Frame`.

:func:`open_source` detects the layout of a path and opens the matching reader:

==============  ===============================================================  ===================
layout          recognised by                                                     reader
==============  ===============================================================  ===================
rosbag2         folder with ``metadata.yaml``, or a ``.mcap`` / ``.db3`` file     ``BagSource``
TUM RGB-D       ``rgb.txt`` (+ ``depth.txt``) or ``associate.txt``               :class:`TumSource`
7-Scenes        ``seq-XX/frame-000000.color.png`` or a scene with ``seq-*``       :class:`SevenScenesSource`
KITTI odometry  ``calib.txt`` + ``times.txt`` + ``image_0/`` or ``image_2/``      :class:`KittiSource`
EuRoC / ASL     ``mav0/cam0/data.csv`` (or ``cam0/data.csv`` inside ``mav0``)     :class:`EurocSource`
image folder    ``*.png`` / ``*.jpg`` files + a calibration YAML or ``calib``     :class:`ImageFolderSource`
==============  ===============================================================  ===================
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from recon_slam.errors import InputError
from recon_slam.io.datasets.base import FrameSource
from recon_slam.io.datasets.euroc import EurocSource, euroc_root
from recon_slam.io.datasets.image_folder import ImageFolderSource, is_image_folder
from recon_slam.io.datasets.kitti import KittiSource, is_kitti
from recon_slam.io.datasets.seven_scenes import (
    SevenScenesSource,
    is_seven_scenes_scene,
    is_seven_scenes_sequence,
)
from recon_slam.io.datasets.tum import TumSource, is_tum

__all__ = [
    "FrameSource",
    "TumSource",
    "SevenScenesSource",
    "KittiSource",
    "EurocSource",
    "ImageFolderSource",
    "open_source",
    "detect_layout",
    "BAG_SUFFIXES",
]

#: File suffixes of single-file rosbag2 storage.
BAG_SUFFIXES = (".mcap", ".db3")

_LAYOUTS_HELP = (
    "rosbag2 (folder with metadata.yaml, or a .mcap/.db3 file); "
    "TUM RGB-D (rgb.txt + depth.txt, or associate.txt); "
    "7-Scenes (seq-XX/frame-000000.color.png, or a scene folder with seq-* and TrainSplit.txt/TestSplit.txt); "
    "KITTI odometry (sequences/XX with calib.txt, times.txt, image_0/ or image_2/); "
    "EuRoC/ASL (mav0/cam0/data.csv); "
    "image folder (*.png/*.jpg with intrinsics.yaml, calibration.yaml or camera.yaml, or --calib)"
)


def detect_layout(path: str | Path) -> str:
    """Layout name of ``path``: "bag", "tum", "7scenes", "kitti", "euroc" or "image_folder".

    Raises :class:`InputError` when the path is missing or matches no layout.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path} not found: give a dataset folder, an image folder or a rosbag2")
    if path.is_file():
        if path.suffix.lower() in BAG_SUFFIXES:
            return "bag"
        raise InputError(f"{path} is a file but not a rosbag2 (.mcap/.db3); the readers look for: {_LAYOUTS_HELP}")
    if (path / "metadata.yaml").is_file():
        return "bag"
    if is_tum(path):
        return "tum"
    if is_seven_scenes_sequence(path) or is_seven_scenes_scene(path):
        return "7scenes"
    if is_kitti(path):
        return "kitti"
    if euroc_root(path) is not None:
        return "euroc"
    if is_image_folder(path):
        return "image_folder"
    raise InputError(f"{path}: unknown dataset layout; looked for {_LAYOUTS_HELP}")


def open_source(path: str | Path, *, calib: Any = None, **kwargs: Any) -> FrameSource:
    """Open the frame reader matching the layout of ``path`` (see :func:`detect_layout`).

    Args:
        path: dataset folder, image folder or rosbag2 (folder or .mcap/.db3 file).
        calib: optional calibration YAML path (or :class:`PinholeCamera`) overriding/providing
            the intrinsics of the stored images.
        **kwargs: reader options (``stride``, ``max_frames``, ``undistort`` for all readers;
            e.g. ``max_dt`` for TUM, ``sequences`` for 7-Scenes, ``poses`` for KITTI).

    Returns:
        A :class:`FrameSource`.
    """
    layout = detect_layout(path)
    if layout == "bag":
        from recon_slam.io.bag_reader import BagSource

        return BagSource(path, calib=calib, **kwargs)
    reader = {
        "tum": TumSource,
        "7scenes": SevenScenesSource,
        "kitti": KittiSource,
        "euroc": EurocSource,
        "image_folder": ImageFolderSource,
    }[layout]
    accepted = [n for n, prm in inspect.signature(reader).parameters.items() if prm.kind == prm.KEYWORD_ONLY]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise InputError(
            f"option {unknown[0]!r} does not apply to {path} (detected layout {layout}); "
            f"its reader accepts: {', '.join(accepted)}"
        )
    return reader(path, calib=calib, **kwargs)
