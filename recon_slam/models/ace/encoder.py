"""ACE-shaped convolutional encoder: image -> dense features at stride 8.

The layer layout follows the published ACE encoder (Brachmann et al., CVPR 2023), with
configurable channel widths so that a slim encoder can be trained per map:

==============  =====================  ==============================================
layer           shape                  notes
==============  =====================  ==============================================
conv1           in -> c1, 3x3, s1      ReLU
conv2           c1 -> c2, 3x3, s2      ReLU
conv3           c2 -> c3, 3x3, s2      ReLU
conv4           c3 -> c4, 3x3, s2      ReLU  (``r`` below)
res1_conv1..3   c4 -> c4 (3x3, 1x1,    ReLU after each, added to ``r``
                3x3)
res2_conv1..3   c4 -> c5 (3x3, 1x1,    ReLU after each, plus ``res2_skip`` (1x1,
                3x3)                   c4 -> c5, no ReLU)
==============  =====================  ==============================================

With ``widths = ACE_WIDTHS = (32, 64, 128, 256, 512)`` and one input channel the
parameter names and shapes are those of the official encoder file, so a user who has it
can load it with :func:`recon_slam.models.ace.checkpoint.load_official_encoder`.

Pixel geometry: every 3x3 convolution is zero-padded by one pixel, so an input of
``H x W`` gives ``ceil(H / 8) x ceil(W / 8)`` features and feature cell ``(i, j)`` is
centred on input pixel ``(u, v) = (8 j, 8 i)`` (OpenCV convention, pixel centres at
integer coordinates); see :func:`feature_pixel_grid`.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

#: Channel widths (conv1, conv2, conv3, conv4/res1, res2) of the published ACE encoder.
ACE_WIDTHS: tuple[int, int, int, int, int] = (32, 64, 128, 256, 512)

#: Grey-value normalisation of the ACE encoder input (after scaling to [0, 1]).
IMAGE_MEAN = 0.4
IMAGE_STD = 0.25

#: Output stride of the encoder in pixels.
STRIDE = 8


class Encoder(nn.Module):
    """ACE-shaped encoder with configurable widths.

    Args:
        widths: five channel widths ``(c1, c2, c3, c4, c5)``; :data:`ACE_WIDTHS` gives the
            official layout (about 5.6 M parameters); the per-map default of
            :class:`recon_slam.reloc.trainer.RelocConfig` is half of it.
        in_channels: 1 for grey images (ACE), 3 for RGB.

    Input ``(B, in_channels, H, W)`` normalised images (see :func:`normalise_image`);
    output ``(B, c5, ceil(H/8), ceil(W/8))`` features.
    """

    stride = STRIDE

    def __init__(self, widths: Sequence[int] = ACE_WIDTHS, in_channels: int = 1) -> None:
        super().__init__()
        widths = tuple(int(w) for w in widths)
        if len(widths) != 5 or any(w <= 0 for w in widths):
            raise ValueError(f"encoder widths must be five positive integers, got {widths}")
        if in_channels not in (1, 3):
            raise ValueError(f"encoder in_channels must be 1 (grey) or 3 (RGB), got {in_channels}")
        c1, c2, c3, c4, c5 = widths
        self.widths = widths
        self.in_channels = int(in_channels)
        self.out_channels = c5
        self.conv1 = nn.Conv2d(in_channels, c1, 3, 1, 1)
        self.conv2 = nn.Conv2d(c1, c2, 3, 2, 1)
        self.conv3 = nn.Conv2d(c2, c3, 3, 2, 1)
        self.conv4 = nn.Conv2d(c3, c4, 3, 2, 1)
        self.res1_conv1 = nn.Conv2d(c4, c4, 3, 1, 1)
        self.res1_conv2 = nn.Conv2d(c4, c4, 1, 1, 0)
        self.res1_conv3 = nn.Conv2d(c4, c4, 3, 1, 1)
        self.res2_conv1 = nn.Conv2d(c4, c5, 3, 1, 1)
        self.res2_conv2 = nn.Conv2d(c5, c5, 1, 1, 0)
        self.res2_conv3 = nn.Conv2d(c5, c5, 3, 1, 1)
        self.res2_skip = nn.Conv2d(c4, c5, 1, 1, 0)
        # The last convolution of each residual branch starts small so that every block
        # starts close to its skip path (stable training from scratch without norm layers).
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)
        for m in (self.res1_conv3, self.res2_conv3):
            m.weight.data.mul_(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_channels, H, W) normalised image -> (B, c5, ceil(H/8), ceil(W/8)) features."""
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.relu(self.conv3(x))
        r = F.relu(self.conv4(x))
        x = F.relu(self.res1_conv1(r))
        x = F.relu(self.res1_conv2(x))
        x = F.relu(self.res1_conv3(x))
        r = r + x
        x = F.relu(self.res2_conv1(r))
        x = F.relu(self.res2_conv2(x))
        x = F.relu(self.res2_conv3(x))
        return self.res2_skip(r) + x


def normalise_image(image: torch.Tensor, in_channels: int = 1) -> torch.Tensor:
    """uint8 or [0, 1] float images -> normalised encoder input.

    Args:
        image: (B, 3, H, W) or (B, 1, H, W) RGB / grey, uint8 (0..255) or float in [0, 1].
        in_channels: 1 converts RGB to grey (ITU-R BT.601 weights), 3 keeps RGB (a grey
            input is replicated).

    Returns:
        (B, in_channels, H, W) float32 ``(value - 0.4) / 0.25``.
    """
    x = image.float()
    if image.dtype == torch.uint8:
        x = x / 255.0
    if in_channels == 1 and x.shape[1] == 3:
        w = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        x = (x * w).sum(1, keepdim=True)
    elif in_channels == 3 and x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return (x - IMAGE_MEAN) / IMAGE_STD


def feature_size(height: int, width: int) -> tuple[int, int]:
    """Feature map size ``(h, w)`` of an ``height x width`` input: ``ceil(/8)`` each."""
    return (int(height) + STRIDE - 1) // STRIDE, (int(width) + STRIDE - 1) // STRIDE


def feature_pixel_grid(h: int, w: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Pixel centre of every feature cell: (h, w, 2) ``(u, v) = (8 j, 8 i)`` in input pixels."""
    v, u = torch.meshgrid(
        torch.arange(h, device=device, dtype=dtype) * STRIDE,
        torch.arange(w, device=device, dtype=dtype) * STRIDE,
        indexing="ij",
    )
    return torch.stack((u, v), dim=-1)
