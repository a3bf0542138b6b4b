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
        """Camera from a 3x3 intrinsic matrix ``K`` (pixels)."""
        K = np.asarray(K, dtype=np.float64).reshape(3, 3)
        return cls(width, height, K[0, 0], K[1, 1], K[0, 2], K[1, 2], tuple(np.ravel(distortion)))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "calibration") -> "PinholeCamera":
        """Camera from a mapping with ``width height fx fy cx cy [distortion]``.

        Also accepts ROS ``camera_info``-style YAML (``image_width``, ``image_height``,
        ``camera_matrix: {data: [...]}``, ``distortion_coefficients: {data: [...]}``).
        """
        try:
            if "camera_matrix" in data:
                K = np.asarray(data["camera_matrix"]["data"], dtype=np.float64).reshape(3, 3)
                dist = data.get("distortion_coefficients", {}).get("data", ())
                return cls.from_K(K, int(data["image_width"]), int(data["image_height"]), dist)
            if "K" in data and "fx" not in data:
                K = np.asarray(data["K"], dtype=np.float64).reshape(3, 3)
                return cls.from_K(K, int(data["width"]), int(data["height"]), data.get("distortion", ()))
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
                "(and optionally distortion: [k1, k2, p1, p2, k3])"
            ) from None
        except (TypeError, ValueError) as exc:
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
        return cv2.undistortPoints(uv, self.K, np.asarray(self.distortion)).reshape(-1, 2)

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
        """Depth map ``(H, W)`` in metres (z) -> camera-frame pointmap ``(H, W, 3)``."""
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
