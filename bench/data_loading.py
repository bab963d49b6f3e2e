"""Per-image costs behind the data-loading design of ``train.py``, measured on this machine.

    python bench/data_loading.py [--image-size 224] [--images 24] [--batch 8] [--gpu-train-rate IMG_PER_S]

One thread each (what a DataLoader worker or one trainer core gets):

* decode + resize of an MVTec bottle PNG (900×900 → S×S; the demo set if ../shared is absent);
* anomaly synthesis (``AnomalySynthesizer``: CutPaste / scar / Perlin texture paste) per image, with
  the built-in procedural textures and with a DTD-style folder (one JPEG decoded per Perlin sample);
* frozen backbone forward per image (batch ``--batch``);
* one training step per image: backbone on the synthetic images + OneNIP losses + backward + AdamW
  (clean and prompt features cached, as in ``train.py``).

``train.py`` decodes every training image once per worker and caches its clean features, so
decoding is a one-off cost; per step only synthesis runs on the CPU. The question is whether
synthesis can stay inline in the training process (``loader_workers=0``) or needs DataLoader worker
processes, and how many per GPU. ``--gpu-train-rate`` (images/s of one GPU's training step, e.g.
from bench/gpu_check.py) turns the answer into a worker count for GPUs.
"""
from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from onenip_ray.config import ModelConfig  # noqa: E402
from onenip_ray.data.images import decode_image, resize_image  # noqa: E402
from onenip_ray.data.synthesis import AnomalySynthesizer, TextureSource  # noqa: E402
from onenip_ray.model.build import build_backbone, build_onenip  # noqa: E402
from onenip_ray.model.loss import training_losses  # noqa: E402

BOTTLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "mvtec_ad" / "bottle"


def source_files(n: int) -> tuple[str, list[Path]]:
    if BOTTLE.is_dir():
        return "MVTec AD bottle train/good (900×900 PNG)", sorted((BOTTLE / "train" / "good").glob("*.png"))[:n]
    from demo.data import write_demo_dataset

    root = write_demo_dataset(tempfile.mkdtemp(prefix="demo-"), size=512, train_per_class=max(1, n // 3 + 1),
                              test_good=0, test_per_defect=0)
    return "synthetic demo set (512×512 PNG; ../shared absent)", sorted(Path(root).rglob("train/good/*.png"))[:n]


def texture_folder(count: int = 16, side: int = 512) -> str:
    """A DTD-like folder: ``count`` JPEG textures of side×side (DTD images are 300–640 px)."""
    import cv2

    from onenip_ray.data.synthesis import procedural_texture

    folder = tempfile.mkdtemp(prefix="textures-")
    rng = np.random.default_rng(0)
    for i in range(count):
        cv2.imwrite(f"{folder}/t{i:02d}.jpg", procedural_texture(rng, side)[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 90])
    return folder


def per_image_ms(fn, count: int, repeats: int = 3) -> float:
    """Best of ``repeats`` runs of ``fn()`` (which handles ``count`` images), in ms per image."""
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return 1000.0 * best / count


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--images", type=int, default=24, help="images per measurement")
    p.add_argument("--batch", type=int, default=8, help="per-worker batch size of the model measurements")
    p.add_argument("--backbone", default="tf_efficientnet_lite0")
    p.add_argument("--gpu-train-rate", type=float, default=None,
                   help="images/s of one GPU's training step (gpu_check.py)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    size, batch = args.image_size, args.batch

    source, files = source_files(args.images)
    blobs = [f.read_bytes() for f in files]
    decode_ms = per_image_ms(lambda: [resize_image(decode_image(b), size) for b in blobs], len(blobs))
    images = np.stack([resize_image(decode_image(b), size) for b in blobs])

    synthesizer = AnomalySynthesizer(size, TextureSource.procedural(0))
    n_synth = max(48, len(images))

    def synthesise() -> None:
        rng = np.random.default_rng(0)
        for i in range(n_synth):
            synthesizer(images[i % len(images)], rng)

    synth_ms = per_image_ms(synthesise, n_synth)
    folder_synthesizer = AnomalySynthesizer(size, TextureSource.from_folder(texture_folder()))

    def synthesise_folder() -> None:
        rng = np.random.default_rng(0)
        for i in range(n_synth):
            folder_synthesizer(images[i % len(images)], rng)

    folder_synth_ms = per_image_ms(synthesise_folder, n_synth)

    cfg = ModelConfig(backbone=args.backbone, image_size=size)
    backbone = build_backbone(cfg, require_pretrained=False)
    torch.manual_seed(0)
    model = build_onenip(cfg, backbone.channels)
    x = backbone.to_network_input(torch.from_numpy(images[:batch]))
    backbone_ms = per_image_ms(lambda: backbone(x), batch)

    with torch.no_grad():
        clean = backbone(x)
    prompt = clean.roll(1, 0)
    mask = torch.zeros(batch, size, size)
    mask[:, size // 4 : size // 2, size // 4 : size // 2] = 1.0
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()

    def step() -> None:
        synthetic = backbone(x.flip(-1))
        losses = training_losses(model, clean, synthetic, mask, prompt)
        optimizer.zero_grad(set_to_none=True)
        losses.total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        optimizer.step()

    step()  # warm-up (allocations, optimizer state)
    step_ms = per_image_ms(step, batch)

    share = synth_ms / (synth_ms + step_ms)
    worst = max(synth_ms, folder_synth_ms)
    print(f"source: {source}; {size}×{size}; backbone {args.backbone}; 1 thread; batch {batch}")
    print(f"{'per image':<52} {'ms':>8}")
    print(f"{'decode + resize (once per image, cached)':<52} {decode_ms:>8.2f}")
    print(f"{'anomaly synthesis, built-in textures (every image)':<52} {synth_ms:>8.2f}")
    print(f"{'anomaly synthesis, DTD-style folder (local JPEGs)':<52} {folder_synth_ms:>8.2f}")
    print(f"{'backbone forward':<52} {backbone_ms:>8.2f}")
    print(f"{'training step (backbone + losses + backward + AdamW)':<52} {step_ms:>8.2f}")
    print(f"\nsynthesis = {100 * synth_ms / step_ms:.2f} % (built-in textures) / "
          f"{100 * folder_synth_ms / step_ms:.2f} % "
          f"(texture folder) of a CPU training step; one core synthesises {1000 / synth_ms:.0f} / "
          f"{1000 / folder_synth_ms:.0f} images/s.")
    print("conclusion:")
    verdict = ("a DataLoader process would take a core away from the step for that: keep it inline" if share < 0.1 else
               "worth a DataLoader process (--loader-workers 1) if a core is free for it")
    print(f"  CPU workers: inline synthesis (loader_workers=0) is {100 * share:.1f} % of the step time; {verdict}.")
    if args.gpu_train_rate:
        cores = args.gpu_train_rate * worst / 1000.0
        print(f"  GPU at {args.gpu_train_rate:.0f} images/s: synthesis needs {cores:.1f} cores (worst case above) "
              f"→ --loader-workers {max(1, math.ceil(cores * 1.5))} per GPU worker (1.5× headroom; as many CPUs "
              "per worker).")
    else:
        print(f"  GPU workers: a GPU step at R images/s needs R × {worst / 1000:.4f} cores of synthesis (worst case "
              "above); "
              f"inline synthesis caps R at {1000 / worst:.0f} images/s and serialises with the GPU step, so use "
              "--loader-workers ⌈1.5 × R × that⌉ (R from bench/gpu_check.py); texture folders on S3 add one GET "
              "per Perlin sample.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
