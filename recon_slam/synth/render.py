"""Vectorised ray casting of synthetic scenes (torch, CPU): RGB, metric depth, surface ids.

One ray per pixel centre through an undistorted pinhole camera. Ray directions are kept
un-normalised with a camera-frame z component of 1, so the ray parameter of a hit *is* the
depth (z along the optical axis). Intersections are exact and analytic (planes, slabs,
a quadratic for cylinders); primitives are culled to their screen-space bounding
rectangle. Texture look-ups are bilinear in a pre-blurred atlas whose level is chosen
from the pixel footprint on the surface (anti-aliasing), and shading is Lambertian from a
fixed directional light plus a point light under the ceiling (view independent, so a
surface point has the same colour in every frame).
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from recon_slam.errors import InputError
from recon_slam.geometry.camera import PinholeCamera
from recon_slam.synth.scene import Scene

_AMBIENT, _K_DIR, _K_POINT, _POINT_RANGE, _K_BOUNCE = 0.32, 0.38, 0.55, 3.2, 0.3


@dataclass(frozen=True)
class DepthNoise:
    """Kinect-like depth sensor model (all lengths in metres).

    ``sigma(z) = sigma_base + sigma_quad * (z - 0.4)^2`` Gaussian noise along z; optional
    disparity quantisation (``1/z`` rounded to steps of ``1 / (disparity_fb * subpixel)``);
    random hole blobs covering ``hole_fraction`` of the image; readings dropped at grazing
    incidence (``> grazing_deg`` from the surface normal) and outside
    ``[min_range, max_range]``. Invalid pixels are 0.
    """

    sigma_base: float = 0.0012
    sigma_quad: float = 0.0019
    quantize: bool = True
    disparity_fb: float = 43.5  # focal [px] x baseline [m] of the IR camera/projector pair
    subpixel: float = 8.0
    hole_fraction: float = 0.02
    hole_size_px: float = 8.0
    grazing_deg: float = 82.0
    min_range: float = 0.3
    max_range: float = 4.5

    def sigma(self, z: np.ndarray) -> np.ndarray:
        """Standard deviation (m) of the depth noise at depth ``z`` (m), same shape."""
        return self.sigma_base + self.sigma_quad * (np.asarray(z) - 0.4) ** 2


@dataclass
class RenderResult:
    """One rendered view.

    Attributes:
        image: (H, W, 3) uint8 RGB.
        depth: (H, W) float32 depth in metres (z along the optical axis); with sensor
            noise this is the noisy reading (0 = no reading), else equal to ``depth_gt``.
        depth_gt: (H, W) float32 exact depth of the ray cast.
        surface_id: (H, W) int32 index into ``scene.surfaces`` (-1: no surface).
        normal: (H, W, 3) float32 world-frame unit normals of the surfaces hit.
        right_image: (H, W, 3) uint8 right stereo image (camera at +baseline along x) or None.
        right_depth: (H, W) float32 exact depth of the right view or None.
        baseline_m: stereo baseline or None.
    """

    image: np.ndarray
    depth: np.ndarray
    depth_gt: np.ndarray
    surface_id: np.ndarray
    normal: np.ndarray
    right_image: Optional[np.ndarray] = None
    right_depth: Optional[np.ndarray] = None
    baseline_m: Optional[float] = None


@contextlib.contextmanager
def single_thread():
    """Run torch on one thread inside the block (restored afterwards).

    Per-op work of a render is small (one image); with two or more busy cores, OpenMP
    barriers of multi-threaded kernels stall far longer than the work itself. OpenMP
    thread counts are per calling thread, so other threads are not affected.
    """
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@functools.lru_cache(maxsize=16)
def _camera_rays(camera: PinholeCamera) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Camera-frame ray components ``x/z`` and ``y/z`` (H, W) and the ray norm (H, W)."""
    v, u = torch.meshgrid(
        torch.arange(camera.height, dtype=torch.float64), torch.arange(camera.width, dtype=torch.float64), indexing="ij"
    )
    xd = (u - camera.cx) / camera.fx
    yd = (v - camera.cy) / camera.fy
    norm = torch.sqrt(xd * xd + yd * yd + 1.0)
    return xd.float(), yd.float(), norm.float()


def _check_inputs(camera: PinholeCamera, T_world_cam: np.ndarray) -> np.ndarray:
    if not isinstance(camera, PinholeCamera):
        raise InputError(f"render needs a PinholeCamera, got {type(camera).__name__}")
    if camera.has_distortion:
        raise InputError("render draws undistorted pinhole images: give a camera without distortion coefficients")
    T = np.asarray(T_world_cam, dtype=np.float64)
    if T.shape != (4, 4) or not np.all(np.isfinite(T)):
        raise InputError(f"T_world_cam must be a finite (4, 4) pose, got shape {T.shape}")
    R = T[:3, :3]
    if np.abs(R.T @ R - np.eye(3)).max() > 1e-4 or np.linalg.det(R) < 0:
        raise InputError("T_world_cam has no valid rotation (R^T R != I or det(R) < 0)")
    return T


def cast_rays(scene: Scene, camera: PinholeCamera, T_world_cam: np.ndarray):
    """Ray-cast the scene: nearest hit of every pixel ray.

    Args:
        scene: the scene.
        camera: undistorted pinhole intrinsics (H, W).
        T_world_cam: (4, 4) pose of the optical camera frame in the world.

    Returns:
        depth: (H, W) float32 tensor, z of the hit in the camera frame (inf: no hit).
        sid: (H, W) int64 tensor of surface ids (-1: no hit).
        dirs: tuple of three (H, W) float32 tensors, world ray directions with camera z = 1.
    """
    T = _check_inputs(camera, T_world_cam)
    with single_thread(), torch.no_grad():
        return _cast(scene, camera, T)


def _cast(scene: Scene, camera: PinholeCamera, T: np.ndarray):
    if scene.room.sdf(T[None, :3, 3])[0] <= 0:
        lo, hi = scene.bounds
        raise InputError(
            f"camera at {np.round(T[:3, 3], 3).tolist()} is outside the room of scene {scene.name!r} "
            f"({lo.tolist()} to {hi.tolist()}): synthetic scenes are seen from inside"
        )
    xd, yd, _ = _camera_rays(camera)
    R, o = T[:3, :3], T[:3, 3]
    dx = xd * float(R[0, 0]) + yd * float(R[0, 1]) + float(R[0, 2])
    dy = xd * float(R[1, 0]) + yd * float(R[1, 1]) + float(R[1, 2])
    dz = xd * float(R[2, 0]) + yd * float(R[2, 1]) + float(R[2, 2])
    room = scene.room
    t, face = room.intersect(o, dx, dy, dz)
    sid = face + scene.surface_base[0]
    outside = ~torch.isfinite(t)
    if bool(outside.any()):  # camera outside the room: no surface
        sid[outside] = -1
    rects = _screen_rects(scene.object_corners, R, o, camera)
    for prim, base, rect in zip(scene.objects, scene.surface_base[1:], rects):
        if rect is None:
            continue
        v0, v1, u0, u1 = rect
        tt, ff = prim.intersect(o, dx[v0:v1, u0:u1], dy[v0:v1, u0:u1], dz[v0:v1, u0:u1])
        reg_t = t[v0:v1, u0:u1]
        closer = tt < reg_t
        torch.minimum(reg_t, tt, out=reg_t)
        reg_s = sid[v0:v1, u0:u1]
        reg_s.copy_(torch.where(closer, ff.add_(base), reg_s))
    return t, sid, (dx, dy, dz)


def _screen_rects(corners: np.ndarray, R: np.ndarray, o: np.ndarray, camera: PinholeCamera) -> list:
    """Pixel rectangles ``(v0, v1, u0, u1)`` covering each bounding box (P, 8, 3) world
    corners; None where the box is behind the camera or outside the image."""
    if len(corners) == 0:
        return []
    pc = (corners - o) @ R
    z = pc[..., 2]
    near = 1e-3
    zs = np.maximum(z, near)
    u = camera.fx * pc[..., 0] / zs + camera.cx
    v = camera.fy * pc[..., 1] / zs + camera.cy
    u0 = np.clip(np.floor(u.min(axis=1)) - 1, 0, camera.width).astype(int)
    u1 = np.clip(np.ceil(u.max(axis=1)) + 2, 0, camera.width).astype(int)
    v0 = np.clip(np.floor(v.min(axis=1)) - 1, 0, camera.height).astype(int)
    v1 = np.clip(np.ceil(v.max(axis=1)) + 2, 0, camera.height).astype(int)
    all_behind = np.all(z <= near, axis=1)
    some_behind = np.any(z <= near, axis=1)
    rects = []
    for k in range(len(corners)):
        if all_behind[k]:
            rects.append(None)
        elif some_behind[k]:  # straddles the camera plane: test the whole image
            rects.append((0, camera.height, 0, camera.width))
        elif u0[k] >= u1[k] or v0[k] >= v1[k]:
            rects.append(None)
        else:
            rects.append((int(v0[k]), int(v1[k]), int(u0[k]), int(u1[k])))
    return rects


def cast_rays_many(scene: Scene, camera: PinholeCamera, T_world_cam: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ray-cast several small views at once (no culling; for probing many poses).

    Args:
        scene: the scene.
        camera: undistorted pinhole intrinsics (h, w), preferably tiny.
        T_world_cam: (B, 4, 4) poses.

    Returns:
        depth: (B, h, w) float32 depth (inf: no hit).
        sid: (B, h, w) int64 surface ids (-1: no hit).
    """
    T = np.asarray(T_world_cam, np.float64).reshape(-1, 4, 4)
    B, H, W = len(T), camera.height, camera.width
    with single_thread(), torch.no_grad():
        xd, yd, _ = _camera_rays(camera)
        Rt = torch.from_numpy(T[:, :3, :3].astype(np.float32))
        d = [
            (xd[None] * Rt[:, k, 0, None, None] + yd[None] * Rt[:, k, 1, None, None] + Rt[:, k, 2, None, None])
            .reshape(B * H, W)
            for k in range(3)
        ]
        o = [torch.from_numpy(np.repeat(T[:, k, 3], H).astype(np.float32))[:, None].expand(B * H, W) for k in range(3)]
        t, face = scene.room.intersect(o, *d)
        sid = face + scene.surface_base[0]
        for prim, base in zip(scene.objects, scene.surface_base[1:]):
            tt, ff = prim.intersect(o, *d)
            closer = tt < t
            t = torch.where(closer, tt, t)
            sid = torch.where(closer, ff + base, sid)
        sid = torch.where(torch.isfinite(t), sid, torch.full_like(sid, -1))
        return t.reshape(B, H, W).numpy(), sid.reshape(B, H, W).numpy()


_CHUNK = 32768  # pixels shaded at a time: keeps the working set of the texture look-up in cache


def _shade(scene: Scene, camera: PinholeCamera, o: np.ndarray, t: torch.Tensor, sid: torch.Tensor, dirs):
    """Colour (H, W, 3) uint8, world normals (H, W, 3) and |cos incidence| (H, W) of the
    hits ``t`` / ``sid`` (pixels with ``sid < 0`` come out black)."""
    H, W = camera.height, camera.width
    N = H * W
    _, _, ray_norm = _camera_rays(camera)
    flat = (t.reshape(-1), sid.reshape(-1), *(d.reshape(-1) for d in dirs), ray_norm.reshape(-1))
    img = torch.empty((N, 3), dtype=torch.uint8)
    normal = torch.empty((N, 3), dtype=torch.float32)
    cos_inc = torch.empty(N, dtype=torch.float32)
    for start in range(0, N, _CHUNK):
        sl = slice(start, min(N, start + _CHUNK))
        _shade_chunk(scene, camera, o, *(f[sl] for f in flat), img[sl], normal[sl], cos_inc[sl])
    return img.reshape(H, W, 3), normal.reshape(H, W, 3), cos_inc.reshape(H, W)


def _shade_chunk(scene, camera, o, tf, sid, dx, dy, dz, ray_norm, img_out, normal_out, cos_out) -> None:
    """Shade n pixels (flat (n,) inputs) into ``img_out`` (n, 3) uint8, ``normal_out``
    (n, 3) and ``cos_out`` (n,)."""
    invalid = sid < 0
    any_invalid = bool(invalid.any())
    sidf = sid.clamp(min=0)
    if any_invalid:
        tf = torch.where(invalid, torch.zeros_like(tf), tf)
    px = torch.add(tf * dx, float(o[0]))
    py = torch.add(tf * dy, float(o[1]))
    pz = torch.add(tf * dz, float(o[2]))
    row = scene.surface_table.index_select(0, sidf).T  # (13, n) strided view
    X = torch.addcmul(torch.addcmul(torch.addcmul(row[3], row[0], px), row[1], py), row[2], pz)
    Y = torch.addcmul(torch.addcmul(torch.addcmul(row[7], row[4], px), row[5], py), row[6], pz)
    nx, ny, nz = row[8].clone(), row[9].clone(), row[10].clone()
    if scene.cylinder_ids:
        idx = torch.nonzero(row[12] > 0.5, as_tuple=True)[0]
        if len(idx):
            c = scene.cyl_table.index_select(0, sidf[idx])
            rx, ry = px[idx] - c[:, 0], py[idx] - c[:, 1]
            ang = torch.remainder(torch.atan2(ry, rx), 2 * math.pi)
            X[idx] = row[3][idx] + c[:, 4] * c[:, 2] * ang
            Y[idx] = row[7][idx] + c[:, 5] * (c[:, 3] - pz[idx])
            inv_r = 1.0 / c[:, 2]
            nx[idx], ny[idx], nz[idx] = rx * inv_r, ry * inv_r, 0.0
    # pixel footprint on the surface (texels) -> blur level of the texture
    cos_inc = torch.div((nx * dx + ny * dy + nz * dz).abs_(), ray_norm, out=cos_out)
    sigma = (tf * (0.5 / camera.fx)).mul_(row[11]).div_(cos_inc.clamp(min=0.2))
    albedo = _sample_atlas(scene, X, Y, sigma)  # (3, n), 0-255
    # Lambertian shading: directional + point light, view independent
    L = scene.light_dir
    ndl = (nx * float(L[0]) + ny * float(L[1]) + nz * float(L[2])).clamp_(min=0.0)
    lx, ly, lz = float(scene.light_pos[0]) - px, float(scene.light_pos[1]) - py, float(scene.light_pos[2]) - pz
    d2 = lx * lx + ly * ly + lz * lz
    ndp = ((nx * lx + ny * ly + nz * lz) * torch.rsqrt(d2)).clamp_(min=0.0)
    shade = ndp.div_(d2.mul_(1.0 / _POINT_RANGE**2).add_(1.0)).mul_(_K_POINT).add_(ndl.mul_(_K_DIR)).add_(_AMBIENT)
    shade.add_(nz.clamp(max=0.0), alpha=-_K_BOUNCE)  # light bounced off the floor onto downward faces
    if any_invalid:
        shade = torch.where(invalid, torch.zeros_like(shade), shade)
    rgb = albedo.mul_(shade).add_(0.5).clamp_(0.0, 255.0)
    img_out.copy_(rgb.T)
    normal_out[:, 0], normal_out[:, 1], normal_out[:, 2] = nx, ny, nz


_WORKSPACE = threading.local()


def _workspace(n: int) -> dict:
    """Per-thread scratch buffers of the texture look-up for ``n`` pixels (re-used between
    frames: fresh multi-megabyte allocations cost page faults on every frame)."""
    ws = getattr(_WORKSPACE, "buffers", None)
    if ws is None or ws["n"] != n:
        ws = {
            "n": n,
            "idx": torch.empty(4 * n, dtype=torch.long),
            "rows": torch.empty((4 * n, 6), dtype=torch.uint8),
            "v": torch.empty((6, 4 * n), dtype=torch.float32),
            "top": torch.empty((6, n), dtype=torch.float32),
            "bot": torch.empty((6, n), dtype=torch.float32),
            "out": torch.empty((3, n), dtype=torch.float32),
        }
        _WORKSPACE.buffers = ws
    return ws


def _sample_atlas(scene: Scene, X: torch.Tensor, Y: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Bilinear atlas look-up at continuous texel coordinates X, Y (N,), blending the two
    pre-blurred levels that bracket ``sigma`` (N,) texels.

    Returns (3, N) float RGB 0-255, a per-thread buffer valid until the next call.
    """
    atlas = scene.atlas
    Wa, Ha = atlas.width, atlas.height
    n_pairs = len(atlas.sigmas) - 1
    N = X.shape[0]
    ws = _workspace(N)
    x = (X - 0.5).clamp_(0.0, Wa - 1.001)
    y = (Y - 0.5).clamp_(0.0, Ha - 1.001)
    x0, y0 = x.floor(), y.floor()
    fx, fy = x.sub_(x0), y.sub_(y0)
    # level pair l (levels l, l + 1) and the blend weight between them
    lvl = torch.zeros(N, dtype=torch.long)
    for s_k in atlas.sigmas[1:-1]:
        lvl += sigma > s_k
    s = torch.tensor(atlas.sigmas, dtype=torch.float32)
    s_lo = s.index_select(0, lvl)
    w = (sigma - s_lo).div_(s.index_select(0, lvl + 1).sub_(s_lo)).clamp_(0.0, 1.0)
    i = y0.long().mul_(Wa).add_(x0.long()).mul_(n_pairs).add_(lvl)
    idx = ws["idx"]
    for k, off in enumerate((0, n_pairs, Wa * n_pairs, (Wa + 1) * n_pairs)):
        torch.add(i, off, out=idx[k * N : (k + 1) * N])
    rows = torch.index_select(atlas.table, 0, idx, out=ws["rows"])  # (4N, 6) uint8
    v = ws["v"]
    v.copy_(rows.T)  # channel-first: every later op is a plain 1-D broadcast
    v = v.view(6, 4, N)
    top = torch.lerp(v[:, 0], v[:, 1], fx, out=ws["top"])
    bot = torch.lerp(v[:, 2], v[:, 3], fx, out=ws["bot"])
    both = top.lerp_(bot, fy)
    return torch.lerp(both[:3], both[3:], w, out=ws["out"])


def apply_depth_noise(
    depth: np.ndarray, cos_incidence: np.ndarray, noise: DepthNoise, rng: np.random.Generator
) -> np.ndarray:
    """Kinect-like reading of an exact depth map.

    Args:
        depth: (H, W) exact depth in metres (inf or <= 0: nothing there).
        cos_incidence: (H, W) |cos| of the angle between ray and surface normal.
        noise: the sensor model.
        rng: random generator (deterministic noise for a given state).

    Returns:
        (H, W) float32 noisy depth, 0 where there is no reading.
    """
    import cv2

    z = np.asarray(depth, np.float64)
    H, W = z.shape
    finite = np.isfinite(z) & (z > 0)
    zs = np.where(finite, z, 1.0)
    noisy = zs + rng.standard_normal(z.shape) * noise.sigma(zs)
    if noise.quantize:
        step = 1.0 / (noise.disparity_fb * noise.subpixel)
        inv = np.round((1.0 / np.maximum(noisy, 1e-3)) / step) * step
        noisy = np.where(inv > 0, 1.0 / np.maximum(inv, 1e-12), np.inf)
    ok = finite & (z >= noise.min_range) & (z <= noise.max_range)
    ok &= (noisy <= noise.max_range) & (noisy >= noise.min_range)
    ok &= np.asarray(cos_incidence) >= math.cos(math.radians(noise.grazing_deg))
    if noise.hole_fraction > 0:
        cells = max(1.0, noise.hole_size_px)
        gh, gw = int(math.ceil(H / cells)) + 1, int(math.ceil(W / cells)) + 1
        field = cv2.resize(rng.random((gh, gw)).astype(np.float32), (int(gw * cells), int(gh * cells)),
                           interpolation=cv2.INTER_LINEAR)[:H, :W]
        ok &= field > np.quantile(field, noise.hole_fraction)
    return np.where(ok, noisy, 0.0).astype(np.float32)


def render(
    scene: Scene,
    camera: PinholeCamera,
    T_world_cam: np.ndarray,
    *,
    depth_noise: DepthNoise | bool | None = None,
    noise_seed: int | Sequence[int] = 0,
    stereo_baseline: float | None = None,
) -> RenderResult:
    """Render one view of ``scene``.

    Args:
        scene: from :func:`recon_slam.synth.make_scene`.
        camera: undistorted pinhole intrinsics; the image is ``camera.height x camera.width``.
        T_world_cam: (4, 4) pose of the optical camera frame (x right, y down, z forward)
            in the scene's world frame.
        depth_noise: None/False for exact depth, True for the default :class:`DepthNoise`,
            or a :class:`DepthNoise`.
        noise_seed: seed (int or sequence of ints) of the depth noise.
        stereo_baseline: if given (metres, > 0), also render the right image of a
            rectified stereo pair, camera at ``T_world_cam @ [I | (baseline, 0, 0)]``.

    Returns:
        A :class:`RenderResult` (image, depth, depth_gt, surface_id, normal, right view).
    """
    T = _check_inputs(camera, T_world_cam)
    with single_thread(), torch.no_grad():
        t, sid, dirs = _cast(scene, camera, T)
        img, nrm, cos_inc = _shade(scene, camera, T[:3, 3], t, sid, dirs)
        depth_gt = torch.where(sid >= 0, t, torch.zeros_like(t)).numpy().astype(np.float32, copy=False)
        result = RenderResult(img.numpy(), depth_gt.copy(), depth_gt, sid.to(torch.int32).numpy(), nrm.numpy())
        if depth_noise:
            model = depth_noise if isinstance(depth_noise, DepthNoise) else DepthNoise()
            rng = np.random.default_rng(noise_seed)
            result.depth = apply_depth_noise(np.where(sid.numpy() >= 0, depth_gt, np.inf), cos_inc.numpy(), model, rng)
        if stereo_baseline is not None:
            b = float(stereo_baseline)
            if not math.isfinite(b) or b <= 0:
                raise InputError(f"stereo baseline must be a positive number of metres, got {stereo_baseline!r}")
            T_r = T.copy()
            T_r[:3, 3] = T[:3, 3] + b * T[:3, 0]
            tr, sr, dr = _cast(scene, camera, T_r)
            img_r, _, _ = _shade(scene, camera, T_r[:3, 3], tr, sr, dr)
            result.right_image = img_r.numpy()
            result.right_depth = torch.where(sr >= 0, tr, torch.zeros_like(tr)).numpy().astype(np.float32, copy=False)
            result.baseline_m = b
    return result
