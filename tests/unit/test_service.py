"""sd_notify against a real AF_UNIX datagram socket the test owns, as systemd would hold it."""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from gatewayd.service import Notifier, Service, watchdog_interval

GUARD_S = 10.0


class NotifySocket:
    """The receiving end of $NOTIFY_SOCKET; `address` is what systemd would put in the variable."""

    def __init__(self, sock: socket.socket, address: str) -> None:
        self.sock = sock
        self.address = address

    async def next(self) -> dict[str, str]:
        loop = asyncio.get_running_loop()
        data = await asyncio.wait_for(loop.sock_recv(self.sock, 65536), GUARD_S)
        return dict(line.split("=", 1) for line in data.decode().split("\n"))

    async def until(self, key: str) -> dict[str, str]:
        while True:
            message = await self.next()
            if key in message:
                return message


def _bind(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.setblocking(False)
    return sock


@pytest.fixture
def abstract_socket() -> Iterator[NotifySocket]:
    # Abstract names live in the network namespace, not on disk: unique per test, no cleanup.
    name = f"gatewayd-test-{uuid.uuid4().hex}"
    sock = _bind("\0" + name)
    yield NotifySocket(sock, "@" + name)
    sock.close()


@pytest.fixture
def path_socket(tmp_path: Path) -> Iterator[NotifySocket]:
    path = tmp_path / "notify"
    if len(str(path)) >= 100:  # sun_path holds 108 bytes; pytest's tmp paths can be long
        short = Path("/tmp") / f"gwd-{uuid.uuid4().hex[:12]}"
        path = short
    sock = _bind(str(path))
    yield NotifySocket(sock, str(path))
    sock.close()
    path.unlink(missing_ok=True)


@pytest.fixture
async def running() -> AsyncIterator[list[asyncio.Task[None]]]:
    tasks: list[asyncio.Task[None]] = []
    yield tasks
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def test_ready_carries_the_status_line(abstract_socket: NotifySocket) -> None:
    service = Service(Notifier(abstract_socket.address), lambda: "4 devices,\n 2 consumers")
    service.ready()
    message = await abstract_socket.next()
    assert message == {"READY": "1", "STATUS": "4 devices, 2 consumers"}


async def test_a_filesystem_socket_path_works_too(path_socket: NotifySocket) -> None:
    notifier = Notifier(path_socket.address)
    assert notifier.stopping("bye")
    assert await path_socket.next() == {"STOPPING": "1", "STATUS": "bye"}
    notifier.close()


async def test_watchdog_pings_come_from_the_event_loop(
    abstract_socket: NotifySocket, running: list[asyncio.Task[None]]
) -> None:
    env = {"NOTIFY_SOCKET": abstract_socket.address, "WATCHDOG_USEC": "100000"}
    service = Service.from_env(env=env)
    assert service.watchdog_s == pytest.approx(0.05)
    running.append(asyncio.create_task(service.run()))
    for _ in range(3):
        assert await abstract_socket.until("WATCHDOG") == {"WATCHDOG": "1"}


async def test_status_is_sent_when_it_changes_only(
    abstract_socket: NotifySocket, running: list[asyncio.Task[None]]
) -> None:
    summaries = iter(["1 device", "1 device", "1 device", "2 devices"])
    last = ["2 devices"]

    def summary() -> str:
        return next(summaries, last[0])

    service = Service(Notifier(abstract_socket.address), summary, status_every_s=0.01)
    service.ready()
    assert await abstract_socket.next() == {"READY": "1", "STATUS": "1 device"}
    running.append(asyncio.create_task(service.run()))
    # The next datagram is the change, not a repeat of the unchanged "1 device".
    assert await abstract_socket.next() == {"STATUS": "2 devices"}


async def test_a_failing_summary_does_not_stop_the_watchdog(
    abstract_socket: NotifySocket, running: list[asyncio.Task[None]]
) -> None:
    def summary() -> str:
        raise RuntimeError("boom")

    service = Service(Notifier(abstract_socket.address), summary, watchdog_s=0.01)
    running.append(asyncio.create_task(service.run()))
    assert await abstract_socket.until("WATCHDOG") == {"WATCHDOG": "1"}
    assert await abstract_socket.until("WATCHDOG") == {"WATCHDOG": "1"}


def test_watchdog_interval_is_half_of_watchdog_usec() -> None:
    assert watchdog_interval({"WATCHDOG_USEC": "20000000"}) == 10.0
    mine = {"WATCHDOG_USEC": "20000000", "WATCHDOG_PID": str(os.getpid())}
    assert watchdog_interval(mine) == 10.0


def test_no_watchdog_when_not_asked_or_meant_for_another_process() -> None:
    assert watchdog_interval({}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "junk"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"}, pid=4242) is None


async def test_outside_systemd_everything_is_a_no_op() -> None:
    service = Service.from_env(lambda: "x", env={})
    assert not service.enabled
    service.ready()
    service.stopping()
    # run() returns at once instead of looping forever.
    await asyncio.wait_for(service.run(), GUARD_S)
    assert service.notifier.sent == 0


def test_a_vanished_socket_is_counted_not_raised(tmp_path: Path) -> None:
    notifier = Notifier(str(tmp_path / "gone"))
    assert notifier.enabled
    assert not notifier.watchdog()
    assert not notifier.ready("x")
    assert notifier.failed == 2


def test_an_unsupported_address_disables_notification() -> None:
    notifier = Notifier("vsock:2:1234")
    assert not notifier.enabled
    assert not notifier.ready()
