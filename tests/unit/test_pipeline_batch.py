"""Pipeline.process_all over whole batches (as run_once takes them) against process (one frame
at a time, a batch of one).

The batch loop looks routes and decoders up once per batch and keeps them in locals; this holds
it to exactly the samples, statuses and counters of frames taken one by one, over a long room
with everything that changes the state under it: devices lost and heard again, a device given to
another athlete mid-run, values too late for their second, bad and unknown frames, RR intervals
and battery pages.
"""

from __future__ import annotations

from gatewayd.clock import ManualClock
from gatewayd.config import PipelineConfig, SimulatorConfig
from gatewayd.energy import EnergyMeter
from gatewayd.hub import Hub, Subscription
from gatewayd.model import DataType, DeviceState, DeviceStatus, Frame, Sample
from gatewayd.pipeline import FrameQueue, Pipeline
from gatewayd.roster import Roster
from gatewayd.sources.simulator import SimulatorSource
from tests.helpers import START_WALL

STEP = 0.05


class _Side:
    """One pipeline with its own hub, clock and energy meter, fed frames from outside."""

    def __init__(self, roster: Roster) -> None:
        self.clock = ManualClock(wall=START_WALL)
        self.hub = Hub()
        self.events: Subscription = self.hub.subscribe("test", 10**7)
        self.pipeline = Pipeline(
            FrameQueue(),
            self.hub,
            roster,
            PipelineConfig(),
            self.clock,
            energy=EnergyMeter(zone4_pct=80.0, default_max_hr=190),
        )
        self.pipeline.tick()


def _roster(sim: SimulatorSource, move: tuple[str, str] | None = None) -> Roster:
    athletes, devices = [], {}
    for info, owned in sim.roster_entries():
        athletes.append(info)
        devices.update({ident: info.uid for ident in owned})
    if move is not None:
        devices[move] = "sim-01"  # the device changes hands
    return Roster(athletes, devices, track_unknown=False)


def test_the_batch_loop_gives_exactly_what_frame_by_frame_processing_gives() -> None:
    sim_clock = ManualClock(wall=START_WALL)
    sim = SimulatorSource(
        SimulatorConfig(
            enabled=True,
            athletes=8,
            bike_fraction=0.75,
            drop_after_s={"sim-03": 12.0, "sim-05": 30.0},
        ),
        sim_clock,
    )
    source = FrameQueue(maxsize=10**7)
    single, batch = _Side(_roster(sim)), _Side(_roster(sim))
    entries = sim.roster_entries()
    moved = next(d for d in entries[3][1] if d[0] == "ant")  # one of sim-04's ANT+ sensors
    strap = next(d for d in entries[1][1] if d[0] == "ant")  # sim-02's ANT+ strap
    elapsed = 0.0
    for step in range(1, int(75 / STEP) + 1):
        elapsed += STEP
        sim_clock.advance(STEP)
        sim.emit_due(elapsed, source)
        frames = source.take_all()
        mono, wall = sim_clock.mono(), sim_clock.wall()
        if step % 37 == 0 and frames:  # a frame that missed its second's close: counted late
            frames.append(frames[0]._replace(mono=mono, wall=wall - 3.0))
        if step % 53 == 0:  # malformed, of a kind without a decoder, and from a stranger
            frames.append(Frame("ant", "sim", strap[1], "ant:120", b"\x00\x01", mono, wall))
            frames.append(Frame("ant", "sim", strap[1], "ant:999", bytes(8), mono, wall))
            frames.append(Frame("ble", "sim", "C0:FF:EE:00:00:09", "2a37", b"\x00\x48", mono, wall))
        if 20 / STEP <= step < 30 / STEP:  # silent for 10 s: lost, then heard again
            frames = [f for f in frames if (f.source, f.device_id) != moved]
        if step == int(40 / STEP):  # the roster gives that sensor to sim-01
            single.pipeline.set_roster(_roster(sim, moved))
            batch.pipeline.set_roster(_roster(sim, moved))
        for side in (single, batch):
            side.clock.advance(STEP)
        for frame in frames:
            single.pipeline.process(frame)
        single.pipeline.tick()
        batch.pipeline.process_all(frames)
        batch.pipeline.tick()
    for side in (single, batch):
        side.pipeline.flush()

    got, want = batch.events.get_nowait(), single.events.get_nowait()
    assert got == want
    assert single.pipeline.ignored_frames > 0
    for counter in ("processed", "ignored_frames", "samples"):
        assert getattr(batch.pipeline, counter) == getattr(single.pipeline, counter), counter
    assert batch.pipeline.decode_errors == single.pipeline.decode_errors
    for counter in ("late_values", "shadowed_values", "timeline_resets"):
        assert getattr(batch.pipeline.aggregator, counter) == getattr(
            single.pipeline.aggregator, counter
        ), counter

    # The run held every case it claims to hold, so the comparison above covers them.
    statuses = [e for e in want if isinstance(e, DeviceStatus)]
    samples = [e for e in want if isinstance(e, Sample)]
    lost = {s.uid for s in statuses if s.state is DeviceState.LOST}
    assert {"sim-03", "sim-05"} <= lost
    assert any(s.reason.startswith("given to") for s in statuses)
    assert any(s.reason == "heard again" for s in statuses)
    assert any(s.reason == "battery" for s in statuses)
    assert single.pipeline.aggregator.late_values > 0
    assert single.pipeline.aggregator.shadowed_values > 0
    assert sum(single.pipeline.decode_errors.values()) >= 2 * (int(75 / STEP) // 53)
    assert {DataType.RR_INTERVAL, DataType.POWER, DataType.CALORIES} <= {s.t for s in samples}
