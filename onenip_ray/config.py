"""Typed configuration records shared by the model, training and scoring."""
from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass, field, fields
from typing import Any

LEASE_SECONDS = 300.0  # default lifetime of an unrenewed nightly-run lease (renewed every third of it)
DECODERS = ("v2", "v1")  # post-fix official decoder; the pre-fix bug (paper numbers)
FUSIONS = ("calibrated", "official", "paper")
FEATURE_NORMS = ("none", "channel")
LR_SCHEDULES = ("cosine", "step")
PRECISIONS = ("auto", "fp32", "bf16")
RUNTIMES = ("torch", "onnxruntime", "openvino")  # engines: a bundle in PyTorch, or an ``onenip export`` directory
GRAPH_FORMATS = ("onnx", "openvino")  # ``onenip export --format``
PARITY_IMAGES = 32  # real images an export is checked on against PyTorch
EVALUATE_BATCH_SIZE = 16  # images per model batch in ``onenip evaluate``
GALLERY_SIZE = 24  # images per gallery section of ``onenip report``


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a OneNIP model (stored in ``bundle.json``)."""

    backbone: str = "tf_efficientnet_lite0"
    out_indices: tuple[int, ...] = (0, 1, 2, 3)
    image_size: int = 320  # 20×20 feature grid: small defects (VisA) need it; 224 = the paper's main table
    hidden_dim: int = 256
    num_heads: int = 8
    num_encoder_layers: int = 4
    num_decoder_layers: int = 4
    dim_feedforward: int = 1024
    dropout: float = 0.1
    neighbor_mask: bool = True
    jitter_scale: float = 20.0
    jitter_prob: float = 1.0
    decoder: str = "v2"  # "v2" = post-fix official decoder; "v1" = the pre-fix bug (paper numbers)
    refiner_dim: int = 128
    # Residual-branch output layers (attention out_proj, FFN/MLP last linear) start at this gain × the
    # official xavier init (1.0 = official). With 1.0 the post-norm stack collapses to an
    # input-independent output for thousands of steps; 0.1 trains in ~100 (docs/training.md).
    residual_init: float = 0.1
    feature_norm: str = "none"  # "none" (official) or "channel": standardise each backbone channel
    # "calibrated": α chosen on the calibration set (held-out normals + synthetic anomalies);
    # "official": α fixed, refiner rescaled to the S_rec range; "paper": Eq. 10 as written.
    fusion: str = "calibrated"
    alpha: float = 0.5
    map_sigma: float = 4.0  # Gaussian smoothing of the fused map in pixels (0 = none, as the official code)
    score_pool: int = 16  # image score = max of the k×k mean-pooled map

    def __post_init__(self) -> None:
        if self.image_size % 16:
            raise ValueError(f"image_size must be a multiple of 16 (the feature stride), got {self.image_size}")
        _check_choice("decoder", self.decoder, DECODERS)
        _check_choice("fusion", self.fusion, FUSIONS)
        if self.map_sigma < 0:
            raise ValueError(f"map_sigma must be >= 0, got {self.map_sigma}")
        _check_choice("feature_norm", self.feature_norm, FEATURE_NORMS)
        if not 0.0 < self.residual_init <= 1.0:
            raise ValueError(f"residual_init must be in (0, 1], got {self.residual_init}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
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
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        return cls(**d)


@dataclass(frozen=True)
class TrainConfig:
    """A training run: data, optimisation (official recipe by default) and Ray scaling."""

    dataset: str = "mvtec"
    data: tuple[str, ...] = ()
    out: str = "runs/bundle"
    classes: tuple[str, ...] = ()
    epochs: int = 3
    batch_size: int = 4
    lr: float = 1e-3  # official 1e-4 over 1000 epochs; 1e-3 trains in the few epochs a CPU affords
    weight_decay: float = 1e-4
    grad_clip: float = 0.1
    # "cosine": linear warm-up over warmup_fraction of the steps, then cosine to lr/100 at the last
    # step; "step": the official ×0.1 at 80 % of the epochs (800 of 1000). Both scale with --epochs.
    lr_schedule: str = "cosine"
    warmup_fraction: float = 0.05
    steps_per_epoch: int = 80  # 0 = training images / (batch × workers); fixed > 0 keeps a run's cost fixed
    balance_classes: bool = True  # every class drawn equally often per epoch, whatever its image count
    seed: int = 133
    textures: str | None = None
    backbone_weights: str | None = None
    num_workers: int = 1
    use_gpu: bool = False
    calibration_fraction: float = 0.1
    target_fpr: float = 0.05
    prompts_per_class: int = 4
    memory_per_class: int = 100_000  # normal patches kept per class for the nearest-neighbour map (0 = all)
    checkpoint_every: int = 1
    max_failures: int = 2  # worker-group restarts from the latest checkpoint
    loader_workers: int = 0
    precision: str = "auto"  # "auto" = bf16 autocast on GPU, fp32 on CPU; or "fp32" / "bf16"
    model: ModelConfig = field(default_factory=ModelConfig)

    def __post_init__(self) -> None:
        _check_choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        _check_choice("precision", self.precision, PRECISIONS)
        if self.steps_per_epoch < 0 or self.prompts_per_class < 1:
            raise ValueError("steps_per_epoch must be >= 0 and prompts_per_class >= 1")

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
    heatmaps: bool = False
    batch_size: int = 32
    concurrency: int = 1
    use_gpu: bool = False
    actor_cpus: float | None = None
    actor_threads: int | None = None
    task_cpus: float = 1.0
    runtime: str = "torch"
    max_pixels: int | None = None  # decoder's pixel limit (None = data.images.DEFAULT_MAX_PIXELS)
    rows_per_file: int = 100_000
    run_id: str | None = None
    max_error_fraction: float = 0.2  # above it the run is rejected (the committed night stays)
    allow_empty: bool = False  # commit an empty night instead of rejecting it
    chunk_size: int = 100_000  # inputs per pipeline pass: bounds the driver's memory
    lease_seconds: float = LEASE_SECONDS  # a lease not renewed for this long expires
