"""The device-resident LM loop (``tracking.device_loop``) solves like the host loop.

It is the loop used on CUDA; here it runs on the CPU with ``device_loop='on'``.
"""

import math

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from recon_slam.frontend.tracking import retract, solve_normal_equations
from recon_slam.frontend.tracking_device import damped_solve_torch, retract_torch
from test_frontend import _solve, make_pose, pose_error


@pytest.mark.parametrize("residual", ["pixel_depth", "ray_dist"])
def test_device_loop_recovers_se3_motion(residual):
    T_true = make_pose(Rotation.from_rotvec([0.02, -0.04, 0.01]).as_matrix(), [0.04, -0.02, 0.05])
    res = _solve(T_true, **{"tracking.residual": residual, "tracking.device_loop": "device"})
    assert res.success, res.reason
    dt, dr = pose_error(res.T_kf_frame, T_true)
    assert dt < 2e-3 and dr < 0.1, (dt, dr)
    assert res.valid_fraction > 0.8
    assert res.information.shape == (6, 6) and np.all(np.linalg.eigvalsh(res.information) > 0)


def test_device_loop_recovers_sim3_motion():
    s = 0.8
    T_rigid = make_pose(Rotation.from_rotvec([0.01, 0.03, -0.02]).as_matrix(), [-0.03, 0.02, 0.04])
    res = _solve(T_rigid, metric=False, scale=s, **{"tracking.occlusion_distance": 0.5, "tracking.device_loop": "device"})
    assert res.success, res.reason
    assert abs(float(np.cbrt(np.linalg.det(res.T_kf_frame[:3, :3]))) - 1.0 / s) < 5e-3


def test_device_loop_reports_failure_without_overlap():
    T_far = make_pose(Rotation.from_rotvec([0.0, math.pi, 0.0]).as_matrix(), [0.0, 0.0, 0.0])
    res = _solve(T_far, T_init=np.eye(4), **{"tracking.device_loop": "device"})
    assert not res.success


@pytest.mark.parametrize("dof", [6, 7])
def test_torch_retract_and_solve_match_numpy(dof):
    rng = np.random.default_rng(3)
    T = make_pose(Rotation.from_rotvec(rng.normal(size=3) * 0.5).as_matrix(), rng.normal(size=3))
    dx = rng.normal(size=dof) * 0.1
    np.testing.assert_allclose(retract_torch(torch.from_numpy(T), torch.from_numpy(dx)).numpy(), retract(T, dx),
                               atol=1e-12)
    A = rng.normal(size=(dof, dof))
    H = A @ A.T + np.eye(dof)
    g = rng.normal(size=dof)
    ref = solve_normal_equations(H, g, 1e-3)
    got = damped_solve_torch(torch.from_numpy(H), torch.from_numpy(g), torch.tensor(1e-3, dtype=torch.float64))
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-9, atol=1e-12)
    # a singular system gives a zero step, not an exception
    zero = damped_solve_torch(torch.zeros(dof, dof, dtype=torch.float64), torch.from_numpy(g),
                              torch.tensor(1e-3, dtype=torch.float64))
    assert torch.all(zero == 0)


def test_device_depth_maps_match_numpy():
    """The torch (CUDA path) depth -> pointmap/confidence equals the numpy one."""
    from recon_slam.config import load_config
    from recon_slam.frontend.predictors import _depth_to_prediction_torch, depth_to_prediction
    from recon_slam.geometry.camera import PinholeCamera

    rng = np.random.default_rng(0)
    cam = PinholeCamera(64, 48, 50.0, 51.0, 31.5, 23.0)
    z = rng.uniform(0.5, 3.0, (48, 64)).astype(np.float32)
    z[10:20, 10:30] = 1.0
    z[10:20, 30:50] = 2.0  # a discontinuity
    z[0, :5] = 0.0
    z[5, 5] = 9.0  # out of range
    img = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
    cfg = load_config(None, {"predictor.discontinuity_ratio": 0.5}).predictor
    sigma = cfg.depth_sigma_base + cfg.depth_sigma_quadratic * z * z
    a = depth_to_prediction(z, cam, img, sigma, cfg)
    b = _depth_to_prediction_torch(z, cam, img, cfg, torch.device("cpu"), 0, 0.0)
    assert torch.equal(a.C > 0, b.C > 0)
    torch.testing.assert_close(b.C, a.C, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b.X_cam, a.X_cam, rtol=1e-6, atol=1e-6)
    assert int((a.C == 0).sum()) > 40  # invalid, out-of-range and discontinuity pixels


def test_graph_mode_falls_back_off_cuda():
    T_true = make_pose(Rotation.from_rotvec([0.02, -0.04, 0.01]).as_matrix(), [0.04, -0.02, 0.05])
    res = _solve(T_true, **{"tracking.device_loop": "graph"})
    assert res.success, res.reason
    dt, dr = pose_error(res.T_kf_frame, T_true)
    assert dt < 2e-3 and dr < 0.1, (dt, dr)


class _InMemory:
    """A rendered sequence held in memory (rendered once, replayed by RepeatedSource)."""

    def __init__(self, seq):
        self.frames = list(seq)
        self.camera, self.name = seq.camera, seq.name
        self.has_depth, self.has_stereo, self.has_ground_truth = True, False, True
        self._gt = seq.ground_truth()

    def __len__(self):
        return len(self.frames)

    def __iter__(self):
        return iter(self.frames)

    def __getitem__(self, i):
        return self.frames[i]

    def ground_truth(self):
        return self._gt


def test_revisit_closes_loop_and_bounds_keyframes():
    """Flying a loop twice: re-anchoring on old keyframes adds loop edges (optimised) and
    keeps the keyframe count; with loop closure off the map keeps growing."""
    from recon_slam.config import load_config
    from recon_slam.io.datasets.perturb import RepeatedSource
    from recon_slam.runner import run_slam
    from recon_slam.synth import SyntheticSequence

    seq = _InMemory(SyntheticSequence(frames=240, width=320, height=240, seed=0, depth_noise=True))
    out = {}
    for lc in (True, False):
        cfg = load_config(None, {"device": "cpu", "backend.loop_closure": lc})
        out[lc] = run_slam(RepeatedSource(seq, laps=2), None, cfg, progress=False)
    assert out[True]["n_loop_closures"] >= 1 and out[False]["n_loop_closures"] == 0
    assert out[True]["n_keyframes"] < out[False]["n_keyframes"]
    assert out[True]["ate_rmse_m"] < 0.01
