"""A class's operating point without retraining: the same threshold rule at another target
false-positive rate, from the normal statistics the bundle stores (``onenip evaluate``'s
``threshold_sweep`` shows what each target gives on a labelled split). The result is a new bundle
version (new content hash); the source bundle is untouched."""
from __future__ import annotations

from dataclasses import replace
from typing import Any

from .bundle import check_new_uri, load_bundle, write_version
from .errors import InputError


def set_threshold(bundle_uri: str, out_uri: str, target_fpr: float, classes: list[str] | None = None,
                  endpoint: str | None = None) -> dict[str, Any]:
    """Write ``out_uri``: the bundle at ``bundle_uri`` with ``classes`` (default: all) thresholded at
    ``target_fpr``. Without ``classes`` it becomes the bundle's target (classes added later aim at
    it), as if trained with it."""
    check_new_uri(bundle_uri, out_uri)
    if not 0.0 < target_fpr < 1.0:
        raise InputError(f"--target-fpr must lie strictly between 0 and 1, got {target_fpr}")
    bundle = load_bundle(bundle_uri, endpoint)
    chosen = list(classes or bundle.classes)
    unknown = [c for c in chosen if c not in bundle.classes]
    if unknown:
        raise InputError(f"{bundle_uri} has no class {', '.join(map(repr, unknown))}; its classes: "
                         f"{', '.join(bundle.classes)}")
    per_class = {c: cal.retargeted(target_fpr) if c in chosen else cal
                 for c, cal in bundle.calibration.per_class.items()}
    calibration = replace(bundle.calibration, per_class=per_class)
    if not classes:
        calibration = replace(calibration, target_fpr=target_fpr,
                              per_class={c: replace(cal, target_fpr=None) for c, cal in per_class.items()})
    record = {"classes": chosen, "target_fpr": target_fpr, "from_version": bundle.version,
              "thresholds_before": {c: bundle.calibration.per_class[c].threshold_raw for c in chosen}}
    meta = write_version(bundle, bundle.pool, calibration, "threshold_changes",
                         record, out_uri, endpoint)
    return {"bundle": out_uri, "version": meta["version"], "from_version": bundle.version, "target_fpr": target_fpr,
            "thresholds": {c: per_class[c].threshold_raw for c in chosen}}
