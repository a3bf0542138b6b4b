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


def _config_from_args(args: argparse.Namespace):
    """The engine configuration: --config YAML, then --mode/--device, then --set overrides."""
    from recon_slam.config import load_config

    overrides: dict = {}
    if getattr(args, "mode", None):
        overrides["mode"] = args.mode
    if getattr(args, "device", None):
        overrides["device"] = args.device
    if getattr(args, "no_loop_closure", False):
        overrides["backend.loop_closure"] = False
    if getattr(args, "checkpoint", None):
        overrides["mono.checkpoint"] = str(args.checkpoint)
    cfg = load_config(getattr(args, "config", None), overrides)
    if cfg.mode == "mono" and getattr(args, "calib", None):
        # monocular with given intrinsics: calibrated residuals, points on the camera rays
        cfg = load_config(cfg, {"mono.calibrated": True})
    if getattr(args, "set", None):
        cfg = load_config(cfg, args.set)
    return cfg


def _print_run_report(summary: dict, out: Path | None) -> None:
    line = (
        f"{summary['n_frames']} frames, {summary['n_keyframes']} keyframes, {summary['n_lost']} lost, "
        f"{summary['fps']:.1f} frames/s ({summary['mode']}, {summary['device']})"
    )
    print(line)
    if "ate_rmse_m" in summary:
        align = "Sim(3)" if summary.get("ate_align") == "sim3" else "SE(3)"
        print(
            f"ATE RMSE {summary['ate_rmse_m'] * 100:.2f} cm ({align}-aligned) = "
            f"{summary['ate_percent_of_path']:.2f} % of the {summary['path_length_m']:.2f} m path"
        )
    if out is not None:
        print(f"outputs in {out}/: trajectory.txt, keyframes.txt, cloud.ply, trajectory.png, summary.json")


def cmd_run(args: argparse.Namespace) -> int:
    """Run SLAM on a dataset folder or bag and write the standard outputs."""
    from recon_slam.io.datasets import open_source
    from recon_slam.runner import public_summary, run_slam

    cfg = _config_from_args(args)
    if cfg.mode == "mono":
        from recon_slam.frontend.mast3r_predictor import CHECKPOINT_HELP

        if not cfg.mono.checkpoint:
            raise InputError(CHECKPOINT_HELP)
        if not Path(cfg.mono.checkpoint).expanduser().is_file():
            raise InputError(f"MASt3R checkpoint {cfg.mono.checkpoint} not found. {CHECKPOINT_HELP}")
    source = open_source(args.source, calib=args.calib, stride=args.stride, max_frames=args.max_frames)
    if cfg.mode == "rgbd" and not source.has_depth:
        raise InputError(f"{args.source} has no depth images: use --mode stereo for a stereo pair, or give an RGB-D source")
    if cfg.mode == "stereo" and not source.has_stereo:
        raise InputError(f"{args.source} has no right images: use --mode rgbd for an RGB-D source, or give a stereo source")
    if args.localize_only is not None:
        from recon_slam.config import load_config

        cfg = load_config(cfg, {"reloc.localize_only": True})
    meta = {"source_path": str(Path(args.source).resolve()), "calib": str(args.calib) if args.calib else None,
            "stride": args.stride, "max_frames": args.max_frames}
    summary = run_slam(source, args.out, cfg, progress=not args.quiet, desc=f"SLAM {cfg.mode}",
                       save_map=args.save_map, localize_map=args.localize_only, meta=meta)
    _print_run_report(public_summary(summary), args.out)
    if "map" in summary:
        m = summary["map"]
        extra = (f", relocaliser from {m['reloc_mapping_frames']} frames in {m['reloc_train_s']:.1f} s "
                 f"({m['reloc_size_bytes'] / 1e6:.2f} MB)") if m.get("relocaliser") else ""
        print(f"map saved to {m['path']} ({m['n_keyframes']} keyframes{extra})")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The main job: synthetic loop -> RGB-D SLAM -> ATE and frame rate, outputs on disk."""
    from recon_slam.runner import public_summary, run_slam
    from recon_slam.synth import SyntheticSequence

    cfg = _config_from_args(args)
    print(
        f"recon-slam demo: rendering a synthetic room, loop trajectory, {args.frames} frames at "
        f"{args.width}x{args.height} (seed {args.seed}) and running RGB-D SLAM on it"
    )
    seq = SyntheticSequence(
        scene="room", trajectory="loop", frames=args.frames, width=args.width, height=args.height,
        seed=args.seed, depth_noise=True,
    )
    summary = public_summary(run_slam(seq, args.out, cfg, progress=not args.quiet, desc="demo"))
    _print_run_report(summary, args.out)
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


def _add_engine_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="engine configuration YAML (see config/default.yaml)")
    p.add_argument("--device", default=None, help="auto (default), cpu, cuda or cuda:N")
    p.add_argument("--no-loop-closure", action="store_true", help="disable loop closure")
    p.add_argument("--set", nargs="+", metavar="KEY=VALUE", help="override config keys, e.g. tracking.huber_k=2")


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

    p = sub.add_parser("run", help="run SLAM on a dataset folder or rosbag2")
    p.add_argument("source", type=Path, help="TUM, 7-Scenes, KITTI, EuRoC, image folder or bag")
    p.add_argument("--mode", choices=("rgbd", "stereo", "mono"), default=None,
                   help="input modality (default from config: rgbd); mono needs --checkpoint")
    p.add_argument("--checkpoint", type=Path,
                   help="MASt3R weights for --mode mono (the released "
                        "MASt3R_ViTLarge_BaseDecoder_512_catmlpdpt_metric.pth, CC BY-NC-SA 4.0, obtained by you)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    _add_engine_options(p)
    p.add_argument("--calib", type=Path, help="intrinsics YAML when the source has none; with --mode mono it "
                   "also switches to calibrated tracking (points on the known camera rays)")
    p.add_argument("--stride", type=int, default=1, help="use every N-th frame")
    p.add_argument("--max-frames", type=int, help="stop after this many frames")
    p.add_argument("--save-map", type=Path, metavar="DIR",
                   help="also save the map (keyframes, cloud, trained relocaliser) to DIR, atomically")
    p.add_argument("--localize-only", type=Path, metavar="MAP",
                   help="start in the saved map MAP and localise in it without extending it")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("demo", help="the main job: synthetic loop -> RGB-D SLAM -> ATE and FPS")
    p.add_argument("--out", type=Path, default=Path("recon_slam_demo"), help="output folder (default ./recon_slam_demo)")
    p.add_argument("--frames", type=int, default=300, help="number of frames (default 300)")
    p.add_argument("--width", type=int, default=320, help="image width (default 320)")
    p.add_argument("--height", type=int, default=240, help="image height (default 240)")
    p.add_argument("--seed", type=int, default=0, help="scene and noise seed (default 0)")
    _add_engine_options(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_demo)

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

    from recon_slam.cli_maps import add_map_parsers
    from recon_slam.replay import add_replay_parser

    add_replay_parser(sub)
    add_map_parsers(sub)
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
