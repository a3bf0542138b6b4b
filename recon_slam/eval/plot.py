"""Trajectory plots as PNG files (matplotlib, no screen needed)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def _plane_axes(points: np.ndarray) -> tuple[int, int]:
    """The two coordinate axes with the largest spread of ``points`` (N, 3), in index order."""
    spread = np.ptp(points, axis=0)
    a, b = sorted(np.argsort(spread)[-2:])
    return int(a), int(b)


def plot_trajectories(
    path: str | Path,
    estimate: np.ndarray,
    ground_truth: np.ndarray | None = None,
    title: str = "",
    keyframes: np.ndarray | None = None,
) -> Path:
    """Write a PNG with the camera path of ``estimate`` (N, 4, 4) and optional ground truth.

    Left: the path projected on the plane of its two largest axes (world frame), with
    keyframe positions ``(K, 4, 4)`` marked. Right (when ground truth is given, same
    length as ``estimate`` and aligned): translation error per pose.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    est = np.asarray(estimate)[:, :3, 3]
    gt = None if ground_truth is None else np.asarray(ground_truth)[:, :3, 3]
    a, b = _plane_axes(np.concatenate([est] + ([gt] if gt is not None else [])))
    names = "xyz"
    ncols = 2 if gt is not None and len(gt) == len(est) else 1
    fig, axes = plt.subplots(1, ncols, figsize=(6 * ncols, 5), squeeze=False)
    ax = axes[0, 0]
    if gt is not None:
        ax.plot(gt[:, a], gt[:, b], "k--", lw=1.2, label="ground truth")
    ax.plot(est[:, a], est[:, b], "-", color="tab:blue", lw=1.5, label="estimate")
    ax.plot(est[:1, a], est[:1, b], "o", color="tab:green", label="start")
    if keyframes is not None and len(keyframes):
        kf = np.asarray(keyframes)[:, :3, 3]
        ax.plot(kf[:, a], kf[:, b], "^", color="tab:orange", ms=4, label="keyframes")
    ax.set_xlabel(f"{names[a]} [m]")
    ax.set_ylabel(f"{names[b]} [m]")
    ax.set_aspect("equal", adjustable="datalim")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    ax.set_title(title or "trajectory")
    if ncols == 2:
        err = np.linalg.norm(est - gt, axis=1)
        ax2 = axes[0, 1]
        ax2.plot(err * 100.0, color="tab:red", lw=1)
        ax2.set_xlabel("pose")
        ax2.set_ylabel("translation error [cm]")
        ax2.set_title(f"ATE RMSE {np.sqrt(np.mean(err ** 2)) * 100:.2f} cm")
        ax2.grid(True, alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path
