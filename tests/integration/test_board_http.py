"""The board on the real broker (127.0.0.1, port 0): its pages over HTTP, and its token, which
whoever has the board link can read from /board/config.json, only ever receives."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from gatewayd.config import DEFAULT_CONFIG_PATH, BoardConfig, LocalBrokerConfig
from gatewayd.hub import Hub
from gatewayd.roster import AthleteInfo
from gatewayd.sinks.local_broker import LocalBroker
from gatewayd.spool import Spool
from gatewayd.tokens import TokenStore
from gatewayd.web import Board, new_token
from tests.daemon import daemon_env
from tests.helpers import SteadyClock

WAIT = 10.0  # a guard on waits for events, never a sleep


async def start(tmp_path: Path, *, with_board: bool) -> tuple[LocalBroker, Board, Spool]:
    board = Board(
        BoardConfig(),
        token=new_token(),
        title="Test gym",
        lost_after_s=5.0,
        athletes=lambda: [AthleteInfo("a1", "Ada", 181, 2.1)],
    )
    spool = Spool(tmp_path / "spool.db", clock=SteadyClock())
    broker = LocalBroker(
        Hub().subscribe("local_broker"),
        LocalBrokerConfig(host="127.0.0.1", port=0),
        spool=spool,
        tokens=TokenStore(tmp_path / "state", consumer_tokens=[board.token], clock=SteadyClock()),
        board=board.respond if with_board else None,
        timer_interval_s=3600.0,
        clock=SteadyClock(),
    )
    await broker.start()
    return broker, board, spool


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[LocalBroker, Board]]:
    broker, board, spool = await start(tmp_path, with_board=True)
    yield broker, board
    await broker.close()
    spool.close()


def get(url: str) -> tuple[int, dict[str, str], str]:
    try:
        with urllib.request.urlopen(url, timeout=WAIT) as response:
            return response.status, dict(response.headers), response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read().decode()


async def test_pages_are_served_next_to_connect_healthz_and_metrics(served) -> None:
    broker, board = served
    base = f"http://127.0.0.1:{broker.port}"
    status, headers, body = await asyncio.to_thread(get, base + "/")
    assert status == 200 and headers["Content-Type"] == "text/html; charset=utf-8"
    assert "board.js" in body and "Content-Security-Policy" in headers
    status, headers, body = await asyncio.to_thread(get, base + "/board.js?v=2")
    assert status == 200 and headers["Content-Type"].startswith("text/javascript")
    status, headers, body = await asyncio.to_thread(get, base + "/board/config.json")
    assert status == 200 and json.loads(body)["token"] == board.token
    status, _, body = await asyncio.to_thread(get, base + "/healthz")
    assert status == 200 and json.loads(body)["consumers"] == 0
    status, _, _ = await asyncio.to_thread(get, base + "/board.js/../../etc/passwd")
    assert status == 404


async def test_without_a_board_there_is_no_page(tmp_path: Path) -> None:
    broker, _, spool = await start(tmp_path, with_board=False)
    try:
        status, _, _ = await asyncio.to_thread(get, f"http://127.0.0.1:{broker.port}/")
        assert status == 404
    finally:
        await broker.close()
        spool.close()


async def identify(port: int, token: str, role: int) -> dict[str, object]:
    async with connect(f"ws://127.0.0.1:{port}/connect") as ws:
        hello = json.loads(await asyncio.wait_for(ws.recv(), WAIT))
        assert hello["op"] == 2
        await ws.send(json.dumps({"op": 3, "d": {"token": token, "type": role}}))
        return json.loads(await asyncio.wait_for(ws.recv(), WAIT))


async def test_the_board_token_receives(served) -> None:
    broker, board = served
    assert await identify(broker.port, board.token, 1) == {"op": 4}


async def test_the_board_token_cannot_produce(served) -> None:
    broker, board = served
    with pytest.raises(ConnectionClosed) as closed:
        await identify(broker.port, board.token, 0)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4001


async def test_a_board_connection_cannot_submit(served) -> None:
    broker, board = served
    async with connect(f"ws://127.0.0.1:{broker.port}/connect") as ws:
        await asyncio.wait_for(ws.recv(), WAIT)
        await ws.send(json.dumps({"op": 3, "d": {"token": board.token, "type": 1}}))
        assert json.loads(await asyncio.wait_for(ws.recv(), WAIT)) == {"op": 4}
        submit = {"op": 6, "t": "HEART_RATE", "d": {"ts": "2026-11-24T14:30:00.000Z", "val": 1}}
        await ws.send(json.dumps(submit))
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), WAIT)
        assert ws.close_code == 4004


def test_run_without_a_config_logs_the_board_url_and_serves_it(tmp_path: Path) -> None:
    if DEFAULT_CONFIG_PATH.exists():
        pytest.skip(f"{DEFAULT_CONFIG_PATH} exists, so `gatewayd run` would not run bare")
    env = {
        **daemon_env(tmp_path),
        "GATEWAYD_HUB__STATE_DIR": str(tmp_path / "state"),
        "GATEWAYD_OUTPUTS__LOCAL_BROKER__PORT": "0",  # parallel-safe; everything else default
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "gatewayd", "run"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert process.stderr is not None
    try:
        url = None
        for line in process.stderr:  # ends if the daemon dies; pytest's timeout guards a hang
            found = re.search(r"board: (http://127\.0\.0\.1:\d+/\?key=[\w-]+)$", line.strip())
            if found:
                url = found.group(1)
                break
        assert url is not None, "no board URL in the log"
        status, _, body = get(url)
        assert status == 200 and "board.js" in body
        base, query = url.split("?")
        status, _, body = get(f"{base}board/config.json?{query}")
        assert status == 200 and len(json.loads(body)["athletes"]) == 8  # the default simulator
    finally:
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=15)
    assert process.returncode == 0
