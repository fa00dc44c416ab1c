from __future__ import annotations

from collections import Counter

from gatewayd.clock import ManualClock
from gatewayd.config import SimulatorConfig
from gatewayd.decode import DECODERS, decode
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
