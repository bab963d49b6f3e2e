"""``onenip report`` (issue 6): a static HTML report from an evaluation and from a scored partition,
checked as files (every <img> is a local, decodable PNG/JPEG) and as rendered by headless Chromium
(no broken image after load, a non-blank screenshot)."""
from __future__ import annotations

import datetime as dt
import html.parser
import json
import os
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest

from onenip_ray.cli import main as cli_main

CHROMIUM = "/usr/bin/chromium"
needs_chromium = pytest.mark.skipif(
    not os.path.exists(CHROMIUM),
    reason=f"{CHROMIUM} not installed (apt-get install -y chromium; .ci/run installs it when it can)",
)
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# Injected into a copy of the page: after load, record every <img> that did not decode.
BROKEN_IMAGE_CHECK = (
    '<script>window.addEventListener("load",function(){var bad=[],im=document.images;'
    'for(var k=0;k<im.length;k++){if(!im[k].complete||im[k].naturalWidth===0)bad.push(im[k].getAttribute("src"));}'
    'document.body.setAttribute("data-images",im.length);document.body.setAttribute("data-broken",JSON.stringify(bad));});</script>'
)


class _Page(html.parser.HTMLParser):
    """Collects <img> attributes, table ids, the metrics table's first-column cells and h3 ids."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[dict[str, str]] = []
        self.tables: list[str] = []
        self.headings: list[str] = []
        self.first_cells: dict[str, list[str]] = {}
        self._table: str | None = None
        self._cell: list[str] | None = None
        self._first = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.images.append(a)
        elif tag == "table":
            self._table = a.get("id", "")
            self.tables.append(self._table)
        elif tag == "tr":
            self._first = True
        elif tag == "td" and self._first and self._table:
            self._cell, self._first = [], False
        elif tag == "h3" and "id" in a:
            self.headings.append(a["id"])

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)

    def handle_endtag(self, tag):
        if tag == "td" and self._cell is not None:
            self.first_cells.setdefault(self._table, []).append("".join(self._cell).strip())
            self._cell = None
        elif tag == "table":
            self._table = None


def _parse(index: Path) -> _Page:
    page = _Page()
    page.feed(index.read_text(encoding="utf-8"))
    return page


def _assert_images_are_local_and_decode(report: Path, page: _Page) -> None:
    assert page.images
    for img in page.images:
        src = img["src"]
        assert "://" not in src and not src.startswith(("/", "data:")), f"not a relative link: {src}"
        path = report / src
        assert path.is_file(), f"broken image link {src}"
        data = path.read_bytes()
        assert data.startswith((b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff")), f"{src} is neither PNG nor JPEG"
        decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        assert decoded is not None and decoded.size > 0, f"{src} does not decode"
        assert img.get("alt"), f"{src} has no alt text"


def _chromium(*args: str, tmp: Path, timeout: int = 120) -> subprocess.CompletedProcess:
    profile = tmp / "chromium-profile"
    profile.mkdir(exist_ok=True)
    return subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
                          capture_output=True, text=True, timeout=timeout, check=False)


def _render_in_chromium(report: Path, tmp: Path, page: str = "index.html") -> tuple[dict[str, str], np.ndarray]:
    """(the <body> attributes after load in a copy with the broken-image check, the screenshot)."""
    check = report / "_check.html"
    check.write_text(
        (report / page).read_text(encoding="utf-8").replace("</body>", BROKEN_IMAGE_CHECK + "</body>"),
        encoding="utf-8",
    )
    dom = _chromium("--virtual-time-budget=10000", "--dump-dom", check.as_uri(), tmp=tmp)
    check.unlink()
    assert dom.returncode == 0, dom.stderr[-2000:]
    body = _Body()
    body.feed(dom.stdout)
    shot = tmp / "screenshot.png"
    run = _chromium(f"--screenshot={shot}", "--window-size=1280,2000", (report / page).as_uri(), tmp=tmp)
    assert run.returncode == 0 and shot.is_file(), run.stderr[-2000:]
    return body.attrs, cv2.imread(str(shot))


class _Body(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.attrs: dict[str, str] = {}

    def handle_starttag(self, tag, attrs):
        if tag == "body":
            self.attrs = dict(attrs)


# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def evaluation_dir(tiny_bundle, tiny_dataset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("evaluation")
    assert cli_main(["evaluate", "--data", str(tiny_dataset), "--bundle", tiny_bundle, "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def evaluation_report(tiny_bundle, evaluation_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report") / "eval-report"
    assert cli_main(["report", "--bundle", tiny_bundle, "--evaluation", str(evaluation_dir), "--out", str(out),
                     "--gallery-size", "4"]) == 0
    return out


def test_evaluation_predictions_carry_the_mask_uri(evaluation_dir, tiny_dataset):
    rows = pq.read_table(evaluation_dir / "predictions.parquet").to_pylist()
    defective = [r for r in rows if r["label"]]
    assert defective and all(r["mask_uri"] and Path(r["mask_uri"]).is_file() for r in defective)
    assert all(r["mask_uri"] is None for r in rows if not r["label"])


def test_evaluation_report_has_metrics_curves_and_a_gallery(evaluation_report, evaluation_dir):
    page = _parse(evaluation_report / "index.html")
    metrics = json.loads((evaluation_dir / "metrics.json").read_text())
    classes = sorted(metrics["per_class"])
    assert "metrics-table" in page.tables
    assert page.first_cells["metrics-table"] == [*classes, "mean"]
    _assert_images_are_local_and_decode(evaluation_report, page)
    srcs = [i["src"] for i in page.images]
    assert sorted(s for s in srcs if s.startswith("figures/roc_")) == [f"figures/roc_{c}.png" for c in classes]
    assert sorted(s for s in srcs if s.startswith("figures/pr_")) == [f"figures/pr_{c}.png" for c in classes]
    assert sorted(s for s in srcs if s.startswith("figures/hist_")) == [f"figures/hist_{c}.png" for c in classes]
    gallery = [s for s in srcs if s.startswith("gallery/")]
    assert any(s.endswith("_overlay.jpg") for s in gallery) and any(s.endswith("_heatmap.png") for s in gallery)
    assert any(s.endswith("_mask.png") for s in gallery), "defective images show their ground truth"
    for section in ("false-positives", "false-negatives", "true-positives", "true-negatives"):
        assert section in page.headings
    # every gallery card is capped at --gallery-size per section: 4 sections x 4 images x <= 4 files
    assert len(gallery) <= 4 * 4 * 4
    text = (evaluation_report / "index.html").read_text()
    assert metrics["model_version"] in text and "images/s" in text


@needs_chromium
def test_evaluation_report_renders_in_headless_chromium(evaluation_report, tmp_path):
    body, shot = _render_in_chromium(evaluation_report, tmp_path)
    page = _parse(evaluation_report / "index.html")
    assert int(body["data-images"]) == len(page.images) > 0
    assert json.loads(body["data-broken"]) == [], "images that did not load in the browser"
    assert shot is not None and shot.shape[1] == 1280
    assert shot.std() > 10, "the screenshot is blank"


# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def scored_partition(tiny_bundle, tiny_dataset, tmp_path_factory) -> Path:
    """A partition as ``onenip score`` writes it (rows from ``Scorer``, one error row,
    ``_SUCCESS.json``), made without Ray: the batch job itself is tested in test_batch.py."""
    from onenip_ray.schema import to_table
    from onenip_ray.scoring import Scorer

    root = tmp_path_factory.mktemp("scores")
    partition = root / "run_date=2026-11-27"
    partition.mkdir()
    images = sorted(tiny_dataset.glob("*/test/*/*.png"))
    items = [(str(p), p.read_bytes(), None) for p in images] + [(str(root / "broken.png"), b"not an image", None)]
    scorer = Scorer.from_uri(tiny_bundle, run_id="20261127-test", run_date=dt.date(2026, 11, 27))
    rows = scorer.score_bytes(items)
    pq.write_table(to_table(rows), partition / "part-20261127-test-00000.parquet")
    ok = [r for r in rows if r["status"] == "ok"]
    summary = {"run_id": "20261127-test", "run_date": "2026-11-27", "model_version": scorer.spec.model_version,
               "input": str(tiny_dataset), "counts": {"total": len(rows), "ok": len(ok), "error": len(rows) - len(ok),
                                                       "anomalous": sum(r["is_anomalous"] for r in ok)},
               "images_per_second": 12.5, "pipeline_seconds": 1.6, "wall_seconds": 2.0}
    (partition / "_SUCCESS.json").write_text(json.dumps(summary))
    return partition


def test_scores_report_has_counts_histograms_gallery_and_errors(tiny_bundle, scored_partition, tmp_path):
    out = tmp_path / "scores-report"
    assert cli_main(["report", "--bundle", tiny_bundle, "--scores", str(scored_partition), "--out", str(out)]) == 0
    page = _parse(out / "index.html")
    assert "counts-table" in page.tables and "metrics-table" not in page.tables
    assert page.first_cells["counts-table"] == ["disc", "stripes"]
    _assert_images_are_local_and_decode(out, page)
    srcs = [i["src"] for i in page.images]
    assert [s for s in srcs if s.startswith("figures/")] == ["figures/hist_disc.png", "figures/hist_stripes.png"]
    assert sum(s.endswith("_heatmap.png") for s in srcs) == 12  # every scored image: flagged or passed
    assert {"flagged", "near-threshold"} <= set(page.headings)
    text = (out / "index.html").read_text()
    assert "broken.png" in text and "not a decodable image" in text  # the error row is listed
    assert "12.50 images/s" in text and "p95" in text
    # one Parquet file of the partition works as well
    (part,) = scored_partition.glob("*.parquet")
    assert cli_main(["report", "--bundle", tiny_bundle, "--scores", str(part), "--out",
                     str(tmp_path / "one-file")]) == 0


def test_report_escapes_class_names_uris_and_messages(tiny_bundle, scored_partition, tmp_path):
    """Class names, URIs and error messages come from users' data: the template engine escapes them."""
    from onenip_ray.schema import error_row, to_table

    hostile = '<script>alert("x")</script>'
    rows = pq.read_table(next(scored_partition.glob("*.parquet"))).to_pylist()
    ok = next(r for r in rows if r["status"] == "ok")
    ok["class_name"] = f"{hostile}&"
    rows.append(error_row(f"s3://bucket/{hostile}.png", f"cannot read {hostile}", error_kind="unreadable",
                          model_version=ok["model_version"], run_id=ok["run_id"], run_date=ok["run_date"]))
    partition = tmp_path / "run_date=2026-11-27"
    partition.mkdir()
    pq.write_table(to_table(rows), partition / "part-00000.parquet")
    out = tmp_path / "report"
    assert cli_main(["report", "--bundle", tiny_bundle, "--scores", str(partition), "--out", str(out)]) == 0
    text = (out / "index.html").read_text()
    assert "<script>" not in text and "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;" in text
    assert _parse(out / "index.html").first_cells["counts-table"][0] == f"{hostile}&"


def test_report_rejects_a_results_root_and_missing_inputs(tiny_bundle, scored_partition, tmp_path, capsys):
    assert cli_main(["report", "--bundle", tiny_bundle, "--scores", str(scored_partition.parent), "--out",
                     str(tmp_path / "r")]) == 2
    assert "pass one partition" in capsys.readouterr().err
    assert cli_main(["report", "--bundle", tiny_bundle, "--evaluation", str(tmp_path), "--out",
                     str(tmp_path / "r")]) == 2
    assert "metrics.json not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # exactly one source
        cli_main(["report", "--bundle", tiny_bundle, "--out", str(tmp_path / "r")])
    assert not (tmp_path / "r").exists()


def test_report_reads_and_writes_s3(tiny_bundle, evaluation_dir, s3_bucket):
    """Evaluation on S3 in, report on S3 out (index.html last, so a readable report is complete)."""
    from onenip_ray import storage

    src = f"{s3_bucket}/eval"
    for name in ("metrics.json", "predictions.parquet"):
        storage.write_bytes(f"{src}/{name}", (evaluation_dir / name).read_bytes())
    out = f"{s3_bucket}/reports/eval"
    assert cli_main(["report", "--bundle", tiny_bundle, "--evaluation", src, "--out", out, "--gallery-size", "2"]) == 0
    names = storage.list_files(out, relative=True)
    assert (
        "index.html" in names
        and any(n.startswith("figures/roc_") for n in names)
        and any(n.startswith("gallery/") for n in names)
    )
    page = _Page()
    page.feed(storage.read_bytes(f"{out}/index.html").decode())
    assert {i["src"] for i in page.images} <= set(names), "every image the page links is in the bucket"
