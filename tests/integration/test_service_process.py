"""The real `gatewayd run` process speaking systemd's notify protocol to a socket the test owns."""

from __future__ import annotations

import asyncio
import signal
import socket
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from gatewayd.errors import EX_CONFIG
from tests.daemon import daemon_env

GUARD_S = 30.0


class NotifySocket:
    def __init__(self) -> None:
        self.name = f"gatewayd-test-{uuid.uuid4().hex}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + self.name)
        self.sock.setblocking(False)

    @property
    def address(self) -> str:
        return "@" + self.name

    async def until(self, key: str) -> dict[str, str]:
        loop = asyncio.get_running_loop()
        while True:
            data = await asyncio.wait_for(loop.sock_recv(self.sock, 65536), GUARD_S)
            message = dict(line.split("=", 1) for line in data.decode().split("\n"))
            if key in message:
                return message

    def pending(self) -> list[bytes]:
        messages = []
        while True:
            try:
                messages.append(self.sock.recv(65536))
            except BlockingIOError:
                return messages


@pytest.fixture
def notify() -> Iterator[NotifySocket]:
    sock = NotifySocket()
    yield sock
    sock.sock.close()


async def start(tmp_path: Path, config: str, *args: str, **env: str) -> asyncio.subprocess.Process:
    (tmp_path / "gatewayd.yaml").write_text(config)
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gatewayd",
        "run",
        *args,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env={
            **daemon_env(tmp_path),
            "GATEWAYD_CONFIG": str(tmp_path / "gatewayd.yaml"),
            "GATEWAYD_HUB__STATE_DIR": str(tmp_path / "state"),
            "GATEWAYD_OUTPUTS__LOCAL_BROKER__PORT": "0",
            **env,
        },
    )


async def test_ready_then_watchdog_pings_then_stopping(tmp_path: Path, notify: NotifySocket):
    process = await start(
        tmp_path,
        "sources: {simulator: {enabled: true, athletes: 2}}\n",
        NOTIFY_SOCKET=notify.address,
        WATCHDOG_USEC="200000",  # WatchdogSec=0.2s: a ping every 0.1 s
    )
    try:
        ready = await notify.until("READY")
        assert "devices live" in ready["STATUS"] and "consumers" in ready["STATUS"]
        for _ in range(3):
            assert await notify.until("WATCHDOG") == {"WATCHDOG": "1"}
        process.send_signal(signal.SIGTERM)
        stopping = await notify.until("STOPPING")
        assert stopping["STOPPING"] == "1"
        assert await asyncio.wait_for(process.wait(), GUARD_S) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_a_bad_config_exits_78_naming_the_key_and_never_says_ready(
    tmp_path: Path, notify: NotifySocket
):
    process = await start(
        tmp_path, "outputs: {mqtt: {port: 99999}}\n", NOTIFY_SOCKET=notify.address
    )
    _, err = await asyncio.wait_for(process.communicate(), GUARD_S)
    assert process.returncode == EX_CONFIG == 78
    assert "outputs.mqtt.port" in err.decode()
    assert not [m for m in notify.pending() if b"READY=1" in m]


async def _stderr_until(process: asyncio.subprocess.Process, text: str) -> str:
    assert process.stderr is not None
    while True:
        line = (await asyncio.wait_for(process.stderr.readline(), GUARD_S)).decode()
        assert line, f"the daemon exited before logging {text!r}"
        if text in line:
            return line


async def test_reload_takes_the_new_roster_and_keeps_running(tmp_path: Path, notify: NotifySocket):
    config = "sources: {simulator: {enabled: true, athletes: 1}}\n"
    process = await start(tmp_path, config, NOTIFY_SOCKET=notify.address)
    try:
        await notify.until("READY")
        # What `systemctl reload gatewayd` does (ExecReload=kill -HUP $MAINPID).
        (tmp_path / "gatewayd.yaml").write_text(
            config + "athletes: [{id: carol, devices: [{source: ant, id: '120:23456'}]}]\n"
        )
        process.send_signal(signal.SIGHUP)
        assert "(1 athletes)" in await _stderr_until(process, "roster reloaded")
        # A broken file is refused and the running roster kept: the daemon stays up.
        (tmp_path / "gatewayd.yaml").write_text("athletes: [{devices: 3}]\n")
        process.send_signal(signal.SIGHUP)
        assert "athletes.0" in await _stderr_until(process, "config not reloaded")
        assert process.returncode is None
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), GUARD_S) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
