"""One typed configuration tree for the whole engine.

Every setting lives here, once, with its default. YAML files, the command line and ROS
parameters are all views of this tree: :func:`load_config` reads a YAML file or a mapping
and applies overrides (nested mappings or dotted ``"section.key": value`` pairs, or
``"section.key=value"`` strings), rejecting unknown keys and wrong types with a
:class:`~recon_slam.errors.ReconSlamError` that names the key. :meth:`SlamConfig.to_dict`
gives the nested plain mapping back and :meth:`SlamConfig.flatten` the dotted one (what the
ROS node declares as parameters). Fields are only ``bool``, ``int``, ``float``, ``str`` or
lists of those, so every field maps onto a ROS parameter.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from recon_slam.errors import ReconSlamError


class ConfigError(ReconSlamError):
    """A configuration key is unknown, has the wrong type or an invalid value."""


# ---------------------------------------------------------------------------- sections
@dataclass
class PredictorConfig:
    """Pointmap prediction from the sensor (depth camera or rectified stereo pair)."""

    #: processing width in pixels (the image, depth and intrinsics are resized to it);
    #: 0 keeps the input width.
    width: int = 320
    #: processing height in pixels; 0 derives it from ``width`` and the input aspect ratio.
    height: int = 0
    #: undistort inputs whose camera has distortion coefficients before anything else.
    undistort: bool = True
    #: depth readings outside [min_depth, max_depth] metres are invalid (confidence 0).
    min_depth: float = 0.2
    max_depth: float = 4.0
    #: depth noise model sigma(z) = depth_sigma_base + depth_sigma_quadratic * z^2 (metres);
    #: the defaults are the usual structured-light (Kinect v1) figures.
    depth_sigma_base: float = 0.0012
    depth_sigma_quadratic: float = 0.0019
    #: a pixel whose depth differs from a 4-neighbour by more than this fraction of its depth
    #: lies on a depth discontinuity and gets confidence 0.
    discontinuity_ratio: float = 0.05
    #: stereo: OpenCV StereoSGBM parameters, at the processing resolution.
    sgbm_min_disparity: int = 0
    sgbm_num_disparities: int = 64
    sgbm_block_size: int = 5
    sgbm_p1: int = 0  # 0: 8 * 3 * block_size^2
    sgbm_p2: int = 0  # 0: 32 * 3 * block_size^2
    sgbm_uniqueness_ratio: int = 10
    sgbm_speckle_window: int = 100
    sgbm_speckle_range: int = 2
    sgbm_disp12_max_diff: int = 1
    sgbm_mode: str = "sgbm_3way"  # sgbm | hh | sgbm_3way (same quality as sgbm here, 2x faster)
    #: stereo: left-right consistency check (right disparity computed by flipping the pair).
    stereo_lr_check: bool = True
    stereo_lr_max_diff: float = 1.0
    #: stereo: disparity standard deviation in pixels (drives the confidence); SGBM is
    #: often a pixel off on weak texture, hence a pessimistic default.
    disparity_sigma: float = 1.0


@dataclass
class TrackingConfig:
    """Frame-to-keyframe pose estimation."""

    #: main residual of the matches: 'pixel_depth' (reprojection (2) + log depth (1)) or
    #: 'ray_dist' (ray direction (3) + distance (1)).
    residual: str = "pixel_depth"
    #: coarse-to-fine levels, as downsampling factors of the processing resolution.
    pyramid: list = field(default_factory=lambda: [4, 2])
    #: Gauss-Newton iterations per pyramid level (a shorter list repeats its last value).
    iterations: list = field(default_factory=lambda: [8, 6])
    #: at most this many frame points per level (a shorter list repeats its last value; a
    #: subsample beyond, see point_selection). 8,000 at the fine level (was 20,000) halves the
    #: frame time on a CPU with the same TUM fr2/desk ATE (0.76 vs 0.75 cm at depth scale 5000,
    #: 0.42 vs 0.41 cm at 5208), which keeps a live node's poses fresh on 2 cores.
    max_points: list = field(default_factory=lambda: [20000, 8000])
    #: how levels with more pixels than ``max_points`` are subsampled: 'grid' (regular) or
    #: 'gradient' (half to the strongest intensity gradients, half regular).
    point_selection: str = "grid"
    huber_k: float = 1.345
    #: weight of the main (match) residual; 0 leaves only the extra terms below.
    match_weight: float = 1.0
    #: also use the direction rows of the main residual (reprojection for 'pixel_depth',
    #: ray direction for 'ray_dist') under projective association, where they are zero up
    #: to pixel rounding (no information, extra cost); matcher-based association always
    #: uses them.
    projective_direction_rows: bool = False
    sigma_pixel: float = 1.0
    #: log-depth sigma (relative depth error)
    sigma_depth: float = 0.02
    sigma_ray: float = 0.003
    #: distance sigma in metres for 'ray_dist'
    sigma_dist: float = 0.02
    #: extra geometric term: point-to-plane distance against the keyframe's normals.
    point_to_plane: bool = True
    sigma_plane: float = 0.005
    #: extra photometric term: intensity difference (intensities in [0, 1]).
    photometric: bool = True
    sigma_photo: float = 0.04
    #: matches whose 3D distance exceeds this (metres, or pointmap units) are occluded.
    occlusion_distance: float = 0.1
    #: stop a level when the update is below this (norm of the twist) ...
    step_tolerance: float = 5e-4
    #: ... or when the last step decreased the cost by less than this fraction.
    rel_cost_tolerance: float = 2e-3
    #: Levenberg damping added to the normal equations' diagonal (relative).
    damping: float = 1e-6
    #: the frame is lost when the valid-match fraction is below this.
    min_valid_fraction: float = 0.05
    #: Levenberg-Marquardt loop with every decision on the device (no host round trip per
    #: iteration, fixed iteration count): 'host' (host loop), 'device' (device loop),
    #: 'graph' (device loop replayed as one CUDA graph per level; eager device loop off
    #: CUDA), 'auto' (= graph on CUDA, host elsewhere). Measured on an H200 at 640x480
    #: (benchmarks/results/tracking_speed_cuda_640x480_*.json): host 56, eager device 14,
    #: graph 66 frames/s end to end.
    device_loop: str = "auto"
    #: in 'graph' mode, fuse each iteration's kernels with torch.compile before capturing
    #: (needs triton; falls back to plain kernels when compiling fails). Off by default:
    #: not yet measured on a GPU.
    device_compile: bool = False
    #: when the inlier fraction falls by more than this against the previous frame, the
    #: solve is repeated from the last pose without the motion model and the better one kept.
    retry_inlier_drop: float = 0.08
    #: a black image (all pixels <= 2) makes the frame lost even when it has depth (a
    #: covered lens, a dropped frame); false tracks such frames on geometry alone.
    lost_on_black_image: bool = True
    #: a valid match is an inlier when its geometric error (point-to-plane, metres) and its
    #: intensity error are below these (relocalisation is judged on inliers).
    inlier_distance: float = 0.02
    inlier_intensity: float = 0.1
    #: a solve that moves further than this from its initial guess (metres / radians) is
    #: treated as a failure.
    max_translation_jump: float = 0.5
    max_rotation_jump: float = 0.8
    #: initialise from the previous frame pose extrapolated with its velocity.
    constant_velocity: bool = True


@dataclass
class KeyframeConfig:
    """Keyframe creation and pointmap fusion."""

    #: new keyframe when min(valid match fraction, unique keyframe pixel fraction) < this.
    new_kf_match_threshold: float = 0.333
    #: confidence-weighted fusion of tracked frames into the keyframe pointmap.
    fusion: bool = True
    #: frames are fused only where their point is within this distance of the keyframe's.
    fusion_max_distance: float = 0.05
    #: the tracking pyramid of a keyframe is rebuilt from its fused pointmap after this
    #: many fusions (1: after every fusion; larger saves time).
    refresh_interval: int = 4
    #: cap of the accumulated confidence (in units of one frame's mean confidence) so that
    #: old observations do not freeze the pointmap.
    max_fused_frames: int = 50
    #: relocalisation without a backend tries this many most recent keyframes.
    reloc_candidates: int = 5
    #: relocalisation needs at least this inlier fraction (see tracking.inlier_distance).
    reloc_min_valid_fraction: float = 0.3
    #: after this many consecutive lost frames with usable input, start a new keyframe at
    #: the last good pose instead of staying lost (the backend may reconnect it by loop
    #: closure); 0 never gives up relocalising.
    reinit_after_lost: int = 30


@dataclass
class BackendConfig:
    """Keyframe graph, retrieval, loop closure and global optimisation (own thread)."""

    enabled: bool = True
    loop_closure: bool = True
    retrieval_top_k: int = 3
    retrieval_min_score: float = 0.05
    #: keyframes closer than this many ids are not loop candidates (consecutive edges
    #: always exist).
    loop_min_keyframe_gap: int = 5
    #: an edge is kept when the lower of the two match fractions reaches this.
    verify_min_inlier_fraction: float = 0.1
    #: relocalisation is accepted when the match fraction reaches this.
    reloc_min_inlier_fraction: float = 0.3
    max_iters: int = 10
    step_tolerance: float = 1e-8
    huber_k: float = 1.345
    #: keep the first keyframe fixed (gauge).
    fix_first: bool = True
    #: nominal edge standard deviations (metres / radians / log-scale); the tracker's
    #: information is rescaled to their determinant.
    edge_sigma_translation: float = 0.01
    edge_sigma_rotation: float = 0.01
    edge_sigma_scale: float = 0.01
    #: bounded map: when a new keyframe is due, an existing keyframe within this distance
    #: (metres) and viewing angle (degrees) whose pointmap overlaps the frame's by at least
    #: this fraction both ways is reused instead.
    reuse_keyframes: bool = True
    cover_min_overlap: float = 0.6
    cover_max_distance: float = 0.6
    cover_max_angle_deg: float = 35.0


@dataclass
class MonoConfig:
    """Monocular mode (``mode: mono``): two-view MASt3R pointmaps up to scale, Sim(3) tracking."""

    #: MASt3R network weights (the released MASt3R_ViTLarge_BaseDecoder_512_catmlpdpt_metric.pth,
    #: CC BY-NC-SA 4.0, downloaded by the user); mode 'mono' needs it.
    checkpoint: str = ""
    #: use the camera intrinsics: points are snapped onto the known camera rays and tracked with
    #: pixel + log-depth residuals; false: no intrinsics, ray direction + distance residuals.
    calibrated: bool = False
    #: network input size: long side in pixels (the image is then centre-cropped to multiples of 16).
    long_side: int = 512
    #: network arithmetic: 'auto' (bfloat16 weights on CUDA, float32 on the CPU), 'float32',
    #: 'bfloat16' (weights cast, no autocast: fastest on GPUs), 'autocast' (float32 weights,
    #: bfloat16 autocast in encoder/decoder, float32 heads, as the reference code).
    precision: str = "auto"
    #: on CUDA, replay encoder and decoder as CUDA graphs captured once per input size (removes
    #: the launch overhead of ~2,000 kernels per frame).
    cuda_graphs: bool = True
    #: on CUDA, compile the encoder blocks, decoder blocks and DPT heads with ``torch.compile``
    #: (Triton kernels: fused normalisation, activations, rotary embeddings) for the CUDA-graph
    #: capture: network 10.5 -> 7.1 ms per frame on an H200 at 512x384, bf16
    #: (benchmarks/results/mono_speed_cuda*.json); costs ~30 s once per input size at the first
    #: frame. Falls back to the plain network (with a warning) when compilation fails.
    compile: bool = True
    #: on CUDA, run the network on the next frame (``SlamSystem.prefetch``) in a background
    #: thread and stream while the engine tracks the current one (throughput ~ max(network,
    #: engine) instead of their sum).
    pipeline: bool = True
    #: keyframe pixels matched per frame: every match_stride-th pixel along each axis.
    match_stride: int = 2
    #: iterative projective matching: Levenberg-Marquardt iterations per point (warm-started
    #: from the previous frame's matches; 5 and 10 gave the same ATE on the synthetic loop,
    #: benchmarks/results/mono_engine_cuda_fewer_iterations.json, and 5 saves 3 ms per frame on
    #: a GPU).
    match_iterations: int = 5
    #: a match is rejected (occlusion) when its two points are further apart than this fraction
    #: of their distance to the camera.
    match_max_distance: float = 0.1
    #: ... or when the ray-space solution misses the point by more than this many pixel angles
    #: (points outside the view end on its border).
    match_max_angle_px: float = 2.0
    #: descriptor refinement of the matches: window radius (in grid steps) and the dilations
    #: searched from coarse to fine (empty: no refinement).
    refine_radius: int = 3
    refine_dilations: list = field(default_factory=lambda: [5, 4, 3, 2, 1])
    #: a match is valid when both descriptor confidences exceed this.
    min_descriptor_confidence: float = 1.5
    #: residual sigmas: uncalibrated ray direction (unit vector) and distance (map units),
    #: calibrated pixel (pixels) and log-depth.
    sigma_ray: float = 0.003
    sigma_dist: float = 0.05
    sigma_pixel: float = 1.0
    sigma_depth: float = 0.05
    huber_k: float = 1.345
    #: Gauss-Newton iterations at most; stop when the relative cost decrease or the step is below tolerance.
    max_iterations: int = 50
    tolerance: float = 1e-3
    #: tracking is lost below this fraction of valid matches.
    min_valid_fraction: float = 0.05
    #: keyframe fusion: a predicted keyframe point further than this fraction of its distance
    #: from the fused one is not fused (occlusion / outlier).
    fusion_max_distance: float = 0.1
    #: per-frame tracking step (matching + Sim(3) solve): 'host' (host loops, early exits, a
    #: host read per Gauss-Newton iteration), 'device' (fixed shapes and iteration counts,
    #: every decision on the device, one host read per frame; runs on any device), 'graph'
    #: (the device step replayed as one CUDA graph per input shape; eager device step off
    #: CUDA), 'auto' (= graph on CUDA, host elsewhere: on an H200 at 512x384 the engine took
    #: 9.6 ms per frame with the graph and 29 ms with the host step,
    #: benchmarks/results/mono_engine_cuda.json).
    device_loop: str = "auto"
    #: device step: Sim(3) Levenberg-Marquardt iterations (fixed; a solve that meets the host
    #: loop's stopping test earlier keeps its pose, so this only caps max_iterations).
    device_iterations: int = 5
    #: device step: dtype of the descriptors gathered by the refinement: 'auto' (float16 on
    #: CUDA, float32 elsewhere), 'float32', 'float16', 'bfloat16'.
    device_descriptor_dtype: str = "auto"


@dataclass
class RelocSettings:
    """Scene-coordinate relocaliser of saved maps (see :mod:`recon_slam.reloc`)."""

    #: train a relocaliser into maps saved with ``--save-map`` / ``~/save_map``.
    build_on_save: bool = True
    #: at most this many tracked frames (evenly spread) train it.
    mapping_frames: int = 300
    #: optimiser steps (0: the relocaliser's default).
    iterations: int = 0
    #: wall-clock budget of the relocaliser training in seconds (0: 40 s on a GPU, 300 s on
    #: the CPU); the learning-rate schedule follows whichever of steps and time runs out first.
    max_seconds: float = 0.0
    #: processing resolution, shorter image side in pixels (0: the relocaliser's default).
    short_side: int = 0
    #: when tracking is lost, also ask the map's relocaliser (if one is loaded).
    use_when_lost: bool = True
    #: start in a saved map without extending it: no new keyframes, no fusion, no backend
    #: changes; tracking re-anchors on the map's keyframes and relocalises when lost.
    localize_only: bool = False


@dataclass
class OutputConfig:
    """What the engine exports."""

    #: voxel size of the fused cloud in metres (0 disables downsampling).
    voxel_size: float = 0.01
    #: pixels whose confidence is below this fraction of their keyframe's median are not
    #: exported.
    cloud_min_confidence: float = 0.5
    #: export every this many keyframe pixels along each axis (1 = all).
    cloud_stride: int = 1


@dataclass
class SlamConfig:
    """Root of the configuration tree."""

    #: 'auto' (cuda when available), 'cpu', 'cuda' or 'cuda:N'.
    device: str = "auto"
    #: input modality: 'rgbd' (registered depth), 'stereo' (rectified pair) or 'mono' (images
    #: only, MASt3R two-view pointmaps; needs mono.checkpoint).
    mode: str = "rgbd"
    #: torch CPU threads set by the engine (0 leaves torch's setting). The engine's tensors
    #: are small (tens of thousands of elements): one thread avoids the OpenMP wake-up
    #: stalls that make two threads slower, much slower on a shared machine.
    cpu_threads: int = 1
    predictor: PredictorConfig = field(default_factory=PredictorConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    keyframes: KeyframeConfig = field(default_factory=KeyframeConfig)
    backend: BackendConfig = field(default_factory=BackendConfig)
    mono: MonoConfig = field(default_factory=MonoConfig)
    reloc: RelocSettings = field(default_factory=RelocSettings)
    output: OutputConfig = field(default_factory=OutputConfig)

    # ------------------------------------------------------------------ views
    def to_dict(self) -> dict[str, Any]:
        """Nested plain mapping (YAML/JSON friendly; lists copied)."""
        return dataclasses.asdict(self)

    def flatten(self) -> dict[str, Any]:
        """Dotted mapping ``{"tracking.huber_k": 1.345, ...}`` (ROS parameter names)."""
        out: dict[str, Any] = {}

        def rec(prefix: str, obj: Any) -> None:
            for f in dataclasses.fields(obj):
                value = getattr(obj, f.name)
                key = f"{prefix}{f.name}"
                if dataclasses.is_dataclass(value):
                    rec(key + ".", value)
                else:
                    out[key] = list(value) if isinstance(value, list) else value

        rec("", self)
        return out

    def validate(self) -> "SlamConfig":
        """Check value ranges and choices; raises :class:`ConfigError` naming the key."""
        _choice("device", self.device, None)
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ConfigError(f"config key 'device': {self.device!r} is not one of auto, cpu, cuda, cuda:N")
        _choice("mode", self.mode, ("rgbd", "stereo", "mono"))
        _nonneg("cpu_threads", self.cpu_threads)
        p = self.predictor
        _nonneg("predictor.width", p.width)
        _nonneg("predictor.height", p.height)
        if p.height and not p.width:
            raise ConfigError("config key 'predictor.height' needs 'predictor.width' (> 0) as well")
        _positive("predictor.max_depth", p.max_depth)
        _nonneg("predictor.min_depth", p.min_depth)
        if p.min_depth >= p.max_depth:
            raise ConfigError("config keys 'predictor.min_depth' must be below 'predictor.max_depth'")
        _positive("predictor.depth_sigma_base", p.depth_sigma_base)
        _nonneg("predictor.depth_sigma_quadratic", p.depth_sigma_quadratic)
        _positive("predictor.discontinuity_ratio", p.discontinuity_ratio)
        if p.sgbm_num_disparities <= 0 or p.sgbm_num_disparities % 16:
            raise ConfigError("config key 'predictor.sgbm_num_disparities' must be a positive multiple of 16")
        if p.sgbm_block_size < 1 or p.sgbm_block_size % 2 == 0:
            raise ConfigError("config key 'predictor.sgbm_block_size' must be odd and >= 1")
        _choice("predictor.sgbm_mode", p.sgbm_mode, ("sgbm", "hh", "sgbm_3way"))
        _positive("predictor.disparity_sigma", p.disparity_sigma)
        t = self.tracking
        _choice("tracking.residual", t.residual, ("pixel_depth", "ray_dist"))
        if not t.pyramid or any((not isinstance(v, int)) or v < 1 for v in t.pyramid):
            raise ConfigError("config key 'tracking.pyramid' must be a non-empty list of integers >= 1")
        if not t.iterations or any((not isinstance(v, int)) or v < 0 for v in t.iterations):
            raise ConfigError("config key 'tracking.iterations' must be a non-empty list of integers >= 0")
        for name in ("huber_k", "sigma_pixel", "sigma_depth", "sigma_ray", "sigma_dist", "sigma_plane",
                     "sigma_photo", "occlusion_distance"):
            _positive(f"tracking.{name}", getattr(t, name))
        if not t.max_points or any((not isinstance(v, int)) or v < 1 for v in t.max_points):
            raise ConfigError("config key 'tracking.max_points' must be a non-empty list of integers >= 1")
        _choice("tracking.point_selection", t.point_selection, ("grid", "gradient"))
        _choice("tracking.device_loop", t.device_loop, ("auto", "host", "device", "graph"))
        _nonneg("tracking.match_weight", t.match_weight)
        if t.match_weight == 0 and not (t.point_to_plane or t.photometric):
            raise ConfigError("config key 'tracking.match_weight' is 0 and no extra term is on: nothing to track with")
        _fraction("tracking.min_valid_fraction", t.min_valid_fraction)
        k = self.keyframes
        _fraction("keyframes.new_kf_match_threshold", k.new_kf_match_threshold)
        _positive("keyframes.fusion_max_distance", k.fusion_max_distance)
        _positive("keyframes.max_fused_frames", k.max_fused_frames)
        _positive("keyframes.refresh_interval", k.refresh_interval)
        _nonneg("keyframes.reloc_candidates", k.reloc_candidates)
        _nonneg("keyframes.reinit_after_lost", k.reinit_after_lost)
        _fraction("keyframes.reloc_min_valid_fraction", k.reloc_min_valid_fraction)
        b = self.backend
        _positive("backend.retrieval_top_k", b.retrieval_top_k)
        _fraction("backend.verify_min_inlier_fraction", b.verify_min_inlier_fraction)
        _fraction("backend.reloc_min_inlier_fraction", b.reloc_min_inlier_fraction)
        _nonneg("backend.max_iters", b.max_iters)
        _fraction("backend.cover_min_overlap", b.cover_min_overlap)
        for name in ("edge_sigma_translation", "edge_sigma_rotation", "edge_sigma_scale"):
            _positive(f"backend.{name}", getattr(b, name))
        m = self.mono
        for name in ("long_side", "match_stride", "match_max_angle_px", "sigma_ray", "sigma_dist", "sigma_pixel", "sigma_depth",
                     "huber_k", "match_max_distance", "fusion_max_distance", "tolerance"):
            _positive(f"mono.{name}", getattr(m, name))
        if m.long_side % 16:
            raise ConfigError("config key 'mono.long_side' must be a multiple of 16")
        _choice("mono.precision", m.precision, ("auto", "float32", "bfloat16", "autocast"))
        _nonneg("mono.match_iterations", m.match_iterations)
        _nonneg("mono.refine_radius", m.refine_radius)
        _nonneg("mono.max_iterations", m.max_iterations)
        if any((not isinstance(v, int)) or v < 1 for v in m.refine_dilations):
            raise ConfigError("config key 'mono.refine_dilations' must be a list of integers >= 1")
        _fraction("mono.min_valid_fraction", m.min_valid_fraction)
        _choice("mono.device_loop", m.device_loop, ("auto", "host", "device", "graph"))
        _positive("mono.device_iterations", m.device_iterations)
        _choice("mono.device_descriptor_dtype", m.device_descriptor_dtype, ("auto", "float32", "float16", "bfloat16"))
        r = self.reloc
        _positive("reloc.mapping_frames", r.mapping_frames)
        _nonneg("reloc.iterations", r.iterations)
        _nonneg("reloc.max_seconds", r.max_seconds)
        if r.short_side and not 32 <= r.short_side <= 2048:
            raise ConfigError("config key 'reloc.short_side' must be 0 (default) or 32..2048 pixels")
        o = self.output
        _nonneg("output.voxel_size", o.voxel_size)
        _positive("output.cloud_stride", o.cloud_stride)
        return self


def _choice(key: str, value: str, choices: Sequence[str] | None) -> None:
    if choices is not None and value not in choices:
        raise ConfigError(f"config key {key!r}: {value!r} is not one of {', '.join(choices)}")


def _positive(key: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(f"config key {key!r} must be > 0 (got {value!r})")


def _nonneg(key: str, value: float) -> None:
    if not value >= 0:
        raise ConfigError(f"config key {key!r} must be >= 0 (got {value!r})")


def _fraction(key: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"config key {key!r} must lie in [0, 1] (got {value!r})")


# ---------------------------------------------------------------------------- loading
def _coerce(key: str, value: Any, expected: type, default: Any) -> Any:
    """Check ``value`` against the field type; ints are accepted for floats."""
    if expected is bool:
        if isinstance(value, bool):
            return value
    elif expected is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif expected is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif expected is str:
        if isinstance(value, str):
            return value
    elif expected is list:
        if isinstance(value, (list, tuple)):
            item_type = type(default[0]) if default else None
            out = []
            for i, item in enumerate(value):
                if item_type is not None:
                    out.append(_coerce(f"{key}[{i}]", item, item_type, None))
                else:
                    out.append(item)
            return out
    raise ConfigError(
        f"config key {key!r} expects {expected.__name__}, got {type(value).__name__} ({value!r})"
    )


def _apply(obj: Any, data: Mapping[str, Any], prefix: str) -> None:
    if not isinstance(data, Mapping):
        raise ConfigError(f"config key {prefix.rstrip('.') or '<root>'!r} expects a mapping, got {data!r}")
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for raw_key, value in data.items():
        key = str(raw_key)
        if "." in key:  # dotted key inside a mapping
            head, rest = key.split(".", 1)
            _apply(obj, {head: {rest: value}}, prefix)
            continue
        full = prefix + key
        if key not in names:
            raise ConfigError(
                f"unknown config key {full!r}; known keys here: {', '.join(sorted(names))}"
            )
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _apply(current, value, full + ".")
            continue
        expected = hints[key]
        origin = typing.get_origin(expected) or expected
        setattr(obj, key, _coerce(full, value, origin, current))


def _parse_override(item: str) -> tuple[str, Any]:
    import yaml

    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value")
    key, text = item.split("=", 1)
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = text
    return key.strip(), value


def load_config(
    source: str | Path | Mapping[str, Any] | SlamConfig | None = None,
    overrides: Mapping[str, Any] | Sequence[str] | None = None,
) -> SlamConfig:
    """Build a validated :class:`SlamConfig`.

    Args:
        source: a YAML file path, a (nested or dotted) mapping, an existing config (copied)
            or ``None`` for the defaults.
        overrides: applied after ``source``: a mapping (nested or dotted keys) or a sequence of
            ``"section.key=value"`` strings (values parsed as YAML scalars/lists).

    Raises:
        ConfigError: unknown key, wrong type or invalid value (the message names the key).
    """
    cfg = SlamConfig()
    if isinstance(source, SlamConfig):
        _apply(cfg, source.to_dict(), "")
    elif isinstance(source, (str, Path)):
        import yaml

        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"config file {path} not found: give an existing YAML file")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc})") from None
        _apply(cfg, data, "")
    elif source is not None:
        _apply(cfg, source, "")
    if overrides:
        if isinstance(overrides, Mapping):
            _apply(cfg, overrides, "")
        else:
            for item in overrides:
                key, value = _parse_override(item)
                _apply(cfg, {key: value}, "")
    return cfg.validate()


def field_docs() -> dict[str, str]:
    """Dotted key -> its ``#:`` documentation comment in this module (for YAML / ROS)."""
    import inspect
    import re

    docs: dict[str, str] = {}
    classes = {
        "": SlamConfig, "predictor.": PredictorConfig, "tracking.": TrackingConfig,
        "keyframes.": KeyframeConfig, "backend.": BackendConfig, "mono.": MonoConfig, "reloc.": RelocSettings,
        "output.": OutputConfig,
    }
    for prefix, cls in classes.items():
        pending: list[str] = []
        for line in inspect.getsource(cls).splitlines():
            text = line.strip()
            if text.startswith("#:"):
                pending.append(text[2:].strip())
                continue
            m = re.match(r"(\w+)\s*:\s*[\w\[\], ]+\s*=", text)
            if m and pending:
                docs[prefix + m.group(1)] = " ".join(pending)
            if not text.startswith("#"):
                pending = []
    return docs


def _yaml_scalar(value: Any) -> str:
    import yaml

    return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("...").strip()


def dump_yaml(cfg: SlamConfig, path: str | Path | None = None, header: str = "", comments: bool = True) -> str:
    """Write ``cfg`` as commented YAML (to ``path`` when given) and return the text.

    Sections are block mappings, lists are inline; each key is preceded by its
    documentation comment when ``comments``.
    """
    docs = field_docs() if comments else {}
    lines = [f"# {line}" if line else "#" for line in header.splitlines()]

    def emit(prefix: str, data: dict, indent: str) -> None:
        for key, value in data.items():
            doc = docs.get(prefix + key)
            if isinstance(value, dict):
                lines.append("")
                lines.append(f"{indent}{key}:")
                emit(prefix + key + ".", value, indent + "  ")
                continue
            if doc:
                import textwrap

                lines.extend(f"{indent}# {t}" for t in textwrap.wrap(doc, 96 - len(indent)))
            lines.append(f"{indent}{key}: {_yaml_scalar(value)}")

    emit("", cfg.to_dict(), "")
    text = "\n".join(lines) + "\n"
    if path is not None:
        Path(path).write_text(text)
    return text


def write_config_files(folder: str | Path) -> list[Path]:
    """(Re)write ``default.yaml`` and the preset files of :data:`PRESETS` into ``folder``."""
    folder = Path(folder)
    out = [folder / "default.yaml"]
    dump_yaml(SlamConfig(), out[0], "recon_slam engine configuration: every key with its default.\n"
              "Generated from recon_slam/config.py (python -m recon_slam.config). Every key is optional;\n"
              "unknown keys and wrong types are rejected. Override single keys with --set section.key=value.")
    for name, overrides in PRESETS.items():
        path = folder / f"{name}.yaml"
        dump_yaml(load_config(overrides), path, f"recon_slam preset '{name}': the defaults with {overrides}.\n"
                  "Generated from recon_slam/config.py (python -m recon_slam.config).")
        out.append(path)
    return out


#: presets that differ from the defaults, by mode (written to config/<name>.yaml)
PRESETS: dict[str, dict[str, Any]] = {
    "rgbd": {"mode": "rgbd"},
    "stereo": {
        "mode": "stereo",
        "predictor": {"max_depth": 10.0},
        "tracking": {"sigma_plane": 0.01, "occlusion_distance": 0.2},
        "keyframes": {"fusion_max_distance": 0.1},
        "output": {"voxel_size": 0.02},
    },
}


if __name__ == "__main__":  # python -m recon_slam.config [folder]: regenerate the YAML files
    import sys

    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[1] / "config"
    for written in write_config_files(target):
        print(f"wrote {written}")
