"""Backend: keyframe graph, image retrieval, loop closure and global pose-graph optimisation.

* :class:`Backend`: the background thread the SLAM system feeds with keyframes.
* :func:`optimize_pose_graph`: robust sparse Gauss-Newton over SE(3) / Sim(3) poses.
* :class:`RetrievalDatabase`: online image retrieval (hashed dense words, tf-idf).
* :func:`verify_pair`: geometric verification of a keyframe pair (ORB + 3D RANSAC + dense).
"""

from recon_slam.backend.backend import Backend, BackendEdge
from recon_slam.backend.pose_graph import PoseGraphStats, edge_residuals, optimize_pose_graph
from recon_slam.backend.retrieval import RetrievalDatabase, RetrievalParams
from recon_slam.backend.verification import (
    ImageFeatures,
    VerificationResult,
    VerifyParams,
    extract_features,
    verify_pair,
)

__all__ = [
    "Backend",
    "BackendEdge",
    "ImageFeatures",
    "PoseGraphStats",
    "RetrievalDatabase",
    "RetrievalParams",
    "VerificationResult",
    "VerifyParams",
    "edge_residuals",
    "extract_features",
    "optimize_pose_graph",
    "verify_pair",
]
