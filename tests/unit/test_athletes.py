"""The roster core: validation naming the field, edits, and the merge with the config."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from gatewayd import athletes as core
from gatewayd.athlete_store import AthleteStore
from gatewayd.athletes import AthleteRecord, ConfigAthlete, FieldError, UnknownAthlete
from gatewayd.roster import Roster


def test_a_full_body_parses_and_normalises_device_ids() -> None:
    record = core.parse_athlete(
        "alice",
        {
            "name": " Alice ",
            "max_hr": 186,
            "age": 35,
            "weight_kg": 61,
            "sex": "female",
            "devices": [{"source": "ble", "id": "c0:ff:ee:00:00:01"}],
            "origin": "admin",  # GET's read-only field may come back
        },
    )
    assert record == AthleteRecord(
        "alice", "Alice", 186, 35, 61.0, "female", (("ble", "C0:FF:EE:00:00:01"),)
    )
    info = record.info()
    assert (info.max_hr, info.age, info.weight_kg, info.sex) == (186, 35, 61.0, "female")
    assert core.parse_athlete("bob", {"age": 40}).info().max_hr == 180  # 220 - age


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"max_hr": 99}, "max_hr"),
        ({"max_hr": 180.5}, "max_hr"),
        ({"max_hr": True}, "max_hr"),
        ({"age": 200}, "age"),
        ({"weight_kg": float("nan")}, "weight_kg"),
        ({"sex": "other"}, "sex"),
        ({"name": 5}, "name"),
        ({"name": "x" * 65}, "name"),
        ({"devices": {}}, "devices"),
        ({"devices": ["ble"]}, "devices[0]"),
        ({"devices": [{"source": "ant", "id": "1:2", "x": 1}]}, "devices[0].x"),
        (
            {"devices": [{"source": "ant", "id": "1:2"}, {"source": "ant", "id": "1:2"}]},
            "devices[1].id",
        ),
        ({"devices": [{"source": "ble", "id": "a b"}]}, "devices[0].id"),
        ({"devices": [{"source": "ant", "id": f"1:{n}"} for n in range(17)]}, "devices"),
        ({"colour": "red"}, "colour"),
        ({"id": "other"}, "id"),
        ("alice", "body"),
    ],
)
def test_a_bad_body_names_its_field(body: object, field: str) -> None:
    with pytest.raises(FieldError) as caught:
        core.parse_athlete("alice", body)
    assert caught.value.field == field


def test_a_bad_id_is_refused() -> None:
    with pytest.raises(FieldError, match="id"):
        core.parse_athlete("no spaces", {})


def test_put_moves_a_device_from_its_previous_owner() -> None:
    strap = ("ble", "AA")
    stored = core.put([], AthleteRecord("a", devices=(strap, ("ant", "1:1"))))
    stored = core.put(stored, AthleteRecord("b", devices=(strap,)))
    assert {r.id: r.devices for r in stored} == {"a": (("ant", "1:1"),), "b": (strap,)}
    assert [r.id for r in core.delete(stored, "a")] == ["b"]


def test_the_store_wins_over_the_config() -> None:
    base = [
        AthleteRecord("carol", "Carol", devices=(("ant", "120:1"), ("ble", "CC"))),
        AthleteRecord("dan", "Dan", max_hr=190),
    ]
    stored = [AthleteRecord("dan", "Daniel"), AthleteRecord("eve", devices=(("ant", "120:1"),))]
    merged = core.merge(base, stored)
    by_id = {a.id: a for a in merged.athletes}
    assert by_id["carol"].devices == (("ble", "CC"),) and by_id["carol"].origin == core.CONFIG
    assert by_id["dan"].name == "Daniel" and by_id["dan"].max_hr is None  # replaced whole
    assert by_id["eve"].origin == core.STORE
    roster = merged.roster(track_unknown=False)
    assert roster.uid_for("ant", "120:1") == "eve"
    assert roster.owner("ble", "cc") == "carol"
    assert roster.uid_for("ble", "FF") is None


def test_base_records_round_trip_a_config_roster() -> None:
    from gatewayd.roster import AthleteInfo

    roster = Roster([AthleteInfo("a", "A", 180, 2.0, age=40)], {("ant", "120:5"): "a"})
    (record,) = core.base_records(roster)
    assert record.devices == (("ant", "120:5"),) and record.wheel_circumference_m == 2.0


def test_the_store_file_is_atomic_and_applies_each_edit(tmp_path: Path) -> None:
    applied: list[Roster] = []
    base = [AthleteRecord("carol", devices=(("ant", "120:1"),))]
    store = AthleteStore(tmp_path, lambda: base, track_unknown=True, apply=applied.append)
    record, created = store.put("eve", {"devices": [{"source": "ant", "id": "120:1"}]})
    assert created and record.id == "eve"
    assert applied[-1].owner("ant", "120:1") == "eve"
    assert not store.put("eve", {"name": "Eve"})[1]
    assert applied[-1].owner("ant", "120:1") == "carol"  # eve gave the device back
    data = json.loads((tmp_path / "athletes.json").read_text())
    assert data == {
        "version": 1,
        "athletes": [
            {
                "id": "eve",
                "name": "Eve",
                "max_hr": None,
                "age": None,
                "weight_kg": None,
                "sex": None,
                "devices": [],
                "wheel_circumference_m": 2.105,
            }
        ],
    }
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".athletes-")]
    with pytest.raises(ConfigAthlete):
        store.delete("carol")
    with pytest.raises(UnknownAthlete):
        store.delete("zed")
    store.delete("eve")
    again = AthleteStore(tmp_path, lambda: base, track_unknown=True)
    assert [a.id for a in again.athletes()] == ["carol"]


def test_a_failed_write_changes_nothing(tmp_path: Path) -> None:
    applied: list[Roster] = []
    blocker = tmp_path / "state"
    blocker.write_text("a file where the directory should be")
    store = AthleteStore(blocker, list, track_unknown=True, apply=applied.append)
    with pytest.raises(OSError):
        store.put("eve", {})
    assert applied == [] and store.athletes() == []


def test_an_unreadable_file_is_kept_aside(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "athletes.json").write_text('{"version": 9, "athletes": []}')
    with caplog.at_level(logging.ERROR):
        store = AthleteStore(tmp_path, list, track_unknown=True)
    assert "unknown format version 9" in caplog.text
    store.put("eve", {})
    assert (tmp_path / "athletes.json.bad-1").read_text() == '{"version": 9, "athletes": []}'
    assert [a.id for a in AthleteStore(tmp_path, list, track_unknown=True).athletes()] == ["eve"]
