"""The ``onenip`` command line: ``info`` numbers, clear exit-2 errors for bad datasets, the Ray job entry."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from onenip_ray.cli import main

REPO = Path(__file__).resolve().parents[1]


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_info_for_the_paper_backbone(capsys):
    code, out, _ = _run(capsys, "info", "--backbone", "tf_efficientnet_b4", "--image-size", "224")
    assert code == 0
    info = json.loads(out)
    assert info["backbone"] == "tf_efficientnet_b4"
    assert info["channels"] == 272
    assert info["stage_channels"] == [24, 32, 56, 160]
    assert info["stage_strides"] == [2, 4, 8, 16]
    assert info["feature_grid"] == [14, 14]
    assert info["trainable_parameters"] == 8_372_625


def test_info_for_lite0(capsys):
    code, out, _ = _run(capsys, "info", "--backbone", "tf_efficientnet_lite0", "--image-size", "224")
    assert code == 0
    info = json.loads(out)
    assert info["channels"] == 192
    assert info["stage_channels"] == [16, 24, 40, 112]
    # b4's count with 192 instead of 272 input channels (input/output projections, refiner's first conv)
    assert info["trainable_parameters"] == 8_372_625 - 80 * 256 - 80 * 257 - 80 * 128 * 9 == 8_239_425
    assert info["normalization"] == {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}
    code, out, _ = _run(capsys, "info", "--image-size", "64")
    small = json.loads(out)
    assert small["feature_grid"] == [4, 4]
    assert small["trainable_parameters"] == 8_239_425 - (14 - 4) * 256  # only the position embedding shrinks


def test_info_rejects_an_image_size_off_the_stride(capsys):
    code, _, err = _run(capsys, "info", "--image-size", "100")
    assert code == 2
    assert "image_size must be a multiple of 16" in err


# -- bad datasets through `onenip train` -------------------------------------------------------
def _train(capsys, tmp_path: Path, data: str, *extra: str) -> tuple[int, str]:
    code, out, err = _run(
        capsys, "train", "--data", data, "--out", str(tmp_path / "bundle"), "--num-workers", "0",
        "--epochs", "1", "--batch-size", "4", "--image-size", "64", "--storage-path", str(tmp_path / "ray"), *extra,
    )
    assert out == ""  # nothing on stdout on failure
    assert not (tmp_path / "bundle").exists()
    return code, err


def _copy(tiny_dataset: Path, tmp_path: Path, classes=("disc",)) -> Path:
    root = tmp_path / "data"
    for name in classes:
        shutil.copytree(tiny_dataset / name, root / name)
    return root


def test_missing_dataset_root(capsys, tmp_path):
    missing = tmp_path / "nowhere"
    code, err = _train(capsys, tmp_path, str(missing))
    assert code == 2
    assert f"onenip train: error: dataset root {missing} does not exist" in err


def test_unknown_class(capsys, tmp_path, tiny_dataset):
    code, err = _train(capsys, tmp_path, str(tiny_dataset), "--classes", "disc,bottle")
    assert code == 2
    assert "onenip train: error: unknown class(es) bottle; available: disc, stripes" in err


def test_defective_image_without_mask(capsys, tmp_path, tiny_dataset):
    root = _copy(tiny_dataset, tmp_path)
    (root / "disc" / "ground_truth" / "defect" / "001_mask.png").unlink()
    code, err = _train(capsys, tmp_path, str(root))
    assert code == 2
    assert f"{root / 'disc' / 'test' / 'defect' / '001.png'}: defective test image without a mask" in err
    assert "001_mask.png" in err


def test_unreadable_training_image_is_named(capsys, tmp_path, tiny_dataset):
    root = _copy(tiny_dataset, tmp_path)
    bad = root / "disc" / "train" / "good" / "007.png"
    bad.write_text("this is not a PNG\n")
    code, err = _train(capsys, tmp_path, str(root))
    assert code == 2
    assert f"{bad}: not a decodable image" in err


def test_unknown_dataset_kind_is_an_argparse_error(capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--dataset", "coco", "--data", str(tmp_path), "--out", str(tmp_path / "b")])
    assert exc.value.code == 2
    assert "invalid choice: 'coco'" in capsys.readouterr().err


def test_ray_job_entry_point_help():
    proc = subprocess.run([sys.executable, str(REPO / "jobs" / "train.py"), "--help"], capture_output=True, text=True,
                          timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: onenip train")
    for flag in ("--data", "--out", "--num-workers", "--backbone-weights", "--epochs"):
        assert flag in proc.stdout


def test_exit_codes_follow_the_error_taxonomy_and_bugs_keep_their_traceback():
    import onenip_ray
    from onenip_ray.cli import EXIT_BUSY, EXIT_ERROR, EXIT_REJECTED, exit_code
    from onenip_ray.data.images import ImageError
    from onenip_ray.data.layouts import DatasetError
    from onenip_ray.lease import LeaseHeld, LeaseLost
    from onenip_ray.nightly import RunRejected

    family = {name: getattr(onenip_ray, name) for name in ("InputError", "BundleError", "BusyError", "RejectedError")}
    assert all(issubclass(kind, onenip_ray.OneNipError) for kind in family.values())
    assert all(issubclass(kind, onenip_ray.InputError) for kind in (DatasetError, ImageError, onenip_ray.BundleError))
    for error, code in ((DatasetError("layout"), EXIT_ERROR), (onenip_ray.BundleError("format"), EXIT_ERROR),
                        (FileNotFoundError("gone"), EXIT_ERROR), (ImportError("no onnx"), EXIT_ERROR),
                        (RunRejected("limits"), EXIT_REJECTED), (LeaseHeld("held"), EXIT_BUSY),
                        (LeaseLost("lost"), EXIT_BUSY)):
        assert exit_code(error) == code, error
    assert exit_code(ValueError("a bug")) is None and exit_code(KeyError("a bug")) is None


def test_a_bad_manifest_is_an_input_error(tmp_path):
    manifest = tmp_path / "inputs.parquet"
    manifest.write_bytes(b"not parquet at all")
    from onenip_ray.errors import InputError
    from onenip_ray.inputs import list_inputs

    with pytest.raises(InputError, match="inputs.parquet cannot be read"):
        list_inputs(str(manifest))
