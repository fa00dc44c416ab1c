"""A real mosquitto on 127.0.0.1 for tests: own config file, free port, persistence on.

Import the fixtures into a test module (`from tests.integration.mosquitto import mosquitto`).
Readiness is the broker's own "running" log line, never a sleep.
"""

from __future__ import annotations

import asyncio
import getpass
import shutil
import socket
import subprocess
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

START_TIMEOUT_S = 10.0
WAIT_S = 15.0  # a guard against hanging, not a pace: events end every wait early


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def make_certificates(directory: Path, ca_file: Path) -> tuple[Path, Path]:
    """A throwaway CA (ca_file) and a server certificate for 127.0.0.1 signed by it."""

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=directory)

    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    openssl(
        "req",
        "-x509",
        *ec,
        "-keyout",
        "ca.key",
        "-out",
        str(ca_file),
        "-days",
        "2",
        "-subj",
        "/CN=gatewayd test CA",
    )
    openssl("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1")
    (directory / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    openssl(
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        str(ca_file),
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "2",
        "-extfile",
        "san.ext",
    )
    return directory / "server.pem", directory / "server.key"


class Mosquitto:
    def __init__(
        self,
        directory: Path,
        passwords: dict[str, str] | None = None,
        *,
        tls: bool = False,
        acl: str | None = None,
        log_types: str = "all",
    ) -> None:
        self.directory = directory
        self.port = free_port()
        # with tls: a second listener on tls_port, its certificate signed by the CA in ca_file
        self.tls_port = free_port() if tls else None
        self.ca_file = directory / "ca.pem"
        self.host = "127.0.0.1"
        self.passwords = passwords
        self.acl = acl  # mosquitto acl_file text: what clients may read and write
        # "all" logs every packet, which tests read; benchmarks take less, as its reader
        # thread runs in their process.
        self.log_types = log_types.split()
        self.log: list[str] = []
        self._process: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "data").mkdir(exist_ok=True)
        self.config_file = directory / "mosquitto.conf"
        self._write_config()

    def _write_config(self) -> None:
        lines = [
            f"listener {self.port} 127.0.0.1",
            "persistence true",
            f"persistence_location {self.directory / 'data'}/",
            "log_dest stderr",  # unbuffered, unlike stdout into a pipe
            *(f"log_type {kind}" for kind in self.log_types),
            # As root mosquitto would switch to its own user, which cannot write tmp_path.
            f"user {getpass.getuser()}",
        ]
        if self.tls_port is not None:
            certificate, key = make_certificates(self.directory, self.ca_file)
            lines += [
                f"listener {self.tls_port} 127.0.0.1",
                f"cafile {self.ca_file}",
                f"certfile {certificate}",
                f"keyfile {key}",
            ]
        if self.passwords is None:
            lines.append("allow_anonymous true")
        else:
            password_file = self.directory / "passwd"
            password_file.touch(mode=0o600)
            for user, password in self.passwords.items():
                subprocess.run(
                    ["mosquitto_passwd", "-b", str(password_file), user, password],
                    check=True,
                    capture_output=True,
                )
            lines += ["allow_anonymous false", f"password_file {password_file}"]
        if self.acl is not None:
            acl_file = self.directory / "acl"
            acl_file.write_text(self.acl)
            lines.append(f"acl_file {acl_file}")
        self.config_file.write_text("\n".join(lines) + "\n")

    def start(self) -> None:
        process = subprocess.Popen(
            ["mosquitto", "-c", str(self.config_file)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        ready = threading.Event()

        def read() -> None:
            assert process.stderr is not None
            for line in process.stderr:
                self.log.append(line.rstrip())
                if " running" in line and "mosquitto version" in line:
                    ready.set()
            ready.set()  # exited: let start() see it

        self._process = process
        self._reader = threading.Thread(target=read, daemon=True)
        self._reader.start()
        if not ready.wait(START_TIMEOUT_S) or process.poll() is not None:
            self.stop()
            raise RuntimeError("mosquitto did not start:\n" + "\n".join(self.log[-20:]))

    def stop(self) -> None:
        """SIGTERM: mosquitto saves its persistence database before exiting."""
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
            process.wait(START_TIMEOUT_S)
        if self._reader is not None:
            self._reader.join(START_TIMEOUT_S)
        self._process = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def reload(self) -> None:
        """SIGHUP: re-read the config and password file without dropping clients."""
        assert self._process is not None
        self._process.send_signal(1)


def _start(
    directory: Path,
    passwords: dict[str, str] | None = None,
    *,
    tls: bool = False,
    acl: str | None = None,
) -> Iterator[Mosquitto]:
    if shutil.which("mosquitto") is None:
        pytest.fail("mosquitto is not installed: run scripts/setup --dev (Debian: mosquitto)")
    broker = Mosquitto(directory, passwords, tls=tls, acl=acl)
    for _attempt in range(3):
        try:
            broker.start()
            break
        except RuntimeError:
            # Another test took the port between probing and binding: try a fresh one.
            broker = Mosquitto(directory, passwords, tls=tls, acl=acl)
    else:
        broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    yield from _start(tmp_path / "mosquitto")


@pytest.fixture
def mosquitto_tls(tmp_path: Path) -> Iterator[Mosquitto]:
    """Plain listener on port, TLS listener on tls_port (server certificate for 127.0.0.1)."""
    yield from _start(tmp_path / "mosquitto", tls=True)


@pytest.fixture
def mosquitto_auth(tmp_path: Path) -> Iterator[Mosquitto]:
    """A broker that accepts only user `gym` with password `s3cret-pass`."""
    yield from _start(tmp_path / "mosquitto", {"gym": "s3cret-pass"})


@pytest.fixture
def mosquitto_acl(tmp_path: Path) -> Iterator[Mosquitto]:
    """A broker whose clients may publish only a hub's status and athlete `anna`'s topics."""
    acl = (
        "topic readwrite gatewayd/+/status\n"
        "topic readwrite gatewayd/+/athletes/anna/#\n"
        "topic read gatewayd/#\n"
    )
    yield from _start(tmp_path / "mosquitto", acl=acl)


class Watcher:
    """A real paho subscriber for asyncio tests: messages are collected on the test's loop and
    tests await a condition on them (with a timeout as a guard), never a sleep."""

    def __init__(
        self,
        broker: Mosquitto,
        topics: list[str],
        *,
        client_id: str = "",
        persistent: bool = False,
        qos: int = 1,
        username: str | None = None,
        password: str | None = None,
        retain_as_published: bool = False,
    ) -> None:
        from paho.mqtt.client import Client
        from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        self.broker = broker
        self.topics = topics
        self.qos = qos
        self.persistent = persistent
        self.retain_as_published = retain_as_published
        self.messages: list[tuple[str, bytes, bool]] = []
        self._changed = asyncio.Event()
        self._subscribed = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self.client = Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id or f"watch-{uuid.uuid4().hex[:12]}",
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        if username is not None:
            self.client.username_pw_set(username, password)
        self.client.reconnect_delay_set(0.05, 0.2)  # type: ignore[arg-type]
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        properties = Properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = 3600 if persistent else 0
        self.client.connect_async(
            broker.host, broker.port, clean_start=not persistent, properties=properties
        )

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            return
        if self.persistent and flags.session_present:
            self._loop.call_soon_threadsafe(self._subscribed.set)
        else:
            from paho.mqtt.subscribeoptions import SubscribeOptions

            # retain_as_published: live messages keep their retain flag (MQTT 5), so a test
            # can tell retained state from plain samples.
            options = SubscribeOptions(qos=self.qos, retainAsPublished=self.retain_as_published)
            client.subscribe([(topic, options) for topic in self.topics])

    def _on_subscribe(self, *args: Any) -> None:
        self._loop.call_soon_threadsafe(self._subscribed.set)

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        item = (message.topic, bytes(message.payload), bool(message.retain))
        self._loop.call_soon_threadsafe(self._add, item)

    def _add(self, item: tuple[str, bytes, bool]) -> None:
        self.messages.append(item)
        self._changed.set()

    async def start(self) -> Watcher:
        self.client.loop_start()
        await asyncio.wait_for(self._subscribed.wait(), WAIT_S)
        return self

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    async def wait_for(
        self, condition: Callable[[list[tuple[str, bytes, bool]]], bool], timeout: float = WAIT_S
    ) -> list[tuple[str, bytes, bool]]:
        async def until() -> None:
            while not condition(self.messages):
                self._changed.clear()
                await self._changed.wait()

        try:
            await asyncio.wait_for(until(), timeout)
        except TimeoutError:
            seen = "\n".join(f"  {t} {p[:120]!r} retain={r}" for t, p, r in self.messages[-30:])
            raise AssertionError(
                f"condition not met within {timeout} s; last messages:\n{seen}"
            ) from None
        return self.messages

    def on(self, topic: str) -> list[bytes]:
        return [payload for t, payload, _ in self.messages if t == topic]
