"""PURE decoders: a Frame's bytes -> Readings, or DecodeError. Nothing else escapes a decoder.

`DECODERS` maps a Frame.kind to its decoder; `PROFILES` maps the CLI's profile names (as in
`gatewayd decode hrm 163C1104`) to the kind they decode. Every decoder's docstring is one line,
usable as that profile's help text (`describe_profile`).

Kinds: a GATT characteristic as 4 lowercase hex digits ("2a37"); a BLE advertisement's
manufacturer data as "mfr:<company id>" with the bytes after the company id ("mfr:006b"); an ANT+
data page as "ant:<device type>" with the 8-byte page. "ant-frame" (a whole ANT serial message) is
for the CLI and tests only; no radio Frame has that kind.
"""

from __future__ import annotations

from collections.abc import Callable

from gatewayd.decode import adverts, antplus, gatt
from gatewayd.errors import DecodeError
from gatewayd.model import Frame, Reading

Decoder = Callable[[bytes], list[Reading]]

DECODERS: dict[str, Decoder] = {**gatt.DECODERS, **adverts.DECODERS, **antplus.DECODERS}

PROFILES: dict[str, str] = {
    "hrm": gatt.HEART_RATE_MEASUREMENT,
    "body-location": gatt.BODY_SENSOR_LOCATION,
    "battery": gatt.BATTERY_LEVEL,
    "csc": gatt.CSC_MEASUREMENT,
    "cps": gatt.CYCLING_POWER_MEASUREMENT,
    "rsc": gatt.RSC_MEASUREMENT,
    "ftms-bike": gatt.FTMS_INDOOR_BIKE,
    "ftms-treadmill": gatt.FTMS_TREADMILL,
    "ftms-rower": gatt.FTMS_ROWER,
    "polar-adv": adverts.POLAR,
    "ant-frame": antplus.KIND_SERIAL,
    "ant-hr": antplus.KIND_HR,
    "ant-power": antplus.KIND_POWER,
    "ant-sc": antplus.KIND_SPEED_CADENCE,
    "ant-cadence": antplus.KIND_CADENCE,
    "ant-speed": antplus.KIND_SPEED,
    "ant-sdm": antplus.KIND_SDM,
    "ant-fe": antplus.KIND_FE,
}


def describe_profile(profile: str) -> str:
    """The first docstring line of a profile's decoder: its help text."""
    doc = DECODERS[PROFILES[profile]].__doc__ or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def decode(frame: Frame) -> list[Reading]:
    """Decode one Frame; an unknown kind is a DecodeError like any other bad input."""
    decoder = DECODERS.get(frame.kind)
    if decoder is None:
        raise DecodeError(frame.kind, "no decoder for this kind of frame", frame.payload)
    return decoder(frame.payload)
