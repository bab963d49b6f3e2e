"""Dataset readers (MVTec AD, VisA, BTAD, generic folders) producing one flat list of Samples.

All listing goes through ``onenip_ray.storage``, so every root may be local or ``s3://``.
Nothing is silently dropped: unexpected files or folders and defective images without masks
raise DatasetError naming them. Hidden entries (any path part starting with '.') are ignored.
"""
from __future__ import annotations

import csv
import io
import posixpath
from dataclasses import dataclass

from onenip_ray import storage
from onenip_ray.errors import InputError
from onenip_ray.formats import DATASET_KINDS, IMAGE_EXTENSIONS, is_image_name

NORMAL_DEFECT = "good"
VISA_SPLIT_CSV = "split_csv/1cls.csv"
VISA_COLUMNS = ("object", "split", "label", "image", "mask")


@dataclass(frozen=True)
class Sample:
    """One image: where it is, its class, split, label (0 normal, 1 anomalous), defect type and mask."""

    uri: str
    class_name: str
    split: str
    label: int
    defect: str
    mask_uri: str | None


class DatasetError(InputError):
    """A dataset that does not match its layout; the message names the file or folder and what was expected."""


@dataclass(frozen=True)
class _FolderLayout:
    """``<cls>/train/<normal>/*``, ``<cls>/test/<defect>/*`` and ``<cls>/ground_truth/<defect>/<mask>``."""

    normal_dirs: tuple[str, ...]
    defect_dirs: tuple[str, ...] | None  # None: any folder name is a defect type
    mask_patterns: tuple[str, ...]  # mask names in ground_truth/<defect>/; {ext} is any image extension
    description: str


def _is_hidden(relative_path: str) -> bool:
    return any(part.startswith(".") for part in relative_path.split("/"))


_LAYOUTS = {
    "mvtec": _FolderLayout(
        normal_dirs=("good",),
        defect_dirs=None,
        mask_patterns=("{stem}_mask.png",),
        description="<class>/train/good/*, <class>/test/<defect|good>/*, <class>/ground_truth/<defect>/<stem>_mask.png",
    ),
    "folder": _FolderLayout(
        normal_dirs=("good", "ok", "normal"),
        defect_dirs=None,
        mask_patterns=("{stem}_mask{ext}", "{stem}{ext}"),
        description="<class>/train/<good|ok|normal>/*, <class>/test/<defect|good|ok|normal>/*, "
        "<class>/ground_truth/<defect>/<stem>_mask.* or <stem>.*",
    ),
    "btad": _FolderLayout(
        normal_dirs=("ok",),
        defect_dirs=("ko",),
        mask_patterns=("{stem}.png", "{stem}.bmp"),
        description="<class>/train/ok/*, <class>/test/{ok,ko}/*, <class>/ground_truth/ko/<stem>.png|.bmp",
    ),
}


def _images_by_folder(split_uri: str, endpoint: str | None) -> dict[str, list[str]]:
    """Image paths under ``split_uri`` grouped by their top folder, paths relative to that folder."""
    grouped: dict[str, list[str]] = {}
    for relative in storage.list_files(split_uri, endpoint=endpoint, relative=True):
        if _is_hidden(relative):
            continue
        folder, _, name = relative.partition("/")
        if not name:
            raise DatasetError(f"{storage.join(split_uri, relative)}: file directly in {split_uri}; expected "
                               f"{split_uri}/<folder>/<image>")
        if not is_image_name(name):
            raise DatasetError(f"{storage.join(split_uri, relative)}: not an image (expected one of "
                               f"{', '.join(IMAGE_EXTENSIONS)})")
        grouped.setdefault(folder, []).append(name)
    return grouped


def _require_dir(uri: str, what: str, layout: _FolderLayout, endpoint: str | None) -> None:
    if not storage.is_dir(uri, endpoint):
        raise DatasetError(f"{uri}: missing {what} folder (expected layout {layout.description})")


def _train_samples(class_uri: str, class_name: str, layout: _FolderLayout, endpoint: str | None) -> list[Sample]:
    train_uri = storage.join(class_uri, "train")
    _require_dir(train_uri, "train", layout, endpoint)
    samples = []
    for folder, names in sorted(_images_by_folder(train_uri, endpoint).items()):
        if folder not in layout.normal_dirs:
            raise DatasetError(f"{train_uri}/{folder}: training images must be normal, in "
                               f"train/{' or train/'.join(layout.normal_dirs)}")
        samples += [Sample(storage.join(train_uri, folder, name), class_name, "train", 0, NORMAL_DEFECT,
                           None) for name in names]
    if not samples:
        raise DatasetError(f"{train_uri}: no training images for class {class_name!r} (expected images in "
                           f"train/{layout.normal_dirs[0]}/)")
    return samples


def _test_samples(class_uri: str, class_name: str, layout: _FolderLayout, endpoint: str | None) -> list[Sample]:
    test_uri, truth_uri = storage.join(class_uri, "test"), storage.join(class_uri, "ground_truth")
    _require_dir(test_uri, "test", layout, endpoint)
    test_images = _images_by_folder(test_uri, endpoint)
    masks = {}
    if any(folder not in layout.normal_dirs for folder in test_images) and storage.is_dir(truth_uri, endpoint):
        masks = {path.lower(): path for path in storage.list_files(truth_uri, endpoint=endpoint, relative=True)}
    samples = []
    for folder, names in sorted(test_images.items()):
        if folder in layout.normal_dirs:
            samples += [Sample(storage.join(test_uri, folder, name), class_name, "test", 0, NORMAL_DEFECT,
                               None) for name in names]
            continue
        if layout.defect_dirs is not None and folder not in layout.defect_dirs:
            allowed = ", ".join([*layout.normal_dirs, *layout.defect_dirs])
            raise DatasetError(f"{test_uri}/{folder}: unexpected test folder (expected one of {allowed})")
        for name in names:
            stem = f"{folder}/{posixpath.splitext(name)[0]}"
            names = (p.format(stem=stem, ext=ext) for p in layout.mask_patterns for ext in IMAGE_EXTENSIONS)
            candidates = dict.fromkeys(n.lower() for n in names)
            found = next((masks[c] for c in candidates if c in masks), None)
            if found is None:
                patterns = (p.format(stem=stem, ext=".<image ext>") for p in layout.mask_patterns)
                expected = " or ".join(storage.join(truth_uri, p) for p in patterns)
                raise DatasetError(f"{storage.join(test_uri, folder, name)}: defective test image without a mask "
                                   f"(expected {expected})")
            samples.append(Sample(storage.join(test_uri, folder, name), class_name, "test", 1, folder,
                                  storage.join(truth_uri, found)))
    return samples


def _folder_classes(root: str, layout: _FolderLayout, endpoint: str | None) -> list[str]:
    names = [name for name in storage.list_dirs(root, endpoint) if not name.startswith(".")]
    if "train" in names and "test" in names:
        raise DatasetError(f"{root} looks like a single class folder; pass its parent as the root (expected "
                           f"{layout.description})")
    if not names:
        raise DatasetError(f"{root}: no class folders (expected {layout.description})")
    return names


def _read_visa_rows(root: str, endpoint: str | None) -> list[dict[str, str]]:
    csv_uri = storage.join(root, VISA_SPLIT_CSV)
    if not storage.exists(csv_uri, endpoint):
        raise DatasetError(
            f"{csv_uri} not found: VisA needs the 1cls split file (split_csv/1cls.csv from the VisA release) "
            "to know the train/test split; alternatively prepare anomalib's layout "
            "visa_pytorch/<class>/{train/good,test/good,test/bad,ground_truth/bad} and read it with kind='folder'"
        )
    reader = csv.DictReader(io.StringIO(storage.read_bytes(csv_uri, endpoint).decode("utf-8-sig")))
    missing = [column for column in VISA_COLUMNS if column not in (reader.fieldnames or [])]
    if missing:
        raise DatasetError(f"{csv_uri}: missing column(s) {', '.join(missing)} (expected {','.join(VISA_COLUMNS)})")
    return list(reader)


def _read_visa(root: str, classes: list[str], endpoint: str | None) -> list[Sample]:
    csv_uri = storage.join(root, VISA_SPLIT_CSV)
    present = set(storage.list_files(root, endpoint=endpoint, relative=True))
    samples = []
    for line, row in enumerate(_read_visa_rows(root, endpoint), start=2):
        if row["object"] not in classes:
            continue
        where = f"{csv_uri} line {line}"
        split, label, image, mask = row["split"], row["label"], row["image"], row["mask"]
        if split not in ("train", "test") or label not in ("normal", "anomaly"):
            raise DatasetError(f"{where}: split must be train/test and label normal/anomaly, got {split!r}, {label!r}")
        if image not in present:
            raise DatasetError(f"{where}: image {storage.join(root, image)} does not exist")
        if not is_image_name(image):
            raise DatasetError(f"{where}: {image} is not an image (expected one of {', '.join(IMAGE_EXTENSIONS)})")
        if label == "normal":
            samples.append(Sample(storage.join(root, image), row["object"], split, 0, NORMAL_DEFECT, None))
            continue
        if split == "train":
            raise DatasetError(f"{where}: anomalous image {image} in the train split; training images must be normal")
        if not mask or mask not in present:
            raise DatasetError(f"{where}: anomalous image {storage.join(root, image)} without a mask (expected "
                               f"{storage.join(root, mask or '<mask>')})")
        samples.append(Sample(storage.join(root, image), row["object"], split, 1, "anomaly", storage.join(root, mask)))
    return sorted(samples, key=lambda s: (s.class_name, s.split != "train", s.uri))


def _available_classes(kind: str, root: str, endpoint: str | None) -> list[str]:
    if not storage.is_dir(root, endpoint):
        raise DatasetError(f"dataset root {root} does not exist or is not a folder")
    if kind == "visa":
        return sorted({row["object"] for row in _read_visa_rows(root, endpoint)})
    return _folder_classes(root, _LAYOUTS[kind], endpoint)


def _read_classes(kind: str, root: str, classes: list[str], endpoint: str | None) -> list[Sample]:
    if kind == "visa":
        return _read_visa(root, classes, endpoint)
    layout = _LAYOUTS[kind]
    samples = []
    for name in classes:
        class_uri = storage.join(root, name)
        samples += _train_samples(class_uri, name, layout, endpoint) + _test_samples(class_uri, name, layout, endpoint)
    return samples


def read_datasets(roots: list[tuple[str, str]], classes: list[str] | None = None,
                  endpoint: str | None = None) -> list[Sample]:
    """Samples of several ``(kind, root)`` datasets merged into one class list.

    ``kind`` is one of "btad", "folder", "mvtec", "visa". ``classes`` selects classes across all
    roots (default: all). A class name present in two roots is an error.
    """
    owners: dict[str, str] = {}
    per_root = []
    for kind, root in roots:
        if kind not in DATASET_KINDS:
            raise DatasetError(f"unknown dataset kind {kind!r} for {root} (expected one of {', '.join(DATASET_KINDS)})")
        root = storage.canonical_uri(root)
        names = _available_classes(kind, root, endpoint)
        for name in names:
            if name in owners:
                raise DatasetError(f"class {name!r} is in both {owners[name]} and {root}; class names must be unique "
                                   "across roots")
            owners[name] = root
        per_root.append((kind, root, names))
    unknown = sorted(set(classes or []) - set(owners))
    if unknown:
        raise DatasetError(f"unknown class(es) {', '.join(unknown)}; available: {', '.join(sorted(owners))}")
    samples = []
    for kind, root, names in per_root:
        selected = [name for name in names if classes is None or name in classes]
        if selected:
            samples += _read_classes(kind, root, selected, endpoint)
    return samples


def read_dataset(kind: str, root: str, classes: list[str] | None = None, endpoint: str | None = None) -> list[Sample]:
    """Samples of one dataset root (local or ``s3://``) of the given ``kind``; see ``read_datasets``."""
    return read_datasets([(kind, root)], classes, endpoint)


def class_names(samples: list[Sample]) -> list[str]:
    """The sorted distinct class names in ``samples``."""
    return sorted({sample.class_name for sample in samples})
