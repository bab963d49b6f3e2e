"""Guarded image decoding (OpenCV, RGB uint8), resizing, and the network input (``to_network_input``).

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

from onenip_ray.errors import InputError

DEFAULT_MAX_PIXELS = 50_000_000
MIN_SIDE = 8

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_JPEG_END = b"\xff\xd9"
_JPEG_TRAILING_PADDING = b"\x00\xff\r\n "
_EXIF_ORIENTATION = 0x0112
_TRANSPOSING_ORIENTATIONS = {5, 6, 7, 8}  # rotated by 90°: OpenCV's decode swaps width and height
# libjpeg decodes at 1/2, 1/4 or 1/8 scale directly (DCT scaling), largest reduction first
_GRAY_PNG_MODES = {"1", "L", "I", "I;16", "I;16B"}  # Pillow's modes of grayscale PNGs without alpha
_JPEG_REDUCED = ((8, cv2.IMREAD_REDUCED_COLOR_8), (4, cv2.IMREAD_REDUCED_COLOR_4), (2, cv2.IMREAD_REDUCED_COLOR_2))


class ImageError(InputError):
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


def _check_header(data: bytes, name: str, max_pixels: int) -> tuple[int, int, str | None, str]:
    """Reject empty, unidentifiable, oversized, tiny or truncated images without decoding pixels;
    returns ``(width, height, format, Pillow mode)`` as stored (before any EXIF orientation)."""
    if not data:
        raise ImageError(f"{name}: empty file")
    try:
        with Image.open(BytesIO(data)) as header:
            (width, height), image_format, mode = header.size, header.format, header.mode
    except Image.DecompressionBombError as exc:
        raise ImageError(f"{name}: over Pillow's hard decompression-bomb limit ({exc}); "
                         f"our limit is {max_pixels} px") from exc
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
    return width, height, image_format, mode


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
    return _bgr_to_rgb(_imdecode(data, name, cv2.IMREAD_COLOR))


def decode_for_size(data: bytes, size: int, name: str = "<bytes>",
                    max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[np.ndarray, int, int]:
    """``decode_image`` + ``resize_image`` to a ``size``×``size`` network input, using as little
    memory as the format allows: ``(RGB image, original width, original height)``.

    * A JPEG whose sides are both at least 2 × ``size`` is decoded by libjpeg at the smallest 1/2,
      1/4 or 1/8 scale that keeps both sides ≥ ``size`` (a 48 Mpx photo for a 320 px input: 1/8,
      64× less memory and time).
    * A grayscale PNG (1-bit, 8-bit, 16-bit) is decoded as one channel and expanded to RGB after
      the resize: 1 byte per pixel instead of OpenCV's colour path, which peaks at 6 (its decode
      buffer and the 3-channel result).
    * Anything else is decoded whole in colour (peak 6 bytes per pixel).
    """
    width, height, image_format, mode = _check_header(data, name, max_pixels)
    if image_format == "PNG" and mode in _GRAY_PNG_MODES:
        gray = _imdecode(data, name, cv2.IMREAD_GRAYSCALE)
        small = resize_image(gray, size)
        return cv2.cvtColor(small, cv2.COLOR_GRAY2RGB), gray.shape[1], gray.shape[0]
    if image_format != "JPEG":
        image = _bgr_to_rgb(_imdecode(data, name, cv2.IMREAD_COLOR))
        return resize_image(image, size), image.shape[1], image.shape[0]
    flags = next((f for scale, f in _JPEG_REDUCED if min(width, height) // scale >= size), cv2.IMREAD_COLOR)
    try:
        with Image.open(BytesIO(data)) as header:  # OpenCV applies the EXIF orientation: so does the reported size
            orientation = header.getexif().get(_EXIF_ORIENTATION)
    except Exception:  # noqa: BLE001 - unreadable EXIF: OpenCV ignores it as well
        orientation = None
    if orientation in _TRANSPOSING_ORIENTATIONS:
        width, height = height, width
    return resize_image(_bgr_to_rgb(_imdecode(data, name, flags)), size), width, height


def _bgr_to_rgb(image: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB, dst=image)  # in place: no second full-size copy


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


def rotate_image(img: np.ndarray, degrees: float) -> np.ndarray:
    """``img`` rotated by ``degrees`` (counter-clockwise) about its centre, same size, the corners
    filled by reflection."""
    height, width = img.shape[:2]
    rotation = cv2.getRotationMatrix2D(((width - 1) / 2, (height - 1) / 2), degrees, 1.0)
    return cv2.warpAffine(img, rotation, (width, height), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """Resize a bool mask to ``size``×``size`` with nearest-neighbour sampling; stays bool."""
    return cv2.resize(mask.astype(np.uint8), (size, size), interpolation=cv2.INTER_NEAREST).astype(bool)


def to_network_input(img: np.ndarray, mean: tuple[float, float, float], std: tuple[float, float, float]) -> np.ndarray:
    """uint8 (H, W, 3) or (N, H, W, 3) RGB -> float32 (..., 3, H, W) as ``(x / 255 - mean) / std``."""
    if img.ndim not in (3, 4) or img.shape[-1] != 3:
        raise ValueError(f"expected (H, W, 3) or (N, H, W, 3) RGB images, got shape {img.shape}")
    scaled = img.astype(np.float32) / 255.0
    standardized = (scaled - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(np.moveaxis(standardized, -1, -3))
