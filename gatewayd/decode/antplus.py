"""ANT+ data pages and ANT serial frames (formats.md part B). Little-endian throughout.

A Frame of kind "ant:<device type>" carries one 8-byte data page. Pages whose bytes 1-3 depend on
a page number that legacy devices never send (HR, and speed/cadence sensors) begin their Readings
with a PAGE_TOGGLE reading and mark page-specific Readings `paged=True`; the per-device Deriver
drops those until it has seen the toggle bit change. An unknown or informational page (common
pages 0x50/0x51, calibration ...) decodes to no Readings: it is not malformed.

`parse_frame` reads one ANT serial message (sync 0xA4, length, id, content, XOR checksum) with
its extended trailer; `ant_frame` is the `ant-frame` profile's decoder built on it.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

from gatewayd.decode.tables import whole_values
from gatewayd.errors import DecodeError
from gatewayd.model import Measure, Reading

KIND_HR = "ant:120"
KIND_POWER = "ant:11"
KIND_FE = "ant:17"
KIND_SPEED_CADENCE = "ant:121"
KIND_CADENCE = "ant:122"
KIND_SPEED = "ant:123"
KIND_SDM = "ant:124"
# Not a radio Frame kind: the `ant-frame` profile takes a whole serial message.
KIND_SERIAL = "ant-frame"

PAGE_LEN = 8
_U8 = 1 << 8
_U16 = 1 << 16


def _page(profile: str, data: bytes) -> bytes:
    if len(data) != PAGE_LEN:
        raise DecodeError(profile, f"an ANT+ page is 8 bytes, got {len(data)}", data)
    return data


def _u16(data: bytes, pos: int) -> int:
    return data[pos] | data[pos + 1] << 8


def _toggle(page: bytes) -> Reading:
    return Reading(Measure.PAGE_TOGGLE, value=float(page[0] >> 7))


# The pages a gym hears most (heart rate, power, speed and cadence: four a second per sensor)
# take their plain Readings from tables (decode/tables.py), build the others with tuple.__new__
# and all eleven fields in order (measure, value, values, count, count_mod, time, time_mod,
# tick_hz, accum, accum_mod, paged), and read their fields with one precompiled Struct:
# NamedTuple's keyword-parsing __new__ and a shift-and-or per u16 field were most of their
# decoding time.
_new = tuple.__new__
_TOGGLES = whole_values(Measure.PAGE_TOGGLE, 2)
_HEART_RATES = whole_values(Measure.HEART_RATE)  # a u8
_CADENCES = whole_values(Measure.CADENCE)  # a u8
_PREVIOUS_BEAT = Measure.PREVIOUS_BEAT
_HEART_BEATS = Measure.HEART_BEATS
_POWER_EVENTS = Measure.POWER_EVENTS
_CRANK_REVS = Measure.CRANK_REVS
_WHEEL_REVS = Measure.WHEEL_REVS
# page number (| toggle bit), byte 1, bytes 2-3, beat time, beat count, heart rate
_HR_PAGE = struct.Struct("<BBHHBB").unpack
# 0x10, event count, balance, cadence, accumulated power, instantaneous power
_POWER_PAGE = struct.Struct("<BBBBHH").unpack
# crank event time, crank revolutions, wheel event time, wheel revolutions
_SC_PAGE = struct.Struct("<HHHH").unpack


def heart_rate(data: bytes) -> list[Reading]:
    """Type 120 heart rate: beat time 1/1024 s, beat count, HR; page 4 RR, page 7 battery."""
    page = data if len(data) == PAGE_LEN else _page("ant-hr", data)
    first, byte1, previous, beat_time, count, hr = _HR_PAGE(page)
    number = first & 0x7F
    readings = [
        _TOGGLES[first >> 7],
        _HEART_RATES[hr],
    ]
    if number == 4:
        # Must come before HEART_BEATS: the Deriver pairs it with the beat of the same count.
        # Paged: bytes 2-3 are the previous beat's time only on a strap that sends pages.
        readings.append(
            _new(Reading, (_PREVIOUS_BEAT, 0.0, (), count, _U8, previous, _U16, 1024.0, 0, 0, True))
        )
    readings.append(
        _new(Reading, (_HEART_BEATS, 0.0, (), count, _U8, beat_time, _U16, 1024.0, 0, 0, False))
    )
    if number == 7 and byte1 <= 100:  # 0xFF: percentage not sent
        readings.append(Reading(Measure.BATTERY, value=float(byte1), paged=True))
    return readings


def _events(measure: Measure, page: bytes, at: int = 4) -> Reading:
    """Event count u8 (byte 1), then from byte `at` accumulated period u16 1/2048 s and
    accumulated torque u16 1/32 N*m (power 0x11/0x12: at 4; FE page 26: at 3)."""
    return Reading(
        measure,
        count=page[1],
        count_mod=_U8,
        time=_u16(page, at),
        time_mod=_U16,
        tick_hz=2048.0,
        accum=_u16(page, at + 2),
        accum_mod=_U16,
    )


def bike_power(data: bytes) -> list[Reading]:
    """Type 11 bike power: 0x10 power (average over events), 0x11 wheel and 0x12 crank torque."""
    page = data if len(data) == PAGE_LEN else _page("ant-power", data)
    number = page[0]
    readings: list[Reading] = []
    if number == 0x10:
        _, events, balance, rpm, accumulated, instant = _POWER_PAGE(page)
        if balance != 0xFF:
            percent = float(balance & 0x7F)
            if balance & 0x80:  # the percentage is the right pedal's
                readings.append(Reading(Measure.BALANCE, value=100.0 - percent, count=1))
            else:
                readings.append(Reading(Measure.BALANCE, value=percent, count=0))
        if rpm != 0xFF:
            readings.append(_CADENCES[rpm])
        readings.append(
            _new(
                Reading,
                (
                    _POWER_EVENTS,
                    float(instant),
                    (),
                    events,
                    _U8,
                    0,
                    0,
                    0.0,
                    accumulated,
                    _U16,
                    False,
                ),
            )
        )
    elif number == 0x11:
        if page[3] != 0xFF:
            readings.append(Reading(Measure.CADENCE, value=float(page[3])))
        readings.append(_events(Measure.WHEEL_TORQUE_EVENTS, page))
    elif number == 0x12:
        # Cadence comes from the event period (exact); byte 3 would only repeat it, rounded.
        readings.append(_events(Measure.TORQUE_EVENTS, page))
    return readings


def _revs(measure: Measure, revs: int, event_time: int) -> Reading:
    return Reading(
        measure, count=revs, count_mod=_U16, time=event_time, time_mod=_U16, tick_hz=1024.0
    )


def speed_cadence(data: bytes) -> list[Reading]:
    """Type 121 combined speed and cadence: crank time, crank revs, wheel time, wheel revs."""
    page = data if len(data) == PAGE_LEN else _page("ant-sc", data)
    crank_time, crank_revs, wheel_time, wheel_revs = _SC_PAGE(page)
    return [
        _new(
            Reading,
            (_CRANK_REVS, 0.0, (), crank_revs, _U16, crank_time, _U16, 1024.0, 0, 0, False),
        ),
        _new(
            Reading,
            (_WHEEL_REVS, 0.0, (), wheel_revs, _U16, wheel_time, _U16, 1024.0, 0, 0, False),
        ),
    ]


def cadence(data: bytes) -> list[Reading]:
    """Type 122 cadence: crank event time 1/1024 s and cumulative crank revs (bytes 4-7)."""
    page = _page("ant-cadence", data)
    return [_toggle(page), _revs(Measure.CRANK_REVS, _u16(page, 6), _u16(page, 4))]


def speed(data: bytes) -> list[Reading]:
    """Type 123 speed: wheel event time 1/1024 s and cumulative wheel revs (bytes 4-7)."""
    page = _page("ant-speed", data)
    return [_toggle(page), _revs(Measure.WHEEL_REVS, _u16(page, 6), _u16(page, 4))]


def sdm(data: bytes) -> list[Reading]:
    """Type 124 stride-based speed and distance: p1 speed, distance, strides; p2/p3 cadence."""
    page = _page("ant-sdm", data)
    number = page[0]
    speed_ms = (page[4] & 0x0F) + page[5] / 256.0
    if number == 1:
        return [
            Reading(Measure.SPEED, value=speed_ms),
            Reading(Measure.WRAPPED_DISTANCE, value=page[3] + (page[4] >> 4) / 16.0, count_mod=_U8),
            Reading(Measure.WRAPPED_STRIDES, count=page[6], count_mod=_U8),
        ]
    if number in (2, 3):
        # SDM profile, pages 2 and 3 share bytes 3-5 (cadence 1/16 stride/min, speed 1/256 m/s);
        # page 3 adds accumulated calories in byte 6 (kcal, wraps at 256). A footpod may send
        # page 3 in place of page 2, so both carry the cadence.
        strides_per_min = page[3] + (page[4] >> 4) / 16.0
        readings = [
            Reading(Measure.SPEED, value=speed_ms),
            # A stride is two steps; STEPS_CADENCE counts steps.
            Reading(Measure.STEPS_CADENCE, value=2.0 * strides_per_min),
        ]
        if number == 3:
            readings.append(Reading(Measure.WRAPPED_ENERGY, value=float(page[6]), count_mod=_U8))
        return readings
    return []


FE_TYPES = {16: "general", 19: "treadmill", 20: "elliptical", 21: "stationary bike", 22: "rower",
            23: "climber", 24: "nordic skier", 25: "trainer"}  # fmt: skip

# FE pages 20-24 share one layout (FE profile, "specific ... data" pages): byte 4 the equipment's
# own cadence, bytes 5-6 instantaneous power u16 W (0xFFFF invalid). Byte 3 (an accumulated
# stride or stroke count, wrapping at 256) has no data type of its own. The measure of byte 4:
_FE_CADENCE = {
    20: Measure.CADENCE,  # elliptical: strides per minute (one stride = one crank revolution)
    21: Measure.CADENCE,  # stationary bike: rpm
    22: Measure.STROKE_RATE,  # rower: strokes per minute
    23: Measure.CADENCE,  # climber: stride cycles per minute
    24: Measure.CADENCE,  # nordic skier: strides per minute
}


def fitness_equipment(data: bytes) -> list[Reading]:
    """Type 17 fitness equipment: p16 speed, distance, HR; p18 kcal; p19-26 cadence, power."""
    page = _page("ant-fe", data)
    number = page[0]
    if number == 16:
        readings = [
            Reading(Measure.EQUIPMENT, value=float(page[1] & 0x1F)),
            Reading(Measure.SPEED, value=_u16(page, 4) / 1000.0),
        ]
        if page[7] & 0x04:  # distance traveled enabled
            readings.append(Reading(Measure.WRAPPED_DISTANCE, value=float(page[3]), count_mod=_U8))
        # FE profile, page 16 byte 7 bits 0-1: HR data source; 0 means the HR byte is invalid
        # whatever it holds. 0xFF is "invalid" too, and 0 is what equipment sends with no strap.
        if page[7] & 0x03 and page[6] not in (0, 0xFF):
            readings.append(Reading(Measure.HEART_RATE, value=float(page[6])))
        return readings
    if number == 25:
        readings = []
        if page[2] != 0xFF:
            readings.append(Reading(Measure.CADENCE, value=float(page[2])))
        instant = page[5] | (page[6] & 0x0F) << 8
        if instant != 0xFFF:  # 0xFFF: power not available, so neither is its sum
            readings.append(
                Reading(
                    Measure.POWER_EVENTS,
                    count=page[1],
                    count_mod=_U8,
                    accum=_u16(page, 3),
                    accum_mod=_U16,
                    value=float(instant),
                )
            )
        return readings
    if number == 26:
        # FE profile, trainer torque page: event count, wheel ticks, wheel period u16 1/2048 s at
        # bytes 3-4 and accumulated torque u16 1/32 N*m at bytes 5-6 (one byte earlier than the
        # bike power profile's 0x11): the same wheel torque events, giving power and speed.
        return [_events(Measure.WHEEL_TORQUE_EVENTS, page, at=3)]
    cadence_measure = _FE_CADENCE.get(number)
    if cadence_measure is not None:
        readings = []
        if page[4] != 0xFF:
            readings.append(Reading(cadence_measure, value=float(page[4])))
        power = _u16(page, 5)
        if power != 0xFFFF:
            readings.append(Reading(Measure.POWER, value=float(power)))
        return readings
    if number == 19:
        # FE profile, treadmill page byte 4: cadence in strides per minute (0xFF invalid); a
        # stride is two steps and STEPS_CADENCE counts steps, as for the SDM.
        return [] if page[4] == 0xFF else [Reading(Measure.STEPS_CADENCE, value=2.0 * page[4])]
    if number == 18 and page[7] & 0x01:
        # FE profile, general metabolic page: byte 6 accumulated calories (kcal, wraps at 256),
        # valid when capability bit 0 of byte 7 says it is enabled.
        return [Reading(Measure.WRAPPED_ENERGY, value=float(page[6]), count_mod=_U8)]
    return []


PAGE_DECODERS: dict[int, Callable[[bytes], list[Reading]]] = {
    120: heart_rate,
    11: bike_power,
    17: fitness_equipment,
    121: speed_cadence,
    122: cadence,
    123: speed,
    124: sdm,
}


# ANT serial messages ------------------------------------------------------------------------

SYNC = 0xA4
MSG_BROADCAST = 0x4E
MSG_ACKNOWLEDGED = 0x4F
MSG_BURST = 0x50
MSG_CHANNEL_EVENT = 0x40
_DATA_MESSAGES = (MSG_BROADCAST, MSG_ACKNOWLEDGED, MSG_BURST)

EXT_CHANNEL_ID = 0x80
EXT_RSSI = 0x40
EXT_TIMESTAMP = 0x20
_RSSI_DBM = 0x20  # RSSI measurement type: dBm

EVENT_NAMES = {
    0x01: "RX_SEARCH_TIMEOUT",
    0x02: "RX_FAIL",
    0x03: "TX",
    0x04: "TRANSFER_RX_FAILED",
    0x05: "TRANSFER_TX_COMPLETED",
    0x06: "TRANSFER_TX_FAILED",
    0x07: "CHANNEL_CLOSED",
    0x08: "RX_FAIL_GO_TO_SEARCH",
    0x09: "CHANNEL_COLLISION",
    0x0A: "TRANSFER_TX_START",
    0x19: "CLOSE_ALL_CHANNELS",
}


@dataclass(frozen=True, slots=True)
class AntMessage:
    """One ANT serial message. Data messages (0x4E/0x4F/0x50) have `page`; extended ones more."""

    msg_id: int
    content: bytes
    channel: int | None = None
    page: bytes | None = None
    burst_sequence: int | None = None
    device_number: int | None = None  # 20 bits: transmission type bits 4-7 extend the u16
    device_type: int | None = None  # without the pairing bit
    pairing: bool = False
    transmission_type: int | None = None
    rssi: int | None = None  # dBm
    threshold: int | None = None  # dBm
    rssi_bytes: bytes = b""
    timestamp: int | None = None  # 1/32768 s, wraps at 2**16

    @property
    def kind(self) -> str | None:
        """The Frame.kind of this message's page, or None when the sender is unknown."""
        return None if self.device_type is None else f"ant:{self.device_type}"

    @property
    def device_id(self) -> str | None:
        """The Frame.device_id, "<device type>:<device number>", or None without a channel id."""
        if self.device_type is None or self.device_number is None:
            return None
        return f"{self.device_type}:{self.device_number}"

    def describe(self) -> str:
        """One human line, for `gatewayd decode ant-frame`."""
        if self.page is not None:
            text = f"channel {self.channel} data 0x{self.msg_id:02x} page {self.page.hex()}"
            if self.device_id is not None:
                text += (
                    f" from device {self.device_number} type {self.device_type}"
                    f" transmission 0x{self.transmission_type or 0:02x}"
                )
            if self.rssi is not None:
                text += f" rssi {self.rssi} dBm"
            if self.timestamp is not None:
                text += f" timestamp 0x{self.timestamp:04x}"
            return text
        if self.msg_id == MSG_CHANNEL_EVENT and len(self.content) >= 3:
            channel, about, code = self.content[0], self.content[1], self.content[2]
            if about == 0x01:
                name = EVENT_NAMES.get(code, f"0x{code:02x}")
                return f"channel {channel} event {name}"
            result = "OK" if code == 0 else f"error 0x{code:02x}"
            return f"channel {channel} response to 0x{about:02x}: {result}"
        return f"message 0x{self.msg_id:02x} content {self.content.hex()}"


def parse_frame(data: bytes) -> AntMessage:
    """Check and split one serial message: A4, len, id, content[len], XOR of all before it."""
    profile = "ant-frame"
    if len(data) < 4:
        raise DecodeError(profile, f"a message is at least 4 bytes, got {len(data)}", data)
    if data[0] != SYNC:
        raise DecodeError(profile, f"sync byte is 0x{data[0]:02x}, not 0xa4", data)
    length = data[1]
    if len(data) != length + 4:
        raise DecodeError(profile, f"length byte says {length + 4} bytes, got {len(data)}", data)
    check = 0
    for byte in data[:-1]:
        check ^= byte
    if check != data[-1]:
        raise DecodeError(profile, f"checksum 0x{data[-1]:02x}, computed 0x{check:02x}", data)
    return parse_content(data[2], bytes(data[3:-1]), data)


def parse_content(msg_id: int, content: bytes, frame: bytes | None = None) -> AntMessage:
    """Split a message's content (between id and checksum), e.g. openant's broadcast callback
    data with its channel number put in front: `parse_content(0x4E, bytes([ch]) + data)`."""
    profile = "ant-frame"
    data = content if frame is None else frame  # what a DecodeError shows
    length = len(content)
    if msg_id not in _DATA_MESSAGES:
        return AntMessage(msg_id, content, channel=content[0] if content else None)
    if length < 9:
        raise DecodeError(profile, f"a data message has 9 content bytes, got {length}", data)
    channel = content[0]
    burst_sequence = None
    if msg_id == MSG_BURST:
        burst_sequence = channel >> 5
        channel &= 0x1F
    page = content[1:9]
    if length == 9:
        return AntMessage(msg_id, content, channel, page, burst_sequence)
    flags = content[9]
    rest = content[10:]
    fixed = (4 if flags & EXT_CHANNEL_ID else 0) + (2 if flags & EXT_TIMESTAMP else 0)
    rssi_size = len(rest) - fixed
    if flags & ~(EXT_CHANNEL_ID | EXT_RSSI | EXT_TIMESTAMP) & 0xFF:
        raise DecodeError(profile, f"unknown extended flags 0x{flags:02x}", data)
    if (flags & EXT_RSSI and rssi_size not in (3, 4)) or (not flags & EXT_RSSI and rssi_size):
        raise DecodeError(
            profile, f"extended flags 0x{flags:02x} do not fit {len(rest)} trailing bytes", data
        )
    pos = 0
    number = device_type = transmission = None
    pairing = False
    if flags & EXT_CHANNEL_ID:
        transmission = rest[3]
        number = (rest[0] | rest[1] << 8) | (transmission >> 4) << 16
        device_type = rest[2] & 0x7F
        pairing = bool(rest[2] & 0x80)
        pos = 4
    rssi = threshold = None
    rssi_bytes = b""
    if flags & EXT_RSSI:
        rssi_bytes = rest[pos : pos + rssi_size]
        # Only the dBm measurement type is understood; other sticks' layouts are unverified.
        if rssi_bytes[0] == _RSSI_DBM:
            rssi = _s8(rssi_bytes[1])
            threshold = _s8(rssi_bytes[2])
        pos += rssi_size
    timestamp = None
    if flags & EXT_TIMESTAMP:
        timestamp = _u16(rest, pos)
    return AntMessage(
        msg_id,
        content,
        channel,
        page,
        burst_sequence,
        number,
        device_type,
        pairing,
        transmission,
        rssi,
        threshold,
        rssi_bytes,
        timestamp,
    )


def _s8(byte: int) -> int:
    return byte - 256 if byte & 0x80 else byte


def ant_frame(data: bytes) -> list[Reading]:
    """A whole ANT serial message (A4 len id ... XOR); a data page with a channel id is decoded."""
    message = parse_frame(data)
    if message.page is None or message.device_type is None:
        return []
    decoder = PAGE_DECODERS.get(message.device_type)
    return [] if decoder is None else decoder(message.page)


DECODERS: dict[str, Callable[[bytes], list[Reading]]] = {
    f"ant:{device_type}": decoder for device_type, decoder in PAGE_DECODERS.items()
}
DECODERS[KIND_SERIAL] = ant_frame
