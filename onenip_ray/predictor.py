"""Inference: backbone → retrieval → cached prompt tokens → maps → fused map and image score."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .config import ModelConfig
from .model.backbone import FrozenBackbone
from .model.onenip import OneNIP, fuse, image_scores
from .prompts import PromptPool, descriptors, retrieve


@dataclass
class Prediction:
    """Batch outputs; maps are at the network input resolution."""

    fused: torch.Tensor  # (N, H, W)
    reconstruction: torch.Tensor  # (N, H, W)
    refiner: torch.Tensor  # (N, H, W)
    scores: torch.Tensor  # (N,)
    prompt_index: torch.Tensor  # (N,)
    class_index: torch.Tensor  # (N,)


class Predictor:
    """Holds the frozen backbone, the trained OneNIP and the prompt pool whose encoded tokens are
    computed once here and reused for every image."""

    def __init__(self, backbone: FrozenBackbone, model: OneNIP, pool: PromptPool, rec_scale: float, device: str | torch.device = "cpu",
                 alpha: float | None = None) -> None:
        self.device = torch.device(device)
        self.backbone = backbone.to(self.device).eval()
        self.model = model.to(self.device).eval()
        self.pool = pool
        self.config: ModelConfig = model.config
        self.rec_scale = float(rec_scale)
        self.alpha = self.config.alpha if alpha is None else float(alpha)
        with torch.inference_mode():
            feats = pool.features.to(self.device)
            self.prompt_tokens = self.model.encode(feats)
            self.prompt_descriptors = descriptors(feats)
        self.pool_class = pool.class_index.to(self.device)

    @property
    def class_names(self) -> list[str]:
        return self.pool.class_names

    def to_input(self, images: np.ndarray) -> torch.Tensor:
        """uint8 RGB (N, S, S, 3) at the model's image size → normalised (N, 3, S, S)."""
        return self.backbone.normalize(torch.from_numpy(np.ascontiguousarray(images)))

    @torch.inference_mode()
    def features(self, images: np.ndarray) -> torch.Tensor:
        return self.backbone(self.to_input(images))

    @torch.inference_mode()
    def predict(self, images: np.ndarray, class_index: torch.Tensor | None = None) -> Prediction:
        """Score uint8 RGB images (N, S, S, 3). ``class_index`` (N,) fixes the class (oracle or
        caller-given); otherwise the class is retrieved from the prompt pool."""
        return self.predict_features(self.features(images), class_index)

    @torch.inference_mode()
    def predict_features(self, feats: torch.Tensor, class_index: torch.Tensor | None = None) -> Prediction:
        if class_index is not None:
            class_index = class_index.to(self.device)
        prompt_index = retrieve(descriptors(feats), self.prompt_descriptors, self.pool_class, class_index)
        maps = self.model.maps(feats, self.prompt_tokens[prompt_index])
        fused = fuse(maps, self.config, self.rec_scale, self.alpha)
        return Prediction(
            fused=fused,
            reconstruction=maps.reconstruction,
            refiner=maps.refiner,
            scores=image_scores(fused, self.config.score_pool),
            prompt_index=prompt_index,
            class_index=self.pool_class[prompt_index],
        )
