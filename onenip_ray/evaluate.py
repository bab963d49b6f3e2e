"""Evaluation on labelled test splits: per-class metrics (unified-setting means) and per-image rows."""
from __future__ import annotations

import datetime as dt
import json
import os
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from . import storage
from .bundle import Bundle
from .calibration import Calibration, ClassCalibration
from .config import EVALUATE_BATCH_SIZE
from .data.images import decode_mask, resize_mask
from .data.layouts import Sample, read_datasets
from .engines import ExportedModel, load_model, make_engine
from .errors import InputError
from .formats import METRICS_FILE, PREDICTIONS_FILE, UNKNOWN_CLASS
from .metrics import class_metrics, confusion, image_auroc, pixel_ap, pixel_auroc, summarize
from .model.anomaly_map import fuse, image_scores
from .predictor import Prediction, Predictor
from .scoring import Prepared, ScoringSpec

# Each branch alone, fused with the bundle's α: neighbour weight β = 0 (OneNIP's maps) and 1 (nearest neighbour).
BRANCHES = {"onenip": 0.0, "neighbor": 1.0}
# Other target false-positive rates of the same threshold rule: what each would have given here.
SWEEP_FPR = (0.01, 0.05, 0.1, 0.15, 0.2, 0.3)
# Per-class facts, not metrics: no mean of them.
NOT_AVERAGED = ("num_images", "target_fpr")


def evaluate(
    bundle_uri: str,
    roots: list[tuple[str, str]],
    out_dir: str,
    classes: list[str] | None = None,
    oracle: bool = False,
    batch_size: int = EVALUATE_BATCH_SIZE,
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
    model = load_model(bundle_uri, runtime, endpoint)
    spec = ScoringSpec.from_bundle(model)
    predictor = model.predictor() if runtime == "torch" else None
    engine = None if predictor is not None else make_engine(model, runtime)
    samples = _test_samples(model, roots, classes, endpoint)
    per_class: dict[str, dict[str, list]] = {}
    rows: list[dict[str, Any]] = []
    for start in range(0, len(samples), batch_size):
        batch = samples[start : start + batch_size]
        prepared = [_prepare(spec, s, oracle, endpoint) for s in batch]
        inputs, given = np.stack([p.input for p in prepared]), np.array([p.given_class for p in prepared])
        if predictor is not None:
            pred, branches = _predict_with_branches(predictor, inputs, given)
        else:
            pred, branches = engine.infer(inputs, given), {}
        for i, sample in enumerate(batch):
            _collect(per_class, sample, pred, branches, i, model.config.image_size, endpoint)
            rows.append(_row(spec, sample, prepared[i], pred, i))
    report = _report(model, per_class, rows, predictor)
    report.update(runtime=runtime, prompt_mode="oracle" if oracle else "retrieval", model_version=model.version,
                  bundle=bundle_uri, num_images=len(rows), seconds=time.perf_counter() - t_start)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, METRICS_FILE), "w") as f:
        json.dump(report, f, indent=2)
    pq.write_table(pa.Table.from_pylist(rows), os.path.join(out_dir, PREDICTIONS_FILE))
    return report


def _prepare(spec: ScoringSpec, sample: Sample, oracle: bool, endpoint: str | None) -> Prepared:
    """The test image decoded as ``onenip score`` and ``serve`` decode it (``ScoringSpec.prepare``),
    its class given only with ``oracle``; a test image that does not decode is an error."""
    data = storage.read_bytes(sample.uri, endpoint)
    prepared = spec.prepare(sample.uri, data, sample.class_name if oracle else None)
    if prepared.error is not None:
        raise InputError(f"test image {sample.uri}: {prepared.error}")
    return prepared


def _test_samples(model: Bundle | ExportedModel, roots: list[tuple[str, str]], classes: list[str] | None,
                  endpoint: str | None) -> list[Sample]:
    """The test split of ``roots``; every class in it must be one of the model's."""
    samples = [s for s in read_datasets(roots, classes or None, endpoint) if s.split == "test"]
    unknown = sorted({s.class_name for s in samples} - set(model.classes))
    if unknown:
        raise InputError(f"test classes {unknown} are not in the bundle (classes: {model.classes})")
    return samples


def _predict_with_branches(predictor: Predictor, inputs: np.ndarray, given_class: np.ndarray
                           ) -> tuple[Prediction[np.ndarray], dict[str, np.ndarray]]:
    """The PyTorch prediction of network inputs, computed as the Scorer's engine computes it, and
    each branch's map fused alone (``BRANCHES``)."""
    with torch.inference_mode():
        feats = predictor.features_of(torch.from_numpy(inputs).to(predictor.device))
        pred = predictor.predict_features(*feats, torch.from_numpy(given_class))
    branches = {name: fuse(pred.maps, predictor.config, predictor.rec_scale, predictor.alpha, beta,
                           predictor.neighbor_scale).cpu().numpy() for name, beta in BRANCHES.items()}
    return pred.numpy(), branches


def sample_mask(sample: Sample, size: int, endpoint: str | None = None) -> np.ndarray:
    """A test sample's ground-truth mask at ``size`` × ``size`` (all False without one)."""
    if sample.label and sample.mask_uri:
        return resize_mask(decode_mask(storage.read_bytes(sample.mask_uri, endpoint), sample.mask_uri), size)
    return np.zeros((size, size), dtype=bool)


def _collect(per_class: dict[str, dict[str, list]], sample: Sample, pred: Prediction[np.ndarray],
             branches: dict[str, np.ndarray], i: int, size: int, endpoint: str | None) -> None:
    """Image ``i``'s label, score, mask and maps into its class's accumulators."""
    mask = sample_mask(sample, size, endpoint)
    acc = per_class.setdefault(sample.class_name, {"labels": [], "scores": [], "masks": [], "maps": [],
                                                   **{b: [] for b in BRANCHES}})
    acc["labels"].append(int(mask.any()) if sample.label else 0)
    acc["scores"].append(float(pred.scores[i]))
    acc["masks"].append(mask)
    acc["maps"].append(pred.fused[i].astype(np.float32))
    for b in branches:
        acc[b].append(branches[b][i].astype(np.float32))


def _row(spec: ScoringSpec, sample: Sample, prepared: Prepared, pred: Prediction[np.ndarray], i: int
         ) -> dict[str, Any]:
    """Image ``i``'s ``predictions.parquet`` row: the decision ``onenip score`` and ``serve`` make
    (``ScoringSpec.result_row``: the routed class's threshold, unknown products flagged), with the
    image's true class and label, and the decision at its own class's threshold beside."""
    raw = float(pred.scores[i])
    deployed = spec.result_row(prepared, pred.fused[i], raw, int(pred.prompt_index[i]), float(pred.similarity[i]),
                               run_id="evaluate", run_date=dt.date.today(), upstream_ms=0.0)
    own = spec.class_calibration(sample.class_name).threshold_raw
    return {
        "image_uri": sample.uri, "class_name": sample.class_name, "routed_class": deployed["class_name"],
        "route_similarity": deployed["route_similarity"], "prompt_id": deployed["prompt_id"],
        "label": int(sample.label), "defect": sample.defect, "mask_uri": sample.mask_uri if sample.label else None,
        "score_raw": raw, "score": deployed["score"], "threshold_raw": deployed["threshold_raw"],
        "is_anomalous": deployed["is_anomalous"],
        "own_class_threshold_raw": own, "own_class_is_anomalous": raw > own,
    }


def _report(model: Bundle | ExportedModel, per_class: dict[str, dict[str, list]], rows: list[dict[str, Any]],
            predictor: Predictor | None) -> dict[str, Any]:
    """Per-class metrics, their means, routing accuracy, the threshold sweep and (PyTorch) the branches."""
    results, branch_results, sweeps = {}, {}, {}
    for cls in sorted(per_class):
        acc = per_class[cls]
        labels, scores, masks = np.array(acc["labels"]), np.array(acc["scores"]), np.stack(acc["masks"])
        cal = model.calibration.per_class[cls]
        results[cls] = class_metrics(labels, scores, masks, np.stack(acc["maps"]))
        decided = np.array([r["is_anomalous"] for r in rows if r["class_name"] == cls], bool)
        results[cls].update(_at_threshold(labels, decided))
        own = _at_threshold(labels, scores > cal.threshold_raw)
        results[cls].update({f"own_class_{k}": v for k, v in own.items()})
        results[cls]["target_fpr"] = model.calibration.target_of(cls)
        sweeps[cls] = _threshold_sweep(labels, scores, cal)
        results[cls]["num_images"] = int(len(labels))
        routed = [r["routed_class"] for r in rows if r["class_name"] == cls]
        results[cls]["unknown_fraction"] = float(np.mean([c == UNKNOWN_CLASS for c in routed]))
        branch_results[cls] = {b: branch_metrics(labels, masks, np.stack(acc[b]), model.config.score_pool)
                               for b in BRANCHES if acc[b]}
    return {
        "per_class": results,
        "mean": summarize({c: {k: v for k, v in m.items() if k not in NOT_AVERAGED} for c, m in results.items()}),
        "thresholds": {cls: _threshold_basis(model.calibration, cls) for cls in sorted(per_class)},
        "neighbor_pool": {cls: _neighbor_pool(model, cls) for cls in sorted(per_class)},
        "routing_accuracy": _routing_accuracy(rows),
        "threshold_sweep": sweeps,
        "branches": None if predictor is None else {
            "per_class": branch_results,
            "mean": {b: summarize({c: r[b] for c, r in branch_results.items()}) for b in BRANCHES},
            "weights": {"alpha": predictor.alpha, "neighbor_weight": predictor.neighbor_weight}},
    }


def _threshold_basis(calibration: Calibration, cls: str) -> dict[str, Any]:
    """What class ``cls``'s threshold rests on: its calibration scores, the rule they allow and the
    range the false-positive rate on fresh normals lies in for that many (``fpr_interval``)."""
    cal = calibration.per_class[cls]
    target = calibration.target_of(cls)
    return {"calibration_normals": cal.num_images, "rule": cal.rule(target), "expected_fpr": cal.expected_fpr(target)}


def _neighbor_pool(model: Bundle | ExportedModel, cls: str) -> dict[str, Any]:
    """The neighbourhood class ``cls``'s patches are averaged over and, where the bundle recorded it,
    each candidate's separation on the class's own normals (``enrolment.neighbor_pool_summary``)."""
    training = model.meta.get("training", {})
    added = [a for a in training.get("added_classes", []) if a.get("class") == cls]
    recorded = added[-1].get("neighbor_pool") if added else training.get("neighbor_pool", {}).get(cls)
    return {"kept": model.pool.neighbor_pool[model.pool.class_names.index(cls)],
            "separation": (recorded or {}).get("separation")}


def _routing_accuracy(rows: list[dict[str, Any]]) -> float:
    """The fraction of images routed to their own class (NaN without images)."""
    return float(np.mean([r["routed_class"] == r["class_name"] for r in rows])) if rows else float("nan")


def _threshold_sweep(labels: np.ndarray, scores: np.ndarray, cal: ClassCalibration) -> dict[str, dict[str, float]]:
    """The operating point of the same threshold rule at each of ``SWEEP_FPR``."""
    sweep = {}
    for fpr in SWEEP_FPR:
        t = cal.retargeted(fpr).threshold_raw
        sweep[str(fpr)] = {"threshold_raw": t, **_at_threshold(labels, scores > t)}
    return sweep


def branch_metrics(labels: np.ndarray, masks: np.ndarray, maps: np.ndarray, pool: int) -> dict[str, float]:
    """Image AUROC, pixel AUROC and pixel AP of one branch's maps (image score as deployed)."""
    return {"image_auroc": image_auroc(labels, image_scores(torch.from_numpy(maps), pool).numpy()),
            "pixel_auroc": pixel_auroc(masks, maps), "pixel_ap": pixel_ap(masks, maps)}


def _at_threshold(labels: np.ndarray, anomalous: np.ndarray) -> dict[str, float]:
    """Precision, recall, F1 and FPR of the decisions ``anomalous``."""
    c = confusion(labels, anomalous)
    tp, fp, fn, tn = c["TP"], c["FP"], c["FN"], c["TN"]
    precision = tp / (tp + fp) if tp + fp else float("nan")
    recall = tp / (tp + fn) if tp + fn else float("nan")
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else float("nan")
    return {"threshold_precision": precision, "threshold_recall": recall, "threshold_f1": f1,
            "threshold_fpr": fp / (fp + tn) if fp + tn else float("nan")}
