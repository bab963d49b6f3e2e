"""The nightly table without a model: standard readers, the journaled commit killed at each step and
repaired, one writer per date (local and S3), limits, and retries through a faulty S3 proxy."""
from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pyarrow.parquet as pq
import pytest

from onenip_ray import nightly, storage
from onenip_ray.cli import EXIT_BUSY, main
from onenip_ray.formats import SUCCESS_FILE
from onenip_ray.lease import Lease, LeaseHeld, LeaseLost
from onenip_ray.schema import FILE_SCHEMA, PARTITION_COLUMN, error_row, to_table
from tests.faultproxy import FaultProxy

DAY1, DAY2 = dt.date(2026, 11, 27), dt.date(2026, 11, 28)


def _stage(layout: nightly.NightLayout, run_id: str, uris: list[str],
           heatmaps: list[str] = ()) -> tuple[list[str], list[str]]:
    """Staged Parquet (one file per two rows) and heat-map files of a run, as a scoring run leaves them."""
    fs, run_dir = layout.fs, layout.run(run_id).path
    nightly.write_json(fs, f"{run_dir}/{nightly.RUN_FILE}", {"run_id": run_id, "model_version": "v1"})
    files = []
    for i in range(0, len(uris), 2):
        rows = [error_row(u, "test row", error_kind="missing", model_version="v1", run_id=run_id,
                          run_date=layout.run_date)
                for u in uris[i:i + 2]]
        path = f"{run_dir}/data/chunk-00000/{i:04d}{nightly.STAGED_SUFFIX}"
        fs.create_dir(f"{run_dir}/data/chunk-00000", recursive=True)
        pq.write_table(to_table(rows).drop_columns([PARTITION_COLUMN]), path, filesystem=fs)
        files.append(path)
    for name in heatmaps:
        layout.run(run_id).join("heatmaps", f"{name}.png").write_bytes(f"{run_id}:{name}".encode())
    return files, [f"{run_dir}/heatmaps"]


def _summary(layout: nightly.NightLayout, run_id: str, files: list[str]) -> dict:
    return {"run_id": run_id, "run_date": f"{layout.run_date}",
            "files": [f"part-{run_id}-{i:05d}.parquet" for i in range(len(files))]}


def _commit_night(output: str, day: dt.date, run_id: str, uris: list[str],
                  endpoint: str | None = None) -> nightly.NightLayout:
    layout = nightly.NightLayout(storage.Location(output, endpoint), day)
    files, heat = _stage(layout, run_id, uris, heatmaps=uris)
    nightly.commit(layout, files, heat, _summary(layout, run_id, files))
    return layout


def _partition_state(layout: nightly.NightLayout) -> tuple[dict | None, set[str], set[str]]:
    """(the _SUCCESS.json, Parquet file names in the partition, image URIs in them)."""
    fs = layout.fs
    marker = nightly.read_json(fs, f"{layout.partition.path}/{SUCCESS_FILE}")
    names = {n for n in nightly.listing(fs, layout.partition.path) if n.endswith(".parquet")}
    uris = set()
    for n in names:
        uris |= set(pq.read_table(f"{layout.partition.path}/{n}",
                                  filesystem=fs).column("image_uri").to_pylist())
    return marker, names, uris


# -- readers --------------------------------------------------------------------------------------
def test_standard_readers_open_every_committed_night(tmp_path):
    import duckdb
    import pandas as pd
    import polars as pl
    import pyarrow.dataset as pads

    out = str(tmp_path / "scores")
    _commit_night(out, DAY1, "r1", ["a", "b", "c"])
    _commit_night(out, DAY2, "r2", ["d", "e"])
    day2 = nightly.NightLayout(storage.Location(out), DAY2)
    _stage(day2, "r3", ["x", "y"], heatmaps=["x"])  # a rejected run's rows stay staged
    Path(day2.lease.path).write_text("{}")

    frame = pd.read_parquet(out)
    assert len(frame) == 5 and sorted(frame["run_date"].astype(str).unique()) == ["2026-11-27", "2026-11-28"]
    assert set(frame["image_uri"]) == {"a", "b", "c", "d", "e"}
    table = pads.dataset(out, partitioning="hive").to_table()
    assert table.num_rows == 5 and set(table.column("run_date").to_pylist()) == {"2026-11-27", "2026-11-28"}
    count, days, kind = duckdb.sql(f"select count(*), count(distinct run_date), typeof(any_value(run_date)) "
                                   f"from read_parquet('{out}/**/*.parquet', hive_partitioning=true)").fetchall()[0]
    assert (count, days, kind) == (5, 2, "DATE")
    frame = pl.scan_parquet(f"{out}/**/*.parquet", hive_partitioning=True).collect()
    assert frame.height == 5 and frame.schema["run_date"] == pl.Date
    assert sorted(frame["run_date"].unique().to_list()) == [DAY1, DAY2]
    assert pq.read_schema(f"{out}/run_date=2026-11-27/part-r1-00000.parquet").equals(FILE_SCHEMA, check_metadata=True)


# -- commit ---------------------------------------------------------------------------------------
COMMIT_SCRIPT = """
import datetime as dt, json, os, sys
from onenip_ray import nightly, storage
a = json.load(open(sys.argv[1]))
def on_step(step):
    if step == a["step"]:
        os._exit(9)
layout = nightly.NightLayout(storage.Location(a["output"]), dt.date.fromisoformat(a["day"]))
nightly.commit(layout, a["files"], a["heat"], a["summary"], on_step)
"""


@pytest.mark.parametrize("step", nightly.COMMIT_STEPS)
def test_commit_killed_at_each_step_never_mixes_runs_and_is_repaired(tmp_path, step, capsys):
    out = str(tmp_path / "scores")
    layout = _commit_night(out, DAY1, "old", ["a", "b", "c"])
    files, heat = _stage(layout, "new", ["b", "c", "d"], heatmaps=["b", "d"])
    args = {"output": out, "day": f"{DAY1}", "files": files, "heat": heat, "summary": _summary(layout, "new", files),
            "step": step}
    (tmp_path / "args.json").write_text(json.dumps(args))

    killed = subprocess.run([sys.executable, "-c", COMMIT_SCRIPT, str(tmp_path / "args.json")],
                            cwd=Path(__file__).parents[1])
    assert killed.returncode == 9  # the driver died right after this step

    marker, names, uris = _partition_state(layout)
    if marker is not None:  # a reader that follows _SUCCESS.json sees exactly one run, complete
        assert names == set(marker["files"])
        assert uris == ({"a", "b", "c"} if marker["run_id"] == "old" else {"b", "c", "d"})
    if step in ("journal", "files_moved"):  # repaired by the CLI here, by the next run of the date otherwise
        assert main(["score", "--repair", out]) == 0
        assert json.loads(capsys.readouterr().out)["repaired"] == {f"{DAY1}": "new"}
    else:
        assert nightly.repair(layout) == (None if step == "journal_removed" else "new")
    marker, names, uris = _partition_state(layout)
    assert marker["run_id"] == "new" and names == set(marker["files"]) and uris == {"b", "c", "d"}
    heat = nightly.listing(layout.fs, layout.heatmaps.path)
    assert {n: Path(p).read_text() for n, p in heat.items()} == {"b.png": "new:b", "d.png": "new:d"}
    assert not nightly.listing(layout.fs, layout.runs.path)  # no journal, no staging left


def test_no_journal_means_the_partition_was_never_touched(tmp_path):
    layout = _commit_night(str(tmp_path / "scores"), DAY1, "old", ["a"])
    _stage(layout, "crashed", ["b"])  # died before its commit began
    assert nightly.repair(layout) is None
    marker, _, uris = _partition_state(layout)
    assert marker["run_id"] == "old" and uris == {"a"}


# -- lease ----------------------------------------------------------------------------------------
DEAD_HOLDER = (
    "import os, sys; from onenip_ray.lease import Lease; from onenip_ray.storage import Location; "
    "Lease(Location(sys.argv[1]), 'dead-run', 3.0).acquire(); os._exit(0)"
)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_one_writer_per_date_and_expiry(where, tmp_path, request):
    base = request.getfixturevalue("s3_bucket") if where == "s3" else str(tmp_path)
    uri = storage.join(base, "scores/_runs/run_date=2026-11-27/lease.json")
    location = storage.Location(uri)
    first = Lease(location, "run-a", ttl=2.0)
    first.acquire()
    with pytest.raises(LeaseHeld, match=r"run run-a on host .* \(pid \d+\), started"):
        Lease(location, "run-b", 60).acquire()
    time.sleep(3.0)  # longer than the ttl: renewed in the background, still held
    with pytest.raises(LeaseHeld, match="run-a"):
        Lease(location, "run-b", 60).acquire()
    first.check()
    first.release()

    subprocess.run([sys.executable, "-c", DEAD_HOLDER, uri], check=True, cwd=Path(__file__).parents[1])
    expires = dt.datetime.fromisoformat(json.loads(storage.read_bytes(uri))["expires_at"]).timestamp()
    if time.time() < expires - 0.5:  # (a very slow machine may already be past it)
        with pytest.raises(LeaseHeld, match="dead-run"):
            Lease(location, "run-c", 60).acquire()
    # the dead holder stopped renewing: its lease expires and is taken over
    time.sleep(max(0.0, expires - time.time()) + 0.2)
    taker = Lease(location, "run-c", 60)
    taker.acquire()
    storage.write_bytes(uri, json.dumps({"run_id": "intruder", "expires_at": "2099-01-01T00:00:00+00:00"}).encode())
    with pytest.raises(LeaseLost, match="intruder"):
        taker.check()  # a holder that lost its lease never commits
    taker.release()  # leaves the other run's lease alone
    assert json.loads(storage.read_bytes(uri))["run_id"] == "intruder"


def test_second_run_for_a_date_exits_naming_the_first(tmp_path, capsys):
    out = str(tmp_path / "scores")
    with Lease(nightly.NightLayout(storage.Location(out), DAY1).lease, "20261127-first", 60):
        code = main(["score", "--bundle", str(tmp_path / "no-bundle"), "--input", str(tmp_path), "--output", out,
                     "--run-date", "2026-11-27"])
    assert code == EXIT_BUSY
    assert "run 20261127-first on host" in capsys.readouterr().err


def test_empty_input_is_rejected_unless_allowed(tiny_bundle, tmp_path, capsys):
    import pandas as pd

    out = str(tmp_path / "scores")
    _commit_night(out, DAY1, "good-night", ["a", "b"])
    (tmp_path / "empty").mkdir()
    argv = ["score", "--bundle", tiny_bundle, "--input", str(tmp_path / "empty"), "--output", out, "--run-date",
            "2026-11-27"]
    assert main(argv) == 3
    assert "no input images" in capsys.readouterr().err
    assert len(pd.read_parquet(out)) == 2  # the good night stays
    assert main([*argv, "--allow-empty"]) == 0
    capsys.readouterr()
    assert len(pd.read_parquet(out)) == 0
    assert json.loads(Path(out, "run_date=2026-11-27", SUCCESS_FILE).read_text())["counts"]["total"] == 0


# -- transient faults -----------------------------------------------------------------------------
def test_reads_writes_and_commits_survive_a_faulty_s3(s3_bucket, s3_env):
    bucket = s3_bucket.removeprefix("s3://")
    client = boto3.client("s3", endpoint_url=s3_env)
    blobs = {f"in/{i:02d}.png": bytes([i]) * (100 + i) for i in range(40)}
    for key, data in blobs.items():
        client.put_object(Bucket=bucket, Key=key, Body=data)
    with FaultProxy(s3_env, fault_rate=0.2, seed=1) as proxy:
        for key, data in blobs.items():
            assert storage.read_bytes(f"{s3_bucket}/{key}", proxy.url) == data
        assert sorted(storage.iter_files(f"{s3_bucket}/in", (".png",),
                                         proxy.url)) == sorted(f"{s3_bucket}/{k}" for k in blobs)
        with pytest.raises(FileNotFoundError):
            storage.read_bytes(f"{s3_bucket}/in/nothing.png", proxy.url)
        layout = _commit_night(f"{s3_bucket}/scores", DAY1, "r1", ["a", "b", "c"], endpoint=proxy.url)
        with Lease(layout.lease, "r2", 60):
            pass
        assert proxy.stats["slow_down"] > 5 and proxy.stats["reset"] > 5
    marker, names, uris = _partition_state(nightly.NightLayout(storage.Location(f"{s3_bucket}/scores", s3_env), DAY1))
    assert marker["run_id"] == "r1" and len(names) == 2 and uris == {"a", "b", "c"}


def test_repair_migrates_an_output_of_the_previous_layout(tmp_path, capsys):
    """onenip-result/1: run_date also inside the files (readers failed to merge it with the
    directory), heat maps under heatmaps/ (read as Parquet by pandas), staging under _staging/."""
    import pandas as pd
    import pyarrow as pa

    out = tmp_path / "scores"
    legacy = pa.schema([f for f in FILE_SCHEMA if f.name != "error_kind"] + [pa.field("run_date", pa.date32())])
    rows = [error_row(u, "x", error_kind="missing", model_version="v", run_id="old", run_date=DAY1) for u in ("a", "b")]
    rows[0]["heatmap_uri"] = f"{out}/heatmaps/run_date=2026-11-27/a.png"
    (out / "run_date=2026-11-27").mkdir(parents=True)
    pq.write_table(to_table(rows).select(legacy.names).cast(legacy),
                   out / "run_date=2026-11-27" / "part-old-00000.parquet")
    (out / "heatmaps/run_date=2026-11-27").mkdir(parents=True)
    (out / "heatmaps/run_date=2026-11-27/a.png").write_bytes(b"png")
    (out / "_staging/crashed/data").mkdir(parents=True)
    pq.write_table(to_table(rows), out / "_staging/crashed/data/x.parquet")
    with pytest.raises(Exception, match="Unable to merge|Could not read schema"):
        pd.read_parquet(out)

    assert main(["score", "--repair", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["migrated"] == {"files_rewritten": 1, "heatmaps_moved": 1}
    frame = pd.read_parquet(out)
    assert len(frame) == 2 and list(frame["run_date"].astype(str).unique()) == ["2026-11-27"]
    assert frame["heatmap_uri"].iloc[0] == f"{out}/_heatmaps/run_date=2026-11-27/a.png"
    assert (out / "_heatmaps/run_date=2026-11-27/a.png").read_bytes() == b"png"
    assert sorted(p.name for p in out.iterdir()) == ["_heatmaps", "run_date=2026-11-27"]
    assert main(["score", "--repair", str(out)]) == 0  # idempotent
    assert json.loads(capsys.readouterr().out)["migrated"] == {"files_rewritten": 0, "heatmaps_moved": 0}
