"""Evaluation: our ATE/RPE equal evo's when evo is called directly; CLI output and errors."""

import json

import numpy as np
import pytest
from evo.core import metrics, sync
from evo.core.trajectory import PoseTrajectory3D
from scipy.spatial.transform import Rotation

from recon_slam.cli import main
from recon_slam.errors import InputError, StampError
from recon_slam.eval import evaluate_trajectory, path_length, plot_trajectories
from recon_slam.geometry.transforms import look_at, make_pose
from recon_slam.io.trajectory import read_tum, write_tum


def _circle(n=120, noise=0.0, seed=0):
    rng = np.random.default_rng(seed)
    ts = np.linspace(0, 2 * np.pi, n, endpoint=False)
    poses = np.stack([look_at([2 * np.cos(t), 1.5 * np.sin(t), 1.2], [0, 0, 1.0]) for t in ts])
    poses[:, :3, 3] += rng.normal(0, noise, (n, 3))
    return np.arange(n) / 30.0, poses


def _transformed(poses, scale=1.0):
    T = make_pose(Rotation.from_euler("zyx", [40, 10, -5], degrees=True).as_matrix(), [1.0, -2.0, 0.5])
    out = T @ poses
    out[:, :3, 3] = (T[:3, :3] @ (scale * poses[:, :3, 3]).T).T + T[:3, 3]
    return out


def _evo_direct(t_est, est, t_gt, gt, correct_scale):
    ref = PoseTrajectory3D(poses_se3=list(gt), timestamps=t_gt)
    e = PoseTrajectory3D(poses_se3=list(est), timestamps=t_est)
    ref, e = sync.associate_trajectories(ref, e, max_diff=0.02)
    e.align(ref, correct_scale=correct_scale)
    ape = metrics.APE(metrics.PoseRelation.translation_part)
    ape.process_data((ref, e))
    rpe = metrics.RPE(metrics.PoseRelation.translation_part, delta=1, delta_unit=metrics.Unit.frames)
    rpe.process_data((ref, e))
    return ape.get_statistic(metrics.StatisticsType.rmse), rpe.get_statistic(metrics.StatisticsType.rmse)


@pytest.mark.parametrize("align,scale", [("se3", 1.0), ("sim3", 0.37)])
def test_matches_evo_called_directly(align, scale):
    t_gt, gt = _circle()
    t_est, est = _circle(noise=0.02, seed=1)
    est = _transformed(est, scale)
    ours = evaluate_trajectory(t_est, est, t_gt, gt, align=align)
    ate, rpe = _evo_direct(t_est, est, t_gt, gt, correct_scale=(align == "sim3"))
    assert ours.ate_rmse_m == pytest.approx(ate, rel=1e-9)
    assert ours.rpe_trans_rmse_m == pytest.approx(rpe, rel=1e-9)
    assert ours.n_matched == len(t_gt)
    # ~2 cm iid noise per axis -> ATE about 2*sqrt(3) cm after alignment
    assert 0.025 < ours.ate_rmse_m < 0.045
    if align == "sim3":
        assert ours.scale == pytest.approx(1 / scale, rel=0.05)


def test_alignment_removes_a_rigid_offset_only_when_asked():
    t, gt = _circle()
    est = _transformed(gt)
    assert evaluate_trajectory(t, est, t, gt, align="se3").ate_rmse_m < 1e-9
    assert evaluate_trajectory(t, est, t, gt, align="none").ate_rmse_m > 0.5
    assert path_length(gt) == pytest.approx(evaluate_trajectory(t, gt, t, gt).path_length_m)


def test_association_by_stamps_and_errors():
    t, gt = _circle()
    ours = evaluate_trajectory(t[::2] + 0.005, gt[::2], t, gt)
    assert ours.n_matched == len(t[::2])
    with pytest.raises(StampError, match="within"):
        evaluate_trajectory(t + 100.0, gt, t, gt)
    with pytest.raises(StampError, match="backwards"):
        evaluate_trajectory(t[::-1].copy(), gt, t, gt)
    with pytest.raises(InputError, match="alignment"):
        evaluate_trajectory(t, gt, t, gt, align="affine")


def test_cli_eval_prints_json_and_plot(tmp_path, capsys):
    t_gt, gt = _circle()
    t_est, est = _circle(noise=0.01, seed=3)
    write_tum(tmp_path / "gt.txt", t_gt, gt)
    write_tum(tmp_path / "est.txt", t_est, _transformed(est))
    assert main(["eval", str(tmp_path / "est.txt"), str(tmp_path / "gt.txt"), "--plot", str(tmp_path / "p.png")]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"ate_rmse_m", "rpe_trans_rmse_m", "n_matched"} <= set(out)
    assert out["n_matched"] == len(t_gt)
    s, P = read_tum(tmp_path / "est.txt")
    ate, _ = _evo_direct(s, P, t_gt, gt, False)
    assert out["ate_rmse_m"] == pytest.approx(ate, rel=1e-6)
    png = (tmp_path / "p.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_cli_errors_are_one_line_without_traceback(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "missing.txt"), str(tmp_path / "gt.txt")]) == 2
    err = capsys.readouterr().err.strip()
    assert "missing.txt" in err and "not found" in err and "Traceback" not in err
    assert len(err.splitlines()) == 1
    bad = tmp_path / "bad.txt"
    bad.write_text("0 1 2 3\n")
    assert main(["eval", str(bad), str(bad)]) == 2
    assert "bad.txt:1" in capsys.readouterr().err


def test_plot_without_ground_truth(tmp_path):
    _, gt = _circle()
    out = plot_trajectories(tmp_path / "a.png", gt, keyframes=gt[::10])
    assert out.read_bytes()[:4] == b"\x89PNG"
