"""Prometheus metrics. One registry per Metrics object, so several brokers (tests) can coexist.

Counters the pipeline already keeps as plain ints are not duplicated: a collector reads them from
the app's health snapshot when /metrics is scraped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# health key -> (metric name, help, counter?)
_FROM_HEALTH: dict[str, tuple[str, str, bool]] = {
    "frames": ("gatewayd_frames", "Radio frames processed by the pipeline", True),
    "samples": ("gatewayd_samples", "Per-second samples produced", True),
    "decode_errors": ("gatewayd_decode_errors", "Frames that did not decode (dropped)", True),
    "frames_dropped": ("gatewayd_frames_dropped", "Frames dropped by a full frame queue", True),
    "devices_live": ("gatewayd_devices_live", "Devices heard within the dropout window", False),
    "spool_depth": ("gatewayd_spool_depth", "Samples held in the spool", False),
    "send_queue_bytes": (
        "gatewayd_broker_send_queue_bytes",
        "Bytes the broker holds for its consumers: send queues and socket write buffers",
        False,
    ),
    "spool_evicted": (
        "gatewayd_spool_evicted",
        "Spooled samples removed by the size or age cap before every upstream had them",
        True,
    ),
    "upstream_backlog": (
        "gatewayd_upstream_backlog",
        "Spooled samples not yet acknowledged by the upstream",
        False,
    ),
    "upstream_backlog_age_seconds": (
        "gatewayd_upstream_backlog_age_seconds",
        "Age of the oldest sample not yet acknowledged by the upstream",
        False,
    ),
    "upstream_connected": (
        "gatewayd_upstream_connected",
        "1 when every upstream connection that has data to send is up",
        False,
    ),
}


class _HealthCollector(Collector):
    def __init__(self, health: Callable[[], Mapping[str, Any]]) -> None:
        self.health = health

    def collect(self) -> Iterator[Metric]:
        try:
            snapshot = self.health()
        except Exception:  # a scrape must never break on a half-built app
            return
        for key, (name, doc, is_counter) in _FROM_HEALTH.items():
            value = snapshot.get(key)
            if isinstance(value, list | dict):
                value = len(value)
            if not isinstance(value, int | float):
                continue
            if is_counter:
                yield CounterMetricFamily(name, doc, value=value)
            else:
                yield GaugeMetricFamily(name, doc, value=value)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.dispatched = Counter(
            "gatewayd_broker_dispatched", "DISPATCH frames written to consumers", registry=r
        )
        self.replayed = Counter(
            "gatewayd_broker_replayed", "DISPATCH frames re-sent for REPLAY", registry=r
        )
        self.dropped = Counter(
            "gatewayd_broker_dropped",
            "DISPATCH frames dropped from full consumer send queues",
            registry=r,
        )
        self.submitted = Counter(
            "gatewayd_broker_submitted", "Samples accepted from producers", registry=r
        )
        self.submit_ignored = Counter(
            "gatewayd_broker_submit_ignored",
            "SUBMITs dropped: duplicates, data types gatewayd does not carry, unusable payloads",
            ["reason"],
            registry=r,
        )
        self.status_ignored = Counter(
            "gatewayd_broker_status_ignored",
            "STATUS frames dropped without closing: malformed, or for an athlete not granted",
            ["reason"],
            registry=r,
        )
        self.closed = Counter(
            "gatewayd_broker_closed", "Connections closed by the broker", ["code"], registry=r
        )
        self.identify_refused = Counter(
            "gatewayd_broker_identify_refused",
            "IDENTIFYs refused with 4001: a wrong token, or unchecked from a locked address",
            ["reason"],
            registry=r,
        )
        self.http_refused = Counter(
            "gatewayd_broker_http_refused",
            "Requests to /auth and /api refused: a wrong credential, or unchecked (429) from a "
            "locked address",
            ["reason"],
            registry=r,
        )
        self.consumers = Gauge("gatewayd_broker_consumers", "Consumers connected", registry=r)
        self.producers = Gauge("gatewayd_broker_producers", "Producers connected", registry=r)
        self.dispatch_delay = Histogram(
            "gatewayd_dispatch_delay_seconds",
            "From the end of a second to its samples' DISPATCH on the consumers' sockets "
            "(once per second of samples dispatched together)",
            buckets=(0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0),
            registry=r,
        )
        self.spool_write_errors = Counter(
            "gatewayd_spool_write_errors", "Spool commits that failed", registry=r
        )

    def watch_health(self, health: Callable[[], Mapping[str, Any]]) -> None:
        self.registry.register(_HealthCollector(health))

    def render(self) -> bytes:
        return generate_latest(self.registry)
