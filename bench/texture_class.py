"""A generated texture class in MVTec AD's layout, for checking the map on textures here.

    python bench/texture_class.py --out /tmp/texture   # then --data mvtec=/tmp/texture

The shared data holds objects only (bottle, capsules, macaroni1). This writes one class, ``grain``:
each image is a random crop (and flip) of one large stationary texture — oriented fibres over
multi-scale Perlin noise in a brown palette, with a soft lighting gradient that changes per image —
so, as on a textured tile or leather, no position is special and normal patches vary a lot. Test
defects change a region's statistics rather than adding an object-like blob: ``weave`` (the
region's fibres run across: a crop of the texture turned 90°), ``stain`` (a soft darker, redder
region), ``scratch`` (a thin bright polyline) and ``crack`` (a thin dark curved line), each with
its mask in ``ground_truth``. Seeded: the same ``--seed`` writes the same files.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np

from onenip_ray.data.synthesis import perlin_noise

CLASS = "grain"
DEFECTS = ("weave", "stain", "scratch", "crack")
MASTER = 1536  # side of the texture every image is cut from


def master_texture(rng: np.random.Generator, size: int = MASTER) -> np.ndarray:
    """The class's texture: float32 (size, size, 3) in [0, 255]."""
    noise = rng.standard_normal((size, size)).astype(np.float32)
    fibres = cv2.GaussianBlur(noise, (0, 0), sigmaX=9.0, sigmaY=0.8)  # long along x, thin along y
    fibres = (fibres - fibres.mean()) / (fibres.std() + 1e-6)
    cloud = sum(0.5 ** o * perlin_noise(size, (6 * 2 ** o,) * 2, rng) for o in range(4))
    field = 0.6 * fibres + 0.9 * cloud
    field = (field - field.min()) / (field.max() - field.min())
    dark, light = np.array([92.0, 64.0, 44.0]), np.array([196.0, 158.0, 112.0])
    return (dark + field[..., None] * (light - dark)).astype(np.float32)


def crop(texture: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
    """A random crop of ``texture``, flipped at random, under a soft random lighting gradient."""
    y, x = (int(v) for v in rng.integers(0, texture.shape[0] - size, 2))
    out = texture[y : y + size, x : x + size].copy()
    if rng.random() < 0.5:
        out = out[:, ::-1]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    angle = rng.uniform(0, 2 * np.pi)
    gain = 1.0 + rng.uniform(0.0, 0.08) * ((xx - 0.5) * np.cos(angle) + (yy - 0.5) * np.sin(angle))
    return out * gain[..., None]


def blob_mask(rng: np.random.Generator, size: int, area: tuple[float, float]) -> np.ndarray:
    """A smooth irregular region (an ellipse warped by noise) covering about ``area`` of the image."""
    for _ in range(50):
        r = np.sqrt(rng.uniform(*area) * size * size / np.pi)
        cy, cx = rng.uniform(r, size - r, 2)
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
        a = rng.uniform(0.6, 1.6)
        d = ((yy - cy) / (r / a)) ** 2 + ((xx - cx) / (r * a)) ** 2
        mask = d + 0.6 * perlin_noise(size, (8, 8), rng) < 1.0
        if mask.sum() > 0.3 * area[0] * size * size:
            return mask
    return mask


def line_mask(rng: np.random.Generator, size: int, width: int, curved: bool) -> np.ndarray:
    """A thin polyline ``width`` px wide across about a third of the image."""
    mask = np.zeros((size, size), np.uint8)
    length = rng.uniform(0.25, 0.45) * size
    angle = rng.uniform(0, np.pi)
    start = rng.uniform(0.2 * size, 0.8 * size, 2)
    points, heading = [start], angle
    for _ in range(8):
        heading += rng.normal(0, 0.35 if curved else 0.05)
        points.append(points[-1] + length / 8 * np.array([np.cos(heading), np.sin(heading)]))
    cv2.polylines(mask, [np.clip(np.array(points), 0, size - 1).astype(np.int32)], False, 1, width)
    return mask.astype(bool)


def defect(kind: str, image: np.ndarray, texture: np.ndarray,
           rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``image`` with a defect of ``kind``, and its mask."""
    size = image.shape[0]
    out = image.copy()
    if kind == "weave":
        mask = blob_mask(rng, size, (0.004, 0.015))
        out[mask] = np.rot90(crop(texture, rng, size))[mask]
    elif kind == "stain":
        mask = blob_mask(rng, size, (0.004, 0.015))
        soft = cv2.GaussianBlur(mask.astype(np.float32), (0, 0), 3.0)[..., None]
        out = out * (1 - soft) + out * np.array([0.93, 0.88, 0.86]) * soft
    else:
        mask = line_mask(rng, size, int(rng.integers(1, 3)), curved=kind == "crack")
        out[mask] = out[mask] * 0.75 if kind == "crack" else np.minimum(out[mask] * 1.12 + 6, 255)
    return out, mask


def write(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    cv2.imwrite(str(path), rgb[..., ::-1] if rgb.ndim == 3 else rgb)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="dataset root to write (the class goes in OUT/grain)")
    parser.add_argument("--train", type=int, default=120, help="training normals")
    parser.add_argument("--test-good", type=int, default=40, help="normal test images")
    parser.add_argument("--per-defect", type=int, default=15, help="test images per defect kind")
    parser.add_argument("--size", type=int, default=512, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    texture = master_texture(rng)
    root = Path(args.out) / CLASS
    for i in range(args.train):
        write(root / "train" / "good" / f"{i:03d}.png", crop(texture, rng, args.size))
    for i in range(args.test_good):
        write(root / "test" / "good" / f"{i:03d}.png", crop(texture, rng, args.size))
    for kind in DEFECTS:
        for i in range(args.per_defect):
            image, mask = defect(kind, crop(texture, rng, args.size), texture, rng)
            write(root / "test" / kind / f"{i:03d}.png", image)
            write(root / "ground_truth" / kind / f"{i:03d}_mask.png", mask.astype(np.uint8) * 255)
    print(f"wrote {root}: {args.train} train, {args.test_good} good and {len(DEFECTS)} x {args.per_defect} "
          "defective test images")


if __name__ == "__main__":
    main()
