"""Writes every sample (and device status change) to stdout as one JSON line."""

from __future__ import annotations

import json
import sys
from typing import TextIO

from gatewayd.hub import Event, Subscription
from gatewayd.model import Sample, format_ts


def event_to_json(event: Event) -> str:
    if isinstance(event, Sample):
        record: dict[str, object] = {"uid": event.uid, "t": str(event.t), "ts": event.ts_text()}
        if event.d is not None:
            record["d"] = list(event.d)
        else:
            record["val"] = event.val
        record["device"] = event.device_id
        record["source"] = event.source
    else:
        record = {
            "status": str(event.state),
            "uid": event.uid,
            "device": event.device_id,
            "source": event.source,
            "ts": format_ts(event.wall),
            "reason": event.reason,
        }
        if event.battery is not None:
            record["battery"] = event.battery
    return json.dumps(record, separators=(",", ":"))


class StdoutSink:
    name = "stdout"

    def __init__(self, subscription: Subscription, stream: TextIO | None = None) -> None:
        self.subscription = subscription
        self.stream = stream or sys.stdout

    async def run(self) -> None:
        while True:
            batch = await self.subscription.get_batch()
            self._write(batch)

    def _write(self, batch: list[Event]) -> None:
        try:
            self.stream.write("".join(event_to_json(event) + "\n" for event in batch))
            self.stream.flush()
        except BrokenPipeError:
            # `gatewayd run --stdout | head` closed the pipe: stop writing, keep running.
            self.subscription.maxsize = 1

    async def close(self) -> None:
        self._write(self.subscription.get_nowait())
