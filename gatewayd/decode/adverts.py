"""Heart rate carried in BLE advertisements, read without a connection (formats.md part A).

A Frame of kind "mfr:<company id, 4 lowercase hex digits>" carries the manufacturer-specific data
of one advertisement WITHOUT the 2-byte company id: exactly the bytes bleak gives as
`AdvertisementData.manufacturer_data[company_id]`.
"""

from __future__ import annotations

from gatewayd.errors import DecodeError
from gatewayd.model import Measure, Reading

POLAR = "mfr:006b"
POLAR_COMPANY_ID = 0x006B

_GPB = 0x40  # a block header with this bit set is not heart rate data


def polar(data: bytes) -> list[Reading]:
    """Polar HR broadcast (company 0x006B): [flags][kHz][fastHR][slowHR] among other blocks."""
    profile = "polar-adv"
    if not data:
        raise DecodeError(profile, "empty manufacturer data", data)
    pos = 0
    block = b""
    while pos < len(data):
        header = data[pos]
        if header & _GPB:
            if pos + 1 >= len(data):
                raise DecodeError(profile, f"block at byte {pos} has no length byte", data)
            end = pos + 2 + data[pos + 1]
            if end > len(data):
                raise DecodeError(profile, f"block at byte {pos} runs past the end", data)
            pos = end
            continue
        rest = len(data) - pos
        if rest < 3:
            raise DecodeError(profile, f"heart rate block at byte {pos} is {rest} bytes", data)
        # Old H6/H7 firmware sends 3 bytes (HR in byte 2); newer ones 4 (slow average HR last).
        size = 3 if rest == 3 else 4
        block = data[pos : pos + size]
        pos += size
    if not block:
        return []  # a Polar device advertising, but not broadcasting heart rate
    flags = block[0]
    counter = (flags >> 2) & 0x07  # changes when the strap has a new measurement
    return [
        Reading(Measure.HEART_RATE, value=float(block[-1]), count=counter, count_mod=8),
        Reading(Measure.CONTACT, value=float(flags >> 1 & 1)),
    ]


DECODERS = {POLAR: polar}
