"""The engine process of the ROS node (recon_slam.ros.engine_process), without DDS.

The frame channel is tested in this process; the engine tests spawn real engine processes
(about 3 s each on a loaded 2-core machine) and feed them rclpy-built messages.
"""

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

from conftest import REPO_ROOT

rclpy = pytest.importorskip("rclpy")  # message classes (no DDS is started here)

from recon_slam.config import load_config  # noqa: E402
from recon_slam.io.messages import (  # noqa: E402
    RclpyTypes,
    make_camera_info,
    make_compressed_depth,
    make_compressed_image,
    make_image,
)
from recon_slam.io.ros_inputs import frame_from_messages  # noqa: E402
from recon_slam.ros.engine_process import (  # noqa: E402
    FAULT_ENV,
    ChannelReader,
    EngineClient,
    EngineUnavailable,
    FrameChannel,
    pack_frame,
    unpack_frame,
)

WIDTH, HEIGHT = 160, 120
CONFIG = {"device": "cpu", "predictor.width": WIDTH}
FID = "camera_optical_frame"


@pytest.fixture(scope="module")
def frames():
    from ros_synth import synthetic_frames

    return synthetic_frames(12, WIDTH, HEIGHT)


def _messages(frame, encoding="rgb8"):
    t = RclpyTypes()
    img = make_image(t, frame.image, "rgb8", frame.stamp, FID)
    img.encoding = encoding
    return img, make_camera_info(t, frame.camera, frame.stamp, FID), make_image(t, frame.depth, "16UC1", frame.stamp, FID)


def _pack(frame, seq, encoding="rgb8"):
    img, info, dep = _messages(frame, encoding)
    return pack_frame(img, info, depth=dep, seq=seq, arrival=time.monotonic(), settings={"topics": {}})


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purpose
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False


class Recorder:
    """Collects the engine's messages (the node's role)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.messages: list = []
        self.exits: list = []

    def on_message(self, msg) -> None:
        with self.lock:
            self.messages.append(msg)

    def on_exit(self, text) -> None:
        with self.lock:
            self.exits.append(text)

    def of(self, kind) -> list:
        with self.lock:
            return [m for m in self.messages if m[0] == kind]

    def wait(self, cond, timeout: float) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if cond():
                return True
            time.sleep(0.02)
        return bool(cond())


def _start(rec: Recorder, fault: str = "") -> EngineClient:
    old = os.environ.get(FAULT_ENV)
    if fault:
        os.environ[FAULT_ENV] = fault  # inherited by the spawned process
    try:
        client = EngineClient(load_config(CONFIG), "rgbd", rec.on_message, rec.on_exit)
        client.start()
    finally:
        if old is None:
            os.environ.pop(FAULT_ENV, None)
        else:
            os.environ[FAULT_ENV] = old
    assert rec.wait(lambda: rec.of("ready"), 60), "engine process did not come up"
    return client


# ------------------------------------------------------------------------------ channel
def test_channel_keeps_the_newest_frame_counts_skipped_and_grows():
    import multiprocessing as mp

    a, b = mp.Pipe(duplex=True)
    writer = FrameChannel(a)
    reader = ChannelReader(b)
    try:
        assert reader.take() is None
        assert writer.put({"n": 0}, [b"x" * 10]) is True  # empty slot: ring the reader
        assert writer.put({"n": 1}, [b"y" * 10]) is False  # replaced: the reader was rung already
        assert writer.put({"n": 2}, [bytes(range(10)), np.arange(5, dtype=np.uint8)]) is False
        meta, parts = reader.take()
        assert meta["n"] == 2 and bytes(parts[0]) == bytes(range(10)) and list(parts[1]) == [0, 1, 2, 3, 4]
        assert writer.skipped == 2 and writer.offered == 3 and writer.taken == 1 and len(writer) == 0
        assert reader.take() is None
        big = np.arange(3 << 20, dtype=np.uint32).view(np.uint8)  # 12 MB: a new, larger buffer
        assert writer.put({"n": 3}, [big]) is True
        meta, parts = reader.take()
        assert meta["n"] == 3 and np.array_equal(parts[0], big)
        writer.put({"n": 4}, [b"z"])
        writer.clear()  # reset: dropped, not counted as skipped
        assert reader.take() is None and writer.skipped == 2
    finally:
        writer.close()


def test_pack_unpack_keeps_raw_and_compressed_messages(frames):
    f = frames[0]
    img, info, dep = _messages(f)
    meta, parts = pack_frame(img, info, depth=dep, seq=7)
    arrays = [np.frombuffer(bytes(p), np.uint8) for p in parts]  # what crosses the channel
    m = unpack_frame(meta, arrays)
    direct = frame_from_messages(0, "rgbd", img, info, depth_msg=dep)
    via = frame_from_messages(0, "rgbd", m["image"], m["info"], depth_msg=m["depth"])
    assert meta["seq"] == 7 and via.stamp == direct.stamp and via.frame_id == direct.frame_id
    assert np.array_equal(via.image, direct.image) and np.array_equal(via.depth, direct.depth)
    assert via.camera == direct.camera
    t = RclpyTypes()
    cimg = make_compressed_image(t, f.image, f.stamp, FID)
    cdep = make_compressed_depth(t, f.depth, f.stamp, FID)
    meta, parts = pack_frame(cimg, info, depth=cdep)
    m = unpack_frame(meta, [np.frombuffer(bytes(p), np.uint8) for p in parts])
    via = frame_from_messages(0, "rgbd", m["image"], m["info"], depth_msg=m["depth"])
    assert via.image.shape == (HEIGHT, WIDTH, 3) and np.allclose(via.depth, f.depth, atol=2e-3)


# ------------------------------------------------------------------------------ engine process
@pytest.mark.slow
def test_engine_process_tracks_skips_serves_commands_and_stops(frames, tmp_path):
    rec = Recorder()
    client = _start(rec)
    pid = client.pid
    try:
        # a burst: the engine takes the newest frame, the others are skipped, never queued
        for i, f in enumerate(frames[:8]):
            client.submit(*_pack(f, i))
        assert rec.wait(lambda: rec.of("result") and rec.of("result")[-1][1]["seq"] == 7, 30), rec.messages
        results = [m[1] for m in rec.of("result")]
        seqs = [r["seq"] for r in results]
        assert seqs == sorted(seqs) and len(seqs) + client.channel.skipped == 8 and client.channel.skipped > 0
        r = results[-1]
        assert r["stamp"] == pytest.approx(frames[7].stamp) and r["result"].T_world_cam.shape == (4, 4)
        assert r["arrival"] <= r["taken"] <= r["done"] and r["n_keyframes"] >= 1
        # then in lockstep: every frame processed
        for i, f in enumerate(frames[8:], start=8):
            client.submit(*_pack(f, i))
            assert rec.wait(lambda: rec.of("result")[-1][1]["seq"] == i, 20)
        # an input problem is reported with its message, the process keeps serving
        client.submit(*_pack(frames[-1], 99, encoding="yuv422"))
        assert rec.wait(lambda: rec.of("error"), 20)
        err = rec.of("error")[-1][1]
        assert err["input"] and err["type"] == "EncodingError" and "yuv422" in err["message"]
        # map snapshots (off the frame path) and the services
        snap = client.map_data({"path": True, "markers": True, "cloud": True, "cloud_params": (0.02, 0.5, 1)})
        stamps, T = snap["path"]
        assert len(stamps) == len(rec.of("result")) and T.shape == (len(stamps), 4, 4)
        ids, T_kf, camera, _ = snap["markers"]
        assert len(ids) >= 1 and T_kf.shape == (len(ids), 4, 4) and camera.width == WIDTH
        xyz, rgb = snap["cloud"]
        assert xyz.shape[1] == 3 and len(xyz) == len(rgb) > 100
        map_path = str(tmp_path / "map")
        reply = client.command("save_map", {"path": map_path, "T_map_world": np.eye(4)}, timeout=60)
        assert reply["ok"] and "keyframes" in reply["message"], reply
        assert client.command("reset", {}, timeout=30)["ok"]
        assert "path" not in client.map_data({"path": True}) or len(client.map_data({"path": True})["path"][0]) == 0
        seen = []
        reply = client.command("load_map", {"path": map_path}, timeout=60, on_reply=seen.append)
        assert reply["ok"] and not reply["pending"] and reply["n"] == len(ids) and seen == [reply], reply
        assert reply["T_map_world"].shape == (4, 4)
        bad = client.command("load_map", {"path": str(tmp_path / "missing")}, timeout=60)
        assert not bad["ok"] and "load_map failed" in bad["message"]
        stats = client.command("stats", timeout=30)
        assert stats["pid"] == pid and stats["engine"]["n_keyframes"] == len(ids)
    finally:
        client.stop()
    assert not client.alive() and client.process.exitcode == 0 and not _alive(pid)
    assert rec.exits == []  # an orderly stop is not a crash
    with pytest.raises(EngineUnavailable):
        client.submit(*_pack(frames[0], 0))


@pytest.mark.slow
def test_engine_bug_is_reported_and_the_process_keeps_serving(frames):
    rec = Recorder()
    client = _start(rec, fault="raise@1")
    try:
        for i, f in enumerate(frames[:3]):
            client.submit(*_pack(f, i))
            assert rec.wait(lambda: len(rec.of("result")) + len(rec.of("error")) > i, 30)
        (err,) = [m[1] for m in rec.of("error")]
        assert not err["input"] and err["type"] == "RuntimeError" and "Traceback" in err["traceback"]
        assert err["seq"] == 1 and [m[1]["seq"] for m in rec.of("result")] == [0, 2]
        assert client.alive()
    finally:
        client.stop()


@pytest.mark.slow
def test_engine_crash_is_reported_and_commands_do_not_hang(frames):
    rec = Recorder()
    client = _start(rec, fault="exit@0")
    try:
        client.submit(*_pack(frames[0], 0))
        assert rec.wait(lambda: rec.exits, 30)
        assert "exited with code 3" in rec.exits[0]
        t0 = time.monotonic()
        with pytest.raises(EngineUnavailable, match="exited with code 3"):
            client.command("stats", timeout=30)
        with pytest.raises(EngineUnavailable):
            client.submit(*_pack(frames[1], 1))
        assert time.monotonic() - t0 < 2.0 and not client.alive()
    finally:
        client.stop()


@pytest.mark.slow
def test_stuck_engine_times_out_and_is_killed_on_stop(frames):
    rec = Recorder()
    client = _start(rec, fault="hang@0")
    pid = client.pid
    client.submit(*_pack(frames[0], 0))
    time.sleep(0.5)
    t0 = time.monotonic()
    with pytest.raises(EngineUnavailable, match="did not answer within 1 s"):
        client.command("stats", timeout=1.0)
    assert time.monotonic() - t0 < 2.0
    client.stop(timeout=1.0)  # not answering: terminated
    assert not _alive(pid) and rec.exits == []


@pytest.mark.slow
def test_no_orphan_when_the_node_process_is_killed(tmp_path):
    script = tmp_path / "parent.py"
    script.write_text(textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(REPO_ROOT)!r})
        from recon_slam.config import load_config
        from recon_slam.ros.engine_process import EngineClient
        if __name__ == "__main__":
            ready = []
            c = EngineClient(load_config({CONFIG!r}), "rgbd", lambda m: ready.append(m), lambda d: None)
            c.start()
            while not ready:
                time.sleep(0.05)
            print(c.pid, flush=True)
            time.sleep(600)
    """))
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        pid = int(parent.stdout.readline())
        assert _alive(pid)
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        end = time.monotonic() + 10
        while _alive(pid) and time.monotonic() < end:
            time.sleep(0.05)
        assert not _alive(pid), "the engine process outlived its node"
    finally:
        if parent.poll() is None:
            parent.kill()
