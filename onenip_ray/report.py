"""``onenip report``: a static HTML report of an evaluation or of a nightly scoring run.

The report is a folder (``index.html`` + ``figures/*.png`` + ``gallery/*``) with relative links and
no external assets, so it can be opened from disk, zipped, or served from a bucket as is:

* a run summary (images, throughput, model version, counts; latency percentiles for scoring runs);
* from an evaluation (``onenip evaluate --out DIR``): the per-class metrics table with the mean
  over classes and the operating point at the deployed threshold (precision, recall, F1, FPR,
  TP/FP/FN/TN), and per class the ROC and PR curves of the image scores (the deployed threshold
  marked) and a score histogram of normal vs defective images with the threshold line;
* from a scored partition (``onenip score``): per-class counts and score histograms;
* a heat-map gallery: image, overlay (heat map blended in, regions boxed), heat map and, where the
  dataset has one, the ground-truth mask — sections for false positives and false negatives at the
  deployed threshold (evaluation) or for flagged / near-threshold images (scoring), sorted by the
  calibrated score. The gallery images are re-scored with the bundle (``Scorer``) to get their
  maps; heat maps use the class's fixed calibration scale (``visualization.render_heatmap``), never
  a per-image stretch, so a red area means the same everywhere.

Each section is built as plain values by a small function here; ``templates/report.html.j2``
(Jinja2, autoescape on) turns them into HTML, so every class name, URI and message is escaped.
The pictures themselves are drawn by ``visualization``.
"""
from __future__ import annotations

import datetime as dt
import functools
import json
import os
import posixpath
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from jinja2 import Environment, PackageLoader, StrictUndefined

from . import storage
from .bundle import Bundle, load_bundle
from .config import EVALUATE_BATCH_SIZE, GALLERY_SIZE
from .data.images import decode_image, decode_mask
from .errors import InputError
from .formats import METRICS_FILE, PREDICTIONS_FILE, SUCCESS_FILE, UNKNOWN_CLASS, uri_stem
from .metrics import clf_curve, confusion
from .scoring import MAP_KEY, Scorer, ScoringSpec, find_regions
from .visualization import (
    DEFECT_COLOUR,
    NORMAL_COLOUR,
    histogram_figure,
    pr_figure,
    render_heatmap,
    render_image,
    render_mask,
    render_overlay,
    roc_figure,
    thumbnail,
)

INDEX, TEMPLATE = "index.html", "report.html.j2"
FIGURES, GALLERY = "figures", "gallery"
SCORE_COLUMNS = ("image_uri", "class_name", "class_source", "score_raw", "score", "threshold_raw", "is_anomalous",
                 "status", "error", "latency_ms", "model_version", "run_date")
METRIC_COLUMNS = (
    ("image_auroc", "I-AUROC"), ("image_ap", "I-AP"), ("image_f1_max", "I-F1max"),
    ("pixel_auroc", "P-AUROC"), ("pixel_ap", "P-AP"), ("pixel_aupro", "AUPRO"),
    ("threshold_precision", "precision@thr"), ("threshold_recall", "recall@thr"),
    ("threshold_f1", "F1@thr"), ("threshold_fpr", "FPR@thr"), ("target_fpr", "target FPR"),
)
CONFUSION_KEYS = ("TP", "FP", "FN", "TN")
GALLERY_ROLES = (("image", "image"), ("overlay", "overlay"), ("heatmap", "heat map"), ("mask", "ground truth"))
MAX_ERROR_ROWS = 200  # inputs listed in the errors table
MISSING = "–"
Row = dict[str, Any]  # one per-image row of predictions.parquet or of a scored partition


@dataclass
class Source:
    """What the report is built from: per-image rows plus the run's own summary."""

    kind: str  # "evaluation" | "scores"
    uri: str
    rows: list[Row]
    metrics: dict[str, Any] | None = None  # metrics.json (evaluation)
    run: dict[str, Any] | None = None  # _SUCCESS.json (scores)
    notes: list[str] = field(default_factory=list)

    @property
    def labelled(self) -> bool:
        return self.kind == "evaluation"


@dataclass
class GalleryItem:
    files: dict[str, str]  # role (image, overlay, heatmap, mask) -> path relative to the report
    error: str | None = None


@dataclass
class Section:
    """One gallery section: its anchor, heading, sort order in words and all its rows."""

    anchor: str
    name: str
    order: str
    rows: list[Row]


# -- inputs --------------------------------------------------------------------------------------
def _read_table(uri: str, endpoint: str | None, columns: tuple[str, ...] | None = None) -> pa.Table:
    fs, path = storage.filesystem_for(uri, endpoint)
    if columns is not None:
        present = set(pq.read_schema(path, filesystem=fs).names)
        columns = tuple(c for c in columns if c in present)
    return pq.read_table(path, filesystem=fs, columns=list(columns) if columns is not None else None)


def load_evaluation(uri: str, endpoint: str | None = None) -> Source:
    """``metrics.json`` and ``predictions.parquet`` of an ``onenip evaluate`` output directory."""
    for name in (METRICS_FILE, PREDICTIONS_FILE):
        if not storage.exists(storage.join(uri, name), endpoint):
            raise FileNotFoundError(
                f"{uri} is not an evaluation directory: {name} not found (written by `onenip evaluate --out`)")
    metrics = json.loads(storage.read_bytes(storage.join(uri, METRICS_FILE), endpoint))
    rows = _read_table(storage.join(uri, PREDICTIONS_FILE), endpoint).to_pylist()
    notes = []
    if rows and "mask_uri" not in rows[0]:
        notes.append("predictions.parquet has no mask_uri column (written by an older version): "
                     "the gallery shows no ground truth")
    return Source("evaluation", uri, rows, metrics=metrics, notes=notes)


def _partition_files(uri: str, endpoint: str | None) -> tuple[str, list[str]]:
    """(the partition, its Parquet files) of a partition directory or of one of its files."""
    if not storage.is_dir(uri, endpoint):
        if storage.exists(uri, endpoint) and uri.lower().endswith(".parquet"):
            return posixpath.dirname(storage.canonical_uri(uri)), [uri]
        raise FileNotFoundError(f"{uri}: not a scored partition directory or Parquet file (written by `onenip score`)")
    names = [n for n in storage.list_files(uri, (".parquet",), endpoint, relative=True)
             if not any(part.startswith(("_", ".")) for part in n.split("/"))]
    if any("run_date=" in n for n in names) or not names:
        subdirs = [d for d in storage.list_dirs(uri, endpoint) if d.startswith("run_date=")]
        example = storage.join(uri, subdirs[-1]) if subdirs else ""
        hint = f"; it looks like a results root: pass one partition, e.g. {example}" if subdirs else ""
        raise FileNotFoundError(f"{uri}: not one scored partition (no Parquet files directly in it){hint}")
    return uri, [storage.join(uri, *n.split("/")) for n in names]


def load_scores(uri: str, endpoint: str | None = None) -> Source:
    """Rows of one scored partition (``OUTPUT/run_date=…/``) or one of its Parquet files, and the
    partition's ``_SUCCESS.json`` when present."""
    partition, files = _partition_files(uri, endpoint)
    rows: list[Row] = []
    for f in files:  # the columns the report uses (not the regions): a night of 10^6 rows stays manageable
        rows.extend(_read_table(f, endpoint, SCORE_COLUMNS).to_pylist())
    marker = storage.join(partition, SUCCESS_FILE)
    if storage.exists(marker, endpoint):
        return Source("scores", uri, rows, run=json.loads(storage.read_bytes(marker, endpoint)))
    note = (f"no {SUCCESS_FILE} beside the results: the run summary is computed from the rows only "
            "(an S3 partition without it may be incomplete or being rewritten)")
    return Source("scores", uri, rows, notes=[note])


# -- numbers -------------------------------------------------------------------------------------
def format_value(value: Any, pct: bool = False) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return MISSING
    if pct:
        return f"{100 * value:.1f}"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def curves(labels: np.ndarray, scores: np.ndarray) -> dict[str, np.ndarray] | None:
    """ROC (fpr, tpr) and PR (recall, precision) points of image scores; None without both kinds."""
    curve = clf_curve(np.asarray(labels), np.asarray(scores, np.float64))
    if curve is None:
        return None
    tps, fps = (c.astype(np.float64) for c in curve)
    return {
        "fpr": np.concatenate([[0.0], fps / fps[-1]]), "tpr": np.concatenate([[0.0], tps / tps[-1]]),
        "recall": tps / tps[-1], "precision": tps / (tps + fps),
    }


def _operating_points(
    labels: np.ndarray, raw: np.ndarray, threshold: float | None
) -> tuple[tuple[float, float] | None, tuple[float, float] | None]:
    """The deployed threshold's (FPR, TPR) and (recall, precision); None where undefined."""
    if threshold is None:
        return None, None
    conf = confusion(labels, raw > threshold)
    tpr = conf["TP"] / max(1, conf["TP"] + conf["FN"])
    roc = (conf["FP"] / max(1, conf["FP"] + conf["TN"]), tpr)
    pr = (tpr, conf["TP"] / (conf["TP"] + conf["FP"])) if conf["TP"] + conf["FP"] else None
    return roc, pr


def _threshold_for(cls: str, rows: list[Row], bundle: Bundle) -> float | None:
    values = [r["threshold_raw"] for r in rows if r.get("threshold_raw") is not None]
    if values:
        return float(np.median(values))
    cal = bundle.calibration.per_class.get(cls)
    return cal.threshold_raw if cal else None


def _by_class(rows: list[Row]) -> dict[str, list[Row]]:
    grouped: dict[str, list[Row]] = {}
    for r in rows:
        grouped.setdefault(r.get("class_name") or UNKNOWN_CLASS, []).append(r)
    return dict(sorted(grouped.items()))


# -- gallery images ------------------------------------------------------------------------------
def _read_images(
    rows: list[Row], given_class: bool, endpoint: str | None
) -> tuple[list[Row], list[tuple[str, bytes, str | None]], dict[str, GalleryItem]]:
    """(the rows whose image is readable, their ``score_bytes`` payloads, items for the others)."""
    readable, payloads, failed = [], [], {}
    for row in rows:
        try:
            data = storage.read_bytes(row["image_uri"], endpoint)
        except Exception as exc:  # noqa: BLE001 - moved or deleted since it was scored: a note on its card, not a failed report
            failed[row["image_uri"]] = GalleryItem({}, f"cannot read the image now: {exc}")
            continue
        readable.append(row)
        payloads.append((row["image_uri"], data, row.get("class_name") if given_class else None))
    return readable, payloads, failed


def _gallery_mask(row: Row, width: int, height: int, endpoint: str | None) -> bytes | None:
    if not row.get("mask_uri"):
        return None
    try:
        mask = decode_mask(storage.read_bytes(row["mask_uri"], endpoint), row["mask_uri"])
    except Exception:  # noqa: BLE001 - an unreadable mask: the card shows no ground truth
        return None
    return render_mask(mask, width, height)


def _render_item(row: Row, data: bytes, result: dict[str, Any], spec: ScoringSpec, out_dir: str,
                 endpoint: str | None) -> GalleryItem:
    """Write one scored image's thumbnail, overlay, heat map and mask into ``out_dir/gallery``."""
    if result["status"] != "ok":
        return GalleryItem({}, result["error"])
    uri, fused, threshold = row["image_uri"], result[MAP_KEY], float(result["threshold_raw"])
    cal = spec.prompt_calibration(spec.prompt_ids.index(result["prompt_id"]))
    thumb = thumbnail(decode_image(data, uri))
    height, width = thumb.shape[:2]
    regions = find_regions(fused, threshold, spec.score_pool, width, height, include_peak=True)[0] \
        if result["is_anomalous"] else []
    stem = f"{GALLERY}/{uri_stem(uri)}"
    images = {"image": (f"{stem}_image.jpg", render_image(thumb)),
              "overlay": (f"{stem}_overlay.jpg", render_overlay(thumb, fused, cal, regions, threshold)),
              "heatmap": (f"{stem}_heatmap.png", render_heatmap(fused, cal, threshold))}
    mask = _gallery_mask(row, width, height, endpoint)
    if mask is not None:
        images["mask"] = (f"{stem}_mask.png", mask)
    for path, encoded in images.values():
        storage.write_bytes(os.path.join(out_dir, path), encoded)
    return GalleryItem({role: path for role, (path, _) in images.items()})


def render_gallery(
    items: list[Row], bundle: Bundle, out_dir: str, given_class: bool, endpoint: str | None,
    batch_size: int = EVALUATE_BATCH_SIZE,
) -> dict[str, GalleryItem]:
    """Re-score ``items`` (rows with ``image_uri``, ``class_name``, optional ``mask_uri``) and write
    their image, overlay, heat map and mask files into ``out_dir/gallery``; keyed by image URI."""
    os.makedirs(os.path.join(out_dir, GALLERY), exist_ok=True)
    scorer = Scorer(bundle, batch_size=batch_size, run_id="report")
    done: dict[str, GalleryItem] = {}
    for start in range(0, len(items), batch_size):
        readable, payloads, failed = _read_images(items[start : start + batch_size], given_class, endpoint)
        done.update(failed)
        if not payloads:
            continue
        for row, (uri, data, _), result in zip(readable, payloads, scorer.score_bytes(payloads, with_maps=True)):
            done[uri] = _render_item(row, data, result, scorer.spec, out_dir, endpoint)
    return done


# -- sections: run summary -----------------------------------------------------------------------
def _bundle_info(source: Source, bundle: Bundle, bundle_uri: str) -> list[tuple[str, Any]]:
    prompts = bundle.pool.prompt_ids
    info: list[tuple[str, Any]] = [
        ("source", source.uri), ("bundle", bundle_uri), ("model version", bundle.version),
        ("bundle created", str(bundle.meta.get("created_at", MISSING))),
        ("backbone", f"{bundle.config.backbone} at {bundle.config.image_size} px"),
        ("classes", ", ".join(bundle.classes)),
        ("prompt images", ", ".join(prompts[:6]) + (" …" if len(prompts) > 6 else "")),
    ]
    epochs = len((bundle.meta.get("training") or {}).get("history", []))
    if epochs:
        info.append(("training epochs", epochs))
    return info


def _evaluation_info(source: Source) -> list[tuple[str, Any]]:
    m, rows = source.metrics or {}, source.rows
    seconds, count = m.get("seconds"), m.get("num_images", len(rows))
    defective = sum(1 for r in rows if r.get("label"))
    throughput = f"{count / seconds:.2f} images/s (model load, decode and metrics included)" if seconds else MISSING
    return [
        ("images evaluated", count), ("defective / good", f"{defective} / {len(rows) - defective}"),
        ("wall time", f"{seconds:.1f} s" if seconds else MISSING), ("throughput", throughput),
        ("prompt mode", str(m.get("prompt_mode", MISSING))),
        ("routing accuracy", f"{format_value(m.get('routing_accuracy'), pct=True)} %"),
    ]


def _latency_text(ok_rows: list[Row]) -> str:
    latencies = [float(r["latency_ms"]) for r in ok_rows if r.get("latency_ms") is not None]
    if not latencies:
        return MISSING
    p50, p95 = np.percentile(latencies, [50, 95])
    return f"p50 {p50:.0f} ms · p95 {p95:.0f} ms · max {max(latencies):.0f} ms"


def _scoring_info(source: Source, ok_rows: list[Row], error_rows: list[Row]) -> list[tuple[str, Any]]:
    run, rows = source.run or {}, source.rows
    counts = run.get("counts") or {"total": len(rows), "ok": len(ok_rows), "error": len(error_rows),
                                   "anomalous": sum(1 for r in ok_rows if r.get("is_anomalous"))}
    run_date = run.get("run_date", next((str(r.get("run_date")) for r in rows), MISSING))
    throughput = (f"{run['images_per_second']:.2f} images/s (pipeline {run.get('pipeline_seconds', 0):.1f} s, "
                  f"wall {run.get('wall_seconds', 0):.1f} s)") if run.get("images_per_second") else MISSING
    return [
        ("run", f"{run.get('run_id', MISSING)} (run_date {run_date})"), ("input", str(run.get("input", MISSING))),
        ("images", f"{counts['total']} total · {counts['ok']} scored · {counts['error']} failed · "
                   f"{counts['anomalous']} anomalous"),
        ("throughput", throughput), ("latency per image", _latency_text(ok_rows)),
    ]


def _version_notes(source: Source, bundle: Bundle) -> list[str]:
    """A warning when the rows were scored by another model version than ``bundle``."""
    version = (source.metrics or {}).get("model_version") or (source.run or {}).get("model_version") \
        or next((r.get("model_version") for r in source.rows if r.get("model_version")), None)
    if not version or version == bundle.version:
        return []
    return [f"the {source.kind} was made with model version {version}, but --bundle is version {bundle.version}: "
            "the gallery's heat maps come from --bundle and may not match the scores shown"]


# -- sections: per-class table -------------------------------------------------------------------
def _confusion_cells(rows: list[Row]) -> list[int]:
    labels = np.array([int(r["label"]) for r in rows], int)
    conf = confusion(labels, np.array([bool(r["is_anomalous"]) for r in rows], bool))
    return [conf[k] for k in CONFUSION_KEYS]


def _metric_row(name: str, images: int, metrics: dict[str, Any], rows: list[Row], css: str = "") -> dict[str, Any]:
    values = [format_value(metrics.get(k), pct=True) for k, _ in METRIC_COLUMNS]
    return {"cells": [name, images, *values, *_confusion_cells(rows)], "css": css}


def _metrics_table(metrics: dict[str, Any], by_class: dict[str, list[Row]], ok_rows: list[Row]) -> dict[str, Any]:
    """Per-class metrics of an evaluation, the unweighted mean last (its TP/FP/FN/TN are totals)."""
    rows = [_metric_row(cls, cm.get("num_images", len(by_class.get(cls, []))), cm, by_class.get(cls, []))
            for cls, cm in sorted((metrics.get("per_class") or {}).items())]
    if metrics.get("mean"):
        rows.append(_metric_row("mean", metrics.get("num_images", len(ok_rows)), metrics["mean"], ok_rows, css="mean"))
    header = ["class", "images", *(title for _, title in METRIC_COLUMNS), *CONFUSION_KEYS]
    return {"id": "metrics-table", "header": header, "rows": rows}


def _counts_table(by_class: dict[str, list[Row]], bundle: Bundle) -> dict:
    """Per-class counts of a scoring run at the deployed threshold."""
    rows = []
    for cls, cls_rows in by_class.items():
        flagged = sum(1 for r in cls_rows if r.get("is_anomalous"))
        cells = [cls, len(cls_rows), flagged, f"{100 * flagged / len(cls_rows):.1f} %",
                 format_value(float(np.median([r["score"] for r in cls_rows]))),
                 format_value(_threshold_for(cls, cls_rows, bundle))]
        rows.append({"cells": cells, "css": ""})
    header = ["class", "scored", "anomalous", "share anomalous", "median score", "threshold (raw)"]
    return {"id": "counts-table", "header": header, "rows": rows}


# -- sections: figures ---------------------------------------------------------------------------
def _slug(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name) or "class"


def _save_figure(work: str, name: str, png: bytes, alt: str, css: str) -> dict[str, str]:
    storage.write_bytes(os.path.join(work, FIGURES, name), png)
    return {"src": f"{FIGURES}/{name}", "alt": alt, "css": css}


def _curve_figures(cls: str, labels: np.ndarray, raw: np.ndarray, threshold: float | None,
                   class_metrics: dict[str, Any], work: str) -> list[dict[str, str]]:
    """ROC and PR figures of one class; none without both good and defective images."""
    c = curves(labels, raw)
    if c is None:
        return []
    roc_point, pr_point = _operating_points(labels, raw, threshold)
    roc = roc_figure(cls, c["fpr"], c["tpr"], class_metrics.get("image_auroc"), roc_point)
    pr = pr_figure(cls, c["recall"], c["precision"], class_metrics.get("image_ap"), float(labels.mean()), pr_point)
    slug = _slug(cls)
    return [_save_figure(work, f"roc_{slug}.png", roc, f"ROC curve, {cls}", "curve"),
            _save_figure(work, f"pr_{slug}.png", pr, f"PR curve, {cls}", "curve")]


def _class_figures(cls: str, rows: list[Row], source: Source, bundle: Bundle, work: str) -> dict[str, Any]:
    """One class's figures (written to ``work/figures``): ROC and PR curves (evaluation) and the
    score histogram."""
    threshold = _threshold_for(cls, rows, bundle)
    raw = np.array([r["score_raw"] for r in rows], np.float64)
    figure: dict[str, Any] = {"slug": _slug(cls), "name": cls, "images": [], "note": None}
    if source.labelled:
        labels = np.array([int(r["label"]) for r in rows])
        class_metrics = ((source.metrics or {}).get("per_class") or {}).get(cls, {})
        figure["images"] = _curve_figures(cls, labels, raw, threshold, class_metrics, work)
        if not figure["images"]:
            figure["note"] = "no curves — the test set needs both good and defective images."
        groups = [("good", raw[labels == 0], NORMAL_COLOUR), ("defective", raw[labels == 1], DEFECT_COLOUR)]
    else:
        flagged = np.array([bool(r.get("is_anomalous")) for r in rows])
        groups = [("passed", raw[~flagged], NORMAL_COLOUR), ("flagged", raw[flagged], DEFECT_COLOUR)]
    histogram = histogram_figure(cls, groups, threshold)
    name = f"hist_{figure['slug']}.png"
    figure["images"].append(_save_figure(work, name, histogram, f"score histogram, {cls}", "histogram"))
    return figure


# -- sections: gallery ---------------------------------------------------------------------------
def _gallery_sections(ok_rows: list[Row], labelled: bool) -> list[Section]:
    by_score = sorted(ok_rows, key=lambda r: -float(r["score"]))
    if not labelled:
        return [
            Section("flagged", "Flagged anomalous", "highest score first", [r for r in by_score if r["is_anomalous"]]),
            Section("near-threshold", "Passed, closest to the threshold", "highest score first",
                    [r for r in by_score if not r["is_anomalous"]]),
        ]
    return [
        Section("false-positives", "False positives", "good images flagged anomalous, highest score first",
                [r for r in by_score if not r["label"] and r["is_anomalous"]]),
        Section("false-negatives", "False negatives", "defective images that passed, lowest score (most missed) first",
                [r for r in reversed(by_score) if r["label"] and not r["is_anomalous"]]),
        Section("true-positives", "Detected defects", "defective images flagged anomalous, highest score first",
                [r for r in by_score if r["label"] and r["is_anomalous"]]),
        Section("true-negatives", "Good images that passed", "highest score (closest to the threshold) first",
                [r for r in by_score if not r["label"] and not r["is_anomalous"]]),
    ]


def _gallery_requests(sections: list[Section], size: int, source: Source) -> tuple[list[Row], bool]:
    """(the rows to re-score, once each, and whether their class is given): an evaluation gives it in
    oracle mode; a scoring run gives the classes its caller gave and retrieves the retrieved ones."""
    wanted: dict[str, Row] = {}
    for section in sections:
        for r in section.rows[:size]:
            wanted.setdefault(r["image_uri"], r)
    if source.labelled:
        return list(wanted.values()), (source.metrics or {}).get("prompt_mode") == "oracle"
    return [r if r.get("class_source") == "given" else {**r, "class_name": None} for r in wanted.values()], True


def _card(item: GalleryItem | None, row: Row, labelled: bool) -> dict[str, Any]:
    """One gallery card: its pictures (none when ``item`` failed) and caption."""
    name = "/".join(row["image_uri"].replace("\\", "/").rstrip("/").split("/")[-3:])  # e.g. test/scratch/000.png
    routed = row.get("routed_class")
    truth = str(row.get("defect") or ("defect" if row.get("label") else "good")) if labelled else None
    figures = [] if item is None or item.error else [
        {"src": item.files[role], "alt": f"{title} of {name}", "title": title} for role, title in GALLERY_ROLES
        if role in item.files]
    return {
        "uri": row["image_uri"], "name": name, "class_name": str(row.get("class_name")), "truth": truth,
        "routed": routed if routed and routed != row.get("class_name") else None,
        "score": format_value(row.get("score")), "score_raw": format_value(row.get("score_raw")),
        "threshold": format_value(row.get("threshold_raw")),
        "anomalous": bool(row.get("is_anomalous")), "error": item.error if item else "not rendered", "figures": figures,
    }


def _gallery_view(sections: list[Section], rendered: dict[str, GalleryItem], size: int, labelled: bool) -> list[dict]:
    return [{"anchor": s.anchor, "name": s.name, "order": s.order, "total": len(s.rows),
             "cards": [_card(rendered.get(r["image_uri"]), r, labelled) for r in s.rows[:size]]} for s in sections]


# -- the page ------------------------------------------------------------------------------------
def _errors_view(error_rows: list[Row]) -> dict[str, Any] | None:
    if not error_rows:
        return None
    rows = [{"cells": [r["image_uri"], str(r.get("error"))], "css": ""} for r in error_rows[:MAX_ERROR_ROWS]]
    return {"total": len(error_rows), "rows": rows}


def _nav(labelled: bool, has_errors: bool) -> list[tuple[str, str]]:
    nav = [("summary", "summary"), ("metrics", "metrics" if labelled else "counts"),
           ("curves", "curves" if labelled else "histograms"), ("gallery", "gallery")]
    return nav + [("errors", "errors")] if has_errors else nav


@functools.cache
def templates() -> Environment:
    return Environment(loader=PackageLoader("onenip_ray", "templates"), autoescape=True, undefined=StrictUndefined,
                       trim_blocks=True, lstrip_blocks=True)


def _page(source: Source, bundle: Bundle, **sections: Any) -> str:
    """index.html from the section values (``templates/report.html.j2``)."""
    return templates().get_template(TEMPLATE).render(
        kind="evaluation" if source.labelled else "scoring run", labelled=source.labelled, source_uri=source.uri,
        model_version=bundle.version, generated=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        **sections)


def _write_report(source: Source, bundle: Bundle, bundle_uri: str, work: str, endpoint: str | None,
                  gallery_size: int) -> dict[str, Any]:
    """Write figures, gallery and ``index.html`` into ``work``; return the summary."""
    os.makedirs(os.path.join(work, FIGURES))
    ok_rows = [r for r in source.rows if r.get("status", "ok") == "ok" and r.get("score_raw") is not None]
    error_rows = [r for r in source.rows if r.get("status", "ok") != "ok"]
    by_class = _by_class(ok_rows)
    figures = [_class_figures(cls, rows, source, bundle, work) for cls, rows in by_class.items()]
    sections = _gallery_sections(ok_rows, source.labelled)
    requests, given = _gallery_requests(sections, gallery_size, source)
    rendered = render_gallery(requests, bundle, work, given, endpoint)
    notes = source.notes + _version_notes(source, bundle)
    if source.labelled:
        info, table = _evaluation_info(source), _metrics_table(source.metrics or {}, by_class, ok_rows)
    else:
        info, table = _scoring_info(source, ok_rows, error_rows), _counts_table(by_class, bundle)
    page = _page(source, bundle, nav=_nav(source.labelled, bool(error_rows)), notes=notes,
                 summary=_bundle_info(source, bundle, bundle_uri) + info, class_table=table, figures=figures,
                 gallery=_gallery_view(sections, rendered, gallery_size, source.labelled),
                 errors=_errors_view(error_rows))
    with open(os.path.join(work, INDEX), "w", encoding="utf-8") as f:
        f.write(page)
    return {"kind": source.kind, "model_version": bundle.version, "figures": sum(len(f["images"]) for f in figures),
            "gallery_images": len(rendered), "gallery_files": sum(len(i.files) for i in rendered.values()),
            "sections": {s.anchor: {"total": len(s.rows), "shown": len(s.rows[:gallery_size])} for s in sections},
            "notes": notes}


def build_report(
    bundle_uri: str,
    out: str,
    evaluation: str | None = None,
    scores: str | None = None,
    endpoint: str | None = None,
    gallery_size: int = GALLERY_SIZE,
) -> dict[str, Any]:
    """Write the report to ``out`` (local folder or ``s3://`` prefix; ``index.html`` lands last) and
    return a summary (``index``, figure and gallery counts, sections)."""
    if (evaluation is None) == (scores is None):
        raise InputError("give exactly one of evaluation= (an `onenip evaluate` output) "
                         "or scores= (an `onenip score` partition)")
    source = load_evaluation(evaluation, endpoint) if evaluation else load_scores(scores, endpoint)  # type: ignore[arg-type]
    bundle = load_bundle(bundle_uri, endpoint)
    work = tempfile.mkdtemp(prefix="onenip-report-")
    try:
        summary = _write_report(source, bundle, bundle_uri, work, endpoint, gallery_size)
        storage.commit_dir(work, out, endpoint, marker=INDEX)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary["index"] = storage.join(out, INDEX)
    return summary
