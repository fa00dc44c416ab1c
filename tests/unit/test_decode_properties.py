"""Any bytes into any decoder: Readings or DecodeError, never another exception."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gatewayd.decode import DECODERS, PROFILES
from gatewayd.decode.counters import Deriver
from gatewayd.errors import DecodeError
from gatewayd.model import Reading

EXAMPLES = 10_000


def _serial(msg_id: int, content: bytes) -> bytes:
    body = bytes([0xA4, len(content), msg_id]) + content
    check = 0
    for byte in body:
        check ^= byte
    return body + bytes([check])


# Shapes that get past the first length/flag checks often enough to reach every field path.
_ANY = st.binary(max_size=40)
_PAGE = st.binary(min_size=8, max_size=8)
_FLAGGED = st.builds(
    lambda flags, body: struct.pack("<H", flags) + body,
    st.integers(0, 0xFFFF),
    st.binary(max_size=30),
)
_KNOWN_PAGE = st.builds(
    lambda number, toggle, rest: bytes([number | toggle]) + rest,
    st.sampled_from(
        [
            0,
            1,
            2,
            3,
            4,
            5,
            6,
            7,
            0x10,
            0x11,
            0x12,
            16,
            18,
            19,
            20,
            21,
            22,
            23,
            24,
            25,
            26,
            0x50,
            0x51,
        ]
    ),
    st.sampled_from([0, 0x80]),
    st.binary(min_size=7, max_size=7),
)
_U8_FLAGGED = st.builds(
    lambda flags, body: bytes([flags]) + body, st.integers(0, 0xFF), st.binary(max_size=20)
)
_SMALL_FLAGGED = st.builds(  # few flag bits set, so the body length matches more often
    lambda bits, body: struct.pack("<H", sum(1 << b for b in bits)) + body,
    st.sets(st.integers(0, 15), max_size=4),
    st.binary(max_size=20),
)
_CHANNEL_ID = st.builds(
    lambda number, device_type, transmission: struct.pack(
        "<HBB", number, device_type, transmission
    ),
    st.integers(0, 0xFFFF),
    st.sampled_from([120, 11, 17, 121, 122, 123, 124, 0x80 | 120, 1, 0]),
    st.integers(0, 0xFF),
)
_SERIAL = st.builds(
    _serial,
    st.sampled_from([0x4E, 0x4F, 0x50, 0x40, 0x46, 0x6E]),
    st.one_of(
        st.binary(max_size=22),
        st.builds(
            lambda ch, page, flags, tail: bytes([ch]) + page + bytes([flags]) + tail,
            st.integers(0, 255),
            st.one_of(_PAGE, _KNOWN_PAGE),
            st.sampled_from([0x80, 0x40, 0x20, 0xC0, 0xA0, 0x60, 0xE0, 0x00, 0x10]),
            st.one_of(
                st.binary(max_size=12),
                st.builds(lambda a, b: a + b, _CHANNEL_ID, st.binary(max_size=6)),
            ),
        ),
    ),
)


def _strategy(kind: str) -> st.SearchStrategy[bytes]:
    if kind.startswith("ant:"):
        return st.one_of(_PAGE, _KNOWN_PAGE, _ANY)
    if kind == "ant-frame":
        return st.one_of(_SERIAL, _ANY)
    if kind in ("2a37", "2a5b", "2a53"):
        return st.one_of(_ANY, _U8_FLAGGED)
    return st.one_of(_ANY, _FLAGGED, _SMALL_FLAGGED)


def _check(kind: str, data: bytes) -> list[Reading]:
    try:
        readings = DECODERS[kind](data)
    except DecodeError as error:
        assert error.payload == data
        assert error.profile in PROFILES or error.profile == kind
        assert error.reason
        return []
    assert isinstance(readings, list)
    assert all(isinstance(r, Reading) for r in readings)
    return readings


@pytest.mark.parametrize("kind", sorted(DECODERS))
def test_any_bytes_decode_or_raise_decode_error(kind: str) -> None:
    @given(_strategy(kind))
    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    def run(data: bytes) -> None:
        _check(kind, data)

    run()


@pytest.mark.parametrize("kind", sorted(DECODERS))
def test_any_frame_sequence_derives_without_error(kind: str) -> None:
    @given(st.lists(_strategy(kind), min_size=2, max_size=8))
    @settings(max_examples=500, deadline=None)
    def run(frames: list[bytes]) -> None:
        deriver = Deriver()
        for index, data in enumerate(frames):
            for reading in _check(kind, data):
                for derived in deriver.derive(reading, index * 0.25):
                    assert (derived.val is None) != (derived.d is None)

    run()
