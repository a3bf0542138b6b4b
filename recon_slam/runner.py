"""Offline runs of the engine on a frame source, with the standard output files.

``run_slam`` is what ``recon-slam run`` and ``recon-slam demo`` call; tests and benchmarks
call it too, so all of them measure the same thing.

Output folder layout:
    trajectory.txt   every frame, TUM format, T_world_cam (after the final optimisation)
    keyframes.txt    keyframe poses, TUM format, T_world_kf
    cloud.ply        fused, voxel-downsampled, coloured point cloud (world frame)
    summary.json     n_frames, n_keyframes, n_lost, fps, ate_rmse_m (with ground truth), ...
    trajectory.png   the path (and ground truth when known)
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from recon_slam.config import SlamConfig, load_config
from recon_slam.errors import InputError


def write_ply(path: str | Path, xyz: np.ndarray, rgb: np.ndarray | None = None) -> Path:
    """Write points ``(N, 3)`` (and colours ``(N, 3)`` uint8) as a binary PLY, atomically."""
    import open3d as o3d

    path = Path(path)
    pcd = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(np.asarray(xyz, dtype=np.float64).reshape(-1, 3)))
    if rgb is not None and len(rgb):
        pcd.colors = o3d.utility.Vector3dVector(np.asarray(rgb, dtype=np.float64).reshape(-1, 3) / 255.0)
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)
    if not o3d.io.write_point_cloud(str(tmp), pcd, write_ascii=False):
        raise InputError(f"could not write point cloud {path}: check the folder is writable")
    os.replace(tmp, path)
    return path


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def run_slam(
    source: Iterable,
    out_dir: str | Path | None,
    config: SlamConfig | None = None,
    progress: bool = True,
    desc: str = "SLAM",
    on_frame: Callable[[Any, Any, Any], None] | None = None,
    predictor: Any = None,
    save_map: str | Path | None = None,
    localize_map: Any = None,
    meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run the engine over every frame of ``source`` and write the output files.

    Args:
        source: a FrameSource (``camera``, ``__len__``, ``__iter__`` of :class:`Frame`,
            ``ground_truth()``).
        out_dir: output folder (created), or ``None`` to write nothing.
        config: engine configuration (defaults when ``None``).
        progress: show a progress bar.
        on_frame: called as ``on_frame(frame, result, system)`` after every frame (benchmarks).
        predictor: optional predictor object instead of the one the configuration selects
            (tests and benchmarks, e.g. the monocular oracle).
        save_map: also save the map here (atomic; with a trained relocaliser unless
            ``config.reloc.build_on_save`` is false); see :mod:`recon_slam.maps`.
        localize_map: a loaded :class:`~recon_slam.maps.MapData` (or a map folder) to start
            in: its keyframes are restored and its relocaliser attached before the first
            frame (``config.reloc.localize_only`` decides whether the map may grow).
        meta: extra entries for the summary (e.g. how to re-open the source:
            ``source_path``, ``calib``, ``stride``, ``max_frames``).

    Returns:
        The summary dict (also written to ``summary.json``), plus, under private keys,
        ``_stamps`` (N,) and ``_T_world_cam`` (N, 4, 4) of the final trajectory.
    """
    from tqdm import tqdm

    from recon_slam.system import SlamSystem

    config = load_config(config) if config is not None else load_config()
    out = None
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
    system = SlamSystem(config, source.camera, predictor=predictor)
    metric = bool(getattr(system.predictor, "metric", True))
    if localize_map is not None:
        from recon_slam.maps import load_map, restore_into_system

        mdata = load_map(localize_map) if not hasattr(localize_map, "keyframes") else localize_map
        restore_into_system(system, mdata)  # also attaches the map's relocaliser
    n_total = len(source)
    states: dict[str, int] = {}
    t0 = time.perf_counter()
    try:
        bar = tqdm(source, total=n_total, desc=desc, unit="frame", disable=not progress, dynamic_ncols=True)
        frames = iter(bar)
        upcoming = next(frames, None)
        while upcoming is not None:
            frame, upcoming = upcoming, next(frames, None)
            if upcoming is not None:  # the network may start on the next frame (mono, CUDA)
                system.prefetch(upcoming)
            result = system.process(frame)
            states[result.state] = states.get(result.state, 0) + 1
            if on_frame is not None:
                on_frame(frame, result, system)
            if progress and frame.index % 10 == 0:
                bar.set_postfix(state=result.state, kf=system.num_keyframes, refresh=False)
        tracking_s = time.perf_counter() - t0
        system.finish()
        total_s = time.perf_counter() - t0
        stamps, T_world_cam = system.trajectory()
        kf_ids, kf_stamps, T_world_kf = system.keyframes()
        stats = system.stats()
        cloud = system.fused_cloud(config.output.voxel_size) if out is not None else None
        map_data = None
        if save_map is not None:
            from recon_slam.maps import map_from_system

            map_data = map_from_system(system)
            frame_states = system.frame_states()
    finally:
        system.close()

    n = len(stamps)
    summary: dict[str, Any] = {
        "source": getattr(source, "name", type(source).__name__),
        "mode": config.mode,
        "device": stats.get("device", config.device),
        "n_frames": int(n),
        "n_keyframes": int(len(kf_ids)),
        "n_lost": int(stats.get("n_lost", states.get("lost", 0))),
        "states": states,
        "fps": float(n / tracking_s) if tracking_s > 0 else 0.0,
        "fps_including_backend_finish": float(n / total_s) if total_s > 0 else 0.0,
        "memory_per_keyframe_bytes": stats.get("memory_per_keyframe_bytes"),
        "n_loop_closures": stats.get("n_loop_closures"),
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cpus",
        "config": config.to_dict(),
        **(meta or {}),
    }
    gt = source.ground_truth() if getattr(source, "has_ground_truth", False) else None
    errors = None
    if gt is not None and n >= 2:
        from recon_slam.eval import evaluate_trajectory

        # a monocular (non-metric) trajectory is only defined up to scale: Sim(3) alignment
        align = "se3" if metric else "sim3"
        errors = evaluate_trajectory(stamps, T_world_cam, gt[0], gt[1], align=align, max_diff=0.02)
        summary.update(
            ate_rmse_m=errors.ate_rmse_m,
            ate_align=align,
            rpe_trans_rmse_m=errors.rpe_trans_rmse_m,
            path_length_m=errors.path_length_m,
            ate_percent_of_path=100.0 * errors.ate_rmse_m / max(errors.path_length_m, 1e-9),
        )
    if out is not None:
        from recon_slam.eval import plot_trajectories
        from recon_slam.io.trajectory import write_tum

        write_tum(out / "trajectory.txt", stamps, T_world_cam, header="recon_slam trajectory: t tx ty tz qx qy qz qw (T_world_cam)")
        write_tum(out / "keyframes.txt", kf_stamps, T_world_kf, header="recon_slam keyframes: t tx ty tz qx qy qz qw (T_world_kf)")
        xyz, rgb = cloud
        write_ply(out / "cloud.ply", xyz, rgb)
        summary["n_cloud_points"] = int(len(xyz))
        if errors is not None:
            plot_trajectories(out / "trajectory.png", errors.aligned_estimate, errors.matched_ground_truth,
                              title=f"{summary['source']} ({config.mode})")
        else:
            plot_trajectories(out / "trajectory.png", T_world_cam, keyframes=T_world_kf, title=summary["source"])
        _write_json(out / "summary.json", summary)
    if map_data is not None:
        summary["map"] = _save_run_map(map_data, save_map, source, system, stamps, T_world_cam, frame_states,
                                       config, metric, gt, progress)
        if out is not None:
            _write_json(out / "summary.json", summary)
    summary["_stamps"] = stamps
    summary["_T_world_cam"] = T_world_cam
    return summary


def public_summary(summary: dict[str, Any]) -> dict[str, Any]:
    """The summary without its private (array) entries."""
    return {k: v for k, v in summary.items() if not k.startswith("_")}


def _save_run_map(map_data, path, source, system, stamps, T_world_cam, frame_states, config, metric: bool,
                  gt, progress: bool) -> dict[str, Any]:
    """Train the relocaliser (if enabled) and save the map of a finished run; returns its summary."""
    from recon_slam.maps import save_map
    from recon_slam.maps.build import (
        alignment_to_ground_truth,
        keyframe_mapping_arrays,
        mapping_arrays,
        train_map_relocaliser,
    )

    info: dict[str, Any] = {"path": str(path), "n_keyframes": len(map_data.keyframes)}
    if gt is not None:
        map_data.T_gt_world = alignment_to_ground_truth(stamps, T_world_cam, gt[0], gt[1], with_scale=not metric)
    if config.reloc.build_on_save and map_data.keyframes:
        t0 = time.perf_counter()
        if metric and not getattr(system.predictor, "two_view", False):
            arrays = mapping_arrays(source, stamps, T_world_cam, system.predictor, config.reloc.mapping_frames,
                                    frame_states, progress)
        else:  # monocular: the keyframes' pointmaps carry the map's scale
            arrays = keyframe_mapping_arrays(map_data.keyframes)
        last = {}

        def report(p: dict) -> None:
            last.update(p)
            if progress:
                print(f"\rrelocaliser: step {p.get('step')}/{p.get('steps')} loss {p.get('loss', float('nan')):.3f}",
                      end="", flush=True)

        rel, stats = train_map_relocaliser(arrays, config.reloc, device=str(system.device), progress=report)
        if progress:
            print()
        map_data.relocaliser = rel.state_dict()
        info.update(relocaliser=True, reloc_mapping_frames=int(len(arrays["images"])),
                    reloc_train_s=time.perf_counter() - t0, reloc_size_bytes=int(rel.size_bytes()))
    else:
        info["relocaliser"] = False
    save_map(map_data, path)
    return info
