"""The model bundle: safetensors + JSON, content-hash version, local and S3 round trips."""
from __future__ import annotations

import hashlib
import json
import os
from datetime import datetime

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save as save_safetensors

from onenip_ray import storage
from onenip_ray.bundle import (
    BUNDLE_FILE,
    FORMAT,
    MODEL_FILE,
    PROMPTS_FILE,
    BundleError,
    commit_bundle,
    load_bundle,
    verify_bundle,
    write_bundle,
)
from onenip_ray.calibration import calibrate, score_normals
from onenip_ray.config import ModelConfig
from onenip_ray.data.images import to_network_input
from onenip_ray.data.layouts import read_dataset
from onenip_ray.data.synthesis import AnomalySynthesizer, TextureSource
from onenip_ray.model.backbone import FrozenBackbone
from onenip_ray.model.build import build_onenip, trainable_parameters
from onenip_ray.predictor import Predictor
from onenip_ray.prompts import PromptPool
from onenip_ray.training_data import load_images

CONFIG = ModelConfig(image_size=64, hidden_dim=32, num_heads=4, num_encoder_layers=1, num_decoder_layers=1,
                     dim_feedforward=64, refiner_dim=8)
TRAINING = {"epochs": 0, "history": [], "workers": 1, "note": "unit test"}


@pytest.fixture(scope="module")
def images(tiny_dataset):
    samples = read_dataset("mvtec", str(tiny_dataset))
    train = {c: load_images([s for s in samples if s.class_name == c and s.split == "train"][:3],
                            64) for c in ("disc", "stripes")}
    test = load_images([s for s in samples if s.split == "test"], 64)
    return train, test


@pytest.fixture(scope="module")
def parts(images):
    """A randomly initialised backbone (so a bundle that silently fell back to the packaged ImageNet
    weights would predict differently), a tiny OneNIP, a pool and a real calibration."""
    train, _ = images
    torch.manual_seed(0)
    backbone = FrozenBackbone(CONFIG.backbone, CONFIG.out_indices)
    model = build_onenip(CONFIG, backbone.channels).eval()
    prompts = np.concatenate([train["disc"][:1], train["stripes"][:1]])
    with torch.no_grad():
        feats = backbone(torch.from_numpy(to_network_input(prompts, backbone.mean, backbone.std)))
    pool = PromptPool(["disc", "stripes"], ["disc/000.png", "stripes/000.png"], torch.tensor([0, 1]), feats)
    predictor = Predictor(backbone, model, pool, rec_scale=1.0)
    synth = AnomalySynthesizer(64, TextureSource.procedural(0, pool_size=4))
    rng = np.random.default_rng(0)
    scored = {c: score_normals(predictor, c, imgs[1:], np.ones(len(imgs) - 1, bool), synth, rng)
              for c, imgs in train.items()}
    calibration = calibrate(predictor, scored)
    return backbone, model, pool, calibration


@pytest.fixture(scope="module")
def bundle_dir(parts, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("bundle") / "b")
    write_bundle(out, CONFIG, *parts, TRAINING)
    return out


def test_loaded_bundle_predicts_identically(parts, bundle_dir, images):
    backbone, model, pool, calibration = parts
    _, test = images
    expected = Predictor(backbone, model, pool, calibration.rec_scale, alpha=calibration.alpha).predict(test)
    bundle = load_bundle(bundle_dir)
    got = bundle.predictor().predict(test)
    assert torch.equal(got.fused, expected.fused)
    assert torch.equal(got.scores, expected.scores)
    assert torch.equal(got.prompt_index, expected.prompt_index)
    assert bundle.classes == ["disc", "stripes"]
    assert bundle.config == CONFIG
    assert bundle.calibration == calibration
    assert not bundle.model.training
    theirs = bundle.backbone.body.state_dict()
    assert all(torch.equal(v, theirs[k]) for k, v in backbone.body.state_dict().items())


def test_bundle_round_trip_through_s3(parts, bundle_dir, images, s3_bucket, s3_server):
    _, test = images
    uri = storage.join(s3_bucket, "models", "tiny")
    commit_bundle(bundle_dir, uri, endpoint=s3_server)
    assert storage.list_files(uri, endpoint=s3_server, relative=True) == sorted([BUNDLE_FILE, MODEL_FILE, PROMPTS_FILE])
    remote = load_bundle(uri, endpoint=s3_server)
    local = load_bundle(bundle_dir)
    assert remote.version == local.version
    assert torch.equal(remote.predictor().predict(test).fused, local.predictor().predict(test).fused)


def test_bundle_json_fields(parts, bundle_dir):
    backbone, model, pool, calibration = parts
    with open(os.path.join(bundle_dir, BUNDLE_FILE)) as f:
        meta = json.load(f)
    assert meta["format"] == FORMAT
    assert meta["config"] == CONFIG.to_dict()
    assert meta["backbone"] == {"name": "tf_efficientnet_lite0", "out_indices": [0, 1, 2, 3],
                                "stage_channels": [16, 24, 40, 112], "channels": 192}
    assert meta["image_size"] == 64
    # TF-ported lite0 weights take (x - 0.5) / 0.5 inputs (see test_backbone)
    assert meta["normalization"]["mean"] == [0.5, 0.5, 0.5] == list(backbone.mean)
    assert meta["normalization"]["std"] == [0.5, 0.5, 0.5] == list(backbone.std)
    assert meta["normalization"]["color"] == "RGB"
    assert meta["classes"] == ["disc", "stripes"]
    assert meta["prompts"] == {"ids": ["disc/000.png", "stripes/000.png"], "per_class": {"disc": 1, "stripes": 1}}
    assert meta["thresholds"] == {c: cal.threshold_raw for c, cal in calibration.per_class.items()}
    assert set(meta["thresholds"]) == {"disc", "stripes"} and all(t > 0 for t in meta["thresholds"].values())
    assert meta["calibration"]["rec_scale"] == calibration.rec_scale > 0
    assert meta["trainable_parameters"] == trainable_parameters(model) > 0
    assert meta["training"] == TRAINING
    assert len(meta["version"]) == 16 and int(meta["version"], 16) >= 0
    assert datetime.fromisoformat(meta["created_at"]).tzinfo is not None


def _content_hash(bundle_dir: str) -> str:
    """sha256 of the model file, the pool's tensors and names, and the config + calibration JSON."""
    with open(os.path.join(bundle_dir, BUNDLE_FILE)) as f:
        return _content_hash_of(bundle_dir, json.load(f))


def _content_hash_of(bundle_dir: str, meta: dict) -> str:
    """``_content_hash`` with ``meta`` in place of the directory's ``bundle.json``."""
    with open(os.path.join(bundle_dir, MODEL_FILE), "rb") as f:
        digest = hashlib.sha256(f.read())
    with open(os.path.join(bundle_dir, PROMPTS_FILE), "rb") as f:
        pool = PromptPool.from_bytes(f.read())
    tensors = {"features": pool.features, "class_index": pool.class_index, "memory": pool.memory,
               "memory_class": pool.memory_class}
    if (pool.memory_weight != 1).any():
        tensors["memory_weight"] = pool.memory_weight
    digest.update(save_safetensors(tensors))
    digest.update(json.dumps([pool.class_names, pool.prompt_ids]).encode())
    digest.update(json.dumps([meta["config"], meta["calibration"]], sort_keys=True).encode())
    return digest.hexdigest()[:16]


def test_prompt_file_bytes_vary_but_the_version_does_not(parts, tmp_path):
    """safetensors orders the metadata keys differently from call to call; the version must not
    depend on that (it used to hash the file bytes and flipped between identical writes)."""
    backbone, model, pool, calibration = parts
    versions = {write_bundle(str(tmp_path / f"w{i}"), CONFIG, backbone, model, pool, calibration, TRAINING)["version"]
                for i in range(8)}
    assert len(versions) == 1
    assert versions == {_content_hash(str(tmp_path / "w0"))}


def test_version_is_a_content_hash(parts, bundle_dir, tmp_path):
    backbone, model, pool, calibration = parts
    version = load_bundle(bundle_dir).version
    assert version == _content_hash(bundle_dir)
    again = write_bundle(str(tmp_path / "again"), CONFIG, backbone, model, pool, calibration, {"other": "summary"})
    assert again["version"] == version  # stable: same content, other time and training summary
    with torch.no_grad():
        model.output_proj.bias[0] += 1.0
    try:
        changed = write_bundle(str(tmp_path / "changed"), CONFIG, backbone, model, pool, calibration, TRAINING)
    finally:
        with torch.no_grad():
            model.output_proj.bias[0] -= 1.0
    assert changed["version"] != version
    assert changed["version"] == _content_hash(str(tmp_path / "changed"))
    restored = write_bundle(str(tmp_path / "restored"), CONFIG, backbone, model, pool, calibration, TRAINING)
    assert restored["version"] == version


def test_a_bundle_from_before_neighbor_stride_loads_with_its_stride_16_memory(parts, tmp_path):
    """Older releases wrote no ``neighbor_stride`` (their patch memory is on OneNIP's stride-16 grid)
    nor ``neighbor_coarse_weight`` (every stage at weight 1); such a bundle still verifies and reads
    as stride 16 and weight 1, a new one as stride 8 and weight 0.5."""
    out = str(tmp_path / "old")
    write_bundle(out, CONFIG, *parts, TRAINING)
    path = os.path.join(out, BUNDLE_FILE)
    with open(path) as f:
        meta = json.load(f)
    assert meta["config"].pop("neighbor_stride") == 8
    assert meta["config"].pop("neighbor_coarse_weight") == 0.5
    meta["version"] = _content_hash_of(out, meta)  # what the older writer hashed: the config without the key
    with open(path, "w") as f:
        json.dump(meta, f)
    old = load_bundle(out)
    assert old.config.neighbor_stride == 16 and old.config.neighbor_coarse_weight == 1.0
    assert old.version == meta["version"]


def test_bundle_holds_no_pickle(bundle_dir, monkeypatch):
    assert sorted(os.listdir(bundle_dir)) == sorted([BUNDLE_FILE, MODEL_FILE, PROMPTS_FILE])
    with safe_open(os.path.join(bundle_dir, MODEL_FILE), framework="pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith(("onenip.", "backbone.")) for k in keys)
    assert any(k.startswith("backbone.") for k in keys) and any(k.startswith("onenip.") for k in keys)
    with safe_open(os.path.join(bundle_dir, PROMPTS_FILE), framework="pt") as f:
        assert set(f.keys()) == {"features", "class_index", "memory", "memory_class"}
    with open(os.path.join(bundle_dir, BUNDLE_FILE)) as f:
        json.load(f)
    for name in (MODEL_FILE, PROMPTS_FILE):
        with open(os.path.join(bundle_dir, name), "rb") as f:
            head = f.read(9)
        assert head[8:9] == b"{" and not head.startswith((b"\x80", b"PK"))  # safetensors header, not pickle/zip

    def no_torch_load(*args, **kwargs):
        raise AssertionError("load_bundle must not call torch.load")

    monkeypatch.setattr(torch, "load", no_torch_load)
    assert load_bundle(bundle_dir).version == _content_hash(bundle_dir)


def test_loading_a_directory_without_bundle_json(tmp_path, bundle_dir):
    empty = tmp_path / "not_a_bundle"
    empty.mkdir()
    (empty / MODEL_FILE).write_bytes(open(os.path.join(bundle_dir, MODEL_FILE), "rb").read())
    with pytest.raises(FileNotFoundError, match=r"not_a_bundle is not a model bundle: bundle.json not found"):
        load_bundle(str(empty))
    with pytest.raises(FileNotFoundError, match="not a model bundle"):
        load_bundle(str(tmp_path / "missing"))


def test_loading_an_unknown_format_is_refused(tmp_path, bundle_dir):
    target = tmp_path / "old"
    storage.commit_dir(bundle_dir, str(target), marker=BUNDLE_FILE)
    meta = json.loads((target / BUNDLE_FILE).read_text())
    meta["format"] = "onenip-bundle/0"
    (target / BUNDLE_FILE).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="unsupported bundle format 'onenip-bundle/0'"):
        load_bundle(str(target))


def _tampered(bundle_dir: str, target, edit_meta=None, prompts_from: str | None = None) -> str:
    storage.commit_dir(bundle_dir, str(target), marker=BUNDLE_FILE)
    if edit_meta is not None:
        meta = json.loads((target / BUNDLE_FILE).read_text())
        edit_meta(meta)
        (target / BUNDLE_FILE).write_text(json.dumps(meta))
    if prompts_from is not None:
        (target / PROMPTS_FILE).write_bytes(open(os.path.join(prompts_from, PROMPTS_FILE), "rb").read())
    return str(target)


def test_tampered_or_mixed_bundles_are_refused_on_load(parts, bundle_dir, tmp_path):
    assert verify_bundle(bundle_dir)["version"] == load_bundle(bundle_dir).version

    def raise_threshold(meta):
        meta["calibration"]["per_class"]["disc"]["threshold_raw"] *= 2

    def drop_class_calibration(meta):
        del meta["calibration"]["per_class"]["stripes"]

    backbone, model, pool, calibration = parts
    other = str(tmp_path / "other")  # same model, a pool with one prompt per class swapped: another version
    write_bundle(other, CONFIG, backbone, model,
                 PromptPool(pool.class_names, ["x", "y"], pool.class_index, pool.features.flip(0)),
                 calibration, TRAINING)
    cases = {
        "edited threshold": (_tampered(bundle_dir, tmp_path / "t1", raise_threshold), "does not match the version"),
        "uncalibrated class": (_tampered(bundle_dir, tmp_path / "t2", drop_class_calibration),
                               r"calibrated classes \['disc'\] differ \(uncalibrated: \['stripes'\]"),
        "prompts of another bundle": (_tampered(bundle_dir, tmp_path / "t3", prompts_from=other),
                                      "does not match the version"),
    }
    for uri, message in cases.values():
        for load in (load_bundle, verify_bundle):
            with pytest.raises(BundleError, match=message):
                load(uri)
