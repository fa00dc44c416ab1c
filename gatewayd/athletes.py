"""PURE. The roster as staff edit it: validation of one athlete, edits, and the merge with the
config file's `athletes:`.

Two places name athletes: the config file (written by an administrator, a Debian conffile) and
the roster store (written by the admin page, `<state dir>/athletes.json`). The merge rule:

- an athlete id in the store replaces the config's athlete of that id, whole;
- a device given to an athlete in the store belongs to that athlete, even when the config names it
  for someone else (the staff's edit is the later intent); the config's athlete simply loses it.

Deleting an athlete through the API deletes the store's entry only: a config athlete it replaced
comes back; an athlete that exists only in the config cannot be deleted from a tablet.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

from gatewayd.roster import DEFAULT_CIRCUMFERENCE_M, AthleteInfo, Roster

ID_PATTERN = re.compile(r"^[A-Za-z0-9_.:@-]{1,64}$")
DEVICE_ID_PATTERN = re.compile(r"^[A-Za-z0-9:_.-]{1,64}$")
SOURCES = ("ble", "ant")
SEXES = ("male", "female")
MAX_DEVICES = 16
MAX_NAME = 64
FIELDS = frozenset(
    {"id", "name", "max_hr", "age", "weight_kg", "sex", "devices", "wheel_circumference_m"}
)
# Read-only fields that GET returns; a client may send them back unchanged.
IGNORED_FIELDS = frozenset({"origin"})

CONFIG = "config"
STORE = "admin"


class FieldError(ValueError):
    """A bad athlete: `field` is the JSON path of the first bad value (e.g. `devices[1].source`)."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field = field_name
        self.message = message


class UnknownAthlete(LookupError):
    pass


class ConfigAthlete(PermissionError):
    """The athlete exists only in the config file: a tablet cannot delete it."""


Device = tuple[str, str]  # (source, id), id upper case


@dataclass(frozen=True, slots=True)
class AthleteRecord:
    id: str
    name: str = ""
    max_hr: int | None = None
    age: int | None = None
    weight_kg: float | None = None
    sex: str | None = None
    devices: tuple[Device, ...] = ()
    wheel_circumference_m: float = DEFAULT_CIRCUMFERENCE_M
    origin: str = STORE

    def to_json(self) -> dict[str, object]:
        return {
            "id": self.id,
            "name": self.name or self.id,
            "max_hr": self.max_hr,
            "age": self.age,
            "weight_kg": self.weight_kg,
            "sex": self.sex,
            "devices": [{"source": s, "id": i} for s, i in self.devices],
            "wheel_circumference_m": self.wheel_circumference_m,
            "origin": self.origin,
        }

    def info(self) -> AthleteInfo:
        max_hr = self.max_hr if self.max_hr is not None else _max_hr_from_age(self.age)
        return AthleteInfo(
            self.id,
            self.name or self.id,
            max_hr,
            self.wheel_circumference_m,
            age=self.age,
            weight_kg=self.weight_kg,
            sex=self.sex,
        )


def _max_hr_from_age(age: int | None) -> int | None:
    return 220 - age if age is not None else None


def check_id(athlete_id: str) -> str:
    if not ID_PATTERN.match(athlete_id):
        raise FieldError("id", "1-64 characters of letters, digits and _ . : @ -")
    return athlete_id


def parse_athlete(athlete_id: str, body: object) -> AthleteRecord:
    """One athlete from a PUT body (JSON already decoded); FieldError names the first bad field."""
    check_id(athlete_id)
    if not isinstance(body, Mapping):
        raise FieldError("body", "must be a JSON object")
    for key in body:
        if key not in FIELDS and key not in IGNORED_FIELDS:
            raise FieldError(str(key), f"unknown field; known: {', '.join(sorted(FIELDS))}")
    if "id" in body and body["id"] != athlete_id:
        raise FieldError("id", f"must match the URL's id {athlete_id!r}")
    name = body.get("name") or ""
    if not isinstance(name, str) or len(name) > MAX_NAME:
        raise FieldError("name", f"must be text of at most {MAX_NAME} characters")
    return AthleteRecord(
        id=athlete_id,
        name=name.strip(),
        max_hr=_int(body, "max_hr", 100, 250),
        age=_int(body, "age", 5, 110),
        weight_kg=_number(body, "weight_kg", 20.0, 350.0),
        sex=_sex(body.get("sex")),
        devices=_devices(body.get("devices", [])),
        wheel_circumference_m=_number(body, "wheel_circumference_m", 0.5, 4.0)
        or DEFAULT_CIRCUMFERENCE_M,
    )


def _int(body: Mapping[str, object], key: str, low: int, high: int) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value):
        raise FieldError(key, f"must be a whole number from {low} to {high}, or null")
    if not low <= value <= high:
        raise FieldError(key, f"must be from {low} to {high} (got {value})")
    return int(value)


def _number(body: Mapping[str, object], key: str, low: float, high: float) -> float | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise FieldError(key, f"must be a number from {low:g} to {high:g}, or null")
    if not low <= value <= high:
        raise FieldError(key, f"must be from {low:g} to {high:g} (got {value})")
    return float(value)


def _sex(value: object) -> str | None:
    if value is None or value == "":
        return None
    if value not in SEXES:
        raise FieldError("sex", 'must be "male", "female" or null (Keytel\'s formula has two)')
    return str(value)


def _devices(value: object) -> tuple[Device, ...]:
    if not isinstance(value, list):
        raise FieldError("devices", 'must be a list of {"source", "id"}')
    if len(value) > MAX_DEVICES:
        raise FieldError("devices", f"at most {MAX_DEVICES} devices per athlete")
    out: list[Device] = []
    for index, item in enumerate(value):
        where = f"devices[{index}]"
        if not isinstance(item, Mapping):
            raise FieldError(where, 'must be an object {"source", "id"}')
        for key in item:
            if key not in ("source", "id"):
                raise FieldError(f"{where}.{key}", "unknown field; a device has source and id")
        source = item.get("source")
        if source not in SOURCES:
            raise FieldError(f"{where}.source", 'must be "ble" or "ant"')
        device_id = item.get("id")
        if not isinstance(device_id, str) or not DEVICE_ID_PATTERN.match(device_id.strip()):
            raise FieldError(f"{where}.id", "must be a device id as GET /api/devices shows it")
        device = (str(source), device_id.strip().upper())
        if device in out:
            raise FieldError(f"{where}.id", "listed twice")
        out.append(device)
    return tuple(out)


# -- edits of the store's list (all return a new list) ----------------------------------------


def put(stored: Iterable[AthleteRecord], record: AthleteRecord) -> list[AthleteRecord]:
    """Create or replace `record`; its devices leave whichever other stored athlete had them."""
    taken = set(record.devices)
    out: list[AthleteRecord] = []
    for other in stored:
        if other.id == record.id:
            continue
        if taken.intersection(other.devices):
            kept = tuple(d for d in other.devices if d not in taken)
            out.append(replace(other, devices=kept))
        else:
            out.append(other)
    out.append(replace(record, origin=STORE))
    return out


def delete(stored: Iterable[AthleteRecord], athlete_id: str) -> list[AthleteRecord]:
    return [record for record in stored if record.id != athlete_id]


# -- the merge --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Merged:
    athletes: list[AthleteRecord] = field(default_factory=list)

    def by_id(self, athlete_id: str) -> AthleteRecord | None:
        return next((a for a in self.athletes if a.id == athlete_id), None)

    def roster(self, *, track_unknown: bool) -> Roster:
        devices = {device: a.id for a in self.athletes for device in a.devices}
        return Roster([a.info() for a in self.athletes], devices, track_unknown=track_unknown)


def merge(base: Iterable[AthleteRecord], stored: Iterable[AthleteRecord]) -> Merged:
    """The running roster: the config's athletes (`base`) overlaid by the store's (see top)."""
    stored = list(stored)
    replaced = {record.id for record in stored}
    claimed = {device for record in stored for device in record.devices}
    out = [
        replace(a, devices=tuple(d for d in a.devices if d not in claimed), origin=CONFIG)
        for a in base
        if a.id not in replaced
    ]
    out.extend(replace(record, origin=STORE) for record in stored)
    out.sort(key=lambda a: a.id)
    return Merged(out)


def from_info(info: AthleteInfo, devices: Iterable[Device]) -> AthleteRecord:
    """A config (or simulated) athlete as a record, for the merge."""
    return AthleteRecord(
        id=info.uid,
        name=info.name,
        max_hr=info.max_hr,
        age=info.age,
        weight_kg=info.weight_kg,
        sex=info.sex,
        devices=tuple((source, device_id.upper()) for source, device_id in devices),
        wheel_circumference_m=info.wheel_circumference_m,
        origin=CONFIG,
    )


def base_records(roster: Roster) -> list[AthleteRecord]:
    """Every athlete of a config-built roster, with the devices it names."""
    owned: dict[str, list[Device]] = {}
    for device, uid in roster.devices().items():
        owned.setdefault(uid, []).append(device)
    return [from_info(info, owned.get(info.uid, [])) for info in roster.athletes()]
