"""The ``recon-slam`` command line: a thin shell over the library.

Every sub-command turns user mistakes (:class:`recon_slam.errors.ReconSlamError`) into one
clear line on stderr and a non-zero exit; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable, Sequence

from recon_slam import __version__
from recon_slam.errors import InputError, ReconSlamError

EXIT_USER_ERROR = 2


# ----------------------------------------------------------------------------- commands
def cmd_synth(args: argparse.Namespace) -> int:
    """Render a synthetic sequence to a TUM folder and/or a rosbag2."""
    from recon_slam.synth import SyntheticSequence, write_tum_folder

    if args.out is None and args.bag is None:
        raise InputError("synth: give --out DIR (TUM folder) and/or --bag FILE (rosbag2)")
    seq = SyntheticSequence(
        scene=args.scene,
        trajectory=args.trajectory,
        frames=args.frames,
        width=args.width,
        height=args.height,
        seed=args.seed,
        depth_noise=args.depth_noise,
        stereo=args.stereo,
        baseline_m=args.baseline,
        fps=args.fps,
    )
    if args.out is not None:
        out = write_tum_folder(seq, args.out, progress=not args.quiet)
        print(f"wrote TUM folder {out} ({len(seq)} frames)")
    if args.bag is not None:
        from recon_slam.io.bag_writer import write_source_to_bag

        bag = write_source_to_bag(seq, args.bag, storage=args.storage, progress=not args.quiet)
        print(f"wrote rosbag2 {bag} ({args.storage})")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """Compare an estimated TUM trajectory with ground truth; print one JSON line."""
    from recon_slam.eval import evaluate_trajectory, plot_trajectories
    from recon_slam.io.trajectory import read_tum

    est_t, est_T = read_tum(args.estimate)
    gt_t, gt_T = read_tum(args.ground_truth)
    result = evaluate_trajectory(est_t, est_T, gt_t, gt_T, align=args.align, max_diff=args.max_diff)
    if args.plot is not None:
        plot_trajectories(args.plot, result.aligned_estimate, result.matched_ground_truth, title=Path(args.estimate).name)
    print(json.dumps(result.summary()))
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    """Write any supported dataset (or bag) as a rosbag2 with images, depth, camera_info and ground truth."""
    from recon_slam.io.bag_writer import write_source_to_bag
    from recon_slam.io.datasets import open_source

    source = open_source(args.source, calib=args.calib, stride=args.stride, max_frames=args.max_frames)
    bag = write_source_to_bag(
        source,
        args.out_bag,
        storage=args.storage,
        compressed=args.compressed,
        distro=args.distro,
        progress=not args.quiet,
    )
    print(f"wrote rosbag2 {bag} ({len(source)} frames, {args.storage}, {args.distro})")
    return 0


# ----------------------------------------------------------------------------- parser
def _add_synth_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scene", default="room", help="scene name: room (default) or room_b")
    p.add_argument("--trajectory", default="loop", help="handheld, loop (default) or reloc")
    p.add_argument("--frames", type=int, default=300, help="number of frames (default 300)")
    p.add_argument("--width", type=int, default=320, help="image width (default 320)")
    p.add_argument("--height", type=int, default=240, help="image height (default 240)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--fps", type=float, default=30.0, help="frame rate for the stamps (default 30)")
    p.add_argument("--depth-noise", action="store_true", help="add Kinect-like depth noise and holes")
    p.add_argument("--stereo", action="store_true", help="also render the right image of a stereo pair")
    p.add_argument("--baseline", type=float, default=0.1, help="stereo baseline in metres (default 0.1)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``recon-slam`` with all sub-commands."""
    parser = argparse.ArgumentParser(
        prog="recon-slam",
        description="Real-time SLAM and relocalisation from keyframe pointmaps (offline tools).",
    )
    parser.add_argument("--version", action="version", version=f"recon-slam {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("synth", help="render a synthetic sequence with exact ground truth")
    _add_synth_options(p)
    p.add_argument("--out", type=Path, help="write a TUM-layout folder here")
    p.add_argument("--bag", type=Path, help="write a rosbag2 here")
    p.add_argument("--storage", choices=("mcap", "sqlite3"), default="mcap", help="bag storage (default mcap)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("eval", help="ATE/RPE of a TUM trajectory against ground truth (JSON line)")
    p.add_argument("estimate", type=Path, help="estimated trajectory (TUM format, T_world_cam)")
    p.add_argument("ground_truth", type=Path, help="ground-truth trajectory (TUM format)")
    p.add_argument("--align", choices=("se3", "sim3", "none"), default="se3", help="alignment (default se3)")
    p.add_argument("--max-diff", type=float, default=0.02, help="stamp association tolerance in s (default 0.02)")
    p.add_argument("--plot", type=Path, help="write a PNG plot here")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("convert", help="turn a dataset folder into a rosbag2")
    p.add_argument("source", type=Path, help="TUM, 7-Scenes, KITTI, EuRoC, image folder or bag")
    p.add_argument("out_bag", type=Path, help="output bag (folder)")
    p.add_argument("--calib", type=Path, help="intrinsics YAML when the source has none")
    p.add_argument("--storage", choices=("mcap", "sqlite3"), default="mcap", help="bag storage (default mcap)")
    p.add_argument("--distro", choices=("humble", "jazzy"), default="humble", help="message definitions (default humble)")
    p.add_argument("--compressed", action="store_true", help="JPEG images and compressedDepth PNG depth")
    p.add_argument("--stride", type=int, default=1, help="use every N-th frame")
    p.add_argument("--max-frames", type=int, help="stop after this many frames")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_convert)

    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``recon-slam``; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USER_ERROR
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except ReconSlamError as exc:
        if args.debug:
            raise
        print(f"recon-slam {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"recon-slam {args.command}: interrupted", file=sys.stderr)
        return 130
    except (OSError, ValueError) as exc:
        if args.debug:
            raise
        print(f"recon-slam {args.command}: error: {exc} (run with --debug for details)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
