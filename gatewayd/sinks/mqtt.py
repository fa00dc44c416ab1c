"""Publishes samples, device state and the hub's own status to an MQTT broker (paho-mqtt).

Topic layout (docs/mqtt.md): `<prefix>/<hub>/athletes/<uid>/<data type>` per sample,
`<prefix>/<hub>/status` retained online/offline (offline is also the last will),
`<prefix>/<hub>/devices/<source>/<device id>` retained device state, and optionally Home
Assistant discovery configs under `<discovery prefix>/sensor/gatewayd_<hub>/.../config`.

Threads: none of its own. paho runs on the event loop (gatewayd/sinks/mqtt_loop.py drives its
socket, keepalive and reconnects; only the blocking connect, DNS to TLS handshake, runs in a
worker thread). paho's callbacks hand their news to the sink with call_soon, so the sink never
runs inside paho's packet handling; messages go to paho in bulk (Client.publish_many) and come
back settled in bulk (Client.settled, read after every socket event).

Memory stays bounded: at most WINDOW messages are inside paho (handed over but not yet written
for QoS 0, not yet acknowledged for QoS 1/2; paho's own max_queued_messages is set to the same
bound), the rest wait in this sink's offline queue of `offline_queue` messages, whose oldest are
dropped and counted when it is full. Retained state (status, devices, discovery) is kept apart,
one message per topic, so a long outage never loses the latest state.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import hashlib
import json
import logging
import math
import os
import re
import ssl
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from gatewayd import __version__
from gatewayd.config import MqttConfig
from gatewayd.errors import ConfigError
from gatewayd.hub import Event, Subscription
from gatewayd.model import (
    FLOAT_TEXT,
    DataType,
    DeviceState,
    DeviceStatus,
    Sample,
    format_ts,
    json_list,
    json_number,
    plain_value,
)
from gatewayd.roster import Roster
from gatewayd.sinks.mqtt_client import Client
from gatewayd.sinks.mqtt_loop import LoopDriver

log = logging.getLogger(__name__)

# Messages inside paho at once (see the module docstring): a whole second of a big gym, so a
# second's burst goes to paho's thread in one hand-over and one wake-up.
WINDOW = 5000
PUMP_CHUNK = 2000  # messages handed to paho per loop turn, so a backlog never stalls the loop
# Hub events taken at once: a whole second of a big gym, so per_athlete finds each athlete's
# second in one batch.
BATCH_LIMIT = 100_000
MAX_DEVICES = 10_000  # remembered device states; the least recently changed is forgotten
CLOSE_BUDGET_S = 2.0  # of the app's shutdown budget: finish sending, then say "offline"

ONLINE = b"online"
OFFLINE = b"offline"

_BATTERY = DataType.BATTERY
_AUTH_CODES = {134, 135}  # Bad user name or password, Not authorized (3.1.1 codes 4, 5 map here)
_CLIENT_ID_CODE = 133  # Client Identifier not valid


@dataclass(frozen=True, slots=True)
class SensorKind:
    """How Home Assistant should show one data type."""

    label: str
    unit: str
    device_class: str | None
    state_class: str
    icon: str | None
    value_template: str = "{{ value_json.val }}"


SENSORS: dict[DataType, SensorKind] = {
    DataType.HEART_RATE: SensorKind("Heart rate", "bpm", None, "measurement", "mdi:heart-pulse"),
    # One message per beat (`val` in ms), as the local broker and the upstream send it.
    DataType.RR_INTERVAL: SensorKind("RR interval", "ms", "duration", "measurement", None),
    DataType.POWER: SensorKind("Power", "W", "power", "measurement", None),
    DataType.BIKE_CADENCE: SensorKind("Cadence", "rpm", None, "measurement", "mdi:bike"),
    DataType.SPEED: SensorKind("Speed", "m/s", "speed", "measurement", None),
    DataType.DISTANCE: SensorKind("Distance", "m", "distance", "total_increasing", None),
    DataType.STEPS: SensorKind("Steps", "steps", None, "total_increasing", "mdi:shoe-print"),
    DataType.STEPS_CADENCE: SensorKind("Step cadence", "steps/s", None, "measurement", "mdi:run"),
    DataType.CALORIES: SensorKind("Calories", "kcal", None, "total_increasing", "mdi:fire"),
    DataType.BATTERY: SensorKind("Battery", "%", "battery", "measurement", None),
}


def level(text: str) -> str:
    """One topic level: MQTT's separators and wildcards cannot appear inside it."""
    return re.sub(r"[/+#\x00]", "_", text) or "_"


def object_id(text: str) -> str:
    """Home Assistant ids allow [a-z0-9_-]; a lossy rewrite gets a hash so two ids never merge."""
    slug = re.sub(r"[^a-z0-9_-]", "_", text.lower())
    if slug == text:
        return slug
    return f"{slug}_{hashlib.sha1(text.encode()).hexdigest()[:6]}"


class Topics:
    def __init__(self, prefix: str, hub_id: str, discovery_prefix: str) -> None:
        self.base = f"{prefix}/{level(hub_id)}"
        self.status = f"{self.base}/status"
        self.node = object_id(f"gatewayd_{hub_id}")
        self.discovery_base = f"{discovery_prefix}/sensor/{self.node}"
        self.discovery_filter = f"{self.discovery_base}/+/config"

    def sample(self, uid: str, t: DataType) -> str:
        return f"{self.base}/athletes/{level(uid)}/{t}"

    def athlete(self, uid: str) -> str:
        return f"{self.base}/athletes/{level(uid)}"

    def device(self, source: str, device_id: str) -> str:
        return f"{self.base}/devices/{level(source)}/{level(device_id)}"

    def discovery(self, uid: str, t: DataType) -> str:
        return f"{self.discovery_base}/{object_id(uid)}_{t.lower()}/config"

    def uid_level_of(self, state_topic: str) -> str | None:
        """The athlete's topic level in one of our sample topics, else None."""
        head = f"{self.base}/athletes/"
        if not state_topic.startswith(head):
            return None
        parts = state_topic[len(head) :].split("/")
        return parts[0] if len(parts) == 2 else None


def sample_payload(sample: Sample, ts_text: str | None = None) -> bytes:
    """`{"ts":..,"val":..|"d":[..],"device":..,"source":..}`, byte for byte what json.dumps
    gives, built without it. MqttSink._samples builds the same bytes from the same three
    parts (`_ts_head`, `_value_text`, `_origin_tail`), caching the first and the last."""
    ts = ts_text if ts_text is not None else format_ts(sample.ts)
    value = _value_text(sample.val, sample.d)
    return (_ts_head(ts) + value + _origin_tail(sample.device_id, sample.source)).encode()


def _ts_head(ts_text: str) -> str:
    return f'{{"ts":"{ts_text}",'


def _value_text(val: float | None, d: tuple[float, ...] | None) -> str:
    return '"d":' + json_list(d) if d is not None else '"val":' + json_number(val)


def _origin_tail(device_id: str, source: str) -> str:
    return f',"device":{_json_string(device_id)},"source":{_json_string(source)}}}'


def athlete_payload(samples: list[Sample], ts_text: str) -> bytes:
    """One athlete's second (`per_athlete`): `{"ts":..,"HEART_RATE":72.0,"RR_INTERVAL":[..]}`."""
    parts = [f'{{"ts":"{ts_text}"']
    for sample in samples:
        value = json_list(sample.d) if sample.d is not None else json_number(sample.val)
        parts.append(f'"{sample.t}":{value}')
    return (",".join(parts) + "}").encode()


@functools.lru_cache(maxsize=4096)
def _json_string(text: str) -> str:
    return json.dumps(text)


def discovery_payload(
    topics: Topics, uid: str, name: str, t: DataType, *, qos: int, expire_after_s: int
) -> bytes:
    kind = SENSORS[t]
    athlete = object_id(uid)
    state_topic = topics.sample(uid, t)
    config: dict[str, Any] = {
        "name": kind.label,
        "unique_id": f"{topics.node}_{athlete}_{t.lower()}",
        "state_topic": state_topic,
        "value_template": kind.value_template,
        "unit_of_measurement": kind.unit,
        "state_class": kind.state_class,
        "json_attributes_topic": state_topic,
        "json_attributes_template": (
            "{{ {'ts': value_json.ts, 'device': value_json.device, "
            "'source': value_json.source} | tojson }}"
        ),
        "availability_topic": topics.status,
        "payload_available": ONLINE.decode(),
        "payload_not_available": OFFLINE.decode(),
        "qos": qos,
        "device": {
            "identifiers": [f"{topics.node}_{athlete}"],
            "name": name,
            "manufacturer": "gatewayd",
            "model": "Athlete",
        },
        "origin": {"name": "gatewayd", "sw_version": __version__},
    }
    if kind.device_class is not None:
        config["device_class"] = kind.device_class
    if kind.icon is not None:
        config["icon"] = kind.icon
    if expire_after_s:
        config["expire_after"] = expire_after_s
    return json.dumps(config, separators=(",", ":")).encode()


@dataclass(frozen=True, slots=True)
class Retained:
    """The latest retained message of one topic (status, a device's state, a discovery config).
    Samples wait as (topic, payload) pairs instead: there are thousands a second."""

    payload: bytes
    qos: int


@dataclass(slots=True)
class _SampleTopic:
    """What the samples of one athlete and data type share: the topic, and the payload's tail
    for the device and source they came from last."""

    topic: str
    device_id: str
    source: str
    tail: str


class Link(enum.StrEnum):
    STARTING = "starting"
    CONNECTED = "connected"
    REFUSED = "refused"
    UNREACHABLE = "unreachable"
    NO_PASSWORD = "no password"  # the password file or variable cannot be read
    LOST = "lost"
    CLOSED = "closed"


class _CredentialsUnreadable(OSError):
    """The password file or variable is missing; treated like any failed attempt."""


class MqttSink:
    name = "mqtt"

    def __init__(
        self,
        subscription: Subscription,
        config: MqttConfig,
        *,
        hub_id: str,
        roster: Roster | None = None,
    ) -> None:
        self.subscription = subscription
        self.config = config
        self.hub_id = hub_id
        self.client_id = config.client_id or f"gatewayd-{hub_id}"
        self.topics = Topics(config.prefix, hub_id, config.discovery_prefix)
        self.where = f"{config.host}:{config.port}"
        # counters (health and tests)
        self.published = 0  # written (QoS 0) or acknowledged (QoS 1/2) by the broker
        self.dropped = 0  # oldest messages dropped from a full offline queue
        self.rejected = 0  # the broker refused a message (MQTT 5 reason code)
        self.link = Link.STARTING
        self.failed_attempts = 0  # refused or unreachable, since the start
        self._link_waiters: list[tuple[Callable[[MqttSink], bool], asyncio.Future[None]]] = []
        self._link_key: tuple[Link, str] = (Link.STARTING, "")
        self._queue: deque[tuple[str, bytes]] = deque()  # samples: (topic, payload)
        self._retained: dict[str, Retained] = {}
        self._settled = 0  # the client's `settled` counter, as far as counted in `published`
        self._connected = False
        self._dropping = False
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._up = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._pump_scheduled = False
        self._devices: dict[str, dict[str, Any]] = {}
        self._sample_topics: dict[tuple[str, DataType], _SampleTopic] = {}
        self._last_ts = math.nan
        self._last_ts_text = ""
        # discovery bookkeeping, keyed by the athlete's topic level
        self._names: dict[str, str] = {}
        self._roster_levels: set[str] = set()
        self._configs: dict[str, set[str]] = {}  # uid level -> config topics known at the broker
        self._announced: dict[str, tuple[str, DataType]] = {}  # config topic -> (uid, type), run
        if roster is not None:
            self._take_roster(roster)
        self._check_files()
        self._client = self._make_client()
        self._driver = LoopDriver(
            self._client, attempt_failed=self._attempt_failed, after_io=self._after_io
        )
        self._started = False

    @property
    def lost(self) -> int:
        """QoS 0 messages whose connection closed before their bytes left."""
        return self._client.lost

    # -- paho client ---------------------------------------------------------------------------

    def _check_files(self) -> None:
        tls = self.config.tls
        for key, path in (
            ("tls.ca_file", tls.ca_file),
            ("tls.cert_file", tls.cert_file),
            ("tls.key_file", tls.key_file),
        ):
            if tls.enabled and path is not None and not path.is_file():
                raise ConfigError(f"outputs.mqtt.{key}", f"{path} does not exist or is not a file")

    def _make_client(self) -> Client:
        cfg = self.config
        v5 = cfg.protocol == "5"
        client = Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            clean_session=None if v5 else cfg.clean_session,
            protocol=MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311,
            credentials=self._credentials,
        )
        # paho rescans every message it holds on each ack while it holds more than its in-flight
        # limit; WINDOW already bounds what it holds, so no limit of its own.
        client.max_inflight_messages_set(0)
        client.max_queued_messages_set(WINDOW)
        # paho accepts fractions of a second here although its annotation says int.
        client.reconnect_delay_set(cfg.reconnect_min_s, cfg.reconnect_max_s)  # type: ignore[arg-type]
        client.will_set(self.topics.status, OFFLINE, qos=1, retain=True)
        if cfg.tls.enabled:
            try:
                client.tls_set(
                    ca_certs=str(cfg.tls.ca_file) if cfg.tls.ca_file else None,
                    certfile=str(cfg.tls.cert_file) if cfg.tls.cert_file else None,
                    keyfile=str(cfg.tls.key_file) if cfg.tls.key_file else None,
                    cert_reqs=ssl.CERT_REQUIRED,
                )
            except (ssl.SSLError, OSError) as exc:
                raise ConfigError(
                    "outputs.mqtt.tls", f"cannot load the TLS files: {exc}; check their paths"
                ) from None
            client.tls_insecure_set(cfg.tls.insecure)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        properties = None
        if v5:
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            properties.SessionExpiryInterval = 0 if cfg.clean_session else cfg.session_expiry_s
        client.connect_async(
            cfg.host,
            cfg.port,
            keepalive=cfg.keepalive_s,
            clean_start=cfg.clean_session,
            properties=properties,
        )
        return client

    def _credentials(self) -> tuple[str | None, str | None]:
        """Runs in a worker thread before every attempt; the password goes nowhere but paho."""
        cfg = self.config
        password: str | None = None
        if cfg.password_file is not None:
            try:
                password = cfg.password_file.read_text(encoding="utf-8").rstrip("\r\n")
            except OSError as exc:
                raise _CredentialsUnreadable(
                    f"cannot read outputs.mqtt.password_file {cfg.password_file}: "
                    f"{exc.strerror or exc}"
                ) from None
        elif cfg.password_env is not None:
            password = os.environ.get(cfg.password_env)
            if password is None:
                raise _CredentialsUnreadable(
                    f"the environment variable {cfg.password_env} named by "
                    "outputs.mqtt.password_env is not set"
                )
        return cfg.username, password

    # paho (inside its packet handling, on the loop) -> the sink, on the next loop turn --------

    def _later(self, callback: Callable[..., None], *args: Any) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon(callback, *args)

    def _attempt_failed(self, exc: OSError) -> None:
        if isinstance(exc, _CredentialsUnreadable):
            self._later(self._link_failed, Link.NO_PASSWORD, str(exc))
            return
        detail = exc.strerror or str(exc) or type(exc).__name__
        self._later(self._link_failed, Link.UNREACHABLE, detail)

    def _on_connect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.ConnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason.is_failure:
            self._later(self._link_failed, Link.REFUSED, self._refusal(reason))
        else:
            self._later(self._link_up, flags.session_present)

    def _on_disconnect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.DisconnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if flags.is_disconnect_packet_from_server:
            detail = f"the broker disconnected us: {reason}"
        elif reason.value == 128:  # what paho reports for a broken socket
            detail = "the connection broke (broker stopped or network down)"
        else:
            detail = str(reason)
        self._later(self._link_down, detail)

    def _on_publish(
        self,
        client: paho.Client,
        userdata: Any,
        mid: int,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        """The acks paho's own reader handles (refusals, acks with properties, QoS 2); plain
        PUBACKs and written QoS 0 messages are counted in bulk by `_after_io`."""
        if reason.is_failure:
            self.rejected += 1
            if self.rejected == 1:
                log.error("MQTT broker %s rejected a message (check its ACL)", self.where)
        else:
            self.published += 1

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        self._later(self._discovered, message.topic, bytes(message.payload))

    def _refusal(self, reason: ReasonCode) -> str:
        cfg = self.config
        if reason.value in _AUTH_CODES:
            if cfg.password_file is not None:
                secret = f"the password in {cfg.password_file} (outputs.mqtt.password_file)"
            elif cfg.password_env is not None:
                secret = f"the password in ${cfg.password_env} (outputs.mqtt.password_env)"
            else:
                secret = "outputs.mqtt.password_file or password_env (no password is set)"
            user = repr(cfg.username) if cfg.username else "none"
            return f"{reason}; check outputs.mqtt.username (now {user}) and {secret}"
        if reason.value == _CLIENT_ID_CODE:
            return f"{reason}; check outputs.mqtt.client_id (now {self.client_id!r})"
        return str(reason)

    # -- link state (loop) ---------------------------------------------------------------------

    def _report(self, link: Link, detail: str) -> None:
        """One log line per change of state: a broker down for a day logs once, not 3000 times."""
        key = (link, detail if link in (Link.REFUSED, Link.NO_PASSWORD) else "")
        self.link = link
        if link in (Link.REFUSED, Link.UNREACHABLE, Link.NO_PASSWORD):
            self.failed_attempts += 1
        self._wake_link_waiters()
        if key == self._link_key:
            return
        self._link_key = key
        retry = f"retrying with backoff (up to {self.config.reconnect_max_s:g} s)"
        if link is Link.REFUSED:
            log.error("MQTT broker %s refused the connection: %s; %s", self.where, detail, retry)
        elif link is Link.NO_PASSWORD:
            log.error("MQTT: not connecting to %s: %s; %s", self.where, detail, retry)
        elif link is Link.UNREACHABLE:
            log.warning(
                "MQTT broker %s unreachable: %s; queueing up to %d messages, %s",
                self.where,
                detail,
                self.config.offline_queue,
                retry,
            )
        elif link is Link.LOST:
            log.warning("MQTT connection to %s lost: %s; reconnecting", self.where, detail)

    def _link_failed(self, link: Link, detail: str) -> None:
        self._connected = False
        self._up.clear()
        if not self._closed:
            self._report(link, detail)

    def _link_down(self, reason: str) -> None:
        if not self._connected:
            return  # the refusal or failed attempt before this was already reported
        self._connected = False
        self._up.clear()
        if not self._closed:
            self._report(Link.LOST, reason)

    def _link_up(self, session_present: bool) -> None:
        # QoS 0 messages that were on the wire are gone (counted in `lost` by the client); QoS
        # 1/2 ones stay in paho and are resent by it.
        self._connected = True
        waiting = len(self._queue) + self._client.in_flight()
        self._report(Link.CONNECTED, "")
        log.info(
            "MQTT connected to %s as %s (MQTT %s, %s session)%s",
            self.where,
            self.client_id,
            self.config.protocol,
            "resumed" if session_present else "new",
            f"; sending {waiting} queued messages" if waiting else "",
        )
        # "online" goes first, ahead of whatever waited.
        self._idle.clear()
        self._retained = {
            self.topics.status: Retained(ONLINE, 1),
            **{t: m for t, m in self._retained.items() if t != self.topics.status},
        }
        if self.config.discovery:
            self._client.subscribe(self.topics.discovery_filter, qos=0)
        self._up.set()
        self._pump()

    # -- sending (loop) ------------------------------------------------------------------------

    def _retain(self, topic: str, payload: bytes, qos: int) -> None:
        """The latest state of `topic`, sent ahead of the samples; an older one waiting is
        replaced (and moves to the back, as a new one would)."""
        self._retained.pop(topic, None)
        self._retained[topic] = Retained(payload, qos)
        self._schedule_pump()

    def _enqueue(self, messages: list[tuple[str, bytes]]) -> None:
        """Samples (topic, payload) to the offline queue; its oldest dropped past its bound."""
        queue = self._queue
        excess = len(queue) + len(messages) - self.config.offline_queue
        if excess > 0:
            self.dropped += excess
            from_queue = min(excess, len(queue))
            for _ in range(from_queue):
                queue.popleft()
            if excess > from_queue:
                messages = messages[excess - from_queue :]
            if not self._dropping:
                self._dropping = True
                log.warning(
                    "MQTT: %d messages waiting for %s; dropping the oldest (outputs.mqtt."
                    "offline_queue)",
                    self.config.offline_queue,
                    self.where,
                )
        queue.extend(messages)
        self._schedule_pump()

    def _schedule_pump(self) -> None:
        self._idle.clear()
        if not self._pump_scheduled and self._connected:
            self._pump_scheduled = True
            asyncio.get_running_loop().call_soon(self._pump)

    def _pump(self) -> None:
        """Hand waiting messages to paho while connected and paho has room."""
        self._pump_scheduled = False
        if (
            self._connected
            and self._hand_over()
            and (self._queue or self._retained)
            and self._client.in_flight() < WINDOW
        ):
            # a whole chunk went: more next turn, so a backlog never stalls the loop
            self._pump_scheduled = True
            asyncio.get_running_loop().call_soon(self._pump)
        self._take_settled()

    def _hand_over(self) -> bool:
        """Up to PUMP_CHUNK messages, retained state first, as far as the WINDOW allows. False
        when the client took fewer than offered (its output is full, or the link went): the
        next socket event pumps again (`_after_io`), not the next loop turn."""
        client = self._client
        budget = min(PUMP_CHUNK, WINDOW - client.in_flight())
        retained = self._retained
        while retained and budget > 0:
            # consecutive retained messages of one QoS go together
            group: list[tuple[str, bytes]] = []
            qos = -1
            for topic, message in retained.items():
                if len(group) == budget or (group and message.qos != qos):
                    break
                qos = message.qos
                group.append((topic, message.payload))
            taken = self._publish(group, qos, True)
            for topic, _ in group[:taken]:
                del retained[topic]
            budget -= taken
            if taken < len(group):
                return False
        queue = self._queue
        if queue and budget > 0:
            if len(queue) <= budget:
                batch = list(queue)
                queue.clear()
            else:
                batch = [queue.popleft() for _ in range(budget)]
            taken = self._publish(batch, self.config.qos, False)
            if taken < len(batch):
                queue.extendleft(reversed(batch[taken:]))
                return False
        return True

    def _publish(self, messages: list[tuple[str, bytes]], qos: int, retain: bool) -> int:
        """How many of `messages` the client took; a message it refuses is counted and gone."""
        try:
            return self._client.publish_many(messages, qos, retain)
        except ValueError:
            pass
        taken = 0
        for message in messages:  # find the one that cannot be published, keep the rest
            try:
                if not self._client.publish_many([message], qos, retain):
                    break
            except ValueError as exc:
                self.rejected += 1
                log.error("MQTT: not publishing to %r: %s", message[0], exc)
            taken += 1
        return taken

    def _after_io(self) -> None:
        """After every socket event: count what settled, refill paho past half its window."""
        if (
            (self._queue or self._retained)
            and self._connected
            and not self._pump_scheduled
            and self._client.in_flight() <= WINDOW // 2
        ):
            self._pump()
        else:
            self._take_settled()

    def _take_settled(self) -> None:
        settled = self._client.settled
        if settled != self._settled:
            self.published += settled - self._settled
            self._settled = settled
        if self._dropping and not self._queue:
            self._dropping = False
            log.info("MQTT caught up; %d messages dropped so far", self.dropped)
        if not self._queue and not self._retained and not self._client.in_flight():
            self._idle.set()

    # -- events (loop) -------------------------------------------------------------------------

    def _handle_batch(self, batch: list[Event]) -> None:
        messages = self._athletes(batch) if self.config.per_athlete else self._samples(batch)
        if messages:
            self._enqueue(messages)
            if self._connected and not self._pump_scheduled:
                self._pump()

    def _samples(self, batch: list[Event]) -> list[tuple[str, bytes]]:
        """One message per sample, on its athlete's per-type topic: `sample_payload`'s bytes,
        from a cached head per second and a cached tail per device. This runs for every
        published sample, hence the one loop with its lookups held in locals."""
        messages: list[tuple[str, bytes]] = []
        append = messages.append
        topics = self._sample_topics
        texts = FLOAT_TEXT
        last_ts, head = math.nan, ""
        for event in batch:
            if type(event) is not Sample:
                self._device_status(event)  # type: ignore[arg-type]
                continue
            uid, t, ts, val, d, device_id, source = event
            entry = topics.get((uid, t))
            if entry is None:
                entry = self._sample_topic(uid, t)
            if entry.device_id != device_id or entry.source != source:
                entry.device_id, entry.source = device_id, source
                entry.tail = _origin_tail(device_id, source)
            if ts != last_ts:  # per second, and per beat for RR_INTERVAL
                last_ts, head = ts, _ts_head(format_ts(ts))
            # A float's lookup finds only finite values; an int must not meet a float's text.
            value = texts.get(val) if type(val) is float and d is None else None
            if value is None:
                value = plain_value(val, d)
            if value is not None:
                append((entry.topic, f'{head}"val":{value}{entry.tail}'.encode()))
            else:
                append((entry.topic, (head + _value_text(val, d) + entry.tail).encode()))
            if t is _BATTERY:
                self._battery(event)
        return messages

    def _sample_topic(self, uid: str, t: DataType) -> _SampleTopic:
        if len(self._sample_topics) >= MAX_DEVICES:
            self._sample_topics.clear()
        entry = self._sample_topics[(uid, t)] = _SampleTopic(
            self.topics.sample(uid, t), "", "", _origin_tail("", "")
        )
        if self.config.discovery:
            self._announce(uid, t)
        return entry

    def _athletes(self, batch: list[Event]) -> list[tuple[str, bytes]]:
        """One message per athlete and second: the aggregator emits a second's samples
        together."""
        seconds: dict[tuple[str, float], list[Sample]] = {}
        for event in batch:
            if isinstance(event, Sample):
                seconds.setdefault((event.uid, event.ts), []).append(event)
                if event.t is _BATTERY:
                    self._battery(event)
            else:
                self._device_status(event)
        return [
            (self.topics.athlete(uid), athlete_payload(samples, self._ts_text(ts)))
            for (uid, ts), samples in seconds.items()
        ]

    def _battery(self, sample: Sample) -> None:
        if sample.device_id and sample.val is not None:
            self._device_update(sample.source, sample.device_id, {"battery": sample.val})

    def _ts_text(self, ts: float) -> str:
        # A second's samples share their ts: format it once.
        if ts != self._last_ts:
            self._last_ts, self._last_ts_text = ts, format_ts(ts)
        return self._last_ts_text

    def _device_status(self, status: DeviceStatus) -> None:
        changes: dict[str, Any] = {
            "state": str(status.state),
            "uid": status.uid,
            "ts": format_ts(status.wall),
            "reason": status.reason if status.state is DeviceState.LOST else "",
        }
        if status.battery is not None:
            changes["battery"] = status.battery
        if status.rssi is not None:
            changes["rssi"] = status.rssi
        self._device_update(status.source, status.device_id, changes)

    def _device_update(self, source: str, device_id: str, changes: dict[str, Any]) -> None:
        topic = self.topics.device(source, device_id)
        state = self._devices.pop(topic, None)
        if state is None:
            state = {
                "state": str(DeviceState.CONNECTED),
                "uid": "",
                "ts": None,
                "reason": "",
                "battery": None,
                "rssi": None,
                "source": source,
                "device": device_id,
            }
            if len(self._devices) >= MAX_DEVICES:
                self._devices.pop(next(iter(self._devices)))
        state.update(changes)
        self._devices[topic] = state
        payload = json.dumps(state, separators=(",", ":")).encode()
        self._retain(topic, payload, self.config.qos)

    # -- Home Assistant discovery (loop) -------------------------------------------------------

    def _take_roster(self, roster: Roster) -> None:
        self._names = {level(a.uid): a.name or a.uid for a in roster.athletes()}
        self._roster_levels = set(self._names)

    def set_roster(self, roster: Roster) -> None:
        """SIGHUP: athletes gone from the roster lose their sensors; renamed ones are renamed."""
        before = dict(self._names)
        self._take_roster(roster)
        if not self.config.discovery:
            return
        for uid_level in set(before) - self._roster_levels:
            self._forget(uid_level)
        for topic, (uid, t) in list(self._announced.items()):
            uid_level = level(uid)
            if uid_level in self._names and before.get(uid_level) != self._names[uid_level]:
                self._publish_config(topic, uid, t)

    def _announce(self, uid: str, t: DataType) -> None:
        if t not in SENSORS:
            return  # a data type Home Assistant has no sensor for yet: samples still flow
        topic = self.topics.discovery(uid, t)
        if topic not in self._announced:
            self._publish_config(topic, uid, t)

    def _publish_config(self, topic: str, uid: str, t: DataType) -> None:
        uid_level = level(uid)
        payload = discovery_payload(
            self.topics,
            uid,
            self._names.get(uid_level, uid),
            t,
            qos=self.config.qos,
            expire_after_s=self.config.discovery_expire_after_s,
        )
        self._announced[topic] = (uid, t)
        self._configs.setdefault(uid_level, set()).add(topic)
        self._retain(topic, payload, 1)

    def _forget(self, uid_level: str) -> None:
        self._sample_topics.clear()  # so the athlete's next sample announces its sensors again
        for topic in self._configs.pop(uid_level, set()):
            self._announced.pop(topic, None)
            self._retain(topic, b"", 1)

    def _discovered(self, topic: str, payload: bytes) -> None:
        """A retained config of ours at the broker: left by an earlier run, or our own echo.
        An athlete neither in the roster nor seen in this run has gone: remove its sensors."""
        if not payload or topic in self._announced or self._closed:
            return
        try:
            state_topic = json.loads(payload)["state_topic"]
            uid_level = self.topics.uid_level_of(state_topic)
        except (ValueError, KeyError, TypeError):
            uid_level = None
        if uid_level is not None and uid_level in self._roster_levels:
            self._configs.setdefault(uid_level, set()).add(topic)
            return
        log.info("MQTT discovery: removing %s (athlete no longer known)", topic)
        self._retain(topic, b"", 1)

    # -- running -------------------------------------------------------------------------------

    def _start(self) -> None:
        if self._started:
            return
        self._started = True
        self._loop = asyncio.get_running_loop()
        self._driver.start()

    async def run(self) -> None:
        self._start()
        while True:
            self._handle_batch(await self.subscription.get_batch(BATCH_LIMIT))

    async def wait_connected(self) -> None:
        await self._up.wait()

    async def wait_for_link(self, condition: Callable[[MqttSink], bool]) -> None:
        """Until `condition(self)` holds, checked at every connection event (tests, health)."""
        if condition(self):
            return
        future = asyncio.get_running_loop().create_future()
        self._link_waiters.append((condition, future))
        try:
            await future
        finally:
            self._link_waiters = [w for w in self._link_waiters if w[1] is not future]

    def _wake_link_waiters(self) -> None:
        for condition, future in self._link_waiters:
            if not future.done() and condition(self):
                future.set_result(None)

    async def wait_idle(self) -> None:
        """Until everything handed to this sink is written (QoS 0) or acknowledged (QoS 1/2)."""
        await self._idle.wait()

    def stats(self) -> dict[str, Any]:
        return {
            "link": str(self.link),
            "queued": len(self._queue) + len(self._retained),
            "in_flight": self._client.in_flight(),
            "published": self.published,
            "dropped": self.dropped,
            "rejected": self.rejected,
            "lost": self.lost,
        }

    async def close(self) -> None:
        """Send what is queued (within a budget), publish "offline", and disconnect cleanly;
        a clean disconnect suppresses the will, so "offline" is published by hand."""
        if self._closed:
            return
        self._handle_batch(self.subscription.get_nowait())
        if not self._started:
            self._closed = True
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + CLOSE_BUDGET_S
        if self._connected:
            self._pump()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), max(0.0, deadline - loop.time()))
            # "offline" last, so no sample follows it
            self._retain(self.topics.status, OFFLINE, 1)
            self._pump()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), max(0.1, deadline - loop.time()))
        self._closed = True
        unsent = len(self._queue) + self._client.in_flight()
        self._client.disconnect()
        self._client.loop_write()  # the DISCONNECT now; paho closes the socket after it
        await self._driver.stop()
        self._connected = False
        self.link = Link.CLOSED
        self._wake_link_waiters()
        log.info(
            "MQTT closed: %d published, %d dropped%s",
            self.published,
            self.dropped,
            f", {unsent} unsent" if unsent else "",
        )
