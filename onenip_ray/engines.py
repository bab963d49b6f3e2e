"""Inference engines behind the ``Scorer``: PyTorch eager on a bundle, or an ``onenip export``
directory run by ONNX Runtime or OpenVINO.

Every engine maps network inputs (N, 3, S, S) and given classes (-1 = retrieve) to the same
``Prediction`` (fused map, raw image score, prompt index, routed class, retrieval similarity). Thresholds and
calibration are never inside a graph: the ``ScoringSpec`` applies them from ``bundle.json``.

An export directory (``EXPORT_FILE`` lists its files) holds the scoring graph, the prompt-encoder
graph and the bundle's ``bundle.json`` and ``prompts.safetensors``: the prompt pool (prompt
features and the per-class patch memory) and the fusion weights are graph *inputs*, so a pool with
a new class (``onenip add-class``) runs on the same graph.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from . import storage
from .bundle import Bundle, ModelIdentity, load_bundle
from .calibration import Calibration
from .config import RUNTIMES, ModelConfig
from .errors import BundleError, InputError
from .formats import BUNDLE_FILE, PROMPTS_FILE
from .predictor import Prediction
from .prompts import PromptPool

EXPORT_FORMAT = "onenip-export/1"
EXPORT_FILE = "export.json"
# graph stems inside an export directory: ``score.onnx`` or ``score.xml`` + ``score.bin``
SCORE_GRAPH, PROMPT_GRAPH = "score", "prompts"
GRAPH_FILES = {"onnx": ("{}.onnx",), "openvino": ("{}.xml", "{}.bin")}
RUNTIME_EXTRAS = {"onnxruntime": ("onnxruntime", "onnx"), "openvino": ("openvino", "openvino")}


class Engine(Protocol):
    runtime: str
    device: str

    def infer(self, inputs: np.ndarray, given_class: np.ndarray) -> Prediction[np.ndarray]:
        """Network inputs (N, 3, S, S) float32; ``given_class`` (N,), -1 = retrieve the class."""

    def check(self) -> None:
        """Raises when the engine's device is broken (a health check)."""


def require_runtime(runtime: str) -> Any:
    """The runtime's Python module, or an ImportError saying which extra installs it."""
    if runtime not in RUNTIMES:
        raise InputError(f"unknown runtime {runtime!r}; choose from {', '.join(RUNTIMES)}")
    if runtime == "torch":
        import torch

        return torch
    module, extra = RUNTIME_EXTRAS[runtime]
    try:
        return __import__(module)
    except ImportError as exc:
        raise ImportError(f"--runtime {runtime} needs the {module} package, which is not installed: "
                          f"pip install 'onenip-ray[{extra}]'") from exc


def gpu_available(runtime: str) -> bool:
    """Whether ``runtime`` can use a GPU in this process (torch: CUDA; onnxruntime: a CUDA or
    TensorRT provider; openvino: an OpenVINO ``GPU`` device)."""
    module = require_runtime(runtime)
    if runtime == "torch":
        return bool(module.cuda.is_available())
    if runtime == "onnxruntime":
        return bool({"CUDAExecutionProvider", "TensorrtExecutionProvider"} & set(module.get_available_providers()))
    return "GPU" in module.Core().available_devices


# -- the export directory -------------------------------------------------------------------------
@dataclass
class ExportedModel(ModelIdentity):
    """An export directory loaded for scoring; offers what ``ScoringSpec.from_bundle`` reads of a
    bundle (``meta``, ``config``, ``classes``, ``pool``, ``calibration``, ``version``)."""

    uri: str
    local_dir: str  # the graphs on local disk (a download for s3:// exports)
    export: dict[str, Any]
    meta: dict[str, Any]
    pool: PromptPool
    config: ModelConfig
    calibration: Calibration

    def graph_path(self, stem: str) -> str:
        return os.path.join(self.local_dir, GRAPH_FILES[self.export["graph_format"]][0].format(stem))


def is_export(uri: str, endpoint: str | None = None) -> bool:
    return storage.exists(storage.join(uri, EXPORT_FILE), endpoint)


def load_export(uri: str, endpoint: str | None = None, pool: PromptPool | None = None) -> ExportedModel:
    """Read an ``onenip export`` directory (local or ``s3://``, downloaded to a temp dir)."""
    try:
        export = json.loads(storage.read_bytes(storage.join(uri, EXPORT_FILE), endpoint))
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{uri} is not an export directory: {EXPORT_FILE} not found "
                                "(make one with `onenip export`)") from e
    if export.get("format") != EXPORT_FORMAT:
        raise BundleError(f"{uri}: unsupported export format {export.get('format')!r} (expected {EXPORT_FORMAT})")
    local_dir = storage.canonical_uri(uri)
    if storage.is_s3(uri):
        local_dir = tempfile.mkdtemp(prefix="onenip-export-")
        storage.download_dir(uri, local_dir, endpoint)
    with open(os.path.join(local_dir, BUNDLE_FILE)) as f:
        meta = json.load(f)
    if pool is None:
        with open(os.path.join(local_dir, PROMPTS_FILE), "rb") as f:
            pool = PromptPool.from_bytes(f.read())
    return ExportedModel(uri, local_dir, export, meta, pool, ModelConfig.from_dict(meta["config"]),
                         Calibration.from_dict(meta["calibration"]))


def load_model(uri: str, runtime: str = "torch", endpoint: str | None = None,
               pool: PromptPool | None = None) -> Bundle | ExportedModel:
    """The bundle (``torch``) or export directory (``onnxruntime``/``openvino``) at ``uri``, with a
    clear error when the two are mixed up or the runtime's package is missing."""
    require_runtime(runtime)
    exported = is_export(uri, endpoint)
    if runtime == "torch":
        if exported:
            raise InputError(f"{uri} is an export directory; --runtime torch needs the model bundle it was exported "
                             f"from (bundle version in {EXPORT_FILE})")
        return load_bundle(uri, endpoint, pool=pool)
    if not exported:
        raise InputError(f"--runtime {runtime} scores an export directory, and {uri} has no {EXPORT_FILE}: "
                         f"run `onenip export --bundle {uri} --format onnx --out EXPORT_DIR` and pass EXPORT_DIR")
    return load_export(uri, endpoint, pool=pool)


def make_engine(model: Bundle | ExportedModel, runtime: str = "torch", device: str = "cpu",
                threads: int | None = None) -> Engine:
    """The engine for ``runtime`` on ``device`` (``cpu``/``cuda``; ``threads`` = intra-op threads,
    None = the runtime's default)."""
    if runtime == "torch":
        if not isinstance(model, Bundle):
            raise InputError("--runtime torch needs a model bundle, not an export directory")
        return TorchEngine(model, device)
    if not isinstance(model, ExportedModel):
        raise InputError(f"--runtime {runtime} needs an export directory (`onenip export`), not a bundle")
    if runtime == "onnxruntime":
        return OnnxRuntimeEngine(model, device, threads)
    if runtime == "openvino":
        return OpenVinoEngine(model, device, threads)
    raise InputError(f"unknown runtime {runtime!r}; choose from {', '.join(RUNTIMES)}")


# -- engines --------------------------------------------------------------------------------------
class TorchEngine:
    """PyTorch eager: the bundle's ``Predictor`` (prompt tokens encoded once)."""

    runtime = "torch"

    def __init__(self, bundle: Bundle, device: str = "cpu") -> None:
        self.predictor = bundle.predictor(device)
        self.device = str(self.predictor.device)

    def check(self) -> None:
        """Waits for the GPU's queued work; raises when its CUDA context is broken (no-op on CPU)."""
        import torch

        if self.predictor.device.type == "cuda":
            torch.cuda.synchronize(self.predictor.device)

    def infer(self, inputs: np.ndarray, given_class: np.ndarray) -> Prediction[np.ndarray]:
        import torch

        start = time.perf_counter()
        p = self.predictor
        with torch.inference_mode():
            feats = p.features_of(torch.from_numpy(np.ascontiguousarray(inputs, np.float32)).to(p.device))
            pred = p.predict_features(*feats, torch.from_numpy(np.asarray(given_class, np.int64)))
        return pred.numpy(time.perf_counter() - start)


def memory_inputs(pool: PromptPool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The patch memory as the graph takes it: (K, Mmax, C) per class, zero-padded, the squared
    norms (K, Mmax) with +inf on padding rows (never nearest; a class without memory gets a zero map)
    and the patches' weights (K, Mmax), 1 on padding."""
    memory, memory_class = pool.memory.float().numpy(), pool.memory_class.numpy()
    memory_weight = pool.memory_weight.float().numpy()
    classes, channels = len(pool.class_names), pool.features.shape[1]
    counts = np.bincount(memory_class, minlength=classes) if len(memory_class) else np.zeros(classes, np.int64)
    width = max(1, int(counts.max()))
    padded = np.zeros((classes, width, channels), np.float32)
    sqnorm = np.full((classes, width), np.inf, np.float32)
    weight = np.ones((classes, width), np.float32)
    for c in range(classes):
        rows = memory[memory_class == c]
        padded[c, : len(rows)] = rows
        sqnorm[c, : len(rows)] = (rows.astype(np.float64) ** 2).sum(1)
        weight[c, : len(rows)] = memory_weight[memory_class == c]
    return padded, sqnorm, weight


def fusion_input(config: ModelConfig, calibration: Calibration) -> np.ndarray:
    """[α, refiner scale s, neighbour weight β, neighbour scale n] (see ``model.anomaly_map.fuse``)."""
    alpha = config.alpha if calibration.alpha is None else calibration.alpha
    scale = 1.0 if config.fusion == "paper" else calibration.rec_scale
    return np.array([alpha, scale, calibration.neighbor_weight, calibration.neighbor_scale], np.float32)


class GraphEngine:
    """Shared part of the exported-graph engines: pool inputs prepared once, fixed-batch padding."""

    runtime = ""

    def __init__(self, model: ExportedModel) -> None:
        self.model = model
        self.batch: int | None = None if model.export["batch"] == "dynamic" else int(model.export["batch"])
        pool = model.pool
        tokens, descriptors = self._run(PROMPT_GRAPH, {"prompt_features": pool.features.float().numpy()})
        memory, sqnorm, weight = memory_inputs(pool)
        # an export written before the weights has no "memory_weight" input (all 1), one before the
        # neighbourhoods no "neighbor_pool" (all 1)
        self.pool_inputs = {
            "prompt_tokens": tokens, "prompt_descriptors": descriptors,
            "prompt_class": pool.class_index.numpy().astype(np.int64),
            "memory": memory, "memory_sqnorm": sqnorm, "memory_weight": weight,
            "fusion": fusion_input(model.config, model.calibration),
            "neighbor_pool": np.asarray(pool.neighbor_pool, np.int64),
        }
        if "neighbor_pool" not in model.export.get("score_inputs", {}) and set(pool.neighbor_pool) != {1}:
            raise BundleError(f"{model.uri}: its graph predates neighbourhood-averaged patches, which this pool's "
                             "classes use; export the bundle again (`onenip export`)")

    def _run(self, graph: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        raise NotImplementedError

    def check(self) -> None:
        """Nothing to check: the session holds no device context that breaks on its own."""

    def infer(self, inputs: np.ndarray, given_class: np.ndarray) -> Prediction[np.ndarray]:
        start = time.perf_counter()
        inputs = np.ascontiguousarray(inputs, np.float32)
        given_class = np.asarray(given_class, np.int64)
        n = len(inputs)
        step = self.batch or max(1, n)
        parts = [self._score(inputs[i : i + step], given_class[i : i + step]) for i in range(0, n, step)]
        if not parts:
            size = self.model.config.image_size
            parts = [[np.zeros((0, size, size), np.float32), np.zeros(0), np.zeros(0, np.int64), np.zeros(0)]]
        fused, scores, prompt_index, similarity = (np.concatenate([p[k] for p in parts]) for k in range(4))
        prompt_index = prompt_index.astype(np.int64)
        return Prediction(fused.astype(np.float32, copy=False), scores.astype(np.float64), prompt_index,
                          self.pool_inputs["prompt_class"][prompt_index], similarity.astype(np.float64),
                          time.perf_counter() - start)

    def _score(self, x: np.ndarray, given_class: np.ndarray) -> list[np.ndarray]:
        """One run of the score graph; a fixed-batch graph gets copies of the first image as padding."""
        n = len(x)
        if self.batch and n < self.batch:
            pad = self.batch - n
            x = np.concatenate([x, np.repeat(x[:1], pad, 0)])
            given_class = np.concatenate([given_class, np.repeat(given_class[:1], pad)])
        # "class_index" is the graph's input name for the given class (the onenip-export/1 format)
        out = self._run(SCORE_GRAPH, {"image": x, "class_index": given_class, **self.pool_inputs})
        return [o[:n] for o in out]


class OnnxRuntimeEngine(GraphEngine):
    """ONNX Runtime on CPU, or CUDA / TensorRT execution providers where installed (``device=cuda``)."""

    runtime = "onnxruntime"

    def __init__(self, model: ExportedModel, device: str = "cpu", threads: int | None = None) -> None:
        ort = require_runtime("onnxruntime")
        if model.export["graph_format"] != "onnx":
            raise InputError(f"{model.uri} holds an OpenVINO graph; --runtime onnxruntime needs "
                             "`onenip export --format onnx`")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = int(threads)
        available = ort.get_available_providers()
        wanted = ["TensorrtExecutionProvider", "CUDAExecutionProvider"] if str(device).startswith("cuda") else []
        providers = [p for p in wanted if p in available] + ["CPUExecutionProvider"]
        if wanted and providers == ["CPUExecutionProvider"]:
            raise InputError(f"device {device} asked for, but onnxruntime has no GPU provider here "
                             f"(available: {available}); "
                             "install onnxruntime-gpu")
        self.providers = providers
        self.device = "cuda" if len(providers) > 1 else "cpu"
        self.sessions = {g: ort.InferenceSession(model.graph_path(g), options, providers=providers)
                         for g in (PROMPT_GRAPH, SCORE_GRAPH)}
        super().__init__(model)

    def _run(self, graph: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        session = self.sessions[graph]
        return session.run(None, {i.name: feeds[i.name] for i in session.get_inputs()})


class OpenVinoEngine(GraphEngine):
    """OpenVINO on ``CPU`` (float32 precision, as the parity check) or an Intel ``GPU`` (``device=gpu``).
    Reads either export format (OpenVINO IR or ONNX)."""

    runtime = "openvino"

    def __init__(self, model: ExportedModel, device: str = "cpu", threads: int | None = None) -> None:
        ov = require_runtime("openvino")
        core = ov.Core()
        target = "GPU" if str(device).lower() in ("gpu", "cuda") else "CPU"
        if target not in core.available_devices:
            raise InputError(f"OpenVINO has no {target} device here (available: {core.available_devices})")
        config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": "f32"}  # bf16 by default on some CPUs
        if threads and target == "CPU":
            config["INFERENCE_NUM_THREADS"] = int(threads)
        self.device = target.lower()
        self.compiled = {g: core.compile_model(core.read_model(model.graph_path(g)), target, config)
                         for g in (PROMPT_GRAPH, SCORE_GRAPH)}
        self.requests = {g: c.create_infer_request() for g, c in self.compiled.items()}
        super().__init__(model)

    def _run(self, graph: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        compiled, request = self.compiled[graph], self.requests[graph]
        result = request.infer({i.any_name: feeds[i.any_name] for i in compiled.inputs})
        return [np.array(result[o]) for o in compiled.outputs]
