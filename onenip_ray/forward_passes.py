"""Dynamic batching that fills batches under load: a batch is formed when the model is free.

Ray Serve's ``@serve.batch`` (2.60) cuts a batch as soon as its first item has waited
``batch_wait_timeout_s`` and only then waits for its turn (``max_concurrent_batches``): while one
slow forward pass runs, the requests arriving meanwhile become many small batches queued behind
it. Here one worker takes, each time the model is free, everything queued meanwhile (up to
``max_batch_size``); only an idle replica waits ``wait_s`` for company.
"""
from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any


class ForwardPasses:
    """Queue items from many requests; ``run(items) -> outputs`` (in order) executes one pass in a
    thread, one pass at a time. Items whose caller stopped waiting (deadline) are dropped before
    their pass; an exception in a pass is raised to that pass's callers only."""

    def __init__(self, run: Callable[[list[Any]], Sequence[Any]], max_batch_size: int, wait_s: float) -> None:
        self.run, self.max_batch_size, self.wait_s = run, max_batch_size, wait_s
        self.pending: deque[tuple[Any, asyncio.Future]] = deque()
        self.arrived = asyncio.Event()
        self.worker: asyncio.Task | None = None

    async def submit(self, item: Any) -> Any:
        """The output of ``item``'s share of a forward pass."""
        loop = asyncio.get_running_loop()
        if self.worker is None or self.worker.done():
            self.worker = loop.create_task(self._work())
        future = loop.create_future()
        self.pending.append((item, future))
        self.arrived.set()
        return await future

    def _next_batch(self) -> list[tuple[Any, asyncio.Future]]:
        batch = []
        while self.pending and len(batch) < self.max_batch_size:
            item, future = self.pending.popleft()
            if not future.done():  # cancelled: its caller is gone
                batch.append((item, future))
        if not self.pending:
            self.arrived.clear()
        return batch

    async def _work(self) -> None:
        while True:
            await self.arrived.wait()
            if len(self.pending) < self.max_batch_size and self.wait_s > 0:
                await asyncio.sleep(self.wait_s)
            batch = self._next_batch()
            if not batch:
                continue
            try:
                outputs = await asyncio.to_thread(self.run, [item for item, _ in batch])
            except Exception as exc:  # noqa: BLE001 - a failed pass fails its own requests, never the worker
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, future), output in zip(batch, outputs):
                if not future.done():
                    future.set_result(output)
