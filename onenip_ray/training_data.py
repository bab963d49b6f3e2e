"""Training images in memory: decoded once, split into training / calibration / prompt images."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from . import storage
from .data.images import decode_for_size
from .data.layouts import Sample, read_datasets
from .errors import InputError
from .formats import DATASET_KINDS

MIN_CALIBRATION_IMAGES = 5  # below this a threshold is a guess (see calibration.py)


def parse_data_roots(default_kind: str, data: list[str] | tuple[str, ...]) -> list[tuple[str, str]]:
    """Dataset roots as ``(kind, root)``: ``ROOT`` uses ``default_kind``; ``KIND=ROOT`` overrides it per root."""
    roots = []
    for item in data:
        kind, sep, root = item.partition("=")
        if sep and kind in DATASET_KINDS:
            roots.append((kind, root))
        else:
            roots.append((default_kind, item))
    for kind, _ in roots:
        if kind not in DATASET_KINDS:
            raise InputError(f"unknown dataset kind {kind!r}; choose from {DATASET_KINDS}")
    if not roots:
        raise InputError("no dataset root given (--data ROOT)")
    return roots


def load_images(samples: list[Sample], size: int, endpoint: str | None = None, threads: int = 4) -> np.ndarray:
    """Decode and square-resize images as scoring does (``decode_for_size``: uint8 RGB,
    (N, size, size, 3)); errors name the file."""

    def load(s: Sample) -> np.ndarray:
        return decode_for_size(storage.read_bytes(s.uri, endpoint), size, name=s.uri)[0]

    with ThreadPoolExecutor(threads) as pool:
        return np.stack(list(pool.map(load, samples))) if samples else np.zeros((0, size, size, 3), np.uint8)


@dataclass
class TrainingSet:
    """``images`` of all training normals; index lists into it per role."""

    class_names: list[str]
    samples: list[Sample]
    images: np.ndarray
    class_ids: np.ndarray  # class index (into ``class_names``) per image
    train_index: np.ndarray  # queries (and training prompts)
    calibration_index: np.ndarray  # held out for thresholds

    def ids(self, index: np.ndarray) -> list[str]:
        return [self.samples[i].uri for i in index]


def build_training_set(
    roots: list[tuple[str, str]],
    classes: list[str] | None,
    image_size: int,
    calibration_fraction: float,
    seed: int,
    endpoint: str | None = None,
) -> TrainingSet:
    """Read the training split and hold out ``calibration_fraction`` of each class for
    calibration: at least ``MIN_CALIBRATION_IMAGES``, at most half of the class."""
    samples = [s for s in read_datasets(roots, classes or None, endpoint) if s.split == "train"]
    names = sorted({s.class_name for s in samples})
    class_ids = np.array([names.index(s.class_name) for s in samples], dtype=np.int64)
    rng = np.random.default_rng(seed)
    train, calib = [], []
    for c in range(len(names)):
        idx = rng.permutation(np.flatnonzero(class_ids == c))
        wanted = max(MIN_CALIBRATION_IMAGES, int(round(calibration_fraction * len(idx))))
        n_cal = min(len(idx) // 2, wanted) if calibration_fraction > 0 else 0
        calib.extend(idx[:n_cal])
        train.extend(idx[n_cal:])
    return TrainingSet(
        class_names=names,
        samples=samples,
        images=load_images(samples, image_size, endpoint),
        class_ids=class_ids,
        train_index=np.sort(np.array(train, dtype=np.int64)),
        calibration_index=np.sort(np.array(calib, dtype=np.int64)),
    )
