"""Per-class thresholds and map statistics from held-out training normals (no test labels).

Fusion weight (``fusion="calibrated"``): α ∈ {0, 0.25, 0.5, 0.75, 1} maximising pixel AUROC on the
held-out normals and their synthetic-anomaly copies (known masks; no test data). A well-trained
reconstruction branch earns its weight; one that a short run left uninformative does not.

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
from .metrics import pixel_auroc
from .model.onenip import Maps, fuse, image_scores
from .predictor import Predictor


@dataclass
class ClassCalibration:
    threshold_raw: float
    score_scale: float
    normal_median: float
    map_low: float  # median fused-map value on normals: heat maps start here
    num_images: int


ALPHA_GRID = (0.0, 0.25, 0.5, 0.75, 1.0)


@dataclass
class Calibration:
    rec_scale: float
    quantile: float
    margin: float
    per_class: dict[str, ClassCalibration]
    alpha: float = 0.5
    alpha_auroc: dict[str, float] | None = None  # calibration pixel AUROC per candidate α

    def to_dict(self) -> dict:
        return {"rec_scale": self.rec_scale, "quantile": self.quantile, "margin": self.margin,
                "alpha": self.alpha, "alpha_auroc": self.alpha_auroc,
                "rule": f"threshold_raw = {self.margin} x Q{self.quantile}(held-out normal scores)",
                "per_class": {k: asdict(v) for k, v in self.per_class.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> "Calibration":
        return cls(rec_scale=float(d["rec_scale"]), quantile=float(d["quantile"]), margin=float(d["margin"]),
                   per_class={k: ClassCalibration(**v) for k, v in d["per_class"].items()},
                   alpha=float(d.get("alpha", 0.5)), alpha_auroc=d.get("alpha_auroc"))


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
    rec_maps, ref_maps, masks, normal_rows = [], [], [], {}
    for cls, images in normals.items():
        pairs = [synthesizer(img, rng) for img in images]
        batch_images = np.concatenate([images, np.stack([p[0] for p in pairs])])
        offset = sum(len(m) for m in masks)
        normal_rows[cls] = slice(offset, offset + len(images))
        masks.append(np.concatenate([np.zeros((len(images), *images.shape[1:3]), bool), np.stack([p[1] > 0 for p in pairs])]))
        for batch in _batches(batch_images, batch_size):
            pred = predictor.predict(batch, torch.full((len(batch),), names.index(cls)))
            rec_maps.append(pred.reconstruction.cpu().numpy())
            ref_maps.append(pred.refiner.cpu().numpy())
    rec, ref, mask = np.concatenate(rec_maps), np.concatenate(ref_maps), np.concatenate(masks)
    predictor.rec_scale = float(rec.max() + rec.min()) / 2.0
    alpha_auroc = None
    if predictor.config.fusion == "calibrated":
        alpha_auroc = _alpha_auroc(rec, ref, mask, predictor)
        valid = {a: v for a, v in alpha_auroc.items() if np.isfinite(v)}
        if valid:  # ties go to the α nearest the paper's 0.5
            predictor.alpha = float(max(valid, key=lambda a: (valid[a], -abs(float(a) - 0.5))))
    per_class = {}
    for cls, rows in normal_rows.items():  # the normals' maps are already here: fuse, don't re-run the model
        fused = fuse(Maps(torch.from_numpy(rec[rows]), torch.from_numpy(ref[rows])), predictor.config, predictor.rec_scale, predictor.alpha)
        s = image_scores(fused, predictor.config.score_pool).numpy()
        q = float(np.quantile(s, quantile))
        spread = float(np.quantile(s, 0.9) - np.quantile(s, 0.1)) if len(s) > 2 else 0.0
        per_class[cls] = ClassCalibration(
            threshold_raw=margin * q,
            score_scale=max(spread, 0.05 * abs(q), 1e-6),
            normal_median=float(np.median(s)),
            map_low=float(np.median(fused.flatten(1).median(dim=1).values.numpy())),
            num_images=int(len(s)),
        )
    return Calibration(rec_scale=predictor.rec_scale, quantile=quantile, margin=margin, per_class=per_class,
                       alpha=predictor.alpha, alpha_auroc=alpha_auroc)


def _alpha_auroc(rec: np.ndarray, ref: np.ndarray, mask: np.ndarray, predictor: Predictor) -> dict[str, float]:
    """Pixel AUROC of the fused map for each α of ``ALPHA_GRID`` (maps pooled 4× to bound cost)."""
    if not mask.any():
        return {str(a): float("nan") for a in ALPHA_GRID}
    out = {}
    for a in ALPHA_GRID:
        fused = fuse(Maps(torch.from_numpy(rec), torch.from_numpy(ref)), predictor.config, predictor.rec_scale, a)
        pooled = torch.nn.functional.avg_pool2d(fused.unsqueeze(1), 4)[:, 0].numpy()
        target = torch.nn.functional.avg_pool2d(torch.from_numpy(mask).float().unsqueeze(1), 4)[:, 0].numpy() > 0.5
        out[str(a)] = pixel_auroc(target, pooled)
    return out


def calibrated_score(raw: np.ndarray | float, cal: ClassCalibration, threshold: float | None = None) -> np.ndarray:
    """Map raw scores to [0, 1] with 0.5 exactly at the threshold."""
    thr = cal.threshold_raw if threshold is None else threshold
    return 1.0 / (1.0 + np.exp(-(np.asarray(raw, dtype=np.float64) - thr) / cal.score_scale))


def _batches(images: np.ndarray, size: int):
    for i in range(0, len(images), size):
        yield images[i : i + size]
