"""TUM trajectory files: one line ``t tx ty tz qx qy qz qw`` per pose (T_world_cam)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from recon_slam.errors import InputError
from recon_slam.geometry.transforms import pose_from_quat, quat_from_pose


def read_tum(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a TUM trajectory.

    Returns:
        stamps: (N,) float64 seconds.
        T_world_cam: (N, 4, 4) float64 poses.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"trajectory file {path} not found: check the path")
    rows = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.replace(",", " ").split()
        if len(parts) != 8:
            raise InputError(
                f"{path}:{lineno}: expected 8 numbers 't tx ty tz qx qy qz qw' (TUM format), got {len(parts)}"
            )
        try:
            rows.append([float(p) for p in parts])
        except ValueError:
            raise InputError(f"{path}:{lineno}: not a number in {line!r}") from None
    if not rows:
        raise InputError(f"{path}: no poses found (TUM format 't tx ty tz qx qy qz qw')")
    data = np.asarray(rows)
    if not np.all(np.isfinite(data)):
        raise InputError(f"{path}: contains NaN or infinite values")
    return data[:, 0], pose_from_quat(data[:, 1:4], data[:, 4:8])


def write_tum(path: str | Path, stamps: np.ndarray, T_world_cam: np.ndarray, header: str | None = None) -> None:
    """Write poses ``(N, 4, 4)`` with stamps ``(N,)`` as a TUM file (atomically)."""
    path = Path(path)
    t, q = quat_from_pose(np.asarray(T_world_cam))
    lines = [f"# {line}" for line in (header or "").splitlines()]
    for s, ti, qi in zip(np.asarray(stamps, dtype=np.float64), t, q):
        lines.append(f"{s:.6f} " + " ".join(f"{v:.9f}" for v in (*ti, *qi)))
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)
