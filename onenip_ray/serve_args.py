"""The online service's typed arguments (``serve run onenip_ray.serve:app key=value …``, ``args:`` in
a Serve config, the flags of ``onenip serve``): the one source of their defaults. Kept apart from
``serve.py`` so the CLI reads them without importing Ray Serve."""
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from .data.images import DEFAULT_MAX_PIXELS

DEFAULT_MAX_BODY_BYTES = 20_000_000


class ServeArgs(BaseModel):
    """Application arguments (``serve run onenip_ray.serve:app key=value …`` or ``args:`` in a config)."""

    model_config = ConfigDict(extra="forbid")

    bundle: str = Field(description="model bundle or release root (onenip publish), local path or s3:// URI")
    endpoint: str | None = Field(None, description="S3-compatible endpoint (default: AWS_ENDPOINT_URL_S3)")
    max_batch_size: int = Field(16, ge=1, description="images per model forward pass (1 = no batching)")
    batch_wait_timeout_s: float = Field(0.01, ge=0,
                                        description="how long an idle replica waits for more requests before a "
                                                    "forward pass")
    max_queued_requests: int = Field(
        64, ge=0, description="requests a replica holds beyond the 2 × max_batch_size it works on; more get 503 + "
                              "Retry-After at once")
    request_timeout_s: float = Field(
        20.0, gt=0, description="deadline per request inside the replica: body upload (408 after it) and scoring (504)")
    max_concurrent_decodes: int = Field(2, ge=1, description="images a replica decodes at once (bounds decode memory)")
    max_body_bytes: int = Field(DEFAULT_MAX_BODY_BYTES, gt=0, description="request body limit (413 above)")
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, gt=0, description="image pixel limit (413 above)")
    api_docs: bool = Field(False, description="serve the OpenAPI schema and interactive docs at /openapi.json and "
                                              "/docs")
    bundle_poll_s: float = Field(
        30.0, ge=0, description="how often replicas read a release root's pointer for a new version (0 = never)")
    runtime: Literal["torch", "onnxruntime", "openvino"] = Field(
        "torch", description="engine: torch runs a bundle; onnxruntime / openvino an `onenip export` directory")
    threads: int | None = Field(None, ge=1, description="intra-op threads of the engine (default: the runtime's)")


class BatchingConfig(BaseModel):
    """The deployment's ``user_config``: batching can change without restarting replicas."""

    model_config = ConfigDict(extra="forbid")

    max_batch_size: int = Field(ge=1)
    batch_wait_timeout_s: float = Field(ge=0)
