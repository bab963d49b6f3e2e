"""``make demo``: train and evaluate end to end, on real MVTec AD bottle images when they are
beside the checkout (or ``DATA=ROOT``), else on a generated synthetic set. Knobs: ``DATA``,
``CLASSES``, ``EPOCHS``, ``DEMO_OUT``."""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from .cli import main as cli_main

REPO = Path(__file__).resolve().parents[1]
SHARED_MVTEC = REPO.parent / "shared" / "data" / "mvtec_ad"


def main() -> int:
    out = Path(os.environ.get("DEMO_OUT", "demo_out")).resolve()
    data = os.environ.get("DATA")
    if data:
        classes, size, epochs = os.environ.get("CLASSES", ""), 224, int(os.environ.get("EPOCHS", "8"))
    elif (SHARED_MVTEC / "bottle").is_dir():
        data, classes, size, epochs = str(SHARED_MVTEC), "bottle", 224, int(os.environ.get("EPOCHS", "8"))
    else:
        from .demo_data import write_demo_dataset

        data = write_demo_dataset(str(out / "data"), size=128)
        classes, size, epochs = "", 128, int(os.environ.get("EPOCHS", "6"))
        print(f"no dataset found: generated a synthetic 3-class set (documented as synthetic) in {data}")
    bundle, evaluation = out / "bundle", out / "evaluation"
    common = ["--data", data] + (["--classes", classes] if classes else [])
    t0 = time.time()
    print(f"training {epochs} epochs on {data} ({classes or 'all classes'}), image size {size} ...", flush=True)
    rc = cli_main(["train", *common, "--out", str(bundle), "--epochs", str(epochs), "--image-size", str(size),
                   "--lr", os.environ.get("LR", "1e-3"), "--batch-size", "4", "--storage-path", str(out / "ray"),
                   "--run-name", time.strftime("demo-%Y%m%d-%H%M%S")])
    if rc:
        return rc
    rc = cli_main(["evaluate", *common, "--bundle", str(bundle), "--out", str(evaluation)])
    if rc:
        return rc
    metrics = json.loads((evaluation / "metrics.json").read_text())
    print("\nper-class metrics:")
    keys = ["image_auroc", "image_ap", "image_f1_max", "pixel_auroc", "pixel_ap", "pixel_aupro"]
    print(f"  {'class':<12}" + "".join(f"{k:>14}" for k in keys))
    for cls, m in list(metrics["per_class"].items()) + [("mean", metrics["mean"])]:
        print(f"  {cls:<12}" + "".join(f"{m[k]:>14.4f}" for k in keys))
    print(f"\nbundle:      {bundle}\nmetrics:     {evaluation / 'metrics.json'}\npredictions: {evaluation / 'predictions.parquet'}")
    print(f"total time:  {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
