"""`gatewayd tail` against the real broker: prints, reconnects after a restart, REPLAYs the gap."""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path

from gatewayd import protocol as p
from gatewayd.tail import Tail, TailState, format_line, parse_filter
from tests.integration.test_broker import CONSUMER_TOKEN, WAIT, Harness, hr


class Lines:
    """A text stream whose lines can be awaited."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[str] = asyncio.Queue()
        self._partial = ""

    def write(self, text: str) -> int:
        self._partial += text
        *lines, self._partial = self._partial.split("\n")
        for line in lines:
            self.queue.put_nowait(line)
        return len(text)

    def flush(self) -> None:
        pass

    async def next(self) -> dict[str, object]:
        return json.loads(await asyncio.wait_for(self.queue.get(), WAIT))  # type: ignore[no-any-return]


async def test_tail_prints_and_fills_the_gap_after_a_restart(tmp_path: Path) -> None:
    first = Harness(tmp_path)
    broker = await first.start()
    lines = Lines()
    tail = Tail(
        first.url,
        CONSUMER_TOKEN,
        as_json=True,
        out=lines,  # type: ignore[arg-type]
        rng=random.Random(1),
        backoff_base_s=0.01,
    )
    task = asyncio.create_task(tail.run())
    try:
        await asyncio.wait_for(tail.reconnected.wait(), WAIT)
        tail.reconnected.clear()
        for i in range(3):
            first.hub.publish(hr(i))
        assert [(await lines.next())["seq"] for _ in range(3)] == [1, 2, 3]
        await first.stop()

        # The daemon comes back on the same port with samples 4..6 produced while tail was away.
        second = Harness(tmp_path, port=broker.port)
        await second.start(before_listening=[hr(3), hr(4), hr(5)])
        try:
            await asyncio.wait_for(tail.reconnected.wait(), WAIT)
            second.hub.publish(hr(6))
            got = [await lines.next() for _ in range(4)]
            assert sorted(int(g["seq"]) for g in got) == [4, 5, 6, 7]  # type: ignore[call-overload]
            assert got[0]["seq"] == 7  # live first, then the REPLAY of the gap
            assert {g["uid"] for g in got} == {"a1"} and "val" in got[1]
            assert tail.sessions == 2
        finally:
            await second.stop()
    finally:
        task.cancel()


async def test_tail_stops_on_a_refused_token(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    await h.start()
    try:
        tail = Tail(h.url, "not-a-token", out=Lines(), backoff_base_s=0.01)  # type: ignore[arg-type]
        assert await asyncio.wait_for(tail.run(), WAIT) == 1
    finally:
        await h.stop()


async def test_tail_gives_up_after_max_attempts_when_nothing_listens(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    broker = await h.start()
    url = h.url
    await h.stop()
    assert broker.port
    tail = Tail(url, CONSUMER_TOKEN, out=Lines(), max_attempts=2, backoff_base_s=0.01)  # type: ignore[arg-type]
    assert await asyncio.wait_for(tail.run(), WAIT) == 1


def test_tail_state_prints_each_seq_once() -> None:
    state = TailState()
    assert [state.accept(s) for s in (1, 2, 3)] == [True, True, True]
    assert not state.accept(2)
    state.replaying.append([3, 7])
    assert state.accept(8)  # live beyond the gap
    assert [state.accept(s) for s in (4, 5, 5, 6)] == [True, True, False, True]
    assert state.replaying == []
    assert not state.accept(6)


def test_table_and_json_lines() -> None:
    message = p.parse(p.dispatch(9, hr(0)))
    row = format_line(message, as_json=False)
    assert "14:30:00.000" in row and " 9 " in row and "HEART_RATE" in row and row.endswith("60")
    assert json.loads(format_line(message, as_json=True)) == {
        "seq": 9,
        "uid": "a1",
        "t": "HEART_RATE",
        "ts": "2026-11-24T14:30:00.000Z",
        "val": 60,
    }


def test_filters_from_flags() -> None:
    assert parse_filter(None, None, False) is None
    wanted = parse_filter(["a,b", "c"], ["POWER"], True)
    assert wanted == p.Filter(frozenset({"a", "b", "c"}), frozenset({"POWER"}), True)
