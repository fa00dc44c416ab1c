"""ANT+ data pages (formats.md part B). Every page is 8 bytes, little-endian."""

from __future__ import annotations

from gatewayd.errors import DecodeError
from gatewayd.model import Measure, Reading

KIND_HR = "ant:120"

PAGE_LEN = 8


def _page(profile: str, data: bytes) -> bytes:
    if len(data) != PAGE_LEN:
        raise DecodeError(profile, f"an ANT+ page is 8 bytes, got {len(data)}", data)
    return data


def heart_rate(data: bytes) -> list[Reading]:
    """Device type 120. Bytes 4-7 are the same on every page; bytes 1-3 depend on the page."""
    page = _page("ant-hr", data)
    beat_time = page[4] | page[5] << 8
    readings = [
        Reading(Measure.HEART_RATE, value=float(page[7])),
        Reading(
            Measure.HEART_BEATS,
            count=page[6],
            count_mod=256,
            time=beat_time,
            time_mod=65536,
            tick_hz=1024.0,
        ),
    ]
    page_number = page[0] & 0x7F
    if page_number == 7 and page[1] <= 100:
        readings.append(Reading(Measure.BATTERY, value=float(page[1])))
    return readings
