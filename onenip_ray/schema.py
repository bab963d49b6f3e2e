"""The per-image result row shared by nightly batch scoring (Parquet) and online scoring (JSON).

One row per input image. ``status`` is ``ok`` or ``error``; an error row keeps what is known
about the input (``image_uri``, and where they were obtained ``image_sha256``, ``width``,
``height`` and a given ``class_name``) and leaves every model output null. Scores are in two
units: ``score_raw`` (the model's, unbounded) and ``score`` (calibrated to [0, 1], exactly 0.5
at ``threshold_raw``). Region coordinates and areas are in ORIGINAL image pixels.
"""
from __future__ import annotations

import datetime as dt
from typing import Any

import pyarrow as pa

SCHEMA_VERSION = "onenip-result/2"
STATUS_OK, STATUS_ERROR = "ok", "error"
CLASS_GIVEN, CLASS_RETRIEVED = "given", "retrieved"
THRESHOLD_PER_CLASS, THRESHOLD_MANUAL = "per_class", "manual"
# ``error_kind`` of an error row: the object is gone; it cannot be read for a lasting reason (e.g.
# access denied); reads kept failing transiently until the retries ran out (a rerun retries it);
# the bytes are not a usable image; the given class is not one of the model's.
ERROR_MISSING, ERROR_UNREADABLE, ERROR_TRANSIENT, ERROR_INVALID_IMAGE, ERROR_UNKNOWN_CLASS = (
    "missing", "unreadable", "transient", "invalid_image", "unknown_class")
# The Hive partition key of the nightly table: a directory ``run_date=YYYY-MM-DD/``, never a column
# inside its Parquet files (readers add it from the path, as Spark, pandas, DuckDB and Polars do).
PARTITION_COLUMN = "run_date"

REGION_TYPE = pa.struct([
    pa.field("x", pa.int32(), nullable=False),
    pa.field("y", pa.int32(), nullable=False),
    pa.field("w", pa.int32(), nullable=False),
    pa.field("h", pa.int32(), nullable=False),
    pa.field("area_px", pa.int64(), nullable=False),
    pa.field("peak_score", pa.float64(), nullable=False),
])

RESULT_SCHEMA = pa.schema(
    [
        pa.field("image_uri", pa.string(), nullable=False),
        pa.field("image_sha256", pa.string()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("class_name", pa.string()),
        pa.field("class_source", pa.string()),
        pa.field("route_similarity", pa.float64()),
        pa.field("prompt_id", pa.string()),
        pa.field("score_raw", pa.float64()),
        pa.field("score", pa.float64()),
        pa.field("threshold_raw", pa.float64()),
        pa.field("threshold_source", pa.string()),
        pa.field("is_anomalous", pa.bool_()),
        pa.field("defect_area_px", pa.int64()),
        pa.field("defect_area_pct", pa.float64()),
        pa.field("max_pixel_score", pa.float64()),
        pa.field("num_regions", pa.int32()),
        pa.field("regions", pa.list_(pa.field("element", REGION_TYPE, nullable=False))),  # Parquet's list item name
        pa.field("heatmap_uri", pa.string()),
        pa.field("status", pa.string(), nullable=False),
        pa.field("error", pa.string()),
        pa.field("error_kind", pa.string()),
        pa.field("model_version", pa.string(), nullable=False),
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("run_date", pa.date32(), nullable=False),
        pa.field("scored_at", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("latency_ms", pa.float64()),
    ],
    metadata={"schema_version": SCHEMA_VERSION},
)

RESULT_COLUMNS: tuple[str, ...] = tuple(RESULT_SCHEMA.names)
# The schema of the nightly Parquet files: every column but the partition key.
FILE_SCHEMA = RESULT_SCHEMA.remove(RESULT_SCHEMA.get_field_index(PARTITION_COLUMN))
# Model outputs: null in every error row.
OUTPUT_COLUMNS: tuple[str, ...] = (
    "route_similarity", "prompt_id", "score_raw", "score", "threshold_raw", "threshold_source", "is_anomalous",
    "defect_area_px", "defect_area_pct", "max_pixel_score", "num_regions", "regions", "heatmap_uri",
)


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def error_row(
    image_uri: str,
    error: str,
    *,
    error_kind: str,
    model_version: str,
    run_id: str,
    run_date: dt.date,
    image_sha256: str | None = None,
    width: int | None = None,
    height: int | None = None,
    class_name: str | None = None,
    latency_ms: float | None = None,
) -> dict[str, Any]:
    """A ``status=error`` row: the input's known identity, the message, every output null."""
    row: dict[str, Any] = dict.fromkeys(RESULT_COLUMNS)
    row.update(
        image_uri=image_uri, image_sha256=image_sha256, width=width, height=height, class_name=class_name,
        class_source=CLASS_GIVEN if class_name is not None else None, status=STATUS_ERROR, error=error,
        error_kind=error_kind,
        model_version=model_version, run_id=run_id, run_date=run_date, scored_at=utc_now(), latency_ms=latency_ms,
    )
    return row


def to_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Rows (dicts with exactly the schema's keys) as a table in ``RESULT_SCHEMA``."""
    for row in rows:
        if row.keys() != set(RESULT_COLUMNS):
            extra, missing = sorted(row.keys() - set(RESULT_COLUMNS)), sorted(set(RESULT_COLUMNS) - row.keys())
            raise ValueError(f"row for {row.get('image_uri')!r} does not match the result schema: extra {extra}, "
                             f"missing {missing}")
    return pa.Table.from_pylist(rows, schema=RESULT_SCHEMA)
