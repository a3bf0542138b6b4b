"""Speed and memory of our MASt3R network (recon_slam.models.mast3r) with made-up weights.

    python benchmarks/bench_mast3r_speed.py                 # full ViT-L on CUDA (about 1-2 min on an H100)
    python benchmarks/bench_mast3r_speed.py --compile       # also try torch.compile (slower to start)
    python benchmarks/bench_mast3r_speed.py --quick         # tiny network, 128x96, on the CPU (smoke test)

The full-size network (``ViTLarge_BaseDecoder_512_catmlpdpt_metric`` layout) is built on the
meta device and filled with the deterministic synthetic weights of the shared reference
recipe (generated on the device). Inputs are 512x384 images. Measured, per precision mode:

* ``encode_ms``: one frame through the encoder (tokens returned in float16, ready to cache);
* ``decode_pair_ms``: one (frame, keyframe) pair through decoder and heads;
* ``frame_ms``: encode + decode of one frame against one cached keyframe (a tracking step);
* ``decode_batch_ms``: ``--batch`` pairs decoded at once (e.g. a new keyframe against
  several graph neighbours), and the time per pair;
* ``peak_mem_mib``: peak CUDA memory allocated during the mode.

Modes: float32 eager, bf16 autocast eager (heads in float32, as the reference), bf16 with
bf16 heads, bf16 with CUDA graphs (encoder, decoder and the whole tracking step captured
for static shapes; heads in float32 or bf16) and, with ``--compile``, ``torch.compile`` of encoder and decoder. Also
reported: bytes per keyframe of the cached float16 encoder tokens and the bf16-vs-float32
output drift; with ``--profile``, a torch.profiler kernel table of the eager bf16 frame step
(``<name>_profile.txt``). Results: ``benchmarks/results/mast3r_speed_<device>.json`` (``--name`` to
override).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import write_results  # noqa: E402

from recon_slam.models.mast3r import (  # noqa: E402
    VITL_512_ARGS,
    MASt3RNet,
    build_model,
    synthetic_state_dict,
    synthetic_state_dict_torch,
)

TINY_ARGS = (
    "AsymmetricMASt3R(enc_depth=4, dec_depth=12, enc_embed_dim=128, dec_embed_dim=64, enc_num_heads=4, "
    "dec_num_heads=4, pos_embed='RoPE100', patch_embed_cls='ManyAR_PatchEmbed', img_size=(512, 512), "
    "head_type='catmlp+dpt', output_mode='pts3d+desc24', depth_mode=('exp', -inf, inf), "
    "conf_mode=('exp', 1, inf), two_confs=True, desc_conf_mode=('exp', 0, inf))"
)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device, iters: int, warmup: int) -> dict:
    """Wall-clock statistics (ms) of ``fn`` over ``iters`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return {
        "median_ms": round(statistics.median(times), 3),
        "mean_ms": round(statistics.fmean(times), 3),
        "min_ms": round(times[0], 3),
        "p90_ms": round(times[min(len(times) - 1, int(0.9 * len(times)))], 3),
        "iters": iters,
    }


def build_net(args: str, device: torch.device) -> MASt3RNet:
    """Network with synthetic weights generated directly on ``device``."""
    net = build_model(args, "meta")
    if device.type == "cpu":
        weights = synthetic_state_dict(net.state_dict())  # numpy is faster on the CPU
    else:
        weights = synthetic_state_dict_torch(net.state_dict(), device)
    net.load_state_dict(weights, strict=True, assign=True)
    net.requires_grad_(False)
    return net.eval()


def test_images(batch: int, height: int, width: int, device: torch.device) -> torch.Tensor:
    """Smooth pseudo-random images in [-1, 1], (batch, 3, H, W)."""
    gen = torch.Generator().manual_seed(0)
    low = torch.rand(batch, 3, height // 16, width // 16, generator=gen) * 2 - 1
    img = torch.nn.functional.interpolate(low, size=(height, width), mode="bilinear", align_corners=False)
    return img.to(device)


def run_mode(net: MASt3RNet, name: str, device: torch.device, imgs: torch.Tensor, batch: int, iters: int,
             warmup: int, amp: torch.dtype | None, head: torch.dtype | None, compiled: bool = False) -> dict:
    """Eager (or torch.compile'd) timings of one precision mode."""
    hw = tuple(imgs.shape[-2:])
    net.set_precision(amp, head)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    encode = lambda img: net.encode(img, out_dtype=torch.float16)[0]  # noqa: E731
    decode = lambda t1, t2: net.decode(t1, t2, hw)  # noqa: E731
    if compiled:
        encode = torch.compile(encode, dynamic=False)
        decode = torch.compile(decode, dynamic=False)
    frame, kf = imgs[:1], imgs[1:2]
    with torch.no_grad():
        t_compile = time.perf_counter()
        kf_tokens = encode(kf)
        frame_tokens = encode(frame)
        decode(frame_tokens, kf_tokens)
        _sync(device)
        first_call_s = time.perf_counter() - t_compile
        many_kf = kf_tokens.expand(batch, -1, -1).contiguous()
        result = {
            "amp_dtype": str(amp).replace("torch.", "") if amp else "float32",
            "head_dtype": str(head).replace("torch.", "") if head else "float32",
            "first_call_s": round(first_call_s, 2),
            "encode": time_call(lambda: encode(frame), device, iters, warmup),
            "decode_pair": time_call(lambda: decode(frame_tokens, kf_tokens), device, iters, warmup),
            "frame": time_call(lambda: decode(encode(frame), kf_tokens), device, iters, warmup),
            f"decode_batch{batch}": time_call(lambda: decode(frame_tokens, many_kf), device, iters, warmup),
        }
    result[f"decode_batch{batch}"]["per_pair_ms"] = round(result[f"decode_batch{batch}"]["median_ms"] / batch, 3)
    if device.type == "cuda":
        result["peak_mem_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    net.set_precision(None)
    print(f"{name:>16}: encode {result['encode']['median_ms']:.2f} ms, decode pair "
          f"{result['decode_pair']['median_ms']:.2f} ms, frame {result['frame']['median_ms']:.2f} ms, "
          f"{batch} pairs {result[f'decode_batch{batch}']['median_ms']:.2f} ms")
    return result


def run_graphs(net: MASt3RNet, device: torch.device, imgs: torch.Tensor, batch: int, iters: int, warmup: int,
               head: torch.dtype | None = None) -> dict:
    """bf16 autocast with CUDA graphs of encoder, decoder and the whole tracking step
    (heads in ``head`` dtype, None = float32)."""
    from recon_slam.models.mast3r.cuda_graphs import capture_decoder, capture_encoder, capture_frame_step

    hw = tuple(imgs.shape[-2:])
    net.set_precision(None, head)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    enc = capture_encoder(net, hw, batch=1)
    dec = capture_decoder(net, hw, batch=1)
    dec_b = capture_decoder(net, hw, batch=batch)
    step = capture_frame_step(net, hw, n_keyframes=1)
    capture_s = time.perf_counter() - t0
    frame, kf = imgs[:1], imgs[1:2]
    with torch.no_grad():
        kf_tokens = enc(kf).clone()
        frame_tokens = enc(frame).clone()
        many_kf = kf_tokens.expand(batch, -1, -1).contiguous()
        result = {
            "amp_dtype": "bfloat16",
            "head_dtype": str(head).replace("torch.", "") if head else "float32",
            "capture_s": round(capture_s, 2),
            "encode": time_call(lambda: enc(frame), device, iters, warmup),
            "decode_pair": time_call(lambda: dec(frame_tokens, kf_tokens), device, iters, warmup),
            "frame": time_call(lambda: step(frame, kf_tokens), device, iters, warmup),
            f"decode_batch{batch}": time_call(lambda: dec_b(frame_tokens.expand(batch, -1, -1), many_kf), device,
                                              iters, warmup),
        }
        # the graphs compute what eager bf16 computes
        net.set_precision(torch.bfloat16, head)
        eager = net.decode(frame_tokens, kf_tokens, hw)
        net.set_precision(None)
        graphed = dec(frame_tokens, kf_tokens)
        result["max_abs_diff_vs_eager_bf16_pts3d"] = float((eager.view1.pts3d - graphed.view1.pts3d).abs().max())
    result[f"decode_batch{batch}"]["per_pair_ms"] = round(result[f"decode_batch{batch}"]["median_ms"] / batch, 3)
    result["peak_mem_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    print(f"{'bf16 cuda graphs' + (' bf16 heads' if head else ''):>16}: encode {result['encode']['median_ms']:.2f} ms, decode pair "
          f"{result['decode_pair']['median_ms']:.2f} ms, frame {result['frame']['median_ms']:.2f} ms, "
          f"{batch} pairs {result[f'decode_batch{batch}']['median_ms']:.2f} ms")
    del enc, dec, dec_b, step
    return result


def profile_decode(net: MASt3RNet, device: torch.device, imgs: torch.Tensor, head: torch.dtype | None,
                   rows: int = 30) -> str:
    """torch.profiler table (GPU time per kernel) of one eager bf16 frame step (encode + decode)."""
    from torch.profiler import ProfilerActivity, profile

    hw = tuple(imgs.shape[-2:])
    net.set_precision(torch.bfloat16, head)
    with torch.no_grad():
        kf_tokens = net.encode(imgs[1:2], out_dtype=torch.float16)[0]
        for _ in range(3):
            net.decode(net.encode(imgs[:1], out_dtype=torch.float16)[0], kf_tokens, hw)
        _sync(device)
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=acts) as prof:
            for _ in range(5):
                net.decode(net.encode(imgs[:1], out_dtype=torch.float16)[0], kf_tokens, hw)
            _sync(device)
    net.set_precision(None)
    key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows)


def output_drift(net: MASt3RNet, imgs: torch.Tensor) -> dict:
    """bf16-autocast vs float32 outputs on the same pair (synthetic weights)."""
    hw = tuple(imgs.shape[-2:])
    with torch.no_grad():
        ref = net.decode(*[net.encode(i[None])[0] for i in imgs[:2]], hw)
        net.set_precision(torch.bfloat16)
        low = net.decode(*[net.encode(i[None], out_dtype=torch.float16)[0] for i in imgs[:2]], hw)
        net.set_precision(None)
    scale = ref.view1.pts3d.abs().max().clamp_min(1e-12)
    return {
        "pts3d_max_abs_rel_to_range": float((low.view1.pts3d - ref.view1.pts3d).abs().max() / scale),
        "pts3d2_max_abs_rel_to_range": float((low.view2.pts3d - ref.view2.pts3d).abs().max() / scale),
        "desc_mean_cos": float((low.view1.desc * ref.view1.desc).sum(-1).mean()),
        "conf_max_rel": float(((low.view1.conf - ref.view1.conf).abs() / ref.view1.conf).max()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny network, few iterations (CPU smoke test)")
    parser.add_argument("--width", type=int, default=None, help="default 512 (128 with --quick)")
    parser.add_argument("--height", type=int, default=None, help="default 384 (96 with --quick)")
    parser.add_argument("--batch", type=int, default=None, help="pairs in the batched-decode measurement")
    parser.add_argument("--iters", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--compile", action="store_true", help="also measure torch.compile (minutes to compile)")
    parser.add_argument("--no-graphs", action="store_true", help="skip the CUDA-graph mode")
    parser.add_argument("--modes", default="fp32_eager,bf16_eager,bf16_eager_bf16_heads,bf16_cuda_graphs,"
                        "bf16_cuda_graphs_bf16_heads", help="comma-separated subset of the modes to measure")
    parser.add_argument("--profile", action="store_true",
                        help="also write a torch.profiler kernel table of the eager bf16 frame step")
    parser.add_argument("--name", default=None)
    args = parser.parse_args()
    wanted = set(args.modes.split(","))

    device = torch.device(args.device)
    args.width = args.width or (128 if args.quick else 512)
    args.height = args.height or (96 if args.quick else 384)
    cuda = device.type == "cuda"
    model_args = TINY_ARGS if args.quick else VITL_512_ARGS
    iters = args.iters or (30 if cuda else 2)
    args.batch = args.batch or (4 if cuda else 2)
    warmup = args.warmup if args.warmup is not None else (5 if cuda else 1)
    if cuda:
        torch.backends.cudnn.benchmark = True

    t0 = time.perf_counter()
    net = build_net(model_args, device)
    _sync(device)
    build_s = time.perf_counter() - t0
    n_params = sum(p.numel() for p in net.parameters())
    hw = (args.height, args.width)
    imgs = test_images(2, args.height, args.width, device)
    print(f"{'tiny' if args.quick else 'ViT-L'} MASt3R, {n_params / 1e6:.1f} M parameters, on {device}, "
          f"{args.width}x{args.height}, built in {build_s:.1f} s")

    modes: dict[str, dict] = {}
    if "fp32_eager" in wanted:
        modes["fp32_eager"] = run_mode(net, "fp32 eager", device, imgs, args.batch, iters, warmup, None, None)
    if (cuda or args.quick) and "bf16_eager" in wanted:
        modes["bf16_eager"] = run_mode(net, "bf16 eager", device, imgs, args.batch, iters, warmup,
                                       torch.bfloat16, None)
    if cuda:
        if "bf16_eager_bf16_heads" in wanted:
            modes["bf16_eager_bf16_heads"] = run_mode(net, "bf16 + bf16 heads", device, imgs, args.batch, iters,
                                                      warmup, torch.bfloat16, torch.bfloat16)
        for mode, head in (("bf16_cuda_graphs", None), ("bf16_cuda_graphs_bf16_heads", torch.bfloat16)):
            if args.no_graphs or mode not in wanted:
                continue
            try:
                modes[mode] = run_graphs(net, device, imgs, args.batch, iters, warmup, head)
            except Exception as exc:  # noqa: BLE001 - report and continue with the other modes
                modes[mode] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
                print(f"CUDA graphs failed: {exc}")
    if args.compile:
        try:
            modes["bf16_compile"] = run_mode(net, "bf16 compile", device, imgs, args.batch, iters, warmup,
                                             torch.bfloat16 if cuda else None, None, compiled=True)
        except Exception as exc:  # noqa: BLE001
            modes["bf16_compile"] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
            print(f"torch.compile failed: {exc}")

    drift = output_drift(net, imgs) if (cuda or args.quick) else None
    kf_bytes = net.token_bytes(hw, torch.float16)
    results = {
        "model": "tiny (reference test size)" if args.quick else "ViTLarge_BaseDecoder_512_catmlpdpt_metric",
        "weights": "synthetic (shared reference recipe)",
        "device": str(device),
        "image_wh": [args.width, args.height],
        "tokens_per_image": net.grid(hw)[0] * net.grid(hw)[1],
        "parameters_m": round(n_params / 1e6, 2),
        "weights_mib_fp32": round(n_params * 4 / 2**20, 1),
        "build_s": round(build_s, 2),
        "batch_pairs": args.batch,
        "keyframe_token_bytes_fp16": kf_bytes,
        "keyframe_token_mib_fp16": round(kf_bytes / 2**20, 3),
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "tf32_cudnn": torch.backends.cudnn.allow_tf32,
        "modes": modes,
        "bf16_vs_fp32_drift": drift,
    }
    name = args.name or f"mast3r_speed_{device.type}{'_quick' if args.quick else ''}"
    write_results(name, results)
    if args.profile:
        from common import RESULTS_DIR

        text = ""
        for head in (None, torch.bfloat16):
            text += f"\n=== eager bf16 frame step (encode + decode), heads {head or 'float32'}, 5 runs ===\n"
            text += profile_decode(net, device, imgs, head)
        (RESULTS_DIR / f"{name}_profile.txt").write_text(text)
        print(text)


if __name__ == "__main__":
    main()
