"""TUM RGB-D benchmark sequences (Sturm et al., IROS 2012).

Layout of a sequence folder::

    rgb/  depth/  rgb.txt  depth.txt  groundtruth.txt  [associate.txt]  [calibration.yaml]

* ``rgb.txt`` / ``depth.txt``: ``timestamp path`` rows (paths relative to the folder).
* ``associate.txt`` (optional, preferred when present): ``t_rgb rgb_path t_depth depth_path``
  rows, optionally followed by ``t_gt tx ty tz qx qy qz qw``.
* ``groundtruth.txt``: ``timestamp tx ty tz qx qy qz qw``, T_world_cam of the optical centre.
* Depth: 16-bit PNG registered to the colour image, metres = value / 5000, 0 = no reading.

Calibration, first match wins:

1. the ``calib`` argument (YAML path, :class:`PinholeCamera` or mapping);
2. ``calibration.yaml`` (or ``intrinsics.yaml`` / ``camera.yaml``) beside the data, with keys
   ``width height fx fy cx cy distortion [depth_scale]``;
3. the values TUM publishes for its three Kinects, chosen from the folder name
   (``rgbd_dataset_freiburgN_*``, also ``..._frN_...``), see :data:`TUM_PUBLISHED`;
4. otherwise :class:`CalibrationError` asking for ``--calib intrinsics.yaml``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import numpy as np

from recon_slam.errors import CalibrationError, InputError
from recon_slam.geometry.camera import PinholeCamera
from recon_slam.geometry.transforms import pose_from_quat
from recon_slam.io.datasets.base import (
    CalibLike,
    FrameSource,
    associate_stamps,
    check_increasing,
    interpolate_poses,
    load_calib,
    parse_float,
    read_color,
    read_depth,
    read_table,
)
from recon_slam.io.frame import Frame

#: Published colour-camera intrinsics of the TUM RGB-D Kinects (640x480, plumb_bob
#: k1 k2 p1 p2 k3). freiburg3 images are already undistorted by the dataset.
TUM_PUBLISHED: dict[int, PinholeCamera] = {
    1: PinholeCamera(640, 480, 517.306408, 516.469215, 318.643040, 255.313989,
                     (0.262383, -0.953104, -0.005358, 0.002628, 1.163314)),
    2: PinholeCamera(640, 480, 520.908620, 521.007327, 325.141442, 249.701764,
                     (0.231222, -0.784899, -0.003257, -0.000105, 0.917205)),
    3: PinholeCamera(640, 480, 535.4, 539.2, 320.1, 247.6),
}

#: Depth PNG value per metre in TUM sequences.
TUM_DEPTH_SCALE = 5000.0

CALIB_FILE_NAMES = ("calibration.yaml", "intrinsics.yaml", "camera.yaml")

_FREIBURG = re.compile(r"(?:freiburg|(?:^|[_\-])fr)([123])(?:[_\-]|$)", re.IGNORECASE)


def tum_camera_from_name(folder: Path) -> Optional[PinholeCamera]:
    """Published freiburg1/2/3 intrinsics chosen from ``folder``'s name, or None."""
    m = _FREIBURG.search(folder.name)
    return TUM_PUBLISHED[int(m.group(1))] if m else None


def is_tum(path: Path) -> bool:
    """True when ``path`` is a folder with ``rgb.txt`` or ``associate.txt``."""
    return path.is_dir() and ((path / "rgb.txt").is_file() or (path / "associate.txt").is_file())


class TumSource(FrameSource):
    """Frames of a TUM RGB-D sequence folder (colour + registered depth + ground truth).

    Args:
        path: the sequence folder.
        calib: calibration overriding the one found beside the data (see module docstring).
        max_dt: largest rgb/depth and rgb/ground-truth stamp difference in seconds.
        gt_max_gap: ground truth is interpolated between samples at most this far apart.
        depth_scale: depth PNG value per metre (default: calibration's ``depth_scale`` or 5000).
        stride, max_frames, undistort: see :mod:`recon_slam.io.datasets.base`.

    Frames: ``image`` (H, W, 3) uint8 RGB, ``depth`` (H, W) float32 metres registered to it,
    ``stamp`` the rgb stamp, ``T_world_cam_gt`` from ``groundtruth.txt`` at the rgb stamp.
    """

    layout = "tum"

    def __init__(
        self,
        path,
        *,
        calib: CalibLike = None,
        max_dt: float = 0.02,
        gt_max_gap: float = 0.1,
        depth_scale: Optional[float] = None,
        stride: int = 1,
        max_frames: Optional[int] = None,
        undistort: bool = True,
    ) -> None:
        super().__init__(stride=stride, max_frames=max_frames, undistort=undistort)
        self.root = Path(path)
        if not self.root.is_dir():
            raise InputError(f"TUM sequence folder {self.root} not found: check the path")
        if not is_tum(self.root):
            raise InputError(f"{self.root} has no rgb.txt or associate.txt: not a TUM RGB-D sequence folder")
        self.name = self.root.resolve().name
        self.max_dt = float(max_dt)

        camera, extra = self._find_calibration(calib)
        self.depth_scale = float(depth_scale or extra.get("depth_scale") or TUM_DEPTH_SCALE)
        if self.depth_scale <= 0:
            raise CalibrationError(f"depth_scale={self.depth_scale} is invalid: it must be positive (TUM: 5000)")
        self._set_remapper(camera)
        self._raw_camera = camera

        self._rgb_stamps, self._rgb_paths, self._depth_paths, assoc_gt = self._index()
        self.has_depth = self._depth_paths is not None

        self._gt: list[Optional[np.ndarray]] = [None] * len(self._rgb_stamps)
        gt_file = self.root / "groundtruth.txt"
        if gt_file.is_file():
            stamps, poses = _read_pose_table(gt_file)
            self._gt = interpolate_poses(self._rgb_stamps, stamps, poses, self.max_dt, gt_max_gap)
        elif assoc_gt is not None:
            self._gt = assoc_gt
        self.has_ground_truth = any(T is not None for T in self._gt)

    # ------------------------------------------------------------------ setup
    def _find_calibration(self, calib: CalibLike) -> tuple[PinholeCamera, dict]:
        if calib is not None:
            camera, extra = load_calib(calib)
            return camera, extra
        for name in CALIB_FILE_NAMES:
            f = self.root / name
            if f.is_file():
                camera, extra = load_calib(f)
                return camera, extra
        camera = tum_camera_from_name(self.root.resolve())
        if camera is not None:
            return camera, {}
        raise CalibrationError(
            f"no calibration for TUM sequence {self.root}: the folder has no calibration.yaml and its name does "
            "not say freiburg1/2/3; give --calib intrinsics.yaml (width, height, fx, fy, cx, cy, distortion) "
            "or keep the original folder name rgbd_dataset_freiburgN_..."
        )

    def _index(self):
        """Stamps (N,), rgb paths, depth paths (or None) and ground truth from associate.txt."""
        assoc = self.root / "associate.txt"
        if assoc.is_file():
            return self._index_associate(assoc)
        rgb_file = self.root / "rgb.txt"
        rgb_t, rgb_p = _read_stamped_paths(rgb_file)
        depth_file = self.root / "depth.txt"
        if not depth_file.is_file():
            return rgb_t, rgb_p, None, None
        d_t, d_p = _read_stamped_paths(depth_file)
        pairs = associate_stamps(rgb_t, d_t, self.max_dt)
        if not pairs:
            raise InputError(
                f"no rgb/depth pairs within {self.max_dt} s between {rgb_file} and {depth_file}: "
                "check the stamps or raise max_dt"
            )
        i, j = np.array(pairs).T
        return rgb_t[i], [rgb_p[k] for k in i], [d_p[k] for k in j], None

    def _index_associate(self, path: Path):
        rows = read_table(path, 4, "'t_rgb rgb_path t_depth depth_path [t_gt tx ty tz qx qy qz qw]' rows")
        if not rows:
            raise InputError(f"{path} has no rows: expected 't_rgb rgb_path t_depth depth_path' per line")
        stamps = np.array([parse_float(f[0], path, n) for n, f in rows])
        check_increasing(stamps, path, [n for n, _ in rows])
        rgb = [self.root / f[1] for _, f in rows]
        depth = [self.root / f[3] for _, f in rows]
        gt = None
        if all(len(f) >= 12 for _, f in rows):
            vals = np.array([[parse_float(x, path, n) for x in f[5:12]] for n, f in rows])
            gt = list(pose_from_quat(vals[:, :3], vals[:, 3:7]))
        return stamps, rgb, depth, gt

    # ------------------------------------------------------------------ FrameSource hooks
    def _raw_count(self) -> int:
        return len(self._rgb_stamps)

    def _raw_stamp(self, raw: int) -> float:
        return float(self._rgb_stamps[raw])

    def _raw_gt(self, raw: int) -> Optional[np.ndarray]:
        return self._gt[raw]

    def _read_frame(self, raw: int, index: int) -> Frame:
        size = self._raw_camera.size
        image = self._remap.image(read_color(self._rgb_paths[raw], size))
        depth = None
        if self._depth_paths is not None:
            depth = self._remap.depth(read_depth(self._depth_paths[raw], self.depth_scale, size=size))
        gt = self._gt[raw]
        return Frame(
            index=index,
            stamp=float(self._rgb_stamps[raw]),
            image=image,
            camera=self.camera,
            depth=depth,
            T_world_cam_gt=None if gt is None else gt.copy(),
        )


def _read_stamped_paths(path: Path) -> tuple[np.ndarray, list[Path]]:
    """``timestamp path`` rows -> stamps (N,) and absolute paths; stamps must increase."""
    rows = read_table(path, 2, "'timestamp filename' rows")
    if not rows:
        raise InputError(f"{path} lists no images: expected 'timestamp filename' per line")
    stamps = np.array([parse_float(f[0], path, n) for n, f in rows])
    check_increasing(stamps, path, [n for n, _ in rows])
    return stamps, [path.parent / f[1] for _, f in rows]


def _read_pose_table(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """TUM ``t tx ty tz qx qy qz qw`` rows -> stamps (N,) and T_world_cam (N, 4, 4)."""
    rows = read_table(path, 8, "'timestamp tx ty tz qx qy qz qw' rows")
    if not rows:
        raise InputError(f"{path} has no poses: expected 'timestamp tx ty tz qx qy qz qw' per line")
    vals = np.array([[parse_float(x, path, n) for x in f[:8]] for n, f in rows])
    check_increasing(vals[:, 0], path, [n for n, _ in rows])
    q = vals[:, 4:8]
    norms = np.linalg.norm(q, axis=1)
    if np.any(norms < 1e-6):
        n = rows[int(np.argmax(norms < 1e-6))][0]
        raise InputError(f"{path}:{n}: zero quaternion; the ground-truth file is corrupt")
    return vals[:, 0], pose_from_quat(vals[:, 1:4], q / norms[:, None])
