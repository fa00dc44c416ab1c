"""Scoped tokens on the real broker: the board's token REPLAYs only the board's last minutes."""

from __future__ import annotations

from pathlib import Path

from websockets.asyncio.client import connect

from gatewayd import protocol as p
from gatewayd.tokens import TokenStore
from tests.integration.test_broker import CONSUMER_TOKEN, Harness, hr, recv_json

BOARD_TOKEN = "board-token-for-scopes"


async def replayed(url: str, token: str, before: int, last: int) -> list[int]:
    async with connect(url) as ws:
        await recv_json(ws)  # HELLO
        await ws.send(p.identify(token, p.Role.CONSUMER))
        assert await recv_json(ws) == {"op": 4}
        await ws.send(p.replay(0, before))
        seqs: list[int] = []
        while not seqs or seqs[-1] < last:  # a REPLAY's frames come in seq order
            seqs.append((await recv_json(ws))["seq"])
        return seqs


async def test_the_board_token_replays_only_its_window(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    h.tokens = TokenStore(
        tmp_path / "state",
        consumer_tokens=[CONSUMER_TOKEN],
        scoped_consumer_tokens=[(BOARD_TOKEN, 30.0)],
        clock=h.clock,
    )
    # Samples at T0 .. T0+59; the hub's clock is at T0+60 (Harness): the last 30 s are 30..59.
    await h.start(before_listening=[hr(i) for i in range(60)])
    try:
        full = await replayed(h.url, CONSUMER_TOKEN, 1000, 60)
        board = await replayed(h.url, BOARD_TOKEN, 1000, 60)
    finally:
        await h.stop()
    assert full == list(range(1, 61))
    assert board == list(range(31, 61))
