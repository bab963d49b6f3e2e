"""bench/learning_curve.py: OneNIP's branch alone at step counts, on the tiny dataset."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from .conftest import TINY_CLASSES

ROOT = Path(__file__).resolve().parents[1]


def test_learning_curve_points_and_profile(tiny_dataset, tmp_path):
    out = tmp_path / "curve.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "learning_curve.py"), "--data", f"mvtec={tiny_dataset}",
         "--steps", "0,2,3", "--image-size", "64", "--profile-steps", "2", "--json", str(out)],
        capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["classes"] == sorted(TINY_CLASSES) and result["horizon"] == 3
    assert [p["step"] for p in result["curve"]] == [0, 2, 3]
    assert result["curve"][0]["loss"] is None and len(result["curve"][2]["loss"]) == 3
    for point in result["curve"]:
        assert len(point["classes"]) == len(TINY_CLASSES)
        for per_map in point["classes"].values():
            assert set(per_map) == {"s_rec", "refiner", "onenip"}
            assert all(0.0 <= v <= 1.0 for m in per_map.values() for v in m.values())
    assert set(result["profile_seconds_per_step"]) == {"synthesis", "backbone", "forward", "backward", "optimizer"}
    assert all(v > 0 for v in result["profile_seconds_per_step"].values())
    assert "| 3 |" in proc.stdout  # the Markdown table has the last point
