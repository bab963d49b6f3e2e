"""GPU check of the training/inference fast path: bf16 autocast numerics and throughput.

    python bench/gpu_check.py [--json OUT.json]          # on a GPU machine (called by gpu_check.sh)
    python bench/gpu_check.py --cpu --quick               # smoke run on CPU (tiny sizes)

Needs torch, timm, opencv, safetensors and this package on PYTHONPATH; no Ray, no network.

(i)   precision: bf16 autocast vs fp32 for the inference maps / image scores (the Predictor path)
      and for the training losses, on random images and on real images (MVTec AD bottle from
      ../shared/data when present, else the synthetic demo set of demo/data.py). On a GPU
      also GPU-fp32 vs CPU-fp32 (cuDNN convolutions use TF32 by default). Pass/fail against the
      tolerance of tests/test_train_scale.py (scores rtol 5e-2, per-image map correlation > 0.99,
      same retrieved prompts).
(ii)  training samples/s: one step = frozen backbone on the synthetic images + OneNIP training
      losses + backward + clip + AdamW (the clean/prompt features are cached, as in train.py),
      per batch size, fp32 vs bf16 autocast (channels_last backbone on GPU).
(iii) inference images/s: backbone + retrieval + maps + fusion + scores, per batch size.

The model is the real architecture with random OneNIP weights (the backbone has ImageNet weights
for lite0 when the efficientnet-lite0 package is installed); weights do not change the speed, and
the precision check compares the same weights in both precisions.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from onenip_ray.config import ModelConfig  # noqa: E402
from onenip_ray.model.anomaly_map import fuse, image_scores  # noqa: E402
from onenip_ray.model.backbone import FrozenBackbone, packaged_weights_path  # noqa: E402
from onenip_ray.model.build import build_backbone, build_onenip  # noqa: E402
from onenip_ray.model.loss import training_losses  # noqa: E402
from onenip_ray.prompts import descriptors, retrieve  # noqa: E402

BOTTLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "mvtec_ad" / "bottle"
SCORE_RTOL, MAP_MIN_CORRELATION = 5e-2, 0.99  # = tests/test_train_scale.py


# ------------------------------------------------------------------------------------------------
def real_images(size: int, n: int) -> tuple[str, np.ndarray]:
    """(source name, uint8 RGB (n, size, size, 3)): bottle test images if present, else demo images."""
    import cv2

    from onenip_ray.data.images import resize_image

    if BOTTLE.is_dir():
        everything = sorted((BOTTLE / "test").rglob("*.png"))  # good, broken_large, broken_small, contamination
        paths = everything[:: max(1, len(everything) // n)][:n]
        source = f"MVTec bottle ({len(paths)} test images)"
    else:
        from demo.data import write_demo_dataset

        root = write_demo_dataset(tempfile.mkdtemp(prefix="demo-"), size=max(128, size), train_per_class=2, test_good=2,
                                  test_per_defect=1)
        paths = sorted(Path(root).rglob("test/*/*.png"))[:n]
        source = f"synthetic demo set ({len(paths)} test images; ../shared absent)"
    imgs = [resize_image(cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB), size) for p in paths]
    return source, np.stack(imgs)


def random_images(size: int, n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


class Bench:
    def __init__(self, backbone_name: str, size: int, device: torch.device, weights: str | None = None) -> None:
        self.config = ModelConfig(backbone=backbone_name, image_size=size)
        self.device = device
        torch.manual_seed(0)
        try:
            data = Path(weights).read_bytes() if weights else None
            backbone = build_backbone(self.config, data, require_pretrained=False)
            self.pretrained = data is not None or packaged_weights_path(backbone_name) is not None
        except ImportError:  # the efficientnet-lite0 weights package is not installed: random weights
            backbone, self.pretrained = FrozenBackbone(self.config.backbone, self.config.out_indices), False
        self.backbone = backbone.to(device)
        self.model = build_onenip(self.config, backbone.channels).to(device).eval()
        self.channels_last = device.type == "cuda"
        if self.channels_last:
            self.backbone = self.backbone.to(memory_format=torch.channels_last)

    def autocast(self, precision: str):
        if precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def to_network_input(self, images) -> torch.Tensor:
        x = self.backbone.to_network_input(images if isinstance(images, torch.Tensor) else torch.from_numpy(images))
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    @torch.inference_mode()
    def encode_prompts(self, prompt_feats) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt tokens and descriptors, once and in fp32 (as ``Predictor`` caches them)."""
        return self.model.encode(prompt_feats), descriptors(prompt_feats)

    @torch.inference_mode()
    def predict(self, images, prompts, prompt_class, rec_scale: float, precision: str) -> dict:
        tokens, prompt_descriptors = prompts
        with self.autocast(precision):
            feats = self.backbone(self.to_network_input(images))
            idx = retrieve(descriptors(feats.float()), prompt_descriptors, prompt_class)[0]
            maps = self.model.maps(feats, tokens[idx])
            fused = fuse(maps, self.config, rec_scale)
            scores = image_scores(fused, self.config.score_pool)
        return {"fused": fused.float(), "reconstruction": maps.reconstruction.float(), "refiner": maps.refiner.float(),
                "scores": scores.float(), "prompt_index": idx}

    def losses(self, clean, synthetic_images, mask, prompt, precision: str) -> torch.Tensor:
        self.model.train()
        torch.manual_seed(1)
        with self.autocast(precision):
            synthetic = self.backbone(self.to_network_input(synthetic_images))
            out = training_losses(self.model, clean, synthetic.float(), mask, prompt)
        self.model.eval()
        return torch.stack([out.total.float().detach(), out.mse.float(), out.dice.float()])


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten().double().cpu(), b.flatten().double().cpu()
    a, b = a - a.mean(), b - b.mean()
    return float((a @ b) / (a.norm() * b.norm()).clamp_min(1e-30))


def compare(ref: dict, other: dict) -> dict:
    scores_rel = float(
        ((other["scores"].cpu() - ref["scores"].cpu()).abs() / ref["scores"].cpu().abs().clamp_min(1e-12)).max()
    )
    maps = ("fused", "reconstruction", "refiner")
    corr = {k: min(_corr(ref[k][i], other[k][i]) for i in range(len(ref[k]))) for k in maps}
    same = bool(torch.equal(ref["prompt_index"].cpu(), other["prompt_index"].cpu()))
    ok = scores_rel <= SCORE_RTOL and min(corr.values()) > MAP_MIN_CORRELATION and same
    return {"score_max_rel": scores_rel, "map_min_corr": corr, "same_prompts": same, "ok": ok}


def precision_check(bench: Bench, size: int, n: int, cpu_reference: Bench | None) -> list[dict]:
    source, real = real_images(size, n)
    # a two-class prompt pool: one real image and one noise image (retrieval is then unambiguous;
    # two prompts of one class could swap on a near-tie, which says nothing about precision)
    prompts_np = np.concatenate([real[:1], random_images(size, 1, seed=99)])
    with torch.inference_mode():
        prompt_feats = bench.backbone(bench.to_network_input(prompts_np)).float()
        rec = bench.model.maps(prompt_feats, bench.model.encode(prompt_feats)).reconstruction
    prompt_class = torch.tensor([0, 1], device=bench.device)
    rec_scale = float((rec.amax() + rec.amin()) / 2)
    rows = []
    for name, images in ((f"random uint8 ×{n}", random_images(size, n)), (source, real)):
        prompts = bench.encode_prompts(prompt_feats)
        fp32 = bench.predict(images, prompts, prompt_class, rec_scale, "fp32")
        bf16 = bench.predict(images, prompts, prompt_class, rec_scale, "bf16")
        rows.append({"inputs": name, "compare": "bf16 vs fp32 (" + bench.device.type + ")", **compare(fp32, bf16)})
        if cpu_reference is not None:
            cpu_prompts = cpu_reference.encode_prompts(prompt_feats.cpu())
            cpu = cpu_reference.predict(images, cpu_prompts, prompt_class.cpu(), rec_scale, "fp32")
            rows.append({"inputs": name, "compare": "gpu fp32 vs cpu fp32", **compare(cpu, fp32)})
    # training losses
    images = torch.from_numpy(real[:4])
    with torch.inference_mode():
        clean = bench.backbone(bench.to_network_input(images)).float()
    clean = clean.clone()
    mask = torch.zeros(len(images), size, size, device=bench.device)
    mask[:, size // 4 : size // 2, size // 4 : size // 2] = 1.0
    synthetic = images.flip(2)
    fp32 = bench.losses(clean, synthetic, mask, clean.roll(1, 0), "fp32")
    bf16 = bench.losses(clean, synthetic, mask, clean.roll(1, 0), "bf16")
    rel = ((bf16 - fp32).abs() / fp32.abs().clamp_min(1e-12)).cpu().tolist()
    rows.append({"inputs": source + " (training losses)", "compare": "bf16 vs fp32",
                 "loss_rel": dict(zip(("total", "mse", "dice"), rel)), "ok": max(rel) <= SCORE_RTOL})
    return rows


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device: torch.device, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / iters


def train_throughput(bench: Bench, size: int, batch: int, precision: str, warmup: int, iters: int) -> float:
    dev = bench.device
    images = torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8, device=dev)
    with torch.inference_mode(), bench.autocast(precision):
        clean = bench.backbone(bench.to_network_input(images)).float()
    clean, prompt = clean.clone(), clean.roll(1, 0).clone()
    mask = (torch.rand(batch, size, size, device=dev) > 0.9).float()
    model = bench.model
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-4)

    def step() -> None:
        with bench.autocast(precision):
            synthetic = bench.backbone(bench.to_network_input(images))
            losses = training_losses(model, clean, synthetic.float(), mask, prompt)
        optimizer.zero_grad(set_to_none=True)
        losses.total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        optimizer.step()

    try:
        seconds = _timed(step, dev, warmup, iters)
    finally:
        model.eval()
    return batch / seconds


def infer_throughput(bench: Bench, size: int, batch: int, precision: str, warmup: int, iters: int) -> float:
    dev = bench.device
    images = torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8, device=dev)
    with torch.inference_mode():
        prompts = bench.encode_prompts(bench.backbone(bench.to_network_input(images[:3])).float())
    prompt_class = torch.arange(3, device=dev)
    return batch / _timed(lambda: bench.predict(images, prompts, prompt_class, 1.0, precision), dev, warmup, iters)


def _rate(fn, *args) -> float | str:
    try:
        return fn(*args)
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return "OOM"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cpu", action="store_true", help="run on CPU even if a GPU is present")
    p.add_argument("--quick", action="store_true", help="tiny sizes / few iterations (smoke run)")
    p.add_argument("--image-size", type=int, default=None, help="default 224 (64 with --quick)")
    p.add_argument("--backbones", default=None, help="comma list (default lite0,b4 on GPU; lite0 with --quick)")
    p.add_argument("--train-batches", default=None, help="default 8,32,64 (2,4 with --quick)")
    p.add_argument("--infer-batches", default=None, help="default 1,16,64,128 (1,4 with --quick)")
    p.add_argument("--weights", action="append", default=[], metavar="BACKBONE=FILE",
                   help="ImageNet weights for a backbone (safetensors / torch state dict); lite0's ship with "
                        "the package")
    p.add_argument("--budget-s", type=float, default=420.0,
                   help="skip the remaining measurements after this many seconds")
    p.add_argument("--json", default=None, help="also write all results to this JSON file")
    args = p.parse_args(argv)

    start = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    quick = args.quick
    size = args.image_size or (64 if quick else 224)
    backbones = (
        args.backbones or ("tf_efficientnet_lite0" if quick else "tf_efficientnet_lite0,tf_efficientnet_b4")
    ).split(",")
    train_batches = [int(b) for b in (args.train_batches or ("2,4" if quick else "8,32,64")).split(",")]
    infer_batches = [int(b) for b in (args.infer_batches or ("1,4" if quick else "1,16,64,128")).split(",")]
    warmup, iters = (1, 2) if quick else (3, 10)
    weights = dict(w.split("=", 1) for w in args.weights)
    env = {"device": torch.cuda.get_device_name() if device.type == "cuda"
           else f"cpu ({torch.get_num_threads()} threads)",
           "torch": torch.__version__, "cuda": torch.version.cuda, "image_size": size,
           "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
           "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
           "bf16_supported": torch.cuda.is_bf16_supported() if device.type == "cuda" else True}
    print("== environment ==\n" + json.dumps(env, indent=1), flush=True)
    results: dict = {"environment": env, "precision": {}, "train": [], "infer": [], "skipped": []}

    for name in backbones:
        bench = Bench(name, size, device, weights.get(name))
        print(f"\n== (i) precision: {name} @ {size}px (pretrained backbone: {bench.pretrained}) ==", flush=True)
        if not bench.pretrained:
            # random backbone weights give tiny, uninformative features (mean |f| ~0.01 for b4 vs ~5
            # for ImageNet lite0): the maps are nearly flat, so their correlation measures bf16
            # rounding against almost no signal. Not the real model; measured 0.74 here.
            print(f"  skipped: no ImageNet weights for {name} (pass --weights {name}=FILE)", flush=True)
            results["skipped"].append(f"precision {name} (random backbone weights)")
        else:
            cpu_ref = None
            if device.type == "cuda":
                cpu_ref = Bench(name, size, torch.device("cpu"), weights.get(name))
                cpu_ref.backbone.load_state_dict(bench.backbone.state_dict())
                cpu_ref.model.load_state_dict(bench.model.state_dict())
            rows = precision_check(bench, size, 4 if quick else 16, cpu_ref)
            results["precision"][name] = rows
            for r in rows:
                detail = r.get("loss_rel") or {"score_max_rel": round(r["score_max_rel"], 5),
                                               "same_prompts": r["same_prompts"],
                                               "min_corr": {k: round(v, 5) for k, v in r["map_min_corr"].items()}}
                print(f"  {'PASS' if r['ok'] else 'FAIL'}  {r['compare']:<22} {r['inputs']:<52} {detail}", flush=True)
            del cpu_ref

        for title, kind, batches, measure in (("(ii) training samples/s", "train", train_batches, train_throughput),
                                              ("(iii) inference images/s", "infer", infer_batches, infer_throughput)):
            print(f"\n== {title}: {name} @ {size}px ==\n  {'batch':>6} {'fp32':>10} {'bf16':>10} {'bf16/fp32':>9}",
                  flush=True)
            for batch in batches:
                if time.perf_counter() - start > args.budget_s:
                    results["skipped"].append(f"{kind} {name} bs{batch}")
                    continue
                r = {p: _rate(measure, bench, size, batch, p, warmup, iters) for p in ("fp32", "bf16")}
                results[kind].append({"backbone": name, "batch": batch, **r})
                ratio = r["bf16"] / r["fp32"] if all(isinstance(v, float) for v in r.values()) else float("nan")
                print(f"  {batch:>6} {_fmt(r['fp32']):>10} {_fmt(r['bf16']):>10} {ratio:>9.2f}", flush=True)
        if device.type == "cuda":
            results.setdefault("peak_memory_gib", {})[name] = torch.cuda.max_memory_allocated() / 2**30
            torch.cuda.reset_peak_memory_stats()
        del bench

    results["seconds"] = time.perf_counter() - start
    checks = [r["ok"] for rows in results["precision"].values() for r in rows]
    ok = bool(checks) and all(checks)
    print(f"\nprecision checks: {'all PASS' if ok else 'FAILURES (see above)' if checks else 'NONE RAN'}; skipped: "
          f"{results['skipped'] or 'none'}; "
          f"{results['seconds']:.0f} s", flush=True)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0 if ok else 1


def _fmt(v) -> str:
    return v if isinstance(v, str) else f"{v:.1f}"


if __name__ == "__main__":
    sys.exit(main())
