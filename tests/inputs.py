"""Image files for scoring tests: good ones in every supported flavour and broken ones, as bytes."""
from __future__ import annotations

import io

import cv2
import numpy as np
from PIL import Image


def _png(img: np.ndarray) -> bytes:
    return cv2.imencode(".png", img)[1].tobytes()


def _jpeg(img: np.ndarray) -> bytes:
    return cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()


def good_inputs(images: list[np.ndarray]) -> dict[str, bytes]:
    """Valid files built from BGR uint8 ``images`` (≥ 7): plain PNG and JPEG, 16-bit, grayscale,
    RGBA, non-square, and a name with spaces and non-ASCII characters."""
    a, b, c, d, e, f, g = images[:7]
    return {
        "plain.png": _png(a),
        "photo.jpg": _jpeg(b),
        "deep16.png": _png(c.astype(np.uint16) * 257),
        "gray.png": _png(cv2.cvtColor(d, cv2.COLOR_BGR2GRAY)),
        "alpha.png": _png(cv2.cvtColor(e, cv2.COLOR_BGR2BGRA)),
        "wide.png": _png(cv2.resize(f, (f.shape[1] * 2, f.shape[0]))),
        "good image ü 檢查.png": _png(g),
    }


def _huge_png(width: int = 8000, height: int = 7000) -> bytes:
    """A real, tiny-on-disk 1-bit PNG of 56 Mpx (over the default 50 Mpx limit)."""
    buffer = io.BytesIO()
    Image.new("1", (width, height)).save(buffer, format="PNG")
    return buffer.getvalue()


def bad_inputs(image: np.ndarray) -> dict[str, str]:
    """Broken files (name → bytes) with a fragment of the expected error message (name → text)."""
    png, jpeg = _png(image), _jpeg(image)
    files = {
        "empty.png": (b"", "empty file"),
        "cut.png": (png[: len(png) // 2], "truncated PNG"),
        "cut.jpg": (jpeg[: len(jpeg) // 2], "truncated JPEG"),
        "notes.jpg": (b"these are meeting notes, not a photo\n" * 4, "not a decodable image"),
        "dot.png": (_png(np.zeros((1, 1, 3), np.uint8)), "both sides must be at least"),
        "huge.png": (_huge_png(), "over the limit"),
    }
    return files
