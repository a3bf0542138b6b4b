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

Without a network object the weights are loaded from ``mono.checkpoint`` (our
implementation of the network, :mod:`recon_slam.models.mast3r`); with no checkpoint the
constructor fails with :data:`CHECKPOINT_HELP` (what to pass and where to get it).
"""

from __future__ import annotations

import dataclasses
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
        self.cache_frames = int(cache_frames)
        self.token_dtype = token_dtype
        # frame index -> (tokens, (h, w), prepared image or None once a keyframe, camera)
        self._tokens: "OrderedDict[int, tuple[torch.Tensor, tuple[int, int], Optional[np.ndarray], PinholeCamera]]" = \
            OrderedDict()
        self._pinned: set[int] = set()
        self._lock = threading.Lock()

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
        with torch.inference_mode():
            try:  # tokens are cached in half precision (half the memory)
                tok = self.network.encode(x, out_dtype=self.token_dtype) if self.token_dtype is not None \
                    else self.network.encode(x)
            except TypeError:  # a network without out_dtype
                tok = self.network.encode(x)
        if isinstance(tok, (tuple, list)):
            tok = tok[0]
        if self.token_dtype is not None and tok.is_floating_point() and tok.dtype != self.token_dtype:
            tok = tok.to(self.token_dtype)
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
        with torch.inference_mode():
            out = self.network.decode(tok1, tok2, shape1)
        v1, v2 = _field(out, "view1"), _field(out, "view2")
        dev = self.device

        def first(t):
            return t[0].to(device=dev, dtype=torch.float32).contiguous()

        if crop1 is not None:
            image = torch.from_numpy(crop1).to(dev)
        elif image1 is not None:
            image = image1.to(dev)
        else:  # a keyframe without its image (stand-ins): black
            image = torch.zeros((*shape1, 3), dtype=torch.uint8, device=dev)

        pred = TwoViewPrediction(
            X_cam=first(_field(v1, "pts3d")), C=first(_field(v1, "conf")), camera=cam1,
            image=image, D=first(_field(v1, "desc")), Q=first(_field(v1, "desc_conf")),
            index=int(index1), stamp=float(stamp),
        )
        if other:
            pred.X_other, pred.C_other = first(_field(v2, "pts3d")), first(_field(v2, "conf"))
            pred.D_other, pred.Q_other = first(_field(v2, "desc")), first(_field(v2, "desc_conf"))
            pred.other_index = int(index2)
        return pred

    def predict(self, frame: Frame, keyframe=None) -> TwoViewPrediction:
        """Decode (``frame``, ``keyframe``) (the frame with itself when ``keyframe`` is None).

        Returns:
            :class:`TwoViewPrediction` at the network resolution (e.g. 512x384 for 640x480
            input): ``X_cam`` (H, W, 3) frame points, ``X_other`` keyframe points in the
            frame's camera, descriptors and confidences of both views.
        """
        e1 = self._encode(frame)
        if keyframe is None:
            return self._decode(e1, e1, frame.index, frame.index, frame.stamp, other=False)
        self.on_keyframe(keyframe.frame_index)
        e2 = e1 if keyframe.frame_index == frame.index else self._cached(keyframe.frame_index)
        return self._decode(e1, e2, frame.index, keyframe.frame_index, frame.stamp, other=True)

    def predict_keyframes(self, kf_a, kf_b) -> TwoViewPrediction:
        """Decode two keyframes: view 1 = ``kf_a``, view 2 = ``kf_b`` (points in a's camera)."""
        ea, eb = self._cached(kf_a.frame_index), self._cached(kf_b.frame_index)
        return self._decode(ea, eb, kf_a.frame_index, kf_b.frame_index, kf_a.stamp, other=True,
                            image1=getattr(kf_a, "image", None))
