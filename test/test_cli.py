"""The command line end to end on small synthetic data: synth, convert, run, demo, errors."""

import json

import numpy as np
import pytest

from recon_slam.cli import main
from recon_slam.io.trajectory import read_tum


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "seq"
    bag = out.parent / "seq_bag"
    assert main(["synth", "--trajectory", "handheld", "--frames", "40", "--width", "160", "--height", "120",
                 "--seed", "3", "--out", str(out), "--bag", str(bag), "--quiet"]) == 0
    return out, bag


def test_synth_writes_tum_folder_and_bag(synth_dir):
    out, bag = synth_dir
    for name in ("rgb.txt", "depth.txt", "groundtruth.txt", "associate.txt", "calibration.yaml"):
        assert (out / name).is_file(), name
    stamps, poses = read_tum(out / "groundtruth.txt")
    assert len(stamps) == 40
    assert (bag / "metadata.yaml").is_file()


def test_run_on_tum_folder_writes_all_outputs(synth_dir, tmp_path, capsys):
    out, _ = synth_dir
    run_dir = tmp_path / "run"
    assert main(["run", str(out), "--mode", "rgbd", "--out", str(run_dir), "--device", "cpu", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "ATE RMSE" in printed
    stamps, _ = read_tum(run_dir / "trajectory.txt")
    assert len(stamps) == 40
    summary = json.loads((run_dir / "summary.json").read_text())
    for key in ("n_frames", "n_keyframes", "n_lost", "fps", "ate_rmse_m"):
        assert key in summary, key
    assert summary["n_frames"] == 40 and summary["n_keyframes"] >= 1
    assert summary["ate_rmse_m"] < 0.02
    assert (run_dir / "cloud.ply").read_bytes().startswith(b"ply")
    assert (run_dir / "trajectory.png").read_bytes()[:4] == b"\x89PNG"
    kf_stamps, _ = read_tum(run_dir / "keyframes.txt")
    assert len(kf_stamps) == summary["n_keyframes"]


def test_run_on_bag_matches_run_on_folder(synth_dir, tmp_path):
    out, bag = synth_dir
    assert main(["run", str(out), "--out", str(tmp_path / "a"), "--device", "cpu", "--quiet"]) == 0
    assert main(["run", str(bag), "--out", str(tmp_path / "b"), "--device", "cpu", "--quiet"]) == 0
    ta, Pa = read_tum(tmp_path / "a" / "trajectory.txt")
    tb, Pb = read_tum(tmp_path / "b" / "trajectory.txt")
    assert len(ta) == len(tb) == 40
    np.testing.assert_allclose(ta, tb, atol=1e-5)
    # depth in the folder is quantised to 1/5000 m, in the bag it is float: poses agree closely
    assert np.abs(Pa[:, :3, 3] - Pb[:, :3, 3]).max() < 0.01


def test_convert_folder_to_bag(synth_dir, tmp_path):
    out, _ = synth_dir
    bag = tmp_path / "converted"
    assert main(["convert", str(out), str(bag), "--storage", "sqlite3", "--quiet"]) == 0
    from recon_slam.io.datasets import open_source

    src = open_source(bag)
    assert len(src) == 40 and src.has_depth and src.has_ground_truth


def test_wrong_mode_and_missing_source_are_clear_errors(synth_dir, tmp_path, capsys):
    out, _ = synth_dir
    assert main(["run", str(out), "--mode", "stereo", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "no right images" in err and "Traceback" not in err
    assert main(["run", str(tmp_path / "nowhere"), "--out", str(tmp_path / "y")]) == 2
    assert "nowhere" in capsys.readouterr().err
    assert main(["run", str(out), "--out", str(tmp_path / "z"), "--set", "tracking.no_such_key=1"]) == 2
    assert "no_such_key" in capsys.readouterr().err


def test_demo_runs_small(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--frames", "60", "--width", "160", "--height", "120", "--out", str(out),
                 "--device", "cpu", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "ATE RMSE" in printed and str(out) in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ate_percent_of_path"] < 1.0
