"""The SQLite spool: dense seqs across restarts, reads by range, retention and caps, cursors."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from gatewayd.clock import ManualClock
from gatewayd.model import DataType, Sample
from gatewayd.spool import RESERVE_BLOCK, Spool


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
    spool = Spool(tmp_path / "s.db", max_bytes=200_000, clock=ManualClock())
    for second in range(40):
        spool.append([hr(second * 100 + k, uid=f"athlete-{k}") for k in range(100)])
        spool.flush()
    assert spool.size_bytes() <= 200_000 + 8192
    assert spool.evicted > 0
    assert spool.first_seq() > 1
    assert spool.last_seq == 4000
    got = spool.read(0, 10**9, limit=10**6)
    assert [seq for seq, _ in got] == list(range(spool.first_seq(), 4001))


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
