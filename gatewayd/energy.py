"""PURE. Energy expenditure (Terra's CALORIES: cumulative kcal) and minutes in zones 4-5, per
athlete and workout, from the per-second samples.

Each second that an athlete has a value, the energy of that second is, in this order:

1. From power, when a power meter gives more than 0 W: the mechanical work of the second divided
   by the gross efficiency of cycling, `P [W] * 1 s / GE / 4184 J/kcal`. GE defaults to 0.22;
   measured gross efficiency of cycling lies around 18-23 % (Ettema & Loras, "Efficiency in
   cycling: a review", Eur J Appl Physiol 106:1-14, 2009). No personal data is needed.
2. From heart rate, for athletes whose age, weight and sex are known: Keytel et al., "Prediction
   of energy expenditure from heart rate monitoring during submaximal exercise", J Sports Sci
   23(3):289-297, 2005, the equation without VO2max, in kJ/min:
       men:   -55.0969 + 0.6309 HR + 0.1988 W + 0.2017 A
       women: -20.4022 + 0.4472 HR - 0.1263 W + 0.074 A
   (HR bpm, W kg, A years), divided by 60 s and 4.184 kJ/kcal. A negative result (very low heart
   rates, outside the study's range) counts as 0: the total never goes down.
3. Otherwise nothing: no CALORIES for that athlete and second.

An athlete whose own device reports CALORIES (a gym machine) keeps the device's figure: nothing
is computed for them, so no consumer sees two CALORIES streams for one athlete.

Zone minutes: seconds with heart rate at or above the zone-4 bound (percent of max HR) count.

A workout begins with an athlete's first sample and ends when they have had none for
`end_after_s`; the next sample starts a new workout, and CALORIES starts again from 0.
Time is the samples' own second stamps, so this module needs no clock.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from gatewayd.model import DataType, Sample, format_ts
from gatewayd.roster import AthleteInfo

KJ_PER_KCAL = 4.184
J_PER_KCAL = 4184.0
DEFAULT_GROSS_EFFICIENCY = 0.22
_new = tuple.__new__

# Keytel et al. 2005, without VO2max: (intercept, HR, weight kg, age years) -> kJ/min.
KEYTEL = {
    "male": (-55.0969, 0.6309, 0.1988, 0.2017),
    "female": (-20.4022, 0.4472, -0.1263, 0.074),
}


def keytel_kj_per_min(hr: float, weight_kg: float, age: float, sex: str) -> float:
    intercept, k_hr, k_weight, k_age = KEYTEL[sex]
    return intercept + k_hr * hr + k_weight * weight_kg + k_age * age


def kcal_from_heart_rate(
    hr: float, weight_kg: float, age: float, sex: str, seconds: float = 1.0
) -> float:
    return max(0.0, keytel_kj_per_min(hr, weight_kg, age, sex)) / KJ_PER_KCAL * seconds / 60.0


def kcal_from_power(
    watts: float, efficiency: float = DEFAULT_GROSS_EFFICIENCY, seconds: float = 1.0
) -> float:
    return max(0.0, watts) * seconds / efficiency / J_PER_KCAL


@dataclass(slots=True)
class Workout:
    start: float  # the first second's ts
    last: float  # the newest second's ts
    kcal: float = 0.0
    computed: bool = False  # a CALORIES value of ours went out this workout
    native: bool = False  # the athlete's device reports CALORIES itself
    zone_s: int = 0  # seconds in zones 4-5

    def summary(self) -> dict[str, object]:
        return {
            "since": format_ts(self.start),
            "kcal": round(self.kcal, 1) if self.computed else None,
            "zone_minutes": round(self.zone_s / 60.0, 1),
        }


class EnergyMeter:
    def __init__(
        self,
        *,
        zone4_pct: float,
        default_max_hr: int | None = None,
        end_after_s: float = 900.0,
        efficiency: float = DEFAULT_GROSS_EFFICIENCY,
    ) -> None:
        self.zone4_pct = zone4_pct
        self.default_max_hr = default_max_hr
        self.end_after_s = end_after_s
        self.efficiency = efficiency
        self._workouts: dict[str, Workout] = {}
        self._newest = 0.0  # the newest second seen: "now" for ending workouts

    def observe(
        self, samples: Iterable[Sample], athlete: Callable[[str], AthleteInfo | None]
    ) -> list[Sample]:
        """The CALORIES samples for a batch of closed seconds (to publish after the batch)."""
        seconds: dict[tuple[str, float], list[float | None]] = {}
        native: set[str] = set()
        heart_rate, power, calories = DataType.HEART_RATE, DataType.POWER, DataType.CALORIES
        for sample in samples:  # every sample of the room's second: keep this loop lean
            t = sample.t
            if t is heart_rate or t is power:
                key = (sample.uid, sample.ts)
                slot = seconds.get(key)
                if slot is None:
                    slot = seconds[key] = [None, None]
                slot[0 if t is heart_rate else 1] = sample.val
            elif t is calories:
                native.add(sample.uid)
                seconds.setdefault((sample.uid, sample.ts), [None, None])
        out: list[Sample] = []
        for (uid, ts), (hr, watts) in seconds.items():
            self._newest = max(self._newest, ts)
            workout = self._workout(uid, ts)
            if uid in native:
                workout.native = True
            info = athlete(uid)
            if hr is not None and self._in_zone_4_or_5(hr, info):
                workout.zone_s += 1
            if workout.native:
                continue
            kcal = self._kcal(hr, watts, info)
            if kcal is None:
                continue
            workout.kcal += kcal
            workout.computed = True
            # tuple.__new__ with every field: one per athlete and second
            out.append(
                _new(Sample, (uid, calories, ts, round(workout.kcal, 3), None, "", "energy"))
            )
        return out

    def workouts(self) -> dict[str, dict[str, object]]:
        """Each athlete's current workout (for the board); ended ones are left out and forgotten."""
        now = self._newest
        for uid in [u for u, w in self._workouts.items() if now - w.last > self.end_after_s]:
            del self._workouts[uid]
        return {uid: w.summary() for uid, w in self._workouts.items()}

    def _workout(self, uid: str, ts: float) -> Workout:
        workout = self._workouts.get(uid)
        if workout is None or ts - workout.last > self.end_after_s:
            workout = self._workouts[uid] = Workout(ts, ts)
        elif ts > workout.last:
            workout.last = ts
        return workout

    def _in_zone_4_or_5(self, hr: float, info: AthleteInfo | None) -> bool:
        max_hr = (info.max_hr if info is not None else None) or self.default_max_hr
        return max_hr is not None and hr * 100.0 >= self.zone4_pct * max_hr

    def _kcal(
        self, hr: float | None, power: float | None, info: AthleteInfo | None
    ) -> float | None:
        if power is not None and power > 0:
            return kcal_from_power(power, self.efficiency)
        if (
            hr is not None
            and hr > 0
            and info is not None
            and info.age is not None
            and info.weight_kg is not None
            and info.sex in KEYTEL
        ):
            assert info.sex is not None
            return kcal_from_heart_rate(hr, info.weight_kg, info.age, info.sex)
        return None
