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

Only the final pose, Hessian and match counts are read back, together with the match
statistics (computed on the device too) and any extra values of the caller: one
synchronisation per frame (:meth:`Tracker._track_device`). On the CPU the host loop is
usually faster (early exits); ``tracking.device_loop`` selects: ``auto`` = this loop on
CUDA only.

Also here, for the CUDA per-frame path of the engine:

* :func:`upload`: host arrays to the device through reused pinned buffers, without the
  stream synchronisation of a pageable copy;
* :class:`StaticGraph` / :func:`graphed_call`: pure fixed-shape functions (depth maps,
  source levels, keyframe levels, fusion, the final statistics) replayed as one CUDA graph
  each; the level solves have their own graphs (:class:`_LevelGraph`), one per level for
  a run (padded sources have a fixed size).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from typing import Sequence

import numpy as np
import torch

__all__ = ["retract_torch", "damped_solve_torch", "solve_levels", "track_device_loop", "track_graphed", "upload",
           "StaticGraph", "graphed_call"]

log = logging.getLogger(__name__)

_CONSTS: dict = {}


def _consts(dtype, device) -> dict:
    """Small constant tensors of the solve and the retraction (made once per device)."""
    key = (dtype, str(device))
    c = _CONSTS.get(key)
    if c is None:
        gen = torch.zeros((3, 3, 3), dtype=dtype)  # K = hat(phi) = gen @ phi
        for (i, j, k_, sgn) in ((0, 1, 2, -1), (0, 2, 1, 1), (1, 0, 2, 1), (1, 2, 0, -1), (2, 0, 1, -1), (2, 1, 0, 1)):
            gen[i, j, k_] = sgn
        c = {"gen": gen.reshape(9, 3).to(device), "eye3": torch.eye(3, dtype=dtype, device=device),
             "bottom": torch.tensor([[0.0, 0.0, 0.0, 1.0]], dtype=dtype, device=device)}
        _CONSTS[key] = c
    return c


def retract_torch(T: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    """Left retraction ``T <- [e^sigma R(phi), rho] T`` on the device (float64).

    Args:
        T: (4, 4) SE(3) / Sim(3) pose; dx: (6,) ``(rho, phi)`` or (7,) ``(rho, phi, sigma)``.

    Returns:
        (4, 4) updated pose (same as :func:`recon_slam.frontend.tracking.retract`), computed
        as ``[[A, rho], [0, 1]] @ T`` with ``A = e^sigma (I + a K + b K^2)`` (~20 kernels).
    """
    c = _consts(T.dtype, T.device)
    phi = dx[3:6]
    K = (c["gen"] @ phi).reshape(3, 3)
    th2 = torch.dot(phi, phi)
    small = th2 < 1e-16
    th2s = torch.where(small, 1.0, th2)
    th = th2s.sqrt()
    a = torch.where(small, 1.0, th.sin() / th)
    b = torch.where(small, 0.5, (1.0 - th.cos()) / th2s)
    A = c["eye3"] + a * K + b * (K @ K)
    if dx.shape[0] == 7:
        A = A * torch.exp(dx[6])
    A4 = torch.cat((torch.cat((A, dx[0:3, None]), dim=1), c["bottom"]), dim=0)
    return A4 @ T


def damped_solve_torch(H: torch.Tensor, g: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """Step ``dx = -(H + lam diag(H) + eps I)^-1 g`` on the device, zero if not solvable.

    Gauss-Jordan elimination without pivoting (the damped system is symmetric positive
    definite when it is solvable at all), unrolled over the d <= 7 rows, three kernels per
    row: no linear-algebra library call, so it can be captured in a CUDA graph.

    Args:
        H: (d, d) float64 (positive semi-definite: a Gauss-Newton matrix); g: (d,)
            float64; lam: () float64 damping.

    Returns:
        (d,) float64 step (zeros when a pivot is not positive or the step is not finite).
    """
    return _damped_solve_aug(torch.cat((H, g[:, None]), dim=1), lam)


def _damped_solve_aug(Hg: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """:func:`damped_solve_torch` of the augmented ``[H | g]`` (d, d + 1)."""
    d = Hg.shape[0]
    c = _consts(Hg.dtype, Hg.device)
    eye = c.get(("eye_aug", d))
    if eye is None:  # (d, d + 1) identity and the masks of the pivot rows (made once)
        eye = c[("eye_aug", d)] = torch.eye(d, d + 1, dtype=Hg.dtype, device=Hg.device)
        c[("rowmask", d)] = (torch.eye(d, dtype=Hg.dtype, device=Hg.device) > 0)[:, :, None]
    rowmask = c[("rowmask", d)]
    diag = torch.diagonal(Hg)
    dmax = diag.max()  # the diagonal of a Gauss-Newton matrix is >= 0
    M = Hg + eye * (diag * lam + dmax.clamp_min(1e-30) * 1e-12)[:, None]
    pivots = []
    for k in range(d):
        row = M[k] / M[k, k]
        pivots.append(M[k, k])
        # eliminate column k from every row, then put the normalised row k in place
        M = torch.where(rowmask[k], row, torch.addr(M, M[:, k], row, alpha=-1.0))
    x = M[:, d]  # H^-1 g
    ok = (torch.minimum(torch.stack(pivots).min(), dmax) > 0) & (x.abs().max() < float("inf"))
    return torch.where(ok, x, 0.0).neg_()


def _iteration(tracker, src, ref, T, best_T, best_Hg, best_cost, n_last, lam):
    """One LM iteration on the device: linearise at ``T``, accept or reject, next ``T``.

    All arguments after ``ref`` are device tensors (see :func:`_level_loop`); returns the
    updated ``(T, best_T, best_Hg, best_cost, n_last, lam)`` (``best_Hg`` = ``[H | g]``).
    """
    dof = tracker.dof
    damping = float(tracker.config.damping)
    lin = tracker.linearise(T.float(), src, ref)
    n_valid = lin["valid"].sum()
    M = lin["M"].double()  # [[H, g], [g^T, cost]]
    cost = M[dof, dof] / n_valid.clamp_min(1)
    usable = (n_valid >= dof * 3) & (cost < float("inf"))  # NaN compares False
    accept = usable & (cost <= best_cost)
    best_T = torch.where(accept, T, best_T)
    best_Hg = torch.where(accept, M[:dof], best_Hg)
    best_cost = torch.where(accept, cost, best_cost)
    n_last = torch.where(accept, n_valid, n_last)
    lam = torch.where(accept, (lam * 0.1).clamp_min_(damping), (lam * 10.0).clamp_max_(1e4))
    dx = _damped_solve_aug(best_Hg, lam)
    T = retract_torch(best_T, dx)
    return T, best_T, best_Hg, best_cost, n_last, lam


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
    best_Hg = torch.zeros((dof, dof + 1), dtype=f64, device=dev)
    n_last = torch.zeros((), dtype=torch.long, device=dev)
    state = (T, best_T, best_Hg, best_cost, n_last, lam)
    for _ in range(n_iter):
        state = step(*state) if step is not None else _iteration(tracker, src, ref, *state)
    _, best_T, best_Hg, best_cost, n_last, _ = state
    return best_T, best_Hg[:, :dof], best_Hg[:, dof], best_cost, n_last


def _n_iter(cfg, li: int) -> int:
    return cfg.iterations[li] if li < len(cfg.iterations) else cfg.iterations[-1]


# ---------------------------------------------------------------------------- uploads
_UPLOADS: dict = {}
_UPLOAD_LOCK = threading.Lock()
_UPLOAD_SLOTS = 4


def upload(a: np.ndarray, device) -> torch.Tensor:
    """Host array -> new tensor on ``device`` without a host synchronisation.

    On CUDA the array is copied into one of a few reused pinned buffers per (shape, dtype)
    and uploaded with a non-blocking copy (a pageable ``.to(device)`` waits for the stream
    to drain); a buffer is reused only once its previous copy has completed (event).
    Elsewhere: ``torch.from_numpy(a).to(device)``.

    Args:
        a: numpy array (any shape); device: target device.

    Returns:
        tensor of the same shape and dtype on ``device`` (it does not alias ``a``'s
        memory on CUDA; on the CPU it may).
    """
    device = torch.device(device)
    a = np.ascontiguousarray(a)
    if device.type != "cuda":
        return torch.from_numpy(a).to(device)
    key = (a.shape, a.dtype.str, str(device))
    with _UPLOAD_LOCK:
        ring = _UPLOADS.get(key)
        if ring is None:
            if len(_UPLOADS) > 64:
                _UPLOADS.clear()
            ring = _UPLOADS[key] = {"slots": [], "next": 0}
        slots = ring["slots"]
        if len(slots) < _UPLOAD_SLOTS:
            slot = [torch.empty(a.shape, dtype=torch.from_numpy(a[:0] if a.ndim else a.reshape(1)[:0]).dtype,
                                pin_memory=True), None]
            slots.append(slot)
        else:
            slot = slots[ring["next"] % _UPLOAD_SLOTS]
        ring["next"] += 1
        if slot[1] is not None:
            slot[1].synchronize()  # its previous upload is done (normally long ago)
        np.copyto(slot[0].numpy(), a)
        out = slot[0].to(device, non_blocking=True)
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(device))
        slot[1] = ev
    return out


# ---------------------------------------------------------------------------- static graphs
class StaticGraph:
    """A pure function of fixed-shape device tensors replayed as one CUDA graph.

    ``fn(*inputs)`` must return a (nested) tuple / list of tensors, use no host
    synchronisation and no host data that changes between calls (the same code runs
    eagerly on any device; tests check that it never syncs). The first call captures
    (after two warm-up runs on a side stream, which also create cached constants); each
    call copies the inputs into static buffers, replays, and returns the static outputs,
    which are overwritten by the next call (copy what must outlive it).
    """

    def __init__(self, fn, inputs: Sequence[torch.Tensor], reuse: Sequence[int] = ()) -> None:
        dev = inputs[0].device
        self.fn = fn
        self.inputs = [t.clone() for t in inputs]
        # inputs never modified in place by their owners (e.g. keyframe levels): their copy
        # is skipped while the same tensor comes again
        self.reuse = set(reuse)
        self.last = [t if i in self.reuse else None for i, t in enumerate(inputs)]
        side = torch.cuda.Stream(device=dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for _ in range(2):
                fn(*self.inputs)
        torch.cuda.current_stream(dev).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: the backend thread may use the GPU meanwhile (its own stream)
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.outputs = fn(*self.inputs)

    def __call__(self, *inputs: torch.Tensor):
        for i, (buf, t) in enumerate(zip(self.inputs, inputs)):
            if i in self.reuse:
                if self.last[i] is t:
                    continue
                self.last[i] = t
            buf.copy_(t)
        self.graph.replay()
        return self.outputs


def _clone_tree(x):
    if isinstance(x, torch.Tensor):
        return x.clone()
    if isinstance(x, (list, tuple)):
        return type(x)(_clone_tree(v) for v in x)
    return x


def graphed_call(cache: dict, key, fn, inputs: Sequence[torch.Tensor], copy_outputs: bool = False,
                 reuse: Sequence[int] = ()):
    """``fn(*inputs)`` through a :class:`StaticGraph` cached in ``cache`` under ``key``.

    Eager (plain call) when the inputs are not on CUDA or a capture failed before (logged
    once; the cache remembers it). The key must name everything ``fn`` depends on besides
    the input tensors (shapes, dtypes, settings, device).

    Args:
        copy_outputs: return copies of the static outputs when graphed (for results that
            outlive the next call).
        reuse: indices of inputs that their owners never modify in place (the copy into
            the graph is skipped while the same tensor object comes again).

    Returns:
        ``fn``'s outputs (static buffers when graphed and not ``copy_outputs``: valid
        until the next call).
    """
    if inputs[0].device.type != "cuda" or cache.get("_failed"):
        return fn(*inputs)
    with _GRAPH_LOCK:  # inputs in, replay, (copies) out: one caller at a time
        return _graphed_call_locked(cache, key, fn, inputs, copy_outputs, reuse)


_GRAPH_LOCK = threading.RLock()


def _graphed_call_locked(cache: dict, key, fn, inputs, copy_outputs: bool, reuse):
    g = cache.get(key)
    if g is None:
        try:  # one graph per key, kept (a handful: the keys name fixed sizes and settings)
            g = cache[key] = StaticGraph(fn, inputs, reuse)
        except Exception as exc:  # capture not supported here: eager from now on
            log.warning("CUDA graph capture failed (%s): running eagerly", exc)
            cache.clear()
            cache["_failed"] = True
            return fn(*inputs)
    out = g(*inputs)
    return _clone_tree(out) if copy_outputs else out


# ---------------------------------------------------------------------------- levels
def solve_levels(tracker, sources: Sequence, references: Sequence, T_init: np.ndarray, graphed: bool = False):
    """Coarse-to-fine LM of ``T_kf_frame`` with every decision on the device, no host read.

    A level without a usable iteration (too few matches, e.g. too few valid points) keeps
    the previous level's normal equations. Shared by the eager device loop (any device)
    and the CUDA-graph loop (``graphed`` on CUDA; one replay per level).

    Args:
        tracker: the :class:`~recon_slam.frontend.tracking.Tracker`.
        sources, references: frame / keyframe levels, coarse to fine.
        T_init: (4, 4) initial ``T_kf_frame`` (numpy).
        graphed: replay each level as a CUDA graph (falls back to eager off CUDA or when a
            capture fails, logged once).

    Returns:
        ``(T (4, 4) f64, H (d, d) f64, cost () f64, n_valid () long, iterations int)``:
        device tensors (H zero and cost inf when no level had a usable iteration).
    """
    cfg = tracker.config
    dev = sources[0].pts.device
    cache = tracker.__dict__.setdefault("_level_graphs", {})
    use_graph = graphed and dev.type == "cuda" and not cache.get("_failed")
    T = upload(np.asarray(T_init, dtype=np.float64).reshape(4, 4), dev)
    H = cost = n_last = None
    iters = 0
    for li, (src, ref) in enumerate(zip(sources, references)):
        n_iter = _n_iter(cfg, li)
        out = None
        if use_graph:
            try:
                out = _graph_for(tracker, cache, li, src, ref, n_iter).run(src, ref, T)
            except Exception as exc:  # capture not supported here: eager device loop from now on
                log.warning("CUDA graph capture of the tracker failed (%s): using the eager device loop", exc)
                cache.clear()
                cache["_failed"] = True
                use_graph = False
        if out is None:
            out = _level_loop(tracker, src, ref, T, n_iter)
        T_l, H_l, _, cost_l, n_l = out
        if H is None:  # graph outputs are static buffers: copy them
            T, H, cost, n_last = T_l.clone(), H_l.clone(), cost_l.clone(), n_l.clone()
        else:
            ok = torch.isfinite(cost_l)
            T = T_l.clone()
            H = torch.where(ok, H_l, H)
            cost = torch.where(ok, cost_l, cost)
            n_last = torch.where(ok, n_l, n_last)
        iters += n_iter
    return T, H, cost, n_last, iters


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
    """:func:`solve_levels` (eager) with its result read back.

    Returns:
        ``(T (4, 4) float64 numpy, H_last (d, d) float64 numpy or None, cost float,
        iterations int, n_valid_last int)``; ``H_last`` is None when no level had enough
        matches (the caller reports a failure).
    """
    T, H, cost, n_last, iters = solve_levels(tracker, sources, references, T_init, graphed=False)
    return _read_back(T_init, T, H, cost, n_last, tracker.dof, iters)


# ---------------------------------------------------------------------------- CUDA graphs
#: compacted (variable-size) source capacities are rounded up to multiples of this; padded
#: sources have a fixed size per level and image size, so one graph per level
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
        self._ref_loaded = None  # the reference tensors now in geo / photo (skip reloading)
        self.T_in = torch.eye(4, dtype=torch.float64, device=dev)
        self.src = dataclasses.replace(src, pts=self.pts, conf=self.conf, intensity=self.inten)
        self.ref = dataclasses.replace(ref, geo=self.geo, photo=self.photo)
        self._load(src, ref)
        self.step = None
        if getattr(tracker.config, "device_compile", False):
            # fuse each iteration's many small element-wise kernels (inductor); the graph
            # then replays a few fused kernels per iteration instead of ~100 small ones
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
        with torch.cuda.stream(side):  # warm-up outside the capture (allocator, kernels, constants)
            for _ in range(2):
                _level_loop(tracker, self.src, self.ref, self.T_in, n_iter, self.step)
        torch.cuda.current_stream(dev).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = _level_loop(tracker, self.src, self.ref, self.T_in, n_iter, self.step)

    def _load(self, src, ref) -> None:
        n = src.capacity
        self.pts[:, :n].copy_(src.pts)
        self.conf[:n].copy_(src.conf)
        if self.inten is not None:
            self.inten[:n].copy_(src.intensity)
        if n < self.capacity:  # padding: far behind the camera, never a valid match
            self.pts[:, n:] = _FAR_Z
            self.conf[n:] = 0.0
            if self.inten is not None:
                self.inten[n:] = 0.0
        # keyframe levels change only when the keyframe's pyramid is rebuilt (new tensors)
        if self._ref_loaded is None or self._ref_loaded[0] is not ref.geo or self._ref_loaded[1] is not ref.photo:
            self.geo.copy_(ref.geo)
            self.photo.copy_(ref.photo)
            self._ref_loaded = (ref.geo, ref.photo)

    def run(self, src, ref, T: torch.Tensor):
        """Replay on new inputs; returns the static output tensors (valid until the next run)."""
        self._load(src, ref)
        self.T_in.copy_(T)
        self.graph.replay()
        return self.out


#: padding value of the static point buffers (same as the padded source levels)
_FAR_Z = -1e6


def _graph_for(tracker, cache: dict, li: int, src, ref, n_iter: int) -> _LevelGraph:
    """The cached graph of level ``li`` for these shapes (captured on first use).

    Padded sources (the CUDA default) have a fixed size per level, so a run captures one
    graph per level and never again; compacted ones are rounded up to
    :data:`_CAPACITY_STEP`.
    """
    n = src.capacity
    cap = n if getattr(src, "padded", False) else -(-n // _CAPACITY_STEP) * _CAPACITY_STEP
    key = (li, cap, tuple(ref.geo.shape), ref.camera, src.intensity is None, n_iter, str(src.pts.device))
    g = cache.get(key)
    if g is None:
        g = cache[key] = _LevelGraph(tracker, src, ref, cap, n_iter)
    return g


def track_graphed(tracker, sources: Sequence, references: Sequence, T_init: np.ndarray):
    """:func:`track_device_loop` with each level's iterations replayed as one CUDA graph.

    Graphs are captured lazily per (level, point capacity, keyframe level shape,
    intrinsics, photometric on/off, iterations) and cached on ``tracker``. Falls back to
    the eager loop when the device is not CUDA or a capture fails (logged once).

    Returns:
        the same tuple as :func:`track_device_loop`.
    """
    T, H, cost, n_last, iters = solve_levels(tracker, sources, references, T_init, graphed=True)
    return _read_back(T_init, T, H, cost, n_last, tracker.dof, iters)
