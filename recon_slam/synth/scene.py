"""Synthetic indoor scenes made of primitives with analytic ray intersection.

World frame: z up, origin at the centre of the room's floor, metres. A :class:`Scene` is
a room (an axis-aligned box seen from inside: floor, ceiling and four walls) furnished with
boxes (rotatable about the vertical axis) and vertical cylinders. Every planar face and
every cylinder side is one *surface* with its own id and its own procedural texture laid
on the surface's 2D coordinates, so the texture sticks to the geometry.

Scenes are deterministic functions of ``(name, seed)``: the layout is fixed per name and
the seed draws every texture (colours, posters, planks, books...).
"""

from __future__ import annotations

import functools
import math
import zlib
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from recon_slam.errors import InputError
from recon_slam.synth import textures as tx

SCENE_NAMES: tuple[str, ...] = ("room", "room_b")

_UP = np.array([0.0, 0.0, 1.0])


# ---------------------------------------------------------------------------- surfaces
@dataclass
class Surface:
    """One textured surface.

    Attributes:
        name: ``"<object>/<face>"`` (room faces are ``floor``, ``ceiling``, ``wall_x-`` ...).
        kind: ``"plane"`` or ``"cylinder"`` (the side of a vertical cylinder).
        size_u, size_v: extent of the surface coordinates in metres.
        origin, axis_u, axis_v: planar mapping ``u = (p - origin) . axis_u`` (world, metres).
        normal: (3,) world unit normal pointing to where the surface is seen from (planes).
        center, radius: cylinder axis (x, y) and radius; ``u = radius * angle``,
            ``v = z_top - z``.
        z_top: top of the cylinder side.
        texture: generator of the surface's texture.
        tpm: texels per metre of the texture.
    """

    name: str
    kind: str
    size_u: float
    size_v: float
    texture: tx.TextureFn
    tpm: float = 100.0
    origin: np.ndarray = field(default_factory=lambda: np.zeros(3))
    axis_u: np.ndarray = field(default_factory=lambda: np.zeros(3))
    axis_v: np.ndarray = field(default_factory=lambda: np.zeros(3))
    normal: np.ndarray = field(default_factory=lambda: np.zeros(3))
    center: np.ndarray = field(default_factory=lambda: np.zeros(2))
    radius: float = 0.0
    z_top: float = 0.0


def _rect_face(name, center, normal, half_u, half_v, axis_u, axis_v, texture, tpm) -> Surface:
    """Planar rectangle centred at ``center`` whose texture origin is the (-u, -v) corner."""
    center, axis_u, axis_v = (np.asarray(a, dtype=np.float64) for a in (center, axis_u, axis_v))
    origin = center - half_u * axis_u - half_v * axis_v
    return Surface(
        name, "plane", 2 * half_u, 2 * half_v, texture, tpm, origin, axis_u, axis_v, np.asarray(normal, np.float64)
    )


def _face_axes(normal: np.ndarray, ex: np.ndarray, ey: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Texture axes of a face: vertical faces read like a poster seen from the front
    (u to the viewer's right, v down); horizontal faces use the object's x and y."""
    if abs(normal[2]) > 0.5:
        return ex, ey * np.sign(normal[2])
    axis_v = -_UP
    axis_u = np.cross(-normal, _UP)
    return axis_u, axis_v


# ---------------------------------------------------------------------------- primitives
class Primitive:
    """A solid with analytic ray intersection; its surfaces get consecutive ids."""

    name: str
    surfaces: list[Surface]

    def intersect(self, o: Sequence[float], dx: torch.Tensor, dy: torch.Tensor, dz: torch.Tensor):
        """Rays ``o + t * d`` -> ``(t, face)``.

        Args:
            o: ray origin: three floats (one origin) or three tensors broadcastable with
                the directions (one origin per ray).
            dx, dy, dz: (h, w) float32 tensors, ray direction components (world).

        Returns:
            t: (h, w) ray parameters of the nearest hit in front (``inf`` on a miss).
            face: (h, w) int64 indices into :attr:`surfaces`.
        """
        raise NotImplementedError

    def corners(self) -> np.ndarray:
        """(8, 3) world corners of a bounding box (used for screen-space culling)."""
        raise NotImplementedError

    def sdf(self, points: np.ndarray) -> np.ndarray:
        """Signed distance (N,) in metres of world points (N, 3) (negative inside)."""
        raise NotImplementedError


class RoomBox(Primitive):
    """The room: an axis-aligned box seen from inside.

    Faces (surface order): ``wall_x-, wall_x+, wall_y-, wall_y+, floor, ceiling``.
    """

    FACE_NAMES = ("wall_x-", "wall_x+", "wall_y-", "wall_y+", "floor", "ceiling")

    def __init__(self, lo, hi, textures: dict[str, tx.TextureFn], tpm: dict[str, float] | None = None):
        self.name = "room"
        self.lo = np.asarray(lo, np.float64)
        self.hi = np.asarray(hi, np.float64)
        tpm = tpm or {}
        c = 0.5 * (self.lo + self.hi)
        half = 0.5 * (self.hi - self.lo)
        ex, ey = np.eye(3)[0], np.eye(3)[1]
        self.surfaces = []
        for axis in range(3):
            for side in (0, 1):
                name = self.FACE_NAMES[2 * axis + side]
                normal = np.zeros(3)
                normal[axis] = 1.0 if side == 0 else -1.0  # inward
                fc = c.copy()
                fc[axis] = self.lo[axis] if side == 0 else self.hi[axis]
                au, av = _face_axes(normal, ex, ey)
                hu = float(np.abs(au) @ half)
                hv = float(np.abs(av) @ half)
                self.surfaces.append(_rect_face(name, fc, normal, hu, hv, au, av, textures[name], tpm.get(name, 100.0)))

    def intersect(self, o, dx, dy, dz):
        ts = []
        for k, d in enumerate((dx, dy, dz)):
            inv = torch.reciprocal(d)
            lo, hi = _f(float(self.lo[k]) - o[k]), _f(float(self.hi[k]) - o[k])
            ts.append(torch.maximum(inv * lo, inv * hi))
        t = torch.minimum(torch.minimum(ts[0], ts[1]), ts[2])
        return t, _face_index(t, ts, (dx, dy, dz))

    def corners(self):
        return _box_corners(0.5 * (self.lo + self.hi), 0.5 * (self.hi - self.lo), 0.0)


    def sdf(self, points):
        p = np.asarray(points, np.float64)
        return np.minimum(p - self.lo, self.hi - p).min(axis=-1)

    def contains(self, points: np.ndarray) -> np.ndarray:
        """(N,) bool: points strictly inside the room."""
        return self.sdf(points) > 0


class Box(Primitive):
    """A solid box ``size = (sx, sy, sz)`` centred at ``center``, rotated by ``yaw`` (rad)
    about the vertical axis. Faces (surface order): ``+x, -x, +y, -y, +z, -z`` (local)."""

    FACE_NAMES = ("+x", "-x", "+y", "-y", "+z", "-z")

    def __init__(self, name, center, size, yaw=0.0, textures=None, tpm: float = 100.0):
        self.name = name
        self.center = np.asarray(center, np.float64)
        self.half = 0.5 * np.asarray(size, np.float64)
        self.yaw = float(yaw)
        c, s = math.cos(self.yaw), math.sin(self.yaw)
        self.R = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])  # world_from_local
        textures = textures or {}
        default = textures.get("*", tx.plain((0.5, 0.5, 0.5)))
        ex, ey, ez = self.R[:, 0], self.R[:, 1], self.R[:, 2]
        self.surfaces = []
        for k, fname in enumerate(self.FACE_NAMES):
            axis, sign = k // 2, (1.0 if k % 2 == 0 else -1.0)
            normal = self.R[:, axis] * sign
            fc = self.center + normal * self.half[axis]
            au, av = _face_axes(normal, ex, ey)
            hu = float(np.abs(self.R.T @ au) @ self.half)
            hv = float(np.abs(self.R.T @ av) @ self.half)
            tex = textures.get(fname, default)
            face_tpm = tpm
            if tex is None:  # never seen (against the floor or a wall)
                tex, face_tpm = tx.plain((0.3, 0.3, 0.3)), 4.0 / max(2 * hu, 2 * hv, 1e-3)
            self.surfaces.append(_rect_face(f"{name}/{fname}", fc, normal, hu, hv, au, av, tex, face_tpm))

    def intersect(self, o, dx, dy, dz):
        rx, ry, rz = (_f(o[k] - float(self.center[k])) for k in range(3))
        if self.yaw == 0.0:
            dl, ol = (dx, dy, dz), (rx, ry, rz)
        else:
            c, s = math.cos(self.yaw), math.sin(self.yaw)
            dl = (dx * c + dy * s, dy * c - dx * s, dz)
            ol = (rx * c + ry * s, ry * c - rx * s, rz)
        tn_list, tf_list = [], []
        for k in range(3):
            inv = torch.reciprocal(dl[k])
            ta = inv * (-float(self.half[k]) - ol[k])
            tb = inv * (float(self.half[k]) - ol[k])
            tn_list.append(torch.minimum(ta, tb))
            tf_list.append(torch.maximum(ta, tb))
        tnear = torch.maximum(torch.maximum(tn_list[0], tn_list[1]), tn_list[2])
        tfar = torch.minimum(torch.minimum(tf_list[0], tf_list[1]), tf_list[2])
        face = _face_index(tnear, tn_list, dl)
        miss = (tnear > tfar) | (tnear <= 1e-6)
        return tnear.masked_fill_(miss, math.inf), face

    def corners(self):
        return _box_corners(self.center, self.half, self.yaw)


    def sdf(self, points):
        p = (np.asarray(points, np.float64) - self.center) @ self.R
        q = np.abs(p) - self.half
        return np.linalg.norm(np.maximum(q, 0.0), axis=-1) + np.minimum(q.max(axis=-1), 0.0)


class Cylinder(Primitive):
    """A solid vertical cylinder (axis through ``(x, y)``, ``z0 <= z <= z1``).

    Faces (surface order): ``side, top, bottom``.
    """

    FACE_NAMES = ("side", "top", "bottom")

    def __init__(self, name, xy, radius, z0, z1, textures=None, tpm: float = 100.0):
        self.name = name
        self.xy = np.asarray(xy, np.float64)
        self.radius = float(radius)
        self.z0, self.z1 = float(z0), float(z1)
        textures = textures or {}
        default = textures.get("*", tx.plain((0.5, 0.5, 0.5)))
        circ = 2 * math.pi * self.radius
        side = Surface(f"{name}/side", "cylinder", circ, self.z1 - self.z0, textures.get("side", default), tpm)
        side.center, side.radius, side.z_top = self.xy.copy(), self.radius, self.z1
        ex, ey = np.eye(3)[0], np.eye(3)[1]
        r = self.radius
        top = _rect_face(f"{name}/top", [*self.xy, self.z1], [0, 0, 1], r, r, ex, ey, textures.get("top", default), tpm)
        bottom_tex = textures.get("bottom")
        bottom = _rect_face(
            f"{name}/bottom", [*self.xy, self.z0], [0, 0, -1], r, r, ex, -ey,
            bottom_tex if bottom_tex is not None else tx.plain((0.3, 0.3, 0.3)),
            tpm if bottom_tex is not None else 4.0 / (2 * r),
        )
        self.surfaces = [side, top, bottom]

    def intersect(self, o, dx, dy, dz):
        ox, oy, oz = _f(o[0] - float(self.xy[0])), _f(o[1] - float(self.xy[1])), _f(o[2])
        a = dx * dx + dy * dy
        b = dx * ox + dy * oy
        c = ox * ox + oy * oy - self.radius**2
        disc = b * b - a * c
        t_side = (-b - torch.sqrt(torch.clamp(disc, min=0.0))) / a
        z = oz + t_side * dz
        ok = (disc >= 0) & (t_side > 1e-6) & (z >= self.z0) & (z <= self.z1)
        inf = torch.full_like(dx, math.inf)
        t = torch.where(ok, t_side, inf)
        face = torch.zeros_like(dx, dtype=torch.long)
        for k, zc, cond in ((1, self.z1, oz > self.z1), (2, self.z0, oz < self.z0)):
            if isinstance(cond, bool) and not cond:
                continue  # the camera cannot see this cap
            tc = (zc - oz) / dz
            xc, yc = ox + tc * dx, oy + tc * dy
            okc = (tc > 1e-6) & (xc * xc + yc * yc <= self.radius**2) & (tc < t) & cond
            t = torch.where(okc, tc, t)
            face = torch.where(okc, torch.full_like(face, k), face)
        return t, face

    def corners(self):
        return _box_corners(
            np.array([*self.xy, 0.5 * (self.z0 + self.z1)]),
            np.array([self.radius, self.radius, 0.5 * (self.z1 - self.z0)]),
            0.0,
        )

    def sdf(self, points):
        p = np.asarray(points, np.float64)
        dr = np.linalg.norm(p[..., :2] - self.xy, axis=-1) - self.radius
        dz = np.abs(p[..., 2] - 0.5 * (self.z0 + self.z1)) - 0.5 * (self.z1 - self.z0)
        q = np.stack((dr, dz), axis=-1)
        return np.linalg.norm(np.maximum(q, 0.0), axis=-1) + np.minimum(q.max(axis=-1), 0.0)


def _face_index(t, per_axis, d) -> torch.Tensor:
    """Face ``2 * axis + (d[axis] > 0)`` of slab hits, ``axis`` being the one whose
    per-axis ray parameter equals ``t`` (element-wise, no reductions)."""
    face = (d[0] > 0).long()
    face = torch.where(t == per_axis[1], (d[1] > 0).long().add_(2), face)
    return torch.where(t == per_axis[2], (d[2] > 0).long().add_(4), face)


def _f(x):
    """Python float of a NumPy scalar; tensors pass through (per-ray origins)."""
    return x if isinstance(x, torch.Tensor) else float(x)


def _box_corners(center, half, yaw) -> np.ndarray:
    c, s = math.cos(yaw), math.sin(yaw)
    R = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    signs = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)], np.float64)
    return center + (signs * half) @ R.T


# ---------------------------------------------------------------------------- scene
class Scene:
    """A furnished room with per-surface textures, ready for :func:`recon_slam.synth.render`.

    Attributes:
        name, seed: what :func:`make_scene` was called with.
        room: the :class:`RoomBox` (``room.lo``, ``room.hi``: (3,) world bounds).
        objects: furniture primitives (:class:`Box`, :class:`Cylinder`).
        surfaces: every surface; ``surface id`` = index in this list (room faces first).
        atlas: the :class:`~recon_slam.synth.textures.TextureAtlas` of all textures.
        light_dir: (3,) unit direction *towards* the directional light (world).
        light_pos: (3,) position of the point light (world).

    Scenes are shared through a cache: treat them as read-only.
    """

    def __init__(self, name: str, seed: int, room: RoomBox, objects: Sequence[Primitive], light_pos=None):
        self.name = name
        self.seed = int(seed)
        self.room = room
        self.objects = list(objects)
        self.primitives: list[Primitive] = [room, *self.objects]
        self.surfaces: list[Surface] = []
        self.surface_base: list[int] = []
        for prim in self.primitives:
            self.surface_base.append(len(self.surfaces))
            self.surfaces.extend(prim.surfaces)
        self._index = {s.name: i for i, s in enumerate(self.surfaces)}
        #: (P, 8, 3) bounding-box corners of the furniture, for screen-space culling
        self.object_corners = np.stack([o.corners() for o in self.objects]) if self.objects else np.zeros((0, 8, 3))
        self.light_dir = np.array([0.35, -0.25, 0.9]) / np.linalg.norm([0.35, -0.25, 0.9])
        self.light_pos = (
            np.asarray(light_pos, np.float64) if light_pos is not None
            else np.array([0.4, 0.3, room.hi[2] - 0.25])
        )
        self._build_textures()

    # ------------------------------------------------------------------ textures
    def _build_textures(self) -> None:
        base = np.random.SeedSequence([self.seed, zlib.crc32(self.name.encode())])
        rngs = [np.random.default_rng(s) for s in base.spawn(len(self.surfaces))]
        images, wrap = [], []
        for rng, surf in zip(rngs, self.surfaces):
            w = max(2, int(math.ceil(surf.size_u * surf.tpm)))
            h = max(2, int(math.ceil(surf.size_v * surf.tpm)))
            img = np.ascontiguousarray(surf.texture(rng, w, h), dtype=np.float32)
            if img.shape != (h, w, 3):
                raise RuntimeError(f"texture of {surf.name} has shape {img.shape}, expected {(h, w, 3)}")
            images.append(img)
            wrap.append(surf.kind == "cylinder")
        self.atlas = tx.TextureAtlas(images, wrap)
        S = len(self.surfaces)
        # planar surfaces: atlas coordinate X = M[:, 0, :3] . p + M[:, 0, 3] (same for Y)
        M = np.zeros((S, 2, 4))
        normals = np.zeros((S, 3))
        tpm = np.zeros(S)
        cyl = np.zeros((S, 6))  # cx, cy, r, z_top, su (texels/m along u), sv
        is_cyl = np.zeros(S, bool)
        for i, (surf, tile) in enumerate(zip(self.surfaces, self.atlas.tiles)):
            su, sv = tile.width / surf.size_u, tile.height / surf.size_v
            tpm[i] = math.sqrt(su * sv)
            if surf.kind == "plane":
                M[i, 0, :3], M[i, 0, 3] = su * surf.axis_u, tile.x0 - su * surf.axis_u @ surf.origin
                M[i, 1, :3], M[i, 1, 3] = sv * surf.axis_v, tile.y0 - sv * surf.axis_v @ surf.origin
                normals[i] = surf.normal
            else:
                is_cyl[i] = True
                cyl[i] = (*surf.center, surf.radius, surf.z_top, su, sv)
                M[i, 0, 3], M[i, 1, 3] = tile.x0, tile.y0
        # one row per surface: uv map (8), normal (3), texels per metre, is-cylinder flag
        table = np.concatenate([M.reshape(S, 8), normals, tpm[:, None], is_cyl[:, None]], axis=1)
        self.surface_table = torch.from_numpy(table.astype(np.float32))
        self.cyl_table = torch.from_numpy(cyl.astype(np.float32))
        self.cylinder_ids = [int(i) for i in np.flatnonzero(is_cyl)]

    # ------------------------------------------------------------------ queries
    @property
    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Room interior ``(lo, hi)``, each (3,) world metres."""
        return self.room.lo.copy(), self.room.hi.copy()

    @property
    def surface_names(self) -> list[str]:
        """Names of all surfaces; index = surface id."""
        return [s.name for s in self.surfaces]

    def surface_id(self, name: str) -> int:
        """Id of the surface called ``name`` (e.g. ``"floor"``, ``"wall_x+"``, ``"table_top/+z"``)."""
        try:
            return self._index[name]
        except KeyError:
            raise InputError(f"scene {self.name!r} has no surface {name!r}; known: {', '.join(self._index)}") from None

    def object_distance(self, points: np.ndarray) -> np.ndarray:
        """Distance (N,) from world points (N, 3) to the nearest furniture (negative inside)."""
        p = np.asarray(points, np.float64).reshape(-1, 3)
        if not self.objects:
            return np.full(len(p), np.inf)
        return np.min([o.sdf(p) for o in self.objects], axis=0)

    def distance(self, points: np.ndarray) -> np.ndarray:
        """Clearance (N,) of world points (N, 3): distance to the nearest surface of the
        scene, walls included; negative inside furniture or outside the room."""
        p = np.asarray(points, np.float64).reshape(-1, 3)
        return np.minimum(self.room.sdf(p), self.object_distance(p))

    def __repr__(self) -> str:
        lo, hi = self.bounds
        return (
            f"Scene({self.name!r}, seed={self.seed}, room={tuple(np.round(hi - lo, 2))} m, "
            f"{len(self.objects)} objects, {len(self.surfaces)} surfaces)"
        )


# ---------------------------------------------------------------------------- layouts
def _pal(*cols) -> np.ndarray:
    return np.asarray(cols, np.float32)


def _jitter(rng: np.random.Generator, colour, amount=0.08) -> np.ndarray:
    return np.clip(np.asarray(colour, np.float32) + rng.uniform(-amount, amount, 3).astype(np.float32), 0.02, 0.98)


def _wall_decals(rng, width, height, n, avoid=(), size=((0.5, 1.1), (0.45, 0.9)), kinds=None):
    """Non-overlapping decals (posters/whiteboards) on a wall ``width x height`` (metres,
    ``v`` measured down from the top), avoiding the ``u`` intervals in ``avoid``."""
    decals, boxes = [], []
    kinds = kinds or [tx.poster()]
    for _ in range(200):
        if len(decals) >= n:
            break
        dw, dh = rng.uniform(*size[0]), rng.uniform(*size[1])
        u0 = rng.uniform(0.15, width - dw - 0.15)
        v0 = rng.uniform(0.5, max(0.55, min(1.3, height - dh - 0.6)))
        box = (u0 - 0.15, v0 - 0.15, u0 + dw + 0.15, v0 + dh + 0.15)
        if any(u0 < b and u0 + dw > a for a, b in avoid):
            continue
        if any(not (box[2] < o[0] or box[0] > o[2] or box[3] < o[1] or box[1] > o[3]) for o in boxes):
            continue
        boxes.append(box)
        decals.append((kinds[len(decals) % len(kinds)], u0, v0, dw, dh))
    return decals


def _layout_room(rng: np.random.Generator):
    """'room': 6 x 5 x 3 m living room/office with wooden floor."""
    W, D, H = 6.0, 5.0, 3.0
    lo, hi = np.array([-W / 2, -D / 2, 0.0]), np.array([W / 2, D / 2, H])
    wood_pal = _pal([0.55, 0.36, 0.2], [0.66, 0.46, 0.27], [0.47, 0.3, 0.16], [0.72, 0.55, 0.35])
    light_wood = _pal([0.78, 0.62, 0.42], [0.7, 0.52, 0.33], [0.85, 0.7, 0.5])
    dark_wood = _pal([0.35, 0.22, 0.12], [0.45, 0.3, 0.18], [0.28, 0.17, 0.1])
    brick_pal = _pal([0.62, 0.27, 0.18], [0.7, 0.35, 0.22], [0.52, 0.24, 0.17], [0.75, 0.45, 0.3], [0.45, 0.2, 0.15])
    wall_paint = _jitter(rng, [0.78, 0.8, 0.82], 0.05)
    warm_paint = _jitter(rng, [0.86, 0.8, 0.7], 0.05)
    ceiling_paint = _jitter(rng, [0.9, 0.9, 0.88], 0.03)
    panel = tx.plain((0.98, 0.98, 0.95))
    textures = {
        "floor": tx.planks(wood_pal),
        "ceiling": tx.composite(
            tx.paint(ceiling_paint, 0.02),
            [(panel, u, v, 1.2, 0.6) for u in (1.2, 3.6) for v in (0.8, 3.4)],
            tpm=60.0,
        ),
        "wall_x-": tx.grid_pattern(brick_pal, 23.0, 8.0, 1.3, (0.72, 0.7, 0.66), running_bond=True),
        # wall_x+ (u runs from y=+2.5 to y=-2.5): bookshelf at u in [0.7, 2.5]
        "wall_x+": tx.composite(
            tx.paint(wall_paint),
            _wall_decals(rng, D, H, 4, avoid=[(0.5, 2.7)], kinds=[tx.poster(), tx.whiteboard(), tx.poster()],
                         size=((0.45, 0.9), (0.4, 0.8))),
        ),
        # wall_y- (u from x=-3 to x=+3): a rich mural band low on the wall, posters above
        "wall_y-": tx.composite(
            tx.paint(_jitter(rng, [0.72, 0.82, 0.74], 0.05)),
            [(tx.mural(), 0.0, 1.9, W, 1.1)] + _wall_decals(rng, W, 1.7, 2, size=((0.5, 0.9), (0.4, 0.6))),
        ),
        # wall_y+ (u from x=+3 to x=-3): mostly plain, weakly textured paint, one picture
        "wall_y+": tx.composite(
            tx.paint(warm_paint),
            [(tx.poster(), rng.uniform(3.7, 4.3), 0.7, 1.1, 0.75), (tx.poster(), rng.uniform(0.3, 0.6), 0.9, 0.6, 0.8),
             (tx.poster(), rng.uniform(1.6, 1.8), 0.8, 0.4, 0.4), (tx.mural(), 2.3, 0.6, 1.1, 0.85)],
        ),
    }
    room = RoomBox(lo, hi, textures, tpm={"ceiling": 60.0})
    grey = tx.plain((0.3, 0.3, 0.3))
    objs: list[Primitive] = []
    # bookshelf against wall x+
    objs.append(Box("bookshelf", [2.78, 0.9, 1.0], [0.44, 1.7, 2.0], 0.0,
                    {"*": tx.wood(dark_wood), "-x": tx.books(dark_wood), "+x": None, "-z": None}))
    # table with four legs and things on it
    tc, tsz, top_z = np.array([1.45, -1.35]), np.array([1.3, 0.8]), 0.75
    objs.append(Box("table_top", [*tc, top_z - 0.025], [*tsz, 0.05], 0.0,
                    {"*": tx.wood(light_wood), "-z": tx.wood(light_wood)}))
    for k, (sx, sy) in enumerate([(-1, -1), (-1, 1), (1, -1), (1, 1)]):
        xy = tc + np.array([sx, sy]) * (tsz / 2 - 0.06)
        objs.append(Box(f"table_leg{k}", [*xy, (top_z - 0.05) / 2], [0.05, 0.05, top_z - 0.05], 0.0,
                        {"*": tx.painted_metal((0.2, 0.2, 0.22)), "-z": None, "+z": None}, tpm=150.0))
    objs.append(Box("parcel", [1.25, -1.25, top_z + 0.08], [0.34, 0.24, 0.16], math.radians(25),
                    {"*": tx.cardboard(), "-z": None}, tpm=150.0))
    objs.append(Cylinder("vase", [1.82, -1.5], 0.07, top_z, top_z + 0.24,
                         {"*": tx.fabric((0.2, 0.45, 0.7)), "top": tx.plain((0.1, 0.1, 0.12))}, tpm=150.0))
    # cabinet against wall y- with a box on top
    objs.append(Box("cabinet", [-1.0, -2.24, 0.45], [1.1, 0.5, 0.9], 0.0,
                    {"*": tx.painted_metal(_jitter(rng, (0.3, 0.45, 0.6), 0.06)), "-y": None, "-z": None}))
    objs.append(Box("cabinet_box", [-1.15, -2.22, 0.9 + 0.15], [0.46, 0.36, 0.3], math.radians(12),
                    {"*": tx.cardboard(), "-z": None}))
    # stacked boxes in a corner
    objs.append(Box("crate_low", [-2.45, 1.9, 0.225], [0.62, 0.5, 0.45], math.radians(20),
                    {"*": tx.cardboard(), "-z": None}))
    objs.append(Box("crate_high", [-2.42, 1.88, 0.45 + 0.175], [0.45, 0.4, 0.35], math.radians(-8),
                    {"*": tx.cardboard((0.7, 0.55, 0.38)), "-z": None}))
    # sofa against wall y+
    sofa = tx.fabric(_jitter(rng, (0.55, 0.2, 0.18), 0.08))
    objs.append(Box("sofa_seat", [0.3, 2.07, 0.21], [1.9, 0.72, 0.42], 0.0, {"*": sofa, "-z": None}))
    objs.append(Box("sofa_back", [0.3, 2.37, 0.45], [1.9, 0.2, 0.9], 0.0, {"*": sofa, "-z": None, "+y": None}))
    # a rotated wooden crate and a few cylinders
    objs.append(Box("chest", [-1.75, 1.45, 0.25], [0.5, 0.5, 0.5], math.radians(35),
                    {"*": tx.grid_pattern(light_wood, 50.0, 12.0, 1.2, (0.3, 0.2, 0.12), running_bond=False),
                     "-z": None}))
    objs.append(Cylinder("bin", [-2.62, -2.1], 0.18, 0.0, 0.5, {"*": tx.painted_metal((0.75, 0.72, 0.2)),
                                                                 "top": tx.plain((0.12, 0.12, 0.12))}))
    objs.append(Cylinder("pillar", [2.55, 2.1], 0.12, 0.0, 1.7, {"*": tx.mural(), "top": tx.plain((0.9, 0.85, 0.6))}))
    objs.append(Cylinder("plant_pot", [-2.6, -0.3], 0.22, 0.0, 0.45, {"side": tx.grid_pattern(
        _pal([0.7, 0.35, 0.2], [0.6, 0.3, 0.18]), 12.0, 9.0, 0.8, (0.5, 0.25, 0.15), running_bond=True),
        "top": tx.terrazzo((0.35, 0.25, 0.15), _pal([0.2, 0.5, 0.2], [0.25, 0.6, 0.2], [0.15, 0.4, 0.12]), 30.0)}))
    return room, objs


def _layout_room_b(rng: np.random.Generator):
    """'room_b': 7 x 4.4 x 2.7 m office with a tiled floor (different layout and textures)."""
    W, D, H = 7.0, 4.4, 2.7
    lo, hi = np.array([-W / 2, -D / 2, 0.0]), np.array([W / 2, D / 2, H])
    tile_pal = _pal([0.78, 0.76, 0.72], [0.7, 0.68, 0.64], [0.85, 0.83, 0.8], [0.6, 0.58, 0.55])
    pine = _pal([0.82, 0.66, 0.42], [0.75, 0.58, 0.36], [0.88, 0.74, 0.5])
    walnut = _pal([0.3, 0.18, 0.1], [0.4, 0.26, 0.15], [0.24, 0.14, 0.08])
    white_brick = _pal([0.9, 0.88, 0.85], [0.82, 0.8, 0.78], [0.94, 0.92, 0.9])
    panel = tx.plain((0.97, 0.97, 0.97))
    textures = {
        "floor": tx.grid_pattern(tile_pal, 45.0, 45.0, 0.9, (0.35, 0.34, 0.33), running_bond=False, veins=0.35),
        "ceiling": tx.composite(
            tx.paint(_jitter(rng, (0.88, 0.88, 0.9), 0.03), 0.02),
            [(panel, 0.6 + 1.5 * i, 1.0 + 1.6 * j, 0.9, 0.9) for i in range(4) for j in range(2)], tpm=60.0,
        ),
        # wall_x- (u from y=-2.2 to +2.2): colourful mural over the whole wall
        "wall_x-": tx.mural(tx.random_palette(rng, 6, sat=(0.5, 1.0))),
        # wall_x+ (u from y=+2.2 to -2.2): tall cabinet in the middle, wood panelling lower half
        "wall_x+": tx.composite(
            tx.paint(_jitter(rng, (0.62, 0.7, 0.78), 0.05)),
            [(tx.wood(pine, along_u=False), 0.0, 1.6, D, 1.1)]
            + _wall_decals(rng, D, 1.5, 2, avoid=[(1.4, 3.0)], size=((0.4, 0.8), (0.35, 0.6))),
        ),
        # wall_y- (u from x=-3.5 to +3.5): weakly textured green paint, a whiteboard and posters
        "wall_y-": tx.composite(
            tx.paint(_jitter(rng, (0.6, 0.74, 0.6), 0.05)),
            [(tx.grid_pattern(tx.random_palette(rng, 5, sat=(0.2, 0.6), val=(0.5, 0.9)), 15.0, 15.0, 0.8,
                              (0.85, 0.85, 0.82), running_bond=False), 0.0, 1.8, W, 0.9)]
            + _wall_decals(rng, W, 1.75, 5, kinds=[tx.whiteboard(), tx.poster(), tx.poster()],
                           size=((0.5, 1.3), (0.45, 0.9))),
        ),
        # wall_y+ (u from x=+3.5 to -3.5): painted bricks
        "wall_y+": tx.grid_pattern(white_brick, 25.0, 7.5, 1.1, (0.62, 0.6, 0.58), running_bond=True),
    }
    room = RoomBox(lo, hi, textures, tpm={"ceiling": 60.0})
    objs: list[Primitive] = []
    # long desk against wall y+ with two monitors and a printer
    objs.append(Box("desk", [-0.4, 1.83, 0.375], [3.0, 0.72, 0.75], 0.0,
                    {"*": tx.wood(walnut), "+z": tx.wood(pine), "+y": None, "-z": None}))
    for k, x in enumerate((-1.2, -0.2)):
        objs.append(Box(f"monitor{k}", [x, 1.95, 0.75 + 0.28], [0.6, 0.05, 0.36], math.radians(4 * (k - 0.5)),
                        {"*": tx.plain((0.1, 0.1, 0.11)), "-y": tx.poster((0.05, 0.05, 0.05)), "-z": None}, tpm=150.0))
    objs.append(Box("printer", [0.8, 1.85, 0.75 + 0.12], [0.45, 0.4, 0.24], math.radians(-10),
                    {"*": tx.painted_metal((0.85, 0.85, 0.82)), "-z": None}, tpm=150.0))
    # tall cabinet against wall x+
    objs.append(Box("tall_cabinet", [3.22, 0.0, 0.95], [0.56, 1.4, 1.9], 0.0,
                    {"*": tx.painted_metal(_jitter(rng, (0.55, 0.55, 0.58), 0.05)),
                     "-x": tx.composite(tx.grid_pattern(_pal([0.5, 0.52, 0.56], [0.45, 0.47, 0.5]), 70.0, 38.0, 1.5,
                                                        (0.15, 0.15, 0.17), running_bond=False),
                                        _wall_decals(rng, 1.4, 1.9, 3, size=((0.2, 0.4), (0.15, 0.3)))),
                     "+x": None, "-z": None}))
    # armchair (rotated) near wall x-
    chair = tx.fabric(_jitter(rng, (0.2, 0.35, 0.55), 0.08))
    yaw = math.radians(-30)
    c, s = math.cos(yaw), math.sin(yaw)
    base = np.array([-2.75, -1.35])
    objs.append(Box("armchair_seat", [*base, 0.22], [0.8, 0.8, 0.44], yaw, {"*": chair, "-z": None}))
    back = base + np.array([-0.32 * c, -0.32 * s])
    objs.append(Box("armchair_back", [*back, 0.45], [0.16, 0.8, 0.9], yaw, {"*": chair, "-z": None}))
    # crates stacked in a corner
    crate = tx.grid_pattern(pine, 60.0, 14.0, 1.5, (0.25, 0.17, 0.1), running_bond=False)
    objs.append(Box("crate_a", [2.9, -1.7, 0.25], [0.55, 0.55, 0.5], math.radians(10), {"*": crate, "-z": None}))
    box_tex = {"*": tx.cardboard(), "-z": None}
    objs.append(Box("crate_b", [2.3, -1.8, 0.2], [0.45, 0.45, 0.4], math.radians(-25), box_tex))
    objs.append(Box("crate_c", [2.88, -1.66, 0.5 + 0.2], [0.45, 0.4, 0.4], math.radians(40), box_tex))
    # round side table, a barrel, a column, and a low bench
    objs.append(Cylinder("round_table", [-2.6, 1.2], 0.4, 0.0, 0.7, {"side": tx.wood(walnut), "top": tx.terrazzo(
        (0.85, 0.83, 0.78), tx.random_palette(rng, 4), 8.0)}))
    objs.append(Cylinder("barrel", [1.9, -1.85], 0.26, 0.0, 0.85, {"side": tx.grid_pattern(
        walnut, 16.0, 85.0, 1.2, (0.15, 0.1, 0.06), running_bond=False), "top": tx.wood(pine)}))
    objs.append(Cylinder("column", [-3.2, -2.0], 0.15, 0.0, H - 0.001, {"*": tx.paint((0.8, 0.78, 0.74), 0.05)}))
    objs.append(Box("bench", [-0.6, -1.95, 0.22], [1.6, 0.4, 0.44], math.radians(2),
                    {"*": tx.wood(pine), "-z": None}))
    return room, objs


_LAYOUTS = {"room": _layout_room, "room_b": _layout_room_b}


@functools.lru_cache(maxsize=4)
def _cached_scene(name: str, seed: int) -> Scene:
    rng = np.random.default_rng([seed, zlib.crc32(name.encode()), 1])
    room, objs = _LAYOUTS[name](rng)
    return Scene(name, seed, room, objs)


def make_scene(name: str = "room", seed: int = 0) -> Scene:
    """Build (or fetch from a small cache) the scene ``name`` with textures drawn from ``seed``.

    Args:
        name: ``"room"`` (6 x 5 x 3 m, default) or ``"room_b"`` (a different room:
            7 x 4.4 x 2.7 m, other layout and textures).
        seed: any non-negative integer; same seed -> identical scene.

    Returns:
        The :class:`Scene` (world frame: z up, origin at the floor centre). Shared
        between callers: do not modify it.
    """
    if name not in _LAYOUTS:
        raise InputError(f"unknown synthetic scene {name!r}; choose one of: {', '.join(SCENE_NAMES)}")
    try:
        seed = int(seed)
    except (TypeError, ValueError):
        raise InputError(f"scene seed must be an integer, got {seed!r}") from None
    if seed < 0:
        raise InputError(f"scene seed must be >= 0, got {seed}")
    return _cached_scene(name, seed)
