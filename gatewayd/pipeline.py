"""Frame queue -> decode -> aggregate -> hub. The only place the clock ticks (it is injected)."""

from __future__ import annotations

import asyncio
import logging
from collections import deque

from gatewayd.model import Frame

log = logging.getLogger(__name__)


class FrameQueue:
    """Bounded queue between sources and the pipeline.

    Sources on the event loop call put(); sources with threads of their own (openant's node,
    paho) call put_threadsafe(). When the pipeline falls behind, the oldest frames go first and
    are counted: fresh data beats stale data for a live display.
    """

    def __init__(self, maxsize: int = 10_000) -> None:
        self.maxsize = maxsize
        self.dropped = 0
        self.received = 0
        self._items: deque[Frame] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def put(self, frame: Frame) -> None:
        self.received += 1
        if len(self._items) >= self.maxsize:
            self._items.popleft()
            self.dropped += 1
        self._items.append(frame)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def put_threadsafe(self, frame: Frame) -> None:
        loop = self._loop
        if loop is None:
            raise RuntimeError("FrameQueue.bind(loop) must run before a thread puts frames")
        loop.call_soon_threadsafe(self.put, frame)

    def __len__(self) -> int:
        return len(self._items)

    def take_all(self) -> list[Frame]:
        items = list(self._items)
        self._items.clear()
        return items

    async def wait(self, timeout: float) -> None:
        """Return when a frame is queued or `timeout` seconds pass, whichever is first."""
        if self._items:
            return
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await asyncio.wait_for(self._waiter, timeout)
        except TimeoutError:
            pass
        finally:
            self._waiter = None
