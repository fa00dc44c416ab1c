"""Polar heart rate in BLE manufacturer data (company 0x006B), without a connection."""

from __future__ import annotations

import pytest

from gatewayd.decode import adverts
from gatewayd.decode.counters import Deriver
from gatewayd.errors import DecodeError
from gatewayd.model import DataType, Measure, Reading


def _hr(readings: list[Reading]) -> float:
    return next(r.value for r in readings if r.measure is Measure.HEART_RATE)


def test_four_byte_block_uses_slow_average() -> None:
    readings = adverts.polar(bytes([0x1B, 0x00, 0x60, 0x5F]))
    assert _hr(readings) == 0x5F
    assert readings[0].count == 6 and readings[0].count_mod == 8
    assert Reading(Measure.CONTACT, value=1.0) in readings


def test_three_byte_block_old_h7() -> None:
    readings = adverts.polar(bytes([0x01, 0x00, 0x48]))
    assert _hr(readings) == 0x48
    assert Reading(Measure.CONTACT, value=0.0) in readings


def test_heart_rate_block_after_a_gpb_block() -> None:
    # OH1-style: a GPB block (bit 6 set, length 6) and then a 3-byte HR block.
    data = bytes.fromhex("72067f4437000000" + "33003c")
    assert _hr(adverts.polar(data)) == 60


def test_vantage_style_gpb_then_four_byte_block() -> None:
    data = bytes.fromhex("7208" + "0102030405060708" + "0D002E2F")
    assert _hr(adverts.polar(data)) == 0x2F


def test_only_gpb_blocks_is_no_heart_rate() -> None:
    assert adverts.polar(bytes.fromhex("720100")) == []


@pytest.mark.parametrize("hex_data", ["", "72", "7205000000", "1B00", "7201001B00"])
def test_malformed(hex_data: str) -> None:
    with pytest.raises(DecodeError) as caught:
        adverts.polar(bytes.fromhex(hex_data))
    assert caught.value.profile == "polar-adv"


def test_frame_counter_marks_new_data() -> None:
    deriver = Deriver()
    flags = [0x03 | c << 2 for c in (1, 1, 2, 2, 2, 3)]
    events = []
    for mono, flag in enumerate(flags):
        for reading in adverts.polar(bytes([flag, 0, 70, 70])):
            for derived in deriver.derive(reading, float(mono)):
                if derived.t is DataType.HEART_RATE:
                    events.append(derived.event)
    assert events == [True, False, True, False, False, True]
