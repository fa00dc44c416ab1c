"""A fake BlueZ: org.bluez served with dbus-fast on a private dbus-daemon, for bleak's real backend.

It models what the gateway depends on: adapters (Adapter1) with a controller connection limit,
devices (Device1) heard by one or more adapters with their own RSSI, GATT services and
characteristics under BlueZ's object path shapes, adverts (RSSI / ManufacturerData
PropertiesChanged while discovering), notifications (PropertiesChanged Value on characteristics
that were StartNotify'd; with AcquireNotify, one datagram each on a SOCK_SEQPACKET socket whose
other end went to the client as a Unix fd in the method reply, as BlueZ does) and the failures
real stacks show: Connect answering InProgress or
Failed, a connection dropping, a strap walking out of range, a controller that goes deaf until it
is power-cycled.

Control it from Python (the methods of FakeBlueZ) or over D-Bus (org.gatewayd.FakeControl at
/org/gatewayd/fake, for a fake running in another process, e.g. the benchmark).

Run standalone: python -m tests.fakes.fake_bluez --adapters 2 --straps 20 --hz 4
(with DBUS_SYSTEM_BUS_ADDRESS pointing at the bus to serve).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Annotated, Any

from dbus_fast import BusType, DBusError, Message, MessageType, Variant
from dbus_fast.aio import MessageBus
from dbus_fast.annotations import DBusSignature
from dbus_fast.service import PropertyAccess, ServiceInterface, dbus_property, method

Str = Annotated[str, DBusSignature("s")]
Path_ = Annotated[str, DBusSignature("o")]
Bool = Annotated[bool, DBusSignature("b")]
Int16 = Annotated[int, DBusSignature("n")]
Int32 = Annotated[int, DBusSignature("i")]
Bytes = Annotated[bytes, DBusSignature("ay")]
StrList = Annotated[list[str], DBusSignature("as")]
VarDict = Annotated[dict[str, Variant], DBusSignature("a{sv}")]
MfrDict = Annotated[dict[int, Variant], DBusSignature("a{qv}")]

BASE_UUID = "-0000-1000-8000-00805f9b34fb"
IN_PROGRESS = "org.bluez.Error.InProgress"
FAILED = "org.bluez.Error.Failed"
NOT_READY = "org.bluez.Error.NotReady"
NOT_PERMITTED = "org.bluez.Error.NotPermitted"
GATT_CHAR = "org.bluez.GattCharacteristic1"
ATT_MTU = 23  # what AcquireNotify answers beside the fd (the LE default)


def uuid16(short: str) -> str:
    return f"0000{short}{BASE_UUID}"


# --------------------------------------------------------------------------- the world model


@dataclass
class CharSpec:
    uuid: str  # short, e.g. "2a37"
    flags: list[str]
    value: bytes = b""


@dataclass
class ServiceSpec:
    uuid: str
    chars: list[CharSpec]


def heart_rate_services(battery: int = 87, location: int = 1) -> list[ServiceSpec]:
    return [
        ServiceSpec(
            "180d",
            [
                CharSpec("2a37", ["notify"], bytes([0x00, 60])),
                CharSpec("2a38", ["read"], bytes([location])),
            ],
        ),
        ServiceSpec("180f", [CharSpec("2a19", ["read", "notify"], bytes([battery]))]),
    ]


def power_services(battery: int = 64) -> list[ServiceSpec]:
    return [
        ServiceSpec(
            "1818",
            [
                CharSpec("2a63", ["notify"], bytes([0, 0, 0, 0])),
                CharSpec("2a65", ["read"], bytes([0, 0, 0, 0])),
            ],
        ),
        ServiceSpec("180f", [CharSpec("2a19", ["read"], bytes([battery]))]),
    ]


def polar_advert(hr: int, counter: int) -> bytes:
    """Polar's HR broadcast block: flags (battery, contact, counter, broadcast), kHz, fast, slow."""
    flags = 0x01 | 0x02 | ((counter & 0x07) << 2) | 0x20
    return bytes([flags, 0x1B, hr & 0xFF, hr & 0xFF])


@dataclass
class FakeDeviceSpec:
    address: str
    name: str
    services: list[ServiceSpec]
    advertised_uuids: list[str]  # short uuids in the advert
    hear: dict[str, int]  # adapter name -> RSSI
    polar: bool = False  # broadcasts HR in manufacturer data 0x006B
    hz: float = 4.0  # notification rate while connected and notifying
    hr: int = 60
    watts: int = 150


@dataclass
class Stats:
    """What the tests assert on."""

    connect_calls: int = 0
    connects_ok: int = 0
    in_progress_answers: int = 0  # Connect while another Connect on the adapter was pending
    over_limit: int = 0  # Connect refused because the controller was full
    max_connected: dict[str, int] = field(default_factory=dict)
    power_offs: dict[str, int] = field(default_factory=dict)
    notifications: int = 0
    acquired: int = 0  # AcquireNotify calls answered with an fd
    fd_notifications: int = 0  # notifications written to an acquired fd (not D-Bus signals)
    ever_connected: set[str] = field(default_factory=set)


# --------------------------------------------------------------------------- D-Bus objects


class AdapterIface(ServiceInterface):
    def __init__(self, fake: FakeBlueZ, adapter: FakeAdapter) -> None:
        super().__init__("org.bluez.Adapter1")
        self._fake = fake
        self._adapter = adapter

    @dbus_property(access=PropertyAccess.READ)
    def Address(self) -> Str:
        return self._adapter.address

    @dbus_property(access=PropertyAccess.READ)
    def Name(self) -> Str:
        return self._adapter.hci

    @dbus_property(access=PropertyAccess.READ)
    def Alias(self) -> Str:
        return self._adapter.hci

    @dbus_property()
    def Powered(self) -> Bool:
        return self._adapter.powered

    @Powered.setter
    def Powered(self, value: Bool) -> None:
        self._fake._set_powered(self._adapter, value)

    @dbus_property(access=PropertyAccess.READ)
    def Discovering(self) -> Bool:
        return self._adapter.discovering

    @dbus_property(access=PropertyAccess.READ)
    def Roles(self) -> StrList:
        return ["central", "peripheral"]

    @dbus_property(access=PropertyAccess.READ)
    def UUIDs(self) -> StrList:
        return []

    @method()
    def SetDiscoveryFilter(self, filters: VarDict):
        return None

    @method()
    def StartDiscovery(self):
        if not self._adapter.powered:
            raise DBusError(NOT_READY, "Resource Not Ready")
        self._adapter.discovering = True
        self.emit_properties_changed({"Discovering": True})

    @method()
    def StopDiscovery(self):
        if not self._adapter.powered:
            raise DBusError(NOT_READY, "Resource Not Ready")
        self._adapter.discovering = False
        self.emit_properties_changed({"Discovering": False})

    @method()
    def RemoveDevice(self, device: Path_):
        return None


class DeviceIface(ServiceInterface):
    """One device as one adapter sees it (BlueZ keeps a Device1 per adapter)."""

    def __init__(self, fake: FakeBlueZ, link: Link) -> None:
        super().__init__("org.bluez.Device1")
        self._fake = fake
        self._link = link

    @dbus_property(access=PropertyAccess.READ)
    def Address(self) -> Str:
        return self._link.spec.address

    @dbus_property(access=PropertyAccess.READ)
    def AddressType(self) -> Str:
        return "public"

    @dbus_property(access=PropertyAccess.READ)
    def Adapter(self) -> Path_:
        return self._link.adapter.path

    @dbus_property(access=PropertyAccess.READ)
    def Name(self) -> Str:
        return self._link.spec.name

    @dbus_property(access=PropertyAccess.READ)
    def Alias(self) -> Str:
        return self._link.spec.name

    @dbus_property(access=PropertyAccess.READ)
    def Paired(self) -> Bool:
        return False

    @dbus_property(access=PropertyAccess.READ)
    def Bonded(self) -> Bool:
        return False

    @dbus_property(access=PropertyAccess.READ)
    def Trusted(self) -> Bool:
        return False

    @dbus_property(access=PropertyAccess.READ)
    def Connected(self) -> Bool:
        return self._link.connected

    @dbus_property(access=PropertyAccess.READ)
    def ServicesResolved(self) -> Bool:
        return self._link.connected

    @dbus_property(access=PropertyAccess.READ)
    def RSSI(self) -> Int16:
        return self._link.rssi

    @dbus_property(access=PropertyAccess.READ)
    def UUIDs(self) -> StrList:
        return [uuid16(u) for u in self._link.spec.advertised_uuids]

    @dbus_property(access=PropertyAccess.READ)
    def ManufacturerData(self) -> MfrDict:
        if self._link.mfr is None:
            return {}
        return {0x006B: Variant("ay", self._link.mfr)}

    @dbus_property(access=PropertyAccess.READ)
    def ServiceData(self) -> VarDict:
        return {}

    @method()
    async def Connect(self):
        await self._fake._connect(self._link)

    @method()
    def Disconnect(self):
        self._fake._disconnect(self._link, "local")


class ServiceIface(ServiceInterface):
    def __init__(self, uuid: str, device_path: str) -> None:
        super().__init__("org.bluez.GattService1")
        self._uuid = uuid16(uuid)
        self._device = device_path

    @dbus_property(access=PropertyAccess.READ)
    def UUID(self) -> Str:
        return self._uuid

    @dbus_property(access=PropertyAccess.READ)
    def Device(self) -> Path_:
        return self._device

    @dbus_property(access=PropertyAccess.READ)
    def Primary(self) -> Bool:
        return True


class CharIface(ServiceInterface):
    def __init__(self, fake: FakeBlueZ, link: Link, spec: CharSpec, service_path: str) -> None:
        super().__init__("org.bluez.GattCharacteristic1")
        self._fake = fake
        self._link = link
        self.spec = spec
        self._service = service_path
        self.notifying = False
        self.value = spec.value

    @dbus_property(access=PropertyAccess.READ)
    def UUID(self) -> Str:
        return uuid16(self.spec.uuid)

    @dbus_property(access=PropertyAccess.READ)
    def Service(self) -> Path_:
        return self._service

    @dbus_property(access=PropertyAccess.READ)
    def Flags(self) -> StrList:
        return self.spec.flags

    @dbus_property(access=PropertyAccess.READ)
    def Value(self) -> Bytes:
        return self.value

    @dbus_property(access=PropertyAccess.READ)
    def Notifying(self) -> Bool:
        return self.notifying

    @method()
    def ReadValue(self, options: VarDict) -> Bytes:
        if not self._link.connected:
            raise DBusError(FAILED, "Not connected")
        return self.value

    @method()
    def StartNotify(self):
        if not self._link.connected:
            raise DBusError(FAILED, "Not connected")
        self.notifying = True
        self.emit_properties_changed({"Notifying": True})

    @method()
    def StopNotify(self):
        self.notifying = False

    @property
    def subscribed(self) -> bool:
        return False

    def push(self, value: bytes) -> None:
        self.value = value
        self.emit_properties_changed({"Value": value})

    def release(self) -> None:
        pass


class NotifyCharIface(CharIface):
    """A characteristic that can notify: BlueZ then offers AcquireNotify (NotifyAcquired)."""

    def __init__(self, fake: FakeBlueZ, link: Link, spec: CharSpec, service_path: str) -> None:
        super().__init__(fake, link, spec, service_path)
        self.acquired: socket.socket | None = None  # our end of an AcquireNotify socket

    @dbus_property(access=PropertyAccess.READ)
    def NotifyAcquired(self) -> Bool:
        return self.acquired is not None

    @property
    def subscribed(self) -> bool:
        return self.notifying or self.acquired is not None

    def acquire(self) -> socket.socket:
        """AcquireNotify: return the client's end of a fresh socket pair."""
        if not self._link.connected:
            raise DBusError(FAILED, "Not connected")
        if self._link.spec.address in self._fake.refuse_acquire:
            raise DBusError(NOT_PERMITTED, "Notify acquire refused")
        if self.subscribed:
            raise DBusError(NOT_PERMITTED, "Notify already started")
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ours.setblocking(False)
        self.acquired = ours
        # The client never writes: readable means it closed its end (stop_notify).
        asyncio.get_running_loop().add_reader(ours.fileno(), self._readable)
        self._fake.stats.acquired += 1
        self.emit_properties_changed({"NotifyAcquired": True})
        return theirs

    def _readable(self) -> None:
        assert self.acquired is not None
        try:
            data = self.acquired.recv(512)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.release()

    def release(self) -> None:
        if self.acquired is None:
            return
        asyncio.get_running_loop().remove_reader(self.acquired.fileno())
        self.acquired.close()
        self.acquired = None
        self.emit_properties_changed({"NotifyAcquired": False})

    def push(self, value: bytes) -> None:
        if self.acquired is None:
            super().push(value)
            return
        self.value = value
        try:
            self.acquired.send(value)
        except BlockingIOError:
            pass  # the client is not reading: like BlueZ, drop rather than block
        except OSError:
            self.release()
        else:
            self._fake.stats.fd_notifications += 1


class ControlIface(ServiceInterface):
    """The test-control interface, for a fake running in another process."""

    def __init__(self, fake: FakeBlueZ) -> None:
        super().__init__("org.gatewayd.FakeControl")
        self._fake = fake

    @method()
    def Drop(self, address: Str):
        self._fake.drop(address)

    @method()
    def Disappear(self, address: Str):
        self._fake.disappear(address)

    @method()
    def Reappear(self, address: Str):
        self._fake.reappear(address)

    @method()
    def Stick(self, adapter: Str):
        self._fake.stick(adapter)

    @method()
    def FailConnects(self, address: Str, error: Str, times: Int32):
        self._fake.fail_connects(address, times, error)

    @method()
    def Notify(self, address: Str, uuid: Str, value: Bytes):
        self._fake.notify(address, uuid, value)

    @method()
    def Notifications(self) -> Int32:
        return self._fake.stats.notifications

    @method()
    def Pause(self, paused: Bool):
        self._fake.paused = paused


# --------------------------------------------------------------------------- state


@dataclass
class FakeAdapter:
    hci: str
    address: str
    limit: int  # the controller's connection limit
    path: str = ""
    powered: bool = True
    discovering: bool = False
    stuck: bool = False  # deaf and not connecting until power-cycled
    connecting: bool = False
    unstuck: asyncio.Event = field(default_factory=asyncio.Event)
    iface: AdapterIface | None = None

    def __post_init__(self) -> None:
        self.path = f"/org/bluez/{self.hci}"


@dataclass
class Link:
    """A device as seen by one adapter: its Device1 object and its GATT tree there."""

    spec: FakeDeviceSpec
    adapter: FakeAdapter
    path: str
    rssi: int
    connected: bool = False
    mfr: bytes | None = None
    iface: DeviceIface | None = None
    chars: dict[str, CharIface] = field(default_factory=dict)
    exported: list[tuple[str, ServiceInterface]] = field(default_factory=list)
    cancel_connect: asyncio.Event = field(default_factory=asyncio.Event)
    notifier: asyncio.Task[None] | None = None


def dev_path(adapter: FakeAdapter, address: str) -> str:
    return f"{adapter.path}/dev_{address.upper().replace(':', '_')}"


class FakeBlueZ:
    def __init__(
        self, bus_address: str, *, advert_interval: float = 0.1, connect_delay: float = 0.02
    ) -> None:
        self.bus_address = bus_address
        self.advert_interval = advert_interval
        self.connect_delay = connect_delay
        self.stats = Stats()
        self.adapters: dict[str, FakeAdapter] = {}
        self.devices: dict[str, FakeDeviceSpec] = {}
        self.links: dict[tuple[str, str], Link] = {}  # (hci, address)
        self.char_at: dict[str, CharIface] = {}  # by object path
        self.refuse_acquire: set[str] = set()  # devices whose AcquireNotify fails
        self.present: dict[str, bool] = {}
        self.paused = False  # connected devices stay connected but send no notifications
        self.fail_plan: dict[str, list[str]] = {}
        self.bus: MessageBus | None = None
        self._advertiser: asyncio.Task[None] | None = None
        self._rng = random.Random(7)
        self._counter = 0
        self.changed = asyncio.Event()  # set on every connection change; tests wait on it

    # ----------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        self.bus = await MessageBus(
            bus_address=self.bus_address, bus_type=BusType.SYSTEM, negotiate_unix_fd=True
        ).connect()
        self.bus.add_message_handler(self._acquire_notify)
        self.bus.export("/org/gatewayd/fake", ControlIface(self))
        await self.bus.request_name("org.bluez")
        self._advertiser = asyncio.create_task(self._advertise_forever())

    async def close(self) -> None:
        if self._advertiser is not None:
            self._advertiser.cancel()
        for link in self.links.values():
            if link.notifier is not None:
                link.notifier.cancel()
            for char in link.chars.values():
                char.release()
        if self.bus is not None:
            self.bus.disconnect()
            with contextlib.suppress(Exception):
                await self.bus.wait_for_disconnect()

    # ----------------------------------------------------------------- building the room

    def add_adapter(self, hci: str, limit: int = 5) -> FakeAdapter:
        assert self.bus is not None
        index = int(hci.removeprefix("hci"))
        adapter = FakeAdapter(hci, f"00:1A:7D:DA:71:{index:02X}", limit)
        adapter.iface = AdapterIface(self, adapter)
        self.adapters[hci] = adapter
        self.stats.max_connected.setdefault(hci, 0)
        self.stats.power_offs.setdefault(hci, 0)
        self.bus.export(adapter.path, adapter.iface)
        for spec in self.devices.values():
            if hci in spec.hear:
                self._export_link(spec, adapter)
        return adapter

    def remove_adapter(self, hci: str) -> None:
        assert self.bus is not None
        adapter = self.adapters.pop(hci)
        for key in [k for k in self.links if k[0] == hci]:
            link = self.links.pop(key)
            self._set_connected(link, False)
            for path, iface in reversed(link.exported):
                self.bus.unexport(path, iface)
        self.bus.unexport(adapter.path)
        self._changed()

    def add_device(self, spec: FakeDeviceSpec) -> FakeDeviceSpec:
        self.devices[spec.address] = spec
        self.present[spec.address] = True
        for hci in spec.hear:
            if hci in self.adapters:
                self._export_link(spec, self.adapters[hci])
        return spec

    def add_strap(
        self,
        address: str,
        hear: dict[str, int],
        *,
        polar: bool = False,
        hz: float = 4.0,
        hr: int = 60,
    ) -> FakeDeviceSpec:
        name = f"Polar H10 {address[-5:].replace(':', '')}" if polar else f"HRM {address[-5:]}"
        return self.add_device(
            FakeDeviceSpec(
                address, name, heart_rate_services(), ["180d"], hear, polar=polar, hz=hz, hr=hr
            )
        )

    def add_power_meter(
        self, address: str, hear: dict[str, int], *, hz: float = 4.0
    ) -> FakeDeviceSpec:
        return self.add_device(
            FakeDeviceSpec(
                address, f"Power {address[-5:]}", power_services(), ["1818"], hear, hz=hz
            )
        )

    def _export_link(self, spec: FakeDeviceSpec, adapter: FakeAdapter) -> None:
        assert self.bus is not None
        path = dev_path(adapter, spec.address)
        link = Link(spec, adapter, path, spec.hear[adapter.hci])
        if spec.polar:
            link.mfr = polar_advert(spec.hr, 0)
        link.iface = DeviceIface(self, link)
        self.links[(adapter.hci, spec.address)] = link
        self.bus.export(path, link.iface)
        link.exported.append((path, link.iface))
        handle = 0x000A
        for service in spec.services:
            service_path = f"{path}/service{handle:04x}"
            service_iface = ServiceIface(service.uuid, path)
            self.bus.export(service_path, service_iface)
            link.exported.append((service_path, service_iface))
            handle += 1
            for char in service.chars:
                char_path = f"{service_path}/char{handle:04x}"
                notifies = {"notify", "indicate"} & set(char.flags)
                char_iface = (NotifyCharIface if notifies else CharIface)(
                    self, link, char, service_path
                )
                self.char_at[char_path] = char_iface
                self.bus.export(char_path, char_iface)
                link.exported.append((char_path, char_iface))
                link.chars[char.uuid] = char_iface
                handle += 2

    # ----------------------------------------------------------------- test control

    def drop(self, address: str) -> None:
        """The link drops (interference): the device stays in range and advertises again."""
        for link in self._links_of(address):
            self._disconnect(link, "remote")

    def disappear(self, address: str) -> None:
        """The athlete walks out of range: connection lost, no adverts, connects fail."""
        self.present[address] = False
        self.drop(address)

    def reappear(self, address: str) -> None:
        self.present[address] = True

    def stick(self, hci: str) -> None:
        """The controller goes deaf: no adverts, links drop, Connect hangs, until power-cycled."""
        adapter = self.adapters[hci]
        adapter.stuck = True
        adapter.unstuck = asyncio.Event()
        for link in [link for (h, _), link in self.links.items() if h == hci]:
            self._disconnect(link, "remote")

    def fail_connects(self, address: str, times: int, error: str = IN_PROGRESS) -> None:
        self.fail_plan.setdefault(address, []).extend([error] * times)

    def notify(self, address: str, uuid: str, value: bytes) -> None:
        for link in self._links_of(address):
            char = link.chars.get(uuid)
            if link.connected and char is not None and char.subscribed:
                char.push(value)
                self.stats.notifications += 1

    def connected_on(self, hci: str) -> list[str]:
        return [a for (h, a), link in self.links.items() if h == hci and link.connected]

    def is_connected(self, address: str) -> bool:
        return any(link.connected for link in self._links_of(address))

    async def wait_until(self, predicate: Any, limit_s: float = 30.0) -> None:
        """Wait for a connection change that makes `predicate()` true (never polls a timer)."""
        async with asyncio.timeout(limit_s):
            while not predicate():
                self.changed.clear()
                await self.changed.wait()

    # ----------------------------------------------------------------- behaviour

    def _acquire_notify(self, msg: Message) -> Message | bool | None:
        """AcquireNotify, answered by hand: the reply carries a Unix fd, and our copy of the
        client's end may only be closed once the reply is on the wire."""
        if (
            msg.message_type is not MessageType.METHOD_CALL
            or msg.interface != GATT_CHAR
            or msg.member != "AcquireNotify"
        ):
            return None
        char = self.char_at.get(msg.path or "")
        if not isinstance(char, NotifyCharIface):
            return None  # the service's own dispatch answers UnknownMethod
        try:
            theirs = char.acquire()
        except DBusError as exc:
            return Message.new_error(msg, exc.type, exc.text)
        assert self.bus is not None
        reply = Message.new_method_return(msg, "hq", [0, ATT_MTU], [theirs.fileno()])
        self.bus.send(reply).add_done_callback(lambda _: theirs.close())
        return True

    def _links_of(self, address: str) -> list[Link]:
        return [link for (_, a), link in self.links.items() if a == address]

    def _changed(self) -> None:
        self.changed.set()

    async def _connect(self, link: Link) -> None:
        adapter = link.adapter
        address = link.spec.address
        self.stats.connect_calls += 1
        if not adapter.powered:
            raise DBusError(NOT_READY, "Resource Not Ready")
        if link.connected:
            return
        if adapter.connecting:
            self.stats.in_progress_answers += 1
            raise DBusError(IN_PROGRESS, "In Progress")
        plan = self.fail_plan.get(address)
        if plan:
            raise DBusError(plan.pop(0), "injected failure")
        adapter.connecting = True
        link.cancel_connect = asyncio.Event()
        try:
            if adapter.stuck:
                # a wedged controller never completes the page; bleak's timeout calls Disconnect
                await asyncio.wait(
                    [
                        asyncio.ensure_future(link.cancel_connect.wait()),
                        asyncio.ensure_future(adapter.unstuck.wait()),
                    ],
                    timeout=60,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                raise DBusError(FAILED, "le-connection-abort-by-local (timeout)")
            if not self.present[address]:
                raise DBusError(FAILED, "Page Timeout")
            if len(self.connected_on(adapter.hci)) >= adapter.limit:
                self.stats.over_limit += 1
                raise DBusError(FAILED, "le-connection-limit")
            if any(other.connected for other in self._links_of(address)):
                raise DBusError(FAILED, "device already connected to another central")
            await asyncio.sleep(self.connect_delay)  # the radio's connection setup time
            if link.cancel_connect.is_set():
                raise DBusError(FAILED, "Operation cancelled")
        finally:
            adapter.connecting = False
        self.stats.connects_ok += 1
        self.stats.ever_connected.add(address)
        self._set_connected(link, True)
        connected = len(self.connected_on(adapter.hci))
        self.stats.max_connected[adapter.hci] = max(
            self.stats.max_connected[adapter.hci], connected
        )

    def _disconnect(self, link: Link, why: str) -> None:
        link.cancel_connect.set()
        if link.connected:
            self._set_connected(link, False)

    def _set_connected(self, link: Link, connected: bool) -> None:
        if link.connected == connected:
            return
        link.connected = connected
        assert link.iface is not None
        link.iface.emit_properties_changed({"Connected": connected, "ServicesResolved": connected})
        if connected:
            link.notifier = asyncio.create_task(self._notify_forever(link))
        else:
            for char in link.chars.values():
                char.notifying = False
                char.release()  # the client's fd reads EOF, as when BlueZ loses the device
            if link.notifier is not None:
                link.notifier.cancel()
                link.notifier = None
        self._changed()

    def _set_powered(self, adapter: FakeAdapter, powered: bool) -> None:
        if adapter.powered == powered:
            return
        adapter.powered = powered
        assert adapter.iface is not None
        changes: dict[str, Any] = {"Powered": powered}
        if not powered:
            self.stats.power_offs[adapter.hci] += 1
            adapter.stuck = False
            adapter.unstuck.set()
            for link in [link for (h, _), link in self.links.items() if h == adapter.hci]:
                self._disconnect(link, "power off")
            if adapter.discovering:
                adapter.discovering = False
                changes["Discovering"] = False
        adapter.iface.emit_properties_changed(changes)
        self._changed()

    async def _notify_forever(self, link: Link) -> None:
        spec = link.spec
        period = 1.0 / spec.hz
        # spread devices over the period like real straps that are not in lock-step
        await asyncio.sleep(self._rng.random() * period)
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while link.connected:
            for char in link.chars.values():
                if char.subscribed and not self.paused:
                    char.push(self._value_for(spec, char.spec.uuid))
                    self.stats.notifications += 1
            next_at += period
            await asyncio.sleep(max(0.0, next_at - loop.time()))

    @staticmethod
    def _value_for(spec: FakeDeviceSpec, uuid: str) -> bytes:
        if uuid == "2a37":
            return bytes([0x00, spec.hr])
        if uuid == "2a63":
            return bytes([0x00, 0x00]) + spec.watts.to_bytes(2, "little", signed=True)
        return b"\x00"

    async def _advertise_forever(self) -> None:
        while True:
            await asyncio.sleep(self.advert_interval)
            self._counter += 1
            for (_hci, address), link in self.links.items():
                adapter = link.adapter
                spec = link.spec
                if not (adapter.powered and adapter.discovering) or adapter.stuck:
                    continue
                if not self.present[address]:
                    continue
                # connected peripherals stop advertising; Polar straps keep broadcasting HR
                if not spec.polar and self.is_connected(address):
                    continue
                assert link.iface is not None
                link.rssi = spec.hear[adapter.hci] + self._rng.choice((-1, 0, 1))
                changes: dict[str, Any] = {"RSSI": link.rssi}
                if spec.polar:
                    link.mfr = polar_advert(spec.hr, self._counter)
                    changes["ManufacturerData"] = {0x006B: Variant("ay", link.mfr)}
                link.iface.emit_properties_changed(changes)


# --------------------------------------------------------------------------- the private bus


@contextlib.asynccontextmanager
async def private_system_bus() -> AsyncIterator[str]:
    """A dbus-daemon of our own; yields its address (for DBUS_SYSTEM_BUS_ADDRESS)."""
    daemon = shutil.which("dbus-daemon")
    if daemon is None:
        raise RuntimeError("dbus-daemon is not installed (apt-get install dbus)")
    with tempfile.TemporaryDirectory(prefix="fake-bluez-") as tmp:
        proc = await asyncio.create_subprocess_exec(
            daemon,
            "--session",
            "--nofork",
            "--print-address=1",
            f"--address=unix:dir={tmp}",
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        try:
            assert proc.stdout is not None
            line = await asyncio.wait_for(proc.stdout.readline(), 10)
            address = line.decode().strip()
            if not address:
                raise RuntimeError("dbus-daemon did not print its address")
            yield address
        finally:
            if proc.returncode is None:
                proc.terminate()
                await proc.wait()


# --------------------------------------------------------------------------- standalone


async def _main(args: argparse.Namespace) -> None:
    address = os.environ["DBUS_SYSTEM_BUS_ADDRESS"]
    fake = FakeBlueZ(address)
    await fake.start()
    hcis = [f"hci{i}" for i in range(args.adapters)]
    for hci in hcis:
        fake.add_adapter(hci, limit=args.limit)
    for i in range(args.straps):
        hci = hcis[i % len(hcis)]
        fake.add_strap(f"C0:FF:EE:00:{i // 256:02X}:{i % 256:02X}", {hci: -60 - i % 20}, hz=args.hz)
    print("ready", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    print(f"notifications {fake.stats.notifications}", flush=True)
    await fake.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--adapters", type=int, default=2)
    parser.add_argument("--limit", type=int, default=10)
    parser.add_argument("--straps", type=int, default=20)
    parser.add_argument("--hz", type=float, default=4.0)
    asyncio.run(_main(parser.parse_args()))
