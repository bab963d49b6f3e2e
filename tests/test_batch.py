"""Nightly batch scoring: input listing, and the Ray Data pipeline end to end on moto S3 and locally
(bad inputs, heat maps, reruns of a date, an inference actor dying mid-run)."""
from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import time
from collections import Counter
from pathlib import Path

import boto3
import cv2
import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from onenip_ray import storage
from onenip_ray.batch import BatchConfig, InferenceActor, run_batch_scoring
from onenip_ray.bundle import load_bundle, write_bundle
from onenip_ray.cli import main
from onenip_ray.formats import uri_stem
from onenip_ray.inputs import list_inputs
from onenip_ray.nightly import STAGED_SUFFIX
from onenip_ray.schema import FILE_SCHEMA, OUTPUT_COLUMNS
from onenip_ray.scoring import Scorer
from tests.faultproxy import FaultProxy
from tests.inputs import bad_inputs, good_inputs
from tests.test_scoring import tiny_images

DAY = dt.date(2026, 11, 27)


def _split(uri: str) -> tuple[str, str]:
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    return bucket, key


def _keys(client, bucket: str, prefix: str) -> set[str]:
    """Object keys under ``prefix``, without the empty ``dir/`` markers pyarrow leaves."""
    listing = client.list_objects_v2(Bucket=bucket, Prefix=prefix)
    return {o["Key"] for o in listing.get("Contents", []) if not o["Key"].endswith("/")}


# -- listing --------------------------------------------------------------------------------------
def test_list_folder_recursive_images_only(tmp_path):
    for rel in ("a.png", "sub/b.JPG", "sub/deeper/c.tiff", "notes.txt", "sub/.DS_Store"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    assert sorted(list_inputs(str(tmp_path))) == [
        (str(tmp_path / "a.png"), None), (str(tmp_path / "sub/b.JPG"), None),
        (str(tmp_path / "sub/deeper/c.tiff"), None),
    ]


def test_list_manifests_csv_and_parquet(tmp_path):
    (tmp_path / "m.csv").write_text("image_uri,class_name\nimgs/a.png,disc\n/abs/b.png,\ns3://bkt/c.png,stripes\nimgs/a.png,stripes\n")
    expected = [(str(tmp_path / "imgs/a.png"), "disc"), ("/abs/b.png", None), ("s3://bkt/c.png", "stripes")]
    assert list_inputs(str(tmp_path / "m.csv")) == expected  # relative to the manifest; first duplicate wins
    pq.write_table(pa.table({"image_uri": ["imgs/a.png", "/abs/b.png", "s3://bkt/c.png"]}), tmp_path / "m.parquet")
    assert list_inputs(str(tmp_path / "m.parquet")) == [(u, None) for u, _ in expected]
    (tmp_path / "bad.csv").write_text("path\na.png\n")
    with pytest.raises(ValueError, match="no image_uri column"):
        list_inputs(str(tmp_path / "bad.csv"))


def test_list_s3_prefix(s3_bucket, s3_env):
    bucket, _ = _split(s3_bucket)
    client = boto3.client("s3", endpoint_url=s3_env)
    for key in ("day/x y ü.png", "day/sub/z.jpeg", "day/readme.md", "other/q.png"):
        client.put_object(Bucket=bucket, Key=key, Body=b"x")
    assert list_inputs(f"{s3_bucket}/day") == [(f"{s3_bucket}/day/sub/z.jpeg", None),
                                               (f"{s3_bucket}/day/x y ü.png", None)]


def test_chunks_bound_the_listing_and_keep_manifest_order(tmp_path):
    from onenip_ray.inputs import iter_input_chunks

    for i in range(7):
        (tmp_path / "in" / f"{i}.png").parent.mkdir(exist_ok=True)
        (tmp_path / "in" / f"{i}.png").write_bytes(b"x")
    chunks = list(iter_input_chunks(str(tmp_path / "in"), chunk_size=3))
    assert [c.num_rows for c in chunks] == [3, 3, 1]
    assert [u for c in chunks for u in c.column("image_uri").to_pylist()] == [
        str(tmp_path / "in" / f"{i}.png") for i in range(7)
    ]
    rows = [f"{i % 5}.png,{'disc' if i < 5 else 'stripes'}" for i in range(8)]
    (tmp_path / "m.csv").write_text("image_uri,class_name\n" + "\n".join(rows) + "\n")
    chunks = list(iter_input_chunks(str(tmp_path / "m.csv"), chunk_size=2))
    assert [c.num_rows for c in chunks] == [2, 2, 1]
    assert [(r["image_uri"], r["class_name"]) for c in chunks for r in c.to_pylist()] == [
        (str(tmp_path / f"{i}.png"), "disc") for i in range(5)]
    # repeats across the manifest's row batches are dropped too (first row wins)
    pq.write_table(pa.table({"image_uri": [f"/x/{i}.png" for i in (0, 1, 2, 0, 3, 1, 4, 4)]}), tmp_path / "m.parquet")
    chunks = list(iter_input_chunks(str(tmp_path / "m.parquet"), chunk_size=2))
    assert [u for c in chunks for u in c.column("image_uri").to_pylist()] == [f"/x/{i}.png" for i in range(5)]
    assert [c.num_rows for c in chunks] == [2, 2, 1]


def test_accounting_drops_repeats_and_refuses_lost_inputs(tmp_path):
    """Duplicates a retried task could leave in staging are dropped; a missing input fails the commit."""
    from onenip_ray.accounting import Tally, account
    from onenip_ray.schema import FILE_SCHEMA, error_row, to_table

    run = {"model_version": "v", "run_id": "r", "run_date": DAY, "error_kind": "missing"}
    for name, uris, text in (("0", ("a", "b"), "first"), ("1", ("b", "c"), "again")):
        pq.write_table(to_table([error_row(u, text, **run) for u in uris]).drop_columns(["run_date"]),
                       tmp_path / f"{name}.staged")
    fs = pafs.LocalFileSystem()
    files = [str(tmp_path / "0.staged"), str(tmp_path / "1.staged")]
    tally = Tally(files=[], groups=Counter())
    account(fs, files, pa.chunked_array([["a", "b", "c"]]), tally)
    assert tally.duplicates_dropped == 1 and tally.files == files and sum(tally.groups.values()) == 3
    rows = pa.concat_tables([pq.read_table(f) for f in files]).to_pylist()
    assert [(r["image_uri"], r["error"]) for r in rows] == [("a", "first"), ("b", "first"), ("c", "again")]
    assert pq.read_table(files[1]).schema.equals(FILE_SCHEMA, check_metadata=True)
    with pytest.raises(RuntimeError, match=r"1 missing \(e.g. \['d'\]\)"):
        account(fs, files, pa.chunked_array([["a", "b", "c", "d"]]), Tally(files=[], groups=Counter()))


# -- pipeline -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sensitive_bundle(tiny_bundle, tmp_path_factory) -> str:
    """The tiny bundle with the ``disc`` threshold lowered to its map floor: disc images are
    anomalous (overlays get written); ``stripes`` at the rule's strict target 0.01, so some of its
    images pass (at the default target 0.1 every input exceeded its threshold)."""
    out = str(tmp_path_factory.mktemp("sensitive") / "bundle")
    bundle = load_bundle(tiny_bundle)  # rewritten, not edited in place: loading verifies the content hash
    cal = bundle.calibration
    disc = dataclasses.replace(cal.per_class["disc"], threshold_raw=cal.per_class["disc"].map_low)
    write_bundle(out, bundle.config, bundle.backbone, bundle.model, bundle.pool,
                 dataclasses.replace(cal, per_class={**cal.per_class, "disc": disc,
                                                     "stripes": cal.per_class["stripes"].retargeted(0.01)}),
                 bundle.meta["training"])
    return out


def _inputs(tiny_dataset: Path) -> tuple[dict[str, bytes], dict[str, str]]:
    """Relative name → bytes of every input, and name → expected error fragment for the bad ones."""
    images = tiny_images(tiny_dataset)
    files = {f"good/{name}": data for name, data in good_inputs(images).items()}
    files.update({f"good/more/{i:02d}.png": cv2.imencode(".png", img)[1].tobytes() for i,
                  img in enumerate(images[7:12])})
    bad = {f"bad/{name}": pair for name, pair in bad_inputs(images[0]).items()}
    files.update({name: data for name, (data, _) in bad.items()})
    return files, {name: fragment for name, (_, fragment) in bad.items()}


def _s3fs(endpoint: str) -> pafs.S3FileSystem:
    return pafs.S3FileSystem(endpoint_override=endpoint, access_key="testing", secret_key="testing", region="us-east-1")


def _check_rows(table: pa.Table, uris: dict[str, str], errors: dict[str, str]) -> dict[str, dict]:
    """One row per input URI (values: relative names); bad ones are error rows naming the problem."""
    rows = table.to_pylist()
    by_uri = {r["image_uri"]: r for r in rows}
    assert len(rows) == len(by_uri) == len(uris) and by_uri.keys() == uris.keys()
    for uri, name in uris.items():
        row = by_uri[uri]
        if name in errors:
            assert row["status"] == "error" and errors[name] in row["error"] and uri in row["error"], (
                name,
                row["error"],
            )
            assert all(row[c] is None for c in OUTPUT_COLUMNS)
        else:
            assert row["status"] == "ok" and row["error"] is None and row["score_raw"] is not None, (name, row["error"])
    return by_uri


@pytest.mark.slow
def test_s3_pipeline_bad_inputs_heatmaps_and_rerun(ray_cluster, s3_bucket, s3_env, sensitive_bundle, tiny_dataset):
    bucket, _ = _split(s3_bucket)
    client = boto3.client("s3", endpoint_url=s3_env)
    files, errors = _inputs(tiny_dataset)
    for name, data in files.items():
        client.put_object(Bucket=bucket, Key=f"incoming/{name}", Body=data)
    bundle_uri = f"{s3_bucket}/bundles/tiny"
    storage.commit_dir(sensitive_bundle, bundle_uri, marker="bundle.json")
    uris = {f"{s3_bucket}/incoming/{name}": name for name in files}
    cfg = BatchConfig(bundle=bundle_uri, input=f"{s3_bucket}/incoming", output=f"{s3_bucket}/scores", run_date=DAY,
                      heatmaps=True, batch_size=4, actor_cpus=0.5, task_cpus=0.25, max_error_fraction=0.5)

    summary = run_batch_scoring(cfg)

    fs = _s3fs(s3_env)
    partition = f"{bucket}/scores/run_date=2026-11-27"
    table = pq.read_table(partition, filesystem=fs)
    assert table.schema.equals(FILE_SCHEMA, check_metadata=True)  # run_date is the partition directory
    by_uri = _check_rows(table, uris, errors)
    assert {r["run_id"] for r in by_uri.values()} == {summary["run_id"]}
    assert {r["error_kind"] for r in by_uri.values() if r["status"] == "error"} == {"invalid_image"}
    assert summary["errors_by_kind"] == {"invalid_image": len(errors)}

    # the pipeline's rows equal the Scorer's on the same bytes
    scorer = Scorer.from_uri(bundle_uri)
    for expected in scorer.score_bytes([(uri, files[name], None) for uri, name in uris.items()]):
        got = by_uri[expected["image_uri"]]
        assert (got["status"], got["error"], got["class_name"], got["prompt_id"]) == (
            expected["status"], expected["error"], expected["class_name"], expected["prompt_id"])
        if got["status"] == "ok":
            np.testing.assert_allclose([got["score_raw"], got["score"], got["max_pixel_score"]],
                                       [expected["score_raw"], expected["score"], expected["max_pixel_score"]],
                                       rtol=1e-5, atol=1e-5)
            assert got["is_anomalous"] == expected["is_anomalous"]

    # heat maps for every scored image, overlays for the anomalous ones, nothing for errors
    ok_rows = [r for r in by_uri.values() if r["status"] == "ok"]
    anomalous = [r for r in ok_rows if r["is_anomalous"]]
    assert anomalous and len(anomalous) < len(ok_rows)
    heat_prefix = "scores/_heatmaps/run_date=2026-11-27/"
    keys = _keys(client, bucket, heat_prefix)
    assert keys == {heat_prefix + uri_stem(r["image_uri"]) + ".png" for r in ok_rows} | {
        heat_prefix + uri_stem(r["image_uri"]) + "_overlay.jpg" for r in anomalous}
    for row in ok_rows:
        assert row["heatmap_uri"] == f"{s3_bucket}/{heat_prefix}{uri_stem(row['image_uri'])}.png"
    png = client.get_object(Bucket=bucket, Key=_split(ok_rows[0]["heatmap_uri"])[1])["Body"].read()
    assert cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR).shape == (64, 64, 3)
    first = anomalous[0]
    overlay = client.get_object(Bucket=bucket,
                                Key=_split(first["heatmap_uri"])[1].replace(".png", "_overlay.jpg"))["Body"].read()
    assert cv2.imdecode(np.frombuffer(overlay, np.uint8),
                        cv2.IMREAD_COLOR).shape == (first["height"], first["width"], 3)

    # the commit marker carries the counts; nothing staged is left behind
    marker = json.loads(client.get_object(Bucket=bucket, Key="scores/run_date=2026-11-27/_SUCCESS.json")["Body"].read())
    assert marker["counts"] == {"total": len(files), "ok": len(files) - len(errors), "error": len(errors),
                                "anomalous": len(anomalous), "unknown": 0}  # every input is a disc or stripes image
    assert marker["per_class"]["disc"]["anomalous"] == marker["per_class"]["disc"]["ok"] > 0
    assert marker["model_version"] == scorer.spec.model_version and marker["run_id"] == summary["run_id"]
    assert marker["images_per_second"] > 0 and marker["wall_seconds"] > 0
    listed = _keys(client, bucket, "scores/")
    assert not [k for k in listed if k.startswith("scores/_runs/")]  # no staging, lease or journal left
    committed = {k.rsplit("/", 1)[1] for k in listed if k.startswith("scores/run_date=")}
    assert committed == {*marker["files"], "_SUCCESS.json"}

    # the same date again, with one image gone and one new, through a proxy that answers 20 % of the
    # S3 requests with 503 SlowDown or a reset connection: the partition is replaced, no duplicates,
    # no error row from a transient fault, the same scores
    client.delete_object(Bucket=bucket, Key="incoming/good/plain.png")
    client.put_object(Bucket=bucket, Key="incoming/good/late.png", Body=files["good/photo.jpg"])
    del uris[f"{s3_bucket}/incoming/good/plain.png"]
    uris[f"{s3_bucket}/incoming/good/late.png"] = "good/late.png"
    first_scores = {u: r["score_raw"] for u, r in by_uri.items()}
    with FaultProxy(s3_env, fault_rate=0.2, seed=7) as proxy:
        rerun = run_batch_scoring(dataclasses.replace(cfg, heatmaps=False, endpoint=proxy.url))
    assert proxy.stats["slow_down"] + proxy.stats["reset"] > 10
    assert rerun["run_id"] != summary["run_id"] and rerun["errors_by_kind"] == {"invalid_image": len(errors)}
    table = pq.read_table(partition, filesystem=fs)
    by_uri = _check_rows(table, uris, errors)
    for uri, row in by_uri.items():
        if uri in first_scores and row["status"] == "ok":
            assert row["score_raw"] == pytest.approx(first_scores[uri], rel=1e-5, abs=1e-5)
    assert {r["run_id"] for r in by_uri.values()} == {rerun["run_id"]}
    assert all(r["heatmap_uri"] is None for r in by_uri.values())
    assert not _keys(client, bucket, heat_prefix)  # stale heat maps went with their rows
    whole = pq.read_table(f"{bucket}/scores", filesystem=fs)  # the table root, no options
    assert whole.num_rows == len(uris) and set(whole.column("run_date").to_pylist()) == {"2026-11-27"}


def _crash_once_actor(marker: str, on_call: int) -> type:
    """An InferenceActor whose process dies (``os._exit``) in its ``on_call``-th batch, once ever."""

    class CrashOnceActor(InferenceActor):
        calls = 0

        def __call__(self, batch):
            self.calls += 1
            if self.calls == on_call and not os.path.exists(marker):
                Path(marker).write_text(str(os.getpid()))
                os._exit(1)
            return super().__call__(batch)

    return CrashOnceActor


@pytest.mark.slow
def test_actor_killed_mid_run_loses_and_duplicates_nothing(ray_cluster, tiny_bundle, tiny_dataset, tmp_path, capsys):
    files, errors = _inputs(tiny_dataset)
    for name, data in files.items():
        (tmp_path / "in" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "in" / name).write_bytes(data)
    given = {name: "disc" for name in files if name.startswith("good/more/")} | {"good/photo.jpg": "gearbox"}
    manifest = ["image_uri,class_name"] + [f"in/{name},{given.get(name, '')}" for name in files]
    manifest += ["in/missing.png,", "in/good/plain.png,stripes"]  # unreadable; repeated (the first row counts)
    (tmp_path / "manifest.csv").write_text("\n".join(manifest) + "\n")
    errors = {**errors, "missing.png": "cannot read", "good/photo.jpg": "unknown class 'gearbox'"}
    uris = {str(tmp_path / "in" / name): name for name in [*files, "missing.png"]}
    marker = str(tmp_path / "crashed")
    cfg = BatchConfig(bundle=tiny_bundle, input=str(tmp_path / "manifest.csv"), output=str(tmp_path / "out"),
                      run_date=DAY, batch_size=2, actor_cpus=0.5, task_cpus=0.25, max_error_fraction=0.6)

    summary = run_batch_scoring(cfg, actor_cls=_crash_once_actor(marker, on_call=3))

    assert os.path.exists(marker)  # the actor really died mid-run
    table = pq.read_table(tmp_path / "out" / "run_date=2026-11-27")
    by_uri = _check_rows(table, uris, errors)
    assert by_uri[str(tmp_path / "in/good/photo.jpg")]["class_name"] == "gearbox"
    assert by_uri[str(tmp_path / "in/good/plain.png")]["class_source"] == "retrieved"
    assert all(r["class_name"] == "disc" and r["class_source"] == "given" for u,
               r in by_uri.items() if "/good/more/" in u)
    assert summary["counts"]["total"] == len(uris)
    assert sorted(os.listdir(tmp_path / "out")) == ["run_date=2026-11-27"]  # staging, lease and journal gone
    assert by_uri[str(tmp_path / "in/missing.png")]["error_kind"] == "missing"

    # the same date again through the CLI, locally: the partition is replaced by directory renames
    argv = ["score", "--bundle", tiny_bundle, "--input", cfg.input, "--out", cfg.output, "--run-date", "2026-11-27",
            "--batch-size", "2", "--actor-cpus", "0.5", "--task-cpus", "0.25", "--max-error-fraction", "0.6"]
    assert main(argv) == 0
    printed = capsys.readouterr().out  # Ray's own log lines may come first
    rerun = json.loads(printed[printed.index("{\n  \"partition\""):])
    assert rerun["counts"] == summary["counts"] and rerun["run_id"] != summary["run_id"]
    table = pq.read_table(tmp_path / "out" / "run_date=2026-11-27")
    assert table.num_rows == len(uris) and set(table.column("run_id").to_pylist()) == {rerun["run_id"]}
    marker = json.loads((tmp_path / "out" / "run_date=2026-11-27" / "_SUCCESS.json").read_text())
    assert sorted(os.listdir(tmp_path / "out" / "run_date=2026-11-27")) == sorted([*marker["files"], "_SUCCESS.json"])


def _poisoned_actor(staged: str) -> type:
    """An InferenceActor that fails every batch holding image ``04.png`` or a later one (a bug, a node
    lost for good), once images 00–03 are staged under ``staged`` (two files of two rows): the run
    dies part-way through the night's one pipeline."""

    class PoisonedActor(InferenceActor):
        def __call__(self, batch):
            if any(os.path.basename(u) >= "04" for u in batch["image_uri"]):
                deadline = time.monotonic() + 120
                while len(list(Path(staged).rglob(f"*{STAGED_SUFFIX}"))) < 2 and time.monotonic() < deadline:
                    time.sleep(0.2)
                raise RuntimeError("inference failed for good")
            return super().__call__(batch)

    return PoisonedActor


@pytest.mark.slow
def test_failed_night_resumes_and_a_bad_night_never_replaces_a_good_one(ray_cluster, tiny_bundle, tiny_dataset,
                                                                        tmp_path, capsys):
    import pandas as pd

    images = tiny_images(tiny_dataset)
    (tmp_path / "in").mkdir()
    for i in range(10):
        cv2.imwrite(str(tmp_path / "in" / f"{i:02d}.png"), images[i % len(images)])
    out = str(tmp_path / "out")
    cfg = BatchConfig(bundle=tiny_bundle, input=str(tmp_path / "in"), output=out, run_date=DAY, batch_size=2,
                      actor_cpus=0.5, task_cpus=0.25, chunk_size=4, rows_per_file=2, run_id="20261127-failed")

    staged = os.path.join(out, "_runs", "run_date=2026-11-27", "20261127-failed", "data")
    with pytest.raises(Exception, match="inference failed for good"):
        run_batch_scoring(cfg, actor_cls=_poisoned_actor(staged))
    assert not os.path.exists(os.path.join(out, "run_date=2026-11-27"))  # nothing committed, the lease released
    assert not os.path.exists(os.path.join(out, "_runs", "run_date=2026-11-27", "lease.json"))

    resumed = run_batch_scoring(dataclasses.replace(cfg, run_id="20261127-resumed"))
    assert resumed["resumed"] == 4 and resumed["resumed_from"] == ["20261127-failed"] and resumed["counts"]["ok"] == 10
    frame = pd.read_parquet(out)
    assert len(frame) == 10 and frame["image_uri"].is_unique
    assert frame.groupby("run_id").size().to_dict() == {"20261127-failed": 4, "20261127-resumed": 6}

    # a night where most images are gone: rejected, the good night stays, the new rows stay staged
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(
        "image_uri\n" + "".join(f"in/{i:02d}.png\n" for i in range(10)) + "".join(f"gone/{i}.png\n" for i in range(10))
    )
    argv = ["score", "--bundle", tiny_bundle, "--input", str(manifest), "--out", out, "--run-date", "2026-11-27",
            "--batch-size", "2", "--actor-cpus", "0.5", "--task-cpus", "0.25"]
    assert main(argv) == 3
    err = capsys.readouterr().err
    assert "10 of 20 inputs (50.0 %) are errors (missing 10), above --max-error-fraction 0.2" in err
    assert set(pd.read_parquet(out)["run_id"]) == {"20261127-failed", "20261127-resumed"}
    (rejected,) = Path(out, "_runs", "run_date=2026-11-27").glob("*/rejected.json")
    staged = [p for p in rejected.parent.rglob(f"*{STAGED_SUFFIX}")]
    assert sum(pq.read_table(p).num_rows for p in staged) == 20
    assert json.loads(rejected.read_text())["errors_by_kind"] == {"missing": 10}
