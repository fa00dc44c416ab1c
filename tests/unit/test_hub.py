from __future__ import annotations

import asyncio

from gatewayd.hub import Hub, only_samples
from gatewayd.model import DataType, DeviceState, DeviceStatus, Sample


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


def test_publish_many_is_publish_for_each_in_order_with_the_same_drops():
    one, many = Hub(), Hub()
    queues = [
        (hub.subscribe("small", maxsize=10), hub.subscribe("big", 1000)) for hub in (one, many)
    ]
    events = [sample(i) for i in range(25)]
    for event in events:
        one.publish(event)
    many.publish_many(events[:5])
    many.publish_many(events[5:])
    assert one.published == many.published == 25
    for (small_one, big_one), (small_many, big_many) in [queues]:
        assert small_one.dropped == small_many.dropped == 15
        assert small_one.get_nowait() == small_many.get_nowait() == events[15:]
        assert big_one.get_nowait() == big_many.get_nowait() == events


async def test_publish_many_wakes_a_waiting_subscriber():
    hub = Hub()
    subscription = hub.subscribe("s")
    waiter = asyncio.create_task(subscription.get_batch())
    await asyncio.sleep(0)
    hub.publish_many([sample(1), sample(2)])
    assert [e.ts for e in await asyncio.wait_for(waiter, 5)] == [1.0, 2.0]


async def test_publishing_nothing_wakes_no_subscriber():
    # The pipeline publishes after every batch of frames; a batch that closes no second must not
    # wake every output for nothing.
    hub = Hub()
    subscription = hub.subscribe("s")
    waiter = asyncio.create_task(subscription.get_batch())
    await asyncio.sleep(0)
    hub.publish_many([])
    assert subscription._waiter is not None and not subscription._waiter.done()
    hub.publish_many([sample(1)])
    assert await waiter == [sample(1)]
    assert hub.published == 1


def test_only_samples_is_false_as_soon_as_one_device_status_is_in_the_batch():
    status = DeviceStatus("a", "120:1", "ant", DeviceState.LOST, 0.0, reason="silent")
    assert only_samples([])
    assert only_samples([sample(1), sample(2)])
    assert not only_samples([sample(1), status, sample(2)])
    assert not only_samples([status])
