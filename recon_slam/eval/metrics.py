"""Trajectory metrics (ATE, RPE) built on evo.

All trajectories are ``T_world_cam`` poses ``(N, 4, 4)`` with stamps ``(N,)`` in seconds.
The estimate is aligned to the ground truth (SE(3), Sim(3) or not at all) after
associating poses by nearest stamps.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Literal

import numpy as np
from evo.core import metrics, sync
from evo.core.trajectory import PoseTrajectory3D

from recon_slam.errors import InputError, StampError

Alignment = Literal["se3", "sim3", "none"]
ALIGNMENTS = ("se3", "sim3", "none")


@dataclass
class TrajectoryErrors:
    """Result of :func:`evaluate_trajectory` (metres, degrees)."""

    ate_rmse_m: float
    ate_mean_m: float
    ate_median_m: float
    ate_max_m: float
    rpe_trans_rmse_m: float
    rpe_rot_rmse_deg: float
    n_matched: int
    n_estimated: int
    n_ground_truth: int
    align: str
    scale: float
    path_length_m: float
    # Aligned estimate and matched ground truth, for plots: (M, 4, 4) each.
    aligned_estimate: np.ndarray = field(repr=False, default=None)
    matched_ground_truth: np.ndarray = field(repr=False, default=None)
    matched_stamps: np.ndarray = field(repr=False, default=None)

    def summary(self) -> dict:
        """JSON-friendly dict of the scalar fields."""
        return {k: v for k, v in asdict(self).items() if not isinstance(v, np.ndarray) and v is not None}


def make_evo_trajectory(stamps: np.ndarray, T_world_cam: np.ndarray, name: str = "") -> PoseTrajectory3D:
    """evo trajectory from stamps ``(N,)`` and poses ``(N, 4, 4)``."""
    stamps = np.asarray(stamps, dtype=np.float64)
    poses = np.asarray(T_world_cam, dtype=np.float64)
    if poses.ndim != 3 or poses.shape[1:] != (4, 4) or len(stamps) != len(poses):
        raise InputError(f"trajectory {name!r}: expected stamps (N,) and poses (N,4,4), got {stamps.shape} and {poses.shape}")
    if len(stamps) > 1 and np.any(np.diff(stamps) < 0):
        bad = int(np.argmax(np.diff(stamps) < 0)) + 1
        raise StampError(f"trajectory {name!r}: stamps go backwards at pose {bad} ({stamps[bad - 1]} -> {stamps[bad]}); sort the file by time")
    return PoseTrajectory3D(poses_se3=list(poses), timestamps=stamps, meta={"name": name})


def evaluate_trajectory(
    est_stamps: np.ndarray,
    est_T_world_cam: np.ndarray,
    gt_stamps: np.ndarray,
    gt_T_world_cam: np.ndarray,
    align: Alignment = "se3",
    max_diff: float = 0.02,
    rpe_delta: int = 1,
) -> TrajectoryErrors:
    """Absolute and relative trajectory errors of an estimate against ground truth.

    Args:
        est_stamps, gt_stamps: (N,), (M,) seconds.
        est_T_world_cam, gt_T_world_cam: (N, 4, 4), (M, 4, 4) camera-to-world poses.
        align: 'se3' (rigid), 'sim3' (rigid + scale, for monocular) or 'none'.
        max_diff: largest stamp difference (s) for two poses to be associated.
        rpe_delta: RPE step in frames.

    Returns:
        :class:`TrajectoryErrors`; ATE on translations after alignment, RPE translation
        and rotation over ``rpe_delta`` consecutive matched poses.
    """
    if align not in ALIGNMENTS:
        raise InputError(f"unknown alignment {align!r}; use one of {', '.join(ALIGNMENTS)}")
    traj_est = make_evo_trajectory(est_stamps, est_T_world_cam, "estimate")
    traj_gt = make_evo_trajectory(gt_stamps, gt_T_world_cam, "ground truth")
    try:
        traj_gt, traj_est = sync.associate_trajectories(traj_gt, traj_est, max_diff=max_diff)
    except sync.SyncException as exc:
        raise StampError(
            f"no estimated pose has a ground-truth pose within {max_diff} s ({exc}); "
            "check that both files use the same clock or raise --max-diff"
        ) from None
    n = traj_est.num_poses
    if n < 2:
        raise StampError(f"only {n} poses could be associated with the ground truth (max_diff {max_diff} s)")
    scale = 1.0
    if align != "none":
        _, _, scale = traj_est.align(traj_gt, correct_scale=(align == "sim3"))
    ape = metrics.APE(metrics.PoseRelation.translation_part)
    ape.process_data((traj_gt, traj_est))
    stats = ape.get_all_statistics()
    rpe_t = metrics.RPE(metrics.PoseRelation.translation_part, delta=rpe_delta, delta_unit=metrics.Unit.frames)
    rpe_t.process_data((traj_gt, traj_est))
    rpe_r = metrics.RPE(metrics.PoseRelation.rotation_angle_deg, delta=rpe_delta, delta_unit=metrics.Unit.frames)
    rpe_r.process_data((traj_gt, traj_est))
    return TrajectoryErrors(
        ate_rmse_m=float(stats["rmse"]),
        ate_mean_m=float(stats["mean"]),
        ate_median_m=float(stats["median"]),
        ate_max_m=float(stats["max"]),
        rpe_trans_rmse_m=float(rpe_t.get_statistic(metrics.StatisticsType.rmse)),
        rpe_rot_rmse_deg=float(rpe_r.get_statistic(metrics.StatisticsType.rmse)),
        n_matched=int(n),
        n_estimated=int(len(est_stamps)),
        n_ground_truth=int(len(gt_stamps)),
        align=align,
        scale=float(scale),
        path_length_m=float(traj_gt.path_length),
        aligned_estimate=np.asarray(copy.deepcopy(traj_est.poses_se3)),
        matched_ground_truth=np.asarray(traj_gt.poses_se3),
        matched_stamps=np.asarray(traj_est.timestamps),
    )


def path_length(T_world_cam: np.ndarray) -> float:
    """Length in metres of the path through the camera centres of poses ``(N, 4, 4)``."""
    p = np.asarray(T_world_cam)[:, :3, 3]
    return float(np.linalg.norm(np.diff(p, axis=0), axis=1).sum())
