"""PURE decoders: a Frame's bytes -> Readings, or DecodeError. Nothing else escapes a decoder.

`DECODERS` maps a Frame.kind to its decoder; `PROFILES` maps the CLI's profile names (as in
`gatewayd decode hrm 163C1104`) to the kind they decode.
"""

from __future__ import annotations

from collections.abc import Callable

from gatewayd.decode import antplus, gatt
from gatewayd.errors import DecodeError
from gatewayd.model import Frame, Reading

Decoder = Callable[[bytes], list[Reading]]

DECODERS: dict[str, Decoder] = {
    gatt.HEART_RATE_MEASUREMENT: gatt.heart_rate_measurement,
    antplus.KIND_HR: antplus.heart_rate,
}

PROFILES: dict[str, str] = {
    "hrm": gatt.HEART_RATE_MEASUREMENT,
    "ant-hr": antplus.KIND_HR,
}


def decode(frame: Frame) -> list[Reading]:
    """Decode one Frame; an unknown kind is a DecodeError like any other bad input."""
    decoder = DECODERS.get(frame.kind)
    if decoder is None:
        raise DecodeError(frame.kind, "no decoder for this kind of frame", frame.payload)
    return decoder(frame.payload)
