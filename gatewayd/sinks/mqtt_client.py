"""paho-mqtt's client, fitted to a publisher of thousands of messages a second.

paho stays the MQTT implementation of record: its session state (`_out_messages`, the message
states it resets and resends after a reconnect), CONNECT/CONNACK, QoS 2, pings, refusals and
TLS. The event loop drives it (gatewayd/sinks/mqtt_loop.py); this subclass adds what that
needs and takes off paho's per-message path what a profile of the daemon showed as the largest
costs:

- Connecting without blocking the loop. `prepare` (run in a worker thread) reads the
  credentials afresh (fixing a password file takes effect without a restart) and opens the
  connection (DNS, TCP, TLS handshake) with paho's own socket code; `connect_prepared` (on the
  loop) hands that socket to paho's reconnect(), which resets its session state and sends
  CONNECT as usual. Sockets are wrapped in mqtt_wire.BatchedSocket.
- Publishing in bulk. `publish_many` writes a batch of PUBLISH packets straight into the
  socket's output (what paho's _send_publish would write, byte for byte) and registers every
  QoS 1/2 message in paho's `_out_messages` in the state paho's publish() leaves it in, so
  paho resends it after a reconnect, acknowledges it and counts it in flight as its own. What
  paho has queued itself (CONNECT, resends, pings) is written first, so the order on the wire
  is paho's. No MQTTMessageInfo, ReasonCode or Properties object is made per message.
- Acknowledgements in bulk. The common PUBACK is four bytes, `40 02 <mid>`: with remaining
  length 2 it carries no reason code and no properties, which MQTT 5 defines as Success
  (MQTT 5.0 §3.4.2.1; MQTT 3.1.1 has only that form); in MQTT 5 a broker may add an accepting
  reason code and no properties (`40 03 <mid> 10`: mosquitto's "No matching subscribers"). A
  run of those at the head of the input settles its messages here, as paho's _do_on_publish
  would (popped from `_out_messages`, one fewer in flight), without calling on_publish: they
  are counted in `settled`. Any other packet, and any PUBACK in another form (a refusal,
  properties), goes through paho's reader and reaches on_publish unchanged.
- QoS 0 messages are settled when the kernel has taken their bytes (BatchedSocket.sent passes
  their end), and `lost` when their connection closes before that.

All of this relies on paho internals, which tests/unit/test_mqtt_client.py pins: the test
fails, rather than the daemon misbehaving quietly, if a paho release changes them.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import MQTTErrorCode

from gatewayd.sinks.mqtt_wire import (
    MAX_HEADERS,
    PUBLISH,
    BatchedSocket,
    headers,
    publish_header,
    topic_field,
)

Prepared = tuple[Any, str | None, str | None]  # an open socket, the username, the password
_CONNECTED = paho._ConnectionState.MQTT_CS_CONNECTED  # type: ignore[attr-defined]
_STATES = {1: paho.mqtt_ms_wait_for_puback, 2: paho.mqtt_ms_wait_for_pubrec}
_MAX_TOPICS = 10_000  # remembered topic fields; forgotten all at once past this


class _NoInfo(paho.MQTTMessageInfo):
    """The info of bulk-published messages: nobody waits for them (no wait_for_publish)."""

    __slots__ = ()

    def _set_as_published(self) -> None:
        pass


_NO_INFO = _NoInfo(0)


class Held(paho.MQTTMessage):
    """A QoS 1/2 message in paho's `_out_messages`, made in one step (paho's own __init__ makes
    an MQTTMessageInfo and then has every field set again by publish())."""

    __slots__ = ()

    def __init__(self, mid: int, topic: bytes, payload: bytes, qos: int, retain: bool) -> None:
        self.timestamp = 0.0
        self.state = _STATES[qos]
        self.dup = False
        self.mid = mid
        self._topic = topic
        self.payload = payload
        self.qos = qos
        self.retain = retain
        self.info = _NO_INFO
        self.properties = None


class Client(paho.Client):
    """paho's client plus prepared connections, bulk publishing and bulk acknowledgements."""

    def __init__(
        self, *args: Any, credentials: Callable[[], tuple[str | None, str | None]], **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self._gw_credentials = credentials
        self._gw_ready: Any = None  # the prepared socket connect_prepared hands to reconnect()
        self._gw_topics: dict[str, tuple[bytes, bytes]] = {}  # topic -> (field, UTF-8)
        self._gw_qos0: deque[tuple[int, int]] = deque()  # (end offset, count) not yet sent
        self.qos0_unsent = 0  # QoS 0 messages whose bytes the kernel has not taken yet
        self.settled = 0  # QoS 0 written and QoS 1/2 acknowledged in bulk, since the start
        self.lost = 0  # QoS 0 messages whose connection closed before their bytes left
        self.fast_acks = 0  # PUBACKs taken by the bulk path (tests check that it is used)

    # -- connecting --------------------------------------------------------------------------

    def prepare(self) -> Prepared:
        """Credentials and an open connection, for connect_prepared. Blocks (DNS, TCP, TLS):
        run it in a worker thread. OSError when either fails."""
        username, password = self._gw_credentials()
        return super()._create_socket(), username, password

    def connect_prepared(self, prepared: Prepared) -> None:
        sock, username, password = prepared
        if username is not None:
            self.username_pw_set(username, password)
        self._gw_ready = sock
        try:
            self.reconnect()
        finally:
            if self._gw_ready is not None:  # reconnect() failed before it took the socket
                self._gw_ready = None
                sock.close()

    def _create_socket(self) -> Any:
        sock, self._gw_ready = self._gw_ready, None
        if sock is None:  # paho's own reconnect from its CONNACK handler (protocol downgrade)
            sock = super()._create_socket()
        return BatchedSocket(sock)

    def _sock_close(self) -> None:
        sock = self._sock
        super()._sock_close()  # BatchedSocket.close writes what it can first
        if isinstance(sock, BatchedSocket):
            self._count_written(sock)
            self.lost += self.qos0_unsent
            self.qos0_unsent = 0
            self._gw_qos0.clear()

    # -- writing -----------------------------------------------------------------------------

    def want_write(self) -> bool:
        sock = self._sock
        return super().want_write() or (isinstance(sock, BatchedSocket) and sock.has_output())

    def loop_write(self) -> MQTTErrorCode:
        rc = super().loop_write()
        sock = self._sock
        if isinstance(sock, BatchedSocket):
            sock.flush()  # one send() for everything paho wrote in this turn
            self._count_written(sock)
            if sock.has_output():
                self._call_socket_register_write()
        return rc

    def in_flight(self) -> int:
        """Messages handed over and not yet settled (QoS 0 unsent, QoS 1/2 unacknowledged)."""
        return len(self._out_messages) + self.qos0_unsent

    def publish_many(self, messages: list[tuple[str, bytes]], qos: int, retain: bool) -> int:
        """Publish `messages` (topic, payload), as many as fit from the front; how many did.

        Fewer when not connected (0), when the socket's output is full (0: `loop_write` makes
        room), or, for QoS 1/2, past paho's max_queued_messages or max_inflight_messages.
        ValueError for a topic paho's publish() refuses (wildcards, empty, too long), before
        anything of the batch is sent."""
        sock = self._sock
        if type(sock) is not BatchedSocket or self._state != _CONNECTED:
            return 0
        if self._out_packet:
            self._packet_write()  # paho's own packets first, in its order
            if self._out_packet:
                self._call_socket_register_write()
                return 0
        if sock.full():
            sock.flush()
            if sock.full():
                self._call_socket_register_write()
                return 0
        count = len(messages)
        if qos:  # paho's bounds on what it holds and on what it has in flight
            if self._max_queued_messages > 0:
                count = min(count, self._max_queued_messages - len(self._out_messages))
            if self._max_inflight_messages > 0:
                count = min(count, self._max_inflight_messages - self._inflight_messages)
            if count <= 0:
                return 0
        if count < len(messages):
            messages = messages[:count]
        topics = self._gw_topics
        for topic, _ in messages:
            if topic not in topics:
                if len(topics) >= _MAX_TOPICS:
                    topics.clear()
                topics[topic] = (field := topic_field(topic), field[2:])
        v5 = self._protocol == paho.MQTTv5
        command = PUBLISH | qos << 1 | int(retain)
        heads = headers(command)
        out = sock.out
        if qos == 0:
            props = b"\x00" if v5 else b""
            extra = len(props)
            for topic, payload in messages:
                field = topics[topic][0]
                size = len(field) + extra + len(payload)
                head = heads.get(size) or self._header(command, size)
                out += head
                out += field
                out += props
                out += payload
            self._gw_qos0.append((sock.sent + len(out), count))
            self.qos0_unsent += count
        else:
            held = self._out_messages
            mid = self._last_mid
            # MQTT 5: the packet id and a properties length of 0 in one go
            extra, shift = (3, 8) if v5 else (2, 0)
            for topic, payload in messages:
                mid = mid + 1 if mid < 65535 else 1
                while mid in held:  # still unacknowledged since the ids last wrapped
                    mid = mid + 1 if mid < 65535 else 1
                field, name = topics[topic]
                size = len(field) + extra + len(payload)
                head = heads.get(size) or self._header(command, size)
                out += head
                out += field
                out += (mid << shift).to_bytes(extra, "big")
                out += payload
                held[mid] = Held(mid, name, payload, qos, retain)
            self._last_mid = mid
            self._inflight_messages += count
        sock.flush()
        self._count_written(sock)
        with self._msgtime_mutex:
            self._last_msg_out = paho.time_func()  # paho's keepalive clock
        if sock.has_output():
            self._call_socket_register_write()
        return count

    @staticmethod
    def _header(command: int, size: int) -> bytes:
        head = publish_header(command, size)
        cache = headers(command)
        if len(cache) < MAX_HEADERS:
            cache[size] = head
        return head

    def _count_written(self, sock: BatchedSocket) -> None:
        runs = self._gw_qos0
        sent = sock.sent
        while runs and runs[0][0] <= sent:
            count = runs.popleft()[1]
            self.qos0_unsent -= count
            self.settled += count

    # -- reading -----------------------------------------------------------------------------

    def _packet_read(self) -> MQTTErrorCode:
        sock = self._sock
        if (
            type(sock) is not BatchedSocket
            or self._in_packet["command"] != 0
            or self._max_inflight_messages  # paho would refill its window per ack: its reader
        ):
            return super()._packet_read()
        mids = sock.take_pubacks(self._protocol == paho.MQTTv5)
        if mids is None:
            return MQTTErrorCode.MQTT_ERR_AGAIN
        if not mids:
            return super()._packet_read()
        self.fast_acks += len(mids)
        held = self._out_messages
        settled = 0
        with self._out_message_mutex:
            for mid in mids:
                message = held.pop(mid, None)  # paho ignores an ack for a message it lacks
                if message is not None:
                    settled += 1
                    if message.info is not _NO_INFO:  # one of paho's publish(): tell its info
                        message.info._set_as_published()
            self._inflight_messages -= settled
        self.settled += settled
        with self._msgtime_mutex:
            self._last_bytes_received = paho.time_func()  # paho's keepalive clock
        return MQTTErrorCode.MQTT_ERR_SUCCESS
