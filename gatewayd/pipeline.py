"""Frame queue -> decode -> aggregate -> hub. The only place the clock ticks (it is injected)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections import Counter, deque
from collections.abc import Callable
from typing import NamedTuple

from gatewayd.aggregate import Aggregator
from gatewayd.clock import Clock
from gatewayd.config import PipelineConfig
from gatewayd.decode import DECODERS, decode
from gatewayd.decode.counters import Deriver
from gatewayd.device_directory import DeviceDirectory
from gatewayd.energy import EnergyMeter
from gatewayd.errors import DecodeError
from gatewayd.hub import Hub
from gatewayd.model import DeviceStatus, Frame, Sample
from gatewayd.roster import Roster

log = logging.getLogger(__name__)

GATHER_S = 0.01  # after a frame wakes the pipeline, it waits this long for more ...
GATHER_FRAMES = 256  # ... unless this many are already queued


class FrameQueue:
    """Bounded queue between sources and the pipeline.

    Sources on the event loop call put(); sources with threads of their own (openant's node,
    paho) call put_threadsafe(). When the pipeline falls behind, the oldest frames go first and
    are counted: fresh data beats stale data for a live display.
    """

    def __init__(self, maxsize: int = 10_000) -> None:
        self.maxsize = maxsize
        self.dropped = 0
        self.received = 0
        self._items: deque[Frame] = deque()
        self._waiter: asyncio.Future[bool] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.gathered = False  # every frame queued came in a source's batch: no need to wait
        self._drains: list[Callable[[], None]] = []
        # Batches put by sources' own threads (put_from_thread), taken at the pipeline's wakes.
        # deque.append and popleft are atomic, so the threads share it without a lock.
        self._inbox: deque[list[Frame]] = deque()
        self._inbox_frames = 0  # put since the inbox was last emptied (approximate: racy)

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def put(self, frame: Frame) -> None:
        self._append(frame)
        self.gathered = False
        self._wake()

    def put_quiet(self, frame: Frame) -> None:
        """Queue a frame without waking the pipeline, unless GATHER_FRAMES are waiting.

        For sources whose frames arrive one per event-loop wake-up (BLE notifications): the
        pipeline takes them at its next wake, at most half a second later and always before it
        emits a second's close, so no frame misses its second; a wake-up per frame would cost
        more than the frame.
        """
        self._append(frame)
        if len(self._items) >= GATHER_FRAMES:
            self._wake()

    def put_many(self, frames: list[Frame]) -> None:
        """put() for each frame, in order, with one wake-up: a source that hears several at once."""
        self._extend(frames)
        self.gathered = False
        self._wake()

    def put_batch(self, frames: list[Frame]) -> None:
        """put_many() for frames a source gathered itself (e.g. a radio's USB transfer): the
        pipeline takes them at once rather than waiting GATHER_S for more."""
        if not frames:
            return
        gathered = self.gathered or not self._items
        self.put_many(frames)
        self.gathered = gathered

    def put_from_thread(self, frames: list[Frame]) -> None:
        """put_quiet() for a batch, from a source's own thread (openant's USB reader).

        The batch waits without waking the event loop: the pipeline takes it at its next wake,
        at most half a second later and always before it emits a second's close, so no frame
        misses its second; a wake-up of the loop per batch cost more than the batch. A backlog
        of GATHER_FRAMES wakes the pipeline, as with put_quiet.
        """
        loop = self._loop
        if loop is None:
            raise RuntimeError("FrameQueue.bind(loop) must run before a thread puts frames")
        self._inbox.append(frames)
        self._inbox_frames += len(frames)
        if self._inbox_frames >= GATHER_FRAMES:
            self._inbox_frames = 0
            with contextlib.suppress(RuntimeError):  # the loop is closed: shutting down
                loop.call_soon_threadsafe(self._wake)

    def _take_inbox(self) -> None:
        inbox = self._inbox
        self._inbox_frames = 0
        while inbox:
            self._extend(inbox.popleft())

    def _extend(self, frames: list[Frame]) -> None:
        """Queue frames in order; at the bound the oldest go first, counted."""
        items = self._items
        self.received += len(frames)
        items.extend(frames)
        excess = len(items) - self.maxsize
        if excess > 0:
            self.dropped += excess
            for _ in range(excess):
                items.popleft()

    def _append(self, frame: Frame) -> None:
        """Queue one frame; at the bound the oldest goes first, counted."""
        self.received += 1
        if len(self._items) >= self.maxsize:
            self._items.popleft()
            self.dropped += 1
        self._items.append(frame)

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(True)

    def put_threadsafe(self, frame: Frame) -> None:
        loop = self._loop
        if loop is None:
            raise RuntimeError("FrameQueue.bind(loop) must run before a thread puts frames")
        loop.call_soon_threadsafe(self.put, frame)

    def __len__(self) -> int:
        return len(self._items)

    def add_drain(self, drain: Callable[[], None]) -> None:
        """Call `drain` whenever frames are about to be taken.

        For a source that holds frames back to save wake-ups (BLE notification windows): it
        hands them in at the pipeline's own wake-up instead of waking the process itself.
        """
        self._drains.append(drain)

    def remove_drain(self, drain: Callable[[], None]) -> None:
        with contextlib.suppress(ValueError):
            self._drains.remove(drain)

    def take_all(self) -> list[Frame]:
        for drain in self._drains:
            drain()
        if self._inbox:
            self._take_inbox()
        items = list(self._items)
        self._items.clear()
        self.gathered = False
        return items

    async def wait(self, timeout: float) -> bool:
        """Return when a frame is queued or `timeout` seconds pass, whichever is first.

        True when frames woke it (or were waiting already), False when the time ran out.
        """
        if self._items:
            return True
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[bool] = loop.create_future()
        self._waiter = waiter
        # A plain timer that resolves the future, not asyncio.timeout or wait_for: this runs
        # dozens of times a second, and a cancel (shutdown) reaches the await unchanged.
        timer = loop.call_later(timeout, _time_up, waiter)
        try:
            return await waiter
        finally:
            timer.cancel()
            self._waiter = None


def _time_up(waiter: asyncio.Future[bool]) -> None:
    if not waiter.done():
        waiter.set_result(False)


class RateLimitedLog:
    """Logs a recurring problem once per `interval` seconds per key, with the count since."""

    def __init__(self, logger: logging.Logger, interval: float) -> None:
        self._logger = logger
        self._interval = interval
        self._last: dict[object, tuple[float, int]] = {}

    def warning(self, key: object, now: float, message: str, *args: object) -> None:
        last = self._last.get(key)
        if last is not None and now - last[0] < self._interval:
            self._last[key] = (last[0], last[1] + 1)
            return
        suppressed = last[1] if last else 0
        suffix = f" ({suppressed} more since the last report)" if suppressed else ""
        self._logger.warning(message + suffix, *args)
        self._last[key] = (now, 0)


class _Route(NamedTuple):
    """What the pipeline remembers about one device: computed on its first frame."""

    key: str
    uid: str
    deriver: Deriver


_UNROUTED = _Route("", "", Deriver())  # a device not seen since the roster was (re)loaded


class Pipeline:
    """Drains the FrameQueue, decodes, derives, aggregates and publishes to the hub."""

    def __init__(
        self,
        frames: FrameQueue,
        hub: Hub,
        roster: Roster,
        config: PipelineConfig,
        clock: Clock,
        *,
        log_interval: float = 60.0,
        energy: EnergyMeter | None = None,
    ) -> None:
        self.energy = energy  # CALORIES and zone minutes per workout; None computes none
        self.frames = frames
        self.hub = hub
        self.roster = roster
        self.config = config
        self.clock = clock
        self.aggregator = Aggregator(
            grace=config.grace_s, lost_after=config.lost_after_s, hold=config.hold_s
        )
        self._routes: dict[tuple[str, str], _Route | None] = {}
        self.directory = DeviceDirectory()
        self.decode_errors: Counter[tuple[str, str]] = Counter()
        self.ignored_frames = 0
        self.processed = 0
        self.samples = 0
        self._decode_log = RateLimitedLog(log, log_interval)

    def set_roster(self, roster: Roster) -> None:
        """Swap the roster (SIGHUP); devices are re-mapped from their next frame on."""
        self.roster = roster
        self._routes.clear()

    def _route(self, frame: Frame) -> _Route | None:
        """Once per device and roster: who it belongs to (a roster edit re-routes it)."""
        source, device_id = frame.source, frame.device_id
        uid = self.roster.uid_for(source, device_id)
        self.directory.first_frame(source, device_id, frame.kind)
        route = None
        if uid is not None:
            deriver = Deriver(self.roster.circumference(uid), self.config.max_gap_s)
            route = _Route(f"{source}/{device_id}", uid, deriver)
            for status in self.aggregator.reassign(route.key, uid, frame.wall):
                self.hub.publish(status)
        self._routes[(source, device_id)] = route
        return route

    def heard_devices(self) -> list[dict[str, object]]:
        """Every device the hub hears, for the admin page (GET /api/devices)."""
        return self.directory.listing(self.aggregator.heard(), self.roster.owner)

    def process(self, frame: Frame) -> None:
        """One frame: decode, derive, aggregate (process_all of a batch of one)."""
        self.process_all([frame])

    def process_all(self, frames: list[Frame]) -> None:
        """Decode, derive and aggregate each frame, in order: the hot path, one loop per batch
        rather than a call per frame, with what every frame needs looked up once."""
        routes = self._routes
        decoders = DECODERS
        add_frame = self.aggregator.add_frame
        processed = 0
        try:
            for frame in frames:
                source, _, device_id, kind, payload, mono, wall, rssi = frame
                route = routes.get((source, device_id), _UNROUTED)
                if route is _UNROUTED:
                    route = self._route(frame)
                if route is None:
                    self._ignore(frame)
                    continue
                processed += 1
                key, uid, deriver = route
                try:
                    decoder = decoders.get(kind)
                    # decode() names an unknown kind in its DecodeError like any other bad input
                    readings = decode(frame) if decoder is None else decoder(payload)
                except DecodeError as exc:
                    self._bad_frame(key, exc, mono)
                    continue
                statuses = add_frame(
                    key,
                    uid,
                    source,
                    device_id,
                    mono,
                    wall,
                    rssi,
                    deriver.derive_all(readings, mono),
                )
                if statuses:
                    for status in statuses:
                        self.hub.publish(status)
        finally:
            self.processed += processed

    def _ignore(self, frame: Frame) -> None:
        self.ignored_frames += 1
        self.directory.ignored(frame)  # still listed, so staff can enrol it

    def _bad_frame(self, key: str, exc: DecodeError, mono: float) -> None:
        self.decode_errors[(key, exc.profile)] += 1
        self._decode_log.warning(
            (key, exc.profile), mono, "dropped a bad frame from %s: %s", key, exc
        )

    def tick(self) -> None:
        samples, statuses = self.aggregator.tick(self.clock.mono(), self.clock.wall())
        self._publish(samples, statuses)

    def flush(self) -> None:
        """Emit the current second too (shutdown): nothing heard is left unsent."""
        self.process_all(self.frames.take_all())
        self._publish(self.aggregator.flush(self.clock.mono(), self.clock.wall()), [])

    def _publish(self, samples: list[Sample], statuses: list[DeviceStatus]) -> None:
        publish = self.hub.publish
        for status in statuses:
            log.warning(
                "device %s %s of %s lost: %s",
                status.source,
                status.device_id,
                status.uid,
                status.reason,
            )
            publish(status)
        if self.energy is not None and samples:
            samples = samples + self.energy.observe(samples, self.roster.athlete)
        self.hub.publish_many(samples)
        self.samples += len(samples)

    def run_once(self) -> None:
        frames = self.frames.take_all()
        if frames:
            self.process_all(frames)
        self.tick()

    async def run(self) -> None:
        frames = self.frames
        loop = asyncio.get_running_loop()
        while True:
            until_tick = self._until_next_tick()
            tick_at = loop.time() + until_tick
            woken = await frames.wait(until_tick)
            if woken and 0 < len(frames) < GATHER_FRAMES and not frames.gathered:
                # A frame woke us: let its neighbours arrive and take them in one turn. Radios
                # deliver one frame per callback, and a wake-up per frame cost more than the
                # frame itself. The wait stops at the second's close it was timed for, so the
                # close (which every consumer waits for) is never put off by it.
                gather = min(GATHER_S, tick_at - loop.time())
                if gather > 0:
                    await asyncio.sleep(gather)
            self.run_once()

    def _until_next_tick(self) -> float:
        # Wake at the next second's close (plus grace) to emit on time, and at least twice a
        # second so a silent device is noticed promptly.
        wall = self.clock.wall()
        next_close = math.floor(wall - self.config.grace_s) + 1 + self.config.grace_s
        return max(0.005, min(0.5, next_close - wall))
