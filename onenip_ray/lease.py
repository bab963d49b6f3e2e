"""One writer per output and date: a lease object created exclusively and renewed while a run lives.

The lease is a small JSON file (run id, host, pid, start, renewal, expiry). It is created with an
exclusive create (S3: ``PutObject`` with ``If-None-Match: *``; local: created under a lock file), so of
two runs started together exactly one gets it; the other fails at once naming the holder. A
background thread renews it every third of its ``ttl`` (S3: ``If-Match`` on the holder's own
ETag), so a holder that died stops renewing and its lease expires; the next run takes an expired
lease over with a conditional replace (S3: ``If-Match`` on the expired ETag; local: the same
compare-and-swap under an exclusive lock file). Every write is ``storage.write_if``. A holder that
finds its lease taken stops before it commits (``check``).
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import os
import socket
import threading
from dataclasses import dataclass
from typing import Any

from . import storage
from .errors import BusyError

_log = logging.getLogger(__name__)


class LeaseHeld(BusyError):
    """Another live run holds the lease."""


class LeaseLost(BusyError):
    """This run's lease expired or was taken over; it must not commit."""


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def describe(holder: dict[str, Any]) -> str:
    return (f"run {holder.get('run_id')} on host {holder.get('host')} (pid {holder.get('pid')}), started "
            f"{holder.get('started_at')}, lease renewed {holder.get('renewed_at')}, expires {holder.get('expires_at')}")


@dataclass
class _Stored:
    content: dict[str, Any]
    tag: str  # ``storage.read_with_tag``'s: the S3 ETag, locally a content hash


class Lease:
    """``with Lease(location, run_id, ttl):`` holds the lease at ``location`` for the block (released at exit)."""

    def __init__(self, location: storage.Location, run_id: str, ttl: float) -> None:
        uri = location.uri if storage.is_s3(location.uri) else storage.canonical_uri(location.uri)
        self.location = location.with_uri(uri)
        self.run_id, self.ttl = run_id, ttl
        self._lost: str | None = None
        self._refused = ""  # why the last conditional write did not go through
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.started_at = _now()

    # -- storage: compare-and-swap writes (``storage.write_if``) ---------------------------------
    def _content(self) -> dict[str, Any]:
        now = _now()
        return {"run_id": self.run_id, "host": socket.gethostname(), "pid": os.getpid(),
                "started_at": self.started_at.isoformat(timespec="seconds"),
                "renewed_at": now.isoformat(timespec="milliseconds"),
                "expires_at": (now + dt.timedelta(seconds=self.ttl)).isoformat(timespec="milliseconds"),
                "ttl_seconds": self.ttl}

    def _read(self) -> _Stored | None:
        try:
            data, tag = self.location.read_with_tag()
        except FileNotFoundError:
            return None
        return _Stored(json.loads(data or b"{}"), tag)

    def _put(self, expected_tag: str | None) -> bool:
        """Write this run's content if the lease still has ``expected_tag`` (None: if there is
        none); False when another writer got there first."""
        body = json.dumps(self._content(), indent=2).encode()
        try:
            self.location.write_if(body, expected_tag)
        except storage.PreconditionFailed as exc:
            self._refused = str(exc)
            return False
        return True

    # -- protocol -------------------------------------------------------------------------------
    def acquire(self) -> None:
        """Take the lease or raise ``LeaseHeld`` naming the live holder."""
        for _ in range(3):
            if self._put(None):
                break
            held = self._read()
            if held is None:
                continue  # released between our create and our read: try again
            if held.content.get("run_id") == self.run_id:  # our create went through, its answer was lost
                break
            expires = dt.datetime.fromisoformat(held.content.get("expires_at", "1970-01-01T00:00:00+00:00"))
            if expires > _now():
                raise LeaseHeld(f"another run is writing {self.location.uri.rsplit('/', 2)[-2]} of this output: "
                                f"{describe(held.content)}")
            if self._put(held.tag):  # take the expired lease over: of several contenders one wins
                break
        else:
            raise LeaseHeld(f"could not take the lease {self.location.uri}: other runs keep changing it "
                            f"({self._refused})")
        self._thread = threading.Thread(target=self._renew_loop, name="onenip-lease", daemon=True)
        self._thread.start()

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                self.renew()
            except LeaseLost as exc:
                self._lost = str(exc)
                return
            except Exception as exc:  # noqa: BLE001 - a failed renewal is retried at the next tick; expiry decides
                _log.warning("renewing lease %s failed (retried in %.0f s): %s", self.location.uri, self.ttl / 3, exc)

    def renew(self) -> None:
        held = self._read()
        if held is None or held.content.get("run_id") != self.run_id:
            raise LeaseLost(f"lease {self.location.uri} is no longer held by run {self.run_id}"
                            + (f" (now: {describe(held.content)})" if held else ""))
        if not self._put(held.tag):
            raise LeaseLost(f"lease {self.location.uri} changed while run {self.run_id} renewed it")

    def check(self) -> None:
        """Raise ``LeaseLost`` unless this run still holds a live lease (call before committing)."""
        if self._lost:
            raise LeaseLost(self._lost)
        self.renew()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        held = self._read()
        if held is None or held.content.get("run_id") != self.run_id:
            return
        self.location.delete()

    def __enter__(self) -> "Lease":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
