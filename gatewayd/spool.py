"""Durable sample store (SQLite, WAL): the broker's dense seq, REPLAY, and the upstream's backlog.

Every Sample gets a seq the moment it is appended (so it can be dispatched at once) and reaches
disk with the rest of its second in one transaction at the next flush(). Reads see committed and
pending rows alike, so a REPLAY right after a reconnect misses nothing.

Seqs are dense across clean restarts and never reused after a crash: each flush records a
reservation a block ahead of the last seq handed out, and a reopened spool starts after the
reservation (a crash leaves a gap, which Terra's rule says consumers must tolerate; reuse would
be silent corruption). close() shrinks the reservation back so a clean restart stays dense.

Retention: rows older than `retention_s` go once every durable cursor (cursors(name, seq): one per
upstream, issue 6) has passed them; rows older than `max_age_s`, or over `max_bytes`, go anyway,
loudly when a cursor had not reached them yet.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
from collections import deque
from collections.abc import Callable, Iterable
from pathlib import Path

from gatewayd.clock import Clock
from gatewayd.errors import SpoolError
from gatewayd.model import DataType, Sample

log = logging.getLogger(__name__)

RESERVE_BLOCK = 4096
DEFAULT_RETENTION_S = 24 * 3600.0
DEFAULT_MAX_AGE_S = 7 * 24 * 3600.0
DEFAULT_MAX_BYTES = 1 << 30
PRUNE_EVERY_S = 60.0
# While the disk is full, unwritten rows wait in memory up to this many, then the oldest go.
MAX_PENDING = 200_000
# Deletes run on the event loop: at most this many rows per flush, so eviction never stalls it.
DELETE_CHUNK = 50_000
# How far back last_ts() looks on disk (unindexed by athlete: a bounded scan from the newest).
LAST_TS_WINDOW = 200_000

_Row = tuple[int, float, str, str, float, float | None, str | None, str, str]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS samples (
    seq INTEGER PRIMARY KEY,
    wall REAL NOT NULL,
    uid TEXT NOT NULL,
    t TEXT NOT NULL,
    ts REAL NOT NULL,
    val,
    d TEXT,
    device_id TEXT NOT NULL DEFAULT '',
    source TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS cursors (name TEXT PRIMARY KEY, seq INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
# `val` has no declared type on purpose: SQLite then keeps 71 an integer and 71.5 a real, so a
# replayed DISPATCH is byte-identical to the live one.


class Spool:
    def __init__(
        self,
        path: Path,
        *,
        retention_s: float = DEFAULT_RETENTION_S,
        max_age_s: float = DEFAULT_MAX_AGE_S,
        max_bytes: int = DEFAULT_MAX_BYTES,
        clock: Clock,
    ) -> None:
        self.path = path
        self.retention_s = retention_s
        self.max_age_s = max(max_age_s, retention_s)
        self.max_bytes = max_bytes
        self.clock = clock
        self.evicted = 0  # rows removed by the caps before every cursor had passed them
        self.expired = 0  # rows removed by plain retention
        self.lost = 0  # rows that never reached disk (disk full for too long)
        self.write_errors = 0
        self.committed = 0
        self._pending: deque[_Row] = deque()
        self._listeners: list[Callable[[int, int], None]] = []
        self._last_prune = 0.0
        self._more_to_prune = False
        self._failing = False
        self.error: str | None = None  # why the last commit failed; None once one succeeds
        self._db = self._open(path)
        row = self._db.execute("SELECT max(seq), min(seq), count(*) FROM samples").fetchone()
        reserved = int(self._meta("reserved", "0"))
        self._next_seq = max(row[0] or 0, reserved) + 1
        self._first_seq = row[1] or self._next_seq
        self._committed_rows = int(row[2])
        self._reserved = self._next_seq - 1
        if reserved > (row[0] or 0):
            log.info("spool %s: resuming at seq %d (after an unclean stop)", path, self._next_seq)

    # ------------------------------------------------------------ open / close

    def _open(self, path: Path) -> sqlite3.Connection:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            return self._connect(path)
        except sqlite3.DatabaseError as exc:
            if "not a database" not in str(exc) and "malformed" not in str(exc):
                raise SpoolError(f"cannot open spool {path}: {exc}") from None
            aside = path.with_name(f"{path.name}.corrupt-{int(self.clock.wall())}")
            log.error(
                "spool %s is corrupt (%s): moved aside to %s, starting empty", path, exc, aside
            )
            path.rename(aside)
            for suffix in ("-wal", "-shm"):
                Path(f"{path}{suffix}").unlink(missing_ok=True)
            return self._connect(path)

    @staticmethod
    def _connect(path: Path) -> sqlite3.Connection:
        try:
            db = sqlite3.connect(path, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL mode: a killed process loses nothing committed; only a power cut
            # may lose the last transactions, which is the trade the 1-commit-per-second allows.
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(_SCHEMA)
            db.execute("SELECT count(*) FROM samples").fetchone()
        except sqlite3.OperationalError as exc:
            raise SpoolError(f"cannot open spool {path}: {exc}") from None
        return db

    def close(self) -> None:
        """Flush, and give back the unused reservation so a clean restart keeps seqs dense."""
        try:
            self.flush()
            self._reserved = self._next_seq - 1
            self._db.execute(
                "INSERT OR REPLACE INTO meta(key, value) VALUES ('reserved', ?)",
                (str(self._reserved),),
            )
        except (SpoolError, sqlite3.Error) as exc:
            log.error("spool %s: could not flush on close: %s", self.path, exc)
        self._db.close()

    def _meta(self, key: str, default: str) -> str:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return default if row is None else str(row[0])

    # ------------------------------------------------------------ writing

    @property
    def next_seq(self) -> int:
        return self._next_seq

    @property
    def last_seq(self) -> int:
        """The highest seq handed out (0 before the first)."""
        return self._next_seq - 1

    def append(self, samples: Iterable[Sample], wall: float | None = None) -> int:
        """Give each sample the next seq (consecutive, in order) and queue it for the next flush.

        Returns the first seq. Never raises for disk trouble: the live path must keep going.
        """
        first = self._next_seq
        now = self.clock.wall() if wall is None else wall
        seq = first
        pending = self._pending
        for s in samples:
            pending.append(
                (
                    seq,
                    now,
                    s.uid,
                    str(s.t),
                    s.ts,
                    s.val,
                    None if s.d is None else json.dumps(list(s.d)),
                    s.device_id,
                    s.source,
                )
            )
            seq += 1
        self._next_seq = seq
        if seq == first:
            return first
        if len(pending) > MAX_PENDING:
            while len(pending) > MAX_PENDING:
                pending.popleft()
                self.lost += 1
        if seq - 1 > self._reserved:
            # A failure is already logged; the seqs stay valid for the live path.
            with contextlib.suppress(SpoolError):
                self.flush()
        for listener in self._listeners:
            listener(first, seq - 1)
        return first

    def add_listener(self, listener: Callable[[int, int], None]) -> None:
        """Called with (first seq, last seq) after each append; must be quick and never raise."""
        self._listeners.append(listener)

    def flush(self) -> int:
        """Commit the pending rows in one transaction; return how many were written.

        Raises SpoolError when the disk refuses (the rows stay pending, bounded by MAX_PENDING).
        """
        rows = list(self._pending)
        reserve = self._next_seq - 1 + RESERVE_BLOCK
        db = self._db
        try:
            db.execute("BEGIN")
            if rows:
                db.executemany("INSERT OR REPLACE INTO samples VALUES (?,?,?,?,?,?,?,?,?)", rows)
            db.execute(
                "INSERT OR REPLACE INTO meta(key, value) VALUES ('reserved', ?)", (str(reserve),)
            )
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            if db.in_transaction:
                db.execute("ROLLBACK")
            self.write_errors += 1
            self.error = f"cannot write {self.path}: {exc}"
            if not self._failing:
                self._failing = True
                log.error(
                    "spool %s cannot write (%s): %d samples wait in memory; live outputs go on",
                    self.path,
                    exc,
                    len(rows),
                )
            raise SpoolError(f"spool {self.path}: {exc}") from None
        self.error = None
        if self._failing:
            self._failing = False
            log.warning("spool %s writes again", self.path)
        for _ in range(len(rows)):
            self._pending.popleft()
        self._reserved = reserve
        if self._committed_rows == 0 and rows:
            self._first_seq = rows[0][0]
        self._committed_rows += len(rows)
        self.committed += len(rows)
        now = self.clock.wall()
        if rows:
            self._enforce_size()
        if self._more_to_prune or now - self._last_prune >= PRUNE_EVERY_S:
            self._last_prune = now
            self.prune(now)
        return len(rows)

    # ------------------------------------------------------------ reading

    def read(self, after: int, before: int, limit: int = 1000) -> list[tuple[int, Sample]]:
        """Up to `limit` samples with after < seq < before, in seq order, committed or pending."""
        if limit <= 0 or before <= after + 1:
            return []
        out: list[tuple[int, Sample]] = []
        pending_start = self._pending[0][0] if self._pending else self._next_seq
        if after + 1 < pending_start:
            cursor = self._db.execute(
                "SELECT seq, wall, uid, t, ts, val, d, device_id, source FROM samples"
                " WHERE seq > ? AND seq < ? ORDER BY seq LIMIT ?",
                (after, min(before, pending_start), limit),
            )
            out.extend((row[0], _sample(row)) for row in cursor)
        if len(out) < limit and self._pending and before > pending_start:
            start = max(after + 1 - pending_start, 0)
            for i in range(start, len(self._pending)):
                row = self._pending[i]
                if row[0] >= before or len(out) >= limit:
                    break
                out.append((row[0], _sample(row)))
        return out

    def first_seq(self) -> int:
        """The oldest seq still held (next_seq when empty)."""
        if self._committed_rows:
            return self._first_seq
        return self._pending[0][0] if self._pending else self._next_seq

    def depth(self) -> int:
        """Rows held, committed and pending."""
        return self._committed_rows + len(self._pending)

    def oldest_wall(self) -> float | None:
        row = self._db.execute("SELECT wall FROM samples ORDER BY seq LIMIT 1").fetchone()
        if row is not None:
            return float(row[0])
        return self._pending[0][1] if self._pending else None

    def size_bytes(self) -> int:
        """Bytes in use by the database (free pages excluded; the WAL not counted)."""
        page_size = self._db.execute("PRAGMA page_size").fetchone()[0]
        pages = self._db.execute("PRAGMA page_count").fetchone()[0]
        free = self._db.execute("PRAGMA freelist_count").fetchone()[0]
        return int((pages - free) * page_size)

    def last_ts(self, uid: str, t: str) -> float | None:
        """The newest sample time held for (uid, t): lets a broker drop re-sent SUBMITs."""
        newest: float | None = None
        for row in reversed(self._pending):
            if row[2] == uid and row[3] == t:
                newest = row[4]
                break
        if newest is None:
            hit = self._db.execute(
                "SELECT ts FROM samples WHERE seq > ? AND uid = ? AND t = ?"
                " ORDER BY seq DESC LIMIT 1",
                (self._next_seq - LAST_TS_WINDOW, uid, t),
            ).fetchone()
            newest = None if hit is None else float(hit[0])
        return newest

    # ------------------------------------------------------------ cursors (one per upstream)

    def cursor(self, name: str) -> int:
        """The last seq `name` has fully handled; 0 for a new name (it starts at the oldest)."""
        row = self._db.execute("SELECT seq FROM cursors WHERE name = ?", (name,)).fetchone()
        return 0 if row is None else int(row[0])

    def set_cursor(self, name: str, seq: int) -> None:
        try:
            self._db.execute(
                "INSERT INTO cursors(name, seq) VALUES (?, ?)"
                " ON CONFLICT(name) DO UPDATE SET seq = max(seq, excluded.seq)",
                (name, seq),
            )
        except sqlite3.Error as exc:
            raise SpoolError(f"spool {self.path}: cannot save cursor {name}: {exc}") from None

    def drop_cursor(self, name: str) -> None:
        self._db.execute("DELETE FROM cursors WHERE name = ?", (name,))

    def cursors(self) -> dict[str, int]:
        return {str(n): int(s) for n, s in self._db.execute("SELECT name, seq FROM cursors")}

    # ------------------------------------------------------------ retention

    def prune(self, now: float | None = None) -> int:
        """Apply retention and the age cap; return the rows removed (at most a chunk or two;
        the next flush continues when there was more)."""
        now = self.clock.wall() if now is None else now
        self._more_to_prune = False
        cursors = self.cursors()
        floor = min(cursors.values()) if cursors else None
        removed = 0
        expired_upto = self._seq_before(now - self.retention_s)
        if expired_upto is not None:
            upto = expired_upto if floor is None else min(expired_upto, floor)
            removed += self._delete_upto(upto, forced=False)
        aged_upto = self._seq_before(now - self.max_age_s)
        if aged_upto is not None:
            removed += self._delete_upto(
                aged_upto, forced=True, why=f"older than {self.max_age_s:.0f} s"
            )
        return removed

    def _enforce_size(self) -> None:
        used = self.size_bytes()
        if used <= self.max_bytes or self._committed_rows == 0:
            return
        per_row = used / self._committed_rows
        # Overshoot by 2 % so eviction does not run on every flush at the cap.
        excess_rows = int((used - self.max_bytes * 0.98) / per_row) + 1
        self._delete_upto(self._first_seq + excess_rows - 1, forced=True, why="over the size cap")

    def _seq_before(self, wall: float) -> int | None:
        """The highest committed seq appended before `wall` (binary search: wall grows with seq)."""
        row = self._db.execute("SELECT seq, wall FROM samples ORDER BY seq LIMIT 1").fetchone()
        if row is None or row[1] >= wall:
            return None
        lo = int(row[0])  # known to be before `wall`
        hi = self._next_seq  # known not to be (or beyond the rows)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            hit = self._db.execute(
                "SELECT seq, wall FROM samples WHERE seq >= ? ORDER BY seq LIMIT 1", (mid,)
            ).fetchone()
            if hit is None or hit[1] >= wall:
                hi = mid
            else:
                lo = int(hit[0])
                if lo >= hi:
                    break
        return lo

    def _delete_upto(self, seq: int, *, forced: bool, why: str = "") -> int:
        if seq < self._first_seq or self._committed_rows == 0:
            return 0
        if seq >= self._first_seq + DELETE_CHUNK:
            seq = self._first_seq + DELETE_CHUNK - 1
            self._more_to_prune = True
        try:
            cursor = self._db.execute("DELETE FROM samples WHERE seq <= ?", (seq,))
        except sqlite3.Error as exc:
            log.error("spool %s: cannot evict: %s", self.path, exc)
            return 0
        removed = max(cursor.rowcount, 0)
        self._committed_rows -= removed
        nxt = self._db.execute("SELECT min(seq) FROM samples").fetchone()[0]
        self._first_seq = int(nxt) if nxt is not None else self._next_seq
        if not forced:
            self.expired += removed
            return removed
        cursors = self.cursors()
        unsent = max(0, seq - min(cursors.values())) if cursors else 0
        self.evicted += removed
        if removed:
            log.warning(
                "spool %s: evicted %d oldest samples (%s)%s",
                self.path,
                removed,
                why,
                f"; about {min(unsent, removed)} had not been forwarded yet" if unsent else "",
            )
        return removed


def _sample(row: _Row) -> Sample:
    d = row[6]
    return Sample(
        uid=row[2],
        t=DataType(row[3]),
        ts=row[4],
        val=row[5],
        d=None if d is None else tuple(json.loads(d)),
        device_id=row[7],
        source=row[8],
    )
