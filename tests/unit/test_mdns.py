"""What the hub announces over DNS-SD (types, instance name, TXT), built without a network."""

from __future__ import annotations

import pytest

from gatewayd import __version__
from gatewayd.config import MdnsConfig
from gatewayd.mdns import (
    GATEWAYD_TYPE,
    HTTP_TYPE,
    Found,
    adverts,
    instance_name,
    is_loopback_only,
    should_advertise,
)


@pytest.mark.parametrize(
    ("setting", "host", "expected"),
    [
        ("auto", "127.0.0.1", False),
        ("auto", "127.0.1.1", False),
        ("auto", "::1", False),
        ("auto", "localhost", False),
        ("auto", "0.0.0.0", True),
        ("auto", "::", True),
        ("auto", "192.168.1.20", True),
        ("auto", "hub.local", True),
        (True, "127.0.0.1", True),
        (False, "0.0.0.0", False),
    ],
)
def test_advertised_only_beyond_loopback_unless_told(
    setting: bool | str, host: str, expected: bool
) -> None:
    assert should_advertise(setting, host) is expected
    assert is_loopback_only(host) is (host in ("127.0.0.1", "127.0.1.1", "::1", "localhost"))


def test_the_broker_and_the_board_are_announced_with_their_paths() -> None:
    broker, web = adverts(
        hub_id="gym-1",
        hub_name="Downtown  gym",
        port=8787,
        addresses=["192.168.1.20"],
        hostname="pi.lan",
        board=True,
        admin=True,
    )
    assert broker.type == GATEWAYD_TYPE == "_gatewayd._tcp.local."
    assert broker.name == "Downtown gym._gatewayd._tcp.local."
    assert (broker.port, broker.addresses, broker.server) == (8787, ("192.168.1.20",), "pi.local.")
    assert broker.properties == {
        "path": "/connect",
        "hub": "gym-1",
        "version": __version__,
        "board": "/",
        "admin": "/admin",
        "api": "/api",
    }
    assert web.type == HTTP_TYPE == "_http._tcp.local."
    assert web.properties == {"path": "/", "admin": "/admin"}


def test_without_board_and_admin_only_the_broker_is_announced() -> None:
    (only,) = adverts(
        hub_id="h", hub_name="", port=1, addresses=[], hostname="", board=False, admin=False
    )
    assert only.instance == "gatewayd" and "board" not in only.properties


def test_an_instance_name_fits_one_dns_label() -> None:
    name = instance_name("Zoë's " + "very " * 20 + "gym")
    assert len(name.encode("utf-8")) <= 63 and name.startswith("Zoë's very")


def test_found_hubs_print_usable_urls() -> None:
    hub = Found("Gym", "gym-1", "0.1.0", ("10.0.0.5",), 8787, {"path": "/connect", "board": "/"})
    assert hub.urls() == {"broker": "ws://10.0.0.5:8787/connect", "board": "http://10.0.0.5:8787/"}


def test_interfaces_must_be_ipv4_addresses() -> None:
    assert MdnsConfig(interfaces=["127.0.0.1"]).interfaces == ["127.0.0.1"]
    with pytest.raises(ValueError, match="not an IPv4 address"):
        MdnsConfig(interfaces=["eth0"])
