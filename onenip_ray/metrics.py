"""Anomaly-detection metrics (image/pixel AUROC, AP, F1-max, AUPRO), vectorised numpy.

All functions return ``float('nan')`` when a metric is undefined: only one class
present (all normal or all anomalous) or, for AUPRO, no anomalous / no normal pixel.
Labels and masks may be bool or numeric (numeric values ``> 0.5`` are anomalous).
AUROC values are never flipped: a detector worse than chance scores below 0.5.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import cv2
import numpy as np

__all__ = [
    "image_auroc",
    "image_ap",
    "f1_max",
    "pixel_auroc",
    "pixel_ap",
    "pixel_aupro",
    "class_metrics",
    "summarize",
]

_NAN = float("nan")


def _as_bool(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    return x if x.dtype == np.bool_ else x > 0.5


def _as_scores(x: np.ndarray) -> np.ndarray:
    s = np.asarray(x)
    if s.dtype.kind not in "biuf":
        raise ValueError(f"scores must be numeric, got dtype {s.dtype}")
    if s.dtype.kind == "f" and np.isnan(s).any():
        raise ValueError("scores contain NaN")
    return s


def clf_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Cumulative (tps, fps) at each distinct score, highest first; None if one class.

    Tied scores form a single operating point, exactly as sklearn's ``roc_curve``;
    this makes the result independent of the order within ties, so the faster
    unstable sort is safe.
    """
    y = _as_bool(labels).ravel()
    s = _as_scores(scores).ravel()
    if y.shape != s.shape:
        raise ValueError(f"labels and scores differ in size: {y.size} vs {s.size}")
    order = np.argsort(s)[::-1]
    s = s[order]
    y = y[order]
    del order
    last = np.flatnonzero(s[1:] != s[:-1])  # last index of each run of equal scores
    last = np.append(last, s.size - 1)
    tps = np.cumsum(y, dtype=np.int64)[last]
    fps = last + 1 - tps
    if s.size == 0 or tps[-1] == 0 or fps[-1] == 0:
        return None
    return tps, fps


def _auroc(curve: tuple[np.ndarray, np.ndarray] | None) -> float:
    if curve is None:
        return _NAN
    tps, fps = (np.concatenate(([0.0], c.astype(np.float64))) for c in curve)
    area2 = np.sum(np.diff(fps) * (tps[1:] + tps[:-1]))  # trapezoid, x2
    return float(area2 / (2.0 * tps[-1] * fps[-1]))


def _ap(curve: tuple[np.ndarray, np.ndarray] | None) -> float:
    """Step-wise average precision: sum over thresholds of delta-recall x precision."""
    if curve is None:
        return _NAN
    tps, fps = (c.astype(np.float64) for c in curve)
    precision = tps / (tps + fps)
    return float(np.sum(np.diff(tps, prepend=0.0) * precision) / tps[-1])


def _f1_max(curve: tuple[np.ndarray, np.ndarray] | None) -> float:
    if curve is None:
        return _NAN
    tps, fps = (c.astype(np.float64) for c in curve)
    # F1 = 2PR / (P + R) = 2 tp / (tp + fp + #positives)
    return float(np.max(2.0 * tps / (tps + fps + tps[-1])))


def image_auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve of image scores (1 = anomalous label)."""
    return _auroc(clf_curve(labels, scores))


def image_ap(labels: np.ndarray, scores: np.ndarray) -> float:
    """Average precision of image scores (sklearn ``average_precision_score``)."""
    return _ap(clf_curve(labels, scores))


def f1_max(labels: np.ndarray, scores: np.ndarray) -> float:
    """Maximum F1 over all thresholds of the precision-recall curve."""
    return _f1_max(clf_curve(labels, scores))


def _pixels(masks: np.ndarray, maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    m, a = np.asarray(masks), np.asarray(maps)
    if m.shape != a.shape:
        raise ValueError(f"masks {m.shape} and maps {a.shape} differ in shape")
    return m, a


def pixel_auroc(masks: np.ndarray, maps: np.ndarray) -> float:
    """AUROC pooled over all pixels of all images; masks/maps are (N, H, W)."""
    return _auroc(clf_curve(*_pixels(masks, maps)))


def pixel_ap(masks: np.ndarray, maps: np.ndarray) -> float:
    """Average precision pooled over all pixels of all images."""
    return _ap(clf_curve(*_pixels(masks, maps)))


def _trapezoid_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoid area of the piecewise-linear curve (x ascending) over [x[0], x_max]."""
    j = int(np.searchsorted(x, x_max, side="right"))  # x[:j] <= x_max < x[j:]
    if j < x.size:
        t = (x_max - x[j - 1]) / (x[j] - x[j - 1])
        x = np.append(x[:j], x_max)
        y = np.append(y[:j], y[j - 1] + t * (y[j] - y[j - 1]))
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1])) / 2.0)


def pixel_aupro(
    masks: np.ndarray,
    maps: np.ndarray,
    fpr_limit: float = 0.3,
    num_thresholds: int = 200,
) -> float:
    """Normalised area under the per-region-overlap curve up to ``fpr_limit`` (MVTec AD).

    At ``num_thresholds`` thresholds evenly spaced over [min, max] of ``maps`` a pixel is
    predicted anomalous when its score is strictly above the threshold. PRO is the mean,
    over the 8-connected components of all GT masks, of the fraction of each component
    predicted anomalous; FPR is the fraction of all normal pixels predicted anomalous.
    The curve is closed with the (FPR=1, PRO=1) point of a threshold below every score,
    integrated (trapezoid) from FPR 0 up to ``fpr_limit`` with linear interpolation at the
    limit, as in the MVTec AD evaluation code, and divided by ``fpr_limit``.
    """
    m, a = _pixels(masks, maps)
    if m.ndim != 3:
        raise ValueError(f"masks/maps must be (N, H, W), got {m.shape}")
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    if num_thresholds < 2:
        raise ValueError(f"num_thresholds must be >= 2, got {num_thresholds}")
    m = _as_bool(m)
    a = _as_scores(a)
    n_normal = int(m.size - np.count_nonzero(m))
    if n_normal == m.size or n_normal == 0:
        return _NAN

    thresholds = np.linspace(float(a.min()), float(a.max()), num_thresholds)
    # k = number of thresholds strictly below the score: the pixel counts as
    # predicted anomalous at thresholds[:k].
    k = np.searchsorted(thresholds, a.ravel(), side="left").reshape(a.shape)

    fp_at = np.bincount(k[~m], minlength=num_thresholds + 1)
    fpr = np.cumsum(fp_at[::-1])[::-1][1:] / n_normal  # fpr[j]: scores > thresholds[j]

    comp_k, comp_w = [], []
    n_comp = 0
    for mask_img, k_img in zip(m, k):
        if not mask_img.any():
            continue
        n_lab, lab = cv2.connectedComponents(mask_img.astype(np.uint8), connectivity=8)
        lab_px = lab[mask_img]
        sizes = np.bincount(lab_px, minlength=n_lab)
        comp_k.append(k_img[mask_img])
        comp_w.append(1.0 / sizes[lab_px])
        n_comp += n_lab - 1
    pro_at = np.bincount(
        np.concatenate(comp_k), weights=np.concatenate(comp_w), minlength=num_thresholds + 1
    )
    pro = np.cumsum(pro_at[::-1])[::-1][1:] / n_comp

    # Highest threshold first gives FPR ascending; close the curve at (1, 1).
    fpr = np.append(fpr[::-1], 1.0)
    pro = np.append(pro[::-1], 1.0)
    return _trapezoid_to(fpr, pro, fpr_limit) / fpr_limit


def confusion(labels: np.ndarray, flagged: np.ndarray) -> dict[str, int]:
    """TP/FP/FN/TN counts of boolean decisions against 0/1 labels."""
    labels, flagged = _as_bool(np.asarray(labels)), np.asarray(flagged, dtype=bool)
    return {"TP": int((flagged & labels).sum()), "FP": int((flagged & ~labels).sum()),
            "FN": int((~flagged & labels).sum()), "TN": int((~flagged & ~labels).sum())}


def class_metrics(
    labels: np.ndarray,
    scores: np.ndarray,
    masks: np.ndarray | None = None,
    maps: np.ndarray | None = None,
) -> dict[str, float]:
    """All metrics of one class; pixel metrics only when both masks and maps are given."""
    curve = clf_curve(labels, scores)
    out = {
        "image_auroc": _auroc(curve),
        "image_ap": _ap(curve),
        "image_f1_max": _f1_max(curve),
    }
    if masks is not None and maps is not None:
        pix = clf_curve(*_pixels(masks, maps))
        out["pixel_auroc"] = _auroc(pix)
        out["pixel_ap"] = _ap(pix)
        out["pixel_aupro"] = pixel_aupro(masks, maps)
    return out


def summarize(per_class: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Unweighted mean over classes of each metric, ignoring NaN (unified setting).

    A metric that is NaN (or missing) for every class stays NaN.
    """
    keys = list(dict.fromkeys(k for metrics in per_class.values() for k in metrics))
    out = {}
    for key in keys:
        vals = [float(c[key]) for c in per_class.values() if key in c and not math.isnan(c[key])]
        out[key] = sum(vals) / len(vals) if vals else _NAN
    return out
