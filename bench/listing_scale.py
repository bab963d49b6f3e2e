"""Driver memory and key throughput of nightly scoring at archive scale, with a model stub.

Two inputs go through ``run_batch_scoring`` (listing / manifest → chunks → Ray Data → staged Parquet
→ Arrow accounting → limits → journaled commit) with the read, model and row stages replaced by
vectorised stubs that return fixed rows — the model is not what is measured here:

* a manifest (Parquet) of ``--manifest-keys`` URIs (default 1,000,000);
* a local folder tree of ``--folder-files`` empty ``.png`` files (default 200,000), listed by the
  streaming walk.

Prints, per input: the listing stage alone (``iter_input_chunks``: keys/s), the accounting stage
alone (``accounting.account`` over the staged rows: keys/s), and the whole run: keys, wall seconds, keys/s,
the driver's peak RSS (``ru_maxrss`` of this process; Ray workers are separate processes) and the
time to the first committed row (the commit is one per night, so it is the time to the commit).
Targets on 2 cores: peak RSS < 1 GB for 1 M inputs, ≥ 20,000 keys/s.

    python bench/listing_scale.py --bundle runs/plant [--manifest-keys 1000000] [--folder-files 200000]
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from onenip_ray import accounting, batch, inputs  # noqa: E402
from onenip_ray.config import BatchConfig  # noqa: E402
from onenip_ray.schema import FILE_SCHEMA, STATUS_OK  # noqa: E402


def stub_prepare(table: pa.Table, spec, source) -> dict[str, np.ndarray]:
    """No read, no decode: the batch's URIs and input chunks only."""
    return {"image_uri": table.column("image_uri").to_numpy(zero_copy_only=False),
            batch.INPUT_CHUNK: table.column(batch.INPUT_CHUNK).to_numpy()}


class StubActor:
    """Stands in for the inference actor: no model, the batch passes through."""

    def __init__(self, **_: object) -> None:
        pass

    def __call__(self, batch_: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return batch_


def stub_finish(batch_: dict[str, np.ndarray], spec, run_id, run_date, heatmaps, source) -> pa.Table:
    """Fixed ok rows in the file schema, built column by column (no per-row Python)."""
    n = len(batch_["image_uri"])
    columns = {}
    for f in FILE_SCHEMA:
        if f.name == "image_uri":
            columns[f.name] = pa.array(batch_["image_uri"], pa.string())
        elif f.name == "status":
            columns[f.name] = pa.array([STATUS_OK] * n, pa.string())
        elif f.name in ("model_version", "run_id"):
            columns[f.name] = pa.array([spec.model_version if f.name == "model_version" else run_id] * n, pa.string())
        elif f.name == "scored_at":
            columns[f.name] = pa.array([dt.datetime.now(dt.timezone.utc)] * n, f.type)
        elif f.name == "is_anomalous":
            columns[f.name] = pa.array(np.zeros(n, bool))
        else:
            columns[f.name] = pa.nulls(n, f.type)
    return pa.table(columns, schema=FILE_SCHEMA).append_column(batch.INPUT_CHUNK, pa.array(batch_[batch.INPUT_CHUNK]))


BASELINE_RSS_MB = 0.0


def run(label: str, cfg: BatchConfig) -> dict:
    start = time.perf_counter()
    listed = sum(chunk.num_rows for chunk in inputs.iter_input_chunks(cfg.input, chunk_size=cfg.chunk_size))
    listing_s = time.perf_counter() - start
    accounted = []
    account = accounting.account

    def timed_account(*a, **k):  # the accounting stage, timed inside the real run
        t = time.perf_counter()
        account(*a, **k)
        accounted.append(time.perf_counter() - t)

    accounting.account = timed_account
    start = time.perf_counter()
    summary = batch.run_batch_scoring(cfg, actor_cls=StubActor)
    wall = time.perf_counter() - start
    accounting.account = account
    keys = summary["counts"]["total"]
    assert keys == listed
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    result = {"input": label, "keys": keys, "listing_keys_per_s": round(keys / listing_s),
              "accounting_keys_per_s": round(keys / sum(accounted)),
              "driver_rss_before_mb": round(BASELINE_RSS_MB), "wall_s": round(wall, 1),
              "keys_per_s": round(keys / wall),
              "driver_peak_rss_mb": round(rss_mb), "first_committed_row_s": round(wall, 1)}
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", required=True, help="any bundle (only its metadata is used)")
    parser.add_argument("--manifest-keys", type=int, default=1_000_000)
    parser.add_argument("--folder-files", type=int, default=200_000)
    parser.add_argument("--batch-size", type=int, default=BatchConfig.batch_size)
    parser.add_argument("--chunk-size", type=int, default=BatchConfig.chunk_size)
    args = parser.parse_args()
    batch.prepare_batch, batch.finish_batch = stub_prepare, stub_finish  # the model is not measured

    import ray
    import ray.data

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    global BASELINE_RSS_MB
    BASELINE_RSS_MB = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with tempfile.TemporaryDirectory(prefix="listing-scale-") as tmp:
        common = {"bundle": args.bundle, "run_date": dt.date(2026, 11, 27), "batch_size": args.batch_size,
                  "chunk_size": args.chunk_size, "actor_cpus": 0.5, "task_cpus": 0.5}
        results = []
        if args.manifest_keys:
            manifest = Path(tmp, "manifest.parquet")
            with pq.ParquetWriter(manifest, pa.schema([("image_uri", pa.string())])) as writer:  # 100k keys at a time
                for start in range(0, args.manifest_keys, 100_000):
                    keys = range(start, min(start + 100_000, args.manifest_keys))
                    writer.write_table(
                        pa.table({"image_uri": [f"s3://archive/line-{i % 7}/2026-11-27/img-{i:09d}.png" for i in keys]})
                    )
            results.append(run(f"manifest of {args.manifest_keys} URIs",
                               BatchConfig(input=str(manifest), output=str(Path(tmp, "out-manifest")), **common)))
        if args.folder_files:
            folder = Path(tmp, "tree")
            for i in range(args.folder_files):
                sub = folder / f"{i // 1000:04d}"
                if i % 1000 == 0:
                    sub.mkdir(parents=True)
                (sub / f"{i:07d}.png").touch()
            results.append(run(f"folder of {args.folder_files} .png files",
                               BatchConfig(input=str(folder), output=str(Path(tmp, "out-folder")), **common)))
    print("\n| input | listing keys/s | accounting keys/s | whole run: wall s | keys/s | driver peak RSS MB (before: "
          "imports + Ray) "
          "| first committed row s |\n|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['input']} | {r['listing_keys_per_s']} | {r['accounting_keys_per_s']} | {r['wall_s']} | "
              f"{r['keys_per_s']} "
              f"| {r['driver_peak_rss_mb']} ({r['driver_rss_before_mb']}) | {r['first_committed_row_s']} |")


if __name__ == "__main__":
    main()
