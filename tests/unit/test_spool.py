"""The SQLite spool: dense seqs across restarts, reads by range, retention and caps, cursors."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gatewayd import protocol as p
from gatewayd import spool_codec as codec
from gatewayd.clock import ManualClock
from gatewayd.model import DataType, Sample
from gatewayd.spool import RESERVE_BLOCK, Spool, read_only


def hr(i: int, uid: str = "a") -> Sample:
    return Sample(uid, DataType.HEART_RATE, 1_000_000.0 + i, val=60 + i % 100)


def test_seqs_are_dense_and_reads_see_pending_and_committed(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s.db", clock=ManualClock())
    assert spool.append([hr(0), hr(1)]) == 1
    spool.flush()
    assert spool.append([hr(2)]) == 3  # pending, not yet on disk
    got = spool.read(0, 10)
    assert [seq for seq, _ in got] == [1, 2, 3]
    assert got[2][1] == hr(2)
    assert [seq for seq, _ in spool.read(1, 3)] == [2]  # exclusive bounds
    assert [seq for seq, _ in spool.read(0, 10, limit=2)] == [1, 2]
    assert spool.read(5, 6) == []
    assert spool.depth() == 3


def test_values_keep_their_json_shape(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s.db", clock=ManualClock())
    rr = Sample("a", DataType.RR_INTERVAL, 5.0, d=(800.0, 812.5), device_id="x", source="ble")
    spool.append([hr(1), rr, Sample("a", DataType.SPEED, 5.0, val=3.25)])
    spool.flush()
    [(_, a), (_, b), (_, c)] = spool.read(0, 100)
    assert isinstance(a.val, int) and a.val == 61
    assert b == rr
    assert c.val == 3.25


def test_a_beat_keeps_its_millisecond_time(tmp_path: Path) -> None:
    # RR_INTERVAL is stored per beat, stamped to the millisecond: REPLAY must give that time back.
    spool = Spool(tmp_path / "s.db", clock=ManualClock())
    beat = Sample("a", DataType.RR_INTERVAL, 1_800_000_005.123, val=812.0, device_id="x")
    spool.append([beat])
    spool.flush()
    [(_, back)] = spool.read(0, 100)
    assert back.ts_text() == beat.ts_text() == "2027-01-15T08:00:05.123Z"
    assert back.val == 812.0 and back.d is None


def test_clean_restart_keeps_seqs_dense(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s.db", clock=ManualClock())
    spool.append([hr(i) for i in range(5)])
    spool.close()
    again = Spool(tmp_path / "s.db", clock=ManualClock())
    assert again.next_seq == 6
    assert [seq for seq, _ in again.read(0, 100)] == [1, 2, 3, 4, 5]
    assert again.append([hr(9)]) == 6


def test_crash_never_reuses_a_seq(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s.db", clock=ManualClock())
    spool.append([hr(i) for i in range(5)])
    spool.flush()
    spool.append([hr(5), hr(6)])  # seqs 6 and 7 may have been dispatched, then: crash
    # no close(): the reopened spool must start past everything that was handed out
    again = Spool(tmp_path / "s.db", clock=ManualClock())
    assert again.next_seq > 7
    assert again.next_seq <= 5 + RESERVE_BLOCK + 1
    assert [seq for seq, _ in again.read(0, 100)] == [1, 2, 3, 4, 5]


def test_more_than_a_reservation_in_one_append_commits_early(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s.db", clock=ManualClock())
    spool.append([hr(i) for i in range(RESERVE_BLOCK + 10)])
    # a crash now must not reuse seqs: the reservation already covers them
    again = Spool(tmp_path / "s.db", clock=ManualClock())
    assert again.next_seq > RESERVE_BLOCK + 10
    assert again.depth() == RESERVE_BLOCK + 10  # and they were committed on the way
    spool.close()


@settings(max_examples=20, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=20), min_size=1, max_size=8))
def test_order_survives_reopen(tmp_path_factory: object, batches: list[int]) -> None:
    path = tmp_path_factory.mktemp("spool") / "s.db"  # type: ignore[attr-defined]
    expected: list[Sample] = []
    i = 0
    for n in batches:
        spool = Spool(path, clock=ManualClock())
        batch = [hr(i + k, uid=f"u{k % 3}") for k in range(n)]
        i += n
        spool.append(batch)
        expected.extend(batch)
        spool.close()
    got = Spool(path, clock=ManualClock()).read(0, 10**9, limit=10**6)
    assert [s for _, s in got] == expected
    assert [seq for seq, _ in got] == list(range(1, len(expected) + 1))


def test_retention_waits_for_cursors(tmp_path: Path) -> None:
    clock = ManualClock()
    spool = Spool(tmp_path / "s.db", retention_s=100.0, max_age_s=1000.0, clock=clock)
    spool.append([hr(i) for i in range(10)])
    spool.flush()
    clock.advance(50)
    spool.append([hr(i) for i in range(10, 15)])
    spool.flush()
    spool.set_cursor("up", 4)
    clock.advance(60)  # first ten are now 110 s old, past retention
    assert spool.prune() == 4  # only what the cursor has passed
    assert spool.first_seq() == 5
    assert spool.expired == 4 and spool.evicted == 0
    spool.set_cursor("up", 15)
    assert spool.prune() == 6
    assert spool.first_seq() == 11
    spool.drop_cursor("up")
    clock.advance(1000)
    assert spool.prune() == 5
    assert spool.depth() == 0
    assert spool.append([hr(99)]) == 16


def test_age_cap_evicts_even_unsent_rows(tmp_path: Path) -> None:
    clock = ManualClock()
    spool = Spool(tmp_path / "s.db", retention_s=10.0, max_age_s=100.0, clock=clock)
    spool.append([hr(i) for i in range(10)])
    spool.flush()
    spool.set_cursor("up", 0)
    clock.advance(101)
    assert spool.prune() == 10
    assert spool.evicted == 10


def test_cursor_never_goes_back(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s.db", clock=ManualClock())
    assert spool.cursor("up") == 0
    spool.set_cursor("up", 9)
    spool.set_cursor("up", 3)
    assert spool.cursor("up") == 9
    spool.close()
    assert Spool(tmp_path / "s.db", clock=ManualClock()).cursors() == {"up": 9}


def test_size_cap_evicts_oldest(tmp_path: Path) -> None:
    # Blocks take a few bytes a sample, so it takes 30,000 samples to pass 100 kB.
    spool = Spool(tmp_path / "s.db", max_bytes=100_000, clock=ManualClock())
    for second in range(300):
        spool.append([hr(second * 100 + k, uid=f"athlete-{k}") for k in range(100)])
        spool.flush()
        assert spool.size_bytes() <= 100_000 + 8192
    assert spool.evicted > 0
    assert spool.first_seq() > 1
    assert spool.last_seq == 30_000
    got = spool.read(0, 10**9, limit=10**6)
    assert [seq for seq, _ in got] == list(range(spool.first_seq(), 30_001))
    assert spool.depth() == len(got)


def test_last_ts_looks_in_pending_and_on_disk(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s.db", clock=ManualClock())
    spool.append([hr(1), hr(2, uid="b")])
    spool.flush()
    spool.append([hr(3)])
    assert spool.last_ts("a", "HEART_RATE") == hr(3).ts
    assert spool.last_ts("b", "HEART_RATE") == hr(2).ts
    assert spool.last_ts("c", "HEART_RATE") is None


def test_listener_hears_each_append(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s.db", clock=ManualClock())
    heard: list[tuple[int, int]] = []
    spool.add_listener(lambda a, b: heard.append((a, b)))
    spool.append([hr(1), hr(2)])
    spool.append([])
    spool.append([hr(3)])
    assert heard == [(1, 2), (3, 3)]


def test_a_corrupt_file_is_moved_aside(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    path.write_bytes(b"this is not a database at all" * 200)
    spool = Spool(path, clock=ManualClock())
    assert spool.append([hr(1)]) == 1
    assert list(tmp_path.glob("s.db.corrupt-*"))


def test_write_failure_keeps_rows_and_the_live_path(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s.db", clock=ManualClock())
    spool.append([hr(1)])
    spool.flush()
    # Another writer holding the lock stands in for a refusing disk: same sqlite3 error path.
    other = sqlite3.connect(tmp_path / "s.db", isolation_level=None, timeout=0)
    other.execute("BEGIN IMMEDIATE")
    spool._db.execute("PRAGMA busy_timeout=0")
    spool.append([hr(2)])
    try:
        spool.flush()
    except Exception as exc:
        assert type(exc).__name__ == "SpoolError"
    else:
        raise AssertionError("flush should fail while the database is locked")
    assert spool.error is not None and "locked" in spool.error
    assert spool.append([hr(3)]) == 3  # seqs keep coming
    assert [seq for seq, _ in spool.read(0, 10)] == [1, 2, 3]
    other.execute("ROLLBACK")
    assert spool.flush() == 2
    assert spool.error is None
    spool.close()
    assert [seq for seq, _ in Spool(tmp_path / "s.db", clock=ManualClock()).read(0, 10)] == [
        1,
        2,
        3,
    ]


def test_big_evictions_are_spread_over_flushes(tmp_path: Path, monkeypatch: object) -> None:
    import gatewayd.spool as spool_module

    monkeypatch.setattr(spool_module, "DELETE_CHUNK", 30)  # type: ignore[attr-defined]
    clock = ManualClock()
    spool = Spool(tmp_path / "s.db", retention_s=10.0, clock=clock)
    spool.append([hr(i) for i in range(100)])
    spool.flush()
    clock.advance(11)
    assert spool.prune() == 30
    spool.append([hr(100)])
    spool.flush()  # carries on without waiting for the next minute
    assert spool.first_seq() == 61
    for _ in range(2):
        spool.flush()
    assert spool.first_seq() == 101  # old rows gone, the new one kept


# ------------------------------------------------------------ the block format


def dispatches(rows: list[tuple[int, Sample]]) -> list[str]:
    return [p.dispatch(seq, sample) for seq, sample in rows]


values = st.one_of(
    st.integers(min_value=-(2**40), max_value=2**40),
    st.floats(allow_nan=False, allow_infinity=False),
)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["alice", "bob", "ünïcode-ath"]),
            st.sampled_from(list(DataType)),
            st.one_of(values, st.lists(values, max_size=4)),
            st.sampled_from(["", "C0:FF:EE:00:00:01", "120:4711"]),
        ),
        min_size=1,
        max_size=30,
    )
)
def test_a_replayed_dispatch_is_byte_identical(
    tmp_path_factory: object, rows: list[tuple[str, DataType, object, str]]
) -> None:
    path = tmp_path_factory.mktemp("spool") / "s.db"  # type: ignore[attr-defined]
    samples = [
        Sample(uid, t, 1_700_000_000.0 + i * 0.25, device_id=dev, source="ble")._replace(
            **({"d": tuple(v)} if isinstance(v, list) else {"val": v})
        )
        for i, (uid, t, v, dev) in enumerate(rows)
    ]
    spool = Spool(path, clock=ManualClock())
    first = spool.append(samples)
    live = dispatches(list(enumerate(samples, first)))
    assert dispatches(spool.read(0, 10**9)) == live  # pending
    spool.close()
    again = Spool(path, clock=ManualClock())
    assert dispatches(again.read(0, 10**9)) == live  # from disk, after a restart
    assert [s for _, s in again.read(0, 10**9)] == samples
    again.close()


def test_reads_across_blocks_honour_exclusive_bounds(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s.db", clock=ManualClock())
    for second in range(5):
        spool.append([hr(second * 10 + k) for k in range(10)])
        spool.flush()
    spool.append([hr(50 + k) for k in range(10)])  # seqs 51..60 pending
    assert [seq for seq, _ in spool.read(8, 23)] == list(range(9, 23))
    assert [seq for seq, _ in spool.read(45, 56)] == list(range(46, 56))
    assert [seq for seq, _ in spool.read(10, 31, limit=12)] == list(range(11, 23))
    assert [s.ts for _, s in spool.read(19, 21)] == [hr(19).ts]
    spool.close()


def test_a_previous_format_spool_is_converted(tmp_path: Path, caplog: object) -> None:
    """A spool written by the previous version (one row per sample) keeps every sample, its seq,
    the cursors and the reservation."""
    path = tmp_path / "s.db"
    write_v1(path)
    spool = Spool(path, clock=ManualClock())
    got = spool.read(0, 10**9)
    assert [seq for seq, _ in got] == [1, 2, 3, 4, 4100, 4101]
    assert got[0][1] == Sample(
        "a", DataType.HEART_RATE, 1000.0, val=71, device_id="x", source="ble"
    )
    assert isinstance(got[1][1].val, float) and got[1][1].val == 71.5
    assert got[2][1].d == (800, 812.5)
    assert spool.cursors() == {"upstream": 3}
    assert spool.next_seq == 8193  # past the old reservation: those seqs may have gone out
    assert "converting 6 samples from the previous format" in caplog.text  # type: ignore[attr-defined]
    db = sqlite3.connect(path)
    assert db.execute("SELECT name FROM sqlite_master WHERE name = 'samples'").fetchone() is None
    db.close()
    spool.close()
    assert [seq for seq, _ in Spool(path, clock=ManualClock()).read(0, 10**9)] == [
        1,
        2,
        3,
        4,
        4100,
        4101,
    ]


def test_a_conversion_cut_short_carries_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import gatewayd.spool as spool_module

    path = tmp_path / "s.db"
    write_v1(path)
    monkeypatch.setattr(spool_module, "CONVERT_CHUNK", 2)
    encode = spool_module.codec.encode
    calls = 0

    def dies_on_the_second_chunk(*args: Any) -> bytes:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise KeyboardInterrupt  # stands in for a kill between two chunks
        return encode(*args)

    monkeypatch.setattr(spool_module.codec, "encode", dies_on_the_second_chunk)
    with pytest.raises(KeyboardInterrupt):
        Spool(path, clock=ManualClock())
    spool = Spool(path, clock=ManualClock())
    assert [seq for seq, _ in spool.read(0, 10**9)] == [1, 2, 3, 4, 4100, 4101]
    spool.close()


def test_a_spool_of_an_unknown_format_is_moved_aside(tmp_path: Path, caplog: object) -> None:
    path = tmp_path / "s.db"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    db.execute("INSERT INTO meta VALUES ('format', '99')")
    db.commit()
    db.close()
    spool = Spool(path, clock=ManualClock())
    assert spool.append([hr(1)]) == 1
    assert list(tmp_path.glob("s.db.corrupt-*"))
    assert "unknown format (99" in caplog.text  # type: ignore[attr-defined]
    spool.close()


def test_a_partly_expired_block_stays_partly_expired_after_a_restart(tmp_path: Path) -> None:
    clock = ManualClock()
    spool = Spool(tmp_path / "s.db", retention_s=10.0, clock=clock)
    spool.append([hr(i) for i in range(10)])
    spool.flush()
    spool.set_cursor("up", 6)
    clock.advance(11)
    assert spool.prune() == 6
    spool.close()
    again = Spool(tmp_path / "s.db", clock=clock)
    assert again.first_seq() == 7
    assert again.depth() == 4
    assert [seq for seq, _ in again.read(0, 100)] == [7, 8, 9, 10]
    assert [seq for seq, _ in read_only(tmp_path / "s.db")] == [7, 8, 9, 10]
    again.close()


def test_last_ts_finds_older_blocks_on_disk(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s.db", clock=ManualClock())
    spool.append([hr(1, uid="old")])
    for second in range(20):
        spool.append([hr(100 + second)])
        spool.flush()
    assert spool.last_ts("old", "HEART_RATE") == hr(1).ts
    assert spool.last_ts("old", "POWER") is None
    spool.close()


W = ManualClock().wall()


def write_v1(path: Path) -> None:
    """A spool as the previous version left it: a row per sample, a crash gap, a cursor."""
    db = sqlite3.connect(path)
    db.executescript(
        """
        PRAGMA journal_mode=WAL;
        CREATE TABLE samples (
            seq INTEGER PRIMARY KEY, wall REAL NOT NULL, uid TEXT NOT NULL, t TEXT NOT NULL,
            ts REAL NOT NULL, val, d TEXT, device_id TEXT NOT NULL DEFAULT '',
            source TEXT NOT NULL DEFAULT ''
        );
        CREATE TABLE cursors (name TEXT PRIMARY KEY, seq INTEGER NOT NULL);
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        INSERT INTO cursors VALUES ('upstream', 3);
        INSERT INTO meta VALUES ('reserved', '8192');
        """
    )
    db.executemany(
        "INSERT INTO samples VALUES (?,?,?,?,?,?,?,?,?)",
        [
            (1, W - 100.0, "a", "HEART_RATE", 1000.0, 71, None, "x", "ble"),
            (2, W - 100.0, "a", "HEART_RATE", 1001.0, 71.5, None, "x", "ble"),
            (3, W - 99.5, "a", "RR_INTERVAL", 1001.0, None, "[800, 812.5]", "x", "ble"),
            (4, W - 98.0, "b", "POWER", 1002.0, 200, None, "1:2", "ant"),
            (4100, W - 10.0, "b", "POWER", 1003.0, 201, None, "1:2", "ant"),
            (4101, W - 10.0, "b", "SPEED", 1003.0, 3.25, None, "1:2", "ant"),
        ],
    )
    db.commit()
    db.close()


@given(
    st.lists(
        st.builds(
            Sample,
            uid=st.sampled_from(["a", "b"]),
            t=st.sampled_from([DataType.HEART_RATE, DataType.RR_INTERVAL]),
            ts=st.sampled_from([1_795_000_000.0, 1_795_000_000.5]),
            val=st.sampled_from([71, 71.0, 812.5, None]),
            d=st.none() | st.just((800.0, 790.5)),
            device_id=st.sampled_from(["d1", "d2"]),
        ).map(lambda s: s._replace(val=None) if s.d is not None else s),  # a value or a list
        max_size=30,
    ),
    st.sets(st.sampled_from([("a", "HEART_RATE", "d1", ""), ("b", "RR_INTERVAL", "d2", "")])),
)
def test_a_block_encoded_with_the_known_streams_is_the_same_block(
    samples: list[Sample], known_keys: set[tuple[str, str, str, str]]
) -> None:
    # The flush passes the streams interned so far, to skip a call per sample; the bytes (and
    # what decode gives back) must be those of the call per sample.
    def interner() -> tuple[dict[tuple[str, str, str, str], int], Any]:
        ids = {key: n for n, key in enumerate(sorted(known_keys))}
        return ids, lambda key: ids.setdefault(key, len(ids))

    ids, stream_id = interner()
    fast = codec.encode(samples, stream_id, ids)
    ids_again, stream_id_again = interner()
    assert fast == codec.encode(samples, stream_id_again)
    assert ids == ids_again
    streams = [(uid, DataType(t), device, source) for (uid, t, device, source) in ids]
    assert codec.decode(fast, streams) == samples
