"""CUDA-graph capture of MASt3R calls for fixed image sizes (removes kernel-launch overhead).

A captured call copies its inputs into static buffers, replays the recorded kernels and
returns **static output tensors that the next call overwrites** (clone what you keep).
Shapes, dtypes, batch sizes and the network's precision are frozen at capture time.

    step = capture_frame_step(net, (384, 512), n_keyframes=1)
    tokens, pred = step(img, keyframe_tokens)      # img (1, 3, 384, 512), tokens (1, N, C) fp16
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from recon_slam.models.mast3r.network import MASt3RNet


class CapturedCall:
    """``fn(*inputs)`` recorded once in a CUDA graph; call it with tensors of the same shapes.

    Args:
        fn: function of tensors returning tensors / tuples / dataclasses of tensors.
        example_inputs: tensors fixing shapes, dtypes and device (copied into static buffers).
        warmup: eager runs on a side stream before capture (fills caches, picks kernels).
    """

    def __init__(self, fn: Callable[..., Any], example_inputs: Sequence[torch.Tensor], warmup: int = 3) -> None:
        if not torch.cuda.is_available():
            raise RuntimeError("CUDA graphs need a CUDA device")
        self.fn = fn
        self.static_inputs = [t.detach().clone() for t in example_inputs]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(max(1, warmup)):
                fn(*self.static_inputs)
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: work other threads launch meanwhile (e.g. a backend) does not break
        # the capture; the caller keeps those threads off this network while capturing
        with torch.no_grad(), torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.static_outputs = fn(*self.static_inputs)

    def __call__(self, *inputs: torch.Tensor) -> Any:
        """Copy ``inputs`` into the static buffers, replay, return the static outputs."""
        if len(inputs) != len(self.static_inputs):
            raise ValueError(f"expected {len(self.static_inputs)} inputs, got {len(inputs)}")
        for static, new in zip(self.static_inputs, inputs):
            if static.shape != new.shape:
                raise ValueError(f"input shape {tuple(new.shape)} differs from the captured {tuple(static.shape)}")
            static.copy_(new, non_blocking=True)
        self.graph.replay()
        return self.static_outputs


class _CaptureSettings:
    """Context: the net's autocast precision for capture (weight-cast cache off, as graphs require)."""

    def __init__(self, net: MASt3RNet, amp_dtype: torch.dtype | None) -> None:
        self.net, self.amp_dtype = net, amp_dtype

    def __enter__(self) -> None:
        self.saved = (self.net.amp_dtype, self.net.head_dtype, self.net.amp_cache)
        self.net.amp_dtype = self.amp_dtype
        self.net.amp_cache = False

    def __exit__(self, *exc) -> None:
        self.net.amp_dtype, self.net.head_dtype, self.net.amp_cache = self.saved


def _token_shape(net: MASt3RNet, image_hw: Sequence[int]) -> tuple[int, int]:
    h, w = net.grid(image_hw)
    return h * w, net.cfg.enc_embed_dim


def capture_encoder(
    net: MASt3RNet, image_hw: Sequence[int], batch: int = 1, amp_dtype: torch.dtype | None = torch.bfloat16,
    out_dtype: torch.dtype = torch.float16,
) -> CapturedCall:
    """Captured ``img (batch, 3, H, W) -> tokens (batch, N, C_enc)`` in ``out_dtype``."""
    H, W = (int(v) for v in image_hw)

    def run(img: torch.Tensor) -> torch.Tensor:
        return net.encode(img, out_dtype=out_dtype)[0]

    with _CaptureSettings(net, amp_dtype):
        return CapturedCall(run, [torch.zeros(batch, 3, H, W, device=net.device)])


def capture_decoder(
    net: MASt3RNet, image_hw: Sequence[int], batch: int = 1, amp_dtype: torch.dtype | None = torch.bfloat16,
    token_dtype: torch.dtype = torch.float16,
) -> CapturedCall:
    """Captured ``(tokens1, tokens2) (batch, N, C_enc) -> PairPrediction`` (both views of size H x W)."""
    n, c = _token_shape(net, image_hw)
    hw = tuple(int(v) for v in image_hw)

    def run(t1: torch.Tensor, t2: torch.Tensor):
        return net.decode(t1, t2, hw)

    example = [torch.zeros(batch, n, c, device=net.device, dtype=token_dtype) for _ in range(2)]
    with _CaptureSettings(net, amp_dtype):
        return CapturedCall(run, example)


def capture_frame_step(
    net: MASt3RNet, image_hw: Sequence[int], n_keyframes: int = 1, amp_dtype: torch.dtype | None = torch.bfloat16,
    token_dtype: torch.dtype = torch.float16,
) -> CapturedCall:
    """Captured tracking step: encode one frame and decode it against ``n_keyframes`` cached keyframes.

    Call with ``img (1, 3, H, W)`` and ``keyframe_tokens (n_keyframes, N, C_enc)``; returns
    ``(frame_tokens (1, N, C_enc) in token_dtype, PairPrediction with batch n_keyframes)``,
    the frame being view 1 (all points in the frame's camera).
    """
    H, W = (int(v) for v in image_hw)
    n, c = _token_shape(net, image_hw)

    def run(img: torch.Tensor, kf_tokens: torch.Tensor):
        tokens, _ = net.encode(img, out_dtype=token_dtype)
        return tokens, net.decode(tokens, kf_tokens, (H, W))

    example = [
        torch.zeros(1, 3, H, W, device=net.device),
        torch.zeros(n_keyframes, n, c, device=net.device, dtype=token_dtype),
    ]
    with _CaptureSettings(net, amp_dtype):
        return CapturedCall(run, example)
