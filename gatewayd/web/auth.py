"""Terra's token endpoints on the broker's port: `POST /auth/developer` and `POST /auth/user?id=`.

Terra's clients mint a single-use token before every (re)connect (Terra's OpenAPI for the
streaming API, `rt.yaml`): a consumer with `/auth/developer`, a producer with
`/auth/user?id=<user>`, authenticated by the `dev-id` and `x-api-key` headers or by
`Authorization: Basic base64(dev-id:api-key)`. Answers as Terra's: 200 `{"token": ...}`, 400
for missing or malformed credentials (or a missing `id`), 403 for credentials that do not match.

Pure: the request comes in as method, target and headers; minting is a callback (the broker's
token store), so nothing here touches a socket or a file after start-up. An unauthenticated
request costs one hash and one constant-time comparison, and nothing is logged about it beyond a
count: never a key, never a token.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from gatewayd.config import Developer
from gatewayd.errors import ConfigError
from gatewayd.web import Page

DEVELOPER_PATH = "/auth/developer"
USER_PATH = "/auth/user"
PATHS = frozenset({DEVELOPER_PATH, USER_PATH})
# Athlete ids as the config allows them (config.Athlete.id).
_USER_ID = re.compile(r"^[A-Za-z0-9_.:@-]{1,64}$")
_MAX_CREDENTIAL = 512  # longer headers are malformed, and never hashed
_JSON = "application/json"
_HEADERS: tuple[tuple[str, str], ...] = (("X-Content-Type-Options", "nosniff"),)

# mint(role, athlete or None) -> the token (its hash is what the store keeps)
Mint = Callable[[str, str | None], str]


def load_developers(developers: Iterable[Developer], key: str) -> dict[str, bytes]:
    """dev_id -> SHA-256 of its API key. Reads `api_key_file`s now, so a bad one stops start-up
    (ConfigError naming the key); only digests are kept in memory afterwards."""
    out: dict[str, bytes] = {}
    for i, developer in enumerate(developers):
        if developer.api_key is not None:
            secret = developer.api_key.get_secret_value()
        else:
            assert developer.api_key_file is not None  # the config model requires one of them
            where = f"{key}.{i}.api_key_file"
            try:
                secret = Path(developer.api_key_file).read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise ConfigError(
                    where, f"cannot read {developer.api_key_file}: {exc.strerror}"
                ) from None
            if not secret:
                raise ConfigError(
                    where, f"{developer.api_key_file} is empty: put the API key in it"
                )
        out[developer.dev_id] = _digest(secret)
    return out


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("utf-8")).digest()


class TokenEndpoints:
    """Answers the two token paths; `respond` returns None for every other path."""

    def __init__(self, developers: Mapping[str, bytes], mint: Mint) -> None:
        self.developers = dict(developers)
        self.mint = mint
        # Compared against when the dev-id is unknown, so both cases take the same time.
        self._decoy = _digest("no developer has this key")
        self.answered: dict[int, int] = {}  # status -> count (metrics, tests)

    def respond(self, method: str, target: str, headers: Mapping[str, str]) -> Page | None:
        path, _, query = target.partition("?")
        if path not in PATHS:
            return None
        page = self._answer(method, path, query, headers)
        self.answered[page.status] = self.answered.get(page.status, 0) + 1
        return page

    def _answer(self, method: str, path: str, query: str, headers: Mapping[str, str]) -> Page:
        if method != "POST":
            return Page(405, _JSON, _error("use POST"), (*_HEADERS, ("Allow", "POST")))
        if not self.developers:
            return _page(403, _error("no developers are configured on this hub"))
        credentials = _credentials(headers)
        if credentials is None:
            return _page(
                400,
                _error("send the dev-id and x-api-key headers, or Authorization: Basic"),
            )
        dev_id, api_key = credentials
        known = self.developers.get(dev_id)
        matches = hmac.compare_digest(_digest(api_key), known or self._decoy)
        if known is None or not matches:
            return Page(403, _JSON, _error("invalid developer credentials"), _HEADERS, True)
        if path == DEVELOPER_PATH:
            return _page(200, json.dumps({"token": self.mint("consumer", None)}))
        user = _query_id(query)
        if user is None:
            return _page(400, _error("missing or invalid `id` (the athlete's id)"))
        return _page(200, json.dumps({"token": self.mint("producer", user)}))


def _credentials(headers: Mapping[str, str]) -> tuple[str, str] | None:
    dev_id = headers.get("dev-id")
    api_key = headers.get("x-api-key")
    if dev_id is not None or api_key is not None:
        if not dev_id or not api_key:
            return None
        return _bounded(dev_id.strip(), api_key.strip())
    authorization = headers.get("authorization")
    if authorization is None or len(authorization) > 2 * _MAX_CREDENTIAL:
        return None
    scheme, _, encoded = authorization.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        return None
    dev_id, colon, api_key = decoded.partition(":")
    if not colon or not dev_id or not api_key:
        return None
    return _bounded(dev_id, api_key)


def _bounded(dev_id: str, api_key: str) -> tuple[str, str] | None:
    if not dev_id or not api_key or len(dev_id) + len(api_key) > _MAX_CREDENTIAL:
        return None
    return dev_id, api_key


def _query_id(query: str) -> str | None:
    try:
        values = urllib.parse.parse_qs(query, strict_parsing=False, max_num_fields=8)
    except ValueError:
        return None
    ids = values.get("id", [])
    if len(ids) != 1 or not _USER_ID.match(ids[0]):
        return None
    return ids[0]


def _page(status: int, body: str) -> Page:
    return Page(status, _JSON, body, _HEADERS)


def _error(message: str) -> str:
    return json.dumps({"error": message})
