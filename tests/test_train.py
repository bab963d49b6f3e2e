"""End to end on the tiny generated dataset: Ray Train (in-process and, marked slow, on the
session's local Ray cluster from conftest), the bundle it writes, and evaluation
(metrics.json + predictions.parquet)."""
from __future__ import annotations

import json
import math
import os
import tempfile

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from onenip_ray.bundle import load_bundle
from onenip_ray.config import ModelConfig, TrainConfig
from onenip_ray.data.layouts import read_dataset
from onenip_ray.evaluate import evaluate
from onenip_ray.train import CHECKPOINT_PREFIX, run_training
from onenip_ray.training_data import load_images

METRICS = ("image_auroc", "image_ap", "image_f1_max", "pixel_auroc", "pixel_ap", "pixel_aupro")
TINY = ModelConfig(image_size=64)


def _config(root, out, **overrides) -> TrainConfig:
    kwargs = dict(data=(str(root),), out=str(out), num_workers=0, epochs=1, batch_size=4, steps_per_epoch=0, model=TINY)
    kwargs.update(overrides)
    return TrainConfig(**kwargs)


@pytest.fixture(scope="module")
def trained(tiny_bundle):
    """The session's in-process run (conftest ``tiny_bundle``: ``run_training`` with num_workers=0,
    1 epoch, batch 4, 64 px on ``tiny_dataset``): its bundle.json and path."""
    with open(f"{tiny_bundle}/bundle.json") as f:
        meta = json.load(f)
    cfg = meta["training"]["config"]
    assert (cfg["num_workers"], cfg["epochs"], cfg["batch_size"], cfg["model"]["image_size"]) == (0, 1, 4, 64)
    return meta, tiny_bundle


def test_in_process_training_writes_a_bundle_that_loads_and_scores(trained, tiny_dataset):
    meta, out = trained
    training = meta["training"]
    assert len(training["history"]) == 1 and training["epochs"] == 1
    assert training["workers"] == 1
    # 12 normals per class, 10 % held out for calibration → 1 per class
    assert training["train_images"] == 14 and training["calibration_images"] == 10  # 5 held out per class
    # all 12 normals per class enrol (train and calibration alike): each also rotated by 6 pairs
    # ±40°·i/6 (12 × 13 = 156 images within the budget of 160)
    angles = [40 * i / 6 * sign for i in range(1, 7) for sign in (1, -1)]
    assert training["memory_rotations"] == {c: pytest.approx(angles) for c in ("disc", "stripes")}
    assert training["memory_density_weights"] == []  # 156 × 64 patches are all kept: no coreset to weigh
    assert all(math.isfinite(training["history"][0][k]) for k in ("loss", "mse", "dice"))
    assert meta["classes"] == ["disc", "stripes"] and set(meta["thresholds"]) == {"disc", "stripes"}

    bundle = load_bundle(out)
    assert bundle.version == meta["version"]
    assert bundle.config == TINY
    assert bundle.meta["backbone"]["channels"] == 192
    samples = [s for s in read_dataset("mvtec", str(tiny_dataset)) if s.split == "test"]
    images = load_images(samples, 64)
    pred = bundle.predictor().predict(images)
    assert pred.fused.shape == (12, 64, 64)
    assert torch.isfinite(pred.scores).all() and (pred.scores > 0).all()
    truth = [bundle.classes.index(s.class_name) for s in samples]
    assert pred.class_index.tolist() == truth  # disc and stripes are told apart by retrieval


def test_evaluate_writes_metrics_and_one_row_per_test_image(trained, tiny_dataset, tmp_path):
    meta, out = trained
    report = evaluate(out, [("mvtec", str(tiny_dataset))], str(tmp_path / "eval"))
    with open(tmp_path / "eval" / "metrics.json") as f:
        written = json.load(f)
    assert written["model_version"] == meta["version"] == report["model_version"]
    assert set(written["per_class"]) == {"disc", "stripes"}
    for name, m in written["per_class"].items():
        assert m["num_images"] == 6
        for key in METRICS:
            assert 0.0 <= m[key] <= 1.0, (name, key, m[key])
    for key in METRICS:
        assert 0.0 <= written["mean"][key] <= 1.0
        assert written["mean"][key] == pytest.approx(np.mean([m[key] for m in written["per_class"].values()]))
    assert written["routing_accuracy"] == 1.0
    assert written["prompt_mode"] == "retrieval" and written["num_images"] == 12
    assert all(m["unknown_fraction"] == 0.0 for m in written["per_class"].values())
    # each branch alone: β = 0 (OneNIP's maps) and β = 1 (nearest neighbour); the fused map is one of
    # them or in between, with the weights calibration chose
    branches = written["branches"]
    assert set(branches["per_class"]["disc"]) == {"onenip", "neighbor"}
    assert branches["weights"]["neighbor_weight"] == load_bundle(out).calibration.neighbor_weight
    for b in ("onenip", "neighbor"):
        assert 0.0 <= branches["mean"][b]["pixel_auroc"] <= 1.0
    # the threshold rule at other false-positive targets: a lower target, a higher threshold
    sweep = written["threshold_sweep"]["disc"]
    assert [sweep[k]["threshold_raw"] for k in ("0.01", "0.05", "0.1", "0.2")] == sorted(
        (sweep[k]["threshold_raw"] for k in ("0.01", "0.05", "0.1", "0.2")), reverse=True)
    assert sweep[str(TrainConfig.target_fpr)]["threshold_raw"] == pytest.approx(meta["thresholds"]["disc"])

    table = pq.read_table(tmp_path / "eval" / "predictions.parquet")
    assert table.num_rows == 12
    rows = table.to_pylist()
    test_files = sorted(str(p) for p in tiny_dataset.glob("*/test/*/*.png"))
    assert sorted(r["image_uri"] for r in rows) == test_files
    assert sum(r["label"] for r in rows) == 6
    assert {r["defect"] for r in rows if r["label"]} == {"defect"}
    for r in rows:
        assert 0.0 <= r["score"] <= 1.0
        assert r["is_anomalous"] == (r["score_raw"] > r["threshold_raw"])
        assert r["threshold_raw"] == pytest.approx(meta["thresholds"][r["class_name"]])
        assert r["routed_class"] == r["class_name"] and 0.0 < r["route_similarity"] <= 1.0 + 1e-6


def test_evaluate_with_oracle_classes(trained, tiny_dataset, tmp_path):
    _, out = trained
    report = evaluate(out, [("mvtec", str(tiny_dataset))], str(tmp_path / "eval"), classes=["stripes"], oracle=True)
    assert report["prompt_mode"] == "oracle"
    assert set(report["per_class"]) == {"stripes"} and report["num_images"] == 6
    assert report["routing_accuracy"] == 1.0


def test_in_process_training_leaves_no_checkpoint_folders(tiny_dataset, tmp_path, monkeypatch):
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    run_training(_config(tiny_dataset, tmp_path / "bundle", epochs=2, checkpoint_every=1),
                 storage_path=str(tmp_path / "ray"))
    assert (tmp_path / "bundle" / "bundle.json").is_file()
    assert list(temp.glob(f"{CHECKPOINT_PREFIX}*")) == []


@pytest.mark.slow
def test_two_workers_on_a_local_ray_cluster(ray_cluster, tiny_dataset, tmp_path, monkeypatch):
    # relative paths, as a user types them: workers run elsewhere, so the driver must resolve them
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "bundle"
    relative_data = os.path.relpath(tiny_dataset, tmp_path)
    meta = run_training(_config(relative_data, "bundle", num_workers=2, epochs=2), storage_path="ray")
    assert len(meta["training"]["history"]) == 2
    assert [h["epoch"] for h in meta["training"]["history"]] == [1, 2]
    assert meta["training"]["workers"] == 2
    bundle = load_bundle(str(out))
    assert bundle.version == meta["version"]
    images = load_images([s for s in read_dataset("mvtec", str(tiny_dataset)) if s.split == "test"][:4], 64)
    assert torch.isfinite(bundle.predictor().predict(images).scores).all()
    # the named run now has checkpoints under the storage path: starting it again is refused
    assert (tmp_path / "ray" / "onenip-bundle" / "checkpoint_manager_snapshot.json").is_file()
    with pytest.raises(ValueError, match="already exists"):
        run_training(_config(tiny_dataset, out, num_workers=2, epochs=2), storage_path=str(tmp_path / "ray"))


def test_cli_dataset_layout_error_exits_2_before_ray_starts(tmp_path, capsys, monkeypatch):
    """Layout errors are checked in the driver: no Train worker (and no retry) is started for them."""
    import ray.train.torch

    from onenip_ray.cli import main

    monkeypatch.setattr(ray.train.torch, "TorchTrainer", lambda *a,
                        **k: pytest.fail("a trainer was started for a missing root"))
    missing = tmp_path / "nowhere"
    code = main(["train", "--data", str(missing), "--out", str(tmp_path / "bundle"), "--num-workers", "1",
                 "--max-failures", "2", "--epochs", "1", "--image-size", "64", "--storage-path", str(tmp_path / "ray")])
    assert code == 2
    assert f"onenip train: error: dataset root {missing} does not exist" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_dataset_error_raised_in_a_ray_worker_exits_2(ray_cluster, tiny_dataset, tmp_path, capsys):
    """An unreadable training image is found by the Train worker that decodes it (Ray wraps the
    error in WorkerGroupError); the CLI still prints the worker's message and exits 2."""
    import shutil

    from onenip_ray.cli import main

    root = tmp_path / "data"
    shutil.copytree(tiny_dataset, root)
    broken = sorted((root / "disc" / "train" / "good").glob("*.png"))[0]
    broken.write_bytes(b"not a png")
    code = main(["train", "--data", str(root), "--out", str(tmp_path / "bundle"), "--num-workers", "1",
                 "--max-failures", "0", "--epochs", "1", "--image-size", "64", "--storage-path", str(tmp_path / "ray")])
    assert code == 2
    err = capsys.readouterr().err
    assert "onenip train: error:" in err and broken.name in err, err


def test_epoch_order_balances_classes_whatever_their_size():
    from onenip_ray.train import epoch_order
    from onenip_ray.training_data import TrainingSet

    class_ids = np.array([0] * 40 + [1] * 200)
    data = TrainingSet(["small", "large"], [], np.zeros((240, 1, 1, 3), np.uint8), class_ids, np.arange(240),
                       np.zeros(0, np.int64))
    order = epoch_order(data, 200, True, np.random.default_rng(0))
    assert len(order) == 200 and np.bincount(class_ids[order]).tolist() == [100, 100]
    assert len(set(order[class_ids[order] == 0].tolist())) == 40  # every small-class image, cycled
    plain = epoch_order(data, 240, False, np.random.default_rng(0))
    assert sorted(plain.tolist()) == list(range(240))


def test_lr_schedule_warms_up_then_decays_for_short_and_long_runs():
    from onenip_ray.train import lr_factor

    for total in (30, 100_000):
        f = lr_factor(TrainConfig(warmup_fraction=0.1), total)
        warm = max(1, round(0.1 * total))
        assert f(0) == pytest.approx(1 / warm) and f(warm - 1) == pytest.approx(1.0)
        assert f(warm + (total - warm) // 2) == pytest.approx(0.505, abs=0.05)
        assert f(total - 1) == pytest.approx(0.01, abs=0.01)
    step = lr_factor(TrainConfig(lr_schedule="step"), 1000)
    assert step(799) == 1.0 and step(800) == 0.1
