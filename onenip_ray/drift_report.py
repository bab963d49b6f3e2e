"""The outputs of ``onenip drift``: ``drift.json``, ``alerts.json`` and ``drift.html`` with its
figures (static, relative links, no external assets — like ``onenip report``), in one folder
(local or ``s3://``; ``drift.html`` lands last)."""
from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import tempfile
from typing import Any

import numpy as np

from . import storage
from .drift import ALERTS_FILE, DRIFT_FILE, EXIT_ALERTS, EXIT_QUIET, QUANTILES, SIGNALS
from .report import FIGURES, MISSING, format_value, templates
from .visualization import quantiles_figure, shift_figure, trend_figure

PAGE, TEMPLATE = "drift.html", "drift.html.j2"
NIGHT_HEADER = ("night", "state", "rows", "errors", "error rate %", "unknown %", "routing mix", "model version")
CLASS_HEADER = ("night", "images", "anomalous", "rate % [95 % CI]", "p50", "p90", "p99", "threshold",
                "PSI score", "KS score (p)", "PSI similarity", "KS similarity (p)")


def _series(rows: list[dict[str, Any]], dates: list[str], key: str) -> np.ndarray:
    by_date = {r["date"]: r.get(key) for r in rows}
    return np.array([np.nan if by_date.get(d) is None else by_date[d] for d in dates], dtype=np.float64)


def _shift_series(rows: list[dict[str, Any]], dates: list[str], references: list[str]) -> dict[str, np.ndarray]:
    by_date = {r["date"]: r["shift"] for r in rows}
    series = {}
    for signal in SIGNALS:
        for ref in references:
            values = [by_date.get(d, {}).get(signal, {}).get(ref, {}).get("psi") for d in dates]
            series[f"{signal} vs {ref}"] = np.array([np.nan if v is None else v for v in values], dtype=np.float64)
    return series


def class_figures(result: dict[str, Any], index: int, cls: str, work: str) -> list[dict[str, str]]:
    """The three PNGs of the ``index``-th class (trend, score quantiles, shift) under ``work/figures``."""
    rows, dates = result["classes"][cls], [n["date"] for n in result["nights"]]
    stem = f"{FIGURES}/class{index:03d}"
    pngs = {
        "trend": trend_figure(cls, dates, np.nan_to_num(_series(rows, dates, "rows")),
                              _series(rows, dates, "anomaly_rate"), _series(rows, dates, "rate_low"),
                              _series(rows, dates, "rate_high")),
        "quantiles": quantiles_figure(cls, dates, {f"p{q}": _series(rows, dates, f"score_p{q}") for q in QUANTILES},
                                      _series(rows, dates, "threshold"), result["calibration_quantiles"].get(cls, {})),
        "shift": shift_figure(cls, dates, _shift_series(rows, dates, result["references"])),
    }
    figures = []
    for name, png in pngs.items():
        path = f"{stem}_{name}.png"
        storage.write_bytes(os.path.join(work, path), png)
        figures.append({"src": path, "alt": f"{name} — {cls}"})
    return figures


def _shift_cells(shift: dict[str, Any], signal: str, reference: str) -> list[str]:
    s = shift.get(signal, {}).get(reference, {})
    if "psi" not in s:
        return [s.get("note", MISSING), MISSING]
    return [format_value(s["psi"]), f"{s['ks']:.3f} ({s['ks_p']:.1e})"]


def class_rows(rows: list[dict[str, Any]], reference: str) -> list[dict[str, Any]]:
    """Table rows of one class: one per night with rows, shift against ``reference``."""
    table = []
    for r in rows:
        low, high = format_value(r["rate_low"], pct=True), format_value(r["rate_high"], pct=True)
        rate = f"{format_value(r['anomaly_rate'], pct=True)} [{low}, {high}]"
        cells = [r["date"], r["rows"], r["anomalous"], rate, *(format_value(r[f"score_p{q}"]) for q in QUANTILES),
                 format_value(r["threshold"])]
        for signal in SIGNALS:
            cells += _shift_cells(r["shift"], signal, reference)
        table.append({"cells": cells, "css": ""})
    return table


def night_rows(nights: list[dict[str, Any]]) -> list[dict[str, Any]]:
    table = []
    for n in nights:
        mix = ", ".join(f"{c} {100 * s:.0f} %" for c, s in sorted(n.get("routing", {}).items(), key=lambda x: -x[1]))
        cells = [n["date"], n["state"], n.get("rows", MISSING), n.get("errors", MISSING),
                 format_value(n.get("error_rate"), pct=True), format_value(n.get("unknown_share"), pct=True),
                 mix or MISSING,
                 n.get("model_version") or MISSING]
        table.append({"cells": cells, "css": "" if n["state"] == "committed" else "muted"})
    return table


def _page(result: dict[str, Any], work: str) -> str:
    classes = [{"name": cls, "figures": class_figures(result, i, cls, work),
                "tables": [(ref, class_rows(rows, ref)) for ref in result["references"]]}
               for i, (cls, rows) in enumerate(result["classes"].items())]
    return templates().get_template(TEMPLATE).render(
        result=result, alerts=result["alerts"], notes=result["notes"], night_header=NIGHT_HEADER,
        nights=night_rows(result["nights"]), class_header=CLASS_HEADER, classes=classes,
        generated=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))


def write_drift(result: dict[str, Any], out: str, endpoint: str | None = None) -> dict[str, Any]:
    """Write ``drift.json``, ``alerts.json``, ``drift.html`` and ``figures/`` to ``out``; return
    ``alerts.json``'s content (``exit_code`` 3 when there are alerts, else 0)."""
    alerts = {"exit_code": EXIT_ALERTS if result["alerts"] else EXIT_QUIET, "window": result["window"],
              "alerts": result["alerts"], "rules": result["rules"]}
    work = tempfile.mkdtemp(prefix="onenip-drift-")
    try:
        os.makedirs(os.path.join(work, FIGURES))
        for name, data in ((DRIFT_FILE, result), (ALERTS_FILE, alerts)):
            with open(os.path.join(work, name), "w", encoding="utf-8") as f:
                json.dump(data, f, indent=2, default=float)
        with open(os.path.join(work, PAGE), "w", encoding="utf-8") as f:
            f.write(_page(result, work))
        storage.commit_dir(work, out, endpoint, marker=PAGE)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {**alerts, "page": storage.join(out, PAGE), "notes": result["notes"]}
