"""The MASt3R network: ViT encoder, two-branch cross-attending decoder, per-view heads.

Typical SLAM use::

    net = load_mast3r("MASt3R_ViTLarge_BaseDecoder_512_catmlpdpt_metric.pth", device="cuda")
    net.set_precision(torch.bfloat16)                    # autocast on CUDA; heads stay float32
    tok_kf, _ = net.encode(img_kf, out_dtype=torch.float16)   # cache per keyframe
    tok_f, _ = net.encode(img_f)
    pred = net.decode(tok_f, tok_kf, img_f.shape[-2:])   # frame = view 1, keyframe = view 2
    pred.view1.pts3d   # (B, H, W, 3) frame points in the frame's camera
    pred.view2.pts3d   # (B, H, W, 3) keyframe points, also in the frame's camera

Images are ``(B, 3, H, W)`` normalised to ``[-1, 1]`` (see ``preprocess.py``), ``H`` and ``W``
multiples of 16; portrait and landscape images are both processed in their own
orientation. Tokens are ``(B, N, C_enc)`` with ``N = (H/16)(W/16)`` patches, row-major.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from recon_slam.models.mast3r.config import MASt3RConfig
from recon_slam.models.mast3r.heads import PointDescHead, ViewPrediction
from recon_slam.models.mast3r.layers import DecoderBlock, EncoderBlock, PatchEmbed, Rope2D, grid_positions


_AUTOCAST_DEVICES = ("cuda", "cpu", "xpu", "mps", "hpu")


@dataclass
class PairPrediction:
    """Outputs of one decoder pass on (view 1, view 2).

    Attributes:
        view1: view 1's points in view 1's camera frame, confidences, descriptors.
        view2: view 2's points **in view 1's camera frame** (``pts3d_in_other_view``),
            confidences and descriptors of view 2's pixels.
    """

    view1: ViewPrediction
    view2: ViewPrediction


def _as_hw(shape) -> tuple[int, int]:
    """(H, W) from a tuple / torch.Size / (2,) tensor of the image size in pixels."""
    if isinstance(shape, torch.Tensor):
        shape = shape.reshape(-1)[-2:].tolist()
    h, w = (int(v) for v in tuple(shape)[-2:])
    return h, w


class MASt3RNet(nn.Module):
    """Asymmetric MASt3R network; the state_dict layout is the released checkpoint's.

    Build with ``MASt3RNet(MASt3RConfig.from_args(args_string))``; building under
    ``torch.device("meta")`` allocates nothing (use :func:`load_mast3r` to fill weights).
    """

    def __init__(self, cfg: MASt3RConfig) -> None:
        super().__init__()
        self.cfg = cfg
        p, eps = cfg.patch_size, cfg.norm_eps
        # Training-time mask token, unused at inference but part of the checkpoint.
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.dec_embed_dim))
        self.patch_embed = PatchEmbed(cfg.enc_embed_dim, p)
        self.enc_blocks = nn.ModuleList(
            EncoderBlock(cfg.enc_embed_dim, cfg.enc_num_heads, cfg.mlp_ratio, eps) for _ in range(cfg.enc_depth)
        )
        self.enc_norm = nn.LayerNorm(cfg.enc_embed_dim, eps=eps)
        self.decoder_embed = nn.Linear(cfg.enc_embed_dim, cfg.dec_embed_dim)
        self.dec_blocks = nn.ModuleList(self._decoder_branch())
        self.dec_norm = nn.LayerNorm(cfg.dec_embed_dim, eps=eps)
        self.dec_blocks2 = nn.ModuleList(self._decoder_branch())
        self.downstream_head1 = PointDescHead(cfg)
        self.downstream_head2 = PointDescHead(cfg)
        self.rope = Rope2D(cfg.rope_base)
        self._pos_cache: dict[tuple, torch.Tensor] = {}
        self.amp_dtype: torch.dtype | None = None  # autocast dtype of encoder/decoder; None = float32
        self.head_dtype: torch.dtype | None = None  # None = heads in float32 (as the reference)
        self.amp_cache = True  # autocast weight-cast cache; graph capture turns it off

    def _decoder_branch(self) -> list[DecoderBlock]:
        cfg = self.cfg
        return [
            DecoderBlock(cfg.dec_embed_dim, cfg.dec_num_heads, cfg.mlp_ratio, cfg.norm_eps, cfg.norm_mem_in_decoder)
            for _ in range(cfg.dec_depth)
        ]

    # ------------------------------------------------------------------ precision
    def set_precision(self, amp_dtype: torch.dtype | None, head_dtype: torch.dtype | None = None) -> "MASt3RNet":
        """Run encoder/decoder under autocast to ``amp_dtype`` (``torch.bfloat16`` / ``float16``;
        ``None`` = float32). Heads run in ``head_dtype`` (``None`` = float32, the reference)."""
        self.amp_dtype = amp_dtype
        self.head_dtype = head_dtype
        return self

    def compile_blocks(self) -> list[nn.Module]:
        """``torch.compile`` (in place: module names and state_dict keys unchanged) the
        encoder blocks, both decoder branches and the two DPT heads, with static shapes.

        Compilation is lazy (it happens at the next call of each module, ~30 s for the
        ViT-L at one input size on an H200; every new input shape compiles again);
        :meth:`uncompile_blocks` undoes it (the compiled code stays cached: CUDA graphs
        captured meanwhile keep replaying it). Returns the compiled modules."""
        mods = [*self.enc_blocks, *self.dec_blocks, *self.dec_blocks2, self.downstream_head1.dpt,
                self.downstream_head2.dpt]
        for m in mods:
            m.compile(dynamic=False)
        return mods

    def uncompile_blocks(self) -> None:
        """Back to plain eager modules (after :meth:`compile_blocks`, e.g. when compiling failed)."""
        for m in self.modules():
            if getattr(m, "_compiled_call_impl", None) is not None:
                m._compiled_call_impl = None

    def _autocast(self, device: torch.device, dtype: torch.dtype | None):
        if dtype is None or device.type not in _AUTOCAST_DEVICES:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=dtype, cache_enabled=self.amp_cache)

    def _compute_dtype(self, device: torch.device) -> torch.dtype:
        """dtype of attention inputs: the autocast dtype if active, else the weights' dtype."""
        if self.amp_dtype is not None and device.type in _AUTOCAST_DEVICES:
            return self.amp_dtype
        return self.decoder_embed.weight.dtype

    @property
    def device(self) -> torch.device:
        """Device of the weights."""
        return self.patch_embed.proj.weight.device

    def grid(self, image_hw) -> tuple[int, int]:
        """Patch grid ``(h, w)`` of an image of size ``image_hw`` = (H, W) pixels."""
        H, W = _as_hw(image_hw)
        p = self.cfg.patch_size
        if H % p or W % p:
            raise ValueError(f"image size {H}x{W} is not a multiple of the patch size {p}: crop it first")
        return H // p, W // p

    # ------------------------------------------------------------------ encoder
    def encode(self, img: torch.Tensor, out_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode images.

        Args:
            img: (B, 3, H, W) normalised images (``(rgb/255 - 0.5) / 0.5``), H, W multiples of 16.
            out_dtype: dtype of the returned tokens (e.g. ``torch.float16`` to cache keyframes at
                half the memory); default float32.

        Returns:
            tokens: (B, N, C_enc) encoder output after its final LayerNorm, N = (H/16)(W/16).
            pos: (B, N, 2) int64 patch coordinates (row, col) of each token.
        """
        h, w = self.grid(img.shape[-2:])
        device = img.device
        with self._autocast(device, self.amp_dtype):
            x = self.patch_embed(img.to(self.patch_embed.proj.weight.dtype))
            rope = self.rope.tables(h, w, self.cfg.enc_head_dim, device, self._compute_dtype(device))
            for block in self.enc_blocks:
                x = block(x, rope)
            x = self.enc_norm(x)
        tokens = x.to(out_dtype) if out_dtype is not None else x.float()
        return tokens, self._positions(h, w, device)[None].expand(img.shape[0], -1, -1)

    def _positions(self, h: int, w: int, device: torch.device) -> torch.Tensor:
        key = (h, w, str(device))
        pos = self._pos_cache.get(key)
        if pos is None:
            pos = self._pos_cache[key] = grid_positions(h, w, device)
        return pos

    # ------------------------------------------------------------------ decoder + heads
    def decode_tokens(
        self, tokens1: torch.Tensor, tokens2: torch.Tensor, grid1: tuple[int, int], grid2: tuple[int, int]
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Run both decoder branches.

        Args:
            tokens1, tokens2: (B, N1, C_enc), (B, N2, C_enc) encoder tokens (any float dtype).
            grid1, grid2: patch grids (h, w) of the two views.

        Returns:
            For each view, the 4 token maps the heads read: encoder tokens (float32) and the
            outputs of decoder blocks d/2, 3d/4 and d (the last after ``dec_norm``).
        """
        cfg = self.cfg
        hooks = cfg.dpt_hooks
        device = tokens1.device
        stream = self.decoder_embed.weight.dtype  # residual stream dtype (float32 unless cast)
        t1, t2 = tokens1.to(stream), tokens2.to(stream)
        keep1, keep2 = [t1], [t2]
        with self._autocast(device, self.amp_dtype):
            dtype = self._compute_dtype(device)
            rope1 = self.rope.tables(*grid1, cfg.dec_head_dim, device, dtype)
            rope2 = rope1 if grid2 == grid1 else self.rope.tables(*grid2, cfg.dec_head_dim, device, dtype)
            f1 = self.decoder_embed(t1).to(stream)
            f2 = self.decoder_embed(t2).to(stream)
            for index, (block1, block2) in enumerate(zip(self.dec_blocks, self.dec_blocks2), start=1):
                f1, f2 = block1(f1, f2, rope1, rope2), block2(f2, f1, rope2, rope1)
                if index in hooks[1:3]:
                    keep1.append(f1)
                    keep2.append(f2)
            keep1.append(self.dec_norm(f1))
            keep2.append(self.dec_norm(f2))
        return keep1, keep2

    def _run_head(self, head: PointDescHead, maps: list[torch.Tensor], grid: tuple[int, int]) -> ViewPrediction:
        device = maps[0].device
        if self.head_dtype is None or self.head_dtype == torch.float32:
            ctx = (
                torch.autocast(device_type=device.type, enabled=False)
                if device.type in _AUTOCAST_DEVICES
                else contextlib.nullcontext()
            )
            head_weights = head.dpt.head[0].weight.dtype
            maps = [m.to(head_weights) for m in maps]
            with ctx:
                pred = head(maps, grid)
        else:
            with self._autocast(device, self.head_dtype):
                pred = head(maps, grid)
        return pred.to(torch.float32)  # no copy when already float32

    def decode(
        self, tokens1: torch.Tensor, tokens2: torch.Tensor, shape1, shape2=None
    ) -> PairPrediction:
        """Decode pairs of encoded views (batched: B pairs at once).

        Args:
            tokens1: (B, N1, C_enc) tokens of view 1 (the frame whose camera is the reference).
            tokens2: (B, N2, C_enc) tokens of view 2; a batch of 1 on either side is broadcast
                to the other's batch (one frame against B keyframes, or B frames against one).
            shape1: (H, W) pixel size of view 1; ``shape2`` of view 2 (default: ``shape1``).

        Returns:
            :class:`PairPrediction`; every tensor float32 at (B, H, W[, C]); ``view2.pts3d`` is
            expressed in view 1's camera frame.
        """
        grid1 = self.grid(shape1)
        grid2 = self.grid(shape2 if shape2 is not None else shape1)
        for tokens, grid, name in ((tokens1, grid1, "tokens1"), (tokens2, grid2, "tokens2")):
            if tokens.ndim != 3 or tokens.shape[1] != grid[0] * grid[1] or tokens.shape[2] != self.cfg.enc_embed_dim:
                raise ValueError(
                    f"{name} has shape {tuple(tokens.shape)}; expected (B, {grid[0] * grid[1]}, "
                    f"{self.cfg.enc_embed_dim}) for that image size"
                )
        b1, b2 = tokens1.shape[0], tokens2.shape[0]
        if b1 != b2:
            if b1 == 1:
                tokens1 = tokens1.expand(b2, -1, -1)
            elif b2 == 1:
                tokens2 = tokens2.expand(b1, -1, -1)
            else:
                raise ValueError(f"batch sizes {b1} and {b2} differ (only a batch of 1 is broadcast)")
        maps1, maps2 = self.decode_tokens(tokens1, tokens2, grid1, grid2)
        return PairPrediction(
            view1=self._run_head(self.downstream_head1, maps1, grid1),
            view2=self._run_head(self.downstream_head2, maps2, grid2),
        )

    def decode_symmetric(self, tokens_a: torch.Tensor, tokens_b: torch.Tensor, shape_a, shape_b=None):
        """Decode (a, b) and (b, a) in one batched pass (same image sizes required when batched).

        Args:
            tokens_a, tokens_b: (B, N, C_enc) tokens of two views.

        Returns:
            ``(ab, ba)``: :class:`PairPrediction` of (a, b) (points in a's frame) and of (b, a)
            (points in b's frame).
        """
        shape_b = shape_a if shape_b is None else shape_b
        if self.grid(shape_a) != self.grid(shape_b):
            return self.decode(tokens_a, tokens_b, shape_a, shape_b), self.decode(tokens_b, tokens_a, shape_b, shape_a)
        if tokens_a.shape[0] != tokens_b.shape[0]:
            n = max(tokens_a.shape[0], tokens_b.shape[0])
            tokens_a, tokens_b = tokens_a.expand(n, -1, -1), tokens_b.expand(n, -1, -1)
        B = tokens_a.shape[0]
        both = self.decode(torch.cat((tokens_a, tokens_b)), torch.cat((tokens_b, tokens_a)), shape_a)
        ab = PairPrediction(both.view1[0:B], both.view2[0:B])
        ba = PairPrediction(both.view1[B:], both.view2[B:])
        return ab, ba

    def forward(self, img1: torch.Tensor, img2: torch.Tensor) -> PairPrediction:
        """Full pass on image pairs ``(B, 3, H1, W1)``, ``(B, 3, H2, W2)`` -> :class:`PairPrediction`.

        Both views are encoded in one batch when their sizes agree.
        """
        if img1.shape == img2.shape:
            tokens, _ = self.encode(torch.cat((img1, img2)))
            tokens1, tokens2 = tokens.chunk(2)
        else:
            tokens1, _ = self.encode(img1)
            tokens2, _ = self.encode(img2)
        return self.decode(tokens1, tokens2, img1.shape[-2:], img2.shape[-2:])

    # ------------------------------------------------------------------ helpers
    def token_bytes(self, image_hw: Sequence[int], dtype: torch.dtype = torch.float16) -> int:
        """Bytes of the cached encoder tokens of one image of size (H, W) in ``dtype``."""
        h, w = self.grid(image_hw)
        return h * w * self.cfg.enc_embed_dim * torch.finfo(dtype).bits // 8
