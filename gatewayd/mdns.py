"""Find the hub by name: DNS-SD over mDNS (RFC 6762/6763) with python-zeroconf.

The hub advertises two services on the broker's port:
- `_gatewayd._tcp`: the Terra-protocol broker, TXT `path=/connect` plus where the board, admin
  page and API are, the hub's id and the version;
- `_http._tcp`: the board, for any browser or DNS-SD browser app, TXT `path=/` (the key RFC 6763's
  registry gives HTTP) and `admin=/admin`.

By default (`mdns.enabled: auto`) only when the broker listens beyond loopback: a hub serving
127.0.0.1 has nothing to offer the LAN. `gatewayd discover` lists the hubs it hears.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from gatewayd import __version__
from gatewayd.config import MdnsConfig

log = logging.getLogger(__name__)

GATEWAYD_TYPE = "_gatewayd._tcp.local."
HTTP_TYPE = "_http._tcp.local."
MAX_LABEL = 63  # DNS: one label, in bytes


@dataclass(frozen=True, slots=True)
class Advert:
    """One DNS-SD service instance, independent of the zeroconf library."""

    type: str
    instance: str  # the user-visible instance name (the hub's name)
    port: int
    properties: dict[str, str]
    addresses: tuple[str, ...]
    server: str

    @property
    def name(self) -> str:
        return f"{self.instance}.{self.type}"


def is_loopback_only(host: str) -> bool:
    if host in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: the machine's, reachable from the LAN


def should_advertise(setting: bool | str, host: str) -> bool:
    if setting == "auto":
        return not is_loopback_only(host)
    return setting is True


def instance_name(hub_name: str) -> str:
    """The instance label: the hub's name, cut to DNS's 63 bytes without splitting a character."""
    name = " ".join(hub_name.split()) or "gatewayd"
    while len(name.encode("utf-8")) > MAX_LABEL:
        name = name[:-1]
    return name


def adverts(
    *,
    hub_id: str,
    hub_name: str,
    port: int,
    addresses: Sequence[str],
    hostname: str,
    board: bool,
    admin: bool,
    tls: bool = False,
) -> list[Advert]:
    """The services to announce for a broker on `port` reachable at `addresses`."""
    instance = instance_name(hub_name)
    server = f"{hostname.split('.', maxsplit=1)[0] or 'gatewayd'}.local."
    paths = {"path": "/connect", "hub": hub_id, "version": __version__}
    if tls:
        paths["tls"] = "1"
    if board:
        paths["board"] = "/"
    if admin:
        paths["admin"] = "/admin"
        paths["api"] = "/api"
    out = [Advert(GATEWAYD_TYPE, instance, port, paths, tuple(addresses), server)]
    if board or admin:
        web = {"path": "/" if board else "/admin"}
        if admin:
            web["admin"] = "/admin"
        out.append(Advert(HTTP_TYPE, instance, port, web, tuple(addresses), server))
    return out


def local_addresses(host: str, interfaces: Sequence[str] | None) -> list[str]:
    """The IPv4 addresses to announce: the listening host's, else every interface's."""
    if interfaces:
        return list(interfaces)
    if host not in ("", "0.0.0.0", "::"):
        with contextlib.suppress(ValueError):
            return [str(ipaddress.ip_address(host))]
        with contextlib.suppress(OSError):
            return sorted({str(i[4][0]) for i in socket.getaddrinfo(host, None, socket.AF_INET)})
        return []
    import ifaddr  # zeroconf's own dependency, which it uses for the same job

    return sorted(
        {
            str(ip.ip)
            for adapter in ifaddr.get_adapters()
            for ip in adapter.ips
            if isinstance(ip.ip, str) and not ipaddress.ip_address(ip.ip).is_loopback
        }
    )


def _service_info(advert: Advert) -> Any:
    from zeroconf import ServiceInfo

    return ServiceInfo(
        advert.type,
        advert.name,
        port=advert.port,
        properties=advert.properties,
        server=advert.server,
        addresses=[socket.inet_aton(a) for a in advert.addresses if ":" not in a],
    )


class Advertiser:
    """Announces the hub while the daemon runs and says goodbye when it stops."""

    def __init__(self, config: MdnsConfig, adverts_: list[Advert]) -> None:
        self.config = config
        self.adverts = adverts_
        self._zeroconf: Any = None

    async def start(self) -> None:
        try:
            from zeroconf import InterfaceChoice, IPVersion
            from zeroconf.asyncio import AsyncZeroconf
        except ImportError:
            log.warning("mDNS: python-zeroconf is not installed; the hub is not advertised")
            return
        if not any(advert.addresses for advert in self.adverts):
            log.warning("mDNS: no address to announce; the hub is not advertised")
            return
        interfaces: Any = list(self.config.interfaces) or InterfaceChoice.All
        try:
            self._zeroconf = AsyncZeroconf(interfaces=interfaces, ip_version=IPVersion.V4Only)
            for advert in self.adverts:
                # Probing takes about 2 s; a clash renames the instance ("name (2)").
                await self._zeroconf.async_register_service(
                    _service_info(advert), allow_name_change=True
                )
        except (OSError, RuntimeError, ValueError) as exc:
            log.warning("mDNS: cannot advertise the hub (%s)", exc)
            await self.close()
            return
        log.info(
            "mDNS: advertising %r as %s on %s",
            self.adverts[0].instance,
            " and ".join(a.type.removesuffix(".local.") for a in self.adverts),
            ", ".join(self.adverts[0].addresses),
        )

    async def close(self) -> None:
        zeroconf, self._zeroconf = self._zeroconf, None
        if zeroconf is None:
            return
        with contextlib.suppress(Exception):
            await asyncio.wait_for(zeroconf.async_unregister_all_services(), 2.0)
        with contextlib.suppress(Exception):
            await zeroconf.async_close()


@dataclass(frozen=True, slots=True)
class Found:
    name: str
    hub: str
    version: str
    addresses: tuple[str, ...]
    port: int
    properties: dict[str, str]

    def urls(self) -> dict[str, str]:
        host = self.addresses[0] if self.addresses else "?"
        http = f"http://{host}:{self.port}"
        ws = f"{'wss' if self.properties.get('tls') == '1' else 'ws'}://{host}:{self.port}"
        out = {"broker": ws + self.properties.get("path", "/connect")}
        if "board" in self.properties:
            out["board"] = http + self.properties["board"]
        if "admin" in self.properties:
            out["admin"] = http + self.properties["admin"]
        return out


def discover(seconds: float, interfaces: Sequence[str] | None = None) -> list[Found]:
    """Browse `_gatewayd._tcp` for `seconds` and resolve every hub heard."""
    from zeroconf import InterfaceChoice, IPVersion, ServiceBrowser, ServiceStateChange, Zeroconf

    zeroconf = Zeroconf(
        interfaces=list(interfaces) if interfaces else InterfaceChoice.All,
        ip_version=IPVersion.V4Only,
    )
    names: set[str] = set()
    lock = threading.Lock()

    def changed(
        zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        if state_change is not ServiceStateChange.Removed:
            with lock:
                names.add(name)

    try:
        browser = ServiceBrowser(zeroconf, GATEWAYD_TYPE, handlers=[changed])
        threading.Event().wait(seconds)  # the CLI listens for as long as it was told
        browser.cancel()
        found = []
        with lock:
            heard = sorted(names)
        for name in heard:
            info = zeroconf.get_service_info(GATEWAYD_TYPE, name, timeout=2000)
            if info is None or info.port is None:
                continue
            properties = {
                k.decode("utf-8", "replace"): (v or b"").decode("utf-8", "replace")
                for k, v in info.properties.items()
            }
            found.append(
                Found(
                    name.removesuffix("." + GATEWAYD_TYPE),
                    properties.get("hub", ""),
                    properties.get("version", ""),
                    tuple(info.parsed_addresses(IPVersion.V4Only)),
                    info.port,
                    properties,
                )
            )
        return found
    finally:
        zeroconf.close()
