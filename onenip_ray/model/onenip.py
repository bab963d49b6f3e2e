"""OneNIP's trainable part: projections, reconstruction transformer and refiner. The frozen backbone
lives in ``backbone.py``, the training loss in ``loss.py``, fusion and image scores in ``anomaly_map.py``."""
from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from .anomaly_map import Maps, upsample
from .refiner import Refiner
from .transformer import ReconstructionTransformer


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
    def forward(self, clean: torch.Tensor, synthetic: torch.Tensor, prompt: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training pass (the loss is ``loss.training_losses``): ``clean`` and ``synthetic`` features
        (N, C, h, w) reconstructed guided by ``prompt``. Returns the reconstructions (2N, C, h, w),
        their target (``clean`` twice) and the refiner logits (2N, H, W), clean stream first."""
        n = clean.shape[0]
        clean, synthetic, prompt = self.standardize(clean), self.standardize(synthetic), self.standardize(prompt)
        encoded = self._encode(torch.cat([clean, synthetic, prompt]))
        queries, prompts = encoded[: 2 * n], encoded[2 * n :]
        reconstruction = self.reconstruct(queries, prompts.repeat(2, 1, 1))
        observed = torch.cat([clean, synthetic])
        logits = self.refiner((reconstruction - observed).abs(), self.config.image_size)[:, 0]
        return reconstruction, torch.cat([clean, clean]), logits

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

