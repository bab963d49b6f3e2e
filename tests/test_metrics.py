"""Metrics vs scikit-learn and a slow reference AUPRO."""
from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from onenip_ray.metrics import (
    class_metrics,
    f1_max,
    image_ap,
    image_auroc,
    pixel_ap,
    pixel_aupro,
    pixel_auroc,
    summarize,
)


def _sk_f1_max(labels, scores):
    p, r, _ = precision_recall_curve(labels, scores)
    f1 = np.divide(2 * p * r, p + r, out=np.zeros_like(p), where=(p + r) > 0)
    return f1.max()


def _cases():
    rng = np.random.default_rng(0)
    for n in (2, 7, 50, 333):
        y = rng.random(n) < 0.4
        y[0], y[1] = True, False
        yield y, rng.normal(size=n) + y  # continuous
        yield y, rng.integers(0, 4, size=n).astype(float)  # heavy ties
        yield y.astype(int), rng.integers(0, 2, size=n)  # binary integer scores


@pytest.mark.parametrize("case", list(_cases()))
def test_image_metrics_match_sklearn(case):
    y, s = case
    assert image_auroc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-9)
    assert image_ap(y, s) == pytest.approx(average_precision_score(y, s), abs=1e-9)
    assert f1_max(y, s) == pytest.approx(_sk_f1_max(y, s), abs=1e-9)


def test_auroc_below_half_is_not_flipped():
    y = np.array([0, 0, 1, 1, 0, 1])
    s = np.array([0.9, 0.8, 0.1, 0.3, 0.7, 0.2])
    assert image_auroc(y, s) == pytest.approx(0.0)
    s[2] = 0.95
    auc = image_auroc(y, s)
    assert auc == pytest.approx(roc_auc_score(y, s)) and auc < 0.5


def test_single_class_is_nan():
    s = np.array([0.1, 0.5, 0.3])
    for y in (np.zeros(3), np.ones(3)):
        for fn in (image_auroc, image_ap, f1_max):
            assert math.isnan(fn(y, s))
    assert math.isnan(pixel_aupro(np.zeros((2, 4, 4)), np.ones((2, 4, 4))))


def _blob_masks(rng, n, h, w):
    masks = np.zeros((n, h, w), bool)
    for i in range(n - 1):  # last image normal
        for _ in range(rng.integers(1, 4)):
            y0, x0 = rng.integers(0, h - 6), rng.integers(0, w - 6)
            masks[i, y0 : y0 + rng.integers(1, 7), x0 : x0 + rng.integers(1, 7)] = True
    return masks


def test_pixel_metrics_match_sklearn():
    rng = np.random.default_rng(1)
    masks = _blob_masks(rng, 6, 48, 48)
    maps = (rng.random(masks.shape) + 0.7 * masks).astype(np.float32)
    maps[::2] = np.round(maps[::2], 1)  # ties
    y, s = masks.ravel(), maps.ravel()
    assert pixel_auroc(masks, maps) == pytest.approx(roc_auc_score(y, s), abs=1e-9)
    assert pixel_ap(masks.astype(np.uint8), maps) == pytest.approx(
        average_precision_score(y, s), abs=1e-9
    )


def _reference_aupro(masks, maps, fpr_limit=0.3, num_thresholds=200):
    """Slow loop implementation: same thresholds, curve closed at (1, 1), interpolated."""
    masks = masks.astype(bool)
    regions = []
    for mask, amap in zip(masks, maps):
        n, lab = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
        regions += [(amap, lab == c) for c in range(1, n)]
    points = []
    for th in np.linspace(maps.min(), maps.max(), num_thresholds):
        pred = maps > th
        pro = np.mean([(a[r] > th).sum() / r.sum() for a, r in regions])
        fpr = (pred & ~masks).sum() / (~masks).sum()
        points.append((fpr, pro))
    points = sorted(points) + [(1.0, 1.0)]
    area, (x0, y0) = 0.0, points[0]
    for x1, y1 in points[1:]:
        if x1 > fpr_limit:
            y1 = y0 + (fpr_limit - x0) / (x1 - x0) * (y1 - y0)
            area += (fpr_limit - x0) * (y0 + y1) / 2
            break
        area += (x1 - x0) * (y0 + y1) / 2
        x0, y0 = x1, y1
    return area / fpr_limit


def test_aupro_matches_reference():
    rng = np.random.default_rng(2)
    masks = _blob_masks(rng, 4, 32, 32)
    masks[0, 10:13, 10:13] = masks[0, 13, 13] = True  # diagonal touch: one 8-connected region
    maps = rng.random(masks.shape).astype(np.float32) + 0.5 * masks
    maps[1] = np.round(maps[1], 1)
    for limit, n_th in ((0.3, 200), (0.05, 37), (1.0, 10)):
        assert pixel_aupro(masks, maps, limit, n_th) == pytest.approx(
            _reference_aupro(masks, maps, limit, n_th), abs=1e-6
        )


def test_aupro_perfect_and_random():
    rng = np.random.default_rng(3)
    masks = _blob_masks(rng, 5, 64, 64)
    assert pixel_aupro(masks, masks.astype(np.float32)) == pytest.approx(1.0)
    noisy_perfect = masks + 0.5 * rng.random(masks.shape)
    assert pixel_aupro(masks, noisy_perfect) == pytest.approx(1.0)
    assert pixel_aupro(masks, rng.random(masks.shape)) < 0.35


def test_class_metrics_and_summarize():
    rng = np.random.default_rng(4)
    masks = _blob_masks(rng, 5, 32, 32)
    labels = masks.any(axis=(1, 2))
    maps = rng.random(masks.shape) + masks
    out = class_metrics(labels, maps.max(axis=(1, 2)), masks, maps)
    assert list(out) == [
        "image_auroc", "image_ap", "image_f1_max", "pixel_auroc", "pixel_ap", "pixel_aupro",
    ]
    assert all(type(v) is float and 0.0 <= v <= 1.0 for v in out.values())
    assert set(class_metrics(labels, maps.max(axis=(1, 2)))) == {
        "image_auroc", "image_ap", "image_f1_max",
    }

    per_class = {
        "a": {"image_auroc": 0.8, "pixel_aupro": float("nan")},
        "b": {"image_auroc": 0.6, "pixel_aupro": 0.5},
        "c": {"image_auroc": float("nan"), "pixel_aupro": 0.7},
    }
    s = summarize(per_class)
    assert s["image_auroc"] == pytest.approx(0.7)
    assert s["pixel_aupro"] == pytest.approx(0.6)
    assert math.isnan(summarize({"a": {"x": float("nan")}})["x"])
