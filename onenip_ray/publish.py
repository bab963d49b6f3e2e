"""Model releases without downtime: immutable versioned bundles and a pointer naming the current one.

    ROOT/versions/<version>/   one bundle per content hash (its ``version``), written once, never changed
    ROOT/CURRENT.json          {"version", "bundle", "published_at", "previous"}: the bundle to serve

``publish`` verifies a bundle (``bundle.verify_bundle``), copies it to its versioned path (kept when
that version is already there) and then moves the pointer with a conditional write
(``storage.write_if``: S3 ``If-Match`` on the pointer's ETag, ``If-None-Match: *`` for the first
release; locally a lock file and an atomic rename), so two publishers racing cannot silently
overwrite each other. A service started on ``ROOT`` (``onenip serve --bundle ROOT``) serves the
pointer's bundle and polls the pointer: a new version is loaded and verified beside the running one
and then takes over; a bad one is refused and the running model stays.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import asdict, dataclass
from datetime import datetime, timezone

from . import storage
from .bundle import commit_bundle, verify_bundle
from .errors import BusyError, InputError
from .formats import BUNDLE_FILE

POINTER_FILE = "CURRENT.json"
VERSIONS_DIR = "versions"


@dataclass(frozen=True)
class Pointer:
    version: str
    bundle: str  # relative to the release root: versions/<version>
    published_at: str
    previous: str | None

    def bundle_uri(self, root: str) -> str:
        return storage.join(root, *self.bundle.split("/"))


def is_release_root(uri: str, endpoint: str | None = None) -> bool:
    """Whether ``uri`` holds a release pointer (else it should be a bundle itself)."""
    return storage.exists(storage.join(uri, POINTER_FILE), endpoint)


def read_pointer(root: str, endpoint: str | None = None) -> tuple[Pointer, str]:
    """The current pointer of release root ``root`` and its tag for a conditional update."""
    data, tag = storage.read_with_tag(storage.join(root, POINTER_FILE), endpoint)
    try:
        return Pointer(**json.loads(data)), tag
    except (ValueError, TypeError) as e:
        raise InputError(f"{storage.join(root, POINTER_FILE)} is not a release pointer: {e}") from e


def resolve_bundle(uri: str, endpoint: str | None = None) -> tuple[str, str | None]:
    """``(bundle URI, release root or None)``: the pointer's bundle when ``uri`` is a release root."""
    if is_release_root(uri, endpoint):
        pointer, _ = read_pointer(uri, endpoint)
        return pointer.bundle_uri(uri), uri
    return uri, None


def publish(bundle_uri: str, root: str, endpoint: str | None = None) -> dict:
    """Verify ``bundle_uri``, store it at ``root/versions/<version>`` and point ``root`` at it."""
    meta = verify_bundle(bundle_uri, endpoint)
    version = meta["version"]
    relative = f"{VERSIONS_DIR}/{version}"
    target = storage.join(root, VERSIONS_DIR, version)
    if storage.exists(storage.join(target, BUNDLE_FILE), endpoint):
        verify_bundle(target, endpoint)  # published before: it must still be intact
        copied = False
    else:
        _copy_bundle(bundle_uri, target, endpoint)
        verify_bundle(target, endpoint)
        copied = True
    try:
        current, tag = read_pointer(root, endpoint)
    except FileNotFoundError:
        current, tag = None, None
    pointer = Pointer(version, relative, datetime.now(timezone.utc).isoformat(timespec="seconds"),
                      current.version if current else None)
    if current is not None and current.version == version:
        return {"root": root, "version": version, "bundle": target, "previous": current.previous, "copied": copied,
                "moved": False}
    try:
        storage.write_if(storage.join(root, POINTER_FILE), json.dumps(asdict(pointer), indent=2).encode(), tag,
                         endpoint)
    except storage.PreconditionFailed as e:
        raise BusyError(f"another publish moved {storage.join(root, POINTER_FILE)} meanwhile; nothing changed, run "
                         f"again ({e})") from e
    return {"root": root, "version": version, "bundle": target, "previous": pointer.previous, "copied": copied,
            "moved": True}


def _copy_bundle(source: str, target: str, endpoint: str | None) -> None:
    """Copy a bundle directory to ``target`` with ``bundle.json`` last (via a local staging copy)."""
    staging = tempfile.mkdtemp(prefix="onenip-publish-")
    try:
        storage.download_dir(source, staging, endpoint)
        commit_bundle(staging, target, endpoint)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
