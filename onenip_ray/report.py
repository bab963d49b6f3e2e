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
  maps; heat maps use the class's fixed calibration scale (``scoring.render_heatmap``), never a
  per-image stretch, so a red area means the same everywhere.
"""
from __future__ import annotations

import datetime as dt
import html
import json
import os
import posixpath
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import storage
from .bundle import Bundle, load_bundle
from .data.images import decode_image, decode_mask
from .metrics import _clf_curve, confusion
from .scoring import MAP_KEY, Scorer, find_regions, render_heatmap, render_overlay
from .formats import METRICS_FILE, PREDICTIONS_FILE, SUCCESS_FILE, UNKNOWN_CLASS, uri_stem

INDEX = "index.html"
FIGURES, GALLERY = "figures", "gallery"
SCORE_COLUMNS = ("image_uri", "class_name", "class_source", "score_raw", "score", "threshold_raw", "is_anomalous",
                 "status", "error", "latency_ms", "model_version", "run_date")
THUMB_SIDE = 256  # longest side of gallery thumbnails and overlays
METRIC_COLUMNS = (
    ("image_auroc", "I-AUROC"), ("image_ap", "I-AP"), ("image_f1_max", "I-F1max"),
    ("pixel_auroc", "P-AUROC"), ("pixel_ap", "P-AP"), ("pixel_aupro", "AUPRO"),
    ("threshold_precision", "precision@thr"), ("threshold_recall", "recall@thr"),
    ("threshold_f1", "F1@thr"), ("threshold_fpr", "FPR@thr"),
)
NORMAL_COLOUR, DEFECT_COLOUR, THRESHOLD_COLOUR = "#3b7dd8", "#d8473b", "#222222"


@dataclass
class Source:
    """What the report is built from: per-image rows plus the run's own summary."""

    kind: str  # "evaluation" | "scores"
    uri: str
    rows: list[dict[str, Any]]
    metrics: dict[str, Any] | None = None  # metrics.json (evaluation)
    run: dict[str, Any] | None = None  # _SUCCESS.json (scores)
    notes: list[str] = field(default_factory=list)


@dataclass
class GalleryItem:
    files: dict[str, str]  # role (image, overlay, heatmap, mask) -> path relative to the report
    error: str | None = None


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
            raise FileNotFoundError(f"{uri} is not an evaluation directory: {name} not found (written by `onenip evaluate --out`)")
    metrics = json.loads(storage.read_bytes(storage.join(uri, METRICS_FILE), endpoint))
    rows = _read_table(storage.join(uri, PREDICTIONS_FILE), endpoint).to_pylist()
    notes = []
    if rows and "mask_uri" not in rows[0]:
        notes.append("predictions.parquet has no mask_uri column (written by an older version): the gallery shows no ground truth")
    return Source("evaluation", uri, rows, metrics=metrics, notes=notes)


def load_scores(uri: str, endpoint: str | None = None) -> Source:
    """Rows of one scored partition (``OUTPUT/run_date=…/``) or one of its Parquet files, and the
    partition's ``_SUCCESS.json`` when present."""
    if storage.is_dir(uri, endpoint):
        partition = uri
        names = [n for n in storage.list_files(uri, (".parquet",), endpoint, relative=True)
                 if not any(part.startswith(("_", ".")) for part in n.split("/"))]
        if any("run_date=" in n for n in names) or not names:
            subdirs = [d for d in storage.list_dirs(uri, endpoint) if d.startswith("run_date=")]
            hint = f"; it looks like a results root: pass one partition, e.g. {storage.join(uri, subdirs[-1])}" if subdirs else ""
            raise FileNotFoundError(f"{uri}: not one scored partition (no Parquet files directly in it){hint}")
        files = [storage.join(uri, *n.split("/")) for n in names]
    elif storage.exists(uri, endpoint) and uri.lower().endswith(".parquet"):
        partition, files = posixpath.dirname(storage.canonical_uri(uri)), [uri]
    else:
        raise FileNotFoundError(f"{uri}: not a scored partition directory or Parquet file (written by `onenip score`)")
    rows: list[dict[str, Any]] = []
    for f in files:  # the columns the report uses (not the regions): a night of 10^6 rows stays manageable
        rows.extend(_read_table(f, endpoint, SCORE_COLUMNS).to_pylist())
    marker = storage.join(partition, SUCCESS_FILE)
    run, notes = None, []
    if storage.exists(marker, endpoint):
        run = json.loads(storage.read_bytes(marker, endpoint))
    else:
        notes.append(f"no {SUCCESS_FILE} beside the results: the run summary is computed from the rows only "
                     "(an S3 partition without it may be incomplete or being rewritten)")
    return Source("scores", uri, rows, run=run, notes=notes)


# -- numbers -------------------------------------------------------------------------------------
def _fmt(value: Any, pct: bool = False) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "–"
    if pct:
        return f"{100 * value:.1f}"
    if isinstance(value, float):
        return f"{value:.4g}"
    return html.escape(str(value))


def curves(labels: np.ndarray, scores: np.ndarray) -> dict[str, np.ndarray] | None:
    """ROC (fpr, tpr) and PR (recall, precision) points of image scores; None without both kinds."""
    curve = _clf_curve(np.asarray(labels), np.asarray(scores, np.float64))
    if curve is None:
        return None
    tps, fps = (c.astype(np.float64) for c in curve)
    return {
        "fpr": np.concatenate([[0.0], fps / fps[-1]]), "tpr": np.concatenate([[0.0], tps / tps[-1]]),
        "recall": tps / tps[-1], "precision": tps / (tps + fps),
    }


def _percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


# -- figures -------------------------------------------------------------------------------------
def _figure(width: float = 4.0, height: float = 3.2):
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # Agg only: no display, no global pyplot state
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=90, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def roc_figure(path: str, cls: str, c: dict[str, np.ndarray], auroc: float | None, operating: tuple[float, float] | None) -> None:
    fig, ax = _figure()
    ax.plot(c["fpr"], c["tpr"], color=DEFECT_COLOUR, lw=2, drawstyle="default",
            label=f"AUROC {100 * auroc:.1f}" if auroc is not None and np.isfinite(auroc) else None)
    ax.plot([0, 1], [0, 1], color="#999999", lw=1, ls=":")
    if operating:
        ax.plot(*operating, "o", color=THRESHOLD_COLOUR, label="deployed threshold")
    ax.set(xlim=(-0.02, 1.02), ylim=(-0.02, 1.02), xlabel="false positive rate", ylabel="true positive rate", title=f"ROC — {cls}")
    ax.legend(loc="lower right", fontsize=8)
    fig.savefig(path, format="png")


def pr_figure(path: str, cls: str, c: dict[str, np.ndarray], ap: float | None, base_rate: float, operating: tuple[float, float] | None) -> None:
    fig, ax = _figure()
    ax.step(c["recall"], c["precision"], where="post", color=DEFECT_COLOUR, lw=2,
            label=f"AP {100 * ap:.1f}" if ap is not None and np.isfinite(ap) else None)
    ax.axhline(base_rate, color="#999999", lw=1, ls=":", label=f"share defective {100 * base_rate:.0f} %")
    if operating:
        ax.plot(*operating, "o", color=THRESHOLD_COLOUR, label="deployed threshold")
    ax.set(xlim=(-0.02, 1.02), ylim=(-0.02, 1.02), xlabel="recall", ylabel="precision", title=f"PR — {cls}")
    ax.legend(loc="lower left", fontsize=8)
    fig.savefig(path, format="png")


def histogram_figure(path: str, cls: str, groups: list[tuple[str, np.ndarray, str]], threshold: float | None) -> None:
    """Raw image scores per group (label, scores, colour) on shared bins, the threshold as a line."""
    fig, ax = _figure()
    values = [g[1] for g in groups if len(g[1])]
    everything = np.concatenate(values + ([np.array([threshold])] if threshold is not None else []))
    lo, hi = float(everything.min()), float(everything.max())
    bins = np.linspace(lo, hi if hi > lo else lo + 1e-6, 31)
    for label, scores, colour in groups:
        if len(scores):
            ax.hist(scores, bins=bins, color=colour, alpha=0.6, label=f"{label} ({len(scores)})")
    if threshold is not None:
        ax.axvline(threshold, color=THRESHOLD_COLOUR, ls="--", lw=1.5, label=f"threshold {threshold:.4g}")
    ax.set(xlabel="image score (raw)", ylabel="images", title=f"scores — {cls}")
    ax.legend(fontsize=8)
    fig.savefig(path, format="png")


# -- gallery -------------------------------------------------------------------------------------
def _thumbnail(image: np.ndarray, side: int = THUMB_SIDE) -> np.ndarray:
    height, width = image.shape[:2]
    scale = side / max(height, width)
    if scale >= 1:
        return image
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def render_gallery(
    items: list[dict[str, Any]], bundle: Bundle, out_dir: str, given_class: bool, endpoint: str | None, batch_size: int = 16
) -> dict[str, GalleryItem]:
    """Re-score ``items`` (rows with ``image_uri``, ``class_name``, optional ``mask_uri``) and write
    their image, overlay, heat map and mask files into ``out_dir/gallery``; keyed by image URI."""
    os.makedirs(os.path.join(out_dir, GALLERY), exist_ok=True)
    scorer = Scorer(bundle, batch_size=batch_size, run_id="report")
    spec = scorer.spec
    done: dict[str, GalleryItem] = {}
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        readable, payloads = [], []
        for row in chunk:
            try:
                data = storage.read_bytes(row["image_uri"], endpoint)
            except Exception as exc:  # moved or deleted since it was scored: a note on its card, not a failed report
                done[row["image_uri"]] = GalleryItem({}, f"cannot read the image now: {exc}")
                continue
            readable.append(row)
            payloads.append((row["image_uri"], data, row.get("class_name") if given_class else None))
        if not payloads:
            continue
        scored = scorer.score_bytes(payloads, with_maps=True)
        for row, (uri, data, _), result in zip(readable, payloads, scored):
            if result["status"] != "ok":
                done[uri] = GalleryItem({}, result["error"])
                continue
            fused = result[MAP_KEY]
            cal = spec.prompt_calibration(spec.prompt_ids.index(result["prompt_id"]))
            threshold = float(result["threshold_raw"])
            thumb = _thumbnail(decode_image(data, uri))
            height, width = thumb.shape[:2]
            regions = find_regions(fused, threshold, spec.score_pool, width, height, include_peak=True)[0] if result["is_anomalous"] else []
            stem = uri_stem(uri)
            files = {"image": f"{GALLERY}/{stem}_image.jpg", "overlay": f"{GALLERY}/{stem}_overlay.jpg", "heatmap": f"{GALLERY}/{stem}_heatmap.png"}
            bgr = cv2.cvtColor(thumb, cv2.COLOR_RGB2BGR)
            storage.write_bytes(os.path.join(out_dir, files["image"]), cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes())
            storage.write_bytes(os.path.join(out_dir, files["overlay"]), render_overlay(thumb, fused, cal, regions, threshold))
            storage.write_bytes(os.path.join(out_dir, files["heatmap"]), render_heatmap(fused, cal, threshold))
            if row.get("mask_uri"):
                try:
                    mask = decode_mask(storage.read_bytes(row["mask_uri"], endpoint), row["mask_uri"])
                    mask = cv2.resize(mask.astype(np.uint8) * 255, (width, height), interpolation=cv2.INTER_NEAREST)
                    files["mask"] = f"{GALLERY}/{stem}_mask.png"
                    storage.write_bytes(os.path.join(out_dir, files["mask"]), cv2.imencode(".png", mask)[1].tobytes())
                except Exception:  # an unreadable mask: the card shows no ground truth
                    pass
            done[uri] = GalleryItem(files)
    return done


# -- the report ----------------------------------------------------------------------------------
CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:0 auto;max-width:1400px;padding:16px 24px;color:#1b1b1b}
h1{font-size:1.5em;margin-bottom:4px} h2{margin-top:32px;border-bottom:1px solid #ddd;padding-bottom:4px} h3{margin-bottom:6px}
nav a{margin-right:14px} .muted{color:#666;font-size:.9em} .note{background:#fff6d6;border-left:4px solid #e0b400;padding:6px 10px;margin:6px 0}
table{border-collapse:collapse;margin:8px 0;font-size:.92em} th,td{border:1px solid #ddd;padding:4px 8px;text-align:right}
th:first-child,td:first-child{text-align:left} thead th{background:#f3f3f3} tr.mean td{font-weight:bold;background:#f8f8f8}
.kv td{text-align:left} .figs{display:flex;flex-wrap:wrap;gap:8px} .figs img{width:360px;border:1px solid #eee}
.cards{display:flex;flex-wrap:wrap;gap:12px} .card{border:1px solid #ddd;border-radius:6px;padding:6px;background:#fafafa}
.card .imgs{display:flex;gap:4px} .card figure{margin:0;text-align:center;font-size:.75em;color:#555}
.card img{width:128px;height:128px;object-fit:contain;background:#000;display:block}
.card .cap{font-size:.8em;margin-top:4px;max-width:620px;word-break:break-all} .bad{color:#b3261e;font-weight:bold} .ok{color:#1e7d32}
"""


def _table(header: list[str], rows: list[list[str]], row_classes: list[str] | None = None, table_id: str = "") -> str:
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join(
        f"<tr{f' class={chr(34)}{row_classes[i]}{chr(34)}' if row_classes and row_classes[i] else ''}>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>"
        for i, r in enumerate(rows)
    )
    attrs = f' id="{table_id}"' if table_id else ""
    return f"<table{attrs}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _kv(pairs: list[tuple[str, Any]]) -> str:
    return "<table class=\"kv\"><tbody>" + "".join(f"<tr><th>{html.escape(k)}</th><td>{v}</td></tr>" for k, v in pairs) + "</tbody></table>"


def _img(src: str, alt: str, cls: str = "") -> str:
    return f'<img src="{html.escape(src)}" alt="{html.escape(alt)}"{f" class={chr(34)}{cls}{chr(34)}" if cls else ""} loading="eager">'


def _slug(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name) or "class"


def _threshold_for(cls: str, rows: list[dict[str, Any]], bundle: Bundle) -> float | None:
    values = [r["threshold_raw"] for r in rows if r.get("threshold_raw") is not None]
    if values:
        return float(np.median(values))
    cal = bundle.calibration.per_class.get(cls)
    return cal.threshold_raw if cal else None


def _by_class(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    grouped: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        grouped.setdefault(r.get("class_name") or UNKNOWN_CLASS, []).append(r)
    return dict(sorted(grouped.items()))


def _card(item: GalleryItem | None, row: dict[str, Any], labelled: bool) -> str:
    name = "/".join(row["image_uri"].replace("\\", "/").rstrip("/").split("/")[-3:])  # e.g. test/scratch/000.png
    verdict = '<span class="bad">anomalous</span>' if row.get("is_anomalous") else '<span class="ok">normal</span>'
    truth = ""
    if labelled:
        truth = f" · truth: <b>{html.escape(str(row.get('defect') or ('defect' if row.get('label') else 'good')))}</b>"
    routed = row.get("routed_class")
    routed_note = f" · routed to <b>{html.escape(routed)}</b>" if routed and routed != row.get("class_name") else ""
    cap = (f"<div class=\"cap\"><b>{html.escape(str(row.get('class_name')))}</b> · {html.escape(name)}{truth}{routed_note}<br>"
           f"score {_fmt(row.get('score'))} (raw {_fmt(row.get('score_raw'))}, threshold {_fmt(row.get('threshold_raw'))}) → {verdict}</div>")
    if item is None or item.error:
        why = item.error if item else "not rendered"
        return f"<div class=\"card\"><div class=\"muted\">{html.escape(why)}</div>{cap}</div>"
    figures = []
    for role, title in (("image", "image"), ("overlay", "overlay"), ("heatmap", "heat map"), ("mask", "ground truth")):
        if role in item.files:
            figures.append(f"<figure>{_img(item.files[role], f'{title} of {name}')}<figcaption>{title}</figcaption></figure>")
    return f"<div class=\"card\" title=\"{html.escape(row['image_uri'])}\"><div class=\"imgs\">{''.join(figures)}</div>{cap}</div>"


def build_report(
    bundle_uri: str,
    out: str,
    evaluation: str | None = None,
    scores: str | None = None,
    endpoint: str | None = None,
    gallery_size: int = 24,
) -> dict[str, Any]:
    """Write the report to ``out`` (local folder or ``s3://`` prefix; ``index.html`` lands last) and
    return a summary (``index``, figure and gallery counts, sections)."""
    if (evaluation is None) == (scores is None):
        raise ValueError("give exactly one of evaluation= (an `onenip evaluate` output) or scores= (an `onenip score` partition)")
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


def _write_report(source: Source, bundle: Bundle, bundle_uri: str, work: str, endpoint: str | None, gallery_size: int) -> dict[str, Any]:
    os.makedirs(os.path.join(work, FIGURES))
    labelled = source.kind == "evaluation"
    rows = source.rows
    ok_rows = [r for r in rows if r.get("status", "ok") == "ok" and r.get("score_raw") is not None]
    error_rows = [r for r in rows if r.get("status", "ok") != "ok"]
    model_version = (source.metrics or {}).get("model_version") or (source.run or {}).get("model_version") \
        or next((r.get("model_version") for r in rows if r.get("model_version")), None)
    notes = list(source.notes)
    if model_version and model_version != bundle.version:
        notes.append(f"the {source.kind} was made with model version {model_version}, but --bundle is version {bundle.version}: "
                     "the gallery's heat maps come from --bundle and may not match the scores shown")
    parts: list[str] = []
    figures = 0

    # run summary
    info: list[tuple[str, Any]] = [("source", html.escape(source.uri)), ("bundle", html.escape(bundle_uri)),
                                   ("model version", html.escape(bundle.version)),
                                   ("bundle created", html.escape(str(bundle.meta.get("created_at", "–")))),
                                   ("backbone", f"{html.escape(bundle.config.backbone)} at {bundle.config.image_size} px"),
                                   ("classes", html.escape(", ".join(bundle.classes))),
                                   ("prompt images", html.escape(", ".join(bundle.pool.prompt_ids[:6]) + (" …" if len(bundle.pool.prompt_ids) > 6 else "")))]
    epochs = len((bundle.meta.get("training") or {}).get("history", []))
    if epochs:
        info.append(("training epochs", epochs))
    if labelled:
        m = source.metrics or {}
        seconds, count = m.get("seconds"), m.get("num_images", len(rows))
        info += [("images evaluated", count), ("defective / good", f"{sum(1 for r in rows if r.get('label'))} / {sum(1 for r in rows if not r.get('label'))}"),
                 ("wall time", f"{seconds:.1f} s" if seconds else "–"),
                 ("throughput", f"{count / seconds:.2f} images/s (model load, decode and metrics included)" if seconds else "–"),
                 ("prompt mode", html.escape(str(m.get("prompt_mode", "–")))),
                 ("routing accuracy", f"{_fmt(m.get('routing_accuracy'), pct=True)} %")]
    else:
        run = source.run or {}
        counts = run.get("counts") or {"total": len(rows), "ok": len(ok_rows), "error": len(error_rows),
                                       "anomalous": sum(1 for r in ok_rows if r.get("is_anomalous"))}
        latencies = [float(r["latency_ms"]) for r in ok_rows if r.get("latency_ms") is not None]
        p50, p95 = _percentile(latencies, 50), _percentile(latencies, 95)
        info += [("run", html.escape(f"{run.get('run_id', '–')} (run_date {run.get('run_date', next((str(r.get('run_date')) for r in rows), '–'))})")),
                 ("input", html.escape(str(run.get("input", "–")))),
                 ("images", f"{counts['total']} total · {counts['ok']} scored · {counts['error']} failed · {counts['anomalous']} anomalous"),
                 ("throughput", f"{run['images_per_second']:.2f} images/s (pipeline {run.get('pipeline_seconds', 0):.1f} s, wall {run.get('wall_seconds', 0):.1f} s)"
                  if run.get("images_per_second") else "–"),
                 ("latency per image", f"p50 {p50:.0f} ms · p95 {p95:.0f} ms · max {max(latencies):.0f} ms" if latencies else "–")]
    parts.append(f"<h2 id=\"summary\">Run summary</h2>{_kv(info)}")

    # per-class metrics (evaluation) / counts (scores)
    grouped = _by_class(ok_rows)
    if labelled:
        m = source.metrics or {}
        header = ["class", "images"] + [title for _, title in METRIC_COLUMNS] + ["TP", "FP", "FN", "TN"]
        table_rows, classes_css = [], []
        for cls, cm in sorted((m.get("per_class") or {}).items()):
            cls_rows = grouped.get(cls, [])
            conf = confusion(np.array([int(r["label"]) for r in cls_rows], int), np.array([bool(r["is_anomalous"]) for r in cls_rows], bool))
            table_rows.append([html.escape(cls), str(cm.get("num_images", len(cls_rows)))] + [_fmt(cm.get(k), pct=True) for k, _ in METRIC_COLUMNS]
                              + [str(conf[k]) for k in ("TP", "FP", "FN", "TN")])
            classes_css.append("")
        if m.get("mean"):
            conf = confusion(np.array([int(r["label"]) for r in ok_rows], int), np.array([bool(r["is_anomalous"]) for r in ok_rows], bool))
            table_rows.append(["mean", str(m.get("num_images", len(ok_rows)))] + [_fmt(m["mean"].get(k), pct=True) for k, _ in METRIC_COLUMNS]
                              + [str(conf[k]) for k in ("TP", "FP", "FN", "TN")])
            classes_css.append("mean")
        parts.append("<h2 id=\"metrics\">Per-class metrics</h2>"
                     "<p class=\"muted\">Percent. I- = image level, P- = pixel level (network resolution), AUPRO to FPR 0.3; "
                     "@thr = at the deployed per-class threshold (no test labels were used to set it); the mean is unweighted over "
                     "classes (its TP/FP/FN/TN are totals).</p>" + _table(header, table_rows, row_classes=classes_css, table_id="metrics-table"))
    else:
        header = ["class", "scored", "anomalous", "share anomalous", "median score", "threshold (raw)"]
        table_rows = []
        for cls, cls_rows in grouped.items():
            flagged = sum(1 for r in cls_rows if r.get("is_anomalous"))
            table_rows.append([html.escape(cls), str(len(cls_rows)), str(flagged), f"{100 * flagged / len(cls_rows):.1f} %",
                               _fmt(float(np.median([r["score"] for r in cls_rows]))), _fmt(_threshold_for(cls, cls_rows, bundle))])
        parts.append("<h2 id=\"metrics\">Per-class counts</h2><p class=\"muted\">No labels in a scoring run: counts at the deployed "
                     "threshold; evaluate on a labelled set for accuracy.</p>" + _table(header, table_rows, table_id="counts-table"))

    # curves and histograms
    figure_html = []
    for cls, cls_rows in grouped.items():
        slug = _slug(cls)
        threshold = _threshold_for(cls, cls_rows, bundle)
        raw = np.array([r["score_raw"] for r in cls_rows], np.float64)
        imgs = []
        if labelled:
            labels = np.array([int(r["label"]) for r in cls_rows])
            c = curves(labels, raw)
            cm = ((source.metrics or {}).get("per_class") or {}).get(cls, {})
            if c is not None:
                flagged = raw > threshold if threshold is not None else None
                roc_op = pr_op = None
                if flagged is not None:
                    conf = confusion(labels, flagged)
                    tpr = conf["TP"] / max(1, conf["TP"] + conf["FN"])
                    roc_op = (conf["FP"] / max(1, conf["FP"] + conf["TN"]), tpr)
                    pr_op = (tpr, conf["TP"] / (conf["TP"] + conf["FP"])) if conf["TP"] + conf["FP"] else None
                roc_figure(os.path.join(work, FIGURES, f"roc_{slug}.png"), cls, c, cm.get("image_auroc"), roc_op)
                pr_figure(os.path.join(work, FIGURES, f"pr_{slug}.png"), cls, c, cm.get("image_ap"), float(labels.mean()), pr_op)
                imgs += [_img(f"{FIGURES}/roc_{slug}.png", f"ROC curve, {cls}", "curve"), _img(f"{FIGURES}/pr_{slug}.png", f"PR curve, {cls}", "curve")]
                figures += 2
            else:
                imgs.append(f"<p class=\"muted\">{html.escape(cls)}: no curves — the test set needs both good and defective images.</p>")
            groups = [("good", raw[labels == 0], NORMAL_COLOUR), ("defective", raw[labels == 1], DEFECT_COLOUR)]
        else:
            flagged = np.array([bool(r.get("is_anomalous")) for r in cls_rows])
            groups = [("passed", raw[~flagged], NORMAL_COLOUR), ("flagged", raw[flagged], DEFECT_COLOUR)]
        histogram_figure(os.path.join(work, FIGURES, f"hist_{slug}.png"), cls, groups, threshold)
        imgs.append(_img(f"{FIGURES}/hist_{slug}.png", f"score histogram, {cls}", "histogram"))
        figures += 1
        if labelled:  # a row per class: ROC, PR, histogram
            figure_html.append(f"<h3 id=\"class-{slug}\">{html.escape(cls)}</h3><div class=\"figs\">{''.join(imgs)}</div>")
        else:  # one histogram per class, side by side
            figure_html.extend(imgs)
    title = "ROC and PR curves, score histograms" if labelled else "Score histograms"
    body = "".join(figure_html) if labelled else f"<div class=\"figs\">{''.join(figure_html)}</div>"
    parts.append(f"<h2 id=\"curves\">{title}</h2><p class=\"muted\">Raw image scores; the dashed line / dot is the deployed "
                 f"threshold of the class.</p>{body}")

    # gallery sections
    by_score = sorted(ok_rows, key=lambda r: -float(r["score"]))
    if labelled:
        sections = [
            ("false-positives", "False positives", "good images flagged anomalous, highest score first",
             [r for r in by_score if not r["label"] and r["is_anomalous"]]),
            ("false-negatives", "False negatives", "defective images that passed, lowest score (most missed) first",
             [r for r in reversed(by_score) if r["label"] and not r["is_anomalous"]]),
            ("true-positives", "Detected defects", "defective images flagged anomalous, highest score first",
             [r for r in by_score if r["label"] and r["is_anomalous"]]),
            ("true-negatives", "Good images that passed", "highest score (closest to the threshold) first",
             [r for r in by_score if not r["label"] and not r["is_anomalous"]]),
        ]
    else:
        sections = [
            ("flagged", "Flagged anomalous", "highest score first", [r for r in by_score if r["is_anomalous"]]),
            ("near-threshold", "Passed, closest to the threshold", "highest score first", [r for r in by_score if not r["is_anomalous"]]),
        ]
    wanted: dict[str, dict[str, Any]] = {}
    for _, _, _, section_rows in sections:
        for r in section_rows[:gallery_size]:
            wanted.setdefault(r["image_uri"], r)
    given = (source.metrics or {}).get("prompt_mode") == "oracle" if labelled else False
    if not labelled:  # a class the caller gave (manifest) is given again; retrieved ones are retrieved again
        wanted = {u: ({**r} if r.get("class_source") == "given" else {**r, "class_name": None}) for u, r in wanted.items()}
        given = True
    rendered = render_gallery(list(wanted.values()), bundle, work, given, endpoint)
    gallery_html, section_counts = [], {}
    for anchor, name, order, section_rows in sections:
        shown = section_rows[:gallery_size]
        section_counts[anchor] = {"total": len(section_rows), "shown": len(shown)}
        more = f" (showing {len(shown)} of {len(section_rows)})" if len(section_rows) > len(shown) else ""
        cards = "".join(_card(rendered.get(r["image_uri"]), r, labelled) for r in shown) or "<p class=\"muted\">none</p>"
        gallery_html.append(f"<h3 id=\"{anchor}\">{name}: {len(section_rows)}{more}</h3><p class=\"muted\">{order}</p><div class=\"cards\">{cards}</div>")
    parts.append("<h2 id=\"gallery\">Heat-map gallery</h2><p class=\"muted\">Per image: the image, the overlay (heat map blended in, "
                 "regions boxed when anomalous), the heat map at network resolution and the ground-truth mask where the dataset has one. "
                 "Heat maps share one fixed scale per class (the class's typical normal level = blue, its threshold = the middle of "
                 "the colour map), so colours are comparable between images. Maps are recomputed with the bundle.</p>" + "".join(gallery_html))
    if error_rows:
        err = [[html.escape(r["image_uri"]), html.escape(str(r.get("error")))] for r in error_rows[:200]]
        parts.append(f"<h2 id=\"errors\">Inputs that could not be scored: {len(error_rows)}</h2>" + _table(["image", "error"], err))

    nav = "".join(f'<a href="#{a}">{t}</a>' for a, t in (("summary", "summary"), ("metrics", "metrics" if labelled else "counts"),
                                                           ("curves", "curves" if labelled else "histograms"), ("gallery", "gallery"))
                  ) + ("<a href=\"#errors\">errors</a>" if error_rows else "")
    note_html = "".join(f"<div class=\"note\">{html.escape(n)}</div>" for n in notes)
    now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    kind = "evaluation" if labelled else "scoring run"
    page = (f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>OneNIP report — {kind}</title><style>{CSS}</style></head><body>"
            f"<h1>OneNIP report — {kind}</h1><p class=\"muted\">{html.escape(source.uri)} · model {html.escape(bundle.version)} · generated {now}</p>"
            f"<nav>{nav}</nav>{note_html}{''.join(parts)}</body></html>")
    with open(os.path.join(work, INDEX), "w", encoding="utf-8") as f:
        f.write(page)
    gallery_files = sum(len(i.files) for i in rendered.values())
    return {"kind": source.kind, "model_version": bundle.version, "figures": figures, "gallery_images": len(rendered),
            "gallery_files": gallery_files, "sections": section_counts, "notes": notes}
