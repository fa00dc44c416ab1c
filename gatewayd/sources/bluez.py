"""BlueZ adapter control over D-Bus (dbus-fast): which adapters exist, hotplug, power-cycling.

bleak drives scanning and connections; this module only does what bleak does not: keep a live
list of the controllers BlueZ knows (ObjectManager plus InterfacesAdded/Removed, so a USB dongle
plugged in at run time is picked up) and switch a controller off and on again when it wedges.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dbus_fast import BusType, Message, MessageType, Variant
from dbus_fast.aio import MessageBus

from gatewayd.errors import SourceUnavailable

log = logging.getLogger(__name__)

BLUEZ = "org.bluez"
ADAPTER = "org.bluez.Adapter1"
OBJECT_MANAGER = "org.freedesktop.DBus.ObjectManager"
PROPERTIES = "org.freedesktop.DBus.Properties"
DBUS = "org.freedesktop.DBus"


@dataclass(frozen=True, slots=True)
class AdapterInfo:
    name: str  # "hci0"
    path: str  # "/org/bluez/hci0"
    address: str
    powered: bool
    central: bool  # can open LE connections (BlueZ's "central" role)


AdapterCallback = Callable[[AdapterInfo], None]
RemovedCallback = Callable[[str], None]


def _adapter_info(path: str, props: dict[str, Any]) -> AdapterInfo:
    def value(key: str, default: Any) -> Any:
        item = props.get(key, default)
        return item.value if isinstance(item, Variant) else item

    roles = value("Roles", ["central"])
    return AdapterInfo(
        name=path.rsplit("/", 1)[-1],
        path=path,
        address=str(value("Address", "")),
        powered=bool(value("Powered", False)),
        central="central" in roles,
    )


class BluezAdapters:
    """A live view of BlueZ's adapters on the system bus.

    `on_added` runs for every adapter present at connect() and every one plugged in later, and
    again whenever an adapter's Powered property changes; `on_removed` when one goes away (or
    BlueZ itself stops). Both run on the event loop and must not block.
    """

    def __init__(self, on_added: AdapterCallback, on_removed: RemovedCallback) -> None:
        self._on_added = on_added
        self._on_removed = on_removed
        self._bus: MessageBus | None = None
        self._adapters: dict[str, AdapterInfo] = {}
        self._resync: asyncio.Task[None] | None = None

    @property
    def adapters(self) -> dict[str, AdapterInfo]:
        return dict(self._adapters)

    @property
    def connected(self) -> bool:
        return self._bus is not None and self._bus.connected

    async def connect(self) -> None:
        """Attach to the system bus and read BlueZ's adapters; SourceUnavailable if we cannot."""
        try:
            bus = await MessageBus(bus_type=BusType.SYSTEM).connect()
        except (OSError, EOFError, ValueError) as exc:
            raise SourceUnavailable(f"cannot reach the D-Bus system bus: {exc}") from exc
        try:
            for rule in (
                f"type='signal',sender='{BLUEZ}',interface='{OBJECT_MANAGER}'",
                f"type='signal',sender='{BLUEZ}',interface='{PROPERTIES}',"
                f"member='PropertiesChanged',arg0='{ADAPTER}'",
                f"type='signal',sender='{DBUS}',interface='{DBUS}',"
                f"member='NameOwnerChanged',arg0='{BLUEZ}'",
            ):
                await _call(
                    bus, DBUS, "/org/freedesktop/DBus", DBUS, member="AddMatch", args=("s", [rule])
                )
            bus.add_message_handler(self._on_message)
            reply = await bus.call(
                Message(
                    destination=BLUEZ,
                    path="/",
                    interface=OBJECT_MANAGER,
                    member="GetManagedObjects",
                )
            )
            if reply.message_type == MessageType.ERROR:
                raise SourceUnavailable(
                    f"BlueZ is not running on the system bus ({reply.error_name}); "
                    "install and start bluetooth.service"
                )
        except BaseException:
            bus.disconnect()
            raise
        self._bus = bus
        self._add_all(reply.body[0])

    def _add_all(self, objects: dict[str, dict[str, Any]]) -> None:
        for path, interfaces in objects.items():
            if ADAPTER in interfaces:
                self._add(path, interfaces[ADAPTER])

    async def _read_adapters(self) -> None:
        bus = self._bus
        if bus is None:
            return
        try:
            reply = await _call(
                bus, BLUEZ, "/", OBJECT_MANAGER, member="GetManagedObjects", args=("", [])
            )
        except SourceUnavailable as exc:
            log.warning("BlueZ is back but its adapters cannot be read: %s", exc)
            return
        self._add_all(reply.body[0])

    def close(self) -> None:
        if self._bus is not None:
            self._bus.disconnect()
            self._bus = None

    async def wait_closed(self) -> None:
        """Return when the bus connection ends (daemon gone, socket broken, close())."""
        bus = self._bus
        if bus is None:
            return
        with contextlib.suppress(Exception):
            await bus.wait_for_disconnect()  # type: ignore[no-untyped-call]

    async def set_powered(self, name: str, powered: bool) -> None:
        bus = self._bus
        if bus is None:
            raise SourceUnavailable("not connected to BlueZ")
        body = [ADAPTER, "Powered", Variant("b", powered)]
        await _call(bus, BLUEZ, f"/org/bluez/{name}", PROPERTIES, member="Set", args=("ssv", body))

    async def power_cycle(self, name: str, off_s: float) -> None:
        """Powered off, wait `off_s`, Powered on: what `bluetoothctl power off/on` does."""
        await self.set_powered(name, False)
        await asyncio.sleep(off_s)
        await self.set_powered(name, True)

    def _add(self, path: str, props: dict[str, Any]) -> None:
        info = _adapter_info(path, props)
        self._adapters[info.name] = info
        self._on_added(info)

    def _remove(self, name: str) -> None:
        if self._adapters.pop(name, None) is not None:
            self._on_removed(name)

    def _on_message(self, msg: Message) -> None:
        if msg.message_type != MessageType.SIGNAL:
            return
        if msg.member == "InterfacesAdded" and msg.interface == OBJECT_MANAGER:
            path, interfaces = msg.body
            if ADAPTER in interfaces:
                self._add(path, interfaces[ADAPTER])
        elif msg.member == "InterfacesRemoved" and msg.interface == OBJECT_MANAGER:
            path, interfaces = msg.body
            if ADAPTER in interfaces:
                self._remove(path.rsplit("/", 1)[-1])
        elif msg.member == "PropertiesChanged" and msg.interface == PROPERTIES:
            name = (msg.path or "").rsplit("/", 1)[-1]
            _iface, changed, _invalidated = msg.body
            old = self._adapters.get(name)
            if old is not None and "Powered" in changed:
                powered = bool(changed["Powered"].value)
                if powered != old.powered:
                    info = AdapterInfo(old.name, old.path, old.address, powered, old.central)
                    self._adapters[name] = info
                    self._on_added(info)
        elif msg.member == "NameOwnerChanged" and msg.interface == DBUS:
            _name, _old_owner, new_owner = msg.body
            if new_owner:
                # bluetoothd restarted: its adapters come back without InterfacesAdded for us
                self._resync = asyncio.get_running_loop().create_task(self._read_adapters())
            else:
                log.warning(
                    "BlueZ left the system bus; all Bluetooth adapters are gone until it returns"
                )
                for name in list(self._adapters):
                    self._remove(name)


async def _call(
    bus: MessageBus, dest: str, path: str, iface: str, *, member: str, args: tuple[str, list[Any]]
) -> Message:
    signature, body = args
    reply = await bus.call(
        Message(
            destination=dest,
            path=path,
            interface=iface,
            member=member,
            signature=signature,
            body=body,
        )
    )
    if reply.message_type == MessageType.ERROR:
        detail = reply.body[0] if reply.body else ""
        raise SourceUnavailable(f"{member} on {path} failed: {reply.error_name} {detail}".rstrip())
    return reply
