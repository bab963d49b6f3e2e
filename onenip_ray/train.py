"""Training through Ray Train: the per-worker loop and the ``TorchTrainer`` wiring.

Each worker decodes the training images once and caches the frozen backbone's features of the
clean images (queries and prompts never change); per step only the freshly synthesised anomalous
copies go through the backbone. Rank 0 finally builds the prompt pool, calibrates the thresholds
on the held-out normals and reports the bundle as the run's checkpoint; the driver commits it.
"""
from __future__ import annotations

import os
import time
from typing import Any

import numpy as np
import torch

from . import storage
from .bundle import commit_bundle, temp_bundle_dir, write_bundle
from .calibration import calibrate
from .config import ModelConfig, TrainConfig
from .data.synthesis import AnomalySynthesizer, TextureSource
from .model.build import build_backbone, build_onenip
from .predictor import Predictor
from .prompts import PromptPool
from .training_data import TrainingSet, build_training_set, parse_data_specs


def _config_from_dict(d: dict[str, Any]) -> TrainConfig:
    d = dict(d)
    model = ModelConfig.from_dict(d.pop("model"))
    return TrainConfig(model=model, **{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def _feature_cache(backbone, images: np.ndarray, mean: torch.Tensor, std: torch.Tensor, device, batch: int = 32) -> torch.Tensor:
    out = []
    for i in range(0, len(images), batch):
        out.append(backbone(_normalise(images[i : i + batch], mean, std, device)))
    return torch.cat(out)


def _normalise(images: np.ndarray, mean: torch.Tensor, std: torch.Tensor, device) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(images)).to(device).permute(0, 3, 1, 2).float() / 255.0
    return (x - mean) / std


def train_loop_per_worker(config_dict: dict[str, Any]) -> None:
    """Ray Train entry point (also runs in-process with ``num_workers=0``)."""
    import ray.train
    import ray.train.torch

    cfg = _config_from_dict(config_dict["train"])
    endpoint = config_dict.get("endpoint")
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    threads = config_dict.get("threads_per_worker")
    if threads:
        torch.set_num_threads(int(threads))
    torch.manual_seed(cfg.seed + rank)
    device = ray.train.torch.get_device() if world > 1 or cfg.use_gpu else torch.device("cpu")

    weights = storage.read_bytes(cfg.backbone_weights, endpoint) if cfg.backbone_weights else None
    backbone = build_backbone(cfg.model, weights).to(device)
    mean = torch.tensor(backbone.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(backbone.std, device=device).view(1, 3, 1, 1)

    t0 = time.perf_counter()
    data = build_training_set(
        parse_data_specs(cfg.dataset, cfg.data), list(cfg.classes), cfg.model.image_size,
        cfg.calibration_fraction, cfg.prompts_per_class, cfg.seed, endpoint,
    )
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    clean_features = _feature_cache(backbone, data.images, mean, std, device)
    cache_s = time.perf_counter() - t0

    textures = TextureSource.from_folder(cfg.textures, endpoint) if cfg.textures else TextureSource.procedural(cfg.seed)
    synthesizer = AnomalySynthesizer(cfg.model.image_size, textures)
    model = build_onenip(cfg.model, backbone.channels).to(device)
    if world > 1:
        model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": cfg.model.decoder == "v1"})
    core = model.module if hasattr(model, "module") else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.lr_step_epochs, gamma=cfg.lr_gamma)

    by_class = {c: data.train_index[data.labels[data.train_index] == c] for c in range(len(data.class_names))}
    history: list[dict[str, float]] = []
    train_start = time.perf_counter()
    for epoch in range(cfg.epochs):
        model.train()
        rng = np.random.default_rng([cfg.seed, epoch])
        order = rng.permutation(data.train_index)[rank::world]
        worker_rng = np.random.default_rng([cfg.seed, epoch, rank])
        sums = {"loss": 0.0, "mse": 0.0, "dice": 0.0}
        steps, t_epoch, synth_s = 0, time.perf_counter(), 0.0
        for start in range(0, len(order), cfg.batch_size):
            idx = order[start : start + cfg.batch_size]
            t_syn = time.perf_counter()
            pairs = [synthesizer(data.images[i], worker_rng) for i in idx]
            synth_s += time.perf_counter() - t_syn
            synthetic = backbone(_normalise(np.stack([p[0] for p in pairs]), mean, std, device))
            masks = torch.from_numpy(np.stack([p[1] for p in pairs])).to(device)
            prompt_idx = np.array([worker_rng.choice(by_class[data.labels[i]]) for i in idx])
            losses = model(clean_features[idx], synthetic, masks, clean_features[prompt_idx])
            optimizer.zero_grad(set_to_none=True)
            losses.total.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            sums["loss"] += float(losses.total.detach())
            sums["mse"] += float(losses.mse)
            sums["dice"] += float(losses.dice)
            steps += 1
        scheduler.step()
        seconds = time.perf_counter() - t_epoch
        metrics = {k: v / max(steps, 1) for k, v in sums.items()}
        metrics.update(epoch=epoch + 1, lr=optimizer.param_groups[0]["lr"], epoch_seconds=seconds,
                       samples_per_second=len(order) / max(seconds, 1e-9), synthesis_seconds=synth_s)
        history.append(metrics)
        last = epoch == cfg.epochs - 1
        if not last:
            ray.train.report(metrics)

    checkpoint = None
    if rank == 0:
        summary = {
            "epochs": cfg.epochs, "history": history, "workers": world,
            "train_seconds": time.perf_counter() - train_start, "image_load_seconds": load_s,
            "feature_cache_seconds": cache_s, "train_images": int(len(data.train_index)),
            "calibration_images": int(len(data.calibration_index)), "config": cfg.to_dict(),
        }
        checkpoint = _finish_bundle(cfg, backbone, core, data, clean_features, synthesizer, summary)
    ray.train.report(history[-1] if history else {"epoch": 0}, checkpoint=checkpoint)


def _finish_bundle(cfg: TrainConfig, backbone, model, data: TrainingSet, clean_features: torch.Tensor, synthesizer, summary: dict):
    import ray.train

    model.eval()
    pool = PromptPool(
        class_names=data.class_names,
        prompt_ids=data.ids(data.prompt_index),
        class_index=torch.from_numpy(data.labels[data.prompt_index]),
        features=clean_features[data.prompt_index].cpu(),
    )
    predictor = Predictor(backbone, model, pool, rec_scale=1.0, device=clean_features.device)
    calib_images = {data.class_names[c]: data.images[data.calibration_index[data.labels[data.calibration_index] == c]] for c in range(len(data.class_names))}
    calib_images = {c: imgs if len(imgs) else data.images[data.labels == data.class_names.index(c)][:1] for c, imgs in calib_images.items()}
    t0 = time.perf_counter()
    calibration = calibrate(predictor, calib_images, synthesizer, seed=cfg.seed, quantile=cfg.threshold_quantile)
    summary["calibration_seconds"] = time.perf_counter() - t0
    out = temp_bundle_dir()
    write_bundle(out, cfg.model, backbone.cpu(), model.cpu(), pool, calibration, summary)
    return ray.train.Checkpoint.from_directory(out)


def run_training(cfg: TrainConfig, endpoint: str | None = None, storage_path: str | None = None, run_name: str | None = None) -> dict[str, Any]:
    """Run a ``TorchTrainer`` (``num_workers=0`` = in-process) and commit the bundle to ``cfg.out``."""
    import json

    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    config_dict: dict[str, Any] = {"train": cfg.to_dict(), "endpoint": endpoint}
    if cfg.num_workers > 0 and not ray.is_initialized():
        ray.init(runtime_env={"env_vars": _forwarded_env()})
    if cfg.num_workers > 0 and not cfg.use_gpu:
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)) // cfg.num_workers)
        config_dict["threads_per_worker"] = cpus
        resources = {"CPU": cpus}
    else:
        resources = {"CPU": 1, "GPU": 1} if cfg.use_gpu else None
        config_dict["threads_per_worker"] = torch.get_num_threads()
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config_dict,
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(name=run_name, storage_path=storage_path or os.path.abspath("runs/ray")),
    )
    result = trainer.fit()
    if result.error:
        raise result.error
    with result.checkpoint.as_directory() as local:
        commit_bundle(local, cfg.out, endpoint)
        with open(os.path.join(local, "bundle.json")) as f:
            return json.load(f)


def _forwarded_env() -> dict[str, str]:
    keys = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_SESSION_TOKEN")
    return {k: os.environ[k] for k in keys if k in os.environ}
