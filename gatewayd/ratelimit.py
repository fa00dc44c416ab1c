"""PURE. How much one authenticated client may make the broker do: SUBMIT rate and REPLAY share.

Sans-I/O like gatewayd.protocol: callers pass times (and sample timestamps) in; these classes
only count and decide. The broker (sinks/local_broker.py) drives them.

SUBMIT: a producer may send at most `per_second` samples per athlete and data type per second of
*sample time* (their `ts`), and none stamped more than `future_s` ahead of the hub's clock. Sample
time, not arrival time, because a forwarder catching up after an outage legitimately sends hours
of samples at wire speed, each in its own second; a phone sends a few per second per type. What
breaks the rule is dropped and counted; `abuse_drops` drops within `abuse_window_s` (arrival
time) is sustained abuse, answered with 1008.

REPLAY: one at a time per consumer, at most `waiting` more queued behind it (one more is abuse:
1008). All REPLAYs together are paced to `share` of the broker's time: after a chunk that took
`busy` seconds, the next chunk of any REPLAY waits until busy * (1 - share) / share has passed, so
live DISPATCHes and other consumers keep their latency however many REPLAYs run.
"""

from __future__ import annotations

import enum
import math
from collections import OrderedDict
from dataclasses import dataclass

DEFAULT_SUBMIT_PER_S = 10
DEFAULT_FUTURE_S = 60.0
DEFAULT_ABUSE_DROPS = 1000
DEFAULT_ABUSE_WINDOW_S = 10.0
DEFAULT_REPLAY_WAITING = 4
DEFAULT_REPLAY_SHARE = 0.25
MAX_KEYS = 10_000  # (athlete, type) pairs remembered per producer; the least recent go first


class Verdict(enum.Enum):
    ACCEPT = "accept"
    EXCESS = "excess"  # over the per-second rate of its (athlete, type): dropped and counted
    FUTURE = "future"  # stamped too far ahead of the hub's clock: dropped and counted
    ABUSE = "abuse"  # sustained: close with 1008


@dataclass(slots=True)
class _Second:
    second: float  # floor(ts) of the samples counted
    count: int


class SubmitLimiter:
    """One producer connection's SUBMIT budget."""

    def __init__(
        self,
        *,
        per_second: int = DEFAULT_SUBMIT_PER_S,
        future_s: float = DEFAULT_FUTURE_S,
        abuse_drops: int = DEFAULT_ABUSE_DROPS,
        abuse_window_s: float = DEFAULT_ABUSE_WINDOW_S,
    ) -> None:
        if per_second < 1 or abuse_drops < 1 or not abuse_window_s > 0 or not future_s >= 0:
            raise ValueError("need per_second >= 1, abuse_drops >= 1, windows > 0")
        self.per_second = per_second
        self.future_s = future_s
        self.abuse_drops = abuse_drops
        self.abuse_window_s = abuse_window_s
        self.dropped = 0
        self._seconds: OrderedDict[tuple[str, str], _Second] = OrderedDict()
        self._window_start = -math.inf
        self._window_drops = 0

    def admit(self, key: tuple[str, str], ts: float, *, wall: float, mono: float) -> Verdict:
        """Decide on one SUBMIT of `key` = (athlete, type) stamped `ts` arriving at `mono`."""
        if ts > wall + self.future_s:
            return self._drop(Verdict.FUTURE, mono)
        second = math.floor(ts)
        slot = self._seconds.get(key)
        if slot is None:
            self._seconds[key] = _Second(second, 1)
            if len(self._seconds) > MAX_KEYS:
                self._seconds.popitem(last=False)
            return Verdict.ACCEPT
        self._seconds.move_to_end(key)
        if slot.second != second:
            slot.second = second
            slot.count = 1
            return Verdict.ACCEPT
        if slot.count < self.per_second:
            slot.count += 1
            return Verdict.ACCEPT
        return self._drop(Verdict.EXCESS, mono)

    def unusable(self, mono: float) -> Verdict:
        """A SUBMIT dropped for its content (malformed, unknown type): it counts toward abuse."""
        return self._drop(Verdict.EXCESS, mono)

    def _drop(self, verdict: Verdict, mono: float) -> Verdict:
        self.dropped += 1
        if mono >= self._window_start + self.abuse_window_s:
            self._window_start = mono
            self._window_drops = 0
        self._window_drops += 1
        if self._window_drops >= self.abuse_drops:
            return Verdict.ABUSE
        return verdict


class ReplayPacer:
    """The share of the broker's time that all REPLAYs together may take (one per broker)."""

    def __init__(self, *, share: float = DEFAULT_REPLAY_SHARE) -> None:
        if not 0 < share <= 1:
            raise ValueError("share must be in (0, 1]")
        self.share = share
        self._ready_at = -math.inf
        self.busy_s = 0.0  # total time spent building REPLAY chunks

    def delay(self, now: float) -> float:
        """How long the next REPLAY chunk must wait; 0 when it may run now."""
        return max(self._ready_at - now, 0.0)

    def spent(self, started: float, ended: float) -> None:
        """A chunk ran from `started` to `ended`: hold the next one back to keep the share."""
        busy = max(ended - started, 0.0)
        self.busy_s += busy
        # From the later of its start and the previous budget: chunks run early still pay.
        self._ready_at = max(self._ready_at, started) + busy / self.share


def replay_admissible(running: bool, waiting: int, limit: int = DEFAULT_REPLAY_WAITING) -> bool:
    """May a consumer with a REPLAY `running` and `waiting` queued behind it ask for another?"""
    return not running or waiting < limit
