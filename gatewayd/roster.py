"""PURE. Which athlete a device belongs to."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class AthleteInfo:
    uid: str
    name: str
    max_hr: int | None
    wheel_circumference_m: float
    # For energy expenditure (gatewayd/energy.py); unknown means no CALORIES from heart rate.
    age: int | None = None
    weight_kg: float | None = None
    sex: str | None = None  # "male" | "female"


DEFAULT_CIRCUMFERENCE_M = 2.105  # 700x25c


class Roster:
    """Maps (source, device id) to an athlete; unknown devices get a stable uid of their own."""

    def __init__(
        self,
        athletes: list[AthleteInfo],
        devices: dict[tuple[str, str], str],
        *,
        track_unknown: bool = True,
    ) -> None:
        self._athletes = {athlete.uid: athlete for athlete in athletes}
        self._devices = {
            (source, device_id.upper()): uid for (source, device_id), uid in devices.items()
        }
        self.track_unknown = track_unknown

    def uid_for(self, source: str, device_id: str) -> str | None:
        """The athlete's uid, `source:device id` for an unknown device, or None to ignore it."""
        uid = self._devices.get((source, device_id.upper()))
        if uid is not None:
            return uid
        return f"{source}:{device_id.upper()}" if self.track_unknown else None

    def owner(self, source: str, device_id: str) -> str | None:
        """The athlete a device is enrolled to, or None (an unknown device has no athlete)."""
        return self._devices.get((source, device_id.upper()))

    def athlete(self, uid: str) -> AthleteInfo | None:
        return self._athletes.get(uid)

    def circumference(self, uid: str) -> float:
        athlete = self._athletes.get(uid)
        return athlete.wheel_circumference_m if athlete else DEFAULT_CIRCUMFERENCE_M

    def athletes(self) -> list[AthleteInfo]:
        return list(self._athletes.values())

    def devices(self) -> dict[tuple[str, str], str]:
        return dict(self._devices)
