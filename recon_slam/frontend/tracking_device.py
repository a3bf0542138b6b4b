"""Device-resident Levenberg-Marquardt for :meth:`Tracker.track` (no host round trips).

The host loop of :meth:`~recon_slam.frontend.tracking.Tracker.track` reads the cost, the
match count and the normal equations back to the CPU at every iteration to decide on
acceptance and convergence and solves the 6x6 / 7x7 system in numpy. On a GPU every such
read is a synchronisation that drains the launch queue, so a frame costs ~3 syncs x 14
iterations and the GPU idles while Python decides. This module runs the same algorithm
with every decision taken on the device:

* a fixed number of iterations per level (the configured ``iterations``; no early exit),
* acceptance of a step (cost per valid match not larger than the best) with
  ``torch.where``: a rejected step restores the best pose and multiplies the damping by
  10, an accepted one divides it by 10 (same rule as the host loop),
* the damped normal equations solved in float64 on the device by an unrolled
  Gauss-Jordan elimination (a non-positive pivot gives a zero step instead of an
  exception),
* the pose update by the same left retraction as the host loop, in torch.

Only the final pose, Hessian and match counts are read back (one synchronisation per
frame). On the CPU the host loop is usually faster (early exits); ``tracking.device_loop``
selects: ``auto`` = this loop on CUDA only.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Sequence

import numpy as np
import torch

__all__ = ["retract_torch", "damped_solve_torch", "track_device_loop", "track_graphed"]

log = logging.getLogger(__name__)


def _skew(phi: torch.Tensor) -> torch.Tensor:
    z = torch.zeros_like(phi[0])
    return torch.stack((torch.stack((z, -phi[2], phi[1])),
                        torch.stack((phi[2], z, -phi[0])),
                        torch.stack((-phi[1], phi[0], z))))


def retract_torch(T: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    """Left retraction ``T <- [e^sigma R(phi), rho] T`` on the device (float64).

    Args:
        T: (4, 4) SE(3) / Sim(3) pose; dx: (6,) ``(rho, phi)`` or (7,) ``(rho, phi, sigma)``.

    Returns:
        (4, 4) updated pose (same as :func:`recon_slam.frontend.tracking.retract`).
    """
    phi = dx[3:6]
    th2 = (phi * phi).sum()
    th = th2.sqrt()
    small = th2 < 1e-16
    th_safe = torch.where(small, torch.ones_like(th), th)
    a = torch.where(small, torch.ones_like(th), torch.sin(th_safe) / th_safe)
    b = torch.where(small, torch.full_like(th, 0.5), (1.0 - torch.cos(th_safe)) / (th_safe * th_safe))
    K = _skew(phi)
    A = torch.eye(3, dtype=T.dtype, device=T.device) + a * K + b * (K @ K)
    if dx.shape[0] == 7:
        A = A * torch.exp(dx[6])
    top = torch.cat((A @ T[:3, :3], (A @ T[:3, 3] + dx[:3])[:, None]), dim=1)
    bottom = torch.eye(4, dtype=T.dtype, device=T.device)[3:4]  # no host->device copy (graph safe)
    return torch.cat((top, bottom), dim=0)


def damped_solve_torch(H: torch.Tensor, g: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """Step ``dx = -(H + lam diag(H) + eps I)^-1 g`` on the device, zero if not solvable.

    Gauss-Jordan elimination without pivoting (the damped system is symmetric positive
    definite when it is solvable at all), unrolled over the d <= 7 rows with plain tensor
    ops: no linear-algebra library call, so it can be captured in a CUDA graph.

    Args:
        H: (d, d) float64; g: (d,) float64; lam: () float64 damping.

    Returns:
        (d,) float64 step (zeros when a pivot is not positive or the step is not finite).
    """
    d = H.shape[0]
    diag = torch.diagonal(H)
    eps = 1e-12 * diag.abs().max().clamp_min(1e-30)
    eye = torch.eye(d, dtype=H.dtype, device=H.device)
    M = torch.cat((H + eye * (diag * lam + eps), -g[:, None]), dim=1)  # (d, d + 1)
    ok = diag.max() > 0
    for k in range(d):
        piv = M[k, k]
        good = piv > 0
        ok = ok & good
        row = M[k] / torch.where(good, piv, torch.ones_like(piv))
        M = M - (M[:, k] * (1.0 - eye[k]))[:, None] * row[None, :]
        M = torch.where(eye[k][:, None] > 0, row[None, :], M)
    dx = M[:, d]
    ok = ok & torch.isfinite(dx).all()
    return torch.where(ok, dx, torch.zeros_like(dx))


def _iteration(tracker, src, ref, T, best_T, best_H, best_g, best_cost, n_last, lam):
    """One LM iteration on the device: linearise at ``T``, accept or reject, next ``T``.

    All arguments after ``ref`` are device tensors (see :func:`_level_loop`); returns the
    updated ``(T, best_T, best_H, best_g, best_cost, n_last, lam)``.
    """
    dof = tracker.dof
    damping = float(tracker.config.damping)
    lin = tracker.linearise(T.float(), src, ref)
    n_valid = lin["valid"].sum()
    cost = lin["cost"].double() / n_valid.clamp_min(1).double()
    usable = (n_valid >= dof * 3) & torch.isfinite(cost)
    cost = torch.where(usable, cost, torch.full_like(cost, float("inf")))
    accept = usable & (cost <= best_cost)
    best_T = torch.where(accept, T, best_T)
    best_H = torch.where(accept, lin["H"].double(), best_H)
    best_g = torch.where(accept, lin["g"].double(), best_g)
    best_cost = torch.where(accept, cost, best_cost)
    n_last = torch.where(accept, n_valid, n_last)
    lam = torch.where(accept, (lam * 0.1).clamp_min(damping), (lam * 10.0).clamp_max(1e4))
    dx = damped_solve_torch(best_H, best_g, lam)
    T = retract_torch(best_T, dx)
    return T, best_T, best_H, best_g, best_cost, n_last, lam


def _level_loop(tracker, src, ref, T: torch.Tensor, n_iter: int, step=None):
    """``n_iter`` LM iterations of one level, all on the device, no host reads.

    Args:
        tracker: the Tracker; src, ref: source / reference level; T: (4, 4) float64 start.
        step: optional replacement of :func:`_iteration` bound to (tracker, src, ref), e.g.
            a ``torch.compile``-d one (same signature without those three).

    Returns:
        ``(best_T (4, 4), best_H (d, d), best_g (d,), best_cost (), n_valid ())`` tensors:
        the last accepted linearisation point and its normal equations (cost ``inf`` and
        zero H when no iteration was usable).
    """
    dof = tracker.dof
    dev = T.device
    f64 = torch.float64
    lam = torch.full((), float(tracker.config.damping), dtype=f64, device=dev)
    best_T = T
    best_cost = torch.full((), float("inf"), dtype=f64, device=dev)
    best_H = torch.zeros((dof, dof), dtype=f64, device=dev)
    best_g = torch.zeros(dof, dtype=f64, device=dev)
    n_last = torch.zeros((), dtype=torch.long, device=dev)
    state = (T, best_T, best_H, best_g, best_cost, n_last, lam)
    for _ in range(n_iter):
        state = step(*state) if step is not None else _iteration(tracker, src, ref, *state)
    _, best_T, best_H, best_g, best_cost, n_last, _ = state
    return best_T, best_H, best_g, best_cost, n_last


def _n_iter(cfg, li: int) -> int:
    return cfg.iterations[li] if li < len(cfg.iterations) else cfg.iterations[-1]


def _read_back(T_init, T, H, cost, n_last, dof: int, iters: int):
    """One host read of the final state -> the tuple :func:`track_device_loop` returns."""
    if H is None:
        return np.asarray(T_init, dtype=np.float64), None, float("inf"), iters, 0
    packed = torch.cat((T.reshape(-1), H.reshape(-1), cost.reshape(1).double(), n_last.double().reshape(1)))
    host = packed.cpu().numpy()
    T_np = host[:16].reshape(4, 4).copy()
    H_np = host[16:16 + dof * dof].reshape(dof, dof).copy()
    cost_f = float(host[16 + dof * dof])
    n_valid_last = int(host[-1])
    if not np.isfinite(cost_f) or not np.all(np.isfinite(H_np)) or not np.any(H_np):
        return T_np, None, cost_f, iters, n_valid_last
    return T_np, H_np, cost_f, iters, n_valid_last


def track_device_loop(tracker, sources: Sequence, references: Sequence, T_init: np.ndarray):
    """Coarse-to-fine LM of ``T_kf_frame`` with all decisions on the device.

    Args:
        tracker: the :class:`~recon_slam.frontend.tracking.Tracker` (its ``linearise`` and
            config are used).
        sources, references: frame / keyframe levels, coarse to fine (same as ``track``).
        T_init: (4, 4) initial ``T_kf_frame``.

    Returns:
        ``(T (4, 4) float64 numpy, H_last (d, d) float64 numpy or None, cost float,
        iterations int, n_valid_last int)``; ``H_last`` is None when no level had enough
        points (the caller reports a failure).
    """
    cfg = tracker.config
    dev = sources[0].pts.device
    T = torch.as_tensor(np.asarray(T_init, dtype=np.float64), dtype=torch.float64, device=dev)
    H = cost = n_last = None
    iters = 0
    for li, (src, ref) in enumerate(zip(sources, references)):
        if src.n < 10 or ref.n_valid < 10:
            continue
        n_iter = _n_iter(cfg, li)
        T, H, _, cost, n_last = _level_loop(tracker, src, ref, T, n_iter)
        iters += n_iter
    return _read_back(T_init, T, H, cost, n_last, tracker.dof, iters)


# ---------------------------------------------------------------------------- CUDA graphs
#: padded source capacities are multiples of this (few distinct graphs per level)
_CAPACITY_STEP = 2048


class _LevelGraph:
    """One captured level solve with static input buffers (CUDA only)."""

    def __init__(self, tracker, src, ref, capacity: int, n_iter: int) -> None:
        dev = src.pts.device
        self.capacity = capacity
        self.pts = torch.zeros((3, capacity), dtype=src.pts.dtype, device=dev)
        self.conf = torch.zeros(capacity, dtype=src.conf.dtype, device=dev)
        self.inten = None if src.intensity is None else torch.zeros(capacity, dtype=src.intensity.dtype, device=dev)
        self.geo = torch.zeros_like(ref.geo)
        self.photo = torch.zeros_like(ref.photo)
        self.T_in = torch.eye(4, dtype=torch.float64, device=dev)
        self.src = dataclasses.replace(src, pts=self.pts, conf=self.conf, intensity=self.inten)
        self.ref = dataclasses.replace(ref, geo=self.geo, photo=self.photo)
        self._load(src, ref)
        self.step = None
        if getattr(tracker.config, "device_compile", False):
            # fuse each iteration's many small element-wise kernels (inductor); the graph
            # then replays a few fused kernels per iteration instead of ~150 tiny ones
            s_src, s_ref = self.src, self.ref

            def body(*state):
                return _iteration(tracker, s_src, s_ref, *state)

            try:
                self.step = torch.compile(body, dynamic=False)
                _level_loop(tracker, self.src, self.ref, self.T_in, 1, self.step)
            except Exception as exc:  # no triton / compiler: plain kernels
                log.warning("torch.compile of the tracker iteration failed (%s): capturing plain kernels", exc)
                self.step = None
        side = torch.cuda.Stream(device=dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):  # warm-up outside the capture (allocator, kernels)
            for _ in range(2):
                _level_loop(tracker, self.src, self.ref, self.T_in, n_iter, self.step)
        torch.cuda.current_stream(dev).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = _level_loop(tracker, self.src, self.ref, self.T_in, n_iter, self.step)

    def _load(self, src, ref) -> None:
        n = src.n
        self.pts[:, :n].copy_(src.pts)
        self.pts[:, n:] = 0.0
        self.pts[2, n:] = -1e6  # padding: far behind the camera, never a valid match
        self.conf[:n].copy_(src.conf)
        self.conf[n:] = 0.0
        if self.inten is not None:
            self.inten[:n].copy_(src.intensity)
            self.inten[n:] = 0.0
        self.geo.copy_(ref.geo)
        self.photo.copy_(ref.photo)

    def run(self, src, ref, T: torch.Tensor):
        """Replay on new inputs; returns the static output tensors (valid until the next run)."""
        self._load(src, ref)
        self.T_in.copy_(T)
        self.graph.replay()
        return self.out


def track_graphed(tracker, sources: Sequence, references: Sequence, T_init: np.ndarray):
    """:func:`track_device_loop` with each level's iterations replayed as one CUDA graph.

    Graphs are captured lazily per (level, padded point capacity, keyframe level shape,
    intrinsics, photometric on/off, iterations) and cached on ``tracker``; sources are
    padded with points that can never match. Falls back to :func:`track_device_loop` when
    the device is not CUDA or a capture fails (logged once).

    Returns:
        the same tuple as :func:`track_device_loop`.
    """
    dev = sources[0].pts.device
    cache = tracker.__dict__.setdefault("_level_graphs", {})
    if dev.type != "cuda" or cache.get("_failed"):
        return track_device_loop(tracker, sources, references, T_init)
    cfg = tracker.config
    T = torch.as_tensor(np.asarray(T_init, dtype=np.float64), dtype=torch.float64, device=dev)
    H = cost = n_last = None
    iters = 0
    try:
        for li, (src, ref) in enumerate(zip(sources, references)):
            if src.n < 10 or ref.n_valid < 10:
                continue
            n_iter = _n_iter(cfg, li)
            cap = -(-src.n // _CAPACITY_STEP) * _CAPACITY_STEP
            key = (li, cap, tuple(ref.geo.shape), ref.camera, src.intensity is None, n_iter, str(dev))
            g = cache.get(key)
            if g is None:
                g = cache[key] = _LevelGraph(tracker, src, ref, cap, n_iter)
            T, H, _, cost, n_last = g.run(src, ref, T)
            T = T.clone()  # the next level's input buffer is another graph's
            iters += n_iter
    except Exception as exc:  # capture not supported here: eager device loop from now on
        log.warning("CUDA graph capture of the tracker failed (%s): using the eager device loop", exc)
        cache.clear()
        cache["_failed"] = True
        return track_device_loop(tracker, sources, references, T_init)
    return _read_back(T_init, T, H, cost, n_last, tracker.dof, iters)
