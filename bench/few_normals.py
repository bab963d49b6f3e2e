"""A class's nearest-neighbour map from a few normals: plain, with rotated copies, with density weights.

    python bench/few_normals.py [--class macaroni1] [--counts 8] [--memory 16000]

The nearest-neighbour map alone (the branch `onenip add-class` builds for a new class; the trained
OneNIP weights play no part in it), on the class's VisA test split, from the first n training
normals of ``split_csv/1cls.csv``, with three memories: the normals' patches only; plus their
rotated copies (``prompts.rotation_angles``, the default budget); plus ``prompts.density_weights``.
Each memory is a coreset of ``--memory`` patches (``prompts.subsample``), as the pool keeps it. Prints
image AUROC / pixel AUROC / pixel AP per count and memory as a Markdown table.
"""
from __future__ import annotations

import argparse
import csv
import os
import time
from pathlib import Path

import numpy as np
import torch

from onenip_ray.config import ModelConfig, TrainConfig
from onenip_ray.data.images import decode_for_size, decode_mask, resize_mask, rotate_image
from onenip_ray.data.layouts import read_dataset
from onenip_ray.metrics import image_auroc, pixel_ap, pixel_auroc
from onenip_ray.model.anomaly_map import gaussian_blur, image_scores, upsample
from onenip_ray.model.build import build_backbone
from onenip_ray.prompts import density_weights, neighbor_distances, patches, rotation_angles, subsample

VISA = Path(__file__).resolve().parents[2] / "shared" / "data" / "visa"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--class", dest="class_name", default="macaroni1", help="VisA class")
    parser.add_argument("--visa", default=str(VISA), help="VisA root with split_csv/1cls.csv")
    parser.add_argument("--counts", default="8", help="numbers of normals (comma-separated)")
    parser.add_argument("--memory", type=int, default=TrainConfig.memory_per_class, help="coreset size")
    args = parser.parse_args()
    config = ModelConfig()
    backbone = build_backbone(config).eval()
    size = config.image_size

    def load(uri: str) -> np.ndarray:
        with open(uri, "rb") as f:
            return decode_for_size(f.read(), size, uri)[0]

    def patch_features(images: list[np.ndarray]) -> torch.Tensor:
        with torch.inference_mode():
            inputs = [backbone.to_network_input(torch.from_numpy(np.stack(images[i : i + 8])))
                      for i in range(0, len(images), 8)]
            return torch.cat([backbone.with_patches(x, config.neighbor_stride, config.neighbor_coarse_weight)[1]
                              for x in inputs])

    with open(Path(args.visa) / "split_csv" / "1cls.csv") as f:
        normals = [os.path.join(args.visa, r["image"]) for r in csv.DictReader(f)
                   if r["object"] == args.class_name and r["split"] == "train"]
    test = [s for s in read_dataset("visa", args.visa, [args.class_name]) if s.split == "test"]
    labels = np.array([s.label for s in test])
    masks = np.stack([resize_mask(decode_mask(open(s.mask_uri, "rb").read(), s.mask_uri), size) > 0 if s.mask_uri
                      else np.zeros((size, size), bool) for s in test])
    test_features = patch_features([load(s.uri) for s in test])
    print(f"{args.class_name}: {len(test)} test images ({labels.sum()} defective), coreset {args.memory} patches\n")
    print("| normals | memory | image AUROC | pixel AUROC | pixel AP | seconds |")
    print("|---|---|---|---|---|---|")
    for count in [int(c) for c in args.counts.split(",")]:
        images = [load(uri) for uri in normals[:count]]
        angles = rotation_angles(count, TrainConfig.memory_rotation_images)
        own = patches(patch_features(images))
        copies = patches(patch_features([rotate_image(im, a) for a in angles for im in images])) if angles else own[:0]
        for name, bank, weighed in (("normals", own, False), (f"+ copies {angles}", torch.cat([own, copies]), False),
                                    ("+ copies + density weights", torch.cat([own, copies]), True)):
            start = time.perf_counter()
            memory = bank[subsample(bank, args.memory)]
            weight = density_weights(memory) if weighed else None
            nn = neighbor_distances(test_features, memory, torch.zeros(len(memory), dtype=torch.int64),
                                    torch.zeros(len(test), dtype=torch.int64), memory_weight=weight)
            maps = gaussian_blur(upsample(nn, size), config.map_sigma)
            scores = image_scores(maps, config.score_pool).numpy()
            print(f"| {count} | {name} | {image_auroc(labels, scores):.3f} | {pixel_auroc(masks, maps.numpy()):.3f} | "
                  f"{pixel_ap(masks, maps.numpy()):.3f} | {time.perf_counter() - start:.0f} |", flush=True)


if __name__ == "__main__":
    main()
