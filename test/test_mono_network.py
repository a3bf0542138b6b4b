"""The monocular engine runs on our MASt3R network code end to end (CPU, tiny model).

Weights are random (no pretrained weights exist here): this checks the wiring (checkpoint
file -> predictor -> two-view decode -> tracking -> keyframes), not accuracy, which the
oracle tests and benchmarks cover.
"""

from __future__ import annotations

import numpy as np
import pytest
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


def _tiny_net(seed: int = 0):
    torch.manual_seed(seed)
    net = build_model(TINY_ARGS, device="cpu")
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.02)
    return net.eval()


def test_bfloat16_precision_runs_on_the_cpu():
    """mono.precision=bfloat16 casts our network's weights; outputs stay float32 and close."""
    from recon_slam.frontend.mast3r_predictor import Mast3rPredictor

    seq = SyntheticSequence(frames=2, width=128, height=96, seed=0)
    frames = list(seq)
    outs = {}
    for prec in ("float32", "bfloat16"):
        cfg = load_config(None, {"mode": "mono", "device": "cpu", "mono.long_side": 128, "mono.precision": prec})
        pred = Mast3rPredictor(cfg.predictor, "cpu", mono_config=cfg.mono, network=_tiny_net())
        assert pred.precision == prec and not pred.cuda_graphs
        assert pred.network.decoder_embed.weight.dtype == (torch.bfloat16 if prec == "bfloat16" else torch.float32)
        pred.predict(frames[1])
        kf = type("KF", (), {"frame_index": frames[1].index})()
        outs[prec] = pred.predict(frames[0], kf)
    lo, hi = outs["bfloat16"], outs["float32"]
    assert lo.X_cam.dtype == torch.float32 and torch.isfinite(lo.X_cam).all()
    rel = (lo.X_cam - hi.X_cam).abs().max() / hi.X_cam.abs().max()
    assert rel < 0.05, rel
    assert (lo.D * hi.D).sum(-1).mean() > 0.99


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_predictions_equal_eager_ones():
    """With mono.cuda_graphs the predictor replays captured graphs: same numbers as eager,
    and results of earlier calls are not overwritten by later replays."""
    from recon_slam.frontend.mast3r_predictor import Mast3rPredictor

    seq = SyntheticSequence(frames=3, width=128, height=96, seed=0)
    frames = list(seq)
    kf = type("KF", (), {"frame_index": frames[0].index})()
    res = {}
    for graphs, compiled in ((False, False), (True, False), (True, True)):
        cfg = load_config(None, {"mode": "mono", "device": "cuda", "mono.long_side": 128,
                                 "mono.cuda_graphs": graphs, "mono.compile": compiled})
        pred = Mast3rPredictor(cfg.predictor, "cuda", mono_config=cfg.mono, network=_tiny_net().cuda())
        assert pred.cuda_graphs == graphs
        pred.predict(frames[0])
        res[graphs, compiled] = [pred.predict(frames[1], kf), pred.predict(frames[2], kf)]
        assert pred.compile == compiled  # compiling worked (no fall-back)
        assert not any(getattr(m, "_compiled_call_impl", None) for m in pred.network.modules())  # eager calls: plain
    for key in ((True, False), (True, True)):
        for a, b in zip(res[False, False], res[key]):
            for name in ("X_cam", "C", "D", "Q", "X_other"):
                assert torch.allclose(getattr(a, name), getattr(b, name), rtol=1e-2, atol=2e-3), (key, name)
        assert not torch.equal(res[key][0].X_cam, res[key][1].X_cam)


def test_compile_blocks_keeps_the_layout_and_undoes_cleanly():
    """MASt3RNet.compile_blocks compiles in place (same state_dict keys) and uncompile_blocks
    leaves plain modules computing the same outputs."""
    net = _tiny_net()
    keys = list(net.state_dict())
    x = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        ref = net.encode(x)[0]
    mods = net.compile_blocks()
    assert len(mods) == len(net.enc_blocks) + len(net.dec_blocks) + len(net.dec_blocks2) + 2
    assert all(m._compiled_call_impl is not None for m in mods)
    assert list(net.state_dict()) == keys
    net.uncompile_blocks()
    assert not any(getattr(m, "_compiled_call_impl", None) for m in net.modules())
    with torch.no_grad():
        assert torch.equal(net.encode(x)[0], ref)


def test_failed_compile_falls_back_to_uncompiled_graphs(monkeypatch, caplog):
    """When capturing the compiled network fails, the predictor warns, captures it uncompiled
    and stops compiling; when that fails too it runs eagerly (capture stubbed: no GPU here)."""
    from recon_slam.frontend.mast3r_predictor import Mast3rPredictor
    from recon_slam.models.mast3r import cuda_graphs as cg

    cfg = load_config(None, {"mode": "mono", "device": "cpu", "mono.long_side": 128})
    pred = Mast3rPredictor(cfg.predictor, "cpu", mono_config=cfg.mono, network=_tiny_net())
    assert not pred.compile  # CPU: no graphs, nothing compiled
    pred.compile = True  # as on CUDA
    seen = []

    def capture_encoder(net, *a, **k):
        compiled = any(getattr(m, "_compiled_call_impl", None) for m in net.modules())
        seen.append(compiled)
        if compiled:
            raise RuntimeError("inductor: no working C compiler")
        return "graph"

    monkeypatch.setattr(cg, "capture_encoder", capture_encoder)
    with caplog.at_level("WARNING"):
        assert pred._graph("enc", (96, 128), torch.float16) == "graph"
    assert seen == [True, False] and not pred.compile
    assert "torch.compile of the MASt3R encoder failed" in caplog.text and "mono.compile: false" in caplog.text
    assert not any(getattr(m, "_compiled_call_impl", None) for m in pred.network.modules())

    monkeypatch.setattr(cg, "capture_decoder", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("no graphs")))
    assert pred._graph("dec", (96, 128), torch.float16) is None
    assert "CUDA graph capture of the MASt3R decoder failed" in caplog.text


def test_prefetched_predictions_equal_direct_ones():
    """SlamSystem.prefetch runs the network on the next frame in a background thread; the
    engine gets the same predictions (and falls back when the keyframe changed)."""
    from recon_slam.frontend.mast3r_predictor import Mast3rPredictor

    seq = SyntheticSequence(frames=6, width=128, height=96, seed=0)
    frames = list(seq)
    cfg = load_config(None, {"mode": "mono", "device": "cpu", "mono.long_side": 128, "backend.enabled": False})
    net = _tiny_net()
    direct = Mast3rPredictor(cfg.predictor, "cpu", mono_config=cfg.mono, network=net)
    piped = Mast3rPredictor(cfg.predictor, "cpu", mono_config=cfg.mono, network=net)
    piped._pipeline_on_cpu = True
    kf0 = type("KF", (), {"frame_index": frames[0].index})()
    kf2 = type("KF", (), {"frame_index": frames[2].index})()
    for p in (direct, piped):
        p.predict(frames[0])
    a = direct.predict(frames[1], kf0)
    piped.prefetch(frames[1], kf0)
    b = piped.predict(frames[1], kf0)
    assert piped._pending is None
    assert torch.allclose(a.X_cam, b.X_cam) and torch.allclose(a.X_other, b.X_other)
    # the keyframe changed after the prefetch started: the right pair is decoded instead
    direct.predict(frames[2])
    piped.predict(frames[2])
    piped.prefetch(frames[3], kf0)
    c = piped.predict(frames[3], kf2)
    d = direct.predict(frames[3], kf2)
    assert c.other_index == frames[2].index and torch.allclose(c.X_other, d.X_other)
    piped.close()

    # whole engine: the runner's prefetch path gives the same trajectory
    results = {}
    for pipelined in (False, True):
        pred = Mast3rPredictor(cfg.predictor, "cpu", mono_config=cfg.mono, network=net)
        pred._pipeline_on_cpu = pipelined
        system = SlamSystem(cfg, seq.camera, predictor=pred)
        for i, f in enumerate(frames):
            if i + 1 < len(frames):
                system.prefetch(frames[i + 1])
            system.process(f)
        results[pipelined] = system.trajectory()[1]
        system.close()
    np.testing.assert_allclose(results[False], results[True], atol=1e-6)
