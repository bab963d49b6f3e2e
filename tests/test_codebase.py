"""The codebase's own rules, checked so they stay true: the public API resolves and loads lazily,
functions stay short, and the shared names of ``formats.py`` are not redefined elsewhere."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import onenip_ray

PACKAGE = Path(onenip_ray.__file__).resolve().parent
MAX_FUNCTION_LINES = 60
# Literals that name a shared fact: only ``formats.py`` may spell them.
SHARED_LITERALS = ("bundle.json", "metrics.json", "predictions.parquet", "_SUCCESS.json", "model.safetensors",
                   "prompts.safetensors", "(unknown)", "s3://")


# The package's layers (docs/architecture.md): a module imports only from its own layer or earlier ones.
LAYERS = (
    {"formats", "errors", "config", "schema", "metrics", "prompts", "data.images", "forward_passes"},  # vocabulary
    {"model.backbone", "model.transformer", "model.refiner", "model.onenip", "model.loss", "model.anomaly_map",
     "model.build"},  # the pure model
    {"storage", "inputs", "lease", "data.layouts", "data.synthesis"},  # IO
    {"predictor", "calibration", "enrolment", "bundle", "engines", "training_data", "visualization"},  # inference
    {"scoring", "train", "evaluate", "add_class", "set_threshold", "export", "publish", "drift"},  # operations
    {"nightly", "accounting", "batch", "serve", "serve_args", "report", "drift_report"},  # applications
    {"cli", "__init__"},
)


def _imports(module: str, tree: ast.AST) -> set[str]:
    """The package modules ``module`` imports (``from .x import y``, ``from onenip_ray import storage``)."""
    package = module.split(".")[:-1]
    found = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level:
            base = package[: len(package) - node.level + 1]
        elif (node.module or "").startswith("onenip_ray"):
            base = []
        else:
            continue
        name = (node.module or "").removeprefix("onenip_ray").lstrip(".")
        target = ".".join([*base, *([name] if name else [])])
        if not name or target in ("data", "model"):  # ``from . import storage``: the names are modules
            found.update(".".join([*base, *([name] if name else []), a.name]) for a in node.names)
        else:
            found.add(target)
    return found


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        yield path, ast.parse(path.read_text(), filename=str(path))


def test_public_api_resolves_and_import_is_light():
    for name in onenip_ray.__all__:
        assert getattr(onenip_ray, name) is not None, name
    code = "import sys, onenip_ray; print(onenip_ray.__all__); print(sorted({'torch', 'ray'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.splitlines()
    assert "run_training" in out[0] and "Scorer" in out[0]
    assert out[1] == "[]", f"`import onenip_ray` imported {out[1]}"


def test_no_function_is_longer_than_the_limit():
    long = []
    for path, tree in _modules():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_modules_import_only_from_their_layer_or_earlier_ones():
    layer_of = {module: i for i, layer in enumerate(LAYERS) for module in layer}
    wrong = []
    for path, tree in _modules():
        module = ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        if module in ("data.__init__", "model.__init__"):
            continue
        assert module in layer_of, f"{module} is in no layer of LAYERS (docs/architecture.md)"
        if module.startswith("model."):
            outside = {m for m in _imports(module, tree) if not m.startswith("model.") and m != "config"}
            wrong += [f"{module} -> {m} (the model imports only config)" for m in outside]
        wrong += [f"{module} -> {m}" for m in _imports(module, tree) if layer_of.get(m, 0) > layer_of[module]]
    assert not wrong, wrong


def test_shared_names_are_spelled_only_in_formats():
    found = []
    for path, tree in _modules():
        if path.name == "formats.py":
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in SHARED_LITERALS:
                found.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.value!r}")
    assert not found, f"use onenip_ray.formats instead of: {found}"
