"""The BLE source's pure pieces: UUIDs, the advert HR check, the scan output, its config."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from gatewayd.config import BleConfig, Config, load
from gatewayd.errors import ConfigError
from gatewayd.sources.ble import (
    BleSource,
    BleTiming,
    ScanEntry,
    advert_carries_hr,
    format_scan,
    short_uuid,
)


@pytest.mark.parametrize(
    ("uuid", "short"),
    [
        ("0000180d-0000-1000-8000-00805f9b34fb", "180d"),
        ("00002A37-0000-1000-8000-00805F9B34FB", "2a37"),
        ("2a63", "2a63"),
        ("6e400001-b5a3-f393-e0a9-e50e24dcca9e", None),  # a vendor service
        ("0001180d-0000-1000-8000-00805f9b34fb", None),  # 32-bit, not a 16-bit alias
    ],
)
def test_short_uuid(uuid: str, short: str | None) -> None:
    assert short_uuid(uuid) == short


def test_polar_hr_block_is_recognised() -> None:
    assert advert_carries_hr(bytes.fromhex("3b1b5452"))  # formats.md: flags 0x3B, HR 82
    assert advert_carries_hr(bytes.fromhex("3b1b54"))  # old firmware: 3-byte block


def test_polar_data_without_hr_is_not() -> None:
    assert not advert_carries_hr(b"")
    assert not advert_carries_hr(bytes.fromhex("4002aabb"))  # a GPB block only


@given(st.binary(max_size=40))
def test_any_manufacturer_data_gives_a_yes_or_no(data: bytes) -> None:
    assert advert_carries_hr(data) in (True, False)


def test_scan_output_is_a_table_and_a_roster_that_validates() -> None:
    entries = [
        ScanEntry(
            "C0:FF:EE:00:00:01",
            'Polar H10 "A"',
            ["heart-rate", "heart-rate-advert"],
            -48,
            "hci0",
            87,
        ),
        ScanEntry("C0:FF:EE:00:00:02", "", ["cycling-power"], -71, "hci1"),
    ]
    text = format_scan(entries, 10)
    table = [line for line in text.splitlines() if line.startswith("# C0:")]
    assert "87%" in table[0] and "-48" in table[0] and "heart-rate-advert" in table[0]
    assert " - " in table[1]  # battery unknown
    config = Config(**yaml.safe_load(text))
    assert [a.name for a in config.athletes] == ['Polar H10 "A"', "C0:FF:EE:00:00:02"]
    assert [d.id for a in config.athletes for d in a.devices] == [e.address for e in entries]


def test_scan_output_when_nothing_was_heard() -> None:
    assert format_scan([], 5) == "# no fitness devices heard in 5 s\n"


def test_timing_comes_from_config() -> None:
    timing = BleTiming.from_config(
        BleConfig(stale_adapter_s=30, connect_timeout_s=7, adapter_fail_limit=3)
    )
    assert (timing.stale_adapter_s, timing.connect_timeout_s, timing.adapter_fail_limit) == (
        30,
        7,
        3,
    )


def test_roster_devices_reach_the_source_with_their_connect_flag() -> None:
    config = Config(
        athletes=[
            {
                "id": "ana",
                "devices": [{"source": "ble", "id": "c0:ff:ee:00:00:01", "connect": True}],
            },
            {
                "id": "bo",
                "devices": [
                    {"source": "ant", "id": "120:1"},
                    {"source": "ble", "id": "AA:BB:CC:DD:EE:FF"},
                ],
            },
        ]
    )
    source = BleSource.from_config(config)
    assert source.roster == {"C0:FF:EE:00:00:01": True, "AA:BB:CC:DD:EE:FF": False}
    assert source.name == "ble"


@pytest.mark.parametrize("adapters", [{"usb0": 5}, {"hci1": 0}, {"hci1": 40}])
def test_bad_adapter_slot_override_names_the_key(adapters: dict[str, int], tmp_path: Path) -> None:
    path = tmp_path / "gatewayd.yaml"
    path.write_text(yaml.safe_dump({"sources": {"ble": {"adapters": adapters}}}))
    with pytest.raises(ConfigError) as info:
        load(path)
    assert "sources.ble.adapters" in str(info.value)
