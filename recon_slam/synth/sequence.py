"""Synthetic RGB-D / stereo sequences with exact ground truth, and a TUM-layout writer.

:class:`SyntheticSequence` is a FrameSource (iterable of :class:`~recon_slam.io.frame.Frame`
with ``len``, ``name``, ``camera``, ``has_depth``, ``has_stereo``, ``has_ground_truth`` and
``ground_truth()``) whose frames are rendered lazily. :func:`write_tum_folder` writes any
FrameSource as a TUM RGB-D style folder.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Iterator

import numpy as np

from recon_slam.errors import InputError
from recon_slam.geometry.camera import PinholeCamera
from recon_slam.io.frame import Frame
from recon_slam.io.trajectory import write_tum
from recon_slam.synth.render import DepthNoise, render
from recon_slam.synth.scene import SCENE_NAMES, make_scene
from recon_slam.synth.trajectories import TRAJECTORY_KINDS, make_trajectory

DEPTH_SCALE = 5000.0  #: TUM depth PNG units per metre


class SyntheticSequence:
    """A rendered camera sequence through a synthetic room.

    Args:
        scene: scene name (``"room"`` or ``"room_b"``).
        trajectory: ``"loop"``, ``"reloc"`` or ``"handheld"``.
        frames: number of frames (>= 2).
        width, height: image size in pixels (8 to 4096).
        seed: seed of the scene textures, the trajectory and the sensor noise.
        fov_deg: horizontal field of view in degrees (square pixels, centred principal point).
        depth_noise: False for exact depth, True for the default Kinect-like
            :class:`~recon_slam.synth.render.DepthNoise`, or a ``DepthNoise``.
        stereo: also render the right image of a rectified pair.
        baseline_m: stereo baseline (right camera at +baseline along the camera x axis).
        fps: frame rate; frame ``i`` has stamp ``i / fps`` seconds.
        poses: optional (N, 4, 4) ``T_world_cam`` to render instead of a ``trajectory``
            kind (e.g. :func:`recon_slam.synth.trajectories.revisit_trajectory`);
            ``trajectory`` and ``frames`` are then ignored.

    Attributes:
        name, camera, scene, poses ((N, 4, 4) T_world_cam), stamps ((N,) seconds),
        has_depth (True), has_stereo, has_ground_truth (True), baseline_m.
    """

    has_depth = True
    has_ground_truth = True

    def __init__(
        self,
        scene: str = "room",
        trajectory: str = "loop",
        frames: int = 300,
        width: int = 320,
        height: int = 240,
        seed: int = 0,
        fov_deg: float = 65.0,
        depth_noise: bool | DepthNoise = False,
        stereo: bool = False,
        baseline_m: float = 0.1,
        fps: float = 30.0,
        poses: np.ndarray | None = None,
    ):
        if poses is not None:
            poses = np.asarray(poses, dtype=np.float64)
            if poses.ndim != 3 or poses.shape[1:] != (4, 4) or len(poses) < 1:
                raise InputError(f"poses must be an (N, 4, 4) array of T_world_cam with N >= 1, got {poses.shape}")
            trajectory, frames = "custom", max(2, len(poses))  # (frames is only validated below)
        elif trajectory not in TRAJECTORY_KINDS:
            raise InputError(f"unknown trajectory {trajectory!r}; choose one of: {', '.join(TRAJECTORY_KINDS)}")
        if scene not in SCENE_NAMES:
            raise InputError(f"unknown synthetic scene {scene!r}; choose one of: {', '.join(SCENE_NAMES)}")
        limits = (("frames", frames, 2, 10**7), ("width", width, 8, 4096), ("height", height, 8, 4096))
        for key, value, lo, hi in limits:
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not lo <= value <= hi:
                raise InputError(f"{key} must be an integer in [{lo}, {hi}], got {value!r}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise InputError(f"seed must be a non-negative integer, got {seed!r}")
        if not isinstance(fov_deg, (int, float)) or not 20.0 <= fov_deg <= 120.0:
            raise InputError(f"fov_deg must be a horizontal field of view in [20, 120] degrees, got {fov_deg!r}")
        if not isinstance(fps, (int, float)) or not math.isfinite(fps) or fps <= 0:
            raise InputError(f"fps must be a positive number, got {fps!r}")
        if stereo and (not isinstance(baseline_m, (int, float)) or not math.isfinite(baseline_m) or baseline_m <= 0):
            raise InputError(f"baseline_m must be a positive number of metres, got {baseline_m!r}")
        if not isinstance(depth_noise, (bool, DepthNoise)):
            raise InputError(f"depth_noise must be True, False or a DepthNoise, got {type(depth_noise).__name__}")
        self.scene_name, self.trajectory_kind = scene, trajectory
        self.seed, self.fps = int(seed), float(fps)
        self.depth_noise = depth_noise
        self.has_stereo = bool(stereo)
        self.baseline_m = float(baseline_m) if stereo else None
        f = (width / 2.0) / math.tan(math.radians(fov_deg) / 2.0)
        self.camera = PinholeCamera(int(width), int(height), f, f, (width - 1) / 2.0, (height - 1) / 2.0)
        self.scene = make_scene(scene, self.seed)
        self.poses = poses.copy() if poses is not None else make_trajectory(trajectory, int(frames), self.scene, self.seed)
        self.stamps = np.arange(len(self.poses), dtype=np.float64) / self.fps
        self.name = f"synth_{scene}_{trajectory}_s{self.seed}"

    def __len__(self) -> int:
        return len(self.poses)

    def __getitem__(self, index: int) -> Frame:
        """Render frame ``index`` (negative indices count from the end)."""
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"frame {index} out of range for a {n}-frame sequence")
        index %= n
        result = render(
            self.scene,
            self.camera,
            self.poses[index],
            depth_noise=self.depth_noise,
            noise_seed=(self.seed, index, 101),
            stereo_baseline=self.baseline_m,
        )
        return Frame(
            index=index,
            stamp=float(self.stamps[index]),
            image=result.image,
            camera=self.camera,
            depth=result.depth,
            right_image=result.right_image,
            baseline_m=self.baseline_m,
            T_world_cam_gt=self.poses[index].copy(),
        )

    def __iter__(self) -> Iterator[Frame]:
        for i in range(len(self)):
            yield self[i]

    def ground_truth(self) -> tuple[np.ndarray, np.ndarray]:
        """Stamps (N,) seconds and ground-truth ``T_world_cam`` (N, 4, 4) of every frame."""
        return self.stamps.copy(), self.poses.copy()

    def __repr__(self) -> str:
        return (
            f"SyntheticSequence({self.scene_name!r}, {self.trajectory_kind!r}, frames={len(self)}, "
            f"{self.camera.width}x{self.camera.height}, seed={self.seed}, stereo={self.has_stereo})"
        )


def write_tum_folder(source, out_dir: str | os.PathLike, progress: bool = True) -> Path:
    """Write any FrameSource as a TUM RGB-D style folder.

    Layout: ``rgb/<stamp>.png`` (8-bit RGB), ``depth/<stamp>.png`` (16-bit, metres x 5000,
    0 = no reading), ``right/<stamp>.png`` for stereo sources, ``rgb.txt``, ``depth.txt``,
    ``right.txt``, ``associate.txt`` (``t_rgb rgb/.. t_depth depth/..``), ``groundtruth.txt``
    (TUM ``t tx ty tz qx qy qz qw`` of ``T_world_cam``, when frames carry ground truth) and
    ``calibration.yaml`` (width, height, fx, fy, cx, cy, distortion, depth_scale[, baseline]).

    Args:
        source: iterable of :class:`~recon_slam.io.frame.Frame` (``len()`` optional).
        out_dir: folder to create or fill (existing files of the same names are replaced).
        progress: show a tqdm progress bar.

    Returns:
        The output folder as a :class:`~pathlib.Path`.
    """
    import cv2
    from tqdm import tqdm

    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create output folder {out}: {exc}") from None
    rgb_lines, depth_lines, right_lines, assoc = [], [], [], []
    gt_stamps, gt_poses = [], []
    camera: PinholeCamera | None = None
    baseline = None
    total = len(source) if hasattr(source, "__len__") else None
    made = set()
    for frame in tqdm(source, total=total, desc=f"writing {out.name}", unit="frame", disable=not progress):
        if camera is None:
            camera = frame.camera
        name = f"{frame.stamp:.6f}.png"
        for sub in ("rgb", "depth", "right"):
            if sub not in made and (sub == "rgb" or (sub == "depth" and frame.depth is not None)
                                    or (sub == "right" and frame.right_image is not None)):
                (out / sub).mkdir(exist_ok=True)
                made.add(sub)
        _imwrite(out / "rgb" / name, cv2.cvtColor(np.ascontiguousarray(frame.image), cv2.COLOR_RGB2BGR))
        rgb_lines.append(f"{frame.stamp:.6f} rgb/{name}")
        if frame.depth is not None:
            d = np.nan_to_num(np.asarray(frame.depth, np.float64), nan=0.0, posinf=0.0, neginf=0.0)
            raw = np.round(d * DEPTH_SCALE)
            raw[(raw < 0) | (raw > 65535)] = 0  # out of the PNG range: no reading
            _imwrite(out / "depth" / name, raw.astype(np.uint16))
            depth_lines.append(f"{frame.stamp:.6f} depth/{name}")
            assoc.append(f"{frame.stamp:.6f} rgb/{name} {frame.stamp:.6f} depth/{name}")
        if frame.right_image is not None:
            _imwrite(out / "right" / name, cv2.cvtColor(np.ascontiguousarray(frame.right_image), cv2.COLOR_RGB2BGR))
            right_lines.append(f"{frame.stamp:.6f} right/{name}")
            baseline = frame.baseline_m
        if frame.T_world_cam_gt is not None:
            gt_stamps.append(frame.stamp)
            gt_poses.append(frame.T_world_cam_gt)
    if camera is None:
        raise InputError(f"source {getattr(source, 'name', source)!r} yielded no frames: nothing to write")
    title = getattr(source, "name", "sequence")
    _write_list(out / "rgb.txt", f"color images\nfile: {title}\ntimestamp filename", rgb_lines)
    if depth_lines:
        header = f"depth maps (16-bit PNG, {DEPTH_SCALE:g} units per metre)\nfile: {title}\ntimestamp filename"
        _write_list(out / "depth.txt", header, depth_lines)
        header = "rgb-depth association\ntimestamp_rgb rgb_file timestamp_depth depth_file"
        _write_list(out / "associate.txt", header, assoc)
    if right_lines:
        _write_list(out / "right.txt", f"right stereo images\nfile: {title}\ntimestamp filename", right_lines)
    if gt_poses:
        header = (
            f"ground truth trajectory (T_world_cam of the optical frame)\nfile: {title}\n"
            "timestamp tx ty tz qx qy qz qw"
        )
        write_tum(out / "groundtruth.txt", np.asarray(gt_stamps), np.stack(gt_poses), header=header)
    calib = [
        f"width: {camera.width}",
        f"height: {camera.height}",
        f"fx: {camera.fx!r}",
        f"fy: {camera.fy!r}",
        f"cx: {camera.cx!r}",
        f"cy: {camera.cy!r}",
        f"distortion: [{', '.join(repr(float(d)) for d in camera.distortion)}]",
        f"depth_scale: {DEPTH_SCALE!r}",
    ]
    if baseline is not None:
        calib.append(f"baseline: {float(baseline)!r}")
    (out / "calibration.yaml").write_text("\n".join(calib) + "\n")
    return out


def _imwrite(path: Path, img: np.ndarray) -> None:
    import cv2

    if not cv2.imwrite(str(path), img, [cv2.IMWRITE_PNG_COMPRESSION, 1]):
        raise InputError(f"cannot write {path}: check the folder is writable and the disk not full")


def _write_list(path: Path, header: str, lines: list[str]) -> None:
    text = "".join(f"# {h}\n" for h in header.splitlines()) + "".join(line + "\n" for line in lines)
    path.write_text(text)
