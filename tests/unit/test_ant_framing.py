"""How openant's reader thread sees the stick's bytes once gatewayd's hook frames them.

The hook (`_Stick._read_message`) is driven here the way openant's reader loop drives it, over
scripted USB transfers: data messages become Frames without reaching openant, everything else
comes back as openant's Message. Messages are built by the fake stick's encoder, and checked
against openant's own Message (tests/unit/test_ant_libraries.py).
"""

from __future__ import annotations

import array
import asyncio
import collections
from collections.abc import Iterator
from typing import Any

import pytest
import usb.core
from openant.base.message import Message

from gatewayd.clock import ManualClock
from gatewayd.config import AntConfig
from gatewayd.model import Frame
from gatewayd.pipeline import FrameQueue
from gatewayd.sources.ant import _Stick
from tests.fakes.fake_ant_stick import (
    ACKNOWLEDGED,
    BROADCAST,
    CHANNEL_STATUS,
    FakeAntStick,
    FakeUsbBackend,
    ant_message,
)

# extended tail: flags (channel id + RSSI), device 0x1234, type 120 (HR), transmission type 1,
# then RSSI: measurement type 0x20, -50 dBm, threshold -96 dBm
TAIL = bytes([0xC0, 0x34, 0x12, 120, 1, 0x20, (-50) & 0xFF, (-96) & 0xFF])


def data(msg_id: int, beat: int) -> bytes:
    page = bytes([4, 0xFF, 0, 0, 0, 0, beat, 60])
    return ant_message(msg_id, bytes([0, *page]) + TAIL)


class _Transfers:
    """The stick's USB transfers, one per read; then the reader is stopped."""

    def __init__(self, ant: Any, transfers: list[bytes]) -> None:
        self._ant = ant
        self._transfers = collections.deque(transfers)

    def read_into(self, buffer: array.array[int]) -> int:
        if not self._transfers:
            self._ant._running = False
            raise usb.core.USBTimeoutError("Timed out")
        chunk = self._transfers.popleft()
        buffer[: len(chunk)] = array.array("B", chunk)
        return len(chunk)


@pytest.fixture
def stick() -> Iterator[_Stick]:
    backend = FakeUsbBackend()
    fake = FakeAntStick()
    backend.plug(fake)
    device = usb.core.find(idVendor=0x0FCF, backend=backend)
    loop = asyncio.new_event_loop()
    frames = FrameQueue()
    frames.bind(loop)
    made = _Stick(device, AntConfig(enabled=True), frames, ManualClock(), lambda *_: "ant0", loop)
    made.adapter = "ant0"
    yield made
    loop.close()
    fake.close()


def read_all(stick: _Stick, transfers: list[bytes]) -> tuple[list[Any], list[Frame], Any]:
    """Call the hook as openant's loop does until it gives None; the messages it returned and
    the frames it queued."""
    ant: Any = type("Ant", (), {})()
    ant._running = True
    ant._buffer = array.array("B")
    ant._message_queue = collections.deque()
    ant._last_data = array.array("B")
    stick._link = _Transfers(ant, transfers)  # type: ignore[assignment]
    returned: list[Any] = []
    while (message := stick._read_message(ant)) is not None:
        returned.append((message._id, bytes(message._data), bytes(ant._last_data)))
    return returned, stick._frames.take_all(), ant


def test_data_becomes_frames_and_everything_else_openants_messages(stick: _Stick) -> None:
    status = ant_message(CHANNEL_STATUS, bytes([0, 0x03]))
    returned, frames, _ = read_all(
        stick, [data(BROADCAST, 1) + data(ACKNOWLEDGED, 2) + status + data(BROADCAST, 3)]
    )
    assert [f.payload[6] for f in frames] == [1, 2, 3]
    assert {(f.device_id, f.kind, f.rssi, f.adapter) for f in frames} == {
        ("120:4660", "ant:120", -50, "ant0")  # device number 0x1234 (transmission type 1)
    }
    # openant's loop gets the status, and the content of the message before it to compare with
    assert returned == [(CHANNEL_STATUS, bytes([0, 0x03]), bytes(data(ACKNOWLEDGED, 2)[3:-1]))]


def test_a_broadcast_identical_to_the_message_before_is_dropped(stick: _Stick) -> None:
    _, frames, _ = read_all(
        stick,
        [
            data(BROADCAST, 1) + data(BROADCAST, 1),  # a repeat: dropped
            data(ACKNOWLEDGED, 1) + data(ACKNOWLEDGED, 1),  # acknowledged: never dropped
            data(BROADCAST, 1),  # the same as the message before (acknowledged): dropped
        ],
    )
    assert len(frames) == 3 and stick.frames_out == 3


def test_a_message_torn_across_transfers_is_put_together(stick: _Stick) -> None:
    message = data(BROADCAST, 7)
    _, frames, _ = read_all(stick, [message[:2], message[2:9], message[9:] + data(BROADCAST, 8)])
    assert [f.payload[6] for f in frames] == [7, 8]
    assert stick.bad_bytes == 0


def test_noise_bad_checksums_and_empty_messages_are_skipped(stick: _Stick) -> None:
    damaged = bytearray(data(BROADCAST, 5))
    damaged[-1] ^= 0xFF
    empty = ant_message(0x6F, b"")
    _, frames, _ = read_all(
        stick, [b"\x00\x13" + bytes(damaged) + empty + data(BROADCAST, 6) + b"\x37"]
    )
    assert [f.payload[6] for f in frames] == [6]
    # the noise, then the damaged message's and the empty one's bytes up to the next sync byte
    # (they hold no other 0xA4); the trailing byte waits for the next transfer
    assert stick.bad_bytes == 2 + len(damaged) + len(empty)


def test_data_goes_through_openants_loop_while_something_waits_for_a_time_slot(
    stick: _Stick,
) -> None:
    ant: Any = type("Ant", (), {})()
    ant._running = True
    ant._buffer = array.array("B")
    ant._message_queue = collections.deque([Message(ACKNOWLEDGED, [0] * 9)])
    ant._last_data = array.array("B")
    stick._link = _Transfers(ant, [data(BROADCAST, 4)])  # type: ignore[assignment]
    message = stick._read_message(ant)
    assert message is not None and message._id == BROADCAST
    assert bytes(message._data) == data(BROADCAST, 4)[3:-1]
    assert stick.frames_out == 0


def test_bytes_openants_own_reader_left_are_read_first(stick: _Stick) -> None:
    ant: Any = type("Ant", (), {})()
    ant._running = True
    ant._buffer = array.array("B", data(BROADCAST, 9)[:5])  # openant read these before the hook
    ant._message_queue = collections.deque()
    ant._last_data = array.array("B")
    stick._link = _Transfers(ant, [data(BROADCAST, 9)[5:]])  # type: ignore[assignment]
    assert stick._read_message(ant) is None
    assert [f.payload[6] for f in stick._frames.take_all()] == [9]
    assert len(ant._buffer) == 0
