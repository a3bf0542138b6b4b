"""Saved maps with a relocaliser through the command line: run --save-map, map, reloc,
run --localize-only, and damaged maps (CPU, small synthetic scene, short training)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from recon_slam.cli import main
from recon_slam.maps import MapError, load_map, load_relocaliser
from recon_slam.synth import SyntheticSequence, write_tum_folder

TINY_RELOC = ["reloc.iterations=150", "reloc.short_side=64", "reloc.mapping_frames=40"]


@pytest.fixture(scope="module")
def mapped(tmp_path_factory):
    root = tmp_path_factory.mktemp("maps_cli")
    seq = write_tum_folder(SyntheticSequence(frames=60, width=128, height=96, seed=0), root / "seq", progress=False)
    rc = main(["run", str(seq), "--out", str(root / "run"), "--save-map", str(root / "map"), "--quiet",
               "--device", "cpu", "--set", *TINY_RELOC])
    assert rc == 0
    return root


def test_run_save_map_writes_a_complete_map(mapped):
    meta = json.loads((mapped / "map" / "metadata.json").read_text())
    assert meta["version"] == 2 and meta["has_relocaliser"] and meta["slam_state"]
    assert meta["n_keyframes"] >= 1 and meta["n_frames"] == 60 and meta["T_gt_world"] is not None
    summary = json.loads((mapped / "run" / "summary.json").read_text())
    assert summary["map"]["relocaliser"] and summary["map"]["reloc_mapping_frames"] == 40
    assert summary["source_path"].endswith("seq")
    data = load_map(mapped / "map")
    rel = load_relocaliser(data, "cpu")
    assert rel.size_bytes() < 8e6  # the bound on the map size without the cloud
    # T_gt_world really aligns the SLAM world with the ground truth
    gt = np.loadtxt(mapped / "seq" / "groundtruth.txt")
    est = np.loadtxt(mapped / "map" / "trajectory.txt")
    P = (data.T_gt_world[:3, :3] @ est[:, 1:4].T).T + data.T_gt_world[:3, 3]
    assert np.abs(P - gt[:, 1:4]).max() < 0.02


def test_reloc_command_scores_against_ground_truth(mapped, capsys):
    out = mapped / "reloc"
    rc = main(["reloc", str(mapped / "seq"), "--map", str(mapped / "map"), "--out", str(out), "--quiet",
               "--device", "cpu", "--stride", "6"])
    assert rc == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["n_queries"] == 10 and 0.0 <= s["within_5cm_5deg"] <= 1.0
    assert (out / "reloc.csv").read_text().count("\n") == 11
    assert "frames localised" in capsys.readouterr().out


def test_map_command_builds_relocaliser_only_map(mapped):
    rc = main(["map", str(mapped / "run"), "--out", str(mapped / "map2"), "--quiet", "--device", "cpu",
               "--set", *TINY_RELOC])
    assert rc == 0
    data = load_map(mapped / "map2")
    assert not data.has_slam_state and data.relocaliser is not None and data.camera is not None
    assert data.metadata["has_relocaliser"] and not data.metadata["slam_state"]
    # SLAM cannot continue in it: a clear error
    rc = main(["run", str(mapped / "seq"), "--out", str(mapped / "run_lo2"), "--localize-only",
               str(mapped / "map2"), "--quiet", "--device", "cpu"])
    assert rc != 0


def test_localize_only_does_not_extend_the_map(mapped):
    n_map = len(load_map(mapped / "map").keyframes)
    rc = main(["run", str(mapped / "seq"), "--out", str(mapped / "run_lo"), "--localize-only", str(mapped / "map"),
               "--quiet", "--device", "cpu", "--max-frames", "30"])
    assert rc == 0
    s = json.loads((mapped / "run_lo" / "summary.json").read_text())
    assert s["n_keyframes"] == n_map
    assert s["states"].get("tracking", 0) + s["states"].get("relocalised", 0) >= 25
    assert s["ate_rmse_m"] < 0.02


def test_damaged_relocaliser_is_refused(mapped, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(mapped / "map", bad)
    p = bad / "relocaliser.pt"
    raw = bytearray(p.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    p.write_bytes(bytes(raw))
    with pytest.raises(MapError, match="checksum"):
        load_map(bad)
    rc = main(["reloc", str(mapped / "seq"), "--map", str(bad), "--out", str(tmp_path / "o"), "--quiet"])
    assert rc != 0
