"""The result schema: field list, nullability, error rows, Parquet round trip."""
from __future__ import annotations

import datetime as dt

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from onenip_ray.schema import (
    FILE_SCHEMA,
    OUTPUT_COLUMNS,
    PARTITION_COLUMN,
    RESULT_COLUMNS,
    RESULT_SCHEMA,
    SCHEMA_VERSION,
    error_row,
    to_table,
)

EXPECTED = [
    "image_uri", "image_sha256", "width", "height", "class_name", "class_source", "route_similarity", "prompt_id",
    "score_raw", "score",
    "threshold_raw", "threshold_source", "is_anomalous", "defect_area_px", "defect_area_pct", "max_pixel_score",
    "num_regions", "regions", "heatmap_uri", "status", "error", "error_kind", "model_version", "run_id", "run_date",
    "scored_at", "latency_ms",
]
RUN = {"model_version": "abc123", "run_id": "r1", "run_date": dt.date(2026, 11, 27), "error_kind": "invalid_image"}


def test_field_order_types_and_nullability():
    assert list(RESULT_COLUMNS) == EXPECTED
    required = {f.name for f in RESULT_SCHEMA if not f.nullable}
    assert required == {"image_uri", "status", "model_version", "run_id", "run_date", "scored_at"}
    assert RESULT_SCHEMA.field("run_date").type == pa.date32()
    assert RESULT_SCHEMA.field("scored_at").type == pa.timestamp("us", tz="UTC")
    region = RESULT_SCHEMA.field("regions").type.value_type
    assert [f.name for f in region] == ["x", "y", "w", "h", "area_px", "peak_score"]
    assert RESULT_SCHEMA.metadata == {b"schema_version": SCHEMA_VERSION.encode()}
    # Parquet files hold every column but the Hive partition key, which readers take from the path
    assert FILE_SCHEMA.names == [c for c in EXPECTED if c != PARTITION_COLUMN] and PARTITION_COLUMN == "run_date"
    assert FILE_SCHEMA.metadata == RESULT_SCHEMA.metadata


def test_error_row_nulls_every_output():
    row = error_row("s3://b/x.png", "x.png: empty file", image_sha256="e3b0", class_name="bottle", latency_ms=0.1,
                    **RUN)
    assert row["status"] == "error" and row["error"] == "x.png: empty file" and row["error_kind"] == "invalid_image"
    assert row["class_name"] == "bottle" and row["class_source"] == "given"
    assert all(row[c] is None for c in OUTPUT_COLUMNS)
    assert row["width"] is None and row["height"] is None
    anonymous = error_row("a.png", "boom", **RUN)
    assert anonymous["class_name"] is None and anonymous["class_source"] is None
    table = to_table([row, anonymous])
    assert table.schema.equals(RESULT_SCHEMA, check_metadata=True)
    assert table.column("score").null_count == 2


def test_ok_row_round_trips_through_parquet(tmp_path):
    ok = dict(error_row("a.png", "x", **RUN))
    ok.update(status="ok", error=None, width=640, height=480, class_name="bottle", class_source="retrieved",
              prompt_id="p0",
              score_raw=1.5, score=0.7, threshold_raw=1.2, threshold_source="per_class", is_anomalous=True,
              defect_area_px=12, defect_area_pct=0.004, max_pixel_score=2.0, num_regions=1,
              regions=[{"x": 1, "y": 2, "w": 3, "h": 4, "area_px": 12, "peak_score": 1.5}], heatmap_uri=None)
    pq.write_table(to_table([ok]), tmp_path / "r.parquet")
    back = pq.read_table(tmp_path / "r.parquet")
    assert back.schema.equals(RESULT_SCHEMA, check_metadata=True)
    assert back.to_pylist()[0]["regions"] == ok["regions"]


def test_to_table_rejects_rows_off_schema():
    row = error_row("a.png", "x", **RUN)
    with pytest.raises(ValueError, match=r"extra \['anomaly_map'\]"):
        to_table([{**row, "anomaly_map": None}])
    del row["latency_ms"]
    with pytest.raises(ValueError, match=r"missing \['latency_ms'\]"):
        to_table([row])
