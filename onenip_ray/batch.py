"""Nightly batch scoring: a streaming Ray Data pipeline from an image archive to one Parquet partition.

Stages (``run_batch_scoring``), under the date's lease (``lease.py``; one writer per output and date):

1. stream the inputs from a folder / ``s3://`` prefix (recursive) or a Parquet/CSV manifest with
   ``image_uri`` and optional ``class_name`` (deduplicated), in chunks of ``chunk_size``: each chunk
   goes into Ray's object store as blocks tagged with its index, so the driver never holds more keys
   than one chunk; inputs that an earlier failed run of the same date and model version already
   scored are skipped (resume);
2. one Ray Data pipeline over all the blocks (one actor pool and model load per night): CPU tasks
   read the bytes (transient errors retried) and ``ScoringSpec.prepare`` them; failures become error
   rows with an ``error_kind``, never task failures;
3. an actor pool (``InferenceActor``; one per GPU with ``use_gpu``) holds the model; the prompt pool
   is ``ray.put`` once by the driver and every actor ``ray.get``s it and encodes its tokens once;
4. CPU tasks: ``ScoringSpec.result_row`` (calibrated score, regions, areas) and, with heat maps,
   a PNG per image and an overlay JPEG per anomalous image;
5. ``write_parquet`` into the run's staging folder, one folder per input chunk; the driver accounts
   each chunk in Arrow against its blocks (every input exactly once, duplicates of retried tasks
   dropped), checks the run against its limits (``max_error_fraction``, empty input) and commits
   with ``nightly.commit`` (journaled, repairable).
"""
from __future__ import annotations

import datetime as dt
import math
import os
import posixpath
import socket
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict
from functools import partial
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from . import accounting, nightly, storage
from .config import LEASE_SECONDS, BatchConfig
from .data.images import DEFAULT_MAX_PIXELS, ImageError, decode_image
from .engines import load_model
from .formats import uri_stem
from .inputs import iter_input_chunks
from .lease import Lease
from .prompts import PromptPool
from .schema import (
    ERROR_MISSING,
    ERROR_TRANSIENT,
    ERROR_UNREADABLE,
    FILE_SCHEMA,
    PARTITION_COLUMN,
    SCHEMA_VERSION,
    STATUS_ERROR,
    to_table,
)
from .scoring import Prepared, Scorer, ScoringSpec
from .visualization import render_heatmap, render_overlay

MAX_BLOCK_ROWS = 1024  # inputs per Ray Data block (several model batches per task)
INPUT_CHUNK = "input_chunk"  # the listing chunk an input came in: carried through the stages, staged by it


# -- pipeline stages ------------------------------------------------------------------------------
def prepare_batch(batch: pa.Table, spec: ScoringSpec, source: storage.Location) -> dict[str, np.ndarray]:
    """Read each input (through ``source``'s endpoint) and prepare it; failures are carried in
    ``error`` (``""`` = none)."""
    size = spec.image_size
    out: dict[str, list] = {k: [] for k in ("image_uri", "class_name", "given_class", "image_sha256", "width", "height",
                                            "error", "error_kind", "prepare_ms")}
    inputs = np.zeros((batch.num_rows, 3, size, size), np.float32)
    for i, (image_uri, class_name) in enumerate(zip(batch.column("image_uri").to_pylist(),
                                                    batch.column("class_name").to_pylist())):
        start = time.perf_counter()
        try:
            data = source.with_uri(image_uri).read_bytes()  # transient failures already retried
        except Exception as exc:  # noqa: BLE001 - one unreadable object is one error row, never a failed task
            kind = (ERROR_MISSING if isinstance(exc, FileNotFoundError)
                    else ERROR_TRANSIENT if storage.is_transient(exc) else ERROR_UNREADABLE)
            prepared = Prepared(image_uri, class_name, error=f"{image_uri}: cannot read: {exc}", error_kind=kind)
        else:
            prepared = spec.prepare(image_uri, data, class_name)
        if prepared.input is not None:
            inputs[i] = prepared.input
        out["image_uri"].append(image_uri)
        out["class_name"].append(class_name or "")
        out["given_class"].append(prepared.given_class)
        out["image_sha256"].append(prepared.image_sha256 or "")
        out["width"].append(prepared.width or 0)
        out["height"].append(prepared.height or 0)
        out["error"].append(prepared.error or "")
        out["error_kind"].append(prepared.error_kind or "")
        out["prepare_ms"].append((time.perf_counter() - start) * 1e3)
    text = ("image_uri", "class_name", "image_sha256", "error", "error_kind")
    result = {k: np.array(v, dtype=object if k in text else None) for k, v in out.items()}
    result["input"] = inputs
    result[INPUT_CHUNK] = batch.column(INPUT_CHUNK).to_numpy()
    return result


class InferenceActor:
    """The Ray Data callable class holding the model (``map_batches(compute=ActorPoolStrategy)``)."""

    def __init__(self, bundle: storage.Location, pool_ref: Any, device: str, threads: int, max_pixels: int,
                 runtime: str = "torch") -> None:
        import ray
        import torch

        torch.set_num_threads(threads)
        pool: PromptPool = ray.get(pool_ref)
        self.scorer = Scorer(load_model(bundle.uri, runtime, bundle.endpoint, pool=pool), runtime=runtime,
                             device=device, threads=threads, max_pixels=max_pixels)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n, size = len(batch["image_uri"]), self.scorer.spec.image_size
        fused = np.zeros((n, size, size), np.float32)
        scores, prompt_index, infer_ms = np.full(n, np.nan), np.full(n, -1, np.int64), np.zeros(n)
        similarity = np.full(n, np.nan)
        ok = np.flatnonzero(batch["error"] == "")
        if len(ok):
            out = self.scorer.infer(batch["input"][ok], batch["given_class"][ok])
            fused[ok], scores[ok], prompt_index[ok] = out.fused, out.scores, out.prompt_index
            infer_ms[ok] = out.seconds * 1e3
            similarity[ok] = out.similarity
        result = {k: v for k, v in batch.items() if k != "input"}
        result.update(fused=fused, score_raw=scores, prompt_index=prompt_index, route_similarity=similarity,
                      infer_ms=infer_ms)
        return result


def finish_batch(
    batch: dict[str, np.ndarray], spec: ScoringSpec, run_id: str, run_date: dt.date,
    heatmaps: tuple[storage.Location, str] | None, source: storage.Location,
) -> pa.Table:
    """Result rows in ``FILE_SCHEMA`` (the partition key lives in the path); ``heatmaps`` = (staging
    dir written now, final dir named in rows); overlays read their originals through ``source``."""
    rows = []
    for i, image_uri in enumerate(batch["image_uri"]):
        prepared = Prepared(
            image_uri, batch["class_name"][i] or None, given_class=int(batch["given_class"][i]),
            image_sha256=batch["image_sha256"][i] or None, width=int(batch["width"][i]) or None,
            height=int(batch["height"][i]) or None, error=batch["error"][i] or None,
            prepare_ms=float(batch["prepare_ms"][i]), error_kind=batch["error_kind"][i] or None,
        )
        if prepared.error is not None:
            rows.append(spec.error_row(prepared, run_id=run_id, run_date=run_date))
            continue
        fused = batch["fused"][i]
        stem = uri_stem(image_uri)
        row = spec.result_row(
            prepared, fused, float(batch["score_raw"][i]), int(batch["prompt_index"][i]),
            float(batch["route_similarity"][i]), run_id=run_id, run_date=run_date,
            upstream_ms=prepared.prepare_ms + float(batch["infer_ms"][i]),
            heatmap_uri=storage.join(heatmaps[1], f"{stem}.png") if heatmaps else None,
        )
        if heatmaps:
            start = time.perf_counter()
            cal = spec.prompt_calibration(int(batch["prompt_index"][i]))
            heatmaps[0].join(f"{stem}.png").write_bytes(render_heatmap(fused, cal))
            if row["is_anomalous"]:
                _write_overlay(source.with_uri(image_uri), fused, cal, row["regions"],
                               heatmaps[0].join(f"{stem}_overlay.jpg"))
            row["latency_ms"] += (time.perf_counter() - start) * 1e3
        rows.append(row)
    return to_table(rows).drop_columns([PARTITION_COLUMN]).append_column(INPUT_CHUNK, pa.array(batch[INPUT_CHUNK]))


def _write_overlay(original: storage.Location, fused: np.ndarray, cal, regions: list[dict],
                   target: storage.Location) -> None:
    """Overlay at original resolution (the original is read again: only anomalous images get one)."""
    try:
        image = decode_image(original.read_bytes(), original.uri)
    except (OSError, ImageError):  # changed or vanished since it was scored: the row and heat map stand
        return
    target.write_bytes(render_overlay(image, fused, cal, regions))


def _separate_stage() -> dict[str, Any]:
    """No extra remote args; an op with a ``ray_remote_args_fn`` is never fused, so decoding stays in
    CPU tasks instead of being fused into the inference actors (Ray Data fuses a task map into
    the next actor map when their resources match, e.g. 1 CPU each on CPU-only clusters)."""
    return {}


def _staged_names() -> Any:
    """Ray Data file names for staged Parquet (``…parquet.staged``: no reader's glob matches them)."""
    from ray.data.datasource import FilenameProvider

    class StagedNames(FilenameProvider):
        def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
            return f"{write_uuid}_{task_index:06}-{{i}}{nightly.STAGED_SUFFIX}"

    return StagedNames()


# -- run ----------------------------------------------------------------------------------------
def run_batch_scoring(cfg: BatchConfig, actor_cls: type = InferenceActor,
                      on_commit_step: nightly.OnStep | None = None) -> dict[str, Any]:
    """Score every input image once into ``OUTPUT/run_date=…/`` and return the run summary (also
    written as its ``_SUCCESS.json``). Raises ``LeaseHeld`` when another run writes the same date,
    ``RunRejected`` over a limit. ``actor_cls`` is the inference class of step 3;
    ``on_commit_step`` is passed to ``nightly.commit``."""
    started_at, t_start = dt.datetime.now(dt.timezone.utc), time.perf_counter()
    endpoint = storage.default_endpoint(cfg.endpoint)
    source = storage.Location(cfg.input, endpoint)
    run_id = cfg.run_id or f"{cfg.run_date:%Y%m%d}-{uuid.uuid4().hex[:8]}"
    layout = nightly.NightLayout(storage.Location(cfg.output, endpoint), cfg.run_date)
    fs = layout.fs
    try:
        with Lease(layout.lease, run_id, ttl=cfg.lease_seconds) as lease:
            repaired = nightly.repair(layout)
            bundle = load_model(cfg.bundle, cfg.runtime, endpoint)
            spec = ScoringSpec.from_bundle(bundle, cfg.max_pixels or DEFAULT_MAX_PIXELS)
            nightly.write_json(fs, layout.run_path(run_id, nightly.RUN_FILE), {
                "run_id": run_id, "model_version": bundle.version, "input": cfg.input, "host": socket.gethostname(),
                "pid": os.getpid(), "started_at": started_at.isoformat(timespec="seconds")})
            earlier = accounting.earlier_results(layout, fs, bundle.version, run_id)
            heatmaps = (layout.staged_heatmaps(run_id), layout.heatmaps.uri) if cfg.heatmaps else None

            t_pipeline = time.perf_counter()
            score = partial(_score_blocks, cfg=cfg, spec=spec, run_id=run_id, heatmaps=heatmaps, source=source,
                            bundle=storage.Location(cfg.bundle, endpoint), actor_cls=actor_cls, fs=fs)
            tally = _score_inputs(cfg, bundle.pool, source, earlier, score, layout, run_id)
            pipeline_s = time.perf_counter() - t_pipeline

            resumed_from = sorted({*earlier.column("run_id").to_pylist()}) if tally.resumed else []
            summary = _summary(cfg, run_id, bundle.version, layout, tally, started_at, pipeline_s, repaired,
                               resumed_from)
            _check_limits(cfg, summary, layout)
            if not tally.files:  # an allowed empty night: one empty file keeps the partition readable
                tally.files.append(_empty_file(fs, layout.staged_data_path(run_id, f"empty{nightly.STAGED_SUFFIX}")))
                summary["files"] = [f"part-{run_id}-00000.parquet"]
            summary["wall_seconds"] = round(time.perf_counter() - t_start, 3)
            lease.check()
            heat_dirs = [layout.staged_heatmaps(r).path for r in [*summary["resumed_from"], run_id]]
            nightly.commit(layout, tally.files, heat_dirs, summary,
                           on_commit_step)
    finally:
        nightly.tidy(layout)
    return summary


def _score_inputs(cfg: BatchConfig, pool: PromptPool, source: storage.Location, earlier: pa.Table | None,
                  score: Callable[..., None], layout: nightly.NightLayout, run_id: str) -> accounting.Tally:
    """Every input through ``score`` (one pipeline, one actor pool for the night) into the run's
    staged data, except the inputs an earlier run of the night already scored (reused); all staged
    rows accounted chunk by chunk. The listing's chunks wait in Ray's object store as blocks tagged
    with their chunk's index, so the driver holds one chunk of keys at a time."""
    tally, reused, chunks, pool_ref = accounting.Tally(files=[], groups=Counter()), [], [], None
    for index, chunk in enumerate(iter_input_chunks(source.uri, source.endpoint, cfg.chunk_size)):
        tally.inputs += chunk.num_rows
        if earlier is not None:
            done = pc.is_in(chunk.column("image_uri"), value_set=earlier.column("image_uri"))
            reused.append(chunk.filter(done).column("image_uri"))
            chunk = chunk.filter(pc.invert(done))
        if not chunk.num_rows:
            continue
        pool_ref = pool_ref or _start_ray(source, pool)
        chunks.append((index, _put_blocks(chunk, index, cfg.batch_size)))
    fs = layout.fs
    if chunks:
        import ray

        score([ref for _, refs in chunks for ref in refs], pool_ref=pool_ref, data_path=layout.staged_data_path(run_id))
        for index, refs in chunks:
            expected = pa.chunked_array([block.column("image_uri") for block in ray.get(refs)], pa.string())
            files = accounting.staged_files(fs, layout.staged_data_path(run_id, f"{INPUT_CHUNK}={index}"))
            accounting.account(fs, files, expected, tally)
    if reused:
        resumed_path = layout.staged_data_path(run_id, "resumed")
        accounting.account_resumed(fs, earlier, pa.chunked_array(reused, pa.string()), resumed_path, tally)
    return tally


def _put_blocks(chunk: pa.Table, index: int, batch_size: int) -> list[Any]:
    """``chunk`` tagged with its ``INPUT_CHUNK`` index, put into Ray as blocks of a few per CPU (parallel
    decode) but not tiny ones (per-task overhead): ``batch_size``–``MAX_BLOCK_ROWS`` rows."""
    import ray

    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    rows = max(batch_size, min(MAX_BLOCK_ROWS, math.ceil(chunk.num_rows / (4 * cpus))))
    tagged = chunk.append_column(INPUT_CHUNK, pa.array(np.full(chunk.num_rows, index, np.int32)))
    return [ray.put(tagged.slice(o, rows)) for o in range(0, chunk.num_rows, rows)]


def _empty_file(fs: pafs.FileSystem, path: str) -> str:
    fs.create_dir(posixpath.dirname(path), recursive=True)
    pq.write_table(FILE_SCHEMA.empty_table(), path, filesystem=fs)
    return path


def _start_ray(source: storage.Location, pool: PromptPool) -> Any:
    """``pool`` put into Ray, started first if needed with the S3 settings that reach ``source``."""
    import ray

    if not ray.is_initialized():
        ray.init(runtime_env={"env_vars": storage.ray_env_vars(source.endpoint)})
    return ray.put(pool)  # held by the driver for the whole run (actor restarts re-read it)


def _score_blocks(blocks: list[Any], cfg: BatchConfig, spec: ScoringSpec, run_id: str,
                  heatmaps: tuple[storage.Location, str] | None, source: storage.Location, bundle: storage.Location,
                  pool_ref: Any, actor_cls: type, fs: pafs.FileSystem, data_path: str) -> None:
    """The night's Ray Data pipeline over the input ``blocks`` (object refs), staged as Parquet under
    ``data_path/input_chunk=N/`` by each row's input chunk."""
    import ray
    import ray.data

    cluster_cpus = ray.cluster_resources().get("CPU", 1.0)
    actor_cpus = cfg.actor_cpus or (1.0 if cfg.use_gpu else min(1.0, cluster_cpus / (2 * cfg.concurrency)))
    ds = ray.data.from_arrow_refs(blocks)
    ds = ds.map_batches(prepare_batch, fn_kwargs={"spec": spec, "source": source}, batch_size=cfg.batch_size,
                        batch_format="pyarrow", num_cpus=cfg.task_cpus, ray_remote_args_fn=_separate_stage)
    ds = ds.map_batches(
        actor_cls, batch_size=cfg.batch_size, batch_format="numpy", num_cpus=actor_cpus,
        num_gpus=1 if cfg.use_gpu else 0, compute=ray.data.ActorPoolStrategy(size=cfg.concurrency),
        fn_constructor_kwargs={"bundle": bundle, "pool_ref": pool_ref,
                               "device": "cuda" if cfg.use_gpu else "cpu",
                               "threads": cfg.actor_threads or max(1, int(actor_cpus)),
                               "max_pixels": spec.max_pixels, "runtime": cfg.runtime},
    )
    ds = ds.map_batches(finish_batch, fn_kwargs={"spec": spec, "run_id": run_id, "run_date": cfg.run_date,
                                                 "heatmaps": heatmaps, "source": source},
                        batch_size=cfg.batch_size, batch_format="numpy", num_cpus=cfg.task_cpus)
    ds.write_parquet(data_path, filesystem=fs, partition_cols=[INPUT_CHUNK], min_rows_per_file=cfg.rows_per_file,
                     filename_provider=_staged_names())


def _summary(cfg: BatchConfig, run_id: str, model_version: str, layout: nightly.NightLayout, tally: accounting.Tally,
             started_at: dt.datetime,
             pipeline_s: float, repaired: str | None, resumed_from: list[str]) -> dict[str, Any]:
    counts, errors, per_class = accounting.counts(tally)
    scored = tally.inputs - tally.resumed
    return {
        "run_id": run_id, "run_date": f"{cfg.run_date:%Y-%m-%d}", "model_version": model_version,
        "schema_version": SCHEMA_VERSION,
        "bundle": cfg.bundle, "input": cfg.input, "output": cfg.output, "partition": layout.partition.uri,
        "counts": counts, "errors_by_kind": errors,
        "per_class": per_class,
        "duplicates_dropped": tally.duplicates_dropped, "resumed": tally.resumed, "resumed_from": resumed_from,
        "repaired": repaired, "files": [f"part-{run_id}-{i:05d}.parquet" for i in range(len(tally.files))],
        "heatmaps": layout.heatmaps.uri if cfg.heatmaps else None,
        "started_at": started_at.isoformat(timespec="seconds"), "pipeline_seconds": round(pipeline_s, 3),
        "images_per_second": round(scored / pipeline_s, 3) if pipeline_s > 0 and scored else None,
        "config": {k: (str(v) if isinstance(v, dt.date) else v) for k, v in asdict(cfg).items()},
    }


def _check_limits(cfg: BatchConfig, summary: dict[str, Any], layout: nightly.NightLayout) -> None:
    """Raise ``RunRejected`` (after writing ``rejected.json`` beside the staged rows) when the run
    is empty without ``allow_empty`` or its error share is above ``max_error_fraction``."""
    counts, reason = summary["counts"], None
    if counts["total"] == 0 and not cfg.allow_empty:
        reason = f"no input images in {cfg.input} (pass --allow-empty to commit an empty night)"
    elif counts["total"] and counts[STATUS_ERROR] / counts["total"] > cfg.max_error_fraction:
        kinds = ", ".join(f"{k} {n}" for k, n in summary["errors_by_kind"].items())
        reason = (f"{counts[STATUS_ERROR]} of {counts['total']} inputs "
                  f"({100 * counts[STATUS_ERROR] / counts['total']:.1f} %) are errors "
                  f"({kinds}), above --max-error-fraction {cfg.max_error_fraction}")
    if reason is None:
        return
    run_id = summary["run_id"]
    nightly.write_json(layout.fs, layout.run_path(run_id, nightly.REJECTED_FILE), {"reason": reason, **summary})
    raise nightly.RunRejected(f"run {summary['run_id']} rejected: {reason}. The committed partition "
                              f"{summary['partition']} is unchanged; "
                      f"the new rows stay staged in {layout.staged_data_path(run_id)} for inspection")


def repair_output(output: str, endpoint: str | None = None) -> dict[str, Any]:
    """Finish every interrupted commit under ``output`` (each date under its lease), after bringing
    an output of an older version to the current layout (``nightly.migrate_legacy``)."""
    location = storage.Location(output, storage.default_endpoint(endpoint))
    migrated = nightly.migrate_legacy(location)
    repaired = {}
    for day in nightly.dates_with_runs(location):
        layout = nightly.NightLayout(location, day)
        with Lease(layout.lease, f"repair-{uuid.uuid4().hex[:8]}", LEASE_SECONDS):
            repaired[f"{day:%Y-%m-%d}"] = nightly.repair(layout)
    return {"output": output, "repaired": {d: r for d, r in repaired.items() if r}, "dates_checked": len(repaired),
            "migrated": migrated}
