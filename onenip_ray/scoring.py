"""Image bytes → result rows (``onenip_ray.schema``), shared by batch scoring and online serving.

Three steps, usable one by one where they run on different workers (Ray Data):

1. ``ScoringSpec.prepare``: guarded decode, resize to the network size and normalise (CPU, no model);
   an unusable input becomes a ``Prepared`` carrying an ``error`` message, never an exception.
2. ``Scorer.infer``: one batched forward pass (backbone → prompt retrieval or the given class's
   prompts → fused map and image score) by the Scorer's engine (``engines.py``: PyTorch on a
   bundle, or ONNX Runtime / OpenVINO on an ``onenip export`` directory).
3. ``ScoringSpec.result_row``: calibrated score, decision, regions in original pixels, areas.

``Scorer.score_bytes`` runs all three. The spec holds no weights, so it is cheap to ship to tasks.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import time
import uuid
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import torch

from .bundle import Bundle
from .calibration import Calibration, ClassCalibration, calibrated_score
from .data.images import DEFAULT_MAX_PIXELS, ImageError, decode_for_size, to_network_input
from .engines import Engine, ExportedModel, load_model, make_engine
from .formats import UNKNOWN_CLASS
from .predictor import Prediction
from .schema import (
    CLASS_GIVEN,
    CLASS_RETRIEVED,
    ERROR_INVALID_IMAGE,
    ERROR_UNKNOWN_CLASS,
    RESULT_COLUMNS,
    STATUS_OK,
    THRESHOLD_MANUAL,
    THRESHOLD_PER_CLASS,
    error_row,
    utc_now,
)

Item = tuple[str, bytes, str | None]
MAP_KEY = "anomaly_map"  # extra key of ``score_bytes(with_maps=True)`` rows: the fused map (S, S) float32


@dataclass
class Prepared:
    """One input after decoding: the normalised network input, or why there is none."""

    image_uri: str
    class_name: str | None = None  # as given by the caller
    given_class: int = -1  # index of the class given by the caller, -1 = retrieve it
    image_sha256: str | None = None
    width: int | None = None
    height: int | None = None
    input: np.ndarray | None = None  # (3, S, S) float32
    error: str | None = None
    prepare_ms: float = 0.0
    error_kind: str | None = None  # one of schema.ERROR_* when ``error`` is set


@dataclass(frozen=True)
class ScoringSpec:
    """Everything about a bundle that pre- and post-processing need, without its weights."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    class_names: tuple[str, ...]
    prompt_ids: tuple[str, ...]
    prompt_class: tuple[int, ...]
    calibration: Calibration
    score_pool: int
    model_version: str
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_regions: int = 100

    @classmethod
    def from_bundle(cls, bundle: Bundle | ExportedModel, max_pixels: int = DEFAULT_MAX_PIXELS,
                    max_regions: int = 100) -> "ScoringSpec":
        """From a bundle or an export directory (which carries the bundle's ``bundle.json`` and pool)."""
        norm = bundle.meta["normalization"]
        return cls(
            image_size=bundle.config.image_size, mean=tuple(norm["mean"]), std=tuple(norm["std"]),
            class_names=tuple(bundle.classes), prompt_ids=tuple(bundle.pool.prompt_ids),
            prompt_class=tuple(int(c) for c in bundle.pool.class_index.tolist()), calibration=bundle.calibration,
            score_pool=bundle.config.score_pool, model_version=bundle.version, max_pixels=max_pixels,
            max_regions=max_regions,
        )

    def prepare(self, image_uri: str, data: bytes, class_name: str | None = None) -> Prepared:
        """Check the class, decode with guards and resize (``decode_for_size``: bounded memory), and
        normalise; failures land in ``error``."""
        start = time.perf_counter()
        sha = hashlib.sha256(data).hexdigest()
        prepared = Prepared(image_uri, class_name, image_sha256=sha)
        if class_name is not None and class_name not in self.class_names:
            known = ", ".join(self.class_names)
            prepared.error = f"{image_uri}: unknown class {class_name!r}; this model knows {known}"
            prepared.error_kind = ERROR_UNKNOWN_CLASS
        else:
            if class_name is not None:
                prepared.given_class = self.class_names.index(class_name)
            try:
                decoded = decode_for_size(data, self.image_size, image_uri, self.max_pixels)
                image, prepared.width, prepared.height = decoded
                prepared.input = to_network_input(image, self.mean, self.std)
            except ImageError as exc:
                prepared.error = str(exc)
            except cv2.error as exc:
                prepared.error = f"{image_uri}: OpenCV failed to decode or resize: {exc.err or exc}"
            except Exception as exc:  # noqa: BLE001 - a decoder bug on one input must not fail its whole batch
                prepared.error = f"{image_uri}: cannot decode ({type(exc).__name__}: {exc})"
            if prepared.error is not None:
                prepared.error_kind = ERROR_INVALID_IMAGE
        prepared.prepare_ms = (time.perf_counter() - start) * 1e3
        return prepared

    def class_calibration(self, class_name: str) -> ClassCalibration:
        return self.calibration.per_class[class_name]

    def prompt_calibration(self, prompt_index: int) -> ClassCalibration:
        """The calibration of the class a prompt belongs to (also for images flagged unknown)."""
        return self.class_calibration(self.class_names[self.prompt_class[prompt_index]])

    def result_row(
        self,
        prepared: Prepared,
        fused: np.ndarray,
        score_raw: float,
        prompt_index: int,
        route_similarity: float,
        *,
        run_id: str,
        run_date: dt.date,
        upstream_ms: float,
        threshold_override: float | None = None,
        heatmap_uri: str | None = None,
    ) -> dict[str, Any]:
        """The ``status=ok`` row for one image from its fused map (network resolution) and score;
        ``latency_ms`` is ``upstream_ms`` (decode, model batch) plus this post-processing. A
        retrieved image below its nearest class's ``route_floor`` is ``UNKNOWN_CLASS`` and anomalous
        (scored against that nearest class)."""
        start = time.perf_counter()
        class_name = self.class_names[self.prompt_class[prompt_index]]
        cal = self.class_calibration(class_name)
        if prepared.class_name is None and route_similarity < cal.route_floor:
            class_name = UNKNOWN_CLASS
        threshold = cal.threshold_raw if threshold_override is None else float(threshold_override)
        is_anomalous = score_raw > threshold or class_name == UNKNOWN_CLASS
        regions, area = ([], 0) if not is_anomalous else find_regions(
            fused, threshold, self.score_pool, prepared.width, prepared.height, include_peak=True)
        row = dict.fromkeys(RESULT_COLUMNS)
        row.update(
            image_uri=prepared.image_uri, image_sha256=prepared.image_sha256, width=prepared.width,
            height=prepared.height,
            class_name=class_name, class_source=CLASS_GIVEN if prepared.class_name is not None else CLASS_RETRIEVED,
            route_similarity=float(route_similarity), prompt_id=self.prompt_ids[prompt_index],
            score_raw=float(score_raw),
            score=float(calibrated_score(score_raw, cal, threshold)), threshold_raw=threshold,
            threshold_source=THRESHOLD_PER_CLASS if threshold_override is None else THRESHOLD_MANUAL,
            is_anomalous=bool(is_anomalous), defect_area_px=area,
            defect_area_pct=100.0 * area / (prepared.width * prepared.height), max_pixel_score=float(fused.max()),
            num_regions=len(regions), regions=regions[: self.max_regions], heatmap_uri=heatmap_uri, status=STATUS_OK,
            model_version=self.model_version, run_id=run_id, run_date=run_date, scored_at=utc_now(),
            latency_ms=upstream_ms + (time.perf_counter() - start) * 1e3,
        )
        return row

    def error_row(self, prepared: Prepared, *, run_id: str, run_date: dt.date) -> dict[str, Any]:
        """The ``status=error`` row for an input that could not be scored."""
        return error_row(
            prepared.image_uri, prepared.error or "unknown error",
            error_kind=prepared.error_kind or ERROR_INVALID_IMAGE, model_version=self.model_version, run_id=run_id,
            run_date=run_date, image_sha256=prepared.image_sha256, width=prepared.width, height=prepared.height,
            class_name=prepared.class_name, latency_ms=prepared.prepare_ms,
        )


def smoothed_map(fused: np.ndarray, pool: int) -> np.ndarray:
    """Same-size k×k mean filter whose maximum is the image score (``image_scores``): each pixel
    takes the mean of the k×k window centred on it, shifted to lie inside the map at the borders."""
    height, width = fused.shape
    k = min(pool, height, width)
    box = cv2.blur(np.ascontiguousarray(fused, np.float32), (k, k), borderType=cv2.BORDER_REPLICATE)
    half = k // 2
    rows = np.clip(np.arange(height), half, height - k + half)
    cols = np.clip(np.arange(width), half, width - k + half)
    return box[np.ix_(rows, cols)]


def _pixel_edges(size: int, original: int) -> np.ndarray:
    """Map pixel i covers original pixels [edges[i], edges[i+1]) under nearest-neighbour upscaling."""
    return (np.arange(size + 1, dtype=np.int64) * original + size - 1) // size


def find_regions(
    fused: np.ndarray, threshold: float, pool: int, width: int, height: int, include_peak: bool = False
) -> tuple[list[dict[str, Any]], int]:
    """Connected components (8-connected) of ``smoothed_map(fused) > threshold``, in original pixels.

    Returns all regions sorted by ``peak_score`` (the smoothed map's maximum inside, raw units)
    descending, and the total defect area in original pixels. Regions covering no original pixel
    (originals smaller than the map) are dropped. ``include_peak`` also marks the map's maximum:
    for an image already judged anomalous by its score, which can exceed the threshold by less
    than the two filters' float rounding differ.
    """
    smooth = smoothed_map(fused, pool)
    mask = (smooth > threshold).astype(np.uint8)
    if include_peak:
        mask.flat[int(np.argmax(smooth))] = 1
    if not mask.any():
        return [], 0
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    rows, cols = _pixel_edges(fused.shape[0], height), _pixel_edges(fused.shape[1], width)
    weights = np.outer(np.diff(rows), np.diff(cols)).ravel()
    areas = np.bincount(labels.ravel(), weights=weights, minlength=count).round().astype(np.int64)
    peaks = np.full(count, -np.inf)
    inside = labels > 0
    np.maximum.at(peaks, labels[inside], smooth[inside].astype(np.float64))
    regions = []
    for label in range(1, count):
        if areas[label] == 0:
            continue
        x, y, w, h = (int(v) for v in stats[label, :4])
        regions.append({
            "x": int(cols[x]), "y": int(rows[y]), "w": int(cols[x + w] - cols[x]), "h": int(rows[y + h] - rows[y]),
            "area_px": int(areas[label]), "peak_score": float(peaks[label]),
        })
    regions.sort(key=lambda r: -r["peak_score"])
    return regions, int(sum(r["area_px"] for r in regions))


class Scorer:
    """A loaded model that turns image bytes into result rows (batch job and online service).
    ``runtime`` picks the engine: ``torch`` runs a bundle, ``onnxruntime``/``openvino`` an
    ``onenip export`` directory; the rows are the same (within the export's parity bounds)."""

    def __init__(
        self,
        model: Bundle | ExportedModel,
        *,
        runtime: str = "torch",
        device: str | torch.device = "cpu",
        threads: int | None = None,
        batch_size: int = 16,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        run_id: str | None = None,
        run_date: dt.date | None = None,
    ) -> None:
        self.spec = ScoringSpec.from_bundle(model, max_pixels)
        self.engine: Engine = make_engine(model, runtime, str(device), threads)
        self.batch_size = batch_size
        self.run_id = run_id or f"adhoc-{uuid.uuid4().hex[:8]}"
        self.run_date = run_date

    @classmethod
    def from_uri(cls, uri: str, endpoint: str | None = None, runtime: str = "torch", **kwargs: Any) -> "Scorer":
        return cls(load_model(uri, runtime, endpoint), runtime=runtime, **kwargs)

    def infer(self, inputs: np.ndarray, given_class: np.ndarray) -> Prediction[np.ndarray]:
        """Network inputs (N, 3, S, S) float32; ``given_class`` (N,), -1 = retrieve the class."""
        return self.engine.infer(inputs, given_class)

    def score_bytes(
        self, items: list[Item], threshold_override: float | None = None, with_maps: bool = False
    ) -> list[dict[str, Any]]:
        """One result row per ``(image_uri, bytes, class_name or None)``, in order; bad inputs give
        ``status=error`` rows. ``with_maps`` adds ``MAP_KEY`` (the fused map) to ok rows."""
        run_date = self.run_date or utc_now().date()
        prepared = [self.spec.prepare(uri, data, cls) for uri, data, cls in items]
        rows: list[dict[str, Any] | None] = [None] * len(prepared)
        good = [i for i, p in enumerate(prepared) if p.error is None]
        for start in range(0, len(good), self.batch_size):
            chunk = good[start : start + self.batch_size]
            out = self.infer(np.stack([prepared[i].input for i in chunk]),
                             np.array([prepared[i].given_class for i in chunk]))
            for j, i in enumerate(chunk):
                row = self.spec.result_row(
                    prepared[i], out.fused[j], float(out.scores[j]), int(out.prompt_index[j]), float(out.similarity[j]),
                    run_id=self.run_id,
                    run_date=run_date, upstream_ms=prepared[i].prepare_ms + out.seconds * 1e3,
                    threshold_override=threshold_override,
                )
                if with_maps:
                    row[MAP_KEY] = out.fused[j]
                rows[i] = row
        for i, p in enumerate(prepared):
            if p.error is not None:
                rows[i] = self.spec.error_row(p, run_id=self.run_id, run_date=run_date)
        return rows  # type: ignore[return-value]
