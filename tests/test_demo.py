"""``make demo`` end to end on a shrunken synthetic set (1 epoch, 64 px), in a subprocess: its own
local Ray cluster, train → evaluate → score → reports, and the printed guide."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

SHRINK = (
    "import sys, demo.guide as d; "
    "d.SYNTHETIC.update(size=64, train_per_class=6, test_good=2, test_per_defect=1); "
    "d.INCOMING.update(per_class=2); sys.exit(d.main())"
)


@pytest.mark.slow
def test_demo_runs_end_to_end_on_the_synthetic_set(tmp_path):
    out = tmp_path / "demo"
    env = {**os.environ, "PYTHONPATH": str(REPO), "FORCE_SYNTHETIC": "1", "EPOCHS": "1", "DEMO_OUT": str(out),
           "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    run = subprocess.run([sys.executable, "-c", SHRINK], env=env, capture_output=True, text=True, timeout=900,
                         cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    text = run.stdout
    assert "SYNTHETIC" in text and "per-class metrics" in text
    for cls in ("woven", "washer", "label", "mean"):
        assert f"\n  {cls} " in text
    assert "onenip serve --bundle" in text and "curl -s -X POST" in text and "/v1/score" in text
    assert (out / "bundle" / "bundle.json").is_file()
    assert (out / "evaluation" / "metrics.json").is_file()
    (partition,) = (out / "scores").glob("run_date=*")
    summary = json.loads((partition / "_SUCCESS.json").read_text())
    assert summary["counts"]["total"] == 6 and summary["counts"]["error"] == 0
    assert (out / "report" / "index.html").is_file() and (out / "report-scores" / "index.html").is_file()
    assert "Failed to query Ray Train Controller actor state" not in run.stdout + run.stderr
