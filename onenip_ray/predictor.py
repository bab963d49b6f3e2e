"""Inference: backbone → retrieval → cached prompt tokens → maps → fused map and image score."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .config import ModelConfig
from .model.backbone import FrozenBackbone
from .model.onenip import Maps, OneNIP, fuse, image_scores, upsample
from .prompts import PromptPool, descriptors, neighbor_distances, retrieve


@dataclass
class Prediction:
    """Batch outputs; maps are at the network input resolution."""

    fused: torch.Tensor  # (N, H, W)
    reconstruction: torch.Tensor  # (N, H, W)
    refiner: torch.Tensor  # (N, H, W)
    neighbor: torch.Tensor  # (N, H, W); zeros where the class has no memory
    scores: torch.Tensor  # (N,)
    prompt_index: torch.Tensor  # (N,)
    class_index: torch.Tensor  # (N,)
    similarity: torch.Tensor  # (N,) cosine similarity of the retrieval descriptor to the chosen prompt's


class Predictor:
    """Holds the frozen backbone, the trained OneNIP and the prompt pool whose encoded tokens are
    computed once here and reused for every image."""

    def __init__(self, backbone: FrozenBackbone, model: OneNIP, pool: PromptPool, rec_scale: float, device: str | torch.device = "cpu",
                 alpha: float | None = None, neighbor_weight: float = 0.0, neighbor_scale: float = 1.0) -> None:
        self.device = torch.device(device)
        self.backbone = backbone.to(self.device).eval()
        self.model = model.to(self.device).eval()
        self.pool = pool
        self.config: ModelConfig = model.config
        self.rec_scale = float(rec_scale)
        self.alpha = self.config.alpha if alpha is None else float(alpha)
        self.neighbor_weight, self.neighbor_scale = float(neighbor_weight), float(neighbor_scale)
        self.set_pool(pool)

    def set_pool(self, pool: PromptPool) -> None:
        """Use ``pool``: its prompts are encoded here, once."""
        self.pool = pool
        with torch.inference_mode():
            feats = pool.features.to(self.device)
            self.prompt_tokens = self.model.encode(feats)
            self.prompt_descriptors = descriptors(feats)
        self.pool_class = pool.class_index.to(self.device)
        self.memory, self.memory_class = pool.memory.to(self.device), pool.memory_class.to(self.device)

    def fuse(self, maps: Maps) -> torch.Tensor:
        """The fused anomaly map with this predictor's calibrated scales and weights."""
        return fuse(maps, self.config, self.rec_scale, self.alpha, self.neighbor_weight, self.neighbor_scale)

    @property
    def class_names(self) -> list[str]:
        return self.pool.class_names

    def to_input(self, images: np.ndarray) -> torch.Tensor:
        """uint8 RGB (N, S, S, 3) at the model's image size → normalised (N, 3, S, S)."""
        return self.backbone.to_network_input(torch.from_numpy(np.ascontiguousarray(images)))

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
        with torch.autocast(self.device.type, enabled=False):  # near-equal prompts of a class: decide in float32
            prompt_index, similarity = retrieve(descriptors(feats.float()), self.prompt_descriptors, self.pool_class, class_index)
        routed = self.pool_class[prompt_index]
        maps = self.model.maps(feats, self.prompt_tokens[prompt_index])
        maps.neighbor = upsample(neighbor_distances(feats, self.memory, self.memory_class, routed), self.config.image_size)
        fused = self.fuse(maps)
        return Prediction(
            fused=fused,
            reconstruction=maps.reconstruction,
            refiner=maps.refiner,
            neighbor=maps.neighbor,
            scores=image_scores(fused, self.config.score_pool),
            prompt_index=prompt_index,
            class_index=routed,
            similarity=similarity,
        )
