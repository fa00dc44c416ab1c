"""BLE GATT characteristics (formats.md part A). Little-endian throughout."""

from __future__ import annotations

from gatewayd.errors import DecodeError
from gatewayd.model import Measure, Reading

HEART_RATE_MEASUREMENT = "2a37"

_KJ_TO_KCAL = 1.0 / 4.184


def heart_rate_measurement(data: bytes) -> list[Reading]:
    """0x2A37: flags, HR u8|u16, [energy u16 kJ], [RR u16 1/1024 s ...]."""
    profile = "hrm"
    if len(data) < 2:
        raise DecodeError(profile, "shorter than flags + heart rate", data)
    flags = data[0]
    pos = 1
    if flags & 0x01:
        if len(data) < 3:
            raise DecodeError(profile, "flags say u16 heart rate but only 1 byte follows", data)
        hr = data[1] | data[2] << 8
        pos = 3
    else:
        hr = data[1]
        pos = 2
    readings = [Reading(Measure.HEART_RATE, value=float(hr))]
    contact_bits = (flags >> 1) & 0x03
    if contact_bits >= 2:
        readings.append(Reading(Measure.CONTACT, value=float(contact_bits == 3)))
    if flags & 0x08:
        if len(data) < pos + 2:
            raise DecodeError(profile, "flags say energy expended but the bytes end", data)
        kj = data[pos] | data[pos + 1] << 8
        readings.append(Reading(Measure.ENERGY, value=kj * _KJ_TO_KCAL))
        pos += 2
    if flags & 0x10:
        rest = len(data) - pos
        if rest % 2:
            raise DecodeError(profile, "RR intervals are not whole u16 values", data)
        rr = tuple((data[i] | data[i + 1] << 8) * 1000.0 / 1024.0 for i in range(pos, len(data), 2))
        if rr:
            readings.append(Reading(Measure.RR_INTERVALS, values=rr))
    elif len(data) != pos:
        raise DecodeError(profile, f"{len(data) - pos} bytes past the last field", data)
    return readings
