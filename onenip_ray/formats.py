"""Names and formats every module shares, each defined once: file names inside bundles, evaluation
folders and the nightly table, image extensions, the S3 URI scheme, the name of the unknown class,
and the file stem derived from an image URI."""
from __future__ import annotations

import hashlib

# Dataset layouts the readers understand (``data/layouts.py``; ``--data KIND=ROOT``).
DATASET_KINDS = ("btad", "folder", "mvtec", "visa")
# Images the tool reads (decoded by OpenCV); matched case-insensitively on the file name.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
S3_SCHEME = "s3://"

# A bundle: weights, encoded prompt pool, and the metadata whose presence marks a complete bundle.
MODEL_FILE, PROMPTS_FILE, BUNDLE_FILE = "model.safetensors", "prompts.safetensors", "bundle.json"
# An evaluation folder (``onenip evaluate --out``).
METRICS_FILE, PREDICTIONS_FILE = "metrics.json", "predictions.parquet"
# A committed night of the results table: the marker listing the partition's files.
SUCCESS_FILE = "_SUCCESS.json"

# ``class_name`` of an image that resembles no class of the model (retrieval similarity below the
# nearest class's calibrated floor; such an image is ``is_anomalous``), and the per-class key of
# error rows without a given class.
UNKNOWN_CLASS = "(unknown)"


def is_image_name(name: str) -> bool:
    """Whether a file name has one of ``IMAGE_EXTENSIONS``."""
    return name.lower().endswith(IMAGE_EXTENSIONS)


def uri_stem(uri: str) -> str:
    """A file-name-safe stem unique to ``uri`` (heat maps, gallery images)."""
    return hashlib.sha256(uri.encode()).hexdigest()[:32]
