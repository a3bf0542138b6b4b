"""Per-map training of the scene-coordinate network (mapping).

No pretrained encoder is available, so the whole ACE-shaped network (a slim encoder and
the head) is trained per map, supervised by

* a 3D loss where the map has depth: ``|| X_pred - X_depth ||`` (metres), with
  ``X_depth = T_world_cam @ backprojected depth`` (DSAC* "with depth" style);
* ACE's reprojection loss where it has none (depth holes, edges, or RGB-only maps):
  ``tau tanh(e / tau)`` pixels for sane predictions with ``tau`` going from 50 to 1 px
  (at 480 px; scaled with the resolution) over training, and an L1 pull towards the
  point 10 m along the pixel's ray for predictions behind the camera, nearer than
  0.1 m, further than 1000 m or reprojecting more than 1000 px away. The pixel loss is
  divided by the focal length (radians), so both terms have comparable units;
* optionally (``reprojection_all_from``) the reprojection loss on all cells in the last
  part of training, as DSAC* does after its depth initialisation.

Optimiser AdamW with a one-cycle schedule (warm-up to ``lr_max``, cosine decay), over
``iterations`` steps or until ``max_seconds`` (whichever ends first; the schedule follows
the larger of the two progress fractions so a time budget still anneals). With a time
budget, every canvas size of the batches gets one untimed forward/backward pass first,
so that one-off set-up costs do not eat the warm-up (see :func:`_warm_up`). On CUDA the
forward pass runs under ``amp_dtype`` autocast (bf16 by default, no loss scaling; fp16
with a GradScaler), cuDNN autotuning off; the network's output layer stays float32.
On CUDA the whole step is captured as CUDA graphs and replayed (``cuda_graphs``): eager
steps are bound by Python and launch overhead (~2,500 steps in 40 s on an H200 whatever
the batch size), graphed ones by the GPU (~6,800 steps of 32 images in 40 s).
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np
import torch

from recon_slam.errors import InputError
from recon_slam.models.ace.head import SceneCoordinateNet, build_net
from recon_slam.reloc.buffer import TrainingBuffer, concat_frames, prepare_mapping_frames, synthesize_views


@dataclass
class RelocConfig:
    """Network, mapping and relocalisation settings of one relocaliser map.

    Network:
        encoder_widths: encoder channel widths (conv1, conv2, conv3, conv4/res1, res2);
            ACE's are (32, 64, 128, 256, 512).
        head_width, head_blocks: head hidden width and extra residual blocks.
        in_channels: 3 RGB input (default: colour disambiguates surfaces that look alike
            in grey, at no cost) or 1 grey (ACE's input, needed for an official encoder).
        homogeneous: ACE's homogeneous output (softplus division).
        weights_dtype: "float16" (map file half as large) or "float32".

    Mapping:
        short_side: processing resolution, shorter image side in pixels (queries are
            resized the same way).
        iterations, batch_images: optimiser steps and augmented images per step
            (``batch_images`` 0: 32 on CUDA, where a graphed step of 32 images takes
            ~6 ms on an H200, and 8 on the CPU, where a step of 32 takes ~5 s on 2 cores).
        max_seconds: optional wall-clock budget of the optimisation.
        lr_max, lr_start_div, lr_final_div, warmup: one-cycle schedule (start
            ``lr_max / lr_start_div``, peak after ``warmup`` of training, end
            ``lr_max / lr_final_div``).
        weight_decay: AdamW weight decay.
        aug_scale, aug_rotation_deg, aug_brightness, aug_contrast: augmentation.
        depth_smooth: relative depth spread above which a cell gets no 3D target.
        nvs_views, nvs_translation, nvs_rotation_deg: novel-view augmentation (maps
            with depth): virtual views per mapping frame, warped from the frame's depth to
            a camera moved by up to ``nvs_translation`` x median depth and rotated by up
            to ``nvs_rotation_deg`` (see :func:`recon_slam.reloc.buffer.synthesize_views`);
            0 disables.
        reprojection_weight: weight of the (focal-normalised) reprojection loss.
        reprojection_all_from: training fraction after which every cell also gets the
            reprojection loss (1 = never).
        mixed_precision: autocast of the training on CUDA (the CPU trains in float32).
        amp_dtype: its dtype, "bfloat16" (default: no loss scaling, so no host read per
            step, and no overflow) or "float16" (with a GradScaler). The output layer runs
            in float32 either way; inference (``localize``) runs in float32.
        cuda_graphs: on CUDA (bf16 or float32), capture the whole training step (batch
            sampling, forward, loss, backward, AdamW) as one CUDA graph per scale level and
            replay it: the step is otherwise bound by Python and kernel-launch overhead, not
            by the GPU. Falls back to eager steps (with a warning) if capture fails.
        seed: seed of the initialisation and sampling.

    Relocalisation:
        hypotheses: RANSAC hypotheses; threshold_px: inlier threshold at a 480 px
            shorter side (scaled with ``short_side``); refine_iterations: Gauss-Newton
            steps; min_inliers and min_inlier_ratio: a pose is accepted only with at
            least that many inliers and that fraction of the cells.
    """

    encoder_widths: tuple[int, int, int, int, int] = (32, 64, 128, 256, 256)
    head_width: int = 256
    head_blocks: int = 1
    in_channels: int = 3
    homogeneous: bool = True
    weights_dtype: str = "float16"

    short_side: int = 240
    iterations: int = 10000
    batch_images: int = 0
    max_seconds: Optional[float] = None
    lr_max: float = 3e-3
    lr_start_div: float = 10.0
    lr_final_div: float = 100.0
    warmup: float = 0.1
    weight_decay: float = 1e-4
    aug_scale: float = 1.5
    aug_rotation_deg: float = 15.0
    aug_brightness: float = 0.1
    aug_contrast: float = 0.1
    depth_smooth: float = 0.05
    nvs_views: float = 1.0
    nvs_translation: float = 0.2
    nvs_rotation_deg: float = 10.0
    reprojection_weight: float = 1.0
    reprojection_all_from: float = 1.0
    mixed_precision: bool = True
    amp_dtype: str = "bfloat16"
    cuda_graphs: bool = True
    seed: int = 0

    hypotheses: int = 64
    threshold_px: float = 10.0
    refine_iterations: int = 12
    min_inliers: int = 50
    min_inlier_ratio: float = 0.2

    def __post_init__(self) -> None:
        self.encoder_widths = tuple(int(w) for w in self.encoder_widths)  # type: ignore[assignment]
        if len(self.encoder_widths) != 5 or min(self.encoder_widths) <= 0:
            raise InputError(f"encoder_widths must be 5 positive integers, got {self.encoder_widths}")
        if self.in_channels not in (1, 3):
            raise InputError(f"in_channels must be 1 (grey) or 3 (RGB), got {self.in_channels}")
        if self.weights_dtype not in ("float16", "float32"):
            raise InputError(f"weights_dtype must be 'float16' or 'float32', got {self.weights_dtype!r}")
        if not 32 <= int(self.short_side) <= 2048:
            raise InputError(f"short_side must be 32..2048 pixels, got {self.short_side}")
        if self.amp_dtype not in ("float16", "bfloat16"):
            raise InputError(f"amp_dtype must be 'float16' or 'bfloat16', got {self.amp_dtype!r}")
        if self.iterations < 1 or self.batch_images < 0:
            raise InputError("iterations must be at least 1 and batch_images at least 0 (0: per device)")

    @property
    def threshold(self) -> float:
        """Inlier threshold in processing pixels (``threshold_px`` scaled from 480 px)."""
        return self.threshold_px * self.short_side / 480.0

    def to_dict(self) -> dict[str, Any]:
        """Plain (JSON-friendly) mapping of the settings."""
        d = dataclasses.asdict(self)
        d["encoder_widths"] = list(self.encoder_widths)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RelocConfig":
        """Settings from :meth:`to_dict` output; unknown keys raise :class:`InputError`."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise InputError(
                f"unknown relocaliser setting(s) {sorted(unknown)}; known settings: {sorted(names)}"
            )
        return cls(**data)


@dataclass
class TrainStats:
    """Summary of a mapping run.

    Attributes:
        iterations: optimiser steps done; seconds: wall clock of the whole mapping
            (preparation included); train_seconds: of the optimisation alone.
        frames: mapping frames; virtual_frames: synthesised views; cells_per_step: mean supervised cells per step.
        loss: mean loss over the last 10 % of the steps.
        median_3d_error_m: median 3D error on the un-augmented mapping frames (cells with
            depth), or None without depth.
        cuda_graphs: the steps ran as captured CUDA graphs (see ``RelocConfig.cuda_graphs``).
        history: (step, loss, lr) every ``log_every`` steps.
    """

    iterations: int = 0
    seconds: float = 0.0
    train_seconds: float = 0.0
    frames: int = 0
    virtual_frames: int = 0
    cells_per_step: float = 0.0
    loss: float = float("nan")
    median_3d_error_m: Optional[float] = None
    device: str = "cpu"
    cuda_graphs: bool = False
    history: list = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _lr_factor(t: float, cfg: RelocConfig) -> float:
    """One-cycle schedule as a fraction of ``lr_max`` at training progress ``t`` in [0, 1]."""
    if t < cfg.warmup:
        a = t / max(cfg.warmup, 1e-9)
        start = 1.0 / cfg.lr_start_div
        return start + (1.0 - start) * 0.5 * (1 - math.cos(math.pi * a))
    a = (t - cfg.warmup) / max(1.0 - cfg.warmup, 1e-9)
    end = 1.0 / cfg.lr_final_div
    return end + (1.0 - end) * 0.5 * (1 + math.cos(math.pi * min(a, 1.0)))


def scene_coordinate_loss(
    pred: torch.Tensor, batch, t: float, cfg: RelocConfig
) -> tuple[torch.Tensor, dict[str, float]]:
    """Training loss of one batch.

    Args:
        pred: (B, 3, h, w) predicted world points.
        batch: :class:`recon_slam.reloc.buffer.Batch`.
        t: training progress in [0, 1] (sets the reprojection tolerance): a float, or a
            0-d float32 tensor on ``pred``'s device (a captured step reads it).
        cfg: settings.

    Returns:
        scalar loss and a dict of float diagnostics (``l3d``, ``lrep``, ``cells``).
    """
    X = pred.permute(0, 2, 3, 1).float()  # (B, h, w, 3)
    valid = batch.valid
    m3 = valid & batch.has_xyz
    n_cells = valid.sum().clamp_min(1)
    e3 = (X - batch.xyz).norm(dim=-1)
    l3 = torch.where(m3, e3, torch.zeros_like(e3)).sum()
    tt = torch.as_tensor(t, dtype=torch.float32, device=pred.device)
    use_rep = valid & (~batch.has_xyz | (tt >= cfg.reprojection_all_from))
    lrep = torch.zeros((), device=pred.device)
    if cfg.reprojection_weight > 0:
        R = batch.T_cam_world[:, None, None, :3, :3]
        tr = batch.T_cam_world[:, None, None, :3, 3]
        Xc = (R @ X.unsqueeze(-1)).squeeze(-1) + tr
        K = batch.K[:, None, None]
        z = Xc[..., 2]
        zs = torch.where(z.abs() > 1e-6, z, torch.full_like(z, 1e-6))
        u = K[..., 0, 0] * Xc[..., 0] / zs + K[..., 0, 2]
        v = K[..., 1, 1] * Xc[..., 1] / zs + K[..., 1, 2]
        e = torch.sqrt((u - batch.uv[..., 0]) ** 2 + (v - batch.uv[..., 1]) ** 2 + 1e-12)
        good = (z > 0.1) & (z < 1000.0) & (e < 1000.0)
        scale = cfg.short_side / 480.0
        tau = (torch.sqrt((1.0 - tt * tt).clamp_min(0.0)) * 50.0 + 1.0) * scale
        f = 0.5 * (K[..., 0, 0] + K[..., 1, 1])
        l_good = tau * torch.tanh(e / tau) / f
        ray = torch.stack(
            ((batch.uv[..., 0] - K[..., 0, 2]) / K[..., 0, 0], (batch.uv[..., 1] - K[..., 1, 2]) / K[..., 1, 1],
             torch.ones_like(z)), -1
        )
        l_bad = (Xc - 10.0 * ray).abs().sum(-1)
        l = torch.where(good, l_good, l_bad)
        lrep = torch.where(use_rep, l, torch.zeros_like(l)).sum()
    loss = (l3 + cfg.reprojection_weight * lrep) / n_cells
    return loss, {"l3d": l3.detach() / n_cells, "lrep": lrep.detach() / n_cells, "cells": n_cells}


def autocast_dtype(cfg: RelocConfig, device: torch.device) -> Optional[torch.dtype]:
    """Autocast dtype of training on ``device`` (None: float32): ``cfg.amp_dtype`` on CUDA
    when ``cfg.mixed_precision``; float32 on the CPU."""
    if not cfg.mixed_precision or torch.device(device).type != "cuda":
        return None
    return torch.float16 if cfg.amp_dtype == "float16" else torch.bfloat16


def _resolve_device(device) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError("device 'cuda' requested but CUDA is not available: use --device cpu (or auto)")
    return dev


def train_relocaliser(
    frames_or_arrays: Any,
    config: Optional[RelocConfig] = None,
    device: Any = "auto",
    progress: Optional[Callable[[dict], None]] = None,
    poses: Optional[np.ndarray] = None,
    log_every: int = 100,
):
    """Build a relocaliser map: train the scene-coordinate network on posed frames.

    Args:
        frames_or_arrays: mapping frames (see
            :func:`recon_slam.reloc.buffer.prepare_mapping_frames`): Frames with
            ``T_world_cam_gt`` (and depth for the 3D loss), or a mapping of arrays.
        config: :class:`RelocConfig` (defaults when None).
        device: "auto", "cpu", "cuda" or a torch device.
        progress: optional callback receiving ``{"step", "steps", "loss", "lr",
            "seconds"}`` every ``log_every`` steps and at the end.
        poses: optional (N, 4, 4) ``T_world_cam`` overriding the frames' ground truth.
        log_every: steps between progress reports.

    Returns:
        ``(relocaliser, stats)``: a :class:`recon_slam.reloc.relocaliser.Relocaliser` on
        ``device`` and :class:`TrainStats`.
    """
    from recon_slam.reloc.relocaliser import Relocaliser

    cfg = config or RelocConfig()
    dev = _resolve_device(device)
    if cfg.batch_images == 0:  # the map records the batch it was trained with
        cfg = dataclasses.replace(cfg, batch_images=32 if dev.type == "cuda" else 8)
    t0 = time.perf_counter()
    frames = prepare_mapping_frames(frames_or_arrays, cfg.short_side, poses=poses)
    n_real = len(frames)
    mean = torch.from_numpy(frames.poses[:, :3, 3].mean(0)).float()
    if cfg.nvs_views > 0 and frames.depths is not None:
        virtual = synthesize_views(frames, cfg.nvs_views, cfg.nvs_translation, cfg.nvs_rotation_deg, dev, cfg.seed)
        frames = concat_frames(frames, virtual)
    buf = TrainingBuffer(
        frames, dev, cfg.in_channels, cfg.aug_scale, cfg.aug_rotation_deg, cfg.aug_brightness,
        cfg.aug_contrast, cfg.depth_smooth, cfg.seed,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        net = build_net(cfg.encoder_widths, cfg.head_width, cfg.head_blocks, cfg.in_channels, cfg.homogeneous, mean)
    net = net.to(dev).train()
    amp_dtype = autocast_dtype(cfg, dev)
    scaler = torch.amp.GradScaler(dev.type, enabled=amp_dtype == torch.float16)
    cudnn_benchmark = torch.backends.cudnn.benchmark
    if dev.type == "cuda":
        net = net.to(memory_format=torch.channels_last)
    steps = None
    if cfg.cuda_graphs and dev.type == "cuda" and amp_dtype != torch.float16:  # (GradScaler needs host reads)
        steps = _CapturedSteps.build(net, buf, cfg, amp_dtype)
    opt = steps.opt if steps is not None else torch.optim.AdamW(
        net.parameters(), lr=cfg.lr_max / cfg.lr_start_div, weight_decay=cfg.weight_decay, fused=dev.type == "cuda")
    stats = TrainStats(frames=n_real, virtual_frames=len(frames) - n_real, device=str(dev))
    cuda_graphs = steps is not None
    losses: list[torch.Tensor] = []
    cells = 0.0
    step = 0
    lr = 0.0
    try:
        # Batches come in several canvas sizes (scale augmentation): cuDNN autotuning would
        # benchmark every new size inside the timed loop; its heuristics are enough here.
        torch.backends.cudnn.benchmark = False
        if cfg.max_seconds and steps is None:
            _warm_up(net, buf, cfg, dev, amp_dtype)
        t_train = time.perf_counter()
        while step < cfg.iterations:
            t = step / cfg.iterations
            if cfg.max_seconds:
                t = max(t, (time.perf_counter() - t_train) / cfg.max_seconds)
            if t >= 1.0:
                break
            lr = cfg.lr_max * _lr_factor(t, cfg)
            if steps is not None:
                loss, info = steps.step(t, lr)
            else:
                for gparam in opt.param_groups:
                    gparam["lr"] = lr
                batch = buf.sample(cfg.batch_images)
                x = batch.images
                if dev.type == "cuda":
                    x = x.contiguous(memory_format=torch.channels_last)
                with torch.autocast(device_type=dev.type, dtype=amp_dtype or torch.float32,
                                    enabled=amp_dtype is not None):
                    pred = net(x)
                loss, info = scene_coordinate_loss(pred, batch, t, cfg)
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                loss = loss.detach()
            step += 1
            losses.append(loss)
            cells = cells + info["cells"]
            if step % log_every == 0 or step == cfg.iterations:
                recent = torch.stack(losses[-log_every:]).mean()
                rec = {"step": step, "steps": cfg.iterations, "loss": float(recent), "lr": lr,
                       "l3d": float(info["l3d"]), "lrep": float(info["lrep"]), "seconds": time.perf_counter() - t0}
                stats.history.append([step, rec["loss"], lr])
                if progress is not None:
                    progress(rec)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        stats.train_seconds = time.perf_counter() - t_train
    finally:
        torch.backends.cudnn.benchmark = cudnn_benchmark
        del steps  # frees the graphs' memory pool
    stats.cuda_graphs = cuda_graphs
    stats.iterations = step
    stats.cells_per_step = float(cells) / max(step, 1)
    tail = losses[-max(1, len(losses) // 10):]
    stats.loss = float(torch.stack(tail).mean()) if tail else float("nan")
    net.eval()
    reloc = Relocaliser(net, cfg, device=dev)
    stats.seconds = time.perf_counter() - t0
    if buf.has_depth:
        stats.median_3d_error_m = _training_error(net, buf, dev, n_real)
    if progress is not None:
        progress({"step": step, "steps": cfg.iterations, "loss": stats.loss, "lr": 0.0, "seconds": stats.seconds,
                  "done": True})
    return reloc, stats


class _CapturedSteps:
    """The training step as CUDA graphs: one per scale level of the buffer, sharing one memory pool.

    Each graph holds batch sampling (:meth:`TrainingBuffer.sample_from` on static
    :class:`~recon_slam.reloc.buffer.Draws`), the forward pass under autocast, the loss,
    the backward pass and a fused, capturable AdamW step whose learning rate is a device
    tensor. Per step the host draws the random numbers into the static tensors (same
    generator as the eager path), fills the progress and learning-rate scalars and replays
    the level's graph: a handful of launches instead of hundreds. The graphs run one at a
    time and nothing they leave behind is read after another one ran (the loss is copied
    out and the diagnostics are read before the next replay), so they can share a pool.
    """

    def __init__(self, net: SceneCoordinateNet, buf: TrainingBuffer, cfg: RelocConfig,
                 amp_dtype: Optional[torch.dtype]) -> None:
        dev = buf.device
        self.buf, self.cfg, self.net, self.amp_dtype = buf, cfg, net, amp_dtype
        self.lr = torch.full((), cfg.lr_max / cfg.lr_start_div, device=dev)
        self.t = torch.zeros((), device=dev)
        self.opt = torch.optim.AdamW(net.parameters(), lr=self.lr, weight_decay=cfg.weight_decay, fused=True,
                                     capturable=True)
        self.draws = buf.draw(cfg.batch_images)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.out: dict[int, tuple[torch.Tensor, dict]] = {}

    def _body(self, level: int) -> tuple[torch.Tensor, dict]:
        batch = self.buf.sample_from(self.draws, level)
        x = batch.images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device_type="cuda", dtype=self.amp_dtype or torch.float32,
                            enabled=self.amp_dtype is not None, cache_enabled=False):
            pred = self.net(x)
        loss, info = scene_coordinate_loss(pred, batch, self.t, self.cfg)
        loss.backward()
        self.opt.step()
        return loss.detach(), info

    @classmethod
    def build(cls, net, buf, cfg, amp_dtype) -> Optional["_CapturedSteps"]:
        """Warm up (learning rate 0: the weights do not move) and capture every level; None
        (with a warning) when capturing fails, e.g. on an unsupported driver."""
        try:
            self = cls(net, buf, cfg, amp_dtype)
            lr0 = float(self.lr)
            self.lr.zero_()
            side = torch.cuda.Stream(buf.device)
            side.wait_stream(torch.cuda.current_stream(buf.device))
            with torch.cuda.stream(side):  # lazy initialisation (optimiser state, cuDNN / cuBLAS handles)
                for level in range(len(buf.scales)):
                    buf.draw(cfg.batch_images, out=self.draws)
                    self._body(level)
                    self.opt.zero_grad(set_to_none=True)
            torch.cuda.current_stream(buf.device).wait_stream(side)
            pool = torch.cuda.graph_pool_handle()
            for level in range(len(buf.scales)):
                self.opt.zero_grad(set_to_none=True)  # each graph writes (not adds) its gradients
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, pool=pool):
                    self.out[level] = self._body(level)
                self.graphs[level] = g
            self.lr.fill_(lr0)
            torch.cuda.synchronize(buf.device)
            return self
        except Exception as exc:  # noqa: BLE001 - any capture failure falls back to eager steps
            warnings.warn(f"relocaliser training: CUDA graph capture failed ({type(exc).__name__}: {exc}); "
                          "training with eager steps (slower; set cuda_graphs=False to skip the attempt)",
                          RuntimeWarning, stacklevel=3)
            net.zero_grad(set_to_none=True)
            return None

    def step(self, t: float, lr: float) -> tuple[torch.Tensor, dict]:
        """One training step at progress ``t`` and learning rate ``lr``: (a copy of the loss,
        the graph's diagnostics, valid until the next step)."""
        level = self.buf.pick_level()
        self.buf.draw(self.cfg.batch_images, out=self.draws)
        self.t.fill_(t)
        self.lr.fill_(lr)
        self.graphs[level].replay()
        loss, info = self.out[level]
        return loss.clone(), info


def _warm_up(net: SceneCoordinateNet, buf: TrainingBuffer, cfg: RelocConfig, dev: torch.device,
             amp_dtype: Optional[torch.dtype]) -> None:
    """One forward and backward pass per canvas size, before the clock of a time budget starts.

    The first pass of every input shape pays one-off costs (kernel loading, cuDNN / oneDNN
    set-up, memory pool growth); inside the timed loop they would use up the budget of
    the warm-up phase of the schedule (a CUDA run once spent 23 of its 40 s on its first
    100 steps and reached the peak learning rate after 18 steps). Gradients are discarded.
    """
    for level in buf.canvas_levels():
        batch = buf.sample(cfg.batch_images, level=level)
        x = batch.images
        if dev.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device_type=dev.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            pred = net(x)
        scene_coordinate_loss(pred, batch, 0.0, cfg)[0].backward()
    net.zero_grad(set_to_none=True)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


@torch.no_grad()
def _training_error(net: SceneCoordinateNet, buf: TrainingBuffer, dev, n_frames: int, max_frames: int = 32) -> float:
    """Median 3D error (metres) of the network on the first ``n_frames`` (real) mapping frames.

    Evaluated in float32, as :meth:`recon_slam.reloc.relocaliser.Relocaliser.predict` does.
    """
    from recon_slam.models.ace.encoder import normalise_image

    idx = np.linspace(0, n_frames - 1, min(n_frames, max_frames)).round().astype(int)
    errs = []
    for i in idx:
        x = normalise_image(buf.images[i : i + 1], buf.in_channels)
        pred = net(x)[0].permute(1, 2, 0).float()
        h, w = pred.shape[:2]
        uv = net.pixel_grid(h, w, device=dev).unsqueeze(0)
        ii = torch.tensor([int(i)], device=dev)
        d, ok = buf._bilinear_depth(ii, uv)
        ok = ok & (uv[..., 0] <= buf.W - 1) & (uv[..., 1] <= buf.H - 1)
        K = buf.K[i]
        pc = torch.stack(((uv[..., 0] - K[0, 2]) / K[0, 0] * d, (uv[..., 1] - K[1, 2]) / K[1, 1] * d, d), -1)[0]
        T = buf.T_world_cam[i]
        xyz = pc @ T[:3, :3].T + T[:3, 3]
        errs.append((pred - xyz).norm(dim=-1)[ok[0]])
    e = torch.cat(errs)
    return float(e.median()) if e.numel() else float("nan")
