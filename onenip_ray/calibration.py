"""Per-class thresholds and map statistics from held-out training normals (no test labels).

Rule (documented in the README): for each class, the held-out normal images are scored with the
class's own prompts; ``threshold_raw = margin × Q_q(scores)`` (defaults q = 0.99, margin = 1.1).
The calibrated score is ``sigmoid((raw − threshold) / scale)`` with ``scale`` the spread of the
normal scores, so it is exactly 0.5 at the threshold. The official fusion scale ``rec_scale`` is
(max + min)/2 of S_rec over the held-out normals *and* their synthetic-anomaly copies — the
released code takes it over the test set instead.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from .data.synthesis import AnomalySynthesizer
from .predictor import Predictor


@dataclass
class ClassCalibration:
    threshold_raw: float
    score_scale: float
    normal_median: float
    map_low: float  # median fused-map value on normals: heat maps start here
    num_images: int


@dataclass
class Calibration:
    rec_scale: float
    quantile: float
    margin: float
    per_class: dict[str, ClassCalibration]

    def to_dict(self) -> dict:
        return {"rec_scale": self.rec_scale, "quantile": self.quantile, "margin": self.margin,
                "rule": f"threshold_raw = {self.margin} x Q{self.quantile}(held-out normal scores)",
                "per_class": {k: asdict(v) for k, v in self.per_class.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> "Calibration":
        return cls(rec_scale=float(d["rec_scale"]), quantile=float(d["quantile"]), margin=float(d["margin"]),
                   per_class={k: ClassCalibration(**v) for k, v in d["per_class"].items()})


def calibrate(
    predictor: Predictor,
    normals: dict[str, np.ndarray],
    synthesizer: AnomalySynthesizer,
    seed: int = 0,
    quantile: float = 0.99,
    margin: float = 1.1,
    batch_size: int = 16,
) -> Calibration:
    """Fit ``rec_scale`` and the per-class thresholds; sets ``predictor.rec_scale``."""
    rng = np.random.default_rng(seed)
    names = predictor.class_names
    rec_lo, rec_hi = np.inf, -np.inf
    for cls, images in normals.items():
        synthetic = np.stack([synthesizer(img, rng)[0] for img in images])
        for batch in _batches(np.concatenate([images, synthetic]), batch_size):
            idx = torch.full((len(batch),), names.index(cls))
            rec = predictor.predict(batch, idx).reconstruction
            rec_lo, rec_hi = min(rec_lo, float(rec.min())), max(rec_hi, float(rec.max()))
    predictor.rec_scale = (rec_hi + rec_lo) / 2.0
    per_class = {}
    for cls, images in normals.items():
        scores, medians = [], []
        for batch in _batches(images, batch_size):
            pred = predictor.predict(batch, torch.full((len(batch),), names.index(cls)))
            scores.append(pred.scores.cpu().numpy())
            medians.append(pred.fused.flatten(1).median(dim=1).values.cpu().numpy())
        s = np.concatenate(scores)
        q = float(np.quantile(s, quantile))
        spread = float(np.quantile(s, 0.9) - np.quantile(s, 0.1)) if len(s) > 2 else 0.0
        per_class[cls] = ClassCalibration(
            threshold_raw=margin * q,
            score_scale=max(spread, 0.05 * abs(q), 1e-6),
            normal_median=float(np.median(s)),
            map_low=float(np.median(np.concatenate(medians))),
            num_images=int(len(s)),
        )
    return Calibration(rec_scale=predictor.rec_scale, quantile=quantile, margin=margin, per_class=per_class)


def calibrated_score(raw: np.ndarray | float, cal: ClassCalibration, threshold: float | None = None) -> np.ndarray:
    """Map raw scores to [0, 1] with 0.5 exactly at the threshold."""
    thr = cal.threshold_raw if threshold is None else threshold
    return 1.0 / (1.0 + np.exp(-(np.asarray(raw, dtype=np.float64) - thr) / cal.score_scale))


def _batches(images: np.ndarray, size: int):
    for i in range(0, len(images), size):
        yield images[i : i + size]
