"""The nightly job's accounting: every input scored exactly once, in Arrow, without per-key Python
objects. Each chunk's staged files are checked against its inputs (repeats of retried tasks
dropped, files rewritten without them); rows an earlier unfinished run of the night scored with
the same model version are reused; the counts per class, status and error kind make the run's
summary (``batch._summary``)."""
from __future__ import annotations

import posixpath
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from . import nightly, storage
from .formats import UNKNOWN_CLASS
from .schema import FILE_SCHEMA, STATUS_ERROR, STATUS_OK

COUNT_KEYS = ("total", STATUS_OK, STATUS_ERROR, "anomalous")


@dataclass
class Tally:
    """Accounting of the run so far: staged files and counts, without any per-key Python objects."""

    files: list[str]
    groups: Counter  # (class_name, status, error_kind, is_anomalous) -> rows
    inputs: int = 0
    resumed: int = 0
    duplicates_dropped: int = 0


def staged_files(fs: pafs.FileSystem, path: str) -> list[str]:
    return sorted(p for n, p in nightly.listing(fs, path).items() if n.endswith(nightly.STAGED_SUFFIX))


ACCOUNT_COLUMNS = ["image_uri", "class_name", "status", "error_kind", "is_anomalous"]


def _read_rows(fs: pafs.FileSystem, files: list[str], columns: list[str]) -> pa.Table:
    """``columns`` of ``files`` with ``_file`` (index into ``files``) and ``_row`` (row within it)."""
    parts = []
    for i, path in enumerate(files):
        t = storage.retry(lambda: pq.read_table(path, columns=columns, filesystem=fs))
        parts.append(t.append_column("_file", pa.array(np.full(t.num_rows, i, np.int32)))
                     .append_column("_row", pa.array(np.arange(t.num_rows, dtype=np.int64))))
    if parts:
        return pa.concat_tables(parts)
    empty = {c: pa.array([], FILE_SCHEMA.field(c).type) for c in columns}
    return pa.table(empty | {"_file": pa.array([], pa.int32()), "_row": pa.array([], pa.int64())})


def keep_first(rows: pa.Table) -> pa.Array:
    """Boolean mask: the first row of every ``image_uri`` (in file, then row order)."""
    order = pa.array(np.arange(rows.num_rows))
    first = pa.table({"image_uri": rows.column("image_uri"), "order": order}).group_by(
        "image_uri", use_threads=False).aggregate([("order", "min")]).column("order_min")
    mask = np.zeros(rows.num_rows, bool)
    mask[first.to_numpy()] = True
    return pa.array(mask)


def account(fs: pafs.FileSystem, files: list[str], expected: pa.ChunkedArray, tally: Tally) -> None:
    """Check that ``files`` hold every ``expected`` URI exactly once after dropping repeats (rows
    of retried tasks; files are rewritten without them) and add them to ``tally``."""
    rows = _read_rows(fs, files, ACCOUNT_COLUMNS)
    keep = keep_first(rows)
    kept = rows.filter(keep)
    seen = kept.column("image_uri")
    missing = pc.sum(pc.invert(pc.is_in(expected, value_set=seen))).as_py() or 0
    unexpected = pc.sum(pc.invert(pc.is_in(seen, value_set=expected))).as_py() or 0
    if missing or unexpected:
        lost = expected.filter(pc.invert(pc.is_in(expected, value_set=seen)))[:3].to_pylist()
        raise RuntimeError(f"staged results do not match the inputs: {missing} missing (e.g. {lost}), {unexpected} "
                           "unexpected; "
                           "nothing was committed")
    dropped = rows.num_rows - kept.num_rows
    if dropped:
        files_with_drops = set(rows.filter(pc.invert(keep)).column("_file").to_pylist())
        for i in sorted(files_with_drops):
            mask = pc.equal(kept.column("_file"), i)
            rows_kept = kept.filter(mask).column("_row")
            table = pq.read_table(files[i], filesystem=fs, schema=FILE_SCHEMA).take(rows_kept)
            pq.write_table(table, files[i], filesystem=fs)
    tally.duplicates_dropped += dropped
    tally.files.extend(files)
    for key in kept.group_by(ACCOUNT_COLUMNS[1:], use_threads=False).aggregate([("image_uri", "count")]).to_pylist():
        tally.groups[(key["class_name"], key["status"], key["error_kind"],
                      bool(key["is_anomalous"]))] += key["image_uri_count"]


def earlier_results(layout: nightly.NightLayout, fs: pafs.FileSystem, model_version: str,
                     run_id: str) -> pa.Table | None:
    """``ok`` rows that earlier unfinished runs of this date scored with the same model version
    (``image_uri``, ``run_id``, ``_path``): a restarted night scores only the rest. Unreadable
    (half-written) files are ignored; error rows are tried again."""
    runs = layout.runs.path
    parts = []
    for info in fs.get_file_info(pafs.FileSelector(runs, allow_not_found=True)):
        if info.type != pafs.FileType.Directory or posixpath.basename(info.path) == run_id:
            continue
        meta = nightly.read_json(fs, posixpath.join(info.path, nightly.RUN_FILE)) or {}
        if meta.get("model_version") != model_version:
            continue
        for path in staged_files(fs, posixpath.join(info.path, nightly.STAGED_DATA)):
            try:
                t = pq.read_table(path, columns=["image_uri", "status"], filesystem=fs)
            except (OSError, pa.ArrowInvalid):
                continue
            ok = t.filter(pc.equal(t.column("status"), STATUS_OK)).column("image_uri")
            parts.append(pa.table({"image_uri": ok, "run_id": pa.array([meta["run_id"]] * len(ok), pa.string()),
                                   "_path": pa.array([path] * len(ok), pa.string())}))
    if not parts:
        return None
    table = pa.concat_tables(parts)
    return table.filter(keep_first(table))


def account_resumed(fs: pafs.FileSystem, earlier: pa.Table, reused: pa.ChunkedArray, target_dir: str,
                     tally: Tally) -> None:
    """Copy the reused rows of earlier runs into this run's staging and account them."""
    chosen = earlier.filter(pc.is_in(earlier.column("image_uri"), value_set=reused))
    fs.create_dir(target_dir, recursive=True)
    files = []
    for i, path in enumerate(sorted(set(chosen.column("_path").to_pylist()))):
        uris = chosen.filter(pc.equal(chosen.column("_path"), path)).column("image_uri")
        table = pq.read_table(path, filesystem=fs, schema=FILE_SCHEMA)
        table = table.filter(pc.and_(pc.is_in(table.column("image_uri"), value_set=uris),
                                     pc.equal(table.column("status"), STATUS_OK)))
        target = posixpath.join(target_dir, f"{i:05d}{nightly.STAGED_SUFFIX}")
        pq.write_table(table, target, filesystem=fs)
        files.append(target)
    account(fs, files, reused, tally)
    tally.resumed += len(reused)


def counts(tally: Tally) -> tuple[dict[str, int], dict[str, int], dict[str, dict[str, int]]]:
    """(totals incl. ``unknown``, error rows by kind, per class totals) of ``tally``; raises when the
    rows do not add up to the inputs (nothing is committed then)."""
    per_class: dict[str, Counter] = {}
    errors: Counter = Counter()
    for (cls, status, kind, anomalous), n in tally.groups.items():
        c = per_class.setdefault(cls or UNKNOWN_CLASS, Counter())
        c["total"] += n
        c[status] += n
        c["anomalous"] += n if anomalous else 0
        if status == STATUS_ERROR:
            errors[kind or "unknown"] += n
    totals: Counter = Counter()
    for c in per_class.values():
        totals.update(c)
    result = {k: totals[k] for k in COUNT_KEYS}
    result["unknown"] = per_class.get(UNKNOWN_CLASS, Counter())[STATUS_OK]
    if result["total"] != tally.inputs:
        raise RuntimeError(f"{result['total']} result rows for {tally.inputs} inputs; nothing was committed")
    return (result, dict(sorted(errors.items())),
            {cls: {k: c[k] for k in COUNT_KEYS} for cls, c in sorted(per_class.items())})
