"""KITTI odometry sequences (Geiger et al., CVPR 2012), rectified stereo.

Layout::

    <root>/sequences/XX/image_0, image_1     grey left / right   000000.png ...
                       /image_2, image_3     colour left / right
                       /calib.txt            "P0: 12 numbers" ... "P3: ..." (3x4, rectified)
                       /times.txt            one stamp in seconds per line
    <root>/poses/XX.txt                      12 numbers per line: 3x4 T_world_cam0 (cam0 = left grey)

All P matrices share the rectified intrinsics ``K = P[:, :3]``; ``P_i = K [I | t_i]`` with
``t_i = K^-1 P_i[:, 3]`` the position of the rectified cam0 origin in camera ``i``
(``T_cami_cam0 = [I | t_i]``). Ground truth of the yielded left camera is therefore
``T_world_cam0 @ [I | -t_left]``. Baseline of the pair: ``-(P_right[0, 3] - P_left[0, 3]) / fx``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from recon_slam.errors import CalibrationError, InputError
from recon_slam.geometry.camera import PinholeCamera
from recon_slam.io.datasets.base import (
    CalibLike,
    FrameSource,
    check_increasing,
    image_size,
    load_calib,
    parse_float,
    read_color,
    read_table,
)
from recon_slam.io.frame import Frame


def is_kitti(path: Path) -> bool:
    """True for a KITTI odometry sequence folder (calib.txt, times.txt, image_0 or image_2)."""
    return (
        path.is_dir()
        and (path / "calib.txt").is_file()
        and (path / "times.txt").is_file()
        and ((path / "image_0").is_dir() or (path / "image_2").is_dir())
    )


def read_kitti_calib(path: Path) -> dict[str, np.ndarray]:
    """``calib.txt`` -> ``{"P0": (3, 4), ..., "Tr": (3, 4)}`` float64 matrices."""
    if not path.is_file():
        raise CalibrationError(f"{path} not found: a KITTI sequence needs calib.txt with P0..P3")
    out = {}
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        key, sep, rest = line.partition(":")
        if not sep:
            raise CalibrationError(f"{path}:{lineno}: expected 'KEY: 12 numbers', got {line.strip()!r}")
        values = rest.split()
        if len(values) != 12:
            raise CalibrationError(f"{path}:{lineno}: {key.strip()} has {len(values)} numbers; expected 12 (3x4)")
        try:
            out[key.strip()] = np.array([float(v) for v in values]).reshape(3, 4)
        except ValueError:
            raise CalibrationError(f"{path}:{lineno}: {key.strip()} holds a value that is not a number") from None
    return out


def read_kitti_poses(path: Path) -> np.ndarray:
    """KITTI pose file (12 numbers per line, row-major 3x4) -> (N, 4, 4) float64."""
    rows = read_table(path, 12, "12 numbers per line (a row-major 3x4 pose)")
    if not rows:
        raise InputError(f"{path} has no poses: expected 12 numbers per line")
    vals = np.array([[parse_float(x, path, n) for x in f[:12]] for n, f in rows])
    T = np.tile(np.eye(4), (len(vals), 1, 1))
    T[:, :3, :] = vals.reshape(-1, 3, 4)
    return T


class KittiSource(FrameSource):
    """Rectified stereo frames of a KITTI odometry sequence folder (``sequences/XX``).

    Args:
        path: the sequence folder.
        color: True for image_2/image_3 (colour), False for image_0/image_1 (grey);
            None picks colour when image_2 exists.
        stereo: yield the right image and baseline (when the right folder exists).
        poses: ground-truth pose file; default ``<path>/../../poses/XX.txt`` when present.
        calib: intrinsics YAML overriding those of calib.txt (the baseline stays from calib.txt).
        stride, max_frames, undistort: see :mod:`recon_slam.io.datasets.base` (images are
            already rectified, so undistortion does nothing).

    Frames: ``image`` / ``right_image`` (H, W, 3) uint8 RGB (grey replicated), ``baseline_m``,
    ``stamp`` from times.txt, ``T_world_cam_gt`` of the left camera used (cam0 or cam2).
    """

    layout = "kitti"

    def __init__(
        self,
        path,
        *,
        color: Optional[bool] = None,
        stereo: bool = True,
        poses=None,
        calib: CalibLike = None,
        stride: int = 1,
        max_frames: Optional[int] = None,
        undistort: bool = True,
    ) -> None:
        super().__init__(stride=stride, max_frames=max_frames, undistort=undistort)
        self.root = Path(path)
        if not self.root.is_dir():
            raise InputError(f"KITTI sequence folder {self.root} not found: check the path")
        if not is_kitti(self.root):
            raise InputError(
                f"{self.root} is not a KITTI odometry sequence: expected calib.txt, times.txt and image_0/ or image_2/"
            )
        self.name = self.root.resolve().name
        if color is None:
            color = (self.root / "image_2").is_dir()
        left_id, right_id = (2, 3) if color else (0, 1)
        self.left_dir = self.root / f"image_{left_id}"
        self.right_dir = self.root / f"image_{right_id}"
        if not self.left_dir.is_dir():
            raise InputError(
                f"{self.left_dir} not found: download the KITTI {'colour' if color else 'grey'} images "
                f"or pass color={not color}"
            )

        # stamps
        times = self.root / "times.txt"
        rows = read_table(times, 1, "one stamp in seconds per line")
        if not rows:
            raise InputError(f"{times} is empty: expected one stamp in seconds per frame")
        self._stamps = np.array([parse_float(f[0], times, n) for n, f in rows])
        check_increasing(self._stamps, times, [n for n, _ in rows])
        n = len(self._stamps)
        self._check_images(self.left_dir, n)

        # calibration
        P = read_kitti_calib(self.root / "calib.txt")
        for key in (f"P{left_id}", f"P{right_id}"):
            if key not in P and (key == f"P{left_id}" or stereo):
                raise CalibrationError(f"{self.root / 'calib.txt'} has no {key}: it needs P0..P3 (KITTI odometry)")
        P_left = P[f"P{left_id}"]
        K = P_left[:, :3]
        if abs(K[0, 1]) > 1e-9 or abs(K[2, 2] - 1.0) > 1e-9 or K[0, 0] <= 0:
            raise CalibrationError(f"{self.root / 'calib.txt'}: P{left_id} is not a rectified projection matrix")
        width, height = image_size(self.left_dir / "000000.png")
        override, _ = load_calib(calib)
        camera = override or PinholeCamera.from_K(K, width, height)
        self._set_remapper(camera)
        self._raw_camera = camera
        t_left = np.linalg.solve(K, P_left[:, 3])
        self._T_cam0_left = np.eye(4)
        self._T_cam0_left[:3, 3] = -t_left

        self.baseline_m: Optional[float] = None
        self.has_stereo = bool(stereo) and self.right_dir.is_dir()
        if self.has_stereo:
            self._check_images(self.right_dir, n)
            self.baseline_m = float(-(P[f"P{right_id}"][0, 3] - P_left[0, 3]) / K[0, 0])
            if self.baseline_m <= 0:
                raise CalibrationError(
                    f"{self.root / 'calib.txt'}: P{right_id} puts the right camera left of P{left_id} "
                    f"(baseline {self.baseline_m:.3f} m); check the calibration file"
                )

        # ground truth
        pose_file = Path(poses) if poses is not None else self.root.parent.parent / "poses" / f"{self.name}.txt"
        self._gt: Optional[np.ndarray] = None
        if poses is not None and not pose_file.is_file():
            raise InputError(f"KITTI pose file {pose_file} not found: check the poses path")
        if pose_file.is_file():
            T_world_cam0 = read_kitti_poses(pose_file)
            if len(T_world_cam0) != n:
                raise InputError(
                    f"{pose_file} has {len(T_world_cam0)} poses but {times} has {n} stamps: "
                    "the pose file belongs to another sequence"
                )
            self._gt = T_world_cam0 @ self._T_cam0_left
        self.has_ground_truth = self._gt is not None

    @staticmethod
    def _check_images(folder: Path, n: int) -> None:
        if not folder.is_dir():
            raise InputError(f"{folder} not found: the KITTI sequence is incomplete")
        names = {p.name for p in folder.iterdir()}
        for i in range(n):
            if f"{i:06d}.png" not in names:
                raise InputError(
                    f"{folder / f'{i:06d}.png'} not found: times.txt lists {n} frames; the sequence is incomplete"
                )

    # ------------------------------------------------------------------ FrameSource hooks
    def _raw_count(self) -> int:
        return len(self._stamps)

    def _raw_stamp(self, raw: int) -> float:
        return float(self._stamps[raw])

    def _raw_gt(self, raw: int) -> Optional[np.ndarray]:
        return None if self._gt is None else self._gt[raw].copy()

    def _read_frame(self, raw: int, index: int) -> Frame:
        size = self._raw_camera.size
        image = self._remap.image(read_color(self.left_dir / f"{raw:06d}.png", size))
        right = None
        if self.has_stereo:
            right = self._remap.image(read_color(self.right_dir / f"{raw:06d}.png", size))
        return Frame(
            index=index,
            stamp=float(self._stamps[raw]),
            image=image,
            camera=self.camera,
            right_image=right,
            baseline_m=self.baseline_m,
            T_world_cam_gt=self._raw_gt(raw),
        )
