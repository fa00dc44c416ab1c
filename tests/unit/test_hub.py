from __future__ import annotations

import asyncio

from gatewayd.hub import Hub
from gatewayd.model import DataType, Sample


def sample(i: int) -> Sample:
    return Sample("a", DataType.HEART_RATE, float(i), val=60.0 + i % 50)


def test_a_slow_subscriber_loses_its_oldest_and_counts_without_touching_others():
    hub = Hub()
    slow = hub.subscribe("slow", maxsize=10)
    fast = hub.subscribe("fast", maxsize=1000)
    for i in range(100):
        hub.publish(sample(i))
    assert slow.dropped == 90 and fast.dropped == 0
    assert [e.ts for e in slow.get_nowait()] == [float(i) for i in range(90, 100)]
    assert len(fast.get_nowait()) == 100


async def test_get_batch_wakes_on_publish():
    hub = Hub()
    subscription = hub.subscribe("s")
    waiter = asyncio.create_task(subscription.get_batch())
    await asyncio.sleep(0)
    assert not waiter.done()
    hub.publish(sample(1))
    assert [e.ts for e in await asyncio.wait_for(waiter, 5)] == [1.0]
