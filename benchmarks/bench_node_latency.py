"""Latency and sustained frame rate of the SLAM node on a 30 Hz synthetic RGB-D stream.

    python benchmarks/bench_node_latency.py [--seconds 30] [--width 320 --height 240]
                                            [--configs default,fast] [--variants process,thread]
                                            [--repeat 1] [--out benchmarks/results/node_latency.json]

A publisher (this process, rclpy) sends a synthetic 320x240 RGB-D sequence at 30 Hz with
sensor-data QoS, header stamps = wall-clock time of publication (messages pre-built, only
the stamps change, so the publisher costs little); the node runs in its own process with its
default parameters (``fast``: processing width 160), once per variant:

* ``process``: ``engine_process:=true`` (default): the engine in a process of its own, fed
  the newest frame through shared memory;
* ``thread``: ``engine_process:=false``: the engine in a worker thread of the node.

Variants run one after the other for each configuration in the same session, so they see
about the same machine load (recorded before and after each run). Measured:

* latency: odometry received here minus the image stamp (image publication -> odometry
  received, across processes: DDS both ways plus the node), and the node's own figure
  (image arrival in its callback -> odometry published) from ``/diagnostics``;
* pose age: at every image publication, how old the newest received pose is
  (now - its image stamp); the requirement is <= 100 ms;
* sustained rate: odometry messages per second after a warm-up;
* frames skipped by the newest-frame policy (a newer frame replaced one the engine had not
  taken yet), from ``/diagnostics``;
* engine time per frame, from ``/diagnostics``: until the pose was known and published
  (``engine_ms``) and for the whole frame (``engine_total_ms``: the frame's map work, fusion,
  keyframe decision and backend hand-off, runs after its pose is published);
* the engine alone (no ROS, every frame of the same stream, same settings) as a baseline
  separating the engine's cost from the node's, and the engine alone fed in real time
  (30 Hz clock, newest frame, same policy as the node): the best a node can do on this
  machine at this load;
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
import copy  # noqa: E402
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
#: where the node runs the engine
VARIANTS = {
    "process": ["-p", "engine_process:=true"],
    "thread": ["-p", "engine_process:=false"],
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


def engine_alone_realtime(name: str, frames: list, seconds: float = 15.0, rate_hz: float = 30.0) -> dict:
    """Baseline: the engine alone (no ROS) fed in real time: at each step it takes the newest frame of a
    ``rate_hz`` clock (older ones are skipped), as the node's newest-frame policy does, and runs live as
    the node's engine does (``live=True``: backend between frames, pose handed out before the map work).

    Frames carry their due time as stamp (as the node's frames carry the image stamps). Latency = pose
    known (``on_pose``, else end of processing) - due time of the frame; pose age = at each due time, how
    long ago the newest frame with a known pose was due.
    """
    from recon_slam.ros.engine_process import warm_up_torch
    from recon_slam.system import SlamSystem

    warm_up_torch()  # as the node's engine does: no one-time import (sympy, ~0.5 s) at the first skipped frame
    system = SlamSystem(dict(ENGINE_OVERRIDES[name], device="cpu"), frames[0].camera, live=True)
    done: list = []  # (due time of the frame, time its pose was known)
    states: dict = {}
    try:
        t0 = time.monotonic()
        last = -1
        while time.monotonic() - t0 < seconds:
            k = int((time.monotonic() - t0) * rate_hz)
            if k == last:
                time.sleep(max(0.0, t0 + (k + 1) / rate_hz - time.monotonic()))
                continue
            f = copy.copy(frames[k % len(frames)])
            f.index = k
            f.stamp = k / rate_hz
            posed: list = []
            r = system.process(f, on_pose=lambda _r: posed.append(time.monotonic()))
            done.append((t0 + k / rate_hz, posed[0] if posed else time.monotonic()))
            states[r.state] = states.get(r.state, 0) + 1
            last = k
    finally:
        system.close()
    warm = 2.0
    lat = np.array([c - d for d, c in done if d - t0 >= warm]) * 1e3
    ages = []
    for k in range(int(warm * rate_hz), int(seconds * rate_hz)):
        t = t0 + k / rate_hz
        prev = [d for d, c in done if c <= t]
        if prev:
            ages.append(t - prev[-1])
    ages = np.array(ages) * 1e3
    return {"seconds": seconds, "frames_processed": len(done), "fps": len(done) / seconds,
            "latency_ms": {"p50": _pct(lat, 50), "p90": _pct(lat, 90), "max": float(lat.max()) if len(lat) else float("nan")},
            "pose_age_ms": {"p50": _pct(ages, 50), "p90": _pct(ages, 90), "max": float(ages.max()) if len(ages) else float("nan")},
            "pose_age_over_100ms": int((ages > 100.0).sum()), "states": states}


def _pct(a, q) -> float:
    return float(np.percentile(a, q)) if len(a) else float("nan")


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


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (nan when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


def _children(pid: int) -> list:
    out = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            out += [int(c) for c in (task / "children").read_text().split()]
    except OSError:
        pass
    return out


def run_config(name: str, extra: list, frames: list, seconds: float, rate_hz: float, variant: str = "process") -> dict:
    """Start the node with ``extra`` parameters, stream ``frames`` at ``rate_hz`` for ``seconds``; return figures."""
    import rclpy
    from diagnostic_msgs.msg import DiagnosticArray
    from nav_msgs.msg import Odometry
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.qos import QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
    from sensor_msgs.msg import CameraInfo, Image

    from recon_slam.io.messages import RclpyTypes, make_camera_info, make_image, sec_to_stamp_parts

    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    log_path = REPO / "benchmarks" / "results" / f"node_latency_{name}_{variant}.log"
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
        # pre-build the messages so publishing costs little (only the stamps change)
        fid = "camera_optical_frame"
        enc = [(make_camera_info(types, f.camera, 0.0, fid), make_image(types, f.depth, "16UC1", 0.0, fid),
                make_image(types, f.image, "rgb8", 0.0, fid)) for f in frames]
        period = 1.0 / rate_hz
        load_start = os.getloadavg()
        engine_pids = [c for c in _children(proc.pid) if "spawn_main" in Path(f"/proc/{c}/cmdline").read_text()]
        cpu_start = (_cpu_seconds(proc.pid), sum(_cpu_seconds(c) for c in engine_pids), time.monotonic())
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
            info, dep, img = enc[k % len(enc)]
            stamp = time.time()
            sec, nsec = sec_to_stamp_parts(stamp)
            for m in (info, dep, img):
                m.header.stamp.sec, m.header.stamp.nanosec = sec, nsec
            pub_info.publish(info)
            pub_dep.publish(dep)
            pub_img.publish(img)
            sent.append(stamp)
            with lock:
                if received:
                    ages.append((stamp, stamp - received[-1][1]))
            k += 1
        load_end = os.getloadavg()
        cpu_end = (_cpu_seconds(proc.pid), sum(_cpu_seconds(c) for c in engine_pids), time.monotonic())
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
    ages_steady = np.array([a for s, a in ages if s - t_first >= warm]) * 1e3
    dur = sent[-1] - (t_first + warm)
    slope = float(np.polyfit([s - t_first for _, s in rec_steady], lat, 1)[0]) if len(lat) > 2 else float("nan")
    half = len(lat) // 2

    def pct(a, q):
        return float(np.percentile(a, q)) if len(a) else float("nan")

    return {
        "config": name,
        "variant": variant,
        "node_args": extra,
        "load_average_start": load_start,
        "load_average_end": load_end,
        # CPU use while streaming, % of one core: the node process and its engine process (if any)
        "cpu_percent": {"node": 100.0 * (cpu_end[0] - cpu_start[0]) / (cpu_end[2] - cpu_start[2]),
                        "engine_process": 100.0 * (cpu_end[1] - cpu_start[1]) / (cpu_end[2] - cpu_start[2])},
        "frames_published": len(sent),
        "publish_rate_hz": len(sent) / (sent[-1] - sent[0]) if len(sent) > 1 else 0.0,
        "odometry_received": len(rec),
        "sustained_fps": len(rec_steady) / dur if dur > 0 else 0.0,
        "latency_ms": {"p50": pct(lat, 50), "p90": pct(lat, 90), "p99": pct(lat, 99), "max": float(lat.max()) if len(lat) else float("nan")},
        "pose_age_ms": {"p50": pct(ages_steady, 50), "p90": pct(ages_steady, 90), "p99": pct(ages_steady, 99),
                        "max": float(ages_steady.max()) if len(ages_steady) else float("nan")},
        # image publications at which the newest received pose was more than 100 ms old
        "pose_age_over_100ms": int((ages_steady > 100.0).sum()),
        # the five worst moments, [seconds since the first image, ms] (to find them in a trace)
        "pose_age_worst": [[round(s - t_first, 3), round(1e3 * a, 1)]
                           for s, a in sorted((x for x in ages if x[0] - t_first >= warm), key=lambda x: -x[1])[:5]],
        "latency_worst": [[round(s - t_first, 3), round(1e3 * (r - s), 1)]
                          for r, s in sorted(rec_steady, key=lambda x: -(x[0] - x[1]))[:5]],
        "latency_slope_ms_per_s": slope,
        "latency_first_half_mean_ms": float(lat[:half].mean()) if half else float("nan"),
        "latency_second_half_mean_ms": float(lat[half:].mean()) if half else float("nan"),
        "frames_skipped_by_policy": int(last_diag.get("dropped_by_policy", -1)),
        "node_latency_ms": {"p50": _num(last_diag.get("latency_p50_ms")), "p90": _num(last_diag.get("latency_p90_ms")),
                            "max": _num(last_diag.get("latency_max_ms"))},
        "node_pose_age_ms": {"p50": _num(last_diag.get("pose_age_ms_p50")), "p90": _num(last_diag.get("pose_age_ms_p90")),
                             "max": _num(last_diag.get("pose_age_ms_max"))},
        "node_diagnostics_last": last_diag,
        "pose_age_within_100ms": bool(len(ages_steady) and ages_steady.max() <= 100.0),
        # no backlog: a frame never waits for more than the engine's slowest frame (one frame
        # in the slot, newer ones replace it) - the node's own figures over its last 300 frames
        "queue_wait_ms_max": _num(last_diag.get("queue_wait_ms_max")),
        "engine_ms_p50": _num(last_diag.get("engine_ms_p50")),
        "engine_ms_max": _num(last_diag.get("engine_ms_max")),
        # the whole frame in the engine, with the map work done after the pose was handed out
        "engine_total_ms_p50": _num(last_diag.get("engine_total_ms_p50")),
        "engine_total_ms_max": _num(last_diag.get("engine_total_ms_max")),
        # (a frame waits at most for the whole previous frame: its map work runs after its pose)
        "no_backlog_growth": bool(_num(last_diag.get("queue_wait_ms_max"))
                                  <= np.nanmax([_num(last_diag.get("engine_ms_max")),
                                                _num(last_diag.get("engine_total_ms_max"))]) + 50.0),
        "log": str(log_path.relative_to(REPO)),
    }


def _summary(r: dict) -> dict:
    return {
        "config": r["config"], "variant": r["variant"], "run": r.get("run", 1),
        "sustained_fps": round(r["sustained_fps"], 2),
        "latency_ms_p50/p90/max": [round(r["latency_ms"][k], 1) for k in ("p50", "p90", "max")],
        "pose_age_ms_p50/p90/max": [round(r["pose_age_ms"][k], 1) for k in ("p50", "p90", "max")],
        "pose_age_over_100ms": r["pose_age_over_100ms"],
        "skipped": r["frames_skipped_by_policy"], "engine_ms_p50/max": [r["engine_ms_p50"], r["engine_ms_max"]],
        "engine_total_ms_p50/max": [r["engine_total_ms_p50"], r["engine_total_ms_max"]],
        "cpu_percent_node/engine_process": [round(r["cpu_percent"]["node"]), round(r["cpu_percent"]["engine_process"])],
        "load_average_1min_start/end": [round(r["load_average_start"][0], 2), round(r["load_average_end"][0], 2)],
    }


def main() -> None:
    """Render the stream, run every configuration and variant, write the JSON results."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=30.0, help="streaming time per configuration and variant")
    ap.add_argument("--rate", type=float, default=30.0, help="publication rate (Hz)")
    ap.add_argument("--width", type=int, default=320)
    ap.add_argument("--height", type=int, default=240)
    ap.add_argument("--frames", type=int, default=240, help="distinct frames rendered (a closed loop, replayed)")
    ap.add_argument("--configs", default="default,fast", help=f"comma list of {', '.join(CONFIGS)}")
    ap.add_argument("--variants", default="process,thread", help=f"comma list of {', '.join(VARIANTS)}")
    ap.add_argument("--baselines", type=int, default=1, help="also run the engine-alone baselines (0: skip)")
    ap.add_argument("--repeat", type=int, default=1, help="runs per configuration and variant (the variant order "
                    "alternates between runs)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "node_latency.json")
    args = ap.parse_args()

    frames = _frames(args.frames, args.width, args.height)
    load_before = os.getloadavg()
    results, baselines = [], {}
    for name in args.configs.split(","):
        for rep in range(args.repeat):
            variants = args.variants.split(",")
            for variant in variants if rep % 2 == 0 else variants[::-1]:  # alternate the order: fairer under drifting load
                print(f"[bench_node_latency] {name}/{variant} (run {rep + 1}/{args.repeat}): streaming "
                      f"{args.width}x{args.height} at {args.rate} Hz for {args.seconds} s (load {os.getloadavg()[0]:.2f})")
                r = run_config(name, CONFIGS[name] + VARIANTS[variant], frames, args.seconds, args.rate, variant)
                r["run"] = rep + 1
                print(json.dumps(_summary(r), indent=1))
                results.append(r)
        if args.baselines:
            load0 = os.getloadavg()
            baselines[name] = {"every_frame": engine_alone(name, frames),
                               "realtime_30hz": engine_alone_realtime(name, frames, rate_hz=args.rate),
                               "load_average_start": load0, "load_average_end": os.getloadavg()}
            print(f"[bench_node_latency] {name} engine alone:", json.dumps(baselines[name], indent=1))
    out = {
        "benchmark": "bench_node_latency",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": _machine(),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "stream": {"width": args.width, "height": args.height, "rate_hz": args.rate, "seconds": args.seconds,
                   "frames": args.frames, "source": "synthetic room, loop trajectory, exact depth"},
        "requirement": "no backlog growth at 30 Hz input; published pose never more than 100 ms old",
        "summary": [_summary(r) for r in results],
        "results": results,
        "engine_alone": baselines,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
