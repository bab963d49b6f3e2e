"""ForwardPasses: batches formed when the model is free (no Ray needed)."""
from __future__ import annotations

import asyncio
import threading

import pytest

from onenip_ray.forward_passes import ForwardPasses


class GatedModel:
    """Doubles numbers; each pass waits until the test opens the gate, and records its size."""

    def __init__(self) -> None:
        self.sizes: list[int] = []
        self.started, self.gate = threading.Event(), threading.Event()

    def __call__(self, items: list[int]) -> list[int]:
        self.sizes.append(len(items))
        self.started.set()
        self.gate.wait(30)
        if -1 in items:
            raise ValueError("bad item")
        return [2 * x for x in items]


def test_items_queued_during_a_pass_form_the_next_full_batch():
    async def scenario():
        model = GatedModel()
        passes = ForwardPasses(model, max_batch_size=8, wait_s=0.01)
        first = asyncio.create_task(passes.submit(0))
        await asyncio.to_thread(model.started.wait, 30)  # the first pass is running, alone
        rest = [asyncio.create_task(passes.submit(i)) for i in range(1, 11)]
        await asyncio.sleep(0.05)  # all ten queued while the model is busy
        model.gate.set()
        return model.sizes, await first, await asyncio.gather(*rest)

    sizes, first, rest = asyncio.run(scenario())
    assert sizes == [1, 8, 2]  # not ten batches of one: the next pass takes all it may
    assert first == 0 and rest == [2 * i for i in range(1, 11)]


def test_failures_reach_only_their_pass_and_cancelled_items_are_skipped():
    async def scenario():
        model = GatedModel()
        passes = ForwardPasses(model, max_batch_size=4, wait_s=0)
        bad = asyncio.create_task(passes.submit(-1))
        await asyncio.to_thread(model.started.wait, 30)
        gone = asyncio.create_task(passes.submit(5))
        kept = asyncio.create_task(passes.submit(6))
        await asyncio.sleep(0.01)
        gone.cancel()  # its caller's deadline passed: it takes no place in a pass
        model.gate.set()
        with pytest.raises(ValueError, match="bad item"):
            await bad
        return model.sizes, await kept

    sizes, kept = asyncio.run(scenario())
    assert sizes == [1, 1] and kept == 12
