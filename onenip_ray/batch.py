"""Nightly batch scoring: a streaming Ray Data pipeline from an image archive to one Parquet partition.

Stages (``run_batch_scoring``):

1. list the inputs in the driver (a folder / ``s3://`` prefix, recursively, or a Parquet/CSV
   manifest with ``image_uri`` and optional ``class_name``), deduplicated by URI;
2. CPU tasks: read the bytes and ``ScoringSpec.prepare`` them (decode with guards, resize,
   normalise); read and decode failures become error rows, never task failures;
3. an actor pool (``InferenceActor``; one per GPU with ``use_gpu``) holds the model; the prompt pool
   is ``ray.put`` once by the driver and every actor ``ray.get``s it and encodes its tokens once;
4. CPU tasks: ``ScoringSpec.result_row`` (calibrated score, regions, areas) and, with heat maps,
   a PNG per image and an overlay JPEG per anomalous image;
5. ``write_parquet`` into ``OUTPUT/_staging/<run_id>/``, then the driver checks that every input
   appears exactly once (dropping duplicates left by retried tasks) and commits: the partition
   ``OUTPUT/run_date=YYYY-MM-DD/`` is replaced (local: directory renames; S3: new objects copied
   in, old ones deleted) and ``_SUCCESS.json`` inside it is written last.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import os
import posixpath
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from . import storage
from .data.images import DEFAULT_MAX_PIXELS, ImageError, decode_image
from .engines import load_model
from .prompts import PromptPool
from .schema import RESULT_SCHEMA, SCHEMA_VERSION, STATUS_ERROR, STATUS_OK, UNKNOWN_CLASS, to_table
from .scoring import Prepared, Scorer, ScoringSpec, render_heatmap, render_overlay

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
MANIFEST_EXTENSIONS = (".parquet", ".csv")
SUCCESS_FILE = "_SUCCESS.json"
STAGING_DIR = "_staging"
HEATMAP_DIR = "heatmaps"
MAX_BLOCKS = 20_000  # bound on input blocks (Ray Data scheduling overhead on huge archives)


@dataclass(frozen=True)
class BatchConfig:
    """One scoring run. ``actor_cpus=None``: 1 CPU per GPU actor; on CPU-only clusters at most
    half the cluster's CPUs shared by the actors, so read and post-processing tasks always run.
    ``actor_threads``: the engine's intra-op threads per actor (default: its whole CPUs, at least 1);
    more than ``actor_cpus`` lets the model use cores the CPU tasks leave idle. ``runtime``: the
    engine (``torch`` on a bundle; ``onnxruntime`` / ``openvino`` on an ``onenip export`` directory)."""

    bundle: str
    input: str
    output: str
    run_date: dt.date
    endpoint: str | None = None
    heatmaps: bool = False
    batch_size: int = 32
    concurrency: int = 1
    use_gpu: bool = False
    actor_cpus: float | None = None
    actor_threads: int | None = None
    task_cpus: float = 1.0
    runtime: str = "torch"
    max_pixels: int = DEFAULT_MAX_PIXELS
    rows_per_file: int = 100_000
    run_id: str | None = None


# -- inputs -------------------------------------------------------------------------------------
def list_inputs(uri: str, endpoint: str | None = None) -> list[tuple[str, str | None]]:
    """``(image_uri, class_name or None)`` for every image under a folder / prefix (recursive,
    ``IMAGE_EXTENSIONS``), or every row of a Parquet/CSV manifest. Relative manifest URIs are
    resolved against the manifest's folder; repeated URIs keep their first row."""
    if uri.lower().endswith(MANIFEST_EXTENSIONS) and not storage.is_dir(uri, endpoint):
        items = _read_manifest(uri, endpoint)
    else:
        items = [(u, None) for u in storage.list_files(uri, IMAGE_EXTENSIONS, endpoint)]
    unique: dict[str, str | None] = {}
    for image_uri, class_name in items:
        unique.setdefault(image_uri, class_name)
    return list(unique.items())


def _read_manifest(uri: str, endpoint: str | None) -> list[tuple[str, str | None]]:
    fs, path = storage.filesystem_for(uri, endpoint)
    if uri.lower().endswith(".parquet"):
        table = pq.read_table(path, filesystem=fs)
    else:
        with fs.open_input_stream(path) as stream:
            table = pacsv.read_csv(stream, convert_options=pacsv.ConvertOptions(strings_can_be_null=True))
    if "image_uri" not in table.column_names:
        raise ValueError(f"manifest {uri} has no image_uri column (columns: {table.column_names})")
    uris = table.column("image_uri").cast(pa.string()).to_pylist()
    classes = table.column("class_name").cast(pa.string()).to_pylist() if "class_name" in table.column_names else [None] * len(uris)
    base = posixpath.dirname(storage.normalize_uri(uri))
    items = []
    for row, (image_uri, class_name) in enumerate(zip(uris, classes)):
        if not image_uri:
            raise ValueError(f"manifest {uri}: row {row} has an empty image_uri")
        if not (image_uri.startswith(storage.S3_SCHEME) or os.path.isabs(image_uri) or image_uri.startswith(storage.FILE_SCHEME)):
            image_uri = storage.join(base, image_uri)
        items.append((image_uri, class_name or None))
    return items


# -- pipeline stages ------------------------------------------------------------------------------
def prepare_batch(batch: pa.Table, spec: ScoringSpec, endpoint: str | None) -> dict[str, np.ndarray]:
    """Read and prepare each input; failures are carried in ``error`` (``""`` = none)."""
    size = spec.image_size
    out: dict[str, list] = {k: [] for k in ("image_uri", "class_name", "class_index", "image_sha256", "width", "height", "error", "prepare_ms")}
    inputs = np.zeros((batch.num_rows, 3, size, size), np.float32)
    for i, (image_uri, class_name) in enumerate(zip(batch.column("image_uri").to_pylist(), batch.column("class_name").to_pylist())):
        start = time.perf_counter()
        try:
            data = storage.read_bytes(image_uri, endpoint)
        except Exception as exc:  # one unreadable object is one error row, never a failed task
            prepared = Prepared(image_uri, class_name, -1, None, None, None, None, f"{image_uri}: cannot read: {exc}", 0.0)
        else:
            prepared = spec.prepare(image_uri, data, class_name)
        if prepared.input is not None:
            inputs[i] = prepared.input
        out["image_uri"].append(image_uri)
        out["class_name"].append(class_name or "")
        out["class_index"].append(prepared.class_index)
        out["image_sha256"].append(prepared.image_sha256 or "")
        out["width"].append(prepared.width or 0)
        out["height"].append(prepared.height or 0)
        out["error"].append(prepared.error or "")
        out["prepare_ms"].append((time.perf_counter() - start) * 1e3)
    result = {k: np.array(v, dtype=object if k in ("image_uri", "class_name", "image_sha256", "error") else None) for k, v in out.items()}
    result["input"] = inputs
    return result


class InferenceActor:
    """The Ray Data callable class holding the model (``map_batches(compute=ActorPoolStrategy)``)."""

    def __init__(self, bundle_uri: str, endpoint: str | None, pool_ref: Any, device: str, threads: int, max_pixels: int,
                 runtime: str = "torch") -> None:
        import ray
        import torch

        torch.set_num_threads(threads)
        pool: PromptPool = ray.get(pool_ref)
        self.scorer = Scorer(load_model(bundle_uri, runtime, endpoint, pool=pool), runtime=runtime, device=device, threads=threads,
                             max_pixels=max_pixels)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n, size = len(batch["image_uri"]), self.scorer.spec.image_size
        fused = np.zeros((n, size, size), np.float32)
        scores, prompt_index, infer_ms = np.full(n, np.nan), np.full(n, -1, np.int64), np.zeros(n)
        similarity = np.full(n, np.nan)
        ok = np.flatnonzero(batch["error"] == "")
        if len(ok):
            out = self.scorer.infer(batch["input"][ok], batch["class_index"][ok])
            fused[ok], scores[ok], prompt_index[ok], infer_ms[ok] = out.fused, out.scores, out.prompt_index, out.seconds * 1e3
            similarity[ok] = out.similarity
        result = {k: v for k, v in batch.items() if k != "input"}
        result.update(fused=fused, score_raw=scores, prompt_index=prompt_index, route_similarity=similarity, infer_ms=infer_ms)
        return result


def heatmap_name(image_uri: str) -> str:
    """File stem of an image's heat map (``<stem>.png``) and overlay (``<stem>_overlay.jpg``)."""
    return hashlib.sha256(image_uri.encode()).hexdigest()[:32]


def finish_batch(
    batch: dict[str, np.ndarray], spec: ScoringSpec, run_id: str, run_date: dt.date,
    heatmaps: tuple[str, str] | None, endpoint: str | None,
) -> pa.Table:
    """Result rows in ``RESULT_SCHEMA``; ``heatmaps`` = (staging dir written now, final dir named in rows)."""
    rows = []
    for i, image_uri in enumerate(batch["image_uri"]):
        prepared = Prepared(
            image_uri, batch["class_name"][i] or None, int(batch["class_index"][i]), batch["image_sha256"][i] or None,
            int(batch["width"][i]) or None, int(batch["height"][i]) or None, None, batch["error"][i] or None,
            float(batch["prepare_ms"][i]),
        )
        if prepared.error is not None:
            rows.append(spec.error_row(prepared, run_id=run_id, run_date=run_date))
            continue
        fused = batch["fused"][i]
        stem = heatmap_name(image_uri)
        row = spec.result_row(
            prepared, fused, float(batch["score_raw"][i]), int(batch["prompt_index"][i]), float(batch["route_similarity"][i]),
            run_id=run_id, run_date=run_date,
            upstream_ms=prepared.prepare_ms + float(batch["infer_ms"][i]),
            heatmap_uri=storage.join(heatmaps[1], f"{stem}.png") if heatmaps else None,
        )
        if heatmaps:
            start = time.perf_counter()
            cal = spec.prompt_calibration(int(batch["prompt_index"][i]))
            storage.write_bytes(storage.join(heatmaps[0], f"{stem}.png"), render_heatmap(fused, cal), endpoint)
            if row["is_anomalous"]:
                _write_overlay(image_uri, fused, cal, row["regions"], storage.join(heatmaps[0], f"{stem}_overlay.jpg"), endpoint)
            row["latency_ms"] += (time.perf_counter() - start) * 1e3
        rows.append(row)
    return to_table(rows)


def _write_overlay(image_uri: str, fused: np.ndarray, cal, regions: list[dict], target: str, endpoint: str | None) -> None:
    """Overlay at original resolution (the original is read again: only anomalous images get one)."""
    try:
        image = decode_image(storage.read_bytes(image_uri, endpoint), image_uri)
    except (OSError, ImageError):  # changed or vanished since it was scored: the row and heat map stand
        return
    storage.write_bytes(target, render_overlay(image, fused, cal, regions), endpoint)


def _separate_stage() -> dict[str, Any]:
    """No extra remote args; an op with a ``ray_remote_args_fn`` is never fused, so decoding stays in
    CPU tasks instead of being fused into the inference actors (Ray Data fuses a task map into
    the next actor map when their resources match, e.g. 1 CPU each on CPU-only clusters)."""
    return {}


# -- run ----------------------------------------------------------------------------------------
def run_batch_scoring(cfg: BatchConfig, actor_cls: type = InferenceActor) -> dict[str, Any]:
    """Score every input image once into ``OUTPUT/run_date=…/`` and return the run summary
    (also written as its ``_SUCCESS.json``). ``actor_cls`` is the inference class of step 3."""
    import ray
    import ray.data

    started_at, t_start = dt.datetime.now(dt.timezone.utc), time.perf_counter()
    endpoint = cfg.endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    run_id = cfg.run_id or f"{cfg.run_date:%Y%m%d}-{uuid.uuid4().hex[:8]}"
    bundle = load_model(cfg.bundle, cfg.runtime, endpoint)
    spec = ScoringSpec.from_bundle(bundle, cfg.max_pixels)
    inputs = list_inputs(cfg.input, endpoint)
    fs, out_root = storage.filesystem_for(cfg.output, endpoint)
    staging = storage.join(cfg.output, STAGING_DIR, run_id)
    partition_name = f"run_date={cfg.run_date:%Y-%m-%d}"
    heatmaps = (storage.join(staging, HEATMAP_DIR), storage.join(cfg.output, HEATMAP_DIR, partition_name)) if cfg.heatmaps else None
    staging_path = storage.filesystem_for(staging, endpoint)[1]
    data_path = posixpath.join(staging_path, "data")

    t_pipeline = time.perf_counter()
    if inputs:
        if not ray.is_initialized():
            ray.init(runtime_env={"env_vars": storage.ray_env_vars(endpoint)})
        pool_ref = ray.put(bundle.pool)  # held here until the write finishes (actor restarts re-read it)
        actor_cpus = cfg.actor_cpus or (1.0 if cfg.use_gpu else min(1.0, ray.cluster_resources().get("CPU", 1.0) / (2 * cfg.concurrency)))
        blocks = max(1, min(MAX_BLOCKS, math.ceil(len(inputs) / cfg.batch_size)))
        ds = ray.data.from_items([{"image_uri": u, "class_name": c} for u, c in inputs], override_num_blocks=blocks)
        ds = ds.map_batches(prepare_batch, fn_kwargs={"spec": spec, "endpoint": endpoint}, batch_size=cfg.batch_size,
                            batch_format="pyarrow", num_cpus=cfg.task_cpus, ray_remote_args_fn=_separate_stage)
        ds = ds.map_batches(
            actor_cls, batch_size=cfg.batch_size, batch_format="numpy", num_cpus=actor_cpus, num_gpus=1 if cfg.use_gpu else 0,
            compute=ray.data.ActorPoolStrategy(size=cfg.concurrency),
            fn_constructor_kwargs={"bundle_uri": cfg.bundle, "endpoint": endpoint, "pool_ref": pool_ref,
                                   "device": "cuda" if cfg.use_gpu else "cpu", "threads": cfg.actor_threads or max(1, int(actor_cpus)),
                                   "max_pixels": cfg.max_pixels, "runtime": cfg.runtime},
        )
        ds = ds.map_batches(finish_batch, fn_kwargs={"spec": spec, "run_id": run_id, "run_date": cfg.run_date,
                                                     "heatmaps": heatmaps, "endpoint": endpoint},
                            batch_size=cfg.batch_size, batch_format="numpy", num_cpus=cfg.task_cpus)
        ds.write_parquet(data_path, filesystem=fs, min_rows_per_file=cfg.rows_per_file)
        del pool_ref
    else:
        fs.create_dir(data_path, recursive=True)
        pq.write_table(RESULT_SCHEMA.empty_table(), posixpath.join(data_path, "empty.parquet"), filesystem=fs)
    pipeline_s = time.perf_counter() - t_pipeline

    files, dropped = _dedupe(fs, data_path, {u for u, _ in inputs})
    summary = {
        "run_id": run_id, "run_date": f"{cfg.run_date:%Y-%m-%d}", "model_version": bundle.version, "schema_version": SCHEMA_VERSION,
        "bundle": cfg.bundle, "input": cfg.input, "output": cfg.output, "partition": storage.join(cfg.output, partition_name),
        **_counts(fs, files), "duplicates_dropped": dropped,
        "files": [f"part-{run_id}-{i:05d}.parquet" for i in range(len(files))],
        "heatmaps": heatmaps[1] if heatmaps else None,
        "started_at": started_at.isoformat(timespec="seconds"), "pipeline_seconds": round(pipeline_s, 3),
        "images_per_second": round(len(inputs) / pipeline_s, 3) if pipeline_s > 0 else None,
        "config": {k: (str(v) if isinstance(v, dt.date) else v) for k, v in asdict(cfg).items()},
    }
    summary["wall_seconds"] = round(time.perf_counter() - t_start, 3)
    _commit(fs, out_root, staging_path, files, partition_name, summary, cfg.output.startswith(storage.S3_SCHEME))
    return summary


def _dedupe(fs: pafs.FileSystem, data_path: str, expected: set[str]) -> tuple[list[str], int]:
    """Staged Parquet files (sorted), rewritten without repeated ``image_uri`` rows (first kept);
    raises when an input is missing or an unknown one appears. Returns (files, rows dropped)."""
    infos = fs.get_file_info(pafs.FileSelector(data_path, recursive=True))
    files = sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(".parquet"))
    seen: set[str] = set()
    dropped = 0
    for path in files:
        uris = pq.read_table(path, columns=["image_uri"], filesystem=fs).column("image_uri").to_pylist()
        keep = []
        for uri in uris:
            keep.append(uri not in seen)
            seen.add(uri)
        if not all(keep):
            dropped += keep.count(False)
            table = pq.read_table(path, filesystem=fs, schema=RESULT_SCHEMA).filter(pa.array(keep))
            pq.write_table(table, path, filesystem=fs)
    missing, unknown = expected - seen, seen - expected
    if missing or unknown:
        raise RuntimeError(f"staged results do not match the inputs: {len(missing)} missing (e.g. {sorted(missing)[:3]}), "
                           f"{len(unknown)} unexpected (e.g. {sorted(unknown)[:3]}); nothing was committed")
    return files, dropped


def _counts(fs: pafs.FileSystem, files: list[str]) -> dict[str, Any]:
    """Totals and per-class counts (``total, ok, error, anomalous``); ``unknown`` = ok rows of
    images that resemble no class of the model (``class_name`` = ``UNKNOWN_CLASS``)."""
    columns = ["class_name", "status", "is_anomalous"]
    table = pa.concat_tables([pq.read_table(p, columns=columns, filesystem=fs) for p in files])
    per_class: dict[str, Counter] = {}
    for cls, status, anomalous in zip(*(table.column(c).to_pylist() for c in columns)):
        c = per_class.setdefault(cls or UNKNOWN_CLASS, Counter())
        c["total"] += 1
        c[status] += 1
        c["anomalous"] += bool(anomalous)
    totals = Counter()
    for c in per_class.values():
        totals.update(c)
    keys = ("total", STATUS_OK, STATUS_ERROR, "anomalous")
    counts = {k: totals[k] for k in keys}
    counts["unknown"] = per_class.get(UNKNOWN_CLASS, Counter())[STATUS_OK]
    return {"counts": counts, "per_class": {cls: {k: c[k] for k in keys} for cls, c in sorted(per_class.items())}}


def _listing(fs: pafs.FileSystem, path: str) -> dict[str, str]:
    """Files under ``path`` (recursive) as {relative name: full path}; empty when absent."""
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return {}
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    return {posixpath.relpath(i.path, path): i.path for i in infos if i.type == pafs.FileType.File}


def _write_json(fs: pafs.FileSystem, path: str, content: dict[str, Any]) -> None:
    with fs.open_output_stream(path) as stream:
        stream.write(json.dumps(content, indent=2, default=str).encode())


def _replace_dir(fs: pafs.FileSystem, new: str, dest: str, retired: str) -> None:
    """Local: ``dest`` becomes ``new`` by two renames (old tree moved aside, then deleted)."""
    fs.create_dir(posixpath.dirname(dest), recursive=True)
    if fs.get_file_info(dest).type != pafs.FileType.NotFound:
        fs.move(dest, retired)
    fs.move(new, dest)
    if fs.get_file_info(retired).type != pafs.FileType.NotFound:
        fs.delete_dir(retired)


def _commit(fs: pafs.FileSystem, out_root: str, staging: str, files: list[str], partition_name: str,
            summary: dict[str, Any], is_s3: bool) -> None:
    """Replace ``run_date=…/`` (and its heat maps) with the staged run; ``_SUCCESS.json`` last."""
    partition = posixpath.join(out_root, partition_name)
    heat_final = posixpath.join(out_root, HEATMAP_DIR, partition_name)
    heat_new = posixpath.join(staging, HEATMAP_DIR)
    if not is_s3:
        new_partition = posixpath.join(staging, "partition")
        fs.create_dir(new_partition)
        for source, name in zip(files, summary["files"]):
            fs.move(source, posixpath.join(new_partition, name))
        _write_json(fs, posixpath.join(new_partition, SUCCESS_FILE), summary)
        if summary["heatmaps"]:
            fs.create_dir(heat_new, recursive=True)
            _replace_dir(fs, heat_new, heat_final, posixpath.join(staging, "retired-heatmaps"))
        elif fs.get_file_info(heat_final).type != pafs.FileType.NotFound:
            fs.delete_dir(heat_final)
        _replace_dir(fs, new_partition, partition, posixpath.join(staging, "retired"))
    else:  # no rename on S3: readers trust a partition only while its _SUCCESS.json exists
        marker = posixpath.join(partition, SUCCESS_FILE)
        if fs.get_file_info(marker).type == pafs.FileType.File:
            fs.delete_file(marker)
        old_heat, new_heat = _listing(fs, heat_final), _listing(fs, heat_new)
        for name, source in new_heat.items():
            fs.move(source, posixpath.join(heat_final, name))
        for name in old_heat.keys() - new_heat.keys():
            fs.delete_file(old_heat[name])
        old_files = _listing(fs, partition)
        for source, name in zip(files, summary["files"]):
            fs.move(source, posixpath.join(partition, name))
        for name in old_files.keys() - set(summary["files"]):
            fs.delete_file(old_files[name])
        _write_json(fs, marker, summary)
    fs.delete_dir(staging)
    if not is_s3 and not _listing(fs, posixpath.dirname(staging)):
        fs.delete_dir(posixpath.dirname(staging))
