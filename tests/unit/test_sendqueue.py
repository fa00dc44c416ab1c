"""The slow consumer's send queue (gatewayd/sendqueue.py): bounded, oldest first out, and stuck
consumers recognised by how long they have been dropping."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gatewayd.sendqueue import Overflow, SendQueue


def frames(first: int, n: int) -> list[bytes]:
    return [f"frame-{i}".encode() for i in range(first, first + n)]


def test_the_oldest_go_past_the_limit_and_are_counted() -> None:
    q = SendQueue(limit=5, stall_s=10.0)
    assert q.push(frames(0, 3), now=0.0) is None
    assert q.push(frames(3, 4), now=1.0) == Overflow(dropped=2, started=True)
    assert q.push(frames(7, 1), now=2.0) == Overflow(dropped=1, started=False)
    assert len(q) == 5 and q.dropped == 3
    assert q.nbytes == sum(map(len, frames(3, 5)))
    assert q.take() == b"".join(frames(3, 5))
    assert len(q) == 0 and q.nbytes == 0


def test_an_episode_ends_only_when_the_queue_empties() -> None:
    q = SendQueue(limit=2, stall_s=10.0)
    q.push(frames(0, 3), now=0.0)
    assert q.dropping
    assert not q.caught_up()  # still holding two frames
    q.take()
    assert q.caught_up() and not q.dropping
    assert not q.caught_up()  # once per episode
    assert q.push(frames(3, 3), now=20.0) == Overflow(dropped=1, started=True)


def test_stalled_after_dropping_for_stall_s_without_catching_up() -> None:
    q = SendQueue(limit=2, stall_s=10.0)
    q.push(frames(0, 2), now=0.0)
    assert not q.stalled(100.0)  # full but not dropping: merely behind
    q.push(frames(2, 1), now=5.0)
    assert not q.stalled(14.9)
    assert q.stalled(15.0)
    q.take()
    q.caught_up()
    assert not q.stalled(100.0)  # caught up once: the clock starts again at the next drop
    q.push(frames(3, 3), now=100.0)
    assert not q.stalled(109.0) and q.stalled(110.0)


def test_nonsense_bounds_are_refused() -> None:
    with pytest.raises(ValueError, match="limit"):
        SendQueue(limit=0)
    with pytest.raises(ValueError, match="stall_s"):
        SendQueue(stall_s=0.0)


@given(st.lists(st.integers(0, 40), max_size=60), st.integers(1, 30))
def test_never_more_than_limit_and_the_newest_always_kept(batches: list[int], limit: int) -> None:
    q = SendQueue(limit=limit)
    sent = 0
    for n in batches:
        q.push(frames(sent, n), now=float(sent))
        sent += n
        assert len(q) <= limit
        assert q.dropped + len(q) == sent
    assert q.take() == b"".join(frames(sent - min(sent, limit), min(sent, limit)))
