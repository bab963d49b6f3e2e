"""OneNIP's trainable part: projections, reconstruction transformer and refiner, with the
training losses and the inference maps. The frozen backbone lives outside (see ``backbone.py``)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .refiner import Refiner
from .transformer import ReconstructionTransformer


class Losses(NamedTuple):
    total: torch.Tensor
    mse: torch.Tensor
    dice: torch.Tensor


@dataclass
class Maps:
    """Per-image outputs at input resolution."""

    reconstruction: torch.Tensor  # S_rec = ||F̂ − F||₂, upsampled (N, H, W)
    refiner: torch.Tensor  # sigmoid of the refiner logits (N, H, W)
    neighbor: torch.Tensor | None = None  # distance to the class's nearest normal patch, upsampled (N, H, W)


class OneNIP(nn.Module):
    """Reconstruct (or restore) target features guided by one normal prompt image."""

    def __init__(self, config: ModelConfig, in_channels: int) -> None:
        super().__init__()
        self.config = config
        self.in_channels = in_channels
        dim = config.hidden_dim
        self.input_proj = nn.Linear(in_channels, dim)
        self.output_proj = nn.Linear(dim, in_channels)
        self.transformer = ReconstructionTransformer(
            grid=config.grid,
            dim=dim,
            num_heads=config.num_heads,
            num_encoder_layers=config.num_encoder_layers,
            num_decoder_layers=config.num_decoder_layers,
            ffn=config.dim_feedforward,
            dropout=config.dropout,
            use_neighbor_mask=config.neighbor_mask,
            buggy_v1=config.decoder == "v1",
        )
        self.refiner = Refiner(in_channels, config.refiner_dim)
        if config.feature_norm == "channel":
            self.register_buffer("feature_mean", torch.zeros(in_channels))
            self.register_buffer("feature_std", torch.ones(in_channels))
        for name, p in self.named_parameters():
            if p.dim() > 1 and "pos_embed" not in name and not name.startswith("refiner."):
                nn.init.xavier_uniform_(p)
        with torch.no_grad():
            for layer in self.transformer.residual_branch_outputs():
                layer.weight.mul_(config.residual_init)

    def set_feature_statistics(self, features: torch.Tensor) -> None:
        """Per-channel mean/std of clean training features (only with ``feature_norm="channel"``)."""
        if self.config.feature_norm == "channel":
            self.feature_mean.copy_(features.mean(dim=(0, 2, 3)))
            self.feature_std.copy_(features.std(dim=(0, 2, 3)).clamp_min(1e-6))

    def standardize(self, features: torch.Tensor) -> torch.Tensor:
        """Backbone features as the model sees them (identity unless ``feature_norm="channel"``)."""
        if self.config.feature_norm != "channel":
            return features
        return (features - self.feature_mean.view(1, -1, 1, 1)) / self.feature_std.view(1, -1, 1, 1)

    # -- tokens ---------------------------------------------------------------------------
    def _jitter(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feature jitter (training only): Gaussian noise of std scale·||f||/C per token."""
        if not self.training or self.config.jitter_scale <= 0:
            return tokens
        if torch.rand(()) > self.config.jitter_prob:
            return tokens
        std = tokens.norm(dim=-1, keepdim=True) / tokens.shape[-1] * self.config.jitter_scale
        return tokens + torch.randn_like(tokens) * std

    @staticmethod
    def _to_tokens(features: torch.Tensor) -> torch.Tensor:
        return features.flatten(2).transpose(1, 2)

    def encode(self, features: torch.Tensor) -> torch.Tensor:
        """Backbone features (N, C, h, w) → encoded tokens (N, hw, dim). Prompts are encoded once
        and cached at inference (see ``predictor.py``)."""
        return self._encode(self.standardize(features))

    def _encode(self, features: torch.Tensor) -> torch.Tensor:
        return self.transformer.encode(self.input_proj(self._jitter(self._to_tokens(features))))

    def reconstruct(self, encoded_query: torch.Tensor, encoded_prompt: torch.Tensor) -> torch.Tensor:
        """Encoded query and prompt tokens → reconstructed features (N, C, h, w)."""
        out = self.output_proj(self.transformer.decode(encoded_query, encoded_prompt))
        g = self.config.grid
        return out.transpose(1, 2).reshape(out.shape[0], self.in_channels, g, g)

    # -- training -------------------------------------------------------------------------
    def training_losses(
        self,
        clean: torch.Tensor,
        synthetic: torch.Tensor,
        synthetic_mask: torch.Tensor,
        prompt: torch.Tensor,
        loss_form: str = "official",
    ) -> Losses:
        """Reconstruction of ``clean`` and restoration of ``synthetic`` (both toward ``clean``),
        guided by ``prompt``; refiner supervised with zeros / the synthetic mask (N, H, W).

        ``official``: mean MSE over both streams (= (L_rec+L_res)/2) + 0.5·Dice with smoothing 1
        and no factor 2 (the released code). ``paper``: L_rec + L_res + 0.5·Dice of Eq. 7.
        """
        n = clean.shape[0]
        clean, synthetic, prompt = self.standardize(clean), self.standardize(synthetic), self.standardize(prompt)
        encoded = self._encode(torch.cat([clean, synthetic, prompt]))
        queries, prompts = encoded[: 2 * n], encoded[2 * n :]
        recon = self.reconstruct(queries, prompts.repeat(2, 1, 1))
        target = torch.cat([clean, clean])
        mse = F.mse_loss(recon, target)
        observed = torch.cat([clean, synthetic])
        logits = self.refiner((recon - observed).abs(), self.config.image_size)[:, 0]
        masks = torch.cat([torch.zeros_like(synthetic_mask), synthetic_mask])
        if loss_form == "official":
            dice = dice_loss(logits, masks, smooth=1.0, factor=1.0)
        elif loss_form == "paper":
            mse = 2.0 * mse
            dice = dice_loss(logits, masks, smooth=1e-6, factor=2.0)
        else:
            raise ValueError(f"loss_form must be 'official' or 'paper', got {loss_form!r}")
        return Losses(total=mse + 0.5 * dice, mse=mse.detach(), dice=dice.detach())

    forward = training_losses

    # -- inference ------------------------------------------------------------------------
    def maps(self, features: torch.Tensor, encoded_prompt: torch.Tensor) -> Maps:
        """Anomaly maps for features (N, C, h, w) given encoded prompt tokens (N, hw, dim)."""
        features = self.standardize(features)
        recon = self.reconstruct(self._encode(features), encoded_prompt)
        error = recon - features
        size = self.config.image_size
        s_rec = upsample(error.norm(dim=1), size)
        refined = torch.sigmoid(self.refiner(error.abs(), size))[:, 0]
        return Maps(reconstruction=s_rec, refiner=refined)


def upsample(grid_map: torch.Tensor, size: int) -> torch.Tensor:
    """(N, h, w) feature-grid map → (N, size, size), bilinear with aligned corners (official)."""
    return F.interpolate(grid_map.unsqueeze(1), size=(size, size), mode="bilinear", align_corners=True)[:, 0]


def dice_loss(logits: torch.Tensor, masks: torch.Tensor, smooth: float, factor: float) -> torch.Tensor:
    """1 − (factor·Σpt + smooth) / (Σp² + Σt² + smooth), per sample, averaged."""
    p = torch.sigmoid(logits).flatten(1)
    t = masks.flatten(1)
    num = factor * (p * t).sum(1) + smooth
    den = (p * p).sum(1) + (t * t).sum(1) + smooth
    return (1.0 - num / den).mean()


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
