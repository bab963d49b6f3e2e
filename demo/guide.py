"""``make demo``: the newcomer's path, end to end on one machine with no dataset and no internet.

1. starts a private local Ray cluster (all of this machine's CPUs, no dashboard, no auth token);
2. data: the real MVTec AD ``bottle`` class when ``../shared/data/mvtec_ad`` is beside the checkout,
   or ``DATA=ROOT [CLASSES=a,b]``; otherwise (or with ``FORCE_SYNTHETIC=1``) a generated,
   deterministic 3-class synthetic set (``demo/data.py``) — synthetic, not for accuracy
   claims — plus a separate ``incoming/`` folder of new images drawn with another seed (with real
   data, a manifest of up to 40 of its test images stands in for the new images);
3. trains with Ray Train (1 worker, the offline ``tf_efficientnet_lite0`` backbone), evaluates on
   the labelled test split, scores the incoming folder with the Ray Data batch job into Parquet,
   writes HTML reports of the evaluation and of the scoring run;
4. prints per-class metrics, where everything is and how to start the HTTP endpoint.

Knobs (environment): ``DATA``, ``CLASSES``, ``EPOCHS``, ``LR``, ``DEMO_OUT`` (default ``demo_out``),
``FORCE_SYNTHETIC=1``.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import io
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

from onenip_ray.cli import main as cli_main

REPO = Path(__file__).resolve().parents[1]
SHARED_MVTEC = REPO.parent / "shared" / "data" / "mvtec_ad"
SYNTHETIC = {"size": 128, "train_per_class": 40, "test_good": 8, "test_per_defect": 3, "seed": 0}
INCOMING = {"per_class": 8, "defect_rate": 0.25, "seed": 1}
METRIC_KEYS = ("image_auroc", "image_ap", "image_f1_max", "pixel_auroc", "pixel_ap", "pixel_aupro")


def _step(name: str, argv: list[str], logs: Path) -> dict:
    """Run one ``onenip`` command; its JSON answer goes to ``logs/<name>.json``, not the terminal."""
    start = time.time()
    print(f"[{time.strftime('%H:%M:%S')}] {name}: onenip {' '.join(shlex.quote(a) for a in argv)}", flush=True)
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        rc = cli_main(argv)
    (logs / f"{name}.json").write_text(buffer.getvalue())
    if rc:
        print(buffer.getvalue(), file=sys.stderr)
        raise SystemExit(rc)
    print(f"    done in {time.time() - start:.0f} s", flush=True)
    return json.loads(buffer.getvalue())


def worker_setup() -> None:
    """``worker_process_setup_hook`` of the demo's private cluster (runs in every worker process).

    Ray Train's placement-group watchdog (``PlacementGroupCleaner``) asks the State API every
    second whether the training controller still lives, without an address: Ray then auto-detects
    *a* cluster on the machine. With another Ray cluster running beside the demo (a second demo, a
    test session, ``onenip serve``), it may ask that one, hear "no such actor", and remove the
    training's placement group, killing the run. Pinning ``RAY_ADDRESS`` to this worker's own
    cluster prevents that. Its warning that the State API (served by the dashboard, which the
    demo does not start) is unavailable is silenced: it repeats every second and is harmless.
    """
    import logging

    import ray

    try:
        os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    except Exception:  # noqa: BLE001 - not connected yet: nothing to pin
        pass
    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)


def _start_ray() -> str:
    import ray
    import ray.data

    os.environ["RAY_AUTH_MODE"] = "disabled"  # a private local cluster: no token file in $HOME
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    cpus = os.cpu_count() or 1
    temp_dir = tempfile.mkdtemp(prefix="ray-demo-", dir="/tmp")  # short path: Ray puts unix sockets here
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, _temp_dir=temp_dir, configure_logging=False,
             runtime_env={"worker_process_setup_hook": worker_setup})
    ray.data.DataContext.get_current().enable_progress_bars = sys.stdout.isatty()
    print(f"started a local Ray cluster with {cpus} CPUs (no dashboard, auth disabled)", flush=True)
    return temp_dir


def main() -> int:
    t0 = time.time()
    out = Path(os.environ.get("DEMO_OUT", "demo_out")).resolve()
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    data = os.environ.get("DATA")
    synthetic = not data and (os.environ.get("FORCE_SYNTHETIC") == "1" or not (SHARED_MVTEC / "bottle").is_dir())
    if synthetic:
        from demo.data import write_demo_dataset, write_incoming

        data = write_demo_dataset(str(out / "data"), **SYNTHETIC)
        incoming = out / "incoming"
        write_incoming(str(incoming), size=SYNTHETIC["size"], **INCOMING)
        classes, size, epochs = "", SYNTHETIC["size"], int(os.environ.get("EPOCHS", "10"))
        print(f"no dataset given: generated a SYNTHETIC 3-class set (woven, washer, label; seed {SYNTHETIC['seed']}) "
              f"in {data}\n"
              f"and {len(os.listdir(incoming))} new images to score (seed {INCOMING['seed']}) in {incoming}",
              flush=True)
    else:
        if not data:
            data, classes = str(SHARED_MVTEC), "bottle"
        else:
            classes = os.environ.get("CLASSES", "")
        size, epochs = 224, int(os.environ.get("EPOCHS", "5"))
        try:
            incoming = _test_manifest(data, classes, out / "incoming.parquet")
        except (ValueError, FileNotFoundError) as error:
            print(f"make demo: error: {error}", file=sys.stderr)
            return 2
        print(f"dataset {data} ({classes or 'all classes'}); its test images (manifest {incoming}) stand in for new "
              "images", flush=True)
    temp_dir = _start_ray()
    rc = 1
    try:
        rc = _run(data, classes, size, epochs, incoming, synthetic, out, logs, t0)
        return rc
    finally:
        import shutil

        import ray

        ray.shutdown()
        if rc == 0:  # Ray's session logs are kept only when something failed
            shutil.rmtree(temp_dir, ignore_errors=True)
        else:
            print(f"Ray session logs: {temp_dir}", file=sys.stderr)


def _test_manifest(data: str, classes: str, path: Path, limit: int = 40) -> Path:
    """A scoring manifest (``image_uri``) of up to ``limit`` test images spread over the dataset:
    real data has no separate folder of new images, and this works for every layout and s3://."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from .data.layouts import read_datasets
    from .training_data import parse_data_roots

    wanted = [c.strip() for c in classes.split(",") if c.strip()] or None
    tests = [s.uri for s in read_datasets(parse_data_roots("mvtec", [data]), wanted) if s.split == "test"]
    if not tests:
        raise ValueError(f"{data}: no test images")
    picked = tests[:: max(1, len(tests) // limit)][:limit]
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"image_uri": picked}), str(path))
    return path


def _run(data: str, classes: str, size: int, epochs: int, incoming: Path, synthetic: bool, out: Path, logs: Path,
         t0: float) -> int:
    bundle, evaluation, scores = out / "bundle", out / "evaluation", out / "scores"
    report, scores_report = out / "report", out / "report-scores"
    run_date = dt.date.today().isoformat()
    common = ["--data", data] + (["--classes", classes] if classes else [])
    timings = {}
    t = time.time()
    trained = _step("train", ["train", *common, "--out", str(bundle), "--epochs", str(epochs), "--image-size",
                              str(size),
                              "--steps-per-epoch", "0", "--lr", os.environ.get("LR", "1e-3"), "--batch-size", "4",
                              "--num-workers", "1",
                              "--storage-path", str(out / "ray"), "--run-name", time.strftime("demo-%Y%m%d-%H%M%S")],
                              logs)
    timings["train"] = time.time() - t
    history = trained.get("epochs", [])
    if history:
        print("    loss per epoch: " + ", ".join(f"{h.get('loss', float('nan')):.3g}" for h in history), flush=True)
    t = time.time()
    _step("evaluate", ["evaluate", *common, "--bundle", str(bundle), "--out", str(evaluation)], logs)
    timings["evaluate"] = time.time() - t
    t = time.time()
    scored = _step("score", ["score", "--bundle", str(bundle), "--input", str(incoming), "--out", str(scores),
                             "--run-date", run_date, "--heatmaps", "--batch-size", "16"], logs)
    timings["score"] = time.time() - t
    t = time.time()
    _step("report", ["report", "--bundle", str(bundle), "--evaluation", str(evaluation), "--out", str(report)], logs)
    _step("report-scores",
          ["report", "--bundle", str(bundle), "--scores", scored["partition"], "--out", str(scores_report)], logs)
    timings["reports"] = time.time() - t

    metrics = json.loads((evaluation / "metrics.json").read_text())
    warning = " — SYNTHETIC data, not an accuracy claim" if synthetic else ""
    print("\nper-class metrics (percent; image level I-, pixel level P-)" + warning)
    print(f"  {'class':<12}" + "".join(f"{k:>14}" for k in METRIC_KEYS) + f"{'F1@threshold':>14}")
    for cls, m in list(metrics["per_class"].items()) + [("mean", metrics["mean"])]:
        print(f"  {cls:<12}" + "".join(f"{100 * m[k]:>14.1f}" for k in METRIC_KEYS + ("threshold_f1",)))
    counts = scored["counts"]
    print(f"\nscored {counts['total']} new images: {counts['anomalous']} flagged anomalous, {counts['error']} failed "
          f"({scored['images_per_second']:.1f} images/s)")
    if incoming.suffix == ".parquet":
        import pyarrow.parquet as pq

        example = str(pq.read_table(str(incoming)).column("image_uri")[0])
        example = example if os.path.isfile(example) else "part.png"
    else:
        example = str(sorted(incoming.rglob("*.png"))[0])
    onenip = Path(sys.executable).with_name("onenip")
    print(f"""
where everything is:
  data:            {data}{' (synthetic)' if synthetic else ''}
  bundle:          {bundle}   (model version {trained['version']})
  evaluation:      {evaluation / 'metrics.json'}, {evaluation / 'predictions.parquet'}
  scores:          {scored['partition']}/  (Parquet + _SUCCESS.json; heat maps in {scored['heatmaps']})
  report:          {report / 'index.html'}
  scoring report:  {scores_report / 'index.html'}
  logs:            {logs}/*.json

start the HTTP endpoint (Ctrl-C stops it), then score an image from another shell:
  {onenip if onenip.exists() else 'onenip'} serve --bundle {bundle} --port 8000
  curl -s -X POST -H "Content-Type: image/png" --data-binary @{example} http://127.0.0.1:8000/v1/score
""")
    print("timings: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()) + f"; total {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
