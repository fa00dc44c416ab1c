"""outputs.upstream: validation that names the key, secrets kept out of reprs and logs."""

from __future__ import annotations

import asyncio
import ssl
import subprocess
from pathlib import Path

import pytest

from gatewayd import config
from gatewayd.config import UpstreamConfig
from gatewayd.errors import ConfigError
from gatewayd.sinks.upstream import Credentials, TokenError, safe_url, tls_context


@pytest.fixture(autouse=True)
def _no_ambient_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GATEWAYD_CONFIG", raising=False)
    monkeypatch.setattr(config, "DEFAULT_CONFIG_PATH", Path("/nonexistent/gatewayd.yaml"))


def load(tmp_path: Path, upstream: str) -> config.Config:
    path = tmp_path / "gatewayd.yaml"
    path.write_text(f"outputs:\n  upstream: {upstream}\n")
    return config.load(path)


@pytest.mark.parametrize(
    ("upstream", "fragment"),
    [
        ("{enabled: true, mode: gatewayd}", "needs `token`"),
        ("{enabled: true, mode: terra}", "needs `tokens`"),
        ("{enabled: true, mode: terra, terra_user_ids: {a: u1}}", "needs `dev_id`"),
        ("{enabled: true, url: 'http://x', token: tttttttt}", "must start with ws:// or wss://"),
        ("{api_base_url: 'ftp://x'}", "must start with http:// or https://"),
        ("{backoff_min_s: 10, backoff_max_s: 5}", "backoff_max_s"),
        ("{tls_client_key: /k.pem}", "tls_client_key needs tls_client_cert"),
        ("{mode: mqtt}", "'terra' or 'gatewayd'"),
        ("{tokenz: {}}", "unknown key"),
    ],
)
def test_bad_upstream_settings_name_the_key(tmp_path: Path, upstream: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, upstream)
    assert caught.value.key.startswith("outputs.upstream")
    assert fragment in str(caught.value)


def test_disabled_needs_no_credentials_and_the_example_config_is_valid(tmp_path: Path) -> None:
    assert not load(tmp_path, "{mode: terra}").outputs.upstream.enabled
    root = Path(__file__).resolve().parents[2]
    assert config.load(root / "config" / "gatewayd.yaml").outputs.upstream.name == "upstream"


def test_tokens_stay_out_of_reprs_and_env_overrides_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GATEWAYD_OUTPUTS__UPSTREAM__TOKEN", "secret-from-env")
    cfg = load(tmp_path, "{enabled: true, mode: terra, tokens: {alice: secret-alice-token}}")
    upstream = cfg.outputs.upstream
    assert upstream.token is not None and upstream.token.get_secret_value() == "secret-from-env"
    assert upstream.tokens["alice"].get_secret_value() == "secret-alice-token"
    assert "secret" not in repr(cfg) and "secret" not in str(upstream)
    # `gatewayd run --simulate` rebuilds the config: secrets survive the round trip
    again = config.override(cfg, {"sources.simulator.athletes": 2})
    assert again.outputs.upstream.tokens["alice"].get_secret_value() == "secret-alice-token"


def terra(**kw: object) -> UpstreamConfig:
    base: dict[str, object] = {
        "enabled": True,
        "mode": "terra",
        "url": "ws://127.0.0.1:9/connect",
        "terra_user_ids": {"alice": "terra-user-1"},
        "dev_id": "dev",
    }
    base.update(kw)
    return UpstreamConfig(**base)  # type: ignore[arg-type]


def test_the_api_key_comes_from_a_file_or_the_environment(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("  key-from-file\n")
    assert Credentials(terra(api_key_file=key_file), env={})._api_key == "key-from-file"
    assert Credentials(terra(), env={"TERRA_API_KEY": "key-from-env"})._api_key == "key-from-env"
    other = terra(api_key_env="MY_KEY")
    assert Credentials(other, env={"MY_KEY": "k2"})._api_key == "k2"


@pytest.mark.parametrize("problem", ["missing", "empty", "no env"])
def test_a_missing_api_key_is_a_config_error_naming_the_fix(tmp_path: Path, problem: str) -> None:
    key_file = tmp_path / "key"
    if problem == "empty":
        key_file.write_text("\n")
    settings = terra(api_key_file=None if problem == "no env" else key_file)
    with pytest.raises(ConfigError) as caught:
        Credentials(settings, env={})
    assert caught.value.key == "outputs.upstream.api_key_file"
    if problem == "no env":
        assert "$TERRA_API_KEY" in str(caught.value)


def test_gatewayd_token_from_a_file(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("hub-token-from-file\n")
    settings = UpstreamConfig(enabled=True, token_file=token_file)
    assert asyncio.run(Credentials(settings).token("*")) == "hub-token-from-file"
    token_file.unlink()
    with pytest.raises(ConfigError) as caught:
        Credentials(settings)
    assert caught.value.key == "outputs.upstream.token_file"


def test_lanes_are_the_athletes_with_credentials() -> None:
    creds = Credentials(terra(tokens={"bob": "bob-token-123"}), env={"TERRA_API_KEY": "k"})
    assert creds.lanes() == ["alice", "bob"]
    assert creds.mints("alice") and not creds.mints("bob")
    assert Credentials(UpstreamConfig(enabled=True, token="t" * 8)).lanes() == ["*"]


def test_an_unreachable_mint_endpoint_is_a_transient_token_error() -> None:
    creds = Credentials(
        terra(api_base_url="http://127.0.0.1:9"), env={"TERRA_API_KEY": "secret-key"}
    )
    with pytest.raises(TokenError) as caught:
        asyncio.run(creds.token("alice"))
    assert not caught.value.fatal
    assert "secret-key" not in str(caught.value) and "terra-user-1" in str(caught.value)


def test_safe_url_drops_credentials_and_query() -> None:
    assert safe_url("wss://user:pw@hub.example:8443/connect?token=x") == (
        "wss://hub.example:8443/connect"
    )


def test_tls_uses_the_system_store_and_a_client_certificate(tmp_path: Path) -> None:
    assert tls_context(UpstreamConfig(url="ws://h/connect")) is None
    context = tls_context(UpstreamConfig(url="wss://h/connect"))
    assert context is not None and context.verify_mode is ssl.CERT_REQUIRED
    assert context.check_hostname
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "1",
            "-subj",
            "/CN=gym",
        ],
        check=True,
        capture_output=True,
    )
    assert tls_context(
        UpstreamConfig(url="wss://h/connect", tls_client_cert=cert, tls_client_key=key)
    )
    with pytest.raises(ConfigError) as caught:
        tls_context(UpstreamConfig(url="wss://h/connect", tls_client_cert=tmp_path / "none.pem"))
    assert caught.value.key == "outputs.upstream.tls_client_cert"
