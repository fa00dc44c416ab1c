"""bench/receipt.py: what bench/daemon.py's consumers count as received, and when.

The frames come from the broker's own encoder (protocol.dispatch + ws_text_frame), so the
benchmark's parser is checked against the bytes the daemon really sends."""

from __future__ import annotations

import importlib.util
import socket
import sys
import time
from pathlib import Path
from types import ModuleType

from gatewayd import protocol as p
from gatewayd.model import DataType, Sample
from gatewayd.sinks.ws_frames import ws_text_frame


def _load() -> ModuleType:
    path = Path(__file__).resolve().parents[2] / "bench" / "receipt.py"
    spec = importlib.util.spec_from_file_location("bench_receipt", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


receipt = _load()

SECOND = 1_796_000_000.0  # whole second, 2026-11-30


def _frames(first_seq: int) -> list[tuple[bytes, bool]]:
    """A second's DISPATCH frames, each with whether it is a per-second sample (not a beat)."""
    samples = [
        Sample("a", DataType.HEART_RATE, SECOND, val=120.0),
        Sample("a", DataType.RR_INTERVAL, SECOND - 0.25, val=500.0),
        Sample("a", DataType.RR_INTERVAL, SECOND + 0.5, val=750.0),
        Sample("b", DataType.POWER, SECOND, val=250.5),
        Sample("b", DataType.CALORIES, SECOND, val=12.0),
    ]
    return [
        (ws_text_frame(p.dispatch(first_seq + i, s).encode()), s.t is not DataType.RR_INTERVAL)
        for i, s in enumerate(samples)
    ]


def _burst(first_seq: int) -> tuple[bytes, int, int]:
    """A second's bytes: three per-second samples and two beats (one of the second before)."""
    return b"".join(frame for frame, _ in _frames(first_seq)), 3, 2


def test_every_split_of_a_burst_counts_each_dispatch_once_in_its_group() -> None:
    hello = ws_text_frame(p.hello().encode()) + ws_text_frame(p.ready().encode())
    burst, per_second, per_beat = _burst(7)
    data = hello + burst
    ends, at = [], len(hello)
    for frame, whole_second in _frames(7):
        at += len(frame)
        if whole_second:
            ends.append(at)
    for cut in range(len(data) + 1):
        r = receipt.Receipts()
        r.feed(data[:cut], 0.0, 0.0, True)
        r.feed(data[cut:], SECOND + 1.2, SECOND + 1.25, True)
        assert r.count == 5 and r.unparsed == 0
        assert (r.first_seq, r.last_seq, r.gaps) == (7, 11, 0)
        assert sum(n for *_, n in r.per_second) == per_second
        assert sum(n for *_, n in r.per_beat) == per_beat
        # A frame is received by the read holding its last byte: never before that read.
        second_read = sum(n for _, read, n in r.per_second if read > 0)
        assert second_read == sum(1 for end in ends if end > cut)


def test_latency_runs_from_the_seconds_close_and_rr_from_its_beat() -> None:
    r = receipt.Receipts()
    burst, _, _ = _burst(1)
    r.feed(burst, SECOND + 1.1, SECOND + 1.15, True)
    assert [(round(k, 3), round(u, 3), n) for k, u, n in r.per_second] == [(0.1, 0.15, 3)]
    beats = sorted((round(k, 3), n) for k, _, n in r.per_beat)
    assert beats == [(0.6, 1), (1.35, 1)]


def test_a_gap_in_seqs_is_counted_and_nothing_is_timed_outside_the_window() -> None:
    r = receipt.Receipts()
    r.feed(_burst(1)[0], 0.0, 0.0, False)
    r.feed(_burst(9)[0], 0.0, 0.0, False)  # seqs 6..8 never arrived
    assert (r.count, r.gaps) == (10, 3)
    assert r.per_second == [] and r.per_beat == []


def test_percentile_weighs_each_value_by_its_count() -> None:
    rows = [(0.3, 1), (0.1, 98), (0.2, 1)]
    assert receipt.percentile(rows, 0.5) == 0.1
    assert receipt.percentile(rows, 0.99) == 0.3
    assert receipt.percentile(rows, 1.0) == 0.3
    assert receipt.percentile([], 0.5) != receipt.percentile([], 0.5)  # NaN


def _stamped_read(peer: socket.socket, client: socket.socket) -> float | None:
    peer.sendall(b"x" * 1000)
    data, ancillary = b"", []
    while len(data) < 1000:
        chunk, ancillary, _, _ = client.recvmsg(1 << 16, receipt.ANCILLARY)
        data += chunk
    assert data == b"x" * 1000
    return receipt.kernel_time(ancillary)


def test_the_kernel_receive_time_of_a_loopback_read() -> None:
    """Read against the monotonic clock, as the suite also runs with the wall clock shifted
    (libfaketime moves time.time(), not the kernel's stamps). The kernel turns receive stamps
    on shortly after the first socket asks (a deferred static key): until a read has one, send
    again."""
    server = socket.create_server(("127.0.0.1", 0))
    with server, socket.create_connection(server.getsockname()) as client:
        peer, _ = server.accept()
        with peer:
            client.setsockopt(
                socket.SOL_SOCKET, receipt.SO_TIMESTAMPING, receipt.TIMESTAMPING_FLAGS
            )
            deadline = time.monotonic() + 10
            first = None
            while first is None and time.monotonic() < deadline:
                started = time.monotonic()
                first = _stamped_read(peer, client)
            second = _stamped_read(peer, client)
            elapsed = time.monotonic() - started
    assert first is not None and second is not None
    assert first > 1e9  # seconds since 1970, not since boot
    assert 0 <= second - first <= elapsed
