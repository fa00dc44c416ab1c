"""Replays a capture file of Frames (JSON lines, hex payloads) as if the radios were live.

A capture is written by `gatewayd record`. Frames keep their relative timing (scaled by
`speed`) and are re-stamped with the current clock, so they aggregate like live ones.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from gatewayd.clock import Clock
from gatewayd.config import ReplayConfig
from gatewayd.errors import ConfigError
from gatewayd.model import Frame
from gatewayd.pipeline import FrameQueue

log = logging.getLogger(__name__)

FIELDS = ("source", "adapter", "device_id", "kind", "payload", "mono", "wall", "rssi")


def frame_to_json(frame: Frame) -> str:
    record: dict[str, Any] = {
        "source": frame.source,
        "adapter": frame.adapter,
        "device_id": frame.device_id,
        "kind": frame.kind,
        "payload": frame.payload.hex(),
        "mono": round(frame.mono, 6),
        "wall": round(frame.wall, 6),
    }
    if frame.rssi is not None:
        record["rssi"] = frame.rssi
    return json.dumps(record, separators=(",", ":"))


def frame_from_json(line: str) -> Frame:
    record = json.loads(line)
    if not isinstance(record, dict):
        raise ValueError("a capture line must be a JSON object")
    rssi = record.get("rssi")
    return Frame(
        source=str(record["source"]),
        adapter=str(record.get("adapter", "replay")),
        device_id=str(record["device_id"]),
        kind=str(record["kind"]),
        payload=bytes.fromhex(record["payload"]),
        mono=float(record["mono"]),
        wall=float(record.get("wall", 0.0)),
        rssi=int(rssi) if rssi is not None else None,
    )


def read_capture(stream: TextIO, name: str = "capture") -> Iterator[Frame]:
    """Yield the frames of a capture; a bad line is logged with its number and skipped."""
    for number, line in enumerate(stream, start=1):
        if not line.strip():
            continue
        try:
            yield frame_from_json(line)
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("%s line %d skipped: %s", name, number, exc)


class ReplaySource:
    name = "replay"

    def __init__(self, config: ReplayConfig, clock: Clock) -> None:
        if config.file is None:
            raise ConfigError("sources.replay.file", "a replay source needs a capture file")
        self.path: Path = config.file
        self.speed = config.speed
        self.loop = config.loop
        self.clock = clock
        self.frames_sent = 0

    async def run(self, frames: FrameQueue) -> None:
        while True:
            await self._play_once(frames)
            if not self.loop:
                log.info("replay of %s finished (%d frames)", self.path, self.frames_sent)
                return

    async def _play_once(self, frames: FrameQueue) -> None:
        start = self.clock.mono()
        first: float | None = None
        with self.path.open(encoding="utf-8") as stream:
            for recorded in read_capture(stream, str(self.path)):
                if first is None:
                    first = recorded.mono
                due = (recorded.mono - first) / self.speed
                wait = due - (self.clock.mono() - start)
                if wait > 0:
                    await asyncio.sleep(wait)
                frames.put(
                    Frame(
                        source=recorded.source,
                        adapter=recorded.adapter,
                        device_id=recorded.device_id,
                        kind=recorded.kind,
                        payload=recorded.payload,
                        mono=self.clock.mono(),
                        wall=self.clock.wall(),
                        rssi=recorded.rssi,
                    )
                )
                self.frames_sent += 1
