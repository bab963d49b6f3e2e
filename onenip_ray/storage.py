"""One small IO layer over ``pyarrow.fs`` so local paths, ``file://`` and ``s3://`` URIs behave alike.

Every function takes a URI and an optional S3 ``endpoint``; without one, S3 uses
``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` (e.g. a MinIO or moto server), else AWS itself.
A ``Location`` holds the two together, with these functions as its methods.
Credentials come from the usual AWS environment variables / config chain.

Transient failures (throttling such as S3 ``SlowDown``, 5xx answers, reset or timed-out
connections) are retried with exponential backoff and full jitter: inside the S3 client
(``RETRY_ATTEMPTS`` attempts) and again around whole reads (``retry``); a missing object or a
refused one is never retried.
"""
from __future__ import annotations

import hashlib
import json
import os
import posixpath
import random
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import TypeVar
from urllib.parse import urlparse

import pyarrow.fs as pafs

from .formats import S3_SCHEME

FILE_SCHEME = "file://"
_COPY_CHUNK = 8 * 1024 * 1024
RETRY_ATTEMPTS = 8  # per S3 request (AWS SDK standard strategy) and per ``retry`` call
RETRY_BASE_SECONDS, RETRY_MAX_SECONDS = 0.1, 5.0
# Substrings of transient errors as the AWS SDKs (C++ inside pyarrow, botocore) and sockets word them.
_TRANSIENT_MARKERS = (
    "SlowDown", "Throttl", "RequestTimeout", "ServiceUnavailable", "InternalError", "INTERNAL_FAILURE",
    "NETWORK_CONNECTION",
    "SERVICE_UNAVAILABLE", "SLOW_DOWN", "HTTP status 5", "Connection reset", "Connection was closed",
    "Connection aborted", "connection closed", "Broken pipe", "timed out", "Timeout", "Could not connect", "curlCode",
)
T = TypeVar("T")


def is_s3(uri: str) -> bool:
    return uri.startswith(S3_SCHEME)


def canonical_uri(uri: str) -> str:
    """``s3://bucket/key`` without a trailing slash, or an absolute local path (``file://`` stripped)."""
    if is_s3(uri):
        return S3_SCHEME + uri[len(S3_SCHEME):].rstrip("/")
    if uri.startswith(FILE_SCHEME):
        uri = urlparse(uri).path
    return os.path.abspath(os.path.expanduser(uri))


@lru_cache(maxsize=None)
def _local_filesystem() -> pafs.LocalFileSystem:
    return pafs.LocalFileSystem()


@lru_cache(maxsize=None)
def _s3_filesystem(endpoint: str | None, region: str) -> pafs.S3FileSystem:
    if endpoint is None:
        return pafs.S3FileSystem(region=region, retry_strategy=pafs.AwsStandardS3RetryStrategy(RETRY_ATTEMPTS))
    parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
    return pafs.S3FileSystem(endpoint_override=parsed.netloc, scheme=parsed.scheme, region=region,
                             retry_strategy=pafs.AwsStandardS3RetryStrategy(RETRY_ATTEMPTS))


def default_endpoint(endpoint: str | None = None) -> str | None:
    """``endpoint``, else ``AWS_ENDPOINT_URL_S3``, else ``AWS_ENDPOINT_URL`` (None = AWS itself)."""
    return endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def s3_client(endpoint: str | None = None):
    """A boto3 S3 client (standard retries, ``RETRY_ATTEMPTS`` attempts) for what pyarrow cannot
    do: conditional writes (``IfNoneMatch`` / ``IfMatch``) and paged listings."""
    return _s3_client(default_endpoint(endpoint))


@lru_cache(maxsize=None)
def _s3_client(endpoint: str | None):
    import boto3
    from botocore.config import Config

    config = Config(retries={"mode": "standard", "max_attempts": RETRY_ATTEMPTS})
    return boto3.client("s3", endpoint_url=endpoint, config=config)


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/key`` → ``(bucket, key)``."""
    bucket, _, key = canonical_uri(uri)[len(S3_SCHEME):].partition("/")
    return bucket, key


def is_transient(exc: BaseException) -> bool:
    """Whether retrying may help: throttling, 5xx, reset / refused / timed-out connections."""
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    text = f"{type(exc).__name__}: {exc}"
    return any(marker in text for marker in _TRANSIENT_MARKERS)


def retry(fn: Callable[[], T], attempts: int = RETRY_ATTEMPTS) -> T:
    """``fn()``, retried on transient errors with exponential backoff and full jitter; the last
    error (or any permanent one) is raised."""
    for attempt in range(attempts):
        try:
            return fn()
        except Exception as exc:
            if attempt == attempts - 1 or not is_transient(exc):
                raise
            time.sleep(random.uniform(0.0, min(RETRY_MAX_SECONDS, RETRY_BASE_SECONDS * 2 ** attempt)))
    raise AssertionError("unreachable")


def filesystem_for(uri: str, endpoint: str | None = None) -> tuple[pafs.FileSystem, str]:
    """The (cached) filesystem for ``uri`` and the path inside it: ``bucket/key`` or an absolute path."""
    if is_s3(uri):
        endpoint = default_endpoint(endpoint)
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        return _s3_filesystem(endpoint, region), canonical_uri(uri)[len(S3_SCHEME):]
    return _local_filesystem(), canonical_uri(uri)


def _file_type(uri: str, endpoint: str | None) -> pafs.FileType:
    fs, path = filesystem_for(uri, endpoint)
    return fs.get_file_info(path).type


def exists(uri: str, endpoint: str | None = None) -> bool:
    """Whether a file or directory (for S3: an object or a non-empty prefix) is at ``uri``."""
    return _file_type(uri, endpoint) != pafs.FileType.NotFound


def is_dir(uri: str, endpoint: str | None = None) -> bool:
    """Whether ``uri`` is a directory (for S3: a bucket or a prefix holding objects)."""
    return _file_type(uri, endpoint) == pafs.FileType.Directory


def _require_file(uri: str, endpoint: str | None) -> None:
    file_type = _file_type(uri, endpoint)
    if file_type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{uri}: no such file")
    if file_type == pafs.FileType.Directory:
        raise IsADirectoryError(f"{uri}: is a directory, expected a file")


def _require_dir(uri: str, endpoint: str | None) -> None:
    file_type = _file_type(uri, endpoint)
    if file_type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{uri}: no such directory")
    if file_type != pafs.FileType.Directory:
        raise NotADirectoryError(f"{uri}: is a file, expected a directory")


def read_bytes(uri: str, endpoint: str | None = None) -> bytes:
    """The whole content of the file at ``uri`` (transient failures retried); FileNotFoundError
    naming ``uri`` when it is missing."""
    fs, path = filesystem_for(uri, endpoint)

    def read() -> bytes:
        try:
            with fs.open_input_stream(path) as stream:
                return stream.read()
        except OSError as exc:
            if not is_transient(exc):
                _require_file(uri, endpoint)
            raise

    return retry(read)


def write_bytes(uri: str, data: bytes, endpoint: str | None = None) -> None:
    """Write ``data`` to ``uri``, replacing it; local parent directories are created."""
    fs, path = filesystem_for(uri, endpoint)
    if not is_s3(uri):
        fs.create_dir(os.path.dirname(path), recursive=True)
    with fs.open_output_stream(path) as stream:
        stream.write(data)


def is_precondition_failure(error: Exception) -> bool:
    """Whether a botocore ``ClientError`` is S3 refusing a conditional write (412 / 409)."""
    response = getattr(error, "response", {})
    code = response.get("Error", {}).get("Code")
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412)


class PreconditionFailed(RuntimeError):
    """A conditional write found the object changed (or created) since it was read."""


def read_with_tag(uri: str, endpoint: str | None = None) -> tuple[bytes, str]:
    """``(content, tag)`` of a small file for ``write_if``: the S3 ETag, locally a content hash."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        client = s3_client(endpoint)
        try:
            answer = client.get_object(Bucket=bucket, Key=key)
        except client.exceptions.NoSuchKey as e:
            raise FileNotFoundError(f"{uri}: no such file") from e
        return answer["Body"].read(), answer["ETag"]
    data = read_bytes(uri)
    return data, hashlib.sha256(data).hexdigest()


def write_if(uri: str, data: bytes, expected_tag: str | None, endpoint: str | None = None) -> None:
    """Compare-and-swap: write ``data`` to ``uri`` only if it still has ``expected_tag`` (from
    ``read_with_tag``), or, with ``expected_tag=None``, only if it does not exist; else raise
    ``PreconditionFailed``. S3: ``If-Match`` / ``If-None-Match: *`` (conditional PUT). Local: an
    exclusive ``<file>.lock`` while the tag is compared, then write-to-temporary and atomic rename."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        condition = {"IfNoneMatch": "*"} if expected_tag is None else {"IfMatch": expected_tag}
        client = s3_client(endpoint)
        try:
            client.put_object(Bucket=bucket, Key=key, Body=data, **condition)
        except client.exceptions.ClientError as e:
            if is_precondition_failure(e):
                raise PreconditionFailed(f"{uri} changed since it was read ({e.response['Error'].get('Code')})") from e
            raise
        return
    path = canonical_uri(uri)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    lock = f"{path}.lock"
    try:
        os.close(os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError as e:
        raise PreconditionFailed(
            f"{uri} is being written by another process ({lock} exists; remove it if none is)") from e
    try:
        current = hashlib.sha256(read_bytes(path)).hexdigest() if os.path.exists(path) else None
        if current != expected_tag:
            changed = "already exists" if expected_tag is None else "changed since it was read"
            raise PreconditionFailed(f"{uri} {changed}")
        staging = f"{path}.tmp-{uuid.uuid4().hex}"
        with open(staging, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(staging, path)
    finally:
        os.remove(lock)


def delete(uri: str, endpoint: str | None = None) -> None:
    """Remove the file at ``uri`` (transient failures retried); a missing one is not an error."""
    fs, path = filesystem_for(uri, endpoint)

    def remove() -> None:
        try:
            fs.delete_file(path)
        except FileNotFoundError:
            pass

    retry(remove)


def join(uri: str, *parts: str) -> str:
    """``uri`` extended by ``parts`` with ``/`` (local paths use ``os.path.join``)."""
    if is_s3(uri) or uri.startswith(FILE_SCHEME):
        return posixpath.join(uri.rstrip("/"), *(part.strip("/") for part in parts))
    return os.path.join(uri, *parts)


def list_files(
    uri: str,
    extensions: tuple[str, ...] | None = None,
    endpoint: str | None = None,
    relative: bool = False,
) -> list[str]:
    """All files under directory ``uri``, recursively, sorted.

    Returns ``s3://`` URIs for S3 and absolute paths for local directories, or with
    ``relative=True`` paths relative to ``uri`` with ``/`` separators. ``extensions``
    (e.g. ``(".png", ".jpg")``) keeps only names ending in one of them, case-insensitively.
    """
    _require_dir(uri, endpoint)
    fs, base = filesystem_for(uri, endpoint)
    suffixes = tuple(ext.lower() for ext in extensions) if extensions is not None else None
    found = []
    for info in fs.get_file_info(pafs.FileSelector(base, recursive=True)):
        if info.type != pafs.FileType.File or (suffixes is not None and not info.path.lower().endswith(suffixes)):
            continue
        if relative:
            found.append(posixpath.relpath(info.path, base) if is_s3(uri) else os.path.relpath(info.path, base))
        else:
            found.append(S3_SCHEME + info.path if is_s3(uri) else info.path)
    return sorted(found)


def iter_files(uri: str, extensions: tuple[str, ...] | None = None, endpoint: str | None = None) -> Iterator[str]:
    """Like ``list_files`` (S3 URIs or absolute paths) but streamed: one directory (local) or one
    listing page of 1000 keys (S3) at a time, so 10^7 inputs never sit in memory together.
    Local order is sorted within each directory; S3 order is key order."""
    _require_dir(uri, endpoint)
    suffixes = tuple(ext.lower() for ext in extensions) if extensions is not None else None

    def wanted(name: str) -> bool:
        return suffixes is None or name.lower().endswith(suffixes)

    if is_s3(uri):
        bucket, prefix = split_s3(uri)
        paginator = s3_client(endpoint).get_paginator("list_objects_v2")
        pages = paginator.paginate(Bucket=bucket, Prefix=f"{prefix}/" if prefix else "")
        for page in pages:
            for item in page.get("Contents", []):
                if not item["Key"].endswith("/") and wanted(item["Key"]):
                    yield f"{S3_SCHEME}{bucket}/{item['Key']}"
        return
    for folder, dirs, names in os.walk(canonical_uri(uri)):
        dirs.sort()
        for name in sorted(names):
            if wanted(name):
                yield os.path.join(folder, name)


def list_dirs(uri: str, endpoint: str | None = None) -> list[str]:
    """Names of the immediate subdirectories of ``uri`` (for S3: common prefixes), sorted."""
    _require_dir(uri, endpoint)
    fs, base = filesystem_for(uri, endpoint)
    infos = fs.get_file_info(pafs.FileSelector(base, recursive=False))
    return sorted(posixpath.basename(info.path) for info in infos if info.type == pafs.FileType.Directory)


def _local_files(local_dir: str) -> list[str]:
    """Files under ``local_dir`` relative to it, ``/``-separated, sorted."""
    if not os.path.isdir(local_dir):
        raise FileNotFoundError(f"{local_dir}: no such directory")
    return sorted(
        os.path.relpath(os.path.join(folder, name), local_dir).replace(os.sep, "/")
        for folder, _, names in os.walk(local_dir)
        for name in names
    )


def _upload(fs: pafs.FileSystem, local_path: str, path: str) -> None:
    with open(local_path, "rb") as source, fs.open_output_stream(path) as target:
        shutil.copyfileobj(source, target, _COPY_CHUNK)


def commit_dir(local_dir: str, dest_uri: str, endpoint: str | None = None, *, marker: str | None) -> None:
    """Publish the finished directory ``local_dir`` at ``dest_uri`` so readers never see it half-written.

    Local destinations: the tree is copied to ``<dest>.tmp-<uuid>`` beside ``dest`` and renamed
    into place; an existing ``dest`` is first renamed aside and deleted afterwards, so ``dest`` is
    either the old or the new tree (or, for an instant, absent), never a mix.

    S3 has no rename, so the ``marker`` file (relative path inside ``local_dir``) is the commit
    point: an existing marker at ``dest`` is deleted first, then every other file is uploaded,
    objects left over from an older version are deleted, and the marker is uploaded last.
    Readers must wait for the marker before reading. ``marker=None`` skips the ordering.
    """
    files = _local_files(local_dir)
    if marker is not None and marker not in files:
        raise ValueError(f"{local_dir} has no marker file {marker!r} to commit last")
    fs, dest = filesystem_for(dest_uri, endpoint)
    if is_s3(dest_uri):
        old_files = list_files(dest_uri, endpoint=endpoint, relative=True) if is_dir(dest_uri, endpoint) else []
        if marker in old_files:
            fs.delete_file(posixpath.join(dest, marker))
        for name in files:
            if name != marker:
                _upload(fs, os.path.join(local_dir, name), posixpath.join(dest, name))
        for name in sorted(set(old_files) - set(files)):
            fs.delete_file(posixpath.join(dest, name))
        if marker is not None:
            _upload(fs, os.path.join(local_dir, marker), posixpath.join(dest, marker))
        return
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    staging = f"{dest}.tmp-{uuid.uuid4().hex}"
    shutil.copytree(local_dir, staging)
    if not os.path.exists(dest):
        os.replace(staging, dest)
        return
    retired = f"{dest}.old-{uuid.uuid4().hex}"
    os.replace(dest, retired)
    os.replace(staging, dest)
    shutil.rmtree(retired)


def download_dir(uri: str, local_dir: str, endpoint: str | None = None) -> None:
    """Copy every file under ``uri`` into ``local_dir`` (created), keeping relative paths."""
    fs, base = filesystem_for(uri, endpoint)
    join_remote = posixpath.join if is_s3(uri) else os.path.join
    for name in list_files(uri, endpoint=endpoint, relative=True):
        target = os.path.join(local_dir, *name.split("/"))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with fs.open_input_stream(join_remote(base, name)) as source, open(target, "wb") as sink:
            shutil.copyfileobj(source, sink, _COPY_CHUNK)


@dataclass(frozen=True)
class Location:
    """A URI and the S3 endpoint that reaches it (None: the environment's, see ``default_endpoint``)."""

    uri: str
    endpoint: str | None = None

    def join(self, *parts: str) -> Location:
        return replace(self, uri=join(self.uri, *parts))

    def with_uri(self, uri: str) -> Location:
        """``uri``, reached through the same endpoint."""
        return replace(self, uri=uri)

    def filesystem(self) -> tuple[pafs.FileSystem, str]:
        return filesystem_for(self.uri, self.endpoint)

    @property
    def path(self) -> str:
        """The path inside ``filesystem()``'s filesystem: ``bucket/key`` or an absolute path."""
        return self.filesystem()[1]

    def exists(self) -> bool:
        return exists(self.uri, self.endpoint)

    def is_dir(self) -> bool:
        return is_dir(self.uri, self.endpoint)

    def list_dirs(self) -> list[str]:
        return list_dirs(self.uri, self.endpoint)

    def read_bytes(self) -> bytes:
        return read_bytes(self.uri, self.endpoint)

    def write_bytes(self, data: bytes) -> None:
        write_bytes(self.uri, data, self.endpoint)

    def read_with_tag(self) -> tuple[bytes, str]:
        return read_with_tag(self.uri, self.endpoint)

    def write_if(self, data: bytes, expected_tag: str | None) -> None:
        write_if(self.uri, data, expected_tag, self.endpoint)

    def delete(self) -> None:
        delete(self.uri, self.endpoint)

    def download_dir(self, local_dir: str) -> None:
        download_dir(self.uri, local_dir, self.endpoint)


def ray_env_vars(endpoint: str | None) -> dict[str, str]:
    """``runtime_env`` variables that give Ray actors (Train workers, Data actors) the driver's S3 settings.

    In a submitted job (``ray job submit``, KubeRay RayJob) the variables the job's runtime_env
    already sets are left out: they reach every worker anyway, and ``ray.init`` refuses a driver
    runtime_env that repeats one of the job's env var keys ("Failed to merge the Job's runtime env").
    """
    keys = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
            "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_SESSION_TOKEN")
    env = {k: os.environ[k] for k in keys if k in os.environ}
    if endpoint:
        env["AWS_ENDPOINT_URL_S3"] = endpoint
    job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")  # set by Ray for job drivers
    from_job = (job.get("runtime_env") or {}).get("env_vars") or {}
    return {k: v for k, v in env.items() if k not in from_job}
