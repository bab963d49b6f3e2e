"""Guarded decoding of every bad input kind, resizing and normalisation."""
from __future__ import annotations

import struct
import zlib

import cv2
import numpy as np
import pytest

from onenip_ray.data import images
from onenip_ray.data.images import (
    ImageError,
    decode_for_size,
    decode_image,
    decode_mask,
    resize_image,
    resize_mask,
    rotate_image,
    to_network_input,
)


def _encode(array: np.ndarray, ext: str = ".png") -> bytes:
    ok, buffer = cv2.imencode(ext, array)
    assert ok
    return buffer.tobytes()


def _rgb_test_image(height: int = 32, width: int = 48) -> np.ndarray:
    """An RGB image with distinct channels and some texture (so JPEG data is not trivial)."""
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    img[:8, :8] = (200, 100, 50)
    return img


def _png_claiming(width: int, height: int) -> bytes:
    """A well-formed PNG whose header claims width×height but whose pixel data is one row."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * (width + 1)))
        + chunk(b"IEND", b"")
    )


@pytest.fixture
def no_decoding(monkeypatch):
    """Fails the test if OpenCV is asked to decode pixels."""
    def refuse(*args):
        raise AssertionError("cv2.imdecode must not run for data rejected by the header checks")

    monkeypatch.setattr(images.cv2, "imdecode", refuse)


def test_decodes_png_and_jpeg_to_rgb():
    img = _rgb_test_image()
    png = decode_image(_encode(cv2.cvtColor(img, cv2.COLOR_RGB2BGR)), "a.png")
    assert png.dtype == np.uint8 and png.shape == (32, 48, 3)
    np.testing.assert_array_equal(png, img)
    jpeg = decode_image(_encode(cv2.cvtColor(img, cv2.COLOR_RGB2BGR), ".jpg"), "a.jpg")
    assert jpeg.shape == (32, 48, 3)
    assert np.abs(jpeg[2:6, 2:6].astype(int) - (200, 100, 50)).max() < 12


def test_jpeg_with_trailing_padding_is_accepted():
    data = _encode(_rgb_test_image(), ".jpg") + b"\x00" * 16
    assert decode_image(data, "padded.jpg").shape == (32, 48, 3)


def test_empty_file(no_decoding):
    with pytest.raises(ImageError, match=r"empty\.png: empty file"):
        decode_image(b"", "empty.png")


def test_text_named_jpg(no_decoding):
    with pytest.raises(ImageError, match=r"notes\.jpg: not a decodable image"):
        decode_image(b"this is plain text, not a JPEG", "notes.jpg")


def test_truncated_png(no_decoding):
    data = _encode(_rgb_test_image())
    with pytest.raises(ImageError, match=r"cut\.png: truncated PNG"):
        decode_image(data[: len(data) - 20], "cut.png")


def test_truncated_jpeg(no_decoding):
    data = _encode(_rgb_test_image(), ".jpg")
    with pytest.raises(ImageError, match=r"cut\.jpg: truncated JPEG"):
        decode_image(data[: len(data) * 2 // 3], "cut.jpg")


def test_tiny_image(no_decoding):
    with pytest.raises(ImageError, match=r"dot\.png is 1×1 px; both sides must be at least 8 px"):
        decode_image(_encode(np.zeros((1, 1, 3), np.uint8)), "dot.png")
    with pytest.raises(ImageError, match=r"strip\.png is 100×7 px"):
        decode_image(_encode(np.zeros((7, 100, 3), np.uint8)), "strip.png")


def test_sixteen_bit_is_scaled_to_eight_bit():
    values = np.array([0, 257, 32768, 65535] * 4, dtype=np.uint16)
    img16 = np.tile(values, (8, 1))
    decoded = decode_image(_encode(img16), "deep.png")
    assert decoded.dtype == np.uint8 and decoded.shape == (8, 16, 3)
    np.testing.assert_array_equal(decoded[0, :4, 0], [0, 1, 128, 255])


def test_grayscale_becomes_three_equal_channels():
    gray = np.arange(64, dtype=np.uint8).reshape(8, 8) * 3
    decoded = decode_image(_encode(gray), "gray.png")
    assert decoded.shape == (8, 8, 3)
    for channel in range(3):
        np.testing.assert_array_equal(decoded[..., channel], gray)


def test_alpha_is_dropped():
    bgra = np.zeros((8, 8, 4), np.uint8)
    bgra[..., :3] = (50, 100, 200)
    bgra[..., 3] = 0
    decoded = decode_image(_encode(bgra), "rgba.png")
    assert decoded.shape == (8, 8, 3)
    np.testing.assert_array_equal(decoded[0, 0], (200, 100, 50))


def test_bomb_header_rejected_before_decoding(no_decoding):
    with pytest.raises(ImageError, match=r"bomb\.png is 9000×9000 = 81000000 px, over the limit of 50000000 px"):
        decode_image(_png_claiming(9000, 9000), "bomb.png")
    with pytest.raises(ImageError, match=r"huge\.png: over Pillow's hard decompression-bomb limit"):
        decode_image(_png_claiming(20000, 20000), "huge.png")


def test_real_compressible_large_png_respects_a_lowered_limit():
    data = _encode(np.zeros((3000, 3000), np.uint8))
    assert len(data) < 100_000
    with pytest.raises(ImageError, match=r"zeros\.png is 3000×3000 = 9000000 px, over the limit of 1000000 px"):
        decode_image(data, "zeros.png", max_pixels=1_000_000)
    assert decode_image(data, "zeros.png", max_pixels=9_000_000).shape == (3000, 3000, 3)


def test_decode_mask():
    mask = np.zeros((16, 16), np.uint8)
    mask[2:5, 3:9] = 255
    mask[10, 10] = 1
    decoded = decode_mask(_encode(mask), "000_mask.png")
    assert decoded.dtype == bool and decoded.shape == (16, 16)
    assert decoded.sum() == 3 * 6 + 1 and decoded[10, 10]
    with pytest.raises(ImageError, match=r"000_mask\.png: empty file"):
        decode_mask(b"", "000_mask.png")


def test_resize_image_uses_area_when_shrinking_and_linear_when_enlarging():
    img = _rgb_test_image(64, 64)
    small = resize_image(img, 16)
    assert small.shape == (16, 16, 3) and small.dtype == np.uint8
    np.testing.assert_array_equal(small, cv2.resize(img, (16, 16), interpolation=cv2.INTER_AREA))
    large = resize_image(img, 100)
    np.testing.assert_array_equal(large, cv2.resize(img, (100, 100), interpolation=cv2.INTER_LINEAR))
    assert resize_image(_rgb_test_image(32, 48), 40).shape == (40, 40, 3)


def test_rotate_image_turns_about_the_centre_and_keeps_the_size():
    img = np.random.default_rng(0).integers(1, 256, (48, 64, 3), dtype=np.uint8)
    square = img[:, :48]
    assert np.array_equal(rotate_image(square, 90), np.rot90(square))  # counter-clockwise, exactly
    assert np.array_equal(rotate_image(square, -90), np.rot90(square, -1))
    turned = rotate_image(img, 30)
    assert turned.shape == img.shape and turned.dtype == np.uint8
    assert not np.array_equal(turned, img) and turned.min() > 0  # corners reflected, not black


def test_resize_mask_stays_bool():
    mask = np.zeros((10, 10), bool)
    mask[:5] = True
    resized = resize_mask(mask, 4)
    assert resized.dtype == bool and resized.shape == (4, 4)
    assert resized[0].all() and not resized[-1].any()


def test_to_network_input_single_and_batch():
    img = np.full((4, 5, 3), 255, np.uint8)
    img[..., 1] = 0
    mean, std = (0.5, 0.5, 0.5), (0.5, 0.25, 0.5)
    out = to_network_input(img, mean, std)
    assert out.dtype == np.float32 and out.shape == (3, 4, 5) and out.flags.c_contiguous
    np.testing.assert_allclose(out[:, 0, 0], [1.0, -2.0, 1.0])
    batch = to_network_input(np.stack([img, img]), mean, std)
    assert batch.shape == (2, 3, 4, 5)
    np.testing.assert_allclose(batch[1], out)
    with pytest.raises(ValueError, match="shape"):
        to_network_input(np.zeros((4, 5), np.uint8), mean, std)


def _smooth_image(height: int, width: int) -> np.ndarray:
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    return np.stack([xx * 255 / width, yy * 255 / height, (xx + yy) * 127 / (width + height)], -1).astype(np.uint8)


def _decoded_shapes(monkeypatch) -> list[tuple[int, ...]]:
    """Records the shape of every array OpenCV decodes."""
    shapes, decode = [], images._imdecode

    def recording(*args):
        out = decode(*args)
        shapes.append(out.shape)
        return out

    monkeypatch.setattr(images, "_imdecode", recording)
    return shapes


def test_large_jpegs_decode_at_reduced_scale_keeping_the_original_size(monkeypatch):
    img = _smooth_image(1500, 2000)
    jpeg = _encode(cv2.cvtColor(img, cv2.COLOR_RGB2BGR), ".jpg")
    full = decode_image(jpeg, "big.jpg")
    shapes = _decoded_shapes(monkeypatch)
    for size, scale in ((320, 4), (700, 2), (751, 1), (180, 8)):
        net, width, height = decode_for_size(jpeg, size, "big.jpg")
        assert (width, height) == (2000, 1500)  # the original size: regions are reported in it
        assert shapes.pop() == (-(-1500 // scale), -(-2000 // scale), 3)  # libjpeg rounds up
        assert net.shape == (size, size, 3)
        # the network sees nearly the same input (libjpeg's DCT scaling vs area averaging)
        diff = np.abs(net.astype(int) - resize_image(full, size)).mean()
        assert diff < 2.0, (size, diff)


def test_gray_pngs_decode_as_one_channel_with_the_same_result(monkeypatch):
    from io import BytesIO

    from PIL import Image

    gray = _smooth_image(300, 400)[..., 0]
    one_bit = BytesIO()
    Image.fromarray(gray > 128).convert("1").save(one_bit, format="PNG")
    files = {"1-bit": one_bit.getvalue(), "8-bit": _encode(gray), "16-bit": _encode(gray.astype(np.uint16) * 257),
             "colour": _encode(cv2.cvtColor(_smooth_image(300, 400), cv2.COLOR_RGB2BGR))}
    shapes = _decoded_shapes(monkeypatch)
    for kind, data in files.items():
        expected = resize_image(decode_image(data, kind), 64)
        net, width, height = decode_for_size(data, 64, kind)
        assert (width, height) == (400, 300) and net.shape == (64, 64, 3)
        np.testing.assert_array_equal(net, expected, err_msg=kind)
        assert shapes[-1] == ((300, 400, 3) if kind == "colour" else (300, 400)), kind  # gray: one byte per pixel


def test_reduced_jpeg_keeps_the_exif_rotated_size():
    from io import BytesIO

    from PIL import Image

    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    buffer = BytesIO()
    Image.fromarray(_smooth_image(600, 800)).save(buffer, format="JPEG", exif=exif.tobytes())
    net, width, height = decode_for_size(buffer.getvalue(), 128, "rotated.jpg")
    assert (width, height) == (600, 800) and net.shape == (128, 128, 3)
    assert decode_image(buffer.getvalue(), "rotated.jpg").shape == (800, 600, 3)
