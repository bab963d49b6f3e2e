"""Online scoring on Ray Serve: one image in, one result row (``onenip_ray.schema``) out.

``POST /v1/score`` runs the batch job's steps (``ScoringSpec.prepare`` → ``Scorer.infer`` →
``ScoringSpec.result_row``); concurrent requests share model forward passes
(``ForwardPasses``: a batch is formed when the model is free). Bad client input is answered
400/401/408/413/415 with ``{"error": "..."}``; a full replica answers 503 (``Retry-After``) and a
request past its deadline 504, both in the same shape.
Memory is bounded by configuration: a fixed number of requests per replica, a fixed number of
decodes at a time (large JPEGs decoded at reduced scale). ``bundle`` may be a release root
(``onenip publish``): replicas then follow its pointer and switch versions without downtime.

    serve run onenip_ray.serve:app bundle=s3://models/onenip
    serve deploy deploy/serve_config.yaml
    onenip serve --bundle runs/bundle
"""
import asyncio
import base64
import collections
import datetime as dt
import hmac
import logging
import math
import os
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from io import BytesIO
from typing import Any

import numpy as np
import pyarrow as pa
from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from PIL import Image
from pydantic import BaseModel, create_model
from ray import serve
from ray.serve import Application
from ray.serve.metrics import Counter
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from . import __version__
from .engines import gpu_available
from .engines import load_model as load_engine_model
from .errors import BundleError
from .forward_passes import ForwardPasses
from .predictor import Prediction
from .publish import read_pointer, resolve_bundle
from .schema import RESULT_SCHEMA, SCHEMA_VERSION, utc_now
from .scoring import Prepared, Scorer, ScoringSpec
from .serve_args import BatchingConfig, ServeArgs
from .visualization import render_heatmap

TOKEN_ENV = "ONENIP_API_TOKEN"
RETRY_AFTER_S = 1  # Retry-After of 503/504 answers
BATCH_SIZE_HEADER = "X-Batch-Size"  # images in the forward pass that scored this request
logger = logging.getLogger("ray.serve")
UPLOAD_NAME = "upload"  # image_uri of a raw-body upload (multipart uploads use their filename)
RAW_CONTENT_TYPES = ("image/", "application/octet-stream")
_TRUE, _FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off", ""}


class ErrorAnswer(Exception):
    """A request answered with ``status`` and ``{"error": message}``."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


class ClientError(ErrorAnswer):
    """A request the client must fix (4xx)."""


class Unavailable(ErrorAnswer):
    """The service cannot take or finish the request now (503 full, 504 deadline); retry later."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(status, message, headers={"Retry-After": str(RETRY_AFTER_S)})


@dataclass(frozen=True)
class ScoreOptions:
    class_name: str | None
    return_heatmap: bool
    threshold: float | None


# One image's share of a batched forward pass: the pass's Prediction and the image's index in it.
Share = tuple[Prediction, int]


@dataclass(frozen=True)
class LoadedModel:
    """One verified bundle version, ready to score; a replica swaps the whole object on an update."""

    scorer: Scorer
    info: dict[str, Any]  # the /v1/model body

    @property
    def spec(self) -> ScoringSpec:
        return self.scorer.spec

    @property
    def version(self) -> str:
        return self.scorer.spec.model_version


ScoreItem = tuple[LoadedModel, np.ndarray, int]  # (model, network input, given class or -1)


def _python_type(arrow_type: pa.DataType, name: str) -> Any:
    if pa.types.is_struct(arrow_type):
        return create_model(name.capitalize(), **{f.name: (_python_type(f.type, f.name), ...) for f in arrow_type})
    if pa.types.is_list(arrow_type):  # "regions" → list[Region]
        return list[_python_type(arrow_type.value_type, name.removesuffix("s"))]
    for check, python in ((pa.types.is_string, str), (pa.types.is_boolean, bool), (pa.types.is_integer, int),
                          (pa.types.is_floating, float), (pa.types.is_timestamp, dt.datetime),
                          (pa.types.is_date, dt.date)):
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
    except Exception:  # noqa: BLE001 - not an image at all: the caller answers 400
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


def load_model(bundle_uri: str, args: ServeArgs, run_id: str, release_root: str | None = None) -> LoadedModel:
    """The verified model's ``Scorer`` in ``args.runtime`` (on the GPU when the process has one and
    the runtime can use it) and the ``/v1/model`` body."""
    device = "cuda" if gpu_available(args.runtime) else "cpu"
    model = load_engine_model(bundle_uri, args.runtime, args.endpoint)
    scorer = Scorer(model, runtime=args.runtime, device=device, threads=args.threads, max_pixels=args.max_pixels,
                    run_id=run_id)
    info = {
        "model_version": model.version,
        "bundle": bundle_uri,
        "release_root": release_root,
        "classes": model.classes,
        "thresholds": model.meta["thresholds"],
        "target_fpr": {c: model.calibration.target_of(c) for c in model.classes},
        "image_size": model.config.image_size,
        "backbone": model.meta["backbone"]["name"],
        "runtime": args.runtime,
        "device": scorer.engine.device,
        "schema_version": SCHEMA_VERSION,
    }
    return LoadedModel(scorer, info)


def infer_grouped(items: list[ScoreItem]) -> tuple[list[Share], list[int]]:
    """Forward passes for a batch of queued items, one per model version among them (two only
    while a new version takes over); returns the outputs in order and the forward-pass sizes."""
    outputs: list[Share | None] = [None] * len(items)
    sizes = []
    for model in {id(m): m for m, _, _ in items}.values():
        chosen = [i for i, (m, _, _) in enumerate(items) if m is model]
        out = model.scorer.infer(np.stack([items[i][1] for i in chosen]),
                                 np.array([items[i][2] for i in chosen], np.int64))
        for j, i in enumerate(chosen):
            outputs[i] = (out, j)
        sizes.append(len(chosen))
    return outputs, sizes  # type: ignore[return-value]


async def within_deadline(read: Callable[[], Awaitable[Any]], score: Callable[[Any], Awaitable[Any]],
                          seconds: float) -> Any:
    """``score(await read())`` within ``seconds``: past it, 408 while the body is still arriving
    (a slow upload cannot hold a slot for long), else 504."""
    stage = "upload"

    async def run() -> Any:
        nonlocal stage
        upload = await read()
        stage = "scoring"
        return await score(upload)

    try:
        return await asyncio.wait_for(run(), seconds)
    except asyncio.TimeoutError:
        if stage == "upload":
            raise ClientError(408, f"request body not received within the {seconds:g} s deadline") from None
        raise Unavailable(504, f"scoring did not finish within the {seconds:g} s deadline (replica overloaded); retry "
                               "later") from None


def memory_usage() -> dict[str, int | None]:
    """This process's resident set size now and at its peak, in bytes (Linux ``/proc``; None elsewhere)."""
    try:
        with open("/proc/self/status") as status:
            fields = dict(line.split(":", 1) for line in status if ":" in line)
        return {"rss_bytes": int(fields["VmRSS"].split()[0]) * 1024,
                "peak_rss_bytes": int(fields["VmHWM"].split()[0]) * 1024}
    except (OSError, KeyError, ValueError):
        return {"rss_bytes": None, "peak_rss_bytes": None}


api = FastAPI(
    docs_url=None, redoc_url=None, openapi_url=None,  # served by OneNIPService only with api_docs=True
    title="OneNIP anomaly scoring",
    version=__version__,
    description="Score one image with a OneNIP model bundle. The response is one result row, the same "
                f"columns as the nightly Parquet output (schema {SCHEMA_VERSION}).",
)


@api.exception_handler(ErrorAnswer)
async def _error_answer(_: Request, exc: ErrorAnswer) -> JSONResponse:
    return JSONResponse({"error": exc.message}, status_code=exc.status, headers=exc.headers)


_SCORE_PARAMETERS = {
    "class_name": ({"type": "string"}, "product class; skips retrieval (400 if the model does not know it)"),
    "return_heatmap": ({"type": "boolean", "default": False},
                       "put the heat map (PNG at network resolution, class-calibrated colours) in heatmap_uri "
                       "as a data: URI"),
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
                           **{name: {**schema, "description": text} for name,
                              (schema, text) in _SCORE_PARAMETERS.items()}},
        }},
    }},
}
_ERRORS = {status: {"model": ErrorBody, "description": text} for status, text in (
    (400, "not an image, corrupt, unknown class_name or a bad parameter"), (401, "missing or wrong bearer token"),
    (408, "request body not received within request_timeout_s"), (413, "body or pixel count over the limit"),
    (415, "unsupported content type"), (503, "replica full (max_queued_requests); retry after Retry-After seconds"),
    (504, "scoring did not finish within request_timeout_s; retry later"))}


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
        self.run_id = f"serve-{serve.get_replica_context().replica_id.unique_id}"
        bundle_uri, self.release_root = resolve_bundle(args.bundle, args.endpoint)
        self.model = load_model(bundle_uri, args, self.run_id, self.release_root)
        self.api_token = os.environ.get(TOKEN_ENV, "").strip() or None
        self.decode_pool = ThreadPoolExecutor(args.max_concurrent_decodes, thread_name_prefix="onenip-decode")
        self.max_batch_size = args.max_batch_size
        self.in_progress = 0  # admitted /v1/score requests (event-loop only: no lock)
        self.forward_passes: collections.Counter[int] = collections.Counter()  # forward-pass size → count
        self.passes = ForwardPasses(self._forward, args.max_batch_size, args.batch_wait_timeout_s)
        self.update_error: str | None = None
        self.stopping = threading.Event()
        self.requests_total = Counter("onenip_score_requests", description="POST /v1/score answers by outcome",
                                      tag_keys=("outcome",))
        if self.release_root is not None and args.bundle_poll_s > 0:
            threading.Thread(target=self._follow_releases, name="onenip-releases", daemon=True).start()

    def __del__(self) -> None:
        self.stopping.set()
        self.decode_pool.shutdown(wait=False, cancel_futures=True)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Apply ``BatchingConfig`` (``user_config``) to the forward passes."""
        batching = BatchingConfig.model_validate(user_config)
        self.max_batch_size = self.passes.max_batch_size = batching.max_batch_size
        self.passes.wait_s = batching.batch_wait_timeout_s

    def check_health(self) -> None:
        """Raises (and Serve replaces the replica) when the engine's device is broken (CUDA context)."""
        self.model.scorer.engine.check()

    def _follow_releases(self) -> None:
        """Poll the release pointer; load and verify a new version beside the running one, then
        swap it in (requests already admitted finish on the model they started with)."""
        refused = None
        while not self.stopping.wait(self.args.bundle_poll_s):
            try:
                pointer, _ = read_pointer(self.release_root, self.args.endpoint)
            except Exception as exc:  # noqa: BLE001 - an unreadable pointer is retried at the next poll; the running model stays
                self._update_failed(f"cannot read the release pointer: {type(exc).__name__}: {exc}")
                continue
            if pointer.version == self.model.version:
                self.update_error = None  # e.g. rolled back after a refused release
                continue
            if pointer.version == refused:
                continue
            try:
                model = load_model(pointer.bundle_uri(self.release_root), self.args, self.run_id, self.release_root)
            except Exception as exc:  # noqa: BLE001 - a bad release must never take the running model down
                if isinstance(exc, BundleError):  # another format, mismatched files: not retried; OSError: next poll
                    refused = pointer.version
                self._update_failed(f"release {pointer.version} refused: {type(exc).__name__}: {exc}")
                continue
            previous, self.model, self.update_error = self.model.version, model, None
            logger.info(f"now serving model version {model.version} (was {previous})")

    def _update_failed(self, message: str) -> None:
        self.update_error = f"{message}; still serving {self.model.version}"
        logger.error(self.update_error)

    def _authorize(self, request: Request) -> None:
        if self.api_token is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_token.encode()):
            raise ClientError(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    def capacity(self) -> int:
        """Requests a replica admits: the 2 × max_batch_size it works on plus max_queued_requests."""
        return 2 * self.max_batch_size + self.args.max_queued_requests

    def _forward(self, items: list[ScoreItem]) -> list[Share]:
        """Forward passes for a batch of ``(model, network input, given class or -1)`` items (a thread)."""
        outputs, sizes = infer_grouped(items)
        self.forward_passes.update(sizes)
        return outputs

    async def score_upload(self, model: LoadedModel, image_uri: str, data: bytes,
                           options: ScoreOptions) -> tuple[dict[str, Any], int]:
        """The ``status=ok`` result row for one upload and its forward-pass size; unusable images
        raise ``ClientError``."""
        loop = asyncio.get_running_loop()
        prepared = await loop.run_in_executor(self.decode_pool, model.spec.prepare, image_uri, data, options.class_name)
        if prepared.error is not None:
            raise ClientError(413 if exceeds_pixel_limit(data, model.spec.max_pixels) else 400, prepared.error)
        share = await self.passes.submit((model, prepared.input, prepared.given_class))
        # regions and the heat-map PNG are CPU work: off the event loop, like prepare and infer
        return await asyncio.to_thread(self._result_row, model, prepared, share, options), len(share[0].scores)

    def _result_row(self, model: LoadedModel, prepared: Prepared, share: Share,
                    options: ScoreOptions) -> dict[str, Any]:
        spec = model.spec
        out, j = share
        prompt_index = int(out.prompt_index[j])
        row = spec.result_row(
            prepared, out.fused[j], float(out.scores[j]), prompt_index, float(out.similarity[j]), run_id=self.run_id,
            run_date=utc_now().date(),
            upstream_ms=prepared.prepare_ms + out.seconds * 1e3, threshold_override=options.threshold,
        )
        if options.return_heatmap:
            png = render_heatmap(out.fused[j], spec.prompt_calibration(prompt_index), options.threshold)
            row["heatmap_uri"] = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
        return row

    @api.post("/v1/score", response_model=ScoreResult, responses=_ERRORS, openapi_extra=_SCORE_OPENAPI,
              summary="Score one image (raw image/* body or multipart field 'file')")
    async def score(self, request: Request) -> JSONResponse:
        model = self.model  # one version for the whole request, even if an update lands meanwhile
        try:
            self._authorize(request)
            if self.in_progress >= self.capacity():
                raise Unavailable(503, f"replica full: {self.in_progress} requests in progress or queued "
                                       f"(max_queued_requests={self.args.max_queued_requests}); retry after "
                                       f"{RETRY_AFTER_S} s")
            self.in_progress += 1
            try:
                row, batch_size = await within_deadline(
                    lambda: read_upload(request, self.args.max_body_bytes),
                    lambda upload: self.score_upload(model, upload[0], upload[1],
                                                     parse_options(upload[2], model.spec.class_names)),
                    self.args.request_timeout_s)
            finally:
                self.in_progress -= 1
        except ErrorAnswer as exc:
            outcome = "client_error" if isinstance(exc, ClientError) else f"http_{exc.status}"
            self.requests_total.inc(tags={"outcome": outcome})
            raise
        self.requests_total.inc(tags={"outcome": "anomalous" if row["is_anomalous"] else "ok"})
        return JSONResponse(json_safe(row), headers={BATCH_SIZE_HEADER: str(batch_size)})

    @api.get("/v1/model", responses={401: _ERRORS[401]},
             summary="Model version, classes, thresholds, image size, backbone")
    async def model_info(self, request: Request) -> dict[str, Any]:
        self._authorize(request)
        return self.model.info

    @api.get("/v1/stats", responses={401: _ERRORS[401]},
             summary="This replica: load, forward-pass sizes, memory, model updates")
    async def stats(self, request: Request) -> dict[str, Any]:
        self._authorize(request)
        return {
            "replica": self.run_id, "pid": os.getpid(), "model_version": self.model.version,
            "update_error": self.update_error, "in_progress": self.in_progress, "capacity": self.capacity(),
            "max_concurrent_decodes": self.args.max_concurrent_decodes,
            "forward_passes": {str(size): n for size, n in sorted(self.forward_passes.items())}, **memory_usage(),
        }

    @api.get("/healthz", summary="Liveness (never needs a token)")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok", "model_version": self.model.version}

    @api.get("/openapi.json", include_in_schema=False)
    async def openapi_schema(self, request: Request) -> JSONResponse:
        self._require_docs()
        return JSONResponse(request.app.openapi())

    @api.get("/docs", include_in_schema=False)
    async def docs(self, request: Request) -> HTMLResponse:
        self._require_docs()
        root = request.scope.get("root_path", "").rstrip("/")
        return get_swagger_ui_html(openapi_url=f"{root}/openapi.json", title=f"{request.app.title} - docs")

    def _require_docs(self) -> None:
        if not self.args.api_docs:
            raise ClientError(404, "API docs are off (start with --api-docs / api_docs: true)")


def build_app(args: ServeArgs, **deployment_options: Any) -> Application:
    """The bound deployment. Serve hands a replica up to ``max_ongoing_requests`` = 2 × its
    capacity (2 × ``max_batch_size`` + ``max_queued_requests``), so requests over capacity reach
    it and get a JSON 503 at once. Serve's own queue (requests not yet assigned to a replica;
    plain-text 503 beyond it) is a backstop of one capacity: smaller, it would also reject bursts
    of simultaneous arrivals that the replicas have room for. ``deployment_options`` override
    these and ``@serve.deployment``'s options."""
    batching = BatchingConfig(max_batch_size=args.max_batch_size, batch_wait_timeout_s=args.batch_wait_timeout_s)
    capacity = 2 * args.max_batch_size + args.max_queued_requests
    options = {"max_ongoing_requests": 2 * capacity, "max_queued_requests": capacity,
               "backpressure_config": {"retry_after_s": RETRY_AFTER_S}, "user_config": batching.model_dump(),
               **deployment_options}
    return OneNIPService.options(**options).bind(args)


def app(args: dict[str, Any]) -> Application:
    """Application builder for ``serve run onenip_ray.serve:app bundle=…`` and ``import_path`` in configs."""
    return build_app(ServeArgs.model_validate(args))
