"""From OneNIP's per-image maps to the fused anomaly map and the image score."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import ModelConfig


@dataclass
class Maps:
    """Per-image maps at the network input resolution, before fusion."""

    reconstruction: torch.Tensor  # S_rec = ||F̂ − F||₂, upsampled (N, H, W)
    refiner: torch.Tensor  # sigmoid of the refiner logits (N, H, W)
    neighbor: torch.Tensor | None = None  # distance to the class's nearest normal patch, upsampled (N, H, W)


def upsample(grid_map: torch.Tensor, size: int) -> torch.Tensor:
    """(N, h, w) feature-grid map → (N, size, size), bilinear with aligned corners (official)."""
    return F.interpolate(grid_map.unsqueeze(1), size=(size, size), mode="bilinear", align_corners=True)[:, 0]


def fuse(maps: Maps, config: ModelConfig, rec_scale: float, alpha: float | None = None,
         neighbor_weight: float = 0.0, neighbor_scale: float = 1.0) -> torch.Tensor:
    """Fused anomaly map S (N, H, W): S = (1−α)·S_rec + α·s·M̂; with a neighbour map and
    ``neighbor_weight`` β > 0, S ← (1−β)·S + β·n·S_nn (n = ``neighbor_scale`` puts S_nn in S_rec's
    units); then Gaussian smoothing (``config.map_sigma``).

    ``official``/``calibrated``: s = (max+min)/2 of S_rec. The released code takes s over the whole
    test set (transductive); we take it from the calibration images (``rec_scale``), so one image's
    score never depends on the others. ``paper``: s = 1 (Eq. 10). ``alpha`` overrides
    ``config.alpha`` (the calibrated fusion stores its own).
    """
    a = config.alpha if alpha is None else alpha
    scale = 1.0 if config.fusion == "paper" else rec_scale
    fused = (1.0 - a) * maps.reconstruction + a * scale * maps.refiner
    if neighbor_weight > 0 and maps.neighbor is not None:
        fused = (1.0 - neighbor_weight) * fused + neighbor_weight * neighbor_scale * maps.neighbor
    return gaussian_blur(fused, config.map_sigma)


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian smoothing of (N, H, W) maps (radius 4σ, edge-replicating padding)."""
    if sigma <= 0:
        return maps
    radius = int(4 * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=maps.dtype, device=maps.device)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = kernel / kernel.sum()
    out = F.pad(maps.unsqueeze(1), (radius, radius, radius, radius), mode="replicate")
    out = F.conv2d(out, kernel.view(1, 1, 1, -1))
    out = F.conv2d(out, kernel.view(1, 1, -1, 1))
    return out[:, 0]


def image_scores(fused: torch.Tensor, pool: int) -> torch.Tensor:
    """Max of the pool×pool mean-pooled map (stride 1, no padding), per image."""
    pooled = F.avg_pool2d(fused.unsqueeze(1), kernel_size=pool, stride=1)
    return pooled.flatten(1).amax(1)
