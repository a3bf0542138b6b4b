"""Frame-to-keyframe tracking: dense Gauss-Newton on SE(3) / Sim(3) with Huber IRLS.

The tracker estimates ``T_kf_frame`` (maps frame-camera coordinates to keyframe-camera
coordinates) from the frame's pointmap and the keyframe's canonical pointmap. At every
iteration the frame points are expressed in the keyframe with the current estimate and
re-associated to keyframe pixels by projection (:mod:`recon_slam.frontend.matching`);
the keyframe maps are read there by bilinear interpolation. Residual terms per matched
point (each selectable, each whitened by its sigma and weighted by the confidences):

* main term, ``residual='pixel_depth'``: reprojection ``pi(q) - pi(y)`` (2, pixels) and
  log-depth ``log z(q) - log z(y)`` (1); ``residual='ray_dist'``: ray direction
  ``q/|q| - y/|y|`` (3) and distance ``|q| - |y|`` (1); ``q = T x`` the frame point in the
  keyframe, ``y`` the keyframe point it matches.
* optional point-to-plane ``n(y) . (q - y)`` (1) with the keyframe normals.
* optional photometric ``I_kf(pi(q)) - I_frame(x)`` (1), intensities in [0, 1].

Jacobians use LEFT perturbations ``T <- exp(delta) T`` (``delta = (rho, phi[, sigma])``);
for a residual row with gradient ``g = dr/dq`` the row is ``[g, q x g (, g . q)]``. The
dense normal equations (6x6 / 7x7) are solved by Cholesky in float64. Levels run coarse to
fine (area-pooled pyramids of both pointmaps).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch

from recon_slam.config import TrackingConfig
from recon_slam.frontend.matching import unique_count
from recon_slam.geometry.camera import PinholeCamera

#: luminance weights of RGB -> grey
_LUMA = (0.299, 0.587, 0.114)


# ---------------------------------------------------------------------------- pyramids
def grey(image: torch.Tensor) -> torch.Tensor:
    """(H, W, 3) uint8 RGB -> (H, W) float32 intensity in [0, 1]."""
    img = image.to(torch.float32)
    return (img[..., 0] * _LUMA[0] + img[..., 1] * _LUMA[1] + img[..., 2] * _LUMA[2]) / 255.0


@dataclass
class MapLevel:
    """One pyramid level of a pointmap (frame or keyframe), channel-first, own camera frame.

    Attributes:
        factor: downsampling factor relative to the processing resolution.
        camera: intrinsics of this level (``camera.scaled``).
        X: (3, h, w) points; C: (h, w) confidence (0 invalid); I: (h, w) intensity in [0, 1].
    """

    factor: int
    camera: PinholeCamera
    X: torch.Tensor
    C: torch.Tensor
    I: torch.Tensor


def block_reduce(S: torch.Tensor, r: int, op: str = "mean") -> torch.Tensor:
    """Reduce non-overlapping ``r x r`` blocks of (C, H, W) maps: 'mean', 'sum' or 'max'.

    Uses strided slices (much faster than the CPU pooling kernels for small ``r``); the
    maps are cropped to multiples of ``r``.
    """
    h, w = S.shape[-2] // r, S.shape[-1] // r
    out = None
    for i in range(r):
        for j in range(r):
            part = S[..., i: h * r: r, j: w * r: r]
            if out is None:
                out = part.clone() if op == "max" else part * 1.0
            elif op == "max":
                out = torch.maximum(out, part)
            else:
                out = out + part
    if op == "mean":
        out = out * (1.0 / (r * r))
    return out


def _level_camera(camera: PinholeCamera, H: int, W: int, factor: int) -> PinholeCamera:
    h, w = H // factor, W // factor
    cam = camera if (h * factor, w * factor) == (H, W) else camera.cropped(0, 0, w * factor, h * factor)
    return cam.scaled(w, h)


def build_pyramid(
    X: torch.Tensor, C: torch.Tensor, image: torch.Tensor, camera: PinholeCamera, factors: Sequence[int],
    max_spread_ratio: float = 0.05, backend: str = "auto",
) -> list[MapLevel]:
    """Area-pooled pyramid levels (one per factor, in the given order) of a pointmap.

    Valid points (``C > 0``) of each ``f x f`` block are averaged; a block is invalid when
    fewer than half its pixels are valid or its depths spread more than
    ``max_spread_ratio`` of their mean (it straddles a discontinuity). Confidence is the
    mean over the block's valid pixels, intensity the plain block mean. Sizes not divisible
    by ``f`` are cropped at the right/bottom.

    Args:
        X: (H, W, 3) points, C: (H, W) float32, image: (H, W, 3) uint8, camera: intrinsics of X.
        backend: 'auto' (OpenCV for CPU tensors, torch otherwise), 'cv2' or 'torch'; both
            compute the same levels.

    Returns:
        list of :class:`MapLevel` (channel-first, on the device of ``X``).
    """
    if backend == "cv2" or (backend == "auto" and X.device.type == "cpu"):
        return _build_pyramid_cv2(X, C, image, camera, factors, max_spread_ratio)
    return _build_pyramid_torch(X, C, image, camera, factors, max_spread_ratio)


def _build_pyramid_cv2(
    X: torch.Tensor, C: torch.Tensor, image: torch.Tensor, camera: PinholeCamera, factors: Sequence[int],
    max_spread_ratio: float = 0.05,
) -> list[MapLevel]:
    import cv2

    H, W = C.shape
    Xn = X.detach().cpu().numpy()
    Cn = C.detach().cpu().numpy()
    img = image.detach().cpu().numpy()
    In = cv2.cvtColor(np.ascontiguousarray(img), cv2.COLOR_RGB2GRAY).astype(np.float32) * np.float32(1.0 / 255.0)
    vf = (Cn > 0).astype(np.float32)
    Xc = X.permute(2, 0, 1)
    if Xc.is_contiguous():  # channel-first storage: the planes are views
        x, y, z = Xc.detach().cpu().numpy()
    else:
        x, y, z = cv2.split(np.ascontiguousarray(Xn))
    pen = (vf - np.float32(1.0)) * np.float32(1e9)
    # single-channel planes (OpenCV is fastest on those): sums to average, maxima to dilate
    sums = {1: [cv2.multiply(x, vf), cv2.multiply(y, vf), cv2.multiply(z, vf), vf, cv2.multiply(Cn, vf), In]}
    maxs = {1: [z + pen, pen - z]}
    dev = X.device
    out: list[MapLevel] = []
    cache: dict[int, MapLevel] = {}
    for f in factors:
        f = int(f)
        if f in cache:
            out.append(cache[f])
            continue
        if f == 1:
            lv = MapLevel(1, camera, X.permute(2, 0, 1), torch.from_numpy(sums[1][4]).to(dev), torch.from_numpy(In).to(dev))
        else:
            if f not in sums:  # pool from the finest computed level whose factor divides f
                src = max(k for k in sums if f % k == 0)
                r = f // src
                hs, ws = sums[src][0].shape
                h, w = hs // r, ws // r
                sums[f] = [cv2.resize(a[: h * r, : w * r], (w, h), interpolation=cv2.INTER_AREA) for a in sums[src]]
                kernel = np.ones((r, r), np.uint8)
                maxs[f] = [cv2.dilate(a[: h * r, : w * r], kernel, anchor=(0, 0))[::r, ::r][:h, :w] for a in maxs[src]]
            sx, sy, sz, frac, sc, si = sums[f]
            inv = np.float32(1.0) / np.maximum(frac, np.float32(1e-12))
            zp = sz * inv
            ok = (frac >= 0.5) & ((maxs[f][0] + maxs[f][1]) <= max_spread_ratio * np.abs(zp))
            Xp = np.stack((sx * inv, sy * inv, zp))
            Cp = sc * inv * ok
            lv = MapLevel(
                f, _level_camera(camera, H, W, f), torch.from_numpy(Xp).to(dev),
                torch.from_numpy(Cp.astype(np.float32)).to(dev), torch.from_numpy(np.ascontiguousarray(si)).to(dev),
            )
        cache[f] = lv
        out.append(lv)
    return out


def _build_pyramid_torch(
    X: torch.Tensor, C: torch.Tensor, image: torch.Tensor, camera: PinholeCamera, factors: Sequence[int],
    max_spread_ratio: float = 0.05,
) -> list[MapLevel]:
    """Area-pooled pyramid levels (one per factor, in the given order) of a pointmap.

    Valid points (``C > 0``) of each ``f x f`` block are averaged; a block is invalid when
    fewer than half its pixels are valid or its depths spread more than
    ``max_spread_ratio`` of their mean (it straddles a discontinuity). Confidence is the
    mean over the block's valid pixels, intensity the plain block mean. Coarser levels are
    pooled from finer ones when the factors divide (same result as pooling from full
    resolution). Sizes not divisible by ``f`` are cropped at the right/bottom.

    Args:
        X: (H, W, 3) points, C: (H, W) float32, image: (H, W, 3) uint8, camera: intrinsics of X.

    Returns:
        list of :class:`MapLevel` (channel-first).
    """
    H, W = C.shape
    I = grey(image)
    Xc = X.permute(2, 0, 1)
    vf = (C > 0).to(X.dtype)
    pen = (vf - 1.0) * 1e9  # 0 where valid, -1e9 where not
    base = torch.empty((8, H, W), dtype=X.dtype, device=X.device)  # sums 0..5, maxima 6..7
    torch.mul(Xc, vf, out=base[0:3])
    base[3] = vf
    torch.mul(C, vf, out=base[4])
    base[5] = I
    torch.add(base[2], pen, out=base[6])
    torch.sub(pen, base[2], out=base[7])
    pooled: dict[int, torch.Tensor] = {1: base}
    F = torch.nn.functional
    # pool in increasing factor order, each level from the finest one whose factor divides
    # it (one average and one max pooling kernel per level; pooling crops to multiples)
    for f in sorted({int(f) for f in factors if int(f) > 1}):
        src_f = max(k for k in pooled if f % k == 0)
        r = f // src_f
        S = pooled[src_f]
        pooled[f] = torch.cat((F.avg_pool2d(S[:6], r), F.max_pool2d(S[6:], r)))
    levels: dict[int, MapLevel] = {}
    for f in (int(f) for f in factors):
        if f in levels:
            continue
        if f == 1:
            levels[f] = MapLevel(1, camera, Xc, base[4], I)
            continue
        S = pooled[f]
        frac = S[3]
        inv = frac.clamp_min(1e-12).reciprocal_()
        Xp = S[0:3] * inv
        Cp = S[4] * inv
        ok = (frac >= 0.5) & ((S[6] + S[7]) <= Xp[2].abs().mul_(max_spread_ratio))
        levels[f] = MapLevel(f, _level_camera(camera, H, W, f), Xp, Cp.mul_(ok), S[5])
    return [levels[int(f)] for f in factors]


def normals_from_pointmap(X: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit normals (3, h, w) of a channel-first pointmap (3, h, w) by central differences.

    Normals face the camera. Returns normals and (h, w) bool validity (the pixel and its four
    neighbours valid, non-degenerate); borders are invalid.
    """
    _, h, w = X.shape
    n = torch.zeros_like(X)
    ok = torch.zeros_like(valid)
    if h < 3 or w < 3:
        return n, ok
    du = X[:, 1:-1, 2:] - X[:, 1:-1, :-2]
    dv = X[:, 2:, 1:-1] - X[:, :-2, 1:-1]
    c = torch.stack((du[1] * dv[2] - du[2] * dv[1], du[2] * dv[0] - du[0] * dv[2], du[0] * dv[1] - du[1] * dv[0]))
    norm = (c[0] * c[0] + c[1] * c[1] + c[2] * c[2]).sqrt()
    Xm = X[:, 1:-1, 1:-1]
    facing = (c[0] * Xm[0] + c[1] * Xm[1] + c[2] * Xm[2]) > 0
    sign = (1.0 - 2.0 * facing.to(X.dtype)) / norm.clamp_min(1e-12)
    n[:, 1:-1, 1:-1] = c * sign
    v = valid
    ok[1:-1, 1:-1] = v[1:-1, 2:] & v[1:-1, :-2] & v[2:, 1:-1] & v[:-2, 1:-1] & v[1:-1, 1:-1] & (norm > 0)
    return n, ok


def _host_ints(t) -> tuple:
    """Host ints of a count tensor (one read) or of an int / tuple of ints."""
    if isinstance(t, torch.Tensor):
        return tuple(int(v) for v in t.reshape(-1).tolist())
    return tuple(int(v) for v in (t if isinstance(t, (tuple, list)) else (t,)))


@dataclass
class ReferenceLevel:
    """Keyframe maps of one level, channel-first and flattened for gathers.

    Attributes:
        factor: level factor; camera: its intrinsics (size (w, h)).
        geo: (7, h*w) float32: point X (3, keyframe camera), normal (3, zero where unknown),
            confidence (1, 0 = invalid).
        photo: (3, h*w) float32: intensity in [0, 1], dI/du, dI/dv (per level pixel).
        valid_count: number of valid keyframe pixels, an int or a () long device tensor
            (read lazily by :attr:`n_valid`, so that building the level does not sync).
    """

    factor: int
    camera: PinholeCamera
    geo: torch.Tensor
    photo: torch.Tensor
    valid_count: object

    @property
    def n_valid(self) -> int:
        """Number of valid keyframe pixels (host int; reads the device count once)."""
        if isinstance(self.valid_count, torch.Tensor):
            self.valid_count = _host_ints(self.valid_count)[0]
        return int(self.valid_count)


def reference_level(level: MapLevel) -> ReferenceLevel:
    """Flatten the maps of a keyframe level (normals and intensity gradients included).

    No host synchronisation: the valid pixel count stays on the device until read.
    """
    valid = level.C > 0
    n, nok = normals_from_pointmap(level.X, valid)
    I = level.I
    h, w = I.shape
    geo = torch.cat((level.X, n * nok, level.C[None])).reshape(7, -1)
    photo = torch.zeros((3, h, w), dtype=I.dtype, device=I.device)
    photo[0] = I
    torch.sub(I[:, 2:], I[:, :-2], out=photo[1, :, 1:-1]).mul_(0.5)
    torch.sub(I[2:, :], I[:-2, :], out=photo[2, 1:-1, :]).mul_(0.5)
    return ReferenceLevel(level.factor, level.camera, geo, photo.reshape(3, -1), valid.sum())


#: padding point of fixed-size sources: far behind the camera, it never matches (the
#: occlusion test rejects it even when a rotation brings it in front)
_FAR_Z = -1e6


@dataclass
class SourceLevel:
    """Frame points of one level, channel-first.

    Two layouts: *compacted* (only the selected valid points, the CPU default) and *padded*
    (a fixed number of slots per level for a given image size, the CUDA default: the
    regular-grid subsample or every pixel, invalid slots have confidence 0 and a point far
    behind the camera that never matches; no host synchronisation to build, fixed shapes
    for CUDA graphs).

    Attributes:
        factor: level factor; camera: its intrinsics.
        pts: (3, N) points in the frame camera; conf: (N,) (0 = padding); intensity: (N,)
            or None (no photometric term).
        dense: True when no subsampling happened (one point per level pixel).
        counts: ``(n_total, n_selected)``: valid points of the level before subsampling
            (denominator of match fractions) and valid selected points; ints or a (2,)
            long device tensor (read lazily, or set from a combined read by
            :meth:`set_counts`).
        padded: the padded layout (N is fixed, ``n <= N``).
    """

    factor: int
    camera: PinholeCamera
    pts: torch.Tensor
    conf: torch.Tensor
    intensity: Optional[torch.Tensor]
    dense: bool
    counts: object
    padded: bool = False

    def _host_counts(self) -> tuple:
        if isinstance(self.counts, torch.Tensor):
            self.counts = _host_ints(self.counts)
        return self.counts

    def set_counts(self, n_total: int, n_selected: int) -> None:
        """Host values of :attr:`counts` (read back together with other results)."""
        self.counts = (int(n_total), int(n_selected))

    @property
    def n_total(self) -> int:
        """Valid points of the level before subsampling."""
        return self._host_counts()[0]

    @property
    def n(self) -> int:
        """Number of valid selected points (may read the device counts)."""
        return self._host_counts()[1]

    @property
    def capacity(self) -> int:
        """Number of point slots N (== :attr:`n` when compacted)."""
        return int(self.pts.shape[1])


_GRID_CACHE: dict = {}


def _grid_step(h: int, w: int, budget: int) -> int:
    return int(np.ceil(np.sqrt(h * w / max(budget, 1))))


def _grid_mask(h: int, w: int, s: int, device) -> torch.Tensor:
    """(h, w) bool regular grid (every ``s``-th pixel from ``s // 2``), cached per size."""
    key = (h, w, s, str(device))
    m = _GRID_CACHE.get(key)
    if m is None:  # never evicted (one entry per level size; graphs may read them)
        m = torch.zeros((h, w), dtype=torch.bool, device=device)
        m[s // 2::s, s // 2::s] = True
        _GRID_CACHE[key] = m
    return m


def _gradient_score(I: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(h*w,) |dI/du| + |dI/dv| (central differences, 0 on the border and where invalid)."""
    g = torch.zeros_like(I)
    gx = (I[1:-1, 2:] - I[1:-1, :-2]).abs()
    gy = (I[2:, 1:-1] - I[:-2, 1:-1]).abs()
    g[1:-1, 1:-1] = gx + gy
    return (g * valid).reshape(-1)


def source_level(level: MapLevel, max_points: int, selection: str = "grid",
                 compact: Optional[bool] = None) -> SourceLevel:
    """Valid points of a frame level, selecting at most ~``max_points``.

    Args:
        level: the frame level.
        max_points: budget of points; levels with more pixels are subsampled.
        selection: 'grid' (regular grid subsample) or 'gradient' (half the budget to the
            pixels of strongest intensity gradient, half to a regular grid).
        compact: keep only the valid selected points (host sync, variable N); False gives
            the padded fixed-size layout (see :class:`SourceLevel`); default: compact on
            the CPU, padded elsewhere.
    """
    X, C, I = level.X, level.C, level.I
    if compact is None:
        compact = X.device.type == "cpu"
    valid = C > 0
    h, w = C.shape
    dense = h * w <= max_points
    if not compact:
        return _source_level_padded(level, max_points, selection, dense)
    n_total = int(valid.sum())
    if dense:
        sel = valid.reshape(-1)
    elif selection == "gradient":
        budget = max_points // 2
        s = _grid_step(h, w, budget)
        score = _gradient_score(I, valid)
        k = min(budget, n_total)
        top = torch.topk(score, k, sorted=False).indices if k > 0 else score.new_zeros(0, dtype=torch.long)
        sel = _grid_mask(h, w, s, C.device).reshape(-1).clone()
        sel[top] = True
        sel &= valid.reshape(-1)
    else:
        s = _grid_step(h, w, max_points)
        sel = (_grid_mask(h, w, s, C.device) & valid).reshape(-1)
    idx = sel.nonzero()[:, 0]
    stack = torch.cat((X.reshape(3, -1), C.reshape(1, -1), I.reshape(1, -1))).index_select(1, idx)
    return SourceLevel(level.factor, level.camera, stack[0:3], stack[3], stack[4], dense,
                       (n_total, int(idx.shape[0])))


def _source_level_padded(level: MapLevel, max_points: int, selection: str, dense: bool) -> SourceLevel:
    """Fixed-size :func:`source_level` (no host sync; N depends only on the level size)."""
    X, C, I = level.X, level.C, level.I
    h, w = C.shape
    if dense:
        Cs = C.reshape(-1)
        ok = Cs > 0
        n = ok.sum()
        pts = torch.where(ok, X.reshape(3, -1), _FAR_Z)
        return SourceLevel(level.factor, level.camera, pts, Cs, I.reshape(-1), True, torch.stack((n, n)),
                           padded=True)
    valid = C > 0
    if selection == "gradient":
        budget = max_points // 2
        s = _grid_step(h, w, budget)
        grid = _grid_mask(h, w, s, C.device).reshape(-1)
        # the grid, then the strongest gradients among the valid pixels (invalid ones score
        # -1 and are picked, as padding, only when there are too few valid ones); a top
        # pixel on the grid is already there and becomes padding: the union, as compacted
        score = torch.where(valid.reshape(-1), _gradient_score(I, valid), -1.0)
        gidx = _grid_index(h, w, s, C.device)
        top = torch.topk(score, min(budget, h * w), sorted=False).indices
        idx = torch.cat((gidx, top))
        stack = torch.cat((X.reshape(3, -1), C.reshape(1, -1), I.reshape(1, -1))).index_select(1, idx)
        Xs, Is = stack[0:3], stack[4]
        on_grid = torch.cat((torch.zeros_like(gidx, dtype=torch.bool), grid.index_select(0, top)))
        Cs = torch.where(on_grid, 0.0, stack[3])
    else:
        s = _grid_step(h, w, max_points)
        o = s // 2
        Xs, Cs, Is = X[:, o::s, o::s], C[o::s, o::s], I[o::s, o::s]
    ok = Cs > 0
    pts = torch.where(ok, Xs, _FAR_Z).reshape(3, -1)
    counts = torch.stack((valid.sum(), ok.sum()))
    return SourceLevel(level.factor, level.camera, pts, Cs.reshape(-1), Is.reshape(-1), False, counts, padded=True)


def _grid_index(h: int, w: int, s: int, device) -> torch.Tensor:
    """(M,) long flat indices of :func:`_grid_mask` (row-major), cached."""
    key = ("idx", h, w, s, str(device))
    idx = _GRID_CACHE.get(key)
    if idx is None:
        o = s // 2
        v, u = torch.meshgrid(torch.arange(o, h, s), torch.arange(o, w, s), indexing="ij")
        idx = _GRID_CACHE[key] = (v * w + u).reshape(-1).to(device)
    return idx


# ---------------------------------------------------------------------------- results
@dataclass
class TrackResult:
    """Outcome of one pose solve.

    Attributes:
        T_kf_frame: (4, 4) float64 numpy estimate (Sim(3) when not metric).
        success: solve converged to a finite, plausible pose with enough valid matches.
        n_valid: valid matches at the statistics level; valid_fraction: over valid frame points.
        unique_fraction: fraction of valid keyframe pixels matched (statistics level).
        information: (6, 6) or (7, 7) float64 final Hessian (finest level) for the backend.
        cost: final mean weighted cost; iterations: total GN iterations.
        reason: why it failed ('' on success).
        inlier_fraction: valid matches that also agree geometrically / photometrically
            (see :meth:`Tracker.match_statistics`), over valid frame points.
        extra: the ``extra`` tensor of :meth:`Tracker.track`, read back (float64, flat).
    """

    T_kf_frame: np.ndarray
    success: bool
    n_valid: int = 0
    valid_fraction: float = 0.0
    unique_fraction: float = 0.0
    information: np.ndarray = field(default_factory=lambda: np.zeros((6, 6)))
    cost: float = float("inf")
    iterations: int = 0
    reason: str = ""
    inlier_fraction: float = 0.0
    extra: Optional[np.ndarray] = None


# ---------------------------------------------------------------------------- residuals
# Layout: points are channel-first (3, N); a residual block of R rows is r (R, N) with
# gradients wrt the transformed point G (R, 3, N) and Jacobian rows J (R, d, N).
def jacobian_components(G: torch.Tensor, q: torch.Tensor, sim3: bool = False) -> torch.Tensor:
    """Jacobian wrt a LEFT pose perturbation, component-major: (d, R, N).

    For ``q = T x`` and ``T <- exp(delta) T``: ``dq/d delta = [I, -hat(q) (, q)]``, so a
    residual row with gradient ``g = dr/dq`` has Jacobian ``[g, q x g (, g . q)]``.

    Args:
        G: (R, 3, N) gradients of R residual rows; q: (3, N) transformed points.
    """
    gx, gy, gz = G[:, 0], G[:, 1], G[:, 2]
    qx, qy, qz = q[0], q[1], q[2]
    rows = [gx, gy, gz, qy * gz - qz * gy, qz * gx - qx * gz, qx * gy - qy * gx]
    if sim3:
        rows.append(gx * qx + gy * qy + gz * qz)
    return torch.stack(rows)


def jacobian_row_list(G: torch.Tensor, q: torch.Tensor, sim3: bool = False, fused: bool = False) -> list:
    """The d components of :func:`jacobian_components` as a list of (R, N) tensors.

    ``fused`` computes ``q x g`` with one cross-product kernel (used on CUDA; slow on the
    CPU, where six products and three differences are faster); same values.

    Args:
        G: (R, 3, N) gradients of R residual rows; q: (3, N) transformed points.
    """
    gx, gy, gz = G[:, 0], G[:, 1], G[:, 2]
    if fused:
        qxg = torch.linalg.cross(q[None].expand_as(G), G, dim=1)
        rows = [gx, gy, gz, qxg[:, 0], qxg[:, 1], qxg[:, 2]]
    else:
        qx, qy, qz = q[0], q[1], q[2]
        rows = [gx, gy, gz, qy * gz - qz * gy, qz * gx - qx * gz, qx * gy - qy * gx]
    if sim3:
        rows.append(gx * q[0] + gy * q[1] + gz * q[2])
    return rows


def jacobian_rows(G: torch.Tensor, q: torch.Tensor, sim3: bool = False) -> torch.Tensor:
    """Jacobian rows (R, 6|7, N) from gradients G (R, 3, N) (see :func:`jacobian_components`)."""
    return jacobian_components(G, q, sim3).permute(1, 0, 2)


def grad_pixel_depth(q: torch.Tensor, y: torch.Tensor, camera: PinholeCamera) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual (3, N) ``[pi(q) - pi(y), log z_q - log z_y]`` and its gradient wrt q (3, 3, N)."""
    iz = 1.0 / q[2].clamp_min(1e-9)
    izy = 1.0 / y[2].clamp_min(1e-9)
    xq, yq = q[0] * iz, q[1] * iz
    r = torch.stack((
        camera.fx * (xq - y[0] * izy),
        camera.fy * (yq - y[1] * izy),
        torch.log(q[2].clamp_min(1e-9) * izy),
    ))
    zero = torch.zeros_like(iz)
    G = torch.stack((
        torch.stack((camera.fx * iz, zero, -camera.fx * xq * iz)),
        torch.stack((zero, camera.fy * iz, -camera.fy * yq * iz)),
        torch.stack((zero, zero, iz)),
    ))
    return r, G


def grad_ray_dist(q: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual (4, N) ``[q/|q| - y/|y|, |q| - |y|]`` and its gradient wrt q (4, 3, N)."""
    nq = (q[0] * q[0] + q[1] * q[1] + q[2] * q[2]).sqrt().clamp_min(1e-12)
    ny = (y[0] * y[0] + y[1] * y[1] + y[2] * y[2]).sqrt().clamp_min(1e-12)
    inq = 1.0 / nq
    dq = q * inq
    r = torch.cat((dq - y / ny, (nq - ny)[None]))
    eye = torch.eye(3, dtype=q.dtype, device=q.device)
    Gr = (eye[:, :, None] - dq[:, None, :] * dq[None, :, :]) * inq  # (3, 3, N), symmetric
    return r, torch.cat((Gr, dq[None]))


def grad_point_to_plane(q: torch.Tensor, y: torch.Tensor, n: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual (1, N) ``n . (q - y)`` and its gradient wrt q (1, 3, N)."""
    d = q - y
    r = (n[0] * d[0] + n[1] * d[1] + n[2] * d[2])[None]
    return r, n[None]


def grad_photometric(
    q: torch.Tensor, i_kf: torch.Tensor, grad_kf: torch.Tensor, i_frame: torch.Tensor, camera: PinholeCamera
) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual (1, N) ``I_kf(pi(q)) - I_frame`` and its gradient wrt q (1, 3, N)."""
    iz = 1.0 / q[2].clamp_min(1e-9)
    gu = grad_kf[0] * (camera.fx * iz)
    gv = grad_kf[1] * (camera.fy * iz)
    g = torch.stack((gu, gv, -(gu * q[0] + gv * q[1]) * iz))
    return (i_kf - i_frame)[None], g[None]


def residual_pixel_depth(
    q: torch.Tensor, y: torch.Tensor, camera: PinholeCamera, sim3: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Calibrated residual of matched points: reprojection (2, pixels) and log-depth (1).

    Args:
        q: (3, N) frame points in the keyframe camera (``T_kf_frame x``).
        y: (3, N) matched keyframe points (keyframe camera).
        camera: keyframe intrinsics.

    Returns:
        r: (3, N) ``[pi(q) - pi(y), log z_q - log z_y]``; J: (3, 6|7, N) wrt a left
        perturbation of ``T_kf_frame`` (``y`` fixed).
    """
    r, G = grad_pixel_depth(q, y, camera)
    return r, jacobian_rows(G, q, sim3)


def residual_ray_dist(q: torch.Tensor, y: torch.Tensor, sim3: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Uncalibrated residual of matched points: ray direction (3) and distance (1).

    Args:
        q: (3, N) frame points in the keyframe camera; y: (3, N) matched keyframe points.

    Returns:
        r: (4, N) ``[q/|q| - y/|y|, |q| - |y|]``; J: (4, 6|7, N) wrt a left perturbation.
    """
    r, G = grad_ray_dist(q, y)
    return r, jacobian_rows(G, q, sim3)


def residual_point_to_plane(
    q: torch.Tensor, y: torch.Tensor, n: torch.Tensor, sim3: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Point-to-plane distance ``n . (q - y)`` (1, N) and its Jacobian (1, 6|7, N).

    Args:
        q, y, n: (3, N) frame point in the keyframe, keyframe point and keyframe normal.
    """
    r, G = grad_point_to_plane(q, y, n)
    return r, jacobian_rows(G, q, sim3)


def residual_photometric(
    q: torch.Tensor, i_kf: torch.Tensor, grad_kf: torch.Tensor, i_frame: torch.Tensor,
    camera: PinholeCamera, sim3: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Photometric residual ``I_kf(pi(q)) - I_frame`` (1, N) and its Jacobian (1, 6|7, N).

    Args:
        q: (3, N) frame points in the keyframe camera; i_kf: (N,) keyframe intensity at
            ``pi(q)``; grad_kf: (2, N) its image gradient (per pixel); i_frame: (N,).
    """
    r, G = grad_photometric(q, i_kf, grad_kf, i_frame, camera)
    return r, jacobian_rows(G, q, sim3)


def huber_weights(e: torch.Tensor, k: float) -> torch.Tensor:
    """IRLS weights of the Huber loss for whitened residual norms ``e`` (...): min(1, k / e)."""
    return (k / e.clamp_min(1e-12)).clamp_max(1.0)


# ---------------------------------------------------------------------------- updates
def solve_normal_equations(H: np.ndarray, g: np.ndarray, damping: float = 0.0) -> Optional[np.ndarray]:
    """Gauss-Newton step ``dx = -(H + damping diag(H))^-1 g`` by Cholesky (float64).

    Args:
        H: (d, d) symmetric positive (semi-)definite; g: (d,).

    Returns:
        (d,) step, or None when the system is singular / not finite.
    """
    Hd = H + np.diag(np.diag(H) * damping + 1e-12 * max(float(np.abs(np.diag(H)).max()), 1e-30))
    try:
        L = np.linalg.cholesky(Hd)
    except np.linalg.LinAlgError:
        return None
    dx = -np.linalg.solve(L.T, np.linalg.solve(L, g))
    return dx if np.all(np.isfinite(dx)) else None


def _rodrigues(phi: np.ndarray) -> np.ndarray:
    """(3,) rotation vector -> (3, 3) rotation matrix (float64)."""
    th = float(np.linalg.norm(phi))
    K = np.array([[0.0, -phi[2], phi[1]], [phi[2], 0.0, -phi[0]], [-phi[1], phi[0], 0.0]])
    if th < 1e-8:
        return np.eye(3) + K + 0.5 * K @ K
    return np.eye(3) + np.sin(th) / th * K + (1.0 - np.cos(th)) / (th * th) * K @ K


def retract(T: np.ndarray, dx: np.ndarray) -> np.ndarray:
    """Left retraction of a pose: ``T <- [e^sigma R(phi), rho] T`` (float64).

    Agrees with ``exp(dx) @ T`` (:func:`recon_slam.geometry.lie.se3_exp` /
    :func:`~recon_slam.geometry.lie.sim3_exp`) to first order, which is all Gauss-Newton
    needs, at a fraction of the cost for one pose.

    Args:
        T: (4, 4) SE(3) / Sim(3) matrix; dx: (6,) ``(rho, phi)`` or (7,) ``(rho, phi, sigma)``.
    """
    A = _rodrigues(dx[3:6])
    if dx.shape[0] == 7:
        A = A * np.exp(dx[6])
    out = np.empty_like(T)
    out[:3, :3] = A @ T[:3, :3]
    out[:3, 3] = A @ T[:3, 3] + dx[:3]
    out[3] = (0.0, 0.0, 0.0, 1.0)
    return out


def project_pixels(q: torch.Tensor, iz: torch.Tensor, camera: PinholeCamera, consts: Optional[torch.Tensor] = None):
    """Pinhole projection of points and their nearest pixels.

    Args:
        q: (3, N) points (camera frame); iz: (N,) their inverse depths; camera: intrinsics.
        consts: None for per-row scalar ops (fastest on the CPU), or the (4, 2, 1)
            ``[focal, principal point, 0, (W - 1, H - 1)]`` tensor of the camera for a
            form with fewer kernels (used on CUDA; same values).

    Returns:
        ``uv`` projections, ``uvi`` their rounded pixels (each (2, N), or a pair of (N,)
        without ``consts``), ``inside`` (N,) bool (the rounded pixel is in the image) and
        ``idx`` (N,) long flat index ``v * W + u`` of the clamped pixel.
    """
    W, H = camera.width, camera.height
    if consts is not None:
        uv = torch.addcmul(consts[1], q[0:2] * iz, consts[0])
        uvi = torch.round(uv)
        uvc = torch.clamp(uvi, consts[2], consts[3])
        e = uvi == uvc
        return uv, uvi, e[0] & e[1], torch.add(uvc[0], uvc[1], alpha=W).long()
    u = (q[0] * iz).mul_(camera.fx).add_(camera.cx)
    v = (q[1] * iz).mul_(camera.fy).add_(camera.cy)
    ui, vi = torch.round(u), torch.round(v)
    uc, vc = ui.clamp(0, W - 1), vi.clamp(0, H - 1)
    inside = (ui == uc) & (vi == vc)
    return (u, v), (ui, vi), inside, torch.add(uc, vc, alpha=W).long()


# ---------------------------------------------------------------------------- tracker
class Tracker:
    """Dense frame-to-keyframe pose estimation (see the module docstring).

    Args:
        config: tracking settings.
        metric: SE(3) when true, Sim(3) otherwise.
    """

    def __init__(self, config: TrackingConfig, metric: bool = True) -> None:
        self.config = config
        self.metric = metric

    @property
    def dof(self) -> int:
        """6 (SE(3)) or 7 (Sim(3))."""
        return 6 if self.metric else 7

    # ------------------------------------------------------------------ constants
    def _const(self, key: tuple, make) -> torch.Tensor:
        """Small constant tensor cached per key (made once on the device, never per frame;
        a CUDA graph capture finds it made by the warm-up run)."""
        cache = self.__dict__.setdefault("_consts", {})
        t = cache.get(key)
        if t is None:  # never evicted: captured graphs read these tensors
            t = cache[key] = make()
        return t

    def _camera_consts(self, cam: PinholeCamera, dtype, device) -> torch.Tensor:
        """(4, 2, 1): focal lengths, principal point, lowest and highest pixel of ``cam``."""
        return self._const(("cam", cam, dtype, str(device)), lambda: torch.tensor(
            [[[cam.fx], [cam.fy]], [[cam.cx], [cam.cy]], [[0.0], [0.0]], [[cam.width - 1.0], [cam.height - 1.0]]],
            dtype=dtype, device=device))

    # ------------------------------------------------------------------ one linearisation
    def associate(self, T: torch.Tensor, src: SourceLevel, ref: ReferenceLevel) -> dict:
        """Projective association of the frame points at pose ``T`` (4, 4) = ``T_kf_frame``.

        Returns a dict: ``q`` (3, N) points in the keyframe, ``uv`` projections and ``uvi``
        their nearest pixels ((2, N) or a pair of (N,), see :func:`project_pixels`), ``iz``
        (N,) inverse depths, ``idx`` (N,) flat
        nearest keyframe pixel, ``geo`` (7, N) keyframe maps there, ``d`` (3, N) =
        ``q - y``, ``valid`` (N,) bool (in the image, in front, keyframe point valid, not
        occluded). No host synchronisation.
        """
        cam = ref.camera
        q = torch.addmm(T[:3, 3:4], T[:3, :3], src.pts)
        iz = q[2].clamp_min(1e-6).reciprocal_()
        k = self._camera_consts(cam, q.dtype, q.device) if q.is_cuda else None
        uv, uvi, inside, idx = project_pixels(q, iz, cam, k)
        inside &= q[2] > 1e-3
        geo = ref.geo.index_select(1, idx)
        d = q - geo[0:3]
        occ = self.config.occlusion_distance
        valid = inside & (geo[6] > 0) & ((d * d).sum(0) <= occ * occ)
        return {"q": q, "uv": uv, "uvi": uvi, "iz": iz, "idx": idx, "geo": geo, "d": d, "valid": valid}

    def linearise(
        self, T: torch.Tensor, src: SourceLevel, ref: ReferenceLevel, need_system: bool = True
    ) -> dict:
        """Residuals and normal equations of all terms at pose ``T`` (4, 4) = ``T_kf_frame``.

        Returns the :meth:`associate` dict plus ``H`` (d, d), ``g`` (d,) and ``cost`` (sum of
        weighted squared whitened residuals) when ``need_system``, and ``M`` (d+1, d+1)
        = ``[[H, g], [g^T, cost]]`` (float32, one product gives all three). Vectorised over
        the residual rows (a few dozen kernels, no host synchronisation).
        """
        cfg = self.config
        sim3 = not self.metric
        cam = ref.camera
        out = self.associate(T, src, ref)
        if not need_system:
            return out
        q, geo, valid, iz, d = out["q"], out["geo"], out["valid"], out["iz"], out["d"]
        dt = q.dtype
        vm = valid.to(dt)
        c_kf = geo[6]
        # confidence weight of geometric terms: harmonic combination (1 when both are 1)
        cw = (src.conf * c_kf).div_((src.conf + c_kf).clamp_min_(1e-12)).mul_(vm).mul_(2.0)
        k = cfg.huber_k
        rows_r: list[torch.Tensor] = []  # (N,) each
        rows_G: list[torch.Tensor] = []  # (3, N) each
        weights: list[torch.Tensor] = []  # (N,) per block
        layout: list[tuple] = []  # per block: the sigma of each of its rows

        def block(rs: list, Gs: list, sigmas: Sequence[float], weight: torch.Tensor) -> None:
            rows_r.extend(rs)
            rows_G.extend(Gs)
            weights.append(weight)
            layout.append(tuple(float(sg) for sg in sigmas))

        if cfg.match_weight > 0:
            y = geo[0:3]
            full = cfg.projective_direction_rows
            if cfg.residual == "pixel_depth":
                r_d = torch.log(q[2].clamp_min(1e-9) / y[2].clamp_min(1e-9))
                G_d = iz * self._const(("ez", dt, str(q.device)),
                                       lambda: torch.tensor([[0.0], [0.0], [1.0]], dtype=dt, device=q.device))
                if full:
                    r, G = grad_pixel_depth(q, y, cam)
                    block([r[0], r[1], r_d], [G[0], G[1], G_d], [cfg.sigma_pixel] * 2 + [cfg.sigma_depth],
                          cw * cfg.match_weight)
                else:
                    block([r_d], [G_d], [cfg.sigma_depth], cw * cfg.match_weight)
            else:
                r, G = grad_ray_dist(q, y)
                if full:
                    block(list(r), list(G), [cfg.sigma_ray] * 3 + [cfg.sigma_dist], cw * cfg.match_weight)
                else:
                    block([r[3]], [G[3]], [cfg.sigma_dist], cw * cfg.match_weight)
        if cfg.point_to_plane:
            n = geo[3:6]
            r_p = (n * d).sum(0)
            block([r_p], [n], [cfg.sigma_plane], cw * (n[2] != 0).to(dt))
        if cfg.photometric and src.intensity is not None:
            i_kf, grad = self._sample_photo(out, ref)
            guv = grad * (self._camera_consts(cam, dt, q.device)[0] * iz)  # (2, N) d I / d (x, y) * z
            gz = torch.addcmul(guv[0] * q[0], guv[1], q[1]).mul_(iz).neg_()
            block([i_kf - src.intensity], [torch.cat((guv, gz[None]))], [cfg.sigma_photo], vm)
        key = (tuple(layout), dt, str(q.device))
        inv2 = self._const(("inv2",) + key, lambda: torch.tensor(
            [1.0 / (sg * sg) for sgs in layout for sg in sgs], dtype=dt, device=q.device)[:, None])  # (R, 1)
        r = torch.stack(rows_r)  # (R, N)
        Wb = torch.stack(weights)  # (B, N)
        e2 = r * r * inv2
        multi = len(rows_r) != len(weights)
        if multi:  # Huber on the whitened norm of each multi-row block: (B, R) @ (R, N)
            Bm = self._block_matrix(layout, dt, q.device)
            e2 = Bm @ e2
        # IRLS weights of the Huber loss, min(1, k / e) (times the block weight)
        wb = Wb * (e2 * Wb).sqrt_().clamp_min_(1e-12).reciprocal_().mul_(k).clamp_max_(1.0)
        if multi:
            wb = Bm.T @ wb
        w = wb * inv2  # (R, N), zero for invalid matches
        r = r * vm  # zero for invalid matches
        G = torch.stack(rows_G)  # (R, 3, N)
        # Jacobian rows of a left perturbation and the residual: one (d + 1, R * N) matrix
        A = torch.stack(jacobian_row_list(G, q, sim3, fused=G.is_cuda) + [r]).reshape(self.dof + 1, -1)
        M = (A * w.reshape(1, -1)) @ A.T  # (d + 1, d + 1)
        dof = self.dof
        out.update(M=M, H=M[:dof, :dof], g=M[:dof, dof], cost=M[dof, dof])
        return out

    def _block_matrix(self, layout: list, dtype, device) -> torch.Tensor:
        """(B, R) membership of the rows in the Huber blocks of ``layout`` (cached)."""
        def make():
            R = sum(len(sgs) for sgs in layout)
            B = torch.zeros((len(layout), R), dtype=dtype)
            r0 = 0
            for bi, sgs in enumerate(layout):
                B[bi, r0:r0 + len(sgs)] = 1.0
                r0 += len(sgs)
            return B.to(device)

        return self._const(("blocks", tuple(layout), dtype, str(device)), make)

    @staticmethod
    def _sample_photo(assoc: dict, ref: ReferenceLevel) -> tuple[torch.Tensor, torch.Tensor]:
        """Keyframe intensity (N,) and its gradient (2, N) at the projections.

        Intensity, gradient at the nearest pixel and first-order (gradient) interpolation
        to the sub-pixel position: one gather instead of four.
        """
        p = ref.photo.index_select(1, assoc["idx"])  # (3, N): I, dI/du, dI/dv
        uv, uvi = assoc["uv"], assoc["uvi"]
        val = torch.addcmul(torch.addcmul(p[0], p[1], uv[0] - uvi[0]), p[2], uv[1] - uvi[1])
        return val, p[1:3]

    # ------------------------------------------------------------------ solve
    def track(
        self,
        sources: Sequence[SourceLevel],
        references: Sequence[ReferenceLevel],
        T_init: np.ndarray,
        stats_level: Optional[int] = None,
        extra: Optional[torch.Tensor] = None,
    ) -> TrackResult:
        """Estimate ``T_kf_frame`` coarse to fine.

        Args:
            sources: frame levels (coarse to fine); references: keyframe levels, same factors.
            T_init: (4, 4) initial ``T_kf_frame``.
            stats_level: level index used for the match statistics (default: the finest
                dense level).
            extra: optional tensor (any shape, on the device) read back with the result
                (in the device loop: in the frame's single host synchronisation), returned
                flattened as ``TrackResult.extra`` (float64 numpy).

        Returns:
            :class:`TrackResult`.
        """
        cfg = self.config
        dev = sources[0].pts.device
        mode = getattr(cfg, "device_loop", "auto")
        if mode in ("device", "graph") or (mode == "auto" and dev.type == "cuda"):
            return self._track_device(sources, references, T_init, stats_level, mode in ("graph", "auto"), extra)
        res = self._track_host(sources, references, T_init, stats_level)
        if extra is not None:
            res.extra = extra.detach().double().reshape(-1).cpu().numpy()
        return res

    def _track_host(self, sources, references, T_init: np.ndarray, stats_level: Optional[int]) -> TrackResult:
        """Host Levenberg-Marquardt loop (early exits; one read of the normal equations per
        iteration)."""
        cfg = self.config
        dev = sources[0].pts.device
        T = np.array(T_init, dtype=np.float64).reshape(4, 4)
        iters_total = 0
        H_last = None
        cost = float("inf")
        d = self.dof
        for li, (src, ref) in enumerate(zip(sources, references)):
            n_iter = cfg.iterations[li] if li < len(cfg.iterations) else cfg.iterations[-1]
            if src.n < 10 or ref.n_valid < 10:
                continue
            # Levenberg-Marquardt: a step that raises the (re-associated, per-match) cost is
            # undone and retried with 10x the damping; accepted steps divide it by 10.
            lam = cfg.damping
            best = None  # (T, H, g, cost) of the last accepted linearisation point
            for it in range(n_iter):
                lin = self.linearise(torch.from_numpy(T.astype(np.float32)).to(dev), src, ref)
                # one read: [[H, g], [g^T, cost]] and the number of valid matches
                host = torch.cat((lin["M"].reshape(-1), lin["valid"].sum().reshape(1).to(lin["M"].dtype)))
                host = host.double().cpu().numpy()
                n_valid = int(host[-1])
                M = host[:-1].reshape(d + 1, d + 1)
                cost = float(M[d, d]) / max(n_valid, 1)
                if n_valid < self.dof * 3 or not np.isfinite(cost):
                    if best is None:
                        return TrackResult(T, False, n_valid, 0.0, reason="too few valid matches")
                    cost = float("inf")
                if best is not None and cost > best[3]:
                    T, H, g, _ = best  # reject the step
                    lam = min(lam * 10.0, 1e4)
                else:
                    H = M[:d, :d].copy()
                    g = M[:d, d].copy()
                    converged = best is not None and best[3] - cost < cfg.rel_cost_tolerance * best[3]
                    best = (T, H, g, cost)
                    H_last = H
                    lam = max(lam * 0.1, cfg.damping)
                    if converged:
                        break  # the last step no longer decreased the cost noticeably
                dx = solve_normal_equations(H, g, lam)
                if dx is None:
                    return TrackResult(T, False, n_valid, reason="singular normal equations")
                iters_total += 1
                if float(np.linalg.norm(dx)) < cfg.step_tolerance:
                    break
                T = retract(T, dx)
            if best is not None:
                cost = best[3]
        if H_last is None:
            return TrackResult(T, False, reason="no valid points")
        # statistics with the final pose
        si = self._stats_level(sources) if stats_level is None else stats_level
        stats = self.match_statistics(T, sources[si], references[si])
        return self._result(T, np.asarray(T_init, dtype=np.float64), H_last, cost, iters_total, stats)

    def _track_device(self, sources, references, T_init: np.ndarray, stats_level: Optional[int], graphed: bool,
                      extra: Optional[torch.Tensor]) -> TrackResult:
        """Device LM loop (:mod:`recon_slam.frontend.tracking_device`), the match statistics
        on the device and ONE host read of everything (pose, Hessian, cost, counts, extra)."""
        from recon_slam.frontend.tracking_device import solve_levels

        from recon_slam.frontend.tracking_device import graphed_call

        T, H, cost, n_last, iters = solve_levels(self, sources, references, T_init, graphed)
        si = self._stats_level(sources) if stats_level is None else stats_level
        src, ref = sources[si], references[si]
        lazy_src = isinstance(src.counts, torch.Tensor)
        lazy_ref = isinstance(ref.valid_count, torch.Tensor)
        photo = src.intensity is not None
        # the statistics at the final pose and everything to read, packed in one vector (on
        # CUDA with the graph loop: one graph replay instead of ~50 small kernels)
        inputs = [T, H, cost, n_last, ref.geo, ref.photo, src.pts, src.conf]
        inputs += [src.intensity] if photo else []
        inputs += [src.counts] if lazy_src else []
        inputs += [ref.valid_count] if lazy_ref else []
        inputs += [extra.detach()] if extra is not None else []

        def pack(T, H, cost, n_last, geo, photo_maps, pts, conf, *rest):
            s = dataclasses.replace(src, pts=pts, conf=conf, intensity=rest[0] if photo else None)
            r = dataclasses.replace(ref, geo=geo, photo=photo_maps)
            counts = self.match_counts(T.float(), s, r)
            parts = [T, H, cost, n_last, counts] + list(rest[photo:])
            return torch.cat([t.reshape(-1).to(torch.float64) for t in parts])

        if graphed:
            key = ("stats", self.dof, tuple(t.shape for t in inputs), ref.camera, photo, lazy_src, lazy_ref,
                   None if extra is None else extra.dtype, str(T.device))
            packed = graphed_call(self.__dict__.setdefault("_stats_graphs", {}), key, pack, inputs,
                                  reuse=(4, 5))  # keyframe maps: new tensors when rebuilt
        else:
            packed = pack(*inputs)
        host = packed.cpu().numpy()
        d = self.dof
        T_np = host[:16].reshape(4, 4).copy()
        H_np = host[16:16 + d * d].reshape(d, d).copy()
        o = 16 + d * d
        cost_f, n_valid_last = float(host[o]), int(host[o + 1])
        n_valid, hits, inl = (int(v) for v in host[o + 2:o + 5])
        o += 5
        if lazy_src:
            src.set_counts(host[o], host[o + 1])
            o += 2
        if lazy_ref:
            ref.valid_count = int(host[o])
            o += 1
        extra_np = host[o:].copy() if extra is not None else None
        if not np.isfinite(cost_f) or not np.all(np.isfinite(H_np)) or not np.any(H_np):
            return TrackResult(T_np, False, n_valid_last, 0.0, reason="too few valid matches", extra=extra_np)
        stats = self._fractions(src, ref, n_valid, hits, inl)
        res = self._result(T_np, np.asarray(T_init, dtype=np.float64), H_np, cost_f, iters, stats)
        res.extra = extra_np
        return res

    def _result(self, T_np: np.ndarray, T0: np.ndarray, H: np.ndarray, cost: float, iters: int,
                stats: tuple) -> TrackResult:
        """:class:`TrackResult` of a solve with its plausibility checks (host values only)."""
        cfg = self.config
        valid_fraction, unique, n_valid, inliers = stats
        # information for the backend: the last Hessian of the finest level
        res = TrackResult(T_np, True, n_valid, valid_fraction, unique, H, cost, iters, inlier_fraction=inliers)
        if not np.all(np.isfinite(T_np)):
            res.success, res.reason = False, "non-finite pose"
        else:
            dt = np.linalg.norm(T_np[:3, 3] - T0[:3, 3])
            R0 = T0[:3, :3] / np.cbrt(np.linalg.det(T0[:3, :3]))
            R1 = T_np[:3, :3] / np.cbrt(np.linalg.det(T_np[:3, :3]))
            ang = np.arccos(np.clip((np.trace(R0.T @ R1) - 1) / 2, -1, 1))
            if dt > cfg.max_translation_jump or ang > cfg.max_rotation_jump:
                res.success, res.reason = False, f"implausible jump ({dt:.3f} m, {np.degrees(ang):.1f} deg)"
            elif valid_fraction < cfg.min_valid_fraction:
                res.success, res.reason = False, f"valid match fraction {valid_fraction:.3f} below threshold"
        return res

    def solve_matched(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        T_init: np.ndarray,
        weights: Optional[torch.Tensor] = None,
        camera: Optional[PinholeCamera] = None,
        iterations: int = 50,
    ) -> TrackResult:
        """Pose from fixed correspondences with the main residual (matcher-based tracking).

        This is the solve of the network path: matches come from a matcher (e.g.
        :func:`recon_slam.frontend.matching.ray_match`) and stay fixed; all rows of the main
        residual are used ('pixel_depth' needs ``camera``, the keyframe intrinsics).

        Args:
            x: (3, N) frame points (frame camera); y: (3, N) matched keyframe points.
            T_init: (4, 4) initial ``T_kf_frame``.
            weights: (N,) confidence weights (default 1; 0 drops a match).
            iterations: Gauss-Newton iterations at most (stops when the step is below
                ``step_tolerance``).

        Matches further apart in 3D than ``max(occlusion_distance, 3 x median distance)`` at
        the current estimate are ignored (occlusions and gross mismatches; the gate shrinks
        to ``occlusion_distance`` as the solve converges), the rest are Huber-weighted.

        Returns:
            :class:`TrackResult` (valid fraction = matches with positive weight; inlier
            fraction = matches inside the gate whose Huber weight stayed 1 at the end).
        """
        cfg = self.config
        sim3 = not self.metric
        w0 = torch.ones_like(x[0]) if weights is None else weights.to(x.dtype)
        if cfg.residual == "pixel_depth" and camera is None:
            raise ValueError("solve_matched with residual 'pixel_depth' needs the keyframe camera")
        sig = ([cfg.sigma_pixel, cfg.sigma_pixel, cfg.sigma_depth] if cfg.residual == "pixel_depth"
               else [cfg.sigma_ray] * 3 + [cfg.sigma_dist])
        inv2 = torch.tensor([1.0 / (v * v) for v in sig], dtype=x.dtype, device=x.device)[:, None]
        T = np.array(T_init, dtype=np.float64).reshape(4, 4)
        H = None
        hw = torch.ones_like(w0)
        it = 0
        for it in range(1, iterations + 1):
            Tt = torch.from_numpy(T).to(x)
            q = torch.addmm(Tt[:3, 3:4], Tt[:3, :3], x)
            if cfg.residual == "pixel_depth":
                r, G = grad_pixel_depth(q, y, camera)
                wv = w0 * ((q[2] > 1e-3) & (y[2] > 1e-3)).to(x.dtype)  # in front of both cameras
            else:
                r, G = grad_ray_dist(q, y)
                wv = w0
            # gate gross mismatches by 3D distance (occlusion test), annealed while converging
            dd = q - y
            dist = (dd * dd).sum(0).sqrt()
            live = wv > 0
            if bool(live.any()):
                gate = max(cfg.occlusion_distance, 3.0 * float(dist[live].median()))
                wv = wv * (dist <= gate).to(x.dtype)
            r = r * (wv > 0).to(x.dtype)
            e = ((r * r * inv2).sum(0) * wv).sqrt()
            hw = huber_weights(e, cfg.huber_k)
            w = (wv * hw)[None] * inv2  # (R, N)
            J = jacobian_components(G, q, sim3).reshape(self.dof, -1)
            Jw = J * w.reshape(1, -1)
            H = (Jw @ J.T).double().cpu().numpy()
            g = (Jw @ r.reshape(-1)).double().cpu().numpy()
            dx = solve_normal_equations(H, g, cfg.damping)
            if dx is None:
                return TrackResult(T, False, reason="singular normal equations")
            T = retract(T, dx)
            if float(np.linalg.norm(dx)) < cfg.step_tolerance:
                break
        n = int(x.shape[1])
        n_valid = int((w0 > 0).sum())
        inl = int(((wv > 0) & (hw >= 0.999)).sum())
        return TrackResult(T, bool(np.all(np.isfinite(T))), n_valid, n_valid / max(n, 1), 0.0,
                           H, 0.0, it, inlier_fraction=inl / max(n, 1))

    def _stats_level(self, sources: Sequence[SourceLevel]) -> int:
        dense = [i for i, s in enumerate(sources) if s.dense]
        return dense[-1] if dense else len(sources) - 1

    def match_statistics(
        self, T_kf_frame: np.ndarray, src: SourceLevel, ref: ReferenceLevel
    ) -> tuple[float, float, int, float]:
        """Match statistics at pose ``T_kf_frame``.

        Returns:
            (valid match fraction, unique keyframe pixel fraction, n_valid, inlier fraction).
            Fractions of matches are over the frame's valid points of the level, the unique
            fraction over the keyframe's valid pixels of the level; inliers are valid matches
            whose geometric error (point-to-plane, else point distance) is below
            ``inlier_distance`` and, with the photometric term, whose intensity error is below
            ``inlier_intensity``.
        """
        T = torch.as_tensor(np.asarray(T_kf_frame), dtype=torch.float32, device=src.pts.device)
        n_valid, hits, inl = _host_ints(self.match_counts(T, src, ref))
        return self._fractions(src, ref, n_valid, hits, inl)

    def match_counts(self, T: torch.Tensor, src: SourceLevel, ref: ReferenceLevel) -> torch.Tensor:
        """(3,) long device tensor: valid matches, keyframe pixels hit by one, inliers (see
        :meth:`match_statistics`) at pose ``T`` (4, 4) float32; no host synchronisation."""
        cfg = self.config
        a = self.associate(T, src, ref)
        valid, idx = a["valid"], a["idx"]
        cam = ref.camera
        hits = unique_count(idx, valid, cam.width * cam.height)
        d, n = a["d"], a["geo"][3:6]
        plane = (n * d).sum(0).abs_()
        dist = (d * d).sum(0).sqrt_()
        geo_err = torch.where(n[2] != 0, plane, dist)
        inl = valid & (geo_err <= cfg.inlier_distance)
        if cfg.photometric and src.intensity is not None:
            i_kf, _ = self._sample_photo(a, ref)
            inl &= (i_kf - src.intensity).abs_() <= cfg.inlier_intensity
        return torch.stack((valid.sum(), hits, inl.sum()))

    @staticmethod
    def _fractions(src: SourceLevel, ref: ReferenceLevel, n_valid: int, hits: int,
                   inl: int) -> tuple[float, float, int, float]:
        """:meth:`match_statistics` from the host counts of :meth:`match_counts`."""
        n_src = src.n if not src.dense else src.n_total
        vf = n_valid / max(n_src, 1)
        denom = ref.n_valid
        uf = hits / denom if denom > 0 else 0.0
        if not src.dense:  # subsampled sources cannot hit every keyframe pixel
            uf = min(1.0, uf * (src.n_total / max(src.n, 1)))
        return vf, uf, n_valid, inl / max(n_src, 1)


def source_levels(
    X: torch.Tensor, C: torch.Tensor, image: torch.Tensor, camera: PinholeCamera, factors: Sequence[int],
    max_points: int | Sequence[int], max_spread_ratio: float = 0.05, selection: str = "grid",
    compact: Optional[bool] = None, backend: str = "auto",
) -> list[SourceLevel]:
    """Frame points of every level (coarse to fine, one per factor) ready for :meth:`Tracker.track`.

    Args:
        X: (H, W, 3) frame pointmap (frame camera); C: (H, W); image: (H, W, 3) uint8;
            camera: intrinsics of X at processing resolution.
        max_points: point budget per level (one number for all, or one per level);
        selection, compact: see :func:`source_level`; backend: see :func:`build_pyramid`.
    """
    levels = build_pyramid(X, C, image, camera, factors, max_spread_ratio, backend)
    budgets = list(max_points) if isinstance(max_points, (list, tuple)) else [max_points] * len(levels)
    budgets += [budgets[-1]] * (len(levels) - len(budgets))
    return [source_level(lv, int(b), selection, compact) for lv, b in zip(levels, budgets)]


def source_levels_graphed(
    cache: dict, X_chw: torch.Tensor, C: torch.Tensor, image: torch.Tensor, camera: PinholeCamera,
    factors: Sequence[int], max_points: int | Sequence[int], max_spread_ratio: float = 0.05,
    selection: str = "grid",
) -> list[SourceLevel]:
    """Padded :func:`source_levels` (torch pyramid), replayed as one CUDA graph on CUDA.

    The levels are a pure function of the frame maps with fixed shapes (no host sync), so
    on CUDA the ~70 kernels of the pyramid and the point selection are captured once per
    (size, camera, settings) and replayed; elsewhere (and when a capture fails) they run
    eagerly. The returned tensors are the graph's static buffers: valid until the next
    call with the same ``cache`` (a frame's levels are used within the frame).

    Args:
        cache: graph cache (one per engine).
        X_chw: (3, H, W) frame points (frame camera); C: (H, W); image: (H, W, 3) uint8;
            camera, factors, max_points, max_spread_ratio, selection: see
            :func:`source_levels`.

    Returns:
        list of padded :class:`SourceLevel` (coarse to fine, one per factor).
    """
    from recon_slam.frontend.tracking_device import graphed_call

    budgets = tuple(int(b) for b in (max_points if isinstance(max_points, (list, tuple)) else [max_points]))
    key = ("levels", tuple(C.shape), X_chw.dtype, camera, tuple(int(f) for f in factors), budgets,
           float(max_spread_ratio), selection, str(C.device))
    meta = cache.setdefault("_meta", {})

    def fn(X_chw, C, image):
        levels = source_levels(X_chw.permute(1, 2, 0), C, image, camera, factors, list(budgets), max_spread_ratio,
                               selection, compact=False, backend="torch")
        meta[key] = [(lv.factor, lv.camera, lv.dense) for lv in levels]
        return [(lv.pts, lv.conf, lv.intensity, lv.counts) for lv in levels]

    outs = graphed_call(cache, key, fn, [X_chw, C, image])
    return [SourceLevel(f, cam, pts, conf, inten, dense, counts, padded=True)
            for (f, cam, dense), (pts, conf, inten, counts) in zip(meta[key], outs)]
