"""The board's pages and the JSON it starts from (no server: Board.respond is plain code)."""

from __future__ import annotations

import json

import pytest

from gatewayd import config as config_module
from gatewayd.config import BoardConfig
from gatewayd.errors import ConfigError
from gatewayd.roster import AthleteInfo
from gatewayd.web import CONFIG_PATH, Board, board_url, new_token

ROSTER = [AthleteInfo("a1", "Ada", 181, 2.1), AthleteInfo("a2", "Ben", None, 2.1)]


def board(**settings: object) -> Board:
    return Board(
        BoardConfig(**settings),  # type: ignore[arg-type]
        token="board-token-1",
        title="My gym",
        lost_after_s=5.0,
        athletes=lambda: ROSTER,
    )


@pytest.mark.parametrize(
    ("path", "content_type", "needle"),
    [
        ("/", "text/html; charset=utf-8", '<script src="board.js"'),
        ("/index.html", "text/html; charset=utf-8", '<main id="grid"'),
        ("/board.css", "text/css; charset=utf-8", ".tile"),
        ("/board.js", "text/javascript; charset=utf-8", '"use strict"'),
    ],
)
def test_static_files_come_from_the_package(path: str, content_type: str, needle: str) -> None:
    page = board().respond(path)
    assert page is not None
    assert (page.status, page.content_type) == (200, content_type)
    assert needle in page.text
    headers = dict(page.headers)
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert "script-src 'self'" in headers["Content-Security-Policy"]


def test_page_uses_no_outside_resources() -> None:
    b = board()
    for path in ("/", "/board.css", "/board.js"):
        page = b.respond(path)
        assert page is not None
        assert "http://" not in page.text and "https://" not in page.text, path


@pytest.mark.parametrize(
    "path", ["/connect", "/healthz", "/board", "/../gatewayd/config.py", "/__init__.py", "//"]
)
def test_other_paths_are_not_the_boards(path: str) -> None:
    assert board().respond(path) is None


def test_config_json_has_what_the_page_needs_and_nothing_else() -> None:
    page = board(zones=[55, 65, 75, 85, 92], default_max_hr=190).respond(CONFIG_PATH)
    assert page is not None and page.content_type == "application/json"
    data = json.loads(page.text)
    assert data == {
        "title": "My gym",
        "token": "board-token-1",
        "zones": [55, 65, 75, 85, 92],
        "default_max_hr": 190,
        "low_battery_pct": 20.0,
        "lost_after_s": 5.0,
        "forget_after_s": 600.0,
        "athletes": [
            {"uid": "a1", "name": "Ada", "max_hr": 181},
            {"uid": "a2", "name": "Ben", "max_hr": None},
        ],
        "workouts": {},
    }


def test_roster_is_read_per_request() -> None:
    roster = list(ROSTER)
    b = Board(BoardConfig(), token="t", title="x", lost_after_s=5, athletes=lambda: roster)
    roster.append(AthleteInfo("a3", "Chloe", 170, 2.1))
    page = b.respond(CONFIG_PATH)
    assert page is not None
    assert [a["uid"] for a in json.loads(page.text)["athletes"]] == ["a1", "a2", "a3"]


def test_title_from_the_board_section_wins() -> None:
    page = board(title="Spin 18:00").respond(CONFIG_PATH)
    assert page is not None and json.loads(page.text)["title"] == "Spin 18:00"


def test_generated_tokens_are_long_and_differ() -> None:
    first, second = new_token(), new_token()
    assert first != second and len(first) >= 30 and first.startswith("board_")


def test_board_url() -> None:
    assert board_url("127.0.0.1", 8787) == "http://127.0.0.1:8787/"
    assert board_url("::1", 8787) == "http://[::1]:8787/"
    assert not board_url("0.0.0.0", 8787).startswith("http://0.0.0.0")


def test_max_hr_comes_from_the_roster_or_from_age(tmp_path) -> None:
    path = tmp_path / "g.yaml"
    path.write_text(
        "athletes:\n"
        "  - {id: a1, name: Ada, max_hr: 181}\n"
        "  - {id: a2, name: Ben, age: 40}\n"
        "  - {id: a3}\n"
    )
    roster = config_module.load(path).roster()
    assert [(a.uid, a.name, a.max_hr) for a in roster.athletes()] == [
        ("a1", "Ada", 181),
        ("a2", "Ben", 180),
        ("a3", "a3", None),
    ]


@pytest.mark.parametrize(
    ("zones", "message"),
    [
        ("[50, 60, 70, 80]", "exactly five"),
        ("[50, 60, 60, 80, 90]", "strictly increase"),
        ("[0, 60, 70, 80, 90]", "percent of max HR"),
    ],
)
def test_bad_zones_name_the_key_and_the_fix(tmp_path, zones: str, message: str) -> None:
    path = tmp_path / "g.yaml"
    path.write_text(f"board: {{zones: {zones}}}\n")
    with pytest.raises(ConfigError) as caught:
        config_module.load(path)
    assert "board.zones" in str(caught.value) and message in str(caught.value)


def test_config_json_carries_each_workout_for_the_tiles() -> None:
    workout = {"since": "2027-01-15T08:00:00.000Z", "kcal": 12.5, "zone_minutes": 3.0}
    b = Board(
        BoardConfig(),
        token="t",
        title="gym",
        lost_after_s=5.0,
        athletes=lambda: ROSTER,
        workouts=lambda: {"a1": workout},
    )
    page = b.respond(CONFIG_PATH)
    assert page is not None
    assert json.loads(page.text)["workouts"] == {"a1": workout}


def test_the_admin_page_uses_no_outside_resources() -> None:
    from gatewayd.web.admin import Admin, Request

    admin = Admin(tokens=None, roster=None, devices=list)  # type: ignore[arg-type]
    for path in ("/admin", "/admin.js", "/admin.css"):
        page = admin.respond(Request("GET", path, "", b""))
        assert page.status == 200, path
        assert "http://" not in page.text and "https://" not in page.text, path
        assert "frame-ancestors 'none'" in dict(page.headers)["Content-Security-Policy"]


def test_a_wrong_admin_token_is_a_guess_a_missing_one_is_not() -> None:
    from gatewayd.web.admin import ADMIN_ROLE, SETUP_ROLE, Admin, Request

    class Tokens:
        def check(self, token: str, role: str) -> object:
            return {ADMIN_ROLE: "admin-ok", SETUP_ROLE: "setup-ok"}[role] == token or None

        def create(self, role: str) -> str:
            return "minted"

    admin = Admin(tokens=Tokens(), roster=None, devices=list)  # type: ignore[arg-type]
    for path, method in (("/api/devices", "GET"), ("/api/claim", "POST")):
        wrong = admin.respond(Request(method, path, "Bearer guess", b""))
        assert wrong.status == 401 and wrong.refused, path  # the broker's brake counts it
        missing = admin.respond(Request(method, path, "", b""))
        assert missing.status == 401 and not missing.refused, path  # a signed-out tablet
    right = admin.respond(Request("GET", "/api/devices", "Bearer admin-ok", b""))
    assert right.status == 200 and not right.refused
