"""``onenip export`` and the exported runtimes: parity with PyTorch on real images, refusal of a
miss, the Scorer / batch job / evaluation on ONNX Runtime and OpenVINO, pools as graph inputs."""
from __future__ import annotations

import contextlib
import datetime as dt
import io
import json
import sys
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from onenip_ray import export as export_module
from onenip_ray.batch import BatchConfig, run_batch_scoring
from onenip_ray.bundle import load_bundle, write_bundle
from onenip_ray.cli import main
from onenip_ray.engines import (
    EXPORT_FILE,
    TorchEngine,
    load_export,
    make_engine,
    require_runtime,
)
from onenip_ray.errors import BundleError
from onenip_ray.export import MAX_SCORE_DIFF, MIN_MAP_CORR, ExportError, export_bundle
from onenip_ray.schema import RESULT_SCHEMA
from onenip_ray.scoring import Scorer, ScoringSpec
from tests.conftest import BOTTLE, needs_bottle
from tests.inputs import bad_inputs
from tests.test_scoring import tiny_images

TOLERANCE = MAX_SCORE_DIFF  # scores of the exported runtimes vs PyTorch: the export's own bound


def _test_folder(tiny_dataset: Path) -> str:
    """The tiny set's test images of one class (real painted defects), as a parity image folder."""
    return str(tiny_dataset / "disc" / "test")


@pytest.fixture(scope="module")
def onnx_export(tiny_bundle, tiny_dataset, tmp_path_factory) -> tuple[str, dict]:
    """The tiny bundle exported by the CLI (ONNX, dynamic batch); returns (dir, CLI JSON)."""
    out = str(tmp_path_factory.mktemp("export") / "onnx")
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        rc = main(["export", "--bundle", tiny_bundle, "--format", "onnx", "--out", out, "--images", str(tiny_dataset)])
    assert rc == 0, stderr.getvalue()
    assert "max abs image-score diff" in stderr.getvalue() and "map correlation" in stderr.getvalue()
    return out, json.loads(stdout.getvalue())


def test_export_writes_graphs_and_checks_parity(onnx_export):
    out, result = onnx_export
    p = result["parity"]
    assert p["images"] >= 20 and p["runtime"] == "onnxruntime"
    assert p["max_abs_score_diff"] < MAX_SCORE_DIFF and p["map_correlation"] > MIN_MAP_CORR
    assert p["same_prompt_fraction"] == 1.0 and p["min_image_map_correlation"] > MIN_MAP_CORR
    files = sorted(f.name for f in Path(out).iterdir())
    assert files == ["bundle.json", EXPORT_FILE, "prompts.onnx", "prompts.safetensors", "score.onnx"]
    meta = json.loads(Path(out, EXPORT_FILE).read_text())
    assert meta["batch"] == "dynamic" and meta["parity"] == p
    import onnx

    graph = onnx.load(str(Path(out, "score.onnx")))
    inputs = [i.name for i in graph.graph.input]
    assert inputs == ["image", "class_index", "prompt_tokens", "prompt_descriptors", "prompt_class", "memory",
                      "memory_sqnorm", "memory_weight", "fusion", "neighbor_pool"]
    assert not any("threshold" in i.name for i in graph.graph.initializer)  # thresholds stay in bundle.json


def test_onnxruntime_scorer_gives_the_torch_rows(tiny_bundle, onnx_export, tiny_dataset):
    """Same rows (schema, classes, prompts, decisions) with scores within the parity bound; bad
    inputs still give error rows; a given class restricts the prompts as in PyTorch."""
    out, _ = onnx_export
    images = tiny_images(tiny_dataset)
    pngs = [cv2.imencode(".png", img)[1].tobytes() for img in images]
    names = load_bundle(tiny_bundle).classes
    items = [(f"{i}.png", d, names[i % 2] if i % 3 == 0 else None) for i, d in enumerate(pngs)]
    items += [(name, data, None) for name, (data, _) in list(bad_inputs(images[0]).items())[:3]]
    ref = Scorer.from_uri(tiny_bundle, batch_size=4, run_id="r").score_bytes(items)
    got = Scorer.from_uri(out, runtime="onnxruntime", batch_size=5, run_id="r").score_bytes(items)
    from onenip_ray.schema import to_table

    assert to_table(got).schema.equals(RESULT_SCHEMA)
    for r, g in zip(ref, got):
        assert g["status"] == r["status"] and g["image_uri"] == r["image_uri"]
        if r["status"] != "ok":
            assert g["error"] == r["error"]
            continue
        assert (g["class_name"], g["prompt_id"], g["class_source"], g["model_version"]) == \
               (r["class_name"], r["prompt_id"], r["class_source"], r["model_version"])
        assert abs(g["score_raw"] - r["score_raw"]) < TOLERANCE and abs(g["score"] - r["score"]) < TOLERANCE
        assert g["threshold_raw"] == r["threshold_raw"]


@pytest.mark.parametrize("neighbor_pool", [[1], [3], [3, 1]])
def test_a_changed_prompt_pool_runs_on_the_same_graph(tiny_bundle, onnx_export, tiny_dataset, neighbor_pool):
    """The pool is a graph input: a pool without one class (as ``add-class`` would change it), its
    memory weighed, or its classes' patches averaged over their own neighbourhoods, gives PyTorch's
    scores with that pool, no re-export."""
    out, _ = onnx_export
    bundle = load_bundle(tiny_bundle)
    pool = bundle.pool.without_class("stripes") if len(neighbor_pool) == 1 else bundle.pool
    pool = replace(pool, neighbor_pool=neighbor_pool)
    pool.memory_weight = 0.5 + torch.rand(len(pool.memory), generator=torch.Generator().manual_seed(0))
    spec = ScoringSpec.from_bundle(bundle)
    x = np.stack([spec.prepare(f"{i}", cv2.imencode(".png", img)[1].tobytes()).input for i,
                  img in enumerate(tiny_images(tiny_dataset)[:6])])
    # a bundle's pool must match its calibration: swap it in the predictor
    torch_engine = TorchEngine(load_bundle(tiny_bundle))
    torch_engine.predictor.set_pool(pool)
    ref = torch_engine.infer(x, np.full(len(x), -1))
    got = make_engine(load_export(out, pool=pool), "onnxruntime").infer(x, np.full(len(x), -1))
    assert (got.prompt_index == ref.prompt_index).all()
    if len(neighbor_pool) == 1:
        assert (pool.class_index[got.prompt_index] == 0).all()
    np.testing.assert_allclose(got.scores, ref.scores, atol=TOLERANCE, rtol=0)


def test_a_graph_from_before_the_neighbourhoods_refuses_a_pool_that_averages(tiny_bundle, onnx_export):
    model = load_export(onnx_export[0], pool=replace(load_bundle(tiny_bundle).pool, neighbor_pool=[3, 1]))
    del model.export["score_inputs"]["neighbor_pool"]
    with pytest.raises(BundleError, match="export the bundle again"):
        make_engine(model, "onnxruntime")


def test_openvino_fixed_batch_pads_partial_batches(tiny_bundle, tiny_dataset, tmp_path):
    out = str(tmp_path / "ov")
    meta = export_bundle(tiny_bundle, "openvino", out, batch=4, images=_test_folder(tiny_dataset))
    assert meta["batch"] == 4 and meta["parity"]["images"] == 6 and meta["parity"]["runtime"] == "openvino"
    assert {"score.xml", "score.bin", "prompts.xml", "prompts.bin"} <= {f.name for f in Path(out).iterdir()}
    bundle = load_bundle(tiny_bundle)
    spec = ScoringSpec.from_bundle(bundle)
    x = np.stack([spec.prepare(f"{i}", cv2.imencode(".png", img)[1].tobytes()).input for i,
                  img in enumerate(tiny_images(tiny_dataset)[:7])])
    classes = np.array([-1, 0, 1, -1, -1, 0, -1])
    ref = TorchEngine(bundle).infer(x, classes)
    got = make_engine(load_export(out), "openvino").infer(x, classes)  # 7 images = a batch of 4 and a padded 3
    assert got.fused.shape == ref.fused.shape and (got.prompt_index == ref.prompt_index).all()
    np.testing.assert_allclose(got.scores, ref.scores, atol=TOLERANCE, rtol=0)


def test_export_refuses_a_miss_and_writes_nothing(tiny_bundle, tiny_dataset, tmp_path, monkeypatch):
    """Real figures against a bound nothing meets: refused, the target left absent."""
    monkeypatch.setattr(export_module, "MAX_SCORE_DIFF", 0.0)
    out = tmp_path / "refused"
    with pytest.raises(ExportError, match="export refused, nothing written"):
        export_bundle(tiny_bundle, "onnx", str(out), batch=2, images=_test_folder(tiny_dataset))
    assert not out.exists()


def test_clear_errors(tiny_bundle, onnx_export, tmp_path, capsys, monkeypatch):
    out, _ = onnx_export
    assert main(["export", "--bundle", tiny_bundle, "--out", str(tmp_path / "e"), "--image-size", "96"]) == 2
    assert "trained at 64 px" in capsys.readouterr().err
    assert main(["score", "--bundle", tiny_bundle, "--input", str(tmp_path), "--output", str(tmp_path / "o"),
                 "--runtime", "openvino"]) == 2
    assert "onenip export --bundle" in capsys.readouterr().err
    assert main(["score", "--bundle", out, "--input", str(tmp_path), "--output", str(tmp_path / "o")]) == 2
    assert "is an export directory" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if the extra were not installed
    with pytest.raises(ImportError, match=r"pip install 'onenip-ray\[onnx\]'"):
        require_runtime("onnxruntime")
    assert main(["score", "--bundle", out, "--input", str(tmp_path), "--output", str(tmp_path / "o"), "--runtime",
                 "onnxruntime"]) == 2
    assert "onenip-ray[onnx]" in capsys.readouterr().err


def test_evaluate_on_onnxruntime_matches_torch(tiny_bundle, onnx_export, tiny_dataset, tmp_path):
    from onenip_ray.evaluate import evaluate

    out, _ = onnx_export
    ref = evaluate(tiny_bundle, [("mvtec", str(tiny_dataset))], str(tmp_path / "t"))
    got = evaluate(out, [("mvtec", str(tiny_dataset))], str(tmp_path / "o"), runtime="onnxruntime")
    assert got["runtime"] == "onnxruntime" and got["branches"] is None
    for cls, metrics in ref["per_class"].items():
        for key in ("image_auroc", "pixel_auroc", "pixel_ap"):
            assert abs(got["per_class"][cls][key] - metrics[key]) <= 0.002, (cls, key)


@pytest.mark.slow
def test_batch_scoring_on_onnxruntime_writes_the_same_parquet(ray_cluster, tiny_bundle, onnx_export, tiny_dataset,
                                                              tmp_path):
    out, _ = onnx_export
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i, img in enumerate(tiny_images(tiny_dataset)[:8]):
        cv2.imwrite(str(inputs / f"{i}.png"), img)
    (inputs / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    day = dt.date(2026, 11, 30)
    tables = {}
    for runtime, uri in (("torch", tiny_bundle), ("onnxruntime", out)):
        summary = run_batch_scoring(BatchConfig(bundle=uri, input=str(inputs), output=str(tmp_path / runtime),
                                                run_date=day, batch_size=4, runtime=runtime))
        assert summary["counts"]["ok"] == 8 and summary["counts"]["error"] == 1
        tables[runtime] = pq.read_table(summary["partition"]).sort_by("image_uri")
    assert tables["onnxruntime"].schema.equals(tables["torch"].schema)
    for column in ("image_uri", "status", "class_name", "prompt_id", "is_anomalous", "model_version"):
        assert tables["onnxruntime"].column(column).to_pylist() == tables["torch"].column(column).to_pylist()
    ref, got = (np.array(t.column("score_raw").to_pylist(),
                         dtype=float) for t in (tables["torch"], tables["onnxruntime"]))
    ok = ~np.isnan(ref)
    assert np.abs(got[ok] - ref[ok]).max() < TOLERANCE


@pytest.mark.slow
def test_lite0_at_224_exports_within_bounds(tiny_dataset, tmp_path):
    """The real backbone at the paper's input size: a one-epoch lite0 bundle at 224 px."""
    from onenip_ray.config import ModelConfig, TrainConfig
    from onenip_ray.train import run_training

    bundle = str(tmp_path / "bundle224")
    run_training(TrainConfig(data=(str(tiny_dataset),), out=bundle, epochs=1, batch_size=4, steps_per_epoch=2,
                             num_workers=0, model=ModelConfig(image_size=224)), storage_path=str(tmp_path / "ray"))
    assert load_bundle(bundle).config.backbone == "tf_efficientnet_lite0"
    images = str(BOTTLE / "test") if BOTTLE.is_dir() else str(tiny_dataset)
    meta = export_bundle(bundle, "onnx", str(tmp_path / "e224"), images=images, parity_images=12)
    p = meta["parity"]
    assert meta["image_size"] == 224 and p["images"] == 12
    assert p["max_abs_score_diff"] < MAX_SCORE_DIFF and p["map_correlation"] > MIN_MAP_CORR


@needs_bottle
def test_bottle_images_through_both_runtimes_agree(onnx_export, tiny_bundle):
    """Real photographs (MVTec bottle, not the model's domain) through ONNX Runtime and PyTorch."""
    out, _ = onnx_export
    paths = sorted((BOTTLE / "test" / "broken_large").glob("*.png"))[:4]
    items = [(str(p), p.read_bytes(), None) for p in paths]
    ref = Scorer.from_uri(tiny_bundle).score_bytes(items)
    got = Scorer.from_uri(out, runtime="onnxruntime").score_bytes(items)
    assert max(abs(r["score_raw"] - g["score_raw"]) for r, g in zip(ref, got)) < TOLERANCE


def test_a_class_added_after_export_needs_no_new_graph(tiny_bundle, onnx_export, tiny_dataset, tmp_path):
    """``onenip add-class`` then ``export --pool-only``: the graphs stay byte for byte, the new class
    scores as in PyTorch, and a bundle with other weights is refused."""
    import hashlib
    import shutil

    from onenip_ray.add_class import add_class
    from tests.test_add_class import _checker

    rng = np.random.default_rng(11)
    normals = tmp_path / "checker"
    normals.mkdir()
    for i in range(6):
        cv2.imwrite(str(normals / f"{i:02d}.png"), _checker(rng))
    bundle2 = str(tmp_path / "b2")
    add_class(tiny_bundle, "checker", str(normals), bundle2)
    export = str(tmp_path / "e")
    shutil.copytree(onnx_export[0], export)
    graph_sha = hashlib.sha256(Path(export, "score.onnx").read_bytes()).hexdigest()
    assert main(["export", "--bundle", bundle2, "--out", export, "--pool-only", "--images",
                 _test_folder(tiny_dataset)]) == 0
    assert hashlib.sha256(Path(export, "score.onnx").read_bytes()).hexdigest() == graph_sha
    meta = json.loads(Path(export, EXPORT_FILE).read_text())
    assert meta["model_version"] == load_bundle(bundle2).version != meta["graphs_from"]
    items = [(f"c{i}.png", cv2.imencode(".png", _checker(rng))[1].tobytes(), None) for i in range(3)]
    ref = Scorer.from_uri(bundle2).score_bytes(items)
    got = Scorer.from_uri(export, runtime="onnxruntime").score_bytes(items)
    assert [r["class_name"] for r in got] == [r["class_name"] for r in ref] == ["checker"] * 3
    assert max(abs(r["score_raw"] - g["score_raw"]) for r, g in zip(ref, got)) < TOLERANCE
    other = str(tmp_path / "other")  # a valid bundle whose weights differ
    source = load_bundle(tiny_bundle)
    with torch.no_grad():
        next(source.model.parameters()).add_(0.01)
    write_bundle(other, source.config, source.backbone, source.model, source.pool, source.calibration,
                 source.meta.get("training", {}))
    with pytest.raises(ExportError, match="other weights"):
        export_bundle(other, "onnx", export, pool_only=True, images=_test_folder(tiny_dataset))


def test_serve_replica_loads_the_exported_runtime(onnx_export, tiny_bundle, tiny_dataset):
    """What a Serve replica builds (``serve.load_model``): the exported engine, named in ``/v1/model``."""
    from onenip_ray.serve import load_model
    from onenip_ray.serve_args import ServeArgs

    out, _ = onnx_export
    loaded = load_model(out, ServeArgs(bundle=out, runtime="onnxruntime", threads=1), run_id="serve-test")
    scorer, info = loaded.scorer, loaded.info
    assert info["runtime"] == "onnxruntime" and info["device"] == "cpu"
    assert info["model_version"] == load_bundle(tiny_bundle).version and info["classes"] == ["disc", "stripes"]
    scorer.engine.check()
    data = cv2.imencode(".png", tiny_images(tiny_dataset)[0])[1].tobytes()
    row = scorer.score_bytes([("x.png", data, None)])[0]
    ref = Scorer.from_uri(tiny_bundle).score_bytes([("x.png", data, None)])[0]
    assert abs(row["score_raw"] - ref["score_raw"]) < TOLERANCE


def test_the_graphs_nearest_distances_are_the_predictors():
    """``export.nearest_distances`` (the graph's form: padded per-class memory, weights) equals
    ``prompts.neighbor_distances`` with the same weighed memory, run eagerly."""
    from onenip_ray.engines import memory_inputs
    from onenip_ray.export import nearest_distances
    from onenip_ray.prompts import PromptPool, neighbor_distances

    g = torch.Generator().manual_seed(7)
    pool = PromptPool(["a", "b"], ["a0", "b0"], torch.tensor([0, 1]), torch.randn(2, 4, 2, 2, generator=g),
                      torch.randn(15, 4, generator=g), torch.tensor([0] * 9 + [1] * 6),
                      0.5 + torch.rand(15, generator=g))
    feats, classes = torch.randn(3, 4, 3, 3, generator=g), torch.tensor([1, 0, 1])
    memory, sqnorm, weight = (torch.from_numpy(a) for a in memory_inputs(pool))
    got = nearest_distances(feats, memory, sqnorm, weight, classes)
    expected = neighbor_distances(feats, pool.memory, pool.memory_class, classes, memory_weight=pool.memory_weight)
    assert torch.allclose(got, expected, atol=1e-5)
