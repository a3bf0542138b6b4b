"""ACE-style relocaliser: minimal solver, RANSAC, refinement, weight files, mapping + queries.

All tests run on the CPU; the end-to-end test trains a tiny map (well under a minute).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from recon_slam.errors import InputError
from recon_slam.geometry.lie import so3_exp
from recon_slam.models.ace import (
    ACE_WIDTHS,
    ENCODER_KEYS,
    Encoder,
    build_net,
    load_official_encoder,
    load_official_head,
)
from recon_slam.models.ace.encoder import feature_size
from recon_slam.reloc import (
    RansacConfig,
    RelocConfig,
    Relocaliser,
    TrainingBuffer,
    prepare_mapping_frames,
    ransac_pnp,
    train_relocaliser,
)
from recon_slam.reloc.pnp import p3p4, refine_pnp, solve_quartic

F64 = torch.float64


def _K(fx=500.0, fy=470.0, cx=300.0, cy=260.0) -> torch.Tensor:
    return torch.tensor([[fx, 0, cx], [0, fy, cy], [0, 0, 1]], dtype=F64)


def _scene(n, K, R, t, gen, width=640, height=480, dmin=1.0, dmax=6.0):
    """n pixels with depths -> world points seen by T_cam_world = [R | t]."""
    uv = torch.rand(*R.shape[:-2], n, 2, generator=gen, dtype=F64) * torch.tensor([width, height], dtype=F64)
    d = torch.rand(*R.shape[:-2], n, 1, generator=gen, dtype=F64) * (dmax - dmin) + dmin
    rays = torch.cat((uv, torch.ones_like(uv[..., :1])), -1) @ torch.linalg.inv(K).T
    Xc = rays * d
    X = (Xc - t.unsqueeze(-2)) @ R  # R^T (Xc - t)
    return uv, X


def _angle_deg(Ra, Rb):
    c = ((Ra.transpose(-1, -2) @ Rb).diagonal(dim1=-2, dim2=-1).sum(-1) - 1) / 2
    return torch.rad2deg(torch.arccos(c.clamp(-1, 1)))


# ---------------------------------------------------------------------------- solvers
def test_quartic_real_roots():
    gen = torch.Generator().manual_seed(0)
    roots = torch.randn(500, 4, generator=gen, dtype=F64) * 3
    coeffs = torch.stack([torch.from_numpy(np.poly(r.numpy())) for r in roots]) * 2.5
    x, valid = solve_quartic(coeffs)
    assert valid.all()
    assert torch.allclose(x.sort(-1).values, roots.sort(-1).values, atol=1e-8)
    # x^4 + 1 has no real root
    x, valid = solve_quartic(torch.tensor([[1.0, 0, 0, 0, 1.0]], dtype=F64))
    assert not valid.any()


def test_p3p_recovers_known_poses_fx_ne_fy():
    gen = torch.Generator().manual_seed(1)
    K = _K()
    B = 500
    R = so3_exp(torch.randn(B, 3, generator=gen, dtype=F64))
    t = torch.randn(B, 3, generator=gen, dtype=F64)
    uv, X = _scene(4, K, R, t, gen)
    Rh, th, err = p3p4(K, uv, X)
    ok = err < 1e-4
    assert ok.float().mean() > 0.99  # near-degenerate random triangles may fail
    assert _angle_deg(Rh[ok], R[ok]).max() < 1e-5
    assert (th[ok] - t[ok]).norm(dim=-1).max() < 1e-6


def test_refine_pnp_converges_from_perturbed_pose():
    gen = torch.Generator().manual_seed(2)
    K = _K(400, 430, 150, 110)
    R = so3_exp(torch.tensor([0.2, -0.1, 0.3], dtype=F64))
    t = torch.tensor([0.3, -0.2, 0.5], dtype=F64)
    uv, X = _scene(800, K, R, t, gen, 320, 240)
    uv = uv + 0.5 * torch.randn(uv.shape, generator=gen, dtype=F64)
    R0 = so3_exp(torch.tensor([[0.22, -0.08, 0.31]], dtype=F64))
    t0 = (t + 0.05).unsqueeze(0)
    Rr, tr, inl = refine_pnp(K, R0, t0, X, uv, threshold=30.0, iterations=15)
    assert _angle_deg(Rr[0], R) < 0.05
    assert (tr[0] - t).norm() < 5e-3
    assert inl[0] == 800


def test_ransac_with_outliers():
    gen = torch.Generator().manual_seed(3)
    K = _K(250, 265, 170, 110)
    R = so3_exp(torch.tensor([0.1, 0.4, -0.2], dtype=F64))
    t = torch.tensor([-0.2, 0.1, 0.4], dtype=F64)
    n = 1200
    uv, X = _scene(n, K, R, t, gen, 320, 240)
    X = X + 0.01 * torch.randn(X.shape, generator=gen, dtype=F64)
    out = torch.rand(n, generator=gen) < 0.6
    X[out] = torch.randn(int(out.sum()), 3, generator=gen, dtype=F64) * 2
    res = ransac_pnp(uv.float(), X.float(), K, threshold=5.0, config=RansacConfig(),
                     generator=torch.Generator().manual_seed(0))
    assert res.T_cam_world is not None
    assert _angle_deg(res.T_cam_world[:3, :3], R) < 0.5
    assert (res.T_cam_world[:3, 3] - t).norm() < 0.02
    n_in = int((~out).sum())
    assert 0.9 * n_in <= res.inliers <= n_in + 0.05 * n
    # pure noise: far fewer inliers
    res2 = ransac_pnp(uv.float(), torch.randn(n, 3, generator=gen) * 2, K, threshold=5.0,
                      generator=torch.Generator().manual_seed(0))
    assert res2.inliers < 0.1 * n


def test_ransac_batched_rounds_match_early_exit_and_do_not_sync():
    """All rounds in one batch (the accelerator path) give the early-exit result, with no
    data-dependent host reads before the final transfer."""
    from torch.profiler import ProfilerActivity, profile

    gen = torch.Generator().manual_seed(6)
    K = _K(250, 265, 170, 110)
    R = so3_exp(torch.tensor([0.3, -0.2, 0.1], dtype=F64))
    t = torch.tensor([0.1, 0.2, 0.3], dtype=F64)
    n = 900
    uv, X = _scene(n, K, R, t, gen, 320, 240)
    out = torch.rand(n, generator=gen) < 0.7  # few sets pass: several rounds are needed
    X[out] = torch.randn(int(out.sum()), 3, generator=gen, dtype=F64) * 2
    X[:5] = float("nan")  # invalid predictions are ignored
    res = {}
    for early in (True, False):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            res[early] = ransac_pnp(uv.float(), X.float(), K, 5.0, generator=torch.Generator().manual_seed(1),
                                    early_exit=early)
        names = [e.name for e in prof.events()]
        if not early:
            assert "aten::nonzero" not in names and "aten::_linalg_check_errors" not in names
            assert "aten::item" not in names and "aten::is_nonzero" not in names
    a, b = res[True], res[False]
    assert a.T_cam_world is not None and torch.allclose(a.T_cam_world, b.T_cam_world)
    assert a.inliers == b.inliers and a.hypotheses == b.hypotheses and torch.equal(a.inlier_mask, b.inlier_mask)
    assert not a.inlier_mask[:5].any()
    assert _angle_deg(a.T_cam_world[:3, :3], R) < 0.5 and (a.T_cam_world[:3, 3] - t).norm() < 0.02


# ---------------------------------------------------------------------------- weights
def _official_encoder_state_dict(gen) -> dict:
    """A state_dict with exactly the keys and shapes of the published ACE encoder file."""
    shapes = {
        "conv1": (32, 1, 3, 3), "conv2": (64, 32, 3, 3), "conv3": (128, 64, 3, 3), "conv4": (256, 128, 3, 3),
        "res1_conv1": (256, 256, 3, 3), "res1_conv2": (256, 256, 1, 1), "res1_conv3": (256, 256, 3, 3),
        "res2_conv1": (512, 256, 3, 3), "res2_conv2": (512, 512, 1, 1), "res2_conv3": (512, 512, 3, 3),
        "res2_skip": (512, 256, 1, 1),
    }
    sd = {}
    for name, shape in shapes.items():
        sd[f"{name}.weight"] = torch.randn(shape, generator=gen) * 0.02
        sd[f"{name}.bias"] = torch.randn(shape[0], generator=gen) * 0.01
    return sd


def test_official_encoder_keys_load(tmp_path):
    gen = torch.Generator().manual_seed(4)
    sd = _official_encoder_state_dict(gen)
    assert set(sd) == set(ENCODER_KEYS)
    path = tmp_path / "ace_encoder_pretrained.pt"
    torch.save(sd, path)
    enc = load_official_encoder(path)
    assert enc.widths == ACE_WIDTHS and enc.in_channels == 1
    for k, v in enc.state_dict().items():
        assert torch.equal(v, sd[k])
    with torch.no_grad():
        y = enc(torch.randn(1, 1, 60, 84))
    assert y.shape == (1, 512, *feature_size(60, 84)) == (1, 512, 8, 11)
    assert 5.4e6 < sum(p.numel() for p in enc.parameters()) < 5.8e6
    # a wrong file names the problem
    bad = dict(sd)
    del bad["res2_skip.weight"]
    with pytest.raises(InputError, match="res2_skip"):
        load_official_encoder(bad)


def test_official_head_keys_load():
    gen = torch.Generator().manual_seed(5)
    sd = {}
    names = ["res3_conv1", "res3_conv2", "res3_conv3", "0c0", "0c1", "0c2", "fc1", "fc2"]
    for n in names:
        sd[f"{n}.weight"] = (torch.randn(512, 512, 1, 1, generator=gen) * 0.02).half()
        sd[f"{n}.bias"] = torch.zeros(512).half()
    sd["fc3.weight"] = (torch.randn(4, 512, 1, 1, generator=gen) * 0.02).half()
    sd["fc3.bias"] = torch.zeros(4).half()
    sd["mean"] = torch.tensor([1.0, 2.0, 3.0]).view(1, 3, 1, 1)
    head = load_official_head(sd)
    assert head.width == 512 and head.num_blocks == 1
    with torch.no_grad():
        out = head(torch.zeros(1, 512, 2, 3))
    # zero features, zero biases: xyz = 0, h = 1 -> the mean
    assert torch.allclose(out, torch.tensor([1.0, 2.0, 3.0]).view(1, 3, 1, 1).expand(1, 3, 2, 3))


def test_head_output_layer_stays_float32_under_autocast():
    torch.manual_seed(0)
    net = build_net((8, 16, 16, 32, 32), 32, 1, 3, homogeneous=False).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x)
    assert out.dtype == torch.float32
    # computed in bf16 every coordinate would sit on the bf16 grid (steps of 1-3 cm at metres)
    assert (out.bfloat16().float() != out).float().mean() > 0.9


def test_encoder_rejects_bad_widths():
    with pytest.raises(ValueError):
        Encoder((16, 32, 64))


# ---------------------------------------------------------------------------- mapping data
def _synth(scene, traj, n, w=128, h=96, seed=0):
    from recon_slam.synth import SyntheticSequence

    return list(SyntheticSequence(scene, traj, frames=n, width=w, height=h, seed=seed))


def test_buffer_targets_are_consistent_across_views():
    frames = _synth("room", "loop", 12)
    mf = prepare_mapping_frames(frames, 96)
    buf = TrainingBuffer(mf, "cpu", 1, seed=0)
    batch = buf.sample(4)
    assert batch.has_xyz.float().mean() > 0.7
    # every 3D target must land on the depth of another frame that sees it
    X = batch.xyz[batch.has_xyz].double().numpy()
    errs = []
    for f in frames[:4]:
        T = np.linalg.inv(f.T_world_cam_gt)
        Xc = X @ T[:3, :3].T + T[:3, 3]
        p = Xc @ f.camera.K.T
        uv = p[:, :2] / p[:, 2:]
        ok = (Xc[:, 2] > 0.1) & (uv[:, 0] > 1) & (uv[:, 0] < 126) & (uv[:, 1] > 1) & (uv[:, 1] < 94)
        d = f.depth[uv[ok, 1].round().astype(int), uv[ok, 0].round().astype(int)]
        errs.append(np.abs(d - Xc[ok, 2]) / d)
    e = np.concatenate(errs)
    assert len(e) > 50 and np.median(e) < 0.01


def test_novel_views_match_the_scene():
    from recon_slam.reloc.buffer import synthesize_views

    frames = _synth("room", "loop", 6)
    mf = prepare_mapping_frames(frames, 96)
    virt = synthesize_views(mf, 1.0, translation=0.2, rotation_deg=10.0, seed=0)
    assert len(virt) == 6 and 0.5 < virt.masks.mean() < 1.0
    # the warped depth of a virtual view agrees with the real depth of another mapping frame
    errs = []
    for k in range(6):
        D, K, T = virt.depths[k], virt.K[k], virt.poses[k]
        v, u = np.nonzero(D > 0)
        z = D[v, u]
        X = np.stack(((u - K[0, 2]) / K[0, 0] * z, (v - K[1, 2]) / K[1, 1] * z, z), -1) @ T[:3, :3].T + T[:3, 3]
        f = frames[(k + 1) % 6]
        Ti = np.linalg.inv(f.T_world_cam_gt)
        Xc = X @ Ti[:3, :3].T + Ti[:3, 3]
        p = Xc @ f.camera.K.T
        uv = p[:, :2] / p[:, 2:]
        ok = (Xc[:, 2] > 0.1) & (uv[:, 0] > 1) & (uv[:, 0] < 126) & (uv[:, 1] > 1) & (uv[:, 1] < 94)
        d = f.depth[uv[ok, 1].round().astype(int), uv[ok, 0].round().astype(int)]
        errs.append(np.abs(d - Xc[ok, 2]) / d)
    assert np.median(np.concatenate(errs)) < 0.01


def test_mapping_input_errors():
    frames = _synth("room", "loop", 3, 64, 48)
    frames[1].T_world_cam_gt = None
    with pytest.raises(InputError, match="no pose"):
        prepare_mapping_frames(frames, 48)
    with pytest.raises(InputError, match="poses"):
        prepare_mapping_frames({"images": [frames[0].image]}, 48)
    with pytest.raises(InputError):
        RelocConfig(in_channels=2)
    with pytest.raises(InputError, match="batch_images"):
        RelocConfig(batch_images=-1)


def test_default_batch_is_chosen_per_device_and_recorded():
    frames = _synth("room", "loop", 6, 64, 48)
    cfg = RelocConfig(short_side=48, encoder_widths=(4, 8, 8, 8, 8), head_width=8, iterations=2, nvs_views=0.0)
    assert cfg.batch_images == 0
    reloc, stats = train_relocaliser(frames, cfg, device="cpu")
    assert reloc.config.batch_images == 8 and stats.iterations == 2
    assert cfg.batch_images == 0  # the caller's settings are left alone


def _anisotropic(frames, sx=1.25, crop=(6, 2)):
    """Resample frames to a camera with fx != fy and an off-centre principal point."""
    import cv2
    from recon_slam.io.frame import Frame

    out = []
    for f in frames:
        cam = f.camera
        w = int(round(cam.width * sx))
        img = cv2.resize(f.image, (w, cam.height), interpolation=cv2.INTER_LINEAR)
        dep = cv2.resize(f.depth, (w, cam.height), interpolation=cv2.INTER_NEAREST)
        c2 = cam.scaled(w, cam.height)
        x0, y0 = crop
        c3 = c2.cropped(x0, y0, w - x0 - 2, cam.height - y0 - 4)
        img = img[y0 : y0 + c3.height, x0 : x0 + c3.width]
        dep = dep[y0 : y0 + c3.height, x0 : x0 + c3.width]
        out.append(Frame(index=f.index, stamp=f.stamp, image=np.ascontiguousarray(img), camera=c3,
                         depth=np.ascontiguousarray(dep), T_world_cam_gt=f.T_world_cam_gt))
    return out


# ---------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def tiny_map():
    """A tiny map (fx != fy, off-centre principal point) trained on the CPU."""
    torch.manual_seed(0)
    frames = _anisotropic(_synth("room", "loop", 80, 128, 96))
    # A slim network at 96 px keeps this under a minute on one CPU core; the pose precision
    # at this resolution (f ~ 100 px, 192 cells) is a few centimetres, hence the 15 cm bar.
    cfg = RelocConfig(short_side=96, encoder_widths=(8, 16, 32, 64, 128), head_width=128, iterations=1000,
                      batch_images=4, nvs_views=0.0, min_inliers=40, seed=0)
    reloc, stats = train_relocaliser(frames[::2], cfg, device="cpu")
    return reloc, stats, frames


def test_tiny_map_localises_and_rejects(tiny_map):
    reloc, stats, frames = tiny_map
    assert frames[0].camera.fx != frames[0].camera.fy
    assert stats.iterations == 1000 and stats.median_3d_error_m < 0.06
    queries = frames[1::4]  # views between the mapping frames
    good, terrs = 0, []
    for f in queries:
        r = reloc.localize(f.image, f.camera)
        if r.ok:
            T, G = r.T_world_cam, f.T_world_cam_gt
            terr = np.linalg.norm(T[:3, 3] - G[:3, 3])
            rerr = math.degrees(math.acos(np.clip((np.trace(T[:3, :3].T @ G[:3, :3]) - 1) / 2, -1, 1)))
            good += terr < 0.15 and rerr < 5.0
            terrs.append(terr)
    assert good >= 0.7 * len(queries), f"{good}/{len(queries)} queries within 15 cm / 5 deg"
    assert np.median(terrs) < 0.12
    wrong = _anisotropic(_synth("room_b", "reloc", 10, 128, 96))
    accepted = sum(reloc.localize(f.image, f.camera).ok for f in wrong)
    assert accepted <= 1, f"{accepted}/10 queries of another scene were accepted"


def test_state_dict_round_trip(tiny_map, tmp_path):
    reloc, _, frames = tiny_map
    state = reloc.state_dict()
    assert all(v.dtype in (torch.float16, torch.float32) for v in state["weights"].values())
    assert reloc.size_bytes() < 8e6
    path = reloc.save(tmp_path / "reloc.pt")
    again = Relocaliser.load(path)
    f = frames[5]
    _, X1, _ = reloc.predict(f.image, f.camera)
    _, X2, _ = again.predict(f.image, f.camera)
    assert (X1 - X2).abs().max() < 0.02  # fp16 round trip of the weights
    with pytest.raises(InputError):
        Relocaliser.from_state_dict({"format": "other"})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_localize_equals_eager(tiny_map):
    """On CUDA, network + RANSAC are replayed as one CUDA graph (after a first eager query of
    the shape): same random sets, same pose and inliers as the eager path."""
    reloc, _, frames = tiny_map
    gpu = Relocaliser.from_state_dict(reloc.state_dict(), "cuda")
    eager = Relocaliser.from_state_dict(reloc.state_dict(), "cuda")
    eager.cuda_graphs = False
    for f in frames[1:40:6]:
        a, b = gpu.localize(f.image, f.camera), eager.localize(f.image, f.camera)
        assert (a.ok, a.inliers) == (b.ok, b.inliers)
        if a.candidate is not None:
            assert np.allclose(a.candidate, b.candidate, atol=1e-6)
    assert len(gpu._graphs) == 1 and next(iter(gpu._graphs.values())) is not None
    assert not eager._graphs


def test_default_map_size_under_8mb():
    cfg = RelocConfig()
    net = build_net(cfg.encoder_widths, cfg.head_width, cfg.head_blocks, cfg.in_channels)
    reloc = Relocaliser(net, cfg)
    assert reloc.size_bytes() <= 8 * 1024 * 1024


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_training_fits_like_eager_training():
    """On CUDA the training step is replayed as CUDA graphs (one per scale level): the same
    number of steps fits the map as well as eager steps do, and the weights really train."""
    frames = _synth("room", "loop", 40, 128, 96)
    base = dict(short_side=96, encoder_widths=(8, 16, 32, 64, 128), head_width=128, iterations=400,
                batch_images=8, nvs_views=0.0, seed=0)
    graphed, gs = train_relocaliser(frames, RelocConfig(**base), device="cuda")
    eager, es = train_relocaliser(frames, RelocConfig(cuda_graphs=False, **base), device="cuda")
    assert gs.cuda_graphs and not es.cuda_graphs
    assert gs.iterations == es.iterations == 400
    assert gs.history[-1][1] < 0.5 * gs.history[0][1]  # the loss fell
    assert gs.median_3d_error_m < 1.5 * es.median_3d_error_m + 0.01, (gs.median_3d_error_m, es.median_3d_error_m)


@pytest.mark.skipif(torch.cuda.is_available(), reason="simulates a failed capture where CUDA is missing")
def test_failed_training_capture_warns_and_leaves_the_weights_alone():
    """When capturing the training step fails (here: no CUDA at all), the trainer gets None,
    a warning that names the fallback, and a network whose weights were not touched."""
    from recon_slam.reloc.buffer import TrainingBuffer
    from recon_slam.reloc.trainer import _CapturedSteps

    frames = prepare_mapping_frames(_synth("room", "loop", 4, 64, 48), 48)
    cfg = RelocConfig(short_side=48, encoder_widths=(4, 8, 8, 8, 8), head_width=8, batch_images=2)
    net = build_net(cfg.encoder_widths, cfg.head_width, cfg.head_blocks, cfg.in_channels)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    buf = TrainingBuffer(frames, "cpu", cfg.in_channels, seed=0)
    with pytest.warns(RuntimeWarning, match="eager steps"):
        assert _CapturedSteps.build(net, buf, cfg, None) is None
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert all(p.grad is None for p in net.parameters())
