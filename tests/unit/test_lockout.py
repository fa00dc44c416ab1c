"""The guessing brake (gatewayd/lockout.py), driven by a plain number for the clock."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gatewayd.lockout import GuessBrake, Locked

A = "192.0.2.7"
B = "192.0.2.8"


def refuse(brake: GuessBrake, address: str, times: int, now: float, step: float = 0.1) -> list:
    return [brake.refused(address, now + i * step) for i in range(times)]


def test_ten_refusals_in_a_minute_lock_the_address_and_only_it() -> None:
    brake = GuessBrake()
    results = refuse(brake, A, 10, 0.0)
    assert results[:9] == [None] * 9
    assert results[9] == Locked(A, 10, 60.0, 0.9 + 60.0)
    assert brake.locked(A, 1.0)
    assert brake.locked(A, 60.8)
    assert not brake.locked(A, 60.9)
    assert not brake.locked(B, 1.0)  # another address is checked as usual


def test_refusals_spread_beyond_the_window_never_lock() -> None:
    brake = GuessBrake(attempts=10, window_s=60.0)
    results = refuse(brake, A, 100, 0.0, step=6.7)  # fewer than 10 in any minute
    assert results == [None] * 100
    assert not brake.locked(A, 700.0)


def test_each_new_episode_locks_twice_as_long_up_to_the_cap() -> None:
    brake = GuessBrake(lock_s=60.0, max_lock_s=300.0)
    now = 0.0
    lengths = []
    for _ in range(5):
        locked = refuse(brake, A, 10, now)[-1]
        assert isinstance(locked, Locked)
        lengths.append(locked.lock_s)
        now = locked.until
    assert lengths == [60.0, 120.0, 240.0, 300.0, 300.0]


def test_a_quiet_address_is_forgiven() -> None:
    brake = GuessBrake(lock_s=60.0, max_lock_s=600.0)
    first = refuse(brake, A, 10, 0.0)[-1]
    assert isinstance(first, Locked)
    later = first.until + 600.0
    again = refuse(brake, A, 10, later)[-1]
    assert isinstance(again, Locked) and again.lock_s == 60.0


def test_the_table_is_bounded_least_recently_seen_first() -> None:
    brake = GuessBrake(max_addresses=3)
    refuse(brake, A, 10, 0.0)
    for i in range(5):
        brake.refused(f"198.51.100.{i}", 1.0)
    assert len(brake) == 3
    assert not brake.locked(A, 2.0)  # evicted: costs a table entry, never a lock on others


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError):
        GuessBrake(attempts=0)
    with pytest.raises(ValueError):
        GuessBrake(lock_s=10.0, max_lock_s=5.0)


@given(st.lists(st.tuples(st.sampled_from([A, B]), st.floats(0.0, 5.0)), max_size=200))
def test_never_more_than_attempts_checked_per_window_while_locked(
    steps: list[tuple[str, float]],
) -> None:
    """Whatever the timing, an address gets at most `attempts` checked refusals before a lock,
    and a lock is never shorter than lock_s."""
    brake = GuessBrake(attempts=3, window_s=10.0, lock_s=5.0, max_lock_s=40.0)
    now = 0.0
    checked_since_lock = {A: 0, B: 0}
    for address, gap in steps:
        now += gap
        if brake.locked(address, now):
            continue
        checked_since_lock[address] += 1
        locked = brake.refused(address, now)
        if locked is not None:
            assert checked_since_lock[address] >= 3
            assert 5.0 <= locked.lock_s <= 40.0
            checked_since_lock[address] = 0


def test_retry_after_is_what_is_left_of_the_lock() -> None:
    brake = GuessBrake(attempts=2, lock_s=60.0)
    assert brake.retry_after(A, 0.0) == 0.0
    refuse(brake, A, 2, 0.0, step=1.0)  # locked at 1.0 until 61.0
    assert brake.retry_after(A, 1.0) == 60.0
    assert brake.retry_after(A, 31.0) == 30.0
    assert brake.retry_after(A, 61.0) == 0.0
    assert brake.retry_after(B, 31.0) == 0.0
