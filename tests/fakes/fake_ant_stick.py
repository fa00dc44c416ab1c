"""A fake ANT USB stick, plugged in below openant at pyusb's backend, and a room of ANT+ devices.

- FakeUsbBackend is a real `usb.backend.IBackend`: pyusb's core (find, Device, endpoints,
  bulk transfers) runs over it, then gatewayd's driver and openant's real message code.
- FakeAntStick speaks ANT serial frames (`A4 len id content XOR`) on its bulk endpoints: it
  answers reset, capability/serial/version requests and every configuration command, and
  delivers broadcasts in continuous scan mode or on wildcard channels, with the extended tail
  (channel id, RSSI) the host asked for. It can be unplugged and replugged, lack scan mode, deny
  access or be held by another process. With `event_buffering=True` (an ANTUSB-m's capability)
  it honours Configure Event Buffer (0x74): data messages wait in the stick and reach the host
  together, in one USB transfer, when the buffer passes its size or its time threshold.
- What the stick sends the host goes through an OS pipe, the fake's IN endpoint: a host read is
  poll() + read() in the kernel with the GIL released, as libusb's is, so the fake's own CPU per
  USB transfer is about what libusb's would be. A bench can hand the pipe's write end to another
  process that plays the radio (`radio_state()`, `FakeAntStick.on_wire()`), keeping the radio's
  CPU out of the process it measures.
- Room holds simulated ANT+ devices that encode real data pages at their real periods. Time is
  virtual: Player steps it message by message and waits until gatewayd has taken each message
  (an event, not a sleep), so a test of minutes of broadcasts runs in about a second.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import errno
import heapq
import itertools
import math
import os
import select
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import usb.backend
import usb.core

from gatewayd.clock import ManualClock
from gatewayd.model import Frame
from gatewayd.pipeline import FrameQueue

SYNC = 0xA4
ANT_PLUS_KEY = bytes.fromhex("B9A521FBBD72C345")
TICKS_PER_S = 32768

# message ids
RESPONSE = 0x40
UNASSIGN = 0x41
ASSIGN = 0x42
PERIOD = 0x43
SEARCH_TIMEOUT = 0x44
RF_FREQ = 0x45
NETWORK_KEY = 0x46
RESET = 0x4A
OPEN = 0x4B
CLOSE = 0x4C
REQUEST = 0x4D
BROADCAST = 0x4E
ACKNOWLEDGED = 0x4F
CHANNEL_ID = 0x51
SCAN = 0x5B
EXT_MESSAGES = 0x66
LIB_CONFIG = 0x6E
STARTUP = 0x6F
CAPABILITIES = 0x54
SERIAL = 0x61
VERSION = 0x3E
CHANNEL_STATUS = 0x52
EVENT_BUFFER = 0x74  # Configure Event Buffer: [0, config, size u16, time u16 in 10 ms]
# response codes
OK = 0x00
CHANNEL_CLOSED_EVENT = 0x07
CHANNEL_IN_WRONG_STATE = 0x15
CLOSE_ALL_CHANNELS = 0x19
INVALID_MESSAGE = 0x28
# Configure Event Buffer's config byte: buffer only low-priority events, or every event.
BUFFER_LOW_PRIORITY = 0x00
BUFFER_ALL = 0x01
EVENT_BUFFERING = 0x02  # advanced options 3 (capabilities byte 6)

_LIBUSB_TIMEOUT = -7
_LIBUSB_NO_DEVICE = -4
_LIBUSB_ACCESS = -3
_LIBUSB_BUSY = -6


def ant_message(msg_id: int, content: bytes | list[int]) -> bytes:
    body = bytes([SYNC, len(content), msg_id, *content])
    checksum = 0
    for byte in body:
        checksum ^= byte
    return body + bytes([checksum])


def split_messages(buffer: bytearray) -> Iterator[tuple[int, bytes, bool]]:
    """Consume complete messages from `buffer`: (id, content, checksum ok)."""
    while len(buffer) >= 4:
        if buffer[0] != SYNC:
            del buffer[0]
            continue
        size = buffer[1] + 4
        if len(buffer) < size:
            return
        packet = bytes(buffer[:size])
        del buffer[:size]
        checksum = 0
        for byte in packet[:-1]:
            checksum ^= byte
        yield packet[2], packet[3:-1], checksum == packet[-1]


# -- ANT+ devices -----------------------------------------------------------------------------


def _u16(value: float) -> list[int]:
    number = int(value) & 0xFFFF
    return [number & 0xFF, number >> 8]


@dataclass
class SimDevice:
    """An ANT+ master broadcasting one data page per period. Subclasses encode the pages."""

    number: int  # 20-bit device number
    device_type: int = 0
    period: int = 8070  # 1/32768 s
    rssi: int = -60
    phase: float = 0.0  # seconds after the start of its first transmission
    repeat: int = 1  # each new page is sent this many times in a row (sensor slower than 4 Hz)
    transmission_type: int = 0x01
    sent: int = field(default=0, init=False)
    pages: list[bytes] = field(default_factory=list, init=False)  # every page broadcast

    @property
    def device_id(self) -> str:
        return f"{self.device_type}:{self.number}"

    @property
    def period_s(self) -> float:
        return self.period / TICKS_PER_S

    def channel_id(self) -> tuple[int, int, int]:
        """(device number u16, device type, transmission type with the number's high nibble)."""
        trans = (self.transmission_type & 0x0F) | ((self.number >> 16) & 0x0F) << 4
        return self.number & 0xFFFF, self.device_type, trans

    def next_page(self, t: float) -> bytes:
        if self.sent % self.repeat == 0 or not self.pages:
            page = bytes(self.encode(self.sent // self.repeat, t))
            assert len(page) == 8, page
        else:
            page = self.pages[-1]
        self.sent += 1
        self.pages.append(page)
        return page

    def encode(self, n: int, t: float) -> list[int]:
        raise NotImplementedError


@dataclass
class HeartRateStrap(SimDevice):
    """Type 120. Page 4 (with the previous beat time) and background pages 2, 3, 7; the toggle
    bit flips every 4 pages. A legacy strap never toggles and its bytes 0-3 mean nothing."""

    bpm: float = 60.0
    legacy: bool = False
    battery: int = 87

    def __post_init__(self) -> None:
        self.device_type = 120
        self.period = 8070

    def beats_by(self, t: float) -> tuple[int, float, float]:
        """(beats so far, time of the last beat, time of the one before), beat 0 at t = 0."""
        interval = 60.0 / self.bpm
        count = math.floor(t / interval + 1e-9)
        return count, count * interval, (count - 1) * interval

    def encode(self, n: int, t: float) -> list[int]:
        count, last, previous = self.beats_by(t)
        tail = [*_u16(round(last * 1024)), count & 0xFF, round(self.bpm)]
        if self.legacy:
            return [0x84, 0xFF, 0x12, 0x34, *tail]
        toggle = 0x80 if (n // 4) % 2 else 0x00
        if n % 65 == 64:
            background = (2, 3, 7)[(n // 65) % 3]
            if background == 2:
                return [2 | toggle, 1, *_u16(self.number >> 4), *tail]
            if background == 3:
                return [3 | toggle, 4, 12, 7, *tail]
            return [7 | toggle, self.battery, 0x80, 0x13, *tail]
        return [4 | toggle, 0xFF, *_u16(round(previous * 1024)), *tail]


@dataclass
class PowerMeter(SimDevice):
    """Type 11, page 0x10 (standard power) with a manufacturer page 0x50 every 61 pages."""

    watts: int = 200
    cadence: int = 90

    def __post_init__(self) -> None:
        self.device_type = 11
        self.period = 8182
        self._events = 0
        self._accumulated = 0

    def encode(self, n: int, t: float) -> list[int]:
        if n % 61 == 60:
            return [0x50, 0xFF, 0xFF, 3, *_u16(1), *_u16(2)]
        self._events = (self._events + 1) & 0xFF
        self._accumulated = (self._accumulated + self.watts) & 0xFFFF
        return [
            0x10,
            self._events,
            0xFF,
            self.cadence,
            *_u16(self._accumulated),
            *_u16(self.watts),
        ]


def _event_revs(t: float, per_minute: float) -> tuple[int, int]:
    """(revolutions so far, time of the last one in 1/1024 s) for a steady rate, rev 0 at 0."""
    if per_minute <= 0:
        return 0, 0
    interval = 60.0 / per_minute
    revs = math.floor(t / interval + 1e-9)
    return revs, round(revs * interval * 1024)


@dataclass
class SpeedCadenceSensor(SimDevice):
    """Type 121: no pages; crank and wheel event times and revolution counts."""

    rpm: float = 90.0
    speed: float = 8.0  # m/s
    circumference: float = 2.105

    def __post_init__(self) -> None:
        self.device_type = 121
        self.period = 8086

    def encode(self, n: int, t: float) -> list[int]:
        crank_revs, crank_time = _event_revs(t, self.rpm)
        wheel_revs, wheel_time = _event_revs(t, self.speed * 60 / self.circumference)
        return [*_u16(crank_time), *_u16(crank_revs), *_u16(wheel_time), *_u16(wheel_revs)]


@dataclass
class CadenceSensor(SimDevice):
    """Type 122, page 0 with the toggle bit."""

    rpm: float = 85.0

    def __post_init__(self) -> None:
        self.device_type = 122
        self.period = 8102

    def encode(self, n: int, t: float) -> list[int]:
        revs, when = _event_revs(t, self.rpm)
        toggle = 0x80 if (n // 4) % 2 else 0x00
        return [toggle, 0xFF, 0xFF, 0xFF, *_u16(when), *_u16(revs)]


@dataclass
class SpeedSensor(SimDevice):
    """Type 123, page 0 with the toggle bit."""

    speed: float = 7.0
    circumference: float = 2.105

    def __post_init__(self) -> None:
        self.device_type = 123
        self.period = 8118

    def encode(self, n: int, t: float) -> list[int]:
        revs, when = _event_revs(t, self.speed * 60 / self.circumference)
        toggle = 0x80 if (n // 4) % 2 else 0x00
        return [toggle, 0xFF, 0xFF, 0xFF, *_u16(when), *_u16(revs)]


@dataclass
class StrideSensor(SimDevice):
    """Type 124 (SDM): page 1 (time, distance, speed, strides), every 4th page 2 (cadence)."""

    speed: float = 3.5  # m/s
    strides_per_min: float = 85.0

    def __post_init__(self) -> None:
        self.device_type = 124
        self.period = 8134

    def encode(self, n: int, t: float) -> list[int]:
        whole_speed = int(self.speed) & 0x0F
        speed_fraction = round((self.speed % 1) * 256) & 0xFF
        if n % 4 == 3:
            cadence_fraction = round((self.strides_per_min % 1) * 16) & 0x0F
            return [
                2,
                0xFF,
                0xFF,
                int(self.strides_per_min) & 0xFF,
                cadence_fraction << 4 | whole_speed,
                speed_fraction,
                0xFF,
                0x00,
            ]
        distance = self.speed * t
        strides = int(self.strides_per_min * t / 60)
        return [
            1,
            round((t % 1) * 200) % 200,
            int(t) & 0xFF,
            int(distance) & 0xFF,
            (int((distance % 1) * 16) & 0x0F) << 4 | whole_speed,
            speed_fraction,
            strides & 0xFF,
            8,  # latency 0.25 s
        ]


@dataclass
class Trainer(SimDevice):
    """Type 17 (FE-C trainer): page 16 every 4th page, page 25 (trainer data) otherwise."""

    watts: int = 180
    cadence: int = 88
    speed: float = 9.0  # m/s

    def __post_init__(self) -> None:
        self.device_type = 17
        self.period = 8192
        self._events = 0
        self._accumulated = 0

    def encode(self, n: int, t: float) -> list[int]:
        in_use = 3 << 4
        if n % 4 == 0:
            return [
                16,
                25,
                round(t * 4) & 0xFF,
                int(self.speed * t) & 0xFF,
                *_u16(round(self.speed * 1000)),
                0xFF,
                in_use | 0x04,
            ]
        self._events = (self._events + 1) & 0xFF
        self._accumulated = (self._accumulated + self.watts) & 0xFFFF
        return [
            25,
            self._events,
            self.cadence,
            *_u16(self._accumulated),
            self.watts & 0xFF,
            (self.watts >> 8) & 0x0F,
            in_use,
        ]


class Room:
    """Devices in radio range, each broadcasting at its own period from its own phase."""

    def __init__(self, devices: list[SimDevice]) -> None:
        self.devices = devices
        self._queue: list[tuple[float, int, SimDevice]] = []
        self._order = itertools.count()
        for device in devices:
            heapq.heappush(self._queue, (device.phase, next(self._order), device))

    def due_until(self, end: float) -> Iterator[tuple[float, SimDevice]]:
        """Every transmission with time < end, in time order."""
        while self._queue and self._queue[0][0] < end:
            t, _, device = heapq.heappop(self._queue)
            heapq.heappush(self._queue, (t + device.period_s, next(self._order), device))
            yield t, device


# -- the stick --------------------------------------------------------------------------------


@dataclass
class _Channel:
    number: int
    kind: int = 0
    network: int = 0
    device_number: int = 0
    device_type: int = 0
    transmission_type: int = 0
    period: int = 8192
    rf: int = 66
    is_open: bool = False
    paired: tuple[int, int, int] | None = None  # a wildcard channel locks onto the first match


class FakeAntStick:
    """The ANT side of one stick. Host bytes in through host_write, out through host_read."""

    def __init__(
        self,
        serial: int = 0x1234_5678,
        *,
        product: int = 0x1008,
        scan_mode: bool = True,
        lib_config: bool = True,
        max_channels: int = 8,
        port: int = 1,
        event_buffering: bool = False,
        event_queue_bytes: int = 1024,
    ) -> None:
        self.serial = serial
        self.product = product
        self.scan_capable = scan_mode
        self.lib_config_capable = lib_config
        self.event_buffering_capable = event_buffering
        # The real stick's event queue size is not published; the host's size threshold is
        # capped to it, as the firmware does.
        self.event_queue_bytes = event_queue_bytes
        self.max_channels = max_channels
        self.port = port
        self.deny_access = False  # open fails as without the udev rule
        self.held_elsewhere = False  # claim fails as when another process has the stick
        self.wedged = False  # ignores everything but a reset, delivers nothing (a reset cures it)
        self.errors: list[str] = []  # protocol violations by the host: tests assert none
        self.commands: list[tuple[int, bytes]] = []  # everything the host sent, in order
        self.configured = threading.Event()  # set when scanning or a channel opened
        self.resets = 0
        self._lock = threading.Condition()
        self._in = bytearray()
        self._last_content: bytes = b""
        self.surfaced = 0  # data messages openant will pass on (it drops exact repeats)
        self.transfers = 0  # USB reads that returned data (one per wake-up of the host)
        # The IN endpoint: bytes for the host wait in the kernel, as in a USB controller's queue.
        self._wire_r, self._wire_w = os.pipe()
        self._bell_r, self._bell_w = os.pipe()  # wakes a host read when the stick goes away
        for fd in (self._wire_r, self._bell_r, self._bell_w):
            os.set_blocking(fd, False)
        self._fds = [self._wire_r, self._wire_w, self._bell_r, self._bell_w]
        weakref.finalize(self, _close_all, self._fds)
        self._buffered = bytearray()  # events held back by event buffering
        self._last_flush = time.monotonic()
        self._timer: threading.Thread | None = None
        self._closed = False
        self._reset_state()

    # state

    def _reset_state(self) -> None:
        self.channels: dict[int, _Channel] = {}
        self.network_key: bytes | None = None
        self.scanning = False
        self.ext_flags = 0
        self.buffer_config = BUFFER_LOW_PRIORITY
        self.buffer_size = 0  # bytes; 0: every event goes out at once
        self.buffer_time_s = 0.0  # 0: no time threshold
        self._buffered.clear()
        self.configured.clear()

    @property
    def advanced_options_two(self) -> int:
        led, ext_messages, scan, ext_assign = 0x01, 0x02, 0x04, 0x20
        return led | ext_messages | ext_assign | (scan if self.scan_capable else 0)

    # host side (called by the backend, in the host's threads)

    def host_write(self, data: bytes) -> None:
        with self._lock:
            self._in.extend(data)
            for msg_id, content, ok in split_messages(self._in):
                if not ok:
                    self.errors.append(f"bad checksum on message {msg_id:#04x}")
                    continue
                self.commands.append((msg_id, content))
                if msg_id == RESET:
                    self.wedged = False
                if not self.wedged:
                    self._handle(msg_id, content)
            self._lock.notify_all()

    def host_read(self, size: int, timeout_s: float, is_attached: Callable[[], bool]) -> bytes:
        """One bulk IN transfer: what the stick has queued (up to `size`), waiting for it if none.

        Like libusb's, the wait is a poll() in the kernel with the GIL released; no Python runs
        until bytes arrive, so the fake costs the host about what a USB transfer would.
        """
        poller = select.poll()
        poller.register(self._wire_r, select.POLLIN)
        poller.register(self._bell_r, select.POLLIN)
        deadline = time.monotonic() + timeout_s
        while True:
            if not is_attached():
                raise usb.core.USBError("No such device", _LIBUSB_NO_DEVICE, errno.ENODEV)
            remaining = deadline - time.monotonic()
            ready = poller.poll(max(0.0, remaining) * 1000)
            for fd, _ in ready:
                if fd == self._bell_r:
                    _drain(fd)
                    continue
                try:
                    chunk = os.read(fd, size)
                except BlockingIOError:  # a reset took the bytes between poll and read
                    continue
                self.transfers += 1
                return chunk
            if not ready and remaining <= 0:
                raise usb.core.USBTimeoutError("Timed out", _LIBUSB_TIMEOUT, errno.ETIMEDOUT)

    def wait_until(self, condition: Callable[[], bool], timeout: float = 20.0) -> bool:
        """Wait (from any thread) until `condition` holds; it is checked after every host write."""
        with self._lock:
            return self._lock.wait_for(condition, timeout)

    def sent(self, msg_id: int, content: bytes | None = None) -> int:
        """How many times the host sent this message (with this content, if given)."""
        return sum(m == msg_id and content in (None, c) for m, c in list(self.commands))

    def wake(self) -> None:
        with self._lock:
            self._lock.notify_all()

    def power_cycle(self) -> None:
        """Unplugging loses everything: pending bytes and the ANT configuration."""
        with self._lock:
            _drain(self._wire_r)
            self._in.clear()
            self._last_content = b""
            self._reset_state()
            self._lock.notify_all()
        with contextlib.suppress(BlockingIOError):
            os.write(self._bell_w, b"!")

    def close(self) -> None:
        """Send what event buffering holds, stop the firmware's timer and close the pipes."""
        with self._lock:
            self._flush()
            self._closed = True
            self._lock.notify_all()
        if self._timer is not None:
            self._timer.join()
        _close_all(self._fds)

    # another process playing the radio (bench/ant.py)

    def radio_state(self) -> dict[str, Any]:
        """What a radio in another process needs to send broadcasts as this stick would."""
        with self._lock:
            return {
                "scanning": self.scanning,
                "ext_flags": self.ext_flags,
                "network_key": (self.network_key or b"").hex(),
                "buffer": [self.buffer_config, self.buffer_size, self.buffer_time_s],
            }

    def wire(self) -> int:
        """The write end of the IN endpoint, for another process to send the host bytes."""
        return self._wire_w

    @classmethod
    def on_wire(cls, fd: int, state: dict[str, Any]) -> FakeAntStick:
        """The radio side of a stick whose host is in another process, set up as `state`."""
        stick = cls(event_buffering=True)
        os.close(stick._wire_w)
        stick._fds.remove(stick._wire_w)
        stick._wire_w = fd
        stick._fds.append(fd)
        with stick._lock:
            stick.scanning = state["scanning"]
            stick.ext_flags = state["ext_flags"]
            stick.network_key = bytes.fromhex(state["network_key"])
            config, size, time_s = state["buffer"]
            stick._configure_buffer(config, size, time_s)
        return stick

    # radio side

    def hear(self, device: SimDevice, page: bytes) -> None:
        """A device broadcast `page`; deliver it if the stick is listening for it."""
        with self._lock:
            if self.network_key != ANT_PLUS_KEY or self.wedged:
                return
            channel = self._channel_for(device)
            if channel is None:
                return
            content = bytes([channel, *page]) + self._tail(device)
            self._emit(BROADCAST, content, event=True)
            self._lock.notify_all()

    def inject(self, msg_id: int, content: bytes) -> None:
        """Send the host any message, e.g. a malformed one (not counted as a frame to come)."""
        with self._lock:
            self._emit(msg_id, content, counted=False)
            self._lock.notify_all()

    def inject_bytes(self, data: bytes) -> None:
        """Send the host raw bytes: line noise, or a message torn or damaged on the way."""
        with self._lock:
            self._send(data)
            self._lock.notify_all()

    def _channel_for(self, device: SimDevice) -> int | None:
        number, device_type, trans = device.channel_id()
        if self.scanning:
            return 0
        for channel in self.channels.values():
            if not channel.is_open:
                continue
            if channel.paired is not None:
                if channel.paired == (number, device_type, trans):
                    return channel.number
                continue
            if (
                channel.device_number in (0, number)
                and channel.device_type in (0, device_type)
                and channel.transmission_type in (0, trans)
            ):
                channel.paired = (number, device_type, trans)
                return channel.number
        return None

    def _tail(self, device: SimDevice) -> bytes:
        if not self.ext_flags:
            return b""
        number, device_type, trans = device.channel_id()
        tail = bytearray([self.ext_flags & 0xC0])
        if self.ext_flags & 0x80:
            tail += bytes([number & 0xFF, number >> 8, device_type, trans])
        if self.ext_flags & 0x40:
            tail += bytes([0x20, device.rssi & 0xFF, (-96) & 0xFF])
        return bytes(tail)

    def _emit(
        self, msg_id: int, content: bytes, *, counted: bool = True, event: bool = False
    ) -> None:
        """Send a message; an event (data, channel event) may wait in the event buffer."""
        # openant passes on a data message unless its content equals the previous message's.
        if counted and msg_id in (BROADCAST, ACKNOWLEDGED) and content != self._last_content:
            self.surfaced += 1
        self._last_content = content
        message = ant_message(msg_id, content)
        if event and self.buffer_config == BUFFER_ALL and self.buffer_size:
            # As the firmware does: queue it, then flush past the size or time threshold.
            self._buffered += message
            if len(self._buffered) > self.buffer_size or self._flush_due():
                self._flush()
            return
        if self._buffered:
            self._flush()  # whatever is not buffered goes out after what is, never before
        self._send(message)

    def _flush_due(self) -> bool:
        return bool(self.buffer_time_s) and (
            time.monotonic() - self._last_flush >= self.buffer_time_s
        )

    def _flush(self) -> None:
        if self._buffered:
            self._send(bytes(self._buffered))  # one write: the host gets it in one transfer
            self._buffered.clear()
        self._last_flush = time.monotonic()

    def _send(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self._wire_w, view) :]

    def _configure_buffer(self, config: int, size: int, time_s: float) -> None:
        self.buffer_config = config
        self.buffer_size = min(size, self.event_queue_bytes)
        self.buffer_time_s = time_s
        self._flush()
        if time_s and self._timer is None:
            self._timer = threading.Thread(
                target=self._run_timer, name="fake-ant-firmware", daemon=True
            )
            self._timer.start()

    def _run_timer(self) -> None:
        """The firmware's timer: flush what waited for the time threshold, traffic or not."""
        with self._lock:
            while not self._closed:
                if not (self._buffered and self.buffer_time_s):
                    self._lock.wait()
                    continue
                wait = self._last_flush + self.buffer_time_s - time.monotonic()
                if wait > 0:
                    self._lock.wait(wait)
                else:
                    self._flush()

    def _respond(self, channel: int, msg_id: int, code: int = OK) -> None:
        self._emit(RESPONSE, bytes([channel, msg_id, code]))

    def _handle(self, msg_id: int, content: bytes) -> None:
        ch = content[0] if content else 0
        if msg_id == RESET:
            self.resets += 1
            _drain(self._wire_r)
            self._reset_state()
            self._emit(STARTUP, bytes([0x20]))  # reset by command
        elif msg_id == REQUEST:
            wanted = content[1]
            if wanted == CAPABILITIES:
                options_three = EVENT_BUFFERING if self.event_buffering_capable else 0
                options = [self.max_channels, 8, 0x00, 0x12, self.advanced_options_two, 0]
                self._emit(CAPABILITIES, bytes([*options, options_three, 0]))
            elif wanted == SERIAL:
                self._emit(SERIAL, self.serial.to_bytes(4, "little"))
            elif wanted == VERSION:
                self._emit(VERSION, b"AP2USB1.05\x00")
            elif wanted == CHANNEL_STATUS:
                channel = self.channels.get(ch)
                state = 0 if channel is None else 3 if channel.is_open or self.scanning else 1
                self._emit(CHANNEL_STATUS, bytes([ch, state]))
            else:
                self._respond(ch, REQUEST, INVALID_MESSAGE)
        elif msg_id == NETWORK_KEY:
            self.network_key = bytes(content[1:9])
            self._respond(ch, msg_id)
        elif msg_id == ASSIGN:
            if ch >= self.max_channels:
                self._respond(ch, msg_id, INVALID_MESSAGE)
                return
            self.channels[ch] = _Channel(ch, kind=content[1], network=content[2])
            self._respond(ch, msg_id)
        elif msg_id == UNASSIGN:
            self.channels.pop(ch, None)
            self._respond(ch, msg_id)
        elif msg_id in (CHANNEL_ID, PERIOD, SEARCH_TIMEOUT, RF_FREQ):
            channel = self.channels.get(ch)
            if channel is None:
                self._respond(ch, msg_id, CHANNEL_IN_WRONG_STATE)
                return
            if msg_id == CHANNEL_ID:
                channel.device_number = content[1] | content[2] << 8
                channel.device_type = content[3]
                channel.transmission_type = content[4]
            elif msg_id == PERIOD:
                channel.period = content[1] | content[2] << 8
            elif msg_id == RF_FREQ:
                channel.rf = content[1]
            self._respond(ch, msg_id)
        elif msg_id == EXT_MESSAGES:
            self.ext_flags = 0x80 if content[1] else 0
            self._respond(ch, msg_id)
        elif msg_id == EVENT_BUFFER:
            if not self.event_buffering_capable or len(content) != 6:
                self._respond(ch, msg_id, INVALID_MESSAGE)
                return
            size = content[2] | content[3] << 8
            time_s = (content[4] | content[5] << 8) / 100
            self._configure_buffer(content[1], size, time_s)
            self._respond(ch, msg_id)
        elif msg_id == LIB_CONFIG:
            if not self.lib_config_capable:
                self._respond(ch, msg_id, INVALID_MESSAGE)
                return
            self.ext_flags = content[1]
            self._respond(ch, msg_id)
        elif msg_id == OPEN:
            channel = self.channels.get(ch)
            if channel is None:
                self._respond(ch, msg_id, CHANNEL_IN_WRONG_STATE)
                return
            if channel.rf != 57:
                self.errors.append(f"channel {ch} opened on RF {channel.rf}, not ANT+'s 57")
            channel.is_open = True
            self._respond(ch, msg_id)
            self.configured.set()
        elif msg_id == SCAN:
            if not self.scan_capable:
                self._respond(ch, msg_id, INVALID_MESSAGE)
            elif any(c.is_open for c in self.channels.values()):
                self._respond(ch, msg_id, CLOSE_ALL_CHANNELS)
            elif ch not in self.channels:
                self._respond(ch, msg_id, CHANNEL_IN_WRONG_STATE)
            else:
                if self.channels[ch].rf != 57:
                    self.errors.append(f"scan channel on RF {self.channels[ch].rf}, not 57")
                self.scanning = True
                self._respond(ch, msg_id)
                self.configured.set()
        elif msg_id == CLOSE:
            channel = self.channels.get(ch)
            self._respond(ch, msg_id)
            if channel is not None and (channel.is_open or self.scanning):
                channel.is_open = False
                self.scanning = False
                self._emit(RESPONSE, bytes([ch, 0x01, CHANNEL_CLOSED_EVENT]), event=True)
        else:
            self._respond(ch, msg_id, INVALID_MESSAGE)

    def close_channel_unasked(self, channel: int = 0) -> None:
        """The stick closes a channel on its own (as after a search timeout)."""
        with self._lock:
            self.scanning = False
            self.configured.clear()
            if channel in self.channels:
                self.channels[channel].is_open = False
            self._emit(RESPONSE, bytes([channel, 0x01, CHANNEL_CLOSED_EVENT]), event=True)
            self._lock.notify_all()


def _drain(fd: int) -> None:
    """Read a non-blocking fd until it is empty."""
    with contextlib.suppress(BlockingIOError):
        while os.read(fd, 65536):
            pass


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
    fds.clear()


# -- pyusb backend ----------------------------------------------------------------------------


class _Descriptor:
    def __init__(self, **fields: Any) -> None:
        self.__dict__.update(fields)


@dataclass(eq=False)
class _Attachment:
    """One plugging-in of a stick: a USB address that dies when the stick is pulled."""

    stick: FakeAntStick
    bus: int
    address: int
    attached: bool = True
    claimed_by: object | None = None

    def is_attached(self) -> bool:
        return self.attached


@dataclass(eq=False)
class _Handle:
    attachment: _Attachment


class FakeUsbBackend(usb.backend.IBackend):  # type: ignore[misc]
    """pyusb backend with fake ANT sticks on bus 1; plug(), unplug() and replug() them."""

    def __init__(self) -> None:
        super().__init__()
        self._attachments: dict[int, _Attachment] = {}  # by stick id
        self._addresses = itertools.count(4)
        self._lock = threading.Lock()
        self._pull_on: dict[int, int] = {}
        self.calls: dict[str, int] = {}  # IBackend method -> times called
        self._called = threading.Condition()
        self._accounting = False
        self._read_cpu = 0.0

    def account_reads(self, on: bool) -> float:
        """Measure (on) or stop measuring (off) the CPU bulk_read spends in the fake itself:
        the poll() and read() that stand in for libusb's. Returns the seconds so far."""
        self._accounting = on
        if on:
            self._read_cpu = 0.0
        return self._read_cpu

    def _count(self, name: str) -> None:
        with self._called:
            self.calls[name] = self.calls.get(name, 0) + 1
            self._called.notify_all()

    def wait_calls(self, name: str, count: int, timeout: float = 20.0) -> bool:
        """Wait until the host has called `name` (e.g. "open_device") `count` times."""
        with self._called:
            return self._called.wait_for(lambda: self.calls.get(name, 0) >= count, timeout)

    def plug(self, stick: FakeAntStick) -> None:
        with self._lock:
            self._attachments[id(stick)] = _Attachment(stick, 1, next(self._addresses))

    def unplug(self, stick: FakeAntStick) -> None:
        with self._lock:
            attachment = self._attachments.pop(id(stick))
        attachment.attached = False
        stick.power_cycle()

    def pull_on(self, stick: FakeAntStick, msg_id: int) -> None:
        """Pull the stick out the moment the host sends it `msg_id` (its write then fails)."""
        self._pull_on[id(stick)] = msg_id

    def replug(self, stick: FakeAntStick) -> None:
        self.unplug(stick)
        self.plug(stick)

    # IBackend

    def enumerate_devices(self) -> list[_Attachment]:
        self._count("enumerate_devices")
        with self._lock:
            return list(self._attachments.values())

    def get_parent(self, dev: _Attachment) -> None:
        return None

    def get_device_descriptor(self, dev: _Attachment) -> _Descriptor:
        return _Descriptor(
            bLength=18,
            bDescriptorType=1,
            bcdUSB=0x0200,
            bDeviceClass=0,
            bDeviceSubClass=0,
            bDeviceProtocol=0,
            bMaxPacketSize0=32,
            idVendor=0x0FCF,
            idProduct=dev.stick.product,
            bcdDevice=0x0100,
            iManufacturer=1,
            iProduct=2,
            iSerialNumber=3,
            bNumConfigurations=1,
            address=dev.address,
            bus=dev.bus,
            port_number=dev.stick.port,
            port_numbers=(dev.stick.port,),
            speed=2,
        )

    def get_configuration_descriptor(self, dev: _Attachment, config: int) -> _Descriptor:
        if config != 0:
            raise IndexError(config)
        return _Descriptor(
            bLength=9,
            bDescriptorType=2,
            wTotalLength=32,
            bNumInterfaces=1,
            bConfigurationValue=1,
            iConfiguration=0,
            bmAttributes=0x80,
            bMaxPower=50,
            extra_descriptors=[],
        )

    def get_interface_descriptor(
        self, dev: _Attachment, intf: int, alt: int, config: int
    ) -> _Descriptor:
        if (intf, alt, config) != (0, 0, 0):
            raise IndexError((intf, alt, config))
        return _Descriptor(
            bLength=9,
            bDescriptorType=4,
            bInterfaceNumber=0,
            bAlternateSetting=0,
            bNumEndpoints=2,
            bInterfaceClass=0xFF,
            bInterfaceSubClass=0,
            bInterfaceProtocol=0,
            iInterface=0,
            extra_descriptors=[],
        )

    def get_endpoint_descriptor(
        self, dev: _Attachment, ep: int, intf: int, alt: int, config: int
    ) -> _Descriptor:
        if ep not in (0, 1) or (intf, alt, config) != (0, 0, 0):
            raise IndexError((ep, intf, alt, config))
        return _Descriptor(
            bLength=7,
            bDescriptorType=5,
            bEndpointAddress=0x81 if ep == 0 else 0x01,
            bmAttributes=0x02,  # bulk
            wMaxPacketSize=64,
            bInterval=1,
            bRefresh=0,
            bSynchAddress=0,
            extra_descriptors=[],
        )

    def open_device(self, dev: _Attachment) -> _Handle:
        self._count("open_device")
        self._check(dev)
        if dev.stick.deny_access:
            raise usb.core.USBError(
                "Access denied (insufficient permissions)", _LIBUSB_ACCESS, errno.EACCES
            )
        return _Handle(dev)

    def close_device(self, dev_handle: _Handle) -> None:
        if dev_handle.attachment.claimed_by is dev_handle:
            dev_handle.attachment.claimed_by = None

    def set_configuration(self, dev_handle: _Handle, config_value: int) -> None:
        self._check(dev_handle.attachment)
        if dev_handle.attachment.stick.held_elsewhere:
            raise usb.core.USBError("Resource busy", _LIBUSB_BUSY, errno.EBUSY)

    def get_configuration(self, dev_handle: _Handle) -> int:
        return 1

    def set_interface_altsetting(self, dev_handle: _Handle, intf: int, altsetting: int) -> None:
        self._check(dev_handle.attachment)

    def claim_interface(self, dev_handle: _Handle, intf: int) -> None:
        attachment = dev_handle.attachment
        self._check(attachment)
        if attachment.stick.held_elsewhere or attachment.claimed_by not in (None, dev_handle):
            raise usb.core.USBError("Resource busy", _LIBUSB_BUSY, errno.EBUSY)
        attachment.claimed_by = dev_handle

    def release_interface(self, dev_handle: _Handle, intf: int) -> None:
        if dev_handle.attachment.claimed_by is dev_handle:
            dev_handle.attachment.claimed_by = None

    def bulk_write(
        self, dev_handle: _Handle, ep: int, intf: int, data: array.array[int], timeout: int
    ) -> int:
        attachment = dev_handle.attachment
        self._check(attachment)
        stick = attachment.stick
        if len(data) > 2 and self._pull_on.get(id(stick)) == data[2]:
            del self._pull_on[id(stick)]
            self.unplug(stick)
            self._check(attachment)
        stick.host_write(bytes(data))
        return len(data)

    def bulk_read(
        self, dev_handle: _Handle, ep: int, intf: int, buff: array.array[int], timeout: int
    ) -> int:
        attachment = dev_handle.attachment
        self._check(attachment)
        if not self._accounting:
            chunk = attachment.stick.host_read(len(buff), timeout / 1000, attachment.is_attached)
        else:
            started = time.thread_time()
            try:
                chunk = attachment.stick.host_read(
                    len(buff), timeout / 1000, attachment.is_attached
                )
            finally:
                self._read_cpu += time.thread_time() - started
        size = len(chunk)
        memoryview(buff)[:size] = chunk
        return size

    def clear_halt(self, dev_handle: _Handle, ep: int) -> None:
        pass

    def reset_device(self, dev_handle: _Handle) -> None:
        self._check(dev_handle.attachment)

    def is_kernel_driver_active(self, dev_handle: _Handle, intf: int) -> bool:
        return False

    def detach_kernel_driver(self, dev_handle: _Handle, intf: int) -> None:
        pass

    def attach_kernel_driver(self, dev_handle: _Handle, intf: int) -> None:
        pass

    @staticmethod
    def _check(dev: _Attachment) -> None:
        if not dev.attached:
            raise usb.core.USBError("No such device", _LIBUSB_NO_DEVICE, errno.ENODEV)


# -- driving it -------------------------------------------------------------------------------


class CountingFrameQueue(FrameQueue):
    """A FrameQueue that also lets a test wait, from any thread, until N frames were handed in
    (put on the event loop, past any batching in the source)."""

    def __init__(self, maxsize: int = 1_000_000) -> None:
        super().__init__(maxsize)
        self.handed_in = 0
        self.log: list[Frame] = []  # every frame handed in, in order
        self._handed = threading.Condition()

    def put(self, frame: Frame) -> None:
        super().put(frame)
        self._handed_in([frame])

    def put_many(self, frames: list[Frame]) -> None:
        super().put_many(frames)
        self._handed_in(frames)

    def put_from_thread(self, frames: list[Frame]) -> None:
        super().put_from_thread(frames)
        self._handed_in(frames)

    def _handed_in(self, frames: list[Frame]) -> None:
        with self._handed:
            self.log.extend(frames)
            self.handed_in += len(frames)
            self._handed.notify_all()

    def wait_handed_in(self, count: int, timeout: float) -> bool:
        with self._handed:
            return self._handed.wait_for(lambda: self.handed_in >= count, timeout)


class Player:
    """Plays a Room into sticks on a virtual clock, one transmission at a time.

    Before each transmission the clock moves to its time; after it, the player waits until
    gatewayd has stamped every message the sticks passed on, so each Frame carries the time its
    broadcast was sent, exactly, whatever the machine's speed. `after_each` (e.g. the pipeline's
    run_once) runs on the event loop after every transmission.
    """

    def __init__(
        self,
        room: Room,
        sticks: list[FakeAntStick],
        clock: ManualClock,
        frames: CountingFrameQueue,
        after_each: Callable[[], None] | None = None,
        *,
        timeout: float = 20.0,
    ) -> None:
        self.room = room
        self.sticks = sticks
        self.clock = clock
        self.frames = frames
        self.after_each = after_each
        self.timeout = timeout
        self.t = 0.0  # virtual seconds since the start
        self.target = frames.handed_in  # frames gatewayd must have taken by now

    async def play(self, seconds: float) -> None:
        end = self.t + seconds
        for t, device in self.room.due_until(end):
            self._move_to(t)
            page = device.next_page(t)
            before = [stick.surfaced for stick in self.sticks]
            for stick in self.sticks:
                stick.hear(device, page)
            self.target += sum(s.surfaced - b for s, b in zip(self.sticks, before, strict=True))
            if self.frames.handed_in < self.target:
                target = self.target
                arrived = await asyncio.to_thread(self.frames.wait_handed_in, target, self.timeout)
                assert arrived, (
                    f"at t={t:.3f} s gatewayd took {self.frames.handed_in} of {target} frames"
                )
            if self.after_each is not None:
                self.after_each()
        self._move_to(end)
        if self.after_each is not None:
            self.after_each()

    def sync(self) -> None:
        """Count from here: what was handed in so far is settled."""
        self.target = self.frames.handed_in

    def _move_to(self, t: float) -> None:
        if t > self.t:
            self.clock.advance(t - self.t)
            self.t = t
