"""The PyTorch predictor: backbone → retrieval → cached prompt tokens → maps → fused map and image score."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np
import torch

from .config import ModelConfig
from .model.anomaly_map import Maps, fuse, image_scores, upsample
from .model.backbone import FrozenBackbone
from .model.onenip import OneNIP
from .prompts import PromptPool, descriptors, neighbor_distances, retrieve

Array = TypeVar("Array", torch.Tensor, np.ndarray)


@dataclass
class Prediction(Generic[Array]):
    """One batch's results: torch tensors from the ``Predictor``, numpy arrays from every engine
    (``engines.py``; see ``numpy``). Maps are at the network input resolution."""

    fused: Array  # (N, H, W) the fused anomaly map
    scores: Array  # (N,) raw image scores
    prompt_index: Array  # (N,) the prompt each image was scored against
    class_index: Array  # (N,) the routed class: the prompt's class
    similarity: Array  # (N,) cosine similarity of the retrieval descriptor to the chosen prompt's
    seconds: float = 0.0  # the forward pass (engines)
    maps: Maps | None = None  # the maps before fusion (the Predictor only)

    def numpy(self, seconds: float = 0.0) -> Prediction[np.ndarray]:
        """The engines' form: float32 maps, float64 scores and similarities, int64 indices; no maps."""
        def host(t: torch.Tensor) -> np.ndarray:
            return t.cpu().numpy()

        return Prediction(host(self.fused), host(self.scores.double()), host(self.prompt_index), host(self.class_index),
                          host(self.similarity.double()), seconds)


class Predictor:
    """Holds the frozen backbone, the trained OneNIP and the prompt pool whose encoded tokens are
    computed once here and reused for every image."""

    def __init__(self, backbone: FrozenBackbone, model: OneNIP, pool: PromptPool, rec_scale: float,
                 device: str | torch.device = "cpu", alpha: float | None = None, neighbor_weight: float = 0.0,
                 neighbor_scale: float = 1.0) -> None:
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
        self.memory_weight = pool.memory_weight.to(self.device)

    def fuse(self, maps: Maps) -> torch.Tensor:
        """The fused anomaly map with this predictor's calibrated scales and weights."""
        return fuse(maps, self.config, self.rec_scale, self.alpha, self.neighbor_weight, self.neighbor_scale)

    @property
    def class_names(self) -> list[str]:
        return self.pool.class_names

    def to_network_input(self, images: np.ndarray) -> torch.Tensor:
        """uint8 RGB (N, S, S, 3) at the model's image size → the network input (N, 3, S, S)."""
        return self.backbone.to_network_input(torch.from_numpy(np.ascontiguousarray(images)))

    @torch.inference_mode()
    def features(self, images: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """OneNIP's fused features and the nearest-neighbour map's patch features of uint8 RGB images."""
        return self.features_of(self.to_network_input(images))

    def features_of(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``features`` of network inputs (N, 3, S, S)."""
        return self.backbone.with_patches(inputs, self.config.neighbor_stride,
                                         self.config.neighbor_coarse_weight)

    @torch.inference_mode()
    def predict(self, images: np.ndarray, given_class: torch.Tensor | None = None) -> Prediction[torch.Tensor]:
        """Score uint8 RGB images (N, S, S, 3). ``given_class`` (N,) fixes each image's class (oracle
        or caller-given; -1 = retrieve it); None retrieves every image's class from the prompt pool."""
        return self.predict_features(*self.features(images), given_class)

    @torch.inference_mode()
    def predict_features(self, feats: torch.Tensor, patch_feats: torch.Tensor,
                         given_class: torch.Tensor | None = None) -> Prediction[torch.Tensor]:
        if given_class is not None:
            given_class = given_class.to(self.device)
        with torch.autocast(self.device.type, enabled=False):  # near-equal prompts of a class: decide in float32
            prompt_index, similarity = retrieve(descriptors(feats.float()), self.prompt_descriptors, self.pool_class,
                                                given_class)
        class_index = self.pool_class[prompt_index]
        maps = self.model.maps(feats, self.prompt_tokens[prompt_index])
        neighbor = neighbor_distances(patch_feats, self.memory, self.memory_class, class_index,
                                      memory_weight=self.memory_weight, neighbor_pool=self.pool.neighbor_pool)
        maps.neighbor = upsample(neighbor, self.config.image_size)
        fused = self.fuse(maps)
        return Prediction(fused=fused, scores=image_scores(fused, self.config.score_pool), prompt_index=prompt_index,
                          class_index=class_index, similarity=similarity, maps=maps)
