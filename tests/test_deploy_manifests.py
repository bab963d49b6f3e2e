"""KubeRay manifests for the long-lived cluster, the HTTP service and nightly scoring (issue 6):
each parses, has the fields its operator needs, asks for GPUs where the work is, runs Ray 2.60.0,
and its entrypoint runs an existing ``jobs/*.py`` with flags the CLI accepts."""
from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from onenip_ray.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
KUBERAY = REPO / "deploy" / "kuberay"
RAY_VERSION = "2.60.0"
JOBS_IN_IMAGE = "/home/ray/onenip/jobs/"  # deploy/Dockerfile: WORKDIR /home/ray/onenip, COPY jobs ./jobs
YESTERDAY = "$(date -u -d yesterday +%F)"
CREDENTIALS = re.compile(
    r"AKIA[0-9A-Z]{12,}|aws_secret_access_key|AWS_SECRET_ACCESS_KEY|AWS_ACCESS_KEY_ID|aws_session_token", re.I
)


def _load(name: str) -> dict:
    text = (KUBERAY / name).read_text()
    assert not CREDENTIALS.search(text), f"{name} holds credentials"
    (doc,) = list(yaml.safe_load_all(text))
    return doc


def _check_cluster_spec(spec: dict, gpu_workers: bool = True) -> None:
    """A RayCluster spec: Ray 2.60.0, a CPU-only head, GPU worker groups with CPU and memory set."""
    assert spec["rayVersion"] == RAY_VERSION
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    (head_container,) = head["template"]["spec"]["containers"]
    assert "nvidia.com/gpu" not in head_container["resources"].get("limits", {})
    assert {p["containerPort"] for p in head_container["ports"]} >= {6379, 8265, 10001}
    images = {head_container["image"]}
    for group in spec["workerGroupSpecs"]:
        assert group["groupName"] and group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        (container,) = group["template"]["spec"]["containers"]
        images.add(container["image"])
        for kind in ("requests", "limits"):
            res = container["resources"][kind]
            assert float(res["cpu"]) >= 2 and res["memory"].endswith("Gi")
            if gpu_workers:
                assert res["nvidia.com/gpu"] == "1"
    assert len(images) == 1 and images.pop().endswith(f"-ray{RAY_VERSION}-gpu"), (
        "head and workers run the deploy/Dockerfile image"
    )


def _score_args(command: str) -> tuple[list[str], object]:
    """(argv, parsed ``onenip score`` flags) of a ``python …/jobs/score.py …`` command line."""
    argv = shlex.split(command)
    assert argv[0] == "python" and argv[1].startswith(JOBS_IN_IMAGE)
    assert (REPO / "jobs" / argv[1].removeprefix(JOBS_IN_IMAGE)).is_file(), f"{argv[1]} is not in jobs/"
    assert argv[1].endswith("jobs/score.py")
    return argv, build_parser().parse_args(["score", *argv[2:]])


def test_raycluster_is_long_lived_with_autoscaling_gpu_workers():
    doc = _load("raycluster.yaml")
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayCluster"
    spec = doc["spec"]
    _check_cluster_spec(spec)
    assert spec["enableInTreeAutoscaling"] is True
    (gpu,) = spec["workerGroupSpecs"]
    assert gpu["minReplicas"] == 0 and gpu["maxReplicas"] >= 1  # GPUs only while jobs need them
    assert spec["authOptions"]["mode"] == "token" and spec["authOptions"]["secretName"]


def test_rayservice_serves_the_same_application_as_serve_config():
    doc = _load("rayservice.yaml")
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayService"
    spec = doc["spec"]
    serve_config = yaml.safe_load(spec["serveConfigV2"])
    assert serve_config == yaml.safe_load((REPO / "deploy" / "serve_config.yaml").read_text()), \
        "serveConfigV2 must equal deploy/serve_config.yaml (edit both)"
    (app,) = serve_config["applications"]
    assert app["import_path"] == "onenip_ray.serve:app" and app["args"]["bundle"].startswith("s3://")
    module, attribute = app["import_path"].split(":")
    source = REPO / (module.replace(".", "/") + ".py")  # not imported here: Serve is slow to import
    assert source.is_file() and re.search(rf"^(def {attribute}\(|{attribute}\s*=)", source.read_text(),
                                          re.M), f"{app['import_path']} does not resolve"
    cluster = spec["rayClusterConfig"]
    _check_cluster_spec(cluster)
    (gpu,) = cluster["workerGroupSpecs"]
    (deployment,) = app["deployments"]
    actor = deployment["ray_actor_options"]
    (container,) = gpu["template"]["spec"]["containers"]
    assert actor["num_gpus"] == 1 and float(container["resources"]["requests"]["cpu"]) >= actor["num_cpus"]
    scaling = deployment["autoscaling_config"]
    assert gpu["minReplicas"] == scaling["min_replicas"] and gpu["maxReplicas"] == scaling["max_replicas"]
    assert cluster["enableInTreeAutoscaling"] is True
    token = [e for e in container["env"] if e["name"] == "ONENIP_API_TOKEN"]
    assert token and "secretKeyRef" in token[0]["valueFrom"]
    assert spec["upgradeStrategy"]["type"] in ("NewCluster", "NewClusterWithIncrementalUpgrade")


def test_raycronjob_scores_yesterday_every_night_on_gpus():
    doc = _load("raycronjob-score.yaml")
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayCronJob"
    spec = doc["spec"]
    assert spec["schedule"] == "0 2 * * *" and spec.get("suspend") is False
    job = spec["jobTemplate"]  # KubeRay 1.6: a RayJob spec
    assert job["shutdownAfterJobFinishes"] is True and job["backoffLimit"] >= 1 and job["activeDeadlineSeconds"] > 0
    assert isinstance(yaml.safe_load(job["runtimeEnvYAML"])["env_vars"], dict)
    _check_cluster_spec(job["rayClusterSpec"])
    # the shell expands the date when the job starts; the input folder and the partition agree
    assert job["entrypoint"].count(YESTERDAY) == 2
    argv, args = _score_args(job["entrypoint"].replace(YESTERDAY, "2026-11-27"))
    assert str(args.run_date) == "2026-11-27" and args.input.rstrip("/").endswith("/incoming/2026-11-27")
    assert args.bundle.startswith("s3://") and args.output.startswith("s3://") and args.input.startswith("s3://")
    (gpu,) = job["rayClusterSpec"]["workerGroupSpecs"]
    assert args.use_gpu and args.concurrency == gpu["replicas"]


def test_cronjob_fallback_submits_with_an_idempotent_submission_id():
    doc = _load("cronjob-submit-score.yaml")
    assert doc["apiVersion"] == "batch/v1" and doc["kind"] == "CronJob"
    spec = doc["spec"]
    assert spec["schedule"] == "0 2 * * *" and spec["concurrencyPolicy"] == "Forbid"
    pod = spec["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    (container,) = pod["containers"]
    env = {e["name"]: e for e in container["env"]}
    cluster = _load("raycluster.yaml")
    assert env["RAY_ADDRESS"]["value"] == f"http://{cluster['metadata']['name']}-head-svc:8265"
    assert env["RAY_AUTH_MODE"]["value"] == "token"
    assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == cluster["spec"]["authOptions"]["secretName"]
    assert container["image"] == cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
    assert "nvidia.com/gpu" not in container["resources"]["limits"]  # the submitter only waits
    (script,) = container["args"]
    assert container["command"] == ["/bin/bash", "-c"]
    assert 'ID="score-${DAY}"' in script and '--submission-id "$1"' in script and 'submit "$ID"' in script
    assert "ray job submit --no-wait" in script and 'ray job logs --follow "$ID"' in script
    # the job's command line (continuation lines joined), with the date filled in
    joined = script.replace("\\\n", " ")
    (command,) = [line.strip() for line in joined.splitlines() if "jobs/score.py" in line]
    command = command.split(" -- ", 1)[1] if " -- " in command else command
    _, args = _score_args(command.replace("${DAY}", "2026-11-27"))
    assert str(args.run_date) == "2026-11-27" and args.input.rstrip("/").endswith("/2026-11-27") and args.use_gpu


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash not installed")
def test_cronjob_fallback_script_is_valid_bash():
    (script,) = _load("cronjob-submit-score.yaml")["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0][
        "args"
    ]
    result = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
