"""Dataset readers: each test fabricates a tiny dataset in the real file layout."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import cv2
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from recon_slam.errors import CalibrationError, EncodingError, InputError, ReconSlamError, StampError
from recon_slam.geometry.camera import PinholeCamera
from recon_slam.geometry.transforms import invert_pose, make_pose, pose_from_quat
from recon_slam.io.datasets import (
    EurocSource,
    FrameSource,
    ImageFolderSource,
    KittiSource,
    SevenScenesSource,
    TumSource,
    detect_layout,
    open_source,
)
from recon_slam.io.datasets.base import associate_stamps, interpolate_poses, read_color, read_depth
from recon_slam.io.datasets.tum import TUM_PUBLISHED
from recon_slam.io.trajectory import read_tum

RNG = np.random.default_rng(0)


# ---------------------------------------------------------------------------------- helpers
def write_png(path: Path, img: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), img)


def bgr(w: int, h: int, value: tuple[int, int, int] = (10, 20, 30)) -> np.ndarray:
    img = np.zeros((h, w, 3), np.uint8)
    img[:] = value
    return img


def write_yaml(path: Path, cam: PinholeCamera, **extra) -> None:
    lines = [f"{k}: {v}" for k, v in cam.to_dict().items()] + [f"{k}: {v}" for k, v in extra.items()]
    path.write_text("\n".join(lines) + "\n")


def check_contract(src: FrameSource) -> list:
    """Common FrameSource checks; returns the frames."""
    assert isinstance(src.name, str) and src.name
    assert isinstance(src.camera, PinholeCamera)
    frames = list(src)
    assert len(frames) == len(src)
    for i, f in enumerate(frames):
        assert f.index == i
        assert f.camera == src.camera
        assert f.image.dtype == np.uint8 and f.image.shape == (src.camera.height, src.camera.width, 3)
        assert f.has_depth == src.has_depth
        assert f.has_stereo == src.has_stereo
        if f.depth is not None:
            assert f.depth.dtype == np.float32 and f.depth.shape == f.image.shape[:2]
        if f.right_image is not None:
            assert f.right_image.shape == f.image.shape and f.baseline_m > 0
    stamps = [f.stamp for f in frames]
    assert all(b > a for a, b in zip(stamps, stamps[1:]))
    gt = src.ground_truth()
    if src.has_ground_truth:
        t, T = gt
        assert T.shape == (len(t), 4, 4)
    else:
        assert gt is None
    return frames


# ---------------------------------------------------------------------------------- TUM
SMALL_CAM = PinholeCamera(32, 24, 30.0, 31.0, 15.5, 11.5)


def make_tum(root: Path, n: int = 5, cam: PinholeCamera = SMALL_CAM, calib: bool = True, gt: bool = True) -> dict:
    """TUM folder with n frames at 30 Hz; depth offset +5 ms; depth of frame i = (i+1)*1000 raw."""
    root.mkdir(parents=True, exist_ok=True)
    t0 = 1311868164.0
    rgb_t = t0 + np.arange(n) / 30.0
    depth_t = rgb_t + 0.005
    rgb_lines, depth_lines = ["# color images", "# timestamp filename"], ["# depth maps"]
    for i in range(n):
        write_png(root / "rgb" / f"{rgb_t[i]:.6f}.png", bgr(cam.width, cam.height, (i, 100, 200)))
        d = np.full((cam.height, cam.width), (i + 1) * 1000, np.uint16)
        d[0, 0] = 0
        write_png(root / "depth" / f"{depth_t[i]:.6f}.png", d)
        rgb_lines.append(f"{rgb_t[i]:.6f} rgb/{rgb_t[i]:.6f}.png")
        depth_lines.append(f"{depth_t[i]:.6f} depth/{depth_t[i]:.6f}.png")
    # an unmatched depth image far in the future
    depth_lines.append(f"{t0 + 100:.6f} depth/none.png")
    (root / "rgb.txt").write_text("\n".join(rgb_lines) + "\n")
    (root / "depth.txt").write_text("\n".join(depth_lines) + "\n")
    gt_t = t0 - 0.01 + np.arange(3 * n + 3) / 100.0  # 100 Hz ground truth
    rot = Rotation.from_rotvec(np.outer(np.arange(len(gt_t)), [0.0, 0.02, 0.01]))
    trans = np.stack([gt_t - t0, 2 * (gt_t - t0), np.zeros_like(gt_t)], 1)
    if gt:
        q = rot.as_quat()
        rows = ["# timestamp tx ty tz qx qy qz qw"]
        rows += [f"{s:.6f} " + " ".join(f"{v:.9f}" for v in (*p, *qq)) for s, p, qq in zip(gt_t, trans, q)]
        (root / "groundtruth.txt").write_text("\n".join(rows) + "\n")
    if calib:
        write_yaml(root / "calibration.yaml", cam, depth_scale=5000.0)
    return {"rgb_t": rgb_t, "gt_t": gt_t, "rot": rot, "trans": trans}


def test_tum_frames_depth_and_ground_truth(tmp_path):
    info = make_tum(tmp_path / "seq")
    src = TumSource(tmp_path / "seq")
    assert src.has_depth and src.has_ground_truth and not src.has_stereo
    assert src.camera == SMALL_CAM
    frames = check_contract(src)
    assert len(frames) == 5
    np.testing.assert_allclose([f.stamp for f in frames], info["rgb_t"], atol=1e-6)
    f = frames[2]
    assert tuple(f.image[5, 5]) == (200, 100, 2)  # written as BGR (2, 100, 200) -> RGB
    assert f.depth[0, 0] == 0.0
    np.testing.assert_allclose(f.depth[1, 1], 3000 / 5000.0)
    # ground truth interpolated at the rgb stamp (between the 100 Hz samples)
    t = info["rgb_t"][2]
    g = info["gt_t"]
    k = np.searchsorted(g, t) - 1
    a = (t - g[k]) / (g[k + 1] - g[k])
    expected_t = (1 - a) * info["trans"][k] + a * info["trans"][k + 1]
    np.testing.assert_allclose(f.T_world_cam_gt[:3, 3], expected_t, atol=1e-6)
    stamps, poses = src.ground_truth()
    np.testing.assert_allclose(stamps, info["rgb_t"])
    np.testing.assert_allclose(poses[2], f.T_world_cam_gt)


def test_tum_association_drops_unmatched_and_respects_max_dt(tmp_path):
    make_tum(tmp_path / "seq")
    assert len(TumSource(tmp_path / "seq")) == 5
    with pytest.raises(InputError, match="no rgb/depth pairs"):
        TumSource(tmp_path / "seq", max_dt=0.001)


def test_associate_stamps_one_to_one():
    pairs = associate_stamps(np.array([0.0, 0.01, 1.0]), np.array([0.006, 2.0]), 0.02)
    assert pairs == [(1, 0)]  # the closer rgb stamp wins, each depth used once


def test_interpolate_poses_nearest_and_slerp():
    T = np.stack([make_pose(np.eye(3), [0, 0, 0]), make_pose(Rotation.from_rotvec([0, 0, 0.2]).as_matrix(), [1, 0, 0])])
    out = interpolate_poses(np.array([-0.005, 0.25, 5.0]), np.array([0.0, 1.0]), T, max_dt=0.8, max_gap=2.0)
    np.testing.assert_allclose(out[0], T[0])
    np.testing.assert_allclose(out[1][:3, 3], [0.25, 0, 0])
    np.testing.assert_allclose(Rotation.from_matrix(out[1][:3, :3]).as_rotvec(), [0, 0, 0.05], atol=1e-12)
    assert out[2] is None


def test_tum_stride_and_max_frames(tmp_path):
    info = make_tum(tmp_path / "seq", n=7)
    src = TumSource(tmp_path / "seq", stride=2, max_frames=3)
    frames = list(src)
    assert len(src) == 3 and [f.index for f in frames] == [0, 1, 2]
    np.testing.assert_allclose([f.stamp for f in frames], info["rgb_t"][[0, 2, 4]])
    np.testing.assert_allclose(src.ground_truth()[0], info["rgb_t"][[0, 2, 4]])
    with pytest.raises(InputError, match="stride"):
        TumSource(tmp_path / "seq", stride=0)


def test_tum_published_calibration_from_folder_name(tmp_path):
    root = tmp_path / "rgbd_dataset_freiburg1_xyz"
    make_tum(root, n=2, cam=TUM_PUBLISHED[1], calib=False)
    raw = TumSource(root, undistort=False)
    assert raw.camera == TUM_PUBLISHED[1] and raw.camera.distortion
    und = TumSource(root)
    assert und.camera.distortion == ()
    assert und.camera.size == (640, 480)
    frame = next(iter(und))
    assert frame.camera.distortion == ()


def test_tum_missing_calibration_names_the_fix(tmp_path):
    make_tum(tmp_path / "my_recording", calib=False)
    with pytest.raises(CalibrationError, match="--calib"):
        TumSource(tmp_path / "my_recording")
    # the calib argument provides it
    (tmp_path / "cam.yaml").write_text("width: 32\nheight: 24\nfx: 40\nfy: 40\ncx: 16\ncy: 12\n")
    src = open_source(tmp_path / "my_recording", calib=tmp_path / "cam.yaml")
    assert src.camera.fx == 40.0 and len(list(src)) == 5


def test_tum_calib_argument_overrides_file(tmp_path):
    make_tum(tmp_path / "seq")
    other = PinholeCamera(32, 24, 50.0, 50.0, 16.0, 12.0)
    assert TumSource(tmp_path / "seq", calib=other).camera == other


def test_tum_backwards_stamps(tmp_path):
    make_tum(tmp_path / "seq")
    rgb = tmp_path / "seq" / "rgb.txt"
    lines = rgb.read_text().splitlines()
    lines[3], lines[4] = lines[4], lines[3]  # data rows 2 and 3 swapped -> line 5 goes back
    rgb.write_text("\n".join(lines) + "\n")
    with pytest.raises(StampError, match=r"rgb\.txt:5.*backwards"):
        TumSource(tmp_path / "seq")


def test_tum_unreadable_image(tmp_path):
    make_tum(tmp_path / "seq")
    bad = sorted((tmp_path / "seq" / "rgb").iterdir())[1]
    bad.write_bytes(b"not a png at all")
    src = TumSource(tmp_path / "seq")
    it = iter(src)
    next(it)  # frame 0 is fine: images are decoded lazily
    with pytest.raises(InputError, match=bad.name):
        next(it)


def test_tum_image_size_mismatch(tmp_path):
    make_tum(tmp_path / "seq")
    other = PinholeCamera(64, 48, 50.0, 50.0, 32.0, 24.0)
    with pytest.raises(CalibrationError, match="32x24"):
        next(iter(TumSource(tmp_path / "seq", calib=other)))


def test_tum_undistortion_remaps_depth_with_nearest(tmp_path):
    cam = PinholeCamera(64, 48, 60.0, 60.0, 31.5, 23.5, (0.2, -0.1, 0.001, 0.001, 0.0))
    make_tum(tmp_path / "seq", n=2, cam=cam)
    d = (RNG.integers(1, 4, (48, 64)) * 2500).astype(np.uint16)  # 0.5, 1.0, 1.5 m only
    for p in (tmp_path / "seq" / "depth").iterdir():
        write_png(p, d)
    src = TumSource(tmp_path / "seq")
    assert src.camera.distortion == () and cam.distortion
    f = next(iter(src))
    assert set(np.unique(f.depth)) <= {0.0, 0.5, 1.0, 1.5}  # no blended depths
    raw = next(iter(TumSource(tmp_path / "seq", undistort=False)))
    assert raw.camera.distortion == cam.distortion
    assert not np.array_equal(raw.depth, f.depth)


def test_tum_associate_txt_only(tmp_path):
    info = make_tum(tmp_path / "seq", gt=False)
    root = tmp_path / "seq"
    rgb = [l.split() for l in (root / "rgb.txt").read_text().splitlines() if not l.startswith("#")]
    dep = [l.split() for l in (root / "depth.txt").read_text().splitlines() if not l.startswith("#")]
    q = Rotation.from_rotvec([0.1, 0.2, 0.3]).as_quat()
    lines = [f"{r[0]} {r[1]} {d[0]} {d[1]} {r[0]} 1 2 3 {q[0]} {q[1]} {q[2]} {q[3]}" for r, d in zip(rgb, dep)]
    (root / "associate.txt").write_text("\n".join(lines) + "\n")
    (root / "rgb.txt").unlink()
    (root / "depth.txt").unlink()
    src = open_source(root)
    assert isinstance(src, TumSource) and src.has_ground_truth and len(src) == 5
    f = next(iter(src))
    np.testing.assert_allclose(f.T_world_cam_gt, pose_from_quat([1, 2, 3], q))
    np.testing.assert_allclose(f.stamp, info["rgb_t"][0], atol=1e-6)


def test_tum_real_fr2_desk(tum_fr2_desk_50):
    src = open_source(tum_fr2_desk_50)
    assert isinstance(src, TumSource)
    assert len(src) == 50 and src.has_depth and src.has_ground_truth
    assert (src.camera.width, src.camera.height) == (640, 480)
    assert src.camera.distortion == ()
    frames = list(src)
    assert len(frames) == 50
    for f in frames[::7]:
        assert f.image.shape == (480, 640, 3) and f.image.dtype == np.uint8
        valid = f.depth[f.depth > 0]
        assert valid.size > 0.5 * f.depth.size
        assert 0.3 <= np.median(valid) <= 5.0
        assert np.mean((valid >= 0.3) & (valid <= 5.0)) > 0.9
    gt_t, gt_T = read_tum(tum_fr2_desk_50 / "groundtruth.txt")
    np.testing.assert_allclose(frames[0].T_world_cam_gt, gt_T[0], atol=1e-9)
    stamps, poses = src.ground_truth()
    assert len(stamps) == 50
    np.testing.assert_allclose(poses[0], gt_T[0], atol=1e-9)
    assert abs(frames[0].stamp - 1311868164.363181) < 1e-6
    raw = TumSource(tum_fr2_desk_50, undistort=False)
    assert raw.camera.fx == pytest.approx(520.908620) and len(raw.camera.distortion) == 5


# ---------------------------------------------------------------------------------- 7-Scenes
def make_seven_scenes(scene: Path, seqs=(1, 2), n: int = 2) -> dict:
    poses = {}
    for s in seqs:
        d = scene / f"seq-{s:02d}"
        for i in range(n):
            write_png(d / f"frame-{i:06d}.color.png", bgr(640, 480, (s, i, 50)))
            depth = np.full((480, 640), 1500, np.uint16)
            depth[0, :10] = 65535
            depth[1, :10] = 0
            write_png(d / f"frame-{i:06d}.depth.png", depth)
            T = make_pose(Rotation.from_rotvec([0.1 * s, 0.05 * i, 0]).as_matrix(), [s, i, 0.5])
            np.savetxt(d / f"frame-{i:06d}.pose.txt", T, fmt="%.10e", delimiter="\t")
            poses[(s, i)] = T
    (scene / "TrainSplit.txt").write_text("sequence1\n")
    (scene / "TestSplit.txt").write_text("sequence2\n")
    return poses


def test_seven_scenes_scene_and_splits(tmp_path):
    poses = make_seven_scenes(tmp_path / "chess")
    src = SevenScenesSource(tmp_path / "chess", sequences="test")
    assert src.has_depth and src.has_ground_truth
    assert src.camera == PinholeCamera(640, 480, 525.0, 525.0, 320.0, 240.0)
    frames = check_contract(src)
    assert len(frames) == 2
    f = frames[1]
    assert tuple(f.image[0, 0]) == (50, 1, 2)
    assert f.depth[5, 5] == pytest.approx(1.5)
    assert f.depth[0, 0] == 0.0 and f.depth[1, 0] == 0.0  # 65535 and 0 -> no reading
    np.testing.assert_allclose(f.T_world_cam_gt, poses[(2, 1)])
    assert f.stamp == pytest.approx(1 / 30)
    all_src = open_source(tmp_path / "chess")
    assert isinstance(all_src, SevenScenesSource) and len(all_src) == 4
    np.testing.assert_allclose(all_src.ground_truth()[0], np.arange(4) / 30)
    assert len(SevenScenesSource(tmp_path / "chess", sequences=[1, "seq-02"], max_frames=3)) == 3
    with pytest.raises(InputError, match="seq-07"):
        SevenScenesSource(tmp_path / "chess", sequences=[7])


def test_seven_scenes_single_sequence(tmp_path):
    poses = make_seven_scenes(tmp_path / "fire", seqs=(3,), n=3)
    src = open_source(tmp_path / "fire" / "seq-03", stride=2)
    assert isinstance(src, SevenScenesSource) and len(src) == 2
    frames = list(src)
    np.testing.assert_allclose(frames[1].T_world_cam_gt, poses[(3, 2)])
    np.testing.assert_allclose(frames[1].stamp, 2 / 30)


# ---------------------------------------------------------------------------------- KITTI
KITTI_K = np.array([[50.0, 0, 20.0], [0, 50.0, 10.0], [0, 0, 1]])


def kitti_P(offset) -> np.ndarray:
    return np.hstack([KITTI_K, np.asarray(offset, float).reshape(3, 1)])


def make_kitti(root: Path, n: int = 4, seq: str = "05") -> dict:
    d = root / "sequences" / seq
    P = {
        "P0": kitti_P([0, 0, 0]),
        "P1": kitti_P([-50 * 0.54, 0, 0]),
        "P2": kitti_P([50 * 0.06, 0.1, 0.002]),
        "P3": kitti_P([-50 * 0.47, 0.05, 0.003]),
    }
    d.mkdir(parents=True)
    (d / "calib.txt").write_text(
        "".join(f"{k}: " + " ".join(f"{v:.12e}" for v in m.ravel()) + "\n" for k, m in P.items())
        + "Tr: " + " ".join(["0"] * 12) + "\n"
    )
    (d / "times.txt").write_text("".join(f"{0.1 * i:.6e}\n" for i in range(n)))
    for i in range(n):
        for c in (0, 1):
            write_png(d / f"image_{c}" / f"{i:06d}.png", np.full((20, 40), 10 * i + c, np.uint8))
        for c in (2, 3):
            write_png(d / f"image_{c}" / f"{i:06d}.png", bgr(40, 20, (i, c, 99)))
    poses = np.stack(
        [make_pose(Rotation.from_rotvec([0, 0.1 * i, 0.02]).as_matrix(), [0.5 * i, 0, 1.0 * i]) for i in range(n)]
    )
    (root / "poses").mkdir()
    np.savetxt(root / "poses" / f"{seq}.txt", poses[:, :3, :].reshape(n, 12), fmt="%.12e")
    return {"dir": d, "P": P, "poses": poses}


def test_kitti_colour_stereo_intrinsics_baseline_and_poses(tmp_path):
    info = make_kitti(tmp_path)
    src = open_source(info["dir"])
    assert isinstance(src, KittiSource) and src.has_stereo and src.has_ground_truth and not src.has_depth
    np.testing.assert_allclose(src.camera.K, KITTI_K)
    assert src.camera.size == (40, 20)
    frames = check_contract(src)
    assert len(frames) == 4
    f = frames[2]
    assert f.baseline_m == pytest.approx(0.53)
    assert tuple(f.image[0, 0]) == (99, 2, 2) and tuple(f.right_image[0, 0]) == (99, 3, 2)
    assert f.stamp == pytest.approx(0.2)
    # the cam2 pose must reproduce P2's projection of world points
    X = np.array([[1.0, 2.0, 8.0, 1.0], [-3.0, 0.5, 12.0, 1.0]]).T
    p_expected = info["P"]["P2"] @ invert_pose(info["poses"][2]) @ X
    p_ours = KITTI_K @ (invert_pose(f.T_world_cam_gt) @ X)[:3]
    np.testing.assert_allclose(p_ours[:2] / p_ours[2], p_expected[:2] / p_expected[2], atol=1e-9)


def test_kitti_grey_uses_cam0_poses_unchanged(tmp_path):
    info = make_kitti(tmp_path)
    src = KittiSource(info["dir"], color=False, stride=3)
    frames = list(src)
    assert len(frames) == 2 and frames[1].baseline_m == pytest.approx(0.54)
    assert np.all(frames[1].image == 30) and np.all(frames[1].right_image == 31)
    np.testing.assert_allclose(frames[1].T_world_cam_gt, info["poses"][3])
    np.testing.assert_allclose(src.ground_truth()[0], [0.0, 0.3])


def test_kitti_poses_kwarg_and_errors(tmp_path):
    info = make_kitti(tmp_path)
    moved = tmp_path / "gt.txt"
    (tmp_path / "poses" / "05.txt").rename(moved)
    assert not KittiSource(info["dir"]).has_ground_truth
    assert KittiSource(info["dir"], poses=moved).has_ground_truth
    with pytest.raises(InputError, match="not found"):
        KittiSource(info["dir"], poses=tmp_path / "nope.txt")
    (info["dir"] / "image_3" / "000002.png").unlink()
    with pytest.raises(InputError, match="000002.png"):
        KittiSource(info["dir"])
    (info["dir"] / "times.txt").write_text("0.0\n0.2\n0.1\n0.3\n")
    with pytest.raises(StampError, match=r"times\.txt:3"):
        KittiSource(info["dir"], stereo=False)


# ---------------------------------------------------------------------------------- EuRoC
EUROC_SIZE = (48, 32)


def asl_sensor_yaml(T_BS: np.ndarray, intr, dist) -> str:
    return (
        "# General sensor definitions.\nsensor_type: camera\ncomment: test camera\n"
        "T_BS:\n  cols: 4\n  rows: 4\n  data: [" + ", ".join(f"{v:.15g}" for v in T_BS.ravel()) + "]\n"
        "rate_hz: 20\nresolution: [%d, %d]\ncamera_model: pinhole\n" % EUROC_SIZE
        + "intrinsics: [" + ", ".join(map(str, intr)) + "] #fu, fv, cu, cv\n"
        "distortion_model: radial-tangential\n"
        "distortion_coefficients: [" + ", ".join(map(str, dist)) + "]\n"
    )


def make_euroc(root: Path, T_BS0, T_BS1, dist=(0, 0, 0, 0), n: int = 3) -> dict:
    mav = root / "mav0"
    stamps = 1403636579763555584 + np.arange(n, dtype=np.int64) * 50_000_000
    for c, T in (("cam0", T_BS0), ("cam1", T_BS1)):
        cam = mav / c
        cam.mkdir(parents=True)
        (cam / "sensor.yaml").write_text(asl_sensor_yaml(T, [40.0, 40.0, 23.5, 15.5], dist))
        rows = ["#timestamp [ns],filename"]
        for i, s in enumerate(stamps):
            write_png(cam / "data" / f"{s}.png", np.full(EUROC_SIZE[::-1], 100 + 10 * i, np.uint8))
            rows.append(f"{s},{s}.png")
        (cam / "data.csv").write_text("\n".join(rows) + "\n")
    gt = mav / "state_groundtruth_estimate0"
    gt.mkdir()
    gt_ns = stamps[0] - 10_000_000 + np.arange(6 * n, dtype=np.int64) * 10_000_000  # 100 Hz
    rot = Rotation.from_rotvec(np.outer(np.arange(len(gt_ns)), [0.01, 0.03, -0.02]) + [0.3, -1.0, 0.4])
    q_xyzw = rot.as_quat()
    pos = np.stack([np.arange(len(gt_ns)) * 0.01, np.ones(len(gt_ns)), np.full(len(gt_ns), 2.0)], 1)
    rows = [
        "#timestamp, p_RS_R_x [m], p_RS_R_y [m], p_RS_R_z [m], q_RS_w [], q_RS_x [], q_RS_y [], q_RS_z [], "
        "v_RS_R_x [m s^-1], v_RS_R_y [m s^-1], v_RS_R_z [m s^-1], b_w_RS_S_x [rad s^-1], b_w_RS_S_y [rad s^-1], "
        "b_w_RS_S_z [rad s^-1], b_a_RS_S_x [m s^-2], b_a_RS_S_y [m s^-2], b_a_RS_S_z [m s^-2]"
    ]
    for s, p, q in zip(gt_ns, pos, q_xyzw):
        rows.append(f"{s}," + ",".join(f"{v:.12f}" for v in (*p, q[3], q[0], q[1], q[2])) + ",0,0,0,0,0,0,0,0,0")
    (gt / "data.csv").write_text("\n".join(rows) + "\n")
    (gt / "sensor.yaml").write_text(
        "sensor_type: visual-inertial\nT_BS:\n  cols: 4\n  rows: 4\n  data: [1,0,0,0, 0,1,0,0, 0,0,1,0, 0,0,0,1]\n"
    )
    T_world_body = {int(s): pose_from_quat(p, q) for s, p, q in zip(gt_ns, pos, q_xyzw)}
    return {"stamps": stamps, "T_world_body": T_world_body}


T_BS0_EUROC = make_pose(Rotation.from_rotvec([0.02, -0.01, 1.56]).as_matrix(), [-0.02, -0.06, 0.01])


def test_euroc_stereo_gt_quaternion_order_and_extrinsic(tmp_path):
    T_BS1 = T_BS0_EUROC @ make_pose(np.eye(3), [0.11, 0, 0])  # cam1 11 cm along cam0's x
    info = make_euroc(tmp_path / "MH_01_easy", T_BS0_EUROC, T_BS1)
    src = open_source(tmp_path / "MH_01_easy")
    assert isinstance(src, EurocSource) and src.has_stereo and src.has_ground_truth
    frames = check_contract(src)
    assert len(frames) == 3
    f = frames[1]
    assert f.baseline_m == pytest.approx(0.11)
    assert np.all(f.image[10:20, 10:20] == 110)  # grey -> 3 channels, rectification ~ identity
    assert f.stamp == pytest.approx(info["stamps"][1] / 1e9)
    # stamps of frames coincide with gt samples, so no interpolation is involved
    expected = info["T_world_body"][int(info["stamps"][1])] @ T_BS0_EUROC
    np.testing.assert_allclose(f.T_world_cam_gt, expected, atol=1e-6)
    stamps, poses = src.ground_truth()
    np.testing.assert_allclose(stamps, info["stamps"] / 1e9)
    np.testing.assert_allclose(poses[1], expected, atol=1e-6)


def test_euroc_rectified_frame_ground_truth(tmp_path):
    # cam1 rotated and offset: rectification rotates cam0, the gt must follow R_rect^T
    T_cam0_cam1 = make_pose(Rotation.from_rotvec([0.01, 0.03, -0.02]).as_matrix(), [0.1, 0.004, -0.003])
    T_BS1 = T_BS0_EUROC @ T_cam0_cam1
    info = make_euroc(tmp_path / "V1", T_BS0_EUROC, T_BS1, dist=(-0.05, 0.01, 0.0005, -0.0002))
    src = EurocSource(tmp_path / "V1" / "mav0")
    assert src.camera.distortion == ()
    f = list(src)[2]
    B = f.baseline_m
    assert B == pytest.approx(np.linalg.norm(T_cam0_cam1[:3, 3]), rel=1e-6)
    T_world_body = info["T_world_body"][int(info["stamps"][2])]
    c0 = (T_world_body @ T_BS0_EUROC)[:3, 3]
    c1 = (T_world_body @ T_BS1)[:3, 3]
    np.testing.assert_allclose(f.T_world_cam_gt[:3, 3], c0, atol=1e-9)
    # the right camera sits at +B along the rectified x axis
    np.testing.assert_allclose((f.T_world_cam_gt @ [B, 0, 0, 1])[:3], c1, atol=1e-6)
    Rw = f.T_world_cam_gt[:3, :3]
    np.testing.assert_allclose(Rw.T @ Rw, np.eye(3), atol=1e-9)
    # mono: cam0 only undistorted, gt is T_world_body @ T_body_cam0
    mono = EurocSource(tmp_path / "V1", stereo=False, max_frames=1)
    g = next(iter(mono))
    assert not mono.has_stereo and g.right_image is None and mono.camera.distortion == ()
    np.testing.assert_allclose(g.T_world_cam_gt, info["T_world_body"][int(info["stamps"][0])] @ T_BS0_EUROC, atol=1e-6)
    assert EurocSource(tmp_path / "V1", undistort=False).camera.distortion


def _blob(size, uv, sigma=1.2) -> np.ndarray:
    w, h = size
    u, v = np.meshgrid(np.arange(w), np.arange(h))
    return np.clip(255 * np.exp(-((u - uv[0]) ** 2 + (v - uv[1]) ** 2) / (2 * sigma**2)), 0, 255).astype(np.uint8)


def _centroid(img: np.ndarray) -> np.ndarray:
    g = img[..., 0].astype(np.float64)
    g[g < 20] = 0
    v, u = np.mgrid[: g.shape[0], : g.shape[1]]
    return np.array([(g * u).sum(), (g * v).sum()]) / g.sum()


def test_euroc_rectified_images_agree_with_pose_and_baseline(tmp_path):
    """A world point drawn into the raw images lands where the rectified camera, gt pose and baseline say."""
    T_cam0_cam1 = make_pose(Rotation.from_rotvec([0.01, 0.03, -0.02]).as_matrix(), [0.1, 0.004, -0.003])
    T_BS1 = T_BS0_EUROC @ T_cam0_cam1
    dist = (-0.05, 0.01, 0.0005, -0.0002)
    info = make_euroc(tmp_path / "seq", T_BS0_EUROC, T_BS1, dist=dist, n=1)
    T_world_cam0 = info["T_world_body"][int(info["stamps"][0])] @ T_BS0_EUROC
    X_world = (T_world_cam0 @ [0.04, -0.02, 1.0, 1.0])[:3]
    K = np.array([[40.0, 0, 23.5], [0, 40.0, 15.5], [0, 0, 1]])
    for cam, T_world_cam in (("cam0", T_world_cam0), ("cam1", T_world_cam0 @ T_cam0_cam1)):
        Xc = (invert_pose(T_world_cam) @ [*X_world, 1.0])[:3]
        uv, _ = cv2.projectPoints(Xc.reshape(1, 3), np.zeros(3), np.zeros(3), K, np.array(dist))
        write_png(tmp_path / "seq" / "mav0" / cam / "data" / f"{info['stamps'][0]}.png", _blob(EUROC_SIZE, uv.ravel()))
    src = EurocSource(tmp_path / "seq")
    f = next(iter(src))
    X_rect = (invert_pose(f.T_world_cam_gt) @ [*X_world, 1.0])[:3]
    uv_left = (src.camera.K @ X_rect)[:2] / X_rect[2]
    uv_right = uv_left - [src.camera.fx * f.baseline_m / X_rect[2], 0.0]
    np.testing.assert_allclose(_centroid(f.image), uv_left, atol=0.25)
    np.testing.assert_allclose(_centroid(f.right_image), uv_right, atol=0.25)


def test_euroc_backwards_stamps(tmp_path):
    make_euroc(tmp_path / "seq", T_BS0_EUROC, T_BS0_EUROC @ make_pose(np.eye(3), [0.1, 0, 0]))
    csv = tmp_path / "seq" / "mav0" / "cam0" / "data.csv"
    lines = csv.read_text().splitlines()
    lines[2], lines[3] = lines[3], lines[2]
    csv.write_text("\n".join(lines) + "\n")
    with pytest.raises(StampError, match=r"cam0.data\.csv:4"):
        EurocSource(tmp_path / "seq")


# ---------------------------------------------------------------------------------- image folder
def test_image_folder_numeric_stamps_and_undistortion(tmp_path):
    cam = PinholeCamera(32, 24, 30.0, 30.0, 15.5, 11.5, (0.1, -0.05, 0.0, 0.0, 0.0))
    for s in ("1311868164.400000", "1311868164.363181", "1311868164.433000"):
        write_png(tmp_path / f"{s}.png", bgr(32, 24))
    write_yaml(tmp_path / "intrinsics.yaml", cam)
    src = open_source(tmp_path)
    assert isinstance(src, ImageFolderSource)
    assert not (src.has_depth or src.has_stereo or src.has_ground_truth)
    assert src.camera.distortion == ()
    frames = check_contract(src)
    np.testing.assert_allclose([f.stamp for f in frames], [1311868164.363181, 1311868164.4, 1311868164.433])
    assert ImageFolderSource(tmp_path, undistort=False).camera == cam


def test_image_folder_names_fps_grey_and_16bit(tmp_path):
    write_png(tmp_path / "img10.png", np.full((24, 32), 7, np.uint8))
    write_png(tmp_path / "img2.jpg", bgr(32, 24, (0, 0, 255)))
    write_png(tmp_path / "img1.png", np.full((24, 32, 3), 40000, np.uint16))
    (tmp_path / "camera.yaml").write_text("width: 32\nheight: 24\nfx: 30\nfy: 30\ncx: 16\ncy: 12\n")
    src = ImageFolderSource(tmp_path, fps=10)
    frames = list(src)
    np.testing.assert_allclose([f.stamp for f in frames], [0.0, 0.1, 0.2])
    assert np.all(frames[0].image == 40000 >> 8)
    assert frames[1].image[5, 5, 0] > 200 and frames[1].image[5, 5, 2] < 50  # red, RGB order
    assert np.all(frames[2].image == 7) and frames[2].image.shape == (24, 32, 3)


def test_image_folder_frame_numbers_and_missing_calib(tmp_path):
    for i in (0, 1, 3):
        write_png(tmp_path / f"{i:06d}.png", bgr(32, 24))
    with pytest.raises(CalibrationError, match="--calib"):
        open_source(tmp_path)
    src = open_source(tmp_path, calib=PinholeCamera(32, 24, 30.0, 30.0, 16.0, 12.0), fps=30)
    np.testing.assert_allclose([f.stamp for f in src], [0, 1 / 30, 3 / 30])


def test_read_color_and_depth_errors(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG garbage")
    with pytest.raises(InputError, match="bad.png"):
        read_color(bad)
    with pytest.raises(InputError, match="not found"):
        read_color(tmp_path / "missing.png")
    write_png(tmp_path / "grey8.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(EncodingError, match="16-bit"):
        read_depth(tmp_path / "grey8.png", 1000.0)
    write_png(tmp_path / "d.png", np.array([[0, 65535], [1000, 2000]], np.uint16))
    np.testing.assert_allclose(read_depth(tmp_path / "d.png", 1000.0, invalid=65535), [[0, 0], [1, 2]])


# ---------------------------------------------------------------------------------- open_source
def test_open_source_detects_layouts(tmp_path):
    make_tum(tmp_path / "tum")
    make_seven_scenes(tmp_path / "7s", seqs=(1,), n=1)
    kitti = make_kitti(tmp_path / "kitti", n=1)
    make_euroc(tmp_path / "euroc", T_BS0_EUROC, T_BS0_EUROC @ make_pose(np.eye(3), [0.1, 0, 0]), n=1)
    assert detect_layout(tmp_path / "tum") == "tum"
    assert detect_layout(tmp_path / "7s") == "7scenes"
    assert detect_layout(tmp_path / "7s" / "seq-01") == "7scenes"
    assert detect_layout(kitti["dir"]) == "kitti"
    assert detect_layout(tmp_path / "euroc") == "euroc"
    assert detect_layout(tmp_path / "euroc" / "mav0") == "euroc"
    assert isinstance(open_source(kitti["dir"], max_frames=1), KittiSource)
    with pytest.raises(InputError, match="sequences"):
        open_source(tmp_path / "tum", sequences=[1])


def test_open_source_delegates_bags(tmp_path, monkeypatch):
    calls = []

    class FakeBag:
        def __init__(self, path, calib=None, **kwargs):
            calls.append((Path(path), calib, kwargs))

    fake = types.ModuleType("recon_slam.io.bag_reader")
    fake.BagSource = FakeBag
    monkeypatch.setitem(sys.modules, "recon_slam.io.bag_reader", fake)
    (tmp_path / "bag").mkdir()
    (tmp_path / "bag" / "metadata.yaml").write_text("rosbag2_bagfile_information: {}\n")
    (tmp_path / "x.mcap").write_bytes(b"")
    (tmp_path / "y.db3").write_bytes(b"")
    assert isinstance(open_source(tmp_path / "bag", calib="c.yaml", stride=2), FakeBag)
    assert isinstance(open_source(tmp_path / "x.mcap"), FakeBag)
    assert isinstance(open_source(tmp_path / "y.db3"), FakeBag)
    assert calls[0] == (tmp_path / "bag", "c.yaml", {"stride": 2})


def test_open_source_unknown_layout_and_missing_path(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("hello")
    with pytest.raises(InputError) as exc:
        open_source(tmp_path / "empty")
    for word in ("TUM", "7-Scenes", "KITTI", "EuRoC", "image folder", "rosbag2"):
        assert word in str(exc.value)
    with pytest.raises(InputError, match="not found"):
        open_source(tmp_path / "nothing_here")
    assert issubclass(InputError, ReconSlamError)
