"""ACE-style relocaliser on real TUM RGB-D frames (fr2/desk, 50 frames).

    python benchmarks/bench_reloc_tum.py [--data ../shared/data/tum_fr2_desk_50]
        [--device auto|cpu|cuda] [--wrong 100] [--set iterations=2000 ...] [--out reloc_tum]

The frames are read (and undistorted) by :class:`recon_slam.io.datasets.TumSource`
(640x480, depth PNG / 5000, ground truth from ``groundtruth.txt``):

* map: the even frames (0, 2, 4, ...) with their ground-truth poses and depth (default
  :class:`RelocConfig`; on CUDA ``max_seconds=40`` unless ``--set`` overrides it);
* queries: the odd frames: share within 5 cm / 5 deg (bar: >= 95 %), median errors;
* timing: ``localize`` per 640x480 frame on the mapping device and, on a CPU copy of the
  map, with 2 CPU threads;
* wrong answers: ``--wrong`` synthetic frames (``room`` and ``room_b``, 640x480) that are
  not of this scene: share that returns a pose;
* map size in bytes.

Results: ``benchmarks/results/<out>.json`` with machine and date.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_reloc_synth import (  # noqa: E402
    cpu_threads_block,
    evaluate_queries,
    jsonable,
    map_size,
    parse_overrides,
    progress_printer,
    resolve_device,
    time_localize,
    wrong_answer_rate,
)
from common import write_results  # noqa: E402

from recon_slam.reloc import RelocConfig, train_relocaliser  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "tum_fr2_desk_50"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--device", default="auto", help="auto (CUDA if available), cpu or cuda")
    ap.add_argument("--wrong", type=int, default=100, help="synthetic frames of other scenes")
    ap.add_argument("--set", action="append", default=[], help="RelocConfig override key=value (repeatable)")
    ap.add_argument("--out", default=None, help="results name (default reloc_tum_<device>)")
    args = ap.parse_args(argv)

    from recon_slam.io.datasets import TumSource
    from recon_slam.synth import SyntheticSequence

    device = resolve_device(args.device)
    overrides = parse_overrides(args.set)
    if device == "cuda" and "max_seconds" not in overrides:
        overrides["max_seconds"] = 40.0
    cfg = RelocConfig(**overrides)
    print(f"device {device}, config {cfg.to_dict()}", flush=True)

    t = time.perf_counter()
    src = TumSource(args.data)
    frames = [f for f in src if f.T_world_cam_gt is not None]
    if len(frames) < 4:
        raise SystemExit(f"{args.data}: fewer than 4 frames with ground truth")
    map_frames, q_frames = frames[0::2], frames[1::2]
    print(f"read {len(frames)} frames ({frames[0].camera.width}x{frames[0].camera.height}) in "
          f"{time.perf_counter() - t:.1f} s: {len(map_frames)} map, {len(q_frames)} queries", flush=True)

    print("mapping ...", flush=True)
    reloc, stats = train_relocaliser(map_frames, cfg, device=device, progress=progress_printer())
    print(f"mapping done: {stats.seconds:.1f} s ({stats.iterations} steps), median 3D error on map frames "
          f"{100 * (stats.median_3d_error_m or float('nan')):.2f} cm", flush=True)

    print("queries (odd frames) ...", flush=True)
    q = evaluate_queries(reloc, q_frames, "odd frames", every=5)
    print(f"  within 5 cm / 5 deg: {q['within_5cm_5deg_pct']} %, median {q['median_t_err_cm']} cm / "
          f"{q['median_r_err_deg']} deg", flush=True)

    print("timing (640x480) ...", flush=True)
    timing = {device: time_localize(reloc, q_frames)}
    if device != "cpu" or torch.get_num_threads() != 2:
        timing["cpu"] = cpu_threads_block(reloc, q_frames, 2)
    else:
        timing["cpu"] = dict(timing[device], threads=2)
    for k, v in timing.items():
        print(f"  {k}: median {v['median_ms']} ms per {v['size']} frame", flush=True)

    print("wrong answers (synthetic scenes) ...", flush=True)
    n = max(2, args.wrong // 2)
    wrong_frames = list(SyntheticSequence("room_b", "reloc", frames=n, width=640, height=480, seed=0))
    wrong_frames += list(SyntheticSequence("room", "handheld", frames=n, width=640, height=480, seed=1))
    wrong = wrong_answer_rate(reloc, wrong_frames, "synthetic")

    size = map_size(reloc)
    print(f"map size: {size['weights_bytes'] / 1e6:.2f} MB weights, {size['file_bytes'] / 1e6:.2f} MB file",
          flush=True)
    bars = {
        "within_5cm_5deg_ge_95pct": q["within_5cm_5deg_pct"] >= 95.0,
        "wrong_answers_le_1pct": wrong["accepted_pct"] <= 1.0,
        "map_le_8MB": size["file_bytes"] <= 8 * 1024 * 1024,
        "cpu_reloc_le_300ms": timing["cpu"]["median_ms"] <= 300.0,
    }
    if device == "cuda":
        bars["gpu_reloc_le_20ms"] = timing["cuda"]["median_ms"] <= 20.0
    results = {
        "benchmark": "ACE-style relocaliser, TUM fr2/desk 50 frames (map: even frames, queries: odd frames)",
        "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
        "settings": {"device": device, "data": str(args.data), "map_frames": len(map_frames),
                     "queries": len(q_frames), "wrong": len(wrong_frames),
                     "load_average": [round(x, 2) for x in os.getloadavg()]},
        "config": reloc.config.to_dict(),  # as trained (per-device defaults resolved)
        "mapping": {k: v for k, v in stats.to_dict().items() if k != "history"},
        "mapping_history": stats.history,
        "queries": q,
        "timing": timing,
        "wrong_scene": wrong,
        "map_size": size,
        "bars": bars,
    }
    bars = {k: bool(v) for k, v in bars.items()}
    write_results(args.out or f"reloc_tum_{device}", jsonable(results))
    print("bars: " + ", ".join(f"{k}={'PASS' if v else 'FAIL'}" for k, v in bars.items()), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
