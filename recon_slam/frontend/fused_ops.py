"""GPU-friendly forms of two hot spots of monocular tracking.

* :func:`gram_splitk`: the Gauss-Newton sums ``J W J^T`` / ``J W r`` over hundreds of
  thousands of residual rows. Written as one matrix product with a 7-wide output and a huge
  inner dimension, cuBLAS picks a small-N kernel that runs the whole inner dimension in
  few threads (3.2 ms per call on an H200 for 2 x 196,608 rows,
  ``benchmarks/results/mono_engine_cuda_profile_device.txt``). Splitting the inner
  dimension into chunks turns it into a batch of small products plus a short sum.
* :func:`refine_descriptors`: the coarse-to-fine dilated-window descriptor search of the
  matcher (for every match, ``(2 radius + 1)^2`` candidate pixels per dilation scored by a
  descriptor dot product). In torch it gathers every candidate's descriptor into an
  ``(N, K, F)`` tensor (hundreds of MB per dilation at 512x384); on CUDA a Triton kernel
  reads the candidates straight from the descriptor image and keeps only the best score,
  for all dilations in one launch. Elsewhere (CPU, no Triton) the torch form runs.

Both give the same results as the torch reference (the kernel: the same candidate order
and first-maximum tie rule as ``argmax``); tests compare them on the CPU (Triton's
interpreter) and on CUDA.
"""

from __future__ import annotations

import logging
import os
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

__all__ = ["gram_splitk", "refine_descriptors", "refine_descriptors_torch", "triton_available"]

log = logging.getLogger(__name__)


def gram_splitk(P: torch.Tensor, Q: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    """Batched ``P @ Q^T`` over a long inner dimension, summed in chunks.

    Args:
        P: (B, m, K); Q: (B, n, K) (same dtype and device; any strides).
        chunk: inner-dimension chunk length (K is zero-padded to a multiple of it).

    Returns:
        (B, m, n) ``sum_k P[b, i, k] Q[b, j, k]``.
    """
    B, m, K = P.shape
    n = Q.shape[1]
    if K <= chunk:
        return torch.matmul(P, Q.transpose(1, 2))
    c = -(-K // chunk)
    pad = c * chunk - K
    if pad:
        P = F.pad(P, (0, pad))
        Q = F.pad(Q, (0, pad))
    Pc = P.reshape(B, m, c, chunk).transpose(1, 2)  # (B, c, m, chunk)
    Qc = Q.reshape(B, n, c, chunk).permute(0, 2, 3, 1)  # (B, c, chunk, n)
    return torch.matmul(Pc, Qc).sum(1)


# ---------------------------------------------------------------------------- descriptor search
def _usable_dilations(radius: int, dilations: Sequence[int], H: int, W: int) -> list[int]:
    """The dilations whose window fits the image (``2 radius dil < min(H, W)``), in order."""
    return [int(d) for d in dilations if 2 * radius * int(d) < W and 2 * radius * int(d) < H]


def refine_descriptors_torch(D_dst: torch.Tensor, d_src: torch.Tensor, u: torch.Tensor, v: torch.Tensor,
                             radius: int, dilations: Sequence[int],
                             dtype: Optional[torch.dtype] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference descriptor search in torch (every point; candidates gathered).

    For each dilation ``d`` in order the window ``p + d (du, dv)``, ``du, dv`` in
    ``[-radius, radius]`` (``dv`` outer), is shifted inside the image (its centre clamped to
    ``[r d, size - 1 - r d]``) and the point moves to the candidate with the largest dot
    product ``<D_dst[candidate], d_src>`` (first maximum on ties).

    Args:
        D_dst: (H, W, F) destination descriptors; d_src: (N, F) source descriptors.
        u, v: (N,) integer destination pixels (inside the image).
        dtype: dtype of the gathered descriptors and scores (default ``D_dst``'s).

    Returns:
        (u, v): (N,) int32 refined pixels.
    """
    H, W, Fd = D_dst.shape
    dtype = dtype or D_dst.dtype
    flat = D_dst.reshape(H * W, Fd).to(dtype)
    d_col = d_src.to(dtype)[:, :, None]
    u, v = u.int(), v.int()
    n = u.shape[0]
    r = torch.arange(-radius, radius + 1, device=u.device, dtype=torch.int32)
    dv, du = torch.meshgrid(r, r, indexing="ij")
    off = (dv.reshape(-1) * W + du.reshape(-1))  # (K,)
    for dil in _usable_dilations(radius, dilations, H, W):
        m = radius * dil
        ci = (v.clamp(m, H - 1 - m) * W + u.clamp(m, W - 1 - m))[:, None] + dil * off  # (N, K)
        cand = flat.index_select(0, ci.reshape(-1)).reshape(n, -1, Fd)
        best = torch.bmm(cand, d_col)[..., 0].argmax(1)
        b = ci.gather(1, best[:, None])[:, 0]
        u, v = b % W, torch.div(b, W, rounding_mode="floor")
    return u.int(), v.int()


_TRITON = None  # (module, kernel) once built; False when unavailable


def triton_available() -> bool:
    """True when Triton imports and its kernels can be built (CUDA builds, or TRITON_INTERPRET=1)."""
    return _triton() is not None


def _triton():
    global _TRITON
    if _TRITON is None:
        try:
            import triton
            import triton.language as tl
        except Exception:  # noqa: BLE001 - not installed / broken install: torch path
            _TRITON = False
            return None

        @triton.jit
        def _refine_kernel(D, S, U, V, DIL, N, H, W, NDIL: tl.constexpr, FD: tl.constexpr, BF: tl.constexpr,
                           R: tl.constexpr, BN: tl.constexpr):
            pid = tl.program_id(0)
            rows = pid * BN + tl.arange(0, BN)
            rmask = rows < N
            cols = tl.arange(0, BF)
            cmask = cols < FD
            m2 = rmask[:, None] & cmask[None, :]
            s = tl.load(S + rows[:, None] * FD + cols[None, :], mask=m2, other=0.0).to(tl.float32)
            u = tl.load(U + rows, mask=rmask, other=0)
            v = tl.load(V + rows, mask=rmask, other=0)
            for i in range(NDIL):
                dil = tl.load(DIL + i)
                m = R * dil
                cu = tl.minimum(tl.maximum(u, m), W - 1 - m)
                cv = tl.minimum(tl.maximum(v, m), H - 1 - m)
                best = tl.full((BN,), float("-inf"), tl.float32)
                bu = cu
                bv = cv
                for k in range((2 * R + 1) * (2 * R + 1)):
                    dv = k // (2 * R + 1) - R
                    du = k % (2 * R + 1) - R
                    pu = cu + du * dil
                    pv = cv + dv * dil
                    idx = (pv * W + pu).to(tl.int64)
                    d = tl.load(D + idx[:, None] * FD + cols[None, :], mask=m2, other=0.0).to(tl.float32)
                    score = tl.sum(d * s, axis=1)
                    better = score > best
                    best = tl.where(better, score, best)
                    bu = tl.where(better, pu, bu)
                    bv = tl.where(better, pv, bv)
                u = bu
                v = bv
            tl.store(U + rows, u, mask=rmask)
            tl.store(V + rows, v, mask=rmask)

        _TRITON = (triton, _refine_kernel)
    return _TRITON or None


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def refine_descriptors(D_dst: torch.Tensor, d_src: torch.Tensor, p: torch.Tensor, active: torch.Tensor,
                       radius: int, dilations: Sequence[int], dtype: Optional[torch.dtype] = None,
                       backend: str = "auto") -> torch.Tensor:
    """Dilated-window descriptor refinement of every match (no compaction; graph-safe on CUDA).

    See :func:`refine_descriptors_torch` for the search; inactive points keep ``p``.

    Args:
        D_dst: (H, W, F) destination (frame) descriptors; d_src: (N, F) source descriptors.
        p: (N, 2) integer destination pixels ``(u, v)`` inside the image; active: (N,) bool.
        dtype: descriptor dtype read by the search (float16 halves the traffic; default
            ``D_dst``'s); the kernel accumulates in float32.
        backend: 'auto' (Triton on CUDA when available, or under ``TRITON_INTERPRET=1``;
            torch otherwise), 'triton' or 'torch'.

    Returns:
        (N, 2) long refined pixels.
    """
    H, W, Fd = D_dst.shape
    dils = _usable_dilations(radius, dilations, H, W)
    n = p.shape[0]
    use_triton = backend == "triton" or (
        backend == "auto" and (D_dst.is_cuda or _interpret()) and _triton() is not None)
    if not dils or n == 0:
        return p.long()
    if use_triton:
        tri = _triton()
        if tri is None:
            raise RuntimeError("refine_descriptors(backend='triton'): Triton is not installed (pip install triton)")
        _, kernel = tri
        dtype = dtype or D_dst.dtype
        Dc = D_dst.reshape(H * W, Fd).to(dtype).contiguous()
        Sc = d_src.to(dtype).contiguous()
        u = p[:, 0].to(torch.int32).contiguous()
        v = p[:, 1].to(torch.int32).contiguous()
        dil_t = _dil_tensor(tuple(dils), p.device)
        BN = 64
        bf = 1
        while bf < Fd:
            bf *= 2
        grid = (-(-n // BN),)
        kernel[grid](Dc, Sc, u, v, dil_t, n, H, W, len(dils), FD=Fd, BF=bf, R=int(radius), BN=BN)
        out = torch.stack((u, v), -1).long()
    else:
        u, v = refine_descriptors_torch(D_dst, d_src, p[:, 0], p[:, 1], radius, dils, dtype)
        out = torch.stack((u, v), -1).long()
    return torch.where(active[:, None], out, p.long())


_DILS: dict = {}


def _dil_tensor(dils: tuple, device) -> torch.Tensor:
    """The dilations as an int32 device tensor, made once (no upload inside a CUDA graph capture)."""
    key = (dils, str(device))
    t = _DILS.get(key)
    if t is None:
        t = _DILS[key] = torch.tensor(dils, dtype=torch.int32, device=device)
    return t
