"""ACE-shaped scene-coordinate regression network (encoder, head, weight files)."""

from recon_slam.models.ace.checkpoint import (
    ENCODER_KEYS,
    encoder_from_state_dict,
    head_from_state_dict,
    load_official_encoder,
    load_official_head,
    pack_weights,
    unpack_weights,
)
from recon_slam.models.ace.encoder import ACE_WIDTHS, Encoder, normalise_image
from recon_slam.models.ace.head import Head, SceneCoordinateNet, build_net

__all__ = [
    "ACE_WIDTHS",
    "ENCODER_KEYS",
    "Encoder",
    "Head",
    "SceneCoordinateNet",
    "build_net",
    "normalise_image",
    "encoder_from_state_dict",
    "head_from_state_dict",
    "load_official_encoder",
    "load_official_head",
    "pack_weights",
    "unpack_weights",
]
