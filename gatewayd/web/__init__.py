"""The gym board: the page's static files (shipped in this package) and the JSON it starts from.

The local broker serves these on its own port (`GET /`), so a TV on the gym's LAN needs nothing
but a browser: no build step, no CDN.

What `/board/config.json` tells whoever holds the board link (its `?key=`, gatewayd/web/access.py;
without it the page and the JSON answer 401): the board token (a consumer token scoped to what
the board shows: live samples, and REPLAY of the last minutes only; never SUBMIT), athletes'
uids, display names and max HR (the board shows names and percent of max HR), and the zone
bounds. Never device ids, ages, the hub's other tokens or paths.
"""

from __future__ import annotations

import json
import secrets
import socket
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from importlib import resources

from gatewayd.config import BoardConfig
from gatewayd.roster import AthleteInfo
from gatewayd.web.access import KEY_PARAM, LOCKED_PAGE, key_from, key_ok

CONFIG_PATH = "/board/config.json"

# URL path -> (file in this package, content type). Nothing outside this table is served, so no
# request path ever reaches the file system.
_FILES: dict[str, tuple[str, str]] = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/index.html": ("index.html", "text/html; charset=utf-8"),
    "/board.css": ("board.css", "text/css; charset=utf-8"),
    "/board.js": ("board.js", "text/javascript; charset=utf-8"),
}

# The page loads only its own files and talks only to its own origin.
_SECURITY_HEADERS: tuple[tuple[str, str], ...] = (
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    (
        "Content-Security-Policy",
        "default-src 'none'; script-src 'self'; style-src 'self'; "
        "connect-src 'self' ws: wss:; img-src 'self' data:; base-uri 'none'; form-action 'none'",
    ),
)


@dataclass(frozen=True, slots=True)
class Page:
    """One HTTP answer, independent of the server library that sends it."""

    status: int
    content_type: str
    text: str
    headers: tuple[tuple[str, str], ...] = field(default=_SECURITY_HEADERS)
    # A credential was presented and did not match: the broker's guessing brake counts it.
    refused: bool = False


def new_token() -> str:
    """A board token for this run only (the config sets none): the page fetches it anyway."""
    return "board_" + secrets.token_urlsafe(24)


def board_url(host: str, port: int, key: str | None = None, *, tls: bool = False) -> str:
    """Where to point a browser; a wildcard listener is reached by this machine's name."""
    if host in ("", "0.0.0.0", "::"):
        host = socket.gethostname()
    elif ":" in host:
        host = f"[{host}]"
    query = "" if key is None else f"?{KEY_PARAM}={key}"
    return f"{'https' if tls else 'http'}://{host}:{port}/{query}"


# Pages that need the key: the board itself and the JSON holding its token. Its static files
# hold no secret and are served to anyone (the 401 page needs none of them).
_KEYED = frozenset({"/", "/index.html", CONFIG_PATH})


class Board:
    """Answers the board's GET requests; `athletes` is read per request so SIGHUP shows."""

    def __init__(
        self,
        config: BoardConfig,
        *,
        token: str,
        title: str,
        lost_after_s: float,
        athletes: Callable[[], Iterable[AthleteInfo]],
        workouts: Callable[[], Mapping[str, Mapping[str, object]]] = dict,
        key: str | None = None,
    ) -> None:
        self.config = config
        self.token = token
        self.key = key  # None: no key needed (tests of the page alone)
        self.title = config.title or title
        self.lost_after_s = lost_after_s
        self.athletes = athletes
        self.workouts = workouts  # uid -> {"since", "kcal", "zone_minutes"} (gatewayd/energy.py)
        self._files: dict[str, str] = {}

    def respond(self, target: str) -> Page | None:
        """The answer for a request target (path and query), or None when it is not the board's."""
        path = target.split("?", 1)[0]
        if path in _KEYED and self.key is not None and not key_ok(key_from(target), self.key):
            if path == CONFIG_PATH:
                return Page(401, "application/json", '{"error": "ask staff for the board link"}')
            return Page(401, "text/html; charset=utf-8", LOCKED_PAGE)
        if path == CONFIG_PATH:
            return Page(200, "application/json", json.dumps(self.page_config()))
        entry = _FILES.get(path)
        if entry is None:
            return None
        name, content_type = entry
        return Page(200, content_type, self._file(name))

    def page_config(self) -> dict[str, object]:
        return {
            "title": self.title,
            "token": self.token,
            "zones": list(self.config.zones),
            "default_max_hr": self.config.default_max_hr,
            "low_battery_pct": self.config.low_battery_pct,
            "lost_after_s": self.lost_after_s,
            "forget_after_s": self.config.forget_after_s,
            "athletes": [
                {"uid": a.uid, "name": a.name, "max_hr": a.max_hr} for a in self.athletes()
            ],
            "workouts": {uid: dict(w) for uid, w in self.workouts().items()},
        }

    def _file(self, name: str) -> str:
        text = self._files.get(name)
        if text is None:
            text = resources.files(__name__).joinpath(name).read_text(encoding="utf-8")
            self._files[name] = text
        return text
