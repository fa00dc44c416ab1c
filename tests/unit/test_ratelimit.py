"""SUBMIT and REPLAY budgets (gatewayd/ratelimit.py), with times as plain numbers."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gatewayd.ratelimit import ReplayPacer, SubmitLimiter, Verdict, replay_admissible

NOW = 1_795_000_000.0  # a fixed calendar: the hub's wall clock in these tests
HR = ("phone-1", "HEART_RATE")
RR = ("phone-1", "RR_INTERVAL")


def test_a_phone_at_a_few_per_second_is_never_limited() -> None:
    limiter = SubmitLimiter(per_second=10)
    verdicts = {
        limiter.admit(key, NOW + i * 0.25, wall=NOW + i * 0.25, mono=i * 0.25)
        for i in range(400)
        for key in (HR, RR)
    }
    assert verdicts == {Verdict.ACCEPT}


def test_a_forwarder_catching_up_at_wire_speed_is_not_limited() -> None:
    # An hour of one-per-second samples arriving within a millisecond: each in its own second.
    limiter = SubmitLimiter(per_second=10)
    verdicts = {limiter.admit(HR, NOW - 3600 + i, wall=NOW, mono=i * 1e-6) for i in range(3600)}
    assert verdicts == {Verdict.ACCEPT}


def test_excess_within_one_second_of_sample_time_is_dropped_per_key() -> None:
    limiter = SubmitLimiter(per_second=10)
    verdicts = [limiter.admit(HR, NOW + i / 1000, wall=NOW, mono=0.0) for i in range(15)]
    assert verdicts == [Verdict.ACCEPT] * 10 + [Verdict.EXCESS] * 5
    assert limiter.admit(RR, NOW, wall=NOW, mono=0.0) is Verdict.ACCEPT  # another type
    assert limiter.admit(HR, NOW + 1, wall=NOW, mono=0.0) is Verdict.ACCEPT  # the next second
    assert limiter.dropped == 5


def test_samples_from_the_future_are_dropped() -> None:
    limiter = SubmitLimiter(future_s=60.0)
    assert limiter.admit(HR, NOW + 61, wall=NOW, mono=0.0) is Verdict.FUTURE
    assert limiter.admit(HR, NOW + 59, wall=NOW, mono=0.0) is Verdict.ACCEPT


def test_sustained_excess_is_abuse_a_short_burst_is_not() -> None:
    limiter = SubmitLimiter(per_second=1, abuse_drops=100, abuse_window_s=10.0)
    limiter.admit(HR, NOW, wall=NOW, mono=0.0)
    burst = [limiter.admit(HR, NOW, wall=NOW, mono=0.01 * i) for i in range(99)]
    assert set(burst) == {Verdict.EXCESS}
    # A new window: the count starts again.
    assert limiter.admit(HR, NOW, wall=NOW, mono=10.5) is Verdict.EXCESS
    flood = [limiter.admit(HR, NOW, wall=NOW, mono=11.0) for _ in range(99)]
    assert flood[-1] is Verdict.ABUSE
    assert Verdict.ABUSE not in flood[:-1]


def test_bad_limits_are_refused() -> None:
    with pytest.raises(ValueError):
        SubmitLimiter(per_second=0)
    with pytest.raises(ValueError):
        ReplayPacer(share=0.0)


@given(st.lists(st.tuples(st.sampled_from([HR, RR]), st.floats(0.0, 3.0)), max_size=300))
def test_never_more_than_per_second_accepted_per_key_and_second(
    steps: list[tuple[tuple[str, str], float]],
) -> None:
    # Per key, stamps only increase: the broker drops the others as duplicates first.
    limiter = SubmitLimiter(per_second=3, abuse_drops=10**9)
    counts: dict[tuple[tuple[str, str], int], int] = {}
    latest = {HR: NOW, RR: NOW}
    for key, gap in steps:
        ts = latest[key] = latest[key] + gap / 4
        if limiter.admit(key, ts, wall=NOW, mono=0.0) is Verdict.ACCEPT:
            slot = (key, int(ts))
            counts[slot] = counts.get(slot, 0) + 1
    assert all(count <= 3 for count in counts.values())


def test_the_pacer_keeps_replays_to_their_share() -> None:
    pacer = ReplayPacer(share=0.25)
    now = 0.0
    busy_total = 0.0
    for _ in range(100):
        now += pacer.delay(now)
        assert pacer.delay(now) == 0.0
        pacer.spent(now, now + 0.004)  # a 4 ms chunk
        now += 0.004
        busy_total += 0.004
    assert busy_total / (now + pacer.delay(now)) == pytest.approx(0.25)


def test_the_pacer_is_shared_so_many_replays_still_take_one_share() -> None:
    pacer = ReplayPacer(share=0.5)
    now = 0.0
    for _ in range(10):  # ten consumers each run a chunk back to back
        pacer.spent(now, now + 0.01)
        now += 0.01
    assert pacer.delay(now) == pytest.approx(0.1)  # as much idle as busy


def test_one_replay_running_and_a_small_queue() -> None:
    assert replay_admissible(running=False, waiting=0, limit=4)
    assert replay_admissible(running=True, waiting=3, limit=4)
    assert not replay_admissible(running=True, waiting=4, limit=4)


def test_unusable_submits_count_toward_abuse() -> None:
    limiter = SubmitLimiter(abuse_drops=3, abuse_window_s=10.0)
    assert [limiter.unusable(0.0) for _ in range(3)][-1] is Verdict.ABUSE
