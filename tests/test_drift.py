"""``onenip drift`` (issue 28): nightly tables generated here with known behaviour — quiet nights drawn
from the bundle's calibration normals, then a shifted night, a night with an unknown product and a
night with a surge of error rows — each raise exactly their alert; partial data gives lines, not
crashes; the page renders in headless Chromium with no broken image; S3 tables are read too."""
from __future__ import annotations

import datetime as dt
import io
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from onenip_ray import storage
from onenip_ray.bundle import FORMAT
from onenip_ray.calibration import Calibration, ClassCalibration
from onenip_ray.cli import main as cli_main
from onenip_ray.config import AlertRules
from onenip_ray.drift import drift, load_rules, parse_references, psi, shift, wilson
from onenip_ray.formats import BUNDLE_FILE, SUCCESS_FILE, UNKNOWN_CLASS
from onenip_ray.schema import ERROR_INVALID_IMAGE, FILE_SCHEMA, PARTITION_COLUMN, error_row, to_table, utc_now
from tests.test_report import _parse, _render_in_chromium, needs_chromium

VERSION = "drift-test-v1"
CLASSES = ("bottle", "capsules")
ROWS_PER_CLASS = 300
FIRST = dt.date(2026, 12, 1)


def _calibration(rng: np.random.Generator) -> Calibration:
    """Two classes with 200 calibration normals each (log-normal scores, similarities near 1), the
    threshold at the normals' 90th percentile (target FPR 0.1), as training stores them."""
    per_class = {}
    for i, cls in enumerate(CLASSES):
        scores = np.sort(np.exp(rng.normal(3.0 + i, 0.15, 200)))
        sims = np.sort(1.0 - np.abs(rng.normal(0.0, 0.004, 200)))
        per_class[cls] = ClassCalibration(
            threshold_raw=float(np.quantile(scores, 0.9)), score_scale=float(scores.std()),
            normal_median=float(np.median(scores)), normal_mean=float(scores.mean()), normal_std=float(scores.std()),
            map_low=0.0, num_images=200, normal_similarity_min=float(sims.min()), route_floor=0.7,
            normal_scores=scores.tolist(), normal_similarities=sims.tolist())
    return Calibration(rec_scale=1.0, target_fpr=0.1, per_class=per_class)


def _write_bundle(path: Path, calibration: Calibration) -> str:
    """The part of a bundle ``onenip drift`` reads: ``bundle.json`` with version and calibration."""
    path.mkdir(parents=True, exist_ok=True)
    (path / BUNDLE_FILE).write_text(json.dumps({"format": FORMAT, "version": VERSION,
                                                "calibration": calibration.to_dict()}))
    return str(path)


def _ok_row(date: dt.date, i: int, cls: str, score: float, similarity: float, threshold: float,
            version: str = VERSION) -> dict:
    row = error_row(f"s3://line/{date}/{cls}/{i:05d}.png", "", error_kind="", model_version=version,
                    run_id="r", run_date=date)
    row.update(class_name=cls, class_source="retrieved", route_similarity=similarity, prompt_id=f"{cls}/0",
               score_raw=score, score=0.5, threshold_raw=threshold, threshold_source="per_class",
               is_anomalous=bool(score > threshold or cls == UNKNOWN_CLASS), status="ok", error=None,
               error_kind=None, scored_at=utc_now())
    return row


def _night_rows(date: dt.date, cal: Calibration, rng: np.random.Generator, *, score_factor: float = 1.0,
                similarity_drop: float = 0.0, unknown: int = 0, errors: int = 0, classes=CLASSES,
                version: str = VERSION) -> list[dict]:
    """One night: per class ``ROWS_PER_CLASS`` images drawn from its calibration normals (scores
    × ``score_factor``, similarities − ``similarity_drop``), ``unknown`` images of a product the
    model does not know and ``errors`` undecodable inputs."""
    rows = []
    for cls in classes:
        c = cal.per_class[cls]
        scores = rng.choice(c.normal_scores, ROWS_PER_CLASS) * rng.normal(1.0, 0.01, ROWS_PER_CLASS) * score_factor
        sims = np.minimum(1.0, rng.choice(c.normal_similarities, ROWS_PER_CLASS) - similarity_drop)
        rows += [_ok_row(date, i, cls, float(s), float(m), c.threshold_raw, version)
                 for i, (s, m) in enumerate(zip(scores, sims))]
    rows += [_ok_row(date, 10_000 + i, UNKNOWN_CLASS, 80.0, 0.45, cal.per_class[CLASSES[0]].threshold_raw, version)
             for i in range(unknown)]
    rows += [error_row(f"s3://line/{date}/broken/{i}.png", "not an image", error_kind=ERROR_INVALID_IMAGE,
                       model_version=version, run_id="r", run_date=date) for i in range(errors)]
    return rows


def _commit_night(output: str, date: dt.date, rows: list[dict], bundle: str | None, version: str = VERSION,
                  marker: bool = True) -> None:
    """A night as ``onenip score`` commits it: Parquet without the partition column, then ``_SUCCESS.json``."""
    partition = storage.join(output, f"{PARTITION_COLUMN}={date:%Y-%m-%d}")
    name = f"part-{date:%Y%m%d}-00000.parquet"
    table = to_table(rows).drop_columns([PARTITION_COLUMN]).cast(FILE_SCHEMA)
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    storage.write_bytes(storage.join(partition, name), buffer.getvalue())
    if marker:
        storage.write_bytes(storage.join(partition, SUCCESS_FILE), json.dumps(
            {"run_date": str(date), "model_version": version, "bundle": bundle, "files": [name]}).encode())


@pytest.fixture(scope="module")
def plant(tmp_path_factory) -> tuple[str, str, Calibration]:
    """(table, bundle, calibration): nights 1–5 quiet, 6 shifted (scores × 0.85 — normal parts that
    now look more normal, defects would pass —, similarities − 0.03), 7 with 5 % unknown products,
    8 with 10 % error rows."""
    rng = np.random.default_rng(28)
    root = tmp_path_factory.mktemp("drift")
    cal = _calibration(rng)
    bundle, output = _write_bundle(root / "bundle", cal), str(root / "results")
    changes = {6: {"score_factor": 0.85, "similarity_drop": 0.03}, 7: {"unknown": 32}, 8: {"errors": 66}}
    for day in range(1, 9):
        date = FIRST + dt.timedelta(days=day - 1)
        _commit_night(output, date, _night_rows(date, cal, rng, **changes.get(day, {})), bundle)
    return output, bundle, cal


def _alerts(result: dict) -> list[tuple[str, str | None, str]]:
    return sorted((a["date"], a["class_name"], a["rule"]) for a in result["alerts"])


def test_each_injected_change_raises_exactly_its_alert(plant):
    output, bundle, _ = plant
    result = drift(output, days=8)
    assert _alerts(result) == [("2026-12-06", "bottle", "shift"), ("2026-12-06", "capsules", "shift"),
                               ("2026-12-07", None, "unknown_product"), ("2026-12-08", None, "error_rate")]
    assert result["bundle"] == {"uri": bundle, "version": VERSION}
    shifted = [a for a in result["alerts"] if a["rule"] == "shift"][0]
    assert {(e["signal"], e["reference"]) for e in shifted["evidence"]} == {
        ("score", "calibration"), ("score", "trailing"), ("similarity", "calibration"), ("similarity", "trailing")}
    quiet = [r for r in result["classes"]["bottle"] if r["date"] <= "2026-12-05"]
    for r in quiet:  # drawn from the reference: a small PSI, KS does not reject
        assert r["shift"]["score"]["calibration"]["psi"] < 0.1 and r["shift"]["score"]["calibration"]["ks_p"] > 0.01
        assert 0.03 < r["anomaly_rate"] < 0.2 and r["rate_low"] < r["anomaly_rate"] < r["rate_high"]
    night7 = result["nights"][6]
    assert night7["unknown"] == 32 and night7["routing"][UNKNOWN_CLASS] == pytest.approx(32 / 632, abs=1e-4)
    assert result["nights"][7]["errors_by_kind"] == {ERROR_INVALID_IMAGE: 66}
    assert "note" in result["classes"]["bottle"][0]["shift"]["score"]["trailing"]  # the first night has none


def test_a_rate_jump_raises_the_rate_alert(tmp_path):
    rng = np.random.default_rng(5)
    cal = _calibration(rng)
    bundle, output = _write_bundle(tmp_path / "bundle", cal), str(tmp_path / "results")
    for day in range(4):
        date = FIRST + dt.timedelta(days=day)
        rows = _night_rows(date, cal, rng)
        if day == 3:  # a third of bottle's parts get a defect: scores far above the threshold
            for row in [r for r in rows if r["class_name"] == "bottle"][:100]:
                row.update(score_raw=row["threshold_raw"] * 3, is_anomalous=True)
        _commit_night(output, date, rows, bundle)
    result = drift(output, days=4, references="calibration")
    assert [(a["date"], a["class_name"], a["rule"]) for a in result["alerts"]] == [
        ("2026-12-04", "bottle", "anomaly_rate")], result["alerts"]


def test_partial_data_gives_a_line_for_each_gap_never_a_crash(tmp_path):
    rng = np.random.default_rng(3)
    cal = _calibration(rng)
    bundle, output = _write_bundle(tmp_path / "bundle", cal), str(tmp_path / "results")
    day = [FIRST + dt.timedelta(days=i) for i in range(7)]
    _commit_night(output, day[0], _night_rows(day[0], cal, rng), bundle)
    # day[1]: no run; day[2]: a run that never committed
    _commit_night(output, day[2], _night_rows(day[2], cal, rng), bundle, marker=False)
    _commit_night(output, day[3], _night_rows(day[3], cal, rng, classes=("bottle",)), bundle)  # capsules gone
    _commit_night(output, day[4], _night_rows(day[4], cal, rng, classes=(), errors=40), bundle)  # errors only
    _commit_night(output, day[5], _night_rows(day[5], cal, rng), bundle)  # capsules back
    _commit_night(output, day[6], _night_rows(day[6], cal, rng, version="v2"), bundle, version="v2")
    result = drift(output, days=7)
    notes = "\n".join(result["notes"])
    for line in ("2026-12-02: no partition", "2026-12-03: no _SUCCESS.json", "capsules: no rows on 2026-12-04",
                 "2026-12-05: only error rows (40)", f"2026-12-07: model version {VERSION} → v2"):
        assert line in notes, notes
    assert [n["state"] for n in result["nights"]] == ["committed", "missing", "uncommitted", "committed",
                                                      "committed", "committed", "committed"]
    assert _alerts(result) == [("2026-12-05", None, "error_rate")]
    last = result["classes"]["bottle"][-1]["shift"]
    assert "note" in last["score"]["calibration"] and "note" in last["score"]["trailing"]  # v2: no reference yet


def test_cli_writes_page_and_json_and_exits_3_on_alerts_0_when_quiet(plant, tmp_path, capsys):
    output, _, _ = plant
    out = tmp_path / "drift"
    assert cli_main(["drift", "--scores", output, "--days", "8", "--out", str(out)]) == 3
    alerts = json.loads((out / "alerts.json").read_text())
    assert alerts["exit_code"] == 3 and len(alerts["alerts"]) == 4
    assert json.loads((out / "drift.json").read_text())["window"] == {"from": "2026-12-01", "until": "2026-12-08",
                                                                       "days": 8}
    page = _parse(out / "drift.html")
    assert len(page.images) == 3 * len(CLASSES)
    assert "distribution shift" in (out / "drift.html").read_text()
    quiet = tmp_path / "quiet"
    assert cli_main(["drift", "--scores", output, "--days", "5", "--until", "2026-12-05", "--out", str(quiet)]) == 0
    assert json.loads((quiet / "alerts.json").read_text())["alerts"] == []
    capsys.readouterr()
    assert cli_main(["drift", "--scores", str(tmp_path / "nothing"), "--days", "3", "--out", str(quiet)]) == 2
    assert "no results table" in capsys.readouterr().err


@needs_chromium
def test_drift_page_renders_in_headless_chromium_with_no_broken_image(plant, tmp_path):
    output, _, _ = plant
    out = tmp_path / "drift"
    cli_main(["drift", "--scores", output, "--days", "8", "--out", str(out)])
    body, shot = _render_in_chromium(out, tmp_path, page="drift.html")
    assert int(body["data-images"]) == 3 * len(CLASSES)
    assert json.loads(body["data-broken"]) == [], "images that did not load in the browser"
    assert shot is not None and shot.std() > 10, "the screenshot is blank"


def test_a_fixed_window_reference_and_a_yaml_rule_file(plant, tmp_path):
    output, _, _ = plant
    result = drift(output, days=3, until=dt.date(2026, 12, 7), references="2026-12-01..2026-12-03")
    assert {(a["date"], a["rule"]) for a in result["alerts"]} == {("2026-12-06", "shift"),
                                                                  ("2026-12-07", "unknown_product")}
    config = tmp_path / "rules.yaml"
    config.write_text("unknown_share: 0.1\npsi: 100\n")
    rules = load_rules(str(config))
    assert (rules.unknown_share, rules.psi, rules.error_rate) == (0.1, 100.0, AlertRules().error_rate)
    assert drift(output, days=3, until=dt.date(2026, 12, 7), rules=rules)["alerts"] == []
    config.write_text("unknown_shares: 0.1\n")
    with pytest.raises(ValueError, match="unknown keys.*unknown_shares"):
        load_rules(str(config))
    with pytest.raises(ValueError, match="DATE..DATE"):
        parse_references("2026-12-05..2026-12-01")


def test_drift_reads_a_table_in_s3(s3_bucket, tmp_path):
    rng = np.random.default_rng(7)
    cal = _calibration(rng)
    bundle, output = _write_bundle(tmp_path / "bundle", cal), f"{s3_bucket}/results"
    for day in range(3):
        date = FIRST + dt.timedelta(days=day)
        _commit_night(output, date, _night_rows(date, cal, rng, errors=40 if day == 2 else 0), bundle)
    result = drift(output, days=3)
    assert _alerts(result) == [("2026-12-03", None, "error_rate")]


def test_statistics_on_known_inputs():
    rng = np.random.default_rng(0)
    reference = rng.normal(0, 1, 5000)
    assert psi(rng.normal(0, 1, 5000), reference) < 0.01
    assert psi(rng.normal(1, 1, 5000), reference) > 0.25  # a one-sd shift is a major one
    low, high = wilson(10, 100)
    assert (round(low, 4), round(high, 4)) == (0.0552, 0.1744)  # the textbook Wilson interval
    assert wilson(0, 0) == (0.0, 1.0)
    assert "note" in shift(np.ones(5), reference, min_rows=10)
