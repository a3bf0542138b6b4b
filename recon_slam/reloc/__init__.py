"""ACE-style scene-coordinate relocalisation: per-map network training and DSAC*-style RANSAC.

Typical use::

    from recon_slam.reloc import RelocConfig, train_relocaliser, Relocaliser

    reloc, stats = train_relocaliser(frames, RelocConfig(), device="auto")
    result = reloc.localize(image, camera)       # RelocResult(ok, T_world_cam, inliers, confidence, ...)
    state = reloc.state_dict()                    # store inside a map folder
    reloc = Relocaliser.from_state_dict(state)
"""

from recon_slam.reloc.buffer import MappingFrames, TrainingBuffer, prepare_mapping_frames
from recon_slam.reloc.ransac import RansacConfig, RansacResult, ransac_pnp
from recon_slam.reloc.relocaliser import Relocaliser, RelocResult
from recon_slam.reloc.trainer import RelocConfig, TrainStats, train_relocaliser

__all__ = [
    "MappingFrames",
    "TrainingBuffer",
    "prepare_mapping_frames",
    "RansacConfig",
    "RansacResult",
    "ransac_pnp",
    "Relocaliser",
    "RelocResult",
    "RelocConfig",
    "TrainStats",
    "train_relocaliser",
]
