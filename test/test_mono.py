"""Monocular mode: oracle two-view predictor, ray-space matching, Sim(3) tracking, the engine
path (keyframes, relocalisation, backend edges), the MASt3R predictor wrapper and the CLI."""

import math

import numpy as np
import pytest
import torch

from recon_slam.config import load_config
from recon_slam.errors import InputError
from recon_slam.frontend import mono
from recon_slam.frontend.oracle import OraclePredictor
from recon_slam.synth import SyntheticSequence

W, H = 128, 96
LAP = 300  # frames per loop of the synthetic trajectory


@pytest.fixture(scope="module")
def seq():
    return SyntheticSequence(scene="room", trajectory="loop", frames=LAP, width=W, height=H, seed=0)


@pytest.fixture(scope="module")
def frames(seq):
    return {i: seq[i] for i in (0, 4, 8, 150)}


def _cfg(**kw):
    over = {"device": "cpu", "mode": "mono", "predictor.width": W, "mono.refine_radius": 1,
            "mono.refine_dilations": [2, 1]}
    over.update({k.replace("__", "."): v for k, v in kw.items()})
    return load_config(None, over)


class _KF:
    """Stand-in for a keyframe: the oracle only reads ``frame_index``."""

    def __init__(self, index):
        self.frame_index = index
        self.stamp = 0.0


def _scale(T):
    return float(np.cbrt(np.linalg.det(T[:3, :3])))


def _gt_pixels(oracle, i_kf, i_frame, src, cam):
    """Ground-truth frame pixel (u, v) of each sampled keyframe pixel, and whether it is in view."""
    tk, tf = oracle._get(i_kf), oracle._get(i_frame)
    P = tk.P_cam.reshape(-1, 3)[src.numpy()]
    T = np.linalg.inv(tf.T_world_cam) @ tk.T_world_cam
    Q = P @ T[:3, :3].T + T[:3, 3]
    u = cam.fx * Q[:, 0] / Q[:, 2] + cam.cx
    v = cam.fy * Q[:, 1] / Q[:, 2] + cam.cy
    return u, v, (Q[:, 2] > 0) & (u > 1) & (u < W - 2) & (v > 1) & (v < H - 2)


# ------------------------------------------------------------------------------ oracle
def test_oracle_has_one_scale_per_pair_and_identifying_descriptors(frames):
    cfg = _cfg()
    oracle = OraclePredictor(cfg.predictor, seed=3)
    oracle.predict(frames[0])
    p = oracle.predict(frames[4], _KF(0))
    q = oracle.predict(frames[8], _KF(0))
    tf, tk = oracle._get(4), oracle._get(0)
    # view 1: frame points in the frame camera; view 2: keyframe points, also in the frame camera
    T_f_k = np.linalg.inv(tf.T_world_cam) @ tk.T_world_cam
    gt1 = np.linalg.norm(tf.P_cam, axis=-1)
    gt2 = np.linalg.norm(tk.P_cam @ T_f_k[:3, :3].T + T_f_k[:3, 3], axis=-1)
    ok = ~tf.edge & ~tk.edge
    s1 = np.median(p.X_cam.norm(dim=-1).numpy()[ok] / gt1[ok])
    s2 = np.median(p.X_other.norm(dim=-1).numpy()[ok] / gt2[ok])
    assert 0.5 <= s1 <= 2.0 and abs(s2 / s1 - 1) < 0.01  # one scale for both views of the pair
    s_q = np.median(q.X_cam.norm(dim=-1).numpy()[ok] / np.linalg.norm(oracle._get(8).P_cam, axis=-1)[ok])
    assert abs(s_q / s1 - 1) > 0.01  # another pair, another scale
    # deterministic, noise grows with distance, confidence lower at depth edges
    p_again = oracle.predict(frames[4], _KF(0))
    assert torch.equal(p.X_cam, p_again.X_cam)
    rel = np.abs(p.X_cam.norm(dim=-1).numpy() / (s1 * gt1) - 1)
    z = tf.P_cam[..., 2]
    near, far = ok & (z < np.percentile(z[ok], 25)), ok & (z > np.percentile(z[ok], 75))
    assert np.median(rel[far]) > np.median(rel[near])
    C = p.C.numpy()
    assert tf.edge.any() and C[tf.edge].mean() < 0.5 * C[~tf.edge].mean()
    # descriptors: unit 24-d; the same surface point agrees across views, other points do not
    assert p.D.shape == (H, W, 24) and torch.allclose(p.D.norm(dim=-1), torch.ones(H, W), atol=1e-5)
    src = mono.sample_grid(H, W, 4)
    u, v, inside = _gt_pixels(oracle, 0, 4, src, p.camera)
    idx_f = (np.round(v).astype(int).clip(0, H - 1) * W + np.round(u).astype(int).clip(0, W - 1))
    Dk = p.D_other.reshape(-1, 24)[src]
    Df = p.D.reshape(-1, 24)
    same = (Dk * Df[torch.as_tensor(idx_f)]).sum(-1).numpy()[inside]
    other = (Dk * Df[torch.randperm(H * W)[: len(src)]]).sum(-1).numpy()[inside]
    assert np.median(same) > 0.85 and np.median(other) < 0.5
    assert (p.Q > 1.5).float().mean() > 0.8 and float(p.Q[torch.as_tensor(tf.edge)].max()) < 1.5


def test_oracle_needs_ground_truth(frames):
    import dataclasses

    oracle = OraclePredictor(_cfg().predictor)
    with pytest.raises(InputError, match="ground-truth depth"):
        oracle.predict(dataclasses.replace(frames[0], depth=None))


# ------------------------------------------------------------------------------ matching and Sim(3)
def test_ray_matching_with_descriptor_refinement_finds_the_true_pixels(frames):
    cfg = _cfg()
    oracle = OraclePredictor(cfg.predictor, seed=1)
    oracle.predict(frames[0])
    p = oracle.predict(frames[8], _KF(0))
    src = mono.sample_grid(H, W, 2)
    u, v, inside = _gt_pixels(oracle, 0, 8, src, p.camera)
    errs = {}
    for name, c in (("rays", load_config(cfg, {"mono.refine_dilations": []}).mono), ("refined", cfg.mono)):
        m = mono.match_pair(p, src, c)
        du = (m.dst_idx % W).numpy() - u
        dv = (m.dst_idx // W).numpy() - v
        sel = inside & m.valid.numpy()
        errs[name] = np.hypot(du, dv)[sel]
        assert sel.sum() > 0.5 * inside.sum()
        assert m.valid.numpy()[~inside].mean() < 0.2  # points out of view are rejected
    assert np.median(errs["refined"]) < 0.6 and np.percentile(errs["refined"], 95) < 1.5
    assert np.median(errs["refined"]) <= np.median(errs["rays"]) + 0.05


@pytest.mark.parametrize("calibrated", [False, True])
def test_solve_sim3_recovers_an_exact_similarity(calibrated):
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(3, 500, generator=gen) * torch.tensor([[2.0], [1.5], [1.0]]) - torch.tensor([[1.0], [0.75], [-1.5]])
    from recon_slam.geometry import lie

    T_true = lie.sim3_exp(torch.tensor([0.1, -0.05, 0.08, 0.03, -0.06, 0.04, math.log(1.7)], dtype=torch.float64))
    T_true = T_true.numpy()
    y = torch.as_tensor(T_true[:3, :3]).float() @ x + torch.as_tensor(T_true[:3, 3:4]).float()
    cam = SyntheticSequence(frames=2, width=W, height=H).camera if calibrated else None
    T0 = np.eye(4)
    T0[:3, :3] *= 1.3
    sol = mono.solve_sim3(x, y, torch.ones(500), T0, _cfg().mono, camera=cam)
    assert sol.success and sol.inlier_fraction > 0.99
    np.testing.assert_allclose(sol.T, T_true, atol=2e-4)
    np.testing.assert_allclose(mono.sim3_umeyama(x, y), T_true, atol=1e-4)


@pytest.mark.parametrize("calibrated", [False, True])
def test_sim3_tracking_recovers_motion_and_scale_from_oracle_pointmaps(frames, calibrated):
    from recon_slam.system import SlamSystem

    cfg = _cfg(mono__calibrated=calibrated, backend__enabled=False)
    oracle = OraclePredictor(cfg.predictor, seed=2)
    system = SlamSystem(cfg, frames[0].camera, predictor=oracle, backend=False)
    system.process(frames[0])  # first keyframe: its pointmap has its own unknown scale
    kf = system.keyframe_map.get(0)
    p0 = oracle.predict(frames[0])
    p = oracle.predict(frames[8], kf)
    tr, m = system._mono.track(p, kf, np.eye(4))
    assert tr.success and m.valid_fraction > 0.4
    # ground truth: rigid motion of the camera, scale = keyframe scale / pair scale
    T_gt = np.linalg.inv(frames[0].T_world_cam_gt) @ frames[8].T_world_cam_gt
    t0 = oracle._get(0)
    ok = ~t0.edge
    s_kf = np.median(p0.X_cam.norm(dim=-1).numpy()[ok] / np.linalg.norm(t0.P_cam, axis=-1)[ok])
    t8 = oracle._get(8)
    ok8 = ~t8.edge
    s_pair = np.median(p.X_cam.norm(dim=-1).numpy()[ok8] / np.linalg.norm(t8.P_cam, axis=-1)[ok8])
    T = tr.T_kf_frame
    s = _scale(T)
    assert abs(s / (s_kf / s_pair) - 1) < 0.01
    R = T[:3, :3] / s
    ang = np.degrees(np.arccos(np.clip((np.trace(T_gt[:3, :3].T @ R) - 1) / 2, -1, 1)))
    assert ang < 0.3
    t_err = np.linalg.norm(T[:3, 3] / s_kf - T_gt[:3, 3])
    assert t_err < 0.1 * np.linalg.norm(T_gt[:3, 3]) + 0.005
    system.close()


# ------------------------------------------------------------------------------ the engine
def _run(source, cfg, seed=0):
    from recon_slam.eval import evaluate_trajectory
    from recon_slam.runner import run_slam

    oracle = OraclePredictor(cfg.predictor, seed=seed)
    s = run_slam(source, None, cfg, progress=False, predictor=oracle)
    gt = source.ground_truth()
    err = evaluate_trajectory(s["_stamps"], s["_T_world_cam"], gt[0][: s["n_frames"]], gt[1][: s["n_frames"]],
                              align="sim3")
    return s, err


@pytest.mark.parametrize("calibrated", [False, True])
def test_oracle_monocular_sequence_ate(calibrated):
    seq = SyntheticSequence(scene="room", trajectory="loop", frames=LAP, width=W, height=H, seed=0)

    class Head:  # the first 80 frames of the loop (several keyframes)
        camera, has_depth, has_stereo, has_ground_truth, name = seq.camera, True, False, True, "head"

        def __len__(self):
            return 80

        def __iter__(self):
            return (seq[i] for i in range(80))

        def ground_truth(self):
            st, T = seq.ground_truth()
            return st[:80], T[:80]

    s, err = _run(Head(), _cfg(mono__calibrated=calibrated))
    assert s["n_frames"] == 80 and s["n_lost"] == 0 and s["ate_align"] == "sim3"
    assert s["n_keyframes"] >= 3
    assert 100 * err.ate_rmse_m / err.path_length_m < (1.0 if not calibrated else 0.5)
    assert abs(s["ate_rmse_m"] - err.ate_rmse_m) < 1e-9  # run_slam reports the Sim(3)-aligned ATE


def test_mono_relocalises_after_black_frames():
    from recon_slam.io.datasets.perturb import PerturbedSource

    seq = SyntheticSequence(scene="room", trajectory="loop", frames=LAP, width=W, height=H, seed=0)

    class Head:
        camera, has_depth, has_stereo, has_ground_truth, name = seq.camera, True, False, True, "head"

        def __len__(self):
            return 40

        def __iter__(self):
            return (seq[i] for i in range(40))

        def ground_truth(self):
            st, T = seq.ground_truth()
            return st[:40], T[:40]

    from recon_slam.eval import evaluate_trajectory

    src = PerturbedSource(Head(), blank_start=20, blank_count=3, blank_kind="black")
    s, _ = _run(src, _cfg())
    assert s["n_lost"] == 3 and s["states"].get("relocalised") == 1
    # lost frames keep the last good pose; every other frame is back in the same map
    keep = np.r_[0:20, 23:40]
    st, T = seq.ground_truth()
    err = evaluate_trajectory(s["_stamps"][keep], s["_T_world_cam"][keep], st[keep], T[keep], align="sim3")
    assert 100 * err.ate_rmse_m / err.path_length_m < 1.5  # a wrong relocalisation costs many cm


def test_backend_edge_from_symmetric_pair_prediction(frames):
    from recon_slam.system import SlamSystem

    cfg = _cfg()
    oracle = OraclePredictor(cfg.predictor, seed=4)
    system = SlamSystem(cfg, frames[0].camera, predictor=oracle, backend=False)
    system.process(frames[0])
    kf0 = system.keyframe_map.get(0)
    p = oracle.predict(frames[8], kf0)
    kf8 = system._mono._new_keyframe(frames[8], p, np.eye(4))
    p150 = oracle.predict(frames[150], kf0)
    kf150 = system._mono._new_keyframe(frames[150], p150, np.eye(4))
    res = system._mono.verify_keyframe_pair(kf0, kf8, 0.1)
    assert res.success and res.inlier_fraction > 0.3 and res.information.shape == (7, 7)
    T = res.T_a_b.numpy()
    T_gt = np.linalg.inv(frames[0].T_world_cam_gt) @ frames[8].T_world_cam_gt
    R = T[:3, :3] / _scale(T)
    assert np.degrees(np.arccos(np.clip((np.trace(T_gt[:3, :3].T @ R) - 1) / 2, -1, 1))) < 0.3
    # the far side of the room shares nothing with keyframe 0
    assert not system._mono.verify_keyframe_pair(kf0, kf150, 0.1).success
    system.close()


# ------------------------------------------------------------------------------ MASt3R wrapper, CLI
class _FakeNet:
    """Network stand-in with MASt3R's encode / decode shapes (points = depth-2 planes)."""

    def __init__(self):
        self.n_encode = 0

    def encode(self, img):
        assert img.ndim == 4 and img.shape[1] == 3 and img.shape[2] % 16 == 0 and img.shape[3] % 16 == 0
        assert float(img.min()) >= -1.0 and float(img.max()) <= 1.0
        self.n_encode += 1
        return img.mean(1).flatten(1)[:, None, :], None

    def decode(self, t1, t2, shape):
        h, w = shape
        v, u = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
        X = torch.stack(((u - w / 2) / w, (v - h / 2) / w, torch.ones_like(u)), -1)[None] * 2.0

        class V:
            pts3d = X
            conf = torch.full((1, h, w), 2.0)
            desc = torch.nn.functional.normalize(torch.ones(1, h, w, 24), dim=-1)
            desc_conf = torch.full((1, h, w), 3.0)

        return {"view1": V, "view2": V}


def test_mast3r_predictor_preprocesses_caches_and_wraps_outputs():
    from recon_slam.frontend.mast3r_predictor import Mast3rPredictor, input_geometry
    from recon_slam.geometry.camera import PinholeCamera
    from recon_slam.io.frame import Frame

    geo = input_geometry(640, 480)
    assert (geo.width, geo.height) == (512, 384)
    geo = input_geometry(1241, 376)
    assert geo.width == 512 and geo.height % 16 == 0 and geo.width % 16 == 0
    cam = PinholeCamera(640, 480, 525.0, 525.0, 319.5, 239.5)
    net = _FakeNet()
    pred = Mast3rPredictor(_cfg().predictor, network=net)
    assert pred.two_view and not pred.metric
    img = np.random.default_rng(0).integers(0, 255, (480, 640, 3), dtype=np.uint8)
    f0, f1 = Frame(0, 0.0, img, cam), Frame(1, 0.1, img, cam)
    p0 = pred.predict(f0)
    assert p0.X_cam.shape == (384, 512, 3) and p0.X_other is None and p0.image.shape == (384, 512, 3)
    assert abs(p0.camera.fx - 525.0 * 0.8) < 1e-9 and p0.camera.size == (512, 384)

    class KF:
        frame_index, stamp = 0, 0.0

    p1 = pred.predict(f1, KF)
    assert p1.X_other.shape == (384, 512, 3) and p1.D_other.shape == (384, 512, 24) and p1.other_index == 0
    assert net.n_encode == 2  # the keyframe's tokens were cached
    pred.predict_keyframes(KF, KF)
    assert net.n_encode == 2


def test_mono_without_checkpoint_fails_clearly(tmp_path, capsys):
    from recon_slam.cli import main
    from recon_slam.system import SlamSystem

    with pytest.raises(InputError) as exc:
        SlamSystem(load_config(None, {"mode": "mono", "device": "cpu"}), backend=False)
    msg = str(exc.value)
    for words in ("--checkpoint", "MASt3R_ViTLarge_BaseDecoder_512_catmlpdpt_metric.pth", "CC BY-NC-SA 4.0"):
        assert words in msg
    assert main(["run", str(tmp_path), "--mode", "mono", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "checkpoint" in err and "MASt3R_ViTLarge" in err and "Traceback" not in err
    assert main(["run", str(tmp_path), "--mode", "mono", "--checkpoint", str(tmp_path / "none.pth"),
                 "--out", str(tmp_path / "out")]) == 2
    assert "none.pth not found" in capsys.readouterr().err


# ------------------------------------------------------------------------------ memory, bounded map
def test_compact_keyframe_stores_half_precision_and_reads_float32():
    from recon_slam.frontend.keyframes import Keyframe
    from recon_slam.geometry.camera import PinholeCamera

    cam = PinholeCamera(64, 48, 50.0, 50.0, 31.5, 23.5)
    g = torch.Generator().manual_seed(0)
    d = 1.0 + 3.0 * torch.rand(48, 64, generator=g)
    X = mono.unit_rays(cam) * d[..., None]
    C = 1.0 + 9.0 * torch.rand(48, 64, generator=g)
    img = torch.zeros(48, 64, 3, dtype=torch.uint8)
    for calibrated in (False, True):
        kf = mono.CompactKeyframe(id=3, frame_index=7, stamp=0.0, camera=cam, image=img, X=X, C=C, metric=False,
                                  calibrated=calibrated, extra_bytes=lambda: 1000)
        Xr, Cr = kf.snapshot()
        assert Xr.dtype == torch.float32 and Cr.dtype == torch.float32 and kf.shape == (48, 64)
        assert float(((Xr - X).norm(dim=-1) / d).max()) < (1e-6 if calibrated else 1e-3)
        assert float(((Cr - C).abs() / C).max()) < 1e-3
        parts = mono.keyframe_bytes(kf)
        assert parts["points"] == 48 * 64 * (4 if calibrated else 6) and parts["confidence"] == 48 * 64 * 2
        assert parts["tokens"] == 1000 and kf.memory_bytes() == parts["total"]
        kf.set_pointmap(2.0 * Xr, Cr, fused=1)
        assert torch.allclose(kf.snapshot()[0], 2.0 * X, rtol=2e-3) and kf.n_fused == 2
    plain = Keyframe(id=0, frame_index=0, stamp=0.0, camera=cam, image=img, X=X, C=C)
    assert mono.keyframe_bytes(plain)["total"] == plain.memory_bytes() == 48 * 64 * (12 + 4 + 3)
    # stochastic rounding keeps a float16 running average unbiased below float16's resolution
    x = torch.full((200000,), 1.0 + 1e-4)
    assert x.half().float().mean() == 1.0  # round to nearest loses the increment
    assert abs(float(mono.to_half_stochastic(x, salt=5).float().mean()) - (1.0 + 1e-4)) < 1e-5


class _ViTLStandIn:
    """MASt3R's interface and output sizes (ViT-L tokens: 1024-d, one per 16x16 patch)."""

    def encode(self, img, out_dtype=None):
        b, _, h, w = img.shape
        tok = img.mean((1, 2, 3))[:, None, None].expand(b, (h // 16) * (w // 16), 1024)
        return tok.to(out_dtype or torch.float32).contiguous(), None

    def decode(self, t1, t2, shape):
        return _FakeNet().decode(t1, t2, shape)


@pytest.mark.parametrize("calibrated", [False, True])
def test_mono_keyframe_memory_at_network_resolution_is_at_most_4_mib(calibrated):
    from recon_slam.frontend.mast3r_predictor import Mast3rPredictor
    from recon_slam.geometry.camera import PinholeCamera
    from recon_slam.io.frame import Frame
    from recon_slam.system import SlamSystem

    cfg = load_config(None, {"mode": "mono", "device": "cpu", "backend.enabled": False,
                             "mono.calibrated": calibrated, "mono.match_stride": 8})
    pred = Mast3rPredictor(cfg.predictor, mono_config=cfg.mono, network=_ViTLStandIn())
    cam = PinholeCamera(640, 480, 525.0, 525.0, 319.5, 239.5)
    system = SlamSystem(cfg, cam, predictor=pred, backend=False)
    img = np.random.default_rng(0).integers(0, 255, (480, 640, 3), dtype=np.uint8)
    for i in range(3):
        system.process(Frame(i, 0.1 * i, img, cam))
    kf = system.keyframe_map.get(0)
    parts = mono.keyframe_bytes(kf, pred)
    assert kf.shape == (384, 512)
    assert parts["tokens"] == 24 * 32 * 1024 * 2  # float16 ViT-L tokens cached for the keyframe
    assert parts["image"] == 384 * 512 * 3 and parts["descriptors"] == 0
    assert parts["total"] <= 4 * 2**20
    assert system.stats()["memory_per_keyframe_bytes"] == parts["total"] == kf.memory_bytes()
    system.close()


def test_mono_map_is_bounded_when_the_camera_revisits_the_loop():
    """A lap of the loop and then its first part again: the revisit re-anchors on the first
    lap's keyframes (a loop edge for the backend) instead of creating new ones."""
    import itertools

    from recon_slam.io.datasets.perturb import RepeatedSource

    w, n_extra = 80, 90
    seq = SyntheticSequence(scene="room", trajectory="loop", frames=LAP, width=w, height=60, seed=0)
    laps = RepeatedSource(seq, laps=2)

    class Revisit:
        camera, has_depth, has_stereo, has_ground_truth, name = seq.camera, True, False, True, "revisit"

        def __len__(self):
            return LAP + n_extra

        def __iter__(self):
            return itertools.islice(iter(laps), LAP + n_extra)

        def ground_truth(self):
            st, T = laps.ground_truth()
            return st[: LAP + n_extra], T[: LAP + n_extra]

    counts = []

    def on_frame(frame, result, system):
        if frame.index in (LAP - 1, LAP + n_extra - 1):
            counts.append((system.num_keyframes, system._mono.n_reused, system._mono.n_loop_edges))

    from recon_slam.runner import run_slam

    cfg = _cfg(predictor__width=w)
    s = run_slam(Revisit(), None, cfg, progress=False, predictor=OraclePredictor(cfg.predictor, seed=0),
                 on_frame=on_frame)
    (kf_lap, _, _), (kf_end, reused, loops) = counts
    assert s["n_lost"] == 0 and kf_lap >= 8
    assert kf_end == kf_lap and reused >= 3 and loops >= 1  # no new keyframe on the revisit, a loop edge
    assert s["n_loop_closures"] >= 1
    assert s["ate_percent_of_path"] < 1.0
