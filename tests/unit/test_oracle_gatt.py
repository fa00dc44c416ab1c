"""GATT decoders against decoders we did not write: bluetooth-sig and pycycling.

Many generated frames, well formed under the flags they carry (and, for FTMS, cut short), go
through gatewayd and the references side by side; the fields both read must agree. Where a
reference is wrong, the disagreement is in KNOWN once, with the clause that proves gatewayd
right, and the comparison corrects for exactly that; any other disagreement fails.

Policies of gatewayd's own that are not decoding (FTMS HR 0 = no strap, energy 0xFFFF = not
available, CPS balance above 100 %) are applied to the reference's values in `_policy_*`.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable
from typing import Any

import pytest
from bluetooth_sig.gatt.characteristics.csc_measurement import CSCMeasurementCharacteristic
from bluetooth_sig.gatt.characteristics.cycling_power_measurement import (
    CyclingPowerMeasurementCharacteristic,
)
from bluetooth_sig.gatt.characteristics.heart_rate_measurement import (
    HeartRateMeasurementCharacteristic,
)
from bluetooth_sig.gatt.characteristics.indoor_bike_data import IndoorBikeDataCharacteristic
from bluetooth_sig.gatt.characteristics.rower_data import RowerDataCharacteristic
from bluetooth_sig.gatt.characteristics.rsc_measurement import RSCMeasurementCharacteristic
from bluetooth_sig.gatt.characteristics.treadmill_data import TreadmillDataCharacteristic
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pycycling.cycling_power_service import _parse_cycling_power_measurement
from pycycling.cycling_speed_cadence_service import _parse_csc_measurement
from pycycling.ftms_parsers.indoor_bike_data import parse_indoor_bike_data
from pycycling.heart_rate_service import _parse_hr_measurement

from gatewayd.decode import gatt
from gatewayd.errors import DecodeError
from gatewayd.model import Measure, Reading

# Where a reference is wrong: what it does, and the clause that says otherwise.
KNOWN = {
    "pycycling-hr-contact": "pycycling reports contact when either of flags bits 1-2 is set; "
    "Heart Rate Service, Heart Rate Measurement flags: bit 2 = contact detection supported, "
    "bit 1 = contact detected, so 0b10 is 'no contact' and 0b01 'not supported'",
    "pycycling-cps-power-unsigned": "pycycling reads Instantaneous Power as uint16; Cycling Power "
    "Service, Cycling Power Measurement: Instantaneous Power is sint16 W",
    "bluetooth-sig-ftms-resistance-u8": "bluetooth-sig reads Indoor Bike/Rower Resistance Level "
    "as uint8 (GSS); FTMS v1.0's Indoor Bike Data and Rower Data (gatt-xml "
    "org.bluetooth.characteristic.indoor_bike_data / rower_data: Resistance Level sint16), and "
    "shipping bikes send 2 bytes (formats.md vectors)",
    "bluetooth-sig-treadmill-pace-u16": "bluetooth-sig reads Treadmill Instantaneous/Average "
    "Pace as uint16 (GSS); FTMS v1.0's Treadmill Data (gatt-xml "
    "org.bluetooth.characteristic.treadmill_data: Pace uint8, 0.1 km/min)",
    "lenient-truncation": "bluetooth-sig skips fields that do not fit and pycycling reads past "
    "the end; FTMS data characteristics: a field whose flag is set is present, so a value too "
    "short for its flags is malformed (gatewayd: DecodeError)",
}

SETTINGS = settings(
    max_examples=400,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

_Fields = dict[str, Any]


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)


def _agree(ours: _Fields, theirs: _Fields, frame: bytes, who: str) -> None:
    assert set(ours) == set(theirs), (who, frame.hex(), ours, theirs)
    for key, value in ours.items():
        want = theirs[key]
        if isinstance(value, tuple):
            assert len(value) == len(want) and all(
                _close(a, b) for a, b in zip(value, want, strict=True)
            ), (who, frame.hex(), key, value, want)
        else:
            assert _close(value, want), (who, frame.hex(), key, value, want)


def _ours(readings: list[Reading]) -> dict[Measure, Reading]:
    by = {r.measure: r for r in readings}
    assert len(by) == len(readings)
    return by


# Frames ----------------------------------------------------------------------------------------


def _u(size: int) -> st.SearchStrategy[bytes]:
    return st.binary(min_size=size, max_size=size)


@st.composite
def _hr_frames(draw: st.DrawFn) -> bytes:
    flags = draw(st.integers(0, 0xFF))
    body = draw(_u(2 if flags & 0x01 else 1))
    if flags & 0x08:
        body += draw(_u(2))
    if flags & 0x10:
        body += draw(_u(2 * draw(st.integers(0, 8))))
    return bytes([flags]) + body


@st.composite
def _csc_frames(draw: st.DrawFn) -> bytes:
    flags = draw(st.integers(0, 3))
    return bytes([flags]) + draw(_u(6 if flags & 1 else 0)) + draw(_u(4 if flags & 2 else 0))


_CPS_SIZES = ((0x01, 1), (0x04, 2), (0x10, 6), (0x20, 4), (0x40, 4), (0x80, 4), (0x100, 3),
              (0x200, 2), (0x400, 2), (0x800, 2))  # fmt: skip


@st.composite
def _cps_frames(draw: st.DrawFn) -> bytes:
    flags = draw(st.integers(0, 0x1FFF))
    if flags & 0x40:  # CPS 3.2.1.1: forces and torques are never both present
        flags &= ~0x80
    frame = struct.pack("<H", flags) + draw(_u(2))
    for bit, size in _CPS_SIZES:
        if flags & bit:
            frame += draw(_u(size))
    return frame


@st.composite
def _rsc_frames(draw: st.DrawFn) -> bytes:
    flags = draw(st.integers(0, 7))
    return (
        bytes([flags])
        + draw(_u(3))
        + draw(_u(2 if flags & 1 else 0))
        + draw(_u(4 if flags & 2 else 0))
    )


# FTMS v1.0 field sizes by flag bit (bit 0 present when clear).
_BIKE = (2, 2, 2, 2, 3, 2, 2, 2, 5, 1, 1, 2, 2)
_TREADMILL = (2, 2, 3, 4, 4, 1, 1, 5, 1, 1, 2, 2, 4)
_ROWER = (3, 1, 3, 2, 2, 2, 2, 2, 5, 1, 1, 2, 2)


def _ftms_frames(sizes: tuple[int, ...]) -> st.SearchStrategy[tuple[bytes, int]]:
    """A well-formed frame, and how many bytes to cut off its end (mostly none)."""

    @st.composite
    def frames(draw: st.DrawFn) -> tuple[bytes, int]:
        flags = draw(st.integers(0, 0x1FFF))
        frame = struct.pack("<H", flags)
        for bit, size in enumerate(sizes):
            if bool(flags >> bit & 1) != (bit == 0):
                frame += draw(_u(size))
        cut = draw(st.sampled_from([0, 0, 0, 1, 2]))
        return frame, min(cut, len(frame) - 2)

    return frames()


def _fields_of(sizes: tuple[int, ...], flags: int, frame: bytes) -> dict[int, bytes]:
    out, pos = {}, 2
    for bit, size in enumerate(sizes):
        if bool(flags >> bit & 1) != (bit == 0):
            out[bit] = frame[pos : pos + size]
            pos += size
    return out


def _rebuild(flags: int, fields: dict[int, bytes]) -> bytes:
    return struct.pack("<H", flags) + b"".join(fields[bit] for bit in sorted(fields))


# Heart rate 0x2A37 -------------------------------------------------------------------------


def _hr_ours(frame: bytes) -> _Fields:
    by = _ours(gatt.heart_rate_measurement(frame))
    out: _Fields = {"hr": by[Measure.HEART_RATE].value}
    if Measure.CONTACT in by:
        out["contact"] = by[Measure.CONTACT].value
    if Measure.ENERGY in by:
        out["kj"] = by[Measure.ENERGY].value * 4.184
    if Measure.RR_INTERVALS in by:
        out["rr_ms"] = by[Measure.RR_INTERVALS].values
    return out


@given(_hr_frames())
@SETTINGS
def test_heart_rate_agrees_with_bluetooth_sig_and_pycycling(frame: bytes) -> None:
    ours = _hr_ours(frame)
    ref = HeartRateMeasurementCharacteristic().parse_value(frame)
    theirs: _Fields = {"hr": ref.heart_rate}
    if ref.sensor_contact.name != "NOT_SUPPORTED":
        theirs["contact"] = float(ref.sensor_contact.name == "DETECTED")
    if ref.energy_expended is not None:
        theirs["kj"] = ref.energy_expended
    if ref.rr_intervals:
        theirs["rr_ms"] = tuple(s * 1000.0 for s in ref.rr_intervals)
    _agree(ours, theirs, frame, "bluetooth-sig")

    pyc = _parse_hr_measurement(frame)
    theirs = {"hr": pyc.bpm}
    contact = frame[0] >> 1 & 3
    # KNOWN["pycycling-hr-contact"]: its bool says nothing about support; read the bits it saw.
    assert pyc.sensor_contact == bool(contact)
    if contact >= 2:
        theirs["contact"] = float(contact == 3)
    if pyc.energy_expended is not None:
        theirs["kj"] = pyc.energy_expended
    if pyc.rr_interval:
        theirs["rr_ms"] = tuple(v * 1000.0 / 1024.0 for v in pyc.rr_interval)
    _agree(ours, theirs, frame, "pycycling")


# CSC 0x2A5B --------------------------------------------------------------------------------


@given(_csc_frames())
@SETTINGS
def test_csc_agrees_with_bluetooth_sig_and_pycycling(frame: bytes) -> None:
    by = _ours(gatt.csc_measurement(frame))
    ours: _Fields = {}
    for measure, name in ((Measure.WHEEL_REVS, "wheel"), (Measure.CRANK_REVS, "crank")):
        if measure in by:
            assert by[measure].tick_hz == 1024.0
            ours[name] = (by[measure].count, by[measure].time / 1024.0)
    ref = CSCMeasurementCharacteristic().parse_value(frame)
    theirs: _Fields = {}
    if ref.cumulative_wheel_revolutions is not None:
        theirs["wheel"] = (ref.cumulative_wheel_revolutions, ref.last_wheel_event_time)
    if ref.cumulative_crank_revolutions is not None:
        theirs["crank"] = (ref.cumulative_crank_revolutions, ref.last_crank_event_time)
    _agree(ours, theirs, frame, "bluetooth-sig")
    pyc = _parse_csc_measurement(frame)
    theirs = {}
    if pyc.cumulative_wheel_revs is not None:
        theirs["wheel"] = (pyc.cumulative_wheel_revs, pyc.last_wheel_event_time / 1024.0)
    if pyc.cumulative_crank_revs is not None:
        theirs["crank"] = (pyc.cumulative_crank_revs, pyc.last_crank_event_time / 1024.0)
    _agree(ours, theirs, frame, "pycycling")


# CPS 0x2A63 --------------------------------------------------------------------------------


def _policy_balance(raw: int | None) -> float | None:
    # gatewayd drops a balance above 100 % (the field's range); 0xFF is "unknown" in both.
    return None if raw is None or raw > 200 else raw / 2.0


@given(_cps_frames())
@SETTINGS
def test_cycling_power_agrees_with_bluetooth_sig_and_pycycling(frame: bytes) -> None:
    by = _ours(gatt.cycling_power_measurement(frame))
    ours: _Fields = {"power": by[Measure.POWER].value}
    if Measure.BALANCE in by:
        ours["balance"] = by[Measure.BALANCE].value
    if Measure.WHEEL_REVS in by:
        assert by[Measure.WHEEL_REVS].tick_hz == 2048.0
        ours["wheel"] = (by[Measure.WHEEL_REVS].count, by[Measure.WHEEL_REVS].time / 2048.0)
    if Measure.CRANK_REVS in by:
        ours["crank"] = (by[Measure.CRANK_REVS].count, by[Measure.CRANK_REVS].time / 1024.0)

    ref = CyclingPowerMeasurementCharacteristic().parse_value(frame)
    theirs: _Fields = {"power": ref.instantaneous_power}
    raw_balance = frame[4] if frame[0] & 0x01 else None
    balance = _policy_balance(raw_balance)
    if balance is not None:
        theirs["balance"] = balance
        assert ref.pedal_power_balance == balance
    if ref.cumulative_wheel_revolutions is not None:
        theirs["wheel"] = (ref.cumulative_wheel_revolutions, ref.last_wheel_event_time)
    if ref.cumulative_crank_revolutions is not None:
        theirs["crank"] = (ref.cumulative_crank_revolutions, ref.last_crank_event_time)
    _agree(ours, theirs, frame, "bluetooth-sig")

    pyc = _parse_cycling_power_measurement(frame)
    # KNOWN["pycycling-cps-power-unsigned"]
    power = (
        pyc.instantaneous_power - 0x10000
        if pyc.instantaneous_power & 0x8000
        else pyc.instantaneous_power
    )
    theirs = {"power": power}
    balance = _policy_balance(pyc.pedal_power_balance)
    if balance is not None:
        theirs["balance"] = balance
    if pyc.cumulative_wheel_revs is not None:
        theirs["wheel"] = (pyc.cumulative_wheel_revs, pyc.last_wheel_event_time / 2048.0)
    if pyc.cumulative_crank_revs is not None:
        theirs["crank"] = (pyc.cumulative_crank_revs, pyc.last_crank_event_time / 1024.0)
    _agree(ours, theirs, frame, "pycycling")


# RSC 0x2A53 --------------------------------------------------------------------------------


@given(_rsc_frames())
@SETTINGS
def test_running_speed_cadence_agrees_with_bluetooth_sig(frame: bytes) -> None:
    by = _ours(gatt.rsc_measurement(frame))
    ours: _Fields = {"speed": by[Measure.SPEED].value, "cadence": by[Measure.STEPS_CADENCE].value}
    if Measure.STRIDE_LENGTH in by:
        ours["stride"] = by[Measure.STRIDE_LENGTH].value
    if Measure.DISTANCE in by:
        ours["distance"] = by[Measure.DISTANCE].value
    ref = RSCMeasurementCharacteristic().parse_value(frame)
    theirs: _Fields = {"speed": ref.instantaneous_speed, "cadence": ref.instantaneous_cadence}
    if ref.instantaneous_stride_length is not None:
        theirs["stride"] = ref.instantaneous_stride_length
    if ref.total_distance is not None:
        theirs["distance"] = ref.total_distance
    _agree(ours, theirs, frame, "bluetooth-sig")


# FTMS 0x2AD2, 0x2ACD, 0x2AD1 -----------------------------------------------------------------


def _ftms_ours(readings: list[Reading]) -> _Fields:
    names = {Measure.SPEED: "speed", Measure.CADENCE: "cadence", Measure.DISTANCE: "distance",
             Measure.POWER: "power", Measure.ENERGY: "energy", Measure.HEART_RATE: "hr",
             Measure.STROKE_RATE: "stroke_rate", Measure.STROKES: "strokes"}  # fmt: skip
    return {names[m]: r.value for m, r in _ours(readings).items()}


def _ftms_common(ref: Any, out: _Fields) -> _Fields:
    if ref.total_distance is not None:
        out["distance"] = ref.total_distance
    if ref.total_energy is not None and ref.total_energy != 0xFFFF:  # gatewayd: not available
        out["energy"] = ref.total_energy
    if ref.heart_rate:  # gatewayd: HR 0 from equipment means no strap, not reported
        out["hr"] = ref.heart_rate
    return out


def _check_ftms(
    decoder: Callable[[bytes], list[Reading]],
    frame: bytes,
    cut: int,
    references: list[tuple[str, Callable[[bytes], _Fields]]],
) -> None:
    if cut:
        # KNOWN["lenient-truncation"]: the references read what fits; gatewayd refuses.
        with pytest.raises(DecodeError, match="need"):
            decoder(frame[:-cut])
        return
    ours = _ftms_ours(decoder(frame))
    for who, reference in references:
        _agree(ours, reference(frame), frame, who)


def _bike_bluetooth_sig(frame: bytes) -> _Fields:
    flags = struct.unpack_from("<H", frame)[0]
    if flags & 0x20:  # KNOWN["bluetooth-sig-ftms-resistance-u8"]: give it the width it reads
        fields = _fields_of(_BIKE, flags, frame)
        fields[5] = fields[5][:1]
        frame = _rebuild(flags, fields)
    ref = IndoorBikeDataCharacteristic().parse_value(frame, validate=False)
    out: _Fields = {}
    if ref.instantaneous_speed is not None:
        out["speed"] = ref.instantaneous_speed / 3.6
    if ref.instantaneous_cadence is not None:
        out["cadence"] = ref.instantaneous_cadence
    if ref.instantaneous_power is not None:
        out["power"] = ref.instantaneous_power
    return _ftms_common(ref, out)


def _bike_pycycling(frame: bytes) -> _Fields:
    ref = parse_indoor_bike_data(frame)
    out: _Fields = {}
    if ref.instant_speed is not None:
        out["speed"] = ref.instant_speed / 3.6
    if ref.instant_cadence is not None:
        out["cadence"] = ref.instant_cadence
    if ref.instant_power is not None:
        out["power"] = ref.instant_power
    if ref.total_distance is not None:
        out["distance"] = ref.total_distance
    if ref.total_energy is not None and ref.total_energy != 0xFFFF:
        out["energy"] = ref.total_energy
    if ref.heart_rate:
        out["hr"] = ref.heart_rate
    return out


@given(_ftms_frames(_BIKE))
@SETTINGS
def test_ftms_indoor_bike_agrees_with_bluetooth_sig_and_pycycling(case: tuple[bytes, int]) -> None:
    frame, cut = case
    _check_ftms(
        gatt.ftms_indoor_bike,
        frame,
        cut,
        [("bluetooth-sig", _bike_bluetooth_sig), ("pycycling", _bike_pycycling)],
    )


def _treadmill_bluetooth_sig(frame: bytes) -> _Fields:
    flags = struct.unpack_from("<H", frame)[0]
    if flags & 0x60:  # KNOWN["bluetooth-sig-treadmill-pace-u16"]: give it the width it reads
        fields = _fields_of(_TREADMILL, flags, frame)
        for bit in (5, 6):
            if bit in fields:
                fields[bit] += b"\x00"
        frame = _rebuild(flags, fields)
    ref = TreadmillDataCharacteristic().parse_value(frame, validate=False)
    out: _Fields = {}
    if ref.instantaneous_speed is not None:
        out["speed"] = ref.instantaneous_speed / 3.6
    if ref.power_output is not None:
        out["power"] = ref.power_output
    return _ftms_common(ref, out)


@given(_ftms_frames(_TREADMILL))
@SETTINGS
def test_ftms_treadmill_agrees_with_bluetooth_sig(case: tuple[bytes, int]) -> None:
    frame, cut = case
    _check_ftms(gatt.ftms_treadmill, frame, cut, [("bluetooth-sig", _treadmill_bluetooth_sig)])


def _rower_bluetooth_sig(frame: bytes) -> _Fields:
    flags = struct.unpack_from("<H", frame)[0]
    if flags & 0x80:  # KNOWN["bluetooth-sig-ftms-resistance-u8"]
        fields = _fields_of(_ROWER, flags, frame)
        fields[7] = fields[7][:1]
        frame = _rebuild(flags, fields)
    ref = RowerDataCharacteristic().parse_value(frame, validate=False)
    out: _Fields = {}
    if ref.stroke_rate is not None:
        out["stroke_rate"] = ref.stroke_rate
        out["strokes"] = ref.stroke_count
    if ref.instantaneous_pace not in (None, 0, 0xFFFF):
        out["speed"] = 500.0 / ref.instantaneous_pace
    if ref.instantaneous_power is not None:
        out["power"] = ref.instantaneous_power
    return _ftms_common(ref, out)


@given(_ftms_frames(_ROWER))
@SETTINGS
def test_ftms_rower_agrees_with_bluetooth_sig(case: tuple[bytes, int]) -> None:
    frame, cut = case
    _check_ftms(gatt.ftms_rower, frame, cut, [("bluetooth-sig", _rower_bluetooth_sig)])


def test_every_known_disagreement_names_its_clause() -> None:
    assert all(len(clause) > 40 for clause in KNOWN.values())


def test_the_issue_frames_against_the_references() -> None:
    # One byte short: both references read a one-byte resistance and -1536 W; gatewayd refuses.
    short = bytes.fromhex("6402c409b4001400fa00")
    assert IndoorBikeDataCharacteristic().parse_value(short).instantaneous_power == -1536
    with pytest.raises(DecodeError):
        gatt.ftms_indoor_bike(short)
