"""Anomaly synthesis for OneNIP's restoration stream (reference doc §3).

Every query gets a synthetic anomalous copy: 25 % CutPaste, 25 % CutPaste-scar, 50 % DRAEM-style
Perlin texture paste. Everything is numpy + cv2 on uint8 RGB arrays and is fully determined by the
``np.random.Generator`` passed in.

Deliberate departures from the official code:

* Perlin noise works for any image size (generated on a grid padded to a multiple of the noise
  resolution, then cropped); the official requires a size divisible by 32.
* Perlin masks covering < 0.5 % of the pixels are redrawn (a few tries, then the threshold is lowered
  to the top 0.5 % of the noise), so every synthetic sample carries an anomaly; the official has no
  guard and can emit empty masks.
* Folder textures are converted to RGB (the official leaves DTD textures BGR).
* Scar sizes (w ∈ [2,16], h ∈ [10,25] px) are scaled by ``image_size / 256`` (identical at 256; the
  official uses these absolute pixels at any size), and the scar is placed using its rotated box
  (the official samples the location with the pre-rotation size).
* Without DTD, textures come from a built-in procedural pool, so training never fails for lack of data.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import cv2
import numpy as np

from onenip_ray.errors import InputError
from onenip_ray.formats import IMAGE_EXTENSIONS
from onenip_ray.storage import list_files, read_bytes

MIN_MASK_FRACTION = 0.005
PERLIN_TRIES = 4


# --------------------------------------------------------------------------------------------------
# Perlin noise
# --------------------------------------------------------------------------------------------------
def _fade(t: np.ndarray) -> np.ndarray:
    return ((6.0 * t - 15.0) * t + 10.0) * t * t * t


def perlin_noise(size: int, res: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """2-D gradient (Perlin) noise of shape (size, size), float32, roughly in [-1, 1].

    ``res`` = number of cells per axis (rows, cols). The grid is padded to a multiple of ``res`` and
    cropped, so any ``size`` works. Scaled by √2 like DRAEM, so the 0.5 threshold keeps its meaning.
    """
    ry, rx = res
    cy, cx = math.ceil(size / ry), math.ceil(size / rx)  # cell size in pixels
    angles = rng.random((ry + 1, rx + 1)) * (2.0 * np.pi)
    gy, gx = np.sin(angles).astype(np.float32), np.cos(angles).astype(np.float32)
    pos_y, pos_x = np.arange(size) / cy, np.arange(size) / cx
    iy, ix = pos_y.astype(np.intp), pos_x.astype(np.intp)
    fy = (pos_y - iy).astype(np.float32)[:, None]
    fx = (pos_x - ix).astype(np.float32)[None, :]

    def corner(oy: int, ox: int) -> np.ndarray:
        cols = ix + ox
        return gx[iy + oy][:, cols] * (fx - ox) + gy[iy + oy][:, cols] * (fy - oy)

    n00, n01, n10, n11 = corner(0, 0), corner(0, 1), corner(1, 0), corner(1, 1)
    ty, tx = _fade(fy), _fade(fx)
    top = n00 + tx * (n01 - n00)
    bottom = n10 + tx * (n11 - n10)
    return (np.float32(math.sqrt(2.0)) * (top + ty * (bottom - top))).astype(np.float32)


# --------------------------------------------------------------------------------------------------
# Texture sources
# --------------------------------------------------------------------------------------------------
class TextureSource:
    """Where Perlin-paste textures come from; ``sample`` returns a (size, size, 3) uint8 RGB array."""

    def sample(self, rng: np.random.Generator, size: int) -> np.ndarray:
        raise NotImplementedError

    @classmethod
    def from_folder(cls, uri_or_path: str, endpoint: str | None = None) -> TextureSource:
        """Textures from every image found recursively under a folder (e.g. DTD ``images/<cat>/*.jpg``)."""
        return _FolderTextures(str(uri_or_path), endpoint)

    @classmethod
    def procedural(cls, seed: int = 0, pool_size: int = 64) -> TextureSource:
        """Built-in procedural textures (noise, stripes, checks, blotches) from a seeded pool."""
        return _ProceduralTextures(seed, pool_size)

    @classmethod
    def from_images(cls, images: Sequence[np.ndarray]) -> TextureSource:
        """Textures from in-memory uint8 RGB images (e.g. other training images)."""
        return _ImageTextures(images)


def _resize(image: np.ndarray, size: int) -> np.ndarray:
    if image.shape[:2] == (size, size):
        return image
    return cv2.resize(image, (size, size), interpolation=cv2.INTER_LINEAR)


class _FolderTextures(TextureSource):
    def __init__(self, uri: str, endpoint: str | None) -> None:
        self.uri, self.endpoint = uri, endpoint
        self.files = list_files(uri, extensions=IMAGE_EXTENSIONS, endpoint=endpoint)  # sorted
        if not self.files:
            raise InputError(
                f"no texture images ({', '.join(IMAGE_EXTENSIONS)}) found under {uri!r}; "
                "point it at a DTD-style folder or use TextureSource.procedural()"
            )

    def sample(self, rng: np.random.Generator, size: int) -> np.ndarray:
        uri = self.files[int(rng.integers(len(self.files)))]
        data = np.frombuffer(read_bytes(uri, endpoint=self.endpoint), dtype=np.uint8)
        bgr = cv2.imdecode(data, cv2.IMREAD_COLOR)
        if bgr is None:
            raise InputError(f"cannot decode texture image {uri!r}")
        return cv2.cvtColor(_resize(bgr, size), cv2.COLOR_BGR2RGB)


class _ImageTextures(TextureSource):
    def __init__(self, images: Sequence[np.ndarray]) -> None:
        self.images = [np.ascontiguousarray(im) for im in images]
        if not self.images:
            raise InputError("from_images needs at least one image")
        for im in self.images:
            if im.dtype != np.uint8 or im.ndim != 3 or im.shape[2] != 3:
                raise InputError(f"texture images must be (H, W, 3) uint8 RGB, got {im.dtype} {im.shape}")

    def sample(self, rng: np.random.Generator, size: int) -> np.ndarray:
        return _resize(self.images[int(rng.integers(len(self.images)))], size)


class _ProceduralTextures(TextureSource):
    """A pool of ``pool_size`` textures per requested size, built lazily from ``seed``.

    ``sample`` picks one and applies a random flip/90° rotation; the pool is not pickled (rebuilt on
    demand in each worker, deterministically from the seed).
    """

    def __init__(self, seed: int, pool_size: int) -> None:
        if pool_size < 1:
            raise ValueError("pool_size must be >= 1")
        self.seed, self.pool_size = int(seed), int(pool_size)
        self._pools: dict[int, list[np.ndarray]] = {}

    def __getstate__(self) -> dict:
        return {"seed": self.seed, "pool_size": self.pool_size, "_pools": {}}

    def _pool(self, size: int) -> list[np.ndarray]:
        if size not in self._pools:
            rng = np.random.default_rng([self.seed, size])
            self._pools[size] = [procedural_texture(rng, size) for _ in range(self.pool_size)]
        return self._pools[size]

    def sample(self, rng: np.random.Generator, size: int) -> np.ndarray:
        pool = self._pool(size)
        tex = np.rot90(pool[int(rng.integers(len(pool)))], k=int(rng.integers(4)))
        if rng.random() < 0.5:
            tex = tex[:, ::-1]
        return np.ascontiguousarray(tex)


def _colourise(t: np.ndarray, colours: np.ndarray) -> np.ndarray:
    """Map a field ``t`` in [0, 1] through a piecewise-linear palette of (n, 3) colours."""
    stops = np.linspace(0.0, 1.0, len(colours))
    return np.stack([np.interp(t, stops, colours[:, c]) for c in range(3)], axis=-1)


def _normalise(x: np.ndarray) -> np.ndarray:
    lo, hi = float(x.min()), float(x.max())
    return (x - lo) / (hi - lo + 1e-8)


def procedural_texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """One random RGB texture of shape (size, size, 3), uint8: fractal noise, stripes, checks or blotches."""
    kind = int(rng.integers(4))
    colours = rng.integers(0, 256, size=(int(rng.integers(2, 5)), 3)).astype(np.float64)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    if kind == 0:  # fractal Perlin noise through a random palette
        base = int(rng.integers(0, 3))
        field = sum(0.5**o * perlin_noise(size, (2 ** (base + o),) * 2, rng) for o in range(int(rng.integers(2, 4))))
        img = _colourise(_normalise(field), colours)
    elif kind in (1, 2):  # stripes / checks, random orientation and frequency, optionally warped
        theta = rng.uniform(0.0, np.pi)
        u = xx * np.cos(theta) + yy * np.sin(theta)
        v = -xx * np.sin(theta) + yy * np.cos(theta)
        warp = rng.uniform(0.0, 0.05) * perlin_noise(size, (4, 4), rng)
        wave = np.sin(2 * np.pi * (rng.uniform(2, 30) * (u + warp) + rng.random()))
        if kind == 2:
            wave = np.sign(wave) * np.sign(np.sin(2 * np.pi * (rng.uniform(2, 30) * v + rng.random())))
        hard_edges = rng.random() < 0.5 or kind == 2
        field = (wave > 0).astype(np.float32) if hard_edges else (wave + 1) / 2
        img = _colourise(field, colours[:2])
    else:  # blotches: random ellipses on a background, softened
        img = np.empty((size, size, 3), np.uint8)
        img[:] = colours[0].astype(np.uint8)
        for _ in range(int(rng.integers(5, 40))):
            centre = (int(rng.integers(size)), int(rng.integers(size)))
            axes = tuple(int(a) for a in np.maximum(1, rng.uniform(0.02, 0.2, 2) * size))
            colour = tuple(float(c) for c in colours[int(rng.integers(len(colours)))] + rng.normal(0, 20, 3))
            cv2.ellipse(img, centre, axes, float(rng.uniform(0, 180)), 0, 360, colour, -1)
        img = cv2.GaussianBlur(img, (0, 0), sigmaX=float(rng.uniform(0.3, 2.0))).astype(np.float64)
    img = img + rng.normal(0.0, rng.uniform(0.0, 10.0), size=img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------------
# Colour jitter (torchvision ColorJitter semantics)
# --------------------------------------------------------------------------------------------------
_GRAY = np.array([0.299, 0.587, 0.114], np.float32)


def color_jitter(
    image: np.ndarray,
    rng: np.random.Generator,
    brightness: float = 0.4,
    contrast: float = 0.4,
    saturation: float = 0.4,
    hue: float = 0.1,
) -> np.ndarray:
    """Random brightness/contrast/saturation/hue jitter in random order, like torchvision's ColorJitter."""
    factors = [
        rng.uniform(1 - brightness, 1 + brightness),
        rng.uniform(1 - contrast, 1 + contrast),
        rng.uniform(1 - saturation, 1 + saturation),
        rng.uniform(-hue, hue),
    ]
    img = image.astype(np.float32)
    for op in rng.permutation(4):
        f = np.float32(factors[op])
        if op == 0:
            img = img * f
        elif op == 1:
            img = img * f + (1 - f) * float((img @ _GRAY).mean())
        elif op == 2:
            img = img * f + (1 - f) * (img @ _GRAY)[..., None]
        else:
            hsv = cv2.cvtColor(img / 255.0, cv2.COLOR_RGB2HSV)
            hsv[..., 0] = np.mod(hsv[..., 0] + f * 360.0, 360.0)
            img = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB) * 255.0
        img = np.clip(img, 0.0, 255.0)
    return np.rint(img).astype(np.uint8)


# --------------------------------------------------------------------------------------------------
# Texture augmenters (numpy/cv2 versions of the 10 imgaug augmenters used by DRAEM/OneNIP)
# --------------------------------------------------------------------------------------------------
def _lut(image: np.ndarray, table: np.ndarray) -> np.ndarray:
    return cv2.LUT(np.ascontiguousarray(image), np.clip(np.rint(table), 0, 255).astype(np.uint8))


def _gamma_contrast(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    x = np.arange(256) / 255.0
    return np.dstack([_lut(img[..., c], 255.0 * x ** rng.uniform(0.5, 2.0)) for c in range(3)])


def _brightness(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    ycc = cv2.cvtColor(img, cv2.COLOR_RGB2YCrCb)
    ycc[..., 0] = _lut(ycc[..., 0], np.arange(256) * rng.uniform(0.8, 1.2) + rng.uniform(-30, 30))
    return cv2.cvtColor(ycc, cv2.COLOR_YCrCb2RGB)


_SMOOTH = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], np.float32) / 13.0


def _sharpness(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    degenerate = cv2.filter2D(img, -1, _SMOOTH).astype(np.float32)
    out = degenerate + np.float32(rng.uniform(0.0, 2.0)) * (img.astype(np.float32) - degenerate)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _hue_saturation(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)  # H in [0, 180)
    d_hue, d_sat = rng.uniform(-50, 50, size=2)
    hsv[..., 0] = _lut(hsv[..., 0], np.mod(np.arange(256) + d_hue * 180.0 / 255.0, 180.0))
    hsv[..., 1] = _lut(hsv[..., 1], np.arange(256) + d_sat)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)


def _solarize(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    threshold, apply = rng.uniform(32, 128), rng.random() < 0.5
    x = np.arange(256)
    return _lut(img, np.where(x >= threshold, 255 - x, x)) if apply else img


def _posterize(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    bits = int(rng.integers(1, 9))
    return img & np.uint8((0xFF << (8 - bits)) & 0xFF)


def _flip_lr(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.ascontiguousarray(img[:, ::-1]) if rng.random() < 0.5 else img


def _invert(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return 255 - img


def _autocontrast(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    cutoff = rng.uniform(0.0, 0.2)  # fraction clipped at each end, per channel (PIL semantics)
    out = np.empty_like(img)
    for c in range(3):
        cdf = np.cumsum(np.bincount(img[..., c].ravel(), minlength=256)) / img[..., c].size
        lo, hi = int(np.searchsorted(cdf, cutoff, "right")), int(np.searchsorted(cdf, 1.0 - cutoff, "left"))
        if hi <= lo:
            out[..., c] = img[..., c]
        else:
            out[..., c] = _lut(img[..., c], (np.arange(256) - lo) * (255.0 / (hi - lo)))
    return out


def _equalize(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.dstack([cv2.equalizeHist(np.ascontiguousarray(img[..., c])) for c in range(3)])


AUGMENTERS: tuple[Callable[[np.ndarray, np.random.Generator], np.ndarray], ...] = (
    _gamma_contrast,
    _brightness,
    _sharpness,
    _hue_saturation,
    _solarize,
    _posterize,
    _flip_lr,
    _invert,
    _autocontrast,
    _equalize,
)


def augment_texture(texture: np.ndarray, rng: np.random.Generator, n: int = 3) -> np.ndarray:
    """Apply ``n`` distinct augmenters drawn from :data:`AUGMENTERS`, in random order."""
    for idx in rng.choice(len(AUGMENTERS), size=n, replace=False):
        texture = AUGMENTERS[int(idx)](texture, rng)
    return texture


# --------------------------------------------------------------------------------------------------
# Synthesizer
# --------------------------------------------------------------------------------------------------
def _rotate_expand(patch: np.ndarray, angle: float) -> tuple[np.ndarray, np.ndarray]:
    """Rotate ``patch`` by ``angle`` degrees with canvas expansion; returns (patch, footprint bool mask)."""
    h, w = patch.shape[:2]
    m = cv2.getRotationMatrix2D(((w - 1) / 2.0, (h - 1) / 2.0), angle, 1.0)
    cos, sin = abs(m[0, 0]), abs(m[0, 1])
    nw, nh = int(math.ceil(w * cos + h * sin)), int(math.ceil(w * sin + h * cos))
    m[0, 2] += (nw - w) / 2.0
    m[1, 2] += (nh - h) / 2.0
    rotated = cv2.warpAffine(patch, m, (nw, nh), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    footprint = cv2.warpAffine(np.ones((h, w), np.uint8), m, (nw, nh), flags=cv2.INTER_NEAREST)
    return rotated, footprint.astype(bool)


def _checked_size(image_size: int) -> int:
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16, got {image_size}")
    return int(image_size)


def _check_image(image: np.ndarray, s: int) -> None:
    if image.shape != (s, s, 3) or image.dtype != np.uint8:
        raise ValueError(f"expected ({s}, {s}, 3) uint8 RGB, got {image.dtype} {image.shape}")


class AnomalySynthesizer:
    """Official OneNIP mix: 25 % CutPaste, 25 % CutPaste-scar, 50 % Perlin texture paste.

    ``__call__(image, rng)`` takes a (S, S, 3) uint8 RGB image and returns (synthetic image uint8,
    mask float32 (S, S) in {0, 1}). Pixels outside the mask are left exactly unchanged.
    """

    def __init__(self, image_size: int, textures: TextureSource | None = None) -> None:
        self.image_size = _checked_size(image_size)
        self.textures = textures if textures is not None else TextureSource.procedural()

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        _check_image(image, self.image_size)
        u = rng.random()
        if u < 0.25:
            return self.cutpaste(image, rng)
        if u < 0.5:
            return self.scar(image, rng)
        return self.perlin_paste(image, rng)

    def cutpaste(self, image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Jittered rectangle (2–15 % of the area, aspect 0.3–3.3) cut and pasted elsewhere."""
        s = self.image_size
        area = rng.uniform(0.02, 0.15) * s * s
        aspect = rng.uniform(0.3, 1.0) if rng.random() < 0.5 else rng.uniform(1.0, 3.3)
        w = int(np.clip(int(math.sqrt(area * aspect)), 1, s))
        h = int(np.clip(int(math.sqrt(area / aspect)), 1, s))
        y0, x0 = int(rng.integers(s - h + 1)), int(rng.integers(s - w + 1))
        patch = color_jitter(image[y0 : y0 + h, x0 : x0 + w], rng)
        y1, x1 = int(rng.integers(s - h + 1)), int(rng.integers(s - w + 1))
        out, mask = image.copy(), np.zeros((s, s), np.float32)
        out[y1 : y1 + h, x1 : x1 + w] = patch
        mask[y1 : y1 + h, x1 : x1 + w] = 1.0
        return out, mask

    def scar(self, image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Thin jittered strip (w 2–16, h 10–25 px at 256, scaled by size/256) rotated ±45° and pasted."""
        s = self.image_size
        scale = s / 256.0
        w = max(2, round(int(rng.integers(2, 17)) * scale))
        h = max(2, round(int(rng.integers(10, 26)) * scale))
        y0, x0 = int(rng.integers(s - h + 1)), int(rng.integers(s - w + 1))
        patch = color_jitter(image[y0 : y0 + h, x0 : x0 + w], rng)
        patch, footprint = _rotate_expand(patch, rng.uniform(-45.0, 45.0))
        patch, footprint = patch[:s, :s], footprint[:s, :s]
        ph, pw = footprint.shape
        y1, x1 = int(rng.integers(s - ph + 1)), int(rng.integers(s - pw + 1))
        out, mask = image.copy(), np.zeros((s, s), np.float32)
        out[y1 : y1 + ph, x1 : x1 + pw][footprint] = patch[footprint]
        mask[y1 : y1 + ph, x1 : x1 + pw][footprint] = 1.0
        return out, mask

    def perlin_mask(self, rng: np.random.Generator) -> np.ndarray:
        """Boolean mask = rotated Perlin noise > 0.5, guaranteed to cover >= 0.5 % of the pixels."""
        s = self.image_size
        min_pixels = max(1, math.ceil(MIN_MASK_FRACTION * s * s))
        centre = ((s - 1) / 2.0, (s - 1) / 2.0)
        for _ in range(PERLIN_TRIES):
            res = (2 ** int(rng.integers(1, 6)), 2 ** int(rng.integers(1, 6)))
            rot = cv2.getRotationMatrix2D(centre, rng.uniform(-5.0, 5.0), 1.0)
            noise = cv2.warpAffine(perlin_noise(s, res, rng), rot, (s, s), flags=cv2.INTER_LINEAR)
            mask = noise > 0.5
            if np.count_nonzero(mask) >= min_pixels:
                return mask
        # Last resort: lower the threshold to the top ``min_pixels`` noise values.
        return noise >= np.partition(noise.ravel(), -min_pixels)[-min_pixels]

    def perlin_paste(self, image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """DRAEM-style paste: augmented texture blended with β = 0.8·U(0,1) inside a Perlin mask."""
        s = self.image_size
        mask = self.perlin_mask(rng)
        texture = augment_texture(self.textures.sample(rng, s), rng)
        beta = np.float32(0.8 * rng.random())
        blended = (1 - beta) * texture[mask].astype(np.float32) + beta * image[mask].astype(np.float32)
        out = image.copy()
        out[mask] = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
        return out, mask.astype(np.float32)


Synthesizer = Callable[[np.ndarray, np.random.Generator], tuple[np.ndarray, np.ndarray]]  # (image, rng) → (copy, mask)
HELD_OUT_MIN_PIXELS = 16  # a held-out defect changes at least this many pixels (at any size)
HELD_OUT_CHANGE = 12  # a pixel is part of the defect where some channel changed by more than this
HELD_OUT_TRIES = 6


class HeldOutSynthesizer:
    """Small synthetic defects of kinds training never synthesises, to judge the trained branch
    fairly (the refiner learns ``AnomalySynthesizer``'s kinds and wins on them): a stain (a soft
    ellipse of shifted colour), a scratch (a thin dark or bright polyline), a missing piece (a
    region inpainted from its surroundings) and a dent (a local smooth warp), drawn with equal odds;
    each changes 0.05–8 % of the image (median 0.3–3 % by kind), as real defects of parts tend to.

    ``__call__(image, rng)`` returns (defective image uint8, mask float32 in {0, 1}); the mask is
    exactly the pixels that changed by more than ``HELD_OUT_CHANGE`` in some channel (a draw that
    changes fewer than ``HELD_OUT_MIN_PIXELS`` is redrawn, at last as a stain, which always shows).
    """

    def __init__(self, image_size: int) -> None:
        self.image_size = _checked_size(image_size)
        self.kinds = (self.stain, self.scratch, self.missing, self.dent)

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        _check_image(image, self.image_size)
        for attempt in range(HELD_OUT_TRIES + 1):
            kind = self.kinds[int(rng.integers(len(self.kinds)))] if attempt < HELD_OUT_TRIES else self.stain
            out = kind(image, rng)
            mask = np.abs(out.astype(np.int16) - image.astype(np.int16)).max(-1) > HELD_OUT_CHANGE
            if np.count_nonzero(mask) >= HELD_OUT_MIN_PIXELS:
                break
        return out, mask.astype(np.float32)

    def _centre(self, rng: np.random.Generator, margin: float) -> tuple[float, float]:
        return tuple(float(v) for v in rng.uniform(margin, 1.0 - margin, 2) * self.image_size)

    def stain(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        s = self.image_size
        cy, cx = self._centre(rng, 0.12)
        axes = tuple(max(2, int(rng.uniform(0.01, 0.06) * s)) for _ in range(2))
        mask = np.zeros((s, s), np.float32)
        cv2.ellipse(mask, (int(cx), int(cy)), axes, float(rng.uniform(0.0, 180.0)), 0, 360, 1.0, -1)
        soft = cv2.GaussianBlur(mask, (0, 0), max(0.5, s / 320.0))[..., None]
        shift = rng.choice([-1.0, 1.0]) * rng.uniform(50.0, 110.0) * (1.0 + 0.3 * rng.standard_normal(3))
        return np.clip(image.astype(np.float32) + soft * shift, 0, 255).astype(np.uint8)

    def scratch(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        s = self.image_size
        angle, length = rng.uniform(0.0, 2 * np.pi), rng.uniform(0.08, 0.35) * s
        points = [np.array(self._centre(rng, 0.15))]
        for _ in range(4):
            angle += rng.uniform(-0.4, 0.4)
            points.append(points[-1] + length / 4 * np.array([np.cos(angle), np.sin(angle)]))
        value = rng.uniform(0.0, 50.0) if rng.random() < 0.5 else rng.uniform(200.0, 255.0)
        out = image.copy()
        width = max(1, round(float(rng.uniform(1.0, 3.0)) * s / 320.0))
        cv2.polylines(out, [np.int32(points)[:, ::-1]], False, (value, value, value), width, cv2.LINE_AA)
        return out

    def missing(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        s = self.image_size
        cy, cx = self._centre(rng, 0.15)
        region = np.zeros((s, s), np.uint8)
        axes = tuple(max(2, int(rng.uniform(0.02, 0.07) * s)) for _ in range(2))
        cv2.ellipse(region, (int(cx), int(cy)), axes, float(rng.uniform(0.0, 180.0)), 0, 360, 255, -1)
        return cv2.inpaint(image, region, 5, cv2.INPAINT_TELEA)

    def dent(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        s = self.image_size
        cy, cx = self._centre(rng, 0.2)
        radius = rng.uniform(0.03, 0.07) * s
        yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
        push = rng.uniform(0.3, 0.6) * radius * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * radius * radius))
        angle = rng.uniform(0.0, 2 * np.pi)
        return cv2.remap(image, (xx + push * np.cos(angle)).astype(np.float32),
                         (yy + push * np.sin(angle)).astype(np.float32), cv2.INTER_LINEAR,
                         borderMode=cv2.BORDER_REFLECT)
