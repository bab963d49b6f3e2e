"""Online scoring (Ray Serve): request parsing, the deploy config, and real HTTP against a running app."""
from __future__ import annotations

import base64
import datetime as dt
import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pytest
import requests
import yaml

from onenip_ray.cli import build_parser
from onenip_ray.schema import RESULT_COLUMNS
from onenip_ray.scoring import MAP_KEY, Scorer, render_heatmap
from onenip_ray.serve import TOKEN_ENV, ClientError, ScoreResult, ServeArgs, app, build_app, json_safe, parse_options
from tests.conftest import _free_port
from tests.inputs import bad_inputs

REPO = Path(__file__).resolve().parents[1]
BODY_LIMIT = 1_000_000  # small, so the over-limit request stays quick
CLASSES = ("disc", "stripes")


def _png(path: Path) -> bytes:
    return cv2.imencode(".png", cv2.imread(str(path)))[1].tobytes()


# -- no Ray needed ------------------------------------------------------------------------------
def test_parse_options():
    assert parse_options({}, CLASSES) == parse_options({"class_name": "", "threshold": ""}, CLASSES)
    options = parse_options({"class_name": "disc", "return_heatmap": "True", "threshold": "0.25"}, CLASSES)
    assert (options.class_name, options.return_heatmap, options.threshold) == ("disc", True, 0.25)
    for params, fragment in [({"class_name": "gearbox"}, "this model knows: disc, stripes"),
                             ({"threshold": "abc"}, "finite number"), ({"threshold": "nan"}, "finite number"),
                             ({"threshold": "inf"}, "finite number"), ({"return_heatmap": "maybe"}, "true or false")]:
        with pytest.raises(ClientError) as info:
            parse_options(params, CLASSES)
        assert info.value.status == 400 and fragment in info.value.message


def test_json_safe():
    row = {"scored_at": dt.datetime(2026, 11, 27, 3, 4, 5, tzinfo=dt.timezone.utc), "run_date": dt.date(2026, 11, 27),
           "score": math.nan, "n": np.int32(3), "regions": [{"peak_score": np.float32(0.5)}]}
    assert json_safe(row) == {"scored_at": "2026-11-27T03:04:05+00:00", "run_date": "2026-11-27", "score": None, "n": 3,
                              "regions": [{"peak_score": 0.5}]}


def test_app_builder_validates_args():
    app({"bundle": "s3://models/x", "max_batch_size": "8", "batch_wait_timeout_s": "0.005"})  # serve run passes strings
    for bad in ({}, {"bundle": "x", "max_batch_size": 0}, {"bundle": "x", "bundel": "y"}):
        with pytest.raises(ValueError):
            app(bad)


def test_serve_config_is_a_valid_deploy_config():
    from ray.serve.schema import ServeDeploySchema

    config = yaml.safe_load((REPO / "deploy" / "serve_config.yaml").read_text())
    schema = ServeDeploySchema.model_validate(config)
    (application,) = schema.applications
    assert application.import_path == "onenip_ray.serve:app"
    app(application.args)  # the builder accepts the args (binds only, loads nothing)
    (deployment,) = application.deployments
    assert deployment.name == "OneNIPService"
    assert deployment.max_ongoing_requests >= 2 * deployment.user_config["max_batch_size"]
    scaling = deployment.autoscaling_config
    assert scaling["min_replicas"] >= 1 and scaling["max_replicas"] >= scaling["min_replicas"] and scaling["target_ongoing_requests"] > 0
    assert deployment.ray_actor_options.num_gpus == 1 and deployment.health_check_period_s > 0


def test_cli_serve_flags():
    args = build_parser().parse_args(["serve", "--bundle", "s3://models/x"])
    assert (args.bundle, args.host, args.port, args.max_batch_size, args.s3_endpoint) == ("s3://models/x", "0.0.0.0", 8000, 16, None)


# -- real HTTP ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def service(ray_cluster, tiny_bundle):
    """The app on a free loopback port (batches of up to 8, 1 MB body limit); yields its base URL."""
    from ray import serve

    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        args = ServeArgs(bundle=tiny_bundle, max_batch_size=8, batch_wait_timeout_s=0.02, max_body_bytes=BODY_LIMIT)
        serve.run(build_app(args, ray_actor_options={"num_cpus": 0.25}), name="onenip", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()


@pytest.fixture(scope="module")
def scorer(tiny_bundle) -> Scorer:
    return Scorer.from_uri(tiny_bundle)


@pytest.fixture(scope="module")
def images(tiny_dataset) -> dict[str, bytes]:
    return {str(p.relative_to(tiny_dataset)): _png(p) for p in sorted(tiny_dataset.glob("*/*/*/*.png"))}


@pytest.mark.slow
def test_good_image_raw_and_multipart_score_like_the_batch_path(service, scorer, images):
    name, data = next(iter(images.items()))
    (expected,) = scorer.score_bytes([(name, data, None)])
    raw = requests.post(f"{service}/v1/score", data=data, headers={"Content-Type": "image/png"}, timeout=30)
    multipart = requests.post(f"{service}/v1/score", files={"file": ("part.png", data, "image/png")}, timeout=30)
    for response, image_uri in ((raw, "upload"), (multipart, "part.png")):
        assert response.status_code == 200, response.text
        row = response.json()
        assert tuple(row) == RESULT_COLUMNS
        ScoreResult.model_validate(row)
        assert row["status"] == "ok" and row["error"] is None and row["image_uri"] == image_uri
        assert row["score_raw"] == pytest.approx(expected["score_raw"], abs=1e-5)
        assert row["score"] == pytest.approx(expected["score"], abs=1e-5)
        for key in ("class_name", "prompt_id", "image_sha256", "width", "height", "is_anomalous", "model_version"):
            assert row[key] == expected[key], key
        assert dt.datetime.fromisoformat(row["scored_at"]).tzinfo is not None
        assert dt.date.fromisoformat(row["run_date"]) and row["run_id"].startswith("serve-") and row["heatmap_uri"] is None


@pytest.mark.slow
def test_class_name_threshold_and_heatmap(service, scorer, images):
    name, data = list(images.items())[-1]
    (expected,) = scorer.score_bytes([(name, data, "stripes")], with_maps=True)
    threshold = expected["score_raw"] / 2
    response = requests.post(f"{service}/v1/score", params={"class_name": "stripes", "return_heatmap": "true"},
                             data=data, headers={"Content-Type": "image/png"}, timeout=30)
    assert response.status_code == 200, response.text
    row = response.json()
    assert (row["class_name"], row["class_source"], row["threshold_source"]) == ("stripes", "given", "per_class")
    prefix = "data:image/png;base64,"
    assert row["heatmap_uri"].startswith(prefix)
    heat = cv2.imdecode(np.frombuffer(base64.b64decode(row["heatmap_uri"][len(prefix):]), np.uint8), cv2.IMREAD_COLOR)
    reference = cv2.imdecode(np.frombuffer(render_heatmap(expected[MAP_KEY], scorer.spec.class_calibration("stripes")), np.uint8),
                             cv2.IMREAD_COLOR)
    assert heat.shape == (scorer.spec.image_size, scorer.spec.image_size, 3)
    assert np.abs(heat.astype(int) - reference).max() <= 2
    form = {"class_name": "stripes", "threshold": str(threshold)}  # multipart: parameters as form fields
    row = requests.post(f"{service}/v1/score", files={"file": ("x.png", data, "image/png")}, data=form, timeout=30).json()
    assert (row["threshold_source"], row["threshold_raw"], row["is_anomalous"]) == ("manual", threshold, True)
    assert row["score_raw"] == pytest.approx(expected["score_raw"], abs=1e-5) and row["score"] > 0.5 and row["num_regions"] >= 1


@pytest.mark.slow
def test_bad_inputs_are_client_errors(service, images):
    png = next(iter(images.values()))
    bad = {name: data for name, (data, _) in bad_inputs(cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)).items()}
    image = {"Content-Type": "image/png"}
    cases = {
        "text as jpeg": (dict(data=bad["notes.jpg"], headers={"Content-Type": "image/jpeg"}), 400, "not a decodable image"),
        "truncated png": (dict(data=png[: len(png) // 2], headers=image), 400, "truncated PNG"),
        "empty body": (dict(data=b"", headers=image), 400, "empty file"),
        "56 Mpx": (dict(data=bad["huge.png"], headers=image), 413, "over the limit of 50000000 px"),
        "body over limit": (dict(data=os.urandom(BODY_LIMIT + 1), headers=image), 413, f"over the limit of {BODY_LIMIT} bytes"),
        "text/plain": (dict(data=png, headers={"Content-Type": "text/plain"}), 415, "unsupported content type"),
        "json": (dict(json={"image": "x"}), 415, "unsupported content type"),
        "no content type": (dict(data=png), 415, "unsupported content type"),
        "unknown class": (dict(data=png, headers=image, params={"class_name": "gearbox"}), 400, "knows: disc, stripes"),
        "bad threshold": (dict(data=png, headers=image, params={"threshold": "high"}), 400, "threshold"),
        "bad return_heatmap": (dict(data=png, headers=image, params={"return_heatmap": "please"}), 400, "return_heatmap"),
        "multipart without file": (dict(files={"image": ("a.png", png, "image/png")}), 400, "'file'"),
        "multipart truncated": (dict(files={"file": ("cut.png", png[:100], "image/png")}), 400, "cut.png: truncated PNG"),
    }
    for case, (kwargs, status, fragment) in cases.items():
        response = requests.post(f"{service}/v1/score", timeout=30, **kwargs)
        assert response.status_code == status, (case, response.status_code, response.text)
        assert fragment in response.json()["error"], (case, response.json())


@pytest.mark.slow
def test_concurrent_requests_are_each_answered_right(service, scorer, images):
    names = list(images)[:24]
    expected = {r["image_uri"]: r for r in scorer.score_bytes([(n, images[n], None) for n in names])}

    def post(name: str) -> tuple[str, requests.Response]:
        files = {"file": (name, images[name], "image/png")}
        return name, requests.post(f"{service}/v1/score", files=files, timeout=60)

    with ThreadPoolExecutor(len(names)) as pool:
        answers = list(pool.map(post, names))
    for name, response in answers:
        assert response.status_code == 200, (name, response.text)
        row = response.json()
        assert row["image_uri"] == name and row["class_name"] == expected[name]["class_name"]
        # other batch compositions than the batch path's: float32 rounding differs slightly. The
        # nearest-neighbour distances come from a matrix product (√(a² + b² − 2ab)), whose error near
        # zero is absolute (measured 0.01 on a score of 0.05): compare on the decision's scale
        tolerance = 1e-3 * expected[name]["threshold_raw"]
        assert row["score_raw"] == pytest.approx(expected[name]["score_raw"], rel=2e-5, abs=tolerance)
        assert row["score"] == pytest.approx(expected[name]["score"], abs=1e-3)


@pytest.mark.slow
def test_model_health_and_docs(service, scorer):
    model = requests.get(f"{service}/v1/model", timeout=10).json()
    assert model["model_version"] == scorer.spec.model_version and model["classes"] == list(CLASSES)
    assert model["thresholds"] == {c: scorer.spec.class_calibration(c).threshold_raw for c in CLASSES}
    assert model["image_size"] == scorer.spec.image_size and model["backbone"] and model["device"] == "cpu"
    assert requests.get(f"{service}/healthz", timeout=10).json() == {"status": "ok", "model_version": model["model_version"]}
    assert requests.get(f"{service}/docs", timeout=10).status_code == 200
    score = requests.get(f"{service}/openapi.json", timeout=10).json()["paths"]["/v1/score"]["post"]
    assert set(score["requestBody"]["content"]) == {"image/*", "multipart/form-data"}
    assert {p["name"] for p in score["parameters"]} == {"class_name", "return_heatmap", "threshold"}


@pytest.mark.slow
def test_bearer_token_from_the_replica_environment(service, tiny_bundle, images):
    from ray import serve

    token = "s3cret-token"
    env = {"env_vars": {TOKEN_ENV: token}}
    locked = build_app(ServeArgs(bundle=tiny_bundle), ray_actor_options={"num_cpus": 0.25, "runtime_env": env})
    serve.run(locked, name="locked", route_prefix="/locked")
    try:
        data = next(iter(images.values()))
        url = f"{service}/locked/v1/score"

        def post(headers: dict[str, str]) -> requests.Response:
            return requests.post(url, data=data, headers={"Content-Type": "image/png", **headers}, timeout=30)

        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": token}):
            response = post(headers)
            assert response.status_code == 401 and response.headers["WWW-Authenticate"] == "Bearer", headers
            assert response.json() == {"error": "missing or wrong bearer token"}
        assert requests.get(f"{service}/locked/v1/model", timeout=10).status_code == 401
        assert post({"Authorization": f"Bearer {token}"}).status_code == 200
        assert requests.get(f"{service}/locked/healthz", timeout=10).status_code == 200
        assert post({}).status_code == 401 and requests.post(f"{service}/v1/score", data=data, headers={"Content-Type": "image/png"},
                                                              timeout=30).status_code == 200  # the open app stays open
    finally:
        serve.delete("locked")
