"""Pictures (``onenip_ray.visualization``): heat maps on the class's fixed scale, overlays,
thumbnails, masks and the report's figures (no model, no Ray)."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from onenip_ray import visualization as vis
from onenip_ray.calibration import ClassCalibration
from onenip_ray.scoring import find_regions

PNG_MAGIC, JPEG_MAGIC = b"\x89PNG\r\n\x1a\n", b"\xff\xd8"


@pytest.fixture
def cal() -> ClassCalibration:
    return ClassCalibration(threshold_raw=3.0, score_scale=1.0, normal_median=2.0, normal_mean=2.0, normal_std=0.5,
                            map_low=1.0, num_images=5, normal_similarity_min=0.9)


def _decode(data: bytes, flags: int = cv2.IMREAD_COLOR) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(data, np.uint8), flags)


def test_heatmap_uses_class_statistics_not_per_image(cal):
    assert vis.heat_levels(np.array([[0.5, 1.0, 2.0, 3.0, 5.0, 9.0]]), cal).tolist() == [[0, 0, 64, 128, 255, 255]]
    flat = np.full((64, 64), 3.0, np.float32)  # per-image min-max would make this all 0 (or NaN)
    png = _decode(vis.render_heatmap(flat, cal))
    expected = cv2.applyColorMap(np.full((1, 1), 128, np.uint8), cv2.COLORMAP_TURBO)[0, 0]
    assert png.shape == (64, 64, 3) and (png == expected).all()
    assert vis.heat_levels(flat, cal, threshold=5.0)[0, 0] == 64  # a manual threshold moves the midpoint


def test_overlay_is_a_jpeg_at_original_size(cal):
    image = np.full((120, 200, 3), 200, np.uint8)
    fused = np.ones((64, 64), np.float32)
    fused[10:30, 10:30] = 6.0
    regions, _ = find_regions(fused, 3.0, 16, 200, 120)
    jpeg = vis.render_overlay(image, fused, cal, regions)
    assert jpeg[:2] == JPEG_MAGIC
    decoded = _decode(jpeg)
    assert decoded.shape == (120, 200, 3)
    assert np.abs(decoded[5:45, 5:50].astype(int) - 200).max() > 50  # coloured where the map is hot
    assert np.abs(decoded[100:, 150:].astype(int) - 200).max() < 20  # untouched where it is at map_low


def test_thumbnail_shrinks_to_the_longest_side_and_never_enlarges():
    assert vis.thumbnail(np.zeros((600, 300, 3), np.uint8), 256).shape == (256, 128, 3)
    small = np.zeros((100, 50, 3), np.uint8)
    assert vis.thumbnail(small, 256) is small


def test_gallery_image_and_mask_encode_at_the_thumbnail_size():
    rgb = np.zeros((40, 60, 3), np.uint8)
    rgb[..., 0] = 255  # red in RGB
    jpeg = vis.render_image(rgb)
    assert jpeg[:2] == JPEG_MAGIC and _decode(jpeg)[20, 30, 2] > 200  # red lands in the BGR file's last channel
    mask = np.zeros((8, 8), bool)
    mask[:4] = True
    png = vis.render_mask(mask, 60, 40)
    assert png[:8] == PNG_MAGIC
    decoded = _decode(png, cv2.IMREAD_UNCHANGED)
    assert decoded.shape == (40, 60) and set(np.unique(decoded)) == {0, 255} and decoded[:20].all()


def test_figures_are_pngs():
    scores = np.array([0.1, 0.2, 0.8, 0.9])
    roc = vis.roc_figure("bottle", np.array([0, 0, 1.0]), np.array([0, 1.0, 1.0]), 1.0, (0.0, 1.0))
    pr = vis.pr_figure("bottle", np.array([0.5, 1.0]), np.array([1.0, 1.0]), float("nan"), 0.5, None)
    groups = [("good", scores[:2], vis.NORMAL_COLOUR), ("defective", scores[2:], vis.DEFECT_COLOUR),
              ("none", np.array([]), vis.NORMAL_COLOUR)]
    hist = vis.histogram_figure("bottle", groups, threshold=0.5)
    # a single value and no threshold: the bins still span a width
    flat = vis.histogram_figure("bottle", [("good", np.full(3, 0.4), vis.NORMAL_COLOUR)], threshold=None)
    for png in (roc, pr, hist, flat):
        assert png[:8] == PNG_MAGIC and _decode(png).shape[2] == 3
