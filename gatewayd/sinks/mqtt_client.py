"""paho-mqtt's client, fitted to a publisher of thousands of messages a second.

paho stays the MQTT implementation (sessions, QoS, resends, TLS, reconnects). This subclass
adds what its reconnect loop lacks (why an attempt failed; credentials read afresh before every
attempt), puts gatewayd/sinks/mqtt_wire.py's batching under its socket, and takes two costs off
paho's per-message path that a profile of the daemon showed as the largest:

- Acknowledgements. paho reads every PUBACK on its own (three reads, a fresh state dict, a
  decorated decoder) and builds a ReasonCode and a Properties object for each, even where the
  packet can hold neither. The common PUBACK is four bytes, `40 02 <mid>`: with remaining
  length 2 it carries no reason code and no properties, which MQTT 5 defines as Success
  (MQTT 5.0 §3.4.2.1; MQTT 3.1.1 has only that form); in MQTT 5 a broker may add an accepting
  reason code and no properties (`40 03 <mid> 10`: mosquitto's "No matching subscribers"). A
  run of those at the head of the input is acknowledged here, under one hold of paho's message
  lock, through paho's own `_do_on_publish` with a shared ReasonCode per code and one empty
  Properties. Any other packet, and any PUBACK in another form (a refusal, properties), goes
  through paho's reader unchanged.
- The message info. paho gives every message an MQTTMessageInfo holding its own
  threading.Condition, built on every publish() and used only by wait_for_publish(). `LeanInfo`
  is the same class with one Condition shared by all messages; setting a message published
  wakes every waiter, and each rechecks its own flag, so wait_for_publish() still works.
  paho's module builds infos by name, so `install_lean_info()` puts LeanInfo in its place.
- QoS 0 messages written. For each one paho builds a ReasonCode and a Properties object to call
  on_publish, in the middle of its write loop. With `written` given, the client hides
  on_publish from that loop (paho then only marks the message's info published) and collects
  the written messages' ids through their LeanInfo instead, handing them to `written` in one
  call per turn. Acknowledgements of QoS 1/2 are read, not written, and still reach on_publish.

Both rely on paho internals, which tests/unit/test_mqtt_client.py pins: the test fails, rather
than the daemon misbehaving quietly, if a paho release changes them.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from gatewayd.sinks.mqtt_wire import PUBACK_ACCEPTED, BatchedSocket, QuietWake

# What paho's decoder yields for the plain PUBACKs (mqtt_wire.plain_pubacks), one shared object
# per reason code, passed to every on_publish of the fast path (which only reads them).
ACK_REASONS = {code: ReasonCode(PacketTypes.PUBACK, identifier=code) for code in PUBACK_ACCEPTED}
ACK_PROPERTIES = Properties(PacketTypes.PUBACK)  # type: ignore[no-untyped-call]

_SHARED = threading.Condition()
_ORIGINAL_INFO = paho.MQTTMessageInfo
_WRITING = threading.local()  # .mids: ids of the messages paho's write loop marks published


class LeanInfo(paho.MQTTMessageInfo):
    """paho's MQTTMessageInfo without a Condition of its own."""

    __slots__ = ()

    def __init__(self, mid: int) -> None:
        self.mid = mid
        self._published = False
        self._condition = _SHARED
        self.rc = MQTTErrorCode.MQTT_ERR_SUCCESS
        self._iterpos = 0

    def _set_as_published(self) -> None:
        mids = getattr(_WRITING, "mids", None)
        if mids is not None:
            mids.append(self.mid)
        with _SHARED:
            self._published = True
            if _SHARED._waiters:  # type: ignore[attr-defined]
                _SHARED.notify_all()


def install_lean_info() -> bool:
    """Make paho build LeanInfo; False (paho's own kept) if paho's class is not the one known."""
    current = paho.MQTTMessageInfo
    if current is LeanInfo:
        return True
    if current is not _ORIGINAL_INFO or set(current.__slots__) != {
        "_condition",
        "_iterpos",
        "_published",
        "mid",
        "rc",
    }:
        return False
    paho.MQTTMessageInfo = LeanInfo  # type: ignore[misc]
    return True


class Client(paho.Client):
    """paho's client plus the reason a connection attempt failed (paho swallows the OSError),
    credentials read afresh before every attempt (fixing a password file takes effect without a
    restart), batched socket I/O and the fast paths of the module docstring."""

    def __init__(
        self,
        *args: Any,
        credentials: Callable[[], tuple[str | None, str | None]],
        attempt_failed: Callable[[OSError], None],
        written: Callable[[list[int]], None] | None = None,
        **kwargs: Any,
    ) -> None:
        lean = install_lean_info()
        self._gw_writing = False  # paho's thread is in loop_write (read by on_publish)
        super().__init__(*args, **kwargs)
        self._gw_credentials = credentials
        self._gw_attempt_failed = attempt_failed
        # Without LeanInfo the written messages cannot be collected: paho's on_publish it is.
        self._gw_written = written if lean else None
        self.fast_acks = 0  # PUBACKs taken by the fast path (tests check that it is used)

    def _create_socket(self) -> Any:
        return BatchedSocket(super()._create_socket())  # type: ignore[arg-type]

    def want_write(self) -> bool:
        sock = self._sock
        return super().want_write() or (isinstance(sock, BatchedSocket) and sock.has_output())

    @property
    def on_publish(self) -> Any:
        # Inside loop_write paho asks only to report a QoS 0 message written: see `written`.
        return None if self._gw_writing else self._on_publish

    @on_publish.setter
    def on_publish(self, func: Any) -> None:
        paho.Client.on_publish.fset(self, func)  # type: ignore[attr-defined]

    def loop_write(self) -> MQTTErrorCode:
        written = self._gw_written
        if written is None:
            rc = super().loop_write()
        else:
            mids: list[int] = []
            _WRITING.mids = mids
            self._gw_writing = True
            try:
                rc = super().loop_write()
            finally:
                self._gw_writing = False
                _WRITING.mids = None
            if mids:
                written(mids)
        sock = self._sock
        if isinstance(sock, BatchedSocket):
            sock.flush()  # one send() for everything paho wrote in this turn
        return rc

    def _packet_read(self) -> MQTTErrorCode:
        sock = self._sock
        if type(sock) is not BatchedSocket or self._in_packet["command"] != 0:
            return super()._packet_read()
        acks = sock.take_pubacks(self._protocol == paho.MQTTv5)
        if acks is None:
            return MQTTErrorCode.MQTT_ERR_AGAIN
        if not acks:
            return super()._packet_read()
        self.fast_acks += len(acks)
        with self._out_message_mutex:
            out = self._out_messages
            for mid, code in acks:
                if mid in out:  # paho ignores an ack for a message it does not hold
                    reason = ACK_REASONS[code]
                    rc: MQTTErrorCode = self._do_on_publish(mid, reason, ACK_PROPERTIES)
                    if rc:
                        return rc
        with self._msgtime_mutex:
            self._last_bytes_received = paho.time_func()  # paho's keepalive clock
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    @contextlib.contextmanager
    def handing_over(self) -> Iterator[None]:
        """Around a batch of publish() calls: paho's thread is woken once, at the end."""
        wake = self.quiet_wake()
        if wake is not None:
            wake.hold()
        try:
            yield
        finally:
            if wake is not None:
                wake.release()

    def quiet_wake(self) -> QuietWake | None:
        """paho's wake-up socket, wrapped so that a batch of publishes wakes its thread once."""
        wake: Any = self._sockpairW
        if wake is None or isinstance(wake, QuietWake):
            return wake
        quiet = QuietWake(wake)
        self._sockpairW = quiet  # type: ignore[assignment]
        return quiet

    def reconnect(self) -> MQTTErrorCode:
        try:
            username, password = self._gw_credentials()
            if username is not None:
                self.username_pw_set(username, password)
            return super().reconnect()
        except OSError as exc:
            self._gw_attempt_failed(exc)
            raise
