"""Transformer building blocks of the MASt3R network.

Tokens are ``(B, N, C)`` with ``N = h * w`` patches in row-major order (row ``y`` of the
patch grid first, then column ``x``). Attention uses
:func:`torch.nn.functional.scaled_dot_product_attention`; positions enter through a 2D
rotary embedding: the first half of every head's channels is rotated by the patch row,
the second half by the patch column.

Attribute names of the modules (``qkv``, ``proj``, ``projq``, ``norm_y``, ``fc1`` ...)
follow the released checkpoint layout so that its state_dict loads unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

RopeTables = tuple[torch.Tensor, torch.Tensor]


# ---------------------------------------------------------------------- rotary embedding
class Rope2D:
    """Cached 2D rotary tables for patch grids (not a module: nothing is saved in state_dict).

    ``tables(h, w, head_dim, device, dtype)`` returns ``(cos, sin)``, each ``(h*w, head_dim)``:
    channels ``[0, head_dim/2)`` use the patch row, ``[head_dim/2, head_dim)`` the column;
    within each half, channel ``i`` and ``i + head_dim/4`` form a rotation pair with
    frequency ``base ** (-4 i / head_dim)``. ``sin`` carries the sign of the rotation so
    that :func:`apply_rope` is one multiply-add.
    """

    def __init__(self, base: float = 100.0) -> None:
        self.base = float(base)
        self._cache: dict[tuple, RopeTables] = {}

    def _axis_angles(self, n: int, half_dim: int, device: torch.device) -> torch.Tensor:
        """(n, half_dim) angles of positions 0..n-1 for one axis (float32)."""
        exponents = torch.arange(0, half_dim, 2, device=device, dtype=torch.float32) / half_dim
        inv_freq = 1.0 / (self.base**exponents)  # (half_dim/2,)
        steps = torch.arange(n, device=device, dtype=torch.float32)
        angles = steps[:, None] * inv_freq[None, :]
        return torch.cat((angles, angles), dim=-1)

    def tables(self, h: int, w: int, head_dim: int, device: torch.device, dtype: torch.dtype) -> RopeTables:
        """``(cos, sin)`` tables ``(h*w, head_dim)`` for an ``h x w`` patch grid (cached)."""
        key = (h, w, head_dim, str(device), dtype)
        found = self._cache.get(key)
        if found is not None:
            return found
        half = head_dim // 2
        rows = self._axis_angles(h, half, device)  # (h, half)
        cols = self._axis_angles(w, half, device)  # (w, half)
        ang = torch.cat((rows[:, None, :].expand(h, w, half), cols[None, :, :].expand(h, w, half)), dim=-1)
        ang = ang.reshape(h * w, head_dim)
        cos, sin = ang.cos(), ang.sin()
        sign = torch.ones(head_dim, device=device, dtype=torch.float32)
        sign.view(2, 2, head_dim // 4)[:, 0] = -1.0  # first quarter of each half rotates by -sin
        tables = (cos.to(dtype).contiguous(), (sin * sign).to(dtype).contiguous())
        self._cache[key] = tables
        return tables

    def clear(self) -> None:
        """Forget every cached table (e.g. after moving the model)."""
        self._cache.clear()


def apply_rope(x: torch.Tensor, tables: RopeTables) -> torch.Tensor:
    """Rotate ``x`` ``(B, heads, N, head_dim)`` by the positions of ``tables`` ``(N, head_dim)``."""
    cos, sin = tables
    if cos.dtype != x.dtype:
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    d = x.shape[-1]
    # swap the two quarters of each half: [a, b | c, d] -> [b, a | d, c]
    swapped = x.unflatten(-1, (2, 2, d // 4)).flip(-2).flatten(-3)
    return x * cos + swapped * sin


def grid_positions(h: int, w: int, device: torch.device | str | None = None) -> torch.Tensor:
    """``(h*w, 2)`` int64 patch coordinates ``(row, col)`` in token order."""
    rows = torch.arange(h, device=device).repeat_interleave(w)
    cols = torch.arange(w, device=device).repeat(h)
    return torch.stack((rows, cols), dim=-1)


# ---------------------------------------------------------------------- layers
class PatchEmbed(nn.Module):
    """Image ``(B, 3, H, W)`` -> tokens ``(B, (H/p)(W/p), C)`` by a stride-``p`` convolution."""

    def __init__(self, embed_dim: int, patch_size: int = 16, in_chans: int = 3) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        _, _, H, W = img.shape
        p = self.patch_size
        if H % p or W % p:
            raise ValueError(f"image size {H}x{W} is not a multiple of the patch size {p}: crop it first")
        x = self.proj(img)  # (B, C, h, w)
        # the residual stream keeps the weights' dtype (float32) even under autocast
        return x.flatten(2).transpose(1, 2).to(self.proj.weight.dtype)


class FeedForward(nn.Module):
    """Two-layer MLP with exact GELU: ``(..., dim) -> (..., out_dim)``."""

    def __init__(self, dim: int, hidden: int, out_dim: int | None = None) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, out_dim or dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class SelfAttention(nn.Module):
    """Multi-head self-attention with 2D rotary positions on queries and keys."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rope: RopeTables | None) -> torch.Tensor:
        """``x`` ``(B, N, C)`` -> ``(B, N, C)``."""
        B, N, C = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, heads, N, head_dim)
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


class CrossAttention(nn.Module):
    """Multi-head attention of queries ``(B, Nq, C)`` to a memory ``(B, Nk, C)``, rotary positions."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.projq = nn.Linear(dim, dim)
        self.projk = nn.Linear(dim, dim)
        self.projv = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        B, N, C = t.shape
        return t.view(B, N, self.num_heads, C // self.num_heads).transpose(1, 2)

    def forward(
        self, x: torch.Tensor, mem: torch.Tensor, rope_x: RopeTables | None, rope_mem: RopeTables | None
    ) -> torch.Tensor:
        """``x`` ``(B, Nq, C)`` attends to ``mem`` ``(B, Nk, C)`` -> ``(B, Nq, C)``."""
        B, N, C = x.shape
        q = self._heads(self.projq(x))
        k = self._heads(self.projk(mem))
        v = self._heads(self.projv(mem))
        if rope_x is not None:
            q, k = apply_rope(q, rope_x), apply_rope(k, rope_mem)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


class EncoderBlock(nn.Module):
    """Pre-norm ViT block: ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, eps: float = 1e-6) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = SelfAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = FeedForward(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, rope: RopeTables | None) -> torch.Tensor:
        """``x`` ``(B, N, C)`` -> ``(B, N, C)``."""
        x = x + self.attn(self.norm1(x), rope)
        return x + self.mlp(self.norm2(x))


class DecoderBlock(nn.Module):
    """Decoder block of one view: self-attention, cross-attention to the other view, MLP."""

    def __init__(
        self, dim: int, num_heads: int, mlp_ratio: float = 4.0, eps: float = 1e-6, norm_mem: bool = True
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = SelfAttention(dim, num_heads)
        self.cross_attn = CrossAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.norm3 = nn.LayerNorm(dim, eps=eps)
        self.mlp = FeedForward(dim, int(dim * mlp_ratio))
        self.norm_y = nn.LayerNorm(dim, eps=eps) if norm_mem else nn.Identity()

    def forward(
        self, x: torch.Tensor, other: torch.Tensor, rope_x: RopeTables | None, rope_other: RopeTables | None
    ) -> torch.Tensor:
        """Tokens of this view ``x`` ``(B, N, C)`` given the other view's ``(B, M, C)`` -> ``(B, N, C)``."""
        x = x + self.attn(self.norm1(x), rope_x)
        mem = self.norm_y(other)
        x = x + self.cross_attn(self.norm2(x), mem, rope_x, rope_other)
        return x + self.mlp(self.norm3(x))
