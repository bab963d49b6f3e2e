"""The ``onenip`` command line: thin flag parsing over the library."""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import types
import typing
from dataclasses import fields

from .config import (
    DRIFT_REFERENCES,
    EVALUATE_BATCH_SIZE,
    GALLERY_SIZE,
    GRAPH_FORMATS,
    PARITY_IMAGES,
    RUNTIME_HELP,
    RUNTIMES,
    BatchConfig,
    ModelConfig,
    TrainConfig,
)
from .errors import BusyError, InputError, OneNipError, RejectedError
from .formats import METRICS_FILE

T, M = TrainConfig(), ModelConfig()  # flag defaults come from the typed configs, nowhere else
B = BatchConfig(bundle="", input="", output="", run_date=dt.date.min)
# bad arguments or input; a run over its limits; the date is being written
EXIT_ERROR, EXIT_REJECTED, EXIT_BUSY = 2, 3, 4
S3_ENDPOINT_HELP = "S3-compatible endpoint URL (default: AWS_ENDPOINT_URL_S3)"
# ModelConfig fields ``onenip train`` exposes (the rest keep the config's defaults).
MODEL_FLAGS = ("backbone", "image_size", "neighbor_stride", "neighbor_coarse_weight", "neighbor_pool", "decoder",
               "fusion", "alpha", "map_sigma", "jitter_scale", "residual_init")


class _HelpFormatter(argparse.HelpFormatter):
    """``--help`` shows each flag's default (the measured recipe), except empty ones and switches."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default not in (None, False, "",
                                  argparse.SUPPRESS) and action.nargs != 0 and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


def _field(config: object, name: str) -> tuple[str, tuple[str, ...] | None, type]:
    """The help, legal values and value type of a config field (a typed dataclass or pydantic model)."""
    model_fields = getattr(type(config), "model_fields", None)
    if model_fields is not None:  # pydantic: ServeArgs
        info = model_fields[name]
        kind = info.annotation
        if typing.get_origin(kind) in (typing.Union, types.UnionType):  # X | None
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        choices = typing.get_args(kind) if typing.get_origin(kind) is typing.Literal else None
        return info.description or "", choices, str if choices else kind
    (f,) = [f for f in fields(config) if f.name == name]
    kind = {"int": int, "float": float, "str": str, "bool": bool}[f.type.split("|")[0].strip()]
    return f.metadata["help"], f.metadata.get("choices"), kind


def _options(p: argparse.ArgumentParser, config: object, *names: str) -> None:
    """Flags ``--name-with-dashes`` for ``config``'s fields: default, help and choices all come from
    the config (a switch for a boolean: ``--name`` when it defaults off, ``--no-name`` when on)."""
    for name in names:
        help, choices, kind = _field(config, name)
        default, flag = getattr(config, name), "--" + name.replace("_", "-")
        if kind is bool:
            p.add_argument(f"--no-{flag[2:]}" if default else flag, dest=name,
                           action="store_false" if default else "store_true", help=help)
        else:
            p.add_argument(flag, dest=name, default=default, type=kind, choices=choices, help=help)


def _from_args(cls: type, args: argparse.Namespace, **given):
    """``cls`` built from the flags named after its fields, plus ``given``."""
    flags = vars(args)
    names = getattr(cls, "model_fields", None) or [f.name for f in fields(cls)]  # pydantic or dataclass
    return cls(**{name: flags[name] for name in names if name in flags and name not in given}, **given)


def _add_data_flags(p: argparse.ArgumentParser) -> None:
    _options(p, T, "dataset")
    p.add_argument("--data", action="append", required=True,
                   help="dataset root (local or s3://); repeat to merge, KIND=ROOT to mix layouts")
    p.add_argument("--classes", default="", help="comma-separated class subset (default: all)")
    p.add_argument("--s3-endpoint", default=None, help=S3_ENDPOINT_HELP)


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    _options(p, M, "backbone", "image_size")


def _add_train(train: argparse.ArgumentParser) -> None:
    _add_data_flags(train)
    _add_model_flags(train)
    train.add_argument("--out", required=True, help="bundle directory to write (local or s3://)")
    _options(train, T, "epochs", "steps_per_epoch", "batch_size", "lr", "lr_schedule", "warmup_fraction",
             "refiner_loss", "balance_classes", "backbone_weights", "textures", "num_workers", "use_gpu", "seed")
    _options(train, M, *MODEL_FLAGS[2:])
    _options(train, T, "prompts_per_class", "memory_per_class", "memory_rotation_images", "calibration_fraction",
             "target_fpr")
    train.add_argument("--storage-path", default=None, help="Ray Train storage path (default ./runs/ray)")
    train.add_argument("--run-name", default=None, help="Ray Train run name (default onenip-<out basename>)")
    resume = train.add_mutually_exclusive_group()
    resume.add_argument("--resume", action="store_true", help="continue the named run from its latest checkpoint")
    resume.add_argument("--auto-resume", action="store_true",
                        help="continue the named run if it has checkpoints, else start it (for jobs retried as "
                             "a whole)")
    _options(train, T, "checkpoint_every", "max_failures", "loader_workers", "precision")


def _add_add_class(ac: argparse.ArgumentParser) -> None:
    ac.add_argument("--bundle", required=True, help="source model bundle (local or s3://); left untouched")
    ac.add_argument("--class", dest="class_name", required=True, help="name of the class to add")
    ac.add_argument("--normals", required=True,
                    help="good images: folder / s3:// prefix (recursive) or a .parquet/.csv manifest with image_uri")
    ac.add_argument("--out", required=True, help="the new bundle (local or s3://); must differ from --bundle")
    ac.add_argument("--replace", action="store_true", help="replace the class if the bundle already has it")
    ac.add_argument("--prompts-per-class", type=int, default=None,
                    help="prompt images for the class (default: as the bundle was trained)")
    ac.add_argument("--memory-per-class", type=int, default=None,
                    help="normal patches kept for the class (default: as the bundle was trained, at most the "
                         "training default)")
    ac.add_argument("--memory-rotation-images", type=int, default=None,
                    help="rotated copies of few normals in the class's memory, up to this many images in all, "
                         "and density weights on its coreset (default: as the bundle was trained, else the "
                         "training default; 0 = neither)")
    ac.add_argument("--target-fpr", type=float, default=None,
                    help="false-positive rate of the class's threshold (default: the bundle's)")
    _options(ac, T, "seed")
    ac.add_argument("--s3-endpoint", default=None, help=S3_ENDPOINT_HELP)


def _add_set_threshold(st: argparse.ArgumentParser) -> None:
    st.add_argument("--bundle", required=True, help="source model bundle (local or s3://); left untouched")
    st.add_argument("--target-fpr", type=float, required=True,
                    help="false-positive rate the classes' thresholds aim at (see evaluate's threshold_sweep)")
    st.add_argument("--classes", default="", help="comma-separated classes to re-threshold (default: all)")
    st.add_argument("--out", required=True, help="the new bundle (local or s3://); must differ from --bundle")
    st.add_argument("--s3-endpoint", default=None, help=S3_ENDPOINT_HELP)


def _add_export(ex: argparse.ArgumentParser) -> None:
    ex.add_argument("--bundle", required=True, help="model bundle (local or s3://)")
    ex.add_argument("--format", default=GRAPH_FORMATS[0], choices=GRAPH_FORMATS,
                    help="graph format (OpenVINO also runs onnx exports)")
    ex.add_argument("--out", required=True, help="export directory to write (local or s3://)")
    ex.add_argument("--image-size", type=int, default=None,
                    help="network input size (default and only choice: the bundle's)")
    ex.add_argument("--batch", default="dynamic", help="batch dimension of the graph: a fixed N, or dynamic")
    ex.add_argument("--images", default=None,
                    help="real images for the parity check: folder / s3:// prefix or manifest (default: the "
                         "bundle's prompt images)")
    ex.add_argument("--parity-images", type=int, default=PARITY_IMAGES,
                    help="at most this many images in the parity check")
    ex.add_argument("--pool-only", action="store_true",
                    help="--out is an export of the same weights (e.g. before add-class): keep its graphs, take "
                         "this bundle's "
                         "prompt pool and calibration, check parity again")
    ex.add_argument("--s3-endpoint", default=None, help=S3_ENDPOINT_HELP)


def _add_runtime_flag(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument("--runtime", default=default, choices=RUNTIMES, help=RUNTIME_HELP)


def _add_evaluate(ev: argparse.ArgumentParser) -> None:
    _add_data_flags(ev)
    ev.add_argument("--bundle", required=True, help="model bundle (local or s3://)")
    ev.add_argument("--out", required=True, help="output directory for metrics.json and predictions.parquet")
    ev.add_argument("--oracle-class", action="store_true",
                    help="give each image its true class (official code) instead of retrieval")
    ev.add_argument("--batch-size", type=int, default=EVALUATE_BATCH_SIZE, help="images per model batch")
    _add_runtime_flag(ev, RUNTIMES[0])


def _add_score(sc: argparse.ArgumentParser) -> None:
    sc.add_argument("--bundle", default=None, help="model bundle (local or s3://); required unless --repair")
    sc.add_argument("--input", default=None,
                    help="image folder / s3:// prefix (recursive) or a .parquet/.csv manifest with image_uri[, "
                         "class_name]; required unless --repair")
    sc.add_argument("--out", "--output", dest="output", metavar="OUTPUT", default=None,
                    help="results root (local or s3://); the run replaces OUTPUT/run_date=<date>/ (`--output`: "
                         "its earlier spelling)")
    sc.add_argument("--repair", metavar="OUTPUT", default=None,
                    help="only finish interrupted commits under OUTPUT (each date under its lease), then exit")
    sc.add_argument("--run-date", type=_date, default=None, help="partition date YYYY-MM-DD (default: today, UTC)")
    _options(sc, B, "heatmaps", "max_error_fraction", "allow_empty", "batch_size", "concurrency", "use_gpu",
             "actor_cpus", "task_cpus", "actor_threads", "runtime", "chunk_size", "lease_seconds")
    sc.add_argument("--s3-endpoint", default=None, help=S3_ENDPOINT_HELP)


def _add_serve(sv: argparse.ArgumentParser) -> None:
    from .serve_args import ServeArgs  # the application's typed arguments: the one source of the serve defaults

    S = ServeArgs.model_construct(bundle="")
    sv.add_argument("--bundle", required=True,
                    help="model bundle, or a release root of `onenip publish` (followed as it moves); local or s3://")
    sv.add_argument("--host", default="0.0.0.0",
                    help="HTTP bind address (not loopback without ONENIP_API_TOKEN: a loud warning)")
    sv.add_argument("--port", type=int, default=8000, help="HTTP port")
    _options(sv, S, "max_batch_size")
    sv.add_argument("--batch-wait-ms", type=float, default=S.batch_wait_timeout_s * 1e3,
                    help="how long an idle replica waits for more images before a forward pass (under load a "
                         "pass takes all queued)")
    _options(sv, S, "max_queued_requests", "request_timeout_s", "max_concurrent_decodes", "bundle_poll_s")
    sv.add_argument("--require-token", action="store_true", help="refuse to start without ONENIP_API_TOKEN")
    _options(sv, S, "api_docs", "runtime", "threads")
    sv.add_argument("--s3-endpoint", default=None, help=S3_ENDPOINT_HELP)


def _add_publish(pb: argparse.ArgumentParser) -> None:
    pb.add_argument("--bundle", required=True, help="the bundle to release (local or s3://); verified first")
    pb.add_argument("--root", required=True, help="release root (local or s3://) that services are started on")
    pb.add_argument("--s3-endpoint", default=None, help=S3_ENDPOINT_HELP)


def _add_report(rp: argparse.ArgumentParser) -> None:
    rp.add_argument("--bundle", required=True, help="model bundle (local or s3://); re-scores the gallery images")
    source = rp.add_mutually_exclusive_group(required=True)
    source.add_argument("--evaluation", default=None,
                        help="output directory of `onenip evaluate` (metrics.json, predictions.parquet)")
    source.add_argument("--scores", default=None,
                        help="one partition OUTPUT/run_date=YYYY-MM-DD/ of `onenip score`, or one of its Parquet files")
    rp.add_argument("--out", required=True, help="report folder (local or s3://): index.html, figures/, gallery/")
    rp.add_argument("--gallery-size", type=int, default=GALLERY_SIZE,
                    help="images per gallery section (false positives, false negatives, ...)")
    rp.add_argument("--s3-endpoint", default=None, help=S3_ENDPOINT_HELP)


def _add_drift(dr: argparse.ArgumentParser) -> None:
    dr.add_argument("--scores", required=True, help="the results table OUTPUT of `onenip score` (local or s3://)")
    dr.add_argument("--days", type=int, required=True, help="nights in the window, ending at --until")
    dr.add_argument("--until", type=_date, default=None,
                    help="last night of the window (default: the latest committed)")
    dr.add_argument("--reference", default=DRIFT_REFERENCES,
                    help="comma-separated: calibration (the bundle's normals), trailing (previous nights), "
                         "DATE..DATE (a fixed window of nights)")
    dr.add_argument("--out", required=True, help="folder (local or s3://): drift.html, drift.json, alerts.json")
    dr.add_argument("--alert-config", default=None, help="YAML mapping overriding alert rules (docs/drift.md)")
    dr.add_argument("--bundle", default=None, help="bundle of the calibration reference (default: the latest night's)")
    dr.add_argument("--s3-endpoint", default=None, help=S3_ENDPOINT_HELP)


# Each command's one-line help and the function that adds its flags.
COMMAND_FLAGS = {
    "info": ("print backbone channels, feature grid and parameter count as JSON", _add_model_flags),
    "train": ("train with Ray Train and write a model bundle", _add_train),
    "add-class": ("add (or --replace) a product class from a few good images; writes a new bundle", _add_add_class),
    "set-threshold": ("re-threshold classes at another target false-positive rate; writes a new bundle",
                      _add_set_threshold),
    "export": ("export a bundle to ONNX / OpenVINO; written only if it matches PyTorch on real images", _add_export),
    "evaluate": ("evaluate a bundle on labelled test splits; writes metrics.json", _add_evaluate),
    "score": ("nightly batch scoring with Ray Data into OUTPUT/run_date=YYYY-MM-DD/ (Parquet)", _add_score),
    "serve": ("online scoring: start a local Ray and serve POST /v1/score until Ctrl-C", _add_serve),
    "publish": ("release a bundle: copy it to ROOT/versions/<version> and move ROOT's pointer to it", _add_publish),
    "report": ("static HTML report (metrics, ROC/PR curves, score histograms, heat-map gallery)", _add_report),
    "drift": ("night over night: anomaly rates, score shift, unknown products, errors; alerts exit 3", _add_drift),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="onenip", description="OneNIP unified anomaly detection on Ray")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help, add_flags) in COMMAND_FLAGS.items():
        add_flags(sub.add_parser(name, help=help, formatter_class=_HelpFormatter))
    return parser


def _date(value: str) -> dt.date:
    try:
        return dt.date.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a date YYYY-MM-DD, got {value!r}") from None


def _classes(value: str) -> list[str]:
    return [c.strip() for c in value.split(",") if c.strip()]


def cmd_info(args: argparse.Namespace) -> dict:
    from .model.backbone import FrozenBackbone
    from .model.build import build_onenip, trainable_parameters

    cfg = ModelConfig(backbone=args.backbone, image_size=args.image_size)
    backbone = FrozenBackbone(cfg.backbone, cfg.out_indices)
    model = build_onenip(cfg, backbone.channels)
    return {
        "backbone": cfg.backbone,
        "out_indices": list(cfg.out_indices),
        "stage_channels": backbone.stage_channels,
        "stage_strides": backbone.stage_strides,
        "channels": backbone.channels,
        "feature_grid": [cfg.grid, cfg.grid],
        "image_size": cfg.image_size,
        "trainable_parameters": trainable_parameters(model),
        "normalization": {"mean": list(backbone.mean), "std": list(backbone.std)},
    }


def cmd_train(args: argparse.Namespace) -> dict:
    from .train import run_training

    model = ModelConfig(**{name: getattr(args, name) for name in MODEL_FLAGS})
    cfg = _from_args(TrainConfig, args, data=tuple(args.data), classes=tuple(_classes(args.classes)), model=model)
    meta = run_training(cfg, endpoint=args.s3_endpoint, storage_path=args.storage_path, run_name=args.run_name,
                        resume="auto" if args.auto_resume else args.resume)
    return {"bundle": args.out, "version": meta["version"], "classes": meta["classes"],
            "thresholds": meta["thresholds"],
            "epochs": [{k: round(v, 5) for k, v in h.items()} for h in meta["training"]["history"]]}


def cmd_evaluate(args: argparse.Namespace) -> dict:
    from .evaluate import evaluate
    from .training_data import parse_data_roots

    report = evaluate(args.bundle, parse_data_roots(args.dataset, args.data), args.out, _classes(args.classes) or None,
                      oracle=args.oracle_class, batch_size=args.batch_size, endpoint=args.s3_endpoint,
                      runtime=args.runtime)
    return {"metrics": os.path.join(args.out, METRICS_FILE), "mean": report["mean"],
            "routing_accuracy": report["routing_accuracy"], "per_class": report["per_class"]}


def cmd_set_threshold(args: argparse.Namespace) -> dict:
    from .set_threshold import set_threshold

    return set_threshold(args.bundle, args.out, args.target_fpr, _classes(args.classes) or None,
                         endpoint=args.s3_endpoint)


def cmd_add_class(args: argparse.Namespace) -> dict:
    from .add_class import add_class

    return add_class(args.bundle, args.class_name, args.normals, args.out, replace_class=args.replace,
                     prompts_per_class=args.prompts_per_class, memory_per_class=args.memory_per_class,
                     memory_rotation_images=args.memory_rotation_images, target_fpr=args.target_fpr,
                     seed=args.seed, endpoint=args.s3_endpoint)


def cmd_score(args: argparse.Namespace) -> dict:
    from .batch import repair_output, run_batch_scoring

    if args.repair:
        return repair_output(args.repair, args.s3_endpoint)
    missing = [flag for flag,
               value in (("--bundle", args.bundle), ("--input", args.input), ("--out", args.output)) if not value]
    if missing:
        raise InputError(f"{', '.join(missing)} required (or --repair OUTPUT)")
    cfg = _from_args(BatchConfig, args, run_date=args.run_date or dt.datetime.now(dt.timezone.utc).date(),
                     endpoint=args.s3_endpoint, max_pixels=None)
    summary = run_batch_scoring(cfg)
    return {k: summary[k] for k in ("partition", "run_id", "run_date", "model_version", "counts", "errors_by_kind",
                                    "per_class",
                                    "resumed", "repaired", "heatmaps", "images_per_second", "wall_seconds")}


def cmd_serve(args: argparse.Namespace) -> dict:
    import signal
    import threading

    import ray
    from ray import serve

    from .bundle import verify_bundle
    from .engines import load_model
    from .publish import resolve_bundle
    from .serve import TOKEN_ENV, ServeArgs, build_app

    settings = _from_args(ServeArgs, args, endpoint=args.s3_endpoint, batch_wait_timeout_s=args.batch_wait_ms / 1e3)
    has_token = bool(os.environ.get(TOKEN_ENV, "").strip())
    if not has_token and args.require_token:
        raise InputError(f"--require-token: set {TOKEN_ENV} (a bearer token clients must send)")
    if not has_token and not _is_loopback(args.host):
        print(f"\nWARNING: serving on {args.host}:{args.port} WITHOUT AUTHENTICATION: anyone who can reach this port "
              "can score "
              f"images and read the model's classes and thresholds. Set {TOKEN_ENV}, bind --host 127.0.0.1, or pass "
              "--require-token to refuse to start like this.\n", file=sys.stderr, flush=True)
    bundle_uri, _ = resolve_bundle(args.bundle, args.s3_endpoint)
    if args.runtime == "torch":
        verify_bundle(bundle_uri, args.s3_endpoint)  # a bad bundle: a clear error now, not replicas failing in a loop
    else:
        # a wrong runtime / missing package fails here, not in a replica
        load_model(bundle_uri, args.runtime, args.s3_endpoint)
    ray.init(address="local")  # replicas inherit this process's environment (AWS_*, ONENIP_API_TOKEN)
    try:
        gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
        # Serve's own timeout (408, plain text) only backs up the replica's JSON 408/504
        serve.start(http_options={"host": args.host, "port": args.port,
                                  "request_timeout_s": args.request_timeout_s + 10})
        serve.run(build_app(settings, ray_actor_options={"num_cpus": 1, "num_gpus": gpus}), name="onenip",
                  route_prefix="/")
        url = f"http://{'127.0.0.1' if args.host in ('0.0.0.0', '::') else args.host}:{args.port}"
        docs = f" (API docs {url}/docs)" if args.api_docs else ""
        print(f"OneNIP scoring at {url}/v1/score{docs}; Ctrl-C stops", flush=True)
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):  # SIGTERM too: container and service managers stop with it
            signal.signal(sig, lambda *_: stop.set())
        stop.wait()
        serve.shutdown()
    finally:
        ray.shutdown()
    return {"url": url, "stopped": True}


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def cmd_publish(args: argparse.Namespace) -> dict:
    from .publish import publish

    return publish(args.bundle, args.root, args.s3_endpoint)


def cmd_export(args: argparse.Namespace) -> dict:
    from .export import export_bundle

    meta = export_bundle(args.bundle, args.format, args.out, image_size=args.image_size, batch=args.batch,
                         images=args.images,
                         parity_images=args.parity_images, endpoint=args.s3_endpoint, pool_only=args.pool_only)
    p = meta["parity"]
    print(f"parity on {p['images']} real images ({p['runtime']} vs PyTorch): max abs image-score diff "
          f"{p['max_abs_score_diff']:.3g} "
          f"(bound < {p['bounds']['max_abs_score_diff']}), map correlation {p['map_correlation']:.9f} "
          f"(bound > {p['bounds']['map_correlation']})", file=sys.stderr)
    return {"export": args.out, "format": meta["graph_format"], "batch": meta["batch"],
            "model_version": meta["model_version"], "files": meta["files"], "parity": p}


def cmd_report(args: argparse.Namespace) -> dict:
    from .report import build_report

    return build_report(args.bundle, args.out, evaluation=args.evaluation, scores=args.scores,
                        endpoint=args.s3_endpoint, gallery_size=args.gallery_size)


def cmd_drift(args: argparse.Namespace) -> dict:
    from .drift import drift, load_rules
    from .drift_report import write_drift

    result = drift(args.scores, args.days, args.until, args.reference, load_rules(args.alert_config, args.s3_endpoint),
                   args.bundle, args.s3_endpoint)
    return write_drift(result, args.out, args.s3_endpoint)


COMMANDS = {"info": cmd_info, "train": cmd_train, "add-class": cmd_add_class, "set-threshold": cmd_set_threshold,
            "export": cmd_export,
            "evaluate": cmd_evaluate,
            "score": cmd_score, "serve": cmd_serve, "publish": cmd_publish, "report": cmd_report,
            "drift": cmd_drift}


def exit_code(error: BaseException) -> int | None:
    """The exit code of an error the tool raises on purpose (a missing file and a missing optional
    package are input errors); None for anything else, which is a bug and keeps its traceback."""
    if isinstance(error, BusyError):
        return EXIT_BUSY
    if isinstance(error, RejectedError):
        return EXIT_REJECTED
    return EXIT_ERROR if isinstance(error, (OneNipError, FileNotFoundError, ImportError)) else None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = COMMANDS[args.command](args)
    except Exception as e:
        code = exit_code(e)
        if code is None:
            raise
        print(f"onenip {args.command}: error: {e}", file=sys.stderr)
        return code
    print(json.dumps(result, indent=2, default=float))
    return result.get("exit_code", 0) if isinstance(result, dict) else 0  # drift: 3 when it raised alerts


if __name__ == "__main__":
    sys.exit(main())
