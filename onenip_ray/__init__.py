"""onenip-ray: OneNIP unified visual anomaly detection (one normal image prompt per class) on Ray.

The public API, imported lazily (``import onenip_ray`` loads neither torch nor Ray)::

    from onenip_ray import TrainConfig, run_training, load_bundle, Scorer
    meta = run_training(TrainConfig(data=("../shared/data/mvtec_ad",), classes=("bottle",), out="runs/bottle"))
    scorer = Scorer.from_uri("runs/bottle")
    row = scorer.score_bytes([("part.png", open("part.png", "rb").read(), None)])[0]

Everything else is importable from its module but may change between releases.
"""
from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import Any

try:
    __version__ = version("onenip-ray")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

# public name -> module that defines it
_EXPORTS = {
    "ModelConfig": "config",
    "TrainConfig": "config",
    "BatchConfig": "config",
    "ServeArgs": "serve_args",
    "Bundle": "bundle",
    "load_bundle": "bundle",
    "load_model": "engines",
    "Predictor": "predictor",
    "Scorer": "scoring",
    "RESULT_SCHEMA": "schema",
    "run_training": "train",
    "evaluate": "evaluate",
    "add_class": "add_class",
    "set_threshold": "set_threshold",
    "export_bundle": "export",
    "publish": "publish",
    "run_batch_scoring": "batch",
    "build_app": "serve",
    "build_report": "report",
    "drift": "drift",
    "OneNipError": "errors",
    "InputError": "errors",
    "BundleError": "errors",
    "BusyError": "errors",
    "RejectedError": "errors",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'onenip_ray' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
