"""A class's normal images into the prompt pool, and each of them scored out of fold.

One path for training's final step and ``add-class``: ``enrol`` encodes a class's normals (fused
features for its prompts, patch features for its memory, rotated copies of few normals, one
coreset of them all, density weights where that coreset is of few normals and their copies);
``Enrolment.pool`` gives the class as a subset of its normals gives it; ``score_out_of_fold`` scores
every calibration normal by a pool of the *other* normals (k folds), so no normal is calibrated
against its own prompts or patches.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .calibration import CalibrationMaps, score_normals
from .config import ModelConfig
from .data.images import rotate_image
from .data.synthesis import AnomalySynthesizer
from .model.backbone import FrozenBackbone
from .predictor import Predictor
from .prompts import PromptPool, class_memory_weight, descriptors, patches, rotation_angles, select_prompts, subsample

MAX_FOLDS = 10
MAX_CALIBRATION_NORMALS = 200  # normals per class scored for calibration (fresh ones first)


@dataclass
class Enrolment:
    """A class's normals encoded: ``features`` (n, C, h, w) for prompts; the memory coreset
    ``memory`` (M, C) with ``memory_image`` (M,), the normal each kept patch (or its copy's) is of."""

    name: str
    ids: list[str]
    features: torch.Tensor
    memory: torch.Tensor
    memory_image: torch.Tensor
    prompts_per_class: int
    weighted: bool  # density weights on the memory (a coreset of few normals and their copies)
    rotations: list[float]

    def pool(self, base: PromptPool | None = None, rows: np.ndarray | None = None) -> PromptPool:
        """``base`` (default: an empty pool) plus this class as the normals ``rows`` (default all)
        give it: their covering prompts and their patches of the memory."""
        rows = torch.arange(len(self.ids)) if rows is None else torch.as_tensor(rows)
        chosen = rows[select_prompts(descriptors(self.features[rows]), self.prompts_per_class)].tolist()
        memory = self.memory[torch.isin(self.memory_image, rows)]
        base = base or PromptPool([], [], torch.zeros(0, dtype=torch.int64), self.features[:0].float())
        return base.with_class(self.name, [self.ids[i] for i in chosen], self.features[chosen].float(), memory,
                               class_memory_weight(memory, self.weighted))


@torch.inference_mode()
def encode(backbone: FrozenBackbone, config: ModelConfig, images: np.ndarray,
           batch: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused and patch features of uint8 RGB ``images``, ``batch`` at a time."""
    def encoded(chunk: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = backbone.to_network_input(torch.from_numpy(np.ascontiguousarray(chunk)))
        return backbone.with_patches(inputs, config.neighbor_stride, config.neighbor_coarse_weight)

    parts = [encoded(images[i : i + batch]) for i in range(0, len(images), batch)]
    return torch.cat([p[0] for p in parts]).float(), torch.cat([p[1] for p in parts]).float()


def enrol(backbone: FrozenBackbone, config: ModelConfig, name: str, ids: list[str], images: np.ndarray,
          prompts_per_class: int, memory_cap: int, rotation_budget: int, seed: int) -> Enrolment:
    """Encode a class's normals (see the module docstring); ``memory_cap`` 0 keeps every patch."""
    features, patch_features = encode(backbone, config, images)
    angles = rotation_angles(len(images), rotation_budget)
    if angles:  # image-major within each angle, after the normals
        rotated = np.stack([rotate_image(image, angle) for angle in angles for image in images])
        patch_features = torch.cat([patch_features, encode(backbone, config, rotated)[1]])
    return enrol_features(name, ids, features, patch_features, prompts_per_class, memory_cap, seed, angles)


def enrol_features(name: str, ids: list[str], features: torch.Tensor, patch_features: torch.Tensor,
                   prompts_per_class: int, memory_cap: int, seed: int, rotations: list[float] = ()) -> Enrolment:
    """``enrol`` from encoded normals: ``patch_features`` holds the normals', then their copies' at
    each of ``rotations`` in turn."""
    if len(patch_features) != len(ids) * (1 + len(rotations)):
        raise ValueError("enrolment: patch features do not match the normals and their rotated copies")
    bank = patches(patch_features)
    kept = subsample(bank, memory_cap, seed)
    per_image = len(bank) // len(patch_features)
    return Enrolment(name, list(ids), features, bank[kept], (kept // per_image) % len(ids), prompts_per_class,
                     bool(rotations) and len(kept) < len(bank), list(rotations))


def score_out_of_fold(predictor: Predictor, enrolment: Enrolment, images: np.ndarray, fresh: np.ndarray,
                      synthesizer: AnomalySynthesizer, rng: np.random.Generator,
                      scored: np.ndarray | None = None) -> CalibrationMaps:
    """Maps of the normals ``scored`` (default all) of ``images`` (the enrolment's normals), in order, each by
    a pool of this class from the other normals (``MAX_FOLDS`` folds), then of a synthetic copy of
    each ``fresh`` one. Leaves ``predictor`` on the last fold's pool: set the full one after."""
    n = len(images)
    scored = np.arange(n) if scored is None else np.asarray(scored)
    parts, order = [], []
    for held in np.array_split(rng.permutation(n), min(MAX_FOLDS, n)):
        rows = np.sort(held[np.isin(held, scored)])
        if len(rows):
            predictor.set_pool(enrolment.pool(rows=np.setdiff1d(np.arange(n), held)))
            parts.append(score_normals(predictor, enrolment.name, images[rows], fresh[rows], synthesizer, rng))
            order.append(rows)
    return CalibrationMaps.join(parts).take(np.argsort(np.concatenate(order)))


def calibration_rows(fresh: np.ndarray, rng: np.random.Generator, cap: int = MAX_CALIBRATION_NORMALS) -> np.ndarray:
    """Which of a class's normals calibrate it: ``cap`` of them drawn at random, fresh ones first."""
    fresh = np.asarray(fresh, dtype=bool)
    order = np.concatenate([rng.permutation(np.flatnonzero(fresh)), rng.permutation(np.flatnonzero(~fresh))])
    return np.sort(order[:cap])
