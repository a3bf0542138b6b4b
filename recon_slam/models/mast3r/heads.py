"""Prediction heads of MASt3R and their output activations.

Each view has one :class:`PointDescHead` made of

* a DPT head (``dpt``): four token maps (encoder output and decoder blocks d/2, 3d/4, d)
  are brought to strides 4, 8, 16 and 32 of the image, fused coarse to fine by residual
  convolution units, and upsampled to full resolution -> ``(B, 4, H, W)``: 3D point
  (3 channels, before activation) and confidence (1);
* a local-feature MLP (``head_local_features``) on the concatenation of encoder and last
  decoder tokens, whose ``(desc_dim + 1) * p * p`` outputs per token are rearranged by
  pixel shuffle into a full-resolution ``(B, desc_dim + 1, H, W)`` map: descriptor and
  descriptor confidence.

Module attribute names follow the released checkpoint layout (``scratch.refinenet1``,
``resConfUnit1``, ``act_postprocess`` ...). ``scratch.layer{1..4}_rn`` and
``scratch.layer_rn.{0..3}`` are the same convolutions registered twice, as in that layout;
on loading, the ``layer_rn.{i}`` entry is applied last and wins.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from recon_slam.models.mast3r.config import MASt3RConfig
from recon_slam.models.mast3r.layers import FeedForward


@dataclass
class ViewPrediction:
    """Network outputs for one view, all at image resolution.

    Attributes:
        pts3d: (B, H, W, 3) points; view 1's are in view 1's camera frame and so are view 2's
            (``pts3d_in_other_view``). Up to an unknown global scale for real images.
        conf: (B, H, W) point confidence (>= 1 with the released activations).
        desc: (B, H, W, D) unit-norm local descriptors.
        desc_conf: (B, H, W) descriptor confidence (> 0).
    """

    pts3d: torch.Tensor
    conf: torch.Tensor
    desc: torch.Tensor
    desc_conf: torch.Tensor

    def to(self, *args, **kwargs) -> "ViewPrediction":
        """Copy with every tensor moved/cast by ``Tensor.to(*args, **kwargs)``."""
        return ViewPrediction(**{f.name: getattr(self, f.name).to(*args, **kwargs) for f in fields(self)})

    def __getitem__(self, index) -> "ViewPrediction":
        """Select batch entries (``pred[i]`` keeps a batch dimension of 1, ``pred[a:b]`` a slice)."""
        if isinstance(index, int):
            index = slice(index, index + 1 if index != -1 else None)
        return ViewPrediction(**{f.name: getattr(self, f.name)[index] for f in fields(self)})


# ---------------------------------------------------------------------- activations
def activate_points(xyz: torch.Tensor, mode: tuple) -> torch.Tensor:
    """Raw ``(..., 3)`` -> points: ``exp`` mode gives ``xyz / |xyz| * expm1(|xyz|)``."""
    kind = mode[0]
    if kind == "linear":
        return xyz.clamp(min=mode[1], max=mode[2]) if (mode[1], mode[2]) != (-float("inf"), float("inf")) else xyz
    norm = xyz.norm(dim=-1, keepdim=True)
    unit = xyz / norm.clip(min=1e-8)
    if kind == "square":
        return unit * norm.square()
    return unit * torch.expm1(norm)


def activate_confidence(x: torch.Tensor, mode: tuple) -> torch.Tensor:
    """Raw ``(...)`` -> confidence: ``exp`` mode gives ``vmin + min(exp(x), vmax - vmin)``."""
    kind, vmin, vmax = mode
    if kind == "sigmoid":
        return (vmax - vmin) * torch.sigmoid(x) + vmin
    return vmin + x.exp().clip(max=vmax - vmin)


# ---------------------------------------------------------------------- DPT
class ResidualConvUnit(nn.Module):
    """``x + conv2(relu(conv1(relu(x))))`` with 3x3 convolutions (channels kept)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(F.relu(self.conv1(F.relu(x)))) + x


class FusionStage(nn.Module):
    """One coarse-to-fine step: add the refined skip map, refine, upsample x2, 1x1 projection."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.out_conv = nn.Conv2d(channels, channels, kernel_size=1)
        self.resConfUnit1 = ResidualConvUnit(channels)
        self.resConfUnit2 = ResidualConvUnit(channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` (B, C, h, w) [+ ``skip`` (B, C, h, w)] -> (B, C, 2h, 2w)."""
        if skip is not None:
            x = x + self.resConfUnit1(skip)
        x = self.resConfUnit2(x)
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)
        return self.out_conv(x)


class _Scratch(nn.Module):
    """Container matching the checkpoint's ``dpt.scratch`` layout."""

    def __init__(self, in_dims: tuple, channels: int) -> None:
        super().__init__()
        convs = [nn.Conv2d(d, channels, kernel_size=3, padding=1, bias=False) for d in in_dims]
        self.layer1_rn, self.layer2_rn, self.layer3_rn, self.layer4_rn = convs
        self.layer_rn = nn.ModuleList(convs)  # same modules, second name (checkpoint layout)
        self.refinenet1 = FusionStage(channels)
        self.refinenet2 = FusionStage(channels)
        self.refinenet3 = FusionStage(channels)
        self.refinenet4 = FusionStage(channels)


class DPTPointHead(nn.Module):
    """Dense head: 4 token maps ``(B, N, C_i)`` on an ``h x w`` patch grid -> ``(B, out, 16h, 16w)``.

    The token maps are resampled to strides 4, 8, 16, 32 (transposed convolutions x4, x2,
    identity, strided convolution /2), projected to ``feature_dim`` channels, fused coarse
    to fine, and decoded by a small convolutional head at full resolution.
    """

    def __init__(self, token_dims: tuple, layer_dims: tuple, feature_dim: int, out_channels: int) -> None:
        super().__init__()
        self.scratch = _Scratch(layer_dims, feature_dim)
        last_dim = feature_dim // 2
        self.head = nn.Sequential(
            nn.Conv2d(feature_dim, feature_dim // 2, kernel_size=3, padding=1),
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True),
            nn.Conv2d(feature_dim // 2, last_dim, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(last_dim, out_channels, kernel_size=1),
        )
        d0, d1, d2, d3 = layer_dims
        self.act_postprocess = nn.ModuleList(
            [
                nn.Sequential(nn.Conv2d(token_dims[0], d0, 1), nn.ConvTranspose2d(d0, d0, kernel_size=4, stride=4)),
                nn.Sequential(nn.Conv2d(token_dims[1], d1, 1), nn.ConvTranspose2d(d1, d1, kernel_size=2, stride=2)),
                nn.Sequential(nn.Conv2d(token_dims[2], d2, 1)),
                nn.Sequential(nn.Conv2d(token_dims[3], d3, 1), nn.Conv2d(d3, d3, kernel_size=3, stride=2, padding=1)),
            ]
        )

    def forward(self, token_maps: list[torch.Tensor], grid: tuple[int, int]) -> torch.Tensor:
        """``token_maps``: 4 tensors ``(B, h*w, C_i)``; ``grid`` = (h, w) -> ``(B, out, 16h, 16w)``."""
        h, w = grid
        maps = []
        for tokens, adapt, project in zip(token_maps, self.act_postprocess, self.scratch.layer_rn):
            B, N, C = tokens.shape
            spatial = tokens.transpose(1, 2).reshape(B, C, h, w)
            maps.append(project(adapt(spatial)))
        s = self.scratch
        fused = s.refinenet4(maps[3])[:, :, : maps[2].shape[2], : maps[2].shape[3]]
        fused = s.refinenet3(fused, maps[2])
        fused = s.refinenet2(fused, maps[1])
        fused = s.refinenet1(fused, maps[0])
        return self.head(fused)


class PointDescHead(nn.Module):
    """Per-view head: DPT points + confidence and MLP descriptors + descriptor confidence."""

    def __init__(self, cfg: MASt3RConfig) -> None:
        super().__init__()
        self.cfg = cfg
        enc, dec = cfg.enc_embed_dim, cfg.dec_embed_dim
        self.dpt = DPTPointHead((enc, dec, dec, dec), tuple(cfg.dpt_layer_dims), cfg.dpt_feature_dim, out_channels=4)
        cat_dim = enc + dec
        self.local_channels = cfg.desc_dim + int(cfg.two_confs)
        self.head_local_features = FeedForward(
            cat_dim, int(4 * cat_dim), self.local_channels * cfg.patch_size**2
        )

    def forward(self, token_maps: list[torch.Tensor], grid: tuple[int, int]) -> ViewPrediction:
        """``token_maps``: [encoder (B, N, C_enc), decoder block d/2, 3d/4, last normalised (B, N, C_dec)].

        Returns the activated :class:`ViewPrediction` at ``(16h, 16w)`` resolution.
        """
        cfg = self.cfg
        h, w = grid
        p = cfg.patch_size
        raw_pts = self.dpt(token_maps, grid).permute(0, 2, 3, 1)  # (B, H, W, 4)
        cat = torch.cat((token_maps[0], token_maps[-1]), dim=-1)  # (B, N, C_enc + C_dec)
        B = cat.shape[0]
        local = self.head_local_features(cat).transpose(1, 2).reshape(B, -1, h, w)
        local = F.pixel_shuffle(local, p).permute(0, 2, 3, 1)  # (B, H, W, D [+1])
        conf = activate_confidence(raw_pts[..., 3], cfg.conf_mode)
        desc = F.normalize(local[..., : cfg.desc_dim], dim=-1)
        if cfg.two_confs:
            desc_conf = activate_confidence(local[..., cfg.desc_dim], cfg.desc_conf_mode)
        else:
            desc_conf = conf.clone()
        return ViewPrediction(
            pts3d=activate_points(raw_pts[..., :3], cfg.depth_mode), conf=conf, desc=desc, desc_conf=desc_conf
        )
