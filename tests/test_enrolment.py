"""One enrol path (train's final step and add-class) and out-of-fold calibration on a tiny class."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from onenip_ray.bundle import load_bundle
from onenip_ray.calibration import MIN_NORMALS, CalibrationMaps, neighbor_separation
from onenip_ray.data.layouts import read_dataset
from onenip_ray.data.synthesis import AnomalySynthesizer, TextureSource
from onenip_ray.enrolment import (
    MAX_FOLDS,
    calibration_rows,
    encode_normals,
    enrol_class,
    enrol_features,
    neighbor_pool_summary,
    score_out_of_fold,
)
from onenip_ray.training_data import load_images


@pytest.fixture(scope="module")
def disc(tiny_bundle, tiny_dataset):
    """The tiny bundle's predictor and the disc class's 12 training normals."""
    bundle = load_bundle(tiny_bundle)
    samples = [s for s in read_dataset("mvtec", str(tiny_dataset), ["disc"]) if s.split == "train"]
    return bundle.predictor(), [s.uri for s in samples], load_images(samples, bundle.config.image_size)


def _enrol(predictor, ids, images, rotation_budget=0, neighbor_pool=1):
    features, patch_features, angles = encode_normals(predictor.backbone, predictor.config, images, rotation_budget)
    return enrol_features("disc", ids, features, patch_features, prompts_per_class=2, memory_cap=0, seed=0,
                          rotations=angles, neighbor_pool=neighbor_pool)


def test_each_normal_is_scored_by_a_pool_without_its_own_patches(disc):
    predictor, ids, images = disc
    enrolment = _enrol(predictor, ids, images)
    synth = AnomalySynthesizer(predictor.config.image_size, TextureSource.procedural(0))
    fresh = np.arange(len(images)) % 2 == 0
    out_of_fold = score_out_of_fold(predictor, enrolment, images, fresh, synth, np.random.default_rng(0))
    assert out_of_fold.num_normals == len(images) and out_of_fold.fresh.tolist() == fresh.tolist()
    assert len(out_of_fold.masks) == len(images) + fresh.sum()  # one synthetic copy per fresh normal
    assert not out_of_fold.masks[: len(images)].any() and out_of_fold.masks[len(images) :].any(axis=(1, 2)).all()

    predictor.set_pool(enrolment.pool())  # in-fold: every normal's own patches are in the memory
    in_fold = predictor.predict(images).maps.neighbor.numpy()
    own, held_out = in_fold.max(axis=(1, 2)), out_of_fold.neighbor[: len(images)].max(axis=(1, 2))
    assert (own < 1e-3).all()  # a patch's distance to itself
    assert (held_out > 10 * own.max() + 1e-3).all()  # not one normal met itself out of fold


def test_only_the_chosen_rows_are_scored_in_at_most_max_folds_pools(disc, monkeypatch):
    predictor, ids, images = disc
    enrolment = _enrol(predictor, ids, images)
    pools = []
    monkeypatch.setattr(predictor, "set_pool", lambda pool: pools.append(pool))
    scored = calibration_rows(np.ones(len(images), bool), np.random.default_rng(1), cap=5)
    assert len(scored) == 5 and len(set(scored.tolist())) == 5
    synth = AnomalySynthesizer(predictor.config.image_size, TextureSource.procedural(0))
    maps = score_out_of_fold(predictor, enrolment, images, np.ones(len(images), bool), synth,
                             np.random.default_rng(1), scored)
    assert maps.num_normals == 5 and 1 <= len(pools) <= min(MAX_FOLDS, len(images))
    assert all(len(p.memory) < len(enrolment.memory) for p in pools)  # each fold leaves its normals out


def test_calibration_rows_prefer_fresh_normals():
    fresh = np.array([False] * 6 + [True] * 3)
    rows = calibration_rows(fresh, np.random.default_rng(0), cap=4)
    assert fresh[rows].sum() == 3 and len(rows) == 4
    assert calibration_rows(fresh, np.random.default_rng(0), cap=100).tolist() == list(range(9))


def test_thresholds_use_every_normal_only_where_the_map_is_the_neighbour_alone():
    n, copies = 6, 2
    fresh = np.array([True, False, True, False, False, False])
    zeros = np.zeros((n + copies, 4, 4), np.float32)
    maps = CalibrationMaps(zeros, zeros, zeros, zeros > 0, np.zeros(n), fresh)
    assert maps.threshold_rows(neighbor_alone=True).tolist() == list(range(n))
    assert maps.threshold_rows(neighbor_alone=False).tolist() == [0, 2]  # OneNIP trained on the others
    assert maps.fresh_rows().tolist() == [0, 2, 6, 7]
    few = CalibrationMaps(zeros, zeros, zeros, zeros > 0, np.zeros(n), np.eye(n, dtype=bool)[0])
    assert MIN_NORMALS > 1 and few.threshold_rows(neighbor_alone=False).tolist() == list(range(n))


def test_only_classes_with_few_normals_get_rotated_copies(disc):
    predictor, ids, images = disc
    few = _enrol(predictor, ids[:4], images[:4], rotation_budget=12)  # 4 normals × (1 + 2 copies) = 12
    assert few.rotations == [40.0, -40.0]
    assert len(few.memory) == 3 * 4 * len(_enrol(predictor, ids[:1], images[:1]).memory)
    assert few.memory_image.unique().tolist() == [0, 1, 2, 3]  # copies count as their normal's patches
    many = _enrol(predictor, ids, images, rotation_budget=12)  # 12 normals fill the budget alone
    assert many.rotations == [] and not many.weighted


@pytest.mark.parametrize("neighbor_pool", ["auto", "3"])
def test_enrol_class_scores_each_neighbourhood_alike_and_keeps_the_better(disc, neighbor_pool):
    predictor, ids, images = disc
    config = replace(predictor.config, neighbor_pool=neighbor_pool)
    synth = AnomalySynthesizer(config.image_size, TextureSource.procedural(0))
    seen = []

    def score(enrolment, rng):
        seen.append((enrolment.neighbor_pool, rng.bit_generator.state["state"]["state"]))
        return score_out_of_fold(predictor, enrolment, images, np.ones(len(images), bool), synth, rng)

    rng = np.random.default_rng(5)
    kept, maps = enrol_class(predictor.backbone, config, "disc", ids, images, 2, 0, 0, 0, score, rng)
    sizes = [size for size, _ in seen]
    assert sizes == ([1, 3] if neighbor_pool == "auto" else [3])
    assert len({state for _, state in seen}) == 1  # every candidate from the same folds and anomalies
    assert set(kept.separation) == set(sizes) and kept.neighbor_pool in sizes
    assert kept.separation[kept.neighbor_pool] == max(kept.separation.values())
    assert kept.separation[kept.neighbor_pool] == neighbor_separation(maps, config)
    assert kept.pool().neighbor_pool == [kept.neighbor_pool]
    assert neighbor_pool_summary(kept)["kept"] == kept.neighbor_pool
