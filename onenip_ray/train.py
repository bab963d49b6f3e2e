"""Training through Ray Train: the per-worker loop and the ``TorchTrainer`` wiring.

Each worker decodes the training images once and caches the frozen backbone's features of the
clean images (queries, targets and prompts never change); per step only the freshly synthesised
anomalous copies go through the backbone. Synthesis runs in the DataLoader (``loader_workers``
processes when asked). Rank 0 checkpoints model, optimiser, scheduler, epoch, history and RNG state
every ``checkpoint_every`` epochs; a restarted worker group (``FailureConfig``) or a resubmitted
run (same ``--run-name``) continues from the latest one. At the end rank 0 builds the prompt pool,
calibrates the thresholds on its normals scored out of fold and reports the bundle with the last checkpoint;
the driver commits it.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from . import storage
from .bundle import commit_bundle, write_bundle
from .calibration import calibrate
from .config import ModelConfig, TrainConfig
from .data.layouts import read_datasets
from .data.synthesis import AnomalySynthesizer, HeldOutSynthesizer, TextureSource
from .enrolment import calibration_rows, enrol_class, neighbor_pool_summary, score_out_of_fold
from .errors import InputError
from .formats import BUNDLE_FILE
from .model.build import build_backbone, build_onenip
from .model.loss import training_losses
from .predictor import Predictor
from .training_data import TrainingSet, build_training_set, parse_data_roots

STATE_FILE = "state.pt"
BUNDLE_SUBDIR = "bundle"
CHECKPOINT_PREFIX = "onenip-ckpt-"  # the workers' local checkpoint folders (in the temp dir)


def _config_from_dict(d: dict[str, Any]) -> TrainConfig:
    d = dict(d)
    model = ModelConfig.from_dict(d.pop("model"))
    return TrainConfig(model=model, **{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


class SyntheticPairs(Dataset):
    """Item i of an epoch: (image index, synthetic image, its mask, prompt index). The random
    stream is keyed by (seed, epoch, rank, i), so results do not depend on the loader workers."""

    def __init__(self, data: TrainingSet, order: np.ndarray, synthesizer: AnomalySynthesizer,
                 by_class: dict[int, np.ndarray], key: tuple[int, ...]) -> None:
        self.data, self.order, self.synthesizer, self.by_class, self.key = data, order, synthesizer, by_class, key

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i: int):
        idx = int(self.order[i])
        rng = np.random.default_rng([*self.key, i])
        image, mask = self.synthesizer(self.data.images[idx], rng)
        prompt = int(rng.choice(self.by_class[int(self.data.class_ids[idx])]))
        return idx, torch.from_numpy(image), torch.from_numpy(mask), prompt


def epoch_order(data: TrainingSet, samples: int, balance: bool, rng: np.random.Generator) -> np.ndarray:
    """``samples`` training-image indices for one epoch, shuffled. ``balance``: every class gets the
    same share (its images cycled in fresh permutations), so a 40-image class is not drowned by a
    200-image one; otherwise the training images in permuted passes."""
    train = data.train_index
    groups = [train[data.class_ids[train] == c] for c in range(len(data.class_names))] if balance else [train]
    groups = [g for g in groups if len(g)]
    counts = np.full(len(groups), samples // len(groups))
    counts[rng.permutation(len(groups))[: samples - counts.sum()]] += 1
    parts = []
    for group, n in zip(groups, counts):
        cycles = [rng.permutation(group) for _ in range(-(-n // len(group)))]
        parts.append(np.concatenate(cycles)[:n] if cycles else group[:0])
    return rng.permutation(np.concatenate(parts))


def lr_factor(cfg: TrainConfig, total_steps: int):
    """The schedule as a multiplier of ``cfg.lr`` per optimiser step (see ``TrainConfig``)."""
    if cfg.lr_schedule == "step":
        drop = int(0.8 * total_steps)
        return lambda step: 0.1 if step >= drop else 1.0
    warmup = max(1, round(cfg.warmup_fraction * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return 0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


@dataclass
class Worker:
    """Where this training worker runs: its rank among ``world`` workers, device and precision."""

    rank: int
    world: int
    device: torch.device
    use_bf16: bool

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.use_bf16 else contextlib.nullcontext()

    def network_input(self, backbone, images: torch.Tensor) -> torch.Tensor:
        x = backbone.to_network_input(images)
        return x.contiguous(memory_format=torch.channels_last) if self.on_gpu else x


@dataclass
class Optimization:
    """The model being trained (``model``: DDP-wrapped with several workers, ``core``: the OneNIP
    itself), its optimiser and schedule, and where training (re)starts."""

    model: Any
    core: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    samples: int  # training samples per epoch over all workers
    start_epoch: int
    history: list[dict]


def _worker(cfg: TrainConfig, config_dict: dict[str, Any]) -> Worker:
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    world = ctx.get_world_size()
    if config_dict.get("threads_per_worker"):
        torch.set_num_threads(int(config_dict["threads_per_worker"]))
    device = ray.train.torch.get_device() if world > 1 or cfg.use_gpu else torch.device("cpu")
    use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    return Worker(ctx.get_world_rank(), world, device, use_bf16)


def _frozen_backbone(cfg: TrainConfig, worker: Worker, endpoint: str | None):
    weights = storage.read_bytes(cfg.backbone_weights, endpoint) if cfg.backbone_weights else None
    backbone = build_backbone(cfg.model, weights).to(worker.device)
    return backbone.to(memory_format=torch.channels_last) if worker.on_gpu else backbone


def feature_cache(backbone, images: np.ndarray, worker: Worker, batch: int = 32) -> torch.Tensor:
    """The frozen backbone's features of uint8 RGB ``images`` on ``worker``'s device and precision (float32)."""
    out = []
    for i in range(0, len(images), batch):
        with worker.autocast():
            out.append(backbone(worker.network_input(backbone, torch.from_numpy(images[i : i + batch]))).float())
    return torch.cat(out)


def _optimization(cfg: TrainConfig, worker: Worker, channels: int, clean_features: torch.Tensor,
                  data: TrainingSet) -> Optimization:
    """The model, optimiser and schedule, restored from the latest checkpoint if there is one."""
    import ray.train
    import ray.train.torch

    torch.manual_seed(cfg.seed)
    model = build_onenip(cfg.model, channels).to(worker.device)
    model.set_feature_statistics(clean_features[data.train_index])
    samples = (cfg.steps_per_epoch * cfg.batch_size * worker.world) if cfg.steps_per_epoch else len(data.train_index)
    steps_per_epoch = -(-len(range(worker.rank, samples, worker.world)) // cfg.batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg, cfg.epochs * steps_per_epoch))
    start_epoch, history = _restore(ray.train.get_checkpoint(), model, optimizer, scheduler)
    if start_epoch == 0:
        torch.manual_seed(cfg.seed * 1000 + worker.rank)
    elif worker.rank:  # the checkpoint holds rank 0's stream; other ranks fork from it deterministically
        torch.manual_seed(int(torch.randint(2**62, (1,))) + worker.rank)
    core = model
    if worker.world > 1:
        unused = cfg.model.decoder == "v1"  # the buggy v1 decoder leaves parameters out of the loss
        model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": unused})
    return Optimization(model, core, optimizer, scheduler, samples, start_epoch, history)


def train_loop_per_worker(config_dict: dict[str, Any]) -> None:
    """Ray Train entry point (also runs in-process with ``num_workers=0``)."""
    cfg = _config_from_dict(config_dict["train"])
    endpoint = config_dict.get("endpoint")
    worker = _worker(cfg, config_dict)
    backbone = _frozen_backbone(cfg, worker, endpoint)
    t0 = time.perf_counter()
    data = build_training_set(parse_data_roots(cfg.dataset, cfg.data), list(cfg.classes), cfg.model.image_size,
                              cfg.calibration_fraction, cfg.seed, endpoint)
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    clean_features = feature_cache(backbone, data.images, worker)
    cache_s = time.perf_counter() - t0
    textures = TextureSource.from_folder(cfg.textures, endpoint) if cfg.textures else TextureSource.procedural(cfg.seed)
    synthesizer = AnomalySynthesizer(cfg.model.image_size, textures)
    opt = _optimization(cfg, worker, backbone.channels, clean_features, data)
    by_class = {c: data.train_index[data.class_ids[data.train_index] == c] for c in range(len(data.class_names))}
    train_start = time.perf_counter()
    for epoch in range(opt.start_epoch, cfg.epochs):
        order = epoch_order(data, opt.samples, cfg.balance_classes, np.random.default_rng([cfg.seed, epoch]))
        order = order[worker.rank :: worker.world]
        pairs = SyntheticPairs(data, order, synthesizer, by_class, (cfg.seed, epoch, worker.rank))
        metrics = _train_epoch(cfg, worker, backbone, opt, clean_features, pairs, epoch)
        opt.history.append(metrics)
        if worker.rank == 0:
            print(f"epoch {epoch + 1}/{cfg.epochs}: loss {metrics['loss']:.4f} lr {metrics['lr']:.2e} "
                  f"{metrics['epoch_seconds']:.0f} s, {metrics['samples_per_second']:.2f} samples/s",
                  file=sys.stderr, flush=True)
        if epoch < cfg.epochs - 1:
            due = worker.rank == 0 and cfg.checkpoint_every > 0 and (epoch + 1) % cfg.checkpoint_every == 0
            _report_epoch(metrics, opt, epoch if due else None)
    summary = {
        "epochs": cfg.epochs, "history": opt.history, "workers": worker.world, "resumed_from_epoch": opt.start_epoch,
        "train_seconds": time.perf_counter() - train_start, "image_load_seconds": load_s,
        "feature_cache_seconds": cache_s, "train_images": int(len(data.train_index)),
        "calibration_images": int(len(data.calibration_index)), "precision": "bf16" if worker.use_bf16 else "fp32",
        "config": cfg.to_dict(),
    }
    _report_final(cfg, worker, opt, lambda out: _write_final_bundle(out, cfg, backbone, opt.core, data, summary))


def _train_epoch(cfg: TrainConfig, worker: Worker, backbone, opt: Optimization, clean_features: torch.Tensor,
                 pairs: SyntheticPairs, epoch: int) -> dict[str, float]:
    """One pass over ``pairs``; the epoch's mean losses, learning rate and throughput."""
    opt.model.train()
    loader = DataLoader(pairs, batch_size=cfg.batch_size, num_workers=cfg.loader_workers, pin_memory=worker.on_gpu)
    device = worker.device
    sums = {"loss": 0.0, "mse": 0.0, "dice": 0.0}
    steps, t_epoch, wait_s = 0, time.perf_counter(), 0.0
    t_wait = time.perf_counter()
    for idx, synthetic_images, masks, prompt_idx in loader:
        wait_s += time.perf_counter() - t_wait
        with worker.autocast():
            synthetic = backbone(worker.network_input(backbone, synthetic_images))
            losses = training_losses(opt.model, clean_features[idx.to(device)], synthetic.float(), masks.to(device),
                                     clean_features[prompt_idx.to(device)], cfg.refiner_loss)
        opt.optimizer.zero_grad(set_to_none=True)
        losses.total.backward()
        torch.nn.utils.clip_grad_norm_(opt.model.parameters(), cfg.grad_clip)
        opt.optimizer.step()
        opt.scheduler.step()
        sums["loss"] += float(losses.total.detach())
        sums["mse"] += float(losses.mse)
        sums["dice"] += float(losses.dice)
        steps += 1
        t_wait = time.perf_counter()
    seconds = time.perf_counter() - t_epoch
    metrics = {k: v / max(steps, 1) for k, v in sums.items()}
    metrics.update(epoch=epoch + 1, lr=opt.optimizer.param_groups[0]["lr"], epoch_seconds=seconds,
                   samples_per_second=len(pairs) / max(seconds, 1e-9), loader_wait_seconds=wait_s)
    return metrics


def _save_state(folder: str, opt: Optimization, epoch: int) -> None:
    state = {"model": opt.core.state_dict(), "optimizer": opt.optimizer.state_dict(),
             "scheduler": opt.scheduler.state_dict(),
             "epoch": epoch, "history": json.dumps(opt.history), "torch_rng": torch.get_rng_state()}
    torch.save(state, os.path.join(folder, STATE_FILE))


def _report_epoch(metrics: dict[str, float], opt: Optimization, checkpoint_epoch: int | None) -> None:
    """Every rank reports (a collective); rank 0 with a checkpoint when one is due (``checkpoint_epoch``).
    The report uploads synchronously, so the checkpoint's temporary folder goes right after it."""
    import ray.train

    if checkpoint_epoch is None:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory(prefix=CHECKPOINT_PREFIX) as folder:
        _save_state(folder, opt, checkpoint_epoch)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))


def _report_final(cfg: TrainConfig, worker: Worker, opt: Optimization, write_bundle_to) -> None:
    """The last report: rank 0's checkpoint holds the state and the finished bundle (``BUNDLE_SUBDIR``).
    Ray deletes its folder once uploaded; in-process runs (no upload) leave it to ``run_training``."""
    import ray.train

    checkpoint = None
    if worker.rank == 0:
        folder = tempfile.mkdtemp(prefix=CHECKPOINT_PREFIX)
        _save_state(folder, opt, cfg.epochs - 1)
        write_bundle_to(os.path.join(folder, BUNDLE_SUBDIR))
        checkpoint = ray.train.Checkpoint.from_directory(folder)
    metrics = opt.history[-1] if opt.history else {"epoch": cfg.epochs}
    ray.train.report(metrics, checkpoint=checkpoint, delete_local_checkpoint_after_upload=checkpoint is not None)


def _restore(checkpoint, model, optimizer, scheduler) -> tuple[int, list[dict]]:
    """Load the latest checkpoint (weights_only, never unpickled); returns (next epoch, history)."""
    if checkpoint is None:
        return 0, []
    with checkpoint.as_directory() as d:
        state = torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    return int(state["epoch"]) + 1, json.loads(state["history"])


def _write_final_bundle(out: str, cfg: TrainConfig, backbone, model, data: TrainingSet, summary: dict) -> None:
    """Enrol every class from all its normals (``enrolment.enrol_class``), score up to
    ``MAX_CALIBRATION_NORMALS`` of them out of fold (the held-out ones fresh) and calibrate."""
    model.eval()
    backbone, model = backbone.float().cpu().to(memory_format=torch.contiguous_format), model.cpu()
    rng = np.random.default_rng(cfg.seed)
    synthesizer = HeldOutSynthesizer(cfg.model.image_size)
    fresh = np.isin(np.arange(len(data.images)), data.calibration_index)
    enrolments, scored, pool, predictor = [], {}, None, None
    t0 = time.perf_counter()
    for c, name in enumerate(data.class_names):
        rows = np.flatnonzero(data.class_ids == c)

        def score(enrolment, rng, rows=rows):
            nonlocal predictor
            predictor = predictor or Predictor(backbone, model, enrolment.pool(), rec_scale=1.0)
            return score_out_of_fold(predictor, enrolment, data.images[rows], fresh[rows], synthesizer, rng,
                                     calibration_rows(fresh[rows], rng))

        enrolment, scored[name] = enrol_class(backbone, model.config, name, data.ids(rows), data.images[rows],
                                              cfg.prompts_per_class, cfg.memory_per_class,
                                              cfg.memory_rotation_images, cfg.seed + c, score, rng)
        enrolments.append(enrolment)
        pool = enrolment.pool(pool)
    predictor.set_pool(pool)
    calibration = calibrate(predictor, scored, target_fpr=cfg.target_fpr)
    summary["calibration_seconds"] = time.perf_counter() - t0
    summary["memory_rotations"] = {e.name: e.rotations for e in enrolments}
    summary["memory_density_weights"] = [e.name for e in enrolments if e.weighted]
    summary["neighbor_pool"] = {e.name: neighbor_pool_summary(e) for e in enrolments}
    write_bundle(out, cfg.model, backbone, model, pool, calibration, summary)


def default_run_name(out: str) -> str:
    base = re.sub(r"[^A-Za-z0-9_.-]+", "-", storage.canonical_uri(out).rstrip("/").rsplit("/", 1)[-1]) or "bundle"
    return f"onenip-{base}"


def run_training(cfg: TrainConfig, endpoint: str | None = None, storage_path: str | None = None,
                 run_name: str | None = None, resume: bool | str = False) -> dict[str, Any]:
    """Run a ``TorchTrainer`` (``num_workers=0`` = in-process) and commit the bundle to ``cfg.out``.

    Runs are named (default ``onenip-<out basename>``) under ``storage_path``; an existing run is
    continued only with ``resume=True``, otherwise it is an error (no silent restarts).
    ``resume="auto"`` continues the run if it has checkpoints and starts it otherwise: the mode
    for jobs that are retried as a whole (KubeRay ``backoffLimit``, resubmitted ``ray job``).
    """
    if resume not in (True, False, "auto"):
        raise InputError(f"resume must be True, False or 'auto', got {resume!r}")
    storage_path = storage.canonical_uri(storage_path or os.path.join("runs", "ray"))  # Ray needs absolute paths
    run_name = run_name or default_run_name(cfg.out)
    _check_run_state(storage_path, run_name, resume, endpoint)
    cfg = _absolute_paths(cfg)
    if cfg.num_workers > 0:
        # Dataset layout errors are deterministic: raise them here, before Ray starts, instead of in
        # a worker that FailureConfig would restart max_failures times (in-process runs raise at once).
        read_datasets(parse_data_roots(cfg.dataset, cfg.data), list(cfg.classes) or None, endpoint)
    try:
        result = _trainer(cfg, endpoint, storage_path, run_name).fit()
    except Exception as error:  # Ray wraps worker exceptions in WorkerGroupError
        cause = _worker_input_error(error)
        if cause is not None:
            raise cause from error
        raise
    if result.error:
        raise result.error
    try:
        with result.checkpoint.as_directory() as local:
            bundle_dir = os.path.join(local, BUNDLE_SUBDIR)
            commit_bundle(bundle_dir, cfg.out, endpoint)
            with open(os.path.join(bundle_dir, BUNDLE_FILE)) as f:
                return json.load(f)
    finally:
        if cfg.num_workers == 0:  # in-process: the checkpoint is the worker's own temporary folder, never uploaded
            shutil.rmtree(result.checkpoint.path, ignore_errors=True)


def _check_run_state(storage_path: str, run_name: str, resume: bool | str, endpoint: str | None) -> None:
    """A run that exists is continued only with ``resume``; ``resume=True`` needs one with checkpoints."""
    exists = storage.exists(storage.join(storage_path, run_name, "checkpoint_manager_snapshot.json"), endpoint)
    if exists and resume is False:
        raise InputError(f"run {run_name!r} already exists under {storage_path}: pass --resume to continue it, "
                         "or a new --run-name")
    if resume is True and not exists:
        raise InputError(f"--resume: no run {run_name!r} with checkpoints under {storage_path}")


def _trainer(cfg: TrainConfig, endpoint: str | None, storage_path: str, run_name: str):
    """The ``TorchTrainer``: workers, their resources and threads, and the run's storage."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    config_dict: dict[str, Any] = {"train": cfg.to_dict(), "endpoint": endpoint}
    if cfg.num_workers > 0 and not ray.is_initialized():
        ray.init(runtime_env={"env_vars": storage.ray_env_vars(endpoint)})
    if cfg.num_workers > 0 and not cfg.use_gpu:
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)) // cfg.num_workers)
        config_dict["threads_per_worker"] = cpus
        resources = {"CPU": cpus}
    else:
        resources = {"CPU": max(1, cfg.loader_workers), "GPU": 1} if cfg.use_gpu else None
        config_dict["threads_per_worker"] = None if cfg.use_gpu else torch.get_num_threads()
    fs_kwargs = {}
    if storage.is_s3(storage_path):
        fs, storage_path = storage.filesystem_for(storage_path, endpoint)
        fs_kwargs = {"storage_filesystem": fs}
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config_dict,
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(name=run_name, storage_path=storage_path,
                             failure_config=FailureConfig(max_failures=cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2), **fs_kwargs),
    )


def _worker_input_error(error: Exception) -> Exception | None:
    """The worker's own ValueError / FileNotFoundError (bad dataset, weights or config) inside Ray's
    WorkerGroupError, so callers (the CLI: message and exit 2) see it as in-process runs do."""
    failures = getattr(error, "worker_failures", None) or {}
    for rank in sorted(failures):
        if isinstance(failures[rank], (ValueError, FileNotFoundError)):
            return failures[rank]
    return None


def _absolute_paths(cfg: TrainConfig) -> TrainConfig:
    """Relative local paths resolved in the driver: Ray Train workers run in another directory."""
    def fix(uri: str | None) -> str | None:
        return uri if uri is None or storage.is_s3(uri) else storage.canonical_uri(uri)

    data = tuple(f"{kind}={fix(root)}" for kind, root in parse_data_roots(cfg.dataset, cfg.data))
    return replace(cfg, data=data, out=fix(cfg.out), textures=fix(cfg.textures),
                   backbone_weights=fix(cfg.backbone_weights))
