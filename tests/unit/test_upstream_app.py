"""How the app wires the upstream: one spool, exactly one component appending to it."""

from __future__ import annotations

from pathlib import Path

import pytest

from gatewayd import config
from gatewayd.app import App
from gatewayd.clock import ManualClock
from gatewayd.sinks.local_broker import LocalBroker
from gatewayd.spool import Spool

UPSTREAM = "{enabled: true, url: 'ws://127.0.0.1:9/connect', token: hub-token-123}"


@pytest.fixture(autouse=True)
def _no_ambient_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GATEWAYD_CONFIG", raising=False)
    monkeypatch.setattr(config, "DEFAULT_CONFIG_PATH", Path("/nonexistent/gatewayd.yaml"))


def app(tmp_path: Path, broker: bool, upstream: str) -> App:
    path = tmp_path / "gatewayd.yaml"
    path.write_text(
        f"hub: {{state_dir: {tmp_path / 'state'}}}\n"
        "outputs:\n"
        f"  local_broker: {{enabled: {str(broker).lower()}, port: 0}}\n"
        f"  upstream: {upstream}\n"
    )
    return App(config.load(path))


def test_with_the_broker_the_broker_appends_and_the_upstream_reads(tmp_path: Path) -> None:
    built = app(tmp_path, broker=True, upstream=UPSTREAM)
    assert built.upstream is not None and built.spool is not None
    broker = next(s for s in built.sinks if isinstance(s, LocalBroker))
    assert broker.spool is built.spool is built.upstream.spool
    assert not built.upstream.append
    health = built.health()
    assert health["upstream"]["state"] == "idle" and health["upstream"]["backlog"] == 0
    assert health["upstream_connected"] == 1 and health["spool_evicted"] == 0
    assert built.spool.cursors() == {"upstream": 0}, "retention waits for the upstream"
    built.spool.close()


def test_without_the_broker_the_upstream_appends(tmp_path: Path) -> None:
    built = app(tmp_path, broker=False, upstream=UPSTREAM)
    assert built.upstream is not None and built.upstream.append
    assert built.spool is built.upstream.spool
    built.spool.close()


def test_an_upstream_switched_off_releases_its_cursor(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "state" / "spool.db", clock=ManualClock())
    spool.set_cursor("upstream", 5)
    spool.set_cursor("upstream/alice", 9)
    spool.set_cursor("other", 3)
    spool.close()
    built = app(tmp_path, broker=True, upstream="{enabled: false}")
    assert built.upstream is None and built.spool is not None
    assert built.spool.cursors() == {"other": 3}
    assert built.health()["upstream"] is None
    built.spool.close()
