"""Speed of the synthetic sequence generator (recon_slam.synth).

Measures frames per second of rendering (RGB + exact depth) at 320x240 and 640x480, with
and without the right stereo image, and of writing a full 300-frame 320x240 TUM folder
(render + PNG encoding). Writes ``benchmarks/results/synth.json``.

Usage::

    python benchmarks/bench_synth.py [--frames 300] [--out benchmarks/results/synth.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from recon_slam.synth import SyntheticSequence, make_scene, make_trajectory, write_tum_folder  # noqa: E402
from recon_slam.synth.scene import _cached_scene  # noqa: E402


def _timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def _render_all(seq: SyntheticSequence) -> int:
    n = 0
    for frame in seq:
        n += frame.image.shape[0] > 0
    return n


def bench_render(width: int, height: int, frames: int, stereo: bool) -> dict:
    """Render ``frames`` frames of the 'room' loop; returns timings (seconds, frames/s)."""
    seq = SyntheticSequence("room", "loop", frames=frames, width=width, height=height, stereo=stereo)
    seq[0]  # warm-up (ray tables, buffers)
    _, wall, cpu = _timed(lambda: _render_all(seq))
    return {
        "width": width,
        "height": height,
        "stereo": stereo,
        "frames": frames,
        "wall_s": round(wall, 3),
        "cpu_s": round(cpu, 3),
        "fps_wall": round(frames / wall, 2),
        "ms_per_frame_wall": round(1000 * wall / frames, 2),
        "ms_per_frame_cpu": round(1000 * cpu / frames, 2),
    }


def bench_write(frames: int) -> dict:
    """Full pipeline: build scene + trajectory, render and write a TUM folder."""
    _cached_scene.cache_clear()

    def run():
        seq = SyntheticSequence("room", "loop", frames=frames, width=320, height=240)
        with tempfile.TemporaryDirectory() as tmp:
            write_tum_folder(seq, Path(tmp) / "seq", progress=False)
        return seq

    _, wall, cpu = _timed(run)
    return {
        "what": f"SyntheticSequence('room', 'loop', frames={frames}, 320x240) + write_tum_folder (PNG), cold scene",
        "frames": frames,
        "wall_s": round(wall, 3),
        "cpu_s": round(cpu, 3),
        "fps_wall": round(frames / wall, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=300, help="frames at 320x240 (640x480 uses a third)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "synth.json")
    args = parser.parse_args()

    load_before = os.getloadavg()
    _cached_scene.cache_clear()
    _, scene_wall, _ = _timed(lambda: make_scene("room", 0))
    _, traj_wall, _ = _timed(lambda: make_trajectory("handheld", 300, "room", 0))
    results = []
    for (w, h, n) in ((320, 240, args.frames), (640, 480, max(10, args.frames // 3))):
        for stereo in (False, True):
            r = bench_render(w, h, n, stereo)
            results.append(r)
            print(f"{w}x{h} stereo={stereo}: {r['fps_wall']:.1f} frames/s "
                  f"({r['ms_per_frame_wall']:.1f} ms wall, {r['ms_per_frame_cpu']:.1f} ms cpu per frame)")
    write = bench_write(args.frames)
    print(f"300-frame 320x240 TUM folder (scene + render + PNG): {write['wall_s']:.1f} s")
    report = {
        "benchmark": "recon_slam.synth rendering speed",
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "numpy": np.__version__,
            "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in os.getloadavg()],
            "note": "rendering runs torch single-threaded; the load average shows other processes sharing the cores",
        },
        "scene_build_s": round(scene_wall, 3),
        "handheld_trajectory_300_s": round(traj_wall, 3),
        "render": results,
        "write_tum_300": write,
        "requirement": "300 frames 320x240 RGB-D incl. PNG writing < 60 s",
        "requirement_met": write["wall_s"] < 60.0,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
