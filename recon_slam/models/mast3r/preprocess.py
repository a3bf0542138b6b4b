"""Image preparation for MASt3R: resize, centre crop to the patch grid, normalise.

The long side is resized to ``long_side`` (512 for the released model; 640x480 becomes
512x384), then the image is centre-cropped so that both sides are multiples of the patch
size (16), and values are mapped to ``[-1, 1]`` by ``(rgb / 255 - 0.5) / 0.5``. The camera
intrinsics follow the same resize and crop (OpenCV pixel-centre convention), so a 3D point
projects onto the same image content before and after.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch

from recon_slam.errors import InputError
from recon_slam.geometry.camera import PinholeCamera


@dataclass(frozen=True)
class ResizeCrop:
    """Geometry of the preparation: input ``(in_w, in_h)`` -> resized ``(resized_w, resized_h)``
    -> window ``[x0, x0+width) x [y0, y0+height)`` of the resized image."""

    in_w: int
    in_h: int
    resized_w: int
    resized_h: int
    x0: int
    y0: int
    width: int
    height: int

    def camera(self, camera: PinholeCamera) -> PinholeCamera:
        """Intrinsics of the prepared image from those of the input image."""
        if (camera.width, camera.height) != (self.in_w, self.in_h):
            raise InputError(
                f"camera is {camera.width}x{camera.height} but the image is {self.in_w}x{self.in_h}: "
                "give the calibration of these images (or camera.scaled() to their size)"
            )
        return camera.scaled(self.resized_w, self.resized_h).cropped(self.x0, self.y0, self.width, self.height)

    def to_input_pixels(self, uv: np.ndarray) -> np.ndarray:
        """Pixels ``(..., 2)`` of the prepared image -> pixels of the input image."""
        uv = np.asarray(uv, dtype=np.float64)
        sx, sy = self.resized_w / self.in_w, self.resized_h / self.in_h
        u = (uv[..., 0] + self.x0 + 0.5) / sx - 0.5
        v = (uv[..., 1] + self.y0 + 0.5) / sy - 0.5
        return np.stack((u, v), axis=-1)


def plan_resize_crop(width: int, height: int, long_side: int = 512, multiple: int = 16) -> ResizeCrop:
    """Sizes for an input of ``width x height``: long side -> ``long_side``, centre crop to ``multiple``."""
    if width <= 0 or height <= 0:
        raise InputError(f"image size {width}x{height} is invalid")
    scale = long_side / max(width, height)
    rw, rh = max(1, int(round(width * scale))), max(1, int(round(height * scale)))
    cw, ch = (rw // multiple) * multiple, (rh // multiple) * multiple
    if cw == 0 or ch == 0:
        raise InputError(
            f"image {width}x{height} is too elongated: resized to {rw}x{rh}, one side is below {multiple} pixels"
        )
    return ResizeCrop(width, height, rw, rh, (rw - cw) // 2, (rh - ch) // 2, cw, ch)


@dataclass
class PreparedImage:
    """An image ready for the network.

    Attributes:
        tensor: (1, 3, H, W) float32 in [-1, 1].
        rgb: (H, W, 3) uint8 resized and cropped image (for colours / display).
        camera: intrinsics of the prepared image (``None`` when none were given).
        geometry: the resize and crop applied.
    """

    tensor: torch.Tensor
    rgb: np.ndarray
    camera: PinholeCamera | None
    geometry: ResizeCrop

    @property
    def true_shape(self) -> tuple[int, int]:
        """(H, W) of the prepared image."""
        return self.geometry.height, self.geometry.width


def normalize_rgb(rgb: np.ndarray | torch.Tensor, device: str | torch.device | None = None) -> torch.Tensor:
    """(H, W, 3) or (B, H, W, 3) uint8 RGB -> (B, 3, H, W) float32 ``(x/255 - 0.5) / 0.5``."""
    t = torch.as_tensor(rgb, device=device)
    if t.ndim == 3:
        t = t[None]
    x = t.permute(0, 3, 1, 2).to(torch.float32)
    return (x / 255.0 - 0.5) / 0.5


def prepare_image(
    rgb: np.ndarray,
    camera: PinholeCamera | None = None,
    long_side: int = 512,
    multiple: int = 16,
    device: str | torch.device | None = None,
) -> PreparedImage:
    """Resize (long side -> ``long_side``), centre-crop to multiples of ``multiple``, normalise.

    Args:
        rgb: (H, W, 3) uint8 RGB image (a (H, W) grey image is replicated to 3 channels).
        camera: intrinsics of ``rgb`` (undistorted); adjusted to the prepared image.
        long_side: target size of the longer side in pixels.
        multiple: patch size the sides must be multiples of.
        device: device of the returned tensor.

    Returns:
        :class:`PreparedImage` with the (1, 3, H', W') tensor and the adjusted camera.
    """
    rgb = np.asarray(rgb)
    if rgb.ndim == 2:
        rgb = np.repeat(rgb[..., None], 3, axis=-1)
    if rgb.ndim != 3 or rgb.shape[2] not in (3, 4):
        raise InputError(f"image of shape {rgb.shape}: expected (H, W, 3) RGB")
    rgb = rgb[..., :3]
    if rgb.dtype != np.uint8:
        raise InputError(f"image dtype {rgb.dtype}: expected uint8 RGB (convert 16-bit or float images first)")
    h, w = rgb.shape[:2]
    geo = plan_resize_crop(w, h, long_side, multiple)
    if (geo.resized_w, geo.resized_h) != (w, h):
        shrinking = geo.resized_w < w
        interp = cv2.INTER_AREA if shrinking else cv2.INTER_CUBIC
        resized = cv2.resize(rgb, (geo.resized_w, geo.resized_h), interpolation=interp)
    else:
        resized = rgb
    crop = np.ascontiguousarray(resized[geo.y0 : geo.y0 + geo.height, geo.x0 : geo.x0 + geo.width])
    cam = geo.camera(camera) if camera is not None else None
    return PreparedImage(tensor=normalize_rgb(crop, device), rgb=crop, camera=cam, geometry=geo)
