"""Aggregation rules, driven by an injected clock: no test sleeps."""

from __future__ import annotations

from gatewayd.aggregate import Aggregator
from gatewayd.model import DataType, DeviceState, Sample

T0 = 1_800_000_000.0  # a whole second
KEY = "ant/120:1"


class Room:
    """An aggregator plus a hand-driven clock; mono and wall move together."""

    def __init__(self, **kwargs: float) -> None:
        self.agg = Aggregator(**kwargs)
        self.wall = T0
        self.mono = 100.0
        self.samples: list[Sample] = []
        self.statuses = []
        self.agg.tick(self.mono, self.wall)

    def hear(self, t: DataType, val: float | None = None, d=None, key=KEY, event=True):
        status = self.agg.frame(key, "alice", "ant", key.split("/")[1], self.mono, self.wall)
        if status:
            self.statuses.append(status)
        status = self.agg.value(key, t, val, d, self.mono, self.wall, event)
        if status:
            self.statuses.append(status)

    def advance(self, seconds: float) -> None:
        self.wall += seconds
        self.mono += seconds
        samples, statuses = self.agg.tick(self.mono, self.wall)
        self.samples += samples
        self.statuses += statuses

    def series(self, t: DataType) -> list[tuple[float, float | None]]:
        return [(s.ts - T0, s.val) for s in self.samples if s.t is t]


def test_heart_rate_is_the_latest_value_of_each_second_stamped_at_its_start():
    room = Room(grace=0.25)
    room.advance(0.1)
    room.hear(DataType.HEART_RATE, 70)
    room.advance(0.5)
    room.hear(DataType.HEART_RATE, 72)
    room.advance(0.6)  # 1.2 s: second 0 not closed yet (grace)
    assert room.series(DataType.HEART_RATE) == []
    room.advance(0.1)  # 1.3 s: closed
    assert room.series(DataType.HEART_RATE) == [(0.0, 72)]
    assert room.samples[0].ts_text().endswith(".000Z")


def test_exactly_one_sample_per_second_while_live_even_without_a_frame_in_it():
    room = Room()
    room.advance(0.5)
    room.hear(DataType.HEART_RATE, 80)
    for _ in range(3):  # frames every 1.5 s: some seconds have none
        room.advance(1.5)
        room.hear(DataType.HEART_RATE, 81)
    room.advance(2.5)
    seconds = [ts for ts, _ in room.series(DataType.HEART_RATE)]
    assert seconds == [0, 1, 2, 3, 4, 5, 6]


def test_late_frame_within_grace_counts_for_its_own_second():
    room = Room(grace=0.25)
    room.advance(0.9)
    room.advance(0.2)  # wall is 1.1 s, second 0 still open
    room.agg.frame(KEY, "alice", "ant", "120:1", room.mono, T0 + 0.95)
    room.agg.value(KEY, DataType.HEART_RATE, 99, None, room.mono, T0 + 0.95)
    room.advance(0.5)
    assert room.series(DataType.HEART_RATE)[0] == (0.0, 99)
    assert room.agg.late_values == 0


def test_power_is_the_mean_of_the_second():
    room = Room()
    room.advance(0.1)
    for watts in (100, 200, 300):
        room.hear(DataType.POWER, watts)
        room.advance(0.25)
    room.advance(1)
    assert room.series(DataType.POWER)[0] == (0.0, 200)


def test_cadence_is_held_then_falls_to_zero_after_three_seconds_without_an_event():
    room = Room(hold=3.0, lost_after=30)
    room.advance(0.5)
    room.hear(DataType.BIKE_CADENCE, 90)
    for _ in range(6):  # the device keeps sending, but no new crank event
        room.advance(1.0)
        room.agg.frame(KEY, "alice", "ant", "120:1", room.mono, room.wall)
    values = [v for _, v in room.series(DataType.BIKE_CADENCE)]
    assert values[:3] == [90, 90, 90]
    assert values[4:] == [0.0] * len(values[4:])
    assert len(values) == 6


def test_rr_intervals_come_one_per_beat_stamped_when_the_beat_happened():
    # Terra's clients read RR_INTERVAL's `val` (terra-examples consumer.ts), so one sample per
    # beat: `val` the interval in ms, `ts` the beat's time to the millisecond.
    room = Room()
    room.advance(0.2)
    room.hear(DataType.RR_INTERVAL, d=(800.0,))
    room.advance(1.6)
    room.hear(DataType.RR_INTERVAL, d=(810.0, 790.0))  # arrived at 1.8: beats at 1.01 and 1.8
    room.advance(1.0)
    room.hear(DataType.HEART_RATE, 75)  # keeps the device live, no RR
    room.advance(1.5)
    rr = [(round(s.ts - T0, 3), s.val, s.d) for s in room.samples if s.t is DataType.RR_INTERVAL]
    assert rr == [(0.2, 800.0, None), (1.01, 810.0, None), (1.8, 790.0, None)]


def test_beat_times_only_grow_even_when_readings_arrive_bunched():
    room = Room()
    room.advance(0.5)
    room.hear(DataType.RR_INTERVAL, d=(800.0,))
    room.advance(0.1)  # a late notification whose beats would land before the last one
    room.hear(DataType.RR_INTERVAL, d=(900.0, 700.0))
    room.advance(2.0)
    times = [s.ts for s in room.samples if s.t is DataType.RR_INTERVAL]
    assert [s.val for s in room.samples if s.t is DataType.RR_INTERVAL] == [800.0, 900.0, 700.0]
    assert times == sorted(set(times)) and len(times) == 3
    assert all(abs(t * 1000 - round(t * 1000)) < 1e-3 for t in times)  # whole milliseconds


def test_a_silent_device_is_lost_once_and_no_samples_are_invented():
    room = Room(lost_after=5.0)
    room.advance(0.5)
    room.hear(DataType.HEART_RATE, 60)
    assert [s.state for s in room.statuses] == [DeviceState.CONNECTED]
    for _ in range(20):
        room.advance(0.5)
    lost = [s for s in room.statuses if s.state is DeviceState.LOST]
    assert len(lost) == 1 and "silent" in lost[0].reason
    last_ts = max(ts for ts, _ in room.series(DataType.HEART_RATE))
    assert last_ts <= 5.0  # nothing after the device was declared lost
    count = len(room.samples)
    room.advance(5)
    assert len(room.samples) == count
    room.hear(DataType.HEART_RATE, 61)  # it comes back
    assert room.statuses[-1].state is DeviceState.CONNECTED
    assert room.statuses[-1].reason == "heard again"


def test_second_device_for_the_same_type_is_shadowed_until_the_first_is_lost():
    room = Room(lost_after=2.0)
    room.advance(0.1)
    room.hear(DataType.HEART_RATE, 100, key="ant/120:1")
    room.hear(DataType.HEART_RATE, 150, key="ble/AA")
    room.advance(1.5)
    assert room.series(DataType.HEART_RATE) == [(0.0, 100)]
    assert room.agg.shadowed_values == 1
    for _ in range(4):
        room.advance(1.0)
        room.hear(DataType.HEART_RATE, 150, key="ble/AA")
    room.advance(1.5)
    assert room.series(DataType.HEART_RATE)[-1][1] == 150
    assert room.samples[-1].device_id == "AA"


def test_a_shadowed_device_takes_the_type_over_when_its_owner_is_given_to_another_athlete():
    room = Room()
    room.advance(0.1)
    room.hear(DataType.HEART_RATE, 100, key="ant/120:1")
    room.hear(DataType.HEART_RATE, 150, key="ble/AA")
    room.hear(DataType.HEART_RATE, 151, key="ble/AA")
    assert room.agg.shadowed_values == 2
    room.agg.reassign("ant/120:1", "bob", room.wall)  # alice's strap goes to bob
    room.hear(DataType.HEART_RATE, 152, key="ble/AA")
    assert room.agg.shadowed_values == 2
    room.advance(1.5)
    [sample] = [s for s in room.samples if s.t is DataType.HEART_RATE]
    assert (sample.uid, sample.val, sample.device_id) == ("alice", 152, "AA")


def test_battery_only_in_seconds_it_was_reported_and_a_change_is_a_status():
    room = Room()
    room.advance(0.1)
    room.hear(DataType.HEART_RATE, 70)
    room.hear(DataType.BATTERY, 80)
    for _ in range(3):
        room.advance(1.0)
        room.hear(DataType.HEART_RATE, 70)
    assert room.series(DataType.BATTERY) == [(0.0, 80)]
    assert any(s.battery == 80 for s in room.statuses)


def test_wall_clock_jump_restarts_the_timeline_instead_of_a_flood_or_a_stall():
    room = Room()
    room.advance(0.5)
    room.hear(DataType.HEART_RATE, 70)
    room.advance(1.0)
    emitted = len(room.samples)
    room.wall += 3600  # NTP sets the clock at boot; mono does not jump
    room.advance(0.1)
    assert len(room.samples) == emitted
    assert room.agg.timeline_resets == 1
    room.hear(DataType.HEART_RATE, 71)
    room.advance(1.5)
    assert room.samples[-1].val == 71
    room.wall -= 7200  # and backwards
    room.advance(0.1)
    room.hear(DataType.HEART_RATE, 72)
    room.advance(1.5)
    assert room.samples[-1].val == 72


def test_flush_emits_the_current_second():
    room = Room()
    room.advance(0.3)
    room.hear(DataType.HEART_RATE, 90)
    samples = room.agg.flush(room.mono, room.wall)
    assert [(s.ts - T0, s.val) for s in samples] == [(0.0, 90)]
