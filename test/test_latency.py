"""Live-stream latency machinery: frontend-first scheduling of the backend, early poses,
the vectorised trajectory (see recon_slam.backend.scheduling and SlamSystem.process)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from recon_slam.backend import Backend
from recon_slam.backend.scheduling import FrontendGate, checkpoint, run_in_background_of
from recon_slam.config import BackendConfig
from recon_slam.frontend.keyframes import KeyframeMap
from recon_slam.system import SlamSystem, _FrameRecord, _rigid


# ---------------------------------------------------------------------------- the gate
def test_disabled_gate_never_blocks():
    gate = FrontendGate(enabled=False)
    with gate.frontend():
        t0 = time.monotonic()
        assert gate.wait_idle()
        with run_in_background_of(gate):
            checkpoint()
        assert time.monotonic() - t0 < 0.05
    assert gate.stats()["gate_waits"] == 0


def test_enabled_gate_blocks_background_until_the_frame_is_done():
    gate = FrontendGate(enabled=True, max_wait_s=5.0)
    passed: list[float] = []

    def background() -> None:
        with run_in_background_of(gate):
            checkpoint()
            passed.append(time.monotonic())

    with gate.frontend():
        with gate.frontend():  # re-entrant
            t = threading.Thread(target=background)
            t.start()
            time.sleep(0.2)
            assert not passed  # still waiting: the frontend is busy
        time.sleep(0.1)
        assert not passed
        done = time.monotonic()
    t.join(2.0)
    assert passed and passed[0] >= done
    st = gate.stats()
    assert st["gate_waits"] == 1 and st["gate_timeouts"] == 0 and st["gate_waited_s"] >= 0.25
    # a thread without a registered gate (e.g. the frontend itself) passes checkpoints at once
    with gate.frontend():
        t0 = time.monotonic()
        checkpoint()
        assert time.monotonic() - t0 < 0.05


def test_enabled_gate_cannot_starve_background_work():
    gate = FrontendGate(enabled=True, max_wait_s=0.1)
    with gate.frontend():
        t0 = time.monotonic()
        assert not gate.wait_idle()
        assert 0.08 <= time.monotonic() - t0 < 1.0
    assert gate.stats()["gate_timeouts"] == 1


def test_backend_thread_waits_for_the_frontend():
    backend = Backend(BackendConfig(), KeyframeMap(), "cpu")
    backend.gate = FrontendGate(enabled=True, max_wait_s=10.0)
    try:
        with backend.gate.frontend():
            backend.add_edge(0, 1, np.eye(4))  # unknown keyframes: ignored, but only once it runs
            time.sleep(0.3)
            assert backend.stats()["pending"] == 1  # held back while the frame is processed
        assert backend.wait_idle(timeout=5)
        assert backend.error is None and backend.stats()["gate_waits"] >= 1
    finally:
        backend.close()


# ---------------------------------------------------------------------------- the engine
@pytest.fixture(scope="module")
def frames():
    from recon_slam.synth import SyntheticSequence

    return list(SyntheticSequence(scene="room", trajectory="loop", frames=40, width=160, height=120, seed=0))


def test_live_engine_publishes_the_pose_before_the_map_work(frames):
    system = SlamSystem({"device": "cpu"}, frames[0].camera, live=True)
    try:
        assert system.gate.enabled and system.backend is not None and system.backend.gate is system.gate
        early: list = []

        def on_pose(r) -> None:
            # called inside process(): the frame's map work (record, keyframe decision) is still to come
            early.append((r, len(system._records), system.gate.busy))

        for f in frames:
            n_before = len(system._records)
            res = system.process(f, on_pose=on_pose)
            assert res.final and not system.gate.busy
            mine = [e for e in early if e[0].index == f.index]
            if res.state == "tracking":
                assert len(mine) == 1
                r, n_records, busy = mine[0]
                assert not r.final and not r.is_keyframe and busy and n_records == n_before
                assert r.stamp == f.stamp and 0 < r.time_ms <= res.time_ms
                if r.kf_id == res.kf_id or res.is_keyframe:  # not re-anchored: the same pose
                    np.testing.assert_allclose(r.T_world_cam, res.T_world_cam, atol=1e-9)
            else:
                assert not mine  # initialising / lost: only the returned result
        assert sum(e[0].state == "tracking" for e in early) == len(frames) - 1
    finally:
        system.close()
    # offline (the default): no gate, the same results without a callback
    offline = SlamSystem({"device": "cpu", "backend.enabled": False}, frames[0].camera)
    try:
        assert not offline.gate.enabled
        assert offline.process(frames[0]).final
    finally:
        offline.close()


def test_trajectory_is_vectorised_and_matches_the_records():
    system = SlamSystem({"device": "cpu", "backend.enabled": False})
    rng = np.random.default_rng(0)

    def pose(scale: float = 1.0) -> np.ndarray:
        from scipy.spatial.transform import Rotation

        T = np.eye(4)
        T[:3, :3] = scale * Rotation.from_rotvec(rng.normal(0, 0.3, 3)).as_matrix()
        T[:3, 3] = rng.normal(0, 1, 3)
        return T

    class Map:  # keyframe poses only (Sim(3) ones included: their scale is dropped)
        poses_ = {0: pose(), 3: pose(1.3), 7: pose(0.8)}

        def poses(self):
            ids = sorted(self.poses_)
            return ids, np.stack([self.poses_[i] for i in ids])

    system.keyframe_map = Map()
    kf_ids = [-1, 0, 0, 3, 7, 3, 5, 0]  # -1: before the first keyframe, 5: a removed keyframe
    for k, kf in enumerate(kf_ids[:5]):
        system._records.append(_FrameRecord(k, 0.1 * k, kf, pose(), "tracking"))

    def reference():
        P = Map.poses_
        return np.stack([_rigid(P[r.kf_id] @ r.T_kf_frame) if r.kf_id in P else np.eye(4)
                         for r in system._records])

    stamps, T = system.trajectory()
    np.testing.assert_allclose(T, reference(), atol=1e-12)
    np.testing.assert_allclose(stamps, 0.1 * np.arange(5))
    # records appended later extend the cached arrays; a reset starts over
    for k, kf in enumerate(kf_ids[5:], start=5):
        system._records.append(_FrameRecord(k, 0.1 * k, kf, pose(), "lost"))
    Map.poses_[0] = pose()  # a backend optimisation moved a keyframe
    stamps, T = system.trajectory()
    assert len(stamps) == len(kf_ids)
    np.testing.assert_allclose(T, reference(), atol=1e-12)
    np.testing.assert_allclose(np.linalg.det(T[:, :3, :3]), 1.0, atol=1e-9)
    np.testing.assert_array_equal(T[0], np.eye(4))
    np.testing.assert_array_equal(T[6], np.eye(4))
    system._reset_state()
    stamps, T = system.trajectory()
    assert len(stamps) == 0 and T.shape == (0, 4, 4)
    system.close()


# ---------------------------------------------------------------------------- the node's path
def test_path_builder_matches_path_msg_and_rebuilds_only_changed_poses():
    pytest.importorskip("rclpy")
    from recon_slam.io.messages import RclpyTypes
    from recon_slam.io.ros_outputs import RosOutputs
    from recon_slam.ros.slam_node import PathBuilder

    out = RosOutputs(RclpyTypes())
    rng = np.random.default_rng(1)
    T = np.tile(np.eye(4), (150, 1, 1))
    T[:, :3, 3] = rng.normal(0, 1, (150, 3))
    T[7, 0, 0] = np.nan  # a non-finite pose is left out, as path_msg does
    stamps = 0.033 * np.arange(150)
    builder = PathBuilder(chunk=16)
    waits: list = []

    def same(a, b) -> bool:
        return a.header == b.header and list(a.poses) == list(b.poses)

    for n, expect_built in ((100, 99), (130, 30), (150, 20)):
        msg = builder.build(out, 5.0, stamps[:n], T[:n], wait=lambda: waits.append(1))
        assert same(msg, out.path_msg(5.0, stamps[:n], T[:n])) and builder.n_built == expect_built
    assert len(waits) == 6 + 1 + 1  # between chunks of 16 poses: 99 -> 7 chunks, 30 and 20 -> 2 each
    T2 = T.copy()
    T2[100:, :3, 3] += 0.5  # a loop closure moved the later poses
    msg = builder.build(out, 6.0, stamps, T2)
    assert same(msg, out.path_msg(6.0, stamps, T2)) and builder.n_built == 50
    out.set_map_origin(np.diag([1.0, -1.0, -1.0, 1.0]))  # a map load: everything in the new frame
    msg = builder.build(out, 7.0, stamps, T2)
    assert same(msg, out.path_msg(7.0, stamps, T2)) and builder.n_built == 149
    assert len(builder.build(out, 8.0, stamps[:0], T2[:0]).poses) == 0


def test_live_cloud_cache_gives_the_map_cloud_in_small_steps():
    from recon_slam.io.ros_outputs import MapCloudCache
    from recon_slam.ros.engine_process import LiveCloudCache
    from recon_slam.synth import SyntheticSequence

    frames = list(SyntheticSequence(scene="room", trajectory="loop", frames=240, width=160, height=120, seed=0))[:120:2]
    system = SlamSystem({"device": "cpu"}, frames[0].camera)
    try:
        for f in frames:
            system.process(f)
        system.finish()
        assert system.num_keyframes >= 2
        ref = MapCloudCache(0.02, 0.5, 1).cloud(system)
        engine_side, node_side = LiveCloudCache(0.02, 0.5, 1), LiveCloudCache(0.02, 0.5, 1)
        waits: list = []
        ids, poses = engine_side.refresh(system, wait=lambda: waits.append(1))
        assert len(waits) == engine_side.n_refreshed == system.num_keyframes  # one keyframe per step
        for got in (engine_side.compose(ids, poses), engine_side.cloud(system)):
            np.testing.assert_array_equal(got[0], ref[0])
            np.testing.assert_array_equal(got[1], ref[1])
        assert engine_side.n_refreshed == 0  # nothing changed: nothing recomputed
        # the node's copy: everything the first time, then only what changed
        entries = engine_side.entries_since(node_side.versions() if node_side.generation == engine_side.generation else {})
        assert len(entries) == len(ids)
        node_side.merge(engine_side.generation, entries, ids)
        np.testing.assert_array_equal(node_side.compose(ids, poses)[0], ref[0])
        system.process(frames[-1])  # fused into the current keyframe
        ids, poses = engine_side.refresh(system)
        changed = engine_side.entries_since(node_side.versions())
        assert engine_side.n_refreshed == len(changed) == 1
        node_side.merge(engine_side.generation, changed, ids)
        ref2 = MapCloudCache(0.02, 0.5, 1).cloud(system)
        np.testing.assert_array_equal(node_side.compose(ids, poses)[0], ref2[0])
        # a new generation (reset / map load / new engine) replaces the node's copy
        engine_side.clear()
        node_side.merge(engine_side.generation, {}, ids)
        assert node_side.versions() == {}
    finally:
        system.close()
