"""Camera trajectories through a synthetic scene (``T_world_cam`` of the optical frame).

Every trajectory is a smooth path ``s -> (position, yaw, pitch, roll)`` re-sampled so that
consecutive frames are equally far apart in a combined motion cost
``max(translation / 3 cm, rotation / 2 deg)``; the per-frame motion therefore stays
trackable at 30 Hz (at most ~2.6 cm and ~1.7 deg per frame) for any ``n_frames >= 100``.
Longer sequences move more slowly, shorter ones (< 100 frames) are sub-samples of the
100-frame path. Paths keep the camera inside the room, away from the furniture, looking
at surfaces at least ~0.5 m away.

Kinds:
    ``loop``: an ellipse around the middle of the room, looking outwards at the walls
        (a full turn of the gaze when the sequence is long enough, a swaying gaze
        otherwise); the sequence ends one step before its start (same view).
    ``reloc``: a figure-of-eight at a lower height, travelled the other way round with a
        differently swaying gaze: other viewpoints of the same surfaces as ``loop``.
    ``handheld``: a smooth random walk of position and gaze with a small roll and speed
        changes, like a person carrying the camera.

:func:`revisit_trajectory` builds a second pass along a given (mapping) trajectory, a few
centimetres off it with its own gaze deviations: the relocalisation query set.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

from recon_slam.errors import InputError
from recon_slam.geometry.camera import PinholeCamera
from recon_slam.synth.scene import Scene, make_scene

TRAJECTORY_KINDS: tuple[str, ...] = ("loop", "reloc", "handheld")

MAX_STEP_M = 0.03  #: translation per frame that counts as one unit of motion cost
MAX_STEP_DEG = 2.0  #: rotation per frame that counts as one unit of motion cost
_COST_PER_FRAME = 0.85  # design motion cost per frame (<= 1 keeps the limits with margin)
_DESIGN_MIN_FRAMES = 100
_DENSE_PER_FRAME = 24
_CLEARANCE = 0.6  # camera distance to any surface (m)
_NEAR = 0.5  # depth below which a pixel counts as "too near"

PathFn = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]


# ---------------------------------------------------------------------------- poses
def camera_pose(position: np.ndarray, yaw: np.ndarray, pitch: np.ndarray, roll: np.ndarray) -> np.ndarray:
    """Optical-frame poses from position and gaze angles.

    Args:
        position: (N, 3) camera centres (world, z up).
        yaw: (N,) heading of the optical axis in radians (0 = +x, pi/2 = +y).
        pitch: (N,) elevation of the optical axis (radians, positive = up; |pitch| < 90 deg).
        roll: (N,) rotation about the optical axis (radians, positive = clockwise in the image).

    Returns:
        (N, 4, 4) ``T_world_cam`` (x right, y down, z forward; y points down for roll 0).
    """
    position = np.asarray(position, np.float64).reshape(-1, 3)
    yaw, pitch, roll = (np.asarray(a, np.float64).reshape(-1) for a in (yaw, pitch, roll))
    f = np.stack((np.cos(pitch) * np.cos(yaw), np.cos(pitch) * np.sin(yaw), np.sin(pitch)), axis=-1)
    x = np.stack((np.sin(yaw), -np.cos(yaw), np.zeros_like(yaw)), axis=-1)  # f x up, normalised
    y = np.cross(f, x)
    cr, sr = np.cos(roll)[:, None], np.sin(roll)[:, None]
    xr, yr = cr * x + sr * y, -sr * x + cr * y
    T = np.zeros((len(position), 4, 4))
    T[:, :3, 0], T[:, :3, 1], T[:, :3, 2], T[:, :3, 3] = xr, yr, f, position
    T[:, 3, 3] = 1.0
    return T


def step_motion(T_world_cam: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Translation (m) and rotation (deg) between consecutive poses (N, 4, 4) -> two (N-1,)."""
    T = np.asarray(T_world_cam, np.float64)
    dt = np.linalg.norm(np.diff(T[:, :3, 3], axis=0), axis=1)
    dR = np.linalg.norm(T[1:, :3, :3] - T[:-1, :3, :3], axis=(1, 2))  # = 2 sqrt(2) sin(angle / 2)
    return dt, np.degrees(2.0 * np.arcsin(np.clip(dR / (2.0 * math.sqrt(2.0)), 0.0, 1.0)))


def _step_cost(T: np.ndarray) -> np.ndarray:
    dt, dr = step_motion(T)
    return np.maximum(dt / MAX_STEP_M, dr / MAX_STEP_DEG)


def _poses(path: PathFn, s: np.ndarray) -> np.ndarray:
    return camera_pose(*path(s))


def _cumulative_cost(path: PathFn, s_max: float, n_dense: int) -> tuple[np.ndarray, np.ndarray]:
    s = np.linspace(0.0, s_max, n_dense)
    c = np.concatenate([[0.0], np.cumsum(_step_cost(_poses(path, s)))])
    c += np.arange(len(c)) * 1e-9  # strictly increasing for the inverse
    return s, c


def _resample(path: PathFn, s: np.ndarray, c: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Path parameters and poses at the cumulative costs ``targets``."""
    s_at = np.interp(targets, c, s)
    return s_at, _poses(path, s_at)


# ---------------------------------------------------------------------------- checks
def _view_stats(scene: Scene, T: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Fraction of pixels nearer than 0.5 m and median depth for each pose (tiny 70 deg view)."""
    from recon_slam.synth.render import cast_rays_many  # local: render imports scene only

    near, med = [], []
    for start in range(0, len(T), 64):
        d, sid = cast_rays_many(scene, _probe_camera(), T[start : start + 64])
        d = np.where(sid >= 0, d, 0.0).reshape(len(d), -1)
        near.append(np.mean(d < _NEAR, axis=1))
        med.append(np.median(d, axis=1))
    return np.concatenate(near), np.concatenate(med)


def _probe_camera() -> PinholeCamera:
    w, h = 24, 18
    f = (w / 2) / math.tan(math.radians(35.0))
    return PinholeCamera(w, h, f, f, (w - 1) / 2, (h - 1) / 2)


def _views_ok(scene: Scene, T: np.ndarray, every: int = 3) -> bool:
    near, med = _view_stats(scene, T[::every])
    return bool(np.all(near <= 0.1) and np.all(med >= 1.0))


# ---------------------------------------------------------------------------- periodic paths
def _room_frame(scene: Scene):
    lo, hi = scene.bounds
    centre = 0.5 * (lo[:2] + hi[:2])
    size = hi - lo
    return centre, size


def _loop_path(scene: Scene, k: float, turn: bool, p: dict) -> PathFn:
    centre, size = _room_frame(scene)
    a, b = 0.27 * size[0] * k, 0.25 * size[1] * k
    h0 = min(1.45, 0.55 * size[2])

    def path(s):
        th = 2 * np.pi * s + p["phase"]
        z = h0 + 0.08 * np.sin(2 * th + p["p0"])
        pos = np.stack((centre[0] + a * np.cos(th), centre[1] + b * np.sin(th), z), -1)
        if turn:
            yaw = th + p["yaw_off"] + math.radians(20) * np.sin(2 * th + p["p1"])
        else:
            yaw = p["yaw0"] + math.radians(30) * k * np.sin(th + p["p1"])
        pitch = math.radians(-10) + math.radians(8) * np.sin(3 * th + p["p2"])
        roll = math.radians(3) * np.sin(2 * th + p["p3"])
        return pos, yaw, pitch, roll

    return path


def _reloc_path(scene: Scene, k: float, turn: bool, p: dict) -> PathFn:
    centre, size = _room_frame(scene)
    a, b = 0.2 * size[0] * k, 0.14 * size[1] * k
    h0 = min(1.15, 0.45 * size[2])

    def path(s):
        th = -(2 * np.pi * s) + p["phase"]  # the other way round
        z = h0 + 0.1 * np.sin(th + p["p0"])
        pos = np.stack((centre[0] + a * np.sin(th), centre[1] + b * np.sin(2 * th), z), -1)
        if turn:
            yaw = th + p["yaw_off"] + math.radians(25) * np.sin(3 * th + p["p1"])
        else:
            yaw = p["yaw0"] + math.radians(25) * k * np.sin(2 * th + p["p1"])
        pitch = math.radians(-3) + math.radians(9) * np.sin(2 * th + p["p2"])
        roll = math.radians(4) * np.sin(th + p["p3"])
        return pos, yaw, pitch, roll

    return path


def _periodic(scene: Scene, n: int, rng: np.random.Generator, make_path, closed: bool) -> np.ndarray:
    """Largest feasible periodic path (full gaze turn preferred) sampled at n frames."""
    n_design = max(n, _DESIGN_MIN_FRAMES)
    p = {key: float(rng.uniform(0, 2 * np.pi)) for key in ("phase", "p0", "p1", "p2", "p3")}
    p["yaw_off"] = float(rng.uniform(-0.35, 0.35))
    p["yaw0"] = float(rng.choice([0.0, np.pi]) + rng.uniform(-0.3, 0.3))
    budget = _COST_PER_FRAME * n_design
    for turn in (True, False):
        for k in np.arange(1.0, 0.19, -0.05):
            path = make_path(scene, float(k), turn, p)
            s, c = _cumulative_cost(path, 1.0, _DENSE_PER_FRAME * n_design)
            if c[-1] > budget:
                continue
            pos = path(s[::4])[0]
            if scene.distance(pos).min() < _CLEARANCE:
                continue
            # closed: end one step before the start; open: stop short of the start
            targets = c[-1] * (np.arange(n) / n if closed else 0.92 * np.arange(n) / (n - 1))
            _, T = _resample(path, s, c, targets)
            if not _views_ok(scene, T, every=max(1, n // 60)):
                continue
            return T
    raise RuntimeError(f"no feasible trajectory in scene {scene.name!r} (scene layout too cluttered)")


# ---------------------------------------------------------------------------- hand-held
def _handheld(scene: Scene, n: int, rng: np.random.Generator) -> np.ndarray:
    from scipy.interpolate import CubicSpline

    n_design = max(n, _DESIGN_MIN_FRAMES)
    lo, hi = scene.bounds
    z_lo, z_hi = 1.0, min(1.75, hi[2] - 0.8)
    knot_clear = _CLEARANCE + 0.15

    def free(p):
        return scene.distance(p[None])[0] >= knot_clear

    # start: a free point with a good view
    for _ in range(1000):
        p0 = np.array([rng.uniform(lo[0] + 1, hi[0] - 1), rng.uniform(lo[1] + 1, hi[1] - 1), rng.uniform(z_lo, z_hi)])
        if free(p0):
            break
    else:
        raise RuntimeError(f"no free start position in scene {scene.name!r}")
    pos, yaws, pitches, rolls = [p0], [], [], []
    heading = rng.uniform(-np.pi, np.pi)
    yaw = heading

    def pick_gaze(p, yaw_prev):
        best, best_score = None, -np.inf
        cands = [(yaw_prev + rng.normal(0, math.radians(28)), float(np.clip(rng.normal(-0.15, 0.15), -0.6, 0.25)))
                 for _ in range(8)]
        yaw_c, pitch_c = [c[0] for c in cands], [c[1] for c in cands]
        T = camera_pose(np.repeat(p[None], len(cands), 0), yaw_c, pitch_c, np.zeros(len(cands)))
        near, med = _view_stats(scene, T)
        for (y, pt), nf, md in zip(cands, near, med):
            score = -10 * max(0.0, nf - 0.02) + min(md, 2.5) - 0.3 * abs(y - yaw_prev)
            if score > best_score:
                best, best_score = (y, pt), score
        return best

    def add_gaze(p):
        y, pt = pick_gaze(p, yaws[-1] if yaws else yaw)
        yaws.append(y)
        pitches.append(pt)
        rolls.append(float(np.clip(rng.normal(0, math.radians(3)), -0.1, 0.1)))

    add_gaze(p0)
    needed = _COST_PER_FRAME * n_design
    speed = None
    while True:
        # extend the walk by a batch of knots
        for _ in range(max(4, n_design // 40)):
            for attempt in range(40):
                heading_try = heading + rng.normal(0, math.radians(35 + 4 * attempt))
                step = rng.uniform(0.25, 0.5)
                dz = rng.normal(0, 0.08)
                q = pos[-1] + np.array([step * math.cos(heading_try), step * math.sin(heading_try), dz])
                q[2] = np.clip(q[2], z_lo, z_hi)
                if free(q) and free(0.5 * (q + pos[-1])):
                    heading = heading_try
                    break
            else:  # boxed in: head back towards the middle of the room
                mid = np.array([*(0.5 * (lo[:2] + hi[:2])), 0.5 * (z_lo + z_hi)])
                q = pos[-1] + 0.3 * (mid - pos[-1]) / max(np.linalg.norm(mid - pos[-1]), 1e-6)
                heading = math.atan2(q[1] - pos[-1][1], q[0] - pos[-1][0])
            pos.append(q)
            add_gaze(q)
        knots = np.arange(len(pos), dtype=np.float64)
        splines = [CubicSpline(knots, np.asarray(v), bc_type="natural") for v in (pos, yaws, pitches, rolls)]

        def path(s, splines=splines):
            return tuple(sp(s) for sp in splines)

        s_max = float(knots[-1])
        s, c = _cumulative_cost(path, s_max, _DENSE_PER_FRAME * n_design)
        if speed is None:  # smooth speed changes: 45-100 % of the design speed
            t = np.linspace(0, 1, n_design)
            freqs = rng.uniform(1.5, 5.0, 3) * n_design / 300.0
            phases = rng.uniform(0, 2 * np.pi, 3)
            wob = np.mean([np.sin(2 * np.pi * f * t + ph) for f, ph in zip(freqs, phases)], axis=0)
            speed = 0.725 + 0.275 * np.clip(wob * 1.5, -1, 1)
        targets = np.concatenate([[0.0], np.cumsum(_COST_PER_FRAME * speed[:-1])])
        if targets[-1] <= c[-1]:
            break
    if n < n_design:
        targets = np.interp(np.linspace(0, n_design - 1, n), np.arange(n_design), targets)
    _, T = _resample(path, s, c, targets)
    return T


# ---------------------------------------------------------------------------- API
def make_trajectory(kind: str, n_frames: int, scene: Scene | str = "room", seed: int = 0) -> np.ndarray:
    """Camera trajectory through ``scene``.

    Args:
        kind: ``"loop"``, ``"reloc"`` or ``"handheld"`` (see the module docstring).
        n_frames: number of poses (>= 2); motion per frame is trackable at 30 Hz for
            ``n_frames >= 100`` (<= ~2.6 cm and ~1.7 deg per frame).
        scene: a :class:`Scene` or a scene name for :func:`make_scene`.
        seed: random seed (same seed -> identical trajectory).

    Returns:
        (n_frames, 4, 4) float64 ``T_world_cam`` (optical frame in the world frame).
    """
    if kind not in TRAJECTORY_KINDS:
        raise InputError(f"unknown trajectory {kind!r}; choose one of: {', '.join(TRAJECTORY_KINDS)}")
    try:
        n = int(n_frames)
    except (TypeError, ValueError):
        raise InputError(f"n_frames must be an integer, got {n_frames!r}") from None
    if n < 2 or n != n_frames:
        raise InputError(f"n_frames must be an integer >= 2, got {n_frames!r}")
    if isinstance(scene, str):
        scene = make_scene(scene, seed)
    if not isinstance(scene, Scene):
        raise InputError(f"scene must be a Scene or a scene name, got {type(scene).__name__}")
    try:
        seed = int(seed)
    except (TypeError, ValueError):
        raise InputError(f"trajectory seed must be an integer, got {seed!r}") from None
    rng = np.random.default_rng([seed, TRAJECTORY_KINDS.index(kind), 7919])
    if kind == "loop":
        return _periodic(scene, n, rng, _loop_path, closed=True)
    if kind == "reloc":
        return _periodic(scene, n, rng, _reloc_path, closed=False)
    for attempt in range(8):
        T = _handheld(scene, n, rng)
        if scene.distance(T[:, :3, 3]).min() >= _CLEARANCE - 0.1 and _views_ok(scene, T, every=max(1, n // 80)):
            return T
    raise RuntimeError(f"could not generate a hand-held trajectory in scene {scene.name!r}")


# ---------------------------------------------------------------------------- second pass
def revisit_trajectory(
    reference: np.ndarray,
    n_frames: int,
    scene: Scene | str = "room",
    seed: int = 0,
    offset_m: tuple[float, float] = (0.05, 0.2),
    yaw_deg: float = 10.0,
    pitch_deg: float = 6.0,
    roll_deg: float = 4.0,
    closed: bool = True,
) -> np.ndarray:
    """A second pass through the space a reference trajectory covers (relocalisation queries).

    The standard relocalisation setup (e.g. 7-Scenes: separate recordings in the same
    space) maps one trajectory and queries another that revisits the mapped space along
    a different path. This builds such a path from ``reference`` (the mapping
    trajectory): it follows the reference at another phase and sampling (queries fall
    between mapping frames), displaced by a smooth offset perpendicular to the direction
    of travel (sideways and vertical, its length varying between ``offset_m[0]`` and
    ``offset_m[1]``, spiralling around the reference path), with its own smooth heading,
    pitch and roll deviations (up to ``yaw_deg``, ``pitch_deg``, ``roll_deg``). So no
    query coincides with a mapping frame (every query is at least ``offset_m[0]`` off the
    reference path) while the views show surfaces the mapping frames saw.

    Args:
        reference: (N, 4, 4) ``T_world_cam`` of the mapping trajectory (N >= 2).
        n_frames: number of poses (>= 2).
        scene: the scene (or its name), for the clearance check: offsets that would
            bring the camera nearer than 0.45 m to a surface are shortened.
        seed: random seed of the phase and of the deviations.
        offset_m: (smallest, largest) distance to the reference path in metres.
        yaw_deg, pitch_deg, roll_deg: largest gaze deviations from the reference.
        closed: the reference is a closed loop (its last frame one step before the
            first); the second pass then covers one full lap from a random phase.

    Returns:
        (n_frames, 4, 4) float64 ``T_world_cam``.
    """
    from scipy.spatial.transform import Rotation, Slerp

    T_ref = np.asarray(reference, np.float64)
    if T_ref.ndim != 3 or T_ref.shape[1:] != (4, 4) or len(T_ref) < 2:
        raise InputError(f"reference must be (N, 4, 4) poses with N >= 2, got shape {T_ref.shape}")
    n = int(n_frames)
    if n < 2 or n != n_frames:
        raise InputError(f"n_frames must be an integer >= 2, got {n_frames!r}")
    lo, hi = (float(x) for x in offset_m)
    if not 0.0 <= lo <= hi:
        raise InputError(f"offset_m must be (smallest, largest) with 0 <= smallest <= largest, got {offset_m}")
    if isinstance(scene, str):
        scene = make_scene(scene, seed)
    rng = np.random.default_rng([int(seed), 104729, len(T_ref), n])
    N = len(T_ref)
    # reference pose at a fractional frame index (linear position, slerp rotation)
    if closed:
        keys = np.arange(N + 1, dtype=np.float64)
        P = np.concatenate((T_ref[:, :3, 3], T_ref[:1, :3, 3]))
        R = Rotation.from_matrix(np.concatenate((T_ref[:, :3, :3], T_ref[:1, :3, :3])))
        span = float(N)
    else:
        keys = np.arange(N, dtype=np.float64)
        P, R = T_ref[:, :3, 3], Rotation.from_matrix(T_ref[:, :3, :3])
        span = float(N - 1)
    slerp = Slerp(keys, R)
    u = np.arange(n) / n if closed else np.linspace(0.0, 1.0, n)
    phase = rng.uniform(0.0, 1.0) if closed else 0.0
    s = ((phase + u) % 1.0) * span
    if not closed:
        s = np.clip(s, 0.0, span)
    pos = np.stack([np.interp(s, keys, P[:, k]) for k in range(3)], -1)
    rot = slerp(s).as_matrix()
    # direction of travel (finite difference along the reference), horizontal normal
    ds = 0.25
    ahead = np.stack([np.interp(np.clip(s + ds, 0, keys[-1]), keys, P[:, k]) for k in range(3)], -1)
    behind = np.stack([np.interp(np.clip(s - ds, 0, keys[-1]), keys, P[:, k]) for k in range(3)], -1)
    tangent = ahead - behind
    side = np.cross(np.array([0.0, 0.0, 1.0]), tangent)
    side_n = np.linalg.norm(side, axis=1, keepdims=True)
    side = np.where(side_n > 1e-9, side / np.maximum(side_n, 1e-12), np.array([1.0, 0.0, 0.0]))

    def smooth(cycles_lo: float, cycles_hi: float) -> np.ndarray:
        """A smooth zero-mean wave in [-1, 1] along the pass (two random sinusoids)."""
        f = rng.uniform(cycles_lo, cycles_hi, 2)
        ph = rng.uniform(0, 2 * np.pi, 2)
        w = 0.65 * np.sin(2 * np.pi * f[0] * u + ph[0]) + 0.35 * np.sin(2 * np.pi * f[1] * u + ph[1])
        return w / max(np.abs(w).max(), 1e-9)

    radius = lo + (hi - lo) * 0.5 * (1.0 + smooth(2.0, 5.0))
    angle = rng.uniform(0, 2 * np.pi) + 2 * np.pi * rng.uniform(1.5, 3.5) * u * rng.choice([-1.0, 1.0])
    up = np.array([0.0, 0.0, 1.0])
    offset = radius[:, None] * (np.cos(angle)[:, None] * side + np.sin(angle)[:, None] * up)
    # keep clear of surfaces: shorten (then flip) offsets that come too near
    for _ in range(8):
        bad = scene.distance(pos + offset) < 0.45
        if not bad.any():
            break
        offset[bad] *= -0.8
    dyaw = np.radians(yaw_deg) * smooth(3.0, 7.0)
    dpitch = np.radians(pitch_deg) * smooth(2.0, 6.0)
    droll = np.radians(roll_deg) * smooth(2.0, 5.0)
    c, sn = np.cos(dyaw), np.sin(dyaw)
    Rz = np.zeros((n, 3, 3))
    Rz[:, 0, 0], Rz[:, 0, 1], Rz[:, 1, 0], Rz[:, 1, 1], Rz[:, 2, 2] = c, -sn, sn, c, 1.0
    Rloc = Rotation.from_rotvec(np.stack((dpitch, np.zeros(n), droll), -1)).as_matrix()  # about camera x, then z
    T = np.zeros((n, 4, 4))
    T[:, :3, :3] = Rz @ rot @ Rloc
    T[:, :3, 3] = pos + offset
    T[:, 3, 3] = 1.0
    return T
