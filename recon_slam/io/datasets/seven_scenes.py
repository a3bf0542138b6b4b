"""Microsoft 7-Scenes RGB-D relocalisation dataset (Shotton et al., CVPR 2013).

Layout::

    <scene>/TrainSplit.txt, TestSplit.txt     ("sequence1", "sequence2", ... per line)
    <scene>/seq-01/frame-000000.color.png     640x480 RGB
                  /frame-000000.depth.png     16-bit millimetres, 65535 = no reading
                  /frame-000000.pose.txt      4x4 camera-to-world (T_world_cam)

Approximation (documented): depth comes from the Kinect depth camera and is *not*
registered to the colour image (depth camera fx = fy = 585, cx = 320, cy = 240). Like most
relocalisation work we treat depth as registered and use the commonly used colour
intrinsics fx = fy = 525, cx = 320, cy = 240, no distortion (:data:`SEVEN_SCENES_CAMERA`);
give ``calib`` to use other values. The stamps are ``frame number / 30`` (the dataset stores
none); several sequences are concatenated with continuing stamps.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from recon_slam.errors import InputError
from recon_slam.geometry.camera import PinholeCamera
from recon_slam.io.datasets.base import CalibLike, FrameSource, load_calib, read_color, read_depth
from recon_slam.io.frame import Frame

#: Colour intrinsics used for 7-Scenes (depth treated as registered to colour).
SEVEN_SCENES_CAMERA = PinholeCamera(640, 480, 525.0, 525.0, 320.0, 240.0)
#: Frame rate used to make stamps (Kinect, 30 Hz).
SEVEN_SCENES_FPS = 30.0
#: Depth PNG value per metre (millimetres) and the "no reading" value.
SEVEN_SCENES_DEPTH_SCALE = 1000.0
SEVEN_SCENES_INVALID_DEPTH = 65535

_FRAME = re.compile(r"^frame-(\d+)\.color\.png$")
_SEQ = re.compile(r"^seq-(\d+)$")


def is_seven_scenes_sequence(path: Path) -> bool:
    """True for a folder holding ``frame-000000.color.png``."""
    return path.is_dir() and (path / "frame-000000.color.png").is_file()


def is_seven_scenes_scene(path: Path) -> bool:
    """True for a scene folder with ``seq-*`` sequence folders (and/or the split files)."""
    if not path.is_dir():
        return False
    seqs = [p for p in path.iterdir() if _SEQ.match(p.name) and p.is_dir()]
    return bool(seqs) and (
        (path / "TrainSplit.txt").is_file()
        or (path / "TestSplit.txt").is_file()
        or any(is_seven_scenes_sequence(s) for s in seqs)
    )


def _read_split(path: Path) -> list[int]:
    if not path.is_file():
        raise InputError(f"{path} not found: the 7-Scenes scene folder needs it to pick the train/test sequences")
    numbers = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        m = re.fullmatch(r"sequence\s*(\d+)", line, re.IGNORECASE)
        if not m:
            raise InputError(f"{path}:{lineno}: expected 'sequenceN', got {line!r}")
        numbers.append(int(m.group(1)))
    return numbers


class SevenScenesSource(FrameSource):
    """Frames of a 7-Scenes sequence folder (``seq-XX``) or of a scene folder.

    Args:
        path: a ``seq-XX`` folder or a scene folder with ``seq-*`` sub-folders.
        sequences: for a scene folder: ``None`` (all ``seq-*``), ``"train"`` / ``"test"``
            (from TrainSplit.txt / TestSplit.txt), or a list of sequence numbers / folder names.
        calib: intrinsics overriding :data:`SEVEN_SCENES_CAMERA`.
        stride, max_frames, undistort: see :mod:`recon_slam.io.datasets.base`.

    Frames: ``image`` (480, 640, 3) uint8 RGB, ``depth`` (480, 640) float32 metres (0 = none),
    ``T_world_cam_gt`` (4, 4) from ``frame-XXXXXX.pose.txt``, ``stamp`` = frame count / 30.
    """

    layout = "7scenes"

    def __init__(
        self,
        path,
        *,
        sequences: Union[None, str, Sequence[Union[int, str]]] = None,
        calib: CalibLike = None,
        stride: int = 1,
        max_frames: Optional[int] = None,
        undistort: bool = True,
    ) -> None:
        super().__init__(stride=stride, max_frames=max_frames, undistort=undistort)
        root = Path(path)
        if not root.is_dir():
            raise InputError(f"7-Scenes folder {root} not found: check the path")
        if is_seven_scenes_sequence(root):
            if sequences is not None:
                raise InputError(
                    f"{root} is a single 7-Scenes sequence; 'sequences' only applies to a scene folder (its parent)"
                )
            seq_dirs = [root]
            self.name = f"{root.resolve().parent.name}/{root.name}"
        elif is_seven_scenes_scene(root):
            seq_dirs = self._select(root, sequences)
            self.name = root.resolve().name
            if sequences is not None:
                self.name += ":" + ",".join(d.name for d in seq_dirs)
        else:
            raise InputError(
                f"{root} is not a 7-Scenes folder: expected seq-XX/frame-000000.color.png or a scene folder "
                "with seq-* folders and TrainSplit.txt/TestSplit.txt"
            )

        camera, _ = load_calib(calib)
        self._raw_camera = camera or SEVEN_SCENES_CAMERA
        self._set_remapper(self._raw_camera)

        self._frames: list[tuple[Path, str]] = []  # (sequence folder, "frame-000123")
        for d in seq_dirs:
            numbers = sorted(int(m.group(1)) for p in d.iterdir() if (m := _FRAME.match(p.name)))
            if not numbers:
                raise InputError(f"{d} has no frame-XXXXXX.color.png images: the 7-Scenes sequence is empty")
            self._frames.extend((d, f"frame-{n:06d}") for n in numbers)
        self.has_depth = True
        self._gt_cache: dict[int, Optional[np.ndarray]] = {}
        self.has_ground_truth = any((d / f"{stem}.pose.txt").is_file() for d, stem in self._frames)

    @staticmethod
    def _select(root: Path, sequences) -> list[Path]:
        available = {int(m.group(1)): p for p in root.iterdir() if p.is_dir() and (m := _SEQ.match(p.name))}
        if sequences is None:
            numbers = sorted(available)
        elif isinstance(sequences, str) and sequences.lower() in ("train", "test"):
            numbers = _read_split(root / ("TrainSplit.txt" if sequences.lower() == "train" else "TestSplit.txt"))
        else:
            if isinstance(sequences, (str, int)):
                sequences = [sequences]
            numbers = []
            for s in sequences:
                m = re.fullmatch(r"(?:seq-|sequence)?(\d+)", str(s).strip())
                if not m:
                    raise InputError(
                        f"7-Scenes sequence {s!r} is invalid: give numbers (1, 2), names (seq-01) or 'train'/'test'"
                    )
                numbers.append(int(m.group(1)))
        missing = [n for n in numbers if n not in available]
        if missing:
            raise InputError(
                f"{root} has no folder seq-{missing[0]:02d}: available "
                f"{', '.join(p.name for _, p in sorted(available.items())) or 'none'}; download/extract it"
            )
        if not numbers:
            raise InputError(f"no 7-Scenes sequences selected in {root}")
        return [available[n] for n in numbers]

    # ------------------------------------------------------------------ FrameSource hooks
    def _raw_count(self) -> int:
        return len(self._frames)

    def _raw_stamp(self, raw: int) -> float:
        return raw / SEVEN_SCENES_FPS

    def _raw_gt(self, raw: int) -> Optional[np.ndarray]:
        if raw not in self._gt_cache:
            d, stem = self._frames[raw]
            self._gt_cache[raw] = _read_pose_file(d / f"{stem}.pose.txt")
        T = self._gt_cache[raw]
        return None if T is None else T.copy()

    def _read_frame(self, raw: int, index: int) -> Frame:
        d, stem = self._frames[raw]
        size = self._raw_camera.size
        image = self._remap.image(read_color(d / f"{stem}.color.png", size))
        depth = read_depth(
            d / f"{stem}.depth.png", SEVEN_SCENES_DEPTH_SCALE, invalid=SEVEN_SCENES_INVALID_DEPTH, size=size
        )
        return Frame(
            index=index,
            stamp=self._raw_stamp(raw),
            image=image,
            camera=self.camera,
            depth=self._remap.depth(depth),
            T_world_cam_gt=self._raw_gt(raw),
        )


def _read_pose_file(path: Path) -> Optional[np.ndarray]:
    """4x4 text matrix (T_world_cam) or None when the file is absent or holds non-finite values."""
    if not path.is_file():
        return None
    try:
        T = np.loadtxt(path, dtype=np.float64)
    except ValueError as exc:
        raise InputError(f"{path}: expected a 4x4 matrix of numbers ({exc})") from None
    if T.size < 12:
        raise InputError(f"{path}: expected a 4x4 matrix, got {T.size} numbers")
    T = T.reshape(-1)[:16] if T.size >= 16 else np.concatenate([T.reshape(-1)[:12], [0, 0, 0, 1]])
    T = T.reshape(4, 4)
    if not np.all(np.isfinite(T)):
        return None  # 7-Scenes marks lost tracking with inf
    T[3] = (0.0, 0.0, 0.0, 1.0)
    return T
