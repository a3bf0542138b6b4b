"""Bag writing (BagWriter, write_source_to_bag) and reading (BagSource), sqlite3 and MCAP."""

import numpy as np
import pytest
import yaml

from recon_slam.errors import CalibrationError, InputError
from recon_slam.geometry.camera import PinholeCamera
from recon_slam.geometry.transforms import look_at
from recon_slam.io.bag_reader import BagSource, detect_topics
from recon_slam.io.bag_writer import BagWriter, write_source_to_bag
from recon_slam.io.frame import Frame

H, W = 24, 32
CAM = PinholeCamera(W, H, 30.0, 31.0, 15.5, 11.5)
BASELINE = 0.12
T0 = 1_700_000_000.0


class ListSource:
    """Minimal list-backed FrameSource."""

    def __init__(self, frames, camera=CAM, gt=True):
        self.frames = frames
        self.camera = camera
        self.name = "fabricated"
        self._gt = gt

    def __len__(self):
        return len(self.frames)

    def __iter__(self):
        return iter(self.frames)

    def ground_truth(self):
        if not self._gt:
            return None
        return (
            np.array([f.stamp for f in self.frames]),
            np.stack([f.T_world_cam_gt for f in self.frames]),
        )


def make_frames(n=6, depth=True, stereo=True, camera=CAM, seed=0):
    rng = np.random.default_rng(seed)
    frames = []
    for i in range(n):
        d = rng.uniform(0.5, 4.0, (H, W)).astype(np.float32) if depth else None
        if d is not None:
            d[0, :3] = 0.0
        frames.append(
            Frame(
                index=i,
                stamp=T0 + i / 30.0,
                image=rng.integers(0, 256, (H, W, 3), dtype=np.uint8),
                camera=camera,
                depth=d,
                right_image=rng.integers(0, 256, (H, W, 3), dtype=np.uint8) if stereo else None,
                baseline_m=BASELINE if stereo else None,
                T_world_cam_gt=look_at([0.1 * i, -1.0, 0.3], [0.0, 0.0, 2.0]),
            )
        )
    return frames


@pytest.fixture(params=["sqlite3", "mcap"])
def storage(request):
    return request.param


def test_write_and_read_back_everything(tmp_path, storage):
    frames = make_frames()
    out = write_source_to_bag(ListSource(frames), tmp_path / "seq", storage=storage, progress=False)
    assert out == tmp_path / "seq" and (out / "metadata.yaml").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["seq"]  # no temporary left over
    src = BagSource(out)
    assert src.topics == {
        "image": "/camera/image",
        "depth": "/camera/depth",
        "camera_info": "/camera/camera_info",
        "right_image": "/camera/right/image",
        "right_camera_info": "/camera/right/camera_info",
    }
    assert len(src) == len(frames) and src.name == "seq"
    assert src.camera == CAM and src.has_depth and src.has_stereo and src.has_ground_truth
    assert src.baseline_m == pytest.approx(BASELINE, abs=1e-12)
    got = list(src)
    assert len(got) == len(frames)
    for a, b in zip(got, frames):
        assert a.index == b.index and a.stamp == b.stamp
        np.testing.assert_array_equal(a.image, b.image)
        np.testing.assert_array_equal(a.depth, b.depth)
        np.testing.assert_array_equal(a.right_image, b.right_image)
        assert a.camera == CAM and a.baseline_m == pytest.approx(BASELINE)
        assert a.frame_id == "camera_optical_frame"
        np.testing.assert_allclose(a.T_world_cam_gt, b.T_world_cam_gt, atol=1e-12)
    stamps, poses = src.ground_truth()
    np.testing.assert_array_equal(stamps, [f.stamp for f in frames])
    np.testing.assert_allclose(poses, np.stack([f.T_world_cam_gt for f in frames]), atol=1e-12)


def test_compressed_topics_round_trip(tmp_path, storage):
    frames = make_frames(n=3)
    for f in frames:  # smooth images so JPEG stays close
        f.image = np.broadcast_to(np.linspace(0, 255, W, dtype=np.uint8)[None, :, None], (H, W, 3)).copy()
        f.right_image = f.image.copy()
    out = write_source_to_bag(ListSource(frames), tmp_path / "c", storage=storage, compressed=True, progress=False)
    src = BagSource(out)
    assert src.topics["image"] == "/camera/image/compressed"
    assert src.topics["depth"] == "/camera/depth/compressedDepth"
    assert src.topics["right_image"] == "/camera/right/image/compressed"
    got = list(src)
    assert len(got) == 3
    for a, b in zip(got, frames):
        assert np.abs(a.image.astype(int) - b.image).mean() < 3
        np.testing.assert_allclose(a.depth, b.depth, atol=5e-4 + 1e-6)


def test_metadata_version_per_distro(tmp_path):
    for distro, version in (("humble", 8), ("jazzy", 9)):
        with BagWriter(tmp_path / distro, storage="sqlite3", distro=distro) as bag:
            bag.write_image("/camera/image", np.zeros((H, W, 3), np.uint8), "rgb8", T0, "cam")
            bag.write_tf([(np.eye(4), "map", "odom")], T0, static=True)
        meta = yaml.safe_load((tmp_path / distro / "metadata.yaml").read_text())["rosbag2_bagfile_information"]
        assert meta["version"] == version
        qos = {t["topic_metadata"]["name"]: t["topic_metadata"]["offered_qos_profiles"] for t in meta["topics_with_message_count"]}
        if distro == "humble":  # Humble parses offered_qos_profiles as one YAML string
            assert all(isinstance(q, str) for q in qos.values())
            assert yaml.safe_load(qos["/tf_static"])[0]["durability"] == 1  # transient local
        else:
            assert qos["/tf_static"][0]["durability"] == "transient_local"


def test_every_typed_writer_helper_reads_back(tmp_path, storage):
    from rosbags.highlevel import AnyReader

    from recon_slam.io import messages as M

    T = look_at([1.0, 2.0, 3.0], [0.0, 0.0, 0.0])
    xyz = np.random.default_rng(1).normal(size=(10, 3)).astype(np.float32)
    rgb = np.random.default_rng(2).integers(0, 256, (10, 3), dtype=np.uint8)
    with BagWriter(tmp_path / "all", storage=storage) as bag:
        bag.write_image("/img", np.zeros((H, W, 3), np.uint8), "bgr8", T0, "cam")
        bag.write_compressed_image("/img/compressed", np.zeros((H, W, 3), np.uint8), T0, "cam", fmt="png")
        bag.write_depth("/depth", np.ones((H, W), np.float32), T0, "cam", encoding="16UC1")
        bag.write_compressed_depth("/depth/compressedDepth", np.ones((H, W), np.float32), T0, "cam")
        bag.write_camera_info("/info", CAM, T0, "cam")
        bag.write_tf([(T, "world", "camera_gt")], T0)
        bag.write_tf([(np.eye(4), "base_link", "camera")], T0, static=True)
        bag.write_odometry("/odom", T, T0, twist=np.arange(6.0))
        bag.write_pose("/pose", T, T0, "map")
        bag.write_path("/path", [T0, T0 + 1], np.stack([T, T]), "map")
        bag.write_pointcloud("/cloud", xyz, rgb, T0, "map")
        bag.write_markers("/markers", np.stack([T, T]), CAM, T0, "map", edges=[(0, 1)])
        assert bag.counts["/tf"] == 1
        with pytest.raises(InputError, match="already holds"):
            bag.write_pose("/odom", T, T0, "map")
    with AnyReader([tmp_path / "all"]) as reader:
        msgs = {c.topic: reader.deserialize(raw, c.msgtype) for c, _, raw in reader.messages()}
    assert set(msgs) == {"/img", "/img/compressed", "/depth", "/depth/compressedDepth", "/info", "/tf", "/tf_static",
                         "/odom", "/pose", "/path", "/cloud", "/markers"}
    assert M.image_to_numpy(msgs["/img"]).shape == (H, W, 3)
    np.testing.assert_array_equal(M.depth_to_metres(msgs["/depth"]), 1.0)
    np.testing.assert_array_equal(M.compressed_depth_to_metres(msgs["/depth/compressedDepth"]), 1.0)
    assert M.camera_info_to_camera(msgs["/info"]) == CAM
    np.testing.assert_allclose(M.transform_to_matrix(msgs["/tf"].transforms[0]), T, atol=1e-12)
    np.testing.assert_allclose(M.pose_to_matrix(msgs["/odom"].pose), T, atol=1e-12)
    np.testing.assert_allclose(M.pose_to_matrix(msgs["/pose"]), T, atol=1e-12)
    assert len(msgs["/path"].poses) == 2
    x2, c2 = M.pointcloud2_to_numpy(msgs["/cloud"])
    np.testing.assert_array_equal(x2, xyz)
    np.testing.assert_array_equal(c2, rgb)
    assert msgs["/markers"].markers[0].action == 3 and len(msgs["/markers"].markers) == 4


def _write_named(path, names, frames, storage="sqlite3", infos=True, depth_offset=0.0):
    """Bag with foreign topic names: names = dict role -> topic."""
    with BagWriter(path, storage=storage) as bag:
        for f in frames:
            if "image" in names:
                bag.write_image(names["image"], f.image, "bgr8", f.stamp, "color_optical")
            if "depth" in names:
                bag.write_image(names["depth"], f.depth, "16UC1", f.stamp + depth_offset, "color_optical")
            if "right_image" in names:
                bag.write_image(names["right_image"], f.right_image, "rgb8", f.stamp, "right_optical")
            if infos:
                for role in ("camera_info", "depth_info", "right_camera_info", "other_info"):
                    if role in names:
                        cam = f.camera if role != "other_info" else PinholeCamera(64, 48, 50, 50, 32, 24)
                        base = BASELINE if role == "right_camera_info" else None
                        bag.write_camera_info(names[role], cam, f.stamp, "x", baseline_m=base)
    return path


def test_auto_detect_realsense_style_names(tmp_path):
    names = {
        "image": "/camera/color/image_raw",
        "depth": "/camera/aligned_depth_to_color/image_raw",
        "camera_info": "/camera/color/camera_info",
        "depth_info": "/camera/aligned_depth_to_color/camera_info",
        "other_info": "/camera/infra1/camera_info",
    }
    frames = make_frames(n=4, stereo=False)
    path = _write_named(tmp_path / "rs", names, frames, depth_offset=0.004)
    with BagWriter(tmp_path / "rs2", storage="sqlite3") as bag:  # plus distractors
        for f in frames:
            bag.write_image("/camera/depth/image_rect_raw", f.depth, "16UC1", f.stamp, "d")
            bag.write_image("/camera/infra1/image_rect_raw", f.image[..., 0], "mono8", f.stamp, "ir")
    assert detect_topics({
        **{t: "sensor_msgs/msg/Image" for t in (names["image"], names["depth"], "/camera/depth/image_rect_raw",
                                                 "/camera/infra1/image_rect_raw")},
        **{t: "sensor_msgs/msg/CameraInfo" for t in (names["camera_info"], names["depth_info"], names["other_info"])},
    }) == {
        "image": names["image"],
        "depth": names["depth"],
        "camera_info": names["camera_info"],
        "right_image": None,
        "right_camera_info": None,
    }
    src = BagSource(path)
    assert src.topics["image"] == names["image"] and src.topics["depth"] == names["depth"]
    assert src.topics["camera_info"] == names["camera_info"] and not src.has_stereo
    got = list(src)
    assert len(got) == 4 and not src.has_ground_truth and src.ground_truth() is None
    for a, b in zip(got, frames):
        np.testing.assert_array_equal(a.image, b.image)  # bgr8 on the wire, RGB out
        np.testing.assert_allclose(a.depth, b.depth, atol=5e-4 + 1e-6)
        assert a.frame_id == "color_optical" and a.T_world_cam_gt is None
    # depth switched off
    assert not BagSource(path, depth_topic="").has_depth
    assert list(BagSource(path, depth_topic=""))[0].depth is None


def test_auto_detect_stereo_names_and_baseline(tmp_path):
    names = {
        "image": "/zed/left/image_rect_color",
        "right_image": "/zed/right/image_rect_color",
        "camera_info": "/zed/left/camera_info",
        "right_camera_info": "/zed/right/camera_info",
    }
    frames = make_frames(n=3, depth=False)
    src = BagSource(_write_named(tmp_path / "zed", names, frames))
    assert src.topics["right_image"] == names["right_image"]
    assert src.topics["right_camera_info"] == names["right_camera_info"]
    assert src.has_stereo and not src.has_depth and src.baseline_m == pytest.approx(BASELINE)
    f = next(iter(src))
    np.testing.assert_array_equal(f.right_image, frames[0].right_image)
    # no right CameraInfo: baseline from the keyword, else CalibrationError
    del names["right_camera_info"]
    path = _write_named(tmp_path / "zed2", names, frames)
    assert BagSource(path, baseline_m=0.3).baseline_m == 0.3
    with pytest.raises(CalibrationError, match="baseline"):
        BagSource(path)


def test_explicit_missing_topic_lists_topics(tmp_path):
    out = write_source_to_bag(ListSource(make_frames(n=2)), tmp_path / "b", storage="sqlite3", progress=False)
    with pytest.raises(InputError) as err:
        BagSource(out, image_topic="/cam/rgb")
    msg = str(err.value)
    assert "/cam/rgb" in msg and "/camera/image [sensor_msgs/msg/Image, 2 msgs]" in msg and "/tf" in msg
    assert "--image-topic" in msg
    with pytest.raises(InputError, match="has type sensor_msgs/msg/CameraInfo"):
        BagSource(out, depth_topic="/camera/camera_info")
    # only non-image topics: no image topic found
    with BagWriter(tmp_path / "noimg", storage="mcap") as bag:
        bag.write_pose("/pose", np.eye(4), T0, "map")
    with pytest.raises(InputError, match="no image topic.*?/pose"):
        BagSource(tmp_path / "noimg")


def test_corrupt_and_missing_bags(tmp_path, storage):
    out = write_source_to_bag(ListSource(make_frames(n=3)), tmp_path / "bad", storage=storage, progress=False)
    data_file = next(p for p in out.iterdir() if p.suffix in (".db3", ".mcap"))
    raw = data_file.read_bytes()
    data_file.write_bytes(b"\x00garbage" * 100)
    with pytest.raises(InputError, match="bad"):
        src = BagSource(out)
        list(src)
    data_file.write_bytes(raw[: len(raw) // 2])  # truncated
    with pytest.raises(InputError):
        src = BagSource(out)
        list(src)
    with pytest.raises(InputError, match="not found"):
        BagSource(tmp_path / "nope")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(InputError, match="metadata.yaml"):
        BagSource(tmp_path / "empty_dir")
    (tmp_path / "broken_meta").mkdir()
    (tmp_path / "broken_meta" / "metadata.yaml").write_text("rosbag2_bagfile_information: [")
    with pytest.raises(InputError):
        BagSource(tmp_path / "broken_meta")


def test_no_camera_info_needs_calib(tmp_path):
    frames = make_frames(n=3, depth=False, stereo=False)
    path = _write_named(tmp_path / "nocal", {"image": "/cam/image_raw"}, frames, infos=False)
    with pytest.raises(CalibrationError) as err:
        BagSource(path)
    assert "--calib" in str(err.value) and "/cam/image_raw" in str(err.value)
    calib = tmp_path / "calib.yaml"
    calib.write_text(yaml.safe_dump(CAM.to_dict()))
    src = BagSource(path, calib=calib)
    assert src.camera == CAM and len(list(src)) == 3
    assert BagSource(path, calib=CAM).camera == CAM
    wrong = PinholeCamera(64, 48, 30, 30, 32, 24)
    with pytest.raises(CalibrationError, match="32x24"):
        list(BagSource(path, calib=wrong))


def test_distortion_is_removed(tmp_path):
    cam = PinholeCamera(W, H, 30.0, 31.0, 15.5, 11.5, (-0.2, 0.05, 0.0, 0.0, 0.0))
    frames = make_frames(n=2, stereo=False, camera=cam)
    out = write_source_to_bag(ListSource(frames, camera=cam), tmp_path / "dist", storage="mcap", progress=False)
    src = BagSource(out)
    assert not src.camera.has_distortion
    f = next(iter(src))
    assert f.camera == src.camera and f.image.shape == (H, W, 3) and f.depth.shape == (H, W)
    raw = BagSource(out, undistort=False)
    assert raw.camera == cam
    np.testing.assert_array_equal(next(iter(raw)).image, frames[0].image)


def test_stride_max_frames_and_tolerance(tmp_path):
    frames = make_frames(n=10, stereo=False)
    path = _write_named(
        tmp_path / "off", {"image": "/camera/image", "depth": "/camera/depth", "camera_info": "/camera/camera_info"},
        frames, depth_offset=0.008,
    )
    assert len(BagSource(path)) == 10
    src = BagSource(path, stride=3, max_frames=3)
    assert len(src) == 3
    got = list(src)
    assert [f.stamp for f in got] == [frames[i].stamp for i in (0, 3, 6)]
    assert [f.index for f in got] == [0, 1, 2]
    with pytest.raises(InputError, match="tolerance"):
        len(BagSource(path, tolerance=0.002))


def test_refuse_overwrite_and_no_half_bags(tmp_path):
    src = ListSource(make_frames(n=2))
    out = write_source_to_bag(src, tmp_path / "o", storage="sqlite3", progress=False)
    with pytest.raises(InputError, match="exists"):
        write_source_to_bag(src, out, progress=False)
    with pytest.raises(InputError, match="overwrite"):
        BagWriter(out)
    before = (out / "metadata.yaml").read_text()
    write_source_to_bag(ListSource(make_frames(n=4)), out, storage="mcap", progress=False, overwrite=True)
    assert (out / "metadata.yaml").read_text() != before and len(BagSource(out)) == 4

    class Boom(RuntimeError):
        pass

    with pytest.raises(Boom):
        with BagWriter(tmp_path / "crash", storage="mcap") as bag:
            bag.write_image("/camera/image", np.zeros((H, W, 3), np.uint8), "rgb8", T0, "c")
            raise Boom()
    assert not (tmp_path / "crash").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]  # no temporary folders left
    with pytest.raises(InputError, match="ROS 1"):
        BagWriter(tmp_path / "x.bag")


def test_ros1_bag_with_tum_style_topics(tmp_path):
    """ROS 1 .bag files (e.g. the TUM RGB-D bags) read through the same code."""
    from rosbags.rosbag1 import Writer
    from rosbags.typesys import Stores, get_types_from_msg, get_typestore

    from recon_slam.io import messages as M

    ts = get_typestore(Stores.ROS1_NOETIC)
    ts.register(get_types_from_msg("geometry_msgs/TransformStamped[] transforms", "tf2_msgs/msg/TFMessage"))
    types = M.RosbagsTypes(typestore=ts)
    frames = make_frames(n=3, stereo=False)
    path = tmp_path / "tum.bag"
    with Writer(path) as w:
        conns = {}

        def put(topic, msgtype, msg, t):
            if topic not in conns:
                conns[topic] = w.add_connection(topic, msgtype, typestore=ts)
            w.write(conns[topic], M.sec_to_ns(t), ts.serialize_ros1(msg, msgtype))

        for f in frames:
            t = f.stamp
            put("/camera/rgb/image_color", "sensor_msgs/msg/Image", M.make_image(types, f.image, "rgb8", t, "rgb"), t)
            put("/camera/depth/image", "sensor_msgs/msg/Image", M.make_image(types, f.depth, "32FC1", t + 0.01, "d"), t + 0.01)
            info = types.new(  # ROS 1 field names: D K R P
                "sensor_msgs/msg/CameraInfo", header=M.make_header(types, t, "rgb"), width=W, height=H,
                distortion_model="plumb_bob", D=np.zeros(5), K=CAM.K.reshape(-1), R=np.eye(3).reshape(-1), P=np.zeros(12),
            )
            put("/camera/rgb/camera_info", "sensor_msgs/msg/CameraInfo", info, t)
            put("/camera/depth/camera_info", "sensor_msgs/msg/CameraInfo", info, t)
            tf = M.make_tf_message(types, [M.make_transform_stamped(types, f.T_world_cam_gt, t, "world", "camera_gt")])
            put("/tf", "tf2_msgs/msg/TFMessage", tf, t)
    src = BagSource(path)
    assert src.topics["image"] == "/camera/rgb/image_color" and src.topics["depth"] == "/camera/depth/image"
    assert src.topics["camera_info"] == "/camera/rgb/camera_info" and src.camera == CAM
    assert src.name == "tum" and len(src) == 3 and src.has_ground_truth
    for a, b in zip(src, frames):
        assert a.stamp == b.stamp
        np.testing.assert_array_equal(a.image, b.image)
        np.testing.assert_array_equal(a.depth, b.depth)
        np.testing.assert_allclose(a.T_world_cam_gt, b.T_world_cam_gt, atol=1e-12)
