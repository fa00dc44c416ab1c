from __future__ import annotations

import hashlib
from collections import Counter

import pytest

from gatewayd.clock import ManualClock
from gatewayd.config import SimulatorConfig
from gatewayd.decode import DECODERS, decode
from gatewayd.model import Frame
from gatewayd.pipeline import FrameQueue
from gatewayd.sources.simulator import SimulatorSource


def frames_for(seconds: float, seed: int = 1, athletes: int = 4):
    sim = SimulatorSource(
        SimulatorConfig(enabled=True, athletes=athletes, seed=seed), ManualClock()
    )
    queue = FrameQueue(maxsize=1_000_000)
    sim.emit_due(seconds, queue)
    return queue.take_all()


def test_same_seed_same_bytes_other_seed_other_bytes():
    first = [(f.device_id, f.payload) for f in frames_for(30)]
    again = [(f.device_id, f.payload) for f in frames_for(30)]
    other = [(f.device_id, f.payload) for f in frames_for(30, seed=2)]
    assert first == again
    assert first != other


def test_devices_send_at_their_real_rates():
    counts = Counter(f.kind for f in frames_for(120, athletes=2))
    # athlete 1: BLE HR + ANT+ power + ANT+ speed/cadence; athlete 2: ANT+ HR
    assert abs(counts["2a37"] - 120) <= 1
    assert abs(counts["ant:120"] - 120 * 32768 / 8070) <= 1
    assert abs(counts["ant:11"] - 120 * 32768 / 8182) <= 1
    assert abs(counts["ant:121"] - 120 * 32768 / 8086) <= 1


def test_heart_rate_frames_decode_to_believable_values():
    heart_rates = []
    for frame in frames_for(600, athletes=4):
        if frame.kind in DECODERS:
            for reading in decode(frame):
                if reading.measure == "heart_rate":
                    heart_rates.append(reading.value)
    assert heart_rates and min(heart_rates) >= 45 and max(heart_rates) <= 190
    assert max(heart_rates) - min(heart_rates) > 20  # it moves with the intervals


def test_roster_entries_name_every_device():
    sim = SimulatorSource(SimulatorConfig(enabled=True, athletes=3), ManualClock())
    entries = sim.roster_entries()
    assert [info.uid for info, _ in entries] == ["sim-01", "sim-02", "sim-03"]
    assert sum(len(devices) for _, devices in entries) == sim.device_count()


# The same seed and the same clock give the same frames, bytes, order and timestamps as the
# simulator before its per-frame work was rewritten for speed (issue 17). Each room covers a
# different path: every device kind, all three hr_straps modes, athletes that go silent (one
# from the start, all of them in the end), wake-ups of a few ms and of more than an HR period
# (several beats and athlete steps in one frame), and hours enough to wrap the 16-bit counters.
# (SimulatorConfig's fields, simulated seconds, wake-up steps in turn)
GOLDEN_ROOMS = {
    "mixed": (
        {"hr_straps": "mixed", "athletes": 7, "bike_fraction": 0.6, "seed": 3,
         "drop_after_s": {"sim-02": 20.0, "sim-05": 301.3}},
        1800.0, (0.05, 0.013, 0.6),
    ),
    "ant": (
        {"hr_straps": "ant", "athletes": 5, "bike_fraction": 1.0, "seed": 11,
         "drop_after_s": {"sim-01": 0.0, "sim-04": 95.0}},
        600.0, (0.05, 1.7, 0.031),
    ),
    "ble": (
        {"hr_straps": "ble", "athletes": 4, "bike_fraction": 0.5, "seed": 7,
         "drop_after_s": {f"sim-0{i}": 50.0 * i for i in range(1, 5)}},
        300.0, (0.05, 0.4),
    ),
    "hours": (
        {"hr_straps": "mixed", "athletes": 2, "bike_fraction": 1.0, "seed": 5},
        5 * 3600.0, (2.0, 0.05, 0.5),
    ),
}  # fmt: skip
# sha256 of room_digest's text for each room, recorded by running this file as a script
# against main at 03c2186 (before the rewrite): `PYTHONPATH=<that checkout> python <this file>`.
GOLDEN_DIGESTS = {
    "mixed": "e5138a2d5f9eab5393bf41ebb2f4dd7fdd05063bb1d2f514d804d989c6fb7c59",
    "ant": "c309e28ea5b06f6090707cb661cecce49e65d2236c3610f0ccdc63edac35cd1e",
    "ble": "ea8ef336c6c6fee63f004144a0c1d15e8f5fff1360565b606f3f620d446b3c85",
    "hours": "da6beab39e0359e510e007b6345bb0f2ee6eabd0bc394cc1b186f1b2207b8158",
}


def room_digest(name: str) -> tuple[str, int]:
    """sha256 over every batch's frames (every field, floats by repr) and each call's returned
    next due time; and the number of frames."""
    fields, seconds, steps = GOLDEN_ROOMS[name]
    clock = ManualClock()
    sim = SimulatorSource(SimulatorConfig(enabled=True, **fields), clock)
    queue = FrameQueue(maxsize=1_000_000)
    digest = hashlib.sha256()
    elapsed, frames, wake = 0.0, 0, 0
    while elapsed < seconds:
        step = steps[wake % len(steps)]
        wake += 1
        elapsed += step
        clock.advance(step)
        next_due = sim.emit_due(elapsed, queue)
        batch = queue.take_all()
        frames += len(batch)
        digest.update(f"{next_due!r}|".encode())
        for frame in batch:
            assert type(frame) is Frame
            digest.update(repr(tuple(frame)).encode())
    assert sim.frames_sent == frames
    return digest.hexdigest(), frames


@pytest.mark.parametrize("name", GOLDEN_DIGESTS)
def test_frames_equal_those_recorded_before_the_rewrite(name):
    digest, frames = room_digest(name)
    assert frames > 1000
    assert digest == GOLDEN_DIGESTS[name]


def test_silent_athletes_send_nothing_from_their_drop_time():
    config = SimulatorConfig(enabled=True, athletes=3, drop_after_s={"sim-02": 10.0})
    sim = SimulatorSource(config, ManualClock())
    silent = {device_id for _, devices in sim.roster_entries()[1:2] for _, device_id in devices}
    queue = FrameQueue(maxsize=1_000_000)
    sim.emit_due(10.0, queue)  # frames due before 10 s, the last of them just before
    before = {f.device_id for f in queue.take_all()}
    sim.emit_due(60.0, queue)
    after = {f.device_id for f in queue.take_all()}
    assert silent <= before
    assert not silent & after
    assert after  # the others go on


if __name__ == "__main__":
    for room in GOLDEN_ROOMS:
        print(room, *room_digest(room))
