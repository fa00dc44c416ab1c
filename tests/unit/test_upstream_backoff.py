"""What each close code means for the next attempt, and the reconnect backoff's bounds."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from gatewayd.clock import ManualClock
from gatewayd.config import UpstreamConfig
from gatewayd.hub import Hub
from gatewayd.sinks.upstream import UpstreamSink
from gatewayd.spool import Spool


def sink(tmp_path: Path, **kw: object) -> UpstreamSink:
    settings: dict[str, object] = {"enabled": True, "url": "ws://127.0.0.1:9/c", "token": "t" * 8}
    settings.update(kw)
    return UpstreamSink(
        Hub().subscribe("t"),
        UpstreamConfig(**settings),  # type: ignore[arg-type]
        spool=Spool(tmp_path / "s.db", clock=ManualClock()),
        env={"TERRA_API_KEY": "k"},
        rng=random.Random(7),
        clock=ManualClock(),
    )


@pytest.mark.parametrize("code", [4000, 4003, 4004, 1003, 1007])
def test_codes_that_retrying_will_not_fix_back_off_long_and_loudly(
    tmp_path: Path, code: int, caplog: pytest.LogCaptureFixture
) -> None:
    lane = sink(tmp_path, fatal_backoff_s=900.0).lanes["*"]
    assert lane.close_delay(code, f"the server closed with {code}", was_ready=True) == 900.0
    assert [r.levelname for r in caplog.records] == ["ERROR"]


def test_a_refused_static_token_is_loud_and_names_the_key(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    up = sink(tmp_path, mode="terra", token=None, tokens={"ann": "ann-token-1"})
    assert up.lanes["ann"].close_delay(4001, "closed", was_ready=False) == 300.0
    assert "fix outputs.upstream.tokens.ann" in caplog.records[-1].getMessage()


def test_a_refused_minted_token_is_minted_again_at_once_then_with_backoff(tmp_path: Path) -> None:
    up = sink(tmp_path, mode="terra", token=None, terra_user_ids={"ann": "u1"}, dev_id="d")
    lane = up.lanes["ann"]
    assert lane.close_delay(4001, "closed", was_ready=False) == 0.0
    delays = [lane.close_delay(4001, "closed", was_ready=False) for _ in range(8)]
    assert all(0.5 <= d <= 30.0 for d in delays) and delays[-1] >= 15.0


@pytest.mark.parametrize("code", [1000, 1001, 1006, 1011, 4002, 4005])
def test_other_closes_reconnect_with_exponential_jittered_backoff(
    tmp_path: Path, code: int
) -> None:
    lane = sink(tmp_path).lanes["*"]
    delays = [lane.close_delay(code, "closed", was_ready=True) for _ in range(10)]
    # doubling from 1 s to the 30 s cap, each drawn from the upper half of its ceiling
    for attempt, delay in enumerate(delays):
        ceiling = min(30.0, 2.0**attempt)
        assert ceiling / 2 <= delay <= ceiling
    assert len(set(delays)) > 5, "jitter spreads reconnecting hubs apart"


def test_the_backoff_caps_come_from_the_config(tmp_path: Path) -> None:
    lane = sink(tmp_path, backoff_min_s=0.1, backoff_max_s=2.0).lanes["*"]
    delays = [lane.close_delay(1006, "closed", was_ready=False) for _ in range(12)]
    assert 0.05 <= delays[0] <= 0.1 and max(delays) <= 2.0
