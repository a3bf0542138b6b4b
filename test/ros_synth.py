"""Small synthetic RGB-D sequences for the ROS tests (exact depth and ground truth)."""

from __future__ import annotations

import itertools


def synthetic_frames(n: int, width: int = 160, height: int = 120, seed: int = 0, trajectory: str = "handheld",
                     fps: float = 30.0, t0: float = 100.0) -> list:
    """The first ``n`` frames of a synthetic room sequence (list of Frame, with ``T_world_cam_gt``).

    The frames are the start of a sequence of at least 100 frames, so the motion per frame
    is what a 30 Hz camera sees (shorter sequences are sub-sampled paths). Stamps are
    ``t0 + i / fps``.
    """
    from recon_slam.synth import SyntheticSequence

    seq = SyntheticSequence(scene="room", trajectory=trajectory, frames=max(n, 100), width=width, height=height,
                            seed=seed, fps=fps)
    frames = list(itertools.islice(iter(seq), n))
    for i, f in enumerate(frames):
        f.stamp = t0 + i / fps
    return frames
