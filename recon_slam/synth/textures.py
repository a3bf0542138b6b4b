"""Procedural surface textures for the synthetic scenes, and the texture atlas they live in.

Every texture is an image ``(h, w, 3)`` float32 in ``[0, 1]`` laid out on a surface's own
2D coordinates: column ``i`` covers ``u`` in ``[i, i + 1) / texels_per_m`` metres, row ``j``
covers ``v`` in ``[j, j + 1) / texels_per_m``. Generators take a NumPy ``Generator`` so
that a scene is a pure function of its seed. Textures are band-limited (value noise made
of cubic-interpolated random grids, anti-aliased drawing, a final light blur) so that
images rendered from them stay free of aliasing; :class:`TextureAtlas` further stores a
few pre-blurred levels that the renderer blends by pixel footprint (a mip-map without
the down-sampling).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import cv2
import numpy as np
import torch

TextureFn = Callable[[np.random.Generator, int, int], np.ndarray]
"""``fn(rng, width_texels, height_texels) -> (h, w, 3) float32`` texture generator."""

#: Gaussian blur (in texels) of the atlas levels; the renderer blends the two levels that
#: bracket ~half the pixel footprint.
LEVEL_SIGMAS: tuple[float, ...] = (0.0, 1.5, 4.0, 10.0)

_GUTTER = 2  # texels of replicated border around every atlas tile (bilinear safety)


# ---------------------------------------------------------------------------- noise
def value_noise(
    rng: np.random.Generator,
    h: int,
    w: int,
    cell: float | tuple[float, float],
    channels: int = 1,
    wrap_x: bool = False,
) -> np.ndarray:
    """Smooth value noise ``(h, w, channels)`` float32, mean ~0 and std ~1.

    A uniform random grid with one value per ``cell`` texels (``(cell_u, cell_v)`` for
    anisotropic noise) is bicubically up-sampled, so the spectrum stops near
    ``1 / cell``. ``wrap_x`` makes it periodic along the width (cylinders).
    """
    cu, cv = (cell, cell) if np.isscalar(cell) else cell
    cu, cv = max(1, int(round(cu))), max(1, int(round(cv)))
    gh = h // cv + 4
    if wrap_x:
        gw = max(3, int(round(w / cu)))
        grid = rng.random((gh, gw, channels), dtype=np.float32)
        tiled = np.concatenate([grid, grid, grid], axis=1)
        up = cv2.resize(tiled, (3 * w, gh * cv), interpolation=cv2.INTER_CUBIC).reshape(gh * cv, 3 * w, channels)
        oy = int(rng.integers(0, cv + 1))
        out = up[oy : oy + h, w : 2 * w]
    else:
        gw = w // cu + 4
        grid = rng.random((gh, gw, channels), dtype=np.float32)
        up = cv2.resize(grid, (gw * cu, gh * cv), interpolation=cv2.INTER_CUBIC).reshape(gh * cv, gw * cu, channels)
        oy, ox = int(rng.integers(0, cv + 1)), int(rng.integers(0, cu + 1))
        out = up[oy : oy + h, ox : ox + w]
    return ((out - 0.5) / 0.22).astype(np.float32)


def fbm(
    rng: np.random.Generator,
    h: int,
    w: int,
    cells: Sequence[float],
    gains: Sequence[float] | None = None,
    channels: int = 1,
    wrap_x: bool = False,
) -> np.ndarray:
    """Sum of value-noise octaves ``(h, w, channels)``, normalised to zero mean, unit std."""
    gains = gains if gains is not None else [0.6**i for i in range(len(cells))]
    acc = np.zeros((h, w, channels), np.float32)
    for cell, gain in zip(cells, gains):
        acc += gain * value_noise(rng, h, w, cell, channels, wrap_x)
    acc -= acc.mean(axis=(0, 1), keepdims=True)
    return acc / (acc.std(axis=(0, 1), keepdims=True) + 1e-6)


def _palette_map(t: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """Map scalars ``t (h, w)`` in [0, 1] through a colour ramp ``palette (K, 3)``."""
    k = len(palette)
    x = np.clip(t, 0.0, 1.0) * (k - 1)
    i0 = np.clip(np.floor(x).astype(np.int64), 0, k - 2)
    f = (x - i0)[..., None]
    return (palette[i0] * (1 - f) + palette[i0 + 1] * f).astype(np.float32)


def _to01(n: np.ndarray, spread: float = 3.0) -> np.ndarray:
    """Unit-std noise -> [0, 1] (clipped linear ramp over +-spread/2 std)."""
    return np.clip(0.5 + n / spread, 0.0, 1.0)


def random_colour(
    rng: np.random.Generator, sat: tuple[float, float] = (0.3, 0.9), val: tuple[float, float] = (0.3, 0.95)
) -> np.ndarray:
    """One RGB colour (3,) in [0, 1] with random hue and given saturation/value ranges."""
    hsv = np.array([[[rng.uniform(0, 180), rng.uniform(*sat) * 255, rng.uniform(*val) * 255]]], np.float32)
    return cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB)[0, 0].astype(np.float32) / 255.0


def random_palette(rng: np.random.Generator, k: int, **kw) -> np.ndarray:
    """``(k, 3)`` random colours (see :func:`random_colour`)."""
    return np.stack([random_colour(rng, **kw) for _ in range(k)])


def _finish(img: np.ndarray, sigma: float = 0.7) -> np.ndarray:
    """Clip to [0, 1] and apply the final anti-alias blur."""
    img = np.clip(img, 0.0, 1.0).astype(np.float32)
    if sigma > 0 and min(img.shape[:2]) > 2:
        img = cv2.GaussianBlur(img, (0, 0), sigma, borderType=cv2.BORDER_REFLECT_101)
    return img


def _cv_colour(c: np.ndarray) -> tuple[float, float, float]:
    return tuple(float(x) for x in c)


# ---------------------------------------------------------------------------- textures
def plain(colour: Sequence[float]) -> TextureFn:
    """Uniform colour (used for faces never seen, e.g. box bottoms)."""
    c = np.asarray(colour, np.float32)

    def fn(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
        return np.broadcast_to(c, (h, w, 3)).copy()

    return fn


def paint(colour: Sequence[float], amplitude: float = 0.05) -> TextureFn:
    """Weakly textured painted plaster: a base colour with faint mottling at several scales."""
    c = np.asarray(colour, np.float32)

    def fn(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
        n = fbm(rng, h, w, [160, 60, 20, 7], [1.0, 0.55, 0.4, 0.3])
        return _finish(c * (1.0 + amplitude * n), 0.0)

    return fn


def mural(palette: np.ndarray | None = None, chips: float = 1.0) -> TextureFn:
    """Rich colourful value-noise (a painted mural / patterned wallpaper), with small blots."""

    def fn(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
        pal = palette if palette is not None else random_palette(rng, 5)
        t = _to01(fbm(rng, h, w, [70, 30, 12, 6, 3], [1.0, 0.7, 0.5, 0.35, 0.2])[..., 0], 3.2)
        img = _palette_map(t, pal)
        img *= 1.0 + 0.22 * fbm(rng, h, w, [10, 5, 3], [1.0, 0.7, 0.5])
        _blots(rng, img, density=chips * 0.05, radius=(1.5, 6.0))
        return _finish(img)

    return fn


def _blots(
    rng: np.random.Generator, img: np.ndarray, density: float, radius: tuple[float, float], palette=None
) -> None:
    """Draw anti-aliased random ellipses in place (``density`` blots per texel^2 x 100)."""
    h, w = img.shape[:2]
    n = int(density * h * w / 100.0)
    for _ in range(n):
        c = palette[rng.integers(len(palette))] * rng.uniform(0.8, 1.1) if palette is not None else random_colour(rng)
        axes = (max(1, int(rng.uniform(*radius))), max(1, int(rng.uniform(*radius))))
        cv2.ellipse(
            img, (int(rng.integers(w)), int(rng.integers(h))), axes, float(rng.uniform(0, 180)), 0, 360,
            _cv_colour(c), -1, cv2.LINE_AA,
        )


def terrazzo(base: Sequence[float], chip_palette: np.ndarray, density: float = 4.0) -> TextureFn:
    """Terrazzo / speckled stone: mottled base with many small coloured chips."""
    b = np.asarray(base, np.float32)

    def fn(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
        img = b * (1.0 + 0.12 * fbm(rng, h, w, [80, 25, 8], [1.0, 0.6, 0.3], channels=3))
        _blots(rng, img, density=density * 0.03, radius=(1.0, 3.5), palette=chip_palette)
        return _finish(img, 0.8)

    return fn


def planks(palette: np.ndarray, plank_width_m: float = 0.16, tpm: float = 100.0) -> TextureFn:
    """Wooden floor: planks along ``u`` of random length, per-plank tint, grain and seams."""

    def fn(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
        pw = plank_width_m * tpm
        n_rows = int(math.ceil(h / pw)) + 1
        vv, uu = np.mgrid[0:h, 0:w].astype(np.float32)
        row = np.floor(vv / pw).astype(np.int64)
        # plank boundaries along u per row: random lengths 0.8-2.2 m
        tint = np.zeros((h, w, 3), np.float32)
        seam = np.zeros((h, w), np.float32)
        for r in range(n_rows):
            sel = row == r
            if not sel.any():
                continue
            u0 = -rng.uniform(0, 2.0) * tpm
            ends = [u0]
            while ends[-1] < w:
                ends.append(ends[-1] + rng.uniform(0.8, 2.2) * tpm)
            idx = np.searchsorted(np.asarray(ends), uu[sel], side="right") - 1
            cols = palette[rng.integers(len(palette), size=len(ends))] * rng.uniform(0.8, 1.15, size=(len(ends), 1))
            tint[sel] = cols[idx]
            du = np.min(np.abs(uu[sel][:, None] - np.asarray(ends)[None, :]), axis=1)
            seam[sel] = np.maximum(seam[sel], (du < 0.8).astype(np.float32))
        dv = np.abs(vv - np.round(vv / pw) * pw)
        seam = np.maximum(seam, (dv < 0.6).astype(np.float32))
        grain = fbm(rng, h, w, [(60, 3), (20, 2), (8, 2)], [1.0, 0.5, 0.3])
        img = tint * (1.0 + 0.13 * grain) * (1.0 - 0.45 * seam[..., None])
        img *= 1.0 + 0.06 * fbm(rng, h, w, [50, 15], [1.0, 0.5])
        _blots(rng, img, density=0.0015, radius=(1.0, 2.5), palette=palette * 0.55)
        return _finish(img, 0.8)

    return fn


def grid_pattern(
    palette: np.ndarray,
    cell_w: float,
    cell_h: float,
    mortar: float,
    mortar_colour: Sequence[float],
    running_bond: bool,
    veins: float = 0.0,
) -> TextureFn:
    """Bricks (``running_bond``) or tiles: per-cell random colour + noise, mortar/grout lines."""
    mc = np.asarray(mortar_colour, np.float32)

    def fn(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
        vv, uu = np.mgrid[0:h, 0:w].astype(np.float32)
        row = np.floor(vv / cell_h).astype(np.int64)
        shift = np.where(row % 2 == 1, 0.5 * cell_w, 0.0) if running_bond else 0.0
        uu_s = uu + shift + rng.uniform(0, cell_w)
        col = np.floor(uu_s / cell_w).astype(np.int64)
        n_r, n_c = int(row.max()) + 1, int(col.max()) + 1
        colours = palette[rng.integers(len(palette), size=(n_r, n_c))]
        colours = colours * rng.uniform(0.75, 1.2, size=(n_r, n_c, 1))
        img = colours[row, col].astype(np.float32)
        img *= 1.0 + 0.1 * fbm(rng, h, w, [12, 5], [1.0, 0.6]) + 0.03 * fbm(rng, h, w, [8], channels=3)
        if veins > 0:
            v = np.abs(fbm(rng, h, w, [45, 18, 7], [1.0, 0.5, 0.25])[..., 0])
            img *= 1.0 - veins * np.exp(-((v / 0.12) ** 2))[..., None]
        fu = uu_s - col * cell_w
        fv = vv - row * cell_h
        m = (fu < mortar) | (fv < mortar)
        img[m] = mc * (1.0 + 0.1 * rng.standard_normal((int(m.sum()), 1)).astype(np.float32))
        return _finish(img, 0.8)

    return fn


def wood(palette: np.ndarray, along_u: bool = True) -> TextureFn:
    """Wood veneer: grain stretched along ``u`` (or ``v``), rings and a few knots."""

    def fn(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
        cells = [(80, 4), (25, 2), (10, 2)] if along_u else [(4, 80), (2, 25), (2, 10)]
        g = fbm(rng, h, w, cells, [1.0, 0.6, 0.3])[..., 0]
        rings = np.sin(3.0 * g + 0.5 * fbm(rng, h, w, [40])[..., 0])
        t = _to01(0.6 * g + 0.8 * rings, 3.0)
        img = _palette_map(t, palette)
        img *= 1.0 + 0.1 * fbm(rng, h, w, [30, 8], [1.0, 0.5])
        _blots(rng, img, density=0.004, radius=(1.0, 3.0), palette=palette[:1] * 0.5)
        return _finish(img)

    return fn


def fabric(colour: Sequence[float], amplitude: float = 0.22) -> TextureFn:
    """Upholstery: coloured mottling at several scales plus faint woven speckle."""
    c = np.asarray(colour, np.float32)

    def fn(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
        n = fbm(rng, h, w, [40, 15, 6, 3], [1.0, 0.7, 0.5, 0.3], channels=3)
        lum = fbm(rng, h, w, [20, 5], [1.0, 0.6])
        img = c * (1.0 + amplitude * (0.5 * n + lum))
        _blots(rng, img, density=0.01, radius=(1.0, 4.0), palette=np.stack([c * 0.6, c * 1.3, 1.0 - c]))
        return _finish(img)

    return fn


def poster(frame_colour: Sequence[float] | None = None) -> TextureFn:
    """A picture: colour gradient background, random shapes, noise, and a frame."""

    def fn(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
        pal = random_palette(rng, 6, sat=(0.4, 1.0), val=(0.25, 1.0))
        t = (np.linspace(0, 1, h, dtype=np.float32)[:, None] * rng.uniform(0.3, 1)
             + np.linspace(0, 1, w, dtype=np.float32)[None, :] * rng.uniform(0, 0.7))
        img = _palette_map(t / t.max(), pal[:3])
        img *= 1.0 + 0.15 * fbm(rng, h, w, [25, 8, 3], [1.0, 0.5, 0.3])
        n_shapes = int(8 + h * w / 1500)
        for _ in range(n_shapes):
            col = _cv_colour(pal[rng.integers(len(pal))] * rng.uniform(0.6, 1.2))
            kind = rng.integers(4)
            cx, cy = int(rng.integers(w)), int(rng.integers(h))
            s = int(rng.uniform(0.04, 0.25) * min(w, h)) + 2
            if kind == 0:
                cv2.circle(img, (cx, cy), s, col, -1, cv2.LINE_AA)
            elif kind == 1:
                cv2.rectangle(img, (cx - s, cy - s // 2), (cx + s // 2, cy + s), col, -1, cv2.LINE_AA)
            elif kind == 2:
                pts = (np.array([cx, cy]) + rng.uniform(-s, s, size=(3, 2))).astype(np.int32)
                cv2.fillConvexPoly(img, pts, col, cv2.LINE_AA)
            else:
                p2 = (cx + int(rng.uniform(-2, 2) * s), cy + int(rng.uniform(-2, 2) * s))
                cv2.line(img, (cx, cy), p2, col, max(1, s // 5), cv2.LINE_AA)
        fc = np.asarray(frame_colour if frame_colour is not None else random_colour(rng, val=(0.1, 0.4)), np.float32)
        b = max(2, int(0.04 * min(w, h)))
        img[:b], img[-b:], img[:, :b], img[:, -b:] = fc, fc, fc, fc
        return _finish(img)

    return fn


def whiteboard() -> TextureFn:
    """Whiteboard: near-white with coloured scribbles and a grey frame."""

    def fn(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
        img = np.full((h, w, 3), 0.92, np.float32) * (1 + 0.02 * fbm(rng, h, w, [60, 20]))
        pens = np.array([[0.1, 0.1, 0.6], [0.7, 0.1, 0.1], [0.1, 0.5, 0.15], [0.1, 0.1, 0.1]], np.float32)
        for _ in range(int(10 + w * h / 800)):
            col = _cv_colour(pens[rng.integers(len(pens))])
            p = np.array([rng.uniform(0.08, 0.92) * w, rng.uniform(0.08, 0.92) * h])
            pts = [p.copy()]
            heading = rng.uniform(0, 2 * np.pi)
            for _ in range(int(rng.integers(3, 12))):
                heading += rng.normal(0, 0.9)
                p = p + rng.uniform(2, 8) * np.array([np.cos(heading), np.sin(heading)])
                p = np.clip(p, [3, 3], [w - 4, h - 4])
                pts.append(p.copy())
            cv2.polylines(img, [np.asarray(pts, np.int32)], False, col, 1, cv2.LINE_AA)
        b = max(2, int(0.03 * min(w, h)))
        g = np.float32(0.55)
        img[:b], img[-b:], img[:, :b], img[:, -b:] = g, g, g, g
        return _finish(img, 0.6)

    return fn


def books(board_palette: np.ndarray, row_height_m: float = 0.36, tpm: float = 100.0) -> TextureFn:
    """Bookshelf front: rows of book spines of random width, height and colour between boards."""

    def fn(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
        board = wood(board_palette)(rng, w, h)
        img = board.copy()
        rh = row_height_m * tpm
        bt = max(2, int(0.025 * tpm))  # board thickness
        side = max(2, int(0.03 * tpm))
        r0 = float(bt)
        while r0 + 0.15 * tpm < h - bt:
            r1 = min(r0 + rh, h - bt)
            u = float(side)
            while u < w - side - 2:
                bw = rng.uniform(0.018, 0.06) * tpm
                if rng.random() < 0.07:  # a gap
                    u += rng.uniform(0.03, 0.12) * tpm
                    continue
                top = r1 - (r1 - r0 - 2) * rng.uniform(0.55, 0.95)
                col = random_colour(rng, sat=(0.2, 0.9), val=(0.15, 0.9))
                x0, x1 = int(u), int(min(u + bw, w - side))
                if x1 > x0:
                    spine = col
                    if int(r1) > int(top):
                        spine = col * (1.0 + 0.08 * fbm(rng, int(r1) - int(top), x1 - x0, [6, 3], channels=3))
                    img[int(top) : int(r1), x0:x1] = spine
                    if x1 - x0 >= 3 and r1 - top > 8 and rng.random() < 0.6:  # a label band
                        y = int(top + (r1 - top) * rng.uniform(0.15, 0.7))
                        img[y : y + max(1, int(0.012 * tpm)), x0:x1] = random_colour(rng, val=(0.7, 1.0))
                u += bw
            r0 = r1 + bt
        return _finish(img, 0.6)

    return fn


def cardboard(colour: Sequence[float] | None = None) -> TextureFn:
    """Cardboard box face: brown fibrous noise, packing tape and a printed label."""

    def fn(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
        base = np.asarray(colour if colour is not None else [0.62, 0.46, 0.3], np.float32) * rng.uniform(0.85, 1.1)
        img = base * (1 + 0.1 * fbm(rng, h, w, [40, 10, 3], [1.0, 0.5, 0.3], channels=3))
        if rng.random() < 0.7:  # tape
            y = int(rng.uniform(0.35, 0.65) * h)
            img[max(0, y - int(0.025 * h)) : y + int(0.025 * h) + 1] *= np.float32(1.18)
        lw, lh = int(w * rng.uniform(0.25, 0.5)), int(h * rng.uniform(0.15, 0.35))
        if lw > 4 and lh > 4:
            x0, y0 = int(rng.integers(0, w - lw)), int(rng.integers(0, h - lh))
            img[y0 : y0 + lh, x0 : x0 + lw] = 0.93
            ink = random_colour(rng, val=(0.05, 0.4))
            y = y0 + 2
            while y < y0 + lh - 2:
                x = x0 + 2
                while x < x0 + lw - 3:
                    wl = int(rng.integers(2, 8))
                    img[y : y + 1, x : min(x + wl, x0 + lw - 2)] = ink
                    x += wl + int(rng.integers(1, 3))
                y += int(rng.integers(3, 5))
        _blots(rng, img, density=0.01, radius=(1.0, 3.0), palette=base[None] * 0.6)
        return _finish(img)

    return fn


def painted_metal(colour: Sequence[float]) -> TextureFn:
    """Painted metal (cabinets, bins): brushed streaks, a few stickers and scuffs."""
    c = np.asarray(colour, np.float32)

    def fn(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
        img = c * (1.0 + 0.07 * fbm(rng, h, w, [(3, 40), (2, 12)], [1.0, 0.5]))
        img *= 1.0 + 0.05 * fbm(rng, h, w, [50, 15], channels=3)
        _blots(rng, img, density=0.006, radius=(1.5, 5.0))
        for _ in range(int(1 + w * h / 6000)):
            sw, sh = int(rng.uniform(0.1, 0.3) * w) + 2, int(rng.uniform(0.08, 0.25) * h) + 2
            x0, y0 = int(rng.integers(0, max(1, w - sw))), int(rng.integers(0, max(1, h - sh)))
            img[y0 : y0 + sh, x0 : x0 + sw] = poster()(rng, min(sw, w - x0), min(sh, h - y0))
        return _finish(img)

    return fn


def composite(
    base: TextureFn, decals: Sequence[tuple[TextureFn, float, float, float, float]], tpm: float = 100.0
) -> TextureFn:
    """A base texture with rectangular decals pasted on it.

    ``decals``: ``(texture, u0_m, v0_m, width_m, height_m)`` in surface metres (clipped).
    """

    def fn(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
        img = base(rng, w, h)
        for tex, u0, v0, dw, dh in decals:
            x0, y0 = int(round(u0 * tpm)), int(round(v0 * tpm))
            x1, y1 = min(w, x0 + int(round(dw * tpm))), min(h, y0 + int(round(dh * tpm)))
            x0, y0 = max(0, x0), max(0, y0)
            if x1 - x0 > 2 and y1 - y0 > 2:
                img[y0:y1, x0:x1] = tex(rng, x1 - x0, y1 - y0)
        return _finish(img, 0.5)

    return fn


# ---------------------------------------------------------------------------- atlas
@dataclass
class AtlasTile:
    """Where one surface's texture lies in the atlas (texel units, without gutter)."""

    x0: int
    y0: int
    width: int
    height: int


class TextureAtlas:
    """All surface textures of a scene packed in one channels-last table.

    Attributes:
        table: ``(Ha * Wa * (L - 1), 6)`` uint8 tensor; row ``(y * Wa + x) * (L - 1) + l``
            holds the RGB of texel ``(x, y)`` at levels ``l`` and ``l + 1`` (0-255).
        width, height: atlas size ``Wa, Ha`` in texels.
        tiles: one :class:`AtlasTile` per texture, in the order given.
        sigmas: the blur (texels) of each level (``LEVEL_SIGMAS``).
    """

    def __init__(self, textures: Sequence[np.ndarray], wrap_x: Sequence[bool], max_width: int = 2048):
        self.sigmas = LEVEL_SIGMAS
        g = _GUTTER
        sizes = [(t.shape[1] + 2 * g, t.shape[0] + 2 * g) for t in textures]
        order = sorted(range(len(textures)), key=lambda i: (-sizes[i][1], -sizes[i][0]))
        width = max(max_width, max(s[0] for s in sizes))
        positions: dict[int, tuple[int, int]] = {}
        x = y = shelf_h = 0
        for i in order:
            sw, sh = sizes[i]
            if x + sw > width:
                x, y, shelf_h = 0, y + shelf_h, 0
            positions[i] = (x, y)
            x += sw
            shelf_h = max(shelf_h, sh)
        height = y + shelf_h
        n_levels = len(self.sigmas)
        # row (texel * (L - 1) + l) holds levels l and l + 1: one gather per bilinear corner
        pairs = np.zeros((height, width, n_levels - 1, 6), np.uint8)
        self.tiles: list[AtlasTile] = []
        for i, tex in enumerate(textures):
            px, py = positions[i]
            th, tw = tex.shape[:2]
            ys, xs = slice(py, py + th + 2 * g), slice(px, px + tw + 2 * g)
            for lvl, sigma in enumerate(self.sigmas):
                level = _blur(tex, sigma, wrap_x[i])
                level = np.pad(level, ((0, 0), (g, g), (0, 0)), mode="wrap" if wrap_x[i] else "edge")
                level = np.pad(level, ((g, g), (0, 0), (0, 0)), mode="edge")
                level8 = np.clip(level * 255.0 + 0.5, 0, 255).astype(np.uint8)
                if lvl < n_levels - 1:
                    pairs[ys, xs, lvl, :3] = level8
                if lvl > 0:
                    pairs[ys, xs, lvl - 1, 3:] = level8
            self.tiles.append(AtlasTile(px + g, py + g, tw, th))
        self.width, self.height = width, height
        self.table = torch.from_numpy(pairs.reshape(height * width * (n_levels - 1), 6))

    @property
    def nbytes(self) -> int:
        """Memory held by the atlas table."""
        return self.table.numel() * self.table.element_size()


def _blur(tex: np.ndarray, sigma: float, wrap_x: bool) -> np.ndarray:
    if sigma <= 0:
        return tex
    h, w = tex.shape[:2]
    if not wrap_x and sigma >= 4.0 and min(h, w) >= 64:
        # wide blur: blur a 1/f down-sampled copy and up-sample it (much faster, same look)
        f = int(sigma // 2)
        small = cv2.resize(tex, (max(1, w // f), max(1, h // f)), interpolation=cv2.INTER_AREA)
        small = cv2.GaussianBlur(small, (0, 0), math.sqrt(max(sigma**2 - (0.5 * f) ** 2, 1.0)) / f,
                                 borderType=cv2.BORDER_REFLECT_101)
        return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)
    if not wrap_x:
        return cv2.GaussianBlur(tex, (0, 0), sigma, borderType=cv2.BORDER_REFLECT_101)
    pad = min(tex.shape[1], int(3 * sigma) + 1)
    padded = np.pad(tex, ((0, 0), (pad, pad), (0, 0)), mode="wrap")
    out = cv2.GaussianBlur(padded, (0, 0), sigma, borderType=cv2.BORDER_REFLECT_101)
    return np.ascontiguousarray(out[:, pad:-pad])
