"""Terra's token endpoints on the real broker's port, then the minted token in a real IDENTIFY.

Codes and bodies as Terra's OpenAPI for the streaming API (tryterra/openapi `dist/core/
rt-bundled.yaml`, 2026.07.07, paths./auth/developer and ./auth/user); single use and expiry as its
description says ("a single-use, short-lived token"), on an injected clock.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from pydantic import SecretStr

from gatewayd import config as cfg
from gatewayd import protocol as p
from gatewayd.config import Developer
from gatewayd.model import DataType, Sample
from tests import terra_asyncapi as spec
from tests.integration.test_broker import T0, WAIT, Harness, client, closed_with, recv_json

DEV = "gym-one"
KEY = "the-gym-api-key-0123456789"


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[Harness]:
    h = Harness(
        tmp_path,
        developers=[Developer(dev_id=DEV, api_key=SecretStr(KEY))],
        minted_token_ttl_s=120.0,
    )
    await h.start()
    yield h
    await h.stop()


def post(h: Harness, target: str, headers: dict[str, str]) -> tuple[int, str]:
    assert h.broker is not None
    request = urllib.request.Request(
        f"http://127.0.0.1:{h.broker.port}{target}", data=b"", method="POST", headers=headers
    )
    try:
        with urllib.request.urlopen(request, timeout=WAIT) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


async def mint(h: Harness, target: str = "/auth/developer", **headers: str) -> str:
    sent = headers or {"dev-id": DEV, "x-api-key": KEY}
    status, body = await asyncio.to_thread(post, h, target, sent)
    assert status == 200, body
    answer = json.loads(body)
    assert spec.token_answer_errors(answer) == []
    token = answer["token"]
    assert isinstance(token, str)
    return token


async def test_a_developer_token_works_once(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    token = await mint(harness)
    async with client(harness, token=token) as ws:  # READY
        harness.hub.publish(Sample("a1", DataType.HEART_RATE, T0, val=70))
        assert (await recv_json(ws))["d"]["val"] == 70
    async with client(harness, token=None) as ws:  # single use: the second IDENTIFY is refused
        await ws.send(p.identify(token, p.Role.CONSUMER))
        assert await closed_with(ws) == 4001
    # Basic auth works as well, and each answer is a new token.
    basic = base64.b64encode(f"{DEV}:{KEY}".encode()).decode()
    again = await mint(harness, Authorization=f"Basic {basic}")
    assert again != token
    async with client(harness, token=again):
        pass
    ours = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("gatewayd"))
    assert "minted a single-use consumer token" in ours
    assert KEY not in ours and token not in ours and again not in ours
    stored = (harness.tmp / "state" / "tokens.json").read_text()
    assert token not in stored and KEY not in stored  # hashed, like CLI tokens


async def test_a_user_token_submits_for_that_athlete_only(harness: Harness) -> None:
    token = await mint(harness, "/auth/user?id=alice")
    async with (
        client(harness) as consumer,
        client(harness, token=token, role=p.Role.PRODUCER) as producer,
    ):
        await producer.send('{"op": 6, "t": "HEART_RATE", "d": {"val": 88}}')
        got = await recv_json(consumer)
        assert (got["uid"], got["d"]["val"]) == ("alice", 88)
    # a producer token is not a consumer token
    other = await mint(harness, "/auth/user?id=alice")
    async with client(harness, token=None) as ws:
        await ws.send(p.identify(other, p.Role.CONSUMER))
        assert await closed_with(ws) == 4001


async def test_minted_tokens_expire_on_the_injected_clock(harness: Harness) -> None:
    token = await mint(harness)
    harness.clock.advance(121.0)  # minted_token_ttl_s is 120
    async with client(harness, token=None) as ws:
        await ws.send(p.identify(token, p.Role.CONSUMER))
        assert await closed_with(ws) == 4001
    fresh = await mint(harness)
    harness.clock.advance(119.0)
    async with client(harness, token=fresh):
        pass


@pytest.mark.parametrize(
    ("target", "headers", "status"),
    [
        ("/auth/developer", {}, 400),
        ("/auth/developer", {"dev-id": DEV}, 400),
        ("/auth/developer", {"Authorization": "Basic not-base64!"}, 400),
        ("/auth/developer", {"dev-id": DEV, "x-api-key": "wrong"}, 403),
        ("/auth/developer", {"dev-id": "someone", "x-api-key": KEY}, 403),
        ("/auth/user?id=alice", {"dev-id": DEV, "x-api-key": "wrong"}, 403),
        ("/auth/user", {"dev-id": DEV, "x-api-key": KEY}, 400),  # no `id`
    ],
)
async def test_missing_and_wrong_credentials(
    harness: Harness, target: str, headers: dict[str, str], status: int
) -> None:
    got, body = await asyncio.to_thread(post, harness, target, headers)
    assert got == status
    assert "token" not in json.loads(body)
    assert not (harness.tmp / "state" / "tokens.json").exists()  # nothing minted


async def test_without_developers_the_endpoints_refuse(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    await h.start()
    try:
        got, _ = await asyncio.to_thread(
            post, h, "/auth/developer", {"dev-id": DEV, "x-api-key": KEY}
        )
        assert got == 403
    finally:
        await h.stop()


def test_developers_are_settable_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "GATEWAYD_OUTPUTS__LOCAL_BROKER__DEVELOPERS", json.dumps([{"dev_id": DEV, "api_key": KEY}])
    )
    loaded = cfg.load(None, defaults_run_simulator=False)
    [developer] = loaded.outputs.local_broker.developers
    assert developer.dev_id == DEV and developer.api_key is not None
    assert developer.api_key.get_secret_value() == KEY
    assert KEY not in repr(loaded)
