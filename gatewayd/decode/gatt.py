"""BLE GATT characteristics (formats.md part A). Little-endian throughout.

Each decoder takes one notification's value (or a read's value) and returns Readings, or raises
DecodeError naming the CLI profile, the reason and the bytes. Counter fields (revolutions and
event times) are passed on raw, with their moduli, for decode/counters.py.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

from gatewayd.decode.tables import whole_values
from gatewayd.errors import DecodeError
from gatewayd.model import Measure, Reading

HEART_RATE_MEASUREMENT = "2a37"
BODY_SENSOR_LOCATION = "2a38"
BATTERY_LEVEL = "2a19"
CSC_MEASUREMENT = "2a5b"
CYCLING_POWER_MEASUREMENT = "2a63"
RSC_MEASUREMENT = "2a53"
FTMS_INDOOR_BIKE = "2ad2"
FTMS_TREADMILL = "2acd"
FTMS_ROWER = "2ad1"

_KJ_TO_KCAL = 1.0 / 4.184
_KMH_TO_MS = 1.0 / 3.6
_U16 = 1 << 16
_U32 = 1 << 32


def _u16(data: bytes, pos: int) -> int:
    return data[pos] | data[pos + 1] << 8


def _s16(data: bytes, pos: int) -> int:
    value = data[pos] | data[pos + 1] << 8
    return value - _U16 if value & 0x8000 else value


def _u32(data: bytes, pos: int) -> int:
    return int.from_bytes(data[pos : pos + 4], "little")


def _need(profile: str, data: bytes, end: int, what: str) -> None:
    if len(data) < end:
        raise DecodeError(profile, f"{what}: needs {end} bytes, got {len(data)}", data)


def _exact(profile: str, data: bytes, end: int) -> None:
    if len(data) != end:
        raise DecodeError(profile, f"{len(data) - end} bytes past the last field", data)


# The heart rate characteristic is the one BLE straps notify every second: its Readings come from
# tables (decode/tables.py) or are built with tuple.__new__ and all eleven fields in order
# (measure, value, values, count, count_mod, time, time_mod, tick_hz, accum, accum_mod, paged),
# as antplus.py does for its common pages.
_new = tuple.__new__
_HEART_RATE = Measure.HEART_RATE
_HEART_RATES = whole_values(Measure.HEART_RATE)  # a u8 heart rate
_CONTACTS = whole_values(Measure.CONTACT, 2)  # 1.0: skin contact
_RR_INTERVALS = Measure.RR_INTERVALS


def heart_rate_measurement(data: bytes) -> list[Reading]:
    """0x2A37 Heart Rate Measurement: HR u8|u16, contact, energy (kJ -> kcal), RR intervals."""
    profile = "hrm"
    _need(profile, data, 2, "flags + heart rate")
    flags = data[0]
    if flags & 0x01:
        _need(profile, data, 3, "flags say a u16 heart rate")
        hr = _u16(data, 1)
        pos = 3
    else:
        hr = data[1]
        pos = 2
    if hr < 256:
        readings = [_HEART_RATES[hr]]
    else:
        readings = [_new(Reading, (_HEART_RATE, float(hr), (), 0, 0, 0, 0, 0.0, 0, 0, False))]
    contact_bits = (flags >> 1) & 0x03
    if contact_bits >= 2:  # 0 and 1 mean "contact detection not supported"
        readings.append(_CONTACTS[contact_bits == 3])
    if flags & 0x08:
        _need(profile, data, pos + 2, "flags say energy expended")
        readings.append(Reading(Measure.ENERGY, value=_u16(data, pos) * _KJ_TO_KCAL))
        pos += 2
    if flags & 0x10:
        size = len(data) - pos
        if size % 2:
            raise DecodeError(profile, "RR intervals are not whole u16 values", data)
        if size:
            raw = struct.unpack_from(f"<{size // 2}H", data, pos)
            rr = tuple([ticks * 1000.0 / 1024.0 for ticks in raw])
            readings.append(_new(Reading, (_RR_INTERVALS, 0.0, rr, 0, 0, 0, 0, 0.0, 0, 0, False)))
    else:
        _exact(profile, data, pos)
    return readings


def body_sensor_location(data: bytes) -> list[Reading]:
    """0x2A38 Body Sensor Location: 0 other, 1 chest, 2 wrist, 3 finger, 4 hand, 5 ear, 6 foot."""
    if len(data) != 1:
        raise DecodeError("body-location", f"is 1 byte, got {len(data)}", data)
    return [Reading(Measure.BODY_LOCATION, value=float(data[0]))]


def battery_level(data: bytes) -> list[Reading]:
    """0x2A19 Battery Level: u8 percent, 0-100."""
    profile = "battery"
    if len(data) != 1:
        raise DecodeError(profile, f"is 1 byte, got {len(data)}", data)
    if data[0] > 100:
        raise DecodeError(profile, f"{data[0]} % is above 100", data)
    return [Reading(Measure.BATTERY, value=float(data[0]))]


def _wheel(revs: int, event_time: int, tick_hz: float) -> Reading:
    return Reading(
        Measure.WHEEL_REVS,
        count=revs,
        count_mod=_U32,
        time=event_time,
        time_mod=_U16,
        tick_hz=tick_hz,
    )


def _crank(revs: int, event_time: int) -> Reading:
    return Reading(
        Measure.CRANK_REVS,
        count=revs,
        count_mod=_U16,
        time=event_time,
        time_mod=_U16,
        tick_hz=1024.0,
    )


def csc_measurement(data: bytes) -> list[Reading]:
    """0x2A5B CSC Measurement: wheel revs u32 + time 1/1024 s, crank revs u16 + time 1/1024 s."""
    profile = "csc"
    _need(profile, data, 1, "flags")
    flags = data[0]
    pos = 1
    readings: list[Reading] = []
    if flags & 0x01:
        _need(profile, data, pos + 6, "flags say wheel data")
        readings.append(_wheel(_u32(data, pos), _u16(data, pos + 4), 1024.0))
        pos += 6
    if flags & 0x02:
        _need(profile, data, pos + 4, "flags say crank data")
        readings.append(_crank(_u16(data, pos), _u16(data, pos + 2)))
        pos += 4
    _exact(profile, data, pos)
    return readings


def _balance(raw_percent: float, known: bool) -> Reading:
    return Reading(Measure.BALANCE, value=raw_percent, count=int(known))


def cycling_power_measurement(data: bytes) -> list[Reading]:
    """0x2A63 Cycling Power Measurement: power s16 W, balance, wheel (1/2048 s), crank, ..."""
    profile = "cps"
    _need(profile, data, 4, "flags u16 + instantaneous power s16")
    flags = _u16(data, 0)
    if flags & 0x40 and flags & 0x80:
        raise DecodeError(profile, "flags say both extreme forces and extreme torques", data)
    readings = [Reading(Measure.POWER, value=float(_s16(data, 2)))]
    pos = 4
    if flags & 0x01:
        _need(profile, data, pos + 1, "flags say pedal power balance")
        # Reference bit 1 = the percentage is the left pedal's; 0 = the side is unknown. Above
        # 200 (100 %) is outside the field's range (0xFF: unknown), so it is not reported.
        if data[pos] <= 200:
            readings.append(_balance(data[pos] / 2.0, known=bool(flags & 0x02)))
        pos += 1
    if flags & 0x04:  # accumulated torque: no data type of its own
        pos += 2
    if flags & 0x10:
        _need(profile, data, pos + 6, "flags say wheel revolution data")
        readings.append(_wheel(_u32(data, pos), _u16(data, pos + 4), 2048.0))
        pos += 6
    if flags & 0x20:
        _need(profile, data, pos + 4, "flags say crank revolution data")
        readings.append(_crank(_u16(data, pos), _u16(data, pos + 2)))
        pos += 4
    # Extreme forces or torques (s16 x2), angles (u24), top and bottom dead spot (u16 each),
    # energy (u16 kJ of work at the pedals, not the athlete's calories): checked, not reported.
    for bit, size in ((0x40, 4), (0x80, 4), (0x100, 3), (0x200, 2), (0x400, 2), (0x800, 2)):
        if flags & bit:
            pos += size
    _need(profile, data, pos, "flags say more fields than the bytes hold")
    _exact(profile, data, pos)
    return readings


def rsc_measurement(data: bytes) -> list[Reading]:
    """0x2A53 RSC Measurement: speed 1/256 m/s, cadence /min, stride 1/100 m, distance 1/10 m."""
    profile = "rsc"
    _need(profile, data, 4, "flags + speed u16 + cadence u8")
    flags = data[0]
    readings = [
        Reading(Measure.SPEED, value=_u16(data, 1) / 256.0),
        Reading(Measure.STEPS_CADENCE, value=float(data[3])),
    ]
    pos = 4
    if flags & 0x01:
        _need(profile, data, pos + 2, "flags say stride length")
        readings.append(Reading(Measure.STRIDE_LENGTH, value=_u16(data, pos) / 100.0))
        pos += 2
    if flags & 0x02:
        _need(profile, data, pos + 4, "flags say total distance")
        readings.append(Reading(Measure.DISTANCE, value=_u32(data, pos) / 10.0))
        pos += 4
    _exact(profile, data, pos)
    return readings


# FTMS -----------------------------------------------------------------------------------------

# One sub-value of a field: (size in bytes, signed).
_Part = tuple[int, bool]
_U8: _Part = (1, False)
_U16P: _Part = (2, False)
_S16P: _Part = (2, True)
_U24: _Part = (3, False)
_ENERGY = (_U16P, _U16P, _U8)  # total kcal, kcal per hour, kcal per minute


@dataclass(frozen=True, slots=True)
class _Field:
    bit: int
    name: str
    parts: tuple[_Part, ...]


# One width per field: FTMS v1.0's (the characteristic definitions it shipped with: Resistance
# Level sint16, treadmill Instantaneous/Average Pace uint8 in 0.1 km/min). The later GATT
# Specification Supplement reads Resistance Level as uint8 and treadmill pace as uint16; a frame
# in those widths is byte for byte a v1.0 frame one (or two) bytes short or long, so accepting
# both by length would read a truncated frame as the other width (a bike frame one byte short gave
# -1536 W). Shipping equipment sends the v1.0 widths (Volt and Zwift Hub bikes: 2-byte resistance),
# so a frame whose length is not exactly what its flags need is a DecodeError: one flag set, one
# layout, nothing ever fits two ways.


_BIKE_FIELDS = (
    _Field(0, "speed", (_U16P,)),
    _Field(1, "avg_speed", (_U16P,)),
    _Field(2, "cadence", (_U16P,)),
    _Field(3, "avg_cadence", (_U16P,)),
    _Field(4, "distance", (_U24,)),
    _Field(5, "resistance", (_S16P,)),
    _Field(6, "power", (_S16P,)),
    _Field(7, "avg_power", (_S16P,)),
    _Field(8, "energy", _ENERGY),
    _Field(9, "hr", (_U8,)),
    _Field(10, "met", (_U8,)),
    _Field(11, "elapsed", (_U16P,)),
    _Field(12, "remaining", (_U16P,)),
)

_TREADMILL_FIELDS = (
    _Field(0, "speed", (_U16P,)),
    _Field(1, "avg_speed", (_U16P,)),
    _Field(2, "distance", (_U24,)),
    _Field(3, "incline", (_S16P, _S16P)),
    _Field(4, "elevation", (_U16P, _U16P)),
    _Field(5, "pace", (_U8,)),
    _Field(6, "avg_pace", (_U8,)),
    _Field(7, "energy", _ENERGY),
    _Field(8, "hr", (_U8,)),
    _Field(9, "met", (_U8,)),
    _Field(10, "elapsed", (_U16P,)),
    _Field(11, "remaining", (_U16P,)),
    _Field(12, "force_power", (_S16P, _S16P)),
)

_ROWER_FIELDS = (
    _Field(0, "stroke", (_U8, _U16P)),
    _Field(1, "avg_stroke_rate", (_U8,)),
    _Field(2, "distance", (_U24,)),
    _Field(3, "pace", (_U16P,)),
    _Field(4, "avg_pace", (_U16P,)),
    _Field(5, "power", (_S16P,)),
    _Field(6, "avg_power", (_S16P,)),
    _Field(7, "resistance", (_S16P,)),
    _Field(8, "energy", _ENERGY),
    _Field(9, "hr", (_U8,)),
    _Field(10, "met", (_U8,)),
    _Field(11, "elapsed", (_U16P,)),
    _Field(12, "remaining", (_U16P,)),
)


# The fields' names and widths, and the body length they need.
_Layout = tuple[tuple[tuple[str, tuple[_Part, ...]], ...], int]
_LAYOUTS: dict[tuple[str, int], _Layout] = {}
_LAYOUT_CACHE_MAX = 4096  # real equipment uses a handful of flag sets; junk must not grow it


def _ftms_layout(profile: str, fields: tuple[_Field, ...], flags: int) -> _Layout:
    key = (profile, flags)
    layout = _LAYOUTS.get(key)
    if layout is None:
        present = tuple(
            (f.name, f.parts) for f in fields if bool(flags >> f.bit & 1) != (f.bit == 0)
        )
        layout = present, sum(size for _, parts in present for size, _ in parts)
        if len(_LAYOUTS) < _LAYOUT_CACHE_MAX:
            _LAYOUTS[key] = layout
    return layout


def _ftms_fields(
    profile: str, data: bytes, fields: tuple[_Field, ...]
) -> dict[str, tuple[int, ...]]:
    """Flags u16, then each present field in bit order. Bit 0 is inverted ("more data")."""
    _need(profile, data, 2, "flags u16")
    flags = _u16(data, 0)
    present, expected = _ftms_layout(profile, fields, flags)
    body = len(data) - 2
    if body != expected:
        raise DecodeError(
            profile, f"flags 0x{flags:04x} need {expected} bytes after them, got {body}", data
        )
    values: dict[str, tuple[int, ...]] = {}
    pos = 2
    for name, parts in present:
        got: list[int] = []
        for size, signed in parts:
            got.append(int.from_bytes(data[pos : pos + size], "little", signed=signed))
            pos += size
        values[name] = tuple(got)
    return values


def _ftms_common(values: dict[str, tuple[int, ...]], readings: list[Reading]) -> list[Reading]:
    if "distance" in values:
        readings.append(Reading(Measure.DISTANCE, value=float(values["distance"][0])))
    if "power" in values:
        readings.append(Reading(Measure.POWER, value=float(values["power"][0])))
    energy = values.get("energy")
    if energy is not None and energy[0] != 0xFFFF:  # 0xFFFF: "data not available"
        readings.append(Reading(Measure.ENERGY, value=float(energy[0])))
    hr = values.get("hr")
    # Equipment without a paired strap sends 0; it must not overwrite the athlete's own strap.
    if hr is not None and hr[0] != 0:
        readings.append(Reading(Measure.HEART_RATE, value=float(hr[0])))
    return readings


def ftms_indoor_bike(data: bytes) -> list[Reading]:
    """0x2AD2 FTMS Indoor Bike: speed 0.01 km/h, cadence 1/2 rpm, distance, power, energy, HR."""
    values = _ftms_fields("ftms-bike", data, _BIKE_FIELDS)
    readings: list[Reading] = []
    if "speed" in values:
        readings.append(Reading(Measure.SPEED, value=values["speed"][0] / 100.0 * _KMH_TO_MS))
    if "cadence" in values:
        readings.append(Reading(Measure.CADENCE, value=values["cadence"][0] / 2.0))
    return _ftms_common(values, readings)


def ftms_treadmill(data: bytes) -> list[Reading]:
    """0x2ACD FTMS Treadmill Data: speed 0.01 km/h, distance, energy, HR, power."""
    values = _ftms_fields("ftms-treadmill", data, _TREADMILL_FIELDS)
    readings: list[Reading] = []
    if "speed" in values:
        readings.append(Reading(Measure.SPEED, value=values["speed"][0] / 100.0 * _KMH_TO_MS))
    if "force_power" in values:
        values["power"] = values["force_power"][1:]
    return _ftms_common(values, readings)


def ftms_rower(data: bytes) -> list[Reading]:
    """0x2AD1 FTMS Rower Data: stroke rate 1/2 /min + count, distance, pace s/500 m, power, HR."""
    values = _ftms_fields("ftms-rower", data, _ROWER_FIELDS)
    readings: list[Reading] = []
    if "stroke" in values:
        rate, count = values["stroke"]
        readings.append(Reading(Measure.STROKE_RATE, value=rate / 2.0))
        readings.append(Reading(Measure.STROKES, value=float(count)))
    pace = values.get("pace")
    if pace is not None and pace[0] not in (0, 0xFFFF):
        readings.append(Reading(Measure.SPEED, value=500.0 / pace[0]))
    return _ftms_common(values, readings)


DECODERS: dict[str, Callable[[bytes], list[Reading]]] = {
    HEART_RATE_MEASUREMENT: heart_rate_measurement,
    BODY_SENSOR_LOCATION: body_sensor_location,
    BATTERY_LEVEL: battery_level,
    CSC_MEASUREMENT: csc_measurement,
    CYCLING_POWER_MEASUREMENT: cycling_power_measurement,
    RSC_MEASUREMENT: rsc_measurement,
    FTMS_INDOOR_BIKE: ftms_indoor_bike,
    FTMS_TREADMILL: ftms_treadmill,
    FTMS_ROWER: ftms_rower,
}
