"""PURE. The guessing brake: an address that keeps presenting wrong credentials stops being heard.

Sans-I/O like gatewayd.protocol: the caller passes the peer's address and the monotonic time.

After `attempts` refused credentials from one address within `window_s` (the broker counts wrong
IDENTIFY tokens, admin tokens on /api and developer keys on /auth together), that address is
locked: its further attempts are refused (IDENTIFY with 4001 as for any bad token, HTTP with 429)
without looking at the credential, for
`lock_s`, doubling with each new episode up to `max_lock_s`. An address that stays quiet for
`max_lock_s` after its last lock is forgiven (its next episode starts at `lock_s` again). Other
addresses are unaffected, so a right token from elsewhere is checked as usual.

Memory is bounded: at most `max_addresses` addresses are remembered, the least recently seen go
first (an attacker with many addresses then costs a table entry each, never a lock on others).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field

DEFAULT_ATTEMPTS = 10
DEFAULT_WINDOW_S = 60.0
DEFAULT_LOCK_S = 60.0
DEFAULT_MAX_LOCK_S = 3600.0
DEFAULT_MAX_ADDRESSES = 4096


@dataclass(slots=True)
class _Address:
    refusals: deque[float] = field(default_factory=deque)
    locked_until: float = 0.0
    lock_s: float = 0.0  # the length of the current (or last) lock; 0 before the first
    episodes: int = 0


@dataclass(frozen=True, slots=True)
class Locked:
    """A new episode began: log it (once), then refuse unchecked until `until`."""

    address: str
    refusals: int
    lock_s: float
    until: float


class GuessBrake:
    def __init__(
        self,
        *,
        attempts: int = DEFAULT_ATTEMPTS,
        window_s: float = DEFAULT_WINDOW_S,
        lock_s: float = DEFAULT_LOCK_S,
        max_lock_s: float = DEFAULT_MAX_LOCK_S,
        max_addresses: int = DEFAULT_MAX_ADDRESSES,
    ) -> None:
        if attempts < 1 or not window_s > 0 or not 0 < lock_s <= max_lock_s:
            raise ValueError("need attempts >= 1, window_s > 0 and 0 < lock_s <= max_lock_s")
        self.attempts = attempts
        self.window_s = window_s
        self.lock_s = lock_s
        self.max_lock_s = max_lock_s
        self.max_addresses = max_addresses
        self._table: OrderedDict[str, _Address] = OrderedDict()

    def locked(self, address: str, now: float) -> bool:
        """True: refuse this attempt without checking its credential."""
        entry = self._table.get(address)
        return entry is not None and now < entry.locked_until

    def retry_after(self, address: str, now: float) -> float:
        """Seconds left in the address's lock; 0 when it is not locked."""
        entry = self._table.get(address)
        return max(entry.locked_until - now, 0.0) if entry is not None else 0.0

    def refused(self, address: str, now: float) -> Locked | None:
        """Record a checked and refused token; a Locked when this starts an episode."""
        entry = self._entry(address, now)
        refusals = entry.refusals
        refusals.append(now)
        while refusals and refusals[0] <= now - self.window_s:
            refusals.popleft()
        if len(refusals) < self.attempts:
            return None
        count = len(refusals)
        refusals.clear()
        entry.lock_s = min(entry.lock_s * 2, self.max_lock_s) if entry.lock_s else self.lock_s
        entry.locked_until = now + entry.lock_s
        entry.episodes += 1
        return Locked(address, count, entry.lock_s, entry.locked_until)

    def __len__(self) -> int:
        return len(self._table)

    def _entry(self, address: str, now: float) -> _Address:
        entry = self._table.get(address)
        if entry is None:
            entry = self._table[address] = _Address()
            while len(self._table) > self.max_addresses:
                self._table.popitem(last=False)
        else:
            self._table.move_to_end(address)
            if entry.lock_s and now >= entry.locked_until + self.max_lock_s:
                entry.lock_s = 0.0  # quiet long enough: forgiven
        return entry
