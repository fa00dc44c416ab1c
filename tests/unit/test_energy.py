"""CALORIES and zone minutes, against values worked by hand from the published equations.

Keytel et al. 2005 (J Sports Sci 23:289-297), without VO2max, kJ/min:
  man, HR 150, 80 kg, 30 y:   -55.0969 + 0.6309*150 + 0.1988*80 + 0.2017*30
                            = -55.0969 + 94.635 + 15.904 + 6.051 = 61.4931 kJ/min
                            = 61.4931 / 4.184 = 14.6972 kcal/min = 0.244953 kcal/s
  woman, HR 140, 60 kg, 40 y: -20.4022 + 0.4472*140 - 0.1263*60 + 0.074*40
                            = -20.4022 + 62.608 - 7.578 + 2.96 = 37.5878 kJ/min
                            = 8.98370 kcal/min = 0.149728 kcal/s
Power: 200 W for 60 s at gross efficiency 0.22 = 12000 J / 0.22 / 4184 J/kcal = 13.0367 kcal.
"""

from __future__ import annotations

import pytest

from gatewayd.energy import EnergyMeter, kcal_from_heart_rate, kcal_from_power, keytel_kj_per_min
from gatewayd.model import DataType, Sample
from gatewayd.roster import AthleteInfo
from tests.helpers import START_WALL

MAN = AthleteInfo("m", "M", 190, 2.1, age=30, weight_kg=80.0, sex="male")
WOMAN = AthleteInfo("w", "W", 180, 2.1, age=40, weight_kg=60.0, sex="female")
UNKNOWN = AthleteInfo("u", "U", 200, 2.1)
ROSTER = {a.uid: a for a in (MAN, WOMAN, UNKNOWN)}


def test_keytel_matches_the_hand_computed_values() -> None:
    assert keytel_kj_per_min(150, 80, 30, "male") == pytest.approx(61.4931, abs=1e-4)
    assert kcal_from_heart_rate(150, 80, 30, "male", 60) == pytest.approx(14.6972, abs=1e-4)
    assert keytel_kj_per_min(140, 60, 40, "female") == pytest.approx(37.5878, abs=1e-4)
    assert kcal_from_heart_rate(140, 60, 40, "female") == pytest.approx(0.149728, abs=1e-6)
    assert kcal_from_heart_rate(40, 50, 20, "male") == 0.0  # negative kJ/min counts as none


def test_power_matches_the_hand_computed_value() -> None:
    assert kcal_from_power(200, 0.22, 60) == pytest.approx(13.0367, abs=1e-4)
    assert kcal_from_power(-5) == 0.0


def run(
    meter: EnergyMeter, seconds: int, uid: str, start: float = START_WALL, **values: float
) -> list[Sample]:
    out: list[Sample] = []
    for n in range(seconds):
        batch = [Sample(uid, DataType[t], start + n, val=v) for t, v in values.items()]
        out += meter.observe(batch, ROSTER.get)
    return out


def test_a_minute_of_heart_rate_accumulates_kcal() -> None:
    meter = EnergyMeter(zone4_pct=80)
    out = run(meter, 60, "m", HEART_RATE=150)
    assert len(out) == 60 and all(s.t is DataType.CALORIES and s.uid == "m" for s in out)
    assert [s.ts for s in out] == [START_WALL + n for n in range(60)]
    assert out[0].val == pytest.approx(0.245, abs=1e-3)
    assert out[-1].val == pytest.approx(14.697, abs=1e-3)
    assert run(meter, 1, "w", HEART_RATE=140)[0].val == pytest.approx(0.150, abs=1e-3)


def test_power_wins_over_heart_rate_and_needs_no_personal_data() -> None:
    meter = EnergyMeter(zone4_pct=80)
    out = run(meter, 60, "m", HEART_RATE=150, POWER=200)
    assert out[-1].val == pytest.approx(13.037, abs=1e-3)
    coasting = run(meter, 1, "m", start=START_WALL + 60, HEART_RATE=150, POWER=0)
    assert coasting[0].val == pytest.approx(13.037 + 0.245, abs=1e-3)  # back to heart rate
    assert run(meter, 10, "u", HEART_RATE=150) == []  # no age, weight, sex: nothing
    assert run(meter, 1, "u", POWER=100)[0].val == pytest.approx(0.109, abs=1e-3)


def test_a_device_that_reports_calories_keeps_its_own() -> None:
    meter = EnergyMeter(zone4_pct=80)
    assert run(meter, 3, "m", HEART_RATE=150, CALORIES=12) == []
    assert run(meter, 3, "m", start=START_WALL + 3, HEART_RATE=150) == []  # for the workout
    assert meter.workouts()["m"]["kcal"] is None


def test_zone_minutes_count_seconds_at_or_above_the_zone_4_bound() -> None:
    meter = EnergyMeter(zone4_pct=80)  # UNKNOWN's max HR 200: zone 4 from 160 bpm
    run(meter, 90, "u", HEART_RATE=160)
    run(meter, 30, "u", start=START_WALL + 90, HEART_RATE=159)
    summary = meter.workouts()["u"]
    assert summary == {"since": "2027-01-15T08:00:00.000Z", "kcal": None, "zone_minutes": 1.5}
    nobody = EnergyMeter(zone4_pct=80)
    run(nobody, 60, "stranger", HEART_RATE=190)  # no max HR anywhere: no zones
    assert nobody.workouts()["stranger"]["zone_minutes"] == 0.0
    fallback = EnergyMeter(zone4_pct=80, default_max_hr=200)
    run(fallback, 60, "stranger", HEART_RATE=190)
    assert fallback.workouts()["stranger"]["zone_minutes"] == 1.0


def test_a_workout_ends_after_the_athlete_is_gone_long_enough() -> None:
    meter = EnergyMeter(zone4_pct=80, end_after_s=600)
    first = run(meter, 60, "m", HEART_RATE=150)
    back_soon = run(meter, 1, "m", start=START_WALL + 59 + 600, HEART_RATE=150)
    assert back_soon[0].val == pytest.approx(first[-1].val + 0.245, abs=1e-3)  # same workout
    later = START_WALL + 59 + 600 + 601
    new = run(meter, 1, "m", start=later, HEART_RATE=150)
    assert new[0].val == pytest.approx(0.245, abs=1e-3)  # a new workout starts from 0
    assert meter.workouts()["m"]["since"] == "2027-01-15T08:21:00.000Z"  # START_WALL + 1260 s
    run(meter, 1, "w", start=later + 601, HEART_RATE=140)
    assert set(meter.workouts()) == {"w"}  # m's workout ended and is forgotten


def test_the_pipeline_publishes_calories_for_simulated_athletes() -> None:
    from tests.helpers import SimulatedRoom

    room = SimulatedRoom(athletes=2, bike_fraction=0.5)
    room.pipeline.energy = EnergyMeter(zone4_pct=80)
    room.run_for(10)
    calories = [s for s in room.samples() if s.t is DataType.CALORIES]
    # sim-01 rides with a power meter; sim-02 runs on heart rate (the simulator gives a profile).
    assert {s.uid for s in calories} == {"sim-01", "sim-02"}
    for uid in ("sim-01", "sim-02"):
        values = [s.val for s in calories if s.uid == uid and s.val is not None]
        assert values == sorted(values) and values[-1] > 0
