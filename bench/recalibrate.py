"""A trained bundle's weights re-enrolled and re-calibrated with this checkout's code.

    python bench/recalibrate.py --bundle runs/plant --out runs/plant-recalibrated

Runs the last step of ``onenip train`` (``train._write_final_bundle``: enrol every class from all
its training normals, score them out of fold, choose the fusion and thresholds) on the bundle's
own weights, training set and seed (from its ``bundle.json``), without training again. Training
is deterministic on CPU, so this writes what ``onenip train`` with the bundle's flags writes at
this commit, in minutes instead of half an hour; a check of a calibration change, not a recipe
(a bundle trained by an older commit keeps that commit's weights).
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

from onenip_ray.bundle import load_bundle
from onenip_ray.config import NEIGHBOR_POOL_CHOICES
from onenip_ray.train import _config_from_dict, _write_final_bundle
from onenip_ray.training_data import build_training_set, parse_data_roots


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", required=True, help="a bundle written by onenip train")
    parser.add_argument("--out", required=True, help="the new bundle folder")
    parser.add_argument("--neighbor-pool", choices=NEIGHBOR_POOL_CHOICES, default=None,
                        help="enrol with this --neighbor-pool instead of the bundle's (it does not change training)")
    args = parser.parse_args()
    bundle = load_bundle(args.bundle)
    summary = dict(bundle.meta["training"])
    cfg = _config_from_dict(summary["config"])
    if args.neighbor_pool:
        cfg = replace(cfg, model=replace(cfg.model, neighbor_pool=args.neighbor_pool))
        bundle.model.config = cfg.model
        summary["config"] = cfg.to_dict()
    data = build_training_set(parse_data_roots(cfg.dataset, cfg.data), list(cfg.classes), cfg.model.image_size,
                              cfg.calibration_fraction, cfg.seed)
    summary["recalibrated_from"] = bundle.version
    t0 = time.perf_counter()
    _write_final_bundle(args.out, cfg, bundle.backbone, bundle.model, data, summary)
    meta = json.loads((Path(args.out) / "bundle.json").read_text())
    cal = meta["calibration"]
    print(json.dumps({"version": meta["version"], "from_version": bundle.version, "seconds": time.perf_counter() - t0,
                      "alpha": cal["alpha"], "neighbor_weight": cal["neighbor_weight"],
                      "branch_separation": cal.get("branch_separation")}, indent=1))


if __name__ == "__main__":
    main()
