"""Building saved maps from SLAM runs: mapping frames, the relocaliser, the map folder.

* :func:`mapping_arrays` turns the tracked frames of a run (re-read from their source, with
  the run's final ``T_world_cam``) into the relocaliser's mapping input: images, metric
  depth (from the engine's own predictor: depth camera or stereo matcher) and intrinsics,
  at processing resolution. Without a metric predictor (monocular) the keyframes'
  canonical pointmaps give the depth instead, so the map's scale is the SLAM map's.
* :func:`train_map_relocaliser` trains the scene-coordinate relocaliser on them
  (:func:`recon_slam.reloc.trainer.train_relocaliser`) with the engine's ``reloc`` settings.
* :func:`alignment_to_ground_truth` is the SE(3) (Sim(3) for monocular runs) alignment
  of the run's world frame to its ground truth, stored in maps as ``T_gt_world`` so that
  ``recon-slam reloc`` can score queries against ground truth.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional

import numpy as np

from recon_slam.errors import InputError

__all__ = ["mapping_arrays", "keyframe_mapping_arrays", "train_map_relocaliser", "alignment_to_ground_truth"]

log = logging.getLogger(__name__)


def _even_subset(n: int, k: int) -> np.ndarray:
    """Indices of ``min(n, k)`` evenly spread items of ``range(n)``."""
    if n <= k:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, k).round().astype(int))


def mapping_arrays(source, stamps: np.ndarray, T_world_cam: np.ndarray, predictor, max_frames: int = 300,
                   states: Optional[list[str]] = None, progress: bool = False) -> dict[str, Any]:
    """Mapping input of the relocaliser from a run's tracked frames.

    Args:
        source: the run's FrameSource (iterated again; frames matched by stamp).
        stamps: (N,) seconds and T_world_cam: (N, 4, 4) final poses of the run.
        predictor: a metric single-view pointmap predictor (the engine's), used for depth.
        max_frames: at most this many frames, evenly spread over the run.
        states: optional (N,) per-frame states; 'lost' frames are skipped.

    Returns:
        ``{"images": (M, H, W, 3) uint8, "depths": (M, H, W) float32 m (0 = none),
        "poses": (M, 4, 4) T_world_cam, "cameras": [PinholeCamera] * M}`` at the
        predictor's processing resolution.

    Raises:
        InputError: no usable frame.
    """
    stamps = np.asarray(stamps, dtype=np.float64)
    ok = np.ones(len(stamps), dtype=bool)
    if states is not None and len(states) == len(stamps):
        ok &= np.array([s != "lost" for s in states])
    usable = np.nonzero(ok)[0]
    chosen = set(usable[_even_subset(len(usable), int(max_frames))].tolist())
    images, depths, poses, cameras = [], [], [], []
    it = iter(source)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, total=len(source), desc="mapping frames", unit="frame", dynamic_ncols=True)
    for frame in it:
        j = int(np.argmin(np.abs(stamps - float(frame.stamp)))) if len(stamps) else -1
        if j < 0 or j not in chosen or abs(stamps[j] - float(frame.stamp)) > 1e-6:
            continue
        pred = predictor.predict(frame)
        z = pred.X_chw[2] if hasattr(pred, "X_chw") else pred.X_cam[..., 2]
        z = (z * (pred.C > 0)).detach().cpu().numpy().astype(np.float32)
        images.append(pred.image.detach().cpu().numpy().astype(np.uint8))
        depths.append(z)
        poses.append(np.asarray(T_world_cam[j], dtype=np.float64))
        cameras.append(pred.camera)
        chosen.discard(j)
    if not images:
        raise InputError("no tracked frame of the run could be read again from its source: cannot build a map")
    return {"images": np.stack(images), "depths": np.stack(depths), "poses": np.stack(poses), "cameras": cameras}


def keyframe_mapping_arrays(keyframes) -> dict[str, Any]:
    """Mapping input from map keyframes (image, canonical pointmap depth, pose).

    Args:
        keyframes: :class:`recon_slam.maps.format.KeyframeData` list (``X`` in the keyframe
            camera, ``T_world_kf`` possibly Sim(3): its scale is applied to the depth).

    Returns:
        the same mapping as :func:`mapping_arrays`.
    """
    if not keyframes:
        raise InputError("the map has no keyframes to train a relocaliser on")
    images, depths, poses, cameras = [], [], [], []
    for k in keyframes:
        T = np.asarray(k.T_world_kf, dtype=np.float64).copy()
        s = float(np.cbrt(np.linalg.det(T[:3, :3])))
        T[:3, :3] /= s
        z = np.asarray(k.X, dtype=np.float32)[..., 2] * (np.asarray(k.C) > 0) * s
        images.append(np.asarray(k.image, dtype=np.uint8))
        depths.append(z.astype(np.float32))
        poses.append(T)
        cameras.append(k.camera)
    return {"images": np.stack(images), "depths": np.stack(depths), "poses": np.stack(poses), "cameras": cameras}


def train_map_relocaliser(arrays: dict[str, Any], settings=None, device: Any = "auto",
                          progress: Optional[Callable[[dict], None]] = None):
    """Train the scene-coordinate relocaliser of a map.

    Args:
        arrays: mapping input (:func:`mapping_arrays` / :func:`keyframe_mapping_arrays`).
        settings: the engine's ``reloc`` configuration section (iterations, short_side;
            0 keeps the relocaliser's defaults; max_seconds, 0 = 40 s on a GPU, 300 s on
            the CPU) or None.
        device: 'auto', 'cpu', 'cuda'.
        progress: optional callback of the trainer (``{"step", "steps", "loss", ...}``).

    Returns:
        ``(relocaliser, stats)`` (see :func:`recon_slam.reloc.trainer.train_relocaliser`).
    """
    from recon_slam.reloc.trainer import RelocConfig, train_relocaliser

    import torch

    kw: dict[str, Any] = {}
    if settings is not None and getattr(settings, "iterations", 0):
        kw["iterations"] = int(settings.iterations)
    budget = float(getattr(settings, "max_seconds", 0.0) or 0.0) if settings is not None else 0.0
    if budget <= 0:
        on_gpu = str(device).startswith("cuda") or (str(device) == "auto" and torch.cuda.is_available())
        budget = 40.0 if on_gpu else 300.0
    kw["max_seconds"] = budget
    if settings is not None and getattr(settings, "short_side", 0):
        kw["short_side"] = int(settings.short_side)
    return train_relocaliser(arrays, RelocConfig(**kw), device=device, progress=progress)


def alignment_to_ground_truth(stamps: np.ndarray, T_world_cam: np.ndarray, gt_stamps: np.ndarray,
                              gt_T_world_cam: np.ndarray, with_scale: bool = False,
                              max_diff: float = 0.02) -> Optional[np.ndarray]:
    """``T_gt_world`` (4, 4): the least-squares alignment of estimated to true camera centres.

    Args:
        stamps, T_world_cam: (N,), (N, 4, 4) estimate; gt_stamps, gt_T_world_cam: ground truth.
        with_scale: Sim(3) (monocular runs) instead of SE(3).
        max_diff: stamp association tolerance in seconds.

    Returns:
        (4, 4) float64 (a similarity when ``with_scale``), or None with fewer than 3
        associated frames.
    """
    stamps = np.asarray(stamps, dtype=np.float64)
    gt_stamps = np.asarray(gt_stamps, dtype=np.float64)
    if len(stamps) < 3 or len(gt_stamps) < 3:
        return None
    order = np.argsort(gt_stamps)
    gs = gt_stamps[order]
    pos = np.clip(np.searchsorted(gs, stamps), 1, len(gs) - 1)
    nearest = np.where(np.abs(gs[pos - 1] - stamps) <= np.abs(gs[pos] - stamps), pos - 1, pos)
    ok = np.abs(gs[nearest] - stamps) <= max_diff
    if ok.sum() < 3:
        return None
    P = np.asarray(T_world_cam, dtype=np.float64)[ok, :3, 3]
    Q = np.asarray(gt_T_world_cam, dtype=np.float64)[order][nearest[ok], :3, 3]
    from evo.core.geometry import umeyama_alignment

    R, t, c = umeyama_alignment(P.T, Q.T, with_scale)
    T = np.eye(4)
    T[:3, :3] = c * R if with_scale else R
    T[:3, 3] = t
    return T
