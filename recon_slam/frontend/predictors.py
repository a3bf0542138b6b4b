"""Pointmap predictors: turn one input frame into a pointmap with confidences.

A predictor maps a :class:`~recon_slam.io.frame.Frame` to a :class:`Prediction` at the
configured *processing resolution*: ``X_cam`` (H, W, 3) points in the frame's own optical
camera frame, ``C`` (H, W) confidences (0 = invalid) and optionally descriptors. Sensor
predictors (depth camera, stereo matcher) are metric and single-view; the MASt3R network
predictor (later) is two-view and up to scale.

Resizing keeps pixel centres consistent with :meth:`PinholeCamera.scaled`: images are
resized with area averaging, depth by validity-aware block averaging (integer factors) or
nearest neighbour (other factors).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Optional

import cv2
import numpy as np
import torch

from recon_slam.config import PredictorConfig
from recon_slam.errors import InputError
from recon_slam.geometry.camera import PinholeCamera
from recon_slam.io.frame import Frame


@dataclass
class Prediction:
    """Output of a :class:`PointmapPredictor` for one frame, at processing resolution.

    Attributes:
        X_cam: (H, W, 3) float32 points in the frame's optical camera frame (metres when the
            predictor is metric); arbitrary where ``C == 0``. May be a non-contiguous view
            (the sensor predictors store points channel-first, see :attr:`X_chw`).
        C: (H, W) float32 confidence >= 0; 0 marks invalid pixels.
        camera: intrinsics of the processing resolution (no distortion).
        image: (H, W, 3) uint8 RGB image at processing resolution (torch, same device).
        D: optional (H, W, F) float32 descriptors.
        Q: optional (H, W) float32 descriptor confidence.
        index, stamp: copied from the frame.
        valid_count: optional number of pixels with ``C > 0``: a host int, or a () long
            device tensor that the engine reads together with the tracking result (no
            extra host synchronisation); None: computed from ``C`` when asked.
        image_max: optional host value of ``image.max()`` (the input is on the host).
    """

    X_cam: torch.Tensor
    C: torch.Tensor
    camera: PinholeCamera
    image: torch.Tensor
    D: Optional[torch.Tensor] = None
    Q: Optional[torch.Tensor] = None
    index: int = -1
    stamp: float = 0.0
    valid_count: Optional[object] = None
    image_max: Optional[int] = None

    @property
    def X_chw(self) -> torch.Tensor:
        """(3, H, W) contiguous channel-first ``X_cam`` (a view when ``X_cam`` is one)."""
        cached = self.__dict__.get("_X_chw")
        if cached is None or cached[0] is not self.X_cam:
            cached = (self.X_cam, self.X_cam.permute(2, 0, 1).contiguous())
            self.__dict__["_X_chw"] = cached
        return cached[1]

    @property
    def valid(self) -> torch.Tensor:
        """(H, W) bool: pixels with positive confidence."""
        return self.C > 0

    @property
    def valid_fraction(self) -> float:
        """Fraction of pixels with positive confidence (reads :attr:`valid_count` once)."""
        vc = self.valid_count
        if vc is None:
            return float(self.valid.float().mean())
        if isinstance(vc, torch.Tensor):
            vc = self.valid_count = int(vc)
        return vc / max(self.C.numel(), 1)


@dataclass
class TwoViewPrediction(Prediction):
    """Output of a two-view predictor (MASt3R-style) for a (frame, keyframe) pair.

    The inherited fields describe view 1, the frame: ``X_cam`` (H, W, 3) its points in its
    own camera frame, ``C``, ``D`` (H, W, F), ``Q``. The ``*_other`` fields describe view 2,
    the keyframe's pixels, predicted by the same pass: ``X_other`` (H2, W2, 3) the keyframe's
    points **expressed in the frame's camera** (same unknown scale as ``X_cam``), ``C_other``,
    ``D_other``, ``Q_other``; all None for a single-view pass (no keyframe). ``other_index``
    is the frame index of the keyframe (-1 when none). Both views are up to one unknown scale
    per pair; ``camera`` is the intrinsics of the processing resolution when known (the
    engine uses it only in calibrated mode).
    """

    X_other: Optional[torch.Tensor] = None
    C_other: Optional[torch.Tensor] = None
    D_other: Optional[torch.Tensor] = None
    Q_other: Optional[torch.Tensor] = None
    other_index: int = -1


class PointmapPredictor(abc.ABC):
    """Interface of every pointmap predictor.

    ``predict(frame, keyframe=None)`` returns a :class:`Prediction`. Two-view predictors
    (``two_view``) use ``keyframe``; single-view ones ignore it. ``metric`` tells the tracker
    to estimate SE(3) (true) or Sim(3) (false).
    """

    #: pointmaps in metres (SE(3) tracking) or up to scale (Sim(3)).
    metric: bool = True
    #: prediction depends on the keyframe (network decoders) or not (sensors).
    two_view: bool = False

    def __init__(self, config: PredictorConfig, device: torch.device | str = "cpu") -> None:
        self.config = config
        self.device = torch.device(device)
        self._undistort_cache: dict[PinholeCamera, tuple[np.ndarray, np.ndarray, PinholeCamera]] = {}

    @abc.abstractmethod
    def predict(self, frame: Frame, keyframe=None) -> Prediction:
        """Pointmap of ``frame`` at processing resolution (see :class:`Prediction`)."""

    # ------------------------------------------------------------------ shared helpers
    def processing_camera(self, camera: PinholeCamera) -> PinholeCamera:
        """Intrinsics at processing resolution for input ``camera`` (distortion removed)."""
        cam = PinholeCamera(camera.width, camera.height, camera.fx, camera.fy, camera.cx, camera.cy)
        w, h = processing_size(camera.width, camera.height, self.config.width, self.config.height)
        return cam if (w, h) == (cam.width, cam.height) else cam.scaled(w, h)

    def _undistort(self, frame: Frame) -> tuple[PinholeCamera, np.ndarray, Optional[np.ndarray], Optional[np.ndarray]]:
        """Image, depth and right image without distortion (identity when there is none)."""
        cam = frame.camera
        if not cam.has_distortion or not self.config.undistort:
            return cam, frame.image, frame.depth, frame.right_image
        if cam not in self._undistort_cache:
            self._undistort_cache[cam] = cam.undistortion_maps()
        mx, my, out = self._undistort_cache[cam]
        img = cv2.remap(frame.image, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
        depth = None
        if frame.depth is not None:
            depth = cv2.remap(frame.depth, mx, my, cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT)
        right = None
        if frame.right_image is not None:
            right = cv2.remap(frame.right_image, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
        return out, img, depth, right


def processing_size(width: int, height: int, cfg_width: int, cfg_height: int) -> tuple[int, int]:
    """Processing (width, height) for an input of ``width x height``.

    ``cfg_width == 0`` keeps the input size; ``cfg_height == 0`` keeps the aspect ratio.
    """
    if cfg_width <= 0:
        return width, height
    w = int(cfg_width)
    h = int(cfg_height) if cfg_height > 0 else max(1, int(round(height * w / width)))
    return w, h


def check_image(frame: Frame) -> np.ndarray:
    """The frame's image as (H, W, 3) uint8 (grey replicated), or :class:`InputError`."""
    img = np.asarray(frame.image)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    if img.ndim != 3 or img.shape[2] not in (3, 4):
        raise InputError(f"frame {frame.index}: image has shape {img.shape}; expected (H, W, 3) RGB")
    if img.shape[2] == 4:
        img = img[..., :3]
    if img.dtype != np.uint8:
        if np.issubdtype(img.dtype, np.floating) and img.size and float(np.nanmax(img)) <= 1.0:
            img = img * 255.0
        img = np.clip(np.nan_to_num(img), 0, 255).astype(np.uint8)
    if (img.shape[1], img.shape[0]) != frame.camera.size:
        raise InputError(
            f"frame {frame.index}: image is {img.shape[1]}x{img.shape[0]} but its camera is "
            f"{frame.camera.width}x{frame.camera.height}"
        )
    return np.ascontiguousarray(img)


def resize_image(img: np.ndarray, width: int, height: int) -> np.ndarray:
    """Resize an (H, W[, C]) image to ``width x height`` (area averaging when shrinking)."""
    if (img.shape[1], img.shape[0]) == (width, height):
        return img
    interp = cv2.INTER_AREA if width < img.shape[1] else cv2.INTER_LINEAR
    return cv2.resize(img, (width, height), interpolation=interp)


def resize_depth(depth: np.ndarray, width: int, height: int, max_spread_ratio: float = 0.05) -> np.ndarray:
    """Resize an (H, W) float32 depth map (0 = invalid) to ``width x height``.

    Integer downsampling factors average the valid readings of each block and mark blocks
    with fewer than half their readings valid, or whose readings spread more than
    ``max_spread_ratio`` of their mean (a depth discontinuity), invalid; other factors use
    nearest neighbour.
    """
    h, w = depth.shape
    if (w, h) == (width, height):
        return depth
    if w % width == 0 and h % height == 0 and w // width == h // height:
        f = w // width
        valid = depth > 0
        frac = cv2.resize(valid.astype(np.float32), (width, height), interpolation=cv2.INTER_AREA)
        total = cv2.resize(depth, (width, height), interpolation=cv2.INTER_AREA)
        mean = total / np.maximum(frac, 1e-12)
        kernel = np.ones((f, f), np.uint8)
        zmax = cv2.dilate(depth, kernel, anchor=(0, 0), borderType=cv2.BORDER_REPLICATE)[::f, ::f]
        big = np.float32(1e9)
        zmin = cv2.erode(np.where(valid, depth, big), kernel, anchor=(0, 0),
                         borderType=cv2.BORDER_REPLICATE)[::f, ::f]
        ok = (frac >= 0.5) & ((zmax - zmin) <= max_spread_ratio * mean)
        return np.where(ok, mean, 0.0).astype(np.float32)
    return cv2.resize(depth, (width, height), interpolation=cv2.INTER_NEAREST)


def discontinuity_mask(depth: np.ndarray, ratio: float) -> np.ndarray:
    """(H, W) bool: valid pixels whose depth differs from a valid 4-neighbour by > ratio * depth."""
    z = depth
    valid = z > 0
    out = np.zeros(z.shape, dtype=bool)
    jump = valid[:, 1:] & valid[:, :-1] & (np.abs(z[:, 1:] - z[:, :-1]) > ratio * np.minimum(z[:, 1:], z[:, :-1]))
    out[:, 1:] |= jump
    out[:, :-1] |= jump
    jump = valid[1:] & valid[:-1] & (np.abs(z[1:] - z[:-1]) > ratio * np.minimum(z[1:], z[:-1]))
    out[1:] |= jump
    out[:-1] |= jump
    return out


_RAY_CACHE: dict = {}


def pixel_rays_chw(camera: PinholeCamera) -> np.ndarray:
    """(3, H, W) float32 rays with z = 1 of every pixel of ``camera`` (cached, channel-first)."""
    key = ("chw", camera)
    rays = _RAY_CACHE.get(key)
    if rays is None:
        rays = np.ascontiguousarray(pixel_rays(camera).transpose(2, 0, 1))
        _RAY_CACHE[key] = rays
    return rays


def pixel_rays(camera: PinholeCamera) -> np.ndarray:
    """(H, W, 3) float32 rays with z = 1 of every pixel of ``camera`` (cached)."""
    rays = _RAY_CACHE.get(camera)
    if rays is None:
        if len(_RAY_CACHE) > 16:
            _RAY_CACHE.clear()
        u, v = np.meshgrid(np.arange(camera.width, dtype=np.float64), np.arange(camera.height, dtype=np.float64))
        rays = np.stack(((u - camera.cx) / camera.fx, (v - camera.cy) / camera.fy, np.ones_like(u)), -1)
        rays = rays.astype(np.float32)
        _RAY_CACHE[camera] = rays
    return rays


def depth_to_prediction(
    depth: np.ndarray,
    camera: PinholeCamera,
    image: np.ndarray,
    sigma: np.ndarray,
    config: PredictorConfig,
    device: torch.device | str = "cpu",
    index: int = -1,
    stamp: float = 0.0,
) -> Prediction:
    """Pointmap + confidence from a metric depth map.

    Args:
        depth: (H, W) float32 depth (z) in metres, 0/NaN/inf invalid.
        camera: intrinsics of ``depth`` (no distortion).
        image: (H, W, 3) uint8.
        sigma: (H, W) float32 depth standard deviation in metres (the noise model).
        config: predictor settings (depth range, discontinuity ratio).
        device: where the prediction's tensors go.

    Returns:
        :class:`Prediction` with ``C = (sigma(1 m) / sigma)^2`` (1 for a reading at 1 m with
        the reference noise), 0 for invalid, out-of-range and discontinuity pixels;
        ``X_cam = z * K^-1 (u, v, 1)`` (0 where invalid).
    """
    z = np.asarray(depth, dtype=np.float32)
    valid = (z >= max(config.min_depth, 1e-9)) & (z <= config.max_depth)  # NaN compares False
    z = np.where(valid, z, np.float32(0.0))
    valid &= ~discontinuity_mask(z, config.discontinuity_ratio)
    valid &= sigma > 0  # NaN compares False
    sigma_ref = np.float32(config.depth_sigma_base + config.depth_sigma_quadratic)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        C = np.where(valid, np.square(sigma_ref / sigma), np.float32(0.0)).astype(np.float32)
    z = np.where(valid, z, np.float32(0.0))
    X_chw = torch.from_numpy(pixel_rays_chw(camera) * z).to(torch.device(device))  # (3, H, W)
    dev = X_chw.device
    image = np.ascontiguousarray(image)
    pred = Prediction(
        X_cam=X_chw.permute(1, 2, 0),  # (H, W, 3) view of the channel-first points
        C=torch.from_numpy(C.astype(np.float32)).to(dev),
        camera=camera,
        image=torch.from_numpy(image).to(dev),
        index=index,
        stamp=stamp,
        valid_count=int(np.count_nonzero(C)),
        image_max=int(image.max()) if image.size else 0,
    )
    pred.__dict__["_X_chw"] = (pred.X_cam, X_chw)
    return pred


_RAY_TENSORS: dict = {}


def _ray_tensor(camera: PinholeCamera, device: torch.device) -> torch.Tensor:
    """(3, H, W) float32 rays (z = 1) of ``camera`` on ``device`` (uploaded once, cached)."""
    key = (camera, str(device))
    rays = _RAY_TENSORS.get(key)
    if rays is None:
        if len(_RAY_TENSORS) > 16:
            _RAY_TENSORS.clear()
        rays = _RAY_TENSORS[key] = torch.from_numpy(pixel_rays_chw(camera)).to(device)
    return rays


def depth_maps_torch(z: torch.Tensor, rays: torch.Tensor, config: PredictorConfig
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pointmap, confidence and valid count of a raw metric depth map, on its device.

    Same maps as :func:`depth_to_prediction` with the predictor's noise model
    ``sigma(z) = base + quadratic z^2``; no host synchronisation, fixed shapes (~30
    kernels).

    Args:
        z: (H, W) float32 depth in metres; 0 / NaN / inf / out of range are invalid.
        rays: (3, H, W) float32 pixel rays with z = 1.
        config: predictor settings (depth range, discontinuity ratio, noise model).

    Returns:
        ``X_chw`` (3, H, W) points (0 where invalid), ``C`` (H, W) confidence (0 invalid),
        ``n_valid`` () long number of valid pixels.
    """
    valid = (z >= max(config.min_depth, 1e-9)) & (z <= config.max_depth)  # NaN compares False
    # discontinuities: a valid 4-neighbour differs by more than ratio * the smaller depth;
    # invalid pixels are NaN here, so that no pair with an invalid pixel is a jump
    zi = torch.where(valid, z, float("nan"))
    r = config.discontinuity_ratio
    a, b = zi[:, 1:], zi[:, :-1]
    jh = (a - b).abs_() > torch.minimum(a, b).mul_(r)
    a, b = zi[1:], zi[:-1]
    jv = (a - b).abs_() > torch.minimum(a, b).mul_(r)
    F = torch.nn.functional
    disc = F.pad(jh, (1, 0)) | F.pad(jh, (0, 1)) | F.pad(jv, (0, 0, 1, 0)) | F.pad(jv, (0, 0, 0, 1))
    valid &= ~disc
    base, quad = config.depth_sigma_base, config.depth_sigma_quadratic
    zv = torch.where(valid, z, 0.0)
    sigma = (zv * zv).mul_(quad).add_(base)
    if not (base > 0 and quad >= 0):  # sigma > 0 is not guaranteed by the model
        valid &= sigma > 0
        zv = torch.where(valid, zv, 0.0)
    sigma_ref = base + quad
    C = torch.where(valid, sigma.clamp_min_(1e-12).reciprocal_().mul_(sigma_ref).square_(), 0.0)
    return rays * zv, C, valid.sum()


def _depth_to_prediction_torch(depth, camera: PinholeCamera, image: np.ndarray, config: PredictorConfig,
                               device: torch.device, index: int, stamp: float,
                               graphs: Optional[dict] = None) -> Prediction:
    """:func:`depth_to_prediction` computed on the device (same maps; used on CUDA).

    Only the depth (H, W) float32 and the image (H, W, 3) uint8 are uploaded (through
    pinned buffers, without a host synchronisation); validity, discontinuities, the
    noise-model confidence and the points are computed there
    (:func:`depth_maps_torch`). The valid count stays on the device
    (:attr:`Prediction.valid_count`); the image maximum is taken on the host. With a
    ``graphs`` cache (the predictor's) the maps are one CUDA graph replay on CUDA.
    """
    from recon_slam.frontend.tracking_device import graphed_call, upload

    device = torch.device(device)
    image = np.ascontiguousarray(image)
    z = upload(np.asarray(depth, dtype=np.float32), device)
    rays = _ray_tensor(camera, device)
    c = config
    key = (camera, tuple(z.shape), c.min_depth, c.max_depth, c.discontinuity_ratio, c.depth_sigma_base,
           c.depth_sigma_quadratic, str(device))
    if graphs is None:
        X_chw, C, n_valid = depth_maps_torch(z, rays, config)
    else:  # on CUDA one graph replay (the maps outlive the call: copies of the static outputs)
        X_chw, C, n_valid = graphed_call(graphs, key, lambda zz: depth_maps_torch(zz, rays, config), [z],
                                         copy_outputs=True)
    pred = Prediction(
        X_cam=X_chw.permute(1, 2, 0),
        C=C,
        camera=camera,
        image=upload(image, device),
        index=index,
        stamp=stamp,
        valid_count=n_valid,
        image_max=int(image.max()) if image.size else 0,
    )
    pred.__dict__["_X_chw"] = (pred.X_cam, X_chw)
    return pred


class RgbdPredictor(PointmapPredictor):
    """Pointmap from a registered metric depth image (RGB-D cameras, synthetic depth).

    Confidence from the depth noise model ``sigma(z) = a + b z^2``
    (``config.depth_sigma_base``, ``config.depth_sigma_quadratic``), normalised to 1 at 1 m.
    """

    metric = True
    two_view = False

    def __init__(self, config: PredictorConfig, device: torch.device | str = "cpu") -> None:
        super().__init__(config, device)
        self._graphs: dict = {}  # CUDA graphs of the depth -> pointmap maps

    def predict(self, frame: Frame, keyframe=None) -> Prediction:
        """(H, W, 3) pointmap of ``frame.depth`` at processing resolution, see :class:`Prediction`."""
        if frame.depth is None:
            raise InputError(
                f"frame {frame.index} has no depth image: mode 'rgbd' needs registered depth "
                "(use mode 'stereo' for stereo pairs)"
            )
        check_image(frame)
        cam_u, img, depth, _ = self._undistort(frame)
        img = check_image(Frame(frame.index, frame.stamp, img, cam_u))
        cam = self.processing_camera(cam_u)
        depth = np.asarray(depth, dtype=np.float32)
        if depth.shape != img.shape[:2]:
            raise InputError(
                f"frame {frame.index}: depth is {depth.shape[1]}x{depth.shape[0]} but the image is "
                f"{img.shape[1]}x{img.shape[0]}; depth must be registered to the colour image"
            )
        same_size = (depth.shape[1], depth.shape[0]) == (cam.width, cam.height)
        if self.device.type == "cuda" and same_size:
            # the maps are computed on the device, invalid readings included (NaN, inf,
            # negative and out of range are rejected there exactly as below)
            return _depth_to_prediction_torch(depth, cam, img, self.config, self.device, frame.index, frame.stamp,
                                              self._graphs)
        # 0 for NaN, inf, negative and out-of-range readings, in one pass
        depth = np.where((depth > 0) & (depth <= self.config.max_depth), depth, np.float32(0.0))
        z = resize_depth(depth, cam.width, cam.height, self.config.discontinuity_ratio)
        img = resize_image(img, cam.width, cam.height)
        if self.device.type == "cuda":  # the maps are computed on the device
            return _depth_to_prediction_torch(z, cam, img, self.config, self.device, frame.index, frame.stamp,
                                              self._graphs)
        sigma = self.config.depth_sigma_base + self.config.depth_sigma_quadratic * z * z
        return depth_to_prediction(z, cam, img, sigma, self.config, self.device, frame.index, frame.stamp)


class StereoPredictor(PointmapPredictor):
    """Pointmap from a rectified stereo pair with OpenCV StereoSGBM.

    Disparity at processing resolution with subpixel precision (1/16 px), optional
    left-right consistency check (the right disparity comes from matching the mirrored
    pair), depth ``z = fx * B / d``; confidence from the disparity uncertainty
    ``sigma_z = z^2 sigma_d / (fx B)`` as ``(sigma_ref / sigma_z)^2`` with the same
    reference ``sigma_ref`` (the RGB-D noise at 1 m) as :class:`RgbdPredictor`.
    """

    metric = True
    two_view = False

    def __init__(self, config: PredictorConfig, device: torch.device | str = "cpu") -> None:
        super().__init__(config, device)
        self._matchers: dict[int, cv2.StereoSGBM] = {}

    def _matcher(self, num_disp: int) -> cv2.StereoSGBM:
        if num_disp not in self._matchers:
            c = self.config
            bs = c.sgbm_block_size
            mode = {"sgbm": cv2.STEREO_SGBM_MODE_SGBM, "hh": cv2.STEREO_SGBM_MODE_HH,
                    "sgbm_3way": cv2.STEREO_SGBM_MODE_SGBM_3WAY}[c.sgbm_mode]
            self._matchers[num_disp] = cv2.StereoSGBM_create(
                minDisparity=c.sgbm_min_disparity,
                numDisparities=num_disp,
                blockSize=bs,
                P1=c.sgbm_p1 or 8 * 3 * bs * bs,
                P2=c.sgbm_p2 or 32 * 3 * bs * bs,
                disp12MaxDiff=c.sgbm_disp12_max_diff,
                uniquenessRatio=c.sgbm_uniqueness_ratio,
                speckleWindowSize=c.sgbm_speckle_window,
                speckleRange=c.sgbm_speckle_range,
                mode=mode,
            )
        return self._matchers[num_disp]

    def disparity(self, left: np.ndarray, right: np.ndarray) -> np.ndarray:
        """(H, W) float32 left disparity in pixels (<= 0 invalid) of a rectified grey pair."""
        c = self.config
        num = c.sgbm_num_disparities
        matcher = self._matcher(num)
        pad = num + max(c.sgbm_min_disparity, 0)
        # pad on the left so that the leftmost columns can be matched too
        lp = cv2.copyMakeBorder(left, 0, 0, pad, 0, cv2.BORDER_REPLICATE)
        rp = cv2.copyMakeBorder(right, 0, 0, pad, 0, cv2.BORDER_REPLICATE)
        disp = matcher.compute(lp, rp)[:, pad:].astype(np.float32) / 16.0
        invalid = disp <= max(c.sgbm_min_disparity, 0) - 1 + 1e-3
        if c.stereo_lr_check:
            # right-image disparity: match the mirrored pair (mirrored right acts as left)
            rf = np.ascontiguousarray(right[:, ::-1])
            lf = np.ascontiguousarray(left[:, ::-1])
            rfp = cv2.copyMakeBorder(rf, 0, 0, pad, 0, cv2.BORDER_REPLICATE)
            lfp = cv2.copyMakeBorder(lf, 0, 0, pad, 0, cv2.BORDER_REPLICATE)
            disp_r = (matcher.compute(rfp, lfp)[:, pad:].astype(np.float32) / 16.0)[:, ::-1]
            h, w = disp.shape
            xs = np.arange(w, dtype=np.float32)[None, :] - disp
            xr = np.clip(np.round(xs).astype(np.int64), 0, w - 1)
            dr = np.take_along_axis(disp_r, xr, axis=1)
            invalid |= (xs < 0) | (dr <= 0) | (np.abs(dr - disp) > c.stereo_lr_max_diff)
        disp[invalid] = 0.0
        return disp

    def predict(self, frame: Frame, keyframe=None) -> Prediction:
        """(H, W, 3) pointmap of the rectified left image at processing resolution."""
        if frame.right_image is None or not frame.baseline_m:
            raise InputError(
                f"frame {frame.index} has no right image or baseline: mode 'stereo' needs rectified pairs "
                "with baseline_m > 0 (use mode 'rgbd' for depth cameras)"
            )
        check_image(frame)
        cam_u, img, _, right = self._undistort(frame)
        cam = self.processing_camera(cam_u)
        img = resize_image(np.ascontiguousarray(img), cam.width, cam.height)
        right = resize_image(np.ascontiguousarray(np.asarray(right)), cam.width, cam.height)
        if right.ndim == 2:
            right = np.repeat(right[..., None], 3, axis=2)
        gl = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
        gr = cv2.cvtColor(right.astype(np.uint8), cv2.COLOR_RGB2GRAY)
        disp = self.disparity(gl, gr)
        fb = cam.fx * float(frame.baseline_m)
        depth = np.where(disp > 0, fb / np.maximum(disp, 1e-6), 0.0).astype(np.float32)
        # depth noise from the disparity noise; the confidence uses the same absolute
        # reference as the RGB-D model, (sigma_ref / sigma)^2, so that the tracker's sigmas
        # mean the same for every sensor
        sigma = (depth * depth * self.config.disparity_sigma / fb).astype(np.float32)
        return depth_to_prediction(depth, cam, img, sigma, self.config, self.device, frame.index, frame.stamp)


def make_predictor(mode: str, config: PredictorConfig, device: torch.device | str = "cpu",
                   mono_config=None) -> PointmapPredictor:
    """Predictor for input ``mode`` ('rgbd', 'stereo' or 'mono').

    Mode 'mono' builds the MASt3R network predictor from ``mono_config.checkpoint``
    (:class:`~recon_slam.frontend.mast3r_predictor.Mast3rPredictor`); it fails with an
    :class:`InputError` saying where to get the weights when none is given.
    """
    if mode == "rgbd":
        return RgbdPredictor(config, device)
    if mode == "stereo":
        return StereoPredictor(config, device)
    if mode == "mono":
        from recon_slam.frontend.mast3r_predictor import Mast3rPredictor

        return Mast3rPredictor(config, device, mono_config=mono_config)
    raise InputError(f"unknown mode {mode!r}: use 'rgbd', 'stereo' or 'mono'")
