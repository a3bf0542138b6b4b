"""``recon-slam map`` and ``recon-slam reloc``: relocaliser maps for runs, localisation in maps.

* ``recon-slam map RUN_DIR --out MAP`` trains the scene-coordinate relocaliser for an
  existing ``recon-slam run`` output (its ``summary.json`` says how to re-open the source,
  ``trajectory.txt`` gives the poses) and writes a relocaliser map (no SLAM keyframes: for
  localisation; ``run --save-map`` writes full maps SLAM can continue in).
* ``recon-slam reloc --map MAP SOURCE --out DIR`` localises every frame of SOURCE from its
  image alone and writes ``poses.txt`` (TUM, localised frames), ``reloc.csv`` (per frame:
  accepted or not, inliers, confidence, time, errors) and ``summary.json`` (with ground
  truth: share of frames within 5 cm / 5 degrees, median errors).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

from recon_slam.errors import InputError

__all__ = ["add_map_parsers", "build_map_for_run", "relocalise_source"]


def _rot_err_deg(R_a: np.ndarray, R_b: np.ndarray) -> float:
    c = (np.trace(R_a.T @ R_b) - 1.0) / 2.0
    return float(np.degrees(np.arccos(np.clip(c, -1.0, 1.0))))


def _rigid(T: np.ndarray) -> np.ndarray:
    T = np.asarray(T, dtype=np.float64).copy()
    s = float(np.cbrt(np.linalg.det(T[:3, :3])))
    T[:3, :3] /= s
    return T


# ---------------------------------------------------------------------------- map
def build_map_for_run(run_dir: str | Path, out: str | Path, source: Optional[str | Path] = None,
                      device: str = "auto", config_overrides: Optional[list[str]] = None,
                      progress: bool = True) -> dict[str, Any]:
    """Train a relocaliser for a finished run and save it as a (relocaliser-only) map.

    Args:
        run_dir: output folder of ``recon-slam run`` (summary.json, trajectory.txt).
        out: map folder to write (atomically).
        source: the run's input (default: ``source_path`` recorded in summary.json).
        device: 'auto', 'cpu' or 'cuda'.
        config_overrides: ``section.key=value`` overrides (e.g. ``reloc.iterations=2000``).

    Returns:
        a summary dict (frames used, training seconds, map size).
    """
    from recon_slam.config import load_config
    from recon_slam.frontend.predictors import make_predictor
    from recon_slam.io.datasets import open_source
    from recon_slam.io.trajectory import read_tum
    from recon_slam.maps import MapData, save_map
    from recon_slam.maps.build import alignment_to_ground_truth, mapping_arrays, train_map_relocaliser
    from recon_slam.system import resolve_device

    run_dir = Path(run_dir)
    summary_path = run_dir / "summary.json"
    if not summary_path.is_file() or not (run_dir / "trajectory.txt").is_file():
        raise InputError(f"{run_dir} is not a `recon-slam run` output folder (summary.json, trajectory.txt); "
                         "run SLAM first: recon-slam run SOURCE --out DIR")
    info = json.loads(summary_path.read_text())
    src_path = source or info.get("source_path")
    if not src_path:
        raise InputError(f"{summary_path} does not say where the run's frames came from: give SOURCE with --source")
    cfg = load_config(info.get("config") or None, config_overrides or [])
    if cfg.mode == "mono":
        raise InputError("monocular runs have no metric depth to train a relocaliser from outside the engine: "
                         "save the map during the run with `recon-slam run ... --save-map DIR` instead")
    dev = resolve_device(device)
    src = open_source(src_path, calib=info.get("calib"), stride=int(info.get("stride") or 1),
                      max_frames=info.get("max_frames"))
    stamps, T = read_tum(run_dir / "trajectory.txt")
    predictor = make_predictor(cfg.mode, cfg.predictor, dev, cfg.mono)
    t0 = time.perf_counter()
    arrays = mapping_arrays(src, stamps, T, predictor, cfg.reloc.mapping_frames, progress=progress)
    rel, stats = train_map_relocaliser(arrays, cfg.reloc, device=str(dev))
    train_s = time.perf_counter() - t0
    T_gt = None
    if getattr(src, "has_ground_truth", False):
        gt = src.ground_truth()
        if gt is not None:
            T_gt = alignment_to_ground_truth(stamps, T, gt[0], gt[1])
    cloud = None
    if (run_dir / "cloud.ply").is_file():
        try:
            import open3d as o3d

            pcd = o3d.io.read_point_cloud(str(run_dir / "cloud.ply"))
            xyz = np.asarray(pcd.points, dtype=np.float32)
            rgb = (np.asarray(pcd.colors) * 255.0).round().astype(np.uint8) if pcd.has_colors() else None
            cloud = (xyz, rgb) if len(xyz) else None
        except Exception:  # noqa: BLE001 - the cloud is for viewers only
            cloud = None
    data = MapData(keyframes=[], mode=cfg.mode, config=cfg.to_dict(), trajectory=(stamps, T), cloud=cloud,
                   relocaliser=rel.state_dict(), T_gt_world=T_gt, camera=arrays["cameras"][0])
    save_map(data, out)
    return {"map": str(out), "mapping_frames": int(len(arrays["images"])), "train_s": train_s,
            "relocaliser_bytes": int(rel.size_bytes()), "device": str(dev)}


# ---------------------------------------------------------------------------- reloc
def relocalise_source(map_path: str | Path, source, out: Optional[str | Path] = None, device: str = "auto",
                      progress: bool = True) -> dict[str, Any]:
    """Localise every frame of ``source`` in a saved map from its image alone.

    Args:
        map_path: map folder with a relocaliser.
        source: a FrameSource (frames with ``image``, ``camera`` and optionally
            ``T_world_cam_gt``).
        out: folder for poses.txt, reloc.csv and summary.json (None: nothing written).
        device: 'auto', 'cpu' or 'cuda'.

    Returns:
        summary dict: ``n_queries``, ``n_localised``, ``ms_median``; with ground truth
        ``within_5cm_5deg`` (share of ALL queries, rejected ones count as failures),
        ``median_t_m`` / ``median_r_deg`` (over all queries, rejected = infinite) and the
        same medians over the localised queries.
    """
    from recon_slam.io.trajectory import write_tum
    from recon_slam.maps import load_map, load_relocaliser
    from recon_slam.system import resolve_device

    data = load_map(map_path)
    dev = resolve_device(device)
    rel = load_relocaliser(data, dev)
    T_gt_world = data.T_gt_world if data.T_gt_world is not None else np.eye(4)
    rows, st, poses = [], [], []
    it = iter(source)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, total=len(source), desc="relocalising", unit="frame", dynamic_ncols=True)
    for frame in it:
        res = rel.localize(frame.image, frame.camera)
        row = {"index": int(frame.index), "stamp": float(frame.stamp), "ok": bool(res.ok), "inliers": int(res.inliers),
               "confidence": float(res.confidence), "time_ms": float(res.time_ms), "err_t_m": float("nan"),
               "err_r_deg": float("nan")}
        if res.ok:
            T = np.asarray(res.T_world_cam, dtype=np.float64)
            st.append(frame.stamp)
            poses.append(T)
            if frame.T_world_cam_gt is not None:
                T_est = _rigid(T_gt_world @ T)
                G = np.asarray(frame.T_world_cam_gt, dtype=np.float64)
                row["err_t_m"] = float(np.linalg.norm(T_est[:3, 3] - G[:3, 3]))
                row["err_r_deg"] = _rot_err_deg(T_est[:3, :3], G[:3, :3])
        rows.append(row)
    n = len(rows)
    ok = [r for r in rows if r["ok"]]
    summary: dict[str, Any] = {
        "map": str(map_path), "n_queries": n, "n_localised": len(ok),
        "localised_fraction": len(ok) / max(n, 1),
        "ms_median": float(np.median([r["time_ms"] for r in rows])) if rows else float("nan"),
        "device": str(dev),
    }
    with_gt = [r for r in rows if r["ok"] and np.isfinite(r["err_t_m"])]
    if with_gt or (rows and all(not r["ok"] for r in rows)):
        et = np.array([r["err_t_m"] if r["ok"] else np.inf for r in rows])
        er = np.array([r["err_r_deg"] if r["ok"] else np.inf for r in rows])
        good = (et <= 0.05) & (er <= 5.0)
        summary.update(
            within_5cm_5deg=float(good.mean()) if n else 0.0,
            median_t_m=float(np.median(et)) if n else float("nan"),
            median_r_deg=float(np.median(er)) if n else float("nan"),
            median_t_m_localised=float(np.median([r["err_t_m"] for r in with_gt])) if with_gt else float("nan"),
            median_r_deg_localised=float(np.median([r["err_r_deg"] for r in with_gt])) if with_gt else float("nan"),
        )
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        if poses:
            write_tum(out / "poses.txt", np.asarray(st), np.stack(poses),
                      header="recon-slam reloc: localised frames, T_world_cam in the map's world frame")
        with open(out / "reloc.csv", "w") as f:
            keys = list(rows[0]) if rows else ["index"]
            f.write(",".join(keys) + "\n")
            for r in rows:
                f.write(",".join(str(r[k]) for k in keys) + "\n")
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


# ---------------------------------------------------------------------------- parsers
def _cmd_map(args: argparse.Namespace) -> int:
    res = build_map_for_run(args.run_dir, args.out, args.source, args.device or "auto", args.set, not args.quiet)
    print(f"map written to {res['map']}: relocaliser trained on {res['mapping_frames']} frames in "
          f"{res['train_s']:.1f} s ({res['relocaliser_bytes'] / 1e6:.2f} MB, {res['device']})")
    return 0


def _cmd_reloc(args: argparse.Namespace) -> int:
    from recon_slam.io.datasets import open_source

    source = open_source(args.source, calib=args.calib, stride=args.stride, max_frames=args.max_frames)
    s = relocalise_source(args.map, source, args.out, args.device or "auto", not args.quiet)
    line = f"{s['n_localised']}/{s['n_queries']} frames localised, median {s['ms_median']:.1f} ms per frame"
    if "within_5cm_5deg" in s:
        line += (f"; {100 * s['within_5cm_5deg']:.1f} % within 5 cm / 5 deg, median error "
                 f"{100 * s['median_t_m']:.2f} cm / {s['median_r_deg']:.2f} deg")
    print(line)
    print(f"outputs in {args.out}/: poses.txt, reloc.csv, summary.json")
    return 0


def add_map_parsers(sub) -> None:
    """Add the ``map`` and ``reloc`` sub-commands to the ``recon-slam`` parser."""
    p = sub.add_parser("map", help="train the relocaliser for an existing run and save it as a map")
    p.add_argument("run_dir", type=Path, help="output folder of `recon-slam run`")
    p.add_argument("--out", type=Path, required=True, help="map folder to write")
    p.add_argument("--source", type=Path, help="the run's input (default: recorded in summary.json)")
    p.add_argument("--device", default=None, help="auto (default), cpu, cuda")
    p.add_argument("--set", nargs="+", metavar="KEY=VALUE", help="override config keys, e.g. reloc.iterations=2000")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_map)

    p = sub.add_parser("reloc", help="localise every frame of a source in a saved map (single images)")
    p.add_argument("source", type=Path, help="TUM, 7-Scenes, KITTI, EuRoC, image folder or bag")
    p.add_argument("--map", type=Path, required=True, help="map folder (with a relocaliser)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--calib", type=Path, help="intrinsics YAML when the source has none")
    p.add_argument("--device", default=None, help="auto (default), cpu, cuda")
    p.add_argument("--stride", type=int, default=1, help="use every N-th frame")
    p.add_argument("--max-frames", type=int, help="stop after this many frames")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_reloc)
