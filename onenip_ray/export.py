"""``onenip export``: the bundle as ONNX or OpenVINO graphs, written only if it matches PyTorch.

Two graphs (``engines.EXPORT_FILE`` describes the directory):

* ``prompts``: prompt backbone features (P, C, h, w) → encoded prompt tokens and retrieval
  descriptors; run once when an engine loads, like the ``Predictor`` encodes its pool once;
* ``score``: network inputs (N, 3, S, S) and given classes (-1 = retrieve), with the encoded
  pool, the per-class patch memory and the fusion weights as *inputs* → fused anomaly map
  (N, S, S), raw image score, prompt index and retrieval similarity. One graph: backbone,
  retrieval, OneNIP's maps, the nearest-neighbour map (one image at a time, a ``Scan``, so memory
  stays at one image's distance matrix), fusion, smoothing and the image score.

Thresholds and calibration stay in ``bundle.json`` beside the graphs. Before anything is written
the export is run by its runtime on real images next to the PyTorch bundle; it is refused unless
the image scores agree within ``MAX_SCORE_DIFF`` and every map correlates above ``MIN_MAP_CORR``.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from datetime import datetime, timezone
from typing import Any

import numpy as np
import torch
from torch import nn

from . import storage
from .bundle import Bundle, load_bundle
from .calibration import calibrated_score
from .config import PARITY_IMAGES
from .engines import (
    EXPORT_FILE,
    EXPORT_FORMAT,
    GRAPH_FILES,
    PROMPT_GRAPH,
    SCORE_GRAPH,
    ExportedModel,
    TorchEngine,
    fusion_input,
    load_export,
    make_engine,
    memory_inputs,
    require_runtime,
)
from .errors import InputError
from .formats import BUNDLE_FILE, MODEL_FILE, PROMPTS_FILE
from .model.anomaly_map import gaussian_blur, image_scores, upsample
from .prompts import NEIGHBOR_POOLS, aggregate, descriptors, nearest_distance, retrieve
from .scoring import ScoringSpec

FORMATS = {"onnx": "onnxruntime", "openvino": "openvino"}  # export format → the runtime that checks it
MAX_SCORE_DIFF = 1e-3
MIN_MAP_CORR = 0.999
OPSET = 18


class ExportError(InputError):
    """The export missed the parity bounds (nothing was written) or cannot be made."""


class PromptGraph(nn.Module):
    """Prompt features → (encoded tokens (P, hw, D), retrieval descriptors (P, C))."""

    def __init__(self, bundle: Bundle) -> None:
        super().__init__()
        self.model = bundle.model

    def forward(self, prompt_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.encode(prompt_features), descriptors(prompt_features)


class ScoreGraph(nn.Module):
    """The scoring graph; the same steps as ``Predictor.predict_features`` + ``fuse`` + ``image_scores``."""

    def __init__(self, bundle: Bundle) -> None:
        super().__init__()
        self.backbone, self.model, self.config = bundle.backbone, bundle.model, bundle.config

    def forward(self, image: torch.Tensor, given_class: torch.Tensor, prompt_tokens: torch.Tensor,
                prompt_descriptors: torch.Tensor, prompt_class: torch.Tensor, memory: torch.Tensor,
                memory_sqnorm: torch.Tensor, memory_weight: torch.Tensor, fusion: torch.Tensor,
                neighbor_pool: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        cfg = self.config
        feats, patch_feats = self.backbone.with_patches(image, cfg.neighbor_stride, cfg.neighbor_coarse_weight)
        prompt_index, similarity = retrieve(descriptors(feats), prompt_descriptors, prompt_class, given_class)
        maps = self.model.maps(feats, prompt_tokens[prompt_index])
        class_index = prompt_class[prompt_index]
        size = max(NEIGHBOR_POOLS)  # the one neighbourhood besides the patch alone
        averaged = (neighbor_pool.index_select(0, class_index) == size).view(-1, 1, 1, 1)
        patch_feats = torch.where(averaged, aggregate(patch_feats, size), patch_feats)
        distances = nearest_distances(patch_feats, memory, memory_sqnorm, memory_weight, class_index)
        neighbor = upsample(distances, cfg.image_size)
        alpha, scale, beta, neighbor_scale = fusion[0], fusion[1], fusion[2], fusion[3]
        fused = (1.0 - alpha) * maps.reconstruction + alpha * scale * maps.refiner
        fused = gaussian_blur((1.0 - beta) * fused + beta * neighbor_scale * neighbor, cfg.map_sigma)
        return fused, image_scores(fused, cfg.score_pool), prompt_index, similarity


def nearest_distances(features: torch.Tensor, memory: torch.Tensor, memory_sqnorm: torch.Tensor,
                      memory_weight: torch.Tensor, class_index: torch.Tensor) -> torch.Tensor:
    """``prompts.neighbor_distances`` as a graph: per patch, the L2 distance to the nearest memory
    patch of the image's class times that patch's weight (N, h, w), one image at a time (``scan``);
    memory (K, Mmax, C) per class, squared norms +inf on padding rows (a class without memory gets
    zeros), weights (K, Mmax)."""
    from torch._higher_order_ops.scan import scan

    n, c, h, w = features.shape

    def one_image(carry, x):
        bank, sqnorm, weight = carry
        query, cls = x
        rows, norms = bank.index_select(0, cls)[0], sqnorm.index_select(0, cls)[0]
        squared = (query * query).sum(1, keepdim=True) + norms[None, :] - 2.0 * (query @ rows.T)
        nearest = squared.argmin(1)
        dist = nearest_distance(query, rows, nearest)  # measured directly, as the PyTorch path
        dist = dist * weight.index_select(0, cls)[0][nearest]
        dist = torch.where(torch.isinf(squared.amin(1)), torch.zeros_like(dist), dist)
        # carried, not captured: OpenVINO's Scan needs it so
        return (bank.clone(), sqnorm.clone(), weight.clone()), dist

    queries = features.float().flatten(2).transpose(1, 2)  # (N, hw, C)
    _, dist = scan(one_image, (memory, memory_sqnorm, memory_weight), (queries, class_index.unsqueeze(1)))
    return dist.view(n, h, w)


def _example_inputs(bundle: Bundle, batch: int) -> tuple[torch.Tensor, ...]:
    pool, size = bundle.pool, bundle.config.image_size
    with torch.inference_mode():
        tokens = bundle.model.encode(pool.features.float())
    memory, sqnorm, weight = memory_inputs(pool)
    return (torch.zeros(batch, 3, size, size), torch.full((batch,), -1, dtype=torch.int64), tokens.clone(),
            descriptors(pool.features.float()), pool.class_index.to(torch.int64), torch.from_numpy(memory),
            torch.from_numpy(sqnorm), torch.from_numpy(weight),
            torch.from_numpy(fusion_input(bundle.config, bundle.calibration)), torch.tensor(pool.neighbor_pool))


def write_onnx(bundle: Bundle, out_dir: str, batch: int | None) -> None:
    """``score.onnx`` and ``prompts.onnx`` into ``out_dir``; ``batch`` None = dynamic batch."""
    Dim = torch.export.Dim
    n = Dim("batch", min=1, max=4096) if batch is None else None
    prompts, classes, rows = Dim("prompts", min=1), Dim("classes", min=1), Dim("memory_rows", min=1)
    # the graph input "class_index" is the given class (-1 = retrieve): its onenip-export/1 name, kept for
    # existing exports
    names = ["image", "class_index", "prompt_tokens", "prompt_descriptors", "prompt_class", "memory", "memory_sqnorm",
             "memory_weight", "fusion", "neighbor_pool"]
    shapes = {"image": {0: n} if n else None, "given_class": {0: n} if n else None, "prompt_tokens": {0: prompts},
              "prompt_descriptors": {0: prompts}, "prompt_class": {0: prompts}, "memory": {0: classes, 1: rows},
              "memory_sqnorm": {0: classes, 1: rows}, "memory_weight": {0: classes, 1: rows}, "fusion": None,
              "neighbor_pool": {0: classes}}
    example = _example_inputs(bundle, 2 if batch is None else batch)
    with warnings.catch_warnings():  # inputs sharing an axis (prompts, classes, memory rows) get one name: fine
        warnings.filterwarnings("ignore", message="# The axis name")
        torch.onnx.export(ScoreGraph(bundle).eval(), example, os.path.join(out_dir, f"{SCORE_GRAPH}.onnx"), dynamo=True,
                          external_data=False, opset_version=OPSET, input_names=names,
                          output_names=["anomaly_map", "score", "prompt_index", "similarity"], dynamic_shapes=shapes,
                          verbose=False)
        torch.onnx.export(PromptGraph(bundle).eval(), (bundle.pool.features.float(),),
                          os.path.join(out_dir, f"{PROMPT_GRAPH}.onnx"), dynamo=True, external_data=False,
                          opset_version=OPSET, input_names=["prompt_features"],
                          output_names=["prompt_tokens", "prompt_descriptors"],
                          dynamic_shapes={"prompt_features": {0: prompts}}, verbose=False)


def write_openvino(onnx_dir: str, out_dir: str) -> None:
    """OpenVINO IR (``.xml`` + ``.bin``) of the ONNX graphs in ``onnx_dir``."""
    ov = require_runtime("openvino")
    for stem in (SCORE_GRAPH, PROMPT_GRAPH):
        ov.save_model(ov.convert_model(os.path.join(onnx_dir, f"{stem}.onnx")), os.path.join(out_dir, f"{stem}.xml"),
                      compress_to_fp16=False)


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation (float64); 1.0 when both are constant and equal to float32 rounding."""
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    sa, sb = a.std(), b.std()
    if sa == 0 or sb == 0:
        return 1.0 if np.allclose(a, b, rtol=1e-5, atol=1e-6) else 0.0
    return float(((a - a.mean()) * (b - b.mean())).mean() / (sa * sb))


def parity(torch_engine: TorchEngine, engine: Any, inputs: np.ndarray, batch_size: int,
           spec: ScoringSpec) -> dict[str, Any]:
    """Both engines on the same network inputs (class retrieved): image-score and map agreement.

    ``map_correlation`` (the bound) pools every pixel of every map. Per image it is also given
    (``min_image_map_correlation``) over the maps that vary by more than 1e-4 of their class's
    threshold: a flatter map (an image whose patches are all in the memory, e.g. a prompt image)
    is float rounding noise, and its correlation says nothing.
    """
    ref_maps, got_maps, raw, calibrated, per_image, same_prompt = [], [], [], [], [], []
    for i in range(0, len(inputs), batch_size):
        x = inputs[i : i + batch_size]
        c = np.full(len(x), -1, np.int64)
        ref, got = torch_engine.infer(x, c), engine.infer(x, c)
        ref_maps.append(ref.fused)
        got_maps.append(got.fused)
        raw += list(np.abs(ref.scores - got.scores))
        for j in range(len(x)):
            cal = spec.prompt_calibration(int(ref.prompt_index[j]))
            calibrated.append(abs(float(calibrated_score(ref.scores[j], cal))
                                  - float(calibrated_score(got.scores[j], cal))))
            if ref.fused[j].std() > 1e-4 * cal.threshold_raw:
                per_image.append(correlation(ref.fused[j], got.fused[j]))
        same_prompt += list(ref.prompt_index == got.prompt_index)
    ref_all, got_all = np.concatenate(ref_maps), np.concatenate(got_maps)
    return {"images": len(inputs), "max_abs_score_diff": float(max(raw)),
            "max_abs_calibrated_score_diff": float(max(calibrated)), "map_correlation": correlation(ref_all, got_all),
            "min_image_map_correlation": float(min(per_image)) if per_image else None,
            "images_with_informative_maps": len(per_image), "max_abs_map_diff": float(np.abs(ref_all - got_all).max()),
            "same_prompt_fraction": float(np.mean(same_prompt)),
            "bounds": {"max_abs_score_diff": MAX_SCORE_DIFF, "map_correlation": MIN_MAP_CORR}}


def parity_inputs(bundle: Bundle, images: str | None, limit: int, endpoint: str | None) -> tuple[np.ndarray, list[str]]:
    """Real images as network inputs for the parity check: ``images`` (folder / prefix / manifest), else
    the bundle's own prompt images (their URIs are the pool's prompt ids); at most ``limit``."""
    from .inputs import list_inputs

    spec = ScoringSpec.from_bundle(bundle)
    if images:
        uris = [u for u, _ in list_inputs(images, endpoint)]
        source = images
    else:
        uris = [u for u in bundle.pool.prompt_ids if storage.exists(u, endpoint)] if bundle.pool.prompt_ids else []
        source = "the bundle's prompt images"
    if len(uris) > limit:  # spread over the listing (classes / defect types are listed in order)
        uris = [uris[int(i)] for i in np.linspace(0, len(uris) - 1, limit).round()]
    prepared = [spec.prepare(u, storage.read_bytes(u, endpoint)) for u in uris]
    good = [p for p in prepared if p.error is None]
    if not good:
        raise ExportError(f"no readable real images to check parity on ({source}); pass --images FOLDER")
    return np.stack([p.input for p in good]), [p.image_uri for p in good]


def export_bundle(bundle_uri: str, fmt: str, out: str, image_size: int | None = None, batch: str | int = "dynamic",
                  images: str | None = None, parity_images: int = PARITY_IMAGES, endpoint: str | None = None,
                  pool_only: bool = False) -> dict[str, Any]:
    """Export, check parity against the PyTorch bundle, and only then write ``out``. Returns
    ``export.json``'s content (with the parity figures); raises ``ExportError`` on a miss.

    ``pool_only``: ``out`` is an export of the same weights (e.g. ``bundle_uri`` came from it by
    ``onenip add-class``); its graphs are kept (format and batch too), the bundle's pool and
    calibration replace the old ones, and parity is checked again before anything is replaced."""
    previous = load_export(out, endpoint) if pool_only else None
    if previous is not None:
        fmt, batch = previous.export["graph_format"], previous.export["batch"]
    _require_export_packages(fmt)
    bundle = load_bundle(bundle_uri, endpoint)
    fixed = _fixed_batch(bundle, image_size, batch)
    weights_sha256 = hashlib.sha256(storage.read_bytes(storage.join(bundle_uri, MODEL_FILE), endpoint)).hexdigest()
    if previous is not None and previous.export["weights_sha256"] != weights_sha256:
        raise ExportError(f"--pool-only: {bundle_uri} has other weights than the export at {out} (bundle "
                          f"{previous.export['model_version']}); export it in full")
    inputs, uris = parity_inputs(bundle, images, parity_images, endpoint)
    work = tempfile.mkdtemp(prefix="onenip-export-")
    try:
        stage = os.path.join(work, "stage")
        _write_graphs(bundle, fmt, fixed, previous, work, stage)
        for name in (BUNDLE_FILE, PROMPTS_FILE):
            with open(os.path.join(stage, name), "wb") as f:
                f.write(storage.read_bytes(storage.join(bundle_uri, name), endpoint))
        meta = _export_meta(bundle, bundle_uri, fmt, fixed, weights_sha256, previous)
        _write_meta(stage, meta)
        meta["parity"] = _check_parity(bundle, stage, FORMATS[fmt], inputs, fixed, images, uris, out)
        _write_meta(stage, meta)
        storage.commit_dir(stage, out, endpoint=endpoint, marker=EXPORT_FILE)
        return meta
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _require_export_packages(fmt: str) -> None:
    """The checking runtime and the ONNX exporter's packages, or an ImportError naming the extra."""
    if fmt not in FORMATS:
        raise InputError(f"unknown export format {fmt!r}; choose from {', '.join(FORMATS)}")
    require_runtime(FORMATS[fmt])
    for module in ("onnx", "onnxscript"):
        try:
            __import__(module)
        except ImportError as exc:
            extra = "onnx" if fmt == "onnx" else "openvino"
            raise ImportError(f"onenip export needs the {module} package: pip install 'onenip-ray[{extra}]'") from exc


def _fixed_batch(bundle: Bundle, image_size: int | None, batch: str | int) -> int | None:
    """The graph's fixed batch size (None = dynamic), after checking the image size and batch asked for."""
    if image_size is not None and image_size != bundle.config.image_size:
        size, grid = bundle.config.image_size, bundle.config.grid
        raise ExportError(f"--image-size {image_size}: this bundle was trained at {size} px and its position "
                          f"embeddings fix the {grid}×{grid} feature grid; export it at {size} (resize happens "
                          "before the graph, in decoding)")
    fixed = None if str(batch) == "dynamic" else int(batch)
    if fixed is not None and fixed < 1:
        raise ExportError(f"--batch must be a positive integer or 'dynamic', got {batch}")
    return fixed


def _write_graphs(bundle: Bundle, fmt: str, fixed: int | None, previous: ExportedModel | None, work: str,
                  stage: str) -> None:
    """The graphs into ``stage``: copied from ``previous`` (pool only), else exported (ONNX first, in ``work``)."""
    onnx_dir = os.path.join(work, "onnx")
    os.makedirs(onnx_dir)
    os.makedirs(stage)
    if previous is not None:
        for name in previous.export["files"]["graphs"]:
            shutil.copy(os.path.join(previous.local_dir, name), stage)
        return
    write_onnx(bundle, onnx_dir, fixed)
    if fmt == "onnx":
        for stem in (SCORE_GRAPH, PROMPT_GRAPH):
            shutil.copy(os.path.join(onnx_dir, f"{stem}.onnx"), stage)
    else:
        write_openvino(onnx_dir, stage)


def _export_meta(bundle: Bundle, bundle_uri: str, fmt: str, fixed: int | None, weights_sha256: str,
                 previous: ExportedModel | None) -> dict[str, Any]:
    """``export.json`` before the parity check."""
    return {
        "format": EXPORT_FORMAT, "graph_format": fmt,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "bundle": bundle_uri, "model_version": bundle.version, "weights_sha256": weights_sha256,
        "image_size": bundle.config.image_size, "batch": "dynamic" if fixed is None else fixed, "opset": OPSET,
        "graphs_from": (previous.export.get("graphs_from", previous.export["model_version"]) if previous
                        else bundle.version),
        "files": {"graphs": [f.format(s) for s in (SCORE_GRAPH, PROMPT_GRAPH) for f in GRAPH_FILES[fmt]],
                  "calibration": BUNDLE_FILE, "prompt_pool": PROMPTS_FILE},
        "score_inputs": {"image": "(N, 3, S, S) float32, (x / 255 - mean) / std (bundle.json normalization)",
                         "class_index": "(N,) int64, -1 = retrieve the class", "prompt_tokens": "prompts graph output",
                         "prompt_descriptors": "prompts graph output", "prompt_class": "(P,) int64",
                         "memory": "(K, Mmax, C) float32 per-class patch memory, zero-padded",
                         "memory_sqnorm": "(K, Mmax) float32 squared norms, +inf on padding",
                         "memory_weight": "(K, Mmax) float32 weights of the distances to the memory patches",
                         "fusion": "[alpha, refiner scale, neighbour weight, neighbour scale] "
                                   "from bundle.json calibration",
                         "neighbor_pool": "(K,) int64 per class: 3 = patches averaged over 3 x 3 before the "
                                          "memory, 1 = as they are (prompts.safetensors metadata)"},
        "score_outputs": {"anomaly_map": "(N, S, S) float32 fused map", "score": "(N,) raw image score",
                          "prompt_index": "(N,) int64", "similarity": "(N,) retrieval cosine similarity"},
    }


def _write_meta(stage: str, meta: dict[str, Any]) -> None:
    with open(os.path.join(stage, EXPORT_FILE), "w") as f:
        json.dump(meta, f, indent=2)


def _check_parity(bundle: Bundle, stage: str, runtime: str, inputs: np.ndarray, fixed: int | None, images: str | None,
                  uris: list[str], out: str) -> dict[str, Any]:
    """The staged export run by ``runtime`` next to the PyTorch bundle; ``ExportError`` outside the bounds."""
    engine = make_engine(load_export(stage), runtime)
    figures = parity(TorchEngine(bundle), engine, inputs, fixed or 8, ScoringSpec.from_bundle(bundle))
    figures.update(runtime=runtime, source=images or "prompt images", first_images=uris[:3])
    if not (figures["max_abs_score_diff"] < MAX_SCORE_DIFF and figures["map_correlation"] > MIN_MAP_CORR):
        raise ExportError(
            f"export refused, nothing written to {out}: on {figures['images']} real images {runtime} differs from "
            f"PyTorch by up to {figures['max_abs_score_diff']:.3g} in raw image score (bound < {MAX_SCORE_DIFF}) "
            "and its maps "
            f"correlate {figures['map_correlation']:.6f} with PyTorch's (bound > {MIN_MAP_CORR})")
    return figures
