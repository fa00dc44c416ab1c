"""NotifyBatcher on real sockets: readers like bleak's, moved off the loop and read along the
pipeline's own wake-ups (FrameQueue.add_drain). The fake BlueZ and bleak's real reader are in
tests/integration/test_ble.py; here the socket ends and the timing are under the test's hand."""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import socket
from collections.abc import AsyncIterator, Callable

import pytest

from gatewayd.clock import ManualClock
from gatewayd.model import Frame
from gatewayd.pipeline import FrameQueue
from gatewayd.sources.ble_batch import NotifyBatcher
from tests.helpers import START_WALL, until


class Strap:
    """One acquired notification socket with a reader shaped like bleak's: read a datagram,
    on an empty read with the peer gone remove itself and close the socket."""

    def __init__(self, name: str, room: Room) -> None:
        self.name = name
        self.ours, self.peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.fd = self.ours.detach()  # the fd alone, as bleak holds it
        self.peer.setblocking(False)
        self.closed = False
        loop = asyncio.get_running_loop()

        def on_data() -> None:
            data = os.read(self.fd, 1024)
            if not data:
                poll = select.poll()
                poll.register(self.fd, select.POLLHUP)
                if poll.poll(0):
                    loop.remove_reader(self.fd)
                    os.close(self.fd)
                    self.closed = True
                    return
            room.notes += 1
            room.heard.set()
            room.queue.put_quiet(
                Frame("ble", "hci0", name, "2a37", data, room.clock.mono(), room.clock.wall(), -60)
            )

        loop.add_reader(self.fd, on_data)

    def close(self) -> None:
        self.peer.close()
        if not self.closed:
            asyncio.get_running_loop().remove_reader(self.fd)
            os.close(self.fd)


class Room:
    """Three straps' sockets, the queue their frames go to, and a clock that moves by hand."""

    def __init__(self) -> None:
        # the middle of a second: the batcher's own timer is half a second away in real time
        self.clock = ManualClock(wall=START_WALL + 0.5)
        self.queue = FrameQueue()
        self.notes = 0  # notifications the readers delivered
        self.heard = asyncio.Event()  # set at each
        self.straps: list[Strap] = []

    def batcher(self) -> NotifyBatcher:
        return NotifyBatcher(1.0, self.clock.wall, lambda: self.notes)


@pytest.fixture
async def room() -> AsyncIterator[Room]:
    made = Room()
    made.straps = [Strap(f"strap{i}", made) for i in range(3)]
    try:
        yield made
    finally:
        for strap in made.straps:
            strap.close()


async def settle() -> None:
    """Let the loop turn a few times (a reader on it would run)."""
    for _ in range(10):
        await asyncio.sleep(0)


async def test_busy_sockets_are_read_when_the_pipeline_takes_frames(room: Room) -> None:
    queue, made, heard = room.queue, room.straps, room.heard
    batcher = room.batcher()
    queue.add_drain(batcher.flush)
    assert batcher.adopt({s.fd for s in made}) == 3

    # quiet: each notification is read as it arrives, by the reader we put on the loop
    made[0].peer.send(b"\x00\x40")
    await until(lambda: room.notes == 1, heard)
    assert not batcher.batching

    # busy (2 per socket in this second = 6/s, at least 1.5 per 1 s window): windowed
    for strap in made:
        strap.peer.send(b"\x00\x41")
        strap.peer.send(b"\x00\x42")
    await until(lambda: batcher.batching, batcher.switched)
    queue.take_all()
    read = room.notes
    assert read == 7

    # windowed: nothing wakes the loop for a notification ...
    for strap in made:
        strap.peer.send(b"\x00\x43")
    await settle()
    assert room.notes == read
    # ... the pipeline's take reads them, within the same call
    taken = queue.take_all()
    assert sorted((f.device_id, f.payload) for f in taken) == [(s.name, b"\x00\x43") for s in made]
    assert (batcher.flushes, batcher.windows) == (2, 0)

    # a socket that ends while windowed is forgotten once bleak's reader closed it
    made[1].peer.close()
    queue.take_all()
    assert made[1].closed and batcher.sockets == 2

    batcher.close()  # the readers go back on the loop: a notification wakes it again
    made[2].peer.send(b"\x00\x44")
    await until(lambda: room.notes == read + 4, heard)
    assert [f.payload for f in queue.take_all()] == [b"\x00\x44"]


async def test_a_window_of_its_own_reads_before_the_second_ends_without_the_pipeline(
    room: Room,
) -> None:
    queue, made, heard = room.queue, room.straps, room.heard
    room.clock.advance(0.45)  # 50 ms before the second ends: its window is due then, not in 1 s
    batcher = room.batcher()
    batcher.adopt({s.fd for s in made})
    for strap in made:
        for _ in range(3):
            strap.peer.send(b"\x00\x50")
    await until(lambda: batcher.batching, batcher.switched)
    await until(lambda: room.notes == 9, heard)
    made[0].peer.send(b"\x00\x51")
    await until(lambda: room.notes == 10, heard)
    assert batcher.windows >= 1 and batcher.flushes == 0, "nobody took frames: its own window"
    assert queue.take_all()[-1].payload == b"\x00\x51"
    batcher.close()


def test_a_drain_is_called_before_every_take_and_can_be_removed() -> None:
    queue = FrameQueue()
    calls: list[int] = []

    def drain() -> None:
        calls.append(len(queue))
        queue.put_quiet(Frame("ble", "hci0", "x", "2a37", b"\x00\x3c", 0.0, 0.0))

    queue.add_drain(drain)
    assert len(queue.take_all()) == 1, "what the drain queued is taken in the same call"
    queue.remove_drain(drain)
    queue.remove_drain(drain)  # twice: harmless
    assert queue.take_all() == [] and calls == [0]


async def test_bleaks_private_parts_we_lean_on_are_still_there() -> None:
    """ble.py narrows the readers it adopts to bleak's `_notification_fds` (char path -> fd), and
    the batcher finds bleak's reader in asyncio's selector map. If bleak renames either, ble.py
    falls back to every new SEQPACKET reader (or leaves the readers alone): this test says so."""
    from bleak.backends.bluezdbus.client import BleakClientBlueZDBus

    client = BleakClientBlueZDBus(
        "C0:FF:EE:00:00:01", disconnected_callback=None, timeout=1.0, bluez={}
    )
    assert isinstance(client._notification_fds, dict)
    ours, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    fd = ours.detach()
    got: list[bytearray] = []
    batcher = NotifyBatcher(1.0, ManualClock(wall=START_WALL).wall, lambda: len(got))
    before = batcher.readers()
    client._register_notify_fd_reader("/org/bluez/hci0/dev_x/char0010", fd, got.append)
    try:
        assert batcher.readers() - before == {fd}, "bleak reads the socket from a loop reader"
        assert batcher.adopt({fd}) == 1
        peer.send(b"\x00\x48")
        await turns(lambda: bool(got))
        # the reader we put on the loop called bleak's, which read and delivered the bytes
        assert got == [bytearray(b"\x00\x48")]
        peer.close()  # bleak reads the end and closes the socket; the batcher forgets it
        await turns(lambda: batcher.sockets == 0)
    finally:
        peer.close()
        batcher.close()
        with contextlib.suppress(OSError):
            os.close(fd)


async def turns(predicate: Callable[[], bool], limit: int = 1000) -> None:
    """Let the loop turn until `predicate()` (a reader on it has run); no timers involved."""
    for _ in range(limit):
        if predicate():
            return
        await asyncio.sleep(0)
    raise AssertionError("the loop turned and nothing happened")
