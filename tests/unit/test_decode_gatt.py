"""BLE GATT decoders, every flag combination, built from the specifications' field tables."""

from __future__ import annotations

import itertools
import math
import struct
from collections.abc import Callable

import pytest

from gatewayd.decode import gatt
from gatewayd.errors import DecodeError
from gatewayd.model import Measure, Reading


def _by_measure(readings: list[Reading]) -> dict[Measure, Reading]:
    got = {r.measure: r for r in readings}
    assert len(got) == len(readings), "a measure appeared twice"
    return got


def _assert_rejects_truncated_and_oversize(decoder: object, payload: bytes) -> None:
    assert callable(decoder)
    with pytest.raises(DecodeError):
        decoder(payload[:-1])
    with pytest.raises(DecodeError):
        decoder(payload + b"\x00")


# Heart Rate Measurement 0x2A37 -----------------------------------------------------------------


@pytest.mark.parametrize("flags", range(32))
@pytest.mark.parametrize("rr_count", [0, 1, 3])
def test_hrm_every_flag_combination(flags: int, rr_count: int) -> None:
    wide, contact, energy, has_rr = flags & 1, flags >> 1 & 3, flags >> 3 & 1, flags >> 4 & 1
    hr = 300 if wide else 150
    payload = bytes([flags]) + (struct.pack("<H", hr) if wide else bytes([hr]))
    if energy:
        payload += struct.pack("<H", 1046)  # kJ
    rr_ticks = [1024, 512, 2048][:rr_count] if has_rr else []
    payload += b"".join(struct.pack("<H", t) for t in rr_ticks)

    got = _by_measure(gatt.heart_rate_measurement(payload))

    assert got.pop(Measure.HEART_RATE).value == hr
    if contact >= 2:
        assert got.pop(Measure.CONTACT).value == (1.0 if contact == 3 else 0.0)
    if energy:
        assert math.isclose(got.pop(Measure.ENERGY).value, 1046 / 4.184)  # 250 kcal
    if rr_ticks:
        assert got.pop(Measure.RR_INTERVALS).values == tuple(t * 1000 / 1024 for t in rr_ticks)
    assert not got
    if has_rr:
        with pytest.raises(DecodeError):
            gatt.heart_rate_measurement(payload + b"\x00")  # half an RR interval
    else:
        _assert_rejects_truncated_and_oversize(gatt.heart_rate_measurement, payload)


def test_hrm_reserved_flag_bits_are_ignored() -> None:
    assert [r.value for r in gatt.heart_rate_measurement(bytes([0xE0, 70]))] == [70.0]


# Simple characteristics ---------------------------------------------------------------------


@pytest.mark.parametrize("level", [0, 57, 100])
def test_battery_level(level: int) -> None:
    assert gatt.battery_level(bytes([level])) == [Reading(Measure.BATTERY, value=float(level))]


@pytest.mark.parametrize("payload", [b"", b"\x10\x10", b"\xff"])
def test_battery_level_rejects(payload: bytes) -> None:
    with pytest.raises(DecodeError) as caught:
        gatt.battery_level(payload)
    assert caught.value.profile == "battery"


@pytest.mark.parametrize("location", range(7))
def test_body_sensor_location(location: int) -> None:
    reading = gatt.body_sensor_location(bytes([location]))
    assert reading == [Reading(Measure.BODY_LOCATION, value=float(location))]
    with pytest.raises(DecodeError):
        gatt.body_sensor_location(b"")


# CSC 0x2A5B ---------------------------------------------------------------------------------


@pytest.mark.parametrize("flags", range(4))
def test_csc_every_flag_combination(flags: int) -> None:
    payload = bytes([flags])
    if flags & 1:
        payload += struct.pack("<IH", 0xDEADBEEF, 0xFFFE)
    if flags & 2:
        payload += struct.pack("<HH", 0xFFFF, 1234)
    got = gatt.csc_measurement(payload)
    want = []
    if flags & 1:
        want.append(Reading(Measure.WHEEL_REVS, count=0xDEADBEEF, count_mod=1 << 32,
                            time=0xFFFE, time_mod=1 << 16, tick_hz=1024.0))  # fmt: skip
    if flags & 2:
        want.append(Reading(Measure.CRANK_REVS, count=0xFFFF, count_mod=1 << 16,
                            time=1234, time_mod=1 << 16, tick_hz=1024.0))  # fmt: skip
    assert got == want
    if flags:
        _assert_rejects_truncated_and_oversize(gatt.csc_measurement, payload)


# Cycling Power Measurement 0x2A63 -----------------------------------------------------------

_CPS_OPTIONAL = [  # (flag bit, bytes) in the spec's field order, after instantaneous power
    (0x01, struct.pack("<B", 101)),  # balance, 1/2 %: 50.5 %
    (0x04, struct.pack("<H", 3200)),  # accumulated torque
    (0x10, struct.pack("<IH", 77777, 4096)),  # wheel revs, time 1/2048 s
    (0x20, struct.pack("<HH", 4321, 60000)),  # crank revs, time 1/1024 s
    (0x40, struct.pack("<hh", 500, -100)),  # extreme forces
    (0x80, struct.pack("<hh", 64, -32)),  # extreme torques
    (0x100, b"\x12\x34\x56"),  # extreme angles u24
    (0x200, struct.pack("<H", 10)),  # top dead spot
    (0x400, struct.pack("<H", 190)),  # bottom dead spot
    (0x800, struct.pack("<H", 42)),  # accumulated energy kJ
]


def _cps_payloads() -> list[tuple[int, bytes]]:
    out = []
    for flags in range(1 << 13):
        if flags & 0x40 and flags & 0x80:
            continue
        payload = struct.pack("<Hh", flags, -12)
        for bit, field in _CPS_OPTIONAL:
            if flags & bit:
                payload += field
        out.append((flags, payload))
    return out


def test_cps_every_flag_combination() -> None:
    for flags, payload in _cps_payloads():
        got = _by_measure(gatt.cycling_power_measurement(payload))
        assert got.pop(Measure.POWER).value == -12.0
        if flags & 0x01:
            balance = got.pop(Measure.BALANCE)
            assert (balance.value, balance.count) == (50.5, 1 if flags & 0x02 else 0)
        if flags & 0x10:
            wheel = got.pop(Measure.WHEEL_REVS)
            assert (wheel.count, wheel.time, wheel.tick_hz) == (77777, 4096, 2048.0)
            assert (wheel.count_mod, wheel.time_mod) == (1 << 32, 1 << 16)
        if flags & 0x20:
            crank = got.pop(Measure.CRANK_REVS)
            assert (crank.count, crank.time, crank.tick_hz) == (4321, 60000, 1024.0)
        assert not got, flags
        _assert_rejects_truncated_and_oversize(gatt.cycling_power_measurement, payload)


def test_cps_forces_and_torques_together_are_contradictory() -> None:
    payload = struct.pack("<Hhhhhh", 0xC0, 100, 1, 2, 3, 4)
    with pytest.raises(DecodeError, match="both extreme forces and extreme torques"):
        gatt.cycling_power_measurement(payload)


# RSC 0x2A53 ---------------------------------------------------------------------------------


@pytest.mark.parametrize("flags", range(8))
def test_rsc_every_flag_combination(flags: int) -> None:
    payload = struct.pack("<BHB", flags, 3 * 256 + 64, 172)
    if flags & 1:
        payload += struct.pack("<H", 123)
    if flags & 2:
        payload += struct.pack("<I", 4_000_005)
    got = _by_measure(gatt.rsc_measurement(payload))
    assert got.pop(Measure.SPEED).value == 3.25
    assert got.pop(Measure.STEPS_CADENCE).value == 172.0
    if flags & 1:
        assert got.pop(Measure.STRIDE_LENGTH).value == 1.23
    if flags & 2:
        assert got.pop(Measure.DISTANCE).value == 400_000.5
    assert not got
    _assert_rejects_truncated_and_oversize(gatt.rsc_measurement, payload)


@pytest.mark.parametrize(("raw", "reported"), [(0, True), (200, True), (201, False), (0xFF, False)])
def test_cps_balance_outside_0_to_100_percent_is_not_reported(raw: int, reported: bool) -> None:
    got = _by_measure(gatt.cycling_power_measurement(struct.pack("<HhB", 0x03, 150, raw)))
    assert (Measure.BALANCE in got) == reported
    assert got[Measure.POWER].value == 150.0


# FTMS ---------------------------------------------------------------------------------------
# Per machine: bit -> the field's bytes (preferred widths) in FTMS order. Bit 0 is present when
# the flag bit is 0 ("more data" inverted). Values are chosen so each one is recognisable.

_ENERGY = struct.pack("<HHB", 480, 600, 10)

_BIKE = {
    0: struct.pack("<H", 3000),  # 30.00 km/h
    1: struct.pack("<H", 2500),
    2: struct.pack("<H", 181),  # 90.5 rpm
    3: struct.pack("<H", 170),
    4: (70_000).to_bytes(3, "little"),
    5: struct.pack("<h", -20),
    6: struct.pack("<h", 250),
    7: struct.pack("<h", 200),
    8: _ENERGY,
    9: bytes([141]),
    10: bytes([45]),
    11: struct.pack("<H", 600),
    12: struct.pack("<H", 1200),
}

_TREADMILL = {
    0: struct.pack("<H", 1080),  # 10.80 km/h
    1: struct.pack("<H", 1000),
    2: (5_000).to_bytes(3, "little"),
    3: struct.pack("<hh", 15, 8),
    4: struct.pack("<HH", 120, 30),
    5: bytes([55]),
    6: bytes([60]),
    7: _ENERGY,
    8: bytes([162]),
    9: bytes([80]),
    10: struct.pack("<H", 900),
    11: struct.pack("<H", 300),
    12: struct.pack("<hh", 40, 190),
}

_ROWER = {
    0: struct.pack("<BH", 57, 321),  # 28.5 strokes/min, 321 strokes
    1: bytes([50]),
    2: (2_000).to_bytes(3, "little"),
    3: struct.pack("<H", 125),  # 2:05 /500 m
    4: struct.pack("<H", 130),
    5: struct.pack("<h", 180),
    6: struct.pack("<h", 170),
    7: struct.pack("<h", 7),
    8: _ENERGY,
    9: bytes([150]),
    10: bytes([90]),
    11: struct.pack("<H", 420),
    12: struct.pack("<H", 60),
}


def _ftms_payload(
    fields: dict[int, bytes], flags: int, swap: dict[int, bytes] | None = None
) -> bytes:
    payload = struct.pack("<H", flags)
    for bit in range(13):
        present = not flags & 1 if bit == 0 else bool(flags >> bit & 1)
        if present:
            payload += (swap or {}).get(bit, fields[bit])
    return payload


def _expect_common(flags: int, got: dict[Measure, Reading], bits: dict[str, int]) -> None:
    if flags >> bits["distance"] & 1:
        distance = got.pop(Measure.DISTANCE).value
        assert distance in (70_000.0, 5_000.0, 2_000.0)
    if flags >> bits["energy"] & 1:
        assert got.pop(Measure.ENERGY).value == 480.0
    if flags >> bits["hr"] & 1:
        assert got.pop(Measure.HEART_RATE).value in (141.0, 162.0, 150.0)


def test_ftms_bike_every_flag_combination() -> None:
    for flags in range(1 << 13):
        payload = _ftms_payload(_BIKE, flags)
        got = _by_measure(gatt.ftms_indoor_bike(payload))
        if not flags & 1:
            assert math.isclose(got.pop(Measure.SPEED).value, 30 / 3.6)
        if flags & 0x04:
            assert got.pop(Measure.CADENCE).value == 90.5
        if flags & 0x40:
            assert got.pop(Measure.POWER).value == 250.0
        _expect_common(flags, got, {"distance": 4, "energy": 8, "hr": 9})
        assert not got, hex(flags)
        if len(payload) > 2:
            with pytest.raises(DecodeError):
                gatt.ftms_indoor_bike(payload[:-1] if not flags & 0x20 else payload[:-2])
        with pytest.raises(DecodeError):
            gatt.ftms_indoor_bike(payload + b"\x00\x00\x00")


def test_ftms_treadmill_every_flag_combination() -> None:
    for flags in range(1 << 13):
        payload = _ftms_payload(_TREADMILL, flags)
        got = _by_measure(gatt.ftms_treadmill(payload))
        if not flags & 1:
            assert math.isclose(got.pop(Measure.SPEED).value, 10.8 / 3.6)
        if flags & 0x1000:
            assert got.pop(Measure.POWER).value == 190.0
        _expect_common(flags, got, {"distance": 2, "energy": 7, "hr": 8})
        assert not got, hex(flags)
        with pytest.raises(DecodeError):
            gatt.ftms_treadmill(payload + b"\x00\x00\x00")


def test_ftms_rower_every_flag_combination() -> None:
    for flags in range(1 << 13):
        payload = _ftms_payload(_ROWER, flags)
        got = _by_measure(gatt.ftms_rower(payload))
        if not flags & 1:
            assert got.pop(Measure.STROKE_RATE).value == 28.5
            assert got.pop(Measure.STROKES).value == 321.0
        if flags & 0x08:
            assert got.pop(Measure.SPEED).value == 4.0  # 500 m in 125 s
        if flags & 0x20:
            assert got.pop(Measure.POWER).value == 180.0
        _expect_common(flags, got, {"distance": 2, "energy": 8, "hr": 9})
        assert not got, hex(flags)
        with pytest.raises(DecodeError):
            gatt.ftms_rower(payload + b"\x00\x00\x00")


def test_ftms_bike_frame_one_byte_short_is_refused_not_read_as_another_width() -> None:
    # The frame: speed, cadence, resistance, power, HR. One byte short it once decoded
    # as a one-byte resistance and -1536 W.
    full = bytes.fromhex("6402c409b4001400fa008c")
    got = _by_measure(gatt.ftms_indoor_bike(full))
    assert got[Measure.POWER].value == 250.0 and got[Measure.HEART_RATE].value == 140.0
    with pytest.raises(DecodeError, match="need 9 bytes after them, got 8"):
        gatt.ftms_indoor_bike(full[:-1])


@pytest.mark.parametrize(
    ("decoder", "fields"),
    [(gatt.ftms_indoor_bike, _BIKE), (gatt.ftms_treadmill, _TREADMILL), (gatt.ftms_rower, _ROWER)],
)
def test_ftms_every_truncation_by_one_or_two_bytes_is_a_decode_error(
    decoder: Callable[[bytes], list[Reading]], fields: dict[int, bytes]
) -> None:
    for flags in range(1 << 13):
        payload = _ftms_payload(fields, flags)
        for cut in (1, 2):
            if len(payload) - cut >= 2:
                with pytest.raises(DecodeError):
                    decoder(payload[:-cut])


@pytest.mark.parametrize(
    ("decoder", "fields", "flags", "swap"),
    [
        (gatt.ftms_indoor_bike, _BIKE, 0x0260, {5: bytes([20])}),
        (gatt.ftms_rower, _ROWER, 0x0380, {7: bytes([7])}),
        (gatt.ftms_treadmill, _TREADMILL, 0x0160, {5: b"\x37\x00", 6: b"\x3c\x00"}),
    ],
)
def test_ftms_gss_widths_are_refused(
    decoder: Callable[[bytes], list[Reading]],
    fields: dict[int, bytes],
    flags: int,
    swap: dict[int, bytes],
) -> None:
    # GSS's uint8 resistance and uint16 treadmill pace: one layout per flag set (FTMS v1.0's).
    with pytest.raises(DecodeError, match="need"):
        decoder(_ftms_payload(fields, flags, swap=swap))


def test_ftms_split_record_continuation_carries_only_its_own_fields() -> None:
    # A record split over two notifications: the second one has bit 0 = 1 (no speed).
    first = _ftms_payload(_BIKE, 0x0004)
    second = _ftms_payload(_BIKE, 0x0241)
    assert {r.measure for r in gatt.ftms_indoor_bike(first)} == {Measure.SPEED, Measure.CADENCE}
    assert {r.measure for r in gatt.ftms_indoor_bike(second)} == {Measure.POWER, Measure.HEART_RATE}


def test_ftms_not_available_values_are_not_reported() -> None:
    payload = struct.pack("<H", 0x0301) + struct.pack("<HHB", 0xFFFF, 0xFFFF, 0xFF) + b"\x00"
    assert gatt.ftms_indoor_bike(payload) == []


@pytest.mark.parametrize("decoder", [gatt.ftms_indoor_bike, gatt.ftms_treadmill, gatt.ftms_rower])
def test_ftms_needs_flags(decoder: object) -> None:
    assert callable(decoder)
    for payload in (b"", b"\x01"):
        with pytest.raises(DecodeError, match="flags"):
            decoder(payload)


def test_registry_kinds_are_gatt_uuids() -> None:
    for kind in gatt.DECODERS:
        assert len(kind) == 4 and int(kind, 16) in range(0x2A00, 0x2B00)
    assert list(itertools.islice(gatt.DECODERS, 1)) == ["2a37"]
