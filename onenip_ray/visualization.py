"""Every picture the tool draws, one small function each: heat maps on the class's fixed scale,
overlays, gallery thumbnails and masks (OpenCV, encoded bytes out), and the report's figures —
ROC, PR and score histogram (matplotlib's Agg canvas, PNG bytes out, no global pyplot state).

Heat maps never stretch per image: ``heat_levels`` maps a class's typical normal level
(``map_low``) to 0 and its threshold to the middle of the colour map, so a colour means the same
everywhere."""
from __future__ import annotations

import io
from typing import Any

import cv2
import numpy as np

from .calibration import ClassCalibration

THUMB_SIDE = 256  # longest side of gallery thumbnails and overlays
OVERLAY_ALPHA = 0.45  # weight of the heat map where it is blended into an image
NORMAL_COLOUR, DEFECT_COLOUR, THRESHOLD_COLOUR, CHANCE_COLOUR = "#3b7dd8", "#d8473b", "#222222", "#999999"


# -- heat maps, overlays, thumbnails -------------------------------------------------------------
def heat_levels(fused: np.ndarray, cal: ClassCalibration, threshold: float | None = None) -> np.ndarray:
    """uint8 levels with the class's statistics (not per image): ``map_low`` → 0, threshold → 128."""
    thr = cal.threshold_raw if threshold is None else threshold
    span = max(thr - cal.map_low, 1e-6)
    return (np.clip(0.5 * (fused - cal.map_low) / span, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def colourize(levels: np.ndarray) -> np.ndarray:
    """uint8 levels → BGR colours of the TURBO colour map."""
    return cv2.applyColorMap(levels, cv2.COLORMAP_TURBO)


def encode_png(image: np.ndarray) -> bytes:
    """PNG bytes of a BGR (or single-channel) image."""
    return cv2.imencode(".png", image)[1].tobytes()


def encode_jpeg(image_bgr: np.ndarray, quality: int = 90) -> bytes:
    """JPEG bytes of a BGR image."""
    return cv2.imencode(".jpg", image_bgr, [cv2.IMWRITE_JPEG_QUALITY, quality])[1].tobytes()


def render_heatmap(fused: np.ndarray, cal: ClassCalibration, threshold: float | None = None) -> bytes:
    """The fused map as a TURBO-coloured PNG at network resolution (see ``heat_levels``)."""
    return encode_png(colourize(heat_levels(fused, cal, threshold)))


def blend_heat(image_bgr: np.ndarray, levels: np.ndarray, alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """``image_bgr`` with the coloured ``levels`` (same size) blended in where they are above 0."""
    weight = np.where(levels > 0, alpha, 0.0)[..., None]
    return (image_bgr * (1.0 - weight) + colourize(levels) * weight).astype(np.uint8)


def draw_boxes(image_bgr: np.ndarray, regions: list[dict[str, Any]]) -> np.ndarray:
    """White boxes around ``regions`` (``x, y, w, h`` in the image's pixels), drawn in place."""
    height, width = image_bgr.shape[:2]
    thickness = max(1, round(max(width, height) / 300))
    for r in regions:
        corner = (r["x"] + r["w"] - 1, r["y"] + r["h"] - 1)
        cv2.rectangle(image_bgr, (r["x"], r["y"]), corner, (255, 255, 255), thickness)
    return image_bgr


def render_overlay(
    image_rgb: np.ndarray, fused: np.ndarray, cal: ClassCalibration, regions: list[dict[str, Any]],
    threshold: float | None = None, quality: int = 90,
) -> bytes:
    """JPEG of the original image with the heat map blended where it is above ``map_low`` and the
    regions' boxes drawn (original resolution)."""
    height, width = image_rgb.shape[:2]
    levels = cv2.resize(heat_levels(fused, cal, threshold), (width, height), interpolation=cv2.INTER_LINEAR)
    blended = blend_heat(cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR), levels)
    return encode_jpeg(draw_boxes(blended, regions), quality)


def thumbnail(image: np.ndarray, side: int = THUMB_SIDE) -> np.ndarray:
    """``image`` shrunk (never enlarged) so that its longest side is at most ``side``."""
    height, width = image.shape[:2]
    scale = side / max(height, width)
    if scale >= 1:
        return image
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def render_image(image_rgb: np.ndarray, quality: int = 90) -> bytes:
    """JPEG of an RGB image (a gallery thumbnail)."""
    return encode_jpeg(cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR), quality)


def render_mask(mask: np.ndarray, width: int, height: int) -> bytes:
    """PNG of a boolean ground-truth mask, white on black, resized (nearest) to ``width`` × ``height``."""
    levels = mask.astype(np.uint8) * 255
    return encode_png(cv2.resize(levels, (width, height), interpolation=cv2.INTER_NEAREST))


# -- figures -------------------------------------------------------------------------------------
def _figure(width: float = 4.0, height: float = 3.2):
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # Agg only: no display, no global pyplot state
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=90, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def _percent_label(name: str, value: float | None) -> str | None:
    return f"{name} {100 * value:.1f}" if value is not None and np.isfinite(value) else None


def _mark_operating_point(ax, point: tuple[float, float] | None) -> None:
    if point:
        ax.plot(*point, "o", color=THRESHOLD_COLOUR, label="deployed threshold")


def roc_figure(
    cls: str, fpr: np.ndarray, tpr: np.ndarray, auroc: float | None, operating: tuple[float, float] | None
) -> bytes:
    """PNG of the ROC curve of class ``cls``, the chance diagonal and the deployed threshold's point."""
    fig, ax = _figure()
    ax.plot(fpr, tpr, color=DEFECT_COLOUR, lw=2, label=_percent_label("AUROC", auroc))
    ax.plot([0, 1], [0, 1], color=CHANCE_COLOUR, lw=1, ls=":")
    _mark_operating_point(ax, operating)
    ax.set(xlim=(-0.02, 1.02), ylim=(-0.02, 1.02), xlabel="false positive rate", ylabel="true positive rate",
           title=f"ROC — {cls}")
    ax.legend(loc="lower right", fontsize=8)
    return _png(fig)


def pr_figure(
    cls: str, recall: np.ndarray, precision: np.ndarray, ap: float | None, base_rate: float,
    operating: tuple[float, float] | None,
) -> bytes:
    """PNG of the precision-recall curve of class ``cls``, the share of defective images as the
    chance level, and the deployed threshold's point."""
    fig, ax = _figure()
    ax.step(recall, precision, where="post", color=DEFECT_COLOUR, lw=2, label=_percent_label("AP", ap))
    ax.axhline(base_rate, color=CHANCE_COLOUR, lw=1, ls=":", label=f"share defective {100 * base_rate:.0f} %")
    _mark_operating_point(ax, operating)
    ax.set(xlim=(-0.02, 1.02), ylim=(-0.02, 1.02), xlabel="recall", ylabel="precision", title=f"PR — {cls}")
    ax.legend(loc="lower left", fontsize=8)
    return _png(fig)


def _shared_bins(groups: list[tuple[str, np.ndarray, str]], threshold: float | None, count: int = 30) -> np.ndarray:
    values = [scores for _, scores, _ in groups if len(scores)]
    everything = np.concatenate(values + ([np.array([threshold])] if threshold is not None else []))
    lo, hi = float(everything.min()), float(everything.max())
    return np.linspace(lo, hi if hi > lo else lo + 1e-6, count + 1)


def histogram_figure(cls: str, groups: list[tuple[str, np.ndarray, str]], threshold: float | None) -> bytes:
    """PNG of raw image scores per group (label, scores, colour) on shared bins, the threshold as a line."""
    fig, ax = _figure()
    bins = _shared_bins(groups, threshold)
    for label, scores, colour in groups:
        if len(scores):
            ax.hist(scores, bins=bins, color=colour, alpha=0.6, label=f"{label} ({len(scores)})")
    if threshold is not None:
        ax.axvline(threshold, color=THRESHOLD_COLOUR, ls="--", lw=1.5, label=f"threshold {threshold:.4g}")
    ax.set(xlabel="image score (raw)", ylabel="images", title=f"scores — {cls}")
    ax.legend(fontsize=8)
    return _png(fig)


# -- drift figures (``onenip drift``) ------------------------------------------------------------
PSI_GUIDES = ((0.1, "moderate"), (0.25, "major"))  # the usual reading of a population stability index


def _night_axis(ax, dates: list[str], narrow: bool = False) -> None:
    """Nights as ``MM-DD`` ticks, turned upright where they would overlap."""
    upright = len(dates) > (3 if narrow else 8)
    ax.set_xticks(range(len(dates)), labels=[d[5:] for d in dates], rotation=90 if upright else 0, fontsize=7)


def trend_figure(cls: str, dates: list[str], volume: np.ndarray, rate: np.ndarray, low: np.ndarray,
                 high: np.ndarray) -> bytes:
    """PNG of a class's scored images per night (bars) and its anomaly rate with the 95 % interval
    (line and band, right axis, percent); NaN rates (no rows) leave gaps."""
    fig, ax = _figure(5.0, 3.0)
    x = np.arange(len(dates))
    ax.bar(x, volume, color=NORMAL_COLOUR, alpha=0.35, label="scored images")
    ax.set(ylabel="images per night", title=f"volume and anomaly rate — {cls}")
    _night_axis(ax, dates)
    right = ax.twinx()
    right.fill_between(x, 100 * low, 100 * high, color=DEFECT_COLOUR, alpha=0.18, label="95 % interval")
    right.plot(x, 100 * rate, "o-", color=DEFECT_COLOUR, lw=1.5, label="anomaly rate")
    right.set(ylabel="anomalous (%)", ylim=(0, 100))
    handles = ax.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    ax.legend(handles=handles, fontsize=7, loc="upper left")
    return _png(fig)


def quantiles_figure(cls: str, dates: list[str], quantiles: dict[str, np.ndarray], threshold: np.ndarray,
                     reference: dict[str, float | None]) -> bytes:
    """PNG of small multiples, one panel per score quantile (``p50``…): its value per night, the
    night's threshold (dashed) and the calibration normals' same quantile (dotted) where known."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(2.2 * len(quantiles) + 0.6, 2.8), dpi=90, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(quantiles), sharey=True)
    for ax, (name, values) in zip(np.atleast_1d(axes), quantiles.items()):
        ax.plot(range(len(dates)), values, "o-", color=NORMAL_COLOUR, lw=1.5, label=name)
        ax.plot(range(len(dates)), threshold, "--", color=THRESHOLD_COLOUR, lw=1, label="threshold")
        if reference.get(name) is not None:
            ax.axhline(reference[name], color=CHANCE_COLOUR, ls=":", lw=1.2, label="calibration")
        ax.set_title(f"{name} of score_raw", fontsize=9)
        _night_axis(ax, dates, narrow=True)
    np.atleast_1d(axes)[0].legend(fontsize=7)
    fig.suptitle(f"score quantiles per night — {cls}", fontsize=10)
    return _png(fig)


def shift_figure(cls: str, dates: list[str], series: dict[str, np.ndarray]) -> bytes:
    """PNG of the PSI per night of each (signal vs reference) series, grouped bars, with the
    moderate / major guide lines; NaN (not computable) draws no bar."""
    fig, ax = _figure(5.0, 3.0)
    width = 0.8 / max(1, len(series))
    for i, (label, values) in enumerate(series.items()):
        ax.bar(np.arange(len(dates)) + (i - (len(series) - 1) / 2) * width, values, width, label=label)
    for level, name in PSI_GUIDES:
        ax.axhline(level, color=THRESHOLD_COLOUR if name == "major" else CHANCE_COLOUR, ls="--", lw=1)
    ax.set(ylabel="PSI", title=f"distribution shift — {cls}")
    _night_axis(ax, dates)
    ax.legend(fontsize=7)
    return _png(fig)
