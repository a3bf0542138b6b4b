"""Engine throughput on a synthetic RGB-D loop (frames pre-rendered in memory).

    python benchmarks/bench_tracking_speed.py --device cpu  --width 320 --height 240 --frames 300
    python benchmarks/bench_tracking_speed.py --device cuda --width 640 --height 480 --frames 500

Frames are rendered first (not timed), then fed to ``SlamSystem.process`` one by one; the
time per call is what tracking costs end to end (pointmap prediction, matching, pose solve,
fusion, keyframe decisions; the backend runs in its own thread). With ``--backend off`` the
backend is disabled to isolate the frontend. The processing resolution is the input
resolution (``predictor.width``) unless ``--set`` says otherwise.
Results: benchmarks/results/tracking_speed_<device>_<W>x<H>.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import write_results  # noqa: E402

from recon_slam.config import load_config  # noqa: E402
from recon_slam.synth import SyntheticSequence  # noqa: E402
from recon_slam.system import SlamSystem  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--width", type=int, default=320)
    parser.add_argument("--height", type=int, default=240)
    parser.add_argument("--frames", type=int, default=300)
    parser.add_argument("--backend", choices=("on", "off"), default="on")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    parser.add_argument("--name", default=None)
    args = parser.parse_args()

    seq = SyntheticSequence(scene="room", trajectory="loop", frames=args.frames, width=args.width,
                            height=args.height, seed=0, depth_noise=True)
    t0 = time.perf_counter()
    frames = list(seq)
    render_s = time.perf_counter() - t0
    overrides = {"device": args.device, "predictor.width": args.width, "backend.enabled": args.backend == "on"}
    cfg = load_config(None, overrides)
    if args.set:
        cfg = load_config(cfg, args.set)
    system = SlamSystem(cfg, seq.camera)
    cuda = cfg.device != "cpu" and torch.cuda.is_available()
    # warm-up on a few frames (kernels, allocator), then a fresh system for the timed run
    for f in frames[:5]:
        system.process(f)
    system.close()
    system = SlamSystem(cfg, seq.camera)
    times = []
    t_all = time.perf_counter()
    for f in frames:
        t = time.perf_counter()
        system.process(f)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    wall = time.perf_counter() - t_all
    system.finish()
    stamps, T = system.trajectory()
    stats = system.stats()
    gt_t, gt_T = seq.ground_truth()
    # ATE without evo (the GPU machine may lack it): SE(3) Umeyama on camera centres
    P, Q = T[:, :3, 3], gt_T[:, :3, 3]
    mp, mq = P.mean(0), Q.mean(0)
    U, _, Vt = np.linalg.svd((Q - mq).T @ (P - mp))
    D = np.diag([1, 1, np.sign(np.linalg.det(U @ Vt))])
    R = U @ D @ Vt
    ate = float(np.sqrt(np.mean(np.sum((P @ R.T + (mq - mp @ R.T) - Q) ** 2, axis=1))))
    system.close()
    ms = np.asarray(times) * 1000
    res = {
        "command": " ".join(sys.argv),
        "device": str(stats.get("device", cfg.device)),
        "resolution": [args.width, args.height],
        "frames": len(frames),
        "backend": args.backend,
        "render_s_untimed": render_s,
        "fps": len(frames) / wall,
        "ms_p50": float(np.percentile(ms, 50)),
        "ms_p90": float(np.percentile(ms, 90)),
        "ms_max": float(ms.max()),
        "n_keyframes": int(stats.get("n_keyframes", 0)),
        "memory_per_keyframe_bytes": stats.get("memory_per_keyframe_bytes"),
        "ate_rmse_m": ate,
        "gpu_peak_memory_bytes": int(torch.cuda.max_memory_allocated()) if cuda else None,
        "stage_ms_mean": stats.get("stage_ms"),
        "config_overrides": args.set,
    }
    print({k: v for k, v in res.items() if k != "command"})
    name = args.name or f"tracking_speed_{'cuda' if cuda else 'cpu'}_{args.width}x{args.height}"
    write_results(name, res)


if __name__ == "__main__":
    main()
