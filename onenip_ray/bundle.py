"""The model bundle: ``model.safetensors`` (OneNIP + frozen backbone weights),
``prompts.safetensors`` (the prompt pool) and ``bundle.json`` (config, normalisation, classes,
calibration, version = content hash, training summary). No pickle anywhere."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from . import storage
from .calibration import Calibration
from .config import ModelConfig
from .errors import BundleError, InputError
from .formats import BUNDLE_FILE, MODEL_FILE, PROMPTS_FILE
from .model.backbone import FrozenBackbone
from .model.build import build_onenip, trainable_parameters
from .model.onenip import OneNIP
from .predictor import Predictor
from .prompts import PromptPool

FORMAT = "onenip-bundle/2"  # /2: memory in the prompt pool, fusion weights and routing floors in the calibration


class ModelIdentity:
    """What every loaded model (a bundle, or an export of one) says about itself."""

    meta: dict[str, Any]
    pool: PromptPool

    @property
    def version(self) -> str:
        return self.meta["version"]

    @property
    def classes(self) -> list[str]:
        return self.pool.class_names


@dataclass
class Bundle(ModelIdentity):
    config: ModelConfig
    backbone: FrozenBackbone
    model: OneNIP
    pool: PromptPool
    calibration: Calibration
    meta: dict[str, Any]

    def predictor(self, device: str | torch.device = "cpu") -> Predictor:
        c = self.calibration
        return Predictor(self.backbone, self.model, self.pool, c.rec_scale, device, c.alpha, c.neighbor_weight,
                         c.neighbor_scale)


def content_version(model_bytes: bytes, pool: PromptPool, config: dict[str, Any], calibration: Calibration) -> str:
    """The bundle version: a hash of the weights file, the pool's content, the config (as written in
    ``bundle.json``) and the calibration."""
    digest = hashlib.sha256(model_bytes)
    # Not the prompts file's bytes: safetensors writes the metadata in hash-map order, which changes
    # from call to call, so the pool's content (tensors without metadata, then names/ids) is hashed.
    digest.update(save_safetensors(pool.tensors()))
    digest.update(json.dumps([pool.class_names, pool.prompt_ids], sort_keys=True).encode())
    digest.update(json.dumps([config, calibration.to_dict()], sort_keys=True).encode())
    return digest.hexdigest()[:16]


def check_bundle(uri: str, meta: dict[str, Any], model_bytes: bytes, pool: PromptPool,
                 calibration: Calibration) -> None:
    """Raise ``BundleError`` unless the content hash equals ``meta["version"]`` and the pool's
    classes are exactly the calibrated ones and ``meta["classes"]``."""
    classes = list(pool.class_names)
    calibrated = list(calibration.per_class)
    if set(classes) != set(calibrated):
        raise BundleError(f"{uri}: prompt-pool classes {classes} and calibrated classes {calibrated} differ "
                          f"(uncalibrated: {sorted(set(classes) - set(calibrated))}, no prompts: "
                          f"{sorted(set(calibrated) - set(classes))})")
    if meta.get("classes") != classes:
        raise BundleError(f"{uri}: {BUNDLE_FILE} lists classes {meta.get('classes')}, the prompt pool has {classes}")
    version = content_version(model_bytes, pool, meta["config"], calibration)
    if version != meta.get("version"):
        raise BundleError(f"{uri}: content hash {version} does not match the version {meta.get('version')!r} in "
                          f"{BUNDLE_FILE} "
                          "(files changed or mixed from two bundles)")


def write_bundle(
    local_dir: str,
    config: ModelConfig,
    backbone: FrozenBackbone,
    model: OneNIP,
    pool: PromptPool,
    calibration: Calibration,
    training: dict[str, Any],
) -> dict[str, Any]:
    """Write the three files into ``local_dir``; returns the ``bundle.json`` content."""
    os.makedirs(local_dir, exist_ok=True)
    tensors = {f"onenip.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tensors.update({f"backbone.{k}": v.detach().cpu().contiguous() for k, v in backbone.body.state_dict().items()})
    model_bytes = save_safetensors(tensors)
    prompt_bytes = pool.to_bytes()
    meta = {
        "format": FORMAT,
        "version": content_version(model_bytes, pool, config.to_dict(), calibration),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": config.to_dict(),
        "backbone": {
            "name": config.backbone,
            "out_indices": list(config.out_indices),
            "stage_channels": backbone.stage_channels,
            "channels": backbone.channels,
        },
        "image_size": config.image_size,
        "normalization": {"mean": list(backbone.mean), "std": list(backbone.std), "color": "RGB", "range": "[0,1]"},
        "classes": pool.class_names,
        "prompts": {"ids": pool.prompt_ids,
                    "per_class": {c: pool.class_index.tolist().count(i) for i, c in enumerate(pool.class_names)}},
        "calibration": calibration.to_dict(),
        "thresholds": {c: cal.threshold_raw for c, cal in calibration.per_class.items()},
        "trainable_parameters": trainable_parameters(model),
        "training": training,
    }
    with open(os.path.join(local_dir, MODEL_FILE), "wb") as f:
        f.write(model_bytes)
    with open(os.path.join(local_dir, PROMPTS_FILE), "wb") as f:
        f.write(prompt_bytes)
    with open(os.path.join(local_dir, BUNDLE_FILE), "w") as f:
        json.dump(meta, f, indent=2)
    return meta


def read_meta(uri: str, endpoint: str | None = None) -> dict[str, Any]:
    """The bundle's ``bundle.json`` (FileNotFoundError for a missing one, BundleError for one that is
    not JSON or of another format)."""
    try:
        meta = json.loads(storage.read_bytes(storage.join(uri, BUNDLE_FILE), endpoint))
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{uri} is not a model bundle: {BUNDLE_FILE} not found") from e
    except json.JSONDecodeError as e:
        raise BundleError(f"{uri}: {BUNDLE_FILE} is not JSON ({e})") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise BundleError(f"{uri}: unsupported bundle format {found!r} (expected {FORMAT})")
    return meta


def verify_bundle(uri: str, endpoint: str | None = None) -> dict[str, Any]:
    """``check_bundle`` without building the model (for publishing and start-up checks); returns ``bundle.json``."""
    meta = read_meta(uri, endpoint)
    pool = PromptPool.from_bytes(storage.read_bytes(storage.join(uri, PROMPTS_FILE), endpoint))
    check_bundle(uri, meta, storage.read_bytes(storage.join(uri, MODEL_FILE), endpoint), pool,
                 Calibration.from_dict(meta["calibration"]))
    return meta


def load_bundle(uri: str, endpoint: str | None = None, pool: PromptPool | None = None) -> Bundle:
    """Load a bundle directory from a local path or ``s3://`` URI (safetensors + JSON only), verified
    by ``check_bundle`` (``BundleError`` when its files do not match its version or each other).
    ``pool``: this bundle's prompt pool, already loaded (``prompts.safetensors`` is then not read)."""
    meta = read_meta(uri, endpoint)
    config = ModelConfig.from_dict(meta["config"])
    model_bytes = storage.read_bytes(storage.join(uri, MODEL_FILE), endpoint)
    if pool is None:
        pool = PromptPool.from_bytes(storage.read_bytes(storage.join(uri, PROMPTS_FILE), endpoint))
    calibration = Calibration.from_dict(meta["calibration"])
    check_bundle(uri, meta, model_bytes, pool, calibration)
    tensors = load_safetensors(model_bytes)
    del model_bytes
    backbone = FrozenBackbone(config.backbone, config.out_indices)
    backbone.load_weights({k.removeprefix("backbone."): v for k, v in tensors.items() if k.startswith("backbone.")})
    model = build_onenip(config, backbone.channels)
    model.load_state_dict({k.removeprefix("onenip."): v for k, v in tensors.items() if k.startswith("onenip.")},
                          strict=True)
    model.eval()
    return Bundle(config, backbone, model, pool, calibration, meta)


def commit_bundle(local_dir: str, out_uri: str, endpoint: str | None = None) -> None:
    """Publish a written bundle; ``bundle.json`` lands last so a readable bundle is complete."""
    storage.commit_dir(local_dir, out_uri, endpoint=endpoint, marker=BUNDLE_FILE)


def check_new_uri(bundle_uri: str, out_uri: str) -> None:
    """A new version goes beside its source: ``out_uri`` must differ from ``bundle_uri``."""
    if storage.canonical_uri(out_uri).rstrip("/") == storage.canonical_uri(bundle_uri).rstrip("/"):
        raise InputError("--out must differ from --bundle: the source bundle stays as it is")


def write_version(bundle: Bundle, pool: PromptPool, calibration: Calibration, change: str, record: dict[str, Any],
                  out_uri: str, endpoint: str | None = None) -> dict[str, Any]:
    """A new version of ``bundle`` at ``out_uri``: its weights with ``pool`` and ``calibration``, and
    ``record`` appended to the training summary's ``change`` list (e.g. ``added_classes``); returns
    its ``bundle.json``."""
    training = dict(bundle.meta.get("training", {}))
    training[change] = [*training.get(change, []), record]
    local = tempfile.mkdtemp(prefix="onenip-bundle-")
    try:
        meta = write_bundle(local, bundle.config, bundle.backbone, bundle.model, pool, calibration, training)
        commit_bundle(local, out_uri, endpoint)
    finally:
        shutil.rmtree(local, ignore_errors=True)
    return meta
