"""The one way process tests start `gatewayd run`: a real daemon on loopback, its log readable.

    async with daemon_process(tmp_path, "sources: {simulator: {enabled: true}}\n") as d:
        url = d.broker_url                      # ws://127.0.0.1:<port>/connect (port 0 chosen)
        await d.wait_for_log("roster reloaded") # waits on the log line itself, never a sleep
    # leaving the block stops it with SIGTERM and asserts a clean exit (status 0, no traceback)

stderr is read all the time, so a chatty daemon never blocks on a full pipe, and every line
stays in `d.log` for assertions.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WAIT = 30.0  # a guard on waits for log lines and exits, never a sleep
# A time shift (scripts/timeshift) must reach the daemon too, or a test compares two calendars.
TIME_SHIFT_VARIABLES = (
    "LD_PRELOAD",
    "LD_LIBRARY_PATH",
    "FAKETIME",
    "FAKETIME_DONT_FAKE_MONOTONIC",
    "DONT_FAKE_MONOTONIC",
    "FAKETIME_NO_CACHE",
    "FAKETIME_FORCE_MONOTONIC_FIX",
)
BROKER_LISTENING = re.compile(r"local broker listening on (wss?)://[\d.]+:(\d+)/connect")


def daemon_env(home: Path, **extra: str) -> dict[str, str]:
    """The environment a daemon under test gets: nothing of the developer's but PATH (and a
    time shift, when the suite runs under one), this checkout first on the import path."""
    env = {name: os.environ[name] for name in TIME_SHIFT_VARIABLES if name in os.environ}
    env.update(PATH=os.environ.get("PATH", "/usr/bin:/bin"), PYTHONPATH=str(ROOT), HOME=str(home))
    env.update(extra)
    return env


class Daemon:
    def __init__(self, process: asyncio.subprocess.Process, config: Path) -> None:
        self.process = process
        self.config = config
        self.lines: list[str] = []
        self._changed = asyncio.Condition()
        self._reader = asyncio.create_task(self._read_stderr())
        self.broker_port: int | None = None
        self.tls = False  # the broker serves wss:// and https:// (outputs.local_broker.tls)

    async def _read_stderr(self) -> None:
        assert self.process.stderr is not None
        while line := await self.process.stderr.readline():
            async with self._changed:
                self.lines.append(line.decode("utf-8", "replace"))
                self._changed.notify_all()
        async with self._changed:
            self._changed.notify_all()

    @property
    def log(self) -> str:
        return "".join(self.lines)

    @property
    def broker_url(self) -> str:
        assert self.broker_port is not None, "the local broker is not listening"
        return f"{'wss' if self.tls else 'ws'}://127.0.0.1:{self.broker_port}/connect"

    @property
    def http_url(self) -> str:
        assert self.broker_port is not None, "the local broker is not listening"
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.broker_port}"

    async def wait_for_log(
        self, pattern: str | re.Pattern[str], *, after: int = 0
    ) -> re.Match[str]:
        """The first log line (from index `after`) matching `pattern`; fails if the daemon exits."""
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern

        async def scan() -> re.Match[str]:
            checked = after
            async with self._changed:
                while True:
                    for line in self.lines[checked:]:
                        if match := regex.search(line):
                            return match
                    checked = max(checked, len(self.lines))
                    if self._reader.done():
                        raise AssertionError(
                            f"the daemon exited ({self.process.returncode}) before logging "
                            f"{regex.pattern!r}:\n{self.log}"
                        )
                    await self._changed.wait()

        return await asyncio.wait_for(scan(), WAIT)

    async def stop(self, *, expect_status: int = 0) -> None:
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
        status = await asyncio.wait_for(self.process.wait(), WAIT)
        await asyncio.wait_for(self._reader, WAIT)
        assert status == expect_status, self.log
        assert "Traceback" not in self.log, self.log

    async def kill(self) -> None:
        """SIGKILL, as a power cut or the OOM killer would: no shutdown path runs."""
        if self.process.returncode is None:
            self.process.kill()
        await asyncio.wait_for(self.process.wait(), WAIT)
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(self._reader, WAIT)


async def start_daemon(
    tmp_path: Path,
    config: str,
    *args: str,
    env: Mapping[str, str] | None = None,
    wait_for_broker: bool = True,
) -> Daemon:
    """Write `config` (YAML) to tmp_path and run the daemon on it with its state in tmp_path.

    The broker's port is forced to 0 unless `env` says otherwise; with `wait_for_broker` this
    returns once the broker listens and `broker_port` is known.
    """
    path = tmp_path / "gatewayd.yaml"
    path.write_text(config)
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gatewayd",
        "run",
        "--config",
        str(path),
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env=daemon_env(
            tmp_path,
            **{
                "GATEWAYD_HUB__STATE_DIR": str(tmp_path / "state"),
                "GATEWAYD_OUTPUTS__LOCAL_BROKER__PORT": "0",
                **(env or {}),
            },
        ),
    )
    daemon = Daemon(process, path)
    if wait_for_broker:
        try:
            match = await daemon.wait_for_log(BROKER_LISTENING)
        except BaseException:
            await daemon.kill()
            raise
        daemon.tls = match.group(1) == "wss"
        daemon.broker_port = int(match.group(2))
    return daemon


@asynccontextmanager
async def daemon_process(
    tmp_path: Path,
    config: str,
    *args: str,
    env: Mapping[str, str] | None = None,
    wait_for_broker: bool = True,
    expect_status: int = 0,
) -> AsyncIterator[Daemon]:
    daemon = await start_daemon(tmp_path, config, *args, env=env, wait_for_broker=wait_for_broker)
    try:
        yield daemon
    except BaseException:
        await daemon.kill()
        raise
    await daemon.stop(expect_status=expect_status)
