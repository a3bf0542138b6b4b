"""Synthetic sequence generator: geometry, determinism, sensor models, trajectories, TUM export."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import yaml

from recon_slam.errors import InputError
from recon_slam.geometry.camera import PinholeCamera
from recon_slam.io.frame import Frame
from recon_slam.io.trajectory import read_tum
from recon_slam.synth import (
    DepthNoise,
    SyntheticSequence,
    make_scene,
    make_trajectory,
    render,
    write_tum_folder,
)
from recon_slam.synth.trajectories import camera_pose, revisit_trajectory, step_motion


def _camera(w=80, h=60, fov=65.0) -> PinholeCamera:
    f = (w / 2) / math.tan(math.radians(fov / 2))
    return PinholeCamera(w, h, f, f, (w - 1) / 2, (h - 1) / 2)


def _pose(eye, yaw_deg, pitch_deg=0.0, roll_deg=0.0) -> np.ndarray:
    return camera_pose(np.asarray(eye, float)[None], [math.radians(yaw_deg)], [math.radians(pitch_deg)],
                       [math.radians(roll_deg)])[0]


def _world_rays(cam: PinholeCamera, T: np.ndarray) -> np.ndarray:
    """(H, W, 3) float64 world directions with camera z = 1 (independent of the renderer)."""
    u, v = np.meshgrid(np.arange(cam.width, dtype=float), np.arange(cam.height, dtype=float))
    d_cam = np.stack(((u - cam.cx) / cam.fx, (v - cam.cy) / cam.fy, np.ones_like(u)), axis=-1)
    return d_cam @ T[:3, :3].T


def _backproject(cam: PinholeCamera, T: np.ndarray, depth: np.ndarray) -> np.ndarray:
    return T[:3, 3] + _world_rays(cam, T) * depth[..., None]


@pytest.fixture(scope="module")
def room():
    return make_scene("room", 0)


# ---------------------------------------------------------------------------- scene / geometry
def test_scene_layout(room):
    lo, hi = room.bounds
    np.testing.assert_allclose(hi - lo, [6.0, 5.0, 3.0])
    np.testing.assert_allclose((lo + hi)[:2], 0.0)
    assert lo[2] == 0.0
    names = room.surface_names
    for name in ("floor", "ceiling", "wall_x-", "wall_x+", "wall_y-", "wall_y+"):
        assert room.surface_id(name) == names.index(name)
    assert len(room.objects) >= 10
    # objects are inside the room and rest on something (none floats below the floor)
    for obj in room.objects:
        c = obj.corners()
        assert np.all(c >= lo - 1e-9) and np.all(c <= hi + 1e-9), obj.name
    with pytest.raises(InputError, match="no surface"):
        room.surface_id("nope")


def test_floor_below_horizon_and_camera_up(room):
    cam = _camera()
    r = render(room, cam, _pose([1.5, 0.0, 1.5], 180.0))
    floor = r.surface_id == room.surface_id("floor")
    ceiling = r.surface_id == room.surface_id("ceiling")
    assert floor.any() and ceiling.any()
    rows = np.arange(cam.height)[:, None]
    assert np.all(np.broadcast_to(rows, floor.shape)[floor] > cam.cy)  # floor in the lower half
    assert np.all(np.broadcast_to(rows, ceiling.shape)[ceiling] < cam.cy)


@pytest.mark.parametrize(
    "surface, axis, value",
    [("floor", 2, 0.0), ("ceiling", 2, 3.0), ("wall_x-", 0, -3.0), ("wall_y+", 1, 2.5), ("table_top/+z", 2, 0.75)],
)
def test_depth_equals_analytic_plane_distance(room, surface, axis, value):
    cam = _camera(64, 48)
    sid = room.surface_id(surface)
    poses = [_pose([0.3, 0.2, 1.4], y, p) for y in range(0, 360, 30) for p in (-40, 0, 35)]
    poses.append(_pose([1.45, -0.4, 1.4], -90, -50))  # looking down at the table
    checked = 0
    for T in poses:
        r = render(room, cam, T)
        mask = r.surface_id == sid
        if not mask.any():
            continue
        d = _world_rays(cam, T)[..., axis]
        expected = (value - T[axis, 3]) / d  # ray parameter = depth (camera z = 1)
        np.testing.assert_allclose(r.depth[mask], expected[mask], atol=1e-4, rtol=0)
        checked += int(mask.sum())
    assert checked > 200


def test_backprojected_points_lie_on_their_surfaces(room):
    cam = _camera(64, 48)
    T_all = make_trajectory("handheld", 100, room, seed=3)[::10]
    for T in T_all:
        r = render(room, cam, T)
        p = _backproject(cam, T, r.depth.astype(np.float64))
        for sid in np.unique(r.surface_id):
            surf = room.surfaces[sid]
            q = p[r.surface_id == sid]
            if surf.kind == "plane":
                rel = q - surf.origin
                np.testing.assert_allclose(rel @ surf.normal, 0.0, atol=2e-4)
                u, v = rel @ surf.axis_u, rel @ surf.axis_v
                assert u.min() > -1e-3 and u.max() < surf.size_u + 1e-3, surf.name
                assert v.min() > -1e-3 and v.max() < surf.size_v + 1e-3, surf.name
            else:
                radius = np.linalg.norm(q[:, :2] - surf.center, axis=1)
                np.testing.assert_allclose(radius, surf.radius, atol=2e-4)


def test_images_are_textured_and_shaded(room):
    seq = SyntheticSequence("room", "loop", frames=100, width=80, height=60)
    for i in (0, 25, 50, 75):
        img = seq[i].image.astype(np.float64)
        grey = img.mean(axis=2)
        assert 40 < grey.mean() < 215
        assert (img >= 254).mean() < 0.02 and (img <= 1).mean() < 0.02
        gx, gy = np.abs(np.diff(grey, axis=1)), np.abs(np.diff(grey, axis=0))
        assert (np.maximum(gx[:-1], gy[:, :-1]) > 8).mean() > 0.08  # plenty of texture
    # walls of different orientation get different shading: the same white paint differs
    r = render(room, _camera(), _pose([0.0, 0.0, 1.5], 0.0))
    assert r.normal.shape == (60, 80, 3)


def test_low_resolution_render_is_not_aliased(room):
    # a 80x60 render must look like the area-average of a 4x finer render
    T = _pose([0.2, -0.3, 1.5], 200.0, -20.0)
    small = render(room, _camera(80, 60), T).image.astype(np.float64)
    big = render(room, _camera(320, 240), T).image.astype(np.float64)
    ref = cv2.resize(big, (80, 60), interpolation=cv2.INTER_AREA)
    assert np.abs(small - ref).mean() < 6.0


# ---------------------------------------------------------------------------- determinism
def test_sequence_is_deterministic():
    a = SyntheticSequence("room", "handheld", frames=20, width=64, height=48, seed=1, depth_noise=True)
    b = SyntheticSequence("room", "handheld", frames=20, width=64, height=48, seed=1, depth_noise=True)
    c = SyntheticSequence("room", "handheld", frames=20, width=64, height=48, seed=0, depth_noise=True)
    np.testing.assert_array_equal(a.poses, b.poses)
    for i in (0, 7, 19):
        fa, fb = a[i], b[i]
        np.testing.assert_array_equal(fa.image, fb.image)
        np.testing.assert_array_equal(fa.depth, fb.depth)
    assert np.abs(a.poses - c.poses).max() > 0.1
    assert np.abs(a[0].image.astype(int) - c[0].image.astype(int)).mean() > 5


def test_scene_seed_changes_textures_not_layout():
    s0, s1 = make_scene("room", 0), make_scene("room", 1)
    assert s0.surface_names == s1.surface_names
    T = _pose([0.0, 0.0, 1.5], 90.0, -10.0)
    r0, r1 = render(s0, _camera(), T), render(s1, _camera(), T)
    np.testing.assert_array_equal(r0.depth, r1.depth)
    assert np.abs(r0.image.astype(int) - r1.image.astype(int)).mean() > 5


def test_room_b_is_a_different_scene(room):
    b = make_scene("room_b", 0)
    assert not np.allclose(b.bounds[1], room.bounds[1])
    assert set(b.surface_names) - set(room.surface_names)
    cam = _camera()
    diffs = []
    for yaw in (0, 90, 180, 270):
        T = _pose([0.0, 0.0, 1.4], yaw, -10)
        diffs.append(np.abs(render(room, cam, T).image.astype(int) - render(b, cam, T).image.astype(int)).mean())
    assert min(diffs) > 15


# ---------------------------------------------------------------------------- multi-view consistency
def _reprojection_agreement(cam, fi, fj, T_j):
    """Warp frame i into frame j using depth_i and the poses; returns (fraction of frame i
    pixels visible in j, fraction of visible pixels whose colour matches, median error)."""
    p = _backproject(cam, fi.T_world_cam_gt, fi.depth.astype(np.float64)).reshape(-1, 3)
    pc = (p - T_j[:3, 3]) @ T_j[:3, :3]
    z = pc[:, 2]
    u = cam.fx * pc[:, 0] / z + cam.cx
    v = cam.fy * pc[:, 1] / z + cam.cy
    inside = (z > 0.1) & (u > 0) & (u < cam.width - 1) & (v > 0) & (v < cam.height - 1)
    map_u = u.reshape(cam.height, cam.width).astype(np.float32)
    map_v = v.reshape(cam.height, cam.width).astype(np.float32)
    depth_j = cv2.remap(fj.depth, map_u, map_v, cv2.INTER_NEAREST).reshape(-1)
    visible = inside & (np.abs(depth_j - z) < 0.03 * z)  # not occluded in frame j
    col_j = cv2.remap(fj.image, map_u, map_v, cv2.INTER_LINEAR).reshape(-1, 3).astype(np.float64)
    col_i = fi.image.reshape(-1, 3).astype(np.float64)
    err = np.abs(col_j - col_i).max(axis=1)[visible]
    return visible.mean(), np.mean(err < 30), np.median(err)


@pytest.mark.parametrize("kind, i, j", [("loop", 10, 16), ("handheld", 30, 38), ("reloc", 50, 55)])
def test_poses_are_consistent_with_images(kind, i, j):
    seq = SyntheticSequence("room", kind, frames=100, width=80, height=60, seed=1)
    fi, fj = seq[i], seq[j]
    visible, colour_ok, median_err = _reprojection_agreement(seq.camera, fi, fj, fj.T_world_cam_gt)
    assert visible > 0.4
    assert colour_ok > 0.9 and median_err < 10
    # a pose 20 cm off does not explain the images
    T_bad = fj.T_world_cam_gt.copy()
    T_bad[:3, 3] += 0.2 * fj.T_world_cam_gt[:3, 0]
    _, colour_ok_bad, median_bad = _reprojection_agreement(seq.camera, fi, fj, T_bad)
    assert median_bad > 2 * median_err + 2 and colour_ok_bad < colour_ok


# ---------------------------------------------------------------------------- sensors
def test_depth_noise_model(room):
    cam = _camera(160, 120)
    T = _pose([0.0, 0.0, 1.4], 30.0, -20.0)
    clean = render(room, cam, T)
    model = DepthNoise(quantize=False, hole_fraction=0.05, max_range=10.0, min_range=0.0, grazing_deg=90.0)
    noisy = render(room, cam, T, depth_noise=model, noise_seed=1)
    np.testing.assert_array_equal(noisy.depth_gt, clean.depth)
    assert noisy.image.tobytes() == clean.image.tobytes()
    holes = noisy.depth == 0
    assert abs(holes.mean() - 0.05) < 0.01
    # holes come in blobs, not isolated pixels
    assert (cv2.erode(holes.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0).sum() > 0.3 * holes.sum()
    ok = ~holes
    res = (noisy.depth[ok] - clean.depth[ok]) / model.sigma(clean.depth[ok])
    assert abs(res.std() - 1.0) < 0.08 and abs(res.mean()) < 0.05
    # same seed -> same noise, another seed -> other noise
    again = render(room, cam, T, depth_noise=model, noise_seed=1)
    np.testing.assert_array_equal(again.depth, noisy.depth)
    other = render(room, cam, T, depth_noise=model, noise_seed=2)
    assert not np.array_equal(other.depth, noisy.depth)


def test_depth_noise_range_grazing_and_quantisation(room):
    cam = _camera(160, 120)
    T = _pose([-0.5, 0.3, 1.6], 10.0, -25.0)
    model = DepthNoise(max_range=3.0, min_range=0.5, hole_fraction=0.0, grazing_deg=75.0)
    r = render(room, cam, T, depth_noise=model, noise_seed=0)
    valid = r.depth > 0
    assert np.all(r.depth[valid] <= 3.0) and np.all(r.depth[valid] >= 0.5)
    assert not valid[r.depth_gt > 3.2].any()
    cos_inc = np.abs(np.sum(r.normal * _world_rays(cam, T), axis=-1)) / np.linalg.norm(_world_rays(cam, T), axis=-1)
    assert not valid[cos_inc < math.cos(math.radians(76))].any()
    step = 1.0 / (model.disparity_fb * model.subpixel)
    k = (1.0 / r.depth[valid]) / step
    np.testing.assert_allclose(k, np.round(k), atol=1e-3)  # disparity quantised
    # error grows with depth like a Kinect (sigma ~ z^2)
    err = np.abs(r.depth - r.depth_gt)[valid]
    z = r.depth_gt[valid]
    assert (z < 2.0).sum() > 100 and (z > 2.7).sum() > 100
    assert err[z > 2.7].mean() > 2 * err[z < 2.0].mean()


def test_sequence_depth_noise_option():
    clean = SyntheticSequence("room", "loop", frames=10, width=64, height=48)
    noisy = SyntheticSequence("room", "loop", frames=10, width=64, height=48, depth_noise=True)
    fc, fn = clean[3], noisy[3]
    assert (fc.depth > 0).all()
    assert (fn.depth == 0).mean() > 0.01
    ok = fn.depth > 0
    assert np.abs(fn.depth - fc.depth)[ok].max() < 0.2
    assert not np.array_equal(fn.depth, fc.depth)
    np.testing.assert_array_equal(fn.image, fc.image)


def test_stereo_right_view_and_disparity(room):
    cam = _camera(96, 72)
    T = _pose([0.2, 0.1, 1.5], 150.0, -15.0)
    B = 0.12
    r = render(room, cam, T, stereo_baseline=B)
    T_right = T.copy()
    T_right[:3, 3] += B * T[:3, 0]
    ref = render(room, cam, T_right)
    np.testing.assert_array_equal(r.right_image, ref.image)
    np.testing.assert_array_equal(r.right_depth, ref.depth)
    assert r.baseline_m == B
    # left pixel (u, v) with depth z is seen in the right image at u - fx B / z, same v
    v, u = np.mgrid[0 : cam.height, 0 : cam.width]
    disparity = cam.fx * B / r.depth
    ur = u - disparity
    ui = np.round(ur).astype(int)
    sel = (np.abs(ur - ui) < 0.15) & (ui >= 0)
    same = ref.surface_id[v[sel], ui[sel]] == r.surface_id[sel]
    assert sel.sum() > 500 and same.mean() > 0.95
    z_right = ref.depth[v[sel], ui[sel]][same]
    np.testing.assert_allclose(cam.fx * B / z_right, disparity[sel][same], rtol=0.02)
    col_err = np.abs(ref.image[v[sel], ui[sel]].astype(int) - r.image[sel].astype(int)).max(axis=1)[same]
    assert np.mean(col_err < 30) > 0.9


def test_stereo_sequence_frames():
    seq = SyntheticSequence("room_b", "loop", frames=5, width=64, height=48, stereo=True, baseline_m=0.07)
    assert seq.has_stereo
    f = seq[2]
    assert f.right_image.shape == (48, 64, 3) and f.right_image.dtype == np.uint8
    assert f.baseline_m == 0.07
    assert not np.array_equal(f.right_image, f.image)


# ---------------------------------------------------------------------------- trajectories
@pytest.mark.parametrize("scene_name", ["room", "room_b"])
@pytest.mark.parametrize("kind", ["loop", "reloc", "handheld"])
def test_trajectory_bounds_and_clearance(scene_name, kind):
    scene = make_scene(scene_name, 0)
    for n in (100, 300):
        T = make_trajectory(kind, n, scene, seed=2)
        assert T.shape == (n, 4, 4)
        R = T[:, :3, :3]
        np.testing.assert_allclose(R @ np.swapaxes(R, 1, 2), np.broadcast_to(np.eye(3), R.shape), atol=1e-9)
        dt, dr = step_motion(T)
        assert dt.max() <= 0.03 and dr.max() <= 2.0, (dt.max(), dr.max())
        pos = T[:, :3, 3]
        assert np.all(scene.room.contains(pos))
        assert scene.distance(pos).min() > 0.45  # not inside (nor touching) any object or wall
        # cameras look at surfaces at a usable distance
        cam = _camera(32, 24)
        for Ti in T[:: n // 10]:
            d = render(scene, cam, Ti).depth
            assert (d < 0.5).mean() < 0.1 and np.median(d) > 1.0


def test_loop_closes_and_reloc_differs(room):
    loop = make_trajectory("loop", 300, room, seed=0)
    dt, dr = step_motion(np.stack([loop[-1], loop[0]]))
    assert dt[0] < 0.03 and dr[0] < 2.0  # last frame one step before the first
    # the loop goes around: the gaze covers all directions
    yaw = np.degrees(np.arctan2(loop[:, 1, 2], loop[:, 0, 2]))
    assert np.histogram(yaw, bins=8, range=(-180, 180))[0].min() > 0
    reloc = make_trajectory("reloc", 300, room, seed=0)
    assert abs(np.mean(reloc[:, 2, 3]) - np.mean(loop[:, 2, 3])) > 0.15  # other height
    d = np.linalg.norm(reloc[:, None, :3, 3] - loop[None, :, :3, 3], axis=-1).min(axis=1)
    assert np.median(d) > 0.2  # other path
    # overlapping views: reloc optical axes point in directions the loop also looks at
    ang = np.degrees(np.arccos(np.clip(reloc[:, :3, 2] @ loop[:, :3, 2].T, -1, 1))).min(axis=1)
    assert np.median(ang) < 10


def test_revisit_is_a_second_pass_near_the_reference(room):
    """The relocalisation query pass: every pose 5-20 cm off the mapping path (none coincides
    with a mapping frame), gaze within the set deviations, clear of surfaces, smooth, seeded."""
    loop = make_trajectory("loop", 200, room, seed=0)
    rv = revisit_trajectory(loop, 120, room, seed=0)
    assert rv.shape == (120, 4, 4)
    np.testing.assert_allclose(rv[:, :3, :3] @ rv[:, :3, :3].transpose(0, 2, 1), np.broadcast_to(np.eye(3), (120, 3, 3)),
                               atol=1e-9)
    d = np.linalg.norm(rv[:, None, :3, 3] - loop[None, :, :3, 3], axis=-1).min(axis=1)
    assert d.max() < 0.2 + 0.02  # near the mapped path (the path is sampled, so a little slack)
    assert np.median(d) > 0.05  # but off it
    assert room.distance(rv[:, :3, 3]).min() >= 0.44
    ang = np.degrees(np.arccos(np.clip(np.einsum("qi,mi->qm", rv[:, :3, 2], loop[:, :3, 2]), -1, 1))).min(axis=1)
    assert ang.max() < 15.0  # looks where the map looked
    dt, dr = step_motion(rv)
    assert dt.max() < 0.1 and dr.max() < 6.0  # a smooth path, not scattered poses
    np.testing.assert_array_equal(rv, revisit_trajectory(loop, 120, room, seed=0))
    assert np.abs(rv - revisit_trajectory(loop, 120, room, seed=1)).max() > 0.05
    with pytest.raises(InputError):
        revisit_trajectory(loop[:1], 10, room)
    with pytest.raises(InputError):
        revisit_trajectory(loop, 10, room, offset_m=(0.3, 0.1))


def test_sequence_renders_given_poses(room):
    """Explicit poses (a query pass) render exactly like the same poses of a named trajectory."""
    loop = SyntheticSequence("room", "loop", frames=20, width=64, height=48, seed=0)
    picked = loop.poses[[3, 11, 17]]
    seq = SyntheticSequence("room", width=64, height=48, seed=0, poses=picked)
    assert len(seq) == 3 and "custom" in seq.name
    for f, i in zip(seq, (3, 11, 17)):
        np.testing.assert_array_equal(f.T_world_cam_gt, loop.poses[i])
        np.testing.assert_array_equal(f.image, loop[i].image)
        np.testing.assert_array_equal(f.depth, loop[i].depth)
    with pytest.raises(InputError, match="poses"):
        SyntheticSequence("room", poses=np.eye(4))


def test_trajectory_seed_and_short_sequences(room):
    a, b = make_trajectory("handheld", 120, room, 0), make_trajectory("handheld", 120, room, 0)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - make_trajectory("handheld", 120, room, 1)).max() > 0.1
    short = make_trajectory("loop", 8, room, 0)
    assert short.shape == (8, 4, 4)
    assert np.linalg.norm(short[:, :3, 3] - short[0, :3, 3], axis=1).max() > 0.3  # still a tour


# ---------------------------------------------------------------------------- FrameSource / export
def test_frame_source_contract():
    seq = SyntheticSequence("room", "reloc", frames=6, width=64, height=48, fov_deg=60.0, fps=15.0, seed=0)
    assert len(seq) == 6 and seq.has_depth and seq.has_ground_truth and not seq.has_stereo
    assert isinstance(seq.name, str) and "room" in seq.name
    assert seq.camera.width == 64 and seq.camera.height == 48
    assert seq.camera.fx == pytest.approx(32 / math.tan(math.radians(30)))
    frames = list(seq)
    assert [f.index for f in frames] == list(range(6))
    stamps, poses = seq.ground_truth()
    np.testing.assert_allclose(stamps, np.arange(6) / 15.0)
    for f, t, T in zip(frames, stamps, poses):
        assert isinstance(f, Frame)
        assert f.stamp == t and f.camera == seq.camera
        assert f.image.shape == (48, 64, 3) and f.image.dtype == np.uint8
        assert f.depth.shape == (48, 64) and f.depth.dtype == np.float32
        assert f.right_image is None and f.baseline_m is None
        np.testing.assert_array_equal(f.T_world_cam_gt, T)


def test_write_tum_folder_round_trip(tmp_path):
    seq = SyntheticSequence("room", "handheld", frames=5, width=64, height=48, stereo=True, baseline_m=0.1,
                            depth_noise=True, seed=1)
    out = write_tum_folder(seq, tmp_path / "tum", progress=False)
    assert out == tmp_path / "tum"
    for name in ("rgb.txt", "depth.txt", "groundtruth.txt", "associate.txt", "right.txt", "calibration.yaml"):
        assert (out / name).is_file(), name
    calib = yaml.safe_load((out / "calibration.yaml").read_text())
    assert calib["depth_scale"] == 5000.0 and calib["distortion"] == [] and calib["baseline"] == 0.1
    cam = PinholeCamera.from_yaml(out / "calibration.yaml")
    assert cam == seq.camera
    rgb = [line.split() for line in (out / "rgb.txt").read_text().splitlines() if not line.startswith("#")]
    depth = [line.split() for line in (out / "depth.txt").read_text().splitlines() if not line.startswith("#")]
    assoc = [line.split() for line in (out / "associate.txt").read_text().splitlines() if not line.startswith("#")]
    right = [line.split() for line in (out / "right.txt").read_text().splitlines() if not line.startswith("#")]
    assert len(rgb) == len(depth) == len(assoc) == len(right) == 5
    stamps, poses = read_tum(out / "groundtruth.txt")
    gt_stamps, gt_poses = seq.ground_truth()
    np.testing.assert_allclose(stamps, gt_stamps, atol=1e-6)
    np.testing.assert_allclose(poses, gt_poses, atol=1e-6)
    for k, frame in enumerate(seq):
        assert float(rgb[k][0]) == pytest.approx(frame.stamp, abs=1e-6)
        assert assoc[k][1] == rgb[k][1] and assoc[k][3] == depth[k][1]
        img = cv2.imread(str(out / rgb[k][1]), cv2.IMREAD_COLOR)[:, :, ::-1]
        np.testing.assert_array_equal(img, frame.image)
        raw = cv2.imread(str(out / depth[k][1]), cv2.IMREAD_UNCHANGED)
        assert raw.dtype == np.uint16
        np.testing.assert_allclose(raw / 5000.0, frame.depth, atol=0.5 / 5000.0 + 1e-6)
        np.testing.assert_array_equal(raw == 0, frame.depth == 0)
        right_img = cv2.imread(str(out / right[k][1]), cv2.IMREAD_COLOR)[:, :, ::-1]
        np.testing.assert_array_equal(right_img, frame.right_image)


def test_write_tum_folder_generic_source(tmp_path):
    cam = _camera(16, 12)
    frames = [Frame(i, 100.0 + 0.5 * i, np.full((12, 16, 3), 10 * i, np.uint8), cam) for i in range(3)]
    out = write_tum_folder(frames, tmp_path / "plain", progress=False)
    assert (out / "rgb.txt").is_file() and len(list((out / "rgb").iterdir())) == 3
    assert not (out / "depth.txt").exists() and not (out / "groundtruth.txt").exists()
    assert "baseline" not in yaml.safe_load((out / "calibration.yaml").read_text())
    with pytest.raises(InputError, match="no frames"):
        write_tum_folder([], tmp_path / "empty", progress=False)


# ---------------------------------------------------------------------------- argument checks
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"scene": "kitchen"}, "room, room_b"),
        ({"trajectory": "spiral"}, "loop, reloc, handheld"),
        ({"frames": 1}, "frames"),
        ({"frames": 2.5}, "frames"),
        ({"width": 0}, "width"),
        ({"height": -3}, "height"),
        ({"fov_deg": 170.0}, "fov_deg"),
        ({"stereo": True, "baseline_m": 0.0}, "baseline"),
        ({"seed": -1}, "seed"),
        ({"fps": 0.0}, "fps"),
    ],
)
def test_invalid_sequence_arguments(kwargs, match):
    with pytest.raises(InputError, match=match):
        SyntheticSequence(**kwargs)


def test_invalid_function_arguments(room):
    with pytest.raises(InputError, match="room, room_b"):
        make_scene("garage")
    with pytest.raises(InputError, match="loop, reloc, handheld"):
        make_trajectory("zigzag", 10, room)
    with pytest.raises(InputError, match=">= 2"):
        make_trajectory("loop", 1, room)
    with pytest.raises(InputError, match="distortion"):
        render(room, PinholeCamera(32, 24, 30, 30, 16, 12, (0.1, 0.0, 0.0, 0.0)), np.eye(4))
    with pytest.raises(InputError, match="4, 4"):
        render(room, _camera(), np.eye(3))
    with pytest.raises(InputError, match="outside the room"):
        render(room, _camera(), _pose([-5.0, 0.0, 1.5], 0))
    with pytest.raises(InputError, match="baseline"):
        render(room, _camera(), _pose([0, 0, 1.5], 0), stereo_baseline=-0.1)
