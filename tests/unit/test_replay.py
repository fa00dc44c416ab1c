from __future__ import annotations

import asyncio
import io

from gatewayd.clock import SystemClock
from gatewayd.config import ReplayConfig
from gatewayd.model import Frame
from gatewayd.pipeline import FrameQueue
from gatewayd.sources.replay import ReplaySource, frame_to_json, read_capture


def test_a_frame_survives_the_capture_format():
    frame = Frame(
        "ant",
        "ant0",
        "120:25170",
        "ant:120",
        bytes.fromhex("84ffa5e2a5e6ca3c"),
        12.5,
        1_800_000_000.25,
        -61,
    )
    (back,) = read_capture(io.StringIO(frame_to_json(frame) + "\n"))
    assert back == frame


def test_bad_lines_are_skipped_and_named(caplog):
    good = frame_to_json(Frame("ble", "hci0", "AA", "2a37", b"\x00\x50", 1.0, 2.0))
    text = f'{good}\nnot json\n{{"source": "ble"}}\n\n{good}\n'
    assert len(list(read_capture(io.StringIO(text), "cap.jsonl"))) == 2
    assert "cap.jsonl line 2" in caplog.text and "cap.jsonl line 3" in caplog.text


async def test_replay_plays_every_frame_in_order(tmp_path):
    path = tmp_path / "cap.jsonl"
    frames = [
        Frame("ble", "hci0", "AA", "2a37", bytes([0, 60 + i]), i * 0.001, 0.0) for i in range(5)
    ]
    path.write_text("".join(frame_to_json(f) + "\n" for f in frames))
    queue = FrameQueue()
    await asyncio.wait_for(ReplaySource(ReplayConfig(file=path), SystemClock()).run(queue), 10)
    assert [f.payload for f in queue.take_all()] == [f.payload for f in frames]
