"""Inference engines side by side on real images: PyTorch eager vs ONNX Runtime vs OpenVINO.

    python bench/runtimes.py --bundle runs/bottle [--export-dir runs/bottle-onnx] [--batches 1,32]

The same MVTec AD bottle test images (``../shared/data/mvtec_ad/bottle/test``), decoded and
normalised once, go through each engine at each batch size (model time only: ``Scorer.infer``,
the class retrieved); each engine's first pass over all images at the largest batch is its
warm-up and gives the parity figures; timing rounds interleave the engines and the best round
counts (a shared machine's load changes by the minute). The bundle is exported to ONNX (dynamic
batch) unless ``--export-dir`` names an existing export; OpenVINO runs that ONNX export. Prints
img/s and ms/img per engine and batch, the ratio to torch eager at the same batch, and the parity
figures against torch eager (max abs raw image-score diff, pooled map correlation). Engines use all
the machine's cores.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from onenip_ray.bundle import load_bundle
from onenip_ray.config import RUNTIMES
from onenip_ray.engines import TorchEngine, is_export, load_export, make_engine
from onenip_ray.export import correlation, export_bundle
from onenip_ray.scoring import ScoringSpec

BOTTLE_TEST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mvtec_ad" / "bottle" / "test"


def load_inputs(bundle, folder: Path, limit: int) -> tuple[np.ndarray, list[str]]:
    spec = ScoringSpec.from_bundle(bundle)
    paths = sorted(p for p in folder.rglob("*.png"))
    paths = [paths[int(i)] for i in np.linspace(0, len(paths) - 1, min(limit, len(paths))).round()]
    prepared = [spec.prepare(str(p), p.read_bytes()) for p in paths]
    return np.stack([p.input for p in prepared]), [str(p) for p in paths]


def timed(engine, inputs: np.ndarray, batch: int, images: int) -> float:
    """Seconds per image over ``images`` images (rounded up to whole batches), engine already warm."""
    done, start = 0, time.perf_counter()
    while done < images:
        for i in range(0, len(inputs) - batch + 1, batch):
            engine.infer(inputs[i : i + batch], np.full(batch, -1))
            done += batch
            if done >= images:
                break
    return (time.perf_counter() - start) / done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", required=True, help="model bundle (the torch eager baseline)")
    parser.add_argument("--export-dir", default=None,
                        help="existing ONNX export of the bundle (default: export to a temp dir)")
    parser.add_argument("--images", default=str(BOTTLE_TEST),
                        help="folder of real PNGs (default: MVTec AD bottle test)")
    parser.add_argument("--limit", type=int, default=32,
                        help="distinct images (spread over the folder; at least the largest batch)")
    parser.add_argument("--batches", default="1,32", help="comma-separated batch sizes")
    parser.add_argument("--runtimes", default=",".join(RUNTIMES), help="comma-separated engines to time")
    parser.add_argument("--min-images", type=int, default=16,
                        help="images timed per engine, batch and round (at least one batch)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved timing rounds; the best counts")
    parser.add_argument("--device", default="cpu",
                        help="cpu, or cuda: torch on the GPU, onnxruntime with TensorRT/CUDA providers, "
                        "openvino on an Intel GPU if it sees one")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    folder = Path(args.images)
    if not folder.is_dir():
        print(f"skipped: no images at {folder} (the MVTec AD bottle set lives in ../shared/data on dev machines)")
        return 0
    batches = [int(b) for b in args.batches.split(",")]
    runtimes = args.runtimes.split(",")
    bundle = load_bundle(args.bundle)
    inputs, _ = load_inputs(bundle, folder, max(args.limit, max(batches)))
    export_dir = args.export_dir
    tmp = None
    if export_dir is None or not is_export(export_dir):
        tmp = tempfile.TemporaryDirectory(prefix="onenip-bench-export-")
        export_dir = export_dir or os.path.join(tmp.name, "onnx")
        t0 = time.perf_counter()
        meta = export_bundle(args.bundle, "onnx", export_dir, images=str(folder), parity_images=16)
        print(f"exported to {export_dir} in {time.perf_counter() - t0:.0f} s; parity {json.dumps(meta['parity'])}",
              flush=True)
    exported = load_export(export_dir)
    engines = {}
    for runtime in runtimes:
        try:
            engines[runtime] = (
                TorchEngine(bundle, args.device) if runtime == "torch" else make_engine(exported, runtime, args.device)
            )
        except (ImportError, ValueError) as exc:  # e.g. no GPU provider / device for this runtime here
            print(f"{runtime}: skipped ({exc})", flush=True)
            continue
        print(f"{runtime}: {getattr(engines[runtime], 'providers', engines[runtime].device)}", flush=True)

    # The first pass (all images in one call; --limit = the largest batch by default) is each
    # engine's warm-up at that size and gives the parity figures against torch eager. Then
    # --rounds rounds, each timing every engine at every batch in turn (interleaved, so a change
    # in the machine's load hits all engines alike); the best round counts.
    parity, reference = {}, None
    for runtime, engine in engines.items():
        first = engine.infer(inputs, np.full(len(inputs), -1))
        engine.infer(inputs[:1], np.full(1, -1))  # and at batch 1
        if runtime == "torch":
            reference = first
        elif reference is not None:
            parity[runtime] = {"max_abs_score_diff": float(np.abs(first.scores - reference.scores).max()),
                               "map_correlation": correlation(reference.fused, first.fused)}
    best: dict[tuple[str, int], float] = {}
    for round_ in range(args.rounds):
        for batch in sorted(batches):
            for runtime, engine in engines.items():
                seconds = timed(engine, inputs, batch, max(batch, args.min_images))
                best[runtime, batch] = min(seconds, best.get((runtime, batch), float("inf")))
                print(f"round {round_ + 1} {runtime:12s} batch {batch:3d}: {1 / seconds:7.2f} img/s  "
                      f"{seconds * 1e3:8.1f} ms/img",
                      flush=True)
    rows = [{"runtime": r, "batch": b, "img_per_s": 1.0 / s, "ms_per_img": s * 1e3, "parity": parity.get(r)}
            for (r, b), s in best.items()]
    base = {r["batch"]: r["img_per_s"] for r in rows if r["runtime"] == "torch"}
    print("\n| runtime | batch | img/s | ms/img | × torch eager | max abs score diff | map correlation "
          "|\n|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = r["img_per_s"] / base[r["batch"]] if r["batch"] in base else float("nan")
        p = r["parity"] or {}
        print(f"| {r['runtime']} | {r['batch']} | {r['img_per_s']:.2f} | {r['ms_per_img']:.1f} | {ratio:.2f} | "
              f"{p.get('max_abs_score_diff', 0.0):.2g} | {p.get('map_correlation', 1.0):.6f} |")
    result = {"rounds": args.rounds, "device": args.device, "cores": os.cpu_count(),
              "torch_threads": torch.get_num_threads(), "images": len(inputs),
              "image_size": bundle.config.image_size, "memory_patches": int(bundle.pool.memory.shape[0]), "rows": rows}
    print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
