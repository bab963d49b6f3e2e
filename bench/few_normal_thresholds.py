"""The false-positive rate a new class's threshold achieves on fresh real normals, over random draws.

    python bench/few_normal_thresholds.py --bundle runs/bottle-capsules --class macaroni1 --counts 5,8,20 --draws 6

Per draw: n of the class's VisA training normals (``split_csv/1cls.csv``) at random, added with
``onenip_ray.add_class.add_class`` (the user path; ``--replace`` where the class is in the bundle),
then every other training normal of the class scored by the new bundle (``Scorer``, in process): none
of them calibrated it and none is a test image, so the share above the threshold is the
false-positive rate on fresh normals. Beside the deployed rule, the rates other rules would give
from the same calibration scores (the bundle keeps them): ``largest`` (the largest calibration
score: a fresh normal exceeds it with probability 1 / (n + 1), whatever the distribution) and
``t-bound`` (the Student-t bound of the log scores whatever n). Prints one JSON line per draw, then
per count and rule the mean rate and the share of draws inside the reported ``fpr_interval``.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from onenip_ray.add_class import add_class
from onenip_ray.bundle import load_bundle
from onenip_ray.calibration import fpr_interval, log_bound
from onenip_ray.scoring import Scorer

VISA = Path(__file__).resolve().parents[2] / "shared" / "data" / "visa"


def rules(scores: np.ndarray, deployed: float, target: float) -> dict[str, float]:
    """The thresholds each rule takes from one class's calibration scores."""
    return {"deployed": deployed, "largest": float(scores.max()), "t-bound": log_bound(scores, target)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", required=True, help="the bundle the class is added to")
    parser.add_argument("--class", dest="class_name", default="macaroni1", help="VisA class")
    parser.add_argument("--visa", default=str(VISA), help="VisA root with split_csv/1cls.csv")
    parser.add_argument("--counts", default="8", help="numbers of normals to add with (comma-separated)")
    parser.add_argument("--draws", type=int, default=6, help="random draws of normals per count")
    parser.add_argument("--seed", type=int, default=0, help="seed of the draws")
    args = parser.parse_args()
    with open(Path(args.visa) / "split_csv" / "1cls.csv") as f:
        normals = [os.path.join(args.visa, r["image"]) for r in csv.DictReader(f)
                   if r["object"] == args.class_name and r["split"] == "train"]
    data = {uri: Path(uri).read_bytes() for uri in normals}
    replace_class = args.class_name in load_bundle(args.bundle).pool.class_names
    rng, work = np.random.default_rng(args.seed), Path(tempfile.mkdtemp(prefix="bench-thresholds-"))
    summary: dict[int, list[dict[str, float]]] = {}
    try:
        for count in (int(c) for c in args.counts.split(",")):
            for draw in range(args.draws):
                picked = set(rng.choice(len(normals), count, replace=False).tolist())
                manifest = work / "normals.csv"
                manifest.write_text("image_uri\n" + "\n".join(normals[i] for i in sorted(picked)) + "\n")
                out = work / f"bundle-{count}-{draw}"
                add_class(args.bundle, args.class_name, str(manifest), str(out), replace_class=replace_class)
                calibration = load_bundle(str(out)).calibration
                cal, target = calibration.per_class[args.class_name], calibration.target_of(args.class_name)
                fresh = [(u, data[u], args.class_name) for i, u in enumerate(normals) if i not in picked]
                raw = np.array([r["score_raw"] for r in Scorer.from_uri(str(out)).score_bytes(fresh)])
                thresholds = rules(np.array(cal.normal_scores), cal.threshold_raw, target)
                rates = {name: float(np.mean(raw > t)) for name, t in thresholds.items()}
                summary.setdefault(count, []).append(rates)
                print(json.dumps({"normals": count, "draw": draw, "fresh": len(fresh), "rates": rates,
                                  "calibration_log_sd": float(np.log(cal.normal_scores).std(ddof=1)),
                                  "fresh_log_sd": float(np.log(raw).std(ddof=1))}), flush=True)
                shutil.rmtree(out)
    finally:
        shutil.rmtree(work)
    print(f"\n| normals | rule | mean FPR (target {target}) | draws inside fpr_interval |\n|---|---|---|---|")
    for count, draws in summary.items():
        low, high = fpr_interval(count, target)
        for name in draws[0]:
            rates = np.array([d[name] for d in draws])
            print(f"| {count} | {name} | {rates.mean():.3f} | {np.mean((rates >= low) & (rates <= high)):.2f} "
                  f"({low:.3f}–{high:.3f}) |")


if __name__ == "__main__":
    main()
