"""The supervised refiner: upsamples |F̂ − F| from 1/16 to 1/4 resolution and predicts a mask."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _up_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.ConvTranspose2d(cout, cout, 2, stride=2),
    )


class Refiner(nn.Module):
    """Two (3×3 conv, BN, ReLU, 2×2 transposed conv) blocks and a 1×1 predictor; logits are
    upsampled bilinearly (``align_corners=True``) to the input size."""

    def __init__(self, in_channels: int, dim: int = 128) -> None:
        super().__init__()
        self.upconv1 = _up_block(in_channels, dim)
        self.upconv2 = _up_block(dim, dim)
        self.predictor = nn.Conv2d(dim, 1, 1)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, error: torch.Tensor, size: int) -> torch.Tensor:
        """|F̂ − F| (N, C, h, w) → mask logits (N, 1, size, size)."""
        logits = self.predictor(self.upconv2(self.upconv1(error)))
        return F.interpolate(logits, size=(size, size), mode="bilinear", align_corners=True)
