"""Latency and sustained frame rate of the SLAM node on a 30 Hz synthetic RGB-D stream.

    python benchmarks/bench_node_latency.py [--seconds 30] [--width 320 --height 240]
                                            [--configs default,fast] [--out benchmarks/results/node_latency.json]

A publisher (this process, rclpy) sends a synthetic 320x240 RGB-D sequence at 30 Hz with
sensor-data QoS, header stamps = wall-clock time of publication; the node runs in its own
process with its default parameters (``fast``: processing width 160). Measured:

* latency: odometry received here minus the image stamp (image publication -> odometry
  received, across processes: DDS both ways plus the node), and the node's own figure
  (image arrival in its callback -> odometry published) from ``/diagnostics``;
* pose age: at every image publication, how old the newest received pose is
  (now - its image stamp); the requirement is <= 100 ms;
* sustained rate: odometry messages per second after a warm-up;
* the engine alone (no ROS, every frame of the same stream, same settings) as a baseline
  separating the engine's cost from the node's;
* backlog: how long a frame waits for the engine (node figure; with the newest-frame slot
  it is at most one engine period, older frames are skipped and counted), and the slope of
  latency over time for reference (it also grows when the engine itself slows down, e.g.
  while relocalising).

Results go to ``benchmarks/results/node_latency.json`` with the machine, load and date.
"""

import os

# NETWORK RULE: DDS stays on the loopback interface, in a domain of its own.
os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
os.environ["ROS_LOCALHOST_ONLY"] = "1"
os.environ["ROS_DOMAIN_ID"] = os.environ.get("BENCH_ROS_DOMAIN_ID", str(50 + os.getpid() % 50))

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CONFIGS = {
    "default": [],
    "fast": ["-p", "predictor.width:=160"],
}
#: the same settings as engine configuration overrides (for the engine-alone baseline)
ENGINE_OVERRIDES = {"default": {}, "fast": {"predictor.width": 160}}


def engine_alone(name: str, frames: list, n: int = 90) -> dict:
    """Baseline: the engine alone (no ROS) on the first ``n`` frames, every frame, same settings."""
    from recon_slam.system import SlamSystem

    system = SlamSystem(dict(ENGINE_OVERRIDES[name], device="cpu"), frames[0].camera)
    times, states = [], {}
    try:
        for f in frames[:n]:
            r = system.process(f)
            times.append(r.time_ms)
            states[r.state] = states.get(r.state, 0) + 1
    finally:
        system.close()
    t = np.array(times[5:])  # after warm-up
    return {"frames": len(times), "ms_p50": float(np.percentile(t, 50)), "ms_p90": float(np.percentile(t, 90)),
            "ms_max": float(t.max()), "fps": float(1000.0 / t.mean()), "states": states}


def _frames(n: int, width: int, height: int) -> list:
    """``n`` synthetic RGB-D frames: the closed ``loop`` trajectory of the synthetic room (replayed in a loop)."""
    from recon_slam.synth import SyntheticSequence

    return list(SyntheticSequence(scene="room", trajectory="loop", frames=n, width=width, height=height, seed=0))


def _num(text) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        return float("nan")


def _machine() -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    return {
        "node": platform.node(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": "cpu",
    }


def run_config(name: str, extra: list, frames: list, seconds: float, rate_hz: float) -> dict:
    """Start the node with ``extra`` parameters, stream ``frames`` at ``rate_hz`` for ``seconds``; return figures."""
    import rclpy
    from diagnostic_msgs.msg import DiagnosticArray
    from nav_msgs.msg import Odometry
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.qos import QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
    from sensor_msgs.msg import CameraInfo, Image

    from recon_slam.io.messages import RclpyTypes, make_camera_info, make_image

    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    log_path = REPO / "benchmarks" / "results" / f"node_latency_{name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "-m", "recon_slam.ros.slam_node", "--ros-args", "-p", "device:=cpu", *extra],
                            cwd=str(REPO), env=env, stdout=log, stderr=subprocess.STDOUT)
    ctx = rclpy.Context()
    rclpy.init(context=ctx, domain_id=int(os.environ["ROS_DOMAIN_ID"]))
    node = rclpy.create_node("bench_publisher", context=ctx)
    types = RclpyTypes()
    pub_img = node.create_publisher(Image, "/image", qos_profile_sensor_data)
    pub_dep = node.create_publisher(Image, "/depth", qos_profile_sensor_data)
    pub_info = node.create_publisher(CameraInfo, "/camera_info", qos_profile_sensor_data)
    lock = threading.Lock()
    received: list = []  # (receive wall time, image stamp)
    diags: list = []

    def on_odom(msg):
        now = time.time()
        with lock:
            received.append((now, msg.header.stamp.sec + msg.header.stamp.nanosec * 1e-9))

    def on_diag(msg):
        with lock:
            diags.append({kv.key: kv.value for kv in msg.status[0].values})

    node.create_subscription(Odometry, "/recon_slam/odometry", on_odom, QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE))
    node.create_subscription(DiagnosticArray, "/diagnostics", on_diag, 10)
    ex = SingleThreadedExecutor(context=ctx)
    ex.add_node(node)
    spin = threading.Thread(target=ex.spin, daemon=True)
    spin.start()
    try:
        t_wait = time.monotonic()
        while not (node.count_subscribers("/image") and node.count_publishers("/recon_slam/odometry")):
            if time.monotonic() - t_wait > 60 or proc.poll() is not None:
                raise RuntimeError(f"node did not start; see {log_path}")
            time.sleep(0.1)
        time.sleep(1.0)
        # pre-build the messages so publishing costs little
        enc = [(f.camera, f.image, f.depth) for f in frames]
        period = 1.0 / rate_hz
        sent: list = []
        ages: list = []
        t0 = time.monotonic()
        k = 0
        while True:
            target = t0 + k * period
            now_m = time.monotonic()
            if now_m - t0 >= seconds:
                break
            if target > now_m:
                time.sleep(target - now_m)
            cam, img, dep = enc[k % len(enc)]
            stamp = time.time()
            pub_info.publish(make_camera_info(types, cam, stamp, "camera_optical_frame"))
            pub_dep.publish(make_image(types, dep, "16UC1", stamp, "camera_optical_frame"))
            pub_img.publish(make_image(types, img, "rgb8", stamp, "camera_optical_frame"))
            sent.append(stamp)
            with lock:
                if received:
                    ages.append(stamp - received[-1][1])
            k += 1
        time.sleep(3.0)  # let the last frames through
        with lock:
            rec = list(received)
            last_diag = dict(diags[-1]) if diags else {}
    finally:
        ex.shutdown(timeout_sec=5)
        node.destroy_node()
        rclpy.try_shutdown(context=ctx)
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
        log.close()

    warm = 3.0
    t_first = sent[0]
    rec_steady = [(r, s) for r, s in rec if s - t_first >= warm and s <= sent[-1]]
    lat = np.array([r - s for r, s in rec_steady]) * 1e3
    ages_steady = np.array(ages[int(warm * rate_hz):]) * 1e3
    dur = sent[-1] - (t_first + warm)
    slope = float(np.polyfit([s - t_first for _, s in rec_steady], lat, 1)[0]) if len(lat) > 2 else float("nan")
    half = len(lat) // 2

    def pct(a, q):
        return float(np.percentile(a, q)) if len(a) else float("nan")

    return {
        "config": name,
        "node_args": extra,
        "frames_published": len(sent),
        "publish_rate_hz": len(sent) / (sent[-1] - sent[0]) if len(sent) > 1 else 0.0,
        "odometry_received": len(rec),
        "sustained_fps": len(rec_steady) / dur if dur > 0 else 0.0,
        "latency_ms": {"p50": pct(lat, 50), "p90": pct(lat, 90), "p99": pct(lat, 99), "max": float(lat.max()) if len(lat) else float("nan")},
        "pose_age_ms": {"p50": pct(ages_steady, 50), "p90": pct(ages_steady, 90), "max": float(ages_steady.max()) if len(ages_steady) else float("nan")},
        "latency_slope_ms_per_s": slope,
        "latency_first_half_mean_ms": float(lat[:half].mean()) if half else float("nan"),
        "latency_second_half_mean_ms": float(lat[half:].mean()) if half else float("nan"),
        "frames_skipped_by_policy": int(last_diag.get("dropped_by_policy", -1)),
        "node_diagnostics_last": last_diag,
        "pose_age_within_100ms": bool(len(ages_steady) and ages_steady.max() <= 100.0),
        # no backlog: a frame never waits for more than the engine's slowest frame (one frame
        # in the slot, newer ones replace it) - the node's own figures over its last 300 frames
        "queue_wait_ms_max": _num(last_diag.get("queue_wait_ms_max")),
        "engine_ms_p50": _num(last_diag.get("engine_ms_p50")),
        "engine_ms_max": _num(last_diag.get("engine_ms_max")),
        "no_backlog_growth": bool(_num(last_diag.get("queue_wait_ms_max")) <= _num(last_diag.get("engine_ms_max")) + 50.0),
        "log": str(log_path.relative_to(REPO)),
    }


def main() -> None:
    """Render the stream, run every configuration, write the JSON results."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=30.0, help="streaming time per configuration")
    ap.add_argument("--rate", type=float, default=30.0, help="publication rate (Hz)")
    ap.add_argument("--width", type=int, default=320)
    ap.add_argument("--height", type=int, default=240)
    ap.add_argument("--frames", type=int, default=240, help="distinct frames rendered (a closed loop, replayed)")
    ap.add_argument("--configs", default="default,fast", help=f"comma list of {', '.join(CONFIGS)}")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "node_latency.json")
    args = ap.parse_args()

    frames = _frames(args.frames, args.width, args.height)
    load_before = os.getloadavg()
    results = []
    for name in args.configs.split(","):
        print(f"[bench_node_latency] {name}: streaming {args.width}x{args.height} at {args.rate} Hz for {args.seconds} s")
        r = run_config(name, CONFIGS[name], frames, args.seconds, args.rate)
        r["engine_alone"] = engine_alone(name, frames)
        print(json.dumps({k: v for k, v in r.items() if k != "node_diagnostics_last"}, indent=1))
        results.append(r)
    out = {
        "benchmark": "bench_node_latency",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": _machine(),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "stream": {"width": args.width, "height": args.height, "rate_hz": args.rate, "seconds": args.seconds,
                   "frames": args.frames, "source": "synthetic room, loop trajectory, exact depth"},
        "requirement": "no backlog growth at 30 Hz input; published pose never more than 100 ms old",
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
