"""The forwarder's delivery bookkeeping, against a model network (no sockets).

The sink's own reader steps (`rewind`, `deal`) and the lanes' ACK handling run against a model:
frames sent on a connection are in flight until delivered; a connection that drops loses what
was in flight; the receiver keeps a row only if it is newer than the last it kept for that
athlete (the gatewayd broker's dedupe by (uid, t, ts)). Whatever happens, every row at or below a
lane's cursor has arrived, nothing arrives out of order, and once the links are up everything
arrives.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from gatewayd.clock import ManualClock
from gatewayd.config import UpstreamConfig
from gatewayd.hub import Hub
from gatewayd.model import DataType, Sample
from gatewayd.sinks.upstream import END, Lane, UpstreamSink
from gatewayd.spool import Spool

ATHLETES = ("a", "b")
# A fresh spool per example: on tmpfs its fsyncs cost nothing.
SCRATCH = "/dev/shm" if Path("/dev/shm").is_dir() else None


@dataclass
class Link:
    """One lane's side of the model network."""

    up: bool = False
    in_flight: list[int] = field(default_factory=list)
    last_marker: int | None = None
    kept: list[int] = field(default_factory=list)  # rows the receiver kept, in arrival order

    def deliver(self, n: int | None = None) -> None:
        arriving = self.in_flight if n is None else self.in_flight[:n]
        for seq in arriving:
            if not self.kept or seq > self.kept[-1]:
                self.kept.append(seq)  # older ones are duplicates: dropped by the receiver
        del self.in_flight[: len(arriving)]


def make_sink(tmp: Path, mode: str) -> UpstreamSink:
    if mode == "terra":
        config = UpstreamConfig(
            enabled=True,
            mode="terra",
            url="ws://127.0.0.1:9/connect",
            tokens={uid: f"token-of-{uid}" for uid in ATHLETES},
        )
    else:
        config = UpstreamConfig(
            enabled=True, mode="gatewayd", url="ws://127.0.0.1:9/connect", token="hub-token"
        )
    return UpstreamSink(
        Hub().subscribe("t"),
        config,
        spool=Spool(tmp / "s.db", clock=ManualClock()),
        clock=ManualClock(),
    )


ops = st.lists(
    st.one_of(
        st.tuples(st.just("read"), st.integers(1, 7)),
        st.tuples(st.sampled_from(["up", "down", "ack", "deliver"]), st.sampled_from(ATHLETES)),
        st.tuples(st.just("drop"), st.sampled_from(ATHLETES), st.integers(0, 3)),
    ),
    max_size=60,
)


@settings(max_examples=120, deadline=None)
@given(
    mode=st.sampled_from(["terra", "gatewayd"]),
    uids=st.lists(st.sampled_from([*ATHLETES, "nobody"]), min_size=1, max_size=40),
    script=ops,
)
def test_cursors_never_pass_a_row_that_has_not_arrived(
    mode: str, uids: list[str], script: list[tuple[object, ...]]
) -> None:
    with tempfile.TemporaryDirectory(dir=SCRATCH) as name:
        sink = make_sink(Path(name), mode)
        terra = mode == "terra"
        rows = [Sample(uid, DataType.HEART_RATE, 1000.0 + i, val=i) for i, uid in enumerate(uids)]
        sink.spool.append(rows)
        owner = {seq: s.uid for seq, s in sink.spool.read(0, END, 10**6)}
        lanes = {uid: sink.lanes[uid if terra else "*"] for uid in ATHLETES}
        links = {key: Link() for key in sink.lanes}

        def expected(key: str) -> list[int]:
            if not terra:
                return sorted(owner)
            return [seq for seq, uid in sorted(owner.items()) if uid == key]

        def read(n: int) -> None:
            sink.rewind()
            batch = sink.spool.read(sink.pos, END, n)
            for key, sent in sink.deal(batch).items():
                link, lane = links[key], sink.lanes[key]
                if link.up and lane.usable():
                    link.in_flight += [seq for seq, _ in sent]
                    link.last_marker = sent[-1][0]

        def check() -> None:
            for key, lane in sink.lanes.items():
                kept = links[key].kept
                assert kept == expected(key)[: len(kept)], "lost or out of order"
                done = lane.through(sink.pos)
                assert all(seq in kept for seq in expected(key) if seq <= done), (
                    f"{key}: cursor {done} passed rows that never arrived"
                )
            sink.save_cursors()
            assert sink.cursor <= min(lane.done for lane in sink.lanes.values())

        for op in script:
            kind = op[0]
            if kind == "read":
                assert isinstance(op[1], int)
                read(op[1])
            else:
                lane: Lane = lanes[str(op[1])]
                link = links[lane.key]
                if kind == "up" and not link.up:
                    link.up, link.in_flight, link.last_marker = True, [], None
                    lane.generation += 1
                    lane.link_ready = True
                elif kind == "down" and link.up:
                    link.up = False
                    link.in_flight.clear()  # what was in flight is lost
                    lane.link_ready = False
                elif kind == "drop" and link.up:
                    assert isinstance(op[2], int)
                    link.deliver(op[2])  # some arrive, then the link drops the rest
                    link.up = False
                    link.in_flight.clear()
                    lane.link_ready = False
                elif kind == "deliver" and link.up:
                    link.deliver()
                elif kind == "ack" and link.up:
                    link.deliver()  # the ACK follows every frame sent before its HEARTBEAT
                    lane.on_ack(link.last_marker)
            check()

        # Then the links come back and stay: everything arrives, once, in order.
        for key, link in links.items():
            if not link.up:
                link.up, link.in_flight, link.last_marker = True, [], None
                sink.lanes[key].generation += 1
                sink.lanes[key].link_ready = True
        for _ in range(4 * len(rows) + 4):
            read(5)
            for key, link in links.items():
                link.deliver()
                sink.lanes[key].on_ack(link.last_marker)
            check()
        for key, link in links.items():
            assert link.kept == expected(key)
        sink.save_cursors()
        assert sink.cursor == sink.spool.last_seq
        sink.spool.close()
