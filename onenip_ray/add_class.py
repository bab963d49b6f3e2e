"""A new product class from a few good images, without retraining.

The trained OneNIP weights are class-agnostic (prompt-guided), so a class is added by encoding
its normal images into the prompt pool (covering prompts + patch memory) and calibrating its
threshold, score scale and routing floor on those normals and their synthetic-defect copies
(``HeldOutSynthesizer``, as training's final step).
A few normals also enter the memory rotated (``rotation_angles``), and the memory's neighbourhood is
chosen, as in training (``enrolment.enrol_class``).
Every normal is scored by a pool of the *other* normals (``enrolment.score_out_of_fold``, the path
training's final step takes), so no image is calibrated against itself: their prompts, and the
memory's patches that came from them (one coreset of all normals, built once, so a fold costs no
coreset of its own). A single normal is calibrated on
rotated and re-lit views of itself. The result is a new bundle version (new content hash); the source
bundle is untouched.
"""
from __future__ import annotations

from dataclasses import replace
from functools import partial
from typing import Any

import numpy as np

from . import storage
from .bundle import check_new_uri, load_bundle, write_version
from .calibration import CalibrationMaps, class_calibration, route_floors, score_normals
from .config import TrainConfig
from .data.images import ImageError, decode_for_size, rotate_image
from .data.synthesis import HeldOutSynthesizer
from .enrolment import Enrolment, calibration_rows, enrol_class, neighbor_pool_summary, score_out_of_fold
from .errors import InputError
from .inputs import list_inputs
from .predictor import Predictor

RECOMMENDED_NORMALS = 8


def read_normals(uri: str, size: int, endpoint: str | None = None) -> tuple[list[str], np.ndarray]:
    """Decode every image under a folder / prefix or in a manifest; unreadable ones are named."""
    uris = [u for u, _ in list_inputs(uri, endpoint)]
    images, bad = [], []
    for u in uris:
        try:
            images.append(decode_for_size(storage.read_bytes(u, endpoint), size, name=u)[0])
        except (ImageError, OSError) as exc:
            bad.append(f"{u} ({exc})")
    if bad:
        raise InputError(f"{len(bad)} of {len(uris)} normal images cannot be read: " + "; ".join(bad[:10]))
    if not images:  # one image is enough: it calibrates through ``views_of_one``
        raise InputError(f"{uri}: found no normal images; a class needs at least one "
                         f"({RECOMMENDED_NORMALS} or more recommended, "
                         "20+ for a threshold near the target false-positive rate)")
    return uris, np.stack(images)


# A single normal's calibration views: it rotated half-way between the memory's copies (±10° to
# ±40°), so each view shows poses the memory does not hold, as a new part would.
SINGLE_VIEW_ANGLES = (5.0, 15.0, 25.0, 35.0)


def views_of_one(image: np.ndarray) -> np.ndarray:
    """The calibration normals when a class has a single good image: it rotated by ±5°, ±15°, ±25°
    and ±35° and re-lit (0.95–1.05×); shifted views would include the image itself, whose score
    is far below any fresh normal's (measured in docs/results.md)."""
    angles = [sign * a for a in SINGLE_VIEW_ANGLES for sign in (1, -1)]
    gains = np.linspace(0.95, 1.05, len(angles))
    return np.stack([np.clip(rotate_image(image, a).astype(np.float32) * g, 0, 255).astype(np.uint8)
                     for a, g in zip(angles, gains)])


def add_class(
    bundle_uri: str,
    class_name: str,
    normals_uri: str,
    out_uri: str,
    *,
    replace_class: bool = False,
    prompts_per_class: int | None = None,
    memory_per_class: int | None = None,
    memory_rotation_images: int | None = None,
    target_fpr: float | None = None,
    seed: int = 133,
    endpoint: str | None = None,
) -> dict[str, Any]:
    """Write ``out_uri``: the bundle at ``bundle_uri`` plus (or with a replaced) ``class_name``."""
    check_new_uri(bundle_uri, out_uri)
    if not class_name or class_name != class_name.strip():
        raise InputError(f"invalid class name {class_name!r}")
    bundle = load_bundle(bundle_uri, endpoint)
    train_cfg = bundle.meta.get("training", {}).get("config", {})
    k = prompts_per_class or int(train_cfg.get("prompts_per_class", 4))
    memory_cap = _memory_cap(train_cfg) if memory_per_class is None else memory_per_class
    rotation_budget = (int(train_cfg.get("memory_rotation_images", TrainConfig.memory_rotation_images))
                       if memory_rotation_images is None else memory_rotation_images)
    fpr = bundle.calibration.target_fpr if target_fpr is None else target_fpr
    base, per_class = bundle.pool, dict(bundle.calibration.per_class)
    if class_name in base.class_names:
        if not replace_class:
            raise InputError(f"class {class_name!r} is already in {bundle_uri}; pass --replace to replace it")
        base = base.without_class(class_name)
        per_class.pop(class_name)

    uris, images = read_normals(normals_uri, bundle.config.image_size, endpoint)
    predictor = bundle.predictor()
    enrolment, maps = enrol_class(predictor.backbone, predictor.config, class_name, uris, images, k, memory_cap,
                                  rotation_budget, seed, partial(_score_held_out, predictor, images=images),
                                  np.random.default_rng(seed))
    cal = class_calibration(predictor, maps, fpr)
    if fpr != bundle.calibration.target_fpr:  # the class aims at its own target
        cal = replace(cal, target_fpr=fpr)
    per_class[class_name] = cal
    pool = enrolment.pool(base)
    floors = route_floors(pool, {c: v.normal_similarity_min for c, v in per_class.items()})
    per_class = {c: replace(v, route_floor=floors[c]) for c, v in per_class.items()}
    calibration = replace(bundle.calibration, per_class={c: per_class[c] for c in pool.class_names})
    added = {"class": class_name, "normals": len(images), "source": normals_uri, "from_version": bundle.version,
             "prompts": k, "memory_rotations": enrolment.rotations,
             "memory_density_weights": enrolment.weighted, "neighbor_pool": neighbor_pool_summary(enrolment),
             "memory_patches": int((pool.memory_class == pool.class_names.index(class_name)).sum()),
             "replaced": class_name in bundle.pool.class_names}
    meta = write_version(bundle, pool, calibration, "added_classes", added, out_uri, endpoint)
    return {"bundle": out_uri, "version": meta["version"], "from_version": bundle.version, "classes": meta["classes"],
            "added": class_name, "normals": len(images), "threshold_raw": cal.threshold_raw,
            "threshold_rule": cal.rule(fpr), "expected_fpr": cal.expected_fpr(fpr),
            "route_floor": floors[class_name]}


def _memory_cap(train_cfg: dict[str, Any]) -> int:
    """The bundle's training cap, at most today's default: bundles trained before the memory became a
    coreset hold random 100,000-patch memories, and a coreset that large takes minutes per fold."""
    trained, default = int(train_cfg.get("memory_per_class", 0)), TrainConfig.memory_per_class
    return min(trained, default) if trained > 0 else 0


def _score_held_out(predictor: Predictor, enrolment: Enrolment, rng: np.random.Generator,
                    images: np.ndarray) -> CalibrationMaps:
    """Maps of every normal (and its synthetic copy) scored out of fold (``score_out_of_fold``); a
    single normal is scored through ``views_of_one`` by a pool of itself."""
    synthesizer = HeldOutSynthesizer(predictor.config.image_size)
    if len(images) == 1:
        predictor.set_pool(enrolment.pool())
        views = views_of_one(images[0])
        return score_normals(predictor, enrolment.name, views, np.ones(len(views), bool), synthesizer, rng)
    scored = calibration_rows(np.ones(len(images), bool), rng)
    return score_out_of_fold(predictor, enrolment, images, np.ones(len(images), bool), synthesizer, rng, scored)
