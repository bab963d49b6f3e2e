"""The Scorer (bytes → result rows): guards, classes, calibration, regions (no Ray)."""
from __future__ import annotations

import hashlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from onenip_ray.bundle import load_bundle
from onenip_ray.calibration import calibrated_score
from onenip_ray.model.anomaly_map import image_scores
from onenip_ray.schema import OUTPUT_COLUMNS, RESULT_SCHEMA, to_table
from onenip_ray.scoring import MAP_KEY, Scorer, find_regions, smoothed_map
from tests.inputs import bad_inputs, good_inputs


def tiny_images(root: Path) -> list[np.ndarray]:
    """The tiny dataset's test images (BGR), both classes interleaved."""
    paths = sorted(root.glob("*/test/*/*.png"), key=lambda p: (p.stem, p.parts[-4], p.parts[-2]))
    return [cv2.imread(str(p)) for p in paths]


@pytest.fixture(scope="module")
def scorer(tiny_bundle) -> Scorer:
    return Scorer.from_uri(tiny_bundle, batch_size=4, run_id="test-run")


def test_good_and_bad_inputs_one_row_each(scorer, tiny_dataset):
    images = tiny_images(tiny_dataset)
    good, bad = good_inputs(images), bad_inputs(images[0])
    items = [(name, data, None) for name,
             data in good.items()] + [(name, data, None) for name, (data, _) in bad.items()]
    rows = scorer.score_bytes(items)
    assert [r["image_uri"] for r in rows] == [name for name, _, _ in items]
    table = to_table(rows)  # every row fits the schema
    assert table.schema.equals(RESULT_SCHEMA)
    by_uri = {r["image_uri"]: r for r in rows}
    for name, data in good.items():
        row = by_uri[name]
        assert row["status"] == "ok" and row["error"] is None, (name, row["error"])
        assert row["image_sha256"] == hashlib.sha256(data).hexdigest()
        assert row["class_name"] in scorer.spec.class_names and row["class_source"] == "retrieved"
        assert row["threshold_source"] == "per_class" and row["model_version"] == scorer.spec.model_version
        assert row["latency_ms"] > 0 and row["run_id"] == "test-run"
        assert np.isfinite(row["score_raw"]) and 0.0 <= row["score"] <= 1.0
    assert (by_uri["wide.png"]["width"], by_uri["wide.png"]["height"]) == (192, 96)
    assert (by_uri["deep16.png"]["width"], by_uri["gray.png"]["height"]) == (96, 96)
    for name, (data, fragment) in bad.items():
        row = by_uri[name]
        assert row["status"] == "error" and fragment in row["error"] and name in row["error"], (name, row["error"])
        assert all(row[c] is None for c in OUTPUT_COLUMNS)
        assert row["image_sha256"] == hashlib.sha256(data).hexdigest()


def test_formats_score_like_the_plain_png(scorer, tiny_dataset):
    """16-bit and RGBA copies of one image score like the plain PNG."""
    image = tiny_images(tiny_dataset)[0]
    png = cv2.imencode(".png", image)[1].tobytes()
    variants = {
        "png": png,
        "deep16": cv2.imencode(".png", image.astype(np.uint16) * 257)[1].tobytes(),
        "rgba": cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_BGR2BGRA))[1].tobytes(),
    }
    rows = {r["image_uri"]: r for r in scorer.score_bytes([(k, v, None) for k, v in variants.items()])}
    assert rows["deep16"]["score_raw"] == pytest.approx(rows["png"]["score_raw"], rel=1e-6)
    assert rows["rgba"]["score_raw"] == pytest.approx(rows["png"]["score_raw"], rel=1e-6)


def test_given_class_and_unknown_class(scorer, tiny_dataset):
    data = cv2.imencode(".png", tiny_images(tiny_dataset)[0])[1].tobytes()
    names = scorer.spec.class_names
    rows = scorer.score_bytes([("a.png", data, names[0]), ("b.png", data, names[1]), ("c.png", data, "gearbox")])
    for row, name in zip(rows, names):
        assert row["status"] == "ok" and row["class_name"] == name and row["class_source"] == "given"
        assert scorer.spec.prompt_class[scorer.spec.prompt_ids.index(row["prompt_id"])] == names.index(name)
    assert rows[2]["status"] == "error" and rows[2]["class_name"] == "gearbox" and rows[2]["class_source"] == "given"
    assert rows[2]["error"] == f"c.png: unknown class 'gearbox'; this model knows {', '.join(names)}"


def test_mixed_batch_equals_separate_batches(scorer, tiny_dataset):
    pngs = [cv2.imencode(".png", img)[1].tobytes() for img in tiny_images(tiny_dataset)[:4]]
    name = scorer.spec.class_names[1]
    items = [(f"{i}.png", d, name if i % 2 else None) for i, d in enumerate(pngs)]
    mixed = scorer.score_bytes(items)
    alone = [scorer.score_bytes([item])[0] for item in items]
    for m, a in zip(mixed, alone):
        assert m["prompt_id"] == a["prompt_id"] and m["class_source"] == a["class_source"]
        assert m["score_raw"] == pytest.approx(a["score_raw"], rel=1e-5)


def test_scorer_matches_predictor(tiny_bundle, scorer, tiny_dataset):
    """The numpy preprocessing + ``infer`` path gives the Predictor's own scores."""
    from onenip_ray.data.images import decode_image, resize_image

    images = tiny_images(tiny_dataset)[:4]
    pngs = [cv2.imencode(".png", img)[1].tobytes() for img in images]
    rows = scorer.score_bytes([(f"{i}", d, None) for i, d in enumerate(pngs)])
    bundle = load_bundle(tiny_bundle)
    batch = np.stack([resize_image(decode_image(d), bundle.config.image_size) for d in pngs])
    expected = bundle.predictor().predict(batch).scores.numpy()
    np.testing.assert_allclose([r["score_raw"] for r in rows], expected, rtol=1e-5)


def test_threshold_override_calibration_and_regions(scorer, tiny_dataset):
    data = cv2.imencode(".png", cv2.resize(tiny_images(tiny_dataset)[0], (300, 150)))[1].tobytes()
    base = scorer.score_bytes([("x.png", data, None)], with_maps=True)[0]
    raw, cal = base["score_raw"], scorer.spec.class_calibration(base["class_name"])
    assert base["score"] == pytest.approx(float(calibrated_score(raw, cal)))
    assert base["is_anomalous"] == (raw > cal.threshold_raw) == (base["num_regions"] > 0)
    assert base[MAP_KEY].shape == (scorer.spec.image_size,) * 2
    assert base["max_pixel_score"] == pytest.approx(float(base[MAP_KEY].max()))

    at = scorer.score_bytes([("x.png", data, None)], threshold_override=raw)[0]
    assert at["score"] == pytest.approx(0.5) and not at["is_anomalous"] and at["num_regions"] == 0
    assert at["threshold_source"] == "manual" and at["threshold_raw"] == raw and at["defect_area_px"] == 0

    low = scorer.score_bytes([("x.png", data, None)], threshold_override=raw - 1e-3)[0]
    assert low["is_anomalous"] and low["score"] > 0.5 and low["num_regions"] >= 1
    top = low["regions"][0]
    assert top["peak_score"] == pytest.approx(raw, rel=1e-5)
    assert 0 <= top["x"] and top["x"] + top["w"] <= 300 and 0 <= top["y"] and top["y"] + top["h"] <= 150
    assert low["defect_area_px"] == sum(r["area_px"] for r in low["regions"]) > 0
    assert low["defect_area_pct"] == pytest.approx(100 * low["defect_area_px"] / (300 * 150))

    everything = scorer.score_bytes([("x.png", data, None)], threshold_override=float(base[MAP_KEY].min()) - 1)[0]
    assert everything["num_regions"] == 1 and everything["defect_area_px"] == 300 * 150
    whole = {"x": 0, "y": 0, "w": 300, "h": 150, "area_px": 45000, "peak_score": 0}
    assert everything["regions"][0] | {"peak_score": 0} == whole


def test_smoothed_map_maximum_is_the_image_score():
    fused = np.random.default_rng(0).random((64, 64)).astype(np.float32)
    fused[50:60, 2:9] += 3.0  # a blob near the border
    expected = float(image_scores(torch.from_numpy(fused)[None], 16)[0])
    smooth = smoothed_map(fused, 16)
    assert smooth.shape == fused.shape
    assert float(smooth.max()) == pytest.approx(expected, rel=1e-6)


def test_find_regions_in_original_pixels():
    """A 64×64 map of a 256 (wide) × 128 (high) original: x scales by 4, y by 2."""
    fused = np.zeros((64, 64), np.float32)
    fused[8:24, 40:56] = 1.0  # one 16×16 square; the 16×16 mean filter peaks at 1.0 on it
    fused[40:56, 0:16] = 0.5  # a weaker square in the bottom-left corner
    regions, area = find_regions(fused, 0.25, 16, width=256, height=128)
    assert [r["peak_score"] for r in regions] == pytest.approx([1.0, 0.5])
    strong, weak = regions
    # the smoothed map exceeds 0.25 where a window overlaps the square by > 1/4
    assert strong["x"] % 4 == 0 and strong["y"] % 2 == 0
    assert strong["x"] < 40 * 4 < 56 * 4 < strong["x"] + strong["w"] <= 256
    assert strong["y"] < 8 * 2 < 24 * 2 < strong["y"] + strong["h"]
    assert weak["x"] == 0 and weak["y"] + weak["h"] <= 128
    assert strong["area_px"] % 8 == 0 and area == strong["area_px"] + weak["area_px"]
    assert find_regions(fused, 2.0, 16, 256, 128) == ([], 0)
    # an original smaller than the map: every region still has pixels, boxes stay inside
    regions, area = find_regions(fused, 0.25, 16, width=10, height=9)
    assert all(r["area_px"] > 0 and r["x"] + r["w"] <= 10 and r["y"] + r["h"] <= 9 for r in regions)
