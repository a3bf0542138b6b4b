"""Monocular engine alone (no network): per-frame cost of matching, Sim(3) solve and fusion.

    python benchmarks/bench_mono_engine.py --device cuda [--frames 120] [--modes host,graph]
                                           [--set mono.match_stride=4 ...] [--profile 20]

The network's share of a monocular frame is measured by ``bench_mono_speed.py``; this
script isolates the rest. The engine is fed the oracle's MASt3R-shaped outputs
(:class:`recon_slam.frontend.oracle.OraclePredictor`, synthetic loop, 512x384 by default),
recorded once on the device in an untimed pass, so the timed passes measure only what the
engine does with a prediction: iterative projective matching in ray space, descriptor
refinement, the Sim(3) solve, fusion and keyframe decisions (backend in its thread).

For every ``mono.device_loop`` mode in ``--modes`` (``host``, ``device``, ``graph``) one
timed pass over the same frames on a fresh engine gives the engine time per frame (mean,
p50, p90, max), the engine's own stage means, keyframes, lost frames and the ATE of the
pass (Sim(3)-aligned, % of the path length) so that a faster setting that tracks worse
shows up. ``--profile N`` adds a torch.profiler table of N frames per mode
(``<name>_profile_<mode>.txt``). Results: ``benchmarks/results/<name>.json`` (default
``mono_engine_<device>``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_mono_speed import CachedOracle, _stats  # noqa: E402
from common import RESULTS_DIR, write_results  # noqa: E402

from recon_slam.config import load_config  # noqa: E402
from recon_slam.frontend.oracle import OraclePredictor  # noqa: E402
from recon_slam.synth import SyntheticSequence  # noqa: E402
from recon_slam.system import SlamSystem  # noqa: E402


def _ate_percent(system: SlamSystem, frames) -> float | None:
    """Sim(3)-aligned ATE RMSE of the pass in % of the ground-truth path length (None: no poses).

    Plain Umeyama on the camera centres (frame order), so that it also runs where evo is
    not installed.
    """
    _, T_world_cam = system.trajectory()
    gt = [f.T_world_cam_gt for f in frames[: len(T_world_cam)]]
    if len(T_world_cam) < 3 or any(g is None for g in gt):
        return None
    est = np.asarray(T_world_cam)[:, :3, 3]
    ref = np.stack(gt)[:, :3, 3]
    mu_e, mu_r = est.mean(0), ref.mean(0)
    e, r = est - mu_e, ref - mu_r
    U, S, Vt = np.linalg.svd(r.T @ e / len(e))
    D = np.eye(3)
    D[2, 2] = np.sign(np.linalg.det(U @ Vt))
    R = U @ D @ Vt
    s = np.trace(np.diag(S) @ D) / max((e ** 2).sum() / len(e), 1e-300)
    err = r - s * (e @ R.T)
    rmse = float(np.sqrt((err ** 2).sum(1).mean()))
    return 100.0 * rmse / max(float(np.linalg.norm(np.diff(ref, axis=0), axis=1).sum()), 1e-12)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--frames", type=int, default=120)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--height", type=int, default=384)
    parser.add_argument("--modes", default="host,graph", help="mono.device_loop modes to time")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    parser.add_argument("--profile", type=int, default=0, metavar="N", help="profile N frames per mode")
    parser.add_argument("--name", default=None)
    args = parser.parse_args()

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    W, H = args.width, args.height
    seq = SyntheticSequence(scene="room", trajectory="loop", frames=args.frames, width=W, height=H, seed=0,
                            depth_noise=False)
    frames = list(seq)
    overrides = {"device": str(device), "mode": "mono", "mono.long_side": max(W, H),
                 "predictor.width": W, "predictor.height": H}
    cfg = load_config(None, overrides)
    if args.set:
        cfg = load_config(cfg, args.set)
    oracle = CachedOracle(OraclePredictor(cfg.predictor, device, seed=0))

    def run(frames_, mode: str, prof=None, label: str = ""):
        cfg.mono.device_loop = mode
        system = SlamSystem(cfg, seq.camera, predictor=oracle)
        live0 = oracle.live_ms
        wall = []
        t_all = time.perf_counter()
        for i, f in enumerate(frames_):
            t = time.perf_counter()
            system.process(f)
            if cuda:
                torch.cuda.synchronize(device)
            wall.append((time.perf_counter() - t) * 1e3)
            if prof is not None:
                prof.step()
            if label and (i + 1) % 50 == 0:
                print(f"  [{label}] {i + 1}/{len(frames_)}, last {wall[-1]:.1f} ms", flush=True)
        total = time.perf_counter() - t_all
        system.finish()
        stats = system.stats()
        ate = _ate_percent(system, frames_)
        system.close()
        live = oracle.live_ms - live0
        return {"wall": np.asarray(wall), "stats": stats, "live_ms": live, "ate": ate,
                "fps": len(frames_) / max(total - live / 1e3, 1e-9)}

    modes = [m for m in args.modes.split(",") if m]
    print(f"{len(frames)} frames {W}x{H} on {device}; recording the oracle (untimed) ...", flush=True)
    run(frames, "host", label="record")
    for m in modes:  # warm-up (graph capture, allocator, lazy constants)
        run(frames[:8], m)
    results = {}
    for m in modes:
        r = run(frames, m, label=m)
        results[m] = {"engine_fps": round(r["fps"], 2), "engine_ms": _stats(r["wall"].tolist()),
                      "stage_ms": {k: round(v, 3) for k, v in (r["stats"].get("stage_ms") or {}).items()},
                      "n_keyframes": r["stats"].get("n_keyframes"), "n_lost": r["stats"].get("n_lost"),
                      "ate_sim3_percent_of_path": None if r["ate"] is None else round(r["ate"], 4),
                      "oracle_live_ms_subtracted": round(r["live_ms"], 1)}
        print(f"{m}: {results[m]}", flush=True)
    name = args.name or f"mono_engine_{device.type}"
    res = {"command": " ".join(sys.argv), "device": str(device), "input_wh": [W, H], "frames": len(frames),
           "config_overrides": args.set, "modes": results,
           "note": "engine only: the oracle's recorded outputs replace the network (see bench_mono_speed.py "
                   "for the network and the end-to-end rate)"}
    write_results(name, res)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        key = "cuda_time_total" if cuda else "cpu_time_total"
        for m in modes:
            with profile(activities=acts) as prof:
                run(frames[: args.profile], m, prof=prof)
            text = (f"torch.profiler, engine only, mode {m}, {args.profile} frames, sorted by {key}\n"
                    + prof.key_averages().table(sort_by=key, row_limit=45)
                    + "\nsorted by self CPU time\n" + prof.key_averages().table(sort_by="self_cpu_time_total",
                                                                                row_limit=25))
            (RESULTS_DIR / f"{name}_profile_{m}.txt").write_text(text)


if __name__ == "__main__":
    main()
