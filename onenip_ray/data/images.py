"""Guarded image decoding (OpenCV, RGB uint8), resizing and normalisation.

Every decode checks, before any pixel is decoded: the data is non-empty, its header names an
image (read by Pillow, header only), the pixel count is under ``max_pixels`` (decompression
bombs), both sides are at least ``MIN_SIDE``, and PNG/JPEG data is complete (truncated files
would otherwise decode into partly gray images).
"""
from __future__ import annotations

import struct
from io import BytesIO

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 50_000_000
MIN_SIDE = 8

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_JPEG_END = b"\xff\xd9"
_JPEG_TRAILING_PADDING = b"\x00\xff\r\n "


class ImageError(ValueError):
    """An image that cannot be used; the message names it and says why."""


def _png_is_complete(data: bytes) -> bool:
    """Whether the PNG chunk chain reaches its IEND chunk inside ``data``."""
    offset = len(_PNG_SIGNATURE)
    while offset + 8 <= len(data):
        length, chunk_type = struct.unpack(">I4s", data[offset:offset + 8])
        offset += 12 + length
        if chunk_type == b"IEND":
            return offset <= len(data)
    return False


def _jpeg_is_complete(data: bytes) -> bool:
    """Whether the JPEG ends with its EOI marker (trailing zero/0xFF/whitespace padding allowed)."""
    return data.rstrip(_JPEG_TRAILING_PADDING).endswith(_JPEG_END)


def _check_header(data: bytes, name: str, max_pixels: int) -> None:
    """Reject empty, unidentifiable, oversized, tiny or truncated images without decoding pixels."""
    if not data:
        raise ImageError(f"{name}: empty file")
    try:
        with Image.open(BytesIO(data)) as header:
            (width, height), image_format = header.size, header.format
    except Image.DecompressionBombError as exc:
        raise ImageError(f"{name}: over Pillow's hard decompression-bomb limit ({exc}); our limit is {max_pixels} px") from exc
    except UnidentifiedImageError as exc:
        raise ImageError(f"{name}: not a decodable image (unknown format; starts with {data[:12]!r})") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"{name}: not a decodable image ({exc})") from exc
    if width * height > max_pixels:
        raise ImageError(f"{name} is {width}×{height} = {width * height} px, over the limit of {max_pixels} px")
    if min(width, height) < MIN_SIDE:
        raise ImageError(f"{name} is {width}×{height} px; both sides must be at least {MIN_SIDE} px")
    if image_format == "PNG" and not _png_is_complete(data):
        raise ImageError(f"{name}: truncated PNG (no IEND chunk)")
    if image_format == "JPEG" and not _jpeg_is_complete(data):
        raise ImageError(f"{name}: truncated JPEG (no end-of-image marker FFD9)")


def _imdecode(data: bytes, name: str, flags: int) -> np.ndarray:
    decoded = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    if decoded is None:
        raise ImageError(f"{name}: not a decodable image (OpenCV could not decode it)")
    return decoded


def decode_image(data: bytes, name: str = "<bytes>", max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode to an (H, W, 3) uint8 RGB array, raising ImageError naming ``name`` for unusable data.

    Grayscale is repeated to 3 channels, an alpha channel is dropped (not composited), 16-bit
    data keeps its high byte (65535 -> 255) and EXIF orientation is applied.
    """
    _check_header(data, name, max_pixels)
    return cv2.cvtColor(_imdecode(data, name, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def decode_mask(data: bytes, name: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode a ground-truth mask to an (H, W) bool array: True where its grayscale value is > 0.

    MVTec-style masks are 0/255; any non-zero gray level counts as anomalous.
    """
    _check_header(data, name, max_pixels)
    return _imdecode(data, name, cv2.IMREAD_GRAYSCALE) > 0


def resize_image(img: np.ndarray, size: int) -> np.ndarray:
    """Resize to ``size``×``size``: area averaging when shrinking both sides, bilinear otherwise."""
    height, width = img.shape[:2]
    shrinking = size <= height and size <= width
    return cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """Resize a bool mask to ``size``×``size`` with nearest-neighbour sampling; stays bool."""
    return cv2.resize(mask.astype(np.uint8), (size, size), interpolation=cv2.INTER_NEAREST).astype(bool)


def normalize(img: np.ndarray, mean: tuple[float, float, float], std: tuple[float, float, float]) -> np.ndarray:
    """uint8 (H, W, 3) or (N, H, W, 3) RGB -> float32 (..., 3, H, W) as ``(x / 255 - mean) / std``."""
    if img.ndim not in (3, 4) or img.shape[-1] != 3:
        raise ValueError(f"expected (H, W, 3) or (N, H, W, 3) RGB images, got shape {img.shape}")
    scaled = img.astype(np.float32) / 255.0
    normalized = (scaled - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(np.moveaxis(normalized, -1, -3))
