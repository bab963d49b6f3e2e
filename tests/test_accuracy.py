"""Real data, real pretrained features: a short in-process training run on MVTec AD ``bottle``
(lite0, 224 px) must already learn a useful reconstruction and refiner. With the official
initialisation (``residual_init=1``) the reconstruction stays input-independent for this budget and
the pixel metrics below are not reached (docs/training.md)."""
from __future__ import annotations

import pytest

from onenip_ray.config import TrainConfig
from onenip_ray.evaluate import evaluate
from onenip_ray.train import run_training
from tests.conftest import MVTEC_ROOT, needs_bottle

pytestmark = [pytest.mark.slow, needs_bottle]


def test_two_epochs_on_bottle_reach_useful_pixel_accuracy(tmp_path):
    cfg = TrainConfig(dataset="mvtec", data=(str(MVTEC_ROOT),), classes=("bottle",), out=str(tmp_path / "bundle"),
                      epochs=2, batch_size=4, lr=1e-3, num_workers=0)
    run_training(cfg, storage_path=str(tmp_path / "ray"))
    report = evaluate(cfg.out, [("mvtec", str(MVTEC_ROOT))], str(tmp_path / "eval"), classes=["bottle"])
    bottle = report["per_class"]["bottle"]
    print("bottle after 2 epochs:", {k: round(v, 4) for k, v in bottle.items()})
    assert bottle["image_auroc"] >= 0.97, bottle
    assert bottle["pixel_auroc"] >= 0.94, bottle
    assert bottle["pixel_ap"] >= 0.62, bottle
