"""The one frame type every reader yields and the engine consumes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from recon_slam.geometry.camera import PinholeCamera


@dataclass
class Frame:
    """One camera frame.

    Attributes:
        index: position in its sequence (0-based).
        stamp: time in seconds (float, e.g. ROS/TUM stamps).
        image: (H, W, 3) uint8 RGB (grey inputs are replicated to 3 channels).
        camera: intrinsics of ``image`` (distortion already removed when ``rectified``).
        depth: optional (H, W) float32 metric depth in metres (z along the optical axis),
            registered to ``image``; 0 marks pixels without a reading (NaN/inf are mapped to 0).
        right_image: optional (H, W, 3) uint8 RGB right image of a rectified stereo pair,
            same intrinsics as ``camera``.
        baseline_m: stereo baseline in metres (right camera at +baseline along x).
        T_world_cam_gt: optional (4, 4) float64 ground-truth pose of the optical frame.
        frame_id: ROS frame of the camera (optical) this frame comes from.
    """

    index: int
    stamp: float
    image: np.ndarray
    camera: PinholeCamera
    depth: Optional[np.ndarray] = None
    right_image: Optional[np.ndarray] = None
    baseline_m: Optional[float] = None
    T_world_cam_gt: Optional[np.ndarray] = None
    frame_id: str = "camera_optical_frame"

    @property
    def has_depth(self) -> bool:
        return self.depth is not None

    @property
    def has_stereo(self) -> bool:
        return self.right_image is not None
