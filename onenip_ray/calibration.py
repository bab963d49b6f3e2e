"""Per-class thresholds, map statistics and routing floors from normal images (no test labels).

Fusion weights (``fusion="calibrated"``): the refiner weight α and the nearest-neighbour weight β,
each in {0, 0.25, 0.5, 0.75, 1}, maximise pixel AUROC on the calibration normals and their
synthetic-anomaly copies (known masks; no test data). A branch earns its weight on these images.

Threshold rule (documented in the README): the calibration normals' image scores, scored with the
class's own prompts and memory, give an upper prediction bound for one more normal image,
``threshold_raw = mean + t(1 − target_fpr; n − 1) · sd · √(1 + 1/n)`` (Student t), so a normal
exceeds it with probability ``target_fpr`` under a normal model of the scores. It widens by
itself when there are few normals (n = 5: t = 2.13 at 5 %; n = 500: 1.65) instead of taking the
maximum of a handful as a quantile would. ``MIN_NORMALS`` (2) is the least it accepts; 5 or more
are recommended. A class may carry its own target (``retargeted``; ``onenip set-threshold``): the
same bound from the stored normal statistics. The calibrated
``score = sigmoid((raw − threshold) / scale)`` is exactly 0.5 at the threshold, ``scale`` the
normals' spread.

Routing floor (unknown products): a class's ``route_floor`` lies halfway between the lowest
retrieval similarity of its normals and the highest similarity of another class's prompt to its
prompts (0.5 when the pool has no other class); an image retrieved with a similarity below the
floor of its nearest class resembles no class in the pool.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
from scipy.stats import t as student_t

from .config import TrainConfig
from .data.synthesis import AnomalySynthesizer
from .metrics import pixel_auroc
from .model.anomaly_map import Maps, fuse, image_scores
from .predictor import Predictor
from .prompts import PromptPool, descriptors

WEIGHT_GRID = (0.0, 0.25, 0.5, 0.75, 1.0)
MIN_NORMALS = 2
NO_OTHER_CLASS_SIMILARITY = 0.5


@dataclass
class ClassCalibration:
    threshold_raw: float
    score_scale: float
    normal_median: float
    normal_mean: float
    normal_std: float
    map_low: float  # median fused-map value on normals: heat maps start here
    num_images: int
    normal_similarity_min: float  # lowest retrieval similarity of the normals to their own prompts
    route_floor: float = 0.0  # retrieval similarity below this = an unknown product
    target_fpr: float | None = None  # the class's own target false-positive rate; None: the bundle's

    def retargeted(self, target_fpr: float) -> "ClassCalibration":
        """This class with the threshold the same rule gives at ``target_fpr`` (same normals)."""
        return replace(self, threshold_raw=bound(self.normal_mean, self.normal_std, self.num_images, target_fpr),
                       target_fpr=target_fpr)

    def to_dict(self) -> dict:
        """As stored in ``bundle.json``; no ``target_fpr`` key without an own target (so bundles written
        before it keep their content hash)."""
        return {k: v for k, v in asdict(self).items() if not (k == "target_fpr" and v is None)}


@dataclass
class Calibration:
    rec_scale: float
    target_fpr: float
    per_class: dict[str, ClassCalibration]
    alpha: float = 0.5
    neighbor_weight: float = 0.0
    neighbor_scale: float = 1.0
    fusion_auroc: dict[str, float] | None = None  # calibration pixel AUROC per candidate "α,β"

    def target_of(self, cls: str) -> float:
        """The false-positive rate class ``cls``'s threshold aims at: its own, else the bundle's."""
        own = self.per_class[cls].target_fpr
        return self.target_fpr if own is None else own

    def to_dict(self) -> dict:
        return {"rec_scale": self.rec_scale, "target_fpr": self.target_fpr, "alpha": self.alpha,
                "neighbor_weight": self.neighbor_weight, "neighbor_scale": self.neighbor_scale,
                "fusion_auroc": self.fusion_auroc,
                "rule": f"threshold_raw = mean + t(1-{self.target_fpr}; n-1) * sd * sqrt(1+1/n) "
                        "of the calibration normals' scores",
                "per_class": {k: v.to_dict() for k, v in self.per_class.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> "Calibration":
        return cls(rec_scale=float(d["rec_scale"]), target_fpr=float(d["target_fpr"]),
                   per_class={k: ClassCalibration(**v) for k, v in d["per_class"].items()},
                   alpha=float(d["alpha"]), neighbor_weight=float(d["neighbor_weight"]),
                   neighbor_scale=float(d["neighbor_scale"]), fusion_auroc=d.get("fusion_auroc"))


@dataclass
class CalibrationMaps:
    """A class's calibration images scored with its own prompts: normals first, then their
    synthetic-anomaly copies."""

    reconstruction: np.ndarray
    refiner: np.ndarray
    neighbor: np.ndarray
    masks: np.ndarray
    similarity: np.ndarray  # retrieval similarity of the normals
    num_normals: int

    def maps(self, rows: slice | None = None) -> Maps:
        rows = rows or slice(None)
        return Maps(torch.from_numpy(self.reconstruction[rows]), torch.from_numpy(self.refiner[rows]),
                    torch.from_numpy(self.neighbor[rows]))


def score_normals(predictor: Predictor, cls: str, images: np.ndarray, synthesizer: AnomalySynthesizer,
                  rng: np.random.Generator, batch_size: int = 16) -> CalibrationMaps:
    """Maps of ``images`` (normals of ``cls``) and of a synthetic-anomaly copy of each."""
    pairs = [synthesizer(img, rng) for img in images]
    batch_images = np.concatenate([images, np.stack([p[0] for p in pairs])])
    masks = np.concatenate([np.zeros((len(images), *images.shape[1:3]), bool), np.stack([p[1] > 0 for p in pairs])])
    rec, ref, nn, sim = [], [], [], []
    c = predictor.class_names.index(cls)
    for start in range(0, len(batch_images), batch_size):
        batch = batch_images[start : start + batch_size]
        pred = predictor.predict(batch, torch.full((len(batch),), c))
        rec.append(pred.maps.reconstruction.cpu().numpy())
        ref.append(pred.maps.refiner.cpu().numpy())
        nn.append(pred.maps.neighbor.cpu().numpy())
        sim.append(pred.similarity.cpu().numpy())
    return CalibrationMaps(np.concatenate(rec), np.concatenate(ref), np.concatenate(nn), masks,
                           np.concatenate(sim)[: len(images)], len(images))


def calibrate(
    predictor: Predictor,
    normals: dict[str, np.ndarray],
    synthesizer: AnomalySynthesizer,
    seed: int = 0,
    target_fpr: float = TrainConfig.target_fpr,
) -> Calibration:
    """Fit the map scales, fusion weights and per-class thresholds on held-out normals; sets them
    on ``predictor``."""
    rng = np.random.default_rng(seed)
    scored = {cls: score_normals(predictor, cls, images, synthesizer, rng) for cls, images in normals.items()}
    rec = np.concatenate([m.reconstruction for m in scored.values()])
    nn = np.concatenate([m.neighbor for m in scored.values()])
    predictor.rec_scale = float(rec.max() + rec.min()) / 2.0
    nn_mid = float(nn.max() + nn.min()) / 2.0
    predictor.neighbor_scale = predictor.rec_scale / nn_mid if nn_mid > 0 else 1.0
    fusion_auroc = None
    if predictor.config.fusion == "calibrated":
        fusion_auroc = _fusion_auroc(scored, predictor)
        valid = {k: v for k, v in fusion_auroc.items() if np.isfinite(v)}
        if valid:  # ties go to the weights nearest (α 0.5, β 0.5)
            best = max(valid, key=lambda k: (valid[k], -sum(abs(float(w) - 0.5) for w in k.split(","))))
            predictor.alpha, predictor.neighbor_weight = (float(w) for w in best.split(","))
    else:
        predictor.neighbor_weight = 0.0
    per_class = {cls: class_calibration(predictor, m, target_fpr) for cls, m in scored.items()}
    floors = route_floors(predictor.pool, {cls: cal.normal_similarity_min for cls, cal in per_class.items()})
    for cls, cal in per_class.items():
        cal.route_floor = floors[cls]
    return Calibration(rec_scale=predictor.rec_scale, target_fpr=target_fpr, per_class=per_class, alpha=predictor.alpha,
                       neighbor_weight=predictor.neighbor_weight, neighbor_scale=predictor.neighbor_scale,
                       fusion_auroc=fusion_auroc)


def class_calibration(predictor: Predictor, scored: CalibrationMaps, target_fpr: float) -> ClassCalibration:
    """Threshold, score scale, heat-map floor and routing floor of one class from its normals."""
    if scored.num_normals < MIN_NORMALS:
        raise ValueError(f"calibration needs at least {MIN_NORMALS} normal images per class, got {scored.num_normals}")
    fused = predictor.fuse(scored.maps(slice(0, scored.num_normals)))
    s = image_scores(fused, predictor.config.score_pool).numpy().astype(np.float64)
    threshold = prediction_bound(s, target_fpr)
    spread = float(np.quantile(s, 0.9) - np.quantile(s, 0.1))
    return ClassCalibration(
        threshold_raw=threshold,
        score_scale=max(spread, 0.05 * abs(threshold), 1e-6),
        normal_median=float(np.median(s)),
        normal_mean=float(np.mean(s)),
        normal_std=float(np.std(s, ddof=1)),
        map_low=float(np.median(fused.flatten(1).median(dim=1).values.numpy())),
        num_images=int(len(s)),
        normal_similarity_min=float(scored.similarity.min()),
    )


def prediction_bound(scores: np.ndarray, target_fpr: float) -> float:
    """Upper one-sided prediction bound for one more normal score (Student t); the spread is
    floored at 2 % of the mean so identical scores still leave a margin."""
    return bound(float(np.mean(scores)), float(np.std(scores, ddof=1)), len(scores), target_fpr)


def bound(mean: float, std: float, n: int, target_fpr: float) -> float:
    """``prediction_bound`` from the normals' mean, standard deviation and count."""
    sd = max(std, 0.02 * abs(mean), 1e-6)
    return mean + float(student_t.ppf(1.0 - target_fpr, n - 1)) * sd * float(np.sqrt(1.0 + 1.0 / n))


def route_floors(pool: PromptPool, lowest_similarity: dict[str, float]) -> dict[str, float]:
    """Per class: halfway between its normals' lowest retrieval similarity and the highest
    similarity of another class's prompt to its prompts (see the module docstring)."""
    desc = descriptors(pool.features)
    sims = desc @ desc.T
    floors = {}
    for c, name in enumerate(pool.class_names):
        own, other = pool.class_index == c, pool.class_index != c
        nearest_other = float(sims[own][:, other].max()) if other.any() else NO_OTHER_CLASS_SIMILARITY
        floors[name] = 0.5 * (lowest_similarity[name] + nearest_other)
    return floors


def _fusion_auroc(scored: dict[str, CalibrationMaps], predictor: Predictor) -> dict[str, float]:
    """Pixel AUROC of the fused map for each (α, β) of ``WEIGHT_GRID`` (maps pooled 4× to bound
    cost); β only where the pool has a memory."""
    masks = np.concatenate([m.masks for m in scored.values()])
    if not masks.any():
        return {}
    maps = Maps(*(torch.from_numpy(np.concatenate([getattr(m, k) for m in scored.values()]))
                  for k in ("reconstruction", "refiner", "neighbor")))
    target = torch.nn.functional.avg_pool2d(torch.from_numpy(masks).float().unsqueeze(1), 4)[:, 0].numpy() > 0.5
    betas = WEIGHT_GRID if len(predictor.memory) else (0.0,)
    out = {}
    for a in WEIGHT_GRID:
        for b in betas:
            fused = fuse(maps, predictor.config, predictor.rec_scale, a, b, predictor.neighbor_scale)
            pooled = torch.nn.functional.avg_pool2d(fused.unsqueeze(1), 4)[:, 0].numpy()
            out[f"{a},{b}"] = pixel_auroc(target, pooled)
    return out


def calibrated_score(raw: np.ndarray | float, cal: ClassCalibration, threshold: float | None = None) -> np.ndarray:
    """Map raw scores to [0, 1] with 0.5 exactly at the threshold."""
    thr = cal.threshold_raw if threshold is None else threshold
    return 1.0 / (1.0 + np.exp(-(np.asarray(raw, dtype=np.float64) - thr) / cal.score_scale))
