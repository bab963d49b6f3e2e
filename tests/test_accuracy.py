"""Real data, real pretrained features.

1. A short in-process training run on MVTec AD ``bottle`` (lite0, 224 px) must already learn a
   useful reconstruction and refiner: OneNIP's own maps (nearest-neighbour weight 0) are checked,
   so the nearest-neighbour branch cannot hide a broken training. With the official initialisation
   (``residual_init=1``) the reconstruction stays input-independent for this budget and these
   figures are not reached (docs/training.md).
2. That bottle-only bundle plus VisA ``capsules`` added from 8 good images (``add-class``, no
   retraining) detects capsule defects and routes both classes; VisA ``macaroni1``, in no pool,
   is flagged as an unknown product.
"""
from __future__ import annotations

import csv

import pytest

from onenip_ray.add_class import add_class
from onenip_ray.config import ModelConfig, TrainConfig
from onenip_ray.evaluate import evaluate
from onenip_ray.formats import UNKNOWN_CLASS
from onenip_ray.scoring import Scorer
from onenip_ray.train import run_training
from tests.conftest import MVTEC_ROOT, VISA_ROOT, needs_bottle, needs_visa

pytestmark = [pytest.mark.slow, needs_bottle]


@pytest.fixture(scope="module")
def bottle_bundle(tmp_path_factory) -> str:
    work = tmp_path_factory.mktemp("accuracy")
    cfg = TrainConfig(dataset="mvtec", data=(str(MVTEC_ROOT),), classes=("bottle",), out=str(work / "bundle"),
                      epochs=2, steps_per_epoch=0, batch_size=4, lr=1e-3, num_workers=0,
                      model=ModelConfig(image_size=224))
    run_training(cfg, storage_path=str(work / "ray"))
    return cfg.out


def test_two_epochs_on_bottle_reach_useful_pixel_accuracy(bottle_bundle, tmp_path):
    report = evaluate(bottle_bundle, [("mvtec", str(MVTEC_ROOT))], str(tmp_path / "eval"), classes=["bottle"])
    onenip = report["branches"]["per_class"]["bottle"]["onenip"]
    fused = report["per_class"]["bottle"]
    print("bottle after 2 epochs, OneNIP maps:", onenip, "fused:", {k: round(v, 4) for k, v in fused.items()})
    # measured with the default schedule (warm-up + cosine over these 94 steps): 0.987 / 0.897 / 0.597;
    # the official xavier init measured 0.984 / 0.897 / 0.515 with the previous (constant-lr) recipe
    assert onenip["image_auroc"] >= 0.97, onenip
    assert onenip["pixel_auroc"] >= 0.87, onenip
    assert onenip["pixel_ap"] >= 0.55, onenip
    assert fused["image_auroc"] >= 0.99 and fused["pixel_auroc"] >= 0.975 and fused["pixel_ap"] >= 0.70, fused


def _visa_train_normals(cls: str, count: int) -> list[str]:
    with open(VISA_ROOT / "split_csv" / "1cls.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["object"] == cls and r["split"] == "train"]
    return [str(VISA_ROOT / r["image"]) for r in rows[:count]]


@needs_visa
def test_a_class_added_from_eight_normals_and_an_unknown_product(bottle_bundle, tmp_path):
    manifest = tmp_path / "capsules.csv"
    manifest.write_text("image_uri\n" + "\n".join(_visa_train_normals("capsules", 8)) + "\n")
    out = str(tmp_path / "with-capsules")
    add_class(bottle_bundle, "capsules", str(manifest), out)
    report = evaluate(out, [("mvtec", str(MVTEC_ROOT)), ("visa", str(VISA_ROOT))], str(tmp_path / "eval"),
                      classes=["bottle", "capsules"])
    capsules = report["per_class"]["capsules"]
    print("capsules from 8 normals:", {k: round(v, 4) for k, v in capsules.items()}, "routing",
          report["routing_accuracy"])
    # measured: 0.650 / 0.887 / 0.104 (224 px, a bottle-only model); the nearest-neighbour reference with
    # all 180 capsules normals at 224 px is 0.672 / 0.955 / 0.452
    assert report["routing_accuracy"] >= 0.99
    assert capsules["image_auroc"] >= 0.6 and capsules["pixel_auroc"] >= 0.85, capsules
    with open(VISA_ROOT / "split_csv" / "1cls.csv") as f:
        macaroni = [
            str(VISA_ROOT / r["image"])
            for r in csv.DictReader(f)
            if r["object"] == "macaroni1" and r["split"] == "test"
        ]
    scorer = Scorer.from_uri(out, batch_size=8)
    rows = scorer.score_bytes([(u, open(u, "rb").read(), None) for u in macaroni[::8]])
    flagged = [r["class_name"] == UNKNOWN_CLASS for r in rows]
    print("macaroni1 (in no pool): unknown", sum(flagged), "of", len(rows))
    assert sum(flagged) >= 0.9 * len(rows)
