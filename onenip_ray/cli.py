"""The ``onenip`` command line: thin flag parsing over the library."""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys

from .config import BatchConfig, ModelConfig, TrainConfig
from .formats import METRICS_FILE

T, M = TrainConfig(), ModelConfig()  # flag defaults come from the typed configs
B = BatchConfig(bundle="", input="", output="", run_date=dt.date.min)
EXIT_ERROR, EXIT_REJECTED, EXIT_BUSY = 2, 3, 4  # bad arguments or input; a run over its limits; the date is being written


def _add_data_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="mvtec", choices=["mvtec", "visa", "btad", "folder"], help="layout of --data roots")
    p.add_argument("--data", action="append", required=True, help="dataset root (local or s3://); repeat to merge, KIND=ROOT to mix layouts")
    p.add_argument("--classes", default="", help="comma-separated class subset (default: all)")
    p.add_argument("--s3-endpoint", default=None, help="S3-compatible endpoint URL (default: AWS_ENDPOINT_URL_S3)")


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backbone", default="tf_efficientnet_lite0", help="timm backbone (lite0 ships offline; tf_efficientnet_b4 = paper)")
    p.add_argument("--image-size", type=int, default=M.image_size, help="square network input size in pixels (multiple of 16)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="onenip", description="OneNIP unified anomaly detection on Ray")
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="print backbone channels, feature grid and parameter count as JSON")
    _add_model_flags(info)

    train = sub.add_parser("train", help="train with Ray Train and write a model bundle")
    _add_data_flags(train)
    _add_model_flags(train)
    train.add_argument("--out", required=True, help="bundle directory to write (local or s3://)")
    train.add_argument("--epochs", type=int, default=T.epochs, help="passes over the training images (official recipe: 1000)")
    train.add_argument("--steps-per-epoch", type=int, default=T.steps_per_epoch,
                       help="optimiser steps per epoch (0 = training images / (batch × workers)); fixes a run's cost as data grows")
    train.add_argument("--batch-size", type=int, default=T.batch_size, help="per-worker batch size")
    train.add_argument("--lr", type=float, default=T.lr, help="AdamW peak learning rate (official 1e-4 over 1000 epochs)")
    train.add_argument("--lr-schedule", default=T.lr_schedule, choices=["cosine", "step"],
                       help="cosine: warm-up then cosine to lr/100; step: official ×0.1 at 80%% of the epochs")
    train.add_argument("--warmup-fraction", type=float, default=T.warmup_fraction, help="share of the steps spent warming up (cosine)")
    train.add_argument("--no-balance-classes", dest="balance_classes", action="store_false",
                       help="draw training images uniformly instead of every class equally often")
    train.add_argument("--backbone-weights", default=None, help="backbone weights file or URI (safetensors or torch state dict)")
    train.add_argument("--textures", default=None, help="DTD-style texture folder (default: built-in procedural textures)")
    train.add_argument("--num-workers", type=int, default=1, help="Ray Train workers (0 = in-process, no cluster)")
    train.add_argument("--use-gpu", action="store_true", help="one GPU per Ray Train worker (NCCL); default CPU (gloo)")
    train.add_argument("--seed", type=int, default=133, help="random seed (split, prompts, anomaly synthesis, initialisation)")
    train.add_argument("--decoder", default="v2", choices=["v2", "v1"], help="v2 = post-fix decoder; v1 = pre-fix bug (paper numbers)")
    train.add_argument("--fusion", default="calibrated", choices=["calibrated", "official", "paper"],
                       help="map fusion: α chosen on calibration data (default), official α=0.5 rescaled, or paper Eq. 10")
    train.add_argument("--alpha", type=float, default=0.5, help="refiner weight α for --fusion official/paper")
    train.add_argument("--map-sigma", type=float, default=4.0, help="Gaussian smoothing of the fused map in px (0 = official: none)")
    train.add_argument("--jitter-scale", type=float, default=20.0, help="feature jitter scale in training (official 20)")
    train.add_argument("--residual-init", type=float, default=0.1,
                       help="gain on the xavier init of residual-branch outputs (1 = official; 0.1 trains in ~100 steps)")
    train.add_argument("--prompts-per-class", type=int, default=T.prompts_per_class,
                       help="prompt images per class, chosen to cover the class (k-center on retrieval descriptors)")
    train.add_argument("--memory-per-class", type=int, default=T.memory_per_class,
                       help="normal patches kept per class for the nearest-neighbour map (0 = all; above: a random subset)")
    train.add_argument("--calibration-fraction", type=float, default=T.calibration_fraction,
                       help="training normals held out for thresholds (at least 5, at most half a class)")
    train.add_argument("--target-fpr", type=float, default=T.target_fpr, help="false-positive rate the per-class thresholds aim at")
    train.add_argument("--storage-path", default=None, help="Ray Train storage path (default ./runs/ray)")
    train.add_argument("--run-name", default=None, help="Ray Train run name (default onenip-<out basename>)")
    resume = train.add_mutually_exclusive_group()
    resume.add_argument("--resume", action="store_true", help="continue the named run from its latest checkpoint")
    resume.add_argument("--auto-resume", action="store_true",
                        help="continue the named run if it has checkpoints, else start it (for jobs retried as a whole)")
    train.add_argument("--checkpoint-every", type=int, default=1, help="checkpoint every N epochs (0 = only at the end)")
    train.add_argument("--max-failures", type=int, default=2, help="worker-group restarts from the latest checkpoint")
    train.add_argument("--loader-workers", type=int, default=0, help="DataLoader processes for anomaly synthesis per trainer")
    train.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"], help="auto = bf16 autocast on GPU, fp32 on CPU")

    ac = sub.add_parser("add-class", help="add (or --replace) a product class from a few good images; writes a new bundle")
    ac.add_argument("--bundle", required=True, help="source model bundle (local or s3://); left untouched")
    ac.add_argument("--class", dest="class_name", required=True, help="name of the class to add")
    ac.add_argument("--normals", required=True, help="good images: folder / s3:// prefix (recursive) or a .parquet/.csv manifest with image_uri")
    ac.add_argument("--out", required=True, help="the new bundle (local or s3://); must differ from --bundle")
    ac.add_argument("--replace", action="store_true", help="replace the class if the bundle already has it")
    ac.add_argument("--prompts-per-class", type=int, default=None, help="prompt images for the class (default: as the bundle was trained)")
    ac.add_argument("--memory-per-class", type=int, default=None, help="normal patches kept for the class (default: as the bundle was trained)")
    ac.add_argument("--target-fpr", type=float, default=None, help="false-positive rate of the class's threshold (default: the bundle's)")
    ac.add_argument("--seed", type=int, default=T.seed, help="random seed (folds, synthetic anomalies)")
    ac.add_argument("--s3-endpoint", default=None, help="S3-compatible endpoint URL (default: AWS_ENDPOINT_URL_S3)")

    ex = sub.add_parser("export", help="export a bundle to ONNX / OpenVINO; written only if it matches PyTorch on real images")
    ex.add_argument("--bundle", required=True, help="model bundle (local or s3://)")
    ex.add_argument("--format", default="onnx", choices=["onnx", "openvino"], help="graph format (OpenVINO also runs onnx exports)")
    ex.add_argument("--out", required=True, help="export directory to write (local or s3://)")
    ex.add_argument("--image-size", type=int, default=None, help="network input size (default and only choice: the bundle's)")
    ex.add_argument("--batch", default="dynamic", help="batch dimension of the graph: a fixed N, or dynamic")
    ex.add_argument("--images", default=None,
                    help="real images for the parity check: folder / s3:// prefix or manifest (default: the bundle's prompt images)")
    ex.add_argument("--parity-images", type=int, default=32, help="at most this many images in the parity check")
    ex.add_argument("--pool-only", action="store_true",
                    help="--out is an export of the same weights (e.g. before add-class): keep its graphs, take this bundle's "
                         "prompt pool and calibration, check parity again")
    ex.add_argument("--s3-endpoint", default=None, help="S3-compatible endpoint URL (default: AWS_ENDPOINT_URL_S3)")

    ev = sub.add_parser("evaluate", help="evaluate a bundle on labelled test splits; writes metrics.json")
    _add_data_flags(ev)
    ev.add_argument("--bundle", required=True, help="model bundle (local or s3://)")
    ev.add_argument("--out", required=True, help="output directory for metrics.json and predictions.parquet")
    ev.add_argument("--oracle-class", action="store_true", help="give each image its true class (official code) instead of retrieval")
    ev.add_argument("--batch-size", type=int, default=16, help="images per model batch")
    ev.add_argument("--runtime", default="torch", choices=["torch", "onnxruntime", "openvino"],
                    help="engine: torch runs --bundle; onnxruntime / openvino run an `onenip export` directory given as --bundle")

    sc = sub.add_parser("score", help="nightly batch scoring with Ray Data into OUTPUT/run_date=YYYY-MM-DD/ (Parquet)")
    sc.add_argument("--bundle", default=None, help="model bundle (local or s3://); required unless --repair")
    sc.add_argument("--input", default=None,
                    help="image folder / s3:// prefix (recursive) or a .parquet/.csv manifest with image_uri[, class_name]; required unless --repair")
    sc.add_argument("--output", default=None, help="results root (local or s3://); the run replaces OUTPUT/run_date=<date>/")
    sc.add_argument("--repair", metavar="OUTPUT", default=None,
                    help="only finish interrupted commits under OUTPUT (each date under its lease), then exit")
    sc.add_argument("--run-date", type=_date, default=None, help="partition date YYYY-MM-DD (default: today, UTC)")
    sc.add_argument("--heatmaps", action="store_true", help="write heat-map PNGs (and overlay JPEGs of anomalous images) under OUTPUT/_heatmaps/")
    sc.add_argument("--max-error-fraction", type=float, default=B.max_error_fraction,
                    help="reject the run (keep the committed night, exit 3) when a larger share of inputs are error rows")
    sc.add_argument("--allow-empty", action="store_true", help="commit an empty night instead of rejecting a run without inputs")
    sc.add_argument("--batch-size", type=int, default=B.batch_size, help="images per model batch")
    sc.add_argument("--concurrency", type=int, default=B.concurrency, help="inference actors (one per GPU with --use-gpu)")
    sc.add_argument("--use-gpu", action="store_true", help="run the inference actors on GPUs (one each)")
    sc.add_argument("--actor-cpus", type=float, default=B.actor_cpus,
                    help="CPUs per inference actor (default: 1 with GPUs, else a share of half the cluster)")
    sc.add_argument("--task-cpus", type=float, default=B.task_cpus, help="CPUs per decode / post-processing task")
    sc.add_argument("--actor-threads", type=int, default=B.actor_threads,
                    help="intra-op threads per inference actor (default: its --actor-cpus, at least 1)")
    sc.add_argument("--runtime", default=B.runtime, choices=["torch", "onnxruntime", "openvino"],
                    help="engine: torch runs --bundle; onnxruntime / openvino run an `onenip export` directory given as --bundle")
    sc.add_argument("--chunk-size", type=int, default=B.chunk_size, help="inputs per pipeline pass (bounds the driver's memory)")
    sc.add_argument("--lease-seconds", type=float, default=B.lease_seconds,
                    help="a run that stops renewing its lease for this long loses the date to the next run")
    sc.add_argument("--s3-endpoint", default=None, help="S3-compatible endpoint URL (default: AWS_ENDPOINT_URL_S3)")

    from .serve_args import ServeArgs  # the application's typed arguments: the one source of the serve defaults

    S = {name: field.default for name, field in ServeArgs.model_fields.items()}
    sv = sub.add_parser("serve", help="online scoring: start a local Ray and serve POST /v1/score until Ctrl-C")
    sv.add_argument("--bundle", required=True, help="model bundle, or a release root of `onenip publish` (followed as it moves); local or s3://")
    sv.add_argument("--host", default="0.0.0.0", help="HTTP bind address (not loopback without ONENIP_API_TOKEN: a loud warning)")
    sv.add_argument("--port", type=int, default=8000, help="HTTP port")
    sv.add_argument("--max-batch-size", type=int, default=S["max_batch_size"], help="images per model forward pass (1 = no batching)")
    sv.add_argument("--batch-wait-ms", type=float, default=S["batch_wait_timeout_s"] * 1e3, help="how long an idle replica waits for more images before a forward pass (under load a pass takes all queued)")
    sv.add_argument("--max-queued-requests", type=int, default=S["max_queued_requests"],
                    help="requests the replica holds beyond the 2 × max-batch-size it works on; more get 503 + Retry-After at once")
    sv.add_argument("--request-timeout-s", type=float, default=S["request_timeout_s"],
                    help="deadline per request: 408 if the body is still arriving, else 504")
    sv.add_argument("--max-concurrent-decodes", type=int, default=S["max_concurrent_decodes"], help="images decoded at once (bounds decode memory)")
    sv.add_argument("--bundle-poll-s", type=float, default=S["bundle_poll_s"], help="how often a release root's pointer is read (0 = never)")
    sv.add_argument("--require-token", action="store_true", help="refuse to start without ONENIP_API_TOKEN")
    sv.add_argument("--api-docs", action="store_true", help="serve interactive API docs at /docs and the schema at /openapi.json")
    sv.add_argument("--runtime", default=S["runtime"], choices=["torch", "onnxruntime", "openvino"],
                    help="engine: torch runs --bundle; onnxruntime / openvino run an `onenip export` directory given as --bundle")
    sv.add_argument("--threads", type=int, default=S["threads"], help="intra-op threads of the engine (default: the runtime's)")
    sv.add_argument("--s3-endpoint", default=None, help="S3-compatible endpoint URL (default: AWS_ENDPOINT_URL_S3)")

    pb = sub.add_parser("publish", help="release a bundle: copy it to ROOT/versions/<version> and move ROOT's pointer to it")
    pb.add_argument("--bundle", required=True, help="the bundle to release (local or s3://); verified first")
    pb.add_argument("--root", required=True, help="release root (local or s3://) that services are started on")
    pb.add_argument("--s3-endpoint", default=None, help="S3-compatible endpoint URL (default: AWS_ENDPOINT_URL_S3)")

    rp = sub.add_parser("report", help="static HTML report (metrics, ROC/PR curves, score histograms, heat-map gallery)")
    rp.add_argument("--bundle", required=True, help="model bundle (local or s3://); re-scores the gallery images")
    source = rp.add_mutually_exclusive_group(required=True)
    source.add_argument("--evaluation", default=None, help="output directory of `onenip evaluate` (metrics.json, predictions.parquet)")
    source.add_argument("--scores", default=None, help="one partition OUTPUT/run_date=YYYY-MM-DD/ of `onenip score`, or one of its Parquet files")
    rp.add_argument("--out", required=True, help="report folder (local or s3://): index.html, figures/, gallery/")
    rp.add_argument("--gallery-size", type=int, default=24, help="images per gallery section (false positives, false negatives, ...)")
    rp.add_argument("--s3-endpoint", default=None, help="S3-compatible endpoint URL (default: AWS_ENDPOINT_URL_S3)")
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

    model = ModelConfig(backbone=args.backbone, image_size=args.image_size, decoder=args.decoder, fusion=args.fusion,
                        alpha=args.alpha, map_sigma=args.map_sigma, jitter_scale=args.jitter_scale,
                        residual_init=args.residual_init)
    cfg = TrainConfig(
        dataset=args.dataset, data=tuple(args.data), out=args.out, classes=tuple(_classes(args.classes)),
        epochs=args.epochs, steps_per_epoch=args.steps_per_epoch, batch_size=args.batch_size, lr=args.lr,
        lr_schedule=args.lr_schedule, warmup_fraction=args.warmup_fraction, balance_classes=args.balance_classes,
        memory_per_class=args.memory_per_class, target_fpr=args.target_fpr,
        seed=args.seed, textures=args.textures, backbone_weights=args.backbone_weights,
        num_workers=args.num_workers, use_gpu=args.use_gpu, calibration_fraction=args.calibration_fraction,
        prompts_per_class=args.prompts_per_class, checkpoint_every=args.checkpoint_every, max_failures=args.max_failures,
        loader_workers=args.loader_workers, precision=args.precision, model=model,
    )
    meta = run_training(cfg, endpoint=args.s3_endpoint, storage_path=args.storage_path, run_name=args.run_name,
                        resume="auto" if args.auto_resume else args.resume)
    return {"bundle": args.out, "version": meta["version"], "classes": meta["classes"], "thresholds": meta["thresholds"],
            "epochs": [{k: round(v, 5) for k, v in h.items()} for h in meta["training"]["history"]]}


def cmd_evaluate(args: argparse.Namespace) -> dict:
    from .evaluate import evaluate
    from .training_data import parse_data_roots

    report = evaluate(args.bundle, parse_data_roots(args.dataset, args.data), args.out, _classes(args.classes) or None,
                      oracle=args.oracle_class, batch_size=args.batch_size, endpoint=args.s3_endpoint, runtime=args.runtime)
    return {"metrics": os.path.join(args.out, METRICS_FILE), "mean": report["mean"], "routing_accuracy": report["routing_accuracy"],
            "per_class": report["per_class"]}


def cmd_add_class(args: argparse.Namespace) -> dict:
    from .add_class import add_class

    return add_class(args.bundle, args.class_name, args.normals, args.out, replace_class=args.replace,
                     prompts_per_class=args.prompts_per_class, memory_per_class=args.memory_per_class,
                     target_fpr=args.target_fpr, seed=args.seed, endpoint=args.s3_endpoint)


def cmd_score(args: argparse.Namespace) -> dict:
    from .batch import repair_output, run_batch_scoring

    if args.repair:
        return repair_output(args.repair, args.s3_endpoint)
    missing = [flag for flag, value in (("--bundle", args.bundle), ("--input", args.input), ("--output", args.output)) if not value]
    if missing:
        raise ValueError(f"{', '.join(missing)} required (or --repair OUTPUT)")
    cfg = BatchConfig(
        bundle=args.bundle, input=args.input, output=args.output,
        run_date=args.run_date or dt.datetime.now(dt.timezone.utc).date(), endpoint=args.s3_endpoint,
        heatmaps=args.heatmaps, batch_size=args.batch_size, concurrency=args.concurrency, use_gpu=args.use_gpu,
        actor_cpus=args.actor_cpus, actor_threads=args.actor_threads, task_cpus=args.task_cpus, runtime=args.runtime,
        max_error_fraction=args.max_error_fraction, allow_empty=args.allow_empty, chunk_size=args.chunk_size,
        lease_seconds=args.lease_seconds,
    )
    summary = run_batch_scoring(cfg)
    return {k: summary[k] for k in ("partition", "run_id", "run_date", "model_version", "counts", "errors_by_kind", "per_class",
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

    settings = ServeArgs(
        bundle=args.bundle, endpoint=args.s3_endpoint, max_batch_size=args.max_batch_size, batch_wait_timeout_s=args.batch_wait_ms / 1e3,
        max_queued_requests=args.max_queued_requests, request_timeout_s=args.request_timeout_s,
        max_concurrent_decodes=args.max_concurrent_decodes, api_docs=args.api_docs, bundle_poll_s=args.bundle_poll_s,
        runtime=args.runtime, threads=args.threads,
    )
    has_token = bool(os.environ.get(TOKEN_ENV, "").strip())
    if not has_token and args.require_token:
        raise ValueError(f"--require-token: set {TOKEN_ENV} (a bearer token clients must send)")
    if not has_token and not _is_loopback(args.host):
        print(f"\nWARNING: serving on {args.host}:{args.port} WITHOUT AUTHENTICATION: anyone who can reach this port can score "
              f"images and read the model's classes and thresholds. Set {TOKEN_ENV}, bind --host 127.0.0.1, or pass "
              "--require-token to refuse to start like this.\n", file=sys.stderr, flush=True)
    bundle_uri, _ = resolve_bundle(args.bundle, args.s3_endpoint)
    if args.runtime == "torch":
        verify_bundle(bundle_uri, args.s3_endpoint)  # a bad bundle: a clear error now, not replicas failing in a loop
    else:
        load_model(bundle_uri, args.runtime, args.s3_endpoint)  # a wrong runtime / missing package fails here, not in a replica
    ray.init(address="local")  # replicas inherit this process's environment (AWS_*, ONENIP_API_TOKEN)
    try:
        gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
        # Serve's own timeout (408, plain text) only backs up the replica's JSON 408/504
        serve.start(http_options={"host": args.host, "port": args.port, "request_timeout_s": args.request_timeout_s + 10})
        serve.run(build_app(settings, ray_actor_options={"num_cpus": 1, "num_gpus": gpus}), name="onenip", route_prefix="/")
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

    meta = export_bundle(args.bundle, args.format, args.out, image_size=args.image_size, batch=args.batch, images=args.images,
                         parity_images=args.parity_images, endpoint=args.s3_endpoint, pool_only=args.pool_only)
    p = meta["parity"]
    print(f"parity on {p['images']} real images ({p['runtime']} vs PyTorch): max abs image-score diff {p['max_abs_score_diff']:.3g} "
          f"(bound < {p['bounds']['max_abs_score_diff']}), map correlation {p['map_correlation']:.9f} "
          f"(bound > {p['bounds']['map_correlation']})", file=sys.stderr)
    return {"export": args.out, "format": meta["graph_format"], "batch": meta["batch"], "model_version": meta["model_version"],
            "files": meta["files"], "parity": p}


def cmd_report(args: argparse.Namespace) -> dict:
    from .report import build_report

    return build_report(args.bundle, args.out, evaluation=args.evaluation, scores=args.scores, endpoint=args.s3_endpoint,
                        gallery_size=args.gallery_size)


COMMANDS = {"info": cmd_info, "train": cmd_train, "add-class": cmd_add_class, "export": cmd_export, "evaluate": cmd_evaluate,
            "score": cmd_score, "serve": cmd_serve, "publish": cmd_publish, "report": cmd_report}


def main(argv: list[str] | None = None) -> int:
    from .lease import LeaseHeld, LeaseLost
    from .nightly import RunRejected

    args = build_parser().parse_args(argv)
    try:
        result = COMMANDS[args.command](args)
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"onenip {args.command}: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except (LeaseHeld, LeaseLost) as e:
        print(f"onenip {args.command}: error: {e}", file=sys.stderr)
        return EXIT_BUSY
    except RunRejected as e:
        print(f"onenip {args.command}: error: {e}", file=sys.stderr)
        return EXIT_REJECTED
    print(json.dumps(result, indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
