"""The admin page (`/admin`) and the JSON API it uses (`/api/...`), for staff on a tablet.

    GET    /api/devices          every device the hub hears, strongest live ones first
    GET    /api/athletes         the roster (config file and admin page merged)
    PUT    /api/athletes/{id}    create or replace one athlete (JSON body)
    DELETE /api/athletes/{id}    remove one athlete the admin page created
    POST   /api/claim            trade the one-time setup link's token for an admin token

Every /api/ call needs `Authorization: Bearer <admin token>` (401 otherwise). A bad body is a 400
whose JSON names the field. This module knows nothing about sockets: the broker hands it the
method, path, Authorization header and body, and sends back the Page it returns.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any, Protocol
from urllib.parse import unquote

from gatewayd.athletes import AthleteRecord, ConfigAthlete, FieldError, UnknownAthlete
from gatewayd.web import Page

log = logging.getLogger(__name__)

ADMIN_ROLE = "admin"
SETUP_ROLE = "admin-setup"
ATHLETES = "/api/athletes"

_FILES: dict[str, tuple[str, str]] = {
    "/admin": ("admin.html", "text/html; charset=utf-8"),
    "/admin.js": ("admin.js", "text/javascript; charset=utf-8"),
    "/admin.css": ("admin.css", "text/css; charset=utf-8"),
}

# The page talks only to its own origin; the admin token lives in the tablet's localStorage.
_HEADERS: tuple[tuple[str, str], ...] = (
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("X-Frame-Options", "DENY"),
    (
        "Content-Security-Policy",
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    ),
)


class Tokens(Protocol):
    def check(self, token: str, role: str) -> Any: ...

    def create(self, role: str) -> str: ...


class Roster(Protocol):
    def athletes(self) -> list[AthleteRecord]: ...

    def put(self, athlete_id: str, body: object) -> tuple[AthleteRecord, bool]: ...

    def delete(self, athlete_id: str) -> None: ...


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    path: str
    authorization: str
    body: bytes


def _json(status: int, value: object) -> Page:
    return Page(status, "application/json", json.dumps(value), _HEADERS)


def _error(status: int, message: str, field: str | None = None) -> Page:
    error: dict[str, object] = {"error": message}
    if field is not None:
        error["field"] = field
    return _json(status, error)


def _refused(message: str, authorization: str) -> Page:
    """401; a token that was sent and is wrong is a guess (the broker's brake counts it)."""
    return dataclasses.replace(_error(401, message), refused=bool(bearer(authorization)))


def bearer(authorization: str) -> str:
    scheme, _, token = authorization.strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


class Admin:
    def __init__(
        self,
        *,
        tokens: Tokens,
        roster: Roster,
        devices: Callable[[], list[dict[str, object]]],
    ) -> None:
        self.tokens = tokens
        self.roster = roster
        self.devices = devices
        self._files: dict[str, str] = {}

    def authorized(self, authorization: str) -> bool:
        """Whether the Authorization header carries an admin token (also gates request bodies)."""
        token = bearer(authorization)
        return bool(token) and self.tokens.check(token, ADMIN_ROLE) is not None

    def handles(self, path: str) -> bool:
        return path in _FILES or path.startswith("/api/")

    def respond(self, request: Request) -> Page:
        path = request.path
        entry = _FILES.get(path)
        if entry is not None:
            if request.method not in ("GET", "HEAD"):
                return _error(405, "use GET")
            name, content_type = entry
            return Page(200, content_type, self._file(name), _HEADERS)
        if path == "/api/claim":
            return self._claim(request)
        if not self.authorized(request.authorization):
            return _refused(
                "missing or wrong admin token (Authorization: Bearer <token>)",
                request.authorization,
            )
        try:
            return self._api(request)
        except FieldError as exc:
            return _error(400, exc.message, exc.field)
        except OSError as exc:
            log.error("cannot save the roster: %s", exc)
            return _error(500, f"cannot save the roster: {exc.strerror or exc}")

    def _api(self, request: Request) -> Page:
        method, path = request.method, request.path
        if path == "/api/devices":
            if method != "GET":
                return _error(405, "use GET")
            return _json(200, self.devices())
        if path == ATHLETES:
            if method != "GET":
                return _error(405, "use GET, or PUT/DELETE /api/athletes/{id}")
            return _json(200, [a.to_json() for a in self.roster.athletes()])
        if not path.startswith(ATHLETES + "/"):
            return _error(404, "no such endpoint: /api/devices, /api/athletes[/{id}]")
        athlete_id = unquote(path[len(ATHLETES) + 1 :])
        if method == "PUT":
            try:
                body = json.loads(request.body.decode("utf-8")) if request.body else None
            except (UnicodeDecodeError, ValueError) as exc:
                return _error(400, f"the body is not JSON: {exc}", "body")
            record, created = self.roster.put(athlete_id, body)
            log.info("admin: athlete %s %s", record.id, "added" if created else "updated")
            return _json(201 if created else 200, record.to_json())
        if method == "DELETE":
            try:
                self.roster.delete(athlete_id)
            except UnknownAthlete:
                return _error(404, f"no athlete {athlete_id!r}")
            except ConfigAthlete:
                return _error(
                    409, f"{athlete_id!r} is in the config file's athletes: remove it there"
                )
            log.info("admin: athlete %s removed", athlete_id)
            return Page(204, "application/json", "", _HEADERS)
        if method == "GET":
            found = next((a for a in self.roster.athletes() if a.id == athlete_id), None)
            if found is None:
                return _error(404, f"no athlete {athlete_id!r}")
            return _json(200, found.to_json())
        return _error(405, "use GET, PUT or DELETE")

    def _claim(self, request: Request) -> Page:
        if request.method != "POST":
            return _error(405, "use POST")
        token = bearer(request.authorization)
        # check() marks the single-use setup token used: a second claim with it fails.
        if not token or self.tokens.check(token, SETUP_ROLE) is None:
            return _refused(
                "this setup link was used already or is not valid", request.authorization
            )
        log.info("admin: the setup link was used; an admin token was issued")
        return _json(200, {"token": self.tokens.create(ADMIN_ROLE)})

    def _file(self, name: str) -> str:
        text = self._files.get(name)
        if text is None:
            text = resources.files("gatewayd.web").joinpath(name).read_text(encoding="utf-8")
            self._files[name] = text
        return text


def admin_link(board_url: str, setup_token: str) -> str:
    """The one-time link: the token rides in the fragment, which browsers never send."""
    return f"{board_url.rstrip('/')}/admin#setup={setup_token}"
