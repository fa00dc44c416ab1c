"""Token store: config tokens, minted tokens (hashed on disk), single use, expiry, roles."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gatewayd.clock import ManualClock, SystemClock
from gatewayd.tokens import CONSUMER, PRODUCER, TokenStore, parse_duration


def test_config_tokens_carry_roles_and_athletes(tmp_path: Path) -> None:
    store = TokenStore(
        tmp_path,
        consumer_tokens=["c-token-1"],
        producer_tokens=[("p-token-1", ["a", "b"])],
        clock=ManualClock(),
    )
    consumer = store.check("c-token-1", CONSUMER)
    assert consumer is not None and consumer.role == CONSUMER
    assert store.check("c-token-1", PRODUCER) is None
    producer = store.check("p-token-1", PRODUCER)
    assert (
        producer is not None and producer.may_submit_for("a") and not producer.may_submit_for("z")
    )
    assert store.check("nope", CONSUMER) is None
    assert "c-token-1" not in consumer.label


def test_minted_tokens_are_stored_hashed_and_seen_by_another_store(tmp_path: Path) -> None:
    cli = TokenStore(tmp_path, clock=ManualClock())
    daemon = TokenStore(tmp_path, clock=ManualClock())
    assert daemon.check("anything", CONSUMER) is None  # no file yet
    token = cli.create(PRODUCER, athletes=["x"])
    text = (tmp_path / "tokens.json").read_text()
    assert token not in text
    assert (tmp_path / "tokens.json").stat().st_mode & 0o777 == 0o600
    grant = daemon.check(token, PRODUCER)
    assert grant is not None and grant.athletes == frozenset({"x"})
    assert daemon.check(token, PRODUCER) is not None  # reusable unless single-use
    assert daemon.check(token, CONSUMER) is None


def test_single_use_survives_a_restart(tmp_path: Path) -> None:
    token = TokenStore(tmp_path, clock=ManualClock()).create(CONSUMER, single_use=True)
    assert TokenStore(tmp_path, clock=ManualClock()).check(token, CONSUMER) is not None
    assert TokenStore(tmp_path, clock=ManualClock()).check(token, CONSUMER) is None
    used = json.loads((tmp_path / "tokens.json").read_text())["tokens"]
    assert used[0]["used"] is True


def test_ttl_expires(tmp_path: Path) -> None:
    clock = ManualClock()
    store = TokenStore(tmp_path, clock=clock)
    token = store.create(CONSUMER, ttl_s=60)
    clock.advance(59)
    assert store.check(token, CONSUMER) is not None
    clock.advance(1)
    assert store.check(token, CONSUMER) is None
    assert store.purge() == 1
    assert store.minted() == []


def test_a_broken_file_keeps_known_tokens(tmp_path: Path) -> None:
    store = TokenStore(tmp_path, clock=ManualClock())
    token = store.create(CONSUMER)
    assert store.check(token, CONSUMER) is not None
    (tmp_path / "tokens.json").write_text("{ half written")
    assert store.check(token, CONSUMER) is not None


def test_misses_do_not_reread_an_unchanged_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A guesser's wrong tokens cost a stat() each, not a read and parse of tokens.json: with a
    broken file, the complaint (one per read) appears once for a thousand misses, and again
    only after the file changes."""
    store = TokenStore(tmp_path, clock=ManualClock())
    (tmp_path / "tokens.json").write_text("{ not json")
    for i in range(1000):
        assert store.check(f"guess-{i}", CONSUMER) is None
    assert caplog.text.count("cannot read") == 1
    (tmp_path / "tokens.json").write_text("{ still not json, but changed")
    assert store.check("guess", CONSUMER) is None
    assert caplog.text.count("cannot read") == 2


def test_tokens_minted_in_quick_succession_are_all_seen(tmp_path: Path) -> None:
    # Several saves within one tick of the file system's clock: the inode still changes.
    cli = TokenStore(tmp_path, clock=ManualClock())
    daemon = TokenStore(tmp_path, clock=ManualClock())
    for _ in range(20):
        token = cli.create(CONSUMER)
        assert daemon.check(token, CONSUMER) is not None


def test_no_state_dir_cannot_mint() -> None:
    with pytest.raises(Exception, match="state"):
        TokenStore(None, clock=ManualClock()).create(CONSUMER)


@pytest.mark.parametrize(
    ("text", "seconds"), [("90", 90), ("90s", 90), ("15m", 900), ("12h", 43200), ("7d", 604800)]
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "abc", "-5", "0", "5w"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def test_cli_token_create_prints_a_token_the_store_accepts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from gatewayd import cli

    config = tmp_path / "gatewayd.yaml"
    config.write_text(f"hub: {{state_dir: {tmp_path / 'state'}}}\n")
    args = ["token", "create", "--config", str(config), "--role", "producer", "--athlete", "al"]
    assert cli.main([*args, "--single-use", "--ttl", "1h"]) == 0
    token = capsys.readouterr().out.strip()
    # The CLI stamps the TTL from the system clock, so the daemon's view is read on the same one.
    grant = TokenStore(tmp_path / "state", clock=SystemClock()).check(token, PRODUCER)
    assert grant is not None and grant.athletes == frozenset({"al"})
    assert cli.main(["token", "list", "--config", str(config)]) == 0
    listing = capsys.readouterr().out
    assert '"used": true' in listing and token not in listing
    assert (
        cli.main(
            ["token", "create", "--config", str(config), "--role", "consumer", "--ttl", "soon"]
        )
        == 2
    )
