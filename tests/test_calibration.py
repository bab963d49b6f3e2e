"""Threshold rule (a quantile of the normals, a log-score bound for few), fusion choice and routing floors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import gumbel_r, lognorm

from onenip_ray.bundle import load_bundle
from onenip_ray.calibration import (
    FUSION_MARGIN,
    CalibrationMaps,
    ClassCalibration,
    bound,
    calibrate,
    choose_fusion,
    fpr_interval,
    prediction_bound,
    route_floors,
    threshold_for,
    threshold_rule,
)
from onenip_ray.prompts import PromptPool


@pytest.mark.parametrize("n", [5, 20, 500])
def test_prediction_bound_holds_its_false_positive_rate_for_any_sample_size(n):
    """Averaged over many calibration draws, a fresh normal exceeds the threshold ~target_fpr of
    the time, for 5 normals as for 500 (a Q0.99 of 5 normals would flag ~17 %, its max + 10 % far fewer)."""
    rng = np.random.default_rng(n)
    rates = []
    for _ in range(400):
        calib = rng.normal(10.0, 1.0, n)
        threshold = prediction_bound(calib, 0.05)
        rates.append(np.mean(rng.normal(10.0, 1.0, 2000) > threshold))
    assert abs(np.mean(rates) - 0.05) < 0.01, np.mean(rates)


# Skewed score distributions like a max-pooled map's (Gumbel) or a distance's (log-normal):
# (draw n scores, false-positive rate of a threshold).
SKEWED = {
    "gumbel": (lambda rng, n: gumbel_r.rvs(10.0, 1.0, size=n, random_state=rng), lambda t: gumbel_r.sf(t, 10.0, 1.0)),
    "lognormal": (lambda rng, n: lognorm.rvs(0.5, scale=10.0, size=n, random_state=rng),
                  lambda t: lognorm.sf(t, 0.5, scale=10.0)),
}
# Mean achieved false-positive rate over draws within this of the target: the quantile rule is
# exact in expectation (Monte-Carlo error only); the log-score bound of 5 normals is off by up to 2 %.
FPR_TOLERANCE = {5: 0.025, 20: 0.01, 50: 0.01, 500: 0.005}


@pytest.mark.parametrize("n", [5, 20, 50, 500])
@pytest.mark.parametrize("kind", sorted(SKEWED))
def test_threshold_keeps_its_false_positive_rate_on_skewed_scores(n, kind):
    """Fresh normals drawn from the same distribution as the n calibration scores exceed the
    threshold target_fpr of the time on average, and in ~90 % of the draws the achieved rate lies
    in the reported ``fpr_interval``."""
    draw, false_positive_rate = SKEWED[kind]
    rng = np.random.default_rng(n)
    rates = np.array([false_positive_rate(threshold_for(draw(rng, n), 0.1)) for _ in range(1000)])
    assert abs(rates.mean() - 0.1) < FPR_TOLERANCE[n], rates.mean()
    low, high = fpr_interval(n, 0.1)
    assert low < 0.1 < high
    inside = np.mean((rates >= low) & (rates <= high))
    assert 0.8 < inside < 0.97, inside


def test_the_rule_is_a_quantile_where_the_normals_allow_it():
    assert threshold_rule(8, 0.1) == "bound" and threshold_rule(9, 0.1) == "quantile"
    assert threshold_rule(98, 0.01) == "bound" and threshold_rule(99, 0.01) == "quantile"
    scores = np.arange(1.0, 20.0)  # 19 scores: rank (19 + 1) · 0.9 = 18
    assert threshold_for(scores, 0.1) == 18.0
    assert threshold_for(scores, 0.125) == pytest.approx(17.5)  # rank 17.5: half-way
    assert threshold_for(np.arange(1.0, 10.0), 0.1) == 9.0  # rank 9 of 9: the largest
    narrow, wide = fpr_interval(500, 0.1), fpr_interval(20, 0.1)
    assert wide[1] - wide[0] > narrow[1] - narrow[0] > 0


def test_fusion_weighs_a_branch_in_only_where_it_helps():
    """A branch that adds nothing (an untrained OneNIP) gets weight 0: the nearest neighbour alone
    (β = 1) wins unless a mix beats it by FUSION_MARGIN; a useful mix still wins."""
    grid = (0.0, 0.25, 0.5, 0.75, 1.0)
    # OneNIP alone at chance; every mix a little better than the nearest neighbour alone (0.95)
    useless = {f"{a},{b}": 0.5 if b == 0 else 0.95 + (0.5 * FUSION_MARGIN if b < 1 else 0) for a in grid for b in grid}
    assert choose_fusion(useless) == (0.5, 1.0)
    helpful = dict(useless, **{"0.5,0.5": 0.95 + 2 * FUSION_MARGIN})
    assert choose_fusion(helpful) == (0.5, 0.5)
    onenip_only = {f"{a},{b}": 0.9 - 0.3 * b for a in grid for b in grid}
    assert choose_fusion(onenip_only)[1] == 0.0  # the nearest neighbour adds nothing: its weight 0


def _calibration_maps(size: int, informative: str, rng: np.random.Generator, normals: int = 10) -> CalibrationMaps:
    """``normals`` fresh normals then a copy of each with a square defect: the ``informative`` map
    ("neighbor" or "refiner") lights up on the defect, the other maps are noise (an untrained branch)."""
    masks = np.zeros((2 * normals, size, size), bool)
    for i in range(normals, 2 * normals):
        y, x = rng.integers(0, size - 12, 2)
        masks[i, y : y + 12, x : x + 12] = True
    maps = {k: rng.random(masks.shape).astype(np.float32) for k in ("reconstruction", "refiner", "neighbor")}
    maps[informative] = (0.2 * maps[informative] + masks).astype(np.float32)
    return CalibrationMaps(maps["reconstruction"], maps["refiner"], maps["neighbor"], masks,
                           np.full(normals, 0.99, np.float32), np.ones(normals, bool))


@pytest.mark.parametrize("informative", ["neighbor", "refiner"])
def test_calibration_gives_a_branch_of_noise_weight_0_and_reports_both_branches(tiny_bundle, informative):
    """The fusion is chosen on the calibration maps: the branch that separates normals from their
    defective copies gets the weight, a branch of noise (an untrained OneNIP) none; each class's
    separation by OneNIP alone, the nearest neighbour alone and the fusion is kept."""
    predictor = load_bundle(tiny_bundle).predictor()
    rng = np.random.default_rng(0)
    scored = {name: _calibration_maps(predictor.config.image_size, informative, rng) for name in predictor.class_names}
    cal = calibrate(predictor, scored)
    if informative == "neighbor":
        assert (cal.alpha, cal.neighbor_weight) == (0.5, 1.0)
    else:
        assert cal.neighbor_weight == 0.0 and cal.alpha == 1.0
    assert set(cal.branch_separation) == set(predictor.class_names)
    for branches in cal.branch_separation.values():
        best = "neighbor" if informative == "neighbor" else "onenip"
        other = "onenip" if informative == "neighbor" else "neighbor"
        assert branches["fused"] == branches[best] > 0.9 and branches[best] > branches[other] + 0.1
    assert cal.fusion_auroc is None and type(cal).from_dict(cal.to_dict()) == cal


def test_a_bundle_without_stored_scores_keeps_the_bound_of_its_raw_scores():
    old = ClassCalibration(threshold_raw=12.0, score_scale=1.0, normal_median=10.0, normal_mean=10.0, normal_std=1.0,
                           map_low=0.0, num_images=20, normal_similarity_min=0.9)
    assert "normal_scores" not in old.to_dict() and old.rule(0.1) == "bound"
    assert old.retargeted(0.2).threshold_raw == bound(10.0, 1.0, 20, 0.2)


def test_prediction_bound_keeps_a_margin_when_normals_score_alike():
    assert prediction_bound(np.full(6, 4.0), 0.05) > 4.0


def test_route_floor_lies_between_own_normals_and_the_nearest_other_class():
    feats = torch.zeros(3, 3, 1, 1)
    feats[0, 0] = 1.0  # class a
    feats[1, 0], feats[1, 1] = 1.0, 1.0  # class b, cosine 0.707 to a
    feats[2, 2] = 1.0  # class c, orthogonal to both
    pool = PromptPool(["a", "b", "c"], ["a0", "b0", "c0"], torch.tensor([0, 1, 2]), feats)
    floors = route_floors(pool, {"a": 0.99, "b": 0.95, "c": 0.97})
    assert floors["a"] == pytest.approx((0.99 + 2**-0.5) / 2)
    assert floors["c"] == pytest.approx(0.97 / 2)  # the nearest other class has similarity 0
    alone = PromptPool(["a"], ["a0"], torch.tensor([0]), feats[:1])
    assert route_floors(alone, {"a": 0.99})["a"] == pytest.approx((0.99 + 0.5) / 2)
