"""Evaluation on labelled test splits: per-class metrics (unified-setting means) and per-image rows."""
from __future__ import annotations

import json
import os
import time
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from . import storage
from .calibration import bound, calibrated_score
from .data.images import decode_mask, resize_mask, to_network_input
from .data.layouts import read_datasets
from .engines import load_model, make_engine
from .metrics import class_metrics, confusion, image_auroc, pixel_ap, pixel_auroc, summarize
from .model.anomaly_map import Maps, fuse, image_scores
from .formats import METRICS_FILE, PREDICTIONS_FILE, UNKNOWN_CLASS
from .training_data import load_images


class EngineOutput(NamedTuple):
    """What evaluation reads of a ``Prediction``, from an exported engine's ``Inference``."""

    scores: torch.Tensor
    class_index: torch.Tensor
    prompt_index: torch.Tensor
    similarity: torch.Tensor


# Each branch alone, fused with the bundle's α: neighbour weight β = 0 (OneNIP's maps) and 1 (nearest neighbour).
BRANCHES = {"onenip": 0.0, "neighbor": 1.0}
# Other target false-positive rates of the same threshold rule: what each would have given here.
SWEEP_FPR = (0.01, 0.05, 0.1, 0.2)


def evaluate(
    bundle_uri: str,
    specs: list[tuple[str, str]],
    out_dir: str,
    classes: list[str] | None = None,
    oracle: bool = False,
    batch_size: int = 16,
    endpoint: str | None = None,
    runtime: str = "torch",
) -> dict[str, Any]:
    """Score every test image, write ``metrics.json`` and ``predictions.parquet`` to ``out_dir``.

    Prompts are retrieved class-agnostically (paper §3.5) unless ``oracle`` gives each image its
    ground-truth class (the official code's behaviour). Pixel metrics are at the network input
    resolution, masks nearest-resized, as in the official evaluation. ``runtime`` ``onnxruntime`` /
    ``openvino`` evaluates an ``onenip export`` directory: the same metrics from its fused maps and
    scores, without the per-branch metrics (the graph outputs only the fused map).
    """
    t_start = time.perf_counter()
    bundle = load_model(bundle_uri, runtime, endpoint)
    engine = None if runtime == "torch" else make_engine(bundle, runtime)
    predictor = bundle.predictor() if engine is None else None
    names = bundle.classes
    samples = [s for s in read_datasets(specs, classes or None, endpoint) if s.split == "test"]
    unknown = sorted({s.class_name for s in samples} - set(names))
    if unknown:
        raise ValueError(f"test classes {unknown} are not in the bundle (classes: {names})")
    size = bundle.config.image_size
    per_class: dict[str, dict[str, list]] = {}
    rows: list[dict[str, Any]] = []
    for start in range(0, len(samples), batch_size):
        batch = samples[start : start + batch_size]
        images = load_images(batch, size, endpoint)
        truth = torch.tensor([names.index(s.class_name) for s in batch])
        if engine is None:
            pred = predictor.predict(images, truth if oracle else None)
            fused = pred.fused.cpu().numpy()
            branches = {name: fuse(Maps(pred.reconstruction, pred.refiner, pred.neighbor), predictor.config, predictor.rec_scale,
                                   predictor.alpha, beta, predictor.neighbor_scale).cpu().numpy() for name, beta in BRANCHES.items()}
        else:
            norm = bundle.meta["normalization"]
            out = engine.infer(to_network_input(images, tuple(norm["mean"]), tuple(norm["std"])), truth.numpy() if oracle else np.full(len(batch), -1))
            pred = EngineOutput(torch.from_numpy(out.scores), bundle.pool.class_index[torch.from_numpy(out.prompt_index)],
                                torch.from_numpy(out.prompt_index), torch.from_numpy(out.similarity))
            fused, branches = out.fused, {}
        for i, s in enumerate(batch):
            if s.label and s.mask_uri:
                mask = resize_mask(decode_mask(storage.read_bytes(s.mask_uri, endpoint), s.mask_uri), size)
            else:
                mask = np.zeros((size, size), dtype=bool)
            acc = per_class.setdefault(s.class_name, {"labels": [], "scores": [], "masks": [], "maps": [], **{b: [] for b in BRANCHES}})
            raw = float(pred.scores[i])
            acc["labels"].append(int(mask.any()) if s.label else 0)
            acc["scores"].append(raw)
            acc["masks"].append(mask)
            acc["maps"].append(fused[i].astype(np.float32))
            for b in branches:
                acc[b].append(branches[b][i].astype(np.float32))
            cal = bundle.calibration.per_class[s.class_name]
            routed = names[int(pred.class_index[i])]
            similarity = float(pred.similarity[i])
            unknown = not oracle and similarity < bundle.calibration.per_class[routed].route_floor
            rows.append({
                "image_uri": s.uri, "class_name": s.class_name, "routed_class": UNKNOWN_CLASS if unknown else routed,
                "route_similarity": similarity,
                "prompt_id": bundle.pool.prompt_ids[int(pred.prompt_index[i])], "label": int(s.label), "defect": s.defect,
                "mask_uri": s.mask_uri if s.label else None,
                "score_raw": raw, "score": float(calibrated_score(raw, cal)), "threshold_raw": cal.threshold_raw,
                "is_anomalous": raw > cal.threshold_raw,
            })
    results: dict[str, dict[str, float]] = {}
    branch_results: dict[str, dict[str, dict[str, float]]] = {}
    sweeps: dict[str, dict[str, dict[str, float]]] = {}
    for cls in sorted(per_class):
        acc = per_class[cls]
        labels, scores = np.array(acc["labels"]), np.array(acc["scores"])
        m = class_metrics(labels, scores, np.stack(acc["masks"]), np.stack(acc["maps"]))
        cal = bundle.calibration.per_class[cls]
        m.update(_at_threshold(labels, scores, cal.threshold_raw))
        sweeps[cls] = {}
        for fpr in SWEEP_FPR:
            t = bound(cal.normal_mean, cal.normal_std, cal.num_images, fpr)
            sweeps[cls][str(fpr)] = {"threshold_raw": t, **_at_threshold(labels, scores, t)}
        m["num_images"] = int(len(labels))
        m["unknown_fraction"] = float(np.mean([r["routed_class"] == UNKNOWN_CLASS for r in rows if r["class_name"] == cls]))
        results[cls] = m
        branch_results[cls] = {b: _branch_metrics(labels, np.stack(acc["masks"]), np.stack(acc[b]), bundle.config.score_pool)
                               for b in BRANCHES if acc[b]}
    routing = float(np.mean([r["routed_class"] == r["class_name"] for r in rows])) if rows else float("nan")
    report = {
        "per_class": results,
        "mean": summarize({c: {k: v for k, v in m.items() if k != "num_images"} for c, m in results.items()}),
        "routing_accuracy": routing,
        "threshold_sweep": sweeps,
        "branches": None if engine is not None else {
            "per_class": branch_results, "mean": {b: summarize({c: r[b] for c, r in branch_results.items()}) for b in BRANCHES},
            "weights": {"alpha": predictor.alpha, "neighbor_weight": predictor.neighbor_weight}},
        "runtime": runtime,
        "prompt_mode": "oracle" if oracle else "retrieval",
        "model_version": bundle.version,
        "bundle": bundle_uri,
        "num_images": len(rows),
        "seconds": time.perf_counter() - t_start,
    }
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, METRICS_FILE), "w") as f:
        json.dump(report, f, indent=2)
    pq.write_table(pa.Table.from_pylist(rows), os.path.join(out_dir, PREDICTIONS_FILE))
    return report


def _branch_metrics(labels: np.ndarray, masks: np.ndarray, maps: np.ndarray, pool: int) -> dict[str, float]:
    """Image AUROC, pixel AUROC and pixel AP of one branch's maps (image score as deployed)."""
    return {"image_auroc": image_auroc(labels, image_scores(torch.from_numpy(maps), pool).numpy()),
            "pixel_auroc": pixel_auroc(masks, maps), "pixel_ap": pixel_ap(masks, maps)}


def _at_threshold(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, float]:
    """Operating point at the deployed (calibrated) threshold."""
    c = confusion(labels, scores > threshold)
    tp, fp, fn, tn = c["TP"], c["FP"], c["FN"], c["TN"]
    precision = tp / (tp + fp) if tp + fp else float("nan")
    recall = tp / (tp + fn) if tp + fn else float("nan")
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else float("nan")
    return {"threshold_precision": precision, "threshold_recall": recall, "threshold_f1": f1,
            "threshold_fpr": fp / (fp + tn) if fp + tn else float("nan")}
