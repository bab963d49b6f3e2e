"""The cluster definitions (issue 5): ``ray_cluster.yaml`` (Ray cluster launcher, AWS) validated by
the autoscaler's own schema code, and the KubeRay ``RayJob`` manifest checked for what training
needs (GPU workers, a resume-safe entrypoint whose flags the CLI accepts, Ray version)."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from onenip_ray.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
CLUSTER_YAML = REPO / "ray_cluster.yaml"
RAYJOB_YAML = REPO / "deploy" / "kuberay" / "rayjob-train.yaml"
DOCKERFILE = REPO / "deploy" / "Dockerfile"
RAY_VERSION = "2.60.0"
CREDENTIALS = re.compile(
    r"AKIA[0-9A-Z]{12,}|aws_secret_access_key|AWS_SECRET_ACCESS_KEY|AWS_ACCESS_KEY_ID|aws_session_token", re.I
)


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


@pytest.fixture(scope="module")
def rayjob() -> dict:
    return yaml.safe_load(RAYJOB_YAML.read_text())


def test_ray_cluster_yaml_passes_the_autoscaler_validation(cluster):
    from ray.autoscaler._private.util import prepare_config, validate_config  # private: pinned here only

    prepared = prepare_config(cluster)
    validate_config(prepared)
    assert prepared["head_node_type"] == "head"


def test_ray_cluster_yaml_has_a_cpu_head_and_autoscaling_gpu_workers(cluster):
    assert cluster["cluster_name"] and cluster["provider"]["type"] == "aws" and cluster["provider"]["region"]
    types = cluster["available_node_types"]
    head = types[cluster["head_node_type"]]
    assert head["resources"] == {"CPU": 0}  # the head schedules, it does not train
    workers = [t for name, t in types.items() if name != cluster["head_node_type"]]
    gpu = [t for t in workers if t["resources"].get("GPU", 0) >= 1]
    assert len(gpu) == 1
    assert gpu[0]["min_workers"] == 0 and gpu[0]["max_workers"] == 8 == cluster["max_workers"]
    assert gpu[0]["node_config"]["InstanceType"].startswith(("g5.", "g6.", "g6e.", "p4d.", "p5."))
    for t in types.values():  # S3 access through instance profiles, never keys
        assert t["node_config"]["IamInstanceProfile"]["Arn"].startswith("arn:aws:iam::")
    assert cluster["docker"]["image"] == f"rayproject/ray:{RAY_VERSION}-py311-gpu"
    assert cluster["docker"]["head_image"] == f"rayproject/ray:{RAY_VERSION}-py311-cpu"
    mount = next(dst for dst, src in cluster["file_mounts"].items() if src == ".")
    assert any(c.startswith("pip install") and mount in c for c in cluster["setup_commands"])
    assert not CREDENTIALS.search(CLUSTER_YAML.read_text())


def test_rayjob_manifest_trains_on_gpu_workers(rayjob):
    assert rayjob["apiVersion"] == "ray.io/v1" and rayjob["kind"] == "RayJob"
    spec = rayjob["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["backoffLimit"] >= 1
    assert spec["submissionMode"] == "K8sJobMode"
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert isinstance(runtime_env["env_vars"], dict)
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == RAY_VERSION
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    (group,) = cluster["workerGroupSpecs"]
    (container,) = group["template"]["spec"]["containers"]
    for kind in ("requests", "limits"):
        assert container["resources"][kind]["nvidia.com/gpu"] == "1"
    images = {container["image"], *(c["image"] for c in head["template"]["spec"]["containers"])}
    assert len(images) == 1  # head and workers run the same image (deploy/Dockerfile)
    assert f"FROM rayproject/ray:{RAY_VERSION}-py311-gpu" in DOCKERFILE.read_text()
    assert not CREDENTIALS.search(RAYJOB_YAML.read_text())

    # the entrypoint runs jobs/train.py with flags the CLI accepts, resume-safe for retried attempts
    argv = shlex.split(spec["entrypoint"])
    assert argv[0] == "python" and argv[1].endswith("jobs/train.py")
    args = build_parser().parse_args(["train", *argv[2:]])
    assert args.run_name and args.auto_resume and not args.resume
    assert args.storage_path.startswith("s3://") and args.out.startswith("s3://")
    assert args.use_gpu and args.num_workers == group["replicas"] == group["minReplicas"]
    assert args.max_failures >= 1 and args.checkpoint_every >= 1
