"""NumPy helpers for 4x4 rigid transforms and quaternions (float64).

Quaternions are ``(qx, qy, qz, qw)`` (ROS and TUM order). Poses are named by their frames:
``T_a_b`` maps points in frame ``b`` to frame ``a``.
"""

from __future__ import annotations

import numpy as np
from scipy.spatial.transform import Rotation


def make_pose(R: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Rotation ``(..., 3, 3)`` and translation ``(..., 3)`` -> pose ``(..., 4, 4)``."""
    R = np.asarray(R, dtype=np.float64)
    t = np.asarray(t, dtype=np.float64)
    T = np.zeros(R.shape[:-2] + (4, 4))
    T[..., :3, :3] = R
    T[..., :3, 3] = t
    T[..., 3, 3] = 1.0
    return T


def pose_from_quat(t: np.ndarray, q_xyzw: np.ndarray) -> np.ndarray:
    """Translation ``(..., 3)`` and quaternion ``(..., 4)`` (x, y, z, w) -> pose ``(..., 4, 4)``."""
    q = np.asarray(q_xyzw, dtype=np.float64)
    R = Rotation.from_quat(q.reshape(-1, 4)).as_matrix().reshape(q.shape[:-1] + (3, 3))
    return make_pose(R, t)


def quat_from_pose(T: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pose ``(..., 4, 4)`` -> translation ``(..., 3)`` and unit quaternion ``(..., 4)`` (x, y, z, w, w >= 0)."""
    T = np.asarray(T, dtype=np.float64)
    q = Rotation.from_matrix(T[..., :3, :3].reshape(-1, 3, 3)).as_quat().reshape(T.shape[:-2] + (4,))
    q = np.where(q[..., 3:4] < 0, -q, q)
    return T[..., :3, 3].copy(), q


def invert_pose(T: np.ndarray) -> np.ndarray:
    """Inverse of rigid poses ``(..., 4, 4)`` (exact, no general matrix inverse)."""
    T = np.asarray(T, dtype=np.float64)
    R = np.swapaxes(T[..., :3, :3], -1, -2)
    return make_pose(R, -(R @ T[..., :3, 3:4])[..., 0])


def transform_points(T: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply pose ``(4, 4)`` to points ``(..., 3)``."""
    T = np.asarray(T, dtype=np.float64)
    return points @ T[:3, :3].T + T[:3, 3]


def rotation_angle_deg(R: np.ndarray) -> np.ndarray:
    """Rotation angle in degrees of rotation matrices ``(..., 3, 3)``.

    Uses ``atan2(sin, cos)`` of the angle (sine from the antisymmetric part, cosine from the
    trace), which stays accurate for tiny angles and near 180 degrees where ``arccos`` of
    the trace alone loses half the significant digits.
    """
    R = np.asarray(R, dtype=np.float64)
    cos_angle = (np.trace(R, axis1=-2, axis2=-1) - 1.0) / 2.0
    axis_times_sin = 0.5 * np.stack(
        (R[..., 2, 1] - R[..., 1, 2], R[..., 0, 2] - R[..., 2, 0], R[..., 1, 0] - R[..., 0, 1]), axis=-1
    )
    return np.degrees(np.arctan2(np.linalg.norm(axis_times_sin, axis=-1), cos_angle))


def look_at(eye: np.ndarray, target: np.ndarray, up: np.ndarray = (0.0, 0.0, 1.0)) -> np.ndarray:
    """``T_world_cam`` of an optical camera at ``eye`` looking at ``target``.

    The camera's y axis (down in the image) points as close to ``-up`` as possible.
    """
    eye = np.asarray(eye, dtype=np.float64)
    z = np.asarray(target, dtype=np.float64) - eye
    z /= np.linalg.norm(z)
    # x (image right) = y x z with y = -up: right-handed, and y = z x x ends up closest to -up
    x = np.cross(-np.asarray(up, dtype=np.float64), z)
    if np.linalg.norm(x) < 1e-9:  # looking along up: any right vector will do
        x = np.cross(np.array([1.0, 0.0, 0.0]) if abs(z[0]) < 0.9 else np.array([0.0, 1.0, 0.0]), z)
    x /= np.linalg.norm(x)
    y = np.cross(z, x)
    return make_pose(np.stack((x, y, z), axis=1), eye)
