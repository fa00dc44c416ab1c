"""ANT+ source: every ANT+ device in range, heard through openant on one or more USB sticks.

Each stick (Dynastream ANTUSB2 0fcf:1008, ANTUSB-m 0fcf:1009) is opened with openant's real
message code, given the ANT+ network key and put in continuous scan mode (0x5B) with extended
messages, so one channel hears every device and every broadcast names its sender: 20-bit device
number, device type and, where the stick gives it, RSSI. A stick that cannot scan falls back to
one wildcard channel per ANT+ profile, which hears one device of each type.

Threads: openant runs two of its own per stick (USB reader, response dispatcher) and one of ours
runs its data loop (`node.start()` blocks). Data messages skip both of openant's queues: they
become Frames in the USB reader thread itself. Each thread wake-up costs more CPU than
everything else a frame needs, so there are few of them: a stick that can (ANTUSB-m) holds
broadcasts back and sends `event_buffer_s` worth in one USB transfer (Configure Event Buffer,
0x74); a stick that cannot (ANTUSB2) sends a transfer per broadcast. Each transfer's frames go
to the FrameQueue without waking the event loop (`put_from_thread`): the pipeline takes them at
its own wake-ups, which come before every second's close. Responses and channel events keep
openant's path. Supervision (find sticks, reopen after loss, back off) is asyncio.

Hardware trouble never raises out of run(): no stick is a warning and a background retry; an
unplugged stick is logged once and reopened when it is back; a stick without permission or held
by another process gets an error that names the cause and the fix.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import errno
import functools
import logging
import operator
import threading
from collections.abc import Callable, Iterator
from typing import Any

import usb.core
import usb.util
from openant.base import driver as openant_driver
from openant.base.message import Message
from openant.easy.channel import Channel
from openant.easy.node import Node

from gatewayd.clock import Clock
from gatewayd.config import AntConfig
from gatewayd.decode import antplus
from gatewayd.errors import DecodeError, SourceLost, SourceUnavailable
from gatewayd.model import Frame
from gatewayd.pipeline import FrameQueue

log = logging.getLogger(__name__)

VENDOR_ID = 0x0FCF
PRODUCTS = {0x1008: "ANTUSB2", 0x1009: "ANTUSB-m"}
UDEV_RULE = "99-gatewayd-ant.rules"  # grants group plugdev the sticks

# What the wildcard-channel fallback listens for: device type -> (profile, period in 1/32768 s).
FALLBACK_PROFILES: dict[int, tuple[str, int]] = {
    120: ("heart rate", 8070),
    11: ("bike power", 8182),
    17: ("fitness equipment", 8192),
    121: ("speed and cadence", 8086),
    122: ("cadence", 8102),
    123: ("speed", 8118),
    124: ("stride (SDM)", 8134),
}

# Configure Event Buffer (ANT message 0x74): [0, config, size u16, time u16 in 10 ms units].
_EVENT_BUFFER = 0x74
_BUFFER_ALL_EVENTS = 0x01  # data messages too, not only low-priority events
_EVENT_BUFFERING = 0x02  # capabilities byte 6 (advanced options 3): the stick can buffer
# The stick flushes past this many bytes even before the time is up: ~12 broadcasts with their
# channel id and RSSI, four full-speed USB packets, well inside any stick's queue.
_BUFFER_BYTES = 256
_KNOWN_SENDERS = 4096  # (device, RSSI) combinations remembered before starting over
_SYNC = 0xA4
_SEARCH_FOREVER = 0xFF
# Short enough that stopping a stick (openant polls its reader) is quick, long enough not to spin.
_READ_TIMEOUT_MS = 250
_TRANSFER_BYTES = 4096  # the most one USB read takes; a stick ends a transfer sooner
_WRITE_TIMEOUT_MS = 1000
# pyusb/libusb error codes; errno is what libusb0 gives, backend_error_code what libusb1 gives.
_LIBUSB_ERROR_ACCESS = -3
_LIBUSB_ERROR_NO_DEVICE = -4
_LIBUSB_ERROR_BUSY = -6


def describe_open_error(exc: usb.core.USBError, where: str) -> str:
    """The cause of a failed open, in words, with the fix."""
    code = getattr(exc, "backend_error_code", None)
    if exc.errno == errno.EACCES or code == _LIBUSB_ERROR_ACCESS:
        return (
            f"no permission to open the ANT stick {where}. Fix: install the udev rule "
            f"{UDEV_RULE} (the gatewayd package puts it in /lib/udev/rules.d; from a source "
            f"tree copy udev/{UDEV_RULE} to /etc/udev/rules.d/), run `udevadm control "
            "--reload-rules && udevadm trigger`, replug the stick, and make sure the user "
            "gatewayd runs as is in the plugdev group"
        )
    if exc.errno == errno.EBUSY or code == _LIBUSB_ERROR_BUSY:
        return (
            f"the ANT stick {where} is held by another process (another gatewayd, an openant "
            "script, a trainer app). Fix: stop that program (`fuser -v` on the device path "
            "names it); gatewayd takes the stick as soon as it is free"
        )
    if exc.errno == errno.ENODEV or code == _LIBUSB_ERROR_NO_DEVICE:
        return f"the ANT stick {where} went away while it was being opened"
    return f"cannot open the ANT stick {where}: {exc}"


def describe_device(device: usb.core.Device) -> str:
    model = PRODUCTS.get(device.idProduct, "ANT stick")
    path = f"/dev/bus/usb/{device.bus:03d}/{device.address:03d}"
    return f"{model} {device.idVendor:04x}:{device.idProduct:04x} at {path}"


def _location(device: usb.core.Device) -> str:
    """The physical port: the same after a replug into it, unlike the USB address."""
    ports = getattr(device, "port_numbers", None)
    if ports:
        return f"{device.bus}-{'.'.join(str(p) for p in ports)}"
    return f"{device.bus}-@{device.address}"


class _UsbLink:
    """One stick's bulk endpoints through pyusb; reports the stick's loss instead of raising."""

    def __init__(self, device: usb.core.Device, where: str, on_lost: Callable[[str], None]) -> None:
        self._device = device
        self._where = where
        self._on_lost = on_lost
        self._in: Any = None
        self._out: Any = None
        self._backend_read: Callable[[array.array[int], int], int] = self._unopened
        self._lost = threading.Event()
        self._closed = threading.Event()

    def open(self) -> None:
        device = self._device
        try:
            with contextlib.suppress(NotImplementedError):
                if device.is_kernel_driver_active(0):
                    device.detach_kernel_driver(0)
            device.set_configuration()
            interface = device.get_active_configuration()[(0, 0)]
            # Claim now, so a stick held elsewhere fails here with a clear error, not mid-setup.
            usb.util.claim_interface(device, interface)
        except usb.core.USBError as exc:
            with contextlib.suppress(usb.core.USBError):
                usb.util.dispose_resources(device)
            raise SourceUnavailable(describe_open_error(exc, self._where)) from None
        self._out = usb.util.find_descriptor(
            interface,
            custom_match=lambda e: (
                usb.util.endpoint_direction(e.bEndpointAddress) == usb.util.ENDPOINT_OUT
            ),
        )
        self._in = usb.util.find_descriptor(
            interface,
            custom_match=lambda e: (
                usb.util.endpoint_direction(e.bEndpointAddress) == usb.util.ENDPOINT_IN
            ),
        )
        if self._in is None or self._out is None:
            raise SourceUnavailable(f"{self._where} has no bulk IN/OUT endpoints")
        # pyusb's Endpoint.read settles the handle, the claim and the endpoint's type under a
        # lock on every call (a sixth of a frame's CPU); all of that is settled by now, so reads
        # go straight to pyusb's backend, as pyusb's core would send them.
        # tests/unit/test_ant_libraries.py pins the pyusb internals this relies on.
        context = device._ctx
        interrupt = usb.util.endpoint_type(self._in.bmAttributes) == usb.util.ENDPOINT_TYPE_INTR
        backend_read = context.backend.intr_read if interrupt else context.backend.bulk_read
        self._backend_read = functools.partial(
            backend_read, context.handle, self._in.bEndpointAddress, interface.bInterfaceNumber
        )

    @staticmethod
    def _unopened(buffer: array.array[int], timeout_ms: int) -> int:
        raise usb.core.USBError("the stick is not open")

    def read(self) -> array.array[int]:
        buffer: array.array[int] = usb.util.create_buffer(_TRANSFER_BYTES)
        return buffer[: self.read_into(buffer)]

    def read_into(self, buffer: array.array[int]) -> int:
        """One USB transfer into `buffer` (reused: pyusb would allocate one per read); its size."""
        if self._lost.is_set() or self._closed.is_set():
            # openant's reader calls read() in a loop until it is stopped; do not spin.
            self._closed.wait(0.05)
            return 0
        try:
            received: int = self._backend_read(buffer, _READ_TIMEOUT_MS)
        except usb.core.USBTimeoutError:
            raise  # openant expects it on an idle stick
        except usb.core.USBError as exc:
            self._lose(f"reading from it failed ({exc}); unplugged?")
            return 0
        return received

    def write(self, data: array.array[int]) -> None:
        # A failed write is reported as the stick's loss, never raised: raised inside openant's
        # Ant() it would leave that half-built object's reader thread running with no owner.
        if self._lost.is_set():
            return
        try:
            self._out.write(data, timeout=_WRITE_TIMEOUT_MS)
        except usb.core.USBError as exc:
            self._lose(f"writing to it failed ({exc}); unplugged?")

    def close(self) -> None:
        self._closed.set()
        with contextlib.suppress(usb.core.USBError):
            usb.util.dispose_resources(self._device)

    def _lose(self, reason: str) -> None:
        if not self._lost.is_set():
            self._lost.set()
            self._on_lost(reason)


class _PinnedDriver(openant_driver.Driver):  # type: ignore[misc]
    """openant's Driver seam, pinned to the stick we chose.

    openant's own USB driver opens the first 0fcf:1008 that libusb lists, so it cannot serve
    several sticks, nor a given pyusb backend. openant builds its driver with find_driver(),
    which asks each class in `openant.base.driver.drivers`; this one answers only in a thread
    that is opening a stick through `_pinned()`.
    """

    _pending = threading.local()

    @classmethod
    def find(cls) -> bool:
        return getattr(cls._pending, "link", None) is not None

    def __init__(self) -> None:
        self._link: _UsbLink = self._pending.link

    def open(self) -> None:
        self._link.open()

    def close(self) -> None:
        self._link.close()

    def read(self) -> array.array[int]:
        return self._link.read()

    def write(self, data: array.array[int]) -> None:
        self._link.write(data)


_register_lock = threading.Lock()


@contextlib.contextmanager
def _pinned(link: _UsbLink) -> Iterator[None]:
    with _register_lock:
        if _PinnedDriver not in openant_driver.drivers:
            openant_driver.drivers.append(_PinnedDriver)  # find_driver() tries the last first
    _PinnedDriver._pending.link = link
    try:
        yield
    finally:
        _PinnedDriver._pending.link = None


_BROADCAST = Message.ID.BROADCAST_DATA
_DATA_IDS = frozenset({_BROADCAST, Message.ID.ACKNOWLEDGED_DATA})
_DATA_EVENTS = frozenset(
    {
        Message.Code.EVENT_RX_BROADCAST,
        Message.Code.EVENT_RX_ACKNOWLEDGED,
        Message.Code.EVENT_RX_BURST_PACKET,
        Message.Code.EVENT_TX,
    }
)


class _Node(Node):  # type: ignore[misc]
    """openant's Node, handing channel events to us instead of keeping them.

    openant queues every non-data channel event for a waiter; a receive-only gateway never
    waits for one, so RX_FAIL and friends would pile up for as long as the daemon runs.
    """

    def __init__(self, on_event: Callable[[int, int], None], on_status: Callable[[], None]) -> None:
        self._on_event = on_event
        self._on_status = on_status
        self.capabilities = b""  # the raw answer: openant reads advanced options 3 from byte 4
        super().__init__()

    def _worker_event(self, channel: int, event: int, data: Any) -> None:
        if event in _DATA_EVENTS:
            super()._worker_event(channel, event, data)
        else:
            self._on_event(channel, event)

    def _worker_response(self, channel: int, event: int, data: Any) -> None:
        # Answers to our health checks; nobody waits for them, so they must not be queued.
        if event == Message.ID.RESPONSE_CHANNEL_STATUS:
            self._on_status()
            return
        if event == Message.ID.RESPONSE_CAPABILITIES:
            self.capabilities = bytes(data)
        super()._worker_response(channel, event, data)


class _Stick:
    """One open stick: openant's node, our data thread, and what the stick has told us."""

    def __init__(
        self,
        device: usb.core.Device,
        config: AntConfig,
        frames: FrameQueue,
        clock: Clock,
        name_for: Callable[[int | None, str], str],
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.where = describe_device(device)
        self.location = _location(device)
        self.adapter = "ant?"
        self.serial: int | None = None
        self.version = ""
        self.mode = ""
        self.frames_out = 0
        self.malformed = 0
        self.unidentified = 0
        self.rx_failures = 0
        self.answers = 0  # health checks answered
        self.event_buffer_s = 0.0  # how long the stick holds broadcasts back; 0: it does not
        self.lost_reason: str | None = None
        self.lost = asyncio.Event()
        self._device = device
        self._config = config
        self._frames = frames
        self._clock = clock
        self._name_for = name_for
        self._loop = loop
        self._node: Any = None
        self._thread: threading.Thread | None = None
        self._lost_lock = threading.Lock()
        self._link: _UsbLink | None = None
        # Reader thread only: the frames of the USB transfer being parsed, and the transfer.
        self._batch: list[Frame] = []
        self._transfer = usb.util.create_buffer(_TRANSFER_BYTES)
        self._pending = b""  # bytes read but not yet parsed (a message may span transfers)
        self._last_content = b""  # the last message's content, for openant's repeat rule
        self._mono = self._wall = 0.0  # when the last USB transfer arrived
        # device id, kind and RSSI by the bytes they come from (a data message's extended tail)
        self._senders: dict[bytes, tuple[str, str, int | None]] = {}
        self.bad_bytes = 0  # bytes skipped to find the next message (noise, a torn transfer)

    # -- setup (runs in a worker thread; blocking) ---------------------------------------------

    def open(self) -> None:
        link = self._link = _UsbLink(self._device, self.where, self._lose)
        with _pinned(link):
            self._node = _Node(self._channel_event, self._status_answered)
        # Instance attributes win over openant's methods: its reader thread calls these for
        # every message it reads, and nothing is on the air before the channel opens.
        ant = self._node.ant
        ant.read_message = functools.partial(self._read_message, ant)
        ant._on_broadcast = self._on_message
        ant._on_acknowledge = self._on_message
        if self.lost_reason is not None:
            raise SourceLost("it went away during setup (unplugged?)")
        self._configure(self._node)

    def _configure(self, node: Any) -> None:
        node.wait_for_special(Message.ID.RESPONSE_CAPABILITIES)
        node.wait_for_special(Message.ID.RESPONSE_SERIAL_NUMBER)
        node.wait_for_special(Message.ID.RESPONSE_ANT_VERSION)
        self.serial = node.serial
        self.version = (node.ant_version or "").rstrip("\x00")
        self.adapter = self._name_for(self.serial, self.location)
        node.set_network_key(0, list(bytes.fromhex(self._config.network_key)))
        self._buffer_events(node)
        can_scan = openant_driver.AdvancedOptionsTwo.ScanModeEnabled in node.advanced_options_two
        if self._config.scan_mode and can_scan and self._open_scan(node):
            self.mode = "continuous scan"
            return
        if not self._config.scan_mode:
            why = "scan_mode is off in the configuration"
        elif not can_scan:
            why = "the stick's capabilities lack continuous scan mode"
        else:
            why = "the stick refused continuous scan mode"
        self._open_wildcards(node, why)

    def _open_scan(self, node: Any) -> bool:
        channel = node.new_channel(Channel.Type.BIDIRECTIONAL_RECEIVE)
        self._listen(channel)
        channel.set_id(0, 0, 0)  # wildcard: any device number, type and transmission type
        channel.set_rf_freq(self._config.rf_channel)
        self._enable_extended(node, channel)
        try:
            channel.open_rx_scan_mode()
        except Exception as exc:  # openant raises a bare Exception for an error response
            log.info("%s: continuous scan mode refused (%s)", self.adapter, exc)
            node.ant.unassign_channel(channel.id)
            node.wait_for_response(Message.ID.UNASSIGN_CHANNEL)
            node.channels.remove(channel)
            return False
        return True

    def _open_wildcards(self, node: Any, why: str) -> None:
        profiles = list(FALLBACK_PROFILES.items())
        usable = profiles[: max(0, int(node.max_channels))]
        names = ", ".join(name for _, (name, _) in usable)
        left_out = ", ".join(name for _, (name, _) in profiles[len(usable) :])
        log.warning(
            "%s: %s; falling back to %d wildcard channels, one per profile (%s): only the "
            "first device of each type in range is heard%s",
            self.adapter,
            why,
            len(usable),
            names,
            f"; no channel left for {left_out}" if left_out else "",
        )
        for index, (device_type, (_, period)) in enumerate(usable):
            channel = node.new_channel(Channel.Type.BIDIRECTIONAL_RECEIVE)
            self._listen(channel)
            channel.set_id(0, device_type, 0)
            channel.set_period(period)
            channel.set_search_timeout(_SEARCH_FOREVER)
            channel.set_rf_freq(self._config.rf_channel)
            if index == 0:
                self._enable_extended(node, channel)  # a stick-wide setting: once is enough
            channel.open()
        self.mode = f"{len(usable)} wildcard channels"

    def _buffer_events(self, node: Any) -> None:
        """Let the stick send broadcasts in batches, one USB transfer per `event_buffer_s`."""
        wanted = self._config.event_buffer_s
        capabilities = node.capabilities
        if wanted <= 0 or len(capabilities) < 7 or not capabilities[6] & _EVENT_BUFFERING:
            return
        ticks = max(1, round(wanted * 100))
        content = [0, _BUFFER_ALL_EVENTS, *_BUFFER_BYTES.to_bytes(2, "little")]
        try:
            node.ant.write_message(Message(_EVENT_BUFFER, [*content, *ticks.to_bytes(2, "little")]))
            node.wait_for_response(_EVENT_BUFFER)
        except Exception as exc:  # openant raises a bare Exception for an error response
            log.info(
                "%s: event buffering refused (%s); a USB transfer per broadcast", self.adapter, exc
            )
            return
        self.event_buffer_s = ticks / 100

    def _enable_extended(self, node: Any, channel: Any) -> None:
        """Ask for channel id and RSSI on every message; without LibConfig, the id alone."""
        try:
            node.ant.write_message(
                Message(Message.ID.LIB_CONFIG, [0x00, antplus.EXT_CHANNEL_ID | antplus.EXT_RSSI])
            )
            node.wait_for_response(Message.ID.LIB_CONFIG)
        except Exception as exc:  # openant raises a bare Exception for an error response
            log.info("%s: no LibConfig (%s); device ids without RSSI", self.adapter, exc)
            channel.enable_extended_messages(1)

    def _listen(self, channel: Any) -> None:
        # Broadcast and acknowledged data never reach the channel (see open()).
        channel.on_burst_data = self._on_burst

    # -- running (openant's threads and ours) ---------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._run_node, name=f"gatewayd-{self.adapter}", daemon=True
        )
        self._thread.start()

    def _run_node(self) -> None:
        try:
            self._node.start()
        except Exception as exc:
            log.exception("%s: openant's data loop failed", self.adapter)
            self._lose(f"openant's data loop failed ({exc})")

    def _read_message(self, ant: Any) -> Message | None:
        """The next message from the stick for openant's reader loop (openant's reader thread).

        openant's own formats every USB read as hex for a debug log, whether or not anything
        logs it; it also stops at the first byte out of place. This one skips to the next sync
        byte and drops a message whose checksum is wrong, or that has no content (openant's
        Message cannot hold one: it would end the reader thread).

        Broadcast and acknowledged data (nearly every message) never reach openant: they become
        Frames here, as openant's reader loop would pass them on (a broadcast identical to the
        message before it is dropped: a repeat only marks a channel period). openant's Message
        and loop cost more per message than all the rest of a frame, and give a data message
        nothing: its layout (sync, length, id, content, an XOR of all of them) is read here
        directly, and the loop's other work (a chain of tests, a lock, two debug calls) is for
        sending in a channel's time slot, which a receive-only gateway never does; while
        anything waits to be sent so, data goes through openant's loop after all. Every other
        message (responses, channel events) is openant's Message, handled by openant.
        tests/unit/test_ant_libraries.py pins the parts of openant this relies on, and checks
        this reading against openant's Message.
        """
        xor = operator.xor
        if ant._buffer:  # what openant's own read_message left before it was replaced
            self._pending += ant._buffer.tobytes()
            del ant._buffer[:]
        while ant._running:
            data = self._pending
            size = len(data)
            pos = 0
            message = None
            while size - pos >= 4:
                if data[pos] != _SYNC:
                    start = data.find(_SYNC, pos)
                    skipped = (size if start < 0 else start) - pos
                    self.bad_bytes += skipped
                    pos += skipped
                    continue
                end = pos + data[pos + 1] + 4
                if end > size:
                    break  # the rest comes in the next transfer
                packet = data[pos:end]
                if end == pos + 4 or functools.reduce(xor, packet):
                    self.bad_bytes += 1  # no content, or a checksum that does not add up
                    pos += 1
                    continue
                pos = end
                content = packet[3:-1]
                msg_id = packet[2]
                if msg_id in _DATA_IDS and not ant._message_queue:
                    if msg_id != _BROADCAST or content != self._last_content:
                        self._on_data(content)
                    self._last_content = content
                    continue
                # openant's loop compares a broadcast with the message before it, and then
                # remembers this one's content itself
                ant._last_data = array.array("B", self._last_content)
                self._last_content = content
                message = Message(msg_id, array.array("B", content))
                break
            self._pending = data[pos:] if pos else data
            if message is not None:
                return message
            self._receive()
        return None

    def _receive(self) -> None:
        """Wait for the stick's next USB transfer (reader thread), every message before it parsed.

        The previous transfer's frames go to the FrameQueue first, without waking the event
        loop: the pipeline takes them at its own next wake, before the second closes.
        """
        if self._batch:
            self._frames.put_from_thread(self._batch)
            self._batch = []
        assert self._link is not None
        try:
            received = self._link.read_into(self._transfer)
        except usb.core.USBTimeoutError:
            return  # nothing sent: wait again
        if received:
            # Every message in a transfer reached the host now (a buffering stick's waited in it
            # up to event_buffer_s).
            self._mono = self._clock.mono()
            self._wall = self._clock.wall()
            self._pending += memoryview(self._transfer)[:received]

    def _on_message(self, message: Message) -> None:
        """Data that went through openant's loop (something waited to be sent in its slot)."""
        self._on_data(bytes(message._data))

    def _on_data(self, content: bytes) -> None:
        """A broadcast or acknowledged data message's content (openant's reader thread)."""
        sender = self._senders.get(content[9:])
        if sender is None:
            sender = self._identify(content)
            if sender is None:
                return
        device_id, kind, rssi = sender
        self._batch.append(
            Frame("ant", self.adapter, device_id, kind, content[1:9], self._mono, self._wall, rssi)
        )
        self.frames_out += 1

    def _identify(self, content: bytes) -> tuple[str, str, int | None] | None:
        """Who sent a data message, from its extended tail; None drops the message.

        The answer depends on the tail's bytes alone, so it is kept by them: the next message
        of the same device at the same RSSI skips parsing.
        """
        try:
            message = antplus.parse_content(antplus.MSG_BROADCAST, content)
        except DecodeError as exc:
            self.malformed += 1
            log.debug("%s: malformed data message dropped: %s", self.adapter, exc)
            return None
        device_id, kind = message.device_id, message.kind
        if device_id is None or kind is None:
            self.unidentified += 1
            if self.unidentified == 1:
                log.warning(
                    "%s: the stick sends data without the device's id (no extended messages); "
                    "such data is dropped",
                    self.adapter,
                )
            return None
        if len(self._senders) >= _KNOWN_SENDERS:
            self._senders.clear()
        sender = self._senders[content[9:]] = (device_id, kind, message.rssi)
        return sender

    def _on_burst(self, content: Any) -> None:
        # ANT+ sensors do not burst their data pages; a burst is ANT-FS or a control reply.
        log.debug("%s: burst of %d bytes ignored", self.adapter, len(content))

    def _channel_event(self, channel: int, event: int) -> None:
        if event == Message.Code.EVENT_RX_FAIL:
            self.rx_failures += 1  # one missed message on a paired channel: routine
        elif event in (Message.Code.EVENT_CHANNEL_CLOSED, Message.Code.EVENT_RX_SEARCH_TIMEOUT):
            name = Message.Code.lookup(event)
            self._lose(f"the stick closed channel {channel} ({name})")
        else:
            log.debug("%s: channel %d event %s", self.adapter, channel, Message.Code.lookup(event))

    def ping(self) -> None:
        """Ask the stick for channel 0's status; the answer arrives through openant's threads."""
        self._node.ant.request_message(0, Message.ID.RESPONSE_CHANNEL_STATUS)

    def _status_answered(self) -> None:
        self.answers += 1

    def lose(self, reason: str) -> None:
        self._lose(reason)

    def _lose(self, reason: str) -> None:
        with self._lost_lock:
            if self.lost_reason is not None:
                return
            self.lost_reason = reason
        with contextlib.suppress(RuntimeError):  # the loop is closed: shutting down anyway
            self._loop.call_soon_threadsafe(self.lost.set)

    def close(self) -> None:
        """Stop openant's threads and ours, and let go of the stick. Blocking."""
        node = self._node
        if node is not None:
            node.stop()
        if self._thread is not None:
            self._thread.join()


class AntSource:
    """Finds ANT sticks, keeps each one open and turns every broadcast into a Frame."""

    name = "ant"

    def __init__(self, config: AntConfig, clock: Clock, *, backend: Any = None) -> None:
        self.config = config
        self._backend = backend  # a pyusb backend; None lets pyusb pick libusb
        self._clock = clock
        self.sticks: dict[str, _Stick] = {}  # open sticks by adapter name
        self._names: dict[object, str] = {}
        self._names_lock = threading.Lock()
        self._failures: dict[str, int] = {}  # by USB location
        self._retry_at: dict[str, float] = {}
        self._last_problem: dict[str, str] = {}
        self._absence_warned = False
        self._wake: asyncio.Event | None = None

    async def run(self, frames: FrameQueue) -> None:
        loop = asyncio.get_running_loop()
        frames.bind(loop)
        wake = self._wake = asyncio.Event()
        tasks: dict[tuple[int, int], asyncio.Task[None]] = {}

        def finished(key: tuple[int, int]) -> Callable[[asyncio.Task[None]], None]:
            def done(_: asyncio.Task[None]) -> None:
                tasks.pop(key, None)
                wake.set()

            return done

        try:
            while True:
                wake.clear()
                devices = await asyncio.to_thread(self._find_sticks)
                now = loop.time()
                for device in devices:
                    key = (device.bus, device.address)
                    if key in tasks or self._retry_at.get(_location(device), 0.0) > now:
                        continue
                    task = asyncio.create_task(self._serve(device, frames, loop))
                    task.add_done_callback(finished(key))
                    tasks[key] = task
                if not devices and not tasks and not self._absence_warned:
                    self._absence_warned = True
                    log.warning(
                        "no ANT stick found (looked for USB %s); looking again every %g s, "
                        "the rest of gatewayd runs without ANT+",
                        ", ".join(f"{VENDOR_ID:04x}:{p:04x} {n}" for p, n in PRODUCTS.items()),
                        self.config.rescan_s,
                    )
                delay = self.config.rescan_s
                pending = [at - now for at in self._retry_at.values() if at > now]
                if pending:
                    delay = min(delay, *pending)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), delay)
        finally:
            running = list(tasks.values())
            for task in running:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)

    def _find_sticks(self) -> list[usb.core.Device]:
        try:
            found = usb.core.find(
                find_all=True,
                idVendor=VENDOR_ID,
                custom_match=lambda d: d.idProduct in PRODUCTS,
                backend=self._backend,
            )
            return list(found)
        except usb.core.NoBackendError:
            self._problem(
                "usb",
                "pyusb finds no USB library, so no ANT stick can be opened. Fix: install "
                "libusb-1.0 (Debian: apt-get install libusb-1.0-0)",
            )
        except usb.core.USBError as exc:
            self._problem("usb", f"listing USB devices failed: {exc}")
        return []

    async def _serve(
        self, device: usb.core.Device, frames: FrameQueue, loop: asyncio.AbstractEventLoop
    ) -> None:
        stick = _Stick(device, self.config, frames, self._clock, self._name, loop)
        opening = asyncio.ensure_future(asyncio.to_thread(stick.open))
        try:
            await asyncio.shield(opening)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await opening
            await asyncio.to_thread(stick.close)
            raise
        except SourceUnavailable as exc:
            self._failed(stick.location, str(exc), loop)
            return
        except Exception as exc:
            await asyncio.to_thread(stick.close)
            problem = f"setting up the ANT stick {stick.where} failed: {exc}"
            self._failed(stick.location, problem, loop)
            return
        self._failures.pop(stick.location, None)
        self._last_problem.pop(stick.location, None)
        self.sticks[stick.adapter] = stick  # listed before it is announced as listening
        try:
            log.info(
                "%s: ANT stick serial %s (%s, firmware %s) listening in %s mode%s",
                stick.adapter,
                stick.serial,
                stick.where,
                stick.version or "?",
                stick.mode,
                f", broadcasts batched every {stick.event_buffer_s * 1000:g} ms by the stick"
                if stick.event_buffer_s
                else "",
            )
            stick.start()
            await self._watch(stick)
            delay = self.config.retry_initial_s
            self._failures[stick.location] = 1
            self._retry_at[stick.location] = loop.time() + delay
            log.warning(
                "%s: lost the ANT stick serial %s: %s. Reopening it when it is back, first "
                "try in %g s",
                stick.adapter,
                stick.serial,
                stick.lost_reason,
                delay,
            )
        finally:
            self.sticks.pop(stick.adapter, None)
            await asyncio.to_thread(stick.close)

    async def _watch(self, stick: _Stick) -> None:
        """Return when the stick is lost, or stops answering (wedged, yet still on the bus).

        In scan mode a quiet room and a dead stick look the same, so the stick is asked for a
        channel status now and then; no answer by the next check counts as losing it.
        """
        interval = self.config.health_check_s
        answers_before: int | None = None
        while not stick.lost.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stick.lost.wait(), interval)
            if stick.lost.is_set():
                return
            if answers_before is not None and stick.answers == answers_before:
                stick.lose(f"it stopped answering (no reply in {interval:g} s)")
                await stick.lost.wait()
                return
            answers_before = stick.answers
            await asyncio.to_thread(stick.ping)

    def _failed(self, location: str, problem: str, loop: asyncio.AbstractEventLoop) -> None:
        failures = self._failures.get(location, 0) + 1
        self._failures[location] = failures
        delay = min(self.config.retry_initial_s * 2 ** (failures - 1), self.config.retry_max_s)
        self._retry_at[location] = loop.time() + delay
        every = self.config.retry_max_s
        self._problem(location, f"{problem} (retrying, at most every {every:g} s)")

    def _problem(self, key: str, message: str) -> None:
        """Log a problem once; the same problem again is only debug noise."""
        if self._last_problem.get(key) == message:
            log.debug("%s", message)
            return
        self._last_problem[key] = message
        log.error("%s", message)

    def _name(self, serial: int | None, location: str) -> str:
        """ant0, ant1 ... by stick serial, so a replugged stick keeps its name."""
        key: object = serial if serial else location
        with self._names_lock:
            name = self._names.get(key)
            if name is None:
                name = self._names[key] = f"ant{len(self._names)}"
            return name
