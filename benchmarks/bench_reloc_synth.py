"""ACE-style relocaliser on the synthetic room: accuracy, speed, map size, wrong answers.

    python benchmarks/bench_reloc_synth.py [--device auto|cpu|cuda] [--map-frames 500]
        [--queries 200] [--query-trajectory revisit|reloc] [--wrong 200]
        [--width 320 --height 240] [--timing-frames 20] [--no-depth-noise]
        [--set iterations=3000 --set max_seconds=40 ...] [--out reloc_synth]

Steps (progress is printed as it goes):

1. render the map: ``--map-frames`` frames of the ``loop`` trajectory through ``room``
   (RGB, metric depth with Kinect-like noise and holes unless ``--no-depth-noise``,
   ground-truth poses);
2. mapping: :func:`recon_slam.reloc.train_relocaliser` on ``--device`` (CUDA when
   available with ``auto``) with the default :class:`RelocConfig`; on CUDA the
   optimisation gets ``max_seconds=40`` unless ``--set max_seconds=...`` says otherwise
   (the time-based schedule still anneals); the mapping time includes resizing, novel
   view synthesis and upload;
3. queries: ``--queries`` frames of the second trajectory: share within 5 cm / 5 deg
   (accepted poses only: a rejected query counts as a failure), median translation /
   rotation error. The second trajectory (``--query-trajectory revisit``, the default)
   is :func:`recon_slam.synth.trajectories.revisit_trajectory` of the map's loop: a second
   pass through the mapped space along another path, as in 7-Scenes (separate recordings
   of the same space): another phase and sampling, 5-20 cm off the map's path (smooth
   sideways / vertical offsets, never closer than 5 cm, so no query coincides with a map
   frame), with its own heading (+-10 deg), pitch (+-6 deg) and roll (+-4 deg)
   deviations. The results hold the distribution of query-to-nearest-map-frame distances
   and angles and the share of query pixels whose surface some map frame saw
   (``query_geometry``). ``--query-trajectory reloc`` uses the ``reloc`` trajectory
   instead, the benchmark's earlier query set: a figure-of-eight 30 cm lower, inside the
   loop, 0.8-1.1 m from the nearest map frame and 0.9-2.2 m from the nearest one looking
   the same way, with about 40 % of its pixels on surfaces no map frame saw (floor and
   table areas): it measures extrapolation to views far from every map frame rather than
   relocalisation in a mapped space. ``--revisit-offset 0.1,0.35 --revisit-yaw 15`` makes
   the second pass wander further (10-35 cm, +-15 deg);
4. timing per 640x480 frame: ``--timing-frames`` query frames rendered at 640x480,
   ``localize`` timed end to end (resize, network, RANSAC) on the mapping device and, on
   a copy of the map, on the CPU with 2 threads;
5. wrong answers: ``--wrong`` frames of another scene (``room_b``, its ``reloc`` and
   ``loop`` trajectories): share that returns a pose (should be <= 1 %);
6. map size: bytes of the relocaliser's weights (``state_dict``) and of the saved file.

Bars: >= 97 % within 5 cm / 5 deg, median <= 1.5 cm, mapping (500 frames) <= 60 s on an
H100, relocalisation <= 20 ms (H100) / <= 300 ms (2 CPU cores), map <= 8 MB,
wrong answers <= 1 %. Results: ``benchmarks/results/<out>.json`` (machine and date included).
On a CPU-only machine, use fewer iterations (``--set iterations=...``) and frames: the
settings used are recorded with the figures.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import write_results  # noqa: E402

from recon_slam.reloc import RelocConfig, Relocaliser, train_relocaliser  # noqa: E402


# ---------------------------------------------------------------------------- helpers (shared with bench_reloc_tum)
def parse_overrides(items) -> dict:
    """``key=value`` strings (JSON values, else strings) -> dict of RelocConfig overrides."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise SystemExit(f"--set {item!r}: expected key=value (e.g. --set iterations=2000)")
        k, v = item.split("=", 1)
        try:
            out[k.strip()] = json.loads(v)
        except json.JSONDecodeError:
            out[k.strip()] = v
    return out


def pose_errors(T_est: np.ndarray, T_gt: np.ndarray) -> tuple[float, float]:
    """Translation (m) and rotation (deg) error between two (4, 4) T_world_cam."""
    t = float(np.linalg.norm(T_est[:3, 3] - T_gt[:3, 3]))
    c = (np.trace(T_est[:3, :3].T @ T_gt[:3, :3]) - 1.0) / 2.0
    return t, math.degrees(math.acos(float(np.clip(c, -1.0, 1.0))))


def evaluate_queries(reloc: Relocaliser, frames, label: str, every: int = 25) -> dict:
    """Localise frames with ground truth; accuracy figures and per-frame records."""
    recs = []
    t0 = time.perf_counter()
    for i, f in enumerate(frames):
        r = reloc.localize(f.image, f.camera)
        te, re = (float("inf"), 180.0)
        if r.candidate is not None:
            te, re = pose_errors(r.candidate, f.T_world_cam_gt)
        recs.append({"ok": bool(r.ok), "t_err_m": te, "r_err_deg": re, "inliers": r.inliers,
                     "confidence": round(r.confidence, 4), "ms": round(r.time_ms, 2)})
        if (i + 1) % every == 0 or i + 1 == len(frames):
            done = sum(x["ok"] and x["t_err_m"] < 0.05 and x["r_err_deg"] < 5 for x in recs)
            print(f"  [{label}] {i + 1}/{len(frames)} queries, {done} within 5 cm / 5 deg, "
                  f"{time.perf_counter() - t0:.1f} s", flush=True)
    return summarise(recs)


def jsonable(obj):
    """``obj`` with numpy scalars/arrays turned into Python values and inf/NaN into None."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(float(obj)) else None
    return obj


def _finite(x: float):
    """``x``, or None when it is inf/NaN (strict JSON has no infinities)."""
    return x if math.isfinite(x) else None


def summarise(recs) -> dict:
    """Accuracy figures of per-query records (a failed or rejected query counts as wrong)."""
    n = len(recs)
    ok = np.array([r["ok"] for r in recs])
    te = np.array([r["t_err_m"] for r in recs])
    re = np.array([r["r_err_deg"] for r in recs])
    good = ok & (te < 0.05) & (re < 5.0)
    good_cand = (te < 0.05) & (re < 5.0)
    conf = np.array([r["confidence"] for r in recs])
    te_ok = np.where(ok, te, np.inf)
    re_ok = np.where(ok, re, 180.0)
    recs = [{k: (bool(v) if isinstance(v, (bool, np.bool_)) else float(v) if isinstance(v, np.floating) else v)
             for k, v in r.items()} for r in recs]
    return {
        "queries": n,
        "within_5cm_5deg_pct": round(100.0 * good.mean(), 2) if n else None,
        "within_2cm_2deg_pct": round(100.0 * (ok & (te < 0.02) & (re < 2.0)).mean(), 2) if n else None,
        "within_10cm_10deg_pct": round(100.0 * (ok & (te < 0.1) & (re < 10.0)).mean(), 2) if n else None,
        "accepted_pct": round(100.0 * ok.mean(), 2) if n else None,
        "candidate_within_5cm_5deg_pct": round(100.0 * good_cand.mean(), 2) if n else None,
        "median_t_err_cm": _finite(round(100.0 * float(np.median(te_ok)), 3)) if n else None,
        "median_r_err_deg": round(float(np.median(re_ok)), 3) if n else None,
        "median_t_err_cm_candidates": _finite(round(100.0 * float(np.median(te)), 3)) if n else None,
        "median_inliers": float(np.median([r["inliers"] for r in recs])) if n else None,
        "min_confidence_correct": round(float(conf[good_cand].min()), 4) if good_cand.any() else None,
        "median_ms": round(float(np.median([r["ms"] for r in recs])), 2) if n else None,
        "per_query": [{k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in r.items()}
                      for r in recs],
    }


def wrong_answer_rate(reloc: Relocaliser, frames, label: str) -> dict:
    """Share of frames from another scene that the map wrongly accepts."""
    conf, acc = [], 0
    for f in frames:
        r = reloc.localize(f.image, f.camera)
        acc += int(r.ok)
        conf.append(r.confidence)
    conf = np.sort(np.array(conf))[::-1]
    print(f"  [{label}] {acc}/{len(frames)} wrong-scene queries accepted "
          f"(confidence max {conf[0]:.3f}, median {np.median(conf):.3f})", flush=True)
    return {"queries": len(frames), "accepted": acc, "accepted_pct": round(100.0 * acc / max(len(frames), 1), 2),
            "confidence_max": round(float(conf[0]), 4), "confidence_median": round(float(np.median(conf)), 4),
            "confidence_top10": [round(float(c), 4) for c in conf[:10]]}


def time_localize(reloc: Relocaliser, frames, repeats: int = 1) -> dict:
    """End-to-end localize() time per frame (first call excluded as warm-up)."""
    reloc.localize(frames[0].image, frames[0].camera)
    ts = []
    for _ in range(repeats):
        for f in frames:
            if reloc.device.type == "cuda":
                torch.cuda.synchronize(reloc.device)
            t = time.perf_counter()
            reloc.localize(f.image, f.camera)
            ts.append((time.perf_counter() - t) * 1e3)
    size = f"{frames[0].camera.width}x{frames[0].camera.height}"
    return {"frames": len(ts), "size": size, "median_ms": round(statistics.median(ts), 2),
            "mean_ms": round(statistics.fmean(ts), 2), "p90_ms": round(float(np.percentile(ts, 90)), 2)}


def cpu_copy(reloc: Relocaliser) -> Relocaliser:
    """The same map on the CPU (through its state dict, as a loaded map would be)."""
    return Relocaliser.from_state_dict(reloc.state_dict(), device="cpu")


def map_size(reloc: Relocaliser) -> dict:
    buf = io.BytesIO()
    torch.save(reloc.state_dict(), buf)
    return {"weights_bytes": reloc.size_bytes(), "file_bytes": buf.getbuffer().nbytes,
            "parameters": sum(p.numel() for p in reloc.net.parameters())}


def progress_printer(every_s: float = 5.0):
    last = [0.0]

    def cb(rec):
        now = time.perf_counter()
        if rec.get("done") or now - last[0] >= every_s:
            last[0] = now
            print(f"  mapping step {rec['step']}/{rec['steps']} loss {rec['loss']:.4f} lr {rec['lr']:.2e} "
                  f"{rec['seconds']:.1f} s", flush=True)

    return cb


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def cpu_threads_block(reloc: Relocaliser, frames, threads: int = 2) -> dict:
    """Timing of a CPU copy of the map with ``threads`` torch threads (restored after)."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        res = time_localize(cpu_copy(reloc), frames)
        res["threads"] = threads
        return res
    finally:
        torch.set_num_threads(old)


# ---------------------------------------------------------------------------- query set
def query_poses(kind: str, map_seq, n: int, seed: int, offset_m=(0.05, 0.2), yaw_deg: float = 10.0) -> np.ndarray:
    """Poses of the query trajectory ``kind`` ("revisit" or "reloc") for the map ``map_seq``."""
    from recon_slam.synth.trajectories import make_trajectory, revisit_trajectory

    if kind == "revisit":
        return revisit_trajectory(map_seq.poses, n, map_seq.scene, seed=seed, offset_m=tuple(offset_m),
                                  yaw_deg=yaw_deg)
    return make_trajectory(kind, n, map_seq.scene, seed)


def _rotation_deg(Ra: np.ndarray, Rb: np.ndarray) -> np.ndarray:
    c = (np.einsum("...ji,...ji->...", Ra, Rb) - 1.0) / 2.0  # trace(Ra^T Rb)
    return np.degrees(np.arccos(np.clip(c, -1.0, 1.0)))


def query_geometry(map_frames, query_frames, camera, every: int = 4) -> dict:
    """How the queries relate to the map: distance and angle to the nearest map frames,
    and the share of query cells (stride 16) on surfaces some map frame saw (depth of the
    map frames, 3 % tolerance; holes count as unseen)."""
    Tm = np.stack([f.T_world_cam_gt for f in map_frames])
    Tq = np.stack([f.T_world_cam_gt for f in query_frames])
    d = np.linalg.norm(Tq[:, None, :3, 3] - Tm[None, :, :3, 3], axis=-1)
    near = d.argmin(1)
    ang_near = _rotation_deg(Tq[:, :3, :3], Tm[near, :3, :3])
    ang_all = _rotation_deg(Tq[:, None, :3, :3], Tm[None, :, :3, :3])  # (Q, M)
    map_depth = [f.depth for f in map_frames]
    seen = []
    for f in query_frames[::every]:
        D = f.depth
        v, u = np.mgrid[8 : camera.height : 16, 8 : camera.width : 16]
        z = D[v, u].reshape(-1)
        ok = z > 0
        pc = np.stack(((u.reshape(-1) - camera.cx) / camera.fx * z, (v.reshape(-1) - camera.cy) / camera.fy * z, z), -1)
        X = pc[ok] @ f.T_world_cam_gt[:3, :3].T + f.T_world_cam_gt[:3, 3]
        hit = np.zeros(len(X), bool)
        for T, Dm in zip(Tm, map_depth):
            q = (X - T[:3, 3]) @ T[:3, :3]
            zq = q[:, 2]
            front = zq > 0.1
            uq = camera.fx * q[:, 0] / np.where(front, zq, 1.0) + camera.cx
            vq = camera.fy * q[:, 1] / np.where(front, zq, 1.0) + camera.cy
            inside = front & (uq >= 0) & (uq <= camera.width - 1) & (vq >= 0) & (vq <= camera.height - 1)
            ui = np.clip(np.round(uq).astype(int), 0, camera.width - 1)
            vi = np.clip(np.round(vq).astype(int), 0, camera.height - 1)
            hit |= inside & (np.abs(Dm[vi, ui] - zq) < 0.03 * np.maximum(zq, 1e-6))
        seen.append(hit.mean() if len(hit) else 0.0)

    def pct(x):
        return {p: round(float(np.percentile(x, int(p[1:]))), 4) for p in ("p0", "p10", "p50", "p90", "p100")}

    return {
        "nearest_map_frame_distance_m": pct(d.min(1)),
        "angle_to_nearest_map_frame_deg": pct(ang_near),
        "smallest_angle_to_any_map_frame_deg": pct(ang_all.min(1)),
        "queries_closer_than_1cm_and_1deg_to_a_map_frame": int(np.sum((d < 0.01) & (ang_all < 1.0))),
        "share_of_query_cells_seen_by_the_map": pct(np.array(seen)),
        "queries_sampled_for_coverage": len(seen),
    }


# ---------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="auto", help="auto (CUDA if available), cpu or cuda")
    ap.add_argument("--map-frames", type=int, default=500)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--query-trajectory", default="revisit", choices=("revisit", "reloc"),
                    help="revisit (default): a second pass through the mapped space; reloc: the old figure-of-eight")
    ap.add_argument("--revisit-offset", default="0.05,0.2",
                    help="revisit: smallest,largest distance to the map's path in metres")
    ap.add_argument("--revisit-yaw", type=float, default=10.0, help="revisit: largest heading deviation (deg)")
    ap.add_argument("--wrong", type=int, default=200, help="frames of room_b (half reloc, half loop)")
    ap.add_argument("--width", type=int, default=320)
    ap.add_argument("--height", type=int, default=240)
    ap.add_argument("--timing-frames", type=int, default=20)
    ap.add_argument("--no-depth-noise", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", action="append", default=[], help="RelocConfig override key=value (repeatable)")
    ap.add_argument("--out", default=None, help="results name (default reloc_synth_<device>)")
    args = ap.parse_args(argv)
    revisit_offset = [float(x) for x in args.revisit_offset.split(",")]

    from recon_slam.synth import SyntheticSequence

    device = resolve_device(args.device)
    overrides = parse_overrides(args.set)
    if device == "cuda" and "max_seconds" not in overrides:
        overrides["max_seconds"] = 40.0  # optimisation budget: keeps a 500-frame mapping within 60 s
    cfg = RelocConfig(short_side=min(args.width, args.height), **overrides)
    print(f"device {device}, config {cfg.to_dict()}", flush=True)

    t = time.perf_counter()
    map_seq = SyntheticSequence("room", "loop", frames=args.map_frames, width=args.width, height=args.height,
                                seed=args.seed, depth_noise=not args.no_depth_noise)
    map_frames = list(map_seq)
    q_T = query_poses(args.query_trajectory, map_seq, args.queries, args.seed, revisit_offset, args.revisit_yaw)
    q_frames = list(SyntheticSequence("room", width=args.width, height=args.height, seed=args.seed, poses=q_T))
    print(f"rendered {len(map_frames)} map + {len(q_frames)} query frames ({args.query_trajectory}) in "
          f"{time.perf_counter() - t:.1f} s", flush=True)
    t = time.perf_counter()
    geometry = query_geometry(map_frames, q_frames, map_seq.camera)
    print(f"queries vs map: nearest map frame {geometry['nearest_map_frame_distance_m']} m, angle to it "
          f"{geometry['angle_to_nearest_map_frame_deg']} deg, share of query cells the map saw "
          f"{geometry['share_of_query_cells_seen_by_the_map']} ({time.perf_counter() - t:.1f} s)", flush=True)

    print("mapping ...", flush=True)
    reloc, stats = train_relocaliser(map_frames, cfg, device=device, progress=progress_printer())
    del map_frames
    print(f"mapping done: {stats.seconds:.1f} s ({stats.iterations} steps, train {stats.train_seconds:.1f} s), "
          f"median 3D error on map frames {100 * (stats.median_3d_error_m or float('nan')):.2f} cm", flush=True)

    print(f"queries ({args.query_trajectory} trajectory) ...", flush=True)
    q = evaluate_queries(reloc, q_frames, args.query_trajectory)
    print(f"  within 5 cm / 5 deg: {q['within_5cm_5deg_pct']} %, median {q['median_t_err_cm']} cm / "
          f"{q['median_r_err_deg']} deg, accepted {q['accepted_pct']} %", flush=True)

    print("timing at 640x480 ...", flush=True)
    n_t = max(2, args.timing_frames)
    t_frames = list(SyntheticSequence("room", width=640, height=480, seed=args.seed, poses=query_poses(
        args.query_trajectory, map_seq, n_t, args.seed, revisit_offset, args.revisit_yaw)))
    timing = {device: time_localize(reloc, t_frames)}
    acc640 = summarise([{"ok": r.ok, "t_err_m": e[0], "r_err_deg": e[1], "inliers": r.inliers,
                         "confidence": r.confidence, "ms": r.time_ms}
                        for f in t_frames
                        for r in [reloc.localize(f.image, f.camera)]
                        for e in [pose_errors(r.candidate, f.T_world_cam_gt) if r.candidate is not None
                                  else (float("inf"), 180.0)]])
    acc640.pop("per_query")
    if device != "cpu" or torch.get_num_threads() != 2:
        timing["cpu"] = cpu_threads_block(reloc, t_frames, 2)
    else:
        timing["cpu"] = dict(timing[device], threads=torch.get_num_threads())
    for k, v in timing.items():
        print(f"  {k}: median {v['median_ms']} ms per {v['size']} frame", flush=True)

    print("wrong answers (room_b) ...", flush=True)
    n_w = args.wrong // 2
    wrong_frames = list(SyntheticSequence("room_b", "reloc", frames=max(2, n_w), width=args.width,
                                          height=args.height, seed=args.seed))
    wrong_frames += list(SyntheticSequence("room_b", "loop", frames=max(2, args.wrong - n_w), width=args.width,
                                           height=args.height, seed=args.seed + 1))
    wrong = wrong_answer_rate(reloc, wrong_frames, "room_b")

    size = map_size(reloc)
    print(f"map size: {size['weights_bytes'] / 1e6:.2f} MB weights, {size['file_bytes'] / 1e6:.2f} MB file, "
          f"{size['parameters']} parameters", flush=True)

    bars = {
        "within_5cm_5deg_ge_97pct": q["within_5cm_5deg_pct"] >= 97.0,
        "median_le_1p5cm": q["median_t_err_cm"] is not None and q["median_t_err_cm"] <= 1.5,
        "wrong_answers_le_1pct": wrong["accepted_pct"] <= 1.0,
        "map_le_8MB": size["file_bytes"] <= 8 * 1024 * 1024,
        "cpu_reloc_le_300ms": timing["cpu"]["median_ms"] <= 300.0,
    }
    if device == "cuda":
        bars["gpu_reloc_le_20ms"] = timing["cuda"]["median_ms"] <= 20.0
        if args.map_frames >= 500:
            bars["mapping_500_le_60s"] = stats.seconds <= 60.0
    results = {
        "benchmark": f"ACE-style relocaliser, synthetic room (map: loop, queries: {args.query_trajectory}, "
                     "wrong: room_b)",
        "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
        "settings": {"device": device, "map_frames": args.map_frames, "queries": args.queries,
                     "query_trajectory": args.query_trajectory, "revisit_offset_m": revisit_offset,
                     "revisit_yaw_deg": args.revisit_yaw,
                     "wrong": args.wrong, "size": f"{args.width}x{args.height}",
                     "depth_noise": not args.no_depth_noise, "seed": args.seed,
                     "load_average": [round(x, 2) for x in os.getloadavg()]},
        "config": reloc.config.to_dict(),  # as trained (per-device defaults resolved)
        "mapping": {k: v for k, v in stats.to_dict().items() if k != "history"},
        "mapping_history": stats.history,
        "query_geometry": geometry,
        "queries": q,
        "queries_640x480": acc640,
        "timing": timing,
        "wrong_scene": wrong,
        "map_size": size,
        "bars": bars,
    }
    bars = {k: bool(v) for k, v in bars.items()}
    write_results(args.out or f"reloc_synth_{device}", jsonable(results))
    print("bars: " + ", ".join(f"{k}={'PASS' if v else 'FAIL'}" for k, v in bars.items()), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
