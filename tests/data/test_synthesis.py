"""Tests for onenip_ray.data.synthesis (CutPaste, scar, Perlin paste, texture sources)."""
from __future__ import annotations

import math
import pickle

import cv2
import numpy as np
import pytest

from onenip_ray.data import synthesis
from onenip_ray.data.synthesis import AUGMENTERS, AnomalySynthesizer, TextureSource, perlin_noise

METHODS = ("cutpaste", "scar", "perlin_paste")


def natural_image(size: int, seed: int = 0) -> np.ndarray:
    """Smooth colour waves plus noise: enough structure that pasted content differs from the input."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    base = np.dstack([128 + 60 * np.sin(xx / 9.0), 128 + 60 * np.cos(yy / 13.0), 100 + 50 * np.sin((xx + yy) / 7.0)])
    return np.clip(base + rng.normal(0, 10, base.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def textures() -> TextureSource:
    return TextureSource.procedural(seed=0, pool_size=8)


@pytest.fixture(scope="module", params=[64, 100])
def synth(request: pytest.FixtureRequest, textures: TextureSource) -> AnomalySynthesizer:
    return AnomalySynthesizer(request.param, textures)


@pytest.mark.parametrize("method", [*METHODS, "__call__"])
def test_output_contract(synth: AnomalySynthesizer, method: str) -> None:
    s = synth.image_size
    image = natural_image(s)
    for seed in range(8):
        out, mask = getattr(synth, method)(image, np.random.default_rng(seed))
        assert out.shape == (s, s, 3) and out.dtype == np.uint8
        assert mask.shape == (s, s) and mask.dtype == np.float32
        assert set(np.unique(mask)) <= {0.0, 1.0}
        assert mask.sum() > 0
        outside = mask == 0
        np.testing.assert_array_equal(out[outside], image[outside])


@pytest.mark.parametrize("method", ["cutpaste", "perlin_paste"])
def test_inside_mask_changed(synth: AnomalySynthesizer, method: str) -> None:
    image = natural_image(synth.image_size)
    for seed in range(8):
        out, mask = getattr(synth, method)(image, np.random.default_rng(seed))
        inside = mask == 1
        assert np.abs(out[inside].astype(np.float32) - image[inside]).mean() > 1.0


def test_perlin_mask_is_large_enough(synth: AnomalySynthesizer) -> None:
    min_pixels = math.ceil(synthesis.MIN_MASK_FRACTION * synth.image_size**2)
    rng = np.random.default_rng(0)
    assert all(synth.perlin_mask(rng).sum() >= min_pixels for _ in range(30))


def test_perlin_guard_falls_back_when_noise_never_crosses(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(synthesis, "perlin_noise", lambda size, res, rng: np.full((size, size), -1.0, np.float32))
    synth = AnomalySynthesizer(64, TextureSource.procedural(pool_size=1))
    assert synth.perlin_mask(np.random.default_rng(0)).sum() >= math.ceil(synthesis.MIN_MASK_FRACTION * 64 * 64)


def test_deterministic_for_same_seed(textures: TextureSource) -> None:
    synth = AnomalySynthesizer(64, textures)
    image = natural_image(64)
    for seed in range(6):
        a = synth(image, np.random.default_rng(seed))
        b = synth(image, np.random.default_rng(seed))
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])
    first = synth(image, np.random.default_rng(100))[1]
    assert any(not np.array_equal(first, synth(image, np.random.default_rng(s))[1]) for s in range(101, 105))


def test_method_proportions(textures: TextureSource) -> None:
    synth = AnomalySynthesizer(64, textures)
    counts = dict.fromkeys(METHODS, 0)

    def stub(name: str):
        def run(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
            counts[name] += 1
            return image, np.zeros(image.shape[:2], np.float32)

        return run

    for name in METHODS:
        setattr(synth, name, stub(name))
    rng, image, n = np.random.default_rng(0), natural_image(64), 400
    for _ in range(n):
        synth(image, rng)
    # Binomial std at n=400: ~0.022 for p=0.25, 0.025 for p=0.5; allow ~3 std.
    assert abs(counts["cutpaste"] / n - 0.25) < 0.07
    assert abs(counts["scar"] / n - 0.25) < 0.07
    assert abs(counts["perlin_paste"] / n - 0.5) < 0.08


def test_rejects_wrong_input(textures: TextureSource) -> None:
    synth = AnomalySynthesizer(64, textures)
    with pytest.raises(ValueError):
        synth(natural_image(32), np.random.default_rng(0))
    with pytest.raises(ValueError):
        synth(natural_image(64).astype(np.float32), np.random.default_rng(0))


def test_default_textures_are_procedural() -> None:
    synth = AnomalySynthesizer(32)
    assert isinstance(synth.textures, TextureSource)
    assert synth.textures.sample(np.random.default_rng(0), 32).shape == (32, 32, 3)


@pytest.mark.parametrize("size", [33, 100])
def test_perlin_noise_any_size(size: int) -> None:
    rng = np.random.default_rng(0)
    for res in [(2, 32), (32, 2), (4, 8)]:
        noise = perlin_noise(size, res, rng)
        assert noise.shape == (size, size) and noise.dtype == np.float32
        assert np.isfinite(noise).all() and np.abs(noise).max() < 1.5 and noise.std() > 0.05


def test_procedural_textures_vary(textures: TextureSource) -> None:
    rng = np.random.default_rng(0)
    samples = [textures.sample(rng, 100) for _ in range(8)]
    for tex in samples:
        assert tex.shape == (100, 100, 3) and tex.dtype == np.uint8
        assert tex.std() > 3
    distinct = {tex.tobytes() for tex in samples}
    assert len(distinct) >= 5
    means = np.array([tex.reshape(-1, 3).mean(0) for tex in samples])
    assert means.std(0).max() > 10  # different colours, not one palette


def test_procedural_pool_is_seeded() -> None:
    a = TextureSource.procedural(seed=1, pool_size=2).sample(np.random.default_rng(0), 48)
    b = TextureSource.procedural(seed=1, pool_size=2).sample(np.random.default_rng(0), 48)
    np.testing.assert_array_equal(a, b)


def test_augmenters_keep_shape_and_dtype() -> None:
    tex = natural_image(40)
    rng = np.random.default_rng(0)
    for aug in AUGMENTERS:
        out = aug(tex, rng)
        assert out.shape == tex.shape and out.dtype == np.uint8


def test_from_folder_reads_rgb_jpegs(tmp_path) -> None:
    for category, bgr in [("red", (0, 0, 255)), ("deep/blue", (255, 0, 0))]:
        folder = tmp_path / "images" / category
        folder.mkdir(parents=True)
        for i in range(2):
            cv2.imwrite(str(folder / f"t{i}.jpg"), np.full((24, 30, 3), bgr, np.uint8))
    (tmp_path / "labels.txt").write_text("not an image")
    source = TextureSource.from_folder(str(tmp_path))
    rng = np.random.default_rng(0)
    dominant = set()
    for _ in range(12):
        tex = source.sample(rng, 50)
        assert tex.shape == (50, 50, 3) and tex.dtype == np.uint8
        dominant.add(int(tex.reshape(-1, 3).mean(0).argmax()))
    assert dominant == {0, 2}  # RGB order: red -> channel 0, blue -> channel 2


def test_from_folder_without_images_raises(tmp_path) -> None:
    with pytest.raises(ValueError, match="no texture images"):
        TextureSource.from_folder(str(tmp_path))
    (tmp_path / "readme.txt").write_text("nothing here")
    with pytest.raises(ValueError, match="no texture images"):
        TextureSource.from_folder(str(tmp_path))


def test_from_images_resizes_and_validates() -> None:
    source = TextureSource.from_images([natural_image(20), natural_image(70, seed=1)])
    tex = source.sample(np.random.default_rng(0), 64)
    assert tex.shape == (64, 64, 3) and tex.dtype == np.uint8
    with pytest.raises(ValueError):
        TextureSource.from_images([])
    with pytest.raises(ValueError):
        TextureSource.from_images([np.zeros((8, 8), np.uint8)])


def test_procedural_pickles_without_pool() -> None:
    source = TextureSource.procedural(seed=3, pool_size=2)
    before = source.sample(np.random.default_rng(0), 32)
    clone = pickle.loads(pickle.dumps(source))
    assert clone._pools == {}
    np.testing.assert_array_equal(clone.sample(np.random.default_rng(0), 32), before)


@pytest.mark.parametrize("size", [64, 320])
def test_held_out_defects_are_small_and_their_mask_is_exactly_what_changed(size: int) -> None:
    synth = synthesis.HeldOutSynthesizer(size)
    image = natural_image(size)
    kinds = {}
    for seed in range(24):
        rng = np.random.default_rng(seed)
        out, mask = synth(image, rng)
        assert out.shape == image.shape and out.dtype == np.uint8 and mask.dtype == np.float32
        changed = np.abs(out.astype(np.int16) - image.astype(np.int16)).max(-1) > synthesis.HELD_OUT_CHANGE
        np.testing.assert_array_equal(mask > 0, changed)
        assert synthesis.HELD_OUT_MIN_PIXELS <= mask.sum() <= 0.08 * size * size
        for kind in synth.kinds:
            shown = (kind(image, np.random.default_rng(seed)) != image).any()
            kinds[kind.__name__] = kinds.get(kind.__name__, 0) + int(shown)
    assert all(n >= 20 for n in kinds.values()), kinds  # every kind changes the image (nearly always)
    again = synth(image, np.random.default_rng(3))
    np.testing.assert_array_equal(again[0], synth(image, np.random.default_rng(3))[0])
