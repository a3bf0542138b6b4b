"""Mapping data for the relocaliser: frames at processing resolution and augmented batches.

:func:`prepare_mapping_frames` turns frames (or arrays) with known poses into
:class:`MappingFrames` at the processing resolution (shorter image side
``short_side``), undistorting images that carry lens distortion.

:class:`TrainingBuffer` keeps them on the training device and draws augmented batches
(ACE-style augmentation: scale in ``[1/s_max, s_max]``, in-plane rotation within
``+-rot_max``, brightness and contrast jitter; padding is masked out). Since the whole
network is trained per map, the "buffer" holds images rather than frozen features; every
batch samples the stride-8 cells of each augmented image with their source pixel
(in the un-augmented image, so the pose and intrinsics of the source frame stay valid:
no pose rotation is needed) and, where depth is valid and smooth, the 3D target

    X_world = T_world_cam @ (depth(p) * K^-1 [p, 1]).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from recon_slam.errors import CalibrationError, InputError
from recon_slam.geometry.camera import PinholeCamera
from recon_slam.models.ace.encoder import STRIDE, normalise_image


@dataclass
class MappingFrames:
    """Mapping frames at the processing resolution (host arrays).

    Attributes:
        images: (N, H, W, 3) uint8 RGB.
        depths: (N, H, W) float32 metres (0 = no reading), or None (no depth at all).
        poses: (N, 4, 4) float64 ``T_world_cam`` (optical frame).
        K: (N, 3, 3) float64 intrinsics of ``images`` (no distortion).
        masks: optional (N, H, W) bool, False where the image has no content (holes of
            synthesised views); None means all valid.
    """

    images: np.ndarray
    depths: Optional[np.ndarray]
    poses: np.ndarray
    K: np.ndarray
    masks: Optional[np.ndarray] = None

    def __len__(self) -> int:
        return len(self.images)


def processing_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """(width, height) of an image scaled so that its shorter side is ``short_side``."""
    s = short_side / min(width, height)
    return max(8, int(round(width * s))), max(8, int(round(height * s)))


def _to_rgb(image: np.ndarray, where: str) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] not in (3, 4):
        raise InputError(f"{where}: expected an (H, W, 3) RGB or (H, W) grey image, got shape {image.shape}")
    image = image[:, :, :3]
    if image.dtype != np.uint8:
        if np.issubdtype(image.dtype, np.floating) and image.size and float(np.nanmax(image)) <= 1.0 + 1e-6:
            image = np.clip(image * 255.0 + 0.5, 0, 255)
        image = np.clip(image, 0, 255).astype(np.uint8)
    return image


def resize_frame(
    image: np.ndarray, depth: Optional[np.ndarray], camera: PinholeCamera, short_side: int
) -> tuple[np.ndarray, Optional[np.ndarray], PinholeCamera]:
    """Undistort (if needed) and resize one frame to the processing resolution.

    Args:
        image: (H, W, 3) uint8 RGB; depth: optional (H, W) float32 metres.
        camera: intrinsics of ``image`` (with optional distortion).
        short_side: shorter side of the output in pixels.

    Returns:
        image (h, w, 3) uint8, depth (h, w) float32 or None, and the output camera
        (no distortion).
    """
    import cv2

    if (image.shape[1], image.shape[0]) != camera.size:
        raise CalibrationError(
            f"image is {image.shape[1]}x{image.shape[0]} but the camera says {camera.width}x{camera.height}: "
            "give the calibration of this image size"
        )
    if camera.has_distortion:
        mx, my, camera = camera.undistortion_maps()
        image = cv2.remap(image, mx, my, cv2.INTER_LINEAR)
        if depth is not None:
            depth = cv2.remap(depth, mx, my, cv2.INTER_NEAREST)
    w, h = processing_size(camera.width, camera.height, short_side)
    if (w, h) != camera.size:
        interp = cv2.INTER_AREA if w < camera.width else cv2.INTER_LINEAR
        image = cv2.resize(image, (w, h), interpolation=interp)
        if depth is not None:
            depth = cv2.resize(depth, (w, h), interpolation=cv2.INTER_NEAREST)
        camera = camera.scaled(w, h)
    return image, depth, camera


def prepare_mapping_frames(
    frames_or_arrays: Any,
    short_side: int,
    poses: Optional[Sequence[np.ndarray]] = None,
    depth_range: tuple[float, float] = (0.1, 1000.0),
) -> MappingFrames:
    """Mapping frames with poses -> :class:`MappingFrames` at the processing resolution.

    Args:
        frames_or_arrays: an iterable of :class:`~recon_slam.io.frame.Frame` (pose from
            ``T_world_cam_gt`` unless ``poses`` is given; depth from ``depth`` when
            present), or a mapping with ``images`` ((N, H, W, 3) uint8 RGB or a list),
            ``poses`` ((N, 4, 4) ``T_world_cam``), ``camera`` (one
            :class:`PinholeCamera`) or ``cameras`` (one per frame), and optionally
            ``depths`` ((N, H, W) float32 metres, 0 = missing).
        short_side: processing resolution (shorter image side, pixels).
        poses: optional (N, 4, 4) ``T_world_cam`` overriding the frames' ground truth
            (e.g. SLAM keyframe poses).
        depth_range: depths outside ``[min, max]`` metres are treated as missing.

    Raises:
        InputError: no frames, missing poses, inconsistent lengths or bad shapes.
    """
    images, depths, cams, Ts = [], [], [], []
    if isinstance(frames_or_arrays, Mapping):
        data = frames_or_arrays
        if "images" not in data or ("poses" not in data and poses is None):
            raise InputError("mapping data needs 'images' and 'poses' (T_world_cam per image); add the missing key")
        imgs = list(data["images"])
        Ps = list(poses if poses is not None else data["poses"])
        if "cameras" in data:
            cam_list = list(data["cameras"])
        elif "camera" in data:
            cam_list = [data["camera"]] * len(imgs)
        else:
            raise InputError("mapping data needs 'camera' (a PinholeCamera) or 'cameras' (one per image)")
        dps = list(data["depths"]) if data.get("depths") is not None else [None] * len(imgs)
        if not (len(imgs) == len(Ps) == len(cam_list) == len(dps)):
            raise InputError(
                f"mapping data has {len(imgs)} images, {len(Ps)} poses, {len(cam_list)} cameras and "
                f"{len(dps)} depths: give one of each per image"
            )
        items = list(zip(imgs, dps, cam_list, Ps))
    else:
        try:
            frame_list = list(frames_or_arrays)
        except TypeError:
            raise InputError(
                "mapping input must be an iterable of Frames or a mapping with images, poses and camera"
            ) from None
        if poses is not None and len(poses) != len(frame_list):
            raise InputError(f"{len(poses)} poses given for {len(frame_list)} frames: give one pose per frame")
        items = []
        for i, f in enumerate(frame_list):
            T = poses[i] if poses is not None else f.T_world_cam_gt
            if T is None:
                raise InputError(
                    f"mapping frame {i} has no pose: give frames with ground truth or pass poses= "
                    "(e.g. the SLAM keyframe poses)"
                )
            items.append((f.image, f.depth, f.camera, T))
    if not items:
        raise InputError("no mapping frames: the relocaliser needs at least one frame with a pose")
    any_depth = any(d is not None for _, d, _, _ in items)
    lo, hi = depth_range
    for i, (img, dep, cam, T) in enumerate(items):
        if not isinstance(cam, PinholeCamera):
            raise InputError(f"mapping frame {i}: camera must be a PinholeCamera, got {type(cam).__name__}")
        T = np.asarray(T, dtype=np.float64)
        if T.shape != (4, 4) or not np.all(np.isfinite(T)):
            raise InputError(f"mapping frame {i}: pose must be a finite (4, 4) T_world_cam matrix")
        img = _to_rgb(img, f"mapping frame {i}")
        if dep is not None:
            dep = np.asarray(dep, dtype=np.float32)
            if dep.shape != img.shape[:2]:
                raise InputError(
                    f"mapping frame {i}: depth is {dep.shape[1]}x{dep.shape[0]} but the image is "
                    f"{img.shape[1]}x{img.shape[0]}: register the depth to the colour image"
                )
            dep = np.where(np.isfinite(dep) & (dep >= lo) & (dep <= hi), dep, 0.0).astype(np.float32)
        elif any_depth:
            dep = np.zeros(img.shape[:2], np.float32)
        img, dep, cam2 = resize_frame(img, dep, cam, short_side)
        if images and img.shape != images[0].shape:
            raise InputError(
                f"mapping frame {i} is {img.shape[1]}x{img.shape[0]} after resizing but frame 0 is "
                f"{images[0].shape[1]}x{images[0].shape[0]}: all mapping images must have the same aspect ratio"
            )
        images.append(img)
        depths.append(dep)
        cams.append(cam2.K)
        Ts.append(T)
    return MappingFrames(
        images=np.stack(images),
        depths=np.stack(depths) if any_depth else None,
        poses=np.stack(Ts),
        K=np.stack(cams),
    )


@dataclass
class Batch:
    """One augmented training batch (all tensors on the training device).

    Attributes:
        images: (B, C, Hc, Wc) normalised network input.
        uv: (B, h, w, 2) source pixel of each output cell in its frame's processing image.
        valid: (B, h, w) bool, the cell lies inside the source image.
        xyz: (B, h, w, 3) world target where ``has_xyz`` (depth valid and smooth).
        has_xyz: (B, h, w) bool.
        K: (B, 3, 3) source intrinsics; T_cam_world: (B, 4, 4) source poses (float32).
        scale: the augmentation scale of the batch.
    """

    images: torch.Tensor
    uv: torch.Tensor
    valid: torch.Tensor
    xyz: torch.Tensor
    has_xyz: torch.Tensor
    K: torch.Tensor
    T_cam_world: torch.Tensor
    scale: float


@dataclass
class Draws:
    """Random numbers of one batch (all (B,) on the training device): frame indices
    (int64) and uniform [0, 1) draws of the rotation, window shift, gain and contrast."""

    idx: torch.Tensor
    theta: torch.Tensor
    shift_x: torch.Tensor
    shift_y: torch.Tensor
    gain: torch.Tensor
    contrast: torch.Tensor


class TrainingBuffer:
    """Mapping frames on the training device and an augmented batch sampler.

    Args:
        frames: :class:`MappingFrames` (processing resolution).
        device: training device.
        in_channels: network input channels (1 grey, 3 RGB).
        scale_max: scale augmentation range ``[1/scale_max, scale_max]`` (1 disables).
        rotation_deg: in-plane rotation range ``+-rotation_deg``.
        brightness, contrast: jitter amplitudes (fractions).
        depth_smooth: a cell gets a 3D target only where its 4 neighbouring depths are
            within this relative spread (depth edges get the reprojection loss instead).
        seed: seed of the sampler's generator.
    """

    def __init__(
        self,
        frames: MappingFrames,
        device: torch.device | str = "cpu",
        in_channels: int = 1,
        scale_max: float = 1.5,
        rotation_deg: float = 15.0,
        brightness: float = 0.1,
        contrast: float = 0.1,
        depth_smooth: float = 0.05,
        seed: int = 0,
    ) -> None:
        self.device = torch.device(device)
        self.n = len(frames)
        self.H, self.W = frames.images.shape[1:3]
        self.in_channels = in_channels
        imgs = torch.from_numpy(frames.images).to(self.device).permute(0, 3, 1, 2)
        if in_channels == 1:
            w = torch.tensor([0.299, 0.587, 0.114], device=self.device).view(1, 3, 1, 1)
            imgs = (imgs.float() * w).sum(1, keepdim=True).round().clamp(0, 255).to(torch.uint8)
        self.images = imgs.contiguous()  # (N, C, H, W) uint8
        self.depths = None if frames.depths is None else torch.from_numpy(frames.depths).to(self.device)
        self.masks = None if frames.masks is None else torch.from_numpy(frames.masks).to(self.device)
        self.K = torch.from_numpy(frames.K).float().to(self.device)
        T_wc = torch.from_numpy(frames.poses).to(self.device)
        self.T_world_cam = T_wc.float()
        Rt = T_wc[:, :3, :3].transpose(1, 2)
        T_cw = torch.zeros_like(T_wc)
        T_cw[:, :3, :3] = Rt
        T_cw[:, :3, 3] = -(Rt @ T_wc[:, :3, 3:]).squeeze(-1)
        T_cw[:, 3, 3] = 1
        self.T_cam_world = T_cw.float()
        self.scale_max = float(scale_max)
        self.rotation = math.radians(float(rotation_deg))
        self.brightness, self.contrast = float(brightness), float(contrast)
        self.depth_smooth = float(depth_smooth)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(int(seed))
        self._host_rng = np.random.default_rng(int(seed))
        n_levels = 9
        if self.scale_max > 1.0:
            self.scales = np.exp(np.linspace(-math.log(self.scale_max), math.log(self.scale_max), n_levels))
        else:
            self.scales = np.ones(1)

    @property
    def has_depth(self) -> bool:
        return self.depths is not None

    def canvas_size(self, scale: float) -> tuple[int, int]:
        """(Hc, Wc) of a batch at ``scale``: the scaled image, at most the base size, multiples of 8."""
        s = min(scale, 1.0)
        hc = max(STRIDE, int(round(self.H * s / STRIDE)) * STRIDE)
        wc = max(STRIDE, int(round(self.W * s / STRIDE)) * STRIDE)
        return min(hc, self.H // STRIDE * STRIDE or STRIDE), min(wc, self.W // STRIDE * STRIDE or STRIDE)

    def canvas_levels(self) -> list[int]:
        """One scale level per distinct canvas size (for warming up every input shape)."""
        seen: dict[tuple[int, int], int] = {}
        for level, s in enumerate(self.scales):
            seen.setdefault(self.canvas_size(float(s)), level)
        return list(seen.values())

    def pick_level(self) -> int:
        """A random scale level (index into ``scales``), drawn on the host: no device sync."""
        return int(self._host_rng.integers(len(self.scales)))

    def draw(self, batch_size: int, out: Optional[Draws] = None) -> Draws:
        """The random numbers of one batch, from the sampler's generator (on the device).

        ``out`` (a previous :class:`Draws` of the same ``batch_size``) is filled in place
        instead of allocating: a captured training step reads its tensors.
        """
        B, g, dev = int(batch_size), self.generator, self.device
        if out is None:
            out = Draws(*(torch.empty(B, dtype=torch.long if k == 0 else torch.float32, device=dev)
                          for k in range(6)))
        torch.randint(0, self.n, (B,), generator=g, device=dev, out=out.idx)
        for t in (out.theta, out.shift_x, out.shift_y, out.gain, out.contrast):
            torch.rand(B, generator=g, device=dev, out=t)
        return out

    def sample(self, batch_size: int, level: Optional[int] = None) -> Batch:
        """Draw one augmented batch of ``batch_size`` images (random frames, one scale).

        ``level`` picks the scale (index into ``scales``) instead of a random one.
        """
        if level is None:
            level = self.pick_level()
        return self.sample_from(self.draw(batch_size), level)

    def sample_from(self, draws: Draws, level: int) -> Batch:
        """The augmented batch of ``draws`` (:meth:`draw`) at scale level ``level``.

        Device work only (no host-to-device copy, no sync), so it can run inside a CUDA graph.
        """
        dev = self.device
        B = int(draws.idx.shape[0])
        s = float(self.scales[level])
        Hc, Wc = self.canvas_size(s)
        idx = draws.idx
        theta = (draws.theta * 2 - 1) * self.rotation
        cos, sin = torch.cos(theta), torch.sin(theta)
        # source centre: image centre plus a random shift keeping the window inside the image
        span_x = max(0.0, (self.W - Wc / s) / 2.0)
        span_y = max(0.0, (self.H - Hc / s) / 2.0)
        cx = (self.W - 1) / 2.0 + (draws.shift_x * 2 - 1) * span_x
        cy = (self.H - 1) / 2.0 + (draws.shift_y * 2 - 1) * span_y
        # A maps canvas offsets to source offsets: (1/s) R(theta)
        A = torch.stack((torch.stack((cos, -sin), -1), torch.stack((sin, cos), -1)), -2) / s  # (B, 2, 2)
        c_src = torch.stack((cx, cy), -1)  # (B, 2)
        cu0, cv0 = (Wc - 1) / 2.0, (Hc - 1) / 2.0  # canvas centre

        def to_source(q: torch.Tensor) -> torch.Tensor:  # q (..., 2) canvas pixels -> (B, ..., 2)
            d = torch.stack((q[..., 0] - cu0, q[..., 1] - cv0), -1).reshape(1, -1, 2)
            p = torch.einsum("bij,bnj->bni", A, d.expand(B, -1, -1)) + c_src[:, None]
            return p.reshape(B, *q.shape[:-1], 2)

        vv, uu = torch.meshgrid(
            torch.arange(Hc, device=dev, dtype=torch.float32), torch.arange(Wc, device=dev, dtype=torch.float32),
            indexing="ij",
        )
        p = to_source(torch.stack((uu, vv), -1))  # (B, Hc, Wc, 2)
        grid = torch.stack(((2 * p[..., 0] + 1) / self.W - 1, (2 * p[..., 1] + 1) / self.H - 1), -1)
        src = self.images[idx].float() / 255.0
        img = F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        inside = (p[..., 0] >= -0.5) & (p[..., 0] <= self.W - 0.5) & (p[..., 1] >= -0.5) & (p[..., 1] <= self.H - 0.5)
        if self.masks is not None:
            m = F.grid_sample(self.masks[idx, None].float(), grid, mode="nearest", padding_mode="zeros",
                              align_corners=False)[:, 0]
            inside = inside & (m > 0.5)
        # photometric jitter (brightness: gain, contrast: blend with the image mean)
        gain = 1.0 + (draws.gain.view(B, 1, 1, 1) * 2 - 1) * self.brightness
        con = 1.0 + (draws.contrast.view(B, 1, 1, 1) * 2 - 1) * self.contrast
        mean = img.mean(dim=(1, 2, 3), keepdim=True)
        img = ((img * gain - mean) * con + mean).clamp(0, 1)
        x = normalise_image(img, self.in_channels)
        x = torch.where(inside[:, None], x, torch.zeros_like(x))  # padding = mean grey (as conv padding)

        h, w = (Hc + STRIDE - 1) // STRIDE, (Wc + STRIDE - 1) // STRIDE
        cv, cu = torch.meshgrid(
            torch.arange(h, device=dev, dtype=torch.float32) * STRIDE,
            torch.arange(w, device=dev, dtype=torch.float32) * STRIDE,
            indexing="ij",
        )
        uv = to_source(torch.stack((cu, cv), -1))  # (B, h, w, 2)
        valid = (uv[..., 0] >= 0) & (uv[..., 0] <= self.W - 1) & (uv[..., 1] >= 0) & (uv[..., 1] <= self.H - 1)
        if self.masks is not None:
            ui = uv[..., 0].round().long().clamp(0, self.W - 1)
            vi = uv[..., 1].round().long().clamp(0, self.H - 1)
            valid = valid & self.masks[idx[:, None, None].expand_as(ui), vi, ui]
        K = self.K[idx]
        T_wc = self.T_world_cam[idx]
        xyz = torch.zeros(B, h, w, 3, device=dev)
        has_xyz = torch.zeros(B, h, w, dtype=torch.bool, device=dev)
        if self.depths is not None:
            d, ok = self._bilinear_depth(idx, uv)
            has_xyz = ok & valid
            x_n = (uv[..., 0] - K[:, None, None, 0, 2]) / K[:, None, None, 0, 0]
            y_n = (uv[..., 1] - K[:, None, None, 1, 2]) / K[:, None, None, 1, 1]
            pc = torch.stack((x_n * d, y_n * d, d), -1)  # (B, h, w, 3)
            xyz = torch.einsum("bij,bhwj->bhwi", T_wc[:, :3, :3], pc) + T_wc[:, None, None, :3, 3]
        return Batch(x, uv, valid, xyz, has_xyz, K, self.T_cam_world[idx], s)

    def _bilinear_depth(self, idx: torch.Tensor, uv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Depth at sub-pixel ``uv`` (B, h, w, 2) of frames ``idx`` where all 4 neighbours agree."""
        D = self.depths
        x = uv[..., 0].clamp(0, self.W - 1)
        y = uv[..., 1].clamp(0, self.H - 1)
        x0 = x.floor().clamp(max=self.W - 2).long()
        y0 = y.floor().clamp(max=self.H - 2).long()
        fx, fy = x - x0, y - y0
        b = idx[:, None, None].expand_as(x0)
        d00, d01 = D[b, y0, x0], D[b, y0, x0 + 1]
        d10, d11 = D[b, y0 + 1, x0], D[b, y0 + 1, x0 + 1]
        ds = torch.stack((d00, d01, d10, d11), -1)
        lo, hi = ds.amin(-1), ds.amax(-1)
        ok = (lo > 0) & (hi <= lo * (1.0 + self.depth_smooth))
        d = (d00 * (1 - fx) + d01 * fx) * (1 - fy) + (d10 * (1 - fx) + d11 * fx) * fy
        return torch.where(ok, d, torch.zeros_like(d)), ok


# ---------------------------------------------------------------------------- novel views
def synthesize_views(
    frames: MappingFrames,
    views_per_frame: float = 1.0,
    translation: float = 0.15,
    rotation_deg: float = 10.0,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> MappingFrames:
    """Extra mapping frames seen from nearby virtual cameras, warped with the map's depth.

    Each virtual view moves a source frame's camera by a random translation (uniform in a
    ball of radius ``translation`` times the frame's median depth) and rotation (random
    axis, up to ``rotation_deg``), then:

    1. forward-splats the source depth into the virtual camera (z-buffer through an
       integer ``scatter_reduce(amin)`` of depth-and-index keys);
    2. fills one-pixel splatting gaps with the nearest depth of the 3x3 neighbourhood;
    3. pulls colours back from the source image (bilinear) at the reprojection of every
       virtual pixel, keeping pixels whose source depth agrees (visibility check).

    Pixels without content (disocclusions, outside the source view) are masked out
    (``masks``) and are never supervised; the 3D targets of the virtual frames are those
    of the source depth, so no new geometry is invented.

    Args:
        frames: source frames with depth (processing resolution).
        views_per_frame: virtual views per source frame (fractions allowed).
        translation: camera displacement radius as a fraction of the median depth.
        rotation_deg: largest rotation of the virtual camera.
        device: where to compute.
        seed: random seed.

    Returns:
        :class:`MappingFrames` of the virtual views only (with ``masks``).
    """
    if frames.depths is None:
        raise InputError("novel views need depth in the mapping frames: disable them (nvs_views=0) for RGB-only maps")
    dev = torch.device(device)
    rng = np.random.default_rng(seed)
    N, H, W = frames.depths.shape
    n_views = int(round(views_per_frame * N))
    out_img, out_dep, out_T, out_K, out_mask = [], [], [], [], []
    vv, uu = torch.meshgrid(torch.arange(H, device=dev, dtype=torch.float32),
                            torch.arange(W, device=dev, dtype=torch.float32), indexing="ij")
    for k in range(n_views):
        n = int(k % N) if n_views >= N else int(rng.integers(N))
        D = torch.from_numpy(frames.depths[n]).to(dev)
        valid = D > 0
        if int(valid.sum()) < 100:
            continue
        K = torch.from_numpy(frames.K[n]).float().to(dev)
        fx, fy, cx, cy = K[0, 0], K[1, 1], K[0, 2], K[1, 2]
        med = float(D[valid].median())
        # random rigid motion of the camera: T_src_virtual = [Rd | td]
        d = rng.normal(size=3)
        d = d / np.linalg.norm(d) * translation * med * rng.uniform() ** (1 / 3)
        axis = rng.normal(size=3)
        axis /= np.linalg.norm(axis)
        ang = math.radians(rotation_deg) * rng.uniform()
        Kx = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
        Rd = np.eye(3) + math.sin(ang) * Kx + (1 - math.cos(ang)) * Kx @ Kx
        Rd_t = torch.from_numpy(Rd).float().to(dev)
        td_t = torch.from_numpy(d).float().to(dev)
        # 1. splat source points into the virtual view
        z = D[valid]
        Pc = torch.stack(((uu[valid] - cx) / fx * z, (vv[valid] - cy) / fy * z, z), -1)
        Pv = (Pc - td_t) @ Rd_t  # Rd^T (Pc - td)
        zv = Pv[:, 2]
        ok = zv > 0.1
        u = torch.round(fx * Pv[:, 0] / zv.clamp_min(1e-6) + cx)
        v = torch.round(fy * Pv[:, 1] / zv.clamp_min(1e-6) + cy)
        ok = ok & (u >= 0) & (u <= W - 1) & (v >= 0) & (v <= H - 1)
        pix = (v[ok] * W + u[ok]).long()
        key = (zv[ok] * 1e4).long().clamp(max=2**38) * (1 << 24) + torch.arange(int(ok.sum()), device=dev)
        big = torch.iinfo(torch.int64).max
        zbuf = torch.full((H * W,), big, dtype=torch.int64, device=dev)
        zbuf.scatter_reduce_(0, pix, key, reduce="amin")
        has = zbuf != big
        Zv = torch.zeros(H * W, device=dev)
        Zv[has] = zv[ok][zbuf[has] & ((1 << 24) - 1)]
        Zv = Zv.view(H, W)
        # 2. fill one-pixel gaps with the nearest neighbour depth
        inf = torch.where(Zv > 0, Zv, torch.full_like(Zv, float("inf")))
        nearest = -F.max_pool2d(-inf[None, None], 3, 1, 1)[0, 0]
        n_nb = F.avg_pool2d((Zv > 0).float()[None, None], 3, 1, 1)[0, 0] * 9
        Zv = torch.where((Zv == 0) & (n_nb >= 4) & torch.isfinite(nearest), nearest, Zv)
        # 3. colours from the source image, with a visibility check
        m = Zv > 0
        Xv = torch.stack(((uu - cx) / fx * Zv, (vv - cy) / fy * Zv, Zv), -1)
        Ps = Xv @ Rd_t.T + td_t
        zs = Ps[..., 2].clamp_min(1e-6)
        us, vs = fx * Ps[..., 0] / zs + cx, fy * Ps[..., 1] / zs + cy
        inside = (us >= 0) & (us <= W - 1) & (vs >= 0) & (vs <= H - 1) & (Ps[..., 2] > 0.1)
        grid = torch.stack(((2 * us + 1) / W - 1, (2 * vs + 1) / H - 1), -1)[None]
        Ds = F.grid_sample(D[None, None], grid, mode="nearest", align_corners=False)[0, 0]
        vis = inside & m & (Ds > 0) & ((Ds - Ps[..., 2]).abs() <= 0.05 * Ds + 0.02)
        src_img = torch.from_numpy(frames.images[n]).to(dev).permute(2, 0, 1)[None].float()
        img = F.grid_sample(src_img, grid, mode="bilinear", align_corners=False)[0]
        img = torch.where(vis[None], img, torch.full_like(img, 0.4 * 255.0))
        T_sv = np.eye(4)
        T_sv[:3, :3], T_sv[:3, 3] = Rd, d
        out_img.append(img.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).cpu().numpy())
        out_dep.append(torch.where(vis, Zv, torch.zeros_like(Zv)).cpu().numpy().astype(np.float32))
        out_mask.append(vis.cpu().numpy())
        out_T.append(frames.poses[n] @ T_sv)
        out_K.append(frames.K[n])
    if not out_img:
        return MappingFrames(frames.images[:0], frames.depths[:0], frames.poses[:0], frames.K[:0],
                             np.zeros((0, H, W), bool))
    return MappingFrames(np.stack(out_img), np.stack(out_dep), np.stack(out_T), np.stack(out_K), np.stack(out_mask))


def concat_frames(a: MappingFrames, b: MappingFrames) -> MappingFrames:
    """Frames of ``a`` followed by those of ``b`` (masks all-True where absent)."""
    if len(b) == 0:
        return a
    ma = a.masks if a.masks is not None else np.ones(a.images.shape[:3], bool)
    mb = b.masks if b.masks is not None else np.ones(b.images.shape[:3], bool)
    depths = None
    if a.depths is not None and b.depths is not None:
        depths = np.concatenate((a.depths, b.depths))
    return MappingFrames(np.concatenate((a.images, b.images)), depths, np.concatenate((a.poses, b.poses)),
                         np.concatenate((a.K, b.K)), np.concatenate((ma, mb)))
