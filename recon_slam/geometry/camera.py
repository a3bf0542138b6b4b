"""Pinhole cameras with OpenCV (plumb_bob / rational) distortion.

Pixel convention: OpenCV's, pixel centres at integer coordinates, ``u`` along the width
(x, right) and ``v`` along the height (y, down). Camera frame: optical (z forward).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from recon_slam.errors import CalibrationError


_SUPPORTED_DISTORTION_MODELS = ("plumb_bob", "rational_polynomial", "none", "")
# cv2.undistortPoints stops after 5 iterations by default, which leaves errors of tenths of
# a pixel in the corners of wide-angle images; iterate to convergence instead.
_UNDISTORT_CRITERIA = (3, 100, 1e-12)  # cv2.TERM_CRITERIA_COUNT | cv2.TERM_CRITERIA_EPS


def _check_distortion_model(model: Any, source: str) -> None:
    """Reject distortion models whose coefficients would be misread as OpenCV plumb_bob ones."""
    if model is None:
        return
    if str(model).strip().lower() not in _SUPPORTED_DISTORTION_MODELS:
        raise CalibrationError(
            f"{source}: distortion_model {model!r} is not supported (only plumb_bob and "
            "rational_polynomial); rectify the images first and give the rectified camera_info"
        )


def _matrix_data(value: Any) -> Any:
    """Numbers of a calibration matrix: ``{rows, cols, data: [...]}`` mapping, list, or ``None`` (empty)."""
    if value is None:
        return ()
    if isinstance(value, Mapping):
        return value["data"] if value.get("data") is not None else ()
    return value


@dataclass(frozen=True)
class PinholeCamera:
    """Intrinsics of one camera.

    Attributes:
        width, height: image size in pixels.
        fx, fy, cx, cy: focal lengths and principal point in pixels.
        distortion: OpenCV coefficients ``(k1, k2, p1, p2[, k3[, k4, k5, k6]])``;
            empty when the images are already undistorted / rectified.
    """

    width: int
    height: int
    fx: float
    fy: float
    cx: float
    cy: float
    distortion: tuple[float, ...] = field(default=())

    def __post_init__(self) -> None:
        if self.width <= 0 or self.height <= 0:
            raise CalibrationError(
                f"camera size {self.width}x{self.height} is invalid: width and height must be positive"
            )
        for name in ("fx", "fy"):
            value = getattr(self, name)
            if not math.isfinite(value) or value <= 0:
                raise CalibrationError(f"camera {name}={value} is invalid: focal lengths must be positive")
        for name in ("cx", "cy"):
            if not math.isfinite(getattr(self, name)):
                raise CalibrationError(f"camera {name} is not finite: check the calibration")
        for name in ("fx", "fy", "cx", "cy"):
            object.__setattr__(self, name, float(getattr(self, name)))
        object.__setattr__(self, "width", int(self.width))
        object.__setattr__(self, "height", int(self.height))
        dist = tuple(float(d) for d in self.distortion)
        if dist and not all(math.isfinite(d) for d in dist):
            raise CalibrationError("camera distortion has non-finite coefficients: check the calibration")
        if all(d == 0.0 for d in dist):
            dist = ()
        if dist and len(dist) not in (4, 5, 8):
            raise CalibrationError(
                f"camera distortion has {len(dist)} coefficients; expected 4, 5 or 8 "
                "(OpenCV k1 k2 p1 p2 [k3 [k4 k5 k6]])"
            )
        object.__setattr__(self, "distortion", dist)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_K(cls, K: np.ndarray, width: int, height: int, distortion=()) -> "PinholeCamera":
        """Camera from a 3x3 intrinsic matrix ``K`` (pixels).

        ``K`` must have the pinhole form ``[[fx, 0, cx], [0, fy, cy], [0, 0, 1]]``; a skewed or
        all-zero (uncalibrated) matrix raises :class:`CalibrationError`.
        """
        try:
            K = np.asarray(K, dtype=np.float64).reshape(3, 3)
            dist_array = np.asarray(() if distortion is None else distortion, dtype=np.float64)
            dist = tuple(float(d) for d in dist_array.ravel())
        except (TypeError, ValueError) as exc:
            raise CalibrationError(
                f"camera matrix K must be 3x3 numbers and distortion a list of numbers ({exc})"
            ) from None
        if not np.all(np.isfinite(K)):
            raise CalibrationError("camera matrix K has non-finite entries: check the calibration")
        if not K.any():
            raise CalibrationError(
                "camera matrix K is all zeros: the camera is not calibrated; calibrate it (e.g. ros2 run "
                "camera_calibration cameracalibrator) or give --calib FILE"
            )
        pinhole_pattern = np.array([K[1, 0], K[2, 0], K[2, 1], K[2, 2] - 1.0])
        if np.any(np.abs(pinhole_pattern) > 1e-9):
            raise CalibrationError(
                f"camera matrix K={K.tolist()} is not of the form [[fx, 0, cx], [0, fy, cy], [0, 0, 1]]"
            )
        if abs(K[0, 1]) > 1e-6 * abs(K[0, 0]):
            raise CalibrationError(
                f"camera matrix K has skew {K[0, 1]}: skewed pixels are not supported, recalibrate with zero skew"
            )
        return cls(width, height, K[0, 0], K[1, 1], K[0, 2], K[1, 2], dist)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "calibration") -> "PinholeCamera":
        """Camera from a mapping with ``width height fx fy cx cy [distortion]``.

        Also accepts:

        * ``width height K [distortion]`` with ``K`` a 3x3 (nested or flat) list;
        * ROS ``camera_info`` calibration YAML (``image_width``, ``image_height``,
          ``camera_matrix: {data: [...]}``, ``distortion_model``,
          ``distortion_coefficients: {data: [...]}``);
        * a ``sensor_msgs/CameraInfo`` message dumped as YAML (``width``, ``height``,
          ``k``/``K``, ``d``/``D``, ``distortion_model``), ROS 2 or ROS 1 spelling.

        Only the ``plumb_bob`` and ``rational_polynomial`` distortion models are supported.
        """
        if not isinstance(data, Mapping):
            raise CalibrationError(f"{source}: expected a mapping with width, height, fx, fy, cx, cy")
        try:
            _check_distortion_model(data.get("distortion_model"), source)
            if "camera_matrix" in data:
                K = _matrix_data(data["camera_matrix"])
                dist = _matrix_data(data.get("distortion_coefficients"))
                return cls.from_K(K, int(data["image_width"]), int(data["image_height"]), dist)
            if "fx" not in data:
                K_key = "K" if "K" in data else "k" if "k" in data else None
                if K_key is not None:
                    dist = ()
                    for dist_key in ("distortion", "D", "d"):
                        if data.get(dist_key) is not None:
                            dist = _matrix_data(data[dist_key])
                            break
                    K = _matrix_data(data[K_key])
                    return cls.from_K(K, int(data["width"]), int(data["height"]), dist)
            return cls(
                int(data["width"]),
                int(data["height"]),
                float(data["fx"]),
                float(data["fy"]),
                float(data["cx"]),
                float(data["cy"]),
                tuple(float(d) for d in (data.get("distortion") or ())),
            )
        except KeyError as exc:
            raise CalibrationError(
                f"{source}: missing key {exc.args[0]!r}; a calibration needs width, height, fx, fy, cx, cy "
                "(and optionally distortion: [k1, k2, p1, p2, k3]), or is a ROS camera_info YAML with "
                "image_width, image_height, camera_matrix and distortion_coefficients"
            ) from None
        except (TypeError, ValueError, AttributeError) as exc:
            raise CalibrationError(f"{source}: malformed calibration ({exc})") from None

    @classmethod
    def from_yaml(cls, path: str | Path) -> "PinholeCamera":
        """Read a calibration YAML (see :meth:`from_dict` for the accepted keys)."""
        import yaml

        path = Path(path)
        if not path.is_file():
            raise CalibrationError(
                f"calibration file {path} not found: give --calib FILE with width, height, fx, fy, cx, cy"
            )
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise CalibrationError(f"{path}: not valid YAML ({exc})") from None
        if not isinstance(data, Mapping):
            raise CalibrationError(f"{path}: expected a mapping with width, height, fx, fy, cx, cy")
        return cls.from_dict(data, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        """Plain mapping accepted by :meth:`from_dict` (YAML/JSON friendly)."""
        return {
            "width": self.width,
            "height": self.height,
            "fx": self.fx,
            "fy": self.fy,
            "cx": self.cx,
            "cy": self.cy,
            "distortion": list(self.distortion),
        }

    # ------------------------------------------------------------------ matrices
    @property
    def K(self) -> np.ndarray:
        """(3, 3) float64 intrinsic matrix."""
        return np.array([[self.fx, 0.0, self.cx], [0.0, self.fy, self.cy], [0.0, 0.0, 1.0]])

    def K_torch(self, dtype=torch.float32, device=None) -> torch.Tensor:
        """(3, 3) intrinsic matrix as a tensor."""
        return torch.tensor(self.K, dtype=dtype, device=device)

    @property
    def has_distortion(self) -> bool:
        return bool(self.distortion)

    @property
    def size(self) -> tuple[int, int]:
        """(width, height)."""
        return self.width, self.height

    # ------------------------------------------------------------------ resize / crop
    def scaled(self, width: int, height: int) -> "PinholeCamera":
        """Intrinsics of the image resized to ``width x height`` (pixel-centre consistent)."""
        sx, sy = width / self.width, height / self.height
        return replace(
            self,
            width=width,
            height=height,
            fx=self.fx * sx,
            fy=self.fy * sy,
            cx=(self.cx + 0.5) * sx - 0.5,
            cy=(self.cy + 0.5) * sy - 0.5,
        )

    def cropped(self, x0: int, y0: int, width: int, height: int) -> "PinholeCamera":
        """Intrinsics of the window ``[x0, x0+width) x [y0, y0+height)`` of the image."""
        if x0 < 0 or y0 < 0 or x0 + width > self.width or y0 + height > self.height:
            raise CalibrationError(
                f"crop ({x0}, {y0}, {width}x{height}) is outside the {self.width}x{self.height} image"
            )
        return replace(self, width=width, height=height, cx=self.cx - x0, cy=self.cy - y0)

    # ------------------------------------------------------------------ distortion
    def undistortion_maps(self, alpha: float = 0.0) -> tuple[np.ndarray, np.ndarray, "PinholeCamera"]:
        """OpenCV remap tables that undistort images of this camera.

        Returns:
            map_x, map_y: (H, W) float32 tables for ``cv2.remap``.
            camera: the undistorted camera (no distortion) of the output images.
        """
        import cv2

        if not self.has_distortion:
            u, v = np.meshgrid(np.arange(self.width, dtype=np.float32), np.arange(self.height, dtype=np.float32))
            return u, v, self
        dist = np.asarray(self.distortion, dtype=np.float64)
        K_new, _ = cv2.getOptimalNewCameraMatrix(self.K, dist, self.size, alpha, self.size)
        map_x, map_y = cv2.initUndistortRectifyMap(self.K, dist, None, K_new, self.size, cv2.CV_32FC1)
        return map_x, map_y, PinholeCamera.from_K(K_new, self.width, self.height)

    def undistort_points(self, uv: np.ndarray) -> np.ndarray:
        """Distorted pixels (N, 2) -> normalised undistorted image coordinates (N, 2)."""
        import cv2

        uv = np.asarray(uv, dtype=np.float64).reshape(-1, 1, 2)
        if not self.has_distortion:
            out = (uv.reshape(-1, 2) - [self.cx, self.cy]) / [self.fx, self.fy]
            return out
        dist = np.asarray(self.distortion, dtype=np.float64)
        if hasattr(cv2, "undistortPointsIter"):  # OpenCV 4: the overload taking a criteria
            out = cv2.undistortPointsIter(uv, self.K, dist, None, None, _UNDISTORT_CRITERIA)
        else:  # OpenCV 5: undistortPoints takes the criteria itself
            out = cv2.undistortPoints(uv, self.K, dist, None, None, None, _UNDISTORT_CRITERIA)
        return out.reshape(-1, 2)

    # ------------------------------------------------------------------ rays / projection
    def pixel_grid(self, dtype=torch.float32, device=None) -> torch.Tensor:
        """(H, W, 2) tensor of pixel coordinates ``(u, v)``."""
        v, u = torch.meshgrid(
            torch.arange(self.height, dtype=dtype, device=device),
            torch.arange(self.width, dtype=dtype, device=device),
            indexing="ij",
        )
        return torch.stack((u, v), dim=-1)

    def pixel_to_ray(self, uv: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Pixels ``(..., 2)`` -> rays ``(..., 3)`` in the camera frame.

        Ignores distortion (undistort images first). Rays have ``z = 1`` unless
        ``normalize`` is true, then unit length.
        """
        x = (uv[..., 0] - self.cx) / self.fx
        y = (uv[..., 1] - self.cy) / self.fy
        ray = torch.stack((x, y, torch.ones_like(x)), dim=-1)
        return torch.nn.functional.normalize(ray, dim=-1) if normalize else ray

    def project(self, points: torch.Tensor, eps: float = 1e-9) -> tuple[torch.Tensor, torch.Tensor]:
        """Camera-frame points ``(..., 3)`` -> pixels ``(..., 2)`` and depths ``(...)``.

        Ignores distortion. Points at ``z <= eps`` get non-finite-free pixels but their
        depth tells the caller to reject them.
        """
        z = points[..., 2]
        z_safe = torch.where(z.abs() > eps, z, torch.full_like(z, eps))
        u = self.fx * points[..., 0] / z_safe + self.cx
        v = self.fy * points[..., 1] / z_safe + self.cy
        return torch.stack((u, v), dim=-1), z

    def backproject_depth(self, depth: torch.Tensor) -> torch.Tensor:
        """Depth map ``(..., H, W)`` in metres (z) -> camera-frame pointmap ``(..., H, W, 3)``."""
        if tuple(depth.shape[-2:]) != (self.height, self.width):
            raise CalibrationError(
                f"depth map of shape {tuple(depth.shape)} does not match the {self.width}x{self.height} camera "
                f"(expected (..., {self.height}, {self.width})): use camera.scaled() / cropped() to match the images"
            )
        rays = self.pixel_to_ray(self.pixel_grid(depth.dtype, depth.device))
        return rays * depth[..., None]

    def in_image(self, uv: torch.Tensor, margin: float = 0.0) -> torch.Tensor:
        """Boolean ``(...)``: pixel inside the image (with ``margin`` pixels to spare)."""
        return (
            (uv[..., 0] >= -0.5 + margin)
            & (uv[..., 0] <= self.width - 0.5 - margin)
            & (uv[..., 1] >= -0.5 + margin)
            & (uv[..., 1] <= self.height - 0.5 - margin)
        )
