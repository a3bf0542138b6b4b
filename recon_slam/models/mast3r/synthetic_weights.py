"""Deterministic made-up weights for a checkpoint layout (the shared reference recipe).

Tensor number ``t`` (0-based, in the layout's order) with ``n`` elements gets, reshaped to
its shape, ``u`` = a splitmix64 hash of ``arange(n) + (t + 1) * 0x9E3779B97F4A7C15`` mapped to
``[0, 1)``; LayerNorm-like weights (the key's second-to-last part contains ``norm`` and the key
ends in ``.weight``) become ``1 + (u - 0.5) * 0.2``, every other tensor ``(u - 0.5) * 0.1``
(float32). Useful for golden tests and for speed benchmarks without the real weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from recon_slam.errors import InputError

_GOLDEN = 0x9E3779B97F4A7C15
_MUL1 = 0xBF58476D1CE4E5B9
_MUL2 = 0x94D049BB133111EB
_MASK64 = (1 << 64) - 1
_CHUNK = 1 << 22  # elements hashed at once (bounds the float64 / uint64 temporaries)

Layout = Sequence[tuple[str, Sequence[int]]]


def load_spec(path: str | Path) -> tuple[str, list[tuple[str, tuple[int, ...]]]]:
    """Read a layout spec JSON ``{"args": str, "state_dict": [[key, shape], ...]}``.

    Returns:
        (constructor string, [(key, shape), ...] in checkpoint order).
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
        layout = [(str(k), tuple(int(s) for s in shape)) for k, shape in data["state_dict"]]
        return str(data["args"]), layout
    except FileNotFoundError:
        raise InputError(f"layout spec {path} not found") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise InputError(f"layout spec {path} is not a {{'args', 'state_dict'}} JSON file ({exc})") from None


def _is_norm_weight(key: str) -> bool:
    parts = key.split(".")
    return len(parts) >= 2 and "norm" in parts[-2] and key.endswith(".weight")


def _unit_numpy(index: int, n: int) -> np.ndarray:
    """(n,) float64 in [0, 1): hash values of tensor ``index`` (numpy uint64, wraps mod 2**64)."""
    out = np.empty(n, dtype=np.float64)
    offset = np.uint64(((index + 1) * _GOLDEN) & _MASK64)
    m1, m2 = np.uint64(_MUL1), np.uint64(_MUL2)
    s30, s27, s31, s11 = (np.uint64(s) for s in (30, 27, 31, 11))
    for start in range(0, n, _CHUNK):
        z = np.arange(start, min(n, start + _CHUNK), dtype=np.uint64)
        z += offset
        z ^= z >> s30
        z *= m1
        z ^= z >> s27
        z *= m2
        z ^= z >> s31
        out[start : start + len(z)] = (z >> s11).astype(np.float64) / float(2**53)
    return out


def synthetic_tensor(index: int, key: str, shape: Sequence[int]) -> np.ndarray:
    """Synthetic float32 array of tensor number ``index`` named ``key`` with ``shape``."""
    n = int(np.prod(shape, dtype=np.int64)) if len(shape) else 1
    u = _unit_numpy(index, n)
    w = 1.0 + (u - 0.5) * 0.2 if _is_norm_weight(key) else (u - 0.5) * 0.1
    return w.astype(np.float32).reshape(tuple(shape))


def synthetic_state_dict(layout: Layout | Iterable) -> dict[str, torch.Tensor]:
    """State dict (float32 CPU tensors) for ``layout`` = [(key, shape), ...] in checkpoint order.

    ``layout`` may also be a ``state_dict`` (its keys and shapes are used, in its order).
    """
    items = _layout_items(layout)
    return {key: torch.from_numpy(synthetic_tensor(t, key, shape)) for t, (key, shape) in enumerate(items)}


def _layout_items(layout) -> list[tuple[str, tuple[int, ...]]]:
    if isinstance(layout, dict):
        return [(k, tuple(v.shape)) for k, v in layout.items()]
    return [(str(k), tuple(int(s) for s in shape)) for k, shape in layout]


# ---------------------------------------------------------------------- torch (any device)
def _srl(z: torch.Tensor, shift: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns (torch's ``>>`` is arithmetic)."""
    return (z >> shift) & ((1 << (64 - shift)) - 1)


def _signed(value: int) -> int:
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


def synthetic_state_dict_torch(
    layout: Layout | Iterable, device: str | torch.device = "cpu"
) -> dict[str, torch.Tensor]:
    """Same values as :func:`synthetic_state_dict`, computed with int64 torch ops on ``device``.

    Fast on a GPU (the full-size layout takes well under a second there).
    """
    device = torch.device(device)
    out = {}
    for t, (key, shape) in enumerate(_layout_items(layout)):
        n = 1
        for s in shape:
            n *= int(s)
        z = torch.arange(n, device=device, dtype=torch.int64) + _signed((t + 1) * _GOLDEN)
        z = (z ^ _srl(z, 30)) * _signed(_MUL1)
        z = (z ^ _srl(z, 27)) * _signed(_MUL2)
        z = z ^ _srl(z, 31)
        u = _srl(z, 11).to(torch.float64) / float(2**53)
        w = 1.0 + (u - 0.5) * 0.2 if _is_norm_weight(key) else (u - 0.5) * 0.1
        out[key] = w.to(torch.float32).reshape(tuple(shape))
    return out
