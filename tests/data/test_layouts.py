"""Dataset layouts: the real MVTec bottle class, tiny synthetic trees (local and S3) and every error."""
from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import pytest

from onenip_ray import storage
from onenip_ray.data.layouts import DatasetError, Sample, class_names, read_dataset, read_datasets
from tests.conftest import MVTEC_ROOT, needs_bottle

PNG = cv2.imencode(".png", np.zeros((8, 8, 3), np.uint8))[1].tobytes()


def _touch(root: Path, *relative_paths: str) -> None:
    for relative in relative_paths:
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(PNG)


def _mvtec_tree(root: Path, class_name: str = "widget") -> Path:
    """``class_name`` with 2 train images, 1 good and 2 cracked test images with masks."""
    _touch(
        root,
        f"{class_name}/train/good/000.png",
        f"{class_name}/train/good/001.png",
        f"{class_name}/test/good/000.png",
        f"{class_name}/test/crack/000.png",
        f"{class_name}/test/crack/001.png",
        f"{class_name}/ground_truth/crack/000_mask.png",
        f"{class_name}/ground_truth/crack/001_mask.png",
    )
    return root


@needs_bottle
def test_real_mvtec_bottle():
    samples = read_dataset("mvtec", str(MVTEC_ROOT), classes=["bottle"])
    train = [s for s in samples if s.split == "train"]
    test = [s for s in samples if s.split == "test"]
    assert len(train) == 209 and all(s.label == 0 and s.defect == "good" and s.mask_uri is None for s in train)
    assert len(test) == 83
    normal, defective = [s for s in test if s.label == 0], [s for s in test if s.label == 1]
    assert len(normal) == 20 and len(defective) == 63
    assert {s.defect for s in defective} == {"broken_large", "broken_small", "contamination"}
    for sample in defective:
        assert os.path.isfile(sample.mask_uri)
        assert Path(sample.mask_uri).name == Path(sample.uri).stem + "_mask.png"
    assert class_names(samples) == ["bottle"]
    assert all(os.path.isabs(s.uri) for s in samples)


def test_mvtec_tree_samples(tmp_path):
    root = _mvtec_tree(tmp_path / "mvtec")
    (root / "widget" / "test" / "good" / ".DS_Store").write_text("finder junk")
    (root / "license.txt").write_text("not a class")
    samples = read_dataset("mvtec", str(root))
    assert samples[0] == Sample(str(root / "widget/train/good/000.png"), "widget", "train", 0, "good", None)
    assert [(s.split, s.label, s.defect) for s in samples] == [
        ("train", 0, "good"), ("train", 0, "good"), ("test", 1, "crack"), ("test", 1, "crack"), ("test", 0, "good"),
    ]
    assert samples[2].mask_uri == str(root / "widget/ground_truth/crack/000_mask.png")


def test_relative_and_file_uri_roots_give_absolute_uris(tmp_path, monkeypatch):
    _mvtec_tree(tmp_path / "mvtec")
    monkeypatch.chdir(tmp_path)
    assert read_dataset("mvtec", "mvtec") == read_dataset("mvtec", f"file://{tmp_path}/mvtec")
    assert read_dataset("mvtec", "mvtec")[0].uri == str(tmp_path / "mvtec/widget/train/good/000.png")


def test_folder_layout(tmp_path):
    root = tmp_path / "custom"
    _touch(
        root,
        "gear/train/ok/a.JPG",
        "gear/train/normal/b.bmp",
        "gear/test/normal/c.tiff",
        "gear/test/dent/d.png",
        "gear/test/dent/e.jpeg",
        "gear/ground_truth/dent/d_mask.png",
        "gear/ground_truth/dent/e.bmp",
    )
    samples = read_dataset("folder", str(root))
    by_name = {Path(s.uri).name: s for s in samples}
    assert set(by_name) == {"a.JPG", "b.bmp", "c.tiff", "d.png", "e.jpeg"}
    assert by_name["a.JPG"].defect == by_name["c.tiff"].defect == "good"
    assert by_name["d.png"].mask_uri == str(root / "gear/ground_truth/dent/d_mask.png")
    assert by_name["e.jpeg"].mask_uri == str(root / "gear/ground_truth/dent/e.bmp")
    assert by_name["e.jpeg"].label == 1 and by_name["e.jpeg"].defect == "dent"


def test_btad_layout(tmp_path):
    root = tmp_path / "btad"
    _touch(root, "01/train/ok/0000.bmp", "01/test/ok/0001.bmp", "01/test/ko/0002.bmp", "01/ground_truth/ko/0002.png")
    samples = read_dataset("btad", str(root))
    assert [(s.split, s.label,
             s.defect) for s in samples] == [("train", 0, "good"), ("test", 1, "ko"), ("test", 0, "good")]
    assert samples[1].mask_uri == str(root / "01/ground_truth/ko/0002.png")


def test_btad_rejects_other_test_folders(tmp_path):
    root = tmp_path / "btad"
    _touch(root, "01/train/ok/0.png", "01/test/scratch/1.png")
    with pytest.raises(DatasetError, match=r"test/scratch: unexpected test folder \(expected one of ok, ko\)"):
        read_dataset("btad", str(root))


def _visa_tree(root: Path, csv_rows: list[str]) -> Path:
    _touch(
        root,
        "candle/Data/Images/Normal/0000.JPG",
        "candle/Data/Images/Normal/0001.JPG",
        "candle/Data/Images/Anomaly/0002.JPG",
        "candle/Data/Masks/Anomaly/0002.png",
        "fryum/Data/Images/Normal/0000.JPG",
    )
    (root / "split_csv").mkdir()
    (root / "split_csv" / "1cls.csv").write_text("\n".join(["object,split,label,image,mask", *csv_rows]) + "\n")
    return root


VISA_ROWS = [
    "candle,train,normal,candle/Data/Images/Normal/0000.JPG,",
    "candle,test,normal,candle/Data/Images/Normal/0001.JPG,",
    "candle,test,anomaly,candle/Data/Images/Anomaly/0002.JPG,candle/Data/Masks/Anomaly/0002.png",
    "fryum,train,normal,fryum/Data/Images/Normal/0000.JPG,",
]


def test_visa_layout(tmp_path):
    root = _visa_tree(tmp_path / "visa", VISA_ROWS)
    samples = read_dataset("visa", str(root))
    assert class_names(samples) == ["candle", "fryum"]
    candle = [s for s in samples if s.class_name == "candle"]
    assert [(s.split, s.label) for s in candle] == [("train", 0), ("test", 1), ("test", 0)]
    assert candle[1] == Sample(
        str(root / "candle/Data/Images/Anomaly/0002.JPG"), "candle", "test", 1, "anomaly",
        str(root / "candle/Data/Masks/Anomaly/0002.png")
    )
    assert class_names(read_dataset("visa", str(root), classes=["fryum"])) == ["fryum"]


def test_visa_without_split_csv_explains_alternatives(tmp_path):
    _touch(tmp_path / "visa", "candle/Data/Images/Normal/0000.JPG")
    with pytest.raises(DatasetError, match=r"split_csv/1cls\.csv not found.*visa_pytorch.*kind='folder'"):
        read_dataset("visa", str(tmp_path / "visa"))


@pytest.mark.parametrize(
    ("bad_row", "message"),
    [
        ("candle,test,anomaly,candle/Data/Images/Anomaly/0002.JPG,",
         r"line 2: anomalous image .*0002\.JPG without a mask"),
        ("candle,test,normal,candle/Data/Images/Normal/9999.JPG,", r"line 2: image .*9999\.JPG does not exist"),
        ("candle,train,anomaly,candle/Data/Images/Anomaly/0002.JPG,x",
         r"line 2: anomalous image .*0002\.JPG in the train split"),
        ("candle,val,normal,candle/Data/Images/Normal/0000.JPG,", r"line 2: split must be train/test"),
    ],
)
def test_visa_bad_rows(tmp_path, bad_row, message):
    root = _visa_tree(tmp_path / "visa", [bad_row])
    with pytest.raises(DatasetError, match=message):
        read_dataset("visa", str(root))


def test_merging_roots(tmp_path):
    mvtec = _mvtec_tree(tmp_path / "mvtec")
    btad = tmp_path / "btad"
    _touch(btad, "01/train/ok/0.png", "01/test/ok/1.png")
    samples = read_datasets([("mvtec", str(mvtec)), ("btad", str(btad))])
    assert class_names(samples) == ["01", "widget"]
    assert class_names(read_datasets([("mvtec", str(mvtec)), ("btad", str(btad))], classes=["01"])) == ["01"]


def test_duplicate_class_across_roots(tmp_path):
    first, second = _mvtec_tree(tmp_path / "a"), _mvtec_tree(tmp_path / "b")
    with pytest.raises(DatasetError, match=rf"class 'widget' is in both {first} and {second}"):
        read_datasets([("mvtec", str(first)), ("folder", str(second))])


def test_missing_root(tmp_path):
    with pytest.raises(DatasetError, match=rf"dataset root {tmp_path / 'absent'} does not exist"):
        read_dataset("mvtec", str(tmp_path / "absent"))


def test_root_without_class_folders(tmp_path):
    (tmp_path / "readme.txt").write_text("empty")
    with pytest.raises(DatasetError, match=rf"{tmp_path}: no class folders"):
        read_dataset("mvtec", str(tmp_path))


def test_class_folder_passed_as_root(tmp_path):
    root = _mvtec_tree(tmp_path / "mvtec") / "widget"
    with pytest.raises(DatasetError, match=r"widget looks like a single class folder; pass its parent"):
        read_dataset("mvtec", str(root))


def test_unknown_kind(tmp_path):
    with pytest.raises(DatasetError, match=r"unknown dataset kind 'kolektor'.*btad, folder, mvtec, visa"):
        read_dataset("kolektor", str(tmp_path))


def test_unknown_class_lists_available(tmp_path):
    root = _mvtec_tree(tmp_path / "mvtec")
    with pytest.raises(DatasetError, match=r"unknown class\(es\) bottle; available: widget"):
        read_dataset("mvtec", str(root), classes=["bottle"])


def test_class_without_training_images(tmp_path):
    root = tmp_path / "mvtec"
    (root / "widget" / "train" / "good").mkdir(parents=True)
    (root / "widget" / "train" / "good" / ".keep").write_text("")
    _touch(root, "widget/test/good/0.png")
    with pytest.raises(DatasetError, match=rf"{root / 'widget' / 'train'}: no training images for class 'widget'"):
        read_dataset("mvtec", str(root))


def test_class_without_train_folder(tmp_path):
    _touch(tmp_path / "mvtec", "widget/test/good/0.png")
    with pytest.raises(DatasetError, match=r"widget/train: missing train folder"):
        read_dataset("mvtec", str(tmp_path / "mvtec"))


def test_defective_image_without_mask_names_expected_mask(tmp_path):
    root = _mvtec_tree(tmp_path / "mvtec")
    (root / "widget/ground_truth/crack/001_mask.png").unlink()
    image, mask = root / "widget/test/crack/001.png", root / "widget/ground_truth/crack/001_mask.png"
    expected = f"{image}: defective test image without a mask \\(expected {mask}\\)"
    with pytest.raises(DatasetError, match=expected):
        read_dataset("mvtec", str(root))


def test_non_image_file_in_image_folder(tmp_path):
    root = _mvtec_tree(tmp_path / "mvtec")
    (root / "widget/test/crack/notes.txt").write_text("oops")
    with pytest.raises(DatasetError, match=r"widget/test/crack/notes\.txt: not an image"):
        read_dataset("mvtec", str(root))


def test_anomalous_folder_in_train(tmp_path):
    root = _mvtec_tree(tmp_path / "mvtec")
    _touch(root, "widget/train/crack/9.png")
    with pytest.raises(DatasetError, match=r"train/crack: training images must be normal, in train/good"):
        read_dataset("mvtec", str(root))


def test_image_directly_in_test_folder(tmp_path):
    root = _mvtec_tree(tmp_path / "mvtec")
    _touch(root, "widget/test/loose.png")
    with pytest.raises(DatasetError, match=r"widget/test/loose\.png: file directly in"):
        read_dataset("mvtec", str(root))


def test_mvtec_tree_on_s3(s3_bucket, tmp_path):
    local = _mvtec_tree(tmp_path / "mvtec")
    root = storage.join(s3_bucket, "datasets", "mvtec")
    storage.commit_dir(str(local), root, marker=None)
    samples = read_dataset("mvtec", root)
    assert len(samples) == 5 and all(s.uri.startswith(f"{root}/widget/") for s in samples)
    defective = [s for s in samples if s.label == 1]
    assert [s.mask_uri for s in defective] == [f"{root}/widget/ground_truth/crack/{i:03d}_mask.png" for i in range(2)]
    assert storage.read_bytes(defective[0].mask_uri) == PNG


def test_folder_layout_missing_mask_lists_accepted_names(tmp_path):
    root = tmp_path / "custom"
    _touch(root, "gear/train/good/a.png", "gear/test/dent/b.jpg")
    truth = root / "gear/ground_truth/dent"
    with pytest.raises(DatasetError,
                       match=rf"b\.jpg: defective test image without a mask \(expected {truth}/b_mask\.<image ext> or "
                             rf"{truth}/b\.<image ext>\)"):
        read_dataset("folder", str(root))


def test_every_dataset_kind_has_a_reader():
    from onenip_ray.data.layouts import _LAYOUTS
    from onenip_ray.formats import DATASET_KINDS

    assert set(DATASET_KINDS) == {*_LAYOUTS, "visa"}
