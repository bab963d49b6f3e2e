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
    return _read_pointer(storage.Location(root, endpoint).join(POINTER_FILE))


def _read_pointer(pointer_file: storage.Location) -> tuple[Pointer, str]:
    """The pointer in ``pointer_file`` and its tag; InputError when the file is not a pointer."""
    data, tag = pointer_file.read_with_tag()
    try:
        return Pointer(**json.loads(data)), tag
    except (ValueError, TypeError) as e:
        raise InputError(f"{pointer_file.uri} is not a release pointer: {e}") from e


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
    releases = storage.Location(root, endpoint)
    target = releases.join(VERSIONS_DIR, version)
    if target.join(BUNDLE_FILE).exists():
        verify_bundle(target.uri, target.endpoint)  # published before: it must still be intact
        copied = False
    else:
        _copy_bundle(storage.Location(bundle_uri, endpoint), target)
        verify_bundle(target.uri, target.endpoint)
        copied = True
    pointer_file = releases.join(POINTER_FILE)
    try:
        current, tag = _read_pointer(pointer_file)
    except FileNotFoundError:
        current, tag = None, None
    pointer = Pointer(version, relative, datetime.now(timezone.utc).isoformat(timespec="seconds"),
                      current.version if current else None)
    if current is not None and current.version == version:
        return {"root": root, "version": version, "bundle": target.uri, "previous": current.previous,
                "copied": copied, "moved": False}
    try:
        pointer_file.write_if(json.dumps(asdict(pointer), indent=2).encode(), tag)
    except storage.PreconditionFailed as e:
        raise BusyError(f"another publish moved {pointer_file.uri} meanwhile; nothing changed, run again ({e})") from e
    return {"root": root, "version": version, "bundle": target.uri, "previous": pointer.previous, "copied": copied,
            "moved": True}


def _copy_bundle(source: storage.Location, target: storage.Location) -> None:
    """Copy a bundle directory to ``target`` with ``bundle.json`` last (via a local staging copy)."""
    staging = tempfile.mkdtemp(prefix="onenip-publish-")
    try:
        source.download_dir(staging)
        commit_bundle(staging, target.uri, target.endpoint)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
