"""The real `gatewayd run` process forwarding upstream: SIGKILL mid-stream, and a full disk.

The upstream is a real gatewayd broker in this test's event loop on 127.0.0.1 port 0. Waits are
on events: lines of the daemon's log, appends to the upstream's spool, messages on a socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import resource
import signal
import sys
from collections import defaultdict
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from websockets.asyncio.client import connect

from gatewayd import protocol as p
from gatewayd.model import parse_ts
from gatewayd.spool import read_only as spool_file
from tests.daemon import daemon_env
from tests.integration.test_upstream import HUB_TOKEN, WAIT, Key, Upstream

ROOT = Path(__file__).resolve().parents[2]
CONSUMER_TOKEN = "gym-board-consumer-token"


class Daemon:
    """`python -m gatewayd run` with a config file; its log is read line by line as it comes."""

    def __init__(self, tmp: Path, config: dict[str, Any]) -> None:
        self.tmp = tmp
        self.path = tmp / "gatewayd.yaml"
        self.path.write_text(yaml.safe_dump(config))
        self.process: asyncio.subprocess.Process | None = None
        self.lines: list[str] = []
        self._new_line = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None

    async def start(self, fsize_limit: int | None = None) -> None:
        env = daemon_env(self.tmp, PYTHONDONTWRITEBYTECODE="1")

        def limit() -> None:
            # A file size limit stands in for a full disk: writes past it fail with EFBIG
            # (SIGXFSZ is ignored so the process lives to report it).
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            assert fsize_limit is not None
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize_limit, fsize_limit))

        self.process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "gatewayd",
            "run",
            "--config",
            str(self.path),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            env=env,
            preexec_fn=limit if fsize_limit is not None else None,
        )
        self.lines.clear()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.process is not None and self.process.stderr is not None
        while line := await self.process.stderr.readline():
            self.lines.append(line.decode(errors="replace").rstrip())
            self._new_line.set()
        self._new_line.set()

    async def line(self, pattern: str, timeout: float = WAIT) -> re.Match[str]:
        """The first log line matching `pattern` (waits for it)."""

        async def wait() -> re.Match[str]:
            seen = 0
            while True:
                self._new_line.clear()
                for text in self.lines[seen:]:
                    if match := re.search(pattern, text):
                        return match
                seen = len(self.lines)
                assert self._reader is not None
                if self._reader.done():
                    raise AssertionError(f"exited before logging {pattern!r}:\n{self.log()}")
                await self._new_line.wait()

        try:
            return await asyncio.wait_for(wait(), timeout)
        except TimeoutError:
            raise AssertionError(f"no log line {pattern!r}:\n{self.log()}") from None

    def log(self) -> str:
        return "\n".join(self.lines[-60:])

    async def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.process is not None
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(sig)
        code = await asyncio.wait_for(self.process.wait(), WAIT)
        if self._reader is not None:
            await self._reader
        return code


def daemon_config(tmp: Path, upstream_url: str, **extra: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "hub": {"id": "gym-test", "state_dir": str(tmp / "state")},
        "sources": {"simulator": {"enabled": True, "athletes": 3}},
        "outputs": {
            "local_broker": {
                "enabled": True,
                "port": 0,
                "consumer_tokens": [CONSUMER_TOKEN],
            },
            "upstream": {
                "enabled": True,
                "mode": "gatewayd",
                "url": upstream_url,
                "token": HUB_TOKEN,
                "backoff_min_s": 0.05,
                "backoff_max_s": 0.5,
                "ack_interval_s": 0.2,
            },
        },
    }
    for section, values in extra.items():
        config["outputs"][section].update(values)
    return config


def spool_rows(path: Path) -> list[Key]:
    """What a spool holds on disk (committed rows only), read without writing to it."""
    return [(s.uid, s.t, s.ts, s.val if s.d is None else s.d) for _, s in spool_file(path)]


def in_order(keys: list[Key]) -> bool:
    last: dict[tuple[str, str], float] = {}
    for uid, t, ts, _ in keys:
        if ts <= last.get((uid, t), float("-inf")):
            return False
        last[(uid, t)] = ts
    return True


@pytest.fixture
async def upstream(tmp_path: Path) -> AsyncIterator[Upstream]:
    up = Upstream(tmp_path)
    await up.start()
    yield up
    if up.broker is not None:
        await up.stop()


async def test_sigkill_mid_stream_loses_nothing_committed(
    tmp_path: Path, upstream: Upstream
) -> None:
    assert upstream.watch is not None
    gateway = Daemon(tmp_path, daemon_config(tmp_path, upstream.url))
    spool = tmp_path / "state" / "spool.db"
    await gateway.start()
    try:
        await gateway.line(r"upstream: connected")
        # The upstream may read a second's rows before they are committed: wait for three
        # distinct seconds upstream and for the spool file itself to hold committed rows
        # (looked at again on each sample the upstream receives, never on a timer).
        await upstream.watch.until(
            lambda: len({key[2] for key in list(upstream.keys())}) >= 3 and bool(spool_rows(spool)),
            "a few seconds of data, some of it committed",
        )
    finally:
        assert await gateway.stop(signal.SIGKILL) == -signal.SIGKILL
    committed = spool_rows(spool)
    assert committed, "a second or more was committed before the kill"

    await gateway.start()  # the same state directory: the spool must open intact
    try:
        await gateway.line(r"upstream: connected")
        await upstream.watch.until(
            lambda: set(committed) <= set(upstream.keys()), "everything committed before the kill"
        )
        resumed = len(upstream.keys())
        await upstream.watch.until(lambda: len(upstream.keys()) > resumed + 6, "new data")
    finally:
        assert await gateway.stop() == 0, gateway.log()
    held = spool_rows(spool)
    assert held[: len(committed)] == committed, "the spool lost or changed committed rows"
    got = upstream.keys()
    assert len(got) == len(set(got)), "a sample arrived twice"
    assert set(held) <= set(got), "SIGTERM drains: every spooled sample reached the upstream"
    assert in_order(got)


async def test_a_full_disk_is_a_clear_error_and_the_local_broker_keeps_serving(
    tmp_path: Path, upstream: Upstream
) -> None:
    gateway = Daemon(tmp_path, daemon_config(tmp_path, upstream.url))
    # Small: a second of 3 athletes adds only a few kB (one 1 kB page and its WAL frames).
    await gateway.start(fsize_limit=32 * 1024)
    try:
        port = int((await gateway.line(r"listening on ws://127\.0\.0\.1:(\d+)/connect"))[1])
        failed = await gateway.line(r"ERROR.*spool .* cannot write \((.*)\)")
        assert "disk" in failed[1] or "full" in failed[1], failed[0]
        async with connect(f"ws://127.0.0.1:{port}/connect") as ws:
            await asyncio.wait_for(ws.recv(), WAIT)  # HELLO
            await ws.send(p.identify(CONSUMER_TOKEN, p.Role.CONSUMER))
            assert json.loads(await asyncio.wait_for(ws.recv(), WAIT)) == {"op": 4}
            stamps: dict[str, list[float]] = defaultdict(list)
            while len(stamps) < 3 or min(len(v) for v in stamps.values()) < 3:
                frame = json.loads(await asyncio.wait_for(ws.recv(), WAIT))
                if frame.get("t") == "HEART_RATE":
                    stamps[frame["uid"]].append(parse_ts(frame["d"]["ts"]))
            for uid, seen in stamps.items():
                assert seen == sorted(seen) and len(set(seen)) == len(seen), uid
        health = await fetch_json(port, "/healthz")
        assert health["spool_error"] and "cannot write" in health["spool_error"]
        assert health["upstream"]["spool_write_errors"] > 0
        code, out = await status(port)
        assert code == 0
        assert "spool:" in out and "ERROR cannot write" in out
        assert re.search(r"upstream \(gatewayd\) ws://127\.0\.0\.1:\d+/connect: connected", out)
    finally:
        assert await gateway.stop() == 0, gateway.log()


async def status(port: int) -> tuple[int, str]:
    """`gatewayd status` against the daemon's broker."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gatewayd",
        "status",
        "--url",
        f"http://127.0.0.1:{port}",
        stdout=asyncio.subprocess.PIPE,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)},
    )
    out, _ = await asyncio.wait_for(process.communicate(), WAIT)
    assert process.returncode is not None
    return process.returncode, out.decode()


async def fetch_text(port: int, path: str) -> str:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    raw = await asyncio.wait_for(reader.read(), WAIT)
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    return body.decode()


async def fetch_json(port: int, path: str) -> dict[str, Any]:
    data = json.loads(await fetch_text(port, path))
    assert isinstance(data, dict)
    return data


async def test_status_shows_an_upstream_that_refuses_us(tmp_path: Path, upstream: Upstream) -> None:
    config = daemon_config(tmp_path, upstream.url, upstream={"token": "a-wrong-token"})
    gateway = Daemon(tmp_path, config)
    await gateway.start()
    try:
        port = int((await gateway.line(r"listening on ws://127\.0\.0\.1:(\d+)/connect"))[1])
        await gateway.line(r"ERROR.*fix outputs\.upstream\.token")
        code, out = await status(port)
        assert code == 2, out
        assert re.search(r"upstream \(gatewayd\) \S+: down; backlog \d+ samples", out), out
        assert "4001" in out and "retry in" in out
        metrics = await fetch_text(port, "/metrics")
        assert "gatewayd_upstream_connected 0.0" in metrics
        assert re.search(r"^gatewayd_upstream_backlog \d", metrics, re.M)
        assert re.search(r"^gatewayd_spool_evicted_total 0", metrics, re.M)
    finally:
        assert await gateway.stop() == 0, gateway.log()
    assert "a-wrong-token" not in "\n".join(gateway.lines)


async def test_an_upstream_outage_while_the_daemon_runs_loses_nothing(
    tmp_path: Path, upstream: Upstream
) -> None:
    assert upstream.watch is not None
    gateway = Daemon(tmp_path, daemon_config(tmp_path, upstream.url))
    await gateway.start()
    try:
        port = int((await gateway.line(r"listening on ws://127\.0\.0\.1:(\d+)/connect"))[1])
        await gateway.line(r"upstream: connected")
        await upstream.watch.until(lambda: len(upstream.keys()) >= 6, "live data")
        await upstream.stop()
        # The outage lasts while the hub's own broker serves three more seconds of samples.
        async with connect(f"ws://127.0.0.1:{port}/connect") as ws:
            await asyncio.wait_for(ws.recv(), WAIT)
            await ws.send(p.identify(CONSUMER_TOKEN, p.Role.CONSUMER))
            seconds: set[float] = set()
            while len(seconds) < 4:
                frame = json.loads(await asyncio.wait_for(ws.recv(), WAIT))
                if frame.get("t") == "HEART_RATE":
                    seconds.add(parse_ts(frame["d"]["ts"]))
        await gateway.line(r"upstream: (cannot connect|the server closed|the link dropped)")
        await upstream.start()  # the same port
        await upstream.watch.until(
            lambda: max(s.ts for s in upstream.received()) >= max(seconds), "the backlog"
        )
    finally:
        assert await gateway.stop() == 0, gateway.log()
    held = spool_rows(tmp_path / "state" / "spool.db")
    got = upstream.keys()
    assert set(held) <= set(got), "every spooled sample reached the upstream"
    assert len(got) == len(set(got)) and in_order(got)
