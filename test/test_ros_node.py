"""The SLAM node with the real rclpy (localhost only, a domain id of this test process).

The node runs in its own process (``python -m recon_slam.ros.slam_node``); the test side is
an rclpy node in its own context and executor thread that publishes a synthetic sequence
frame by frame and listens to the outputs.
"""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.ros
rclpy = pytest.importorskip("rclpy")

from rclpy.executors import SingleThreadedExecutor  # noqa: E402
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy  # noqa: E402

from conftest import REPO_ROOT  # noqa: E402
from recon_slam.io.messages import RclpyTypes, make_camera_info, make_image, pose_to_matrix  # noqa: E402
from recon_slam.io.ros_outputs import default_T_base_cam  # noqa: E402

NODE = "/recon_slam"
WIDTH, HEIGHT = 160, 120
ENGINE_ARGS = ["-p", f"predictor.width:={WIDTH}", "-p", "device:=cpu"]


def _domain() -> int:
    return int(os.environ["ROS_DOMAIN_ID"])


class NodeProcess:
    """``slam_node`` in a subprocess, its log in a file."""

    def __init__(self, tmp_path: Path, *ros_args: str) -> None:
        self.log_path = tmp_path / "slam_node.log"
        env = dict(os.environ)  # carries ROS_DOMAIN_ID / ROS_AUTOMATIC_DISCOVERY_RANGE / ROS_LOCALHOST_ONLY
        env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        env["RCUTILS_LOGGING_BUFFERED_STREAM"] = "0"
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "recon_slam.ros.slam_node", "--ros-args", *ros_args],
            cwd=str(REPO_ROOT), env=env, stdout=self._log, stderr=subprocess.STDOUT,
        )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text()

    def stop(self) -> int:
        if self.alive():
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self._log.close()
        return self.proc.returncode


class Harness:
    """Test-side rclpy node: publishers of the node's inputs, subscribers of its outputs."""

    def __init__(self) -> None:
        from diagnostic_msgs.msg import DiagnosticArray
        from geometry_msgs.msg import PoseStamped
        from nav_msgs.msg import Odometry, Path
        from sensor_msgs.msg import CameraInfo, Image, PointCloud2
        from visualization_msgs.msg import MarkerArray

        self.context = rclpy.Context()
        rclpy.init(context=self.context, domain_id=_domain())
        self.node = rclpy.create_node("recon_slam_test", context=self.context)
        self.types = RclpyTypes()
        reliable = QoSProfile(depth=50, reliability=ReliabilityPolicy.RELIABLE)
        latched = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)
        self.pub_image = self.node.create_publisher(Image, "/image", reliable)
        self.pub_depth = self.node.create_publisher(Image, "/depth", reliable)
        self.pub_info = self.node.create_publisher(CameraInfo, "/camera_info", reliable)
        self.lock = threading.Lock()
        self.odometry, self.poses, self.paths, self.clouds, self.markers, self.diags = [], [], [], [], [], []

        def keep(store):
            def cb(msg):
                with self.lock:
                    store.append((time.monotonic(), msg))
            return cb

        self.node.create_subscription(Odometry, NODE + "/odometry", keep(self.odometry), reliable)
        self.node.create_subscription(PoseStamped, NODE + "/pose", keep(self.poses), reliable)
        self.node.create_subscription(Path, NODE + "/path", keep(self.paths), QoSProfile(depth=5))
        self.node.create_subscription(PointCloud2, NODE + "/map_cloud", keep(self.clouds), latched)
        self.node.create_subscription(MarkerArray, NODE + "/keyframes", keep(self.markers), latched)
        self.node.create_subscription(DiagnosticArray, "/diagnostics", keep(self.diags), reliable)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self.thread = threading.Thread(target=self.executor.spin, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.executor.shutdown(timeout_sec=5)
        self.node.destroy_node()
        rclpy.try_shutdown(context=self.context)
        self.thread.join(timeout=5)

    # ---------------------------------------------------------------- helpers
    @staticmethod
    def wait_for(cond, timeout: float, step: float = 0.05) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if cond():
                return True
            time.sleep(step)
        return bool(cond())

    def wait_ready(self, proc: NodeProcess, timeout: float = 40.0) -> None:
        ok = self.wait_for(lambda: self.node.count_publishers(NODE + "/odometry") > 0
                           and self.node.count_subscribers("/image") > 0
                           and self.node.count_publishers("/diagnostics") > 0, timeout)
        assert ok and proc.alive(), "node did not come up:\n" + proc.log()[-3000:]
        time.sleep(1.0)  # discovery both ways before the first frame

    def publish_frame(self, frame, *, info=True, encoding="rgb8", depth_offset=0.0) -> None:
        t = self.types
        fid = "camera_optical_frame"
        if info:
            self.pub_info.publish(make_camera_info(t, frame.camera, frame.stamp, fid))
        self.pub_depth.publish(make_image(t, frame.depth, "16UC1", frame.stamp + depth_offset, fid))
        img = make_image(t, frame.image, "rgb8", frame.stamp, fid)
        img.encoding = encoding
        self.pub_image.publish(img)

    def odometry_stamps(self) -> list:
        with self.lock:
            return [m.header.stamp.sec + m.header.stamp.nanosec * 1e-9 for _, m in self.odometry]

    def last_diag(self):
        with self.lock:
            return self.diags[-1][1].status[0] if self.diags else None

    def wait_diag(self, predicate, timeout: float):
        found = []

        def cond():
            with self.lock:
                for _, d in reversed(self.diags[-3:]):
                    if predicate(d.status[0]):
                        found.append(d.status[0])
                        return True
            return False

        self.wait_for(cond, timeout)
        return found[0] if found else None

    def call(self, srv_type, name: str, request, timeout: float = 30.0):
        client = self.node.create_client(srv_type, name)
        assert client.wait_for_service(timeout_sec=10.0), f"service {name} not available"
        future = client.call_async(request)
        assert self.wait_for(future.done, timeout), f"service {name} did not answer in {timeout} s"
        self.node.destroy_client(client)
        return future.result()

    def trigger(self, name: str):
        from std_srvs.srv import Trigger

        return self.call(Trigger, NODE + "/" + name, Trigger.Request())

    def set_parameter(self, name: str, value):
        from rcl_interfaces.srv import SetParameters
        from rclpy.parameter import Parameter

        req = SetParameters.Request(parameters=[Parameter(name, value=value).to_parameter_msg()])
        return self.call(SetParameters, NODE + "/set_parameters", req).results[0]


@pytest.fixture
def harness():
    h = Harness()
    yield h
    h.close()


def _values(status) -> dict:
    return {kv.key: kv.value for kv in status.values}


def _level(status) -> int:
    return status.level[0] if isinstance(status.level, (bytes, bytearray)) else int(status.level)


def _lockstep(h: Harness, frames, timeout: float = 20.0) -> list:
    """Publish frames one at a time, each after the odometry of the previous one arrived."""
    missing = []
    for f in frames:
        n = len(h.odometry)
        h.publish_frame(f)
        if not h.wait_for(lambda: len(h.odometry) > n, timeout):
            missing.append(f.index)
    return missing


# ---------------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_end_to_end_tracking_outputs_and_map_services(harness, tmp_path):
    from sensor_msgs.msg import Image  # noqa: F401 - message package present

    from recon_slam.eval import evaluate_trajectory

    from ros_synth import synthetic_frames

    n_map, n_more = 40, 6
    frames = synthetic_frames(n_map + n_more, WIDTH, HEIGHT)
    map_path = tmp_path / "map"
    proc = NodeProcess(tmp_path, *ENGINE_ARGS, "-p", f"map_path:={map_path}", "-p", "publish_odom_tf:=true",
                       "-p", "path_period:=0.01")
    h = harness
    try:
        t_start = time.monotonic()
        h.wait_ready(proc)
        missing = _lockstep(h, frames[:n_map])
        assert len(missing) <= 2, f"no odometry for frames {missing}:\n{proc.log()[-2000:]}"

        # ---- frames and stamps
        sent = [f.stamp for f in frames[:n_map]]
        got = h.odometry_stamps()
        assert all(any(abs(g - s) < 1e-6 for s in sent) for g in got) and got == sorted(got)
        with h.lock:
            odom = [m for _, m in h.odometry]
            poses = [m for _, m in h.poses]
        assert all((m.header.frame_id, m.child_frame_id) == ("odom", "base_link") for m in odom)
        assert all(m.header.frame_id == "map" for m in poses)

        # ---- path (corrected) and latched cloud / markers
        assert h.wait_for(lambda: h.paths and len(h.paths[-1][1].poses) >= n_map - len(missing), 20)
        assert h.wait_for(lambda: bool(h.clouds) and bool(h.markers), 20)
        path = h.paths[-1][1]
        cloud = h.clouds[-1][1]
        assert path.header.frame_id == "map" and cloud.header.frame_id == "map"
        assert [f.name for f in cloud.fields] == ["x", "y", "z", "rgb"] and cloud.width > 500
        assert any(m.ns == "keyframes" and m.type == 5 for m in h.markers[-1][1].markers)

        # ---- QoS as documented
        (info,) = h.node.get_publishers_info_by_topic(NODE + "/map_cloud")
        assert info.qos_profile.durability == DurabilityPolicy.TRANSIENT_LOCAL
        assert info.qos_profile.reliability == ReliabilityPolicy.RELIABLE
        subs = h.node.get_subscriptions_info_by_topic("/image")
        assert subs and all(s.qos_profile.reliability == ReliabilityPolicy.BEST_EFFORT for s in subs)

        # ---- trajectory against ground truth (camera poses from base_link poses)
        T_bc = default_T_base_cam()
        est_t = np.array([p.header.stamp.sec + p.header.stamp.nanosec * 1e-9 for p in path.poses])
        est_T = np.stack([pose_to_matrix(p.pose) @ T_bc for p in path.poses])
        gt_t = np.array(sent)
        gt_T = np.stack([f.T_world_cam_gt for f in frames[:n_map]])
        err = evaluate_trajectory(est_t, est_T, gt_t, gt_T, align="se3")
        assert err.ate_rmse_m <= 0.005 * err.path_length_m, (err.ate_rmse_m, err.path_length_m)

        # ---- diagnostics
        st = h.wait_diag(lambda s: _values(s).get("frames_processed") not in (None, "0"), 5)
        assert st is not None and _values(st)["mode"] == "rgbd" and int(_values(st)["keyframes"]) >= 1

        # ---- save_map, reset, load_map
        r = h.trigger("save_map")
        assert r.success, r.message
        assert (map_path / "metadata.json").is_file()
        r = h.trigger("reset")
        assert r.success, r.message
        assert h.wait_for(lambda: h.markers and h.markers[-1][1].markers[0].action == 3
                          and len(h.markers[-1][1].markers) == 1, 10)  # keyframe markers cleared
        r = h.trigger("load_map")
        assert r.success and "relocalising" in r.message, r.message
        n_before = len(h.odometry)
        missing = _lockstep(h, frames[n_map:])
        assert len(missing) <= 1
        with h.lock:
            after = [m for _, m in h.poses[n_before:]]
        # continuing in the loaded map: the new poses agree with ground truth in the map's frame
        est_after = np.stack([pose_to_matrix(p.pose) @ T_bc for p in after])
        stamps_after = np.array([p.header.stamp.sec + p.header.stamp.nanosec * 1e-9 for p in after])
        all_t = np.concatenate([est_t, stamps_after])
        all_T = np.concatenate([est_T, est_after])
        gt_all_t = np.array([f.stamp for f in frames])
        gt_all_T = np.stack([f.T_world_cam_gt for f in frames])
        err_all = evaluate_trajectory(all_t, all_T, gt_all_t, gt_all_T, align="se3")
        assert err_all.ate_max_m < 0.03, err_all.ate_max_m
        assert time.monotonic() - t_start < 120
    finally:
        code = proc.stop()
    log = proc.log_path.read_text()
    assert "Traceback" not in log, log[-3000:]
    assert code in (0, -signal.SIGINT), (code, log[-2000:])


# ---------------------------------------------------------------------------------- problems
@pytest.mark.slow
def test_missing_camera_info_wrong_encoding_and_unsynced_stamps_are_explained_once(harness, tmp_path):
    from ros_synth import synthetic_frames

    frames = synthetic_frames(1, WIDTH, HEIGHT)
    proc = NodeProcess(tmp_path, *ENGINE_ARGS, "-p", "no_data_timeout:=1.0", "-p", "diagnostics_period:=0.5")
    h = harness
    try:
        h.wait_ready(proc)

        def stream(seconds, **kw):
            end = time.monotonic() + seconds
            f = frames[0]  # a camera standing still: tracking is easy once the input is right
            while time.monotonic() < end:
                f.stamp = 200.0 + 0.1 * stream.count
                stream.count += 1
                h.publish_frame(f, **kw)
                time.sleep(0.1)

        stream.count = 0

        # 1. no camera_info
        stream(3.0, info=False)
        st = h.wait_diag(lambda s: "camera_info" in s.message, 5)
        assert st is not None, [d[1].status[0].message for d in h.diags[-3:]]
        assert _level(st) >= 1 and _values(st)["frames_processed"] == "0"
        # 2. unsupported encoding
        stream(2.0, encoding="yuv422")
        st = h.wait_diag(lambda s: "yuv422" in s.message, 5)
        assert st is not None and "not supported" in st.message
        # 3. depth stamps 0.05 s off (tolerance 0.02 s)
        stream(3.0, depth_offset=0.05)
        st = h.wait_diag(lambda s: "out of sync" in s.message, 5)
        assert st is not None and "sync_tolerance" in st.message
        assert proc.alive()
        # 4. good input: it tracks
        n = len(h.odometry)
        stream(2.0)
        assert h.wait_for(lambda: len(h.odometry) > n, 20), proc.log()[-2000:]
        st = h.wait_diag(lambda s: s.message in ("tracking", "initialising", "relocalised"), 5)
        assert st is not None, [d.status[0].message for _, d in h.diags[-3:]]
    finally:
        proc.stop()
    log = proc.log_path.read_text()
    assert log.count("no camera_info on") == 1, log
    assert log.count("yuv422") == 1, log
    assert log.count("out of sync") == 1, log
    assert "Traceback" not in log


@pytest.mark.slow
def test_parameter_validation_keeps_the_node_running(harness, tmp_path):
    proc = NodeProcess(tmp_path, *ENGINE_ARGS, "-p", "tracking.huber_k:=-1.0", "-p", "diagnostics_period:=0.5")
    h = harness
    try:
        h.wait_ready(proc)
        st = h.wait_diag(lambda s: True, 10)
        assert st is not None and _level(st) == 2, st
        assert "tracking.huber_k" in st.message and "> 0" in st.message
        assert proc.alive()
        bad = h.set_parameter("predictor.max_depth", -5.0)
        assert not bad.successful and "predictor.max_depth" in bad.reason
        bad = h.set_parameter("image_transport", "theora")
        assert not bad.successful and "image_transport" in bad.reason
        ro = h.set_parameter("mode", "stereo")
        assert not ro.successful  # read-only: chooses the subscriptions
        good = h.set_parameter("tracking.huber_k", 1.5)
        assert good.successful, good.reason
        st = h.wait_diag(lambda s: _level(s) < 2, 5)
        assert st is not None and "waiting_for_data" in st.message
    finally:
        proc.stop()
    log = proc.log_path.read_text()
    assert log.count("not tracking: parameter error") == 1, log


@pytest.mark.slow
def test_mono_mode_says_it_is_not_available_yet(harness, tmp_path):
    proc = NodeProcess(tmp_path, "-p", "mode:=mono", "-p", "diagnostics_period:=0.5")
    h = harness
    try:
        h.wait_ready(proc)
        st = h.wait_diag(lambda s: True, 10)
        assert st is not None and _level(st) == 2 and "MASt3R" in st.message
        assert proc.alive()
    finally:
        proc.stop()


@pytest.mark.slow
def test_compressed_rgbd_and_stereo_inputs(harness, tmp_path):
    from sensor_msgs.msg import CameraInfo, CompressedImage, Image

    from recon_slam.io.messages import make_compressed_depth, make_compressed_image
    from recon_slam.synth.render import render
    from recon_slam.synth.scene import make_scene

    from ros_synth import synthetic_frames

    h = harness
    frames = synthetic_frames(6, WIDTH, HEIGHT)
    reliable = QoSProfile(depth=20, reliability=ReliabilityPolicy.RELIABLE)
    t = h.types
    # ---- compressed colour + compressedDepth
    pub_c = h.node.create_publisher(CompressedImage, "/image/compressed", reliable)
    pub_cd = h.node.create_publisher(CompressedImage, "/depth/compressedDepth", reliable)
    proc = NodeProcess(tmp_path, *ENGINE_ARGS, "-p", "image_transport:=compressed", "-p",
                       "depth_transport:=compressedDepth")
    try:
        assert h.wait_for(lambda: h.node.count_subscribers("/image/compressed") > 0
                          and h.node.count_subscribers("/depth/compressedDepth") > 0, 40), proc.log()[-2000:]
        time.sleep(1.0)  # let discovery finish both ways
        for f in frames:
            n = len(h.odometry)
            h.pub_info.publish(make_camera_info(t, f.camera, f.stamp, "camera_optical_frame"))
            pub_cd.publish(make_compressed_depth(t, f.depth, f.stamp, "camera_optical_frame"))
            pub_c.publish(make_compressed_image(t, f.image, f.stamp, "camera_optical_frame"))
            h.wait_for(lambda: len(h.odometry) > n, 20)
        assert len(h.odometry) >= len(frames) - 1, proc.log()[-2000:]
    finally:
        proc.stop()
    # ---- stereo: left + right images and camera_info with the baseline in P
    h.odometry.clear()
    pub_r = h.node.create_publisher(Image, "/right/image", reliable)
    pub_ri = h.node.create_publisher(CameraInfo, "/right/camera_info", reliable)
    scene = make_scene("room", 0)
    proc = NodeProcess(tmp_path, *ENGINE_ARGS, "-p", "mode:=stereo", "-p", "predictor.sgbm_num_disparities:=32")
    try:
        assert h.wait_for(lambda: h.node.count_subscribers("/right/image") > 0, 40), proc.log()[-2000:]
        time.sleep(1.0)
        for f in frames[:4]:
            r = render(scene, f.camera, f.T_world_cam_gt, stereo_baseline=0.1)
            n = len(h.odometry)
            h.pub_info.publish(make_camera_info(t, f.camera, f.stamp, "camera_optical_frame"))
            pub_ri.publish(make_camera_info(t, f.camera, f.stamp, "camera_right_optical_frame", baseline_m=0.1))
            pub_r.publish(make_image(t, r.right_image, "rgb8", f.stamp, "camera_right_optical_frame"))
            h.pub_image.publish(make_image(t, r.image, "rgb8", f.stamp, "camera_optical_frame"))
            h.wait_for(lambda: len(h.odometry) > n, 20)
        assert len(h.odometry) >= 3, proc.log()[-2000:]
        st = h.wait_diag(lambda s: _values(s).get("mode") == "stereo", 5)
        assert st is not None
    finally:
        proc.stop()
    assert "Traceback" not in proc.log_path.read_text()


# ---------------------------------------------------------------------------------- engine process
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except (ProcessLookupError, OSError):
        return False


def _burst(h: Harness, proc: NodeProcess, frames, engine_process: bool) -> None:
    """Frames much faster than the engine: skipped (counted), never queued; the newest is published."""
    assert not _lockstep(h, frames[:2]), proc.log()[-2000:]  # engine built and warm
    for f in frames[2:]:  # back to back (a few ms each): far faster than the engine
        h.publish_frame(f)
    assert h.wait_for(lambda: h.odometry_stamps() and h.odometry_stamps()[-1] >= frames[-3].stamp - 1e-6, 20)
    time.sleep(0.3)
    got = h.odometry_stamps()
    # the pose published last is for one of the newest frames (best-effort input may lose the very last)
    assert got == sorted(got) and any(abs(got[-1] - f.stamp) < 1e-6 for f in frames[-3:]), got
    st = h.wait_diag(lambda s: int(_values(s).get("frames_processed", "0")) == len(got), 5)
    assert st is not None, proc.log()[-2000:]
    v = _values(st)
    assert v["engine"] == (f"process (pid {v['engine_pid']})" if engine_process else "thread")
    skipped = int(v["dropped_by_policy"])
    assert skipped > 0 and len(got) < len(frames), (skipped, len(got))
    assert len(got) + skipped <= int(v["frames_received"]), v
    for key in ("latency_p50_ms", "latency_p90_ms", "pose_age_ms_p50", "pose_age_ms_max"):
        assert float(v[key]) > 0, (key, v)


@pytest.mark.slow
def test_engine_thread_mode_skips_bursts_and_serves_reset(harness, tmp_path):
    from ros_synth import synthetic_frames

    frames = synthetic_frames(24, WIDTH, HEIGHT)
    proc = NodeProcess(tmp_path, *ENGINE_ARGS, "-p", "engine_process:=false", "-p", "diagnostics_period:=0.5")
    h = harness
    try:
        h.wait_ready(proc)
        _burst(h, proc, frames, engine_process=False)
        r = h.trigger("reset")
        assert r.success, r.message
        assert not _lockstep(h, frames[:2])  # tracking again after the reset
    finally:
        code = proc.stop()
    log = proc.log_path.read_text()
    assert "Traceback" not in log, log[-3000:]
    assert code in (0, -signal.SIGINT), (code, log[-2000:])


@pytest.mark.slow
def test_engine_process_skips_bursts_survives_a_crash_and_leaves_no_orphan(harness, tmp_path):
    from ros_synth import synthetic_frames

    frames = synthetic_frames(27, WIDTH, HEIGHT)
    proc = NodeProcess(tmp_path, *ENGINE_ARGS, "-p", "diagnostics_period:=0.5")
    h = harness
    try:
        h.wait_ready(proc)
        _burst(h, proc, frames[:24], engine_process=True)
        pid = int(_values(h.last_diag())["engine_pid"])
        os.kill(pid, signal.SIGKILL)  # e.g. the OOM killer
        st = h.wait_diag(lambda s: "SIGKILL" in s.message, 10)
        assert st is not None and _level(st) == 2 and "restarted" in st.message, proc.log()[-2000:]
        assert proc.alive()
        # restarted after a back-off: a new engine process, tracking again
        st = h.wait_diag(lambda s: _values(s).get("engine_pid") not in ("", str(pid)), 20)
        assert st is not None and _values(st)["engine_restarts"] == "1", proc.log()[-2000:]
        new_pid = int(_values(st)["engine_pid"])
        assert len(_lockstep(h, frames[24:])) <= 1, proc.log()[-2000:]
        log = proc.log()
        assert "the engine process was killed by signal SIGKILL" in log and "engine process restarted" in log
        assert "Traceback" not in log, log[-3000:]
        # the node killed outright: its engine process goes too (no orphan)
        proc.proc.send_signal(signal.SIGKILL)
        proc.proc.wait(10)
        end = time.monotonic() + 10
        while _pid_alive(new_pid) and time.monotonic() < end:
            time.sleep(0.1)
        assert not _pid_alive(new_pid), "the engine process outlived the node"
    finally:
        proc.stop()
