"""Durable sample store (SQLite, WAL): the broker's dense seq, REPLAY, and the upstream's backlog.

Every Sample gets a seq the moment it is appended (so it can be dispatched at once) and reaches
disk with the rest of its second at the next flush(), as one row: a block of consecutive seqs
packed by gatewayd/spool_codec.py (about 3-6 bytes a sample instead of 83 for a row each).
Reads see committed and pending samples alike, so a REPLAY right after a reconnect misses nothing.

Seqs are dense across clean restarts and never reused after a crash: the spool records a
reservation a block ahead of the last seq handed out, and a reopened spool starts after the
reservation (a crash leaves a gap, which Terra's rule says consumers must tolerate; reuse would
be silent corruption). close() shrinks the reservation back so a clean restart stays dense.

Retention: samples older than `retention_s` go once every durable cursor (cursors(name, seq): one
per upstream, issue 6) has passed them; samples older than `max_age_s`, or over `max_bytes`, go
anyway, loudly when a cursor had not reached them yet. The oldest held seq is kept in `meta`, so
a block can be partly gone: its space comes back when its last sample goes.

A spool of the previous format (table `samples`, one row per sample) is converted in place at
open, a chunk per transaction, so a conversion cut short by a kill carries on at the next start.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from pathlib import Path

from gatewayd import spool_codec as codec
from gatewayd.clock import Clock
from gatewayd.errors import SpoolError
from gatewayd.model import DataType, Sample

log = logging.getLogger(__name__)

FORMAT = "2"
RESERVE_BLOCK = 4096
DEFAULT_RETENTION_S = 24 * 3600.0
DEFAULT_MAX_AGE_S = 7 * 24 * 3600.0
# 1 GiB holds ~160 M samples at ~6.6 bytes each: 24 h of ~500 athletes (docs/upstream.md).
DEFAULT_MAX_BYTES = 1 << 30
PRUNE_EVERY_S = 60.0
# While the disk is full, unwritten samples wait in memory up to this many, then the oldest go.
MAX_PENDING = 200_000
# Deletes run on the event loop: at most this many samples per flush, so eviction never stalls it.
DELETE_CHUNK = 50_000
# How far back last_ts() looks on disk (unindexed by athlete: a bounded scan from the newest).
LAST_TS_WINDOW = 200_000
# Samples per block: a read decodes a whole block, so it stays small enough to be cheap.
BLOCK_MAX = 2048
# Decoded blocks kept for readers (the forwarder and REPLAY read the same recent blocks).
CACHE_BLOCKS = 8
# A second of a gym is a row of 1-3 kB: in 4 kB pages one such row fills a page about half, and
# each commit writes ~12 kB to the WAL (SD card wear); 1 kB pages hold the same rows at ~95 % and
# write ~4 kB a commit.
PAGE_SIZE = 1024
# The WAL is checkpointed every this many pages and cut back to this size, so it stays ~1 MiB
# rather than SQLite's 4 MiB default (which alone would be 10 % of a day's spool for 10 athletes).
WAL_PAGES = 1000
WAL_LIMIT = 1 << 20
# Old-format rows converted per transaction.
CONVERT_CHUNK = 50_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS blocks (
    seq INTEGER PRIMARY KEY,
    last INTEGER NOT NULL,
    wall REAL NOT NULL,
    data BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS streams (
    id INTEGER PRIMARY KEY,
    uid TEXT NOT NULL,
    t TEXT NOT NULL,
    device_id TEXT NOT NULL,
    source TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS cursors (name TEXT PRIMARY KEY, seq INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
# blocks: `seq` is the block's first seq, `last` its last (seqs within a block are consecutive),
# `wall` the clock when its last sample was appended (retention goes by it).


class _Chunk:
    """One append's samples, waiting for the next flush."""

    __slots__ = ("first", "wall", "samples")

    def __init__(self, first: int, wall: float, samples: list[Sample]) -> None:
        self.first = first
        self.wall = wall
        self.samples = samples


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
        self.evicted = 0  # samples removed by the caps before every cursor had passed them
        self.expired = 0  # samples removed by plain retention
        self.lost = 0  # samples that never reached disk (disk full for too long)
        self.write_errors = 0
        self.committed = 0
        self._pending: deque[_Chunk] = deque()
        self._pending_count = 0
        self._listeners: list[Callable[[int, int], None]] = []
        self._last_prune = 0.0
        self._more_to_prune = False
        self._failing = False
        self.error: str | None = None  # why the last commit failed; None once one succeeds
        self._streams: list[codec.Stream] = []
        self._stream_ids: dict[codec.StreamKey, int] = {}
        self._new_streams: list[tuple[int, codec.StreamKey]] = []
        self._cache: OrderedDict[int, list[Sample]] = OrderedDict()
        self._db = self._open(path)
        self._load_streams()
        if self._has_table("samples"):
            try:
                self._convert_v1()
            except BaseException:
                self._db.close()  # a later open carries on where this one stopped
                raise
        db = self._db
        first_block, last, total = db.execute(
            "SELECT min(seq), max(last), sum(last - seq + 1) FROM blocks"
        ).fetchone()
        reserved = int(self._meta("reserved", "0"))
        self._next_seq = max(last or 0, reserved) + 1
        self._first_seq = max(int(self._meta("first", "0")), first_block or self._next_seq)
        self._committed_rows = int(total or 0) - (
            self._first_seq - (first_block or self._first_seq)
        )
        self._reserved = self._next_seq - 1
        if reserved > (last or 0):
            log.info("spool %s: resuming at seq %d (after an unclean stop)", path, self._next_seq)

    # ------------------------------------------------------------ open / close

    def _open(self, path: Path) -> sqlite3.Connection:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            db = self._connect(path)
            why = self._unknown_format(db)
        except sqlite3.DatabaseError as exc:
            if "not a database" not in str(exc) and "malformed" not in str(exc):
                raise SpoolError(f"cannot open spool {path}: {exc}") from None
            why = f"is corrupt ({exc})"
            db = None
        if why is None and db is not None:
            return db
        if db is not None:
            db.close()
        aside = path.with_name(f"{path.name}.corrupt-{int(self.clock.wall())}")
        log.error("spool %s %s: moved aside to %s, starting empty", path, why, aside)
        path.rename(aside)
        for suffix in ("-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
        db = self._connect(path)
        return db

    @staticmethod
    def _connect(path: Path) -> sqlite3.Connection:
        try:
            db = sqlite3.connect(path, isolation_level=None)
            db.execute(f"PRAGMA page_size={PAGE_SIZE}")  # only a new file takes it
            db.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL mode: a killed process loses nothing committed; only a power cut
            # may lose the last transactions, which is the trade the 1-commit-per-second allows.
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute(f"PRAGMA wal_autocheckpoint={WAL_PAGES}")
            db.execute(f"PRAGMA journal_size_limit={WAL_LIMIT}")
            fresh = db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0
            db.executescript(_SCHEMA)
            if fresh:
                db.execute("INSERT INTO meta(key, value) VALUES ('format', ?)", (FORMAT,))
        except sqlite3.OperationalError as exc:
            raise SpoolError(f"cannot open spool {path}: {exc}") from None
        return db

    @staticmethod
    def _unknown_format(db: sqlite3.Connection) -> str | None:
        """Why this file is no spool we can read (None when it is one)."""
        row = db.execute("SELECT value FROM meta WHERE key = 'format'").fetchone()
        if row is not None and row[0] == FORMAT:
            return None
        old = db.execute("SELECT 1 FROM sqlite_master WHERE name = 'samples'").fetchone()
        if row is None and old is not None:
            return None  # the previous format: converted once the streams are loaded
        return f"has an unknown format ({'none' if row is None else row[0]}, expected {FORMAT})"

    def _has_table(self, name: str) -> bool:
        hit = self._db.execute("SELECT 1 FROM sqlite_master WHERE name = ?", (name,)).fetchone()
        return hit is not None

    def _load_streams(self) -> None:
        for sid, uid, t, device_id, source in self._db.execute(
            "SELECT id, uid, t, device_id, source FROM streams ORDER BY id"
        ):
            while len(self._streams) <= sid:
                self._streams.append(("", DataType.HEART_RATE, "", ""))
            self._streams[sid] = (uid, DataType(t), device_id, source)
            self._stream_ids[(uid, t, device_id, source)] = sid

    def _stream_id(self, key: codec.StreamKey) -> int:
        sid = self._stream_ids.get(key)
        if sid is None:
            sid = len(self._streams)
            uid, t, device_id, source = key
            self._streams.append((uid, DataType(t), device_id, source))
            self._stream_ids[key] = sid
            self._new_streams.append((sid, key))
        return sid

    def close(self) -> None:
        """Flush, and give back the unused reservation so a clean restart keeps seqs dense."""
        try:
            self.flush()
            self._reserved = self._next_seq - 1
            self._set_meta("reserved", self._reserved)
        except (SpoolError, sqlite3.Error) as exc:
            log.error("spool %s: could not flush on close: %s", self.path, exc)
        self._db.close()

    def _meta(self, key: str, default: str) -> str:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return default if row is None else str(row[0])

    def _set_meta(self, key: str, value: object) -> None:
        self._db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, str(value)))

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
        batch = list(samples)
        if not batch:
            return first
        self._pending.append(_Chunk(first, self.clock.wall() if wall is None else wall, batch))
        seq = first + len(batch)
        self._next_seq = seq
        self._pending_count += len(batch)
        if self._pending_count > MAX_PENDING:
            self._drop_oldest_pending(self._pending_count - MAX_PENDING)
        if seq - 1 > self._reserved:
            # A failure is already logged; the seqs stay valid for the live path.
            with contextlib.suppress(SpoolError):
                self.flush()
        for listener in self._listeners:
            listener(first, seq - 1)
        return first

    def _drop_oldest_pending(self, excess: int) -> None:
        self.lost += excess
        self._pending_count -= excess
        while excess:
            chunk = self._pending[0]
            if len(chunk.samples) <= excess:
                excess -= len(chunk.samples)
                self._pending.popleft()
            else:
                chunk.samples = chunk.samples[excess:]
                chunk.first += excess
                excess = 0

    def add_listener(self, listener: Callable[[int, int], None]) -> None:
        """Called with (first seq, last seq) after each append; must be quick and never raise."""
        self._listeners.append(listener)

    def _blocks(self) -> list[tuple[int, float, list[Sample]]]:
        """The pending samples cut into blocks: (first seq, wall, samples)."""
        out: list[tuple[int, float, list[Sample]]] = []
        for chunk in self._pending:
            first, samples = chunk.first, chunk.samples
            if out and out[-1][0] + len(out[-1][2]) == first and len(out[-1][2]) < BLOCK_MAX:
                block = out[-1][2]
                room = BLOCK_MAX - len(block)
                block.extend(samples[:room])
                out[-1] = (out[-1][0], chunk.wall, block)
                first, samples = first + room, samples[room:]
            for i in range(0, len(samples), BLOCK_MAX):
                out.append((first + i, chunk.wall, list(samples[i : i + BLOCK_MAX])))
        return out

    def flush(self) -> int:
        """Commit the pending samples in one transaction; return how many were written.

        Raises SpoolError when the disk refuses (the samples stay pending, bounded by MAX_PENDING).
        """
        count = self._pending_count
        # The reservation is renewed only when half of it is used: most commits write one page.
        renew = self._next_seq - 1 + RESERVE_BLOCK // 2 > self._reserved
        if not count and not renew:
            self._maybe_prune()
            return 0
        reserve = self._next_seq - 1 + RESERVE_BLOCK if renew else self._reserved
        blocks = self._blocks()
        db = self._db
        try:
            rows = [
                (
                    first,
                    first + len(samples) - 1,
                    wall,
                    codec.encode(samples, self._stream_id, self._stream_ids),
                )
                for first, wall, samples in blocks
            ]
            db.execute("BEGIN")
            if self._new_streams:
                db.executemany(
                    "INSERT OR REPLACE INTO streams(id, uid, t, device_id, source)"
                    " VALUES (?,?,?,?,?)",
                    [(sid, *key) for sid, key in self._new_streams],
                )
            db.executemany("INSERT OR REPLACE INTO blocks VALUES (?,?,?,?)", rows)
            if renew:
                self._set_meta("reserved", reserve)
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
                    count,
                )
            raise SpoolError(f"spool {self.path}: {exc}") from None
        self.error = None
        if self._failing:
            self._failing = False
            log.warning("spool %s writes again", self.path)
        self._new_streams.clear()
        self._pending.clear()
        self._pending_count = 0
        self._reserved = reserve
        for first, _, samples in blocks:
            self._remember(first, samples)
        if self._committed_rows == 0 and blocks:
            self._first_seq = blocks[0][0]
        self._committed_rows += count
        self.committed += count
        if count:
            self._enforce_size()
        self._maybe_prune()
        return count

    def _maybe_prune(self) -> None:
        now = self.clock.wall()
        if self._more_to_prune or now - self._last_prune >= PRUNE_EVERY_S:
            self._last_prune = now
            self.prune(now)

    # ------------------------------------------------------------ reading

    def _remember(self, first: int, samples: list[Sample]) -> None:
        self._cache[first] = samples
        if len(self._cache) > CACHE_BLOCKS:
            self._cache.popitem(last=False)

    def _block(self, first: int, blob: bytes) -> list[Sample]:
        samples = self._cache.get(first)
        if samples is None:
            try:
                samples = codec.decode(blob, self._streams)
            except codec.BlockError as exc:
                log.error("spool %s: block at seq %d skipped: %s", self.path, first, exc)
                samples = []
            self._remember(first, samples)
        return samples

    def read(self, after: int, before: int, limit: int = 1000) -> list[tuple[int, Sample]]:
        """Up to `limit` samples with after < seq < before, in seq order, committed or pending."""
        if limit <= 0 or before <= after + 1:
            return []
        out: list[tuple[int, Sample]] = []
        lo = after + 1
        pending_start = self._pending[0].first if self._pending else self._next_seq
        if self._committed_rows and max(lo, self._first_seq) < pending_start:
            lo = max(lo, self._first_seq)
            hi = min(before, pending_start)
            rows = self._db.execute(
                "SELECT seq, data FROM blocks WHERE seq >= coalesce("
                "(SELECT max(seq) FROM blocks WHERE seq <= ?), 0) AND seq < ? ORDER BY seq",
                (lo, hi),
            )
            for first, blob in rows:
                samples = self._block(first, blob)
                start, stop = max(lo - first, 0), min(hi - first, len(samples))
                stop = min(stop, start + limit - len(out))
                out.extend(
                    zip(range(first + start, first + stop), samples[start:stop], strict=True)
                )
                if len(out) >= limit:
                    return out
        if self._pending and before > pending_start:
            for chunk in self._pending:
                first, samples = chunk.first, chunk.samples
                if first >= before:
                    break
                if first + len(samples) <= after + 1:
                    continue
                start = max(after + 1 - first, 0)
                stop = min(before - first, len(samples), start + limit - len(out))
                out.extend(
                    zip(range(first + start, first + stop), samples[start:stop], strict=True)
                )
                if len(out) >= limit:
                    break
        return out

    def first_seq(self) -> int:
        """The oldest seq still held (next_seq when empty)."""
        if self._committed_rows:
            return self._first_seq
        return self._pending[0].first if self._pending else self._next_seq

    def depth(self) -> int:
        """Samples held, committed and pending."""
        return self._committed_rows + self._pending_count

    def oldest_wall(self) -> float | None:
        row = self._db.execute("SELECT wall FROM blocks ORDER BY seq LIMIT 1").fetchone()
        if row is not None:
            return float(row[0])
        return self._pending[0].wall if self._pending else None

    def size_bytes(self) -> int:
        """Bytes in use by the database (free pages excluded; the WAL not counted)."""
        page_size = self._db.execute("PRAGMA page_size").fetchone()[0]
        pages = self._db.execute("PRAGMA page_count").fetchone()[0]
        free = self._db.execute("PRAGMA freelist_count").fetchone()[0]
        return int((pages - free) * page_size)

    def last_ts(self, uid: str, t: str) -> float | None:
        """The newest sample time held for (uid, t): lets a broker drop re-sent SUBMITs."""
        for chunk in reversed(self._pending):
            for s in reversed(chunk.samples):
                if s[0] == uid and s[1] == t:
                    return s[2]
        wanted = {i for i, s in enumerate(self._streams) if s[0] == uid and s[1] == t}
        if not wanted or not self._committed_rows:
            return None
        floor = max(self._next_seq - LAST_TS_WINDOW, self._first_seq)
        rows = self._db.execute(
            "SELECT seq, data FROM blocks WHERE last >= ? ORDER BY seq DESC", (floor,)
        )
        for first, blob in rows:
            samples = self._block(first, blob)
            for i in range(len(samples) - 1, -1, -1):
                if first + i < floor:
                    return None
                s = samples[i]
                if s[0] == uid and s[1] == t:
                    return s[2]
        return None

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
        """Apply retention and the age cap; return the samples removed (at most a chunk or two;
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
        upto = self._first_seq + int((used - self.max_bytes * 0.98) / per_row)
        # Up to the end of its block: only a whole block gives its pages back.
        row = self._db.execute(
            "SELECT last FROM blocks WHERE seq <= ? ORDER BY seq DESC LIMIT 1", (upto,)
        ).fetchone()
        if row is not None:
            upto = max(upto, int(row[0]))
        self._delete_upto(upto, forced=True, why="over the size cap")

    def _seq_before(self, wall: float) -> int | None:
        """The highest committed seq appended before `wall` (binary search: wall grows with seq)."""
        row = self._db.execute("SELECT seq, last, wall FROM blocks ORDER BY seq LIMIT 1").fetchone()
        if row is None or row[2] >= wall:
            return None
        lo, lo_last = int(row[0]), int(row[1])  # a block known to be before `wall`
        hi = self._next_seq  # known not to be (or beyond the blocks)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            hit = self._db.execute(
                "SELECT seq, last, wall FROM blocks WHERE seq >= ? ORDER BY seq LIMIT 1", (mid,)
            ).fetchone()
            if hit is None or hit[2] >= wall:
                hi = mid
            else:
                lo, lo_last = int(hit[0]), int(hit[1])
                if lo >= hi:
                    break
        return lo_last

    def _delete_upto(self, seq: int, *, forced: bool, why: str = "") -> int:
        first = self._first_seq
        if seq < first or self._committed_rows == 0:
            return 0
        if seq >= first + DELETE_CHUNK:
            seq = first + DELETE_CHUNK - 1
            self._more_to_prune = True
        db = self._db
        try:
            held = db.execute(
                "SELECT coalesce(sum(min(last, ?) - max(seq, ?) + 1), 0) FROM blocks"
                " WHERE seq <= ? AND last >= ?",
                (seq, first, seq, first),
            ).fetchone()[0]
            db.execute("BEGIN")
            db.execute("DELETE FROM blocks WHERE seq <= ? AND last <= ?", (seq, seq))
            nxt = db.execute("SELECT seq FROM blocks ORDER BY seq LIMIT 1").fetchone()
            new_first = self._next_seq if nxt is None else max(int(nxt[0]), seq + 1)
            self._set_meta("first", new_first)
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            if db.in_transaction:
                db.execute("ROLLBACK")
            log.error("spool %s: cannot evict: %s", self.path, exc)
            return 0
        removed = int(held)
        self._committed_rows -= removed
        self._first_seq = new_first
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

    # ------------------------------------------------------------ the previous format

    def _convert_v1(self) -> None:
        """Move the rows of a format-1 spool (one row per sample) into blocks, oldest first."""
        db = self._db
        left = db.execute("SELECT count(*) FROM samples").fetchone()[0]
        log.warning(
            "spool %s: converting %d samples from the previous format (a row per sample) to"
            " blocks; cursors, seqs and retention carry over",
            self.path,
            left,
        )
        done = 0
        while rows := db.execute(
            "SELECT seq, wall, uid, t, ts, val, d, device_id, source FROM samples"
            " ORDER BY seq LIMIT ?",
            (CONVERT_CHUNK,),
        ).fetchall():
            # [first seq, wall of the first row, wall of the last row, samples]
            blocks: list[tuple[int, float, list[float], list[Sample]]] = []
            for seq, wall, uid, t, ts, val, d, device_id, source in rows:
                sample = Sample(
                    uid,
                    DataType(t),
                    ts,
                    val=val,
                    d=None if d is None else tuple(json.loads(d)),
                    device_id=device_id,
                    source=source,
                )
                if blocks:
                    first, start_wall, last_wall, samples = blocks[-1]
                    if (
                        first + len(samples) == seq
                        and len(samples) < BLOCK_MAX
                        and wall - start_wall < 1.0
                    ):
                        samples.append(sample)
                        last_wall[0] = wall
                        continue
                blocks.append((seq, wall, [wall], [sample]))
            encoded = [
                (
                    first,
                    first + len(samples) - 1,
                    last_wall[0],
                    codec.encode(samples, self._stream_id),
                )
                for first, _, last_wall, samples in blocks
            ]
            db.execute("BEGIN")
            db.executemany(
                "INSERT OR REPLACE INTO streams(id, uid, t, device_id, source) VALUES (?,?,?,?,?)",
                [(sid, *key) for sid, key in self._new_streams],
            )
            db.executemany("INSERT OR REPLACE INTO blocks VALUES (?,?,?,?)", encoded)
            db.execute("DELETE FROM samples WHERE seq <= ?", (rows[-1][0],))
            db.execute("COMMIT")
            self._new_streams.clear()
            done += len(rows)
            log.info("spool %s: converted %d of %d samples", self.path, done, left)
        db.execute("BEGIN")
        db.execute("DROP TABLE samples")
        self._set_meta("format", FORMAT)
        db.execute("COMMIT")
        # The old rows' pages are free now: give them back to the file system, and take the
        # smaller pages (which VACUUM can change only outside WAL mode).
        db.execute("PRAGMA journal_mode=DELETE")
        db.execute(f"PRAGMA page_size={PAGE_SIZE}")
        db.execute("VACUUM")
        db.execute("PRAGMA journal_mode=WAL")
        log.warning("spool %s: conversion done (%d samples)", self.path, done)


def read_only(path: Path) -> list[tuple[int, Sample]]:
    """Every committed sample of a spool file, opened read-only (for tests and inspection)."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        streams: list[codec.Stream] = []
        for sid, uid, t, device_id, source in db.execute(
            "SELECT id, uid, t, device_id, source FROM streams ORDER BY id"
        ):
            streams.extend([("", DataType.HEART_RATE, "", "")] * (sid + 1 - len(streams)))
            streams[sid] = (uid, DataType(t), device_id, source)
        row = db.execute("SELECT value FROM meta WHERE key = 'first'").fetchone()
        floor = 0 if row is None else int(row[0])
        out: list[tuple[int, Sample]] = []
        for first, blob in db.execute("SELECT seq, data FROM blocks ORDER BY seq"):
            samples = codec.decode(blob, streams)
            out.extend((seq, s) for seq, s in enumerate(samples, first) if seq >= floor)
    finally:
        db.close()
    return out
