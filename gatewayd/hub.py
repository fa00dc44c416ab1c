"""Fan-out of Samples and device status events to every sink, never blocking the pipeline.

Each subscriber has its own bounded queue. Publishing is synchronous and O(subscribers): when a
subscriber's queue is full its oldest item is dropped and counted, so a slow sink loses data
(which it can recover from the spool or REPLAY) but never slows the pipeline or its siblings.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Sequence

from gatewayd.model import DeviceStatus, Sample

log = logging.getLogger(__name__)

Event = Sample | DeviceStatus
_SAMPLE_ONLY = frozenset({Sample})


def only_samples(batch: Sequence[Event]) -> bool:
    """True when a batch holds no device status (nearly every batch): a sink may then take it
    whole, without looking at each event, at C speed."""
    return _SAMPLE_ONLY.issuperset(map(type, batch))


class Subscription:
    __slots__ = ("name", "maxsize", "dropped", "delivered", "_items", "_waiter", "_dropping")

    def __init__(self, name: str, maxsize: int) -> None:
        self.name = name
        self.maxsize = maxsize
        self.dropped = 0
        self.delivered = 0
        self._items: deque[Event] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._dropping = False

    def push(self, event: Event) -> None:
        items = self._items
        if len(items) >= self.maxsize:
            items.popleft()
            self._dropped(1)
        items.append(event)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def push_many(self, events: Sequence[Event]) -> None:
        """push() for each event, in order."""
        items = self._items
        items.extend(events)
        overflow = len(items) - self.maxsize
        if overflow > 0:
            for _ in range(overflow):
                items.popleft()
            self._dropped(overflow)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _dropped(self, count: int) -> None:
        self.dropped += count
        if not self._dropping:
            self._dropping = True
            log.warning(
                "output %s is not keeping up: dropping its oldest items (queue of %d full)",
                self.name,
                self.maxsize,
            )

    def __len__(self) -> int:
        return len(self._items)

    async def get_batch(self, limit: int = 1000) -> list[Event]:
        """Wait for at least one item, then take up to `limit` of them."""
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        items = self._items
        if len(items) <= limit:  # the usual case: all of it, without a call per item
            batch = list(items)
            items.clear()
        else:
            batch = [items.popleft() for _ in range(limit)]
        self.delivered += len(batch)
        if self._dropping and not items:
            self._dropping = False
            log.info("output %s caught up; %d items dropped so far", self.name, self.dropped)
        return batch

    def get_nowait(self) -> list[Event]:
        batch = list(self._items)
        self._items.clear()
        self.delivered += len(batch)
        return batch


class Hub:
    def __init__(self, default_maxsize: int = 10_000) -> None:
        self.default_maxsize = default_maxsize
        self._subscriptions: list[Subscription] = []
        self._listeners: list[Callable[[Event], None]] = []
        self.published = 0

    def subscribe(self, name: str, maxsize: int | None = None) -> Subscription:
        subscription = Subscription(name, maxsize or self.default_maxsize)
        self._subscriptions.append(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        if subscription in self._subscriptions:
            self._subscriptions.remove(subscription)

    def add_listener(self, listener: Callable[[Event], None]) -> None:
        """A synchronous callback run for every event; it must be quick and must not raise."""
        self._listeners.append(listener)

    def publish(self, event: Event) -> None:
        self.published += 1
        for subscription in self._subscriptions:
            subscription.push(event)
        for listener in self._listeners:
            listener(event)

    def publish_many(self, events: Sequence[Event]) -> None:
        """publish() for each event, in order, one queue at a time (a second's samples).

        Nothing to publish wakes no one: the pipeline publishes after every batch of frames,
        and most batches close no second."""
        if not events:
            return
        self.published += len(events)
        for subscription in self._subscriptions:
            subscription.push_many(events)
        for listener in self._listeners:
            for event in events:
                listener(event)

    def subscriptions(self) -> list[Subscription]:
        return list(self._subscriptions)
