"""Monocular tracking speed end to end with the full-size MASt3R network (made-up weights).

    python benchmarks/bench_mono_speed.py                        # CUDA: ViT-L, 512x384, 300 frames
    python benchmarks/bench_mono_speed.py --quick --device cpu   # tiny network, 128x96 (smoke test)

What a frame costs: the network (encoder on the frame, decoder + heads on the (frame,
keyframe) pair, as :class:`recon_slam.frontend.mast3r_predictor.Mast3rPredictor` runs it:
bfloat16 weights and CUDA graphs by default on CUDA) plus everything the monocular engine
does with the outputs (iterative projective matching in ray space, descriptor refinement,
Sim(3) Gauss-Newton solve, fusion, keyframe decisions; the backend runs in its thread).

Random weights would give random pointmaps, and the engine would then spend its time
relocalising instead of tracking. So every request runs the real network (timed, result
discarded) and then hands the engine the oracle's outputs for the same pair
(:class:`recon_slam.frontend.oracle.OraclePredictor`: MASt3R-shaped, from the synthetic
ground truth, same sizes). The oracle (numpy on the CPU, ~0.3 s per 512x384 pair) is not
part of the system: a first, untimed pass records its outputs on the device, and the timed
passes read them back (a request not recorded is computed and its time subtracted).

Two timed passes over the same frames, each on a fresh engine:

* sequential: ``process(frame)``; per frame ``network_ms`` (encoder + decoder + copies) and
  ``engine_ms`` (the rest: matching, Sim(3) solve, fusion, keyframe decisions);
* pipelined (``mono.pipeline``, the default on CUDA): ``prefetch(next frame)`` then
  ``process(frame)``: the network runs on the next frame in a background stream while the
  engine tracks the current one.

``fps`` is frames / wall time of the configured mode. Also: the network alone (encoder,
decoder pair), peak GPU memory, memory per keyframe (stored pointmap/confidence/image +
float16 tokens) and the projected memory of a 1,000-keyframe map with the network.
Warm-up frames (graph capture, allocator) run first. Results: ``benchmarks/results/mono_speed_<device>.json``.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_mast3r_speed import TINY_ARGS, build_net, time_call  # noqa: E402
from common import write_results  # noqa: E402

from recon_slam.config import load_config  # noqa: E402
from recon_slam.frontend.mast3r_predictor import Mast3rPredictor, prepare_input  # noqa: E402
from recon_slam.frontend.oracle import OraclePredictor  # noqa: E402
from recon_slam.models.mast3r import VITL_512_ARGS  # noqa: E402
from recon_slam.synth import SyntheticSequence  # noqa: E402
from recon_slam.system import SlamSystem  # noqa: E402


class CachedOracle:
    """The oracle with its outputs kept on the device, keyed by (view 1, view 2) frame index.

    A recording pass fills it; timed passes then make the same requests and get the stored
    outputs back at no cost. A request not seen before is computed (``live_ms`` records the
    time, which the benchmark subtracts).
    """

    def __init__(self, oracle: OraclePredictor) -> None:
        self.oracle = oracle
        self.store: dict[tuple, object] = {}
        self.live_ms = 0.0
        self.misses = 0
        self.lock = threading.Lock()

    def __getattr__(self, name):
        return getattr(self.oracle, name)

    def _get(self, key, fn):
        with self.lock:
            hit = self.store.get(key)
        if hit is not None:
            return hit
        t0 = time.perf_counter()
        out = fn()
        with self.lock:
            self.store[key] = out
            self.live_ms += (time.perf_counter() - t0) * 1e3
            self.misses += 1
        return out

    def predict(self, frame, keyframe=None):
        key = ("f", int(frame.index), None if keyframe is None else int(keyframe.frame_index))
        return self._get(key, lambda: self.oracle.predict(frame, keyframe))

    def predict_keyframes(self, kf_a, kf_b):
        key = ("k", int(kf_a.frame_index), int(kf_b.frame_index))
        return self._get(key, lambda: self.oracle.predict_keyframes(kf_a, kf_b))


class NetworkTimedOracle:
    """Predictor for the engine: runs the network on every request, returns the oracle's outputs.

    ``net_ms`` holds the time of the tracking thread's network requests (in pipelined mode:
    the wait for the prefetched result).
    """

    metric = False
    two_view = True

    def __init__(self, network_predictor: Mast3rPredictor, oracle: CachedOracle, device: torch.device) -> None:
        self.net, self.oracle, self.device = network_predictor, oracle, device
        self.main = threading.get_ident()
        self.net_ms: list[float] = []

    def __getattr__(self, name):
        return getattr(self.oracle, name)

    def _sync(self) -> None:
        if self.device.type == "cuda":  # this thread's stream only (a prefetch may be running)
            torch.cuda.current_stream(self.device).synchronize()

    def prefetch(self, frame, keyframe=None) -> None:
        """Start the network on the next frame (pipelined mode)."""
        self.net.prefetch(frame, keyframe)

    def predict(self, frame, keyframe=None):
        """Network pass (timed, discarded), then the oracle's prediction of the same pair."""
        t0 = time.perf_counter()
        self.net.predict(frame, keyframe)
        self._sync()
        if threading.get_ident() == self.main:
            self.net_ms.append((time.perf_counter() - t0) * 1e3)
        return self.oracle.predict(frame, keyframe)

    def predict_keyframes(self, kf_a, kf_b):
        """Backend pair decode: the network's (discarded) and the oracle's."""
        self.net.predict_keyframes(kf_a, kf_b)
        return self.oracle.predict_keyframes(kf_a, kf_b)

    def on_keyframe(self, frame_index: int) -> None:
        self.net.on_keyframe(frame_index)
        self.oracle.on_keyframe(frame_index)

    def cache_bytes(self, frame_index: int) -> int:
        """The network's cached tokens of a keyframe (what a real run keeps)."""
        return self.net.cache_bytes(frame_index)


def _stats(ms: list[float]) -> dict:
    a = np.asarray(ms, dtype=np.float64)
    return {"mean": round(float(a.mean()), 3), "p50": round(float(np.percentile(a, 50)), 3),
            "p90": round(float(np.percentile(a, 90)), 3), "max": round(float(a.max()), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny network at 128x96 (CPU smoke test)")
    parser.add_argument("--frames", type=int, default=None, help="timed frames (default 300, 12 with --quick)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up frames (default 20, 3 with --quick)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="after the timed run, profile N more frames (torch.profiler table in <name>_profile.txt)")
    parser.add_argument("--compare", default="", metavar="MODE[,MODE]",
                        help="also time sequential passes with these mono.device_loop modes (e.g. host,graph)")
    parser.add_argument("--name", default=None)
    args = parser.parse_args()

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    W, H = (128, 96) if args.quick else (512, 384)
    n_frames = args.frames or (12 if args.quick else 300)
    n_warm = args.warmup if args.warmup is not None else (3 if args.quick else 20)
    if cuda:
        torch.backends.cudnn.benchmark = True
    seq = SyntheticSequence(scene="room", trajectory="loop", frames=n_frames, width=W, height=H, seed=0,
                            depth_noise=False)
    t0 = time.perf_counter()
    frames = list(seq)
    print(f"rendered {len(frames)} frames {W}x{H} in {time.perf_counter() - t0:.1f} s", flush=True)

    overrides = {"device": str(device), "mode": "mono", "mono.long_side": max(W, H),
                 "predictor.width": W, "predictor.height": H}
    cfg = load_config(None, overrides)
    if args.set:
        cfg = load_config(cfg, args.set)
    net = build_net(TINY_ARGS if args.quick else VITL_512_ARGS, device)
    net_pred = Mast3rPredictor(cfg.predictor, device, mono_config=cfg.mono, network=net)
    print(f"network on {device}: precision {net_pred.precision}, CUDA graphs {net_pred.cuda_graphs}", flush=True)

    # network alone (through the predictor's own paths: graphs / precision as configured)
    x, _, _ = prepare_input(frames[0].image, cfg.mono.long_side, device)
    tok = net_pred._run_encoder(x)
    tok2 = net_pred._run_encoder(prepare_input(frames[1].image, cfg.mono.long_side, device)[0])
    hw = tuple(x.shape[-2:])
    network_alone = {
        "encoder_ms": time_call(lambda: net_pred._run_encoder(x), device, 30, 3)["median_ms"],
        "decoder_pair_ms": time_call(lambda: net_pred._run_decoder(tok, tok2, hw), device, 30, 3)["median_ms"],
    }
    print(f"network alone: {network_alone}", flush=True)

    oracle = CachedOracle(OraclePredictor(cfg.predictor, device, seed=0))

    def run(frames_, pipeline: bool, label: str = "", prof=None):
        """One pass over ``frames_`` on a fresh engine; returns its timings and stats."""
        net_pred.clear_cache()
        net_pred.pipeline = pipeline
        pred = NetworkTimedOracle(net_pred, oracle, device)
        system = SlamSystem(cfg, seq.camera, predictor=pred)
        live0, miss0 = oracle.live_ms, oracle.misses
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        wall = []
        t_all = time.perf_counter()
        for i, f in enumerate(frames_):
            t = time.perf_counter()
            if pipeline and i + 1 < len(frames_):
                system.prefetch(frames_[i + 1])
            system.process(f)
            if cuda:  # the engine's stream (the next frame's prefetch keeps running)
                torch.cuda.current_stream(device).synchronize()
            wall.append((time.perf_counter() - t) * 1e3)
            if prof is not None:
                prof.step()
            if label and (i + 1) % 100 == 0:
                print(f"  [{label}] {i + 1}/{len(frames_)} frames, last {wall[-1]:.1f} ms", flush=True)
        total_s = time.perf_counter() - t_all
        system.finish()
        stats = system.stats()
        peak = torch.cuda.max_memory_allocated(device) if cuda else None
        system.close()
        live = oracle.live_ms - live0
        return {"wall": np.asarray(wall), "total_s": total_s, "net_ms": np.asarray(pred.net_ms), "stats": stats,
                "peak": peak, "oracle_live_ms": live, "oracle_misses": oracle.misses - miss0,
                "fps": len(frames_) / max(total_s - live / 1e3, 1e-9)}

    print(f"warm-up on {n_warm} frames (sequential and pipelined) ...", flush=True)
    run(frames[:n_warm], False)
    run(frames[:n_warm], True)
    print(f"recording the oracle's outputs over {len(frames)} frames (not timed) ...", flush=True)
    run(frames, False, "record")
    print("timed: sequential ...", flush=True)
    seq_r = run(frames, False, "sequential")
    print("timed: pipelined ...", flush=True)
    pip_r = run(frames, True, "pipelined")
    compared = {}
    default_loop = cfg.mono.device_loop
    for mode in [m for m in args.compare.split(",") if m]:
        print(f"timed: sequential, mono.device_loop={mode} ...", flush=True)
        cfg.mono.device_loop = mode
        r = run(frames, False, f"sequential {mode}")
        cfg.mono.device_loop = default_loop
        n_c = min(len(r["wall"]), len(r["net_ms"]))
        compared[mode] = {"fps": round(r["fps"], 2), "frame_ms": _stats(r["wall"].tolist()),
                          "engine_ms": _stats((r["wall"][:n_c] - r["net_ms"][:n_c]).tolist()),
                          "stage_ms": r["stats"].get("stage_ms"), "n_keyframes": r["stats"].get("n_keyframes"),
                          "n_lost": r["stats"].get("n_lost"), "oracle_misses": r["oracle_misses"],
                          "oracle_live_ms_subtracted": round(r["oracle_live_ms"], 1)}
        print(f"  {mode}: {compared[mode]}", flush=True)
    stats, peak = seq_r["stats"], max(seq_r["peak"] or 0, pip_r["peak"] or 0) or None
    wall_a, net_ms = seq_r["wall"], seq_r["net_ms"]
    n = min(len(wall_a), len(net_ms))
    frame_ms = wall_a[:n]  # the oracle's stored outputs cost nothing (misses: see oracle_live_ms)
    engine_ms = frame_ms - net_ms[:n]
    kf_bytes = stats.get("memory_per_keyframe_bytes") or 0.0
    # the recorded oracle outputs live on the device too (a benchmark artefact): not counted
    store_bytes = 0
    if cuda:
        seen = set()
        for pred_ in oracle.store.values():
            for f in vars(pred_).values():
                if isinstance(f, torch.Tensor) and f.is_cuda and f.data_ptr() not in seen:
                    seen.add(f.data_ptr())
                    store_bytes += f.numel() * f.element_size()
    peak_system = (peak - store_bytes) if peak else None
    weights_bytes = sum(p.numel() * p.element_size() for p in net.parameters())
    res = {
        "command": " ".join(sys.argv),
        "model": "tiny" if args.quick else "ViTLarge_BaseDecoder_512_catmlpdpt_metric (synthetic weights)",
        "device": str(device),
        "input_wh": [W, H],
        "frames": int(n),
        "precision": net_pred.precision,
        "cuda_graphs": net_pred.cuda_graphs,
        "fps": round(pip_r["fps"] if cfg.mono.pipeline and cuda else seq_r["fps"], 2),
        "fps_pipelined": round(pip_r["fps"], 2),
        "fps_sequential": round(seq_r["fps"], 2),
        "sequential_frame_ms": _stats(frame_ms.tolist()),
        "sequential_network_ms": _stats(net_ms[:n].tolist()),
        "sequential_engine_ms": _stats(engine_ms.tolist()),
        "pipelined_frame_ms": _stats(pip_r["wall"].tolist()),
        "pipelined_wait_for_network_ms": _stats(pip_r["net_ms"].tolist()),
        "oracle_live_ms_subtracted": {"sequential": round(seq_r["oracle_live_ms"], 1),
                                      "pipelined": round(pip_r["oracle_live_ms"], 1)},
        "oracle_misses": {"sequential": seq_r["oracle_misses"], "pipelined": pip_r["oracle_misses"]},
        "stage_ms_mean_engine_stats": stats.get("stage_ms"),
        "n_keyframes_pipelined": pip_r["stats"].get("n_keyframes"),
        "n_lost_pipelined": pip_r["stats"].get("n_lost"),
        "network_alone": network_alone,
        "n_keyframes": stats.get("n_keyframes"),
        "n_lost": stats.get("n_lost"),
        "memory_per_keyframe_bytes": kf_bytes,
        "memory_per_keyframe_mib": round(kf_bytes / 2**20, 3),
        "network_weights_mib": round(weights_bytes / 2**20, 1),
        "gpu_peak_memory_mib": round(peak_system / 2**20, 1) if peak_system else None,
        "gpu_oracle_store_mib_excluded": round(store_bytes / 2**20, 1),
        "projected_1000_keyframes_gib": round(((peak_system or weights_bytes) + 1000 * kf_bytes) / 2**30, 2),
        "mono_device_loop": cfg.mono.device_loop,
        "compared_device_loops": compared,
        "config_overrides": args.set,
    }
    print({k: v for k, v in res.items() if k != "command"}, flush=True)
    name = args.name or f"mono_speed_{device.type}{'_quick' if args.quick else ''}"
    write_results(name, res)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        from common import RESULTS_DIR

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=acts) as prof:
            run(frames[: args.profile], False, prof=prof)
        key = "cuda_time_total" if cuda else "cpu_time_total"
        text = (f"torch.profiler over {args.profile} frames (whole engine incl. oracle), sorted by {key}\n"
                + prof.key_averages().table(sort_by=key, row_limit=40)
                + "\nsorted by CPU time\n" + prof.key_averages().table(sort_by="cpu_time_total", row_limit=40))
        (RESULTS_DIR / f"{name}_profile.txt").write_text(text)


if __name__ == "__main__":
    main()
