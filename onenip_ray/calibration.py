"""Per-class thresholds, map statistics and routing floors from normal images (no test labels).

Every calibration normal is scored out of fold (``enrolment.score_out_of_fold``): by prompts and
a memory built without it. *Fresh* normals are those the trained model never saw (held out of
training; all of an added class's).

Fusion weights (``fusion="calibrated"``): the refiner weight α and the nearest-neighbour weight β,
each in {0, 0.25, 0.5, 0.75, 1}, by their ``separation`` (the mean of image and pixel AUROC) of the
fresh normals from their synthetic-defect copies, averaged over the classes (no test data). The
copies are of kinds training never synthesises (``HeldOutSynthesizer``): on the training kinds the
refiner, which learnt them, wins whatever it does on real defects. The image AUROC counts the real
normals' scores, so a branch that spreads them pays for it. A mix of the two branches wins only
where it beats the better branch alone by ``FUSION_MARGIN``, so the fused map is never worse than
the best single branch on this data and a branch that adds nothing (an untrained OneNIP) gets
weight 0. ``Calibration.branch_separation`` keeps each class's figure for OneNIP alone, the
nearest neighbour alone and the chosen fusion.

Threshold rule: from a class's ``n`` calibration scores (all its out-of-fold normals where the
fused map is the nearest neighbour alone, else its fresh ones), the threshold is the score at rank
``(n + 1)(1 − target)`` (interpolated between neighbouring scores): a fresh normal exceeds it with
probability ``target`` whatever the scores' distribution (conformal). With too few normals for
that rank (n < 1/target − 1, e.g. 8 at 10 %) it is the Student-t prediction bound of the log
scores, ``mean + t(1 − target; n − 1) · sd · √(1 + 1/n)`` (sd floored at 0.02). ``fpr_interval``
is the range (5 % … 95 %) the false-positive rate on fresh normals lies in for ``n`` scores: the
price of few normals. Bundles without stored scores keep the bound of the raw scores. A class may
carry its own target (``retargeted``; ``onenip set-threshold``). The calibrated
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
from scipy.stats import beta as beta_dist
from scipy.stats import norm
from scipy.stats import t as student_t

from .config import ModelConfig, TrainConfig
from .data.synthesis import Synthesizer
from .errors import InputError
from .metrics import image_auroc, pixel_auroc
from .model.anomaly_map import Maps, fuse, gaussian_blur, image_scores
from .predictor import Predictor
from .prompts import PromptPool, descriptors

WEIGHT_GRID = (0.0, 0.25, 0.5, 0.75, 1.0)
FUSION_MARGIN = 0.01  # a mix of the branches must beat the better branch alone by this (criterion units)
MIN_NORMALS = 2
NO_OTHER_CLASS_SIMILARITY = 0.5
FPR_INTERVAL = (0.05, 0.95)  # quantiles of the achieved false-positive rate ``fpr_interval`` reports
LEGACY_RULE = "bound"  # bundles without stored normal scores: the prediction bound of the raw scores


@dataclass
class ClassCalibration:
    threshold_raw: float
    score_scale: float
    normal_median: float
    normal_mean: float
    normal_std: float
    map_low: float  # median fused-map value on normals: heat maps start here
    num_images: int  # calibration scores the threshold comes from
    normal_similarity_min: float  # lowest retrieval similarity of the normals to their own prompts
    route_floor: float = 0.0  # retrieval similarity below this = an unknown product
    target_fpr: float | None = None  # the class's own target false-positive rate; None: the bundle's
    normal_scores: list[float] | None = None  # the calibration scores, sorted; None: bundles before them
    normal_similarities: list[float] | None = None  # the normals' retrieval similarities, sorted (drift reference)

    def retargeted(self, target_fpr: float) -> "ClassCalibration":
        """This class with the threshold the same rule gives at ``target_fpr`` (same normals)."""
        if self.normal_scores is None:
            threshold = bound(self.normal_mean, self.normal_std, self.num_images, target_fpr)
        else:
            threshold = threshold_for(np.asarray(self.normal_scores), target_fpr)
        return replace(self, threshold_raw=threshold, target_fpr=target_fpr)

    def rule(self, target_fpr: float) -> str:
        """``quantile`` or ``bound``: which threshold rule this class's scores allow at ``target_fpr``."""
        return LEGACY_RULE if self.normal_scores is None else threshold_rule(self.num_images, target_fpr)

    def expected_fpr(self, target_fpr: float) -> list[float]:
        """Where the false-positive rate on fresh normals lies for this class's rule (``fpr_interval``)."""
        return list(fpr_interval(self.num_images, target_fpr, self.rule(target_fpr)))

    def to_dict(self) -> dict:
        """As stored in ``bundle.json``; no ``target_fpr`` / ``normal_scores`` / ``normal_similarities``
        key where None (so bundles written before them keep their content hash)."""
        return {k: v for k, v in asdict(self).items()
                if not (k in ("target_fpr", "normal_scores", "normal_similarities") and v is None)}


@dataclass
class Calibration:
    rec_scale: float
    target_fpr: float
    per_class: dict[str, ClassCalibration]
    alpha: float = 0.5
    neighbor_weight: float = 0.0
    neighbor_scale: float = 1.0
    fusion_auroc: dict[str, float] | None = None  # bundles before ``fusion_separation``: pixel AUROC per "α,β"
    fusion_separation: dict[str, float] | None = None  # mean over classes of ``separation`` per candidate "α,β"
    branch_separation: dict[str, dict[str, float]] | None = None  # per class: onenip, neighbor, fused

    def target_of(self, cls: str) -> float:
        """The false-positive rate class ``cls``'s threshold aims at: its own, else the bundle's."""
        own = self.per_class[cls].target_fpr
        return self.target_fpr if own is None else own

    def to_dict(self) -> dict:
        """As stored in ``bundle.json``; bundles before ``fusion_separation`` keep their keys (and content hash)."""
        fusion = ({"fusion_auroc": self.fusion_auroc} if self.fusion_separation is None else
                  {"fusion_separation": self.fusion_separation, "branch_separation": self.branch_separation})
        return {"rec_scale": self.rec_scale, "target_fpr": self.target_fpr, "alpha": self.alpha,
                "neighbor_weight": self.neighbor_weight, "neighbor_scale": self.neighbor_scale, **fusion,
                "rule": f"threshold_raw = the calibration normals' score at rank (n+1)(1-{self.target_fpr}); "
                        "below that many normals mean + t(1-target; n-1) * sd * sqrt(1+1/n) of their log scores",
                "per_class": {k: v.to_dict() for k, v in self.per_class.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> "Calibration":
        return cls(rec_scale=float(d["rec_scale"]), target_fpr=float(d["target_fpr"]),
                   per_class={k: ClassCalibration(**v) for k, v in d["per_class"].items()},
                   alpha=float(d["alpha"]), neighbor_weight=float(d["neighbor_weight"]),
                   neighbor_scale=float(d["neighbor_scale"]), fusion_auroc=d.get("fusion_auroc"),
                   fusion_separation=d.get("fusion_separation"), branch_separation=d.get("branch_separation"))


@dataclass
class CalibrationMaps:
    """A class's calibration normals, each scored out of fold (by prompts and a memory built
    without it), then a synthetic-anomaly copy of each ``fresh`` one (a normal the trained model
    never saw), in order."""

    reconstruction: np.ndarray
    refiner: np.ndarray
    neighbor: np.ndarray
    masks: np.ndarray
    similarity: np.ndarray  # retrieval similarity of the normals
    fresh: np.ndarray  # (normals,) bool

    @property
    def num_normals(self) -> int:
        return len(self.fresh)

    def maps(self, rows: np.ndarray | slice | None = None) -> Maps:
        rows = slice(None) if rows is None else rows
        return Maps(torch.from_numpy(self.reconstruction[rows]), torch.from_numpy(self.refiner[rows]),
                    torch.from_numpy(self.neighbor[rows]))

    def fresh_rows(self) -> np.ndarray:
        """The fresh normals and their copies: the rows that judge the trained model's branch."""
        return np.concatenate([np.flatnonzero(self.fresh), np.arange(self.num_normals, len(self.masks))])

    def threshold_rows(self, neighbor_alone: bool) -> np.ndarray:
        """The normals a threshold comes from: all where the fused map is the nearest neighbour
        alone (out of fold for it), else the fresh ones (OneNIP was trained on the others)."""
        rows = np.arange(self.num_normals) if neighbor_alone else np.flatnonzero(self.fresh)
        return rows if len(rows) >= MIN_NORMALS else np.arange(self.num_normals)

    def take(self, normals: np.ndarray) -> "CalibrationMaps":
        """The normals at positions ``normals``, then their copies, in that order."""
        copy_of = np.flatnonzero(self.fresh)  # normal of each copy
        copies = self.num_normals + np.concatenate([np.flatnonzero(copy_of == i) for i in normals] + [[]]).astype(int)
        rows = np.concatenate([normals, copies])
        return CalibrationMaps(self.reconstruction[rows], self.refiner[rows], self.neighbor[rows], self.masks[rows],
                               self.similarity[normals], self.fresh[normals])

    @staticmethod
    def join(parts: list["CalibrationMaps"]) -> "CalibrationMaps":
        """Several batches of one class's normals as one: all normals, then all copies."""
        def cat(key: str) -> np.ndarray:
            normals = [getattr(p, key)[: p.num_normals] for p in parts]
            return np.concatenate(normals + [getattr(p, key)[p.num_normals :] for p in parts])

        return CalibrationMaps(cat("reconstruction"), cat("refiner"), cat("neighbor"), cat("masks"),
                               np.concatenate([p.similarity for p in parts]), np.concatenate([p.fresh for p in parts]))


def score_normals(predictor: Predictor, cls: str, images: np.ndarray, fresh: np.ndarray,
                  synthesizer: Synthesizer, rng: np.random.Generator, batch_size: int = 16) -> CalibrationMaps:
    """Maps of ``images`` (normals of ``cls``) by the predictor's pool, then of a synthetic copy of
    each ``fresh`` one (``synthesizer``)."""
    fresh = np.asarray(fresh, dtype=bool)
    pairs = [synthesizer(img, rng) for img in images[fresh]]
    copies = np.stack([p[0] for p in pairs]) if pairs else images[:0]
    batch_images = np.concatenate([images, copies])
    masks = np.concatenate([np.zeros((len(images), *images.shape[1:3]), bool),
                            np.stack([p[1] > 0 for p in pairs]) if pairs else np.zeros((0, *images.shape[1:3]), bool)])
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
                           np.concatenate(sim)[: len(images)], fresh)


def calibrate(predictor: Predictor, scored: dict[str, CalibrationMaps],
              target_fpr: float = TrainConfig.target_fpr) -> Calibration:
    """Fit the map scales, fusion weights and per-class thresholds on the classes' out-of-fold
    calibration maps; sets them on ``predictor``, whose pool is the full one."""
    fresh = {cls: m.fresh_rows() for cls, m in scored.items()}
    rec = np.concatenate([m.reconstruction[fresh[cls]] for cls, m in scored.items()])
    nn = np.concatenate([m.neighbor[fresh[cls]] for cls, m in scored.items()])
    predictor.rec_scale = float(rec.max() + rec.min()) / 2.0
    nn_mid = float(nn.max() + nn.min()) / 2.0
    predictor.neighbor_scale = predictor.rec_scale / nn_mid if nn_mid > 0 else 1.0
    fusion, branches = None, None
    if predictor.config.fusion == "calibrated":
        by_class = _fusion_separation(scored, predictor)
        fusion = {k: float(np.mean(list(v.values()))) for k, v in by_class.items()} if by_class else None
        if fusion and any(np.isfinite(v) for v in fusion.values()):
            predictor.alpha, predictor.neighbor_weight = choose_fusion(fusion)
            branches = _branch_separation(by_class, predictor)
    else:
        predictor.neighbor_weight = 0.0
    per_class = {cls: class_calibration(predictor, m, target_fpr) for cls, m in scored.items()}
    floors = route_floors(predictor.pool, {cls: cal.normal_similarity_min for cls, cal in per_class.items()})
    for cls, cal in per_class.items():
        cal.route_floor = floors[cls]
    return Calibration(rec_scale=predictor.rec_scale, target_fpr=target_fpr, per_class=per_class, alpha=predictor.alpha,
                       neighbor_weight=predictor.neighbor_weight, neighbor_scale=predictor.neighbor_scale,
                       fusion_separation=fusion, branch_separation=branches)


def class_calibration(predictor: Predictor, scored: CalibrationMaps, target_fpr: float) -> ClassCalibration:
    """Threshold, score scale, heat-map floor and routing floor of one class from its normals."""
    if scored.num_normals < MIN_NORMALS:
        raise InputError(f"calibration needs at least {MIN_NORMALS} normal images per class, got {scored.num_normals}")
    rows = scored.threshold_rows(predictor.neighbor_weight == 1.0)
    fused = predictor.fuse(scored.maps(rows))
    s = np.sort(image_scores(fused, predictor.config.score_pool).numpy().astype(np.float64))
    threshold = threshold_for(s, target_fpr)
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
        normal_scores=[float(v) for v in s],
        normal_similarities=[float(v) for v in np.sort(scored.similarity)],
    )


def threshold_rule(n: int, target_fpr: float) -> str:
    """``quantile`` where ``n`` scores have a rank ``(n + 1)(1 − target)``, else ``bound``."""
    return "quantile" if (n + 1) * (1.0 - target_fpr) <= n else "bound"


def threshold_for(scores: np.ndarray, target_fpr: float) -> float:
    """The threshold of the module docstring's rule from a class's calibration scores."""
    s = np.sort(np.asarray(scores, dtype=np.float64))
    n = len(s)
    if threshold_rule(n, target_fpr) == "quantile":
        rank = (n + 1) * (1.0 - target_fpr)  # 1-based, interpolated between neighbouring scores
        low = int(np.floor(rank))
        return float(s[low - 1] if low >= n else s[low - 1] + (rank - low) * (s[low] - s[low - 1]))
    return log_bound(s, target_fpr) if s.min() > 0 else prediction_bound(s, target_fpr)


def log_bound(scores: np.ndarray, target_fpr: float) -> float:
    """The Student-t prediction bound of the log scores (sd floored at 0.02), as a score."""
    logs = np.log(np.asarray(scores, dtype=np.float64))
    return float(np.exp(bound(float(logs.mean()), float(logs.std(ddof=1)), len(logs), target_fpr, floor=0.02)))


def fpr_interval(n: int, target_fpr: float, rule: str | None = None) -> tuple[float, float]:
    """Where the false-positive rate on fresh normals lies (``FPR_INTERVAL`` quantiles) for a
    threshold from ``n`` calibration scores: exact for ``quantile`` (a Beta distribution), under
    normal (log-)scores for ``bound`` (by simulation; the rate does not depend on their mean or sd)."""
    rule = rule or threshold_rule(n, target_fpr)
    if rule == "quantile":
        rank = (n + 1) * (1.0 - target_fpr)
        return tuple(float(beta_dist.ppf(q, n + 1 - rank, rank)) for q in FPR_INTERVAL)
    draws = np.random.default_rng(0).standard_normal((4000, n))
    t = draws.mean(1) + student_t.ppf(1.0 - target_fpr, n - 1) * draws.std(1, ddof=1) * np.sqrt(1.0 + 1.0 / n)
    return tuple(float(v) for v in np.quantile(norm.sf(t), FPR_INTERVAL))


def prediction_bound(scores: np.ndarray, target_fpr: float) -> float:
    """Upper one-sided prediction bound for one more normal score (Student t); the spread is
    floored at 2 % of the mean so identical scores still leave a margin."""
    return bound(float(np.mean(scores)), float(np.std(scores, ddof=1)), len(scores), target_fpr)


def bound(mean: float, std: float, n: int, target_fpr: float, floor: float | None = None) -> float:
    """``prediction_bound`` from the normals' mean, standard deviation and count; the spread is
    floored at ``floor`` (default 2 % of the mean)."""
    sd = max(std, 0.02 * abs(mean) if floor is None else floor, 1e-6)
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


def _fusion_separation(scored: dict[str, CalibrationMaps], predictor: Predictor) -> dict[str, dict[str, float]]:
    """Per candidate ``"α,β"`` of ``WEIGHT_GRID``, each class's ``separation`` of its fresh normals
    from their copies by the fused map (classes without copies left out); β only where the pool
    has a memory. Empty when no class has copies."""
    classes = {name: m.take(np.flatnonzero(m.fresh)) for name, m in scored.items() if m.fresh.any()}
    if not classes:
        return {}
    betas = WEIGHT_GRID if len(predictor.memory) else (0.0,)
    config = predictor.config
    return {f"{a},{b}": {name: separation(fuse(m.maps(), config, predictor.rec_scale, a, b, predictor.neighbor_scale),
                                          m.masks, m.num_normals, config)
                         for name, m in classes.items()}
            for a in WEIGHT_GRID for b in betas}


def _branch_separation(by_class: dict[str, dict[str, float]], predictor: Predictor) -> dict[str, dict[str, float]]:
    """Each class's ``separation`` by OneNIP alone (at the chosen α), the nearest neighbour alone
    and the chosen fusion (``_fusion_separation``'s figures)."""
    a, b = predictor.alpha, predictor.neighbor_weight
    picks = {"onenip": f"{a},0.0", "neighbor": f"{WEIGHT_GRID[-1]},{WEIGHT_GRID[-1]}", "fused": f"{a},{b}"}
    names = next(iter(by_class.values()))
    return {name: {k: round(float(by_class[key][name]), 4) for k, key in picks.items() if key in by_class}
            for name in names}


def _pooled(maps: torch.Tensor) -> np.ndarray:
    """(N, H, W) maps or masks mean-pooled 4× (calibration AUROCs on fewer pixels)."""
    return torch.nn.functional.avg_pool2d(maps.unsqueeze(1), 4)[:, 0].numpy()


def separation(fused: torch.Tensor, masks: np.ndarray, num_normals: int, config: ModelConfig) -> float:
    """How well smoothed maps ``fused`` tell ``num_normals`` normals (first) from synthetic-defect
    copies (after, their defects in ``masks``): the mean of the image AUROC (by image score) and
    the pixel AUROC (on ``_pooled`` maps); NaN without copies."""
    if not masks.any():
        return float("nan")
    labels = np.r_[np.zeros(num_normals), np.ones(len(masks) - num_normals)]
    image = image_auroc(labels, image_scores(fused, config.score_pool).numpy())
    pixel = pixel_auroc(_pooled(torch.from_numpy(masks).float()) > 0.5, _pooled(fused))
    return float(np.mean([image, pixel]))


def neighbor_separation(scored: CalibrationMaps, config: ModelConfig) -> float:
    """``separation`` of a class's out-of-fold normals from their copies by its nearest-neighbour
    map, smoothed as fused maps are. ``enrolment.enrol_class`` keeps the neighbourhood where it is highest."""
    maps = gaussian_blur(torch.from_numpy(scored.neighbor), config.map_sigma)
    return separation(maps, scored.masks, scored.num_normals, config)


def choose_fusion(figures: dict[str, float]) -> tuple[float, float]:
    """(α, β) from the calibration figure (higher is better) per candidate ``"α,β"``: the best, but a mix of
    OneNIP and the nearest neighbour only where it beats the better branch alone (β = 1, or β = 0 at
    its best α) by ``FUSION_MARGIN``. Ties go to the nearest neighbour alone, then to the weights
    nearest (0.5, 0.5); the nearest neighbour alone is stored as α 0.5, β 1."""
    valid = {k: v for k, v in figures.items() if np.isfinite(v)}

    def weights(k: str) -> tuple[float, ...]:
        return tuple(float(w) for w in k.split(","))

    def preference(k: str):
        a, b = weights(k)
        return valid[k], b == 1.0, -abs(a - 0.5) - abs(b - 0.5)

    best = max(valid, key=preference)
    singles = [k for k in valid if weights(k)[1] in (0.0, 1.0)]
    best_single = max(singles, key=preference)
    if best not in singles and valid[best] < valid[best_single] + FUSION_MARGIN:
        best = best_single
    a, b = weights(best)
    return (0.5 if b == 1.0 else a), b


def calibrated_score(raw: np.ndarray | float, cal: ClassCalibration, threshold: float | None = None) -> np.ndarray:
    """Map raw scores to [0, 1] with 0.5 exactly at the threshold."""
    thr = cal.threshold_raw if threshold is None else threshold
    return 1.0 / (1.0 + np.exp(-(np.asarray(raw, dtype=np.float64) - thr) / cal.score_scale))
