"""Terra's token endpoints as a pure handler: codes and bodies as Terra's OpenAPI for the streaming
token endpoints (tryterra/openapi `dist/core/rt-bundled.yaml`, 2026.07.07) has them."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from pydantic import SecretStr

from gatewayd.config import Developer
from gatewayd.errors import ConfigError
from gatewayd.web.auth import TokenEndpoints, load_developers
from tests import terra_asyncapi as spec

KEY = "k3y-of-the-gym-0123456789"


def endpoints() -> tuple[TokenEndpoints, list[tuple[str, str | None]]]:
    minted: list[tuple[str, str | None]] = []

    def mint(role: str, athlete: str | None) -> str:
        minted.append((role, athlete))
        return f"tok{len(minted)}"

    developers = load_developers([Developer(dev_id="gym", api_key=SecretStr(KEY))], "x")
    return TokenEndpoints(developers, mint), minted


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


GOOD = {"dev-id": "gym", "x-api-key": KEY}


def test_developer_token_with_headers_or_basic() -> None:
    auth, minted = endpoints()
    for headers in (GOOD, {"authorization": basic("gym", KEY)}):
        page = auth.respond("POST", "/auth/developer", headers)
        assert page is not None and page.status == 200 and not page.refused
        assert page.content_type == "application/json"
        body = json.loads(page.text)
        assert spec.token_answer_errors(body) == []  # 200: {"token": string}
    assert minted == [("consumer", None), ("consumer", None)]


def test_user_token_is_for_the_named_athlete() -> None:
    auth, minted = endpoints()
    page = auth.respond("POST", "/auth/user?id=alice", GOOD)
    assert page is not None and page.status == 200
    assert json.loads(page.text) == {"token": "tok1"}
    assert minted == [("producer", "alice")]


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"dev-id": "gym"},
        {"x-api-key": KEY},
        {"dev-id": "", "x-api-key": KEY},
        {"authorization": "Bearer abc"},
        {"authorization": "Basic !!!notbase64"},
        {"authorization": "Basic " + base64.b64encode(b"no-colon").decode()},
        {"dev-id": "gym", "x-api-key": "x" * 600},
    ],
)
def test_missing_or_malformed_credentials_are_400(headers: dict[str, str]) -> None:
    auth, minted = endpoints()
    page = auth.respond("POST", "/auth/developer", headers)
    assert page is not None and page.status == 400
    assert not page.refused  # no credential to guess with: not counted as a guess
    assert minted == []


@pytest.mark.parametrize(
    "headers",
    [
        {"dev-id": "gym", "x-api-key": "wrong"},
        {"dev-id": "other", "x-api-key": KEY},
        {"authorization": basic("gym", "wrong")},
    ],
)
def test_wrong_credentials_are_403(headers: dict[str, str]) -> None:
    auth, minted = endpoints()
    for target in ("/auth/developer", "/auth/user?id=alice"):
        page = auth.respond("POST", target, headers)
        assert page is not None and page.status == 403
        assert KEY not in page.text
        assert page.refused  # a guess: the broker's brake counts it
    assert minted == []


@pytest.mark.parametrize(
    "target", ["/auth/user", "/auth/user?id=", "/auth/user?id=a/b", "/auth/user?id=a&id=b"]
)
def test_user_token_needs_one_valid_id(target: str) -> None:
    auth, minted = endpoints()
    page = auth.respond("POST", target, GOOD)
    assert page is not None and page.status == 400
    assert minted == []


def test_other_paths_and_methods() -> None:
    auth, _ = endpoints()
    assert auth.respond("POST", "/healthz", GOOD) is None
    page = auth.respond("GET", "/auth/developer", GOOD)
    assert page is not None and page.status == 405
    assert ("Allow", "POST") in page.headers


def test_no_developers_configured_refuses_everyone() -> None:
    auth = TokenEndpoints({}, lambda role, athlete: "never")
    page = auth.respond("POST", "/auth/developer", GOOD)
    assert page is not None and page.status == 403


def test_api_key_file(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n")
    loaded = load_developers([Developer(dev_id="gym", api_key_file=key_file)], "k")
    auth = TokenEndpoints(loaded, lambda role, athlete: "t")
    page = auth.respond("POST", "/auth/developer", GOOD)
    assert page is not None and page.status == 200
    with pytest.raises(ConfigError) as info:
        load_developers([Developer(dev_id="gym", api_key_file=tmp_path / "none")], "outputs.x")
    assert info.value.key == "outputs.x.0.api_key_file"
