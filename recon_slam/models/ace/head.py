"""ACE-shaped regression head and the full scene-coordinate network.

The head is a stack of 1x1 convolutions (a per-pixel MLP) applied to the stride-8
features:

* ``res3_conv1..3`` (in -> width -> width -> width, ReLU each), added to the input
  (through ``res3_skip``, a 1x1 convolution, when ``in_channels != width``);
* ``num_blocks`` residual blocks ``{k}c0, {k}c1, {k}c2`` (width -> width, ReLU each);
* ``fc1``, ``fc2`` (ReLU) and ``fc3`` with 4 outputs ``(x, y, z, w)``.

Output: scene coordinates in the map's world frame, ``xyz / h + mean`` with
``h = softplus(w, beta = ln 2 / (1 - 1/4)) + 1/4`` clamped to at most 100 (so ``h = 1``
for ``w = 0``), and ``mean`` the mean camera centre of the mapping frames (a buffer).
The names match the published ACE head, so an official head file loads into a head of
width 512 with one extra block (:func:`recon_slam.models.ace.checkpoint.load_official_head`).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from recon_slam.models.ace.encoder import Encoder, feature_pixel_grid

MIN_INV_SCALE = 0.25
MAX_INV_SCALE = 100.0
_SOFTPLUS_BETA = math.log(2.0) / (1.0 - MIN_INV_SCALE)


class Head(nn.Module):
    """Per-pixel MLP from features to homogeneous scene coordinates.

    Args:
        in_channels: feature channels of the encoder.
        width: hidden width (512 in ACE).
        num_blocks: extra 3-layer residual blocks (1 in ACE).
        homogeneous: divide by ``softplus`` of the 4th output (ACE); False regresses
            ``xyz`` directly (``fc3`` still has 4 outputs, the 4th is ignored).

    Input ``(B, in_channels, h, w)`` features; output ``(B, 3, h, w)`` world coordinates
    in metres (float32 even under autocast: ``fc3`` and the division run in float32).
    """

    def __init__(self, in_channels: int = 512, width: int = 512, num_blocks: int = 1, homogeneous: bool = True):
        super().__init__()
        self.in_channels, self.width, self.num_blocks = int(in_channels), int(width), int(num_blocks)
        self.homogeneous = bool(homogeneous)
        if self.in_channels != self.width:
            self.res3_skip = nn.Conv2d(self.in_channels, self.width, 1)
        else:
            self.res3_skip = None
        self.res3_conv1 = nn.Conv2d(self.in_channels, self.width, 1)
        self.res3_conv2 = nn.Conv2d(self.width, self.width, 1)
        self.res3_conv3 = nn.Conv2d(self.width, self.width, 1)
        self.blocks: list[tuple[nn.Conv2d, nn.Conv2d, nn.Conv2d]] = []
        for k in range(self.num_blocks):
            convs = tuple(nn.Conv2d(self.width, self.width, 1) for _ in range(3))
            for i, c in enumerate(convs):
                self.add_module(f"{k}c{i}", c)
            self.blocks.append(convs)  # type: ignore[arg-type]
        self.fc1 = nn.Conv2d(self.width, self.width, 1)
        self.fc2 = nn.Conv2d(self.width, self.width, 1)
        self.fc3 = nn.Conv2d(self.width, 4, 1)
        self.register_buffer("mean", torch.zeros(1, 3, 1, 1))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)
        for convs in [(self.res3_conv1, self.res3_conv2, self.res3_conv3), *self.blocks]:
            convs[2].weight.data.mul_(0.1)
        # Start near xyz = 0, h = 1: the first predictions sit at the mean camera centre.
        nn.init.normal_(self.fc3.weight, std=1e-3)

    def set_mean(self, mean: torch.Tensor) -> None:
        """Set the offset added to every prediction: (3,) world point (mean camera centre)."""
        self.mean.copy_(torch.as_tensor(mean, dtype=self.mean.dtype).reshape(1, 3, 1, 1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, in_channels, h, w) features -> (B, 3, h, w) world coordinates (float32)."""
        r = features
        x = F.relu(self.res3_conv1(r))
        x = F.relu(self.res3_conv2(x))
        x = F.relu(self.res3_conv3(x))
        r = (r if self.res3_skip is None else self.res3_skip(r)) + x
        for c0, c1, c2 in self.blocks:
            x = F.relu(c0(r))
            x = F.relu(c1(x))
            x = F.relu(c2(x))
            r = r + x
        x = F.relu(self.fc1(r))
        x = F.relu(self.fc2(x))
        # The output layer runs in float32 even under autocast: in half precision its
        # outputs (metres, a few units) would be rounded to steps of 2-4 mm (fp16) or 1.5-3 cm (bf16).
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = F.conv2d(x.float(), self.fc3.weight.float(), self.fc3.bias.float())
        xyz = x[:, :3]
        if self.homogeneous:
            h = F.softplus(x[:, 3:4], beta=_SOFTPLUS_BETA) + MIN_INV_SCALE
            xyz = xyz / h.clamp(max=MAX_INV_SCALE)
        return xyz + self.mean.float()


class SceneCoordinateNet(nn.Module):
    """Encoder + head: image -> world coordinates at stride 8.

    Input ``(B, C, H, W)`` normalised image (see
    :func:`recon_slam.models.ace.encoder.normalise_image`); output ``(B, 3, h, w)`` world
    points (metres, the map's world frame) for the pixels of :meth:`pixel_grid`.
    """

    def __init__(self, encoder: Encoder, head: Head) -> None:
        super().__init__()
        if encoder.out_channels != head.in_channels:
            raise ValueError(
                f"encoder gives {encoder.out_channels} channels but the head expects {head.in_channels}"
            )
        self.encoder = encoder
        self.head = head

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) normalised image -> (B, 3, ceil(H/8), ceil(W/8)) world points."""
        return self.head(self.encoder(image))

    @staticmethod
    def pixel_grid(h: int, w: int, device=None, dtype=torch.float32) -> torch.Tensor:
        """(h, w, 2) input pixel ``(u, v)`` of every output cell."""
        return feature_pixel_grid(h, w, device=device, dtype=dtype)


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (all, or only those with ``requires_grad``)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def build_net(
    widths=(16, 32, 64, 128, 256),
    head_width: int = 256,
    head_blocks: int = 1,
    in_channels: int = 1,
    homogeneous: bool = True,
    mean: Optional[torch.Tensor] = None,
) -> SceneCoordinateNet:
    """A :class:`SceneCoordinateNet` with an :class:`Encoder` of ``widths`` and a matching head."""
    enc = Encoder(widths, in_channels)
    head = Head(enc.out_channels, head_width, head_blocks, homogeneous)
    if mean is not None:
        head.set_mean(mean)
    return SceneCoordinateNet(enc, head)
