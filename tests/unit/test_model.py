from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gatewayd.model import DataType, Sample, format_ts, parse_ts


def test_timestamps_are_rfc3339_utc_with_milliseconds_and_z():
    assert format_ts(1_795_000_000.0) == "2026-11-18T11:06:40.000Z"
    assert format_ts(1_795_000_000.1234) == "2026-11-18T11:06:40.123Z"
    assert parse_ts("2026-11-18T11:06:40.000Z") == 1_795_000_000.0
    assert parse_ts("2026-11-18T12:06:40+01:00") == 1_795_000_000.0


def test_a_timestamp_without_offset_is_refused():
    with pytest.raises(ValueError, match="no UTC offset"):
        parse_ts("2026-11-18T11:06:40")


def test_sample_payload_is_val_or_d():
    assert Sample("a", DataType.HEART_RATE, 0.0, val=71).payload() == {
        "ts": "1970-01-01T00:00:00.000Z",
        "val": 71,
    }
    assert Sample("a", DataType.RR_INTERVAL, 0.0, d=(800.0, 790.0)).payload()["d"] == [800.0, 790.0]


def test_data_types_carry_terras_names():
    assert {t.value for t in DataType} >= {
        "HEART_RATE", "RR_INTERVAL", "POWER", "BIKE_CADENCE", "SPEED", "DISTANCE", "STEPS",
        "STEPS_CADENCE", "CALORIES",
    }  # fmt: skip


def _reference_ts(unix_seconds: float) -> str:
    moment = datetime.fromtimestamp(unix_seconds, tz=UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


@given(
    st.one_of(
        st.floats(min_value=-2e9, max_value=4e9),
        # half a microsecond either side of a whole one, where the rounding decides
        st.builds(
            lambda s, us, half: s + (us + half) / 1e6,
            st.integers(min_value=0, max_value=4_000_000_000),
            st.integers(min_value=-1, max_value=1_000_000),
            st.sampled_from([-0.5, 0.0, 0.5]),
        ),
    )
)
def test_format_ts_is_what_datetime_writes(unix_seconds: float) -> None:
    # The calendar part is cached per second and the fraction rounded by hand; datetime's own
    # fromtimestamp (round half to even, to the microsecond) is the reference.
    format_ts.cache_clear()
    assert format_ts(unix_seconds) == _reference_ts(unix_seconds)
