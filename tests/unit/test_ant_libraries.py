"""The internals of openant and pyusb that gatewayd.sources.ant relies on, pinned.

The source replaces openant's `Ant.read_message` on the instance and handles broadcast and
acknowledged data itself, as openant's reader loop (`Ant._worker`) would; it reads the stick
through pyusb's backend as pyusb's `Endpoint.read` would. If a new openant or pyusb changes any
of what is asserted here, these tests fail first: read `_Stick._read_message`, `_Stick.open`
and `_UsbLink.open` again before changing the assertions.
"""

from __future__ import annotations

import array
import collections
import functools
import operator
import random
import threading
from typing import Any

import pytest
import usb.core
import usb.util
from openant.base import driver as openant_driver
from openant.base.ant import Ant
from openant.base.message import Message

from gatewayd.sources.ant import _BROADCAST, _DATA_IDS, _UsbLink
from tests.fakes.fake_ant_stick import FakeAntStick, FakeUsbBackend

CHANNEL = 0


def content(page_byte: int) -> array.array[int]:
    # channel, an 8-byte page, the extended flag byte and a channel id (device 0x1234, HR)
    return array.array("B", [CHANNEL, 4, 0, 0, 0, 0, 0, page_byte, 60, 0x80, 0x34, 0x12, 120, 1])


class _Written:
    def __init__(self) -> None:
        self.messages: list[bytes] = []

    def write(self, data: array.array[int]) -> None:
        self.messages.append(bytes(data))


def bare_ant(messages: list[Message]) -> tuple[Any, list[tuple[str, bytes]], _Written]:
    """openant's Ant with its real reader loop, minus the USB stick: read_message gives
    `messages` and then stops the loop, the way the source's replacement is called."""
    ant: Any = Ant.__new__(Ant)
    ant._driver = _Written()
    ant._message_queue_cond = threading.Condition()
    ant._message_queue = collections.deque()
    ant._buffer = array.array("B")
    ant._burst_data = array.array("B")
    ant._last_data = array.array("B")
    ant._running = True
    seen: list[tuple[str, bytes]] = []
    pending = list(messages)

    def read_message() -> Message | None:
        if not pending:
            ant._running = False
            return None
        return pending.pop(0)

    ant.read_message = read_message  # an instance attribute wins, as in _Stick.open
    ant._on_broadcast = lambda m: seen.append(("broadcast", bytes(m._data)))
    ant._on_acknowledge = lambda m: seen.append(("acknowledged", bytes(m._data)))
    return ant, seen, ant._driver


def test_the_reader_loop_reads_through_the_instances_read_message_until_it_gives_none() -> None:
    ant, seen, _ = bare_ant([Message(_BROADCAST, content(1))])
    ant._worker()
    assert seen == [("broadcast", bytes(content(1)))]
    assert not ant._running


def test_a_broadcast_identical_to_the_message_before_is_dropped_an_acknowledged_one_is_not() -> (
    None
):
    ack = Message.ID.ACKNOWLEDGED_DATA
    ant, seen, _ = bare_ant(
        [
            Message(_BROADCAST, content(1)),
            Message(_BROADCAST, content(1)),  # a repeat: dropped
            Message(_BROADCAST, content(2)),
            Message(ack, content(2)),  # the same content acknowledged: passed on
            Message(_BROADCAST, content(2)),  # same as the acknowledged message before: dropped
            Message(ack, content(2)),
        ]
    )
    ant._worker()
    assert seen == [
        ("broadcast", bytes(content(1))),
        ("broadcast", bytes(content(2))),
        ("acknowledged", bytes(content(2))),
        ("acknowledged", bytes(content(2))),
    ]
    # it remembers the last message's content, of whatever kind, in _last_data
    assert bytes(ant._last_data) == bytes(content(2))


def test_the_reader_loop_remembers_every_messages_content_not_only_data() -> None:
    status = Message(Message.ID.RESPONSE_CHANNEL_STATUS, array.array("B", [CHANNEL, 3]))
    ant, _, _ = bare_ant([Message(_BROADCAST, content(1)), status])
    ant._events = _Events()
    ant._worker()
    assert bytes(ant._last_data) == bytes([CHANNEL, 3])


class _Events:
    def __init__(self) -> None:
        self.items: list[object] = []

    def put(self, item: object) -> None:
        self.items.append(item)


def test_time_slot_sends_wait_in_message_queue_and_go_after_a_broadcast() -> None:
    # The source hands a data message back to openant's loop while anything waits here.
    ant, _, written = bare_ant([Message(_BROADCAST, content(1))])
    queued = Message(Message.ID.ACKNOWLEDGED_DATA, content(9))
    ant.write_message_timeslot(queued)
    assert list(ant._message_queue) == [queued]
    ant._worker()
    assert written.messages == [bytes(queued.get())]
    assert not ant._message_queue


def test_message_keeps_id_content_and_checksum_where_the_source_reads_them() -> None:
    packet = bytes([0xA4, 14, _BROADCAST, *content(7)])
    checksum = 0
    for byte in packet:
        checksum ^= byte
    message = Message(packet[2], array.array("B", packet[3:]))
    assert message._id == _BROADCAST
    assert bytes(message._data) == bytes(content(7))
    assert message._checksum == checksum
    assert bytes(message.get()) == packet + bytes([checksum])
    assert {Message.ID.BROADCAST_DATA, Message.ID.ACKNOWLEDGED_DATA} == _DATA_IDS
    assert (Message.ID.BROADCAST_DATA, Message.ID.ACKNOWLEDGED_DATA) == (0x4E, 0x4F)


def test_a_messages_bytes_xor_to_zero_exactly_when_openants_checksum_matches() -> None:
    # _read_message reads data messages without openant's Message: a message is good when the
    # XOR of all its bytes, checksum included, is 0; its content is what Message holds.
    rng = random.Random(17)
    for _ in range(2000):
        content = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 30)))
        msg_id = rng.choice([_BROADCAST, Message.ID.ACKNOWLEDGED_DATA, 0x40, 0x52, 0x6F])
        checksum = rng.randrange(256)
        packet = bytes([0xA4, len(content), msg_id, *content, checksum])
        message = Message(packet[2], array.array("B", packet[3:-1]))
        assert (functools.reduce(operator.xor, packet) == 0) == (message._checksum == checksum)
        assert bytes(message._data) == packet[3:-1] and message._id == packet[2]


def test_an_empty_message_cannot_be_built() -> None:
    # why the source drops a message without content instead of handing it to openant
    with pytest.raises(TypeError):
        Message(0x6F, array.array("B"))


def test_drivers_are_found_from_the_last_registered_first() -> None:
    class Mine(openant_driver.Driver):  # type: ignore[misc]
        @classmethod
        def find(cls) -> bool:
            return True

        def __init__(self) -> None:
            pass

    openant_driver.drivers.append(Mine)
    try:
        assert isinstance(openant_driver.find_driver(), Mine)
    finally:
        openant_driver.drivers.remove(Mine)


# -- pyusb --------------------------------------------------------------------------------------


class _RecordingBackend(FakeUsbBackend):
    def __init__(self) -> None:
        super().__init__()
        self.reads: list[tuple[object, int, int, int, int]] = []

    def bulk_read(
        self, dev_handle: Any, ep: int, intf: int, buff: array.array[int], timeout: int
    ) -> int:
        self.reads.append((dev_handle, ep, intf, id(buff), timeout))
        return super().bulk_read(dev_handle, ep, intf, buff, timeout)


def test_endpoint_read_is_the_backends_bulk_read_with_the_claimed_handle() -> None:
    backend = _RecordingBackend()
    stick = FakeAntStick()
    backend.plug(stick)
    device = usb.core.find(idVendor=0x0FCF, backend=backend)
    link = _UsbLink(device, "the stick", lambda reason: None)
    link.open()
    try:
        context = device._ctx
        assert context.backend is backend and context.handle is not None
        interface = device.get_active_configuration()[(0, 0)]
        endpoint = link._in
        assert usb.util.endpoint_type(endpoint.bmAttributes) == usb.util.ENDPOINT_TYPE_BULK
        buffer = usb.util.create_buffer(64)
        stick.inject_bytes(b"\xa4\x01\x6f\x20\x5a")
        assert endpoint.read(buffer, timeout=100) == 5  # pyusb's own path
        stick.inject_bytes(b"\xa4\x01\x6f\x20\x5a")
        assert link.read_into(buffer) == 5  # ours
        assert bytes(buffer[:5]) == b"\xa4\x01\x6f\x20\x5a"
        ours = (context.handle, endpoint.bEndpointAddress, interface.bInterfaceNumber, id(buffer))
        assert [call[:4] for call in backend.reads] == [ours, ours]
        with pytest.raises(usb.core.USBTimeoutError):
            link.read_into(buffer)  # a timeout reaches openant's loop as pyusb raises it
    finally:
        link.close()
        stick.close()
