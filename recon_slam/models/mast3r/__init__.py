"""Our own implementation of the MASt3R network (``ViTLarge_BaseDecoder_512_catmlpdpt_metric``).

Reads the released checkpoint layout; see :mod:`.network` for the encode / decode API and
:mod:`.preprocess` for preparing images.
"""

from recon_slam.models.mast3r.checkpoint import (
    RELEASED_NAME,
    build_model,
    check_state_dict,
    load_mast3r,
    read_checkpoint,
    save_checkpoint,
)
from recon_slam.models.mast3r.config import VITL_512_ARGS, MASt3RConfig, parse_model_args
from recon_slam.models.mast3r.heads import ViewPrediction
from recon_slam.models.mast3r.network import MASt3RNet, PairPrediction
from recon_slam.models.mast3r.preprocess import PreparedImage, ResizeCrop, normalize_rgb, plan_resize_crop, prepare_image
from recon_slam.models.mast3r.synthetic_weights import (
    load_spec,
    synthetic_state_dict,
    synthetic_state_dict_torch,
)

__all__ = [
    "MASt3RConfig",
    "MASt3RNet",
    "PairPrediction",
    "PreparedImage",
    "RELEASED_NAME",
    "ResizeCrop",
    "VITL_512_ARGS",
    "ViewPrediction",
    "build_model",
    "check_state_dict",
    "load_mast3r",
    "load_spec",
    "normalize_rgb",
    "parse_model_args",
    "plan_resize_crop",
    "prepare_image",
    "read_checkpoint",
    "save_checkpoint",
    "synthetic_state_dict",
    "synthetic_state_dict_torch",
]
