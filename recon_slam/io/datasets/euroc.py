"""EuRoC MAV / ASL-format sequences (Burri et al., IJRR 2016), stereo grey cameras.

Layout (``path`` may be the sequence folder holding ``mav0`` or ``mav0`` itself)::

    mav0/cam0/data.csv       "#timestamp [ns],filename" rows; images in cam0/data/
    mav0/cam0/sensor.yaml    T_BS (4x4 T_body_cam, row-major), resolution [w, h],
                             intrinsics [fu, fv, cu, cv], distortion_coefficients [k1 k2 p1 p2]
    mav0/cam1/...            the right camera, same format
    mav0/state_groundtruth_estimate0/data.csv
                             "timestamp_ns, px py pz, qw qx qy qz, ..." (T_world_body;
                             quaternion stored w first!) and its sensor.yaml (T_BS, identity)

The pair is rectified with ``cv2.stereoRectify`` (zero disparity, ``alpha`` = 0 keeps only
valid pixels). Rectified cam0 is rotated by ``R_rect`` (``x_rect = R_rect @ x_cam0``), so the
ground truth of the yielded optical frame is
``T_world_rect = T_world_body @ T_body_cam0 @ [R_rect^T | 0]``.
Without cam1 (or with ``stereo=False``) cam0 is only undistorted (``R_rect = I``). With
``undistort=False`` the raw cam0 images are yielded with the distorted camera and no right
image (an unrectified pair does not satisfy the rectified-stereo contract of
:class:`~recon_slam.io.frame.Frame`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import cv2
import numpy as np

from recon_slam.errors import CalibrationError, InputError
from recon_slam.geometry.camera import PinholeCamera
from recon_slam.geometry.transforms import invert_pose, pose_from_quat
from recon_slam.io.datasets.base import (
    CalibLike,
    FrameSource,
    Remapper,
    associate_stamps,
    check_increasing,
    interpolate_poses,
    load_calib,
    parse_float,
    read_color,
    read_table,
    read_yaml,
)
from recon_slam.io.frame import Frame


def euroc_root(path: Path) -> Optional[Path]:
    """The ``mav0`` folder of an EuRoC/ASL sequence at ``path`` (or ``path`` itself), else None."""
    for cand in (path / "mav0", path):
        if (cand / "cam0" / "data.csv").is_file():
            return cand
    return None


def read_asl_camera(path: Path) -> tuple[PinholeCamera, np.ndarray]:
    """ASL camera ``sensor.yaml`` -> (camera with distortion, (4, 4) T_body_cam)."""
    data = read_yaml(path, kind=CalibrationError)
    try:
        T_BS = np.asarray(data["T_BS"]["data"], dtype=np.float64).reshape(4, 4)
        width, height = (int(v) for v in data["resolution"])
        fu, fv, cu, cv = (float(v) for v in data["intrinsics"])
        dist = tuple(float(v) for v in data.get("distortion_coefficients") or ())
    except (KeyError, TypeError, ValueError) as exc:
        raise CalibrationError(
            f"{path}: malformed ASL camera file ({exc!r}); it needs T_BS {{data: [16 numbers]}}, "
            "resolution [w, h], intrinsics [fu, fv, cu, cv], distortion_coefficients"
        ) from None
    model = str(data.get("camera_model", "pinhole")).lower()
    dist_model = str(data.get("distortion_model", "radial-tangential")).lower()
    if model != "pinhole" or dist_model not in ("radial-tangential", "radtan", "plumb_bob", "none"):
        raise CalibrationError(
            f"{path}: camera model {model}/{dist_model} is not supported (only pinhole radial-tangential); "
            "give --calib with pinhole intrinsics of undistorted images"
        )
    if not np.allclose(T_BS[3], (0, 0, 0, 1)):
        raise CalibrationError(f"{path}: T_BS last row is {T_BS[3].tolist()}, not [0, 0, 0, 1]")
    return PinholeCamera(width, height, fu, fv, cu, cv, dist), T_BS


def _read_image_list(cam_dir: Path) -> tuple[np.ndarray, list[Path]]:
    """``data.csv`` of an ASL camera -> stamps (N,) int64 ns and image paths."""
    csv = cam_dir / "data.csv"
    rows = read_table(csv, 2, "'timestamp_ns,filename' rows")
    if not rows:
        raise InputError(f"{csv} lists no images: expected 'timestamp_ns,filename' rows")
    stamps = []
    for n, f in rows:
        try:
            stamps.append(int(f[0]))
        except ValueError:
            raise InputError(f"{csv}:{n}: timestamp {f[0]!r} is not an integer number of nanoseconds") from None
    stamps = np.array(stamps, dtype=np.int64)
    check_increasing(stamps.astype(np.float64), csv, [n for n, _ in rows])
    return stamps, [cam_dir / "data" / f[1] for _, f in rows]


def read_asl_groundtruth(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``state_groundtruth_estimate0/data.csv`` -> stamps (N,) seconds, T_world_sensor (N, 4, 4).

    Columns: ``timestamp_ns, px, py, pz, qw, qx, qy, qz, ...`` (quaternion w first).
    """
    rows = read_table(path, 8, "'timestamp_ns, px, py, pz, qw, qx, qy, qz, ...' rows")
    if not rows:
        raise InputError(f"{path} has no poses: expected 'timestamp_ns, px, py, pz, qw, qx, qy, qz' rows")
    ns = []
    for n, f in rows:
        try:
            ns.append(int(f[0]))
        except ValueError:
            raise InputError(f"{path}:{n}: timestamp {f[0]!r} is not an integer number of nanoseconds") from None
    stamps = np.array(ns, dtype=np.int64) / 1e9
    check_increasing(stamps, path, [n for n, _ in rows])
    vals = np.array([[parse_float(x, path, n) for x in f[1:8]] for n, f in rows])
    q_wxyz = vals[:, 3:7]
    norms = np.linalg.norm(q_wxyz, axis=1)
    if np.any(norms < 1e-6):
        n = rows[int(np.argmax(norms < 1e-6))][0]
        raise InputError(f"{path}:{n}: zero quaternion; the ground-truth file is corrupt")
    q_xyzw = q_wxyz[:, [1, 2, 3, 0]] / norms[:, None]
    return stamps, pose_from_quat(vals[:, :3], q_xyzw)


class EurocSource(FrameSource):
    """Rectified stereo frames of an EuRoC / ASL sequence.

    Args:
        path: the sequence folder (with ``mav0``) or the ``mav0`` folder.
        stereo: rectify cam0/cam1 and yield the right image and baseline (when cam1 exists).
        calib: intrinsics (with distortion) of cam0 overriding ``cam0/sensor.yaml``.
        max_dt: largest frame / ground-truth stamp difference in seconds.
        gt_max_gap: ground truth is interpolated between samples at most this far apart.
        stereo_max_dt: largest cam0 / cam1 stamp difference accepted for a pair (seconds).
        alpha: ``cv2.stereoRectify`` free scaling (0: only valid pixels, 1: all source pixels).
        stride, max_frames, undistort: see :mod:`recon_slam.io.datasets.base`.

    Frames: ``image`` / ``right_image`` (H, W, 3) uint8 (grey replicated), ``baseline_m``,
    ``stamp`` cam0 stamp in seconds, ``T_world_cam_gt`` of the rectified cam0 optical frame.
    """

    layout = "euroc"

    def __init__(
        self,
        path,
        *,
        stereo: bool = True,
        calib: CalibLike = None,
        max_dt: float = 0.02,
        gt_max_gap: float = 0.1,
        stereo_max_dt: float = 0.001,
        alpha: float = 0.0,
        stride: int = 1,
        max_frames: Optional[int] = None,
        undistort: bool = True,
    ) -> None:
        super().__init__(stride=stride, max_frames=max_frames, undistort=undistort)
        path = Path(path)
        if not path.exists():
            raise InputError(f"EuRoC sequence folder {path} not found: check the path")
        mav = euroc_root(path)
        if mav is None:
            raise InputError(f"{path} is not an EuRoC/ASL sequence: expected mav0/cam0/data.csv")
        self.root = mav
        self.name = (mav.parent if mav.name == "mav0" else mav).resolve().name
        cam0_dir, cam1_dir = mav / "cam0", mav / "cam1"

        cam0, T_body_cam0 = read_asl_camera(cam0_dir / "sensor.yaml")
        override, _ = load_calib(calib)
        if override is not None:
            cam0 = override
        self._raw_camera = cam0
        self._T_body_cam0 = T_body_cam0

        stamps0, paths0 = _read_image_list(cam0_dir)
        use_stereo = bool(stereo) and self.undistort and (cam1_dir / "data.csv").is_file()
        self._right_paths: Optional[list[Path]] = None
        self.baseline_m: Optional[float] = None
        R_rect = np.eye(3)
        if use_stereo:
            cam1, T_body_cam1 = read_asl_camera(cam1_dir / "sensor.yaml")
            if cam1.size != cam0.size:
                raise CalibrationError(
                    f"cam0 is {cam0.width}x{cam0.height} but cam1 is {cam1.width}x{cam1.height} "
                    f"({cam1_dir / 'sensor.yaml'}): stereo rectification needs equal sizes; pass stereo=False"
                )
            stamps1, paths1 = _read_image_list(cam1_dir)
            pairs = associate_stamps(stamps0 / 1e9, stamps1 / 1e9, stereo_max_dt)
            if not pairs:
                raise InputError(
                    f"no cam0/cam1 image pairs within {stereo_max_dt} s in {mav}: check data.csv or pass stereo=False"
                )
            i0, i1 = np.array(pairs).T
            stamps0 = stamps0[i0]
            paths0 = [paths0[k] for k in i0]
            self._right_paths = [paths1[k] for k in i1]
            R_rect, rect_camera, maps_l, maps_r, self.baseline_m = self._rectify(
                cam0, cam1, invert_pose(T_body_cam1) @ T_body_cam0, alpha
            )
            self._remap = Remapper(rect_camera, maps_l[0], maps_l[1], cam0.size)
            self._remap_right = Remapper(rect_camera, maps_r[0], maps_r[1], cam1.size)
            self._cam1_size = cam1.size
        else:
            self._set_remapper(cam0)
        self.has_stereo = self._right_paths is not None
        self._stamps = stamps0.astype(np.float64) / 1e9
        self._paths = paths0

        T_cam0_rect = np.eye(4)
        T_cam0_rect[:3, :3] = R_rect.T
        self._T_body_rect = T_body_cam0 @ T_cam0_rect
        self._gt: list[Optional[np.ndarray]] = [None] * len(self._stamps)
        gt_dir = mav / "state_groundtruth_estimate0"
        if (gt_dir / "data.csv").is_file():
            gt_stamps, T_world_sensor = read_asl_groundtruth(gt_dir / "data.csv")
            T_body_sensor = np.eye(4)
            if (gt_dir / "sensor.yaml").is_file():
                gt_yaml = read_yaml(gt_dir / "sensor.yaml")
                if "T_BS" in gt_yaml:
                    T_body_sensor = np.asarray(gt_yaml["T_BS"]["data"], dtype=np.float64).reshape(4, 4)
            T_world_body = T_world_sensor @ invert_pose(T_body_sensor)
            per_frame = interpolate_poses(self._stamps, gt_stamps, T_world_body, max_dt, gt_max_gap)
            self._gt = [None if T is None else T @ self._T_body_rect for T in per_frame]
        self.has_ground_truth = any(T is not None for T in self._gt)

    @staticmethod
    def _rectify(cam0: PinholeCamera, cam1: PinholeCamera, T_cam1_cam0: np.ndarray, alpha: float):
        """Stereo rectification; returns R_rect (3, 3), camera, left maps, right maps, baseline."""
        size = cam0.size
        d0 = np.asarray(cam0.distortion or (0.0,) * 4, dtype=np.float64)
        d1 = np.asarray(cam1.distortion or (0.0,) * 4, dtype=np.float64)
        R1, R2, P1, P2, _, _, _ = cv2.stereoRectify(
            cam0.K, d0, cam1.K, d1, size,
            np.ascontiguousarray(T_cam1_cam0[:3, :3]), np.ascontiguousarray(T_cam1_cam0[:3, 3:4]),
            flags=cv2.CALIB_ZERO_DISPARITY, alpha=float(alpha), newImageSize=size,
        )
        if abs(P2[1, 3]) > abs(P2[0, 3]):
            raise CalibrationError(
                "cam0/cam1 are stacked vertically (check T_BS of cam1/sensor.yaml); only horizontal stereo is "
                "supported: pass stereo=False"
            )
        baseline = float(-P2[0, 3] / P2[0, 0])
        if baseline <= 0:
            raise CalibrationError(
                f"cam1 lies left of cam0 (baseline {baseline:.4f} m): check T_BS in the two sensor.yaml files "
                "(cam0 must be the left camera) or pass stereo=False"
            )
        mx0, my0 = cv2.initUndistortRectifyMap(cam0.K, d0, R1, P1[:3, :3], size, cv2.CV_32FC1)
        mx1, my1 = cv2.initUndistortRectifyMap(cam1.K, d1, R2, P2[:3, :3], size, cv2.CV_32FC1)
        camera = PinholeCamera.from_K(P1[:3, :3], size[0], size[1])
        return R1, camera, (mx0, my0), (mx1, my1), baseline

    # ------------------------------------------------------------------ FrameSource hooks
    def _raw_count(self) -> int:
        return len(self._stamps)

    def _raw_stamp(self, raw: int) -> float:
        return float(self._stamps[raw])

    def _raw_gt(self, raw: int) -> Optional[np.ndarray]:
        T = self._gt[raw]
        return None if T is None else T.copy()

    def _read_frame(self, raw: int, index: int) -> Frame:
        image = self._remap.image(read_color(self._paths[raw], self._raw_camera.size))
        right = None
        if self._right_paths is not None:
            right = self._remap_right.image(read_color(self._right_paths[raw], self._cam1_size))
        return Frame(
            index=index,
            stamp=float(self._stamps[raw]),
            image=image,
            camera=self.camera,
            right_image=right,
            baseline_m=self.baseline_m,
            T_world_cam_gt=self._raw_gt(raw),
        )
