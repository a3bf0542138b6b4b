"""Weights in and out: official ACE files and our own dicts of tensors.

* :func:`load_official_encoder` / :func:`encoder_from_state_dict`: a plain encoder
  state_dict with keys ``conv1..conv4``, ``res1_conv1..3``, ``res2_conv1..3`` and
  ``res2_skip`` (``.weight`` and ``.bias`` each), as in the published ACE encoder file;
  the widths are read from the shapes, so slimmer encoders of ours load the same way.
* :func:`load_official_head` / :func:`head_from_state_dict`: an ACE head state_dict
  (``res3_conv1..3``, ``{k}c0..2``, ``fc1..3``, buffer ``mean``; often half precision).
* :func:`pack_weights` / :func:`unpack_weights`: a module's state_dict as a flat dict of
  (optionally fp16) CPU tensors, buffers and 1-element tensors kept in float32.

Files are read with ``torch.load(weights_only=True)``: no code is executed.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping, Union

import torch
from torch import nn

from recon_slam.errors import InputError
from recon_slam.models.ace.encoder import Encoder
from recon_slam.models.ace.head import Head

ENCODER_LAYERS: tuple[str, ...] = (
    "conv1", "conv2", "conv3", "conv4",
    "res1_conv1", "res1_conv2", "res1_conv3",
    "res2_conv1", "res2_conv2", "res2_conv3", "res2_skip",
)
#: Every key of an ACE-shaped encoder state_dict.
ENCODER_KEYS: tuple[str, ...] = tuple(f"{n}.{p}" for n in ENCODER_LAYERS for p in ("weight", "bias"))

StateDictLike = Union[str, Path, Mapping[str, torch.Tensor]]


def _read(source: StateDictLike, what: str) -> dict[str, torch.Tensor]:
    if isinstance(source, Mapping):
        sd = dict(source)
    else:
        path = Path(source)
        if not path.is_file():
            raise InputError(f"{what} file {path} not found: check the path")
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types for bad files
            raise InputError(f"{path} is not a readable torch state_dict ({exc}); give the {what} .pt file") from None
        if isinstance(sd, Mapping) and "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
            sd = sd["state_dict"]
        if not isinstance(sd, Mapping):
            raise InputError(f"{path} holds a {type(sd).__name__}, not a state_dict: give the {what} .pt file")
        sd = dict(sd)
    # tolerate wrappers: "module." (DataParallel) and "encoder." prefixes
    for prefix in ("module.", "encoder."):
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def encoder_widths_from_state_dict(sd: Mapping[str, torch.Tensor]) -> tuple[tuple[int, ...], int]:
    """(widths, in_channels) of an ACE-shaped encoder state_dict (see :data:`ENCODER_KEYS`)."""
    missing = [k for k in ENCODER_KEYS if k not in sd]
    if missing:
        raise InputError(
            f"encoder state_dict lacks {len(missing)} ACE key(s), e.g. {missing[:3]}: expected keys "
            "conv1..conv4, res1_conv1..3, res2_conv1..3, res2_skip (.weight/.bias) of the ACE encoder"
        )
    w = [int(sd[f"{n}.weight"].shape[0]) for n in ("conv1", "conv2", "conv3", "conv4", "res2_conv1")]
    return tuple(w), int(sd["conv1.weight"].shape[1])


def encoder_from_state_dict(source: StateDictLike) -> Encoder:
    """An :class:`Encoder` with the weights of an ACE-shaped state_dict (or file)."""
    sd = _read(source, "encoder")
    widths, cin = encoder_widths_from_state_dict(sd)
    enc = Encoder(widths, cin)
    extra = sorted(set(sd) - set(ENCODER_KEYS))
    if extra:
        raise InputError(f"encoder state_dict has unexpected keys {extra[:5]}: it is not an ACE-shaped encoder")
    try:
        enc.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
    except RuntimeError as exc:
        raise InputError(f"encoder state_dict does not fit the ACE layout ({exc})") from None
    return enc


def load_official_encoder(source: StateDictLike) -> Encoder:
    """Load the published ACE encoder (``ace_encoder_pretrained.pt``) or any ACE-shaped one.

    Args:
        source: file path or state_dict (keys :data:`ENCODER_KEYS`).

    Returns:
        :class:`Encoder` in float32, eval mode, gradients off.
    """
    enc = encoder_from_state_dict(source).eval()
    for p in enc.parameters():
        p.requires_grad_(False)
    return enc


_BLOCK_KEY = re.compile(r"^(\d+)c([012])\.weight$")


def head_from_state_dict(source: StateDictLike) -> Head:
    """A :class:`Head` with the weights of an ACE head state_dict (or file).

    Width, input channels and the number of extra blocks are read from the shapes and
    key names; the ``mean`` buffer is required.
    """
    sd = _read(source, "head")
    need = [f"{n}.{p}" for n in ("res3_conv1", "res3_conv2", "res3_conv3", "fc1", "fc2", "fc3")
            for p in ("weight", "bias")] + ["mean"]
    missing = [k for k in need if k not in sd]
    if missing:
        raise InputError(
            f"head state_dict lacks {missing[:4]}: expected the ACE head keys res3_conv1..3, 0c0..0c2, "
            "fc1..fc3 and the buffer mean"
        )
    width = int(sd["res3_conv1.weight"].shape[0])
    cin = int(sd["res3_conv1.weight"].shape[1])
    blocks = {int(m.group(1)) for k in sd if (m := _BLOCK_KEY.match(k))}
    n_blocks = max(blocks) + 1 if blocks else 0
    head = Head(cin, width, n_blocks, homogeneous=True)
    # ACE stores a few buffers we do not use (e.g. the inverse-scale limits); keep ours.
    own = head.state_dict()
    unknown = [k for k in sd if k not in own]
    sd = {k: v for k, v in sd.items() if k in own}
    if int(sd["fc3.weight"].shape[0]) != 4:
        raise InputError("head fc3 must have 4 outputs (homogeneous scene coordinates)")
    try:
        head.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
    except RuntimeError as exc:
        raise InputError(f"head state_dict does not fit the ACE layout ({exc}); unused keys {unknown[:5]}") from None
    return head


def load_official_head(source: StateDictLike) -> Head:
    """Load an ACE map file (head state_dict, usually fp16) as a float32 :class:`Head`."""
    return head_from_state_dict(source).eval()


def pack_weights(module: nn.Module, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """State dict as CPU tensors; floating parameters in ``dtype``, buffers kept float32."""
    buffers = {name for name, _ in module.named_buffers()}
    out = {}
    for k, v in module.state_dict().items():
        v = v.detach().cpu()
        if v.is_floating_point():
            v = v.float() if k in buffers else v.to(dtype)
        out[k] = v.contiguous().clone()
    return out


def unpack_weights(module: nn.Module, weights: Mapping[str, torch.Tensor]) -> nn.Module:
    """Load :func:`pack_weights` output into ``module`` (converted to the module's dtypes)."""
    own = module.state_dict()
    missing = sorted(set(own) - set(weights))
    extra = sorted(set(weights) - set(own))
    if missing or extra:
        raise InputError(
            f"relocaliser weights do not match the network (missing {missing[:3]}, unexpected {extra[:3]}): "
            "the map was written by another version or with other network settings; rebuild the map"
        )
    module.load_state_dict({k: weights[k].to(own[k].dtype) for k in own}, strict=True)
    return module


def state_dict_bytes(weights: Mapping[str, torch.Tensor]) -> int:
    """Bytes of the tensor data of a packed state dict."""
    return int(sum(v.numel() * v.element_size() for v in weights.values() if isinstance(v, torch.Tensor)))
