"""Batch-scoring throughput on real images: plain loop vs the Ray Data pipeline vs the ideal.

    python bench/score_throughput.py --bundle runs/bundle [--limit 3000] [--batch-size 32]
    python bench/score_throughput.py --bundle runs/bundle-onnx --runtime onnxruntime   # an `onenip export` dir

The MVTec AD bottle images (``../shared/data/mvtec_ad/bottle``) are repeated (as symlinks with
distinct names) up to ``--limit`` inputs. Measured:

(a) one process, one loop: read → decode/resize/normalise → model → result rows (the engine uses all cores);
(b) ``run_batch_scoring`` (Ray Data: decode tasks, inference actors, post-processing, Parquet);
(c) the ideal: cores × the single-thread rate of decode + model measured alone.

Prints images/s of each and the ratios b/a and b/c.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from onenip_ray.batch import BatchConfig, run_batch_scoring
from onenip_ray.config import RUNTIMES
from onenip_ray.engines import load_model
from onenip_ray.inputs import list_inputs
from onenip_ray.scoring import Scorer

BOTTLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "mvtec_ad" / "bottle"


def make_inputs(source: Path, limit: int, folder: Path) -> list[Path]:
    """``limit`` symlinks to the source's PNGs, cycling through them."""
    images = sorted(source.rglob("*.png"))
    images = [p for p in images if "ground_truth" not in p.parts]
    links = []
    for i in range(limit):
        link = folder / f"{i:06d}_{images[i % len(images)].name}"
        link.symlink_to(images[i % len(images)])
        links.append(link)
    return links


def loop_rate(scorer: Scorer, paths: list[Path], batch_size: int) -> float:
    """Images/s of (a): the plain single-process loop."""
    start = time.perf_counter()
    for i in range(0, len(paths), batch_size):
        chunk = paths[i : i + batch_size]
        rows = scorer.score_bytes([(str(p), p.read_bytes(), None) for p in chunk])
        assert all(r["status"] == "ok" for r in rows), [r["error"] for r in rows if r["error"]]
    return len(paths) / (time.perf_counter() - start)


def single_thread_rate(scorer: Scorer, paths: list[Path], batch_size: int) -> float:
    """Images/s of decode + model on one thread (the per-core rate behind (c)); ``scorer``'s
    engine was made with one thread (torch: set here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        start = time.perf_counter()
        for i in range(0, len(paths), batch_size):
            prepared = [scorer.spec.prepare(str(p), p.read_bytes()) for p in paths[i : i + batch_size]]
            scorer.infer(np.stack([p.input for p in prepared]), np.full(len(prepared), -1))
        return len(paths) / (time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", required=True,
                        help="model bundle, or an `onenip export` dir for --runtime onnxruntime/openvino")
    parser.add_argument("--runtime", default="torch", choices=RUNTIMES,
                        help="inference engine (loop and pipeline alike)")
    parser.add_argument("--source", default=str(BOTTLE), help="folder of PNGs to repeat (default: MVTec AD bottle)")
    parser.add_argument("--limit", type=int, default=3000, help="number of inputs")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=None, help="inference actors (default: cores // 2)")
    parser.add_argument("--single-thread-images", type=int, default=64, help="images timed for the per-core rate")
    parser.add_argument("--threads", type=int, default=None,
                        help="engine threads of the plain loop (default: the runtime's, all cores)")
    parser.add_argument("--actor-cpus", type=float, default=None,
                        help="CPUs per inference actor (default: onenip score's)")
    parser.add_argument("--actor-threads", type=int, default=None,
                        help="intra-op threads per inference actor (default: onenip score's)")
    args = parser.parse_args(argv)
    source = Path(args.source)
    if not source.is_dir():
        print(f"skipped: no images at {source} (the MVTec AD bottle set lives in ../shared/data on dev machines)")
        return 0

    import ray

    cores = os.cpu_count() or 1
    concurrency = args.concurrency or max(1, cores // 2)
    with tempfile.TemporaryDirectory(prefix="onenip-bench-") as tmp:
        inputs = Path(tmp, "inputs")
        inputs.mkdir()
        paths = make_inputs(source, args.limit, inputs)
        assert len(list_inputs(str(inputs))) == len(paths)
        model = load_model(args.bundle, args.runtime)
        one_thread = Scorer(model, runtime=args.runtime, threads=1, batch_size=args.batch_size)
        one_thread.score_bytes([(str(paths[0]), paths[0].read_bytes(), None)])  # warm-up
        per_core = single_thread_rate(one_thread, paths[: args.single_thread_images], args.batch_size)
        del one_thread
        if args.threads:
            torch.set_num_threads(args.threads)
        scorer = Scorer(model, runtime=args.runtime, threads=args.threads, batch_size=args.batch_size)
        scorer.score_bytes([(str(paths[0]), paths[0].read_bytes(), None)])  # warm-up
        plain = loop_rate(scorer, paths, args.batch_size)

        # never another agent's cluster
        ray.init(address="local", num_cpus=cores, include_dashboard=False, configure_logging=False)
        summary = run_batch_scoring(BatchConfig(
            bundle=args.bundle, input=str(inputs), output=str(Path(tmp, "out")), run_date=dt.date.today(),
            batch_size=args.batch_size, concurrency=concurrency, runtime=args.runtime, actor_cpus=args.actor_cpus,
            actor_threads=args.actor_threads,
        ))
        ray.shutdown()
    assert summary["counts"]["ok"] == len(paths), summary["counts"]
    pipeline = summary["images_per_second"]
    ideal = cores * per_core
    result = {
        "runtime": args.runtime, "images": len(paths), "cores": cores, "concurrency": concurrency,
        "batch_size": args.batch_size, "image_size": scorer.spec.image_size,
        "plain_loop_threads": args.threads or ("all" if args.runtime != "torch" else torch.get_num_threads()),
        "a_plain_loop_ips": round(plain, 2), "b_ray_pipeline_ips": round(pipeline, 2),
        "c_ideal_ips": round(ideal, 2), "single_thread_ips": round(per_core, 2),
        "b_over_a": round(pipeline / plain, 3), "b_over_c": round(pipeline / ideal, 3),
        "pipeline_wall_seconds": summary["wall_seconds"],
    }
    print(f"(a) plain loop     {plain:8.1f} img/s\n(b) Ray pipeline   {pipeline:8.1f} img/s   b/a = "
          f"{result['b_over_a']:.2f}\n"
          f"(c) ideal {cores:2d}×1thr {ideal:8.1f} img/s   b/c = {result['b_over_c']:.2f}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
