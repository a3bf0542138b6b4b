"""Two-view pointmap predictor backed by the MASt3R network (monocular mode).

:class:`Mast3rPredictor` wraps a network object offering

* ``encode(img)``: ``img`` (B, 3, H, W) normalised to ``[-1, 1]`` -> tokens (or a tuple
  whose first element is the tokens);
* ``decode(tokens_frame, tokens_kf, true_shape)`` -> outputs with ``view1`` / ``view2``
  (attributes or mapping keys), each with ``pts3d`` (B, H, W, 3), ``conf`` (B, H, W),
  ``desc`` (B, H, W, F), ``desc_conf`` (B, H, W); view 2's points are expressed in view 1's
  (the frame's) camera frame,

and turns a (frame, keyframe) pair into a
:class:`~recon_slam.frontend.predictors.TwoViewPrediction`. It does MASt3R's input
preparation: the long side is resized to ``mono.long_side`` (512), the image centre-cropped
to multiples of 16 and normalised ``(x / 255 - 0.5) / 0.5``; the camera intrinsics follow
the same resize and crop. Encoder tokens of keyframes are cached (one encoder pass per
frame, one decoder pass per pair), in float16 on every device (:data:`TOKEN_DTYPE`; 1.5 MiB
per keyframe at 512x384 with ViT-L's 1024-d tokens); :meth:`Mast3rPredictor.cache_bytes`
reports them per keyframe. A keyframe's prepared image is not kept by the cache (the
keyframe holds it).

Speed (our :class:`~recon_slam.models.mast3r.MASt3RNet` only): ``mono.precision`` ``auto``
casts the weights to bfloat16 on CUDA (float32 on the CPU), and with ``mono.cuda_graphs``
the encoder and the decoder + heads are captured once per input size as CUDA graphs and
replayed, their blocks compiled by ``torch.compile`` for the capture (``mono.compile``).
Outputs are copied out of the graph buffers under a lock, so the backend thread can decode
keyframe pairs at the same time (eagerly, uncompiled). ``benchmarks/bench_mast3r_speed.py`` and
``benchmarks/bench_mono_speed.py`` measure them.

Without a network object the weights are loaded from ``mono.checkpoint`` (our
implementation of the network, :mod:`recon_slam.models.mast3r`); with no checkpoint the
constructor fails with :data:`CHECKPOINT_HELP` (what to pass and where to get it).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import cv2
import numpy as np
import torch

from recon_slam.config import MonoConfig, PredictorConfig
from recon_slam.errors import InputError
from recon_slam.frontend.predictors import PointmapPredictor, TwoViewPrediction, check_image
from recon_slam.geometry.camera import PinholeCamera
from recon_slam.io.frame import Frame

log = logging.getLogger(__name__)

#: dtype of the cached encoder tokens (half the memory of float32; the decoder casts them to
#: its own dtype)
TOKEN_DTYPE = torch.float16

#: file name of the released MASt3R weights the monocular mode expects
CHECKPOINT_NAME = "MASt3R_ViTLarge_BaseDecoder_512_catmlpdpt_metric.pth"

CHECKPOINT_HELP = (
    "mode 'mono' needs the MASt3R network weights: pass --checkpoint FILE (config key "
    f"mono.checkpoint) with the released {CHECKPOINT_NAME} (CC BY-NC-SA 4.0, non-commercial; "
    "download it yourself from the MASt3R project, github.com/naver/mast3r, checkpoints "
    "section). recon_slam does not download or ship it."
)


@dataclass(frozen=True)
class InputGeometry:
    """Resize + centre crop of an input image: ``(in_w, in_h)`` -> ``(resized_w, resized_h)``,
    then the window ``[x0, x0 + width) x [y0, y0 + height)``."""

    in_w: int
    in_h: int
    resized_w: int
    resized_h: int
    x0: int
    y0: int
    width: int
    height: int

    def camera(self, camera: PinholeCamera) -> PinholeCamera:
        """Intrinsics of the prepared image from those of the input (distortion dropped)."""
        cam = PinholeCamera(camera.width, camera.height, camera.fx, camera.fy, camera.cx, camera.cy)
        return cam.scaled(self.resized_w, self.resized_h).cropped(self.x0, self.y0, self.width, self.height)


def input_geometry(width: int, height: int, long_side: int = 512, multiple: int = 16) -> InputGeometry:
    """MASt3R's preparation of a ``width x height`` image: long side -> ``long_side``,
    centre crop to multiples of ``multiple``."""
    scale = long_side / max(width, height)
    rw, rh = max(1, int(round(width * scale))), max(1, int(round(height * scale)))
    cw, ch = (rw // multiple) * multiple, (rh // multiple) * multiple
    if cw == 0 or ch == 0:
        raise InputError(f"image {width}x{height} is too elongated for the network input ({rw}x{rh} after resizing)")
    return InputGeometry(width, height, rw, rh, (rw - cw) // 2, (rh - ch) // 2, cw, ch)


def prepare_input(rgb: np.ndarray, long_side: int = 512, device: torch.device | str = "cpu"
                  ) -> tuple[torch.Tensor, np.ndarray, InputGeometry]:
    """Network input of an RGB image.

    Args:
        rgb: (H, W, 3) uint8 RGB.

    Returns:
        tensor (1, 3, h, w) float32 in ``[-1, 1]``, the (h, w, 3) uint8 cropped image, and the
        :class:`InputGeometry` (h, w multiples of 16, long side ``long_side`` before cropping).
    """
    geo = input_geometry(rgb.shape[1], rgb.shape[0], long_side)
    if (geo.resized_w, geo.resized_h) != (rgb.shape[1], rgb.shape[0]):
        interp = cv2.INTER_AREA if geo.resized_w < rgb.shape[1] else cv2.INTER_CUBIC
        rgb = cv2.resize(rgb, (geo.resized_w, geo.resized_h), interpolation=interp)
    crop = np.ascontiguousarray(rgb[geo.y0: geo.y0 + geo.height, geo.x0: geo.x0 + geo.width])
    t = torch.from_numpy(crop).to(device).permute(2, 0, 1)[None].float()
    return (t / 255.0 - 0.5) / 0.5, crop, geo


def _tensors(pred: Optional[TwoViewPrediction]) -> list[torch.Tensor]:
    """The CUDA tensors of a prediction (for stream bookkeeping)."""
    if pred is None:
        return []
    out = []
    for f in dataclasses.fields(pred):
        v = getattr(pred, f.name)
        if isinstance(v, torch.Tensor) and v.is_cuda:
            out.append(v)
    return out


def _field(obj: Any, name: str) -> Any:
    return obj[name] if isinstance(obj, dict) else getattr(obj, name)


def load_network(checkpoint: str | Path, device: torch.device | str = "cpu"):
    """The MASt3R network with weights from ``checkpoint`` (:func:`recon_slam.models.mast3r.load_mast3r`)."""
    path = Path(checkpoint).expanduser()
    if not path.is_file():
        raise InputError(f"MASt3R checkpoint {path} not found. {CHECKPOINT_HELP}")
    try:
        from recon_slam.models.mast3r import load_mast3r
    except ImportError as exc:  # pragma: no cover - the network module is part of the package
        raise InputError(f"the MASt3R network implementation is not available ({exc})") from None
    return load_mast3r(path, device=device)


class Mast3rPredictor(PointmapPredictor):
    """MASt3R two-view predictor (see the module doc).

    Args:
        config: predictor settings (only the device matters; the input size is MASt3R's).
        device: torch device of the network and the outputs.
        mono_config: monocular settings (``checkpoint``, ``long_side``).
        network: a ready network object (``encode`` / ``decode``); when None it is loaded
            from ``mono_config.checkpoint``.
        cache_frames: encoder tokens of this many recent frames are kept (keyframes' are kept).
        token_dtype: dtype of the cached tokens (default :data:`TOKEN_DTYPE`; None: as encoded).

    Raises:
        InputError: no network and no (existing) checkpoint, with :data:`CHECKPOINT_HELP`.
    """

    metric = False
    two_view = True

    def __init__(self, config: PredictorConfig, device: torch.device | str = "cpu",
                 mono_config: Optional[MonoConfig] = None, network: Any = None, cache_frames: int = 4,
                 token_dtype: Optional[torch.dtype] = TOKEN_DTYPE) -> None:
        super().__init__(config, device)
        self.mono = mono_config or MonoConfig()
        if network is None:
            if not self.mono.checkpoint:
                raise InputError(CHECKPOINT_HELP)
            network = load_network(self.mono.checkpoint, self.device)
        self.network = network
        self._net_lock = threading.RLock()  # network calls (graph replays share static buffers)
        self._graphs: dict[tuple, Any] = {}
        self._graph_event = None  # CUDA event after the last graph use (graphs shared by streams)
        self.compile = False  # set by _setup_network for our network (mono.compile)
        self.precision, self.cuda_graphs = self._setup_network()
        self.pipeline = bool(getattr(self.mono, "pipeline", True))
        self._pending = None  # (frame index, keyframe frame index, done event, [prediction])
        self._worker = None
        self._side_stream = None
        self._prefetch_warned = False
        self._pipeline_on_cpu = False  # tests: exercise the prefetch thread without CUDA
        self.cache_frames = int(cache_frames)
        self.token_dtype = token_dtype
        # frame index -> (tokens, (h, w), prepared image or None once a keyframe, camera)
        self._tokens: "OrderedDict[int, tuple[torch.Tensor, tuple[int, int], Optional[np.ndarray], PinholeCamera]]" = \
            OrderedDict()
        self._pinned: set[int] = set()
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ network set-up
    def _setup_network(self) -> tuple[str, bool]:
        """Apply ``mono.precision`` and ``mono.cuda_graphs`` to our MASt3R network.

        Returns the precision in use ('float32', 'bfloat16', 'autocast'; 'external' for a
        network that is not :class:`~recon_slam.models.mast3r.MASt3RNet`) and whether the
        encoder / decoder are replayed as CUDA graphs.
        """
        try:
            from recon_slam.models.mast3r.network import MASt3RNet
        except ImportError:  # pragma: no cover - part of the package
            return "external", False
        net = self.network
        if not isinstance(net, MASt3RNet):
            return "external", False
        prec = self.mono.precision
        if prec == "auto":
            prec = "bfloat16" if self.device.type == "cuda" else "float32"
        if prec == "bfloat16":  # weights in bf16, no autocast: no per-call weight casts
            net.to(torch.bfloat16).set_precision(None)
        elif prec == "autocast":
            net.float().set_precision(torch.bfloat16)
        else:
            net.float().set_precision(None)
        graphs = bool(self.mono.cuda_graphs and self.device.type == "cuda" and torch.cuda.is_available())
        #: compile the network's blocks for the graph captures (never for eager calls: the
        #: backend's batched decodes come in many shapes, each would compile again)
        self.compile = bool(graphs and self.mono.compile)
        return prec, graphs

    def _graph(self, kind: str, hw: tuple[int, int], token_dtype: torch.dtype):
        """The captured encoder / decoder for an input size (None when capture failed)."""
        key = (kind, hw, token_dtype)
        if key in self._graphs:
            return self._graphs[key]
        from recon_slam.models.mast3r import cuda_graphs as cg

        net = self.network
        name = "encoder" if kind == "enc" else "decoder"

        def capture(compiled: bool):
            if compiled:  # only while capturing: the graph keeps the compiled kernels
                log.info("compiling the MASt3R %s for %dx%d input (torch.compile, once per input size, "
                         "~10-30 s; mono.compile: false skips it)", name, hw[1], hw[0])
                net.compile_blocks()
            try:
                if kind == "enc":
                    return cg.capture_encoder(net, hw, 1, amp_dtype=net.amp_dtype, out_dtype=token_dtype)
                return cg.capture_decoder(net, hw, 1, amp_dtype=net.amp_dtype, token_dtype=token_dtype)
            finally:
                if compiled:
                    net.uncompile_blocks()

        try:
            g = capture(self.compile)
        except Exception as exc:  # noqa: BLE001 - fall back: uncompiled graphs, then eager calls
            g = None
            if self.compile:
                log.warning("torch.compile of the MASt3R %s failed (%s): using the uncompiled network "
                            "(set mono.compile: false to skip the attempt)", name, exc)
                self.compile = False
                try:
                    g = capture(False)
                except Exception as exc2:  # noqa: BLE001
                    exc = exc2
            if g is None:
                log.warning("CUDA graph capture of the MASt3R %s failed (%s): running it eagerly "
                            "(set mono.cuda_graphs: false to skip the attempt)", name, exc)
        self._graphs[key] = g
        return g

    def _graph_begin(self) -> None:
        """Order this stream after the last graph use on any stream (shared static buffers)."""
        if self._graph_event is not None:
            torch.cuda.current_stream(self.device).wait_event(self._graph_event)

    def _graph_end(self) -> None:
        """Mark the end of a graph use (its outputs copied) on the current stream."""
        if self._graph_event is None:
            self._graph_event = torch.cuda.Event()
        self._graph_event.record(torch.cuda.current_stream(self.device))

    def _run_encoder(self, x: torch.Tensor) -> torch.Tensor:
        """(1, 3, H, W) prepared image -> (1, N, C) tokens in ``token_dtype`` (own memory)."""
        net = self.network
        out_dtype = self.token_dtype
        with self._net_lock, torch.inference_mode():
            if self.cuda_graphs and x.shape[0] == 1:
                g = self._graph("enc", tuple(x.shape[-2:]), out_dtype or torch.float32)
                if g is not None:
                    self._graph_begin()
                    tok = g(x).clone()
                    self._graph_end()
                    return tok
            try:  # tokens are cached in half precision (half the memory)
                tok = net.encode(x, out_dtype=out_dtype) if out_dtype is not None else net.encode(x)
            except TypeError:  # a network without out_dtype
                tok = net.encode(x)
        if isinstance(tok, (tuple, list)):
            tok = tok[0]
        if out_dtype is not None and tok.is_floating_point() and tok.dtype != out_dtype:
            tok = tok.to(out_dtype)
        return tok

    def _run_decoder(self, tok1: torch.Tensor, tok2: torch.Tensor, shape1: tuple[int, int]):
        """Decoder + heads on one pair; returns (outputs, True when they are graph buffers)."""
        with self._net_lock, torch.inference_mode():
            if self.cuda_graphs and tok1.shape[0] == 1 and tok2.shape == tok1.shape and tok1.dtype == tok2.dtype:
                g = self._graph("dec", tuple(shape1), tok1.dtype)
                if g is not None:
                    self._graph_begin()
                    return g(tok1, tok2), True
            return self.network.decode(tok1, tok2, shape1), False

    # ------------------------------------------------------------------ encoder cache
    def _encode(self, frame: Frame):
        with self._lock:
            hit = self._tokens.get(frame.index)
        if hit is not None:
            return hit
        check_image(frame)
        cam_u, img, _, _ = self._undistort(frame)
        img = check_image(dataclasses.replace(frame, image=img, camera=cam_u))  # (H, W, 3) uint8
        x, crop, geo = prepare_input(img, self.mono.long_side, self.device)
        tok = self._run_encoder(x)
        entry = (tok, (geo.height, geo.width), crop, geo.camera(cam_u))
        with self._lock:
            self._tokens[frame.index] = entry
            unpinned = [k for k in self._tokens if k not in self._pinned]
            for k in unpinned[: max(len(unpinned) - self.cache_frames, 0)]:
                del self._tokens[k]
        return entry

    def _cached(self, index: int):
        with self._lock:
            hit = self._tokens.get(int(index))
        if hit is None:
            raise InputError(f"no encoder tokens cached for keyframe frame {index}")
        return hit

    def on_keyframe(self, frame_index: int) -> None:
        """Keep the encoder tokens of a frame that became a keyframe (engine hook).

        Its prepared image is dropped from the cache: a keyframe is only view 2 of later
        pairs, or view 1 of :meth:`predict_keyframes`, which takes the keyframe's own image.
        """
        i = int(frame_index)
        with self._lock:
            self._pinned.add(i)
            hit = self._tokens.get(i)
            if hit is not None and hit[2] is not None:
                self._tokens[i] = (hit[0], hit[1], None, hit[3])

    def clear_cache(self) -> None:
        """Forget every cached encoder token (e.g. before replaying a sequence from its start).

        Captured CUDA graphs and the network are kept.
        """
        with self._lock:
            self._tokens.clear()
            self._pinned.clear()

    def cache_bytes(self, frame_index: int) -> int:
        """Bytes of the encoder tokens cached for a frame (0 when none): a keyframe's share of
        the predictor's memory (see :func:`recon_slam.frontend.mono.keyframe_bytes`)."""
        with self._lock:
            hit = self._tokens.get(int(frame_index))
        if hit is None:
            return 0
        tok = hit[0]
        return int(tok.element_size() * tok.numel()) if isinstance(tok, torch.Tensor) else 0

    # ------------------------------------------------------------------ decoding
    def _decode(self, e1, e2, index1: int, index2: int, stamp: float, other: bool,
                image1: Optional[torch.Tensor] = None) -> TwoViewPrediction:
        tok1, shape1, crop1, cam1 = e1
        tok2, shape2, _, _ = e2
        with self._net_lock:  # graph outputs are overwritten by the next replay: copy them first
            out, static = self._run_decoder(tok1, tok2, shape1)
            v1, v2 = _field(out, "view1"), _field(out, "view2")
            dev = self.device

            def first(t):
                return t[0].to(device=dev, dtype=torch.float32, copy=static).contiguous()

            fields1 = {k: first(_field(v1, k)) for k in ("pts3d", "conf", "desc", "desc_conf")}
            fields2 = {k: first(_field(v2, k)) for k in ("pts3d", "conf", "desc", "desc_conf")} if other else None
            if static:
                self._graph_end()

        if crop1 is not None:
            image = torch.from_numpy(crop1).to(dev)
        elif image1 is not None:
            image = image1.to(dev)
        else:  # a keyframe without its image (stand-ins): black
            image = torch.zeros((*shape1, 3), dtype=torch.uint8, device=dev)

        pred = TwoViewPrediction(
            X_cam=fields1["pts3d"], C=fields1["conf"], camera=cam1,
            image=image, D=fields1["desc"], Q=fields1["desc_conf"],
            index=int(index1), stamp=float(stamp),
        )
        if fields2 is not None:
            pred.X_other, pred.C_other = fields2["pts3d"], fields2["conf"]
            pred.D_other, pred.Q_other = fields2["desc"], fields2["desc_conf"]
            pred.other_index = int(index2)
        return pred

    def predict(self, frame: Frame, keyframe=None) -> TwoViewPrediction:
        """Decode (``frame``, ``keyframe``) (the frame with itself when ``keyframe`` is None).

        Returns:
            :class:`TwoViewPrediction` at the network resolution (e.g. 512x384 for 640x480
            input): ``X_cam`` (H, W, 3) frame points, ``X_other`` keyframe points in the
            frame's camera, descriptors and confidences of both views.
        """
        ready = self._take_prefetched(frame, keyframe)
        if ready is not None:
            return ready
        e1 = self._encode(frame)
        if keyframe is None:
            return self._decode(e1, e1, frame.index, frame.index, frame.stamp, other=False)
        self.on_keyframe(keyframe.frame_index)
        e2 = e1 if keyframe.frame_index == frame.index else self._cached(keyframe.frame_index)
        return self._decode(e1, e2, frame.index, keyframe.frame_index, frame.stamp, other=True)

    # ------------------------------------------------------------------ pipelining
    def prefetch(self, frame: Frame, keyframe=None) -> None:
        """Start the network on ``frame`` (encoder, and the decoder against ``keyframe``) in a
        background thread, on its own CUDA stream, while the engine still works on the previous
        frame; the next :meth:`predict` of that frame (and keyframe) takes the result.

        Pipelining overlaps the network (GPU-bound, a few graph launches) with the engine's
        tracking of the previous frame (launch-bound Python): throughput approaches
        ``max(network, engine)`` instead of their sum. The decode is speculative: when the
        engine asks for another keyframe (the previous frame became one), only the encoder
        work is reused. Without CUDA (or ``mono.pipeline`` off) this does nothing.
        """
        if not (self.pipeline and (self.device.type == "cuda" or self._pipeline_on_cpu)):
            return
        with self._lock:
            if self._pending is not None:
                return  # one frame in flight at a time
            kf_index = None if keyframe is None else int(keyframe.frame_index)
            done = threading.Event()
            self._pending = (int(frame.index), kf_index, done, [None])
        self._pool_submit(frame, keyframe, kf_index, done)

    def _pool_submit(self, frame: Frame, keyframe, kf_index, done: threading.Event) -> None:
        if self._worker is None:
            import concurrent.futures

            self._worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="mast3r-prefetch")
            if self.device.type == "cuda":
                self._side_stream = torch.cuda.Stream(device=self.device)
        slot = self._pending[3]
        cuda = self._side_stream is not None

        def work():
            e1 = self._encode(frame)
            pred = None
            if kf_index is not None:
                with self._lock:
                    hit = self._tokens.get(kf_index)
                if hit is not None:
                    pred = self._decode(e1, hit, frame.index, kf_index, frame.stamp, other=True)
            return e1, pred

        def job() -> None:
            try:
                if cuda:
                    main = torch.cuda.current_stream(self.device)
                    with torch.cuda.stream(self._side_stream):
                        self._side_stream.wait_stream(main)
                        e1, pred = work()
                        for t in _tensors(pred) + [e1[0]]:
                            t.record_stream(main)  # freed later by the main stream's work
                    self._side_stream.synchronize()
                else:
                    _, pred = work()
                slot[0] = pred
            except Exception as exc:  # noqa: BLE001 - predict() recomputes; say why once
                if not self._prefetch_warned:
                    self._prefetch_warned = True
                    log.warning("MASt3R prefetch failed (%s): computing frames when they are asked for", exc)
            finally:
                done.set()

        self._worker.submit(job)

    def _take_prefetched(self, frame: Frame, keyframe) -> Optional[TwoViewPrediction]:
        """The prefetched prediction of (frame, keyframe) if one was started (waits for it)."""
        with self._lock:
            pending = self._pending
        if pending is None:
            return None
        index, kf_index, done, slot = pending
        if index != int(frame.index):
            if done.is_set():  # a stale prefetch (frame skipped): drop it
                with self._lock:
                    self._pending = None
            return None
        done.wait()
        with self._lock:
            self._pending = None
        want = None if keyframe is None else int(keyframe.frame_index)
        pred = slot[0]
        if pred is None or want != kf_index:
            return None  # encoder tokens are cached: predict() decodes the right pair
        self.on_keyframe(kf_index)
        return pred

    def close(self) -> None:
        """Stop the prefetch thread (idempotent)."""
        if self._worker is not None:
            self._worker.shutdown(wait=True)
            self._worker = None

    def predict_keyframes(self, kf_a, kf_b) -> TwoViewPrediction:
        """Decode two keyframes: view 1 = ``kf_a``, view 2 = ``kf_b`` (points in a's camera)."""
        ea, eb = self._cached(kf_a.frame_index), self._cached(kf_b.frame_index)
        return self._decode(ea, eb, kf_a.frame_index, kf_b.frame_index, kf_a.stamp, other=True,
                            image1=getattr(kf_a, "image", None))
