"""Synthetic indoor sequences with exact ground truth (RGB, depth, stereo, poses).

Deterministic from a seed: textured rooms made of analytic primitives
(:func:`make_scene`), camera paths (:func:`make_trajectory`), a vectorised torch ray
caster (:func:`render`), lazily rendered FrameSources (:class:`SyntheticSequence`) and a
TUM-layout writer for any FrameSource (:func:`write_tum_folder`).

World frame: z up, origin at the centre of the room's floor, metres. Poses are
``T_world_cam`` of the optical camera frame (x right, y down, z forward).
"""

from recon_slam.synth.render import DepthNoise, RenderResult, render
from recon_slam.synth.scene import SCENE_NAMES, Scene, make_scene
from recon_slam.synth.sequence import SyntheticSequence, write_tum_folder
from recon_slam.synth.trajectories import TRAJECTORY_KINDS, make_trajectory

__all__ = [
    "DepthNoise",
    "RenderResult",
    "SCENE_NAMES",
    "Scene",
    "SyntheticSequence",
    "TRAJECTORY_KINDS",
    "make_scene",
    "make_trajectory",
    "render",
    "write_tum_folder",
]
