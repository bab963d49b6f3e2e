"""A small synthetic multi-class inspection set in the MVTec AD layout (deterministic, with masks).

Three product classes — ``woven`` (a woven texture), ``washer`` (a round machined part) and
``label`` (a printed label) — with scratches, dents, stains and missing pieces whose masks are
exactly the painted pixels. It is synthetic: good for a demo and tests, not for accuracy claims.
"""
from __future__ import annotations

import os

import cv2
import numpy as np

CLASSES = ("woven", "washer", "label")
DEFECTS = ("scratch", "stain", "missing")


def _woven(rng: np.random.Generator, size: int) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    period = 12 + rng.uniform(-0.5, 0.5)
    warp = np.sin(2 * np.pi * x / period) * np.sin(2 * np.pi * y / period)
    base = np.array([150, 120, 80], np.float32) + rng.normal(0, 4, 3)
    img = base[None, None, :] * (0.8 + 0.2 * warp[..., None]) + rng.normal(0, 3, (size, size, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def _washer(rng: np.random.Generator, size: int) -> np.ndarray:
    img = np.full((size, size, 3), 40, np.uint8) + rng.integers(0, 6, (size, size, 3), dtype=np.uint8)
    c = (size // 2 + int(rng.integers(-2, 3)), size // 2 + int(rng.integers(-2, 3)))
    cv2.circle(img, c, int(size * 0.38), (185, 185, 190), -1, lineType=cv2.LINE_AA)
    cv2.circle(img, c, int(size * 0.15), (40, 40, 40), -1, lineType=cv2.LINE_AA)
    cv2.circle(img, c, int(size * 0.30), (150, 150, 158), 2, lineType=cv2.LINE_AA)
    return img


def _label(rng: np.random.Generator, size: int) -> np.ndarray:
    img = np.full((size, size, 3), 235, np.uint8)
    cv2.rectangle(img, (size // 8, size // 6), (size * 7 // 8, size * 5 // 6), (30, 60, 160), 2)
    for i, word in enumerate(("ONENIP", "LOT 42", "QC OK")):
        cv2.putText(img, word, (size // 5, size // 3 + i * size // 5), cv2.FONT_HERSHEY_SIMPLEX, size / 320, (20, 20, 20), 1, cv2.LINE_AA)
    shift = rng.integers(-1, 2, 2)
    return np.roll(img, tuple(int(s) for s in shift), axis=(0, 1))


_MAKERS = {"woven": _woven, "washer": _washer, "label": _label}


def add_defect(image: np.ndarray, kind: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Paint a defect; returns the image and the boolean mask of the changed pixels."""
    size = image.shape[0]
    paint = np.zeros((size, size), np.uint8)
    cx, cy = (int(v) for v in rng.integers(size // 4, 3 * size // 4, 2))
    if kind == "scratch":
        angle = rng.uniform(0, np.pi)
        length = rng.uniform(0.15, 0.3) * size
        dx, dy = int(np.cos(angle) * length), int(np.sin(angle) * length)
        cv2.line(paint, (cx - dx, cy - dy), (cx + dx, cy + dy), 255, max(2, size // 60))
        colour = (250, 250, 250)
    elif kind == "stain":
        axes = (int(rng.uniform(0.05, 0.1) * size), int(rng.uniform(0.03, 0.07) * size))
        cv2.ellipse(paint, (cx, cy), axes, float(rng.uniform(0, 180)), 0, 360, 255, -1)
        colour = (90, 60, 20)
    else:  # missing piece
        r = int(rng.uniform(0.06, 0.1) * size)
        cv2.rectangle(paint, (cx - r, cy - r), (cx + r, cy + r), 255, -1)
        colour = (0, 0, 0)
    mask = paint > 0
    out = image.copy()
    out[mask] = (0.25 * out[mask] + 0.75 * np.array(colour)).astype(np.uint8)
    mask &= np.any(out != image, axis=-1)
    return out, mask


def write_demo_dataset(root: str, size: int = 128, train_per_class: int = 40, test_good: int = 8, test_per_defect: int = 4, seed: int = 0) -> str:
    """Write the set under ``root`` (MVTec AD layout); returns ``root``. Same seed, same bytes."""
    rng = np.random.default_rng(seed)
    for cls in CLASSES:
        make = _MAKERS[cls]
        jobs = [("train/good", None, i) for i in range(train_per_class)]
        jobs += [("test/good", None, i) for i in range(test_good)]
        jobs += [(f"test/{d}", d, i) for d in DEFECTS for i in range(test_per_defect)]
        for folder, defect, i in jobs:
            img = make(rng, size)
            name = f"{i:03d}.png"
            os.makedirs(os.path.join(root, cls, folder), exist_ok=True)
            if defect:
                img, mask = add_defect(img, defect, rng)
                mdir = os.path.join(root, cls, "ground_truth", defect)
                os.makedirs(mdir, exist_ok=True)
                cv2.imwrite(os.path.join(mdir, f"{i:03d}_mask.png"), mask.astype(np.uint8) * 255)
            cv2.imwrite(os.path.join(root, cls, folder, name), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    return root
