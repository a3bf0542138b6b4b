"""Monocular SLAM with the oracle two-view predictor on a synthetic loop (exact ground truth).

    python benchmarks/bench_mono_oracle.py [--frames 300 --laps 2] [--width 160 --height 120]
                                           [--cases all|mono_uncal,mono_uncal_no_lc,...] [--refine light|full]
                                           [--no-reuse] [--no-compact]

The oracle (:class:`recon_slam.frontend.oracle.OraclePredictor`, tests and benchmarks only)
fakes MASt3R's two-view outputs from the synthetic ground truth: one random scale per pair
(log-uniform in [0.5, 2]), per-pixel noise growing with distance, bent rays (focal and
radial error per view), a small pose error of the second view, flying pixels and low
confidence at depth edges, 24-d world-position descriptors. The engine itself sees only
those outputs (and the intrinsics in the calibrated cases): no depth, no ground truth.

The loop (``--frames`` per lap) is flown ``--laps`` times (``RepeatedSource``) so that the
start is revisited with drift. Cases (each a full ``recon_slam.runner.run_slam`` run):

  mono_uncal         uncalibrated (ray direction + distance residuals, no intrinsics used)
  mono_uncal_no_lc   the same with ``backend.loop_closure=False`` (keyframe odometry)
  mono_cal           calibrated (points on the known camera rays, pixel + log-depth)
  mono_cal_no_lc     the same without loop closure

ATE is Sim(3)-aligned (``evaluate_trajectory(..., align="sim3")``), in % of the path length.
Bounded map: ``n_keyframes_per_lap`` counts the keyframes at the end of each lap (with
keyframe reuse the second lap re-anchors on the first lap's keyframes; ``--no-reuse``
sets ``backend.reuse_keyframes=False``, the behaviour before it existed). Memory:
``memory_per_keyframe_bytes`` at the benchmark resolution (``SlamSystem.stats()``, the
oracle has no encoder tokens) and ``memory_per_keyframe_bytes_512x384``: the stored
keyframe parts scaled to MASt3R's 512x384 plus the float16 encoder tokens a keyframe keeps
there (768 x 1024 x 2 bytes; ``benchmarks/bench_mono_memory.py`` measures that with the
network predictor). ``--no-compact`` stores float32 pointmaps (before).
Bars: uncalibrated <= 1 %, calibrated <= 0.5 % (with loop closure), and loop closure
reduces the ATE in both. ``--refine light`` (default) searches descriptors in a 3x3 window
at dilations 2 and 1 (enough for the oracle, 5x cheaper on a CPU); ``full`` uses the
configuration default (7x7 window, dilations 5..1, as MASt3R-SLAM).
Results: benchmarks/results/mono_oracle.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import write_results  # noqa: E402

from recon_slam.config import load_config  # noqa: E402
from recon_slam.frontend import mono  # noqa: E402
from recon_slam.eval import evaluate_trajectory  # noqa: E402
from recon_slam.frontend.oracle import OraclePredictor  # noqa: E402
from recon_slam.io.datasets.perturb import RepeatedSource  # noqa: E402
from recon_slam.runner import public_summary, run_slam  # noqa: E402
from recon_slam.synth import SyntheticSequence  # noqa: E402

ALL_CASES = ("mono_uncal", "mono_uncal_no_lc", "mono_cal", "mono_cal_no_lc")
#: MASt3R's network resolution for 640x480 input and its cached keyframe tokens there
NET_W, NET_H = 512, 384
NET_TOKEN_BYTES = (NET_W // 16) * (NET_H // 16) * 1024 * 2  # ViT-L tokens, float16


def _memory(system, width: int, height: int) -> dict:
    """Bytes per keyframe by part at the benchmark resolution and extrapolated to 512x384."""
    kfs = system.keyframe_map.keyframes()
    parts = [mono.keyframe_bytes(k, system.predictor) for k in kfs]
    mean = {k: sum(p[k] for p in parts) / max(len(parts), 1) for k in (parts[0] if parts else {})}
    per_pixel = (mean.get("total", 0.0) - mean.get("tokens", 0.0)) / (width * height)
    return {"memory_per_keyframe_parts": mean,
            "memory_per_keyframe_bytes_512x384": per_pixel * NET_W * NET_H + NET_TOKEN_BYTES}


def _case(name: str, args) -> dict:
    seq = SyntheticSequence(scene="room", trajectory="loop", frames=args.frames, width=args.width,
                            height=args.height, seed=args.seed, depth_noise=False)
    source = RepeatedSource(seq, laps=args.laps) if args.laps > 1 else seq
    overrides = {
        "device": args.device, "mode": "mono", "predictor.width": args.width, "predictor.height": args.height,
        "mono.calibrated": "_cal" in name and "_uncal" not in name,
    }
    if args.refine == "light":
        overrides.update({"mono.refine_radius": 1, "mono.refine_dilations": [2, 1]})
    if name.endswith("_no_lc"):
        overrides["backend.loop_closure"] = False
    if args.no_reuse:
        overrides["backend.reuse_keyframes"] = False
    mono.COMPACT_KEYFRAMES = not args.no_compact
    cfg = load_config(None, overrides)
    oracle = OraclePredictor(cfg.predictor, cfg.device, seed=args.seed)
    per_lap: list[int] = []
    extra: dict = {}
    n_seen = [0]

    def on_frame(frame, result, system):
        n_seen[0] += 1
        if n_seen[0] % args.frames == 0:
            per_lap.append(system.num_keyframes)
        if n_seen[0] == len(source):
            extra.update(_memory(system, args.width, args.height))
            extra["n_reused"] = system._mono.n_reused
            extra["n_reuse_attempts"] = system._mono.n_reuse_attempts

    t0 = time.perf_counter()
    raw = run_slam(source, None, cfg, progress=not args.quiet, desc=name, predictor=oracle, on_frame=on_frame)
    wall = time.perf_counter() - t0
    summary = public_summary(raw)
    gt_stamps, gt_T = source.ground_truth()
    err = evaluate_trajectory(raw["_stamps"], raw["_T_world_cam"], gt_stamps, gt_T, align="sim3", max_diff=0.02)
    out = {
        "calibrated": bool(cfg.mono.calibrated),
        "loop_closure": bool(cfg.backend.loop_closure),
        "n_frames": summary["n_frames"],
        "n_keyframes": summary["n_keyframes"],
        "n_keyframes_per_lap": per_lap,
        "reuse_keyframes": bool(cfg.backend.reuse_keyframes),
        "compact_keyframes": bool(mono.COMPACT_KEYFRAMES),
        "n_lost": summary["n_lost"],
        "states": summary["states"],
        "n_loop_closures": summary.get("n_loop_closures"),
        "fps": summary["fps"],
        "wall_s": wall,
        "ate_rmse_m": err.ate_rmse_m,
        "ate_align": "sim3",
        "sim3_scale": err.scale,
        "path_length_m": err.path_length_m,
        "ate_percent_of_path": 100.0 * err.ate_rmse_m / max(err.path_length_m, 1e-9),
        "rpe_trans_rmse_m": err.rpe_trans_rmse_m,
        "oracle_pairs": oracle.n_pairs,
        "memory_per_keyframe_bytes": summary["memory_per_keyframe_bytes"],
        **extra,
    }
    print(f"{name:18s} ATE {out['ate_rmse_m'] * 100:.2f} cm = {out['ate_percent_of_path']:.3f} % of "
          f"{out['path_length_m']:.1f} m, {out['n_keyframes']} kf (per lap {per_lap}, "
          f"{out.get('n_reused')} reused), {out['n_loop_closures']} loop edges, {out['n_lost']} lost, "
          f"{out['fps']:.1f} fps, {out['memory_per_keyframe_bytes'] / 1024:.0f} KiB/kf here, "
          f"{out.get('memory_per_keyframe_bytes_512x384', 0) / 2**20:.2f} MiB/kf at 512x384", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=300, help="frames per lap of the loop")
    parser.add_argument("--laps", type=int, default=2, help="laps flown (2: the start is revisited)")
    parser.add_argument("--width", type=int, default=160)
    parser.add_argument("--height", type=int, default=120)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--refine", choices=("light", "full"), default="light")
    parser.add_argument("--cases", default="all")
    parser.add_argument("--name", default="mono_oracle", help="results file name (without .json)")
    parser.add_argument("--no-reuse", action="store_true", help="backend.reuse_keyframes=False (unbounded map)")
    parser.add_argument("--no-compact", action="store_true", help="float32 keyframe pointmaps")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    if args.frames * args.laps < 500:
        parser.error("use at least 500 frames in all (--frames x --laps)")
    cases = ALL_CASES if args.cases == "all" else tuple(args.cases.split(","))
    results = {"command": " ".join(sys.argv), "frames_per_lap": args.frames, "laps": args.laps,
               "resolution": [args.width, args.height], "refine": args.refine,
               "reuse_keyframes": not args.no_reuse, "compact_keyframes": not args.no_compact, "cases": {}}
    for name in cases:
        results["cases"][name] = _case(name, args)
    c = results["cases"]
    checks = {}
    if "mono_uncal" in c:
        checks["uncalibrated_ate_le_1_percent"] = c["mono_uncal"]["ate_percent_of_path"] <= 1.0
    if "mono_cal" in c:
        checks["calibrated_ate_le_0.5_percent"] = c["mono_cal"]["ate_percent_of_path"] <= 0.5
    for kind in ("uncal", "cal"):
        a, b = f"mono_{kind}", f"mono_{kind}_no_lc"
        if a in c and b in c:
            checks[f"{kind}_loop_closure_reduces_ate"] = c[a]["ate_rmse_m"] < 0.8 * c[b]["ate_rmse_m"]
    for name, r in c.items():
        if r.get("memory_per_keyframe_bytes_512x384") is not None:
            checks[f"{name}_memory_per_keyframe_512x384_le_4MiB"] = r["memory_per_keyframe_bytes_512x384"] <= 4 * 2**20
    results["checks"] = checks
    print("checks:", checks)
    write_results(args.name, results)


if __name__ == "__main__":
    main()
