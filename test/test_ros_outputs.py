"""The rclpy-free ROS layer: output messages, TF chain, visual odometry, TF buffer, input
decoding, node parameters and the map format. Messages are checked by CDR round trip with
rosbags, and against real rclpy messages when rclpy is importable."""

import json
import math

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from recon_slam.config import ConfigError
from recon_slam.errors import CalibrationError, EncodingError, InputError
from recon_slam.geometry.camera import PinholeCamera
from recon_slam.geometry.transforms import invert_pose, make_pose
from recon_slam.io.messages import (
    RosbagsTypes,
    make_camera_info,
    make_image,
    pointcloud2_to_numpy,
    pose_to_matrix,
    transform_to_matrix,
)
from recon_slam.io.ros_inputs import LatestSlot, frame_from_messages
from recon_slam.io.ros_outputs import (
    DIAG_ERROR,
    DIAG_OK,
    DIAG_WARN,
    FrameNames,
    NodeStatus,
    OutputPolicy,
    RosOutputs,
    VisualOdometry,
    default_T_base_cam,
    output_topics,
)
from recon_slam.io.tf_buffer import TfBuffer, TfLookupError
from recon_slam.maps import MAP_VERSION

TYPES = RosbagsTypes()
CAM = PinholeCamera(160, 120, 120.0, 120.0, 79.5, 59.5)


def _random_pose(rng, scale=1.0):
    return make_pose(Rotation.random(random_state=rng).as_matrix(), rng.normal(size=3) * scale)


def _roundtrip(msg, msgtype):
    return TYPES.deserialize(TYPES.serialize(msg, msgtype), msgtype)


def _tf_map(transforms):
    return {(t.header.frame_id, t.child_frame_id): transform_to_matrix(t) for t in transforms}


# ------------------------------------------------------------------------------ frames
def test_default_extrinsic_maps_optical_axes_to_body_axes():
    R = default_T_base_cam()[:3, :3]
    np.testing.assert_allclose(R @ [0, 0, 1], [1, 0, 0], atol=1e-12)  # optical forward -> x forward
    np.testing.assert_allclose(R @ [1, 0, 0], [0, -1, 0], atol=1e-12)  # image right -> -y (right)
    np.testing.assert_allclose(R @ [0, 1, 0], [0, 0, -1], atol=1e-12)  # image down -> -z


def test_output_topics_resolve_node_namespace():
    topics = output_topics("recon_slam")
    assert topics["/recon_slam/odometry"] == "nav_msgs/msg/Odometry"
    assert topics["/recon_slam/map_cloud"] == "sensor_msgs/msg/PointCloud2"
    assert topics["/diagnostics"] == "diagnostic_msgs/msg/DiagnosticArray"
    assert "/tf" in topics and "/tf_static" in topics
    assert "/robot1/recon_slam/pose" in output_topics("recon_slam", "/robot1")


@pytest.mark.parametrize("publish_odom_tf", [True, False])
def test_tf_chain_composes_to_the_engine_pose(publish_odom_tf):
    rng = np.random.default_rng(0)
    T_base_cam = _random_pose(rng, 0.2)
    out = RosOutputs(TYPES, FrameNames(camera="cam_opt"), T_base_cam, publish_odom_tf=publish_odom_tf)
    T_odom_base_robot = _random_pose(rng)
    for k in range(5):
        T_world_cam = _random_pose(rng) if k == 0 else T_world_cam @ make_pose(np.eye(3), [0.01, 0, 0.02])
        ext = None if publish_odom_tf else T_odom_base_robot @ make_pose(np.eye(3), [0.02 * k, 0, 0])
        o = out.frame_outputs(10.0 + k, T_world_cam, "tracking", ext)
        tf = _tf_map(o.transforms)
        assert ("map", "odom") in tf
        assert (("odom", "base_link") in tf) == publish_odom_tf
        T_odom_base = tf[("odom", "base_link")] if publish_odom_tf else ext
        T_map_cam = tf[("map", "odom")] @ T_odom_base @ T_base_cam
        np.testing.assert_allclose(T_map_cam, out.T_map_world @ T_world_cam, atol=1e-9)
        np.testing.assert_allclose(pose_to_matrix(o.pose.pose), T_map_cam @ invert_pose(T_base_cam), atol=1e-9)
        T_vo = pose_to_matrix(o.odometry.pose.pose)  # the Odometry message is always our visual odometry
        np.testing.assert_allclose(T_vo, out.odometry.T_odom_base, atol=1e-9)
        if publish_odom_tf:
            np.testing.assert_allclose(T_vo, T_odom_base, atol=1e-9)
    statics = _tf_map(out.static_transforms(10.0))
    np.testing.assert_allclose(statics[("base_link", "cam_opt")], T_base_cam, atol=1e-9)


def test_map_frame_starts_at_the_first_base_pose():
    out = RosOutputs(TYPES)
    o = out.frame_outputs(1.0, np.eye(4), "initialising")
    np.testing.assert_allclose(o.T_map_base, np.eye(4), atol=1e-12)
    np.testing.assert_allclose(o.T_map_odom, np.eye(4), atol=1e-12)


def test_visual_odometry_is_continuous_across_jumps():
    vo = VisualOdometry(jump_m=0.3, jump_rad=0.5)
    step = make_pose(np.eye(3), [0.05, 0, 0])
    T = np.eye(4)
    for k in range(3):
        vo.update(k * 0.1, T, "tracking")
        T = T @ step
    before = vo.T_odom_base.copy()
    jumped = T @ make_pose(np.eye(3), [1.0, 0.5, 0])  # relocalisation moved the map pose by > 1 m
    after = vo.update(0.3, jumped, "relocalised")
    np.testing.assert_allclose(after, before, atol=1e-12)
    assert vo.n_jumps == 1
    nxt = vo.update(0.4, jumped @ step, "tracking")
    np.testing.assert_allclose(nxt, before @ step, atol=1e-12)
    np.testing.assert_allclose(vo.twist[:3], [0.5, 0, 0], atol=1e-9)  # 0.05 m in 0.1 s


def test_lost_frame_keeps_tf_alive_without_odometry():
    out = RosOutputs(TYPES)
    out.frame_outputs(1.0, np.eye(4), "tracking")
    o = out.frame_outputs(1.1, np.eye(4), "lost")
    assert o.odometry is None and o.pose is None
    assert {(t.header.frame_id, t.child_frame_id) for t in o.transforms} == {("map", "odom"), ("odom", "base_link")}
    assert all(t.header.stamp.sec == 1 and t.header.stamp.nanosec == 100_000_000 for t in o.transforms)


def test_messages_round_trip_with_frames_and_stamps():
    rng = np.random.default_rng(1)
    out = RosOutputs(TYPES, policy=OutputPolicy(cloud_max_points=500))
    o = out.frame_outputs(12.5, _random_pose(rng), "tracking")
    odom = _roundtrip(o.odometry, "nav_msgs/msg/Odometry")
    assert (odom.header.frame_id, odom.child_frame_id) == ("odom", "base_link")
    assert (odom.header.stamp.sec, odom.header.stamp.nanosec) == (12, 500_000_000)
    cov = np.asarray(odom.pose.covariance).reshape(6, 6)
    assert np.all(np.diag(cov) > 0) and np.allclose(cov, np.diag(np.diag(cov)))
    pose = _roundtrip(o.pose, "geometry_msgs/msg/PoseStamped")
    assert pose.header.frame_id == "map"
    tfm = _roundtrip(out.tf_message(o.transforms), "tf2_msgs/msg/TFMessage")
    assert [t.child_frame_id for t in tfm.transforms] == ["odom", "base_link"]

    stamps = np.arange(5) * 0.1 + 12.0
    T = np.stack([_random_pose(rng) for _ in range(5)])
    T[2, 0, 0] = np.nan  # a frame without a pose is left out
    path = _roundtrip(out.path_msg(12.5, stamps, T), "nav_msgs/msg/Path")
    assert path.header.frame_id == "map" and len(path.poses) == 4
    assert all(p.header.frame_id == "map" for p in path.poses)
    np.testing.assert_allclose(pose_to_matrix(path.poses[0].pose), out.map_base_from_world_cam(T[0]), atol=1e-6)

    xyz = rng.normal(size=(1000, 3))
    rgb = rng.integers(0, 256, size=(1000, 3)).astype(np.uint8)
    cloud = _roundtrip(out.cloud_msg(12.5, xyz, rgb), "sensor_msgs/msg/PointCloud2")
    assert cloud.header.frame_id == "map" and cloud.point_step == 16 and cloud.width == 500
    assert [(f.name, f.offset, f.datatype) for f in cloud.fields] == [
        ("x", 0, 7), ("y", 4, 7), ("z", 8, 7), ("rgb", 12, 7)]
    back_xyz, back_rgb = pointcloud2_to_numpy(cloud)
    np.testing.assert_allclose(back_xyz, (xyz[::2] @ out.T_map_world[:3, :3].T).astype(np.float32), atol=1e-5)
    np.testing.assert_array_equal(back_rgb, rgb[::2])

    T_kf = np.stack([_random_pose(rng) for _ in range(3)])
    markers = _roundtrip(out.markers_msg(12.5, T_kf, CAM, ids=[4, 7, 9]), "visualization_msgs/msg/MarkerArray")
    assert markers.markers[0].action == 3  # DELETEALL first
    frustums = [m for m in markers.markers if m.ns == "keyframes"]
    assert [m.id for m in frustums] == [4, 7, 9] and all(m.type == 5 for m in frustums)
    assert all(m.header.frame_id == "map" for m in markers.markers)
    edges = [m for m in markers.markers if m.ns == "keyframes_edges"]
    assert len(edges) == 1 and len(edges[0].points) == 4  # consecutive keyframes by default


def test_diagnostics_levels_and_values():
    out = RosOutputs(TYPES)
    for state, level in (("tracking", DIAG_OK), ("relocalised", DIAG_OK), ("lost", DIAG_WARN),
                         ("waiting_for_data", DIAG_WARN), ("error", DIAG_ERROR)):
        st = NodeStatus(state=state, reason="" if level == DIAG_OK else "because", fps=12.3, n_keyframes=4)
        msg = _roundtrip(out.diagnostics_msg(3.0, st), "diagnostic_msgs/msg/DiagnosticArray")
        s = msg.status[0]
        assert s.level == level
        values = {kv.key: kv.value for kv in s.values}
        assert values["state"] == state and values["fps"] == "12.30" and values["keyframes"] == "4"
        assert s.message.startswith(state)


def test_output_schedule_follows_stream_time_and_keyframes():
    out = RosOutputs(TYPES, policy=OutputPolicy(path_period_s=0.2, markers_period_s=1.0, cloud_period_s=2.0))
    assert out.due("path", 0.0, 1)
    assert not out.due("path", 0.1, 1)
    assert out.due("path", 0.15, 2)  # a new keyframe: path now
    assert out.due("path", 0.4, 2)
    assert out.due("cloud", 0.0, 1)
    assert not out.due("cloud", 3.0, 1)  # no new keyframe: nothing new to show
    assert not out.due("cloud", 1.0, 2)  # new keyframe but too soon
    assert out.due("cloud", 2.5, 2)
    assert out.due("cloud", 2.6, 2, force=True)


@pytest.mark.ros
def test_rclpy_messages_equal_rosbags_messages():
    pytest.importorskip("rclpy")
    from rclpy.serialization import deserialize_message, serialize_message

    from diagnostic_msgs.msg import DiagnosticArray
    from nav_msgs.msg import Odometry

    from recon_slam.io.messages import RclpyTypes

    rng = np.random.default_rng(2)
    T = _random_pose(rng)
    a = RosOutputs(TYPES).frame_outputs(5.25, T, "tracking").odometry
    b = RosOutputs(RclpyTypes()).frame_outputs(5.25, T, "tracking").odometry
    b = deserialize_message(serialize_message(b), Odometry)
    assert (b.header.frame_id, b.child_frame_id) == (a.header.frame_id, a.child_frame_id)
    np.testing.assert_allclose(pose_to_matrix(b.pose.pose), pose_to_matrix(a.pose.pose), atol=1e-12)
    np.testing.assert_allclose(np.asarray(b.pose.covariance), np.asarray(a.pose.covariance))
    st = NodeStatus(state="lost", reason="too few matches")
    d = RosOutputs(RclpyTypes()).diagnostics_msg(1.0, st)
    d = deserialize_message(serialize_message(d), DiagnosticArray)
    assert d.status[0].level == bytes([DIAG_WARN])  # the byte survives serialisation
    assert d.status[0].message == "lost: too few matches"


# ------------------------------------------------------------------------------ TF buffer
def _ts(parent, child, T, stamp):
    from recon_slam.io.messages import make_transform_stamped

    return make_transform_stamped(TYPES, T, stamp, parent, child)


def test_tf_buffer_chains_and_interpolates():
    rng = np.random.default_rng(3)
    T_base_link = _random_pose(rng, 0.1)
    T_link_opt = default_T_base_cam()
    buf = TfBuffer()
    buf.add(_ts("base_link", "camera_link", T_base_link, 0.0), static=True)
    buf.add(_ts("/camera_link", "camera_optical", T_link_opt, 0.0), static=True)
    np.testing.assert_allclose(buf.lookup("base_link", "camera_optical", static_only=True), T_base_link @ T_link_opt,
                               atol=1e-12)
    np.testing.assert_allclose(buf.lookup("camera_optical", "base_link"), invert_pose(T_base_link @ T_link_opt),
                               atol=1e-12)
    buf.add(_ts("odom", "base_link", make_pose(np.eye(3), [0, 0, 0]), 1.0))
    buf.add(_ts("odom", "base_link", make_pose(Rotation.from_euler("z", 0.2).as_matrix(), [1, 0, 0]), 2.0))
    mid = buf.lookup("odom", "base_link", 1.5)
    np.testing.assert_allclose(mid[:3, 3], [0.5, 0, 0], atol=1e-12)
    np.testing.assert_allclose(Rotation.from_matrix(mid[:3, :3]).as_euler("xyz")[2], 0.1, atol=1e-9)
    with pytest.raises(TfLookupError, match="outside the buffered range"):
        buf.lookup("odom", "base_link", 5.0)
    with pytest.raises(TfLookupError, match="dynamic"):
        buf.lookup("odom", "camera_optical", 1.5, static_only=True)
    with pytest.raises(TfLookupError, match="not in the TF tree"):
        buf.lookup("map", "base_link")


# ------------------------------------------------------------------------------ inputs
def _rgbd_msgs(stamp=1.0, encoding="rgb8"):
    img = np.zeros((120, 160, 3), np.uint8)
    img[:, :, 0] = np.arange(160, dtype=np.uint8)[None, :]
    depth = np.full((120, 160), 1.5, np.float32)
    image = make_image(TYPES, img, "rgb8", stamp, "cam_opt")
    if encoding != "rgb8":
        image.encoding = encoding
    return image, make_image(TYPES, depth, "16UC1", stamp, "cam_opt"), make_camera_info(TYPES, CAM, stamp, "cam_opt")


def test_frame_from_messages_rgbd():
    image, depth, info = _rgbd_msgs(3.5)
    f = frame_from_messages(7, "rgbd", image, info, depth_msg=depth)
    assert f.index == 7 and f.stamp == 3.5 and f.frame_id == "cam_opt"
    assert f.image.shape == (120, 160, 3) and f.depth.dtype == np.float32
    np.testing.assert_allclose(f.depth, 1.5)
    assert f.camera == CAM


@pytest.mark.parametrize(
    "case, error, words",
    [
        ("no_info", CalibrationError, "no camera_info received"),
        ("encoding", EncodingError, "yuv422"),
        ("mode", InputError, "not one of rgbd, stereo, mono"),
        ("no_depth", InputError, "needs a depth image"),
        ("size", CalibrationError, "camera_info says"),
    ],
)
def test_frame_from_messages_explains_problems(case, error, words):
    image, depth, info = _rgbd_msgs(encoding="yuv422" if case == "encoding" else "rgb8")
    kwargs = dict(depth_msg=None if case == "no_depth" else depth, topics={"image": "/cam/image"})
    if case == "size":
        info = make_camera_info(TYPES, CAM.scaled(320, 240), 1.0, "cam_opt")
    with pytest.raises(error, match=words):
        frame_from_messages(0, "lidar" if case == "mode" else "rgbd", image, None if case == "no_info" else info, **kwargs)


def test_frame_from_messages_mono_uses_camera_info_when_present():
    image, _, info = _rgbd_msgs()
    f = frame_from_messages(3, "mono", image, info)
    assert f.depth is None and f.right_image is None and f.camera.fx == pytest.approx(CAM.fx)
    g = frame_from_messages(4, "mono", image, None)  # uncalibrated: a nominal camera of the image size
    assert g.depth is None and (g.camera.width, g.camera.height) == (f.camera.width, f.camera.height)
    assert g.stamp == f.stamp and g.index == 4


def test_latest_slot_keeps_only_the_newest():
    slot = LatestSlot()
    for i in range(5):
        slot.put(i)
    assert slot.take(0.0) == 4 and slot.dropped == 4 and slot.offered == 5
    assert slot.take(0.01) is None


# ------------------------------------------------------------------------------ parameters
def test_node_parameters_validate_with_clear_errors():
    from recon_slam.ros.params import engine_config_from_params, extrinsic_from_values, node_settings_from_params

    s = node_settings_from_params({"sync_tolerance": 0.05, "map_frame": "world", "extrinsic": [0.1, 0, 0.2, 0, 0, 0, 1]})
    assert s.sync_tolerance == 0.05 and s.frames.map == "world"
    np.testing.assert_allclose(s.extrinsic[:3, 3], [0.1, 0, 0.2])
    with pytest.raises(ConfigError, match="'image_transport'"):
        node_settings_from_params({"image_transport": "theora"})
    with pytest.raises(ConfigError, match="'sync_tolerance' must be >= 0"):
        node_settings_from_params({"sync_tolerance": -1.0})
    with pytest.raises(ConfigError, match="'publish_tf' expects bool"):
        node_settings_from_params({"publish_tf": "yes"})
    with pytest.raises(ConfigError, match="must differ"):
        node_settings_from_params({"odom_frame": "map"})
    with pytest.raises(ConfigError, match="7 values"):
        extrinsic_from_values([1.0, 2.0])
    np.testing.assert_allclose(extrinsic_from_values([0, 0, 0, 0, 0, math.pi / 2])[:3, :3],
                               Rotation.from_euler("z", 90, degrees=True).as_matrix(), atol=1e-12)
    assert engine_config_from_params({"tracking.huber_k": 2}).tracking.huber_k == 2.0
    with pytest.raises(ConfigError, match="parameter 'tracking.huber_k' must be > 0"):
        engine_config_from_params({"tracking.huber_k": -1.0})
    with pytest.raises(ConfigError, match="MASt3R"):
        engine_config_from_params({"mode": "mono"})


def test_parameter_presets_hold_only_known_parameters():
    from conftest import REPO_ROOT

    from recon_slam.ros.params import engine_config_from_params, node_settings_from_params, read_params_file, split_params

    presets = {p.name: p for p in (REPO_ROOT / "config").glob("*.yaml")}
    for name in ("realsense_rgbd.yaml", "stereo_camera.yaml", "mono_camera.yaml"):
        assert name in presets
        flat = read_params_file(presets[name])
        engine, node, unknown = split_params(flat)
        assert not unknown, (name, unknown)
        node_settings_from_params(node)
        if engine.get("mode") == "mono":
            with pytest.raises(ConfigError, match="MASt3R"):
                engine_config_from_params(engine)
        else:
            assert engine_config_from_params(engine).mode == engine["mode"]


# ------------------------------------------------------------------------------ maps
def _map_data(n=3, seed=0):
    from recon_slam.maps import KeyframeData, MapData

    rng = np.random.default_rng(seed)
    kfs = []
    for i in range(n):
        kfs.append(KeyframeData(
            id=i, frame_index=10 * i, stamp=1.0 + i, T_world_kf=_random_pose(rng),
            X=rng.normal(size=(12, 16, 3)).astype(np.float32), C=rng.random((12, 16)).astype(np.float32),
            image=rng.integers(0, 255, (12, 16, 3)).astype(np.uint8), camera=CAM.scaled(16, 12), n_fused=3))
    cloud = (rng.normal(size=(50, 3)).astype(np.float32), rng.integers(0, 255, (50, 3)).astype(np.uint8))
    return MapData(keyframes=kfs, mode="rgbd", config={"mode": "rgbd"}, T_map_world=_random_pose(rng), cloud=cloud,
                   trajectory=(np.arange(4.0), np.stack([np.eye(4)] * 4)))


def test_map_round_trip(tmp_path):
    from recon_slam.maps import load_map, save_map

    data = _map_data()
    save_map(data, tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "metadata.json").read_text())
    assert meta["format"] == "recon_slam_map" and meta["version"] == MAP_VERSION and meta["n_keyframes"] == 3
    assert set(meta["files"]) >= {"keyframes.npz", "kf_000000.npz", "cloud.ply", "trajectory.txt"}
    back = load_map(tmp_path / "m", with_cloud=True)
    assert [k.id for k in back.keyframes] == [0, 1, 2] and back.mode == "rgbd"
    for a, b in zip(data.keyframes, back.keyframes):
        np.testing.assert_array_equal(a.X, b.X)
        np.testing.assert_array_equal(a.image, b.image)
        np.testing.assert_allclose(a.T_world_kf, b.T_world_kf)
        assert a.camera == b.camera and b.n_fused == 3
    np.testing.assert_allclose(back.T_map_world, data.T_map_world)
    np.testing.assert_array_equal(back.cloud[1], data.cloud[1])
    assert not [p for p in tmp_path.iterdir() if p.name != "m"]  # no temporary left over


@pytest.mark.parametrize("step", ["files", "metadata", "swap"])
def test_interrupted_save_never_corrupts_the_existing_map(tmp_path, step):
    from recon_slam.maps import MapError, load_map, save_map

    save_map(_map_data(seed=1), tmp_path / "m")
    with pytest.raises(MapError, match="simulated crash"):
        save_map(_map_data(n=5, seed=2), tmp_path / "m", _fail_after=step)
    back = load_map(tmp_path / "m")  # the old map, from m or (crash between renames) m.old
    assert len(back.keyframes) == 3
    if step == "swap":
        assert "interrupted" in back.metadata["warning"]


def test_damaged_or_missing_map_is_refused_with_a_reason(tmp_path):
    from recon_slam.maps import MapError, load_map, save_map

    with pytest.raises(MapError, match="no map at"):
        load_map(tmp_path / "none")
    save_map(_map_data(), tmp_path / "m")
    with open(tmp_path / "m" / "kf_000001.npz", "r+b") as f:
        f.seek(200)
        f.write(b"\x00\x01\x02")
    with pytest.raises(MapError, match="checksum of kf_000001.npz"):
        load_map(tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "metadata.json").read_text())
    meta["version"] = 99
    (tmp_path / "m" / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(MapError, match="version 99"):
        load_map(tmp_path / "m")


def test_engine_map_save_load_restores_keyframes(tmp_path):
    from recon_slam.maps import load_system_map, save_system_map
    from recon_slam.system import SlamSystem

    from ros_synth import synthetic_frames

    frames = synthetic_frames(12, 160, 120)
    cfg = {"predictor.width": 160, "backend.enabled": False}
    sys_a = SlamSystem(cfg, frames[0].camera)
    try:
        for f in frames[:8]:
            sys_a.process(f)
        ids, _, T_a = sys_a.keyframes()
        save_system_map(sys_a, tmp_path / "map")
    finally:
        sys_a.close()
    sys_b = SlamSystem(cfg, frames[0].camera)
    try:
        load_system_map(sys_b, tmp_path / "map")
        ids_b, _, T_b = sys_b.keyframes()
        assert ids_b == ids
        np.testing.assert_allclose(T_b, T_a, atol=1e-12)
        r = sys_b.process(frames[8])  # relocalises against the loaded keyframes
        assert r.state == "relocalised"
        gt = frames[8].T_world_cam_gt
        T0 = frames[0].T_world_cam_gt
        est_in_gt = T0 @ r.T_world_cam  # engine world = first camera
        assert np.linalg.norm(est_in_gt[:3, 3] - gt[:3, 3]) < 0.02
    finally:
        sys_b.close()


def test_graph_edges_from_the_backend_become_marker_lines():
    from types import SimpleNamespace

    from recon_slam.io.ros_outputs import graph_edges

    edges = [SimpleNamespace(i=3, j=5, kind="sequential"), SimpleNamespace(i=3, j=9, kind="loop"),
             SimpleNamespace(i=1, j=3, kind="sequential")]  # keyframe 1 is not shown any more
    engine = SimpleNamespace(backend=SimpleNamespace(edges=lambda: edges))
    assert graph_edges(engine, [3, 5, 9]) == [(0, 1), (0, 2)]
    assert graph_edges(SimpleNamespace(backend=None), [0, 1]) is None
    out = RosOutputs(TYPES)
    T = np.stack([np.eye(4)] * 3)
    msg = out.markers_msg(1.0, T, CAM, ids=[3, 5, 9], edges=graph_edges(engine, [3, 5, 9]))
    (line,) = [m for m in msg.markers if m.ns == "keyframes_edges"]
    assert len(line.points) == 4


def test_map_cloud_cache_follows_keyframe_poses_and_fusion():
    import torch

    from recon_slam.frontend.keyframes import Keyframe, KeyframeMap
    from recon_slam.io.ros_outputs import MapCloudCache, voxel_downsample

    pts = np.array([[0.0, 0, 0], [0.004, 0.004, 0], [0.3, 0, 0]])
    down, col = voxel_downsample(pts, np.arange(9, dtype=np.uint8).reshape(3, 3), 0.01)
    assert len(down) == 2 and col[0].tolist() == [0, 1, 2]

    cam = CAM.scaled(16, 12)
    X = cam.backproject_depth(torch.full((12, 16), 2.0))
    kmap = KeyframeMap()
    for i in range(2):
        kmap.add(Keyframe(id=i, frame_index=i, stamp=float(i), camera=cam, image=torch.full((12, 16, 3), 100 * i,
                          dtype=torch.uint8), X=X.clone(), C=torch.ones(12, 16)), make_pose(np.eye(3), [5.0 * i, 0, 0]))
    engine = type("E", (), {"keyframe_map": kmap})()
    cache = MapCloudCache(voxel=0.001)
    xyz, rgb = cache.cloud(engine)
    assert len(xyz) == 2 * 12 * 16 and set(np.unique(rgb)) == {0, 100}
    np.testing.assert_allclose(np.sort(np.unique(np.round(xyz[:, 2], 6))), [2.0])
    kmap.set_poses([1], make_pose(np.eye(3), [0, 0, 1.0])[None])  # a loop correction moves keyframe 1
    xyz2, rgb2 = cache.cloud(engine)
    np.testing.assert_allclose(xyz2[rgb2[:, 0] == 100, 2], 3.0, atol=1e-6)
    kf = kmap.get(0)
    kf.set_pointmap(X * 0.5, torch.ones(12, 16), fused=1)  # fusion changed keyframe 0: recomputed
    xyz3, rgb3 = cache.cloud(engine)
    np.testing.assert_allclose(xyz3[rgb3[:, 0] == 0, 2], 1.0, atol=1e-6)
