"""A small synthetic multi-class inspection set in the MVTec AD layout (deterministic, with masks).

Three product classes — ``woven`` (a basket-weave fabric), ``washer`` (a round turned metal part
with a centre hole) and ``label`` (a printed label with text and a barcode) — and four defect
kinds: ``scratch``, ``dent``, ``stain`` and ``missing`` (a piece of the product gone, the
background showing). Every defective image is its defect-free rendering with a defect painted on,
and its mask is exactly the set of pixels where the two differ (``make_sample`` returns all three).

It is synthetic: good for a demo and for tests, not for accuracy claims.
"""
from __future__ import annotations

import os
from collections.abc import Iterator

import cv2
import numpy as np

CLASSES = ("woven", "washer", "label")
DEFECTS = ("scratch", "dent", "stain", "missing")
_BACKGROUND = {"woven": (28, 22, 16), "washer": (38, 38, 42), "label": (70, 72, 78)}  # what "missing" reveals
MIN_DEFECT_FRACTION = 0.002  # a defect covers at least this share of the image (redrawn otherwise)


# -- defect-free renderings (RGB uint8) ------------------------------------------------------------
def _woven(rng: np.random.Generator, size: int) -> np.ndarray:
    """Basket weave: warp and weft threads alternating over/under, shaded across each thread, with
    fibre noise along the threads; a random phase and a slight brightness change per image."""
    period = size / 12.0
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    y += rng.uniform(0, 2 * period)
    x += rng.uniform(0, 2 * period)
    cy, cx = np.floor(y / period), np.floor(x / period)
    fy, fx = (y / period) % 1.0, (x / period) % 1.0
    weft_on_top = ((cy + cx) % 2 == 0)[..., None]
    shade = np.where(weft_on_top[..., 0], np.sin(np.pi * fy), np.sin(np.pi * fx)) ** 0.7
    weft, warp = np.array([176, 140, 92], np.float32), np.array([150, 116, 78], np.float32)
    colour = np.where(weft_on_top, weft, warp)
    noise = rng.normal(0, 1, (size, size)).astype(np.float32)
    fibre = np.where(weft_on_top[..., 0], cv2.blur(noise, (9, 1)), cv2.blur(noise, (1, 9)))
    img = colour * (0.5 + 0.5 * shade[..., None]) * rng.uniform(0.96, 1.04) + 10 * fibre[..., None]
    return np.clip(img, 0, 255).astype(np.uint8)


def _washer_geometry(size: int) -> tuple[float, float]:
    return 0.40 * size, 0.15 * size  # outer, inner radius


def _washer(rng: np.random.Generator, size: int) -> np.ndarray:
    """A turned metal washer on a dark bench: concentric turning marks, a chamfer at the rim, a
    directional highlight; the position and the light direction move a little per image."""
    outer, inner = _washer_geometry(size)
    c = size / 2 + rng.uniform(-1.5, 1.5, 2)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    r = np.hypot(x - c[0], y - c[1])
    theta = np.arctan2(y - c[1], x - c[0])
    light = rng.uniform(-0.3, 0.3) - np.pi / 4
    bench = _BACKGROUND["washer"][0] + 4 * cv2.blur(rng.normal(0, 1, (size, size)).astype(np.float32), (5, 5))
    metal = (150 + 6 * np.sin(2 * np.pi * r / 2.3) + 45 * np.cos(theta - light) ** 8
             - 35 * np.clip((r - (outer - 0.05 * size)) / (0.05 * size), 0, 1))  # darker chamfer
    metal += 2 * rng.normal(0, 1, (size, size))
    cover = np.clip(outer - r + 0.5, 0, 1) * np.clip(r - inner + 0.5, 0, 1)  # anti-aliased ring
    grey = bench * (1 - cover) + metal * cover
    img = np.stack([grey, grey, grey * 1.04], axis=-1)
    return np.clip(img, 0, 255).astype(np.uint8)


def _label(rng: np.random.Generator, size: int) -> np.ndarray:
    """A printed label: paper with a little grain, a blue frame, three text lines, a logo and a
    barcode; shifted by up to a pixel per image."""
    img = np.full((size, size, 3), 236, np.uint8)
    s = size / 128.0
    cv2.rectangle(img, (int(10 * s), int(12 * s)), (int(118 * s), int(116 * s)), (30, 60, 160), max(1, int(2 * s)))
    cv2.circle(img, (int(98 * s), int(32 * s)), int(9 * s), (200, 40, 40), -1, lineType=cv2.LINE_AA)
    for i, word in enumerate(("ONENIP", "LOT 42", "QC OK")):
        cv2.putText(img, word, (int(18 * s), int(38 * s + i * 20 * s)), cv2.FONT_HERSHEY_SIMPLEX, 0.42 * s,
                    (20, 20, 20), max(1, int(s)), cv2.LINE_AA)
    bars = np.random.default_rng(1234).integers(1, 4, 24)  # the same barcode on every label
    x = int(18 * s)
    for i, w in enumerate(bars):
        if i % 2 == 0:
            cv2.rectangle(img, (x, int(88 * s)), (x + int(w * s) - 1, int(106 * s)), (15, 15, 15), -1)
        x += int(w * s)
    paper = img.astype(np.float32) + rng.normal(0, 2.0, (size, size, 1))
    shift = tuple(int(v) for v in rng.integers(-1, 2, 2))
    return np.roll(np.clip(paper, 0, 255).astype(np.uint8), shift, axis=(0, 1))


_MAKERS = {"woven": _woven, "washer": _washer, "label": _label}


def render_good(class_name: str, rng: np.random.Generator, size: int = 128) -> np.ndarray:
    """One defect-free RGB image of ``class_name``."""
    return _MAKERS[class_name](rng, size)


# -- defects ---------------------------------------------------------------------------------------
def _defect_centre(class_name: str, rng: np.random.Generator, size: int) -> tuple[float, float]:
    if class_name == "washer":  # on the metal ring, not in the hole or on the bench
        outer, inner = _washer_geometry(size)
        radius, angle = rng.uniform(inner + 0.06 * size, outer - 0.06 * size), rng.uniform(0, 2 * np.pi)
        return size / 2 + radius * np.cos(angle), size / 2 + radius * np.sin(angle)
    lo, hi = 0.22 * size, 0.78 * size
    return float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi))


def _blob(rng: np.random.Generator, size: int, centre: tuple[float, float], radius: float) -> np.ndarray:
    """An irregular filled polygon (uint8 0/255) around ``centre``."""
    n = int(rng.integers(6, 10))
    angles = np.sort(rng.uniform(0, 2 * np.pi, n))
    radii = radius * rng.uniform(0.55, 1.0, n)
    pts = np.stack([centre[0] + radii * np.cos(angles), centre[1] + radii * np.sin(angles)], axis=1)
    out = np.zeros((size, size), np.uint8)
    cv2.fillPoly(out, [np.round(pts).astype(np.int32)], 255, lineType=cv2.LINE_AA)
    return out


def _paint(class_name: str, image: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    size = image.shape[0]
    img = image.astype(np.float32)
    cx, cy = _defect_centre(class_name, rng, size)
    if kind == "scratch":  # a thin, slightly curved line, bright on metal, dark elsewhere
        angle, length = rng.uniform(0, np.pi), rng.uniform(0.12, 0.25) * size
        d = np.array([np.cos(angle), np.sin(angle)]) * length
        bend = np.array([-d[1], d[0]]) * rng.uniform(-0.25, 0.25)
        t = np.linspace(-1, 1, 24)[:, None]
        pts = np.array([cx, cy]) + t * d + (1 - t**2) * bend
        alpha = np.zeros((size, size), np.uint8)
        cv2.polylines(alpha, [np.round(pts).astype(np.int32)], False, 255, max(1, size // 96), cv2.LINE_AA)
        a = alpha.astype(np.float32)[..., None] / 255.0 * 0.85
        tone = np.array([245, 245, 250] if class_name == "washer" else [35, 30, 28], np.float32)
        img = img * (1 - a) + tone * a
    elif kind == "dent":  # a shallow depression lit from the top left: one side darker, one brighter
        rx, ry = rng.uniform(0.05, 0.09) * size, rng.uniform(0.04, 0.07) * size
        y, x = np.mgrid[0:size, 0:size].astype(np.float32)
        u, v = (x - cx) / rx, (y - cy) / ry
        inside = np.clip(1 - (u**2 + v**2), 0, 1)
        relief = (u + v) / np.sqrt(2) * inside  # slope of the dent along the light direction
        img = img * (1 + 0.8 * relief[..., None])
    elif kind == "stain":  # an irregular translucent brownish blot with soft edges
        blob = cv2.GaussianBlur(_blob(rng, size, (cx, cy), rng.uniform(0.06, 0.11) * size), (0, 0), 1.2)
        a = blob.astype(np.float32)[..., None] / 255.0 * rng.uniform(0.55, 0.75)
        a[a < 0.04] = 0
        img = img * (1 - a) + np.array([95, 70, 30], np.float32) * a
    elif kind == "missing":  # a piece gone: the background shows through
        blob = _blob(rng, size, (cx, cy), rng.uniform(0.07, 0.12) * size)
        a = blob.astype(np.float32)[..., None] / 255.0
        background = np.array(_BACKGROUND[class_name], np.float32) + rng.normal(0, 2.0, (size, size, 1))
        img = img * (1 - a) + background * a
    else:
        raise ValueError(f"unknown defect kind {kind!r}; known: {', '.join(DEFECTS)}")
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def add_defect(image: np.ndarray, kind: str, rng: np.random.Generator,
               class_name: str = "woven") -> tuple[np.ndarray, np.ndarray]:
    """Paint a defect of ``kind`` onto a defect-free RGB image. Returns the defective image and its
    mask: exactly the pixels that differ from ``image``. A defect that would change fewer than
    ``MIN_DEFECT_FRACTION`` of the pixels is drawn again (deterministic in ``rng``)."""
    for _ in range(20):
        out = _paint(class_name, image, kind, rng)
        mask = np.any(out != image, axis=-1)
        if mask.sum() >= MIN_DEFECT_FRACTION * mask.size:
            return out, mask
    raise RuntimeError(f"could not paint a visible {kind} on a {class_name} image")  # pragma: no cover


def make_sample(class_name: str, defect: str | None, rng: np.random.Generator,
                size: int = 128) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """``(clean, image, mask)``: the defect-free rendering, the image to save (``clean`` itself
    when ``defect`` is None) and the boolean defect mask (None for a good image)."""
    clean = render_good(class_name, rng, size)
    if defect is None:
        return clean, clean, None
    image, mask = add_defect(clean, defect, rng, class_name)
    return clean, image, mask


def iter_demo_samples(
    size: int = 128, train_per_class: int = 40, test_good: int = 8, test_per_defect: int = 4, seed: int = 0,
    classes: tuple[str, ...] = CLASSES,
) -> Iterator[tuple[str, str, str, np.ndarray, np.ndarray, np.ndarray | None]]:
    """Every sample of the demo set as ``(class, folder, stem, clean, image, mask)``, ``folder`` as
    in MVTec AD (``train/good``, ``test/good``, ``test/<defect>``); each class has its own random
    stream derived from ``seed``."""
    for ci, cls in enumerate(classes):
        rng = np.random.default_rng([seed, ci])
        jobs = [("train/good", None, i) for i in range(train_per_class)]
        jobs += [("test/good", None, i) for i in range(test_good)]
        jobs += [(f"test/{d}", d, i) for d in DEFECTS for i in range(test_per_defect)]
        for folder, defect, i in jobs:
            clean, image, mask = make_sample(cls, defect, rng, size)
            yield cls, folder, f"{i:03d}", clean, image, mask


def _write_png(path: str, array: np.ndarray) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if array.ndim == 3:
        array = cv2.cvtColor(array, cv2.COLOR_RGB2BGR)
    if not cv2.imwrite(path, array):
        raise OSError(f"cannot write {path}")


def write_demo_dataset(root: str, size: int = 128, train_per_class: int = 40, test_good: int = 8,
                       test_per_defect: int = 4, seed: int = 0) -> str:
    """Write the set under ``root`` in the MVTec AD layout (masks in
    ``<class>/ground_truth/<defect>/<stem>_mask.png``); returns ``root``. Same seed, same bytes."""
    samples = iter_demo_samples(size, train_per_class, test_good, test_per_defect, seed)
    for cls, folder, stem, _clean, image, mask in samples:
        _write_png(os.path.join(root, cls, folder, f"{stem}.png"), image)
        if mask is not None:
            defect = folder.split("/", 1)[1]
            _write_png(os.path.join(root, cls, "ground_truth", defect, f"{stem}_mask.png"), mask.astype(np.uint8) * 255)
    return root


def write_incoming(root: str, size: int = 128, per_class: int = 8, defect_rate: float = 0.25,
                   seed: int = 1) -> list[dict]:
    """A flat folder of new, unlabelled images to score (``<class>-<i>.png``, classes and defects
    mixed), as a nightly batch would find them; returns what was painted (``image``, ``class_name``,
    ``defect`` or None) so a demo can compare. Use a different ``seed`` from the training set."""
    rng = np.random.default_rng([seed, 999])
    truth = []
    for cls in CLASSES:
        for i in range(per_class):
            defect = str(rng.choice(DEFECTS)) if rng.uniform() < defect_rate else None
            _clean, image, _mask = make_sample(cls, defect, rng, size)
            name = f"{cls}-{i:03d}.png"
            _write_png(os.path.join(root, name), image)
            truth.append({"image": name, "class_name": cls, "defect": defect})
    return truth
