"""`onenip set-threshold`: a class's operating point changed without retraining."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import cv2
import numpy as np

from onenip_ray.bundle import load_bundle
from onenip_ray.calibration import threshold_for
from onenip_ray.cli import main
from onenip_ray.evaluate import evaluate
from onenip_ray.scoring import Scorer
from onenip_ray.set_threshold import set_threshold


def _digest(folder: str) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(folder).iterdir())}


def test_one_class_is_rethresholded_and_the_rest_is_untouched(tiny_bundle, tiny_dataset, tmp_path, capsys):
    source = load_bundle(tiny_bundle)
    cls, other = source.classes[0], source.classes[1]
    before = _digest(tiny_bundle)
    out = str(tmp_path / "b2")
    assert main(["set-threshold", "--bundle", tiny_bundle, "--classes", cls, "--target-fpr", "0.3", "--out", out]) == 0
    result = json.loads(capsys.readouterr().out)
    assert _digest(tiny_bundle) == before
    new = load_bundle(out)
    assert result["version"] == new.version != source.version and result["from_version"] == source.version
    old_cal, new_cal = source.calibration.per_class[cls], new.calibration.per_class[cls]
    assert new_cal.target_fpr == 0.3 and new_cal.threshold_raw == result["thresholds"][cls]
    assert new_cal.threshold_raw == threshold_for(old_cal.normal_scores, 0.3)  # the same normals' scores
    assert new_cal.threshold_raw < old_cal.threshold_raw  # a higher false-positive rate: a lower threshold
    assert new.calibration.per_class[other] == source.calibration.per_class[other]
    assert new.calibration.target_of(cls) == 0.3 and new.calibration.target_of(other) == source.calibration.target_fpr
    assert new.meta["training"]["threshold_changes"][-1]["classes"] == [cls]
    # the deployed threshold is what scoring and evaluation use
    report = evaluate(out, [("mvtec", str(tiny_dataset))], str(tmp_path / "eval"), classes=[cls])
    assert report["per_class"][cls]["target_fpr"] == 0.3
    basis = report["thresholds"][cls]  # what the threshold rests on, beside the (numeric) metrics
    assert basis["calibration_normals"] == new_cal.num_images and basis["rule"] == new_cal.rule(0.3)
    assert basis["expected_fpr"][0] < 0.3 < basis["expected_fpr"][1]
    chosen = report["neighbor_pool"][cls]  # the neighbourhood training kept, and why
    assert chosen["kept"] == new.pool.neighbor_pool[new.classes.index(cls)]
    assert chosen["separation"][str(chosen["kept"])] == max(chosen["separation"].values())
    sweep = report["threshold_sweep"][cls]["0.3"]
    assert report["per_class"][cls]["threshold_recall"] == sweep["threshold_recall"]
    png = cv2.imencode(".png", np.full((64, 64, 3), 128, np.uint8))[1].tobytes()
    row = Scorer(new, batch_size=1).score_bytes([("x.png", png, cls)])[0]
    assert row["threshold_raw"] == new_cal.threshold_raw
    assert row["is_anomalous"] == (row["score_raw"] > new_cal.threshold_raw)


def test_bad_requests_are_refused(tiny_bundle, tmp_path, capsys):
    out = str(tmp_path / "b2")
    args = ["set-threshold", "--bundle", tiny_bundle, "--out", out]
    assert main([*args, "--classes", "nope", "--target-fpr", "0.1"]) == 2
    assert "no class 'nope'" in capsys.readouterr().err
    assert main([*args, "--target-fpr", "1.5"]) == 2
    assert "between 0 and 1" in capsys.readouterr().err
    assert main(["set-threshold", "--bundle", tiny_bundle, "--target-fpr", "0.1", "--out", tiny_bundle]) == 2
    assert "--out must differ" in capsys.readouterr().err
    assert not Path(out).exists()


def test_a_bundle_without_own_targets_keeps_its_stored_calibration():
    """No ``target_fpr`` key unless a class has its own target: earlier bundles keep their hash."""
    from onenip_ray.calibration import ClassCalibration

    cal = ClassCalibration(threshold_raw=3.0, score_scale=1.0, normal_median=2.0, normal_mean=2.0, normal_std=0.5,
                           map_low=1.0, num_images=10, normal_similarity_min=0.9)
    assert "target_fpr" not in cal.to_dict()
    assert cal.retargeted(0.2).to_dict()["target_fpr"] == 0.2


def test_all_classes_move_the_bundle_target_that_added_classes_aim_at(tiny_bundle, tmp_path):
    from onenip_ray.add_class import add_class

    out = str(tmp_path / "b2")
    result = set_threshold(tiny_bundle, out, 0.3)
    new, source = load_bundle(out), load_bundle(tiny_bundle)
    assert new.calibration.target_fpr == 0.3 and result["target_fpr"] == 0.3
    for cls, cal in new.calibration.per_class.items():
        old = source.calibration.per_class[cls]
        assert cal.target_fpr is None and new.calibration.target_of(cls) == 0.3  # no own target: the bundle's
        assert cal.threshold_raw == threshold_for(old.normal_scores, 0.3)
    rng = np.random.default_rng(0)
    normals = tmp_path / "normals"
    normals.mkdir()
    for i in range(3):
        cv2.imwrite(str(normals / f"{i}.png"), rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    added = load_bundle(add_class(out, "noise", str(normals), str(tmp_path / "b3"))["bundle"])
    assert added.calibration.target_of("noise") == 0.3
