"""OneNIP's branch alone against training steps, and where a training step's time goes.

    python bench/learning_curve.py --data mvtec=../shared/data/mvtec_ad --data visa=../shared/data/visa \
        --steps 80,240,480,720 --json /tmp/curve.json

Trains OneNIP in-process exactly as ``onenip train`` does (the same training set, feature cache,
synthesis, class balance, loss, AdamW, grad clip and schedule; ``--epochs`` and ``--steps-per-epoch``
are replaced by the largest ``--steps``, over which the schedule runs) and, at each step count in
``--steps``, scores every test image of the classes with OneNIP's maps alone: S_rec, the refiner, and
both fused with the default α and the scale s = (max+min)/2 of S_rec on the held-out calibration
normals (what ``metrics.json → branches.onenip`` reports). Each test image is scored against its own
class's nearest prompt (the training's prompt count, chosen as the pool chooses them). Test features
are computed once (the backbone is frozen). The first ``--profile-steps`` steps are timed by phase
(synthesis, backbone on the synthetic copies, forward, backward, optimiser). ``--device cuda`` runs
it on a GPU with bf16 autocast as ``onenip train`` does there (``bench/gpu_check.sh`` calls it that
way). These are test-split figures: a curve to read, not a choice made on them.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch.utils.data import DataLoader

from onenip_ray.config import REFINER_LOSSES, ModelConfig, TrainConfig
from onenip_ray.data.layouts import read_datasets
from onenip_ray.data.synthesis import AnomalySynthesizer, TextureSource
from onenip_ray.evaluate import branch_metrics, sample_mask
from onenip_ray.model.anomaly_map import Maps, fuse
from onenip_ray.model.build import build_backbone, build_onenip
from onenip_ray.model.loss import training_losses
from onenip_ray.prompts import descriptors, retrieve, select_prompts
from onenip_ray.train import SyntheticPairs, Worker, epoch_order, feature_cache, lr_factor
from onenip_ray.training_data import TrainingSet, build_training_set, load_images, parse_data_roots

PHASES = ("synthesis", "backbone", "forward", "backward", "optimizer")


def features(backbone, images: np.ndarray, device: torch.device) -> torch.Tensor:
    """The training feature cache of ``images`` as ``onenip train`` computes it on ``device``."""
    return feature_cache(backbone, images, Worker(0, 1, device, use_bf16=device.type == "cuda"))


def test_set(cfg: TrainConfig, names: list[str], backbone, device: torch.device):
    """Test features, labels, masks and class indices of ``names``."""
    samples = [s for s in read_datasets(parse_data_roots(cfg.dataset, cfg.data), names) if s.split == "test"]
    size = cfg.model.image_size
    masks = np.stack([sample_mask(s, size) for s in samples])
    labels = np.array([int(bool(s.label)) for s in samples])
    classes = np.array([names.index(s.class_name) for s in samples])
    return features(backbone, load_images(samples, size), device), labels, masks, classes


@torch.inference_mode()
def onenip_maps(model, feats: torch.Tensor, tokens: torch.Tensor, index: torch.Tensor, batch: int = 16) -> Maps:
    parts = [model.maps(feats[i : i + batch], tokens[index[i : i + batch]]) for i in range(0, len(feats), batch)]
    return Maps(torch.cat([p.reconstruction for p in parts]), torch.cat([p.refiner for p in parts]))


def evaluate_branch(model, config: ModelConfig, prompts, calibration_feats, test) -> dict:
    """Per class and mean: image AUROC, pixel AUROC, pixel AP of S_rec, the refiner and their fusion."""
    model.eval()
    prompt_feats, prompt_class = prompts
    with torch.inference_mode():
        tokens = model.encode(prompt_feats)
    prompt_desc = descriptors(prompt_feats)

    def maps_of(feats, classes):
        index, _ = retrieve(descriptors(feats), prompt_desc, prompt_class, torch.from_numpy(classes).to(feats.device))
        return onenip_maps(model, feats, tokens, index)

    cal_feats, cal_classes = calibration_feats
    rec = maps_of(cal_feats, cal_classes).reconstruction
    scale = float(rec.max() + rec.min()) / 2
    feats, labels, masks, classes = test
    maps = maps_of(feats, classes)
    by_map = {"s_rec": maps.reconstruction, "refiner": maps.refiner, "onenip": fuse(maps, config, scale)}
    by_map = {name: m.float().cpu() for name, m in by_map.items()}
    out: dict[str, dict] = {}
    for c in np.unique(classes):
        rows = classes == c
        out[int(c)] = {name: branch_metrics(labels[rows], masks[rows], m[rows].numpy(), config.score_pool)
                       for name, m in by_map.items()}
    model.train()
    return out


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", action="append", required=True, help="KIND=ROOT as for onenip train")
    parser.add_argument("--classes", default="", help="comma-separated (default: every class in --data)")
    parser.add_argument("--steps", default="80,240,480,720", help="step counts to evaluate at (the schedule "
                                                                  "runs over the largest)")
    parser.add_argument("--image-size", type=int, default=ModelConfig.image_size)
    parser.add_argument("--lr", type=float, default=TrainConfig.lr)
    parser.add_argument("--lr-schedule", default=TrainConfig.lr_schedule, choices=("cosine", "step"))
    parser.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    parser.add_argument("--loader-workers", type=int, default=TrainConfig.loader_workers,
                        help="DataLoader processes for anomaly synthesis (as onenip train --loader-workers)")
    parser.add_argument("--refiner-loss", default=TrainConfig.refiner_loss, choices=REFINER_LOSSES)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (bf16 autocast on cuda, as onenip train)")
    parser.add_argument("--profile-steps", type=int, default=20)
    parser.add_argument("--json", default=None)
    return parser.parse_args()


@dataclass
class Setup:
    """The run's config and device, the frozen backbone, the training set and the cached features."""

    cfg: TrainConfig
    device: torch.device
    backbone: torch.nn.Module
    data: TrainingSet
    clean: torch.Tensor  # features of every training image
    prompts: tuple[torch.Tensor, torch.Tensor]  # features and class of each class's prompts
    calibration: tuple[torch.Tensor, np.ndarray]  # features and class of the held-out normals
    test: tuple


def prepare(args: argparse.Namespace, horizon: int) -> Setup:
    cfg = TrainConfig(data=tuple(args.data), classes=tuple(c for c in args.classes.split(",") if c),
                      model=replace(ModelConfig(), image_size=args.image_size), lr=args.lr,
                      lr_schedule=args.lr_schedule, batch_size=args.batch_size, loader_workers=args.loader_workers,
                      refiner_loss=args.refiner_loss)
    cfg = replace(cfg, epochs=-(-horizon // cfg.steps_per_epoch))
    device = torch.device(args.device)
    backbone = build_backbone(cfg.model, None).eval().to(device)
    data = build_training_set(parse_data_roots(cfg.dataset, cfg.data), list(cfg.classes), cfg.model.image_size,
                              cfg.calibration_fraction, cfg.seed)
    clean = features(backbone, data.images, device)
    chosen = []
    for c in range(len(data.class_names)):
        rows = data.train_index[data.class_ids[data.train_index] == c]
        chosen.extend(rows[select_prompts(descriptors(clean[rows]), cfg.prompts_per_class).numpy()])
    return Setup(cfg, device, backbone, data, clean,
                 (clean[chosen], torch.from_numpy(data.class_ids[chosen]).to(device)),
                 (clean[data.calibration_index], data.class_ids[data.calibration_index]),
                 test_set(cfg, data.class_names, backbone, device))


def batches(setup: Setup):
    """The training batches of ``onenip train`` (one worker), epoch after epoch."""
    cfg, data = setup.cfg, setup.data
    synthesizer = AnomalySynthesizer(cfg.model.image_size, TextureSource.procedural(cfg.seed))
    by_class = {c: data.train_index[data.class_ids[data.train_index] == c] for c in range(len(data.class_names))}
    for epoch in range(cfg.epochs):
        order = epoch_order(data, cfg.steps_per_epoch * cfg.batch_size, cfg.balance_classes,
                            np.random.default_rng([cfg.seed, epoch]))
        yield from DataLoader(SyntheticPairs(data, order, synthesizer, by_class, (cfg.seed, epoch, 0)),
                              batch_size=cfg.batch_size, num_workers=cfg.loader_workers)


def train_step(setup: Setup, model, optimizer, scheduler, batch, marks: list[float]):
    """One optimiser step as ``onenip train`` takes it; appends a time mark after each phase."""
    idx, synthetic_images, masks, prompt_idx = (t.to(setup.device) for t in batch)
    clean, device = setup.clean, setup.device
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        synthetic = setup.backbone(setup.backbone.to_network_input(synthetic_images)).float().detach()
        marks.append(sync(device))
        loss = training_losses(model, clean[idx], synthetic, masks, clean[prompt_idx], setup.cfg.refiner_loss)
        marks.append(sync(device))
    optimizer.zero_grad(set_to_none=True)
    loss.total.backward()
    marks.append(sync(device))
    torch.nn.utils.clip_grad_norm_(model.parameters(), setup.cfg.grad_clip)
    optimizer.step()
    scheduler.step()
    marks.append(sync(device))
    return loss


def main() -> None:
    args = arguments()
    steps = sorted(int(s) for s in args.steps.split(","))
    setup = prepare(args, steps[-1])
    cfg, names = setup.cfg, setup.data.class_names
    print(f"{len(names)} classes, {len(setup.data.train_index)} training images, {len(setup.test[1])} test images, "
          f"{args.image_size} px", file=sys.stderr, flush=True)
    torch.manual_seed(cfg.seed)
    model = build_onenip(cfg.model, setup.backbone.channels).to(setup.device)
    model.set_feature_statistics(setup.clean[setup.data.train_index])
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg, steps[-1]))
    torch.manual_seed(cfg.seed * 1000)

    def evaluated(step: int, seconds: float, loss) -> dict:
        return {"step": step, "seconds": seconds, "loss": loss,
                "classes": evaluate_branch(model, cfg.model, setup.prompts, setup.calibration, setup.test)}

    curve = [evaluated(0, 0.0, None)] if steps[0] == 0 else []
    phases, losses, train_s, step = dict.fromkeys(PHASES, 0.0), [], 0.0, 0
    model.train()
    t = time.perf_counter()
    for step, batch in enumerate(batches(setup), start=1):
        marks = [t, time.perf_counter()]
        loss = train_step(setup, model, optimizer, scheduler, batch, marks)
        train_s += marks[-1] - marks[0]
        if step <= args.profile_steps:
            for name, a, b in zip(PHASES, marks, marks[1:]):
                phases[name] += b - a
        losses.append((float(loss.total.detach()), float(loss.mse), float(loss.dice)))
        if step in steps:
            curve.append(evaluated(step, train_s, np.mean(losses[-40:], axis=0).tolist()))
            print(report_line(curve[-1], names), file=sys.stderr, flush=True)
            write_json(args.json, names, args, cfg, steps, phases, step, curve)
        if step == steps[-1]:
            break
        t = time.perf_counter()
    profile = write_json(args.json, names, args, cfg, steps, phases, step, curve)
    print("seconds per step by phase (first %d steps): %s" % (
        min(args.profile_steps, step), ", ".join(f"{k} {v:.3f}" for k, v in profile.items())))
    print(markdown(curve, names))


def sync(device: torch.device) -> float:
    """Wait for the device's queued work (CUDA); the time after."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def write_json(path: str | None, names: list[str], args, cfg: TrainConfig, steps: list[int], phases: dict,
               step: int, curve: list[dict]) -> dict:
    """The curve so far (written after every point, so an interrupted run keeps it); the profile."""
    profile = {k: v / max(1, min(args.profile_steps, step)) for k, v in phases.items()}
    if path:
        with open(path, "w") as f:
            json.dump({"classes": names, "image_size": args.image_size, "lr": cfg.lr, "lr_schedule": cfg.lr_schedule,
                       "batch_size": cfg.batch_size, "device": args.device, "horizon": steps[-1],
                       "profile_seconds_per_step": profile, "curve": curve}, f, indent=1)
    return profile


def report_line(point: dict, names: list[str]) -> str:
    scores = " ".join(f"{names[c]} {r['onenip']['image_auroc']:.3f}" for c, r in point["classes"].items())
    return f"step {point['step']} ({point['seconds']:.0f} s, loss {point['loss'][0]:.3f}): onenip image AUROC {scores}"


def markdown(curve: list[dict], names: list[str]) -> str:
    head = ("| step | train s | loss (mse, dice) | " + " | ".join(names)
            + " | mean (onenip) | mean S_rec | mean refiner |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for p in curve:
        per = [p["classes"][c] for c in sorted(p["classes"])]

        def mean(m: str, k: str) -> float:
            return float(np.mean([r[m][k] for r in per]))

        cells = [" / ".join(f"{r['onenip'][k]:.3f}" for k in ("image_auroc", "pixel_auroc", "pixel_ap")) for r in per]
        loss = "" if p["loss"] is None else f"{p['loss'][0]:.2f} ({p['loss'][1]:.2f}, {p['loss'][2]:.3f})"
        summary = [" / ".join(f"{mean(m, k):.3f}" for k in ("image_auroc", "pixel_auroc", "pixel_ap"))
                   for m in ("onenip", "s_rec", "refiner")]
        lines.append(f"| {p['step']} | {p['seconds']:.0f} | {loss} | " + " | ".join(cells + summary) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
