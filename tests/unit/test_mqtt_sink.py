"""The MQTT sink's hand-over to its client, the client on a socket pair (no broker)."""

from __future__ import annotations

import asyncio
import socket

from gatewayd.config import MqttConfig
from gatewayd.hub import Hub
from gatewayd.model import DataType, Sample
from gatewayd.sinks.mqtt import MqttSink
from tests.unit.test_mqtt_client import connected, drain
from tests.unit.test_mqtt_wire import pair

__all__ = ["pair"]  # a fixture, imported for pytest


def samples(count: int) -> list[Sample]:
    return [
        Sample(f"a{i % 50}", DataType.POWER, 1_800_000_000.0, val=200.0 + i, device_id="d")
        for i in range(count)
    ]


async def test_a_full_output_waits_for_the_socket_instead_of_pumping_every_turn(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, b = pair
    sink = MqttSink(Hub().subscribe("mqtt"), MqttConfig(enabled=True, qos=0), hub_id="gym")
    sink._loop = asyncio.get_running_loop()
    connected(sink._client, a)  # the peer does not read: the kernel's buffer and ours fill up
    sink._connected = True
    sink._handle_batch(list(samples(20_000)))
    for _ in range(5):
        await asyncio.sleep(0)
    waiting = len(sink._queue)
    assert waiting and sink._client._sock.full()
    assert not sink._pump_scheduled  # nothing to do until the socket takes bytes
    while sink._queue or sink._client.in_flight():  # the socket drains: the sink refills
        drain(b)
        sink._client.loop_write()
        sink._after_io()
        await asyncio.sleep(0)
    assert sink.published == 20_000 and sink.dropped == 0
    sink._client._sock = None
