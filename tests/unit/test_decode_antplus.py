"""ANT+ data pages and ANT serial frames, from the ANT+ profile layouts."""

from __future__ import annotations

import math
import struct

import pytest

from gatewayd.decode import antplus
from gatewayd.decode.counters import Derived, Deriver
from gatewayd.errors import DecodeError
from gatewayd.model import DataType, Measure, Reading


def _frame(msg_id: int, content: bytes) -> bytes:
    body = bytes([0xA4, len(content), msg_id]) + content
    check = 0
    for byte in body:
        check ^= byte
    return body + bytes([check])


def _hr_page(page: int, toggle: int, b123: bytes, beat_time: int, count: int, hr: int) -> bytes:
    return bytes([page | toggle << 7]) + b123 + struct.pack("<HBB", beat_time, count, hr)


def _derive(deriver: Deriver, readings: list[Reading], mono: float) -> list[Derived]:
    return [d for r in readings for d in deriver.derive(r, mono)]


def _rr(derived: list[Derived]) -> list[float]:
    return [v for d in derived if d.t is DataType.RR_INTERVAL for v in d.d or ()]


# Heart rate (120) ---------------------------------------------------------------------------


@pytest.mark.parametrize("page", range(8))
@pytest.mark.parametrize("toggle", [0, 1])
def test_hr_common_bytes_on_every_page(page: int, toggle: int) -> None:
    readings = antplus.heart_rate(_hr_page(page, toggle, b"\x50\x10\x20", 0xFFF0, 255, 71))
    assert readings[0] == Reading(Measure.PAGE_TOGGLE, value=float(toggle))
    by = {r.measure: r for r in readings}
    assert by[Measure.HEART_RATE].value == 71.0
    beats = by[Measure.HEART_BEATS]
    assert (beats.count, beats.count_mod, beats.time, beats.time_mod) == (255, 256, 0xFFF0, 65536)
    assert beats.tick_hz == 1024.0 and not beats.paged
    assert (Measure.PREVIOUS_BEAT in by) == (page == 4)
    assert (Measure.BATTERY in by) == (page == 7)  # 0x50 = 80 %
    for reading in readings:
        assert reading.paged == (reading.measure in (Measure.PREVIOUS_BEAT, Measure.BATTERY))


def test_hr_page4_previous_beat_comes_before_the_beat() -> None:
    measures = [r.measure for r in antplus.heart_rate(_hr_page(4, 1, b"\xff\x00\x10", 0, 1, 60))]
    assert measures.index(Measure.PREVIOUS_BEAT) < measures.index(Measure.HEART_BEATS)


def test_hr_page7_battery_not_sent() -> None:
    readings = antplus.heart_rate(_hr_page(7, 0, b"\xff\x80\x13", 0, 1, 60))
    assert Measure.BATTERY not in {r.measure for r in readings}


def test_hr_rr_once_per_beat_although_each_beat_repeats_four_times() -> None:
    deriver = Deriver()
    rr: list[float] = []
    mono = 0.0
    beat_time, count = 60000, 250
    for beat in range(12):
        previous = beat_time
        beat_time = (beat_time + 800) % 65536
        count = (count + 1) % 256
        for repeat in range(4):
            message = beat * 4 + repeat
            page, toggle = (4, (message // 4) % 2) if message % 2 else (0, (message // 4) % 2)
            extra = b"\xff" + struct.pack("<H", previous) if page == 4 else b"\xff\xff\xff"
            frame = _hr_page(page, toggle, extra, beat_time, count, 75)
            rr += _rr(_derive(deriver, antplus.heart_rate(frame), mono))
            mono += 0.25
    assert rr == [800 * 1000 / 1024] * 11  # the first beat has no baseline


def test_hr_page4_gives_the_rr_after_a_missed_beat_consecutive_beats_do_not() -> None:
    deriver = Deriver()
    # Toggle flips between the first two messages, so page bytes are trusted from then on.
    _derive(deriver, antplus.heart_rate(_hr_page(0, 0, b"\xff" * 3, 1000, 10, 60)), 0.0)
    _derive(deriver, antplus.heart_rate(_hr_page(0, 1, b"\xff" * 3, 1000, 10, 60)), 0.25)
    # Beat 11 missed entirely; beat 12 arrives on page 0: two RRs summed, so nothing.
    got = _derive(deriver, antplus.heart_rate(_hr_page(0, 1, b"\xff" * 3, 3048, 12, 60)), 2.0)
    assert _rr(got) == []
    # Beat 14 after missing 13, on page 4: page 4 knows beat 13's time.
    page4 = _hr_page(4, 1, b"\xff" + struct.pack("<H", 4072), 5096, 14, 60)
    assert _rr(_derive(deriver, antplus.heart_rate(page4), 4.0)) == [1000.0]


def test_hr_legacy_strap_page_bytes_are_ignored() -> None:
    # A legacy strap never toggles bit 7; its byte 0 can even look like "page 4" and bytes 1-3
    # like a previous beat time or a battery level: none of it may be believed.
    deriver = Deriver()
    out: list[Derived] = []
    for beat in range(6):
        junk_page = 4 if beat % 2 else 7
        frame = _hr_page(junk_page, 0, b"\x33\x44\x55", 1024 * (beat + 1), beat, 60)
        out += _derive(deriver, antplus.heart_rate(frame), beat * 1.0)
    assert _rr(out) == [1000.0] * 5
    assert DataType.BATTERY not in {d.t for d in out}


def test_hr_battery_reported_once_the_toggle_has_flipped() -> None:
    deriver = Deriver()
    first = _derive(deriver, antplus.heart_rate(_hr_page(7, 0, b"\x55\x00\x13", 0, 1, 60)), 0.0)
    second = _derive(deriver, antplus.heart_rate(_hr_page(7, 1, b"\x55\x00\x13", 0, 1, 60)), 0.25)
    assert DataType.BATTERY not in {d.t for d in first}
    assert Derived(DataType.BATTERY, val=85.0) in second


# Bike power (11) ----------------------------------------------------------------------------


def _power_page(events: int, balance: int, cadence: int, accum: int, instant: int) -> bytes:
    return struct.pack("<BBBBHH", 0x10, events, balance, cadence, accum, instant)


def test_power_page_0x10_fields() -> None:
    got = {r.measure: r for r in antplus.bike_power(_power_page(5, 0x80 | 48, 91, 1000, 250))}
    assert got[Measure.BALANCE] == Reading(Measure.BALANCE, value=52.0, count=1)  # right 48 %
    assert got[Measure.CADENCE].value == 91.0
    events = got[Measure.POWER_EVENTS]
    assert (events.count, events.count_mod, events.accum, events.accum_mod) == (5, 256, 1000, 65536)
    assert Measure.POWER not in got  # power comes from the event average, never twice


def test_power_page_0x10_unknown_side_and_invalid_fields() -> None:
    got = {r.measure: r for r in antplus.bike_power(_power_page(5, 30, 0xFF, 0, 0))}
    assert got[Measure.BALANCE] == Reading(Measure.BALANCE, value=30.0, count=0)
    assert Measure.CADENCE not in got
    got = {r.measure for r in antplus.bike_power(_power_page(5, 0xFF, 0xFF, 0, 0))}
    assert got == {Measure.POWER_EVENTS}


def test_power_skipped_events_average_over_the_event_delta_across_wraps() -> None:
    deriver = Deriver()
    _derive(deriver, antplus.bike_power(_power_page(254, 0xFF, 90, 65000, 200)), 0.0)
    # Events 255, 0 and 1 were missed or skipped: 3 events, 900 W*events across the u16 wrap.
    got = _derive(
        deriver, antplus.bike_power(_power_page(1, 0xFF, 90, (65000 + 900) % 65536, 300)), 1.0
    )
    assert Derived(DataType.POWER, val=300.0) in got


def test_power_crank_torque_page() -> None:
    # 2 revolutions in 1.0 s (2048 ticks) with 40 N*m*32 per revolution.
    deriver = Deriver()
    _derive(deriver, antplus.bike_power(struct.pack("<BBBBHH", 0x12, 200, 0, 120, 65000, 65500)), 0)
    page = struct.pack("<BBBBHH", 0x12, 202, 0, 120, (65000 + 2048) % 65536, (65500 + 2560) % 65536)
    got = {d.t: d.val for d in _derive(deriver, antplus.bike_power(page), 1.0)}
    assert got[DataType.BIKE_CADENCE] == pytest.approx(120.0)
    assert got[DataType.POWER] == pytest.approx(128 * math.pi * 2560 / 2048)  # 2 * 40 N*m * 2π
    assert got[DataType.POWER] == pytest.approx(2 * 2 * math.pi * (2560 / 2 / 32))


def test_power_wheel_torque_page_gives_speed_not_cadence() -> None:
    deriver = Deriver(circumference_m=2.0)
    first = struct.pack("<BBBBHH", 0x11, 10, 10, 85, 0, 0)
    assert {r.measure for r in antplus.bike_power(first)} == {
        Measure.CADENCE,
        Measure.WHEEL_TORQUE_EVENTS,
    }
    _derive(deriver, antplus.bike_power(first), 0)
    second = struct.pack("<BBBBHH", 0x11, 14, 14, 85, 2048, 320)
    got = {d.t: d.val for d in _derive(deriver, antplus.bike_power(second), 1.0)}
    assert got[DataType.SPEED] == pytest.approx(8.0)  # 4 turns of 2 m in one second
    assert got[DataType.POWER] == pytest.approx(128 * math.pi * 320 / 2048)
    assert DataType.BIKE_CADENCE in got  # byte 3, as the device reported it
    assert got[DataType.BIKE_CADENCE] == 85.0


@pytest.mark.parametrize("page", [0x01, 0x13, 0x50, 0x51, 0x52, 0xF0])
def test_power_other_pages_are_not_errors(page: int) -> None:
    assert antplus.bike_power(bytes([page]) + b"\xff" * 7) == []


# Speed and cadence (121, 122, 123) ----------------------------------------------------------


def test_combined_speed_cadence() -> None:
    deriver = Deriver(circumference_m=2.1)
    first = struct.pack("<HHHH", 64000, 65535, 64500, 100)
    second = struct.pack("<HHHH", (64000 + 1024) % 65536, 1, (64500 + 512) % 65536, 101)
    _derive(deriver, antplus.speed_cadence(first), 0)
    got = {d.t: d.val for d in _derive(deriver, antplus.speed_cadence(second), 1)}
    assert got[DataType.BIKE_CADENCE] == pytest.approx(61440 * 2 / 1024)  # 2 revs in 1 s
    assert got[DataType.SPEED] == pytest.approx(2.1 * 1024 / 512)


@pytest.mark.parametrize("page", [0, 1, 2, 3, 4, 5])
def test_cadence_and_speed_sensors_read_bytes_4_to_7_on_every_page(page: int) -> None:
    data = bytes([page | 0x80, 1, 2, 3]) + struct.pack("<HH", 5000, 42)
    cadence = antplus.cadence(data)
    speed = antplus.speed(data)
    assert cadence[0].measure is Measure.PAGE_TOGGLE and cadence[0].value == 1.0
    assert (cadence[1].measure, cadence[1].count, cadence[1].time) == (Measure.CRANK_REVS, 42, 5000)
    assert (speed[1].measure, speed[1].count, speed[1].time) == (Measure.WHEEL_REVS, 42, 5000)


# SDM (124) and fitness equipment (17) -------------------------------------------------------


def test_sdm_page2_cadence_is_strides_doubled_to_steps() -> None:
    got = {r.measure: r.value for r in antplus.sdm(bytes([2, 0xFF, 0xFF, 85, 0x82, 0x40, 0, 0]))}
    assert got[Measure.STEPS_CADENCE] == 2 * (85 + 8 / 16)
    assert got[Measure.SPEED] == 2.25


def test_sdm_distance_and_strides_accumulate_across_wraps() -> None:
    deriver = Deriver()
    frames = [(250, 0x00, 250), (4, 0x80, 2), (4, 0x80, 2), (10, 0x00, 9)]
    out: list[Derived] = []
    for mono, (metres, frac, strides) in enumerate(frames):
        page = bytes([1, 0, 0, metres, frac, 0, strides, 0])
        out = _derive(deriver, antplus.sdm(page), float(mono))
    got = {d.t: d.val for d in out}
    assert got[DataType.DISTANCE] == pytest.approx(16.0)  # 250 -> 260 across 256
    assert got[DataType.STEPS] == 2 * 15


def test_sdm_page3_gives_cadence_speed_and_calories() -> None:
    # The vector: 90.5 strides/min = 181 steps/min, 0.625 m/s, 55 kcal.
    got = {r.measure: r for r in antplus.sdm(bytes.fromhex("03ffff5a80a03700"))}
    assert got[Measure.STEPS_CADENCE].value == 181.0
    assert got[Measure.SPEED].value == 0.625
    assert (got[Measure.WRAPPED_ENERGY].value, got[Measure.WRAPPED_ENERGY].count_mod) == (55, 256)
    derived = _derive(Deriver(), antplus.sdm(bytes.fromhex("03ffff5a80a03700")), 0.0)
    assert Derived(DataType.STEPS_CADENCE, val=181.0 / 60.0) in derived


def test_sdm_page3_calories_accumulate_across_the_wrap() -> None:
    deriver = Deriver()
    out: list[Derived] = []
    for mono, kcal in enumerate([250, 254, 3, 3]):
        out = _derive(deriver, antplus.sdm(bytes([3, 0xFF, 0xFF, 80, 0, 0, kcal, 0])), mono)
    assert Derived(DataType.CALORIES, val=9.0, event=False) in out


@pytest.mark.parametrize("page", [4, 0x50, 0x51, 0x52, 22])
def test_sdm_other_pages_are_not_errors(page: int) -> None:
    assert antplus.sdm(bytes([page]) + bytes(7)) == []


def test_fe_page16_heart_rate_and_distance_disabled() -> None:
    got = {r.measure: r.value for r in antplus.fitness_equipment(
        bytes([16, 22, 40, 77]) + struct.pack("<H", 3500) + bytes([133, 0x31])
    )}  # fmt: skip
    assert got == {Measure.EQUIPMENT: 22.0, Measure.SPEED: 3.5, Measure.HEART_RATE: 133.0}


@pytest.mark.parametrize(("source", "reported"), [(0, False), (1, True), (2, True), (3, True)])
def test_fe_page16_heart_rate_only_with_a_heart_rate_source(source: int, reported: bool) -> None:
    # Byte 7 bits 0-1: HR data source; 0 = invalid. The vector has source 0 and HR 140.
    page = bytearray.fromhex("101900005a0a8c34")
    page[7] = page[7] & 0xFC | source
    got = {r.measure: r.value for r in antplus.fitness_equipment(bytes(page))}
    assert (got.get(Measure.HEART_RATE) == 140.0) == reported
    assert (Measure.HEART_RATE in got) == reported
    assert got[Measure.SPEED] == 2.65


def test_fe_page26_trainer_torque_gives_power_and_speed() -> None:
    # Period at bytes 3-4, torque at 5-6: 4 wheel events in 1 s with 320/32 N*m per event.
    deriver = Deriver(circumference_m=2.0)
    first = bytes([26, 10, 10]) + struct.pack("<HH", 65000, 65500) + bytes([0x30])
    second = bytes([26, 14, 14]) + struct.pack("<HH", (65000 + 2048) % 65536, (65500 + 320) % 65536)
    _derive(deriver, antplus.fitness_equipment(first), 0.0)
    got = {d.t: d.val for d in _derive(deriver, antplus.fitness_equipment(second + b"\x30"), 1.0)}
    assert got[DataType.SPEED] == pytest.approx(8.0)
    assert got[DataType.POWER] == pytest.approx(128 * math.pi * 320 / 2048)


def test_fe_page18_calories_accumulate() -> None:
    deriver = Deriver()
    out: list[Derived] = []
    for mono, kcal in enumerate([200, 255, 4]):
        page = bytes([18, 0xFF, 0x20, 0x03, 0x10, 0x27, kcal, 0x31])
        out = _derive(deriver, antplus.fitness_equipment(page), float(mono))
    assert out == [Derived(DataType.CALORIES, val=60.0)]


def test_fe_page25_cadence_and_power_events() -> None:
    page = bytes([25, 7, 88]) + struct.pack("<H", 4000) + bytes([0x2C, 0x31, 0x30])
    got = {r.measure: r for r in antplus.fitness_equipment(page)}
    assert got[Measure.CADENCE].value == 88.0
    events = got[Measure.POWER_EVENTS]
    assert (events.count, events.accum, events.value) == (7, 4000, float(0x12C))
    invalid = bytes([25, 7, 0xFF]) + struct.pack("<H", 4000) + bytes([0xFF, 0x3F, 0x30])
    assert antplus.fitness_equipment(invalid) == []


@pytest.mark.parametrize(
    ("page", "want"),
    [
        # Treadmill: byte 4 strides/min, doubled to steps/min.
        (bytes([19, 0xFF, 0xFF, 0xFF, 86, 3, 5, 0x30]), {Measure.STEPS_CADENCE: 172.0}),
        (bytes([19, 0xFF, 0xFF, 0xFF, 0xFF, 3, 5, 0x30]), {}),
        # Elliptical, the vector: cadence 60 (byte 4), 200 W (bytes 5-6).
        (bytes.fromhex("14ff10203cc80030"), {Measure.CADENCE: 60.0, Measure.POWER: 200.0}),
        (bytes([20, 0xFF, 9, 60, 0xFF, 0xFF, 0xFF, 0x30]), {}),
        # Stationary bike, climber, nordic skier: the same bytes 4-6.
        (bytes([21, 0xFF, 0xFF, 0xFF, 88]) + struct.pack("<H", 180) + b"\x30",
         {Measure.CADENCE: 88.0, Measure.POWER: 180.0}),
        (bytes([23, 0xFF, 0xFF, 12, 40]) + struct.pack("<H", 150) + b"\x30",
         {Measure.CADENCE: 40.0, Measure.POWER: 150.0}),
        (bytes([24, 0xFF, 0xFF, 12, 55]) + struct.pack("<H", 0xFFFF) + b"\x30",
         {Measure.CADENCE: 55.0}),
        (
            bytes([22, 0xFF, 0xFF, 77, 26]) + struct.pack("<H", 260) + bytes([0x30]),
            {Measure.STROKE_RATE: 26.0, Measure.POWER: 260.0},
        ),
        (bytes([22, 0xFF, 0xFF, 77, 0xFF, 0xFF, 0xFF, 0x30]), {}),
        # General metabolic: byte 6 accumulated kcal when byte 7 bit 0 enables it.
        (bytes([18, 0xFF, 0x20, 0x03, 0x10, 0x27, 42, 0x31]), {Measure.WRAPPED_ENERGY: 42.0}),
        (bytes([18, 0xFF, 0x20, 0x03, 0x10, 0x27, 42, 0x30]), {}),
        # General settings (cycle length, incline, resistance): no data type of ours.
        (bytes([17, 0xFF, 0xFF, 150, 0x10, 0x00, 40, 0x30]), {}),
    ],
)  # fmt: skip
def test_fe_treadmill_elliptical_rower_pages(page: bytes, want: dict[Measure, float]) -> None:
    assert {r.measure: r.value for r in antplus.fitness_equipment(page)} == want


@pytest.mark.parametrize(
    "decoder",
    [antplus.heart_rate, antplus.bike_power, antplus.speed_cadence, antplus.cadence,
     antplus.speed, antplus.sdm, antplus.fitness_equipment],
)  # fmt: skip
@pytest.mark.parametrize("size", [0, 7, 9])
def test_pages_are_eight_bytes(decoder: object, size: int) -> None:
    assert callable(decoder)
    with pytest.raises(DecodeError, match="8 bytes"):
        decoder(bytes(size))


# Serial frames ------------------------------------------------------------------------------

_PAGE = bytes.fromhex("84FFA5E2A5E6CA3C")
_ID = struct.pack("<HBB", 0x1234, 0x78 | 0x80, 0x51)


@pytest.mark.parametrize(
    ("flags", "trailer", "rssi", "timestamp"),
    [
        (0x80, _ID, None, None),
        (0x40, bytes([0x20, 0xC4, 0xB0]), -60, None),
        (0x40, bytes([0x20, 0xC4, 0xB0, 0x00]), -60, None),
        (0x20, struct.pack("<H", 0xBEEF), None, 0xBEEF),
        (0xC0, _ID + bytes([0x20, 0xD8, 0xB0]), -40, None),
        (0xE0, _ID + bytes([0x20, 0xD8, 0xB0, 0x01]) + struct.pack("<H", 7), -40, 7),
        (0xA0, _ID + struct.pack("<H", 9), None, 9),
    ],
)
def test_extended_trailer(
    flags: int, trailer: bytes, rssi: int | None, timestamp: int | None
) -> None:
    message = antplus.parse_frame(_frame(0x4E, bytes([3]) + _PAGE + bytes([flags]) + trailer))
    assert (message.channel, message.page, message.rssi, message.timestamp) == (
        3, _PAGE, rssi, timestamp,
    )  # fmt: skip
    if flags & 0x80:
        assert message.device_number == 0x1234 | 5 << 16
        assert (message.device_type, message.pairing, message.transmission_type) == (
            120,
            True,
            0x51,
        )
        assert message.kind == "ant:120" and message.device_id == f"120:{0x51234}"
        assert antplus.ant_frame(_frame(0x4E, bytes([3]) + _PAGE + bytes([flags]) + trailer))
    else:
        assert message.device_id is None and message.kind is None
        assert antplus.ant_frame(_frame(0x4E, bytes([3]) + _PAGE + bytes([flags]) + trailer)) == []
    if flags & 0x40:
        assert message.threshold == -80


@pytest.mark.parametrize(
    ("flags", "trailer"),
    [
        (0x80, _ID[:3]),
        (0x80, _ID + b"\x00"),
        (0x40, bytes([0x20, 0xC4])),
        (0x40, bytes([0x20, 0xC4, 0xB0, 0, 0])),
        (0x20, b"\x01"),
        (0x10, b""),
        (0xE0, _ID + struct.pack("<H", 7)),
    ],
)
def test_extended_trailer_that_does_not_fit_the_flags(flags: int, trailer: bytes) -> None:
    with pytest.raises(DecodeError) as caught:
        antplus.parse_frame(_frame(0x4E, bytes([0]) + _PAGE + bytes([flags]) + trailer))
    assert caught.value.profile == "ant-frame"


def test_plain_broadcast_acknowledged_and_burst() -> None:
    broadcast = antplus.parse_frame(_frame(0x4E, bytes([1]) + _PAGE))
    assert (broadcast.channel, broadcast.page, broadcast.device_id) == (1, _PAGE, None)
    acknowledged = antplus.parse_frame(_frame(0x4F, bytes([2]) + _PAGE))
    assert (acknowledged.msg_id, acknowledged.channel) == (0x4F, 2)
    burst = antplus.parse_frame(_frame(0x50, bytes([0b011_00101]) + _PAGE))
    assert (burst.channel, burst.burst_sequence, burst.page) == (5, 3, _PAGE)


def test_data_message_too_short() -> None:
    with pytest.raises(DecodeError, match="9 content bytes"):
        antplus.parse_frame(_frame(0x4E, bytes([1]) + _PAGE[:5]))


@pytest.mark.parametrize(
    ("code", "text"), [(0x02, "RX_FAIL"), (0x07, "CHANNEL_CLOSED"), (0x19, "CLOSE_ALL_CHANNELS")]
)
def test_channel_events_describe_themselves(code: int, text: str) -> None:
    message = antplus.parse_frame(_frame(0x40, bytes([0, 0x01, code])))
    assert message.describe() == f"channel 0 event {text}"
    assert antplus.ant_frame(_frame(0x40, bytes([0, 0x01, code]))) == []


def test_frame_with_channel_id_decodes_its_page_by_device_type() -> None:
    power = struct.pack("<BBBBHH", 0x10, 1, 0xFF, 80, 100, 200)
    trailer = bytes([0x80]) + struct.pack("<HBB", 777, 11, 5)
    readings = antplus.ant_frame(_frame(0x4E, bytes([0]) + power + trailer))
    assert readings == antplus.bike_power(power)


@pytest.mark.parametrize("data", [b"", b"\xa4", b"\xa4\x00\x00"])
def test_frame_too_short(data: bytes) -> None:
    with pytest.raises(DecodeError):
        antplus.parse_frame(data)


def test_registry_has_every_device_type() -> None:
    assert set(antplus.DECODERS) == {
        "ant:120", "ant:11", "ant:17", "ant:121", "ant:122", "ant:123", "ant:124", "ant-frame",
    }  # fmt: skip


def test_parse_content_takes_openant_callback_data() -> None:
    # openant hands the broadcast data without framing: [0:8] page, [8] 0x80, [9:13] channel id.
    data = bytes.fromhex("84FFA5E2A5E6CA3C") + bytes.fromhex("8052627871")
    message = antplus.parse_content(0x4E, bytes([0]) + data)
    assert (message.kind, message.device_id, message.page) == (
        "ant:120", "120:483922", bytes.fromhex("84FFA5E2A5E6CA3C"),
    )  # fmt: skip
    with pytest.raises(DecodeError) as caught:
        antplus.parse_content(0x4E, bytes([0]) + data[:-1])
    assert caught.value.payload == bytes([0]) + data[:-1]
