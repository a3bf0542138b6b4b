"""SLAM accuracy, speed and robustness on synthetic loop sequences (exact ground truth).

    python benchmarks/bench_slam_synth.py [--frames 600] [--width 320 --height 240]
                                          [--cases all|rgbd,rgbd_no_lc,stereo,...] [--device cpu]

Cases (each a full run of the engine through ``recon_slam.runner.run_slam``):
  rgbd          RGB-D with loop closure (depth noise and holes on); the loop is flown
                --lc-laps times (default 2) so that the start is revisited with drift
  rgbd_no_lc    the same with loop closure disabled (no loop edges, no re-anchoring on
                old keyframes: pure keyframe odometry)
  stereo        rectified stereo (SGBM) with loop closure, one lap
  stereo_no_lc  the same with loop closure disabled
  drop20        RGB-D with 20 % of the frames dropped at random
  black5        RGB-D with 5 consecutive black frames (no depth) in the middle
  zerodepth5    RGB-D with 5 consecutive frames without depth in the middle
  long          RGB-D, the loop played again and again (--long-frames in all): the camera
                keeps revisiting the room; keyframe count and memory are recorded per lap

Bars (issue 3): ATE <= 0.5 % of the path (RGB-D, with loop closure), loop closure
reduces the ATE, stereo <= 1.5 %, perturbed runs complete, report lost frames and stay
within 2x the bar. Results: benchmarks/results/slam_synth.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import write_results  # noqa: E402

from recon_slam.config import load_config  # noqa: E402
from recon_slam.io.datasets.perturb import PerturbedSource, RepeatedSource  # noqa: E402
from recon_slam.runner import public_summary, run_slam  # noqa: E402
from recon_slam.synth import SyntheticSequence  # noqa: E402

ALL_CASES = ("rgbd", "rgbd_no_lc", "stereo", "stereo_no_lc", "drop20", "black5", "zerodepth5", "long")


def _case(name: str, args) -> dict:
    stereo = name.startswith("stereo")
    frames = args.frames
    seq = SyntheticSequence(scene="room", trajectory="loop", frames=frames, width=args.width,
                            height=args.height, seed=args.seed, depth_noise=True, stereo=stereo)
    source = seq
    mid = frames // 2
    if name == "drop20":
        source = PerturbedSource(seq, drop_fraction=0.2, seed=1)
    elif name == "black5":
        source = PerturbedSource(seq, blank_start=mid, blank_count=5, blank_kind="black")
    elif name == "zerodepth5":
        source = PerturbedSource(seq, blank_start=mid, blank_count=5, blank_kind="zero_depth")
    elif name in ("rgbd", "rgbd_no_lc") and args.lc_laps > 1:
        source = RepeatedSource(seq, laps=args.lc_laps)
    elif name == "long":
        source = RepeatedSource(seq, laps=max(1, -(-args.long_frames // frames)))
    overrides = {"device": args.device, "mode": "stereo" if stereo else "rgbd"}
    if name.endswith("_no_lc"):
        overrides["backend.loop_closure"] = False
    cfg = load_config(None, overrides)
    growth = []  # (frame, keyframes, keyframe memory in bytes) once per lap

    def on_frame(frame, result, system):
        if (frame.index + 1) % frames == 0:
            st = system.stats()
            growth.append((frame.index + 1, system.num_keyframes, st.get("memory_bytes")))

    t0 = time.perf_counter()
    summary = public_summary(run_slam(source, None, cfg, progress=not args.quiet, desc=name, on_frame=on_frame))
    summary["wall_s"] = time.perf_counter() - t0
    summary["frames_in_sequence"] = frames
    keep = ("n_frames", "n_keyframes", "n_lost", "fps", "ate_rmse_m", "path_length_m", "ate_percent_of_path",
            "n_loop_closures", "memory_per_keyframe_bytes", "states", "wall_s", "frames_in_sequence", "device")
    out = {k: summary.get(k) for k in keep}
    out["growth_per_lap"] = growth
    print(f"{name:12s} ATE {out['ate_rmse_m'] * 100:.2f} cm = {out['ate_percent_of_path']:.3f} % of "
          f"{out['path_length_m']:.1f} m, {out['n_keyframes']} kf, {out['n_lost']} lost, {out['fps']:.1f} fps")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=600)
    parser.add_argument("--long-frames", type=int, default=5000)
    parser.add_argument("--lc-laps", type=int, default=2, help="laps of the loop in the rgbd/rgbd_no_lc cases")
    parser.add_argument("--width", type=int, default=320)
    parser.add_argument("--height", type=int, default=240)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cases", default="all")
    parser.add_argument("--name", default="slam_synth", help="results file name (without .json)")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    cases = ALL_CASES if args.cases == "all" else tuple(args.cases.split(","))
    results = {"command": " ".join(sys.argv), "frames": args.frames, "resolution": [args.width, args.height],
               "cases": {}}
    for name in cases:
        results["cases"][name] = _case(name, args)
    c = results["cases"]
    checks = {}
    if "rgbd" in c:
        checks["rgbd_ate_le_0.5_percent"] = c["rgbd"]["ate_percent_of_path"] <= 0.5
    if "rgbd" in c and "rgbd_no_lc" in c:
        checks["loop_closure_reduces_ate"] = c["rgbd"]["ate_rmse_m"] < c["rgbd_no_lc"]["ate_rmse_m"]
    if "stereo" in c and "stereo_no_lc" in c:
        checks["stereo_loop_closure_reduces_ate"] = c["stereo"]["ate_rmse_m"] < c["stereo_no_lc"]["ate_rmse_m"]
    if "stereo" in c:
        checks["stereo_ate_le_1.5_percent"] = c["stereo"]["ate_percent_of_path"] <= 1.5
    for name in ("drop20", "black5", "zerodepth5"):
        if name in c:
            checks[f"{name}_within_2x_bar"] = c[name]["ate_percent_of_path"] <= 1.0
    for name in ("black5", "zerodepth5"):
        if name in c:
            checks[f"{name}_reports_lost"] = c[name]["n_lost"] >= 5
    results["checks"] = checks
    print("checks:", checks)
    write_results(args.name, results)


if __name__ == "__main__":
    main()
