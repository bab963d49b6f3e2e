"""A new class from a few good images: `onenip add-class` with 1, 8 and all training normals.

    python bench/add_class.py --bundle runs/bottle-capsules --counts 1,8,0 [--class macaroni1]

The class's training normals are taken in the order of VisA's ``split_csv/1cls.csv`` (the first n;
0 = all), written to a manifest, added with ``onenip_ray.add_class.add_class`` and evaluated on the
class's test split with ``onenip_ray.evaluate.evaluate``. Per count it prints the fused metrics,
the nearest-neighbour map alone on the same normals (``branches.neighbor``: the reference that
uses the same images), the deployed-threshold F1 and the unknown fraction, as a Markdown table.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import tempfile
import time
from pathlib import Path

from onenip_ray.add_class import add_class
from onenip_ray.evaluate import evaluate

VISA = Path(__file__).resolve().parents[2] / "shared" / "data" / "visa"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", required=True,
                        help="a bundle without the class (e.g. trained on bottle + capsules)")
    parser.add_argument("--class", dest="class_name", default="macaroni1", help="VisA class to add")
    parser.add_argument("--visa", default=str(VISA), help="VisA root with split_csv/1cls.csv")
    parser.add_argument("--counts", default="1,8,0", help="numbers of normals to add with (0 = all)")
    parser.add_argument("--out", default=None, help="work folder (default: a temporary one)")
    args = parser.parse_args()
    with open(Path(args.visa) / "split_csv" / "1cls.csv") as f:
        normals = [os.path.join(args.visa, r["image"]) for r in csv.DictReader(f)
                   if r["object"] == args.class_name and r["split"] == "train"]
    work = Path(args.out or tempfile.mkdtemp(prefix="bench-add-class-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for count in (int(c) for c in args.counts.split(",")):
        picked = normals[:count] if count else normals
        manifest = work / f"normals-{len(picked)}.csv"
        manifest.write_text("image_uri\n" + "\n".join(picked) + "\n")
        start = time.perf_counter()
        added = add_class(args.bundle, args.class_name, str(manifest), str(work / f"bundle-{len(picked)}"),
                          replace_class=True)
        add_seconds = time.perf_counter() - start
        report = evaluate(added["bundle"], [("visa", args.visa)], str(work / f"eval-{len(picked)}"),
                          classes=[args.class_name])
        m, nn = report["per_class"][args.class_name], report["branches"]["per_class"][args.class_name]["neighbor"]
        rows.append({"normals": len(picked), "add_seconds": round(add_seconds, 1), **{k: m[k] for k in (
            "image_auroc", "pixel_auroc", "pixel_ap", "image_f1_max", "threshold_f1", "threshold_recall",
            "threshold_fpr",
            "unknown_fraction")}, "nn_image_auroc": nn["image_auroc"], "nn_pixel_auroc": nn["pixel_auroc"],
            "nn_pixel_ap": nn["pixel_ap"], "routing_accuracy": report["routing_accuracy"]})
        print(json.dumps(rows[-1]), flush=True)
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in r.values()) + " |")


if __name__ == "__main__":
    main()
