"""The synthetic demo set (``demo/data.py``): deterministic bytes, masks that are exactly the
painted pixels, every defective test image with a non-empty mask, readable by the mvtec layout."""
from __future__ import annotations

import hashlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from demo.data import CLASSES, DEFECTS, iter_demo_samples, make_sample, write_demo_dataset, write_incoming
from onenip_ray.data.layouts import read_dataset

SMALL = {"size": 64, "train_per_class": 3, "test_good": 2, "test_per_defect": 2}


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _rgb(path: Path) -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    a = _digest(Path(write_demo_dataset(str(tmp_path / "a"), seed=7, **SMALL)))
    b = _digest(Path(write_demo_dataset(str(tmp_path / "b"), seed=7, **SMALL)))
    c = _digest(Path(write_demo_dataset(str(tmp_path / "c"), seed=8, **SMALL)))
    assert a == b
    assert a.keys() == c.keys()
    assert all(a[k] != c[k] for k in a if "/train/" in k or "/test/" in k), "another seed draws other images"


def test_masks_are_exactly_where_the_defective_image_differs_from_its_clean_rendering():
    seen = set()
    for cls, folder, stem, clean, image, mask in iter_demo_samples(seed=3, **SMALL):
        if folder.endswith("good"):
            assert mask is None and np.array_equal(clean, image)
            continue
        seen.add((cls, folder))
        assert mask.dtype == bool and mask.shape == image.shape[:2]
        assert np.array_equal(mask, np.any(image != clean, axis=-1)), f"{cls}/{folder}/{stem}"
        assert mask.mean() >= 0.002  # visible: at least 0.2 % of the image
    assert seen == {(c, f"test/{d}") for c in CLASSES for d in DEFECTS}


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("defect", DEFECTS)
def test_every_class_and_defect_kind_paints_a_defect_at_128px(cls, defect):
    rng = np.random.default_rng(11)
    for _ in range(5):
        clean, image, mask = make_sample(cls, defect, rng, 128)
        assert clean.shape == image.shape == (128, 128, 3) and clean.dtype == np.uint8
        assert np.array_equal(mask, np.any(image != clean, axis=-1)) and mask.sum() >= 0.002 * mask.size
        assert np.abs(image.astype(int) - clean.astype(int))[mask].max() >= 20, "a defect you can see"


def test_written_set_is_an_mvtec_tree_whose_files_match_the_samples(tmp_path):
    root = Path(write_demo_dataset(str(tmp_path / "demo"), seed=5, **SMALL))
    samples = read_dataset("mvtec", str(root))  # the loader accepts it: every defect image has its mask
    assert sorted({s.class_name for s in samples}) == sorted(CLASSES) and len(CLASSES) >= 3
    defective = [s for s in samples if s.split == "test" and s.label]
    assert len(defective) == len(CLASSES) * len(DEFECTS) * SMALL["test_per_defect"]
    for s in defective:
        mask = cv2.imread(s.mask_uri, cv2.IMREAD_GRAYSCALE)
        assert mask is not None and set(np.unique(mask)) == {0, 255}, s.mask_uri
    # the files on disk are the generated arrays, losslessly
    for cls, folder, stem, _clean, image, mask in iter_demo_samples(seed=5, **SMALL):
        assert np.array_equal(_rgb(root / cls / folder / f"{stem}.png"), image)
        if mask is not None:
            written = cv2.imread(str(root / cls / "ground_truth" / folder.split("/")[1] / f"{stem}_mask.png"),
                                 cv2.IMREAD_GRAYSCALE)
            assert np.array_equal(written > 0, mask)


def test_incoming_folder_is_flat_mixed_and_differs_from_the_training_set(tmp_path):
    truth = write_incoming(str(tmp_path / "incoming"), size=64, per_class=6, defect_rate=0.5, seed=1)
    files = sorted(p.name for p in (tmp_path / "incoming").iterdir())
    assert files == sorted(t["image"] for t in truth) and len(files) == 18
    assert {t["class_name"] for t in truth} == set(CLASSES)
    assert any(t["defect"] for t in truth) and any(not t["defect"] for t in truth)
    again = write_incoming(str(tmp_path / "again"), size=64, per_class=6, defect_rate=0.5, seed=1)
    assert again == truth and _digest(tmp_path / "incoming") == _digest(tmp_path / "again")
