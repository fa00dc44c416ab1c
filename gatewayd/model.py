"""The values that travel the data path: Frame -> Reading -> Sample (and device status)."""

from __future__ import annotations

import enum
import functools
import json
import math
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import NamedTuple


class DataType(enum.StrEnum):
    """Terra's data type names (PROTOCOL.md), plus the BATTERY extension."""

    HEART_RATE = "HEART_RATE"
    RR_INTERVAL = "RR_INTERVAL"
    POWER = "POWER"
    BIKE_CADENCE = "BIKE_CADENCE"
    SPEED = "SPEED"
    DISTANCE = "DISTANCE"
    STEPS = "STEPS"
    STEPS_CADENCE = "STEPS_CADENCE"
    CALORIES = "CALORIES"
    BATTERY = "BATTERY"


class Measure(enum.StrEnum):
    """What one Reading measures.

    Plain measures carry a finished value. Counter measures carry a cumulative count and/or an
    event time exactly as the wire had them (with their moduli) so that rates are derived in one
    place (decode/counters.py) from two consecutive readings.
    """

    # finished values
    HEART_RATE = "heart_rate"  # bpm
    RR_INTERVALS = "rr_intervals"  # values: ms, oldest first
    POWER = "power"  # instantaneous W
    CADENCE = "cadence"  # rpm as the device reported it
    SPEED = "speed"  # m/s as the device reported it
    DISTANCE = "distance"  # cumulative m, not wrapping
    STEPS = "steps"  # cumulative, not wrapping
    STEPS_CADENCE = "steps_cadence"  # steps per minute as the device reported it
    ENERGY = "energy"  # cumulative kcal
    BATTERY = "battery"  # percent
    CONTACT = "contact"  # 1 skin contact, 0 none
    BODY_LOCATION = "body_location"  # 0x2A38 code
    EQUIPMENT = "equipment"  # ANT+ FE equipment type code
    BALANCE = "balance"  # % of power from the left pedal; count 1 if the side is known, else 0
    STRIDE_LENGTH = "stride_length"  # m (BLE RSC)
    STROKE_RATE = "stroke_rate"  # strokes per minute (rower)
    STROKES = "strokes"  # cumulative stroke count (rower)
    # per-device bookkeeping: no data type of their own, they steer the Deriver
    PAGE_TOGGLE = "page_toggle"  # ANT+ byte 0 bit 7; until it flips, `paged` readings are junk
    PREVIOUS_BEAT = "previous_beat"  # ANT+ HR page 4: count = beat count, time = the beat before
    # counters (count/time as on the wire; moduli in count_mod/time_mod; tick_hz = time units)
    CRANK_REVS = "crank_revs"  # -> BIKE_CADENCE
    WHEEL_REVS = "wheel_revs"  # -> SPEED (needs the wheel circumference)
    HEART_BEATS = "heart_beats"  # ANT+ beat count + beat time -> RR_INTERVAL
    POWER_EVENTS = "power_events"  # event count + accumulated power (accum) -> POWER
    TORQUE_EVENTS = "torque_events"  # event count + period (time) + accumulated torque (accum)
    WRAPPED_DISTANCE = "wrapped_distance"  # value in m, wraps at count_mod (ANT+ SDM, FE)
    WRAPPED_ENERGY = "wrapped_energy"  # value in kcal, wraps at count_mod (ANT+ SDM p3, FE p18)
    WRAPPED_STRIDES = "wrapped_strides"  # count wraps at count_mod; 1 stride = 2 steps (ANT+ SDM)
    WHEEL_TORQUE_EVENTS = "wheel_torque_events"  # as TORQUE_EVENTS, but the wheel turns (-> SPEED)


# Frame, Reading and Sample are NamedTuples rather than frozen dataclasses: just as immutable,
# about three times cheaper to build, and the hot path builds one Frame and several Readings per
# radio message and a Sample per stream and second.


class Frame(NamedTuple):
    """Raw bytes as a radio gave them, plus where and when. Sources never decode."""

    source: str  # "ble" | "ant": the wire family, which picks the decoder
    adapter: str  # "hci0", "ant0", "sim" ...
    device_id: str  # BLE: "C0:FF:EE:00:00:01"; ANT+: "<device type>:<device number>"
    kind: str  # what the bytes are: a GATT UUID ("2a37"), "mfr:006b", "ant:120" ...
    payload: bytes
    mono: float  # time.monotonic() at reception
    wall: float  # time.time() at reception
    rssi: int | None = None


class Reading(NamedTuple):
    """One decoded measurement. Most fields are used only by counter measures."""

    measure: Measure
    value: float = 0.0
    values: tuple[float, ...] = ()
    count: int = 0  # type: ignore[assignment]  # shadows tuple.count(), which nothing uses
    count_mod: int = 0
    time: int = 0
    time_mod: int = 0
    tick_hz: float = 0.0
    accum: int = 0
    accum_mod: int = 0
    # From ANT+ page-specific bytes (1-3), which legacy devices fill with junk: the Deriver drops
    # it until it has seen this device's page toggle bit change.
    paged: bool = False


class Sample(NamedTuple):
    """One normalized per-second value for one athlete and one data type."""

    uid: str
    t: DataType
    ts: float  # unix seconds at the start of the second (RR_INTERVAL: the beat's time, in ms)
    val: float | None = None
    d: tuple[float, ...] | None = None
    device_id: str = ""
    source: str = ""

    def ts_text(self) -> str:
        return format_ts(self.ts)

    def payload(self) -> dict[str, object]:
        """The `d` object of a DISPATCH / SUBMIT frame."""
        if self.d is not None:
            return {"ts": self.ts_text(), "d": list(self.d)}
        return {"ts": self.ts_text(), "val": self.val}

    def payload_json(self) -> str:
        """payload() as compact JSON, exactly what json.dumps writes, built without it: every
        sample is written this way for each consumer-facing output."""
        if self.d is not None:
            return f'{{"ts":"{format_ts(self.ts)}","d":{json_list(self.d)}}}'
        return f'{{"ts":"{format_ts(self.ts)}","val":{json_number(self.val)}}}'


class DeviceState(enum.StrEnum):
    CONNECTED = "connected"
    LOST = "lost"


@dataclass(frozen=True, slots=True)
class DeviceStatus:
    """A device came alive or went silent; emitted by the aggregator, fanned out by the hub."""

    uid: str
    device_id: str
    source: str
    state: DeviceState
    wall: float
    reason: str = ""
    battery: float | None = None
    rssi: int | None = None
    extra: dict[str, object] = field(default_factory=dict)


def json_number(value: float | None) -> str:
    """A sample's value as json.dumps writes it: a finite float's or an int's repr is its JSON
    (bool is not an int here), anything else (None, NaN) goes through json.dumps."""
    text = plain_value(value, None)
    return json.dumps(value) if text is None else text


def float_text(value: float) -> str:
    """A finite float's JSON (its repr), which every output writes for every sample (DISPATCH,
    SUBMIT, MQTT): the callers look it up in FLOAT_TEXT first, so a value seen before costs a
    dict lookup instead of a repr. Zero is never stored: 0.0 == -0.0, but their texts differ."""
    text = repr(value)
    if value:
        if len(FLOAT_TEXT) >= TEXT_CACHE_MAX:
            FLOAT_TEXT.clear()
        FLOAT_TEXT[value] = text
    return text


def plain_value(val: float | None, d: tuple[float, ...] | None) -> str | None:
    """The JSON of a sample's `val` when it is a plain number (a finite float or an int, and no
    `d`): what the outputs' fast paths write, the miss of their FLOAT_TEXT lookup. None for
    anything else (a `d` list, None, NaN, a bool), which takes the general path."""
    if d is None:
        kind = type(val)
        if kind is float and math.isfinite(val):  # type: ignore[arg-type]
            return float_text(val)  # type: ignore[arg-type]
        if kind is int:
            return repr(val)
    return None


# Values repeat across athletes and seconds (whole bpm, rpm and W; RR in 1/1024 s steps), and
# uids in every sample: their texts are kept, up to this many of each (then started afresh).
FLOAT_TEXT: dict[float, str] = {}
STRING_JSON: dict[str, str] = {}
TEXT_CACHE_MAX = 4096


def json_list(values: tuple[float, ...]) -> str:
    """A sample's `d` as compact JSON."""
    return json.dumps(list(values), separators=(",", ":"))


def json_string(text: str) -> str:
    """A string as compact JSON with non-ASCII kept (the protocol's frames are UTF-8); cached, as
    the same few uids and type names are written for every sample (hot loops look STRING_JSON
    up first themselves)."""
    known = TYPE_JSON.get(text) or STRING_JSON.get(text)
    if known is None:
        known = json.dumps(text, ensure_ascii=False)
        if len(STRING_JSON) >= TEXT_CACHE_MAX:
            STRING_JSON.clear()
        STRING_JSON[text] = known
    return known


# The data types' own JSON, never forgotten.
TYPE_JSON: dict[str, str] = {t: json.dumps(t.value) for t in DataType}


@functools.lru_cache(maxsize=1024)
def format_ts(unix_seconds: float) -> str:
    """RFC 3339 UTC with milliseconds and Z (PROTOCOL.md, Timestamps).

    Cached: every sample of a second has the same ts, and each output formats it again. Each
    per-beat RR sample has a ts of its own, hundreds a second: the calendar part comes from a
    cache per whole second, and the fraction is rounded to the microsecond as
    datetime.fromtimestamp rounds it (half to even), then cut to the millisecond."""
    fraction, whole = math.modf(unix_seconds)
    micros = round(fraction * 1e6)
    if micros >= 1_000_000:
        whole += 1.0
        micros -= 1_000_000
    elif micros < 0:
        whole -= 1.0
        micros += 1_000_000
    return f"{_second_text(int(whole))}{micros // 1000:03d}Z"


@functools.lru_cache(maxsize=64)
def _second_text(second: int) -> str:
    return datetime.fromtimestamp(second, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.")


def parse_ts(text: str) -> float:
    """Inverse of format_ts; accepts any RFC 3339 timestamp with an offset or Z."""
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if moment.tzinfo is None:
        raise ValueError(f"timestamp {text!r} has no UTC offset")
    return moment.timestamp()
