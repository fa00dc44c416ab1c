"""The devices the hub hears (GET /api/devices), through the real pipeline on a manual clock."""

from __future__ import annotations

from gatewayd.aggregate import Aggregator, HeardDevice
from gatewayd.device_directory import DeviceDirectory
from gatewayd.model import DataType, DeviceState, Frame
from gatewayd.roster import Roster
from tests.helpers import START_WALL, SimulatedRoom


def heard(
    device_id: str, wall: float, rssi: int | None, types: tuple[str, ...] = ()
) -> HeardDevice:
    return HeardDevice("ble", device_id, f"ble:{device_id}", True, wall, rssi, None, types)


def test_live_devices_come_strongest_first_then_the_rest_newest_first() -> None:
    directory = DeviceDirectory()
    now = START_WALL
    rows = directory.listing(
        [
            heard("WEAK", now - 1, -80, ("HEART_RATE",)),
            heard("OLD", now - 300, -30),
            heard("STRONG", now - 2, -40),
            heard("OLDER", now - 900, -20),
            heard("MUTE", now, None),
        ],
        lambda source, device_id: "alice" if device_id == "STRONG" else None,
        now,
    )
    assert [r["id"] for r in rows] == ["STRONG", "WEAK", "MUTE", "OLD", "OLDER"]
    assert rows[0]["athlete"] == "alice" and rows[1]["athlete"] is None
    assert rows[1]["kind"] == "heart_rate"  # from the data type it gives
    assert rows[0]["last_seen"] == "2027-01-15T07:59:58.000Z"  # START_WALL - 2 s


def test_ignored_devices_are_listed_and_bounded() -> None:
    directory = DeviceDirectory()
    for n in range(1005):
        directory.ignored(Frame("ant", "ant0", f"120:{n}", "ant:120", b"", n, START_WALL + n, -50))
    rows = directory.listing([], lambda s, d: None, START_WALL + 1005)
    assert len(rows) == 1000
    assert "120:0" not in {r["id"] for r in rows}  # the oldest went first
    assert rows[0]["kind"] == "heart_rate" and rows[0]["battery"] is None


def test_the_pipeline_lists_every_device_with_its_athlete() -> None:
    room = SimulatedRoom(athletes=3, bike_fraction=0.0)
    room.run_for(3)
    rows = room.pipeline.heard_devices()
    assert len(rows) == 3
    assert {r["athlete"] for r in rows} == {"sim-01", "sim-02", "sim-03"}
    assert {r["kind"] for r in rows} == {"heart_rate"}


def test_an_ignoring_roster_still_lists_strangers() -> None:
    room = SimulatedRoom(athletes=2, bike_fraction=0.0)
    room.pipeline.set_roster(Roster([], {}, track_unknown=False))
    room.run_for(3)
    rows = room.pipeline.heard_devices()
    assert {r["athlete"] for r in rows} == {None}
    assert len(rows) == 2


def test_reassigning_a_live_device_moves_its_streams_at_once() -> None:
    aggregator = Aggregator()
    aggregator.frame("k", "sim-01", "ble", "AA", 0.0, START_WALL)
    aggregator.value("k", DataType.HEART_RATE, 120.0, None, 0.0, START_WALL)
    statuses = aggregator.reassign("k", "alice", START_WALL + 0.5)
    assert [(s.uid, s.state) for s in statuses] == [
        ("sim-01", DeviceState.LOST),
        ("alice", DeviceState.CONNECTED),
    ]
    assert aggregator.reassign("k", "alice", START_WALL) == []
    aggregator.value("k", DataType.HEART_RATE, 121.0, None, 1.0, START_WALL + 1)
    samples, _ = aggregator.tick(3.0, START_WALL + 3)
    samples, _ = aggregator.tick(4.0, START_WALL + 4)
    assert {s.uid for s in samples} == {"alice"}
