"""Shared fixtures: the real MVTec data beside the checkout, tiny generated images."""
from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
MVTEC_ROOT = SHARED_DATA / "mvtec_ad"
BOTTLE = MVTEC_ROOT / "bottle"

needs_bottle = pytest.mark.skipif(
    not BOTTLE.is_dir(),
    reason=f"real MVTec AD bottle data not found at {BOTTLE} (only CI and dev machines have ../shared)",
)
VISA_ROOT = SHARED_DATA / "visa"
needs_visa = pytest.mark.skipif(
    not (VISA_ROOT / "split_csv" / "1cls.csv").is_file(),
    reason=f"real VisA data (capsules, macaroni1) not found at {VISA_ROOT} (only CI and dev machines have ../shared)",
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _moto_server_command(port: int) -> list[str]:
    script = Path(sys.executable).with_name("moto_server")
    if script.exists():
        return [str(script), "-H", "127.0.0.1", "-p", str(port)]
    return [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3-compatible server (moto standalone) on a free loopback port; yields its endpoint URL."""
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log_path = tmp_path_factory.mktemp("moto") / "server.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(_moto_server_command(port), stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2):
                    break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"moto server did not start on {endpoint}:\n{log_path.read_text()}")
                time.sleep(0.2)
        yield endpoint
    finally:
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
def s3_env(monkeypatch, s3_server):
    """AWS environment pointing every S3 client (boto3, pyarrow) at the moto server."""
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_server)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    return s3_server


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """Tests run tiny tensors: one intra-op thread. On small, busy machines (2 cores shared with a
    training run) torch's spinning thread pool made a 4×4-grid training step take seconds instead
    of ~0.1 s. Ray workers get their own thread count from ``run_training``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def s3_bucket(s3_env) -> str:
    """A fresh, empty bucket on the moto server; yields ``s3://<name>``."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_env).create_bucket(Bucket=name)
    return f"s3://{name}"


# ------------------------------------------------------------------------------------------------
# A tiny generated MVTec-layout dataset with real (painted) defects
# ------------------------------------------------------------------------------------------------
TINY_SIZE = 96
TINY_CLASSES = ("disc", "stripes")
TINY_TRAIN, TINY_TEST_GOOD, TINY_TEST_DEFECT = 12, 3, 3


def _disc_image(rng) -> "np.ndarray":
    """A coloured disc on a fine noisy checker texture (BGR, uint8)."""
    import cv2
    import numpy as np

    s = TINY_SIZE
    yy, xx = np.mgrid[0:s, 0:s]
    checker = (((yy // 6) + (xx // 6)) % 2).astype(np.float32)
    base = 90 + 40 * checker + rng.normal(0, 6, (s, s))
    img = np.repeat(base[..., None], 3, axis=2)
    img[..., 0] += 20  # slightly blue-grey background
    img = np.clip(img, 0, 255).astype(np.uint8)
    centre = (s // 2 + int(rng.integers(-3, 4)), s // 2 + int(rng.integers(-3, 4)))
    cv2.circle(img, centre, s // 3, (40, 60, 200), -1, lineType=cv2.LINE_AA)  # red-ish disc (BGR)
    cv2.circle(img, centre, s // 3, (20, 30, 120), 2, lineType=cv2.LINE_AA)
    return img


def _stripes_image(rng) -> "np.ndarray":
    """Diagonal sinusoidal stripes with a random phase and a little noise (BGR, uint8)."""
    import numpy as np

    s = TINY_SIZE
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi)
    wave = 0.5 + 0.5 * np.sin((xx + 0.5 * yy) * (2 * np.pi / 12) + phase)
    img = np.stack([60 + 150 * wave, 140 + 60 * wave, 200 - 120 * wave], axis=-1) + rng.normal(0, 4, (s, s, 1))
    return np.clip(img, 0, 255).astype(np.uint8)


def _paint_defect(img, class_name: str, rng):
    """Paint a real defect into ``img`` (in place) and return its 0/255 mask: a blob on the disc
    class, a scratch on the stripes class."""
    import cv2
    import numpy as np

    s = TINY_SIZE
    mask = np.zeros((s, s), np.uint8)
    if class_name == "disc":
        centre = (s // 2 + int(rng.integers(-12, 13)), s // 2 + int(rng.integers(-12, 13)))
        axes = (int(rng.integers(6, 11)), int(rng.integers(4, 8)))
        angle = float(rng.uniform(0, 180))
        cv2.ellipse(img, centre, axes, angle, 0, 360, (30, 220, 240), -1)  # yellow blob
        cv2.ellipse(mask, centre, axes, angle, 0, 360, 255, -1)
    else:
        x0, y0 = int(rng.integers(8, 30)), int(rng.integers(8, 30))
        x1, y1 = int(rng.integers(60, 88)), int(rng.integers(60, 88))
        thickness = int(rng.integers(3, 5))
        cv2.line(img, (x0, y0), (x1, y1), (15, 15, 15), thickness)  # dark scratch
        cv2.line(mask, (x0, y0), (x1, y1), 255, thickness)
    return mask


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """A small MVTec-layout tree, written once per session: classes ``disc`` (a coloured disc on a
    textured background) and ``stripes`` (a striped texture), each with 12 train/good images,
    3 test/good and 3 test/defect images whose painted blobs / scratches match
    ``ground_truth/defect/<stem>_mask.png``. 96×96 PNGs, fixed seed. Returns the root."""
    import cv2
    import numpy as np

    root = tmp_path_factory.mktemp("tiny_mvtec")
    rng = np.random.default_rng(20240601)
    draw = {"disc": _disc_image, "stripes": _stripes_image}
    for name in TINY_CLASSES:
        cls = root / name
        for sub in ("train/good", "test/good", "test/defect", "ground_truth/defect"):
            (cls / sub).mkdir(parents=True)
        for i in range(TINY_TRAIN):
            cv2.imwrite(str(cls / "train" / "good" / f"{i:03d}.png"), draw[name](rng))
        for i in range(TINY_TEST_GOOD):
            cv2.imwrite(str(cls / "test" / "good" / f"{i:03d}.png"), draw[name](rng))
        for i in range(TINY_TEST_DEFECT):
            img = draw[name](rng)
            mask = _paint_defect(img, name, rng)
            cv2.imwrite(str(cls / "test" / "defect" / f"{i:03d}.png"), img)
            cv2.imwrite(str(cls / "ground_truth" / "defect" / f"{i:03d}_mask.png"), mask)
    return root


# ------------------------------------------------------------------------------------------------
# One Ray cluster per session, and a tiny trained bundle
# ------------------------------------------------------------------------------------------------
RAY_TEST_ENV = {
    # static credentials for the moto server; workers do not see variables set later by s3_env
    "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


@pytest.fixture(scope="session")
def ray_cluster():
    """A private local Ray instance (2 CPUs, 256 MiB object store, no dashboard, no auth token)
    shared by every test that needs one; never attaches to another cluster on the machine."""
    import os
    import shutil
    import tempfile

    import ray
    import ray.data

    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_USAGE_STATS_ENABLED")}
    os.environ.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray puts unix sockets here
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=256 * 2**20,
             _temp_dir=temp_dir, configure_logging=False, runtime_env={"env_vars": RAY_TEST_ENV})
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.execution_no_progress_timeout_s = 300  # a resource deadlock fails instead of hanging CI
    try:
        yield ray
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="session")
def tiny_bundle(tiny_dataset, tmp_path_factory) -> str:
    """A bundle trained for one epoch in-process on ``tiny_dataset`` at 64 px; returns its path."""
    from onenip_ray.config import ModelConfig, TrainConfig
    from onenip_ray.train import run_training

    work = tmp_path_factory.mktemp("tiny_bundle")
    out = str(work / "bundle")
    cfg = TrainConfig(data=(str(tiny_dataset),), out=out, epochs=1, batch_size=4, steps_per_epoch=0, num_workers=0,
                      model=ModelConfig(image_size=64))
    run_training(cfg, storage_path=str(work / "ray"))
    return out


@pytest.fixture(scope="session")
def tiny_bundle_v2(tiny_bundle, tmp_path_factory) -> str:
    """``tiny_bundle`` with every class threshold raised by half: another version of the same model."""
    import dataclasses

    from onenip_ray.bundle import load_bundle, write_bundle

    bundle = load_bundle(tiny_bundle)
    cal = bundle.calibration
    raised = dataclasses.replace(cal, per_class={c: dataclasses.replace(k, threshold_raw=k.threshold_raw * 1.5)
                                                 for c, k in cal.per_class.items()})
    out = str(tmp_path_factory.mktemp("tiny_bundle_v2") / "bundle")
    write_bundle(out, bundle.config, bundle.backbone, bundle.model, bundle.pool, raised, bundle.meta["training"])
    return out
