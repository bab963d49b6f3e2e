"""Typed configuration records shared by the model, training and scoring."""
from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .errors import InputError
from .formats import DATASET_KINDS

LEASE_SECONDS = 300.0  # default lifetime of an unrenewed nightly-run lease (renewed every third of it)
DECODERS = ("v2", "v1")  # post-fix official decoder; the pre-fix bug (paper numbers)
FUSIONS = ("calibrated", "official", "paper")
FEATURE_NORMS = ("none", "channel")
LR_SCHEDULES = ("cosine", "step")
REFINER_LOSSES = ("dice", "dice+bce")  # official; + per-pixel BCE (see model/loss.py)
PRECISIONS = ("auto", "fp32", "bf16")
NEIGHBOR_STRIDES = (8, 16)
LEGACY_NEIGHBOR_STRIDE = 16  # bundles written before ``neighbor_stride`` existed hold stride-16 patch memories
LEGACY_NEIGHBOR_COARSE_WEIGHT = 1.0  # bundles written before ``neighbor_coarse_weight`` weighed every stage alike
NEIGHBOR_POOL_CHOICES = ("auto", "1", "3")  # ``neighbor_pool``: per class from its own normals, or fixed
LEGACY_NEIGHBOR_POOL = "1"  # bundles written before ``neighbor_pool`` compared patches as they are
RUNTIMES = ("torch", "onnxruntime", "openvino")  # engines: a bundle in PyTorch, or an ``onenip export`` directory
RUNTIME_HELP = "engine: torch runs --bundle; onnxruntime / openvino run an `onenip export` directory given as --bundle"
GRAPH_FORMATS = ("onnx", "openvino")  # ``onenip export --format``
PARITY_IMAGES = 32  # real images an export is checked on against PyTorch
EVALUATE_BATCH_SIZE = 16  # images per model batch in ``onenip evaluate`` and the report's gallery
GALLERY_SIZE = 24  # images per gallery section of ``onenip report``
DRIFT_REFERENCES = "calibration,trailing"  # what ``onenip drift`` compares each night with


def flag(default: Any, help: str, choices: tuple[str, ...] | None = None) -> Any:
    """A field that is also a command-line flag: its default, its meaning (the flag's help), and
    for text fields the legal values (checked when the config is built)."""
    return field(default=default, metadata={"help": help, "choices": choices})


def _check_choices(config: Any) -> None:
    for f in fields(config):
        choices = f.metadata.get("choices")
        if choices and getattr(config, f.name) not in choices:
            raise InputError(f"{f.name} must be one of {', '.join(map(repr, choices))}, got "
                             f"{getattr(config, f.name)!r}")


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a OneNIP model (stored in ``bundle.json``)."""

    backbone: str = flag("tf_efficientnet_lite0", "timm backbone (lite0 ships offline; tf_efficientnet_b4 = paper)")
    out_indices: tuple[int, ...] = (0, 1, 2, 3)
    # 20×20 feature grid: small defects (VisA) need it; 224 = the paper's main table
    image_size: int = flag(320, "square network input size in pixels (multiple of 16)")
    hidden_dim: int = 256
    num_heads: int = 8
    num_encoder_layers: int = 4
    num_decoder_layers: int = 4
    dim_feedforward: int = 1024
    dropout: float = 0.1
    neighbor_mask: bool = True
    jitter_scale: float = flag(20.0, "feature jitter scale in training (official 20)")
    jitter_prob: float = 1.0
    decoder: str = flag("v2", "v2 = post-fix decoder; v1 = pre-fix bug (paper numbers)", DECODERS)
    refiner_dim: int = 128
    # Residual-branch output layers (attention out_proj, FFN/MLP last linear) start at this gain × the
    # official xavier init (1.0 = official). With 1.0 the post-norm stack collapses to an
    # input-independent output for thousands of steps; 0.1 trains in ~100 (docs/training.md).
    residual_init: float = flag(0.1, "gain on the xavier init of residual-branch outputs (1 = official; 0.1 trains in "
                                     "~100 steps)")
    # "channel": standardise each backbone channel
    feature_norm: str = field(default="none", metadata={"choices": FEATURE_NORMS})
    # "calibrated": α and β chosen on the calibration set (held-out normals + synthetic defects of
    # kinds training never synthesises, ``calibration.py``);
    # "official": α fixed, refiner rescaled to the S_rec range; "paper": Eq. 10 as written.
    fusion: str = flag("calibrated",
                       "map fusion: α chosen on calibration data, official α=0.5 rescaled, or paper Eq. 10", FUSIONS)
    alpha: float = flag(0.5, "refiner weight α for --fusion official/paper")
    map_sigma: float = flag(4.0, "Gaussian smoothing of the fused map in px (0 = official: none)")
    score_pool: int = 16  # image score = max of the k×k mean-pooled map
    # 8: the nearest-neighbour map compares patches of a grid twice as fine as OneNIP's (40 × 40 at
    # 320 px), for defects a few pixels wide (measured in docs/results.md)
    neighbor_stride: int = flag(8, "feature stride of the nearest-neighbour map's patches (8 or 16 = OneNIP's grid)")
    # 0.5: the stride-16 stage (112 of 192 channels) no longer outweighs the finer ones that see small
    # defects (measured in docs/results.md)
    neighbor_coarse_weight: float = flag(0.5, "weight of the coarsest backbone stage in the nearest-neighbour map's "
                                              "patches (1 = as the backbone gives it)")
    # 1: the patch alone. auto enrols each class both ways and keeps the one that separates its
    # out-of-fold normals from their synthetic defects better (``enrolment.enrol_class``), measured
    # in docs/results.md
    neighbor_pool: str = flag("1", "neighbourhood the nearest-neighbour map averages each patch over before "
                                   "comparing: 1 = the patch alone, 3 = 3 x 3, auto = per class from its own "
                                   "normals and their synthetic defects", NEIGHBOR_POOL_CHOICES)

    def __post_init__(self) -> None:
        if self.image_size % 16:
            raise InputError(f"image_size must be a multiple of 16 (the feature stride), got {self.image_size}")
        _check_choices(self)
        if self.map_sigma < 0:
            raise InputError(f"map_sigma must be >= 0, got {self.map_sigma}")
        if not 0.0 < self.residual_init <= 1.0:
            raise InputError(f"residual_init must be in (0, 1], got {self.residual_init}")
        if not 0.0 <= self.alpha <= 1.0:
            raise InputError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.neighbor_stride not in NEIGHBOR_STRIDES:
            raise InputError(f"neighbor_stride must be one of {NEIGHBOR_STRIDES}, got {self.neighbor_stride}")
        if not 0.0 < self.neighbor_coarse_weight <= 1.0:
            raise InputError(f"neighbor_coarse_weight must be in (0, 1], got {self.neighbor_coarse_weight}")
        object.__setattr__(self, "out_indices", tuple(int(i) for i in self.out_indices))

    @property
    def grid(self) -> int:
        """Side of the stride-16 feature grid."""
        return self.image_size // 16

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["out_indices"] = list(self.out_indices)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise InputError(f"unknown model config keys: {sorted(unknown)}")
        legacy = {"neighbor_stride": LEGACY_NEIGHBOR_STRIDE, "neighbor_coarse_weight": LEGACY_NEIGHBOR_COARSE_WEIGHT,
                  "neighbor_pool": LEGACY_NEIGHBOR_POOL}
        return cls(**{**legacy, **d})


@dataclass(frozen=True)
class TrainConfig:
    """A training run: data, optimisation (official recipe by default) and Ray scaling."""

    dataset: str = flag("mvtec", "layout of --data roots", DATASET_KINDS)
    data: tuple[str, ...] = ()
    out: str = "runs/bundle"
    classes: tuple[str, ...] = ()
    epochs: int = flag(3, "passes over the training images (official recipe: 1000)")
    batch_size: int = flag(4, "per-worker batch size")
    # official 1e-4 over 1000 epochs; 1e-3 trains in the few epochs a CPU affords
    lr: float = flag(1e-3, "AdamW peak learning rate (official 1e-4 over 1000 epochs)")
    weight_decay: float = 1e-4
    grad_clip: float = 0.1
    # "cosine": linear warm-up over warmup_fraction of the steps, then cosine to lr/100 at the last
    # step; "step": the official ×0.1 at 80 % of the epochs (800 of 1000). Both scale with --epochs.
    lr_schedule: str = flag("cosine", "cosine: warm-up then cosine to lr/100; step: official ×0.1 at 80%% of the "
                                      "epochs", LR_SCHEDULES)
    warmup_fraction: float = flag(0.05, "share of the steps spent warming up (cosine)")
    steps_per_epoch: int = flag(80, "optimiser steps per epoch (0 = training images / (batch × workers)); fixes a "
                                    "run's cost as data grows")
    balance_classes: bool = flag(True, "draw training images uniformly instead of every class equally often")
    seed: int = flag(133, "random seed (split, prompts, anomaly synthesis, initialisation)")
    textures: str | None = flag(None, "DTD-style texture folder (default: built-in procedural textures)")
    backbone_weights: str | None = flag(None, "backbone weights file or URI (safetensors or torch state dict)")
    num_workers: int = flag(1, "Ray Train workers (0 = in-process, no cluster)")
    use_gpu: bool = flag(False, "one GPU per Ray Train worker (NCCL); default CPU (gloo)")
    calibration_fraction: float = flag(0.1, "training normals OneNIP does not train on (at least 5, at most half a "
                                            "class): they weigh its branch in the fusion")
    target_fpr: float = flag(0.1, "false-positive rate the per-class thresholds aim at")
    prompts_per_class: int = flag(4, "prompt images per class, chosen to cover the class (k-center on retrieval "
                                     "descriptors)")
    memory_per_class: int = flag(16_000, "normal patches kept per class for the nearest-neighbour map (0 = all; "
                                         "above: a greedy coreset)")
    memory_rotation_images: int = flag(160, "a class with few normals also gets rotated copies of them (5° to "
                                           "10° apart, up to ±40°) in its patch memory, up to this many images in "
                                           "all, and density weights on its coreset (0 = neither)")
    refiner_loss: str = flag("dice", "refiner's training loss: dice (official) or dice+bce (adds per-pixel binary "
                                     "cross-entropy)", REFINER_LOSSES)
    checkpoint_every: int = flag(1, "checkpoint every N epochs (0 = only at the end)")
    max_failures: int = flag(2, "worker-group restarts from the latest checkpoint")
    loader_workers: int = flag(0, "DataLoader processes for anomaly synthesis per trainer")
    precision: str = flag("auto", "auto = bf16 autocast on GPU, fp32 on CPU", PRECISIONS)
    model: ModelConfig = field(default_factory=ModelConfig)

    def __post_init__(self) -> None:
        _check_choices(self)
        if self.steps_per_epoch < 0 or self.prompts_per_class < 1:
            raise InputError("steps_per_epoch must be >= 0 and prompts_per_class >= 1")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["model"] = self.model.to_dict()
        d["data"] = list(self.data)
        d["classes"] = list(self.classes)
        return d


@dataclass(frozen=True)
class BatchConfig:
    """One scoring run. ``actor_cpus=None``: 1 CPU per GPU actor; on CPU-only clusters at most
    half the cluster's CPUs shared by the actors, so read and post-processing tasks always run.
    ``actor_threads``: the engine's intra-op threads per actor (default: its whole CPUs, at least 1);
    more than ``actor_cpus`` lets the model use cores the CPU tasks leave idle. ``runtime``: the
    engine (``torch`` on a bundle; ``onnxruntime`` / ``openvino`` on an ``onenip export`` directory)."""

    bundle: str
    input: str
    output: str
    run_date: dt.date
    endpoint: str | None = None
    heatmaps: bool = flag(False, "write heat-map PNGs (and overlay JPEGs of anomalous images) under OUTPUT/_heatmaps/")
    batch_size: int = flag(32, "images per model batch")
    concurrency: int = flag(1, "inference actors (one per GPU with --use-gpu)")
    use_gpu: bool = flag(False, "run the inference actors on GPUs (one each)")
    actor_cpus: float | None = flag(None, "CPUs per inference actor (default: 1 with GPUs, else a share of half the "
                                          "cluster)")
    actor_threads: int | None = flag(None, "intra-op threads per inference actor (default: its --actor-cpus, at least "
                                           "1)")
    task_cpus: float = flag(1.0, "CPUs per decode / post-processing task")
    runtime: str = flag("torch", RUNTIME_HELP, RUNTIMES)
    max_pixels: int | None = None  # decoder's pixel limit (None = data.images.DEFAULT_MAX_PIXELS)
    rows_per_file: int = 100_000
    run_id: str | None = None
    max_error_fraction: float = flag(
        0.2, "reject the run (keep the committed night, exit 3) when a larger share of inputs are error rows")
    allow_empty: bool = flag(False, "commit an empty night instead of rejecting a run without inputs")
    chunk_size: int = flag(100_000, "inputs per listing chunk: the driver holds one chunk of keys at a time")
    lease_seconds: float = flag(LEASE_SECONDS,
                                "a run that stops renewing its lease for this long loses the date to the next run")


@dataclass(frozen=True)
class AlertRules:
    """When ``onenip drift`` raises an alert (exit code 3); every field can be set in a YAML file
    (``--alert-config``). A class's night needs ``min_rows`` rows (and its reference as many) before
    a rate or shift rule looks at it."""

    rate_factor: float = flag(2.0, "anomaly rate alert: the night's 95 % lower bound above this × the larger of the "
                                   "class's trailing median rate and its target FPR")
    rate_history: int = flag(2, "earlier committed nights of the class the rate rule needs")
    psi: float = flag(0.25, "shift alert: population stability index above this ...")
    ks_alpha: float = flag(0.01, "... and the two-sample Kolmogorov-Smirnov p-value below this")
    min_rows: int = flag(10, "rows a class's night (and its reference) needs for the rate and shift rules")
    unknown_share: float = flag(0.01, "unknown-product alert: share of a night's scored images routed to no class")
    error_rate: float = flag(0.05, "error alert: share of a night's rows that are error rows")
    trailing_nights: int = flag(7, "committed nights before a night that form its trailing reference")
