"""Shared test helpers: run the simulator through the real pipeline on a hand-driven clock."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from gatewayd.clock import ManualClock
from gatewayd.config import PipelineConfig, SimulatorConfig
from gatewayd.hub import Hub
from gatewayd.model import Sample
from gatewayd.pipeline import FrameQueue, Pipeline
from gatewayd.roster import Roster
from gatewayd.sources.simulator import SimulatorSource

START_WALL = 1_800_000_000.0


async def until(predicate: Callable[[], bool], *events: asyncio.Event, limit: float = 30.0) -> None:
    """Wait for the events that can make `predicate` true; the limit is only a guard."""
    async with asyncio.timeout(limit):
        while not predicate():
            for event in events:
                event.clear()
            if predicate():
                return
            waiters = [asyncio.ensure_future(event.wait()) for event in events]
            try:
                await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiter in waiters:
                    waiter.cancel()


class SteadyClock:
    """Real elapsed time on a fixed calendar, for tests whose timers must really run.

    `mono` is the system's; `wall` starts at `start_wall` and moves with it, so what a test
    stamps, keeps or expires never depends on the day it runs.
    """

    def __init__(self, start_wall: float = START_WALL) -> None:
        self._offset = start_wall - time.monotonic()

    def mono(self) -> float:
        return time.monotonic()

    def wall(self) -> float:
        return time.monotonic() + self._offset


class SimulatedRoom:
    def __init__(self, athletes: int = 6, step: float = 0.05, **sim: object) -> None:
        self.clock = ManualClock(wall=START_WALL)
        self.frames = FrameQueue()
        self.hub = Hub()
        self.events = self.hub.subscribe("test", 1_000_000)
        self.sim = SimulatorSource(
            SimulatorConfig(enabled=True, athletes=athletes, **sim),
            self.clock,  # type: ignore[arg-type]
        )
        athletes_info, devices = [], {}
        for info, owned in self.sim.roster_entries():
            athletes_info.append(info)
            devices.update({ident: info.uid for ident in owned})
        self.pipeline = Pipeline(
            self.frames, self.hub, Roster(athletes_info, devices), PipelineConfig(), self.clock
        )
        self.step = step
        self.elapsed = 0.0
        self.pipeline.tick()

    def run_for(self, seconds: float) -> None:
        end = self.elapsed + seconds
        while self.elapsed < end:
            self.elapsed += self.step
            self.clock.advance(self.step)
            self.sim.emit_due(self.elapsed, self.frames)
            self.pipeline.run_once()

    def samples(self) -> list[Sample]:
        return [e for e in self.events.get_nowait() if isinstance(e, Sample)]
