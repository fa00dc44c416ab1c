"""BLE source (bleak): hear every fitness device in the room over every adapter.

One scanner per adapter runs for the life of the source. A device is taken if the roster lists
its address, or (auto mode) if it advertises a fitness service. A strap whose adverts carry its
heart rate (Polar manufacturer data) is read from the adverts alone; everything else gets a
connection, on the adapter that hears it best among those with a free slot. Connects on one
adapter are serialized because BlueZ answers InProgress to a second one. Every notification,
read and HR advert becomes a Frame; nothing is decoded here.

Notifications come over AcquireNotify where BlueZ offers it: a socket per characteristic, one
datagram per notification, read straight from the event loop. The alternative, StartNotify,
sends each as a D-Bus PropertiesChanged signal through dbus-daemon, which dbus-fast unmarshals
and bleak routes (about 3x the CPU per notification, docs/benchmarks.md). A device that refuses
AcquireNotify, or whose acquired link delivers nothing (some peripherals notify before the CCC
write is answered, and BlueZ then drops the fd), gets StartNotify from then on.

Failure handling, because this is what goes wrong in gyms:
- a failed connect backs off per device; a device that stopped advertising is not tried again
  until it is heard, so a returning strap reconnects on its first advert;
- a dropped device frees its slot at once;
- an adapter that hears nothing while devices are expected, or that fails connects in a row, is
  power-cycled over D-Bus (sources/bluez.py) and its devices reconnected;
- no BlueZ or no adapter: a warning, and the source keeps retrying; the daemon runs on.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from bleak import BleakClient, BleakScanner
from bleak.backends.characteristic import BleakGATTCharacteristic
from bleak.backends.device import BLEDevice
from bleak.backends.scanner import AdvertisementData
from bleak.exc import BleakError
from dbus_fast import DBusError

from gatewayd.clock import Clock, SystemClock
from gatewayd.config import BleConfig, Config
from gatewayd.decode import DECODERS
from gatewayd.errors import DecodeError, SourceUnavailable
from gatewayd.model import Frame, Measure
from gatewayd.pipeline import FrameQueue
from gatewayd.sources.ble_batch import NotifyBatcher
from gatewayd.sources.bluez import AdapterInfo, BluezAdapters

log = logging.getLogger(__name__)

SOURCE = "ble"
FITNESS_SERVICES: dict[str, str] = {
    "180d": "heart-rate",
    "1816": "cycling-speed-cadence",
    "1818": "cycling-power",
    "1814": "running-speed-cadence",
    "1826": "fitness-machine",
}
NOTIFY_KINDS = frozenset({"2a37", "2a63", "2a5b", "2a53", "2ad2", "2acd", "2ad1"})
BODY_SENSOR_LOCATION = "2a38"
BATTERY_LEVEL = "2a19"
POLAR = 0x006B
ADVERT_KIND = "mfr:006b"
_BASE_UUID_TAIL = "-0000-1000-8000-00805f9b34fb"
# exceptions bleak, dbus-fast and the kernel raise for radio trouble; anything else is a bug
_RADIO_ERRORS = (BleakError, DBusError, TimeoutError, EOFError, OSError, AssertionError)


async def _disconnect(client: BleakClient) -> None:
    with contextlib.suppress(*_RADIO_ERRORS):
        async with asyncio.timeout(5):
            await client.disconnect()


async def _wait(event: asyncio.Event, seconds: float) -> bool:
    """Wait for `event` at most `seconds`; True if it was set.

    asyncio.timeout rather than wait_for: on Python 3.11 wait_for can swallow a cancellation
    that arrives as the event fires, and a source that cannot be cancelled hangs shutdown.
    """
    try:
        async with asyncio.timeout(seconds):
            await event.wait()
    except TimeoutError:
        return False
    return True


def short_uuid(uuid: str) -> str | None:
    """'0000180d-0000-1000-8000-00805f9b34fb' -> '180d'; None for a vendor 128-bit UUID."""
    uuid = uuid.lower()
    if len(uuid) == 36 and uuid.startswith("0000") and uuid.endswith(_BASE_UUID_TAIL):
        return uuid[4:8]
    if len(uuid) == 4:
        return uuid
    return None


def advert_carries_hr(payload: bytes) -> bool:
    """Does this Polar manufacturer data (bytes after the company id) broadcast a heart rate?

    The decoder decides when there is one; until then, the first block's layout from Polar's SDK:
    a block whose first byte has bit 6 clear is [flags, kHz, fast HR, slow HR].
    """
    decoder = DECODERS.get(ADVERT_KIND)
    if decoder is not None:
        try:
            return any(r.measure == Measure.HEART_RATE for r in decoder(payload))
        except DecodeError:
            return False
    return len(payload) >= 3 and not payload[0] & 0x40


@dataclass(frozen=True, slots=True)
class BleTiming:
    """Every delay the source uses, so tests can shrink them instead of sleeping through them."""

    device_timeout_s: float = 15.0  # unheard this long: out of range, not tried
    settle_s: float = 1.0  # a new device is listened to this long before it is connected
    absent_s: float = 3.0  # heard again after this much silence: it returned, retry at once
    connect_timeout_s: float = 20.0
    backoff_min_s: float = 1.0
    backoff_max_s: float = 60.0
    stale_adapter_s: float = 90.0
    adapter_fail_limit: int = 5
    battery_interval_s: float = 600.0
    bluez_retry_s: float = 10.0
    # how often the watchdog looks (stale adapters, scanners to restart) and the longest the
    # scheduler sleeps; backoffs and settling end on time, connects and drops wake it at once.
    # Each wake-up of an idle process costs ~0.3 ms here: 5 s, not 1 s (docs/benchmarks.md).
    tick_s: float = 5.0
    power_off_s: float = 1.0  # between Powered off and on
    forget_s: float = 3600.0  # an unlisted device unheard this long is forgotten
    advert_repeat_s: float = 1.0  # an unchanged HR advert is passed on at most this often
    min_rssi: int = -100

    @classmethod
    def from_config(cls, config: BleConfig) -> BleTiming:
        return cls(
            device_timeout_s=config.device_timeout_s,
            connect_timeout_s=config.connect_timeout_s,
            backoff_max_s=config.reconnect_max_s,
            stale_adapter_s=config.stale_adapter_s,
            adapter_fail_limit=config.adapter_fail_limit,
            battery_interval_s=config.battery_interval_s,
            min_rssi=config.min_rssi,
        )


@dataclass
class BleStats:
    """Counters for logs and metrics."""

    adverts: int = 0
    advert_frames: int = 0
    notifications: int = 0
    acquired: int = 0  # subscriptions asked over AcquireNotify (a socket, not D-Bus signals)
    connects: int = 0
    connect_failures: int = 0
    drops: int = 0
    recoveries: int = 0
    recoveries_by_adapter: dict[str, int] = field(default_factory=dict)


@dataclass(slots=True)
class _Heard:
    rssi: int
    seen: float
    device: BLEDevice


@dataclass(eq=False)
class _Device:
    address: str
    listed: bool  # in the roster
    force_connect: bool  # the roster asks for a connection even if adverts carry HR
    first_seen: float
    name: str = ""
    profiles: set[str] = field(default_factory=set)
    advert_hr: bool = False
    heard: dict[str, _Heard] = field(default_factory=dict)
    last_heard: float = -math.inf
    link: asyncio.Task[None] | None = None
    adapter: str | None = None  # where its link is
    connected: bool = False
    next_attempt: float = 0.0
    backoff: float = 0.0
    need_advert_after: float = -math.inf  # an attempt waits for an advert newer than this
    useless: bool = False  # connected once and had nothing we read
    battery: int | None = None
    location_read: bool = False
    last_advert: bytes = b""
    last_advert_at: float = -math.inf
    signatures: dict[str, tuple[object, ...]] = field(default_factory=dict)  # adapter -> last
    notes: int = 0  # notifications ever heard from it
    start_notify_only: bool = False  # AcquireNotify failed it once: D-Bus signals from now on
    acquired: bool = False  # this connection's notifications come over AcquireNotify

    @property
    def wants_connection(self) -> bool:
        return not self.useless and (self.force_connect or not self.advert_hr)


@dataclass(eq=False)
class _Adapter:
    name: str
    slots: int
    last_advert: float
    members: set[str] = field(default_factory=set)  # addresses connecting or connected here
    connect_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    scanner: BleakScanner | None = None
    starting: bool = False
    powered: bool = True
    recovering: bool = False
    fail_streak: int = 0
    fruitless: int = 0  # recoveries in a row after which nothing was heard

    @property
    def usable(self) -> bool:
        return self.powered and not self.recovering and self.scanner is not None

    @property
    def free(self) -> int:
        return self.slots - len(self.members)


class BleSource:
    """The BLE source: `await run(frames)` until cancelled; never raises for radio trouble."""

    name = SOURCE

    def __init__(
        self,
        config: BleConfig,
        roster: Mapping[str, bool] | None = None,
        *,
        timing: BleTiming | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.config = config
        self.timing = timing or BleTiming.from_config(config)
        self.roster = {address.upper(): connect for address, connect in (roster or {}).items()}
        self.stats = BleStats()
        clock = clock or SystemClock()
        self._clock = clock.mono
        self._wall = clock.wall
        self._adapters: dict[str, _Adapter] = {}
        self._devices: dict[str, _Device] = {}
        self._frames: FrameQueue | None = None
        self._bluez: BluezAdapters | None = None
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self.batcher = NotifyBatcher(
            config.notify_window_s, self._wall, lambda: self.stats.notifications
        )
        self.unavailable: str | None = None  # why BLE cannot run right now, for status output
        self.changed = asyncio.Event()  # set on every connect, drop and recovery; tests wait on it
        self.watched = asyncio.Event()  # set after every watchdog pass

    @classmethod
    def from_config(cls, config: Config, clock: Clock | None = None) -> BleSource:
        roster = {
            device.id: device.connect
            for athlete in config.athletes
            for device in athlete.devices
            if device.source == SOURCE
        }
        return cls(config.sources.ble, roster, clock=clock)

    # ------------------------------------------------------------------ public view

    def slots_in_use(self) -> dict[str, int]:
        return {name: len(ad.members) for name, ad in self._adapters.items()}

    def connected(self) -> dict[str, str]:
        """address -> adapter, for devices with a live connection."""
        return {d.address: d.adapter or "" for d in self._devices.values() if d.connected}

    def status(self) -> dict[str, Any]:
        """For health output: adapters, slots, recoveries, devices, counters."""
        return {
            "unavailable": self.unavailable,
            "adapters": {
                name: {
                    "slots": ad.slots,
                    "in_use": len(ad.members),
                    "scanning": ad.scanner is not None,
                    "recoveries": self.stats.recoveries_by_adapter.get(name, 0),
                }
                for name, ad in self._adapters.items()
            },
            "connected": len(self.connected()),
            "from_adverts": len(self.advert_devices()),
            "waiting": sum(
                1 for d in self._devices.values() if d.wants_connection and not d.connected
            ),
            "notifications": self.stats.notifications,
            "connects": self.stats.connects,
            "connect_failures": self.stats.connect_failures,
            "drops": self.stats.drops,
            "recoveries": self.stats.recoveries,
        }

    def advert_devices(self) -> list[str]:
        return [d.address for d in self._devices.values() if d.advert_hr and not d.wants_connection]

    # ------------------------------------------------------------------ run

    async def run(self, frames: FrameQueue) -> None:
        self._frames = frames
        frames.add_drain(self.batcher.flush)
        warned = False
        try:
            while True:
                bluez = BluezAdapters(self._adapter_seen, self._adapter_gone)
                try:
                    await bluez.connect()
                except SourceUnavailable as exc:
                    level = logging.DEBUG if warned else logging.WARNING
                    log.log(
                        level,
                        "BLE unavailable: %s; retrying every %g s, the rest of the "
                        "gateway keeps running",
                        exc,
                        self.timing.bluez_retry_s,
                    )
                    warned = True
                    self.unavailable = str(exc)
                    self._changed()
                    await asyncio.sleep(self.timing.bluez_retry_s)
                    continue
                warned = False
                self.unavailable = None
                self._bluez = bluez
                if not bluez.adapters:
                    log.warning(
                        "BLE: BlueZ reports no Bluetooth adapter; waiting for one to be plugged in"
                    )
                workers = [asyncio.create_task(self._housekeep_forever(), name="ble-housekeeping")]
                try:
                    await bluez.wait_closed()
                    log.warning("BLE: lost the D-Bus connection to BlueZ; reconnecting")
                finally:
                    for worker in workers:
                        worker.cancel()
                    await asyncio.gather(*workers, return_exceptions=True)
                    bluez.close()
                    for name in list(self._adapters):
                        self._adapter_gone(name, quiet=True)
                    self._bluez = None
                await asyncio.sleep(self.timing.bluez_retry_s)
        finally:
            frames.remove_drain(self.batcher.flush)
            await self._shutdown()

    async def _shutdown(self) -> None:
        self.batcher.close()
        links = [d.link for d in self._devices.values() if d.link is not None]
        for task in links:
            task.cancel()
        scanners = [ad.scanner for ad in self._adapters.values() if ad.scanner is not None]
        for ad in self._adapters.values():
            ad.scanner = None
        for task in list(self._tasks):
            # scanners being stopped may finish: BlueZ should not keep discovering for nobody
            if not task.get_name().startswith("ble-unscan-"):
                task.cancel()
        pending = [*links, *self._tasks]
        if pending:
            # the daemon's whole shutdown budget is a few seconds; links disconnect in parallel
            await asyncio.wait(pending, timeout=2)
        for scanner in scanners:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2):
                    await scanner.stop()
        if self._bluez is not None:
            self._bluez.close()

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _changed(self) -> None:
        self.changed.set()

    # ------------------------------------------------------------------ adapters

    def _adapter_seen(self, info: AdapterInfo) -> None:
        """BlueZ has this adapter (new, or its Powered changed)."""
        ad = self._adapters.get(info.name)
        if ad is None:
            if not info.central:
                log.info("BLE: %s cannot act as an LE central; not using it", info.name)
                return
            slots = self.config.adapters.get(info.name, self.config.slots_per_adapter)
            ad = _Adapter(info.name, slots, last_advert=self._clock())
            self._adapters[info.name] = ad
            log.info(
                "BLE: adapter %s (%s) with %d connection slots", info.name, info.address, slots
            )
        if ad.recovering:
            return
        ad.powered = info.powered
        if not info.powered:
            log.warning(
                "BLE: adapter %s is powered off; not using it until it is powered on", info.name
            )
            ad.scanner = None
        elif ad.scanner is None and not ad.starting:
            self._spawn(self._start_scanner(ad), f"ble-scan-{ad.name}")

    def _adapter_gone(self, name: str, *, quiet: bool = False) -> None:
        ad = self._adapters.pop(name, None)
        if ad is None:
            return
        log.log(
            logging.DEBUG if quiet else logging.WARNING,
            "BLE: adapter %s went away; its devices move to other adapters",
            name,
        )
        scanner, ad.scanner = ad.scanner, None
        if scanner is not None:
            self._spawn(self._stop_scanner(scanner), f"ble-unscan-{name}")
        for dev in self._devices.values():
            dev.heard.pop(name, None)
            if dev.adapter == name and dev.link is not None:
                dev.link.cancel()
        self._wake.set()
        self._changed()

    async def _start_scanner(self, ad: _Adapter) -> None:
        ad.starting = True
        try:
            scanner = BleakScanner(
                lambda device, adv: self._on_advert(ad.name, device, adv),
                bluez={"adapter": ad.name},
            )
            async with asyncio.timeout(self.timing.connect_timeout_s):
                await scanner.start()
        except _RADIO_ERRORS as exc:
            log.warning("BLE: cannot scan on %s (%s); retrying", ad.name, exc or type(exc).__name__)
            return
        finally:
            ad.starting = False
        if self._adapters.get(ad.name) is not ad or not ad.powered:
            await self._stop_scanner(scanner)
            return
        ad.scanner = scanner
        ad.last_advert = self._clock()
        log.info("BLE: scanning on %s", ad.name)
        self._wake.set()

    @staticmethod
    async def _stop_scanner(scanner: BleakScanner) -> None:
        with contextlib.suppress(*_RADIO_ERRORS):
            async with asyncio.timeout(5):
                await scanner.stop()

    # ------------------------------------------------------------------ adverts

    def _on_advert(self, adapter: str, device: BLEDevice, adv: AdvertisementData) -> None:
        ad = self._adapters.get(adapter)
        if ad is None or ad.scanner is None:
            return
        now = self._clock()
        address = device.address.upper()
        dev = self._devices.get(address)
        mfr = adv.manufacturer_data.get(POLAR)
        signature = (adv.rssi, mfr, tuple(adv.service_data.items()))
        if dev is not None:
            # bleak reports every Device1 property change; one that leaves RSSI and data as
            # they were (Connected, ServicesResolved ...) is our own doing, not an advertisement
            if dev.signatures.get(adapter) == signature:
                return
            dev.signatures[adapter] = signature
        self.stats.adverts += 1
        ad.last_advert = now
        ad.fruitless = 0
        if dev is None:
            dev = self._admit(address, adv, mfr, now)
            if dev is None:
                return
            dev.signatures[adapter] = signature
        if adv.rssi < self.timing.min_rssi and not dev.listed:
            return
        if now - dev.last_heard > self.timing.absent_s:
            # back after a silence (out of range, or connected and quiet): no stale backoff
            dev.backoff = self.timing.backoff_min_s
            dev.next_attempt = 0.0
        dev.heard[adapter] = _Heard(adv.rssi, now, device)
        dev.last_heard = now
        if adv.local_name:
            dev.name = adv.local_name
        for uuid in adv.service_uuids:
            profile = FITNESS_SERVICES.get(short_uuid(uuid) or "")
            if profile is not None:
                dev.profiles.add(profile)
        if mfr is not None:
            if not dev.advert_hr and advert_carries_hr(mfr):
                dev.advert_hr = True
                dev.profiles.add("heart-rate-advert")
                if not dev.wants_connection:
                    log.info(
                        "BLE: %s broadcasts its heart rate; reading it from adverts, no connection",
                        address,
                    )
            if dev.advert_hr and not dev.connected:
                self._advert_frame(dev, adapter, mfr, adv.rssi, now)
        if dev.wants_connection and dev.link is None:
            self._wake.set()

    def _admit(
        self, address: str, adv: AdvertisementData, mfr: bytes | None, now: float
    ) -> _Device | None:
        listed = address in self.roster
        if not listed:
            if not self.config.auto or adv.rssi < self.timing.min_rssi:
                return None
            fitness = any(FITNESS_SERVICES.get(short_uuid(u) or "") for u in adv.service_uuids)
            if not fitness and not (mfr is not None and advert_carries_hr(mfr)):
                return None
        dev = _Device(
            address,
            listed,
            self.roster.get(address, False),
            first_seen=now,
            backoff=self.timing.backoff_min_s,
        )
        self._devices[address] = dev
        log.info("BLE: found %s %r rssi %d", address, adv.local_name or "", adv.rssi)
        return dev

    def _advert_frame(
        self, dev: _Device, adapter: str, payload: bytes, rssi: int, now: float
    ) -> None:
        # BlueZ re-reports unchanged data with every RSSI change; Polar's frame counter changes
        # with new data, so identical bytes are a repeat unless a second has passed
        if payload == dev.last_advert and now - dev.last_advert_at < self.timing.advert_repeat_s:
            return
        dev.last_advert = payload
        dev.last_advert_at = now
        self.stats.advert_frames += 1
        self._put(
            Frame(
                SOURCE, adapter, dev.address, ADVERT_KIND, bytes(payload), now, self._wall(), rssi
            )
        )

    def _put(self, frame: Frame) -> None:
        if self._frames is not None:
            self._frames.put_quiet(frame)

    # ------------------------------------------------------------------ scheduling

    async def _housekeep_forever(self) -> None:
        """Scheduling and the watchdog on one timer: an idle gateway wakes once per tick."""
        loop = asyncio.get_running_loop()
        next_watch = loop.time() + self.timing.tick_s
        while True:
            self._wake.clear()
            now = loop.time()
            if now >= next_watch:
                self._watch()
                self.watched.set()
                next_watch = now + self.timing.tick_s
            delay = min(self._schedule(), next_watch - now)
            await _wait(self._wake, max(delay, 0.01))

    def _schedule(self) -> float:
        """Start connections where slots allow; return how long until a backoff ends."""
        now = self._clock()
        horizon = self.timing.device_timeout_s
        next_due = self.timing.tick_s
        waiting = [
            d
            for d in self._devices.values()
            if d.wants_connection and d.link is None and d.last_heard > d.need_advert_after
        ]
        waiting.sort(key=lambda d: d.first_seen)
        for dev in waiting:
            if dev.first_seen + self.timing.settle_s > now:
                # give every adapter a chance to hear a new device before picking the best one
                next_due = min(next_due, dev.first_seen + self.timing.settle_s - now)
                continue
            if dev.next_attempt > now:
                next_due = min(next_due, dev.next_attempt - now)
                continue
            best: tuple[_Adapter, _Heard] | None = None
            for name, heard in dev.heard.items():
                ad = self._adapters.get(name)
                if ad is None or not ad.usable or ad.free <= 0 or now - heard.seen > horizon:
                    continue
                if best is None or heard.rssi > best[1].rssi:
                    best = (ad, heard)
            if best is None:
                continue
            ad, heard = best
            ad.members.add(dev.address)
            dev.adapter = ad.name
            dev.link = asyncio.create_task(
                self._link(dev, ad, heard.device), name=f"ble-{dev.address}"
            )
        return max(next_due, 0.01)

    async def _link(self, dev: _Device, ad: _Adapter, device: BLEDevice) -> None:
        """One connection session: connect, subscribe, read, hold until it drops."""
        started = self._clock()
        dropped = asyncio.Event()
        client: BleakClient | None = None
        reason = ""
        notes_before = dev.notes
        dev.acquired = False
        try:
            async with ad.connect_lock:
                if not ad.usable or self._adapters.get(ad.name) is not ad:
                    return
                client = BleakClient(
                    device, lambda _c: dropped.set(), timeout=self.timing.connect_timeout_s
                )
                await client.connect()
            dev.connected = True
            dev.backoff = self.timing.backoff_min_s
            ad.fail_streak = 0
            self.stats.connects += 1
            log.info(
                "BLE: connected %s %r on %s (%d of %d slots connected)",
                dev.address,
                dev.name,
                ad.name,
                sum(1 for a in ad.members if self._devices[a].connected),
                ad.slots,
            )
            self._changed()
            await self._serve(client, dev, ad, dropped)
            reason = "disconnected"
        except asyncio.CancelledError:
            reason = "stopped"
            raise
        except _RADIO_ERRORS as exc:
            reason = str(exc) or type(exc).__name__
            if not dev.connected:
                self._connect_failed(dev, ad, started, reason)
        except Exception:
            # a bug must not take the other devices down with it: log it, treat it as a drop
            reason = "internal error"
            log.exception("BLE: %s on %s failed unexpectedly", dev.address, ad.name)
            if not dev.connected:
                self._connect_failed(dev, ad, started, reason)
        finally:
            if client is not None and client.is_connected:
                # shielded: a link cancelled by shutdown or recovery still releases the device
                await asyncio.shield(_disconnect(client))
            was_connected = dev.connected
            if was_connected and dev.acquired and dev.notes == notes_before and reason != "stopped":
                self._acquire_failed(dev, "no notification came over AcquireNotify")
            dev.connected = False
            dev.link = None
            ad.members.discard(dev.address)
            if was_connected:
                self.stats.drops += 1
                # a strap that dropped comes back by advertising; wait for that advert
                dev.need_advert_after = self._clock()
                dev.next_attempt = 0.0
                log.log(
                    logging.DEBUG if reason == "stopped" else logging.INFO,
                    "BLE: %s lost on %s (%s); reconnecting when it is heard again",
                    dev.address,
                    ad.name,
                    reason,
                )
            self._wake.set()
            self._changed()

    def _connect_failed(self, dev: _Device, ad: _Adapter, started: float, reason: str) -> None:
        now = self._clock()
        self.stats.connect_failures += 1
        # the next try waits for the backoff and for an advert heard after this one began, so a
        # strap that left is not paged in vain, and one that returns is tried on its first advert
        dev.need_advert_after = started
        dev.next_attempt = now + dev.backoff
        dev.backoff = min(dev.backoff * 2, self.timing.backoff_max_s)
        ad.fail_streak += 1
        log.info(
            "BLE: connect %s on %s failed (%s); next try in %.1f s once it is heard",
            dev.address,
            ad.name,
            reason,
            dev.next_attempt - now,
        )
        if ad.fail_streak >= self.timing.adapter_fail_limit and not ad.recovering:
            self._spawn(
                self._recover(ad, f"{ad.fail_streak} connects failed in a row"),
                f"ble-recover-{ad.name}",
            )

    async def _serve(
        self, client: BleakClient, dev: _Device, ad: _Adapter, dropped: asyncio.Event
    ) -> None:
        chars: dict[str, BleakGATTCharacteristic] = {}
        for char in client.services.characteristics.values():
            short = short_uuid(char.uuid)
            if short is not None:
                chars.setdefault(short, char)
        subscribed = 0
        for kind, char in chars.items():
            if kind in NOTIFY_KINDS and {"notify", "indicate"} & set(char.properties):
                await self._subscribe(client, dev, char, self._notifier(dev, ad.name, kind))
                subscribed += 1
        if not subscribed:
            dev.useless = True
            log.warning(
                "BLE: %s has none of the characteristics we read; leaving it alone", dev.address
            )
            return
        location = chars.get(BODY_SENSOR_LOCATION)
        if location is not None and not dev.location_read:
            await self._read(client, dev, ad.name, location, BODY_SENSOR_LOCATION)
            dev.location_read = True
        battery = chars.get(BATTERY_LEVEL)
        while True:
            if battery is not None:
                value = await self._read(client, dev, ad.name, battery, BATTERY_LEVEL)
                if value:
                    dev.battery = value[0]
            if await _wait(dropped, self.timing.battery_interval_s):
                return

    async def _subscribe(
        self,
        client: BleakClient,
        dev: _Device,
        char: BleakGATTCharacteristic,
        callback: Callable[[BleakGATTCharacteristic, bytearray], None],
    ) -> None:
        if self.config.acquire_notify and not dev.start_notify_only:
            readers = self.batcher.readers()
            try:
                # bleak asks AcquireNotify where BlueZ lists NotifyAcquired, else StartNotify
                await client.start_notify(char, callback, bluez={"use_start_notify": False})
            except (BleakError, DBusError) as exc:
                if not client.is_connected:
                    raise
                self._acquire_failed(dev, f"AcquireNotify refused: {exc}")
            else:
                self.stats.acquired += 1
                dev.acquired = True
                # the socket bleak now reads is a new reader on the loop; others may have
                # started meanwhile, so where bleak's backend lists its sockets, only those
                new = self.batcher.readers() - readers
                owned = getattr(getattr(client, "_backend", None), "_notification_fds", None)
                if isinstance(owned, dict):
                    new &= set(owned.values())
                self.batcher.adopt(new)
                return
        await client.start_notify(char, callback)

    def _acquire_failed(self, dev: _Device, why: str) -> None:
        dev.start_notify_only = True
        log.info(
            "BLE: %s: %s; D-Bus notifications (StartNotify) for it from now on", dev.address, why
        )

    async def _read(
        self,
        client: BleakClient,
        dev: _Device,
        adapter: str,
        char: BleakGATTCharacteristic,
        kind: str,
    ) -> bytes:
        value = bytes(await client.read_gatt_char(char))
        self._put(
            Frame(
                SOURCE,
                adapter,
                dev.address,
                kind,
                value,
                self._clock(),
                self._wall(),
                self._rssi(dev, adapter),
            )
        )
        return value

    def _notifier(
        self, dev: _Device, adapter: str, kind: str
    ) -> Callable[[BleakGATTCharacteristic, bytearray], None]:
        address = dev.address
        heard = dev.heard
        clock = self._clock
        wall = self._wall
        stats = self.stats
        assert self._frames is not None  # run() binds it before any link
        put = self._frames.put_quiet

        def on_notify(_char: BleakGATTCharacteristic, data: bytearray) -> None:
            stats.notifications += 1
            dev.notes += 1
            last = heard.get(adapter)
            put(
                Frame(
                    SOURCE,
                    adapter,
                    address,
                    kind,
                    bytes(data),
                    clock(),
                    wall(),
                    None if last is None else last.rssi,
                )
            )

        return on_notify

    @staticmethod
    def _rssi(dev: _Device, adapter: str) -> int | None:
        heard = dev.heard.get(adapter)
        return heard.rssi if heard is not None else None

    # ------------------------------------------------------------------ recovery

    def _watch(self) -> None:
        now = self._clock()
        for address, dev in list(self._devices.items()):
            if dev.link is None and not dev.listed and now - dev.last_heard > self.timing.forget_s:
                # auto mode meets passers-by for days; forget the ones long gone
                del self._devices[address]
        for ad in list(self._adapters.values()):
            if ad.recovering or not ad.powered:
                continue
            if ad.scanner is None:
                if not ad.starting:
                    self._spawn(self._start_scanner(ad), f"ble-scan-{ad.name}")
                continue
            # each fruitless recovery doubles the wait, so an empty gym at night is not
            # power-cycled every 90 s
            stale_after = self.timing.stale_adapter_s * (2 ** min(ad.fruitless, 6))
            silent = now - ad.last_advert
            if silent > stale_after and self._expects_adverts(ad):
                ad.fruitless += 1
                self._spawn(
                    self._recover(ad, f"no advertisements for {silent:.0f} s"),
                    f"ble-recover-{ad.name}",
                )

    def _expects_adverts(self, ad: _Adapter) -> bool:
        """Is some device we want, and not connected, one this adapter heard or should hear?"""
        unheard_roster = any(address not in self._devices for address in self.roster)
        if unheard_roster:
            return True
        return any(
            not d.connected and not d.useless and ad.name in d.heard for d in self._devices.values()
        )

    async def _recover(self, ad: _Adapter, reason: str) -> None:
        bluez = self._bluez
        if ad.recovering or bluez is None:
            return
        ad.recovering = True
        self.stats.recoveries += 1
        count = self.stats.recoveries_by_adapter.get(ad.name, 0) + 1
        self.stats.recoveries_by_adapter[ad.name] = count
        log.warning(
            "BLE: adapter %s: %s; power-cycling it (recovery %d of this adapter, %d in all)",
            ad.name,
            reason,
            count,
            self.stats.recoveries,
        )
        self._changed()
        try:
            links = [
                d.link
                for d in self._devices.values()
                if d.adapter == ad.name and d.link is not None
            ]
            for task in links:
                task.cancel()
            if links:
                await asyncio.wait(links, timeout=10)
            scanner, ad.scanner = ad.scanner, None
            if scanner is not None:
                await self._stop_scanner(scanner)
            try:
                async with asyncio.timeout(15):
                    await bluez.power_cycle(ad.name, self.timing.power_off_s)
            except (SourceUnavailable, TimeoutError) as exc:
                log.warning("BLE: power-cycling %s failed: %s", ad.name, exc)
            ad.fail_streak = 0
            ad.powered = True
        finally:
            ad.recovering = False
        if self._adapters.get(ad.name) is ad:
            await self._start_scanner(ad)
        self._changed()


# ---------------------------------------------------------------------- gatewayd scan


@dataclass
class ScanEntry:
    address: str
    name: str
    profiles: list[str]
    rssi: int | None
    adapter: str
    battery: int | None = None
    source: str = SOURCE  # ANT+ entries can share the table and the roster


async def scan(
    seconds: float, *, read_battery: bool = True, connect_timeout_s: float = 10.0
) -> list[ScanEntry]:
    """Listen on every adapter for `seconds`; list fitness devices, strongest first.

    Battery levels are read by connecting briefly, one device at a time per adapter, within
    another `seconds` at most. Raises SourceUnavailable when there is no BlueZ or no adapter.
    """
    bluez = BluezAdapters(lambda _info: None, lambda _name: None)
    await bluez.connect()
    try:
        names = [a.name for a in bluez.adapters.values() if a.powered and a.central]
    finally:
        bluez.close()
    if not names:
        raise SourceUnavailable("no powered Bluetooth adapter (check `bluetoothctl show`)")
    found: dict[str, tuple[ScanEntry, BLEDevice]] = {}

    def seen(adapter: str, device: BLEDevice, adv: AdvertisementData) -> None:
        profiles = [
            p for u in adv.service_uuids if (p := FITNESS_SERVICES.get(short_uuid(u) or ""))
        ]
        mfr = adv.manufacturer_data.get(POLAR)
        if mfr is not None and advert_carries_hr(mfr):
            profiles.append("heart-rate-advert")
        if not profiles:
            return
        address = device.address.upper()
        old = found.get(address)
        if old is None or adv.rssi > (old[0].rssi or -200):
            entry = ScanEntry(
                address,
                adv.local_name or device.name or "",
                sorted(set(profiles)),
                adv.rssi,
                adapter,
            )
            found[address] = (entry, device)

    scanners = []
    for name in names:
        scanner = BleakScanner(functools.partial(seen, name), bluez={"adapter": name})
        try:
            await scanner.start()
        except _RADIO_ERRORS as exc:
            log.warning("cannot scan on %s: %s", name, exc)
            continue
        scanners.append(scanner)
    try:
        await asyncio.sleep(seconds)
    finally:
        for scanner in scanners:
            await BleSource._stop_scanner(scanner)
    if read_battery and found:
        by_adapter: dict[str, list[tuple[ScanEntry, BLEDevice]]] = {}
        for entry, device in found.values():
            by_adapter.setdefault(entry.adapter, []).append((entry, device))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(
                asyncio.gather(
                    *(_read_batteries(items, connect_timeout_s) for items in by_adapter.values())
                ),
                max(seconds, connect_timeout_s),
            )
    return sorted((entry for entry, _ in found.values()), key=lambda e: -(e.rssi or -200))


async def _read_batteries(
    items: Iterable[tuple[ScanEntry, BLEDevice]], per_device_s: float
) -> None:
    for entry, device in items:
        if entry.profiles == ["heart-rate-advert"]:
            continue
        try:
            async with BleakClient(device, timeout=per_device_s) as client:
                for char in client.services.characteristics.values():
                    if short_uuid(char.uuid) == BATTERY_LEVEL:
                        value = await client.read_gatt_char(char)
                        entry.battery = value[0] if value else None
                        break
        except _RADIO_ERRORS as exc:
            log.info("no battery level from %s: %s", entry.address, exc)


def format_scan(entries: list[ScanEntry], seconds: float) -> str:
    """A table of what was heard, then a roster to paste into gatewayd.yaml."""
    if not entries:
        return f"# no fitness devices heard in {seconds:g} s\n"
    lines = [f"# {len(entries)} fitness device(s) heard in {seconds:g} s", "#"]
    lines.append(
        f"# {'ID':17}  {'SOURCE':6}  {'RSSI':>4}  {'BATT':>4}  {'ADAPTER':7}  {'NAME':20}  PROFILES"
    )
    for e in entries:
        battery = f"{e.battery}%" if e.battery is not None else "-"
        rssi = str(e.rssi) if e.rssi is not None else "-"
        name = e.name[:20] or "-"
        lines.append(
            f"# {e.address:17}  {e.source:6}  {rssi:>4}  {battery:>4}  {e.adapter:7}  {name:20}  "
            f"{', '.join(e.profiles)}"
        )
    lines += ["", "athletes:"]
    for index, e in enumerate(entries, 1):
        lines.append(f"  - id: athlete-{index:02d}")
        lines.append(f"    name: {_yaml_text(e.name or e.address)}")
        lines.append("    devices:")
        lines.append(
            f'      - {{source: {e.source}, id: "{e.address}"}}  # {", ".join(e.profiles)}'
        )
    return "\n".join(lines) + "\n"


def _yaml_text(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'
