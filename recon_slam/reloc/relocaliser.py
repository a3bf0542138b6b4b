"""The relocaliser: a trained scene-coordinate network plus DSAC*-style RANSAC.

``Relocaliser.localize(image, camera)`` resizes (and undistorts) the query like the
mapping frames, predicts a world point for every stride-8 cell, runs
:func:`recon_slam.reloc.ransac.ransac_pnp` and accepts the pose only when enough cells
agree with it (``min_inliers`` and ``min_inlier_ratio`` of :class:`RelocConfig`); a
rejected query returns ``ok=False`` and ``T_world_cam=None`` ("not localised").

On a GPU a query costs one upload (the resized image) and one download (pose and counts
of :func:`ransac_pnp`, which draws, solves, scores and refines every hypothesis as one
fixed sequence of kernels): nothing in between waits for the device. That sequence and the
network are replayed as one CUDA graph per input shape and camera (:attr:`Relocaliser.cuda_graphs`).

Maps: :meth:`Relocaliser.state_dict` is a plain dict (format tag, settings, weights as
fp16/fp32 CPU tensors) that ``torch.save`` / ``torch.load(weights_only=True)`` handle;
:meth:`Relocaliser.from_state_dict` rebuilds it. :meth:`save` / :meth:`load` do both
with a file.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np
import torch

from recon_slam.errors import InputError
from recon_slam.geometry.camera import PinholeCamera
from recon_slam.models.ace.checkpoint import pack_weights, state_dict_bytes, unpack_weights
from recon_slam.models.ace.encoder import IMAGE_MEAN, IMAGE_STD, normalise_image
from recon_slam.models.ace.head import SceneCoordinateNet, build_net
from recon_slam.reloc.buffer import _to_rgb, processing_size
from recon_slam.reloc.pnp import invert_pose
from recon_slam.reloc.ransac import RansacConfig, RansacResult, draw_sets, parse_summary, ransac_on_device
from recon_slam.reloc.trainer import RelocConfig

log = logging.getLogger(__name__)

#: ITU-R BT.601 grey weights of :func:`recon_slam.models.ace.encoder.normalise_image`.
_GREY_WEIGHTS = np.array([0.299, 0.587, 0.114], np.float32)

#: Format tag and version of :meth:`Relocaliser.state_dict`.
STATE_FORMAT = "recon_slam.ace_relocaliser"
STATE_VERSION = 1


@dataclass
class RelocResult:
    """Outcome of one relocalisation.

    Attributes:
        ok: True when the pose is accepted ("localised").
        T_world_cam: (4, 4) float64 pose of the optical frame in the map's world frame,
            or None when not localised.
        inliers: cells reprojecting within the inlier threshold under the best pose.
        confidence: ``inliers / cells`` in [0, 1] (the acceptance test uses it).
        cells: scene coordinates predicted (stride-8 cells of the processed query).
        candidate: (4, 4) best pose even when rejected (diagnostics), or None.
        reason: why the query was rejected ("" when ok).
        time_ms: wall-clock time of the call.
    """

    ok: bool
    T_world_cam: Optional[np.ndarray]
    inliers: int
    confidence: float
    cells: int
    candidate: Optional[np.ndarray] = None
    reason: str = ""
    time_ms: float = 0.0


class Relocaliser:
    """Scene-coordinate relocaliser of one map.

    Args:
        net: trained :class:`SceneCoordinateNet` (world frame of the map).
        config: the :class:`RelocConfig` it was trained with (processing resolution and
            acceptance thresholds are used here).
        device: inference device ("cpu", "cuda", ...).
    """

    def __init__(self, net: SceneCoordinateNet, config: RelocConfig, device: Any = "cpu") -> None:
        self.config = config
        self.device = torch.device(device)
        self.net = net.to(self.device).eval()
        for p in self.net.parameters():
            p.requires_grad_(False)
        self._undistort_cache: dict[PinholeCamera, tuple] = {}
        self._grid_cache: dict[tuple[int, int], torch.Tensor] = {}
        #: on CUDA, replay network + RANSAC as one CUDA graph per input shape and camera (the
        #: first query of a shape runs eagerly; removes the launch overhead of ~1,000 kernels)
        self.cuda_graphs = True
        self._cells: dict[tuple, int] = {}  # input shape -> predicted cells
        self._graphs: dict[tuple, Any] = {}
        self._graph_lock = threading.Lock()

    # ------------------------------------------------------------------ inference
    def _prepare(self, image: np.ndarray, camera: PinholeCamera) -> tuple[np.ndarray, PinholeCamera]:
        import cv2

        image = _to_rgb(image, "query image")
        if (image.shape[1], image.shape[0]) != camera.size:
            raise InputError(
                f"query image is {image.shape[1]}x{image.shape[0]} but its camera is "
                f"{camera.width}x{camera.height}: give the calibration of this image size"
            )
        if camera.has_distortion:
            if camera not in self._undistort_cache:
                self._undistort_cache[camera] = camera.undistortion_maps()
            mx, my, camera = self._undistort_cache[camera]
            image = cv2.remap(image, mx, my, cv2.INTER_LINEAR)
        w, h = processing_size(camera.width, camera.height, self.config.short_side)
        if (w, h) != camera.size:
            interp = cv2.INTER_AREA if w < camera.width else cv2.INTER_LINEAR
            image = cv2.resize(image, (w, h), interpolation=interp)
            camera = camera.scaled(w, h)
        return image, camera

    def _pixel_grid(self, h: int, w: int) -> torch.Tensor:
        """(h * w, 2) input pixel of every output cell, cached per feature size (on the device)."""
        key = (h, w)
        if key not in self._grid_cache:
            self._grid_cache[key] = self.net.pixel_grid(h, w, device=self.device).reshape(-1, 2)
        return self._grid_cache[key]

    @torch.no_grad()
    def predict(self, image: np.ndarray, camera: PinholeCamera) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Scene coordinates of a query image.

        Args:
            image: (H, W, 3) uint8 RGB (or (H, W) grey) query.
            camera: its intrinsics (distortion allowed; the image is undistorted first).

        Returns:
            uv (N, 2) pixels and X (N, 3) world points (float32, on the device), and K
            (3, 3) float64 CPU tensor: intrinsics of the processed image the pixels refer to.

        Nothing is read back from the device; a grey network gets its (h, w) grey image
        computed on the host (same weights as :func:`normalise_image`), so one upload
        and no other host-to-device copy happens.
        """
        img, cam = self._prepare(image, camera)
        uv, X = self._scene_coordinates(self._host_input(img).to(self.device))
        return uv, X, torch.tensor(cam.K, dtype=torch.float64)

    def _host_input(self, img: np.ndarray) -> torch.Tensor:
        """CPU tensor to upload for a prepared image: (h, w) float32 grey (the grey weights of
        :func:`normalise_image`) for a grey network, else the (h, w, 3) uint8 image."""
        if self.config.in_channels == 1:
            return torch.from_numpy((img.astype(np.float32) * (_GREY_WEIGHTS / 255.0)).sum(-1, dtype=np.float32))
        return torch.from_numpy(np.ascontiguousarray(img))

    def _scene_coordinates(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Uploaded :meth:`_host_input` -> uv (N, 2) cell pixels and X (N, 3) float32 world points."""
        if self.config.in_channels == 1:
            x = (t[None, None] - IMAGE_MEAN) / IMAGE_STD
        else:
            x = normalise_image(t.permute(2, 0, 1).unsqueeze(0), self.config.in_channels)
        # float32 on every device: no per-layer weight casts (launches) and no fp16 range
        # risk for a network trained under bf16; cuDNN may still use TF32 for the convolutions.
        pred = self.net(x)[0]
        h, w = pred.shape[1:]
        X = pred.permute(1, 2, 0).reshape(-1, 3).float()
        # every cell centre (8 j, 8 i) lies inside the image: 8 (ceil(W / 8) - 1) <= W - 1
        return self._pixel_grid(h, w), X

    def _captured(self, t: torch.Tensor, intr: tuple, sets: torch.Tensor, rc: RansacConfig):
        """The CUDA graph of network + RANSAC for this input shape and camera (None when capture failed)."""
        key = (tuple(t.shape), t.dtype, intr, rc)  # (the sets' shape follows from rc)
        if key not in self._graphs:
            from recon_slam.models.mast3r.cuda_graphs import CapturedCall

            thr = self.config.threshold

            def run(t_, sets_):
                uv, X = self._scene_coordinates(t_)
                return ransac_on_device(uv, X, intr, thr, rc, sets_)

            try:
                self._graphs[key] = CapturedCall(run, [t, sets])
            except Exception as exc:  # noqa: BLE001 - eager calls still work
                log.warning("CUDA graph capture of the relocaliser failed (%s): running it eagerly", exc)
                self._graphs[key] = None
        return self._graphs[key]

    @torch.no_grad()
    def localize(self, image: np.ndarray, camera: PinholeCamera, seed: Optional[int] = None) -> RelocResult:
        """Pose of a query image in the map, or "not localised".

        Args:
            image: (H, W, 3) uint8 RGB (or (H, W) grey).
            camera: intrinsics of ``image`` (``fx != fy``, any principal point, OpenCV
                distortion allowed).
            seed: RANSAC sampling seed (default: the map's seed; results are
                deterministic for a given seed and device).

        Returns:
            :class:`RelocResult`; ``T_world_cam`` maps camera (optical) to world.
        """
        t0 = time.perf_counter()
        cfg = self.config
        img, cam = self._prepare(image, camera)
        t = self._host_input(img).to(self.device)
        gen = torch.Generator(device=self.device)
        gen.manual_seed(int(cfg.seed if seed is None else seed))
        rc = RansacConfig(hypotheses=cfg.hypotheses, refine_iterations=cfg.refine_iterations)
        intr = (float(cam.fx), float(cam.fy), float(cam.cx), float(cam.cy))
        n = self._cells.get(tuple(t.shape))
        sets = summary = None
        if self.cuda_graphs and self.device.type == "cuda" and n is not None:
            sets = draw_sets(n, rc, self.device, gen)  # the sets ransac_pnp would draw
            with self._graph_lock:
                g = self._captured(t, intr, sets, rc)
                if g is not None:
                    summary, mask = g(t, sets)
                    summary, mask = summary.cpu(), mask.clone()  # (the graph's buffers are reused)
        if summary is None:
            uv, X = self._scene_coordinates(t)
            n = int(uv.shape[0])
            self._cells[tuple(t.shape)] = n
            if n >= 4:
                sets = draw_sets(n, rc, self.device, gen) if sets is None else sets
                summary, mask = ransac_on_device(uv, X, intr, cfg.threshold, rc, sets,
                                                 early_exit=self.device.type == "cpu")
        if summary is None:  # fewer than 4 cells: nothing to solve
            res = RansacResult(None, 0, torch.zeros(n, dtype=torch.bool), 0.0, 0)
        else:
            res = parse_summary(summary.cpu(), mask, rc)
        conf = res.inliers / max(n, 1)
        cand = None if res.T_cam_world is None else invert_pose(res.T_cam_world).numpy()
        if cand is None:
            reason = "no pose hypothesis passed the 4-point check"
        elif res.inliers < cfg.min_inliers:
            reason = f"{res.inliers} inliers < {cfg.min_inliers}"
        elif conf < cfg.min_inlier_ratio:
            reason = f"inlier ratio {conf:.3f} < {cfg.min_inlier_ratio}"
        else:
            reason = ""
        ok = reason == ""
        return RelocResult(
            ok=ok,
            T_world_cam=cand if ok else None,
            inliers=res.inliers,
            confidence=conf,
            cells=n,
            candidate=cand,
            reason=reason,
            time_ms=(time.perf_counter() - t0) * 1e3,
        )

    # ------------------------------------------------------------------ maps
    def state_dict(self) -> dict[str, Any]:
        """Plain dict of the map: ``format``, ``version``, ``config`` (dict), ``weights``.

        Weights are CPU tensors in ``config.weights_dtype`` (the ``mean`` buffer float32).
        """
        dtype = torch.float16 if self.config.weights_dtype == "float16" else torch.float32
        return {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "config": self.config.to_dict(),
            "weights": pack_weights(self.net, dtype),
        }

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any], device: Any = "cpu") -> "Relocaliser":
        """Rebuild a relocaliser from :meth:`state_dict` output (weights become float32)."""
        if not isinstance(state, Mapping) or state.get("format") != STATE_FORMAT:
            raise InputError(
                "not a recon_slam relocaliser state (format tag missing): give the dict written by "
                "Relocaliser.state_dict() / Relocaliser.save()"
            )
        if int(state.get("version", -1)) > STATE_VERSION:
            raise InputError(
                f"relocaliser state version {state.get('version')} is newer than this recon_slam "
                f"(supports {STATE_VERSION}): upgrade recon_slam"
            )
        cfg = RelocConfig.from_dict(dict(state["config"]))
        net = build_net(cfg.encoder_widths, cfg.head_width, cfg.head_blocks, cfg.in_channels, cfg.homogeneous)
        unpack_weights(net, state["weights"])
        return cls(net, cfg, device)

    def size_bytes(self) -> int:
        """Bytes of the map's weights as stored by :meth:`state_dict`."""
        return state_dict_bytes(self.state_dict()["weights"])

    def save(self, path: str | Path) -> Path:
        """Write :meth:`state_dict` to ``path`` with ``torch.save``."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(self.state_dict(), path)
        return path

    @classmethod
    def load(cls, path: str | Path, device: Any = "cpu") -> "Relocaliser":
        """Read a file written by :meth:`save`."""
        path = Path(path)
        if not path.is_file():
            raise InputError(f"relocaliser file {path} not found: build the map first or check the path")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise InputError(f"{path} is not a relocaliser file ({exc}); rebuild the map") from None
        return cls.from_state_dict(state, device)

    def to(self, device: Any) -> "Relocaliser":
        """Move to another device (in place); returns self."""
        self.device = torch.device(device)
        self.net.to(self.device)
        self._grid_cache.clear()
        return self
