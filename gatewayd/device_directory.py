"""PURE. Every device the hub hears, for staff enrolling straps (GET /api/devices).

Fed from the pipeline, never from the radios' sockets: devices the roster routes are the
aggregator's (it already keeps last heard, RSSI and battery per device, so the hot path pays
nothing more); devices the roster ignores (`hub.unknown_devices: ignore`) are noted here per
frame, so a strap can be enrolled even on a hub that ignores strangers.

Order, for "put your strap on and come to the desk": devices heard in the last LIVE_S seconds
first, strongest signal first; then the others, most recently heard first.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from gatewayd.aggregate import HeardDevice
from gatewayd.model import Frame, format_ts

LIVE_S = 10.0
MAX_IGNORED = 1000  # a bound on what strangers can make the hub remember
MAX_KINDS = 10_000

# Frame.kind -> what the device is (the first non-auxiliary kind it sent names it).
KIND_NAMES: dict[str, str] = {
    "2a37": "heart_rate",
    "mfr:006b": "heart_rate",
    "2a63": "power",
    "2a5b": "speed_cadence",
    "2a53": "running",
    "2ad2": "bike",
    "2acd": "treadmill",
    "2ad1": "rower",
    "ant:120": "heart_rate",
    "ant:11": "power",
    "ant:17": "fitness_equipment",
    "ant:121": "speed_cadence",
    "ant:122": "cadence",
    "ant:123": "speed",
    "ant:124": "footpod",
}
# Data type -> kind, for a device whose frames so far were auxiliary (battery, body location).
_TYPE_KINDS = {
    "HEART_RATE": "heart_rate",
    "POWER": "power",
    "BIKE_CADENCE": "cadence",
    "SPEED": "speed",
    "STEPS_CADENCE": "footpod",
}


@dataclass(slots=True)
class _Ignored:
    kind: str
    last_wall: float
    rssi: int | None


class DeviceDirectory:
    def __init__(self) -> None:
        self._kinds: dict[tuple[str, str], str] = {}
        self._ignored: dict[tuple[str, str], _Ignored] = {}

    def first_frame(self, source: str, device_id: str, kind: str) -> None:
        """A device's first frame (per roster): remember what it is, if the kind says so."""
        name = KIND_NAMES.get(kind)
        known = self._kinds
        if name is not None and (source, device_id) not in known and len(known) < MAX_KINDS:
            known[(source, device_id)] = name

    def ignored(self, frame: Frame) -> None:
        """A frame the roster drops: the device is still listed."""
        key = (frame.source, frame.device_id)
        entry = self._ignored.get(key)
        if entry is None:
            if len(self._ignored) >= MAX_IGNORED:
                oldest = min(self._ignored, key=lambda k: self._ignored[k].last_wall)
                del self._ignored[oldest]
            name = KIND_NAMES.get(frame.kind, "")
            self._ignored[key] = _Ignored(name, frame.wall, frame.rssi)
            return
        entry.last_wall = frame.wall
        if frame.rssi is not None:
            entry.rssi = frame.rssi
        if not entry.kind:
            entry.kind = KIND_NAMES.get(frame.kind, "")

    def listing(
        self,
        routed: Iterable[HeardDevice],
        owner: Callable[[str, str], str | None],
        now_wall: float | None = None,
    ) -> list[dict[str, object]]:
        """The API's device list; `owner(source, id)` names the athlete it is enrolled to."""
        rows: dict[tuple[str, str], dict[str, object]] = {}
        for key, entry in self._ignored.items():
            rows[key] = _row(key, entry.kind, entry.rssi, None, entry.last_wall, owner)
        for device in routed:
            key = (device.source, device.device_id)
            kind = self._kinds.get(key) or next(
                (_TYPE_KINDS[t] for t in device.types if t in _TYPE_KINDS), ""
            )
            rows[key] = _row(key, kind, device.rssi, device.battery, device.last_wall, owner)
        seen = {key: float(str(row["last_seen"])) for key, row in rows.items()}
        newest = now_wall if now_wall is not None else max(seen.values(), default=0.0)

        def order(key: tuple[str, str]) -> tuple[int, float]:
            rssi = rows[key]["rssi"]
            if newest - seen[key] <= LIVE_S:
                return (0, -(float(str(rssi)) if rssi is not None else -200.0))
            return (1, -seen[key])

        out = []
        for key in sorted(rows, key=order):
            row = rows[key]
            row["last_seen"] = format_ts(seen[key])
            out.append(row)
        return out


def _row(
    key: tuple[str, str],
    kind: str,
    rssi: int | None,
    battery: float | None,
    last_wall: float,
    owner: Callable[[str, str], str | None],
) -> dict[str, object]:
    source, device_id = key
    return {
        "source": source,
        "id": device_id,
        "kind": kind or None,
        "rssi": rssi,
        "battery": battery,
        "last_seen": last_wall,
        "athlete": owner(source, device_id),
    }
