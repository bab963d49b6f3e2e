"""Threshold rule (a prediction bound that works with 5 normals as with 500) and routing floors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from onenip_ray.calibration import prediction_bound, route_floors
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
