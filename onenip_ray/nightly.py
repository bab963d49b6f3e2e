"""The nightly table on disk: where each night's files live, and its journaled, repairable commit.

Layout of ``OUTPUT`` (Hive / Spark convention: the table is ``OUTPUT`` itself, partitioned by
``run_date``; everything that is not table data sits under ``_``-prefixed folders that table
readers skip, or is not named ``*.parquet``)::

    OUTPUT/run_date=2026-11-27/part-<run_id>-00000.parquet   rows, without the run_date column
    OUTPUT/run_date=2026-11-27/_SUCCESS.json                 run summary, written last
    OUTPUT/_heatmaps/run_date=2026-11-27/<stem>.png          heat maps, <stem>_overlay.jpg overlays
    OUTPUT/_runs/run_date=2026-11-27/lease.json              the one writer of that date
    OUTPUT/_runs/run_date=2026-11-27/commit.json             journal, only while a commit runs
    OUTPUT/_runs/run_date=2026-11-27/<run_id>/               a run's staging: run.json, data/*.parquet.staged,
                                                             heatmaps/, rejected.json

Commit (``commit``): the journal, naming every move and delete and the new ``_SUCCESS.json``, is
written before the first destructive step; then the old marker is removed, staged files move in,
old files are deleted, the new marker is written and the journal removed. Every step is
idempotent, so a crash anywhere is repaired by rolling the journal forward (``repair``: the next
run for that date, or ``onenip score --repair OUTPUT``). Without a journal the partition was never
touched: the staged rows stay for the next run to resume from. Readers that follow
``_SUCCESS.json`` (it lists the files) never see a mix of two runs: while files change, there is none.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import posixpath
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyarrow.fs as pafs

from . import storage
from .errors import RejectedError
from .formats import SUCCESS_FILE

RUNS_DIR = "_runs"
HEATMAP_DIR = "_heatmaps"
LEASE_FILE = "lease.json"
JOURNAL_FILE = "commit.json"
RUN_FILE = "run.json"
REJECTED_FILE = "rejected.json"
STAGED_DATA, STAGED_HEATMAPS = "data", "heatmaps"  # a run's staging folder: its rows, its heat maps
STAGED_SUFFIX = ".parquet.staged"  # staged Parquet: readers' ``**/*.parquet`` globs do not match it
COMMIT_STEPS = ("journal", "marker_removed", "files_moved", "heatmaps_moved", "old_deleted", "marker_written",
                "staging_removed", "journal_removed")

OnStep = Callable[[str], None]


class RunRejected(RejectedError):
    """The run broke a limit (errors, empty input); nothing was committed, its rows stay staged."""


@dataclass(frozen=True)
class NightLayout:
    """Where one ``run_date`` of one output keeps its files, as locations and filesystem paths."""

    output: storage.Location
    run_date: dt.date

    @property
    def partition_name(self) -> str:
        return f"run_date={self.run_date:%Y-%m-%d}"

    @property
    def partition(self) -> storage.Location:
        return self.output.join(self.partition_name)

    @property
    def heatmaps(self) -> storage.Location:
        return self.output.join(HEATMAP_DIR, self.partition_name)

    @property
    def runs(self) -> storage.Location:
        return self.output.join(RUNS_DIR, self.partition_name)

    @property
    def lease(self) -> storage.Location:
        return self.runs.join(LEASE_FILE)

    def run(self, run_id: str) -> storage.Location:
        return self.runs.join(run_id)

    def run_path(self, run_id: str, *parts: str) -> str:
        """A path inside run ``run_id``'s staging folder (``run.json``, ``rejected.json``, …)."""
        return posixpath.join(self.run(run_id).path, *parts)

    def staged_data_path(self, run_id: str, *parts: str) -> str:
        """Where run ``run_id`` stages its rows: ``data/input_chunk=N/``, ``data/resumed/``, …"""
        return self.run_path(run_id, STAGED_DATA, *parts)

    def staged_heatmaps(self, run_id: str) -> storage.Location:
        """Where run ``run_id`` stages its heat maps before the commit moves them."""
        return self.run(run_id).join(STAGED_HEATMAPS)

    @property
    def fs(self) -> pafs.FileSystem:
        return self.output.filesystem()[0]


def listing(fs: pafs.FileSystem, path: str) -> dict[str, str]:
    """Files under ``path`` (recursive) as {relative name: full path}; empty when absent."""
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return {}
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    return {posixpath.relpath(i.path, path): i.path for i in infos if i.type == pafs.FileType.File}


def read_json(fs: pafs.FileSystem, path: str) -> dict[str, Any] | None:
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    def read() -> bytes:
        with fs.open_input_stream(path) as stream:
            return stream.read()

    return json.loads(storage.retry(read))


def write_json(fs: pafs.FileSystem, path: str, content: dict[str, Any]) -> None:
    """Write ``content`` whole or not at all (S3: one PUT; local: a temporary file renamed)."""
    local = isinstance(fs, pafs.LocalFileSystem)
    target = f"{path}.tmp-{uuid.uuid4().hex}" if local else path
    fs.create_dir(posixpath.dirname(path), recursive=True)

    def write() -> None:
        with fs.open_output_stream(target) as stream:
            stream.write(json.dumps(content, indent=2, default=str).encode())

    storage.retry(write)
    if local:
        fs.move(target, path)


def _exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def _move(fs: pafs.FileSystem, source: str, dest: str) -> None:
    """Idempotent move: done when ``source`` is gone and ``dest`` is there."""
    if not _exists(fs, source):
        if _exists(fs, dest):
            return
        raise RuntimeError(f"commit journal names {source}, which is gone, and {dest} is not there either")
    fs.create_dir(posixpath.dirname(dest), recursive=True)
    storage.retry(lambda: fs.move(source, dest))


def _delete(fs: pafs.FileSystem, path: str) -> None:
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        storage.retry(lambda: fs.delete_file(path))
    elif info.type == pafs.FileType.Directory:
        storage.retry(lambda: fs.delete_dir(path))


def commit(layout: NightLayout, files: list[str], heatmap_dirs: list[str], summary: dict[str, Any],
           on_step: OnStep | None = None) -> None:
    """Make ``files`` (staged paths, in order) the partition ``part-<run_id>-NNNNN.parquet``
    (names in ``summary["files"]``), the heat maps under ``heatmap_dirs`` (later dirs win) its heat
    maps, and ``summary`` its ``_SUCCESS.json``; afterwards every run folder of the date is removed.
    ``on_step(name)`` runs after each of ``COMMIT_STEPS`` (progress, fault injection)."""
    fs = layout.fs
    partition, heat_final = layout.partition.path, layout.heatmaps.path
    new_names = summary["files"]
    heat_new: dict[str, str] = {}
    for folder in heatmap_dirs:
        heat_new.update(listing(fs, folder))
    old_files, old_heat = listing(fs, partition), listing(fs, heat_final)
    runs = layout.runs.path
    journal = {
        "run_id": summary["run_id"],
        "moves": [[source, posixpath.join(partition, name)] for source, name in zip(files, new_names)],
        "heatmap_moves": [[source, posixpath.join(heat_final, name)] for name, source in sorted(heat_new.items())],
        "deletes": sorted([p for n, p in old_files.items() if n not in new_names and n != SUCCESS_FILE]
                          + [p for n, p in old_heat.items() if n not in heat_new]),
        "marker": posixpath.join(partition, SUCCESS_FILE),
        "summary": summary,
        "staging": sorted(i.path for i in fs.get_file_info(pafs.FileSelector(runs))
                          if i.type == pafs.FileType.Directory),
    }
    write_json(fs, posixpath.join(runs, JOURNAL_FILE), journal)
    if on_step:
        on_step("journal")
    _roll_forward(fs, posixpath.join(runs, JOURNAL_FILE), journal, on_step)


def _roll_forward(fs: pafs.FileSystem, journal_path: str, journal: dict[str, Any], on_step: OnStep | None) -> None:
    def done(step: str) -> None:
        if on_step:
            on_step(step)

    marker = journal["marker"]
    summary_written = (read_json(fs, marker) or {}).get("run_id") == journal["run_id"]
    if not summary_written:
        _delete(fs, marker)
    done("marker_removed")
    for source, dest in journal["moves"]:
        _move(fs, source, dest)
    done("files_moved")
    for source, dest in journal["heatmap_moves"]:
        _move(fs, source, dest)
    done("heatmaps_moved")
    for path in journal["deletes"]:
        _delete(fs, path)
    done("old_deleted")
    if not summary_written:
        write_json(fs, marker, journal["summary"])
    done("marker_written")
    for folder in journal["staging"]:
        _delete(fs, folder)
    done("staging_removed")
    _delete(fs, journal_path)
    done("journal_removed")


def repair(layout: NightLayout, on_step: OnStep | None = None) -> str | None:
    """Finish an interrupted commit of this date (roll its journal forward); the run id it
    finished, or None when there was nothing to repair. Call while holding the date's lease."""
    fs = layout.fs
    journal_path = posixpath.join(layout.runs.path, JOURNAL_FILE)
    journal = read_json(fs, journal_path)
    if journal is None:
        return None
    _roll_forward(fs, journal_path, journal, on_step)
    return journal["run_id"]


def tidy(layout: NightLayout) -> None:
    """Remove the date's run folder and ``_runs/`` when empty (local disk; an S3 prefix without
    objects does not exist, and deleting one could race a new run's lease)."""
    if storage.is_s3(layout.output.uri):
        return
    for folder in (layout.runs, layout.output.join(RUNS_DIR)):
        try:
            os.rmdir(folder.path)
        except OSError:  # not empty (another run, kept staging) or already gone
            return


LEGACY_HEATMAP_DIR, LEGACY_STAGING_DIR = "heatmaps", "_staging"  # layout of onenip-result/1 outputs


def migrate_legacy(output: storage.Location) -> dict[str, int]:
    """Bring an output written by ``onenip-result/1`` (``run_date`` also a column in the files,
    heat maps under ``heatmaps/``, staging under ``_staging/``) to this layout, in place: files
    rewritten without ``run_date`` and with a null ``error_kind``, heat maps moved to
    ``_heatmaps/`` (``heatmap_uri`` follows), old staging deleted. Idempotent; returns counts."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from .schema import FILE_SCHEMA

    fs, root = output.filesystem()
    counts = {"files_rewritten": 0, "heatmaps_moved": 0}
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        return counts
    for name, path in sorted(listing(fs, root).items()):
        if name.startswith(f"{LEGACY_HEATMAP_DIR}/"):
            _move(fs, path, posixpath.join(root, HEATMAP_DIR, name.split("/", 1)[1]))
            counts["heatmaps_moved"] += 1
        elif name.startswith("run_date=") and name.endswith(".parquet"):
            table = pq.read_table(path, filesystem=fs)
            if table.schema.names == FILE_SCHEMA.names:
                continue
            if "error_kind" not in table.column_names:
                table = table.append_column("error_kind", pa.nulls(table.num_rows, pa.string()))
            moved = pc.replace_substring(table.column("heatmap_uri"), f"/{LEGACY_HEATMAP_DIR}/run_date=",
                                         f"/{HEATMAP_DIR}/run_date=")
            table = table.set_column(table.schema.get_field_index("heatmap_uri"), "heatmap_uri", moved)
            pq.write_table(table.select(FILE_SCHEMA.names).cast(FILE_SCHEMA), path, filesystem=fs)
            counts["files_rewritten"] += 1
    _delete(fs, posixpath.join(root, LEGACY_STAGING_DIR))
    _delete(fs, posixpath.join(root, LEGACY_HEATMAP_DIR))
    return counts


def dates_with_runs(output: storage.Location) -> list[dt.date]:
    """Dates that have run folders (staging, a lease or a journal) under ``OUTPUT/_runs/``."""
    runs = output.join(RUNS_DIR)
    if not runs.is_dir():
        return []
    dates = [d.split("=", 1)[1] for d in runs.list_dirs() if d.startswith("run_date=")]
    return sorted(dt.date.fromisoformat(d) for d in dates)
