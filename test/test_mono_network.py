"""The monocular engine runs on our MASt3R network code end to end (CPU, tiny model).

Weights are random (no pretrained weights exist here): this checks the wiring (checkpoint
file -> predictor -> two-view decode -> tracking -> keyframes), not accuracy, which the
oracle tests and benchmarks cover.
"""

from __future__ import annotations

import numpy as np
import torch

from recon_slam.config import load_config
from recon_slam.models.mast3r import build_model
from recon_slam.models.mast3r.checkpoint import save_checkpoint
from recon_slam.synth import SyntheticSequence
from recon_slam.system import SlamSystem

TINY_ARGS = (
    "AsymmetricMASt3R(enc_depth=2, dec_depth=4, enc_embed_dim=64, dec_embed_dim=32, enc_num_heads=2, "
    "dec_num_heads=2, pos_embed='RoPE100', patch_embed_cls='ManyAR_PatchEmbed', img_size=(512, 512), "
    "head_type='catmlp+dpt', output_mode='pts3d+desc24', depth_mode=('exp', -inf, inf), "
    "conf_mode=('exp', 1, inf), two_confs=True, desc_conf_mode=('exp', 0, inf))"
)


def test_mono_engine_runs_on_the_network(tmp_path):
    torch.manual_seed(0)
    net = build_model(TINY_ARGS, device="cpu")
    for p in net.parameters():  # a well-scaled random network
        torch.nn.init.normal_(p, std=0.02)
    ckpt = save_checkpoint(tmp_path / "tiny.pth", net.state_dict(), TINY_ARGS)
    seq = SyntheticSequence(frames=4, width=128, height=96, seed=0)
    cfg = load_config(None, {"mode": "mono", "device": "cpu", "mono.checkpoint": str(ckpt), "mono.long_side": 128,
                             "backend.enabled": False})
    system = SlamSystem(cfg, seq.camera)
    assert type(system.predictor).__name__ == "Mast3rPredictor"
    results = [system.process(f) for f in seq]
    system.close()
    assert results[0].is_keyframe
    assert all(r.state in ("initialising", "tracking", "lost", "relocalised") for r in results)
    assert all(np.all(np.isfinite(r.T_world_cam)) for r in results)
    stamps, T = system.trajectory()
    assert len(stamps) == 4
