"""A class's normal images into the prompt pool, and each of them scored out of fold.

One path for training's final step and ``add-class``: ``enrol_class`` encodes a class's normals
(fused features for its prompts, patch features for its memory, rotated copies of few normals, one
coreset of them all, density weights where that coreset is of few normals and their copies), once
per candidate neighbourhood of the memory's patches (``ModelConfig.neighbor_pool``), scores each
out of fold and keeps the one whose nearest-neighbour map separates the class's normals from their
synthetic defects best (``calibration.neighbor_separation``; ties keep the smaller);
``Enrolment.pool`` gives the class as a subset of its normals gives it; ``score_out_of_fold`` scores
every calibration normal by a pool of the *other* normals (k folds), so no normal is calibrated
against its own prompts or patches.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from .calibration import CalibrationMaps, neighbor_separation, score_normals
from .config import ModelConfig
from .data.images import rotate_image
from .data.synthesis import Synthesizer
from .model.backbone import FrozenBackbone
from .predictor import Predictor
from .prompts import (
    NEIGHBOR_POOLS,
    PromptPool,
    aggregate,
    class_memory_weight,
    descriptors,
    patches,
    rotation_angles,
    select_prompts,
    subsample,
)

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
    neighbor_pool: int = 1  # the memory's patches are averaged over this neighbourhood (``prompts.aggregate``)
    separation: dict[int, float] | None = None  # ``neighbor_separation`` per candidate neighbourhood

    def pool(self, base: PromptPool | None = None, rows: np.ndarray | None = None) -> PromptPool:
        """``base`` (default: an empty pool) plus this class as the normals ``rows`` (default all)
        give it: their covering prompts and their patches of the memory."""
        rows = torch.arange(len(self.ids)) if rows is None else torch.as_tensor(rows)
        chosen = rows[select_prompts(descriptors(self.features[rows]), self.prompts_per_class)].tolist()
        memory = self.memory[torch.isin(self.memory_image, rows)]
        base = base or PromptPool([], [], torch.zeros(0, dtype=torch.int64), self.features[:0].float())
        return base.with_class(self.name, [self.ids[i] for i in chosen], self.features[chosen].float(), memory,
                               class_memory_weight(memory, self.weighted), self.neighbor_pool)


@torch.inference_mode()
def encode(backbone: FrozenBackbone, config: ModelConfig, images: np.ndarray,
           batch: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused and patch features of uint8 RGB ``images``, ``batch`` at a time."""
    def encoded(chunk: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = backbone.to_network_input(torch.from_numpy(np.ascontiguousarray(chunk)))
        return backbone.with_patches(inputs, config.neighbor_stride, config.neighbor_coarse_weight)

    parts = [encoded(images[i : i + batch]) for i in range(0, len(images), batch)]
    return torch.cat([p[0] for p in parts]).float(), torch.cat([p[1] for p in parts]).float()


CandidateMaps = Callable[[Enrolment, np.random.Generator], CalibrationMaps]  # a candidate's out-of-fold maps


def enrol_class(backbone: FrozenBackbone, config: ModelConfig, name: str, ids: list[str], images: np.ndarray,
                prompts_per_class: int, memory_cap: int, rotation_budget: int, seed: int, score: CandidateMaps,
                rng: np.random.Generator) -> tuple[Enrolment, CalibrationMaps]:
    """Encode a class's normals (see the module docstring; ``memory_cap`` 0 keeps every patch) and
    score each candidate enrolment with ``score(enrolment, rng)``, every candidate from the same
    ``rng`` state (same folds, same synthetic defects); ``rng`` ends as the kept one left it.
    Returns the kept enrolment (its ``separation`` filled in) and its maps."""
    features, patch_features, angles = encode_normals(backbone, config, images, rotation_budget)
    sizes = NEIGHBOR_POOLS if config.neighbor_pool == "auto" else (int(config.neighbor_pool),)
    start, results = rng.bit_generator.state, {}
    for size in sizes:
        rng.bit_generator.state = start
        enrolment = enrol_features(name, ids, features, patch_features, prompts_per_class, memory_cap, seed, angles,
                                   size)
        results[size] = (enrolment, score(enrolment, rng), rng.bit_generator.state)
    separation = {size: neighbor_separation(maps, config) for size, (_, maps, _) in results.items()}
    kept = max(sizes, key=lambda size: (np.nan_to_num(separation[size], nan=-1.0), -size))
    enrolment, maps, rng.bit_generator.state = results[kept]
    enrolment.separation = separation
    return enrolment, maps


def neighbor_pool_summary(enrolment: Enrolment) -> dict:
    """The kept neighbourhood and every candidate's separation, as the bundle's training summary keeps them."""
    return {"kept": enrolment.neighbor_pool,
            "separation": {str(k): round(float(v), 4) if np.isfinite(v) else None
                           for k, v in (enrolment.separation or {}).items()}}


def encode_normals(backbone: FrozenBackbone, config: ModelConfig, images: np.ndarray,
                   rotation_budget: int) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """A class's normals' fused features, the patch features of them and then of their rotated
    copies (``rotation_angles``, image-major within each angle), and those angles."""
    features, patch_features = encode(backbone, config, images)
    angles = rotation_angles(len(images), rotation_budget)
    if angles:
        rotated = np.stack([rotate_image(image, angle) for angle in angles for image in images])
        patch_features = torch.cat([patch_features, encode(backbone, config, rotated)[1]])
    return features, patch_features, angles


def enrol_features(name: str, ids: list[str], features: torch.Tensor, patch_features: torch.Tensor,
                   prompts_per_class: int, memory_cap: int, seed: int, rotations: list[float] = (),
                   neighbor_pool: int = 1) -> Enrolment:
    """A class's enrolment from encoded normals: ``patch_features`` holds the normals', then their
    copies' at each of ``rotations`` in turn; the memory is a coreset of their patches averaged over
    ``neighbor_pool``."""
    if len(patch_features) != len(ids) * (1 + len(rotations)):
        raise ValueError("enrolment: patch features do not match the normals and their rotated copies")
    bank = patches(aggregate(patch_features, neighbor_pool))
    kept = subsample(bank, memory_cap, seed)
    per_image = len(bank) // len(patch_features)
    return Enrolment(name, list(ids), features, bank[kept], (kept // per_image) % len(ids), prompts_per_class,
                     bool(rotations) and len(kept) < len(bank), list(rotations), neighbor_pool)


def score_out_of_fold(predictor: Predictor, enrolment: Enrolment, images: np.ndarray, fresh: np.ndarray,
                      synthesizer: Synthesizer, rng: np.random.Generator,
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
