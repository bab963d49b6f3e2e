"""Online scoring on Ray Serve: one image in, one result row (``onenip_ray.schema``) out.

``POST /v1/score`` runs the batch job's steps (``ScoringSpec.prepare`` → ``Scorer.infer`` →
``ScoringSpec.result_row``); concurrent requests share model forward passes through
``@serve.batch``. Bad client input is answered 400/401/413/415 with ``{"error": "..."}``.

    serve run onenip_ray.serve:app bundle=s3://models/onenip/current
    serve deploy deploy/serve_config.yaml
    onenip serve --bundle runs/bundle
"""
import asyncio
import base64
import datetime as dt
import hmac
import math
import os
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from importlib.metadata import version as package_version
from io import BytesIO
from typing import Any, Literal, NamedTuple

import numpy as np
import pyarrow as pa
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, create_model
from ray import serve
from ray.serve import Application
from ray.serve.metrics import Counter
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from .data.images import DEFAULT_MAX_PIXELS
from .engines import gpu_available, load_model
from .schema import RESULT_SCHEMA, SCHEMA_VERSION, utc_now
from .scoring import Prepared, Scorer, render_heatmap

TOKEN_ENV = "ONENIP_API_TOKEN"
DEFAULT_MAX_BODY_BYTES = 20_000_000
UPLOAD_NAME = "upload"  # image_uri of a raw-body upload (multipart uploads use their filename)
RAW_CONTENT_TYPES = ("image/", "application/octet-stream")
_TRUE, _FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off", ""}


class ServeArgs(BaseModel):
    """Application arguments (``serve run onenip_ray.serve:app key=value …`` or ``args:`` in a config)."""

    model_config = ConfigDict(extra="forbid")

    bundle: str = Field(description="model bundle, local path or s3:// URI")
    endpoint: str | None = Field(None, description="S3-compatible endpoint (default: AWS_ENDPOINT_URL_S3)")
    max_batch_size: int = Field(16, ge=1, description="images per model forward pass")
    batch_wait_timeout_s: float = Field(0.01, ge=0, description="how long a batch waits to fill")
    max_body_bytes: int = Field(DEFAULT_MAX_BODY_BYTES, gt=0, description="request body limit (413 above)")
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, gt=0, description="image pixel limit (413 above)")
    runtime: Literal["torch", "onnxruntime", "openvino"] = Field(
        "torch", description="engine: torch runs a bundle; onnxruntime / openvino an `onenip export` directory")
    threads: int | None = Field(None, ge=1, description="intra-op threads of the engine (default: the runtime's)")


class BatchingConfig(BaseModel):
    """The deployment's ``user_config``: batching can change without restarting replicas."""

    model_config = ConfigDict(extra="forbid")

    max_batch_size: int = Field(ge=1)
    batch_wait_timeout_s: float = Field(ge=0)


class ClientError(Exception):
    """A request the client must fix; answered with ``status`` and ``{"error": message}``."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


@dataclass(frozen=True)
class ScoreOptions:
    class_name: str | None
    return_heatmap: bool
    threshold: float | None


class ModelOutput(NamedTuple):
    """One image's share of a batched forward pass."""

    fused: np.ndarray
    score_raw: float
    prompt_index: int
    route_similarity: float
    batch_seconds: float


def _python_type(arrow_type: pa.DataType, name: str) -> Any:
    if pa.types.is_struct(arrow_type):
        return create_model(name.capitalize(), **{f.name: (_python_type(f.type, f.name), ...) for f in arrow_type})
    if pa.types.is_list(arrow_type):  # "regions" → list[Region]
        return list[_python_type(arrow_type.value_type, name.removesuffix("s"))]
    for check, python in ((pa.types.is_string, str), (pa.types.is_boolean, bool), (pa.types.is_integer, int),
                          (pa.types.is_floating, float), (pa.types.is_timestamp, dt.datetime), (pa.types.is_date, dt.date)):
        if check(arrow_type):
            return python
    raise TypeError(f"no JSON type for {arrow_type}")


# The response body, generated from RESULT_SCHEMA so HTTP and Parquet cannot drift apart.
ScoreResult = create_model("ScoreResult", **{
    f.name: (_python_type(f.type, f.name), ...) if not f.nullable else (_python_type(f.type, f.name) | None, None)
    for f in RESULT_SCHEMA
})


class ErrorBody(BaseModel):
    error: str


def json_safe(value: Any) -> Any:
    """Result-row values as JSON: dates and datetimes in ISO 8601, non-finite floats as null."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, dt.date):  # datetimes too
        return value.isoformat()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def parse_options(params: Mapping[str, str], class_names: tuple[str, ...]) -> ScoreOptions:
    """``class_name``, ``return_heatmap`` and ``threshold`` from query parameters or form fields."""
    class_name = params.get("class_name") or None
    if class_name is not None and class_name not in class_names:
        raise ClientError(400, f"unknown class_name {class_name!r}; this model knows: {', '.join(class_names)}")
    heatmap = params.get("return_heatmap", "").strip().lower()
    if heatmap not in _TRUE | _FALSE:
        raise ClientError(400, f"return_heatmap must be true or false, got {params['return_heatmap']!r}")
    threshold = None
    if params.get("threshold"):
        try:
            threshold = float(params["threshold"])
        except ValueError:
            threshold = math.nan
        if not math.isfinite(threshold):
            raise ClientError(400, f"threshold must be a finite number (raw score units), got {params['threshold']!r}")
    return ScoreOptions(class_name, heatmap in _TRUE, threshold)


def exceeds_pixel_limit(data: bytes, max_pixels: int) -> bool:
    """Whether the image header declares more than ``max_pixels`` pixels (nothing is decoded)."""
    try:
        with Image.open(BytesIO(data)) as header:
            width, height = header.size
    except Image.DecompressionBombError:
        return True
    except Exception:  # not an image at all: the caller answers 400
        return False
    return width * height > max_pixels


async def _limited_body(request: Request, limit: int) -> AsyncIterator[bytes]:
    """The request body, chunk by chunk; 413 as soon as it (or its Content-Length) exceeds ``limit``."""
    too_large = ClientError(413, f"request body is over the limit of {limit} bytes")
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise ClientError(400, f"invalid Content-Length header {declared!r}")
        if int(declared) > limit:
            raise too_large
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > limit:
            raise too_large
        yield chunk


async def read_upload(request: Request, limit: int) -> tuple[str, bytes, dict[str, str]]:
    """``(image_uri, image bytes, parameters)`` from a raw ``image/*`` body or a multipart ``file``
    field; parameters are the query's, overridden by the form's other fields."""
    params = dict(request.query_params)
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type.startswith(RAW_CONTENT_TYPES):
        return UPLOAD_NAME, b"".join([chunk async for chunk in _limited_body(request, limit)]), params
    if content_type != "multipart/form-data":
        raise ClientError(415, f"unsupported content type {content_type or '(none)'!r}; send the image as "
                               "image/* (raw body) or multipart/form-data with a 'file' field")
    parser = MultiPartParser(request.headers, _limited_body(request, limit), max_files=1, max_fields=10)
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        raise ClientError(400, f"malformed multipart body: {exc.message}") from exc
    try:
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise ClientError(400, "multipart body needs the image as a file field named 'file'")
        params.update({k: v for k, v in form.items() if isinstance(v, str)})
        return upload.filename or UPLOAD_NAME, await upload.read(), params
    finally:
        await form.close()


def load_scorer(args: ServeArgs, run_id: str) -> tuple[Scorer, dict[str, Any]]:
    """The model's ``Scorer`` (on the GPU when the process has one) and the ``/v1/model`` body."""
    device = "cuda" if gpu_available(args.runtime) else "cpu"
    model = load_model(args.bundle, args.runtime, args.endpoint)
    scorer = Scorer(model, runtime=args.runtime, device=device, threads=args.threads, max_pixels=args.max_pixels, run_id=run_id)
    model_info = {
        "model_version": model.version,
        "bundle": args.bundle,
        "classes": model.classes,
        "thresholds": model.meta["thresholds"],
        "image_size": model.config.image_size,
        "backbone": model.meta["backbone"]["name"],
        "runtime": args.runtime,
        "device": scorer.engine.device,
        "schema_version": SCHEMA_VERSION,
    }
    return scorer, model_info


api = FastAPI(
    title="OneNIP anomaly scoring",
    version=package_version("onenip-ray"),
    description="Score one image with a OneNIP model bundle. The response is one result row, the same "
                f"columns as the nightly Parquet output (schema {SCHEMA_VERSION}).",
)


@api.exception_handler(ClientError)
async def _client_error(_: Request, exc: ClientError) -> JSONResponse:
    return JSONResponse({"error": exc.message}, status_code=exc.status, headers=exc.headers)


_SCORE_PARAMETERS = {
    "class_name": ({"type": "string"}, "product class; skips retrieval (400 if the model does not know it)"),
    "return_heatmap": ({"type": "boolean", "default": False},
                       "put the heat map (PNG at network resolution, class-calibrated colours) in heatmap_uri as a data: URI"),
    "threshold": ({"type": "number"}, "decision threshold in raw score units, overriding the class's"),
}
_SCORE_OPENAPI = {
    "parameters": [{"name": name, "in": "query", "required": False, "schema": schema, "description": text}
                   for name, (schema, text) in _SCORE_PARAMETERS.items()],
    "requestBody": {"required": True, "content": {
        "image/*": {"schema": {"type": "string", "format": "binary"}},
        "multipart/form-data": {"schema": {
            "type": "object", "required": ["file"],
            "properties": {"file": {"type": "string", "format": "binary"},
                           **{name: {**schema, "description": text} for name, (schema, text) in _SCORE_PARAMETERS.items()}},
        }},
    }},
}
_ERRORS = {status: {"model": ErrorBody, "description": text} for status, text in (
    (400, "not an image, corrupt, unknown class_name or a bad parameter"), (401, "missing or wrong bearer token"),
    (413, "body or pixel count over the limit"), (415, "unsupported content type"))}


@serve.deployment(
    ray_actor_options={"num_cpus": 1},
    health_check_period_s=10,
    health_check_timeout_s=30,
    graceful_shutdown_timeout_s=20,
    max_constructor_retry_count=3,
)
@serve.ingress(api)
class OneNIPService:
    """One replica: the bundle's model on the replica's GPU if it has one, else on CPU.

    Serve pickles this class by value while the module is still importing, so (1) the module has no
    ``from __future__ import annotations`` (FastAPI could not resolve string annotations in the
    replica) and (2) torch stays out of these methods: cloudpickle also pickles every
    ``torch.<name>`` submodule whose name a method mentions, and ``torch.classes`` cannot be."""

    def __init__(self, args: ServeArgs) -> None:
        self.args = args
        replica = serve.get_replica_context().replica_id.unique_id
        self.scorer, self.model_info = load_scorer(args, run_id=f"serve-{replica}")
        self.spec = self.scorer.spec
        self.api_token = os.environ.get(TOKEN_ENV) or None
        self.requests_total = Counter("onenip_score_requests", description="POST /v1/score answers by outcome",
                                      tag_keys=("outcome",))

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Apply ``BatchingConfig`` (``user_config``) to the batch queue."""
        batching = BatchingConfig.model_validate(user_config)
        self.infer_batch.set_max_batch_size(batching.max_batch_size)
        self.infer_batch.set_batch_wait_timeout_s(batching.batch_wait_timeout_s)

    def check_health(self) -> None:
        """Raises (and Serve replaces the replica) when the engine's device is broken (CUDA context)."""
        self.scorer.engine.check()

    def _authorize(self, request: Request) -> None:
        if self.api_token is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_token.encode()):
            raise ClientError(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def infer_batch(self, items: list[tuple[np.ndarray, int]]) -> list[ModelOutput]:
        """One forward pass for the queued ``(normalised input, class index or -1)`` pairs."""
        inputs = np.stack([x for x, _ in items])
        class_index = np.array([c for _, c in items], np.int64)
        out = await asyncio.to_thread(self.scorer.infer, inputs, class_index)
        return [ModelOutput(out.fused[i], float(out.scores[i]), int(out.prompt_index[i]), float(out.similarity[i]), out.seconds)
                for i in range(len(items))]

    async def score_upload(self, image_uri: str, data: bytes, options: ScoreOptions) -> dict[str, Any]:
        """The ``status=ok`` result row for one upload; unusable images raise ``ClientError``."""
        prepared = await asyncio.to_thread(self.spec.prepare, image_uri, data, options.class_name)
        if prepared.error is not None:
            raise ClientError(413 if exceeds_pixel_limit(data, self.spec.max_pixels) else 400, prepared.error)
        out = await self.infer_batch((prepared.input, prepared.class_index))
        # regions and the heat-map PNG are CPU work: off the event loop, like prepare and infer
        return await asyncio.to_thread(self._result_row, prepared, out, options)

    def _result_row(self, prepared: Prepared, out: ModelOutput, options: ScoreOptions) -> dict[str, Any]:
        row = self.spec.result_row(
            prepared, out.fused, out.score_raw, out.prompt_index, out.route_similarity, run_id=self.scorer.run_id,
            run_date=utc_now().date(),
            upstream_ms=prepared.prepare_ms + out.batch_seconds * 1e3, threshold_override=options.threshold,
        )
        if options.return_heatmap:
            png = render_heatmap(out.fused, self.spec.prompt_calibration(out.prompt_index), options.threshold)
            row["heatmap_uri"] = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
        return row

    @api.post("/v1/score", response_model=ScoreResult, responses=_ERRORS, openapi_extra=_SCORE_OPENAPI,
              summary="Score one image (raw image/* body or multipart field 'file')")
    async def score(self, request: Request) -> JSONResponse:
        try:
            self._authorize(request)
            image_uri, data, params = await read_upload(request, self.args.max_body_bytes)
            row = await self.score_upload(image_uri, data, parse_options(params, self.spec.class_names))
        except ClientError:
            self.requests_total.inc(tags={"outcome": "client_error"})
            raise
        self.requests_total.inc(tags={"outcome": "anomalous" if row["is_anomalous"] else "ok"})
        return JSONResponse(json_safe(row))

    @api.get("/v1/model", responses={401: _ERRORS[401]}, summary="Model version, classes, thresholds, image size, backbone")
    async def model(self, request: Request) -> dict[str, Any]:
        self._authorize(request)
        return self.model_info

    @api.get("/healthz", summary="Liveness (never needs a token)")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok", "model_version": self.spec.model_version}


def build_app(args: ServeArgs, **deployment_options: Any) -> Application:
    """The bound deployment. ``max_ongoing_requests`` is 2 × ``max_batch_size`` (a replica's batch
    can never exceed it); ``deployment_options`` override this and ``@serve.deployment``'s options."""
    batching = BatchingConfig(max_batch_size=args.max_batch_size, batch_wait_timeout_s=args.batch_wait_timeout_s)
    options = {"max_ongoing_requests": 2 * args.max_batch_size, "user_config": batching.model_dump(), **deployment_options}
    return OneNIPService.options(**options).bind(args)


def app(args: dict[str, Any]) -> Application:
    """Application builder for ``serve run onenip_ray.serve:app bundle=…`` and ``import_path`` in configs."""
    return build_app(ServeArgs.model_validate(args))
