"""The device (CUDA) code path of RGB-D tracking, run on the CPU.

On CUDA the engine builds fixed-size (padded) source levels, keeps every count on the
device, runs the LM loop and the match statistics there and reads everything back once
per frame; the pure parts (depth maps, levels, fusion, level solves) are replayed as CUDA
graphs. Graph capture needs a GPU, but the captured functions are the eager ones tested
here: same results as the host path, and no host synchronisation inside them.
"""

from __future__ import annotations

import contextlib
import dataclasses

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation
from torch.utils._python_dispatch import TorchDispatchMode

from recon_slam.config import load_config
from recon_slam.frontend.keyframes import _fuse_calibrated, _pixel_rays_chw, fuse_depth
from recon_slam.frontend.matching import unique_count
from recon_slam.frontend.predictors import RgbdPredictor, _depth_to_prediction_torch, depth_maps_torch
from recon_slam.frontend.tracking import (
    Tracker,
    build_pyramid,
    jacobian_components,
    jacobian_row_list,
    project_pixels,
    reference_level,
    source_levels,
    source_levels_graphed,
)
from recon_slam.frontend.tracking_device import solve_levels, upload
from recon_slam.io.frame import Frame
from test_frontend import CAM, _levels_from_render, _sequence, make_frame, make_pose, pose_error, view

#: aten ops that read device memory on the host (a CUDA synchronisation)
_SYNC_OPS = {"_local_scalar_dense", "nonzero", "_unique2", "unique_dim", "_unique", "unique_consecutive",
             "masked_select", "is_nonzero", "equal", "allclose", "item", "repeat_interleave"}


class _SyncCounter(TorchDispatchMode):
    """Counts host synchronisations: sync ops, boolean-mask indexing, ``.cpu()`` / ``.tolist()``."""

    def __init__(self):
        super().__init__()
        self.syncs: list[str] = []
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in _SYNC_OPS:
            self.syncs.append(name)
        if name in ("index", "index_put", "index_put_", "_index_put_impl_") and len(args) > 1:
            if any(isinstance(t, torch.Tensor) and t.dtype in (torch.bool, torch.uint8) for t in (args[1] or [])):
                self.syncs.append("boolean mask " + name)
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def count_syncs():
    """Context giving a :class:`_SyncCounter`; ``.cpu()`` and ``.tolist()`` calls count as reads."""
    counter = _SyncCounter()
    orig = {name: getattr(torch.Tensor, name) for name in ("cpu", "tolist")}

    def wrap(name):
        def f(self, *a, **k):
            counter.reads += 1
            return orig[name](self, *a, **k)
        return f

    for name in orig:
        setattr(torch.Tensor, name, wrap(name))
    try:
        with counter:
            yield counter
    finally:
        for name, fn in orig.items():
            setattr(torch.Tensor, name, fn)


def _frame_maps(T_world_cam, holes: bool = True):
    X, C, I = _levels_from_render(T_world_cam)
    if holes:  # invalid pixels (a hole and a stripe) so that padding matters
        C = C.clone()
        C[40:60, 30:70] = 0.0
        C[:, ::13] = 0.0
    return X, C, I


# ---------------------------------------------------------------------------- levels
@pytest.mark.parametrize("selection", ["grid", "gradient"])
def test_padded_levels_match_compacted(selection):
    X, C, I = _frame_maps(view(0.0))
    factors, budget = [4, 2, 1], [20000, 20000, 6000]
    a = source_levels(X, C, I, CAM, factors, budget, selection=selection, compact=True)
    with count_syncs() as cs:
        b = source_levels(X, C, I, CAM, factors, budget, selection=selection, compact=False, backend="torch")
    assert cs.syncs == [] and cs.reads == 0
    for la, lb in zip(a, b):
        assert lb.padded and not la.padded and la.dense == lb.dense and la.factor == lb.factor
        keep = lb.conf > 0
        assert int(keep.sum()) == lb.n
        if selection == "grid":  # same points in the same order, the rest is padding
            assert (la.n_total, la.n) == (lb.n_total, lb.n)  # reads the device counts
            torch.testing.assert_close(lb.pts[:, keep], la.pts, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(lb.conf[keep], la.conf)
        else:  # the same union of grid and strongest gradients (up to ties in the ranking)
            assert la.n_total == lb.n_total and abs(la.n - lb.n) <= 0.02 * la.n, (la.n, lb.n)
        assert torch.all(lb.pts[2, ~keep] < -1e5)  # padding far behind the camera
    # the padded size depends on the level size only: stable CUDA graph shapes
    X2, C2, I2 = _frame_maps(view(8.0), holes=False)
    c = source_levels(X2, C2, I2, CAM, factors, budget, selection=selection, compact=False, backend="torch")
    assert [lv.capacity for lv in c] == [lv.capacity for lv in b]


def test_graphed_levels_equal_eager_levels_off_cuda():
    X, C, I = _frame_maps(view(0.0))
    cache: dict = {}
    t = load_config(None, {}).tracking
    a = source_levels(X, C, I, CAM, t.pyramid, t.max_points, compact=False, backend="torch")
    b = source_levels_graphed(cache, X.permute(2, 0, 1).contiguous(), C, I, CAM, t.pyramid, t.max_points)
    for la, lb in zip(a, b):
        assert (la.factor, la.camera, la.dense, lb.padded) == (lb.factor, lb.camera, lb.dense, True)
        torch.testing.assert_close(la.pts, lb.pts)
        torch.testing.assert_close(la.intensity, lb.intensity)
        assert torch.equal(la.counts, lb.counts)


def test_reference_level_counts_lazily():
    X, C, I = _frame_maps(view(0.0))
    with count_syncs() as cs:
        refs = [reference_level(lv) for lv in build_pyramid(X, C, I, CAM, [4, 2], backend="torch")]
    assert cs.syncs == []
    assert refs[0].n_valid == int((refs[0].geo[6] > 0).sum())


# ---------------------------------------------------------------------------- solve
def _problem(T_true, **cfg_over):
    cfg = load_config(None, {"tracking.pyramid": [4, 2, 1], "tracking.iterations": [10, 8, 6],
                             "tracking.step_tolerance": 1e-7, "tracking.rel_cost_tolerance": 0.0, **cfg_over})
    T_w_kf = view(0.0)
    Xk, Ck, Ik = _levels_from_render(T_w_kf)
    Xf, Cf, If = _frame_maps(T_w_kf @ T_true)
    refs = [reference_level(lv) for lv in build_pyramid(Xk, Ck, Ik, CAM, cfg.tracking.pyramid, backend="torch")]
    return cfg, refs, (Xf, Cf, If)


@pytest.mark.parametrize("residual", ["pixel_depth", "ray_dist"])
def test_device_loop_on_padded_levels_matches_compacted(residual):
    T_true = make_pose(Rotation.from_rotvec([0.02, -0.03, 0.01]).as_matrix(), [0.03, -0.02, 0.04])
    cfg, refs, (Xf, Cf, If) = _problem(T_true, **{"tracking.residual": residual,
                                                    "tracking.device_loop": "device"})
    t = cfg.tracking
    tracker = Tracker(t)
    compact = source_levels(Xf, Cf, If, CAM, t.pyramid, t.max_points, compact=True)
    padded = source_levels(Xf, Cf, If, CAM, t.pyramid, t.max_points, compact=False, backend="torch")
    a = tracker.track(compact, refs, np.eye(4))
    extra = torch.tensor([7.0, 8.0])
    with count_syncs() as cs:
        b = tracker.track(padded, refs, np.eye(4), extra=extra)
    # the whole solve, the statistics and the extra values: one read, no other sync
    assert cs.syncs == [] and cs.reads == 1
    assert a.success and b.success, (a.reason, b.reason)
    np.testing.assert_allclose(b.extra, [7.0, 8.0])
    dt, dr = pose_error(b.T_kf_frame, T_true)
    assert dt < 2e-3 and dr < 0.1, (dt, dr)
    dt, dr = pose_error(b.T_kf_frame, a.T_kf_frame)
    assert dt < 1e-4 and dr < 0.01, (dt, dr)
    # same statistics up to a few matches (the poses differ by float rounding)
    assert abs(b.n_valid - a.n_valid) <= 1e-3 * a.n_valid
    for name in ("valid_fraction", "unique_fraction", "inlier_fraction"):
        assert abs(getattr(b, name) - getattr(a, name)) < 1e-3, name
    np.testing.assert_allclose(b.information, a.information, rtol=1e-2, atol=1e-3 * np.abs(a.information).max())
    # the host loop on the same (padded) levels agrees too
    host = Tracker(dataclasses.replace(t, device_loop="host")).track(padded, refs, np.eye(4))
    assert host.success
    dt, dr = pose_error(host.T_kf_frame, T_true)
    assert dt < 2e-3 and dr < 0.1, (dt, dr)
    assert abs(host.n_valid - a.n_valid) <= 1e-3 * a.n_valid


def test_solve_levels_keeps_previous_level_without_matches():
    """A level without usable matches keeps the previous level's normal equations."""
    T_true = make_pose(np.eye(3), [0.02, 0.0, 0.01])
    cfg, refs, (Xf, Cf, If) = _problem(T_true, **{"tracking.device_loop": "device"})
    t = cfg.tracking
    tracker = Tracker(t)
    srcs = source_levels(Xf, Cf, If, CAM, t.pyramid, t.max_points, compact=False, backend="torch")
    empty = dataclasses.replace(srcs[-1], conf=torch.zeros_like(srcs[-1].conf),
                                pts=torch.full_like(srcs[-1].pts, -1e6))
    with count_syncs() as cs:
        T2, H2, cost2, n2, _ = solve_levels(tracker, srcs[:2], refs[:2], np.eye(4))
        T3, H3, cost3, n3, _ = solve_levels(tracker, srcs[:2] + [empty], refs, np.eye(4))
    assert cs.syncs == [] and cs.reads == 0
    assert torch.isfinite(cost3) and torch.equal(H3, H2) and int(n3) == int(n2) > 0
    torch.testing.assert_close(T3, T2)


def test_projection_variants_agree():
    """The CUDA (fewer kernels) and CPU (scalar ops) forms of the projection are equal."""
    g = torch.Generator().manual_seed(1)
    q = torch.randn(3, 500, generator=g)
    q[2] = q[2].abs() + 0.05
    iz = q[2].reciprocal()
    k = Tracker(load_config(None, {}).tracking)._camera_consts(CAM, q.dtype, q.device)
    a = project_pixels(q, iz, CAM, k)
    b = project_pixels(q, iz, CAM, None)
    for x, y in zip(a[:2], b[:2]):
        torch.testing.assert_close(x, torch.stack(y))
    assert torch.equal(a[2], b[2]) and torch.equal(a[3], b[3])
    assert 0 < int(a[2].sum()) < 500


@pytest.mark.parametrize("sim3", [False, True])
def test_jacobian_row_variants_agree(sim3):
    """The CUDA (cross-product kernel) and CPU forms of the Jacobian rows are equal."""
    g = torch.Generator().manual_seed(2)
    G, q = torch.randn(3, 3, 200, generator=g), torch.randn(3, 200, generator=g)
    a = torch.stack(jacobian_row_list(G, q, sim3, fused=True))
    b = torch.stack(jacobian_row_list(G, q, sim3, fused=False))
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(b, jacobian_components(G, q, sim3))


def test_match_counts_and_unique_count_need_no_sync():
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 50, (400,), generator=g)
    valid = torch.rand(400, generator=g) > 0.5
    with count_syncs() as cs:
        n = unique_count(idx, valid, 64)
    assert cs.syncs == []
    assert int(n) == len(set(idx[valid].tolist()))


# ---------------------------------------------------------------------------- predict / fuse
def test_depth_maps_need_no_sync_and_match_numpy():
    from recon_slam.frontend.predictors import depth_to_prediction, pixel_rays_chw
    from recon_slam.geometry.camera import PinholeCamera

    rng = np.random.default_rng(1)
    z = rng.uniform(0.8, 1.2, (48, 64)).astype(np.float32)
    z[10:20, 10:30] = 2.5  # discontinuity
    z[30:40, 5:25] = 0.0  # hole: its neighbours are not discontinuities
    z[0, 0], z[1, 1], z[2, 2] = np.nan, np.inf, -1.0
    cam = PinholeCamera(64, 48, 50.0, 51.0, 31.5, 23.0)
    cfg = load_config(None, {"predictor.discontinuity_ratio": 0.1}).predictor
    zc = np.where((z > 0) & (z <= cfg.max_depth), z, np.float32(0.0))
    sigma = cfg.depth_sigma_base + cfg.depth_sigma_quadratic * zc * zc
    a = depth_to_prediction(zc, cam, np.zeros((48, 64, 3), np.uint8), sigma, cfg)
    rays = torch.from_numpy(pixel_rays_chw(cam))
    with count_syncs() as cs:
        X, C, n = depth_maps_torch(torch.from_numpy(z), rays, cfg)
    assert cs.syncs == [] and cs.reads == 0
    assert torch.equal(C > 0, a.C > 0) and int(n) == int((a.C > 0).sum())
    torch.testing.assert_close(C, a.C, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(X, a.X_chw, rtol=1e-6, atol=1e-6)
    # the prediction keeps the count on the device and the image maximum on the host
    b = _depth_to_prediction_torch(z, cam, np.full((48, 64, 3), 9, np.uint8), cfg, torch.device("cpu"), 0, 0.0, {})
    assert isinstance(b.valid_count, torch.Tensor) and b.image_max == 9
    assert b.valid_fraction == a.valid_fraction


def test_fusion_without_count_needs_no_sync():
    X, C, _ = _levels_from_render(view(0.0))
    Xf, Cf, _ = _levels_from_render(view(3.0))
    T = torch.as_tensor(np.linalg.inv(view(0.0)) @ view(3.0), dtype=torch.float32)
    pts = Xf.reshape(-1, 3).T.contiguous()
    conf = Cf.reshape(-1)
    with count_syncs() as cs:
        X2, C2 = _fuse_calibrated(X[..., 2], C, pts, conf, T, CAM, 0.05, 50.0)
    assert cs.syncs == [] and cs.reads == 0
    q = torch.addmm(T[:3, 3:4], T[:3, :3], pts)
    Z, Cr, n = fuse_depth(X[..., 2], C, q, conf, CAM, 0.05, 50.0)
    assert n > 0
    torch.testing.assert_close(C2, Cr)
    torch.testing.assert_close(X2, _pixel_rays_chw(CAM, Z.dtype, Z.device) * Z)


def test_upload_off_cuda():
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    t = upload(a, "cpu")
    assert t.dtype == torch.float32 and torch.equal(t, torch.from_numpy(a))


# ---------------------------------------------------------------------------- engine
class _DevicePathPredictor(RgbdPredictor):
    """The RGB-D predictor's CUDA branch (maps in torch, count kept on the device)."""

    def predict(self, frame, keyframe=None):
        return _depth_to_prediction_torch(frame.depth, self.processing_camera(frame.camera), frame.image,
                                          self.config, self.device, frame.index, frame.stamp, self._graphs)


def test_engine_device_path_one_read_per_frame(monkeypatch):
    """The RGB-D engine on the CUDA code path: one host read per tracked frame, none else."""
    import recon_slam.frontend.keyframes as keyframes
    from recon_slam.system import SlamSystem

    # keyframe pyramids with the torch builder, as on CUDA (OpenCV on the CPU)
    monkeypatch.setattr(keyframes, "build_pyramid",
                        lambda *a, **k: build_pyramid(*a, **{**k, "backend": "torch"}))

    poses = _sequence(24, seed=2)
    frames = [make_frame(i, T) for i, T in enumerate(poses)]
    frames[9] = Frame(9, 0.9, frames[9].image, CAM, depth=np.zeros_like(frames[9].depth))  # no depth
    cfg = load_config({"predictor": {"width": 0}, "backend": {"enabled": False}},
                      {"tracking.device_loop": "device"})
    system = SlamSystem(cfg, CAM, predictor=_DevicePathPredictor(cfg.predictor))
    system._graph_levels = True  # the padded, graph-ready levels of the CUDA path (eager here)
    results, reads, syncs = [], [], []
    try:
        for f in frames:
            with count_syncs() as cs:
                results.append(system.process(f))
            reads.append(cs.reads)
            syncs.append(list(cs.syncs))
        states = [r.state for r in results]
        assert states[9] == "lost" and results[9].reason == "no valid depth", results[9]
        assert states[10] == "relocalised" and all(s == "tracking" for s in states[11:]), states
        assert all(s == "tracking" for s in states[1:9]), states
        tracked = [i for i, s in enumerate(states) if s == "tracking"]
        assert all(syncs[i] == [] for i in tracked), [syncs[i] for i in tracked]
        # one read per frame (a second one only when the solve is retried)
        assert all(1 <= reads[i] <= 2 for i in tracked) and np.mean([reads[i] for i in tracked]) < 1.3, reads
        assert sum(r.is_keyframe for r in results) >= 2
        _, T = system.trajectory()
        for i in (8, 23):
            dt, dr = pose_error(np.linalg.inv(T[0]) @ T[i], np.linalg.inv(poses[0]) @ poses[i])
            assert dt < 0.01 and dr < 0.5, (i, dt, dr)
    finally:
        system.close()
