"""The device-resident monocular tracking step (``mono.device_loop``) solves like the host path.

It is the step used on CUDA (replayed as a CUDA graph); here it runs eagerly on the CPU with
``mono.device_loop='device'``.
"""

import math

import numpy as np
import pytest
import torch

from recon_slam.config import ConfigError, load_config
from recon_slam.frontend import mono, mono_device as md
from recon_slam.frontend.oracle import OraclePredictor
from recon_slam.frontend.tracking import retract, solve_normal_equations
from recon_slam.geometry import lie
from recon_slam.synth import SyntheticSequence

W, H = 128, 96
LAP = 300


@pytest.fixture(scope="module")
def seq():
    return SyntheticSequence(scene="room", trajectory="loop", frames=LAP, width=W, height=H, seed=0)


def _cfg(**kw):
    over = {"device": "cpu", "mode": "mono", "predictor.width": W, "mono.refine_radius": 1,
            "mono.refine_dilations": [2, 1], "backend.enabled": False}
    over.update({k.replace("__", "."): v for k, v in kw.items()})
    return load_config(None, over)


def _scale(T):
    return float(np.cbrt(np.linalg.det(T[:3, :3])))


# ------------------------------------------------------------------------------ small algebra
def test_sim3_retract_and_damped_solve_match_numpy():
    rng = np.random.default_rng(3)
    Ts, dxs = [], []
    for i in range(4):
        Ts.append(lie.sim3_exp(torch.tensor(rng.normal(size=7) * 0.5)).numpy())
        dx = rng.normal(size=7) * 0.1
        if i == 0:
            dx[3:6] = 1e-10  # small-angle branch
        dxs.append(dx)
    got = md.sim3_retract(torch.from_numpy(np.stack(Ts)), torch.from_numpy(np.stack(dxs))).numpy()
    for T, dx, g in zip(Ts, dxs, got):
        np.testing.assert_allclose(g, retract(T, dx), atol=1e-12)
    Hs, gs = [], []
    for _ in range(3):
        A = rng.normal(size=(7, 7))
        Hs.append(A @ A.T + 0.1 * np.eye(7))
        gs.append(rng.normal(size=7))
    lam = np.array([1e-6, 1e-3, 10.0])
    dx, ok = md.damped_solve7(torch.from_numpy(np.stack(Hs)), torch.from_numpy(np.stack(gs)), torch.from_numpy(lam))
    assert bool(ok.all())
    for i in range(3):
        np.testing.assert_allclose(dx[i].numpy(), solve_normal_equations(Hs[i], gs[i], lam[i]), rtol=1e-9, atol=1e-12)
    # an indefinite system (Cholesky fails on the host) gives ok=False and a zero step
    Hbad = np.diag([1.0, 1.0, -1.0, 1.0, 1.0, 1.0, 1.0])
    assert solve_normal_equations(Hbad, gs[0], 1e-6) is None
    lam1 = torch.tensor([1e-6], dtype=torch.float64)
    dx, ok = md.damped_solve7(torch.from_numpy(Hbad)[None], torch.from_numpy(gs[0])[None], lam1)
    assert not bool(ok[0]) and bool((dx == 0).all())


def test_umeyama_torch_matches_the_svd_solution():
    rng = np.random.default_rng(0)
    for planar in (False, True):
        x = torch.from_numpy(rng.uniform(-1, 1, (3, 400)))
        x[2] += 3.0
        if planar:
            x[2] = 3.0
        T = lie.sim3_exp(torch.tensor(rng.normal(size=7) * np.r_[1, 1, 1, 1, 1, 1, 0.3]))
        y = T[:3, :3] @ x + T[:3, 3:] + 0.01 * torch.from_numpy(rng.normal(size=(3, 400)))
        w = torch.from_numpy(rng.uniform(0, 1, 400))
        w[:60] = 0.0
        np.testing.assert_allclose(md.umeyama_torch(x, y, w).numpy(), mono.sim3_umeyama(x, y, w), atol=1e-9)


@pytest.mark.parametrize("calibrated", [False, True])
def test_solve_sim3_chains_matches_host_solve(calibrated):
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(3, 500, generator=gen) * torch.tensor([[2.0], [1.5], [1.0]]) - torch.tensor([[1.0], [0.75], [-1.5]])
    T_true = lie.sim3_exp(torch.tensor([0.1, -0.05, 0.08, 0.03, -0.06, 0.04, math.log(1.7)], dtype=torch.float64))
    y = T_true[:3, :3].float() @ x + T_true[:3, 3:4].float() + 0.002 * torch.randn(3, 500, generator=gen)
    w = torch.rand(500, generator=gen) + 0.5
    cam = SyntheticSequence(frames=2, width=W, height=H).camera if calibrated else None
    c = _cfg().mono
    T0 = np.eye(4)
    T0[:3, :3] *= 1.3
    # float64: both solves then agree to rounding (float32 sums in another order differ by ~1e-6)
    x, y, w = x.double(), y.double(), w.double()
    ref = mono.solve_sim3(x, y, w, T0, c, camera=cam)
    sig = (c.sigma_pixel, c.sigma_pixel, c.sigma_depth) if calibrated else (c.sigma_ray,) * 3 + (c.sigma_dist,)
    out = md.solve_sim3_chains(x, y, w, torch.from_numpy(T0)[None], sig, c.huber_k, c.max_iterations, c.tolerance, cam)
    assert ref.success and bool(out["success"][0])
    np.testing.assert_allclose(out["T"][0].numpy(), ref.T, atol=1e-9)
    assert int(out["iterations"][0]) == ref.iterations and int(out["n"][0]) == ref.n_valid
    assert abs(float(out["inlier"][0]) - ref.inlier_fraction) < 1e-3
    np.testing.assert_allclose(float(out["cost"][0]), ref.cost, rtol=1e-4)
    np.testing.assert_allclose(out["H"][0].numpy(), ref.information, rtol=1e-4,
                               atol=1e-6 * np.abs(ref.information).max())
    # too few matches: failure with the initial pose, like the host
    w0 = torch.zeros(500)
    w0[:10] = 1.0
    few = md.solve_sim3_chains(x, y, w0, torch.from_numpy(T0)[None], sig, c.huber_k, 8, c.tolerance, cam)
    assert not bool(few["success"][0]) and int(few["reason"][0]) == 1 and int(few["n"][0]) == 10
    np.testing.assert_allclose(few["T"][0].numpy(), T0)


# ------------------------------------------------------------------------------ the step vs the host path
def _system(cfg, seq, seed=2):
    from recon_slam.system import SlamSystem

    oracle = OraclePredictor(cfg.predictor, seed=seed)
    system = SlamSystem(cfg, seq.camera, predictor=oracle, backend=False)
    system.process(seq[0])
    return system, oracle


def _compare(a, ma, b, mb, tol=1e-5):
    assert a.success == b.success
    assert a.valid_fraction == b.valid_fraction and a.unique_fraction == b.unique_fraction and a.n_valid == b.n_valid
    assert torch.equal(ma.dst_idx, mb.dst_idx) and torch.equal(ma.valid, mb.valid)
    torch.testing.assert_close(ma.uv, mb.uv)
    s = _scale(a.T_kf_frame)
    np.testing.assert_allclose(b.T_kf_frame[:3, :3] / s, a.T_kf_frame[:3, :3] / s, atol=tol)
    t = a.T_kf_frame[:3, 3]
    np.testing.assert_allclose(b.T_kf_frame[:3, 3], t, atol=tol * np.linalg.norm(t) + 1e-7)
    assert abs(b.inlier_fraction - a.inlier_fraction) < 2e-3 and b.iterations == a.iterations
    np.testing.assert_allclose(b.cost, a.cost, rtol=1e-4)
    np.testing.assert_allclose(b.information, a.information, rtol=1e-3, atol=1e-5 * np.abs(a.information).max())


@pytest.mark.parametrize("calibrated", [False, True])
@pytest.mark.parametrize("full_refinement", [False, True])
def test_device_step_gives_the_host_pose(seq, calibrated, full_refinement):
    over = {"mono__calibrated": calibrated}
    if full_refinement:
        over.update({"mono__refine_radius": 3, "mono__refine_dilations": [5, 4, 3, 2, 1]})
    system, oracle = _system(_cfg(**over), seq)
    fe = system._mono
    kf = system.keyframe_map.get(0)
    for i in (4, 12):
        p = oracle.predict(seq[i], kf)
        for T_init in (np.eye(4), None):  # prior pose (+ Umeyama fallback chain), Umeyama only
            fe.mono.device_loop = "host"
            fe.reset()
            a, ma = fe.track(p, kf, T_init)
            fe.mono.device_loop = "device"
            fe.reset()
            b, mb = fe.track(p, kf, T_init)
            assert a.success and a.valid_fraction > 0.4
            _compare(a, ma, b, mb)
            assert torch.equal(fe._uv_cache[kf.id], mb.uv)  # cached for the next frame
    system.close()


def test_device_step_retries_a_stale_cached_initialisation_like_the_host(seq):
    system, oracle = _system(_cfg(), seq)
    fe = system._mono
    kf = system.keyframe_map.get(0)
    p = oracle.predict(seq[8], kf)
    n = fe._sample_idx(H, W, "cpu").numel()
    out = {}
    for mode in ("host", "device"):
        fe.mono.device_loop = mode
        fe.reset()
        fe._uv_cache[kf.id] = torch.zeros(n, 2)  # every point starts in the corner: too few valid matches
        out[mode] = fe.track(p, kf, np.eye(4))
        assert out[mode][0].success and out[mode][0].valid_fraction > 0.4
    _compare(*out["host"], *out["device"])
    # a required fraction nobody reaches: the same failure
    for mode in ("host", "device"):
        fe.mono.device_loop = mode
        fe.reset()
        tr, _ = fe.track(p, kf, np.eye(4), min_fraction=0.99)
        assert not tr.success and "below 0.99" in tr.reason and np.allclose(tr.T_kf_frame, np.eye(4))
    system.close()


def test_graph_mode_runs_the_eager_step_off_cuda(seq):
    system, oracle = _system(_cfg(mono__device_loop="graph"), seq)
    fe = system._mono
    kf = system.keyframe_map.get(0)
    p = oracle.predict(seq[8], kf)
    assert fe.device_loop("cpu") == "graph"
    b, mb = fe.track(p, kf, np.eye(4))
    assert fe._step_graphs == {}  # nothing captured off CUDA
    fe.mono.device_loop = "host"
    fe.reset()
    a, ma = fe.track(p, kf, np.eye(4))
    _compare(a, ma, b, mb)
    fe.mono.device_loop = "auto"
    assert fe.device_loop("cpu") == "host" and fe.device_loop("cuda") == "graph"  # measured faster on CUDA
    system.close()


class _Counter(torch.overrides.TorchFunctionMode):
    """Host reads by Python API while active (``cpu``, ``item``, ``int`` / ``float`` / ``bool``)."""

    READS = ("cpu", "item", "tolist", "__int__", "__float__", "__bool__", "__index__")

    def __init__(self):
        super().__init__()
        self.reads = []
        self.paused = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if not self.paused and name in self.READS:
            self.reads.append(name)
        return func(*args, **(kwargs or {}))


class _SyncOps(torch.utils._python_dispatch.TorchDispatchMode):
    """aten ops that synchronise with a GPU (data-dependent shapes, scalar reads)."""

    SYNC = ("nonzero", "_unique2", "unique_dim", "masked_select", "_local_scalar_dense", "unique_consecutive")

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in self.SYNC:
            self.ops.append(name)
        return func(*args, **(kwargs or {}))


def test_tracked_frame_reads_the_device_once(seq):
    """A tracked frame (not a keyframe) costs one host read with the device step, many on the host path."""
    counts = {}
    for mode in ("host", "device"):
        system, oracle = _system(_cfg(mono__device_loop=mode), seq)
        for i in (2, 4):
            system.process(seq[i])  # warm-up: constants and caches
        f = seq[6]
        counter = _Counter()
        predict = oracle.predict

        def quiet_predict(*a, **k):  # the oracle's own work is not the engine's
            counter.paused += 1
            try:
                return predict(*a, **k)
            finally:
                counter.paused -= 1

        oracle.predict = quiet_predict
        sync = _SyncOps()
        with counter, sync:
            res = system.process(f)
        assert res.state == "tracking" and not res.is_keyframe
        counts[mode] = (counter.reads, sync.ops)
        system.close()
    reads, ops = counts["device"]
    assert reads == ["cpu"] and ops == [], counts["device"]
    assert len(counts["host"][0]) > 20 and "nonzero" in counts["host"][1]


def test_device_loop_config_is_validated():
    with pytest.raises(ConfigError, match="mono.device_loop"):
        load_config(None, {"mono.device_loop": "gpu"})
    with pytest.raises(ConfigError, match="mono.device_iterations"):
        load_config(None, {"mono.device_iterations": 0})
    with pytest.raises(ConfigError, match="mono.device_descriptor_dtype"):
        load_config(None, {"mono.device_descriptor_dtype": "int8"})
    c = load_config(None, {}).mono
    assert c.device_loop == "auto" and c.device_iterations == 5 and c.device_descriptor_dtype == "auto"
    assert md.descriptor_dtype("auto", "cpu") == torch.float32 and md.descriptor_dtype("auto", "cuda") == torch.float16


# ------------------------------------------------------------------------------ the engine
class _Head:
    def __init__(self, seq, n):
        self.seq, self.n = seq, n
        self.camera, self.name = seq.camera, "head"
        self.has_depth, self.has_stereo, self.has_ground_truth = True, False, True

    def __len__(self):
        return self.n

    def __iter__(self):
        return (self.seq[i] for i in range(self.n))

    def ground_truth(self):
        st, T = self.seq.ground_truth()
        return st[: self.n], T[: self.n]


def _run(source, cfg, seed=0):
    from recon_slam.eval import evaluate_trajectory
    from recon_slam.runner import run_slam

    s = run_slam(source, None, cfg, progress=False, predictor=OraclePredictor(cfg.predictor, seed=seed))
    gt = source.ground_truth()
    err = evaluate_trajectory(s["_stamps"], s["_T_world_cam"], gt[0][: s["n_frames"]], gt[1][: s["n_frames"]],
                              align="sim3")
    return s, 100 * err.ate_rmse_m / err.path_length_m


@pytest.mark.parametrize("calibrated", [False, True])
def test_oracle_sequence_with_the_device_step_tracks_like_the_host(seq, calibrated):
    out = {m: _run(_Head(seq, 80), _cfg(mono__calibrated=calibrated, mono__device_loop=m)) for m in ("host", "device")}
    (sh, ate_h), (sd, ate_d) = out["host"], out["device"]
    assert sd["n_frames"] == 80 and sd["n_lost"] == 0 and abs(sd["n_keyframes"] - sh["n_keyframes"]) <= 1
    assert ate_d < (1.0 if not calibrated else 0.5)  # the host path's bars (test_mono)
    assert abs(ate_d - ate_h) < 0.05 * ate_h + 0.01


def test_device_step_defers_the_blank_frame_test_and_relocalises(seq):
    from recon_slam.io.datasets.perturb import PerturbedSource

    src = PerturbedSource(_Head(seq, 40), blank_start=20, blank_count=3, blank_kind="black")
    s, _ = _run(src, _cfg(mono__device_loop="device", backend__enabled=True))
    assert s["n_lost"] == 3 and s["states"].get("relocalised") == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("calibrated", [False, True])
def test_cuda_graph_step_equals_the_eager_step(seq, calibrated):
    cfg = _cfg(mono__calibrated=calibrated, device="cuda", mono__device_descriptor_dtype="float32",
               mono__refine_radius=3, mono__refine_dilations=[5, 4, 3, 2, 1])
    from recon_slam.system import SlamSystem

    oracle = OraclePredictor(cfg.predictor, "cuda", seed=2)
    system = SlamSystem(cfg, seq.camera, predictor=oracle, backend=False)
    system.process(seq[0])
    fe = system._mono
    kf = system.keyframe_map.get(0)
    for i in (4, 8, 12):
        p = oracle.predict(seq[i], kf)
        res = {}
        for mode in ("host", "device", "graph", "graph"):  # the second graph call replays
            fe.mono.device_loop = mode
            fe._uv_cache.clear()
            res[mode] = fe.track(p, kf, np.eye(4))
        _compare(*res["host"], *res["graph"], tol=1e-4)
        _compare(*res["device"], *res["graph"], tol=1e-6)
    assert any(k != "_failed" for k in fe._step_graphs) and not fe._step_graphs.get("_failed")
    system.close()
