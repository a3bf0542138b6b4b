"""Memory per monocular keyframe at MASt3R's network resolution (512x384), before / after.

    python benchmarks/bench_mono_memory.py [--frames 4] [--device cpu|cuda]

Runs the monocular engine (``SlamSystem`` with :class:`~recon_slam.frontend.mast3r_predictor.
Mast3rPredictor`) on 640x480 frames, which the predictor prepares to 512x384 like MASt3R.
The network is a stand-in with MASt3R's interface and output sizes (ViT-L encoder tokens
(768, 1024), two-view pointmaps, confidences, 24-d descriptors) but none of its compute:
memory is what is measured here, not accuracy (``bench_mono_oracle.py`` measures that).
Every frame after the first is also made a keyframe, so each figure is an average over
``--frames`` keyframes.

Per keyframe it reports :func:`recon_slam.frontend.mono.keyframe_bytes` (image, pointmap,
confidence, descriptors, cached encoder tokens held by the predictor; what
``SlamSystem.stats()["memory_per_keyframe_bytes"]`` returns in mono mode) and, separately,
the frontend's match-initialisation cache, which used to grow by one entry per keyframe.

Layouts:

  before_cuda   float32 pointmap and confidence, float16 tokens (the CUDA path before),
                unbounded match cache
  before_cpu    the same with float32 tokens (the CPU path before)
  after         compact keyframes (uncalibrated: float16 points with stochastic rounding;
                calibrated: float32 distance along the known rays), float16 confidence,
                float16 tokens on every device, match cache bounded to a few keyframes

Budget: 4 MiB per keyframe (a 1,000-keyframe map plus the float32 network weights in 8 GB).
Results: benchmarks/results/mono_memory.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import write_results  # noqa: E402

from recon_slam.config import load_config  # noqa: E402
from recon_slam.frontend import mono  # noqa: E402
from recon_slam.frontend.mast3r_predictor import Mast3rPredictor  # noqa: E402
from recon_slam.geometry.camera import PinholeCamera  # noqa: E402
from recon_slam.io.frame import Frame  # noqa: E402
from recon_slam.system import SlamSystem  # noqa: E402

BUDGET = 4 * 2**20
MAST3R_PARAMS = 688_638_856  # parameters of the released ViT-L / ViT-B model (VITL_512_ARGS)


class StandInNet:
    """MASt3R's encode / decode interface and output sizes; outputs a slanted plane."""

    enc_dim = 1024

    def encode(self, img: torch.Tensor, out_dtype=None):
        b, _, h, w = img.shape
        tok = img.mean((1, 2, 3))[:, None, None].expand(b, (h // 16) * (w // 16), self.enc_dim)
        return tok.to(out_dtype or torch.float32).contiguous(), None

    def decode(self, t1, t2, shape):
        h, w = shape
        dev = t1.device
        v, u = torch.meshgrid(torch.arange(h, dtype=torch.float32, device=dev),
                              torch.arange(w, dtype=torch.float32, device=dev), indexing="ij")
        z = 2.0 + 0.5 * u / w
        X = torch.stack(((u - w / 2) / 400.0 * z, (v - h / 2) / 400.0 * z, z), -1)[None]
        desc = torch.nn.functional.normalize(torch.stack([torch.sin(u * (k + 1) / 37.0 + v * (k % 5) / 23.0)
                                                          for k in range(24)], -1), dim=-1)[None]
        view = {"pts3d": X, "conf": torch.full((1, h, w), 3.0, device=dev), "desc": desc,
                "desc_conf": torch.full((1, h, w), 5.0, device=dev)}
        return {"view1": view, "view2": view}


def _run(layout: str, calibrated: bool, n_frames: int, device: str) -> dict:
    compact = layout == "after"
    saved = mono.COMPACT_KEYFRAMES, mono.UV_CACHE_SIZE
    mono.COMPACT_KEYFRAMES = compact
    if not compact:
        mono.UV_CACHE_SIZE = 10**9  # the cache was unbounded before
    token_dtype = torch.float32 if layout == "before_cpu" else torch.float16
    cfg = load_config(None, {"mode": "mono", "device": device, "backend.enabled": False,
                             "mono.calibrated": calibrated})
    pred = Mast3rPredictor(cfg.predictor, device, mono_config=cfg.mono, network=StandInNet(), token_dtype=token_dtype)
    cam = PinholeCamera(640, 480, 525.0, 525.0, 319.5, 239.5)
    system = SlamSystem(cfg, cam, predictor=pred, backend=False)
    rng = np.random.default_rng(0)
    try:
        for i in range(n_frames):
            frame = Frame(i, 0.1 * i, rng.integers(0, 255, (480, 640, 3), dtype=np.uint8), cam)
            if i == 0:
                system.process(frame)
                continue
            kf = system.keyframe_map.get(system._kf_id)
            p = pred.predict(frame, kf)
            system._mono.track(p, kf, np.eye(4))  # fills the match cache like tracking does
            new = system._mono._new_keyframe(frame, p, system.keyframe_map.pose(kf.id))
            system._kf_id = new.id
        kfs = system.keyframe_map.keyframes()
        parts = [mono.keyframe_bytes(k, pred) for k in kfs]
        mean = {k: float(np.mean([p[k] for p in parts])) for k in parts[0]}
        entries = list(system._mono._uv_cache.values())
        entry = int(entries[0].element_size() * entries[0].numel()) if entries else 0
        st = system.stats()
        H, W = kfs[0].shape
    finally:
        system.close()
        mono.COMPACT_KEYFRAMES, mono.UV_CACHE_SIZE = saved
    total = mean["total"]
    # before: one match-cache entry per keyframe ever tracked; after: a fixed LRU of a few entries
    uv = entry if not compact else 0
    row = {"layout": layout, "calibrated": calibrated, "resolution": [W, H], "n_keyframes": len(kfs),
           "memory_per_keyframe_bytes": total, "parts": mean,
           "stats_memory_per_keyframe_bytes": st["memory_per_keyframe_bytes"],
           "match_cache_per_keyframe_bytes": uv,
           "match_cache_fixed_bytes": 0 if not compact else entry * mono.UV_CACHE_SIZE,
           "total_with_match_cache_bytes": total + uv,
           "keyframes_in_8GB_with_fp32_weights": int((8e9 - 4 * MAST3R_PARAMS) // (total + uv)),
           "within_4MiB": total + uv <= BUDGET}
    print(f"{layout:12s} {'calibrated' if calibrated else 'uncalibrated':12s} {W}x{H}: "
          f"{total / 2**20:.2f} MiB/kf (points {mean['points'] / 2**20:.2f}, conf {mean['confidence'] / 2**20:.2f}, "
          f"image {mean['image'] / 2**20:.2f}, tokens {mean['tokens'] / 2**20:.2f}) + match cache "
          f"{uv / 2**20:.2f} MiB/kf -> {row['keyframes_in_8GB_with_fp32_weights']} keyframes in 8 GB "
          f"(stats() reports {st['memory_per_keyframe_bytes'] / 2**20:.2f} MiB/kf)", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=4, help="keyframes per case")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--name", default="mono_memory")
    args = parser.parse_args()
    rows = [_run(layout, cal, args.frames, args.device)
            for layout in ("before_cuda", "before_cpu", "after") for cal in (False, True)]
    results = {"command": " ".join(sys.argv), "budget_bytes": BUDGET, "network_params": MAST3R_PARAMS,
               "rows": rows, "checks": {f"after_{'cal' if r['calibrated'] else 'uncal'}_le_4MiB": r["within_4MiB"]
                                        for r in rows if r["layout"] == "after"}}
    print("checks:", results["checks"])
    write_results(args.name, results)


if __name__ == "__main__":
    main()
