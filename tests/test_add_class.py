"""`onenip add-class` (a new class from a few good images, no retraining) and unknown products."""
from __future__ import annotations

import hashlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from onenip_ray.add_class import _memory_cap, add_class, views_of_one
from onenip_ray.bundle import load_bundle
from onenip_ray.cli import main
from onenip_ray.config import TrainConfig
from onenip_ray.data.images import rotate_image
from onenip_ray.formats import UNKNOWN_CLASS
from onenip_ray.prompts import aggregate, density_weights
from onenip_ray.scoring import Scorer


def _checker(rng: np.random.Generator) -> np.ndarray:
    """A third product unlike the tiny dataset's discs and stripes: a tilted checkerboard."""
    y, x = np.mgrid[0:96, 0:96].astype(np.float32)
    angle = rng.uniform(0.2, 0.4)
    u, v = x * np.cos(angle) + y * np.sin(angle), -x * np.sin(angle) + y * np.cos(angle)
    board = ((u // 12 + v // 12) % 2).astype(np.float32)
    image = np.stack([board * 200 + 30, board * 40 + 90, (1 - board) * 180 + 40], -1) + rng.normal(0, 6, (96, 96, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def checker_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("checker")
    rng = np.random.default_rng(7)
    for i in range(8):
        cv2.imwrite(str(root / f"{i:02d}.png"), _checker(rng))
    return root


def _digest(folder: str) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(folder).iterdir())}


def _png(image: np.ndarray) -> bytes:
    return cv2.imencode(".png", image)[1].tobytes()


def test_add_class_writes_a_new_version_and_leaves_the_source_untouched(tiny_bundle, checker_dir, tmp_path):
    before = _digest(tiny_bundle)
    out = str(tmp_path / "b2")
    result = add_class(tiny_bundle, "checker", str(checker_dir), out)
    assert _digest(tiny_bundle) == before
    source, added = load_bundle(tiny_bundle), load_bundle(out)
    assert added.classes == [*source.classes, "checker"] and result["from_version"] == source.version
    assert added.version == result["version"] != source.version
    assert set(added.calibration.per_class) == set(added.classes)
    checker = added.calibration.per_class["checker"]
    assert checker.num_images == 8 and checker.threshold_raw > checker.normal_mean
    # 8 scores allow no rank at target 0.1: the bound, and the wide range its rate lies in
    low, high = result["expected_fpr"]
    assert result["threshold_rule"] == "bound" and low < source.calibration.target_fpr < high
    assert added.calibration.target_of("checker") == source.calibration.target_fpr
    assert added.meta["training"]["added_classes"][-1]["normals"] == 8
    # the trained weights are shared: only the pool and the calibration change
    for key, value in source.model.state_dict().items():
        assert np.array_equal(value.numpy(), added.model.state_dict()[key].numpy()), key
    # Scorer (batch and serve) uses the new bundle as it is: a new checkerboard is routed to the new class
    rows = Scorer(added, batch_size=4).score_bytes([("new.png", _png(_checker(np.random.default_rng(99))), None)])
    assert rows[0]["status"] == "ok" and rows[0]["class_name"] == "checker", rows[0]


def test_a_single_normal_is_calibrated_on_views_of_itself(tiny_bundle, checker_dir, tmp_path):
    one = tmp_path / "one"
    one.mkdir()
    (one / "a.png").write_bytes((checker_dir / "00.png").read_bytes())
    result = add_class(tiny_bundle, "checker", str(one), str(tmp_path / "b1"))
    cal = load_bundle(str(tmp_path / "b1")).calibration.per_class["checker"]
    assert result["normals"] == 1 and cal.num_images == len(views_of_one(np.zeros((8, 8, 3), np.uint8))) == 8
    assert np.isfinite(cal.threshold_raw)


def test_a_single_normals_views_are_rotated_between_the_memorys_copies():
    image = np.random.default_rng(0).integers(1, 256, (32, 32, 3), dtype=np.uint8)
    views = views_of_one(image)
    assert views.shape == (8, 32, 32, 3) and views.dtype == np.uint8
    assert not any(np.array_equal(v, image) for v in views)  # no view is the memory's image itself
    assert np.array_equal(views[0], np.clip(rotate_image(image, 5).astype(np.float32) * 0.95, 0, 255).astype(np.uint8))


def test_bad_input_is_refused_with_a_clear_message(tiny_bundle, checker_dir, tmp_path, capsys):
    with pytest.raises(ValueError, match=r"'disc' is already in .*--replace"):
        add_class(tiny_bundle, "disc", str(checker_dir), str(tmp_path / "x"))
    replaced = add_class(tiny_bundle, "disc", str(checker_dir), str(tmp_path / "r"), replace_class=True)
    assert load_bundle(str(tmp_path / "r")).classes == ["stripes", "disc"] and replaced["added"] == "disc"
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"found no normal images; a class needs at least one"):
        add_class(tiny_bundle, "new", str(empty), str(tmp_path / "y"))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "good.png").write_bytes((checker_dir / "00.png").read_bytes())
    (broken / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match=r"1 of 2 normal images cannot be read: .*bad\.png"):
        add_class(tiny_bundle, "new", str(broken), str(tmp_path / "z"))
    with pytest.raises(ValueError, match="must differ from --bundle"):
        add_class(tiny_bundle, "new", str(checker_dir), tiny_bundle)
    # the CLI: exit code 2 and the reason, nothing written
    assert main(["add-class", "--bundle", tiny_bundle, "--class", "disc", "--normals", str(checker_dir), "--out",
                 str(tmp_path / "c")]) == 2
    assert "already in" in capsys.readouterr().err and not (tmp_path / "c").exists()


def test_an_image_of_no_known_class_is_flagged_unknown(tiny_bundle, tiny_dataset, checker_dir):
    scorer = Scorer.from_uri(tiny_bundle, batch_size=4)
    checkers = [(p.name, p.read_bytes(), None) for p in sorted(checker_dir.iterdir())]
    known = [(str(p), p.read_bytes(), None) for p in sorted(tiny_dataset.glob("*/test/*/*.png"))]
    rows = scorer.score_bytes(checkers + known)
    unknown, rest = rows[: len(checkers)], rows[len(checkers) :]
    for r in unknown:
        floor = scorer.spec.prompt_calibration(scorer.spec.prompt_ids.index(r["prompt_id"])).route_floor
        assert r["class_name"] == UNKNOWN_CLASS and r["is_anomalous"] and r["route_similarity"] < floor, r
    assert all(r["class_name"] in ("disc", "stripes") for r in rest)
    assert all(r["route_similarity"] > 0.5 for r in rest)
    # a caller-given class is trusted: no unknown flag
    given = scorer.score_bytes([(n, d, "disc") for n, d, _ in checkers[:2]])
    assert all(r["class_name"] == "disc" for r in given)


def test_the_memory_cap_follows_the_bundle_up_to_todays_default():
    default = TrainConfig.memory_per_class
    assert _memory_cap({"memory_per_class": 5000}) == 5000
    assert _memory_cap({"memory_per_class": 100_000}) == default  # a pre-coreset bundle: not a 100,000 coreset
    assert _memory_cap({"memory_per_class": 0}) == 0 and _memory_cap({}) == 0  # all patches


def test_each_fold_is_scored_without_its_own_patches_in_the_memory(tiny_bundle, checker_dir, tmp_path, monkeypatch):
    """One coreset of all normals and their rotated copies; a fold's pool keeps only the other
    normals' patches of it (neither a held-out image's patches nor those of its copies)."""
    import onenip_ray.enrolment as module

    folds, score = [], module.score_normals

    def spy(predictor, cls, images, *args):
        in_class = predictor.pool.memory_class == predictor.pool.class_names.index(cls)
        size = predictor.pool.neighbor_pool[predictor.pool.class_names.index(cls)]
        folds.append((images, predictor.pool.memory[in_class].clone(), size))
        # the fold's coreset of few normals and copies is weighed by its own density, as in training
        assert torch.allclose(predictor.pool.memory_weight[in_class], density_weights(folds[-1][1]))
        return score(predictor, cls, images, *args)

    monkeypatch.setattr(module, "score_normals", spy)
    add_class(tiny_bundle, "checker", str(checker_dir), str(tmp_path / "b2"), memory_per_class=300)
    final = load_bundle(str(tmp_path / "b2"))
    memory = final.pool.memory[final.pool.memory_class == final.classes.index("checker")]
    kept = final.pool.neighbor_pool[final.classes.index("checker")]
    assert [size for *_, size in folds] == [1] * 8  # the default neighbourhood (the patch alone): 8 folds
    folds = [(images, fold_memory) for images, fold_memory, size in folds if size == kept]
    assert len(memory) == 300 and sum(len(images) for images, _ in folds) == 8
    angles = final.meta["training"]["added_classes"][-1]["memory_rotations"]
    assert angles == [5 * i * sign for i in range(1, 9) for sign in (1, -1)]  # 8 normals: 8 pairs, 5° apart
    assert final.meta["training"]["added_classes"][-1]["memory_density_weights"]
    weight = final.pool.memory_weight[final.pool.memory_class == final.classes.index("checker")]
    assert torch.allclose(weight, density_weights(memory))
    assert (final.pool.memory_weight[final.pool.memory_class != final.classes.index("checker")] == 1).all()
    predictor = final.predictor()
    for images, fold_memory in folds:
        copies = np.stack([rotate_image(image, angle) for angle in angles for image in images])
        own = aggregate(torch.cat([predictor.features(images)[1], predictor.features(copies)[1]]), kept)
        own = own.permute(0, 2, 3, 1).reshape(-1, memory.shape[1])
        assert 0 < len(fold_memory) < len(memory)
        assert not (_distance(fold_memory, own) < 1e-6).any()  # none of the held-out images' patches
        assert (_distance(fold_memory, memory) < 1e-6).all()  # all from the final coreset


def test_rotated_copies_can_be_turned_off(tiny_bundle, checker_dir, tmp_path):
    with_copies = add_class(tiny_bundle, "checker", str(checker_dir), str(tmp_path / "b2"), memory_per_class=0)
    without = add_class(tiny_bundle, "checker", str(checker_dir), str(tmp_path / "b3"), memory_per_class=0,
                        memory_rotation_images=0)
    added = lambda out: load_bundle(out).meta["training"]["added_classes"][-1]  # noqa: E731
    assert added(with_copies["bundle"])["memory_patches"] == 17 * added(without["bundle"])["memory_patches"]
    assert not added(with_copies["bundle"])["memory_density_weights"]  # no coreset: all patches, weight 1
    assert with_copies["version"] != without["version"]


def _distance(rows: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """Each row's distance to its nearest ``bank`` row, exact (no matrix-product cancellation)."""
    return torch.cdist(rows, bank, compute_mode="donot_use_mm_for_euclid_dist").min(1).values


def test_a_class_added_at_its_own_target_records_it(tiny_bundle, checker_dir, tmp_path):
    out = str(tmp_path / "b2")
    add_class(tiny_bundle, "checker", str(checker_dir), out, target_fpr=0.2)
    added = load_bundle(out)
    assert added.calibration.target_of("checker") == 0.2
    assert added.calibration.target_of(added.classes[0]) == added.calibration.target_fpr != 0.2
