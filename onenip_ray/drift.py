"""``onenip drift``: the nightly table night over night, per product class, and the alerts it raises.

It reads the committed nights of a window (``run_date=…/`` partitions with ``_SUCCESS.json``, only
the files that marker lists) and computes, per class and night: volume, the anomaly rate with a
Wilson 95 % interval, the p50 / p90 / p99 of ``score_raw``, and the shift of two signals — the image
score ``score_raw`` and the routing similarity ``route_similarity`` — against each reference:

* ``calibration``: the class's calibration normals stored in the bundle (``normal_scores`` up to the
  threshold, ``normal_similarities``), against the night's images that passed as normal — normal
  parts that drifted, compared like with like (only nights scored by that bundle version);
* ``trailing``: all scored rows of the class on the previous committed nights (up to
  ``AlertRules.trailing_nights``) of the same model version;
* ``DATE..DATE``: all scored rows of the class on the committed nights of a fixed window.

Shift is measured by the population stability index (PSI, ten quantile bins of the reference, half a
count added to each bin) and the two-sample Kolmogorov-Smirnov statistic D with its p-value. Per
night: the routing mix, the share of unknown products (``class_name`` = ``UNKNOWN_CLASS``) and the
error rate by error kind. ``AlertRules`` turn these into alerts; whatever cannot be computed
(a missing or uncommitted night, a class that disappears, a night of error rows only, a bundle that
does not match) is a line in ``notes``, never an exception.
"""
from __future__ import annotations

import datetime as dt
import json
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from scipy import stats

from . import storage
from .bundle import read_meta
from .calibration import Calibration
from .config import DRIFT_REFERENCES, AlertRules, TrainConfig
from .errors import InputError
from .formats import SUCCESS_FILE, UNKNOWN_CLASS
from .schema import PARTITION_COLUMN, STATUS_OK

DRIFT_FILE, ALERTS_FILE = "drift.json", "alerts.json"
EXIT_QUIET, EXIT_ALERTS = 0, 3
SIGNALS = {"score": "score_raw", "similarity": "route_similarity"}  # signal → result column
CALIBRATION, TRAILING = "calibration", "trailing"
COLUMNS = ("class_name", "route_similarity", "score_raw", "threshold_raw", "is_anomalous", "status", "error_kind",
           "model_version")
QUANTILES = (50, 90, 99)
PSI_BINS = 10
ROWS_PER_BIN = 10  # the smaller side's rows per PSI bin, at least
Z_95 = 1.959964  # two-sided 95 % normal quantile (Wilson interval)
LOOKBACK_FACTOR = 4  # how far back (× trailing_nights days) the trailing reference is searched for
COMMITTED, MISSING, UNCOMMITTED, UNREADABLE = "committed", "missing", "uncommitted", "unreadable"
Columns = dict[str, np.ndarray]


@dataclass(eq=False)
class Night:
    """One ``run_date`` of the table: its state and, when committed, its rows' columns."""

    date: dt.date
    state: str
    rows: Columns = field(default_factory=dict)
    run: dict[str, Any] = field(default_factory=dict)  # its _SUCCESS.json
    note: str | None = None

    @property
    def committed(self) -> bool:
        return self.state == COMMITTED

    @property
    def version(self) -> str | None:
        return self.run.get("model_version")


@dataclass(frozen=True)
class Reference:
    """What a night is compared with: ``calibration``, ``trailing`` or the nights ``start..end``."""

    name: str
    start: dt.date | None = None
    end: dt.date | None = None


# -- reading the table -------------------------------------------------------------------------
def partition_dates(output: str, endpoint: str | None) -> list[dt.date]:
    """The dates that have a partition folder under ``output`` (committed or not), sorted."""
    if not storage.is_dir(output, endpoint):
        raise FileNotFoundError(f"{output}: no results table here (written by `onenip score --output`)")
    dates = []
    for name in storage.list_dirs(output, endpoint):
        key, _, value = name.partition("=")
        if key == PARTITION_COLUMN:
            try:
                dates.append(dt.date.fromisoformat(value))
            except ValueError:
                continue
    return sorted(dates)


def _read_file(uri: str, endpoint: str | None) -> pa.Table:
    fs, path = storage.filesystem_for(uri, endpoint)
    present = set(storage.retry(lambda: pq.read_schema(path, filesystem=fs)).names)
    table = storage.retry(lambda: pq.read_table(path, filesystem=fs, columns=[c for c in COLUMNS if c in present]))
    for name in COLUMNS:  # files written before a column existed
        if name not in present:
            table = table.append_column(name, pa.nulls(len(table), pa.string()))
    return table.select(list(COLUMNS))


def _columns(table: pa.Table) -> Columns:
    return {
        "class_name": np.array(table.column("class_name").fill_null(UNKNOWN_CLASS).to_pylist(), dtype=object),
        "route_similarity": table.column("route_similarity").cast(pa.float64()).to_numpy(zero_copy_only=False),
        "score_raw": table.column("score_raw").cast(pa.float64()).to_numpy(zero_copy_only=False),
        "threshold_raw": table.column("threshold_raw").cast(pa.float64()).to_numpy(zero_copy_only=False),
        "is_anomalous": np.array(table.column("is_anomalous").fill_null(False).to_pylist(), dtype=bool),
        "ok": np.array([s == STATUS_OK for s in table.column("status").to_pylist()], dtype=bool),
        "error_kind": np.array(table.column("error_kind").fill_null("unknown").to_pylist(), dtype=object),
    }


def read_night(output: str, date: dt.date, endpoint: str | None = None) -> Night:
    """One night: committed (rows of the files its ``_SUCCESS.json`` lists), missing, uncommitted or
    unreadable (with the reason)."""
    partition = storage.join(output, f"{PARTITION_COLUMN}={date:%Y-%m-%d}")
    if not storage.exists(partition, endpoint):
        return Night(date, MISSING, note=f"{date}: no partition (no run that night)")
    marker = storage.join(partition, SUCCESS_FILE)
    if not storage.exists(marker, endpoint):
        return Night(date, UNCOMMITTED, note=f"{date}: no {SUCCESS_FILE} (a run failed, was rejected or is "
                                             "still running): skipped")
    try:
        run = json.loads(storage.read_bytes(marker, endpoint))
        tables = [_read_file(storage.join(partition, name), endpoint) for name in run.get("files", [])]
    except (OSError, ValueError, pa.ArrowException) as exc:
        return Night(date, UNREADABLE, note=f"{date}: committed but unreadable ({exc}): skipped")
    table = pa.concat_tables(tables) if tables else _read_empty()
    return Night(date, COMMITTED, _columns(table), run)


def _read_empty() -> pa.Table:
    return pa.table({name: pa.nulls(0, pa.string()) for name in COLUMNS})


def select(rows: Columns, mask: np.ndarray) -> Columns:
    return {k: v[mask] for k, v in rows.items()}


def read_window(output: str, days: int, until: dt.date | None, rules: AlertRules, endpoint: str | None
                ) -> tuple[list[Night], list[Night]]:
    """(the window's nights, oldest first; the committed nights before it that trailing references use)."""
    dates = partition_dates(output, endpoint)
    if until is None:
        committed = [d for d in reversed(dates) if storage.exists(_marker(output, d), endpoint)]
        if not committed:
            raise FileNotFoundError(f"{output}: no committed night (no {SUCCESS_FILE} in any run_date=… folder)")
        until = committed[0]
    start = until - dt.timedelta(days=days - 1)
    window = [read_night(output, start + dt.timedelta(days=i), endpoint) for i in range(days)]
    earliest = start - dt.timedelta(days=LOOKBACK_FACTOR * rules.trailing_nights)
    before: list[Night] = []
    for date in reversed([d for d in dates if earliest <= d < start]):
        night = read_night(output, date, endpoint)
        if night.committed:
            before.insert(0, night)
        if len(before) == rules.trailing_nights:
            break
    return window, before


def _marker(output: str, date: dt.date) -> str:
    return storage.join(output, f"{PARTITION_COLUMN}={date:%Y-%m-%d}", SUCCESS_FILE)


# -- statistics --------------------------------------------------------------------------------
def wilson(successes: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion (``(0, 1)`` without observations)."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def psi(sample: np.ndarray, reference: np.ndarray, bins: int = PSI_BINS) -> float:
    """Population stability index of ``sample`` against ``reference`` over the reference's quantile
    bins (ties merged; fewer than ``bins`` so that the smaller side has ten rows per bin, at least
    two bins: on small samples ten bins would read noise as shift), half a count added to every bin
    so an empty bin stays finite."""
    bins = max(2, min(bins, min(len(sample), len(reference)) // ROWS_PER_BIN))
    edges = np.unique(np.quantile(reference, np.linspace(0.0, 1.0, bins + 1)[1:-1]))
    def shares(values: np.ndarray) -> np.ndarray:
        counts = np.bincount(np.searchsorted(edges, values, side="right"), minlength=len(edges) + 1) + 0.5
        return counts / counts.sum()
    p, q = shares(sample), shares(reference)
    return float(np.sum((p - q) * np.log(p / q)))


def shift(sample: np.ndarray, reference: np.ndarray, min_rows: int) -> dict[str, Any]:
    """PSI and KS (D, p) of ``sample`` against ``reference``; a ``note`` instead below ``min_rows``."""
    sample, reference = sample[np.isfinite(sample)], reference[np.isfinite(reference)]
    out: dict[str, Any] = {"rows": int(len(sample)), "reference_rows": int(len(reference))}
    if len(sample) < min_rows or len(reference) < min_rows:
        out["note"] = f"fewer than {min_rows} rows on one side"
        return out
    ks = stats.ks_2samp(sample, reference)
    out.update(psi=round(psi(sample, reference), 4), ks=round(float(ks.statistic), 4), ks_p=float(ks.pvalue))
    return out


def class_stats(rows: Columns) -> dict[str, Any]:
    """Volume, anomalies, rate with its Wilson 95 % interval, score quantiles and threshold of one
    class's scored rows on one night."""
    n, anomalous = len(rows["score_raw"]), int(rows["is_anomalous"].sum())
    low, high = wilson(anomalous, n)
    quantiles = np.percentile(rows["score_raw"], QUANTILES) if n else [None] * len(QUANTILES)
    out: dict[str, Any] = {"rows": n, "anomalous": anomalous, "anomaly_rate": anomalous / n if n else None,
                           "rate_low": low, "rate_high": high}
    out.update({f"score_p{q}": (float(v) if v is not None else None) for q, v in zip(QUANTILES, quantiles)})
    out["threshold"] = float(np.median(rows["threshold_raw"])) if n else None
    return out


def night_stats(night: Night) -> dict[str, Any]:
    """Volume, errors by kind, unknown products and routing mix of one night."""
    out: dict[str, Any] = {"date": str(night.date), "state": night.state, "model_version": night.version}
    if not night.committed:
        return out
    rows, ok = night.rows, night.rows["ok"]
    total, scored = len(ok), int(ok.sum())
    kinds, counts = np.unique(rows["error_kind"][~ok], return_counts=True)
    classes, routed = np.unique(rows["class_name"][ok], return_counts=True)
    unknown = int(routed[classes == UNKNOWN_CLASS].sum())
    out.update(rows=total, scored=scored, errors=total - scored, error_rate=(total - scored) / total if total else None,
               errors_by_kind={str(k): int(c) for k, c in zip(kinds, counts)},
               unknown=unknown, unknown_share=unknown / scored if scored else None,
               routing={str(c): round(int(n) / scored, 4) for c, n in zip(classes, routed)})
    return out


# -- references --------------------------------------------------------------------------------
def parse_references(text: str) -> list[Reference]:
    """``calibration``, ``trailing`` and ``YYYY-MM-DD..YYYY-MM-DD``, comma-separated."""
    references = []
    for item in (part.strip() for part in text.split(",") if part.strip()):
        if item in (CALIBRATION, TRAILING):
            references.append(Reference(item))
            continue
        start, sep, end = item.partition("..")
        try:
            first, last = dt.date.fromisoformat(start), dt.date.fromisoformat(end)
        except ValueError:
            first = last = None
        if not sep or first is None or last is None or first > last:
            raise InputError(f"--reference {item!r}: expected calibration, trailing or DATE..DATE "
                             "(e.g. 2026-11-01..2026-11-07, first date not after the last)")
        references.append(Reference(item, first, last))
    if not references:
        raise InputError("--reference: give at least one of calibration, trailing, DATE..DATE")
    return references


def _class_rows(night: Night, cls: str) -> Columns:
    return select(night.rows, night.rows["ok"] & (night.rows["class_name"] == cls))


def _pooled(nights: list[Night], cls: str, column: str) -> np.ndarray:
    parts = [_class_rows(n, cls)[column] for n in nights]
    return np.concatenate(parts) if parts else np.empty(0)


def calibration_reference(calibration: Calibration | None, cls: str, signal: str, passing: bool = True
                          ) -> np.ndarray | None:
    """The bundle's calibration normals of ``cls`` for ``signal`` (scores: with ``passing``, those up
    to the threshold — the part of the normal distribution that passes); None where not stored."""
    cal = calibration.per_class.get(cls) if calibration else None
    if cal is None:
        return None
    if signal == "score":
        if cal.normal_scores is None:
            return None
        scores = np.asarray(cal.normal_scores)
        return scores[scores <= cal.threshold_raw] if passing else scores
    return None if cal.normal_similarities is None else np.asarray(cal.normal_similarities)


def trailing_nights(night: Night, earlier: list[Night], rules: AlertRules, skip: set[dt.date] = frozenset()
                   ) -> list[Night]:
    """The committed nights before ``night`` of its model version, not in ``skip``, at most ``trailing_nights``."""
    same = [n for n in earlier if n.committed and n.date < night.date and n.version == night.version
            and n.date not in skip]
    return same[-rules.trailing_nights:]


def class_shift(night: Night, cls: str, references: list[Reference], history: list[Night],
                fixed: dict[str, list[Night]], calibration: Calibration | None, rules: AlertRules
                ) -> dict[str, dict[str, Any]]:
    """Per signal and reference, the shift of ``cls``'s rows on ``night`` (see ``shift``)."""
    rows = _class_rows(night, cls)
    passed = select(rows, ~rows["is_anomalous"])
    out: dict[str, dict[str, Any]] = {}
    for signal, column in SIGNALS.items():
        out[signal] = {}
        for ref in references:
            if ref.name == CALIBRATION:
                values = calibration_reference(calibration, cls, signal)
                out[signal][ref.name] = {"note": "no calibration normals for this class and model version"} \
                    if values is None else shift(passed[column], values, rules.min_rows)
            else:
                nights = history if ref.name == TRAILING else fixed[ref.name]
                out[signal][ref.name] = shift(rows[column], _pooled(nights, cls, column), rules.min_rows)
    return out


# -- alerts ------------------------------------------------------------------------------------
def _alert(night: Night, rule: str, message: str, class_name: str | None = None, **evidence: Any) -> dict[str, Any]:
    return {"date": str(night.date), "class_name": class_name, "rule": rule, "message": message, **evidence}


def night_alerts(night: Night, summary: dict[str, Any], rules: AlertRules) -> list[dict[str, Any]]:
    """Error-rate and unknown-product alerts of one committed night."""
    alerts = []
    if summary.get("error_rate") is not None and summary["error_rate"] > rules.error_rate:
        alerts.append(_alert(night, "error_rate", f"{summary['errors']} of {summary['rows']} rows are errors "
                             f"({100 * summary['error_rate']:.1f} % > {100 * rules.error_rate:g} %)",
                             value=summary["error_rate"], limit=rules.error_rate, by_kind=summary["errors_by_kind"]))
    if summary.get("unknown_share") is not None and summary["unknown_share"] > rules.unknown_share:
        alerts.append(_alert(night, "unknown_product", f"{summary['unknown']} of {summary['scored']} scored images "
                             f"resemble no class ({100 * summary['unknown_share']:.1f} % > "
                             f"{100 * rules.unknown_share:g} %)", value=summary["unknown_share"],
                             limit=rules.unknown_share))
    return alerts


def rate_alert(night: Night, cls: str, today: dict[str, Any], history: list[dict[str, Any]], target_fpr: float,
               rules: AlertRules) -> dict[str, Any] | None:
    """An alert when the night's rate is, at 95 %, above ``rate_factor`` × max(trailing median, target FPR)."""
    rates = [h["anomaly_rate"] for h in history if h["rows"] >= rules.min_rows]
    if today["rows"] < rules.min_rows or len(rates) < rules.rate_history:
        return None
    baseline = max(float(np.median(rates)), target_fpr)
    limit = rules.rate_factor * baseline
    if today["rate_low"] <= limit:
        return None
    return _alert(night, "anomaly_rate", f"{cls}: anomaly rate {100 * today['anomaly_rate']:.1f} % (95 % lower bound "
                  f"{100 * today['rate_low']:.1f} %) above {rules.rate_factor:g} × {100 * baseline:.1f} %", cls,
                  value=today["anomaly_rate"], lower_bound=today["rate_low"], limit=limit, baseline=baseline)


def shift_alert(night: Night, cls: str, shifts: dict[str, dict[str, Any]], rules: AlertRules) -> dict[str, Any] | None:
    """One alert per class and night listing each (signal, reference) with PSI and KS over the limits."""
    crossed = [{"signal": signal, "reference": ref, "psi": s["psi"], "ks": s["ks"], "ks_p": s["ks_p"]}
               for signal, by_ref in shifts.items() for ref, s in by_ref.items()
               if "psi" in s and s["psi"] > rules.psi and s["ks_p"] < rules.ks_alpha]
    if not crossed:
        return None
    what = "; ".join(f"{c['signal']} vs {c['reference']}: PSI {c['psi']:.2f}, KS D {c['ks']:.2f} (p {c['ks_p']:.1e})"
                     for c in crossed)
    return _alert(night, "shift", f"{cls}: distribution shift — {what}", cls, evidence=crossed)


# -- the whole window --------------------------------------------------------------------------
def load_rules(path: str | None, endpoint: str | None = None) -> AlertRules:
    """``AlertRules`` with the keys of a YAML mapping at ``path`` overriding the defaults."""
    if path is None:
        return AlertRules()
    import yaml

    content = yaml.safe_load(storage.read_bytes(path, endpoint)) or {}
    known = {f.name: f.type for f in fields(AlertRules)}
    if not isinstance(content, dict) or set(content) - set(known):
        raise InputError(f"{path}: expected a mapping of alert rules; unknown keys "
                         f"{sorted(set(content) - set(known)) if isinstance(content, dict) else content!r}; "
                         f"known: {', '.join(known)}")
    try:
        return AlertRules(**{k: (int if known[k] == "int" else float)(v) for k, v in content.items()})
    except (TypeError, ValueError) as exc:
        raise InputError(f"{path}: {exc}") from None


def _bundle_calibration(uri: str | None, endpoint: str | None, notes: list[str]
                        ) -> tuple[str | None, Calibration | None]:
    """(version, calibration) of the bundle's ``bundle.json``; a note and (None, None) when unreadable."""
    if uri is None:
        notes.append("no bundle given and none named by the nights' _SUCCESS.json: no calibration reference")
        return None, None
    try:
        meta = read_meta(uri, endpoint)
        return meta["version"], Calibration.from_dict(meta["calibration"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        notes.append(f"bundle {uri} cannot be read ({exc}): no calibration reference")
        return None, None


def _structure_notes(window: list[Night], before: list[Night]) -> list[str]:
    """Lines for nights that cannot be used, model version changes and classes appearing or disappearing."""
    notes = [n.note for n in window if n.note]
    in_window = {n.date for n in window}
    committed = [n for n in before + window if n.committed]
    for prev, cur in zip(committed, committed[1:]):
        if prev.version != cur.version and cur.date in in_window:
            notes.append(f"{cur.date}: model version {prev.version} → {cur.version}; trailing references start "
                         "again from this night")
    seen: dict[str, dt.date] = {}
    for i, night in enumerate(committed):
        ok = night.rows["ok"]
        present = set(night.rows["class_name"][ok]) - {UNKNOWN_CLASS}
        if night.date in in_window:
            if len(ok) and not ok.any():
                notes.append(f"{night.date}: only error rows ({len(ok)}): no class statistics")
            notes += [f"{cls}: first rows on {night.date}" for cls in sorted(present - set(seen)) if i > 0]
            notes += [f"{cls}: no rows on {night.date} (last seen {seen[cls]})"
                      for cls in sorted(set(seen) - present) if ok.any()]
        seen.update({cls: night.date for cls in present})
    return notes


def _class_names(nights: list[Night]) -> list[str]:
    names: set[str] = set()
    for n in nights:
        if n.committed:
            names.update(n.rows["class_name"][n.rows["ok"]])
    return sorted(names - {UNKNOWN_CLASS})


def _class_night(night: Night, cls: str, history: list[Night], references: list[Reference],
                 fixed: dict[str, list[Night]], calibration: Calibration | None, rules: AlertRules
                 ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One class's statistics on one night and the alerts they raise."""
    today = {"date": str(night.date), **class_stats(_class_rows(night, cls))}
    today["shift"] = class_shift(night, cls, references, history, fixed, calibration, rules)
    past = [class_stats(_class_rows(h, cls)) for h in history]
    has_target = calibration is not None and cls in calibration.per_class
    target = calibration.target_of(cls) if has_target else TrainConfig.target_fpr
    alerts = [rate_alert(night, cls, today, past, target, rules), shift_alert(night, cls, today["shift"], rules)]
    return today, [a for a in alerts if a]


def analyse(window: list[Night], before: list[Night], references: list[Reference], fixed: dict[str, list[Night]],
            bundle: tuple[str | None, Calibration | None], rules: AlertRules) -> dict[str, Any]:
    """Per night and per class statistics of ``window`` and the alerts they raise. A night on which a
    class raised a shift alert is left out of that class's later trailing references."""
    version, calibration = bundle
    nights = [night_stats(n) for n in window]
    classes: dict[str, list[dict[str, Any]]] = {cls: [] for cls in _class_names(window)}
    shifted: dict[str, set[dt.date]] = {cls: set() for cls in classes}
    alerts: list[dict[str, Any]] = []
    for night, summary in zip(window, nights):
        if not night.committed:
            continue
        alerts += night_alerts(night, summary, rules)
        cal = calibration if night.version == version else None
        for cls in classes:
            if (night.rows["ok"] & (night.rows["class_name"] == cls)).any():
                history = trailing_nights(night, before + window, rules, shifted[cls])
                today, raised = _class_night(night, cls, history, references, fixed, cal, rules)
                classes[cls].append(today)
                alerts += raised
                if any(a["rule"] == "shift" for a in raised):
                    shifted[cls].add(night.date)
    return {"nights": nights, "classes": classes, "alerts": alerts}


def _fixed_nights(output: str, references: list[Reference], endpoint: str | None) -> dict[str, list[Night]]:
    """The committed nights of each ``DATE..DATE`` reference."""
    fixed = {}
    for ref in references:
        if ref.start is not None and ref.end is not None:
            days = (ref.end - ref.start).days + 1
            nights = [read_night(output, ref.start + dt.timedelta(days=i), endpoint) for i in range(days)]
            fixed[ref.name] = [n for n in nights if n.committed]
    return fixed


def _reference_quantiles(values: np.ndarray | None) -> dict[str, float]:
    if values is None or not len(values):
        return {}
    return {f"p{q}": float(np.percentile(values, q)) for q in QUANTILES}


def drift(output: str, days: int, until: dt.date | None = None, references: str = DRIFT_REFERENCES,
          rules: AlertRules | None = None, bundle: str | None = None, endpoint: str | None = None
          ) -> dict[str, Any]:
    """The drift of the last ``days`` nights up to ``until`` (default: the latest committed night):
    ``drift.json``'s content, alerts included."""
    if days < 1:
        raise InputError(f"--days must be at least 1, got {days}")
    rules = rules or AlertRules()
    refs = parse_references(references)
    window, before = read_window(output, days, until, rules, endpoint)
    fixed = _fixed_nights(output, refs, endpoint)
    notes = _structure_notes(window, before)
    notes += [f"reference {name}: no committed night in it" for name, nights in fixed.items() if not nights]
    committed = [n for n in window if n.committed]
    bundle = bundle or next((n.run.get("bundle") for n in reversed(committed) if n.run.get("bundle")), None)
    version, calibration = _bundle_calibration(bundle, endpoint, notes) if any(r.name == CALIBRATION for r in refs) \
        else (None, None)
    if version is not None and committed and all(n.version != version for n in committed):
        notes.append(f"bundle {bundle} is version {version}, no night of the window was scored by it: "
                     "no calibration reference")
    result = analyse(window, before, refs, fixed, (version, calibration), rules)
    result["calibration_quantiles"] = {cls: _reference_quantiles(
        calibration_reference(calibration, cls, "score", passing=False))
                                       for cls in result["classes"]}
    return {"output": output, "window": {"from": str(window[0].date), "until": str(window[-1].date), "days": days},
            "references": [r.name for r in refs], "bundle": {"uri": bundle, "version": version},
            "trailing_from": [str(n.date) for n in before], "rules": asdict(rules), "notes": notes, **result}
