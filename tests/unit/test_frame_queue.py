"""FrameQueue.put_quiet and put_from_thread: frames that do not wake the pipeline still reach
their own second."""

from __future__ import annotations

import asyncio
import math
import threading

import pytest

from gatewayd.config import PipelineConfig
from gatewayd.hub import Hub, Subscription
from gatewayd.model import DataType, Frame, Sample
from gatewayd.pipeline import GATHER_FRAMES, FrameQueue, Pipeline
from gatewayd.roster import Roster
from tests.helpers import SteadyClock

STRAP = "C0:FF:EE:00:00:01"


def hr_frame(bpm: int, mono: float = 0.0, wall: float = 0.0) -> Frame:
    return Frame("ble", "hci0", STRAP, "2a37", bytes([0x00, bpm]), mono, wall, -60)


async def _yield_to_the_loop() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_a_quiet_frame_does_not_wake_a_waiter_and_a_loud_one_does() -> None:
    queue = FrameQueue()
    waiter = asyncio.create_task(queue.wait(30))
    await _yield_to_the_loop()
    queue.put_quiet(hr_frame(60))
    await _yield_to_the_loop()
    assert not waiter.done()
    queue.put(hr_frame(61))
    assert await waiter is True
    assert [f.payload[1] for f in queue.take_all()] == [60, 61]
    assert queue.received == 2


async def test_the_wait_runs_out_with_quiet_frames_queued_and_says_so() -> None:
    queue = FrameQueue()
    waiter = asyncio.create_task(queue.wait(0.02))
    await _yield_to_the_loop()
    queue.put_quiet(hr_frame(60))
    assert await waiter is False
    assert len(queue) == 1


async def test_a_pile_of_quiet_frames_wakes_the_waiter() -> None:
    queue = FrameQueue()
    waiter = asyncio.create_task(queue.wait(30))
    await _yield_to_the_loop()
    for _ in range(GATHER_FRAMES - 1):
        queue.put_quiet(hr_frame(60))
    await _yield_to_the_loop()
    assert not waiter.done()
    queue.put_quiet(hr_frame(60))
    assert await waiter is True
    assert len(queue) == GATHER_FRAMES


async def test_a_cancel_ends_the_wait_even_when_a_frame_lands_with_it() -> None:
    # Shutdown cancels the pipeline while it waits; a frame arriving in the same turn must not
    # swallow that cancel (the pipeline would then never stop).
    queue = FrameQueue()
    for frame_too in (False, True):
        waiter = asyncio.create_task(queue.wait(30))
        await _yield_to_the_loop()
        if frame_too:
            queue.put(hr_frame(60))
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert queue._waiter is None
    # and the wait's timer went with it
    timers = asyncio.get_running_loop()._scheduled  # type: ignore[attr-defined]
    assert all(timer.cancelled() for timer in timers)


def test_quiet_frames_beyond_the_bound_drop_the_oldest_and_count_it() -> None:
    queue = FrameQueue(maxsize=3)
    for bpm in (60, 61, 62, 63):
        queue.put_quiet(hr_frame(bpm))
    assert [f.payload[1] for f in queue.take_all()] == [61, 62, 63]
    assert queue.dropped == 1


async def _first_heart_rates(events: Subscription) -> list[Sample]:
    """The first batch of HEART_RATE samples the pipeline publishes."""
    samples: list[Sample] = []
    async with asyncio.timeout(5):
        while not samples:
            batch = await events.get_batch()
            samples += [e for e in batch if isinstance(e, Sample) and e.t == DataType.HEART_RATE]
    return samples


async def test_the_running_pipeline_emits_a_quiet_frame_in_its_own_second() -> None:
    clock = SteadyClock()
    queue = FrameQueue()
    hub = Hub()
    events = hub.subscribe("test", 1000)
    pipeline = Pipeline(queue, hub, Roster([], {}), PipelineConfig(), clock)
    task = asyncio.create_task(pipeline.run())
    try:
        wall = clock.wall()
        queue.put_quiet(hr_frame(77, clock.mono(), wall))
        samples = await _first_heart_rates(events)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert [(s.device_id, s.ts, s.val) for s in samples] == [(STRAP, math.floor(wall), 77)]


# put_from_thread: a source's own thread (openant's USB reader) queues a USB transfer's frames.


async def _from_a_thread(queue: FrameQueue, batches: list[list[Frame]]) -> None:
    def put() -> None:
        for batch in batches:
            queue.put_from_thread(batch)

    thread = threading.Thread(target=put)
    thread.start()
    await asyncio.to_thread(thread.join)


async def test_a_threads_batches_wait_without_waking_and_are_taken_in_order() -> None:
    queue = FrameQueue()
    queue.bind(asyncio.get_running_loop())
    waiter = asyncio.create_task(queue.wait(30))
    await _yield_to_the_loop()
    queue.put_quiet(hr_frame(59))
    await _from_a_thread(queue, [[hr_frame(60), hr_frame(61)], [hr_frame(62)]])
    await _yield_to_the_loop()
    assert not waiter.done()
    assert [f.payload[1] for f in queue.take_all()] == [59, 60, 61, 62]
    assert queue.received == 4 and queue.take_all() == []
    waiter.cancel()


async def test_a_backlog_from_a_thread_wakes_the_waiter() -> None:
    queue = FrameQueue()
    queue.bind(asyncio.get_running_loop())
    waiter = asyncio.create_task(queue.wait(30))
    await _yield_to_the_loop()
    await _from_a_thread(queue, [[hr_frame(60)] for _ in range(GATHER_FRAMES - 1)])
    await _yield_to_the_loop()
    assert not waiter.done()
    await _from_a_thread(queue, [[hr_frame(61)]])
    assert await waiter is True
    assert len(queue.take_all()) == GATHER_FRAMES


async def test_a_threads_frames_beyond_the_bound_drop_the_oldest_and_count_it() -> None:
    queue = FrameQueue(maxsize=3)
    queue.bind(asyncio.get_running_loop())
    await _from_a_thread(queue, [[hr_frame(60), hr_frame(61)], [hr_frame(62), hr_frame(63)]])
    assert [f.payload[1] for f in queue.take_all()] == [61, 62, 63]
    assert queue.dropped == 1 and queue.received == 4


def test_a_thread_cannot_put_before_the_queue_knows_its_loop() -> None:
    with pytest.raises(RuntimeError, match="bind"):
        FrameQueue().put_from_thread([hr_frame(60)])


async def test_the_running_pipeline_emits_a_threads_frame_in_its_own_second() -> None:
    # Put late in a second, from a thread, without a wake-up: the pipeline's wake at the
    # second's close (plus the grace) takes it before it emits that second.
    clock = SteadyClock()
    queue = FrameQueue()
    hub = Hub()
    events = hub.subscribe("test", 1000)
    pipeline = Pipeline(queue, hub, Roster([], {}), PipelineConfig(), clock)
    queue.bind(asyncio.get_running_loop())
    task = asyncio.create_task(pipeline.run())
    try:
        wall = clock.wall()
        await _from_a_thread(queue, [[hr_frame(77, clock.mono(), wall)]])
        samples = await _first_heart_rates(events)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert [(s.device_id, s.ts, s.val) for s in samples] == [(STRAP, math.floor(wall), 77)]
    assert pipeline.aggregator.late_values == 0
