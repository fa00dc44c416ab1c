"""The board key (gatewayd/web/access.py): the board and its token only with the board's link."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from gatewayd.config import BoardConfig
from gatewayd.web import CONFIG_PATH, Board, board_url
from gatewayd.web.access import key_from, load_or_create_key

KEY = "k3y-for-the-board-test"


def board() -> Board:
    return Board(
        BoardConfig(), token="board-token-1", title="Gym", lost_after_s=5.0, athletes=list, key=KEY
    )


@pytest.mark.parametrize("path", ["/", "/index.html", CONFIG_PATH])
@pytest.mark.parametrize(
    "query", ["", "?key=", "?key=wrong", "?key=" + KEY[:-1], "?KEY=" + KEY, "?" + "a=1&" * 50]
)
def test_without_the_key_the_board_and_its_token_are_401(path: str, query: str) -> None:
    page = board().respond(path + query)
    assert page is not None and page.status == 401
    assert "board-token-1" not in page.text
    if path != CONFIG_PATH:
        assert "Ask the staff for the board link" in page.text


@pytest.mark.parametrize("path", ["/", "/index.html", CONFIG_PATH])
def test_with_the_key_they_are_served(path: str) -> None:
    page = board().respond(f"{path}?key={KEY}")
    assert page is not None and page.status == 200
    if path == CONFIG_PATH:
        assert json.loads(page.text)["token"] == "board-token-1"


@pytest.mark.parametrize("path", ["/board.css", "/board.js"])
def test_static_files_hold_no_secret_and_need_no_key(path: str) -> None:
    page = board().respond(path)
    assert page is not None and page.status == 200


def test_the_url_carries_the_key() -> None:
    assert board_url("127.0.0.1", 8787, KEY) == f"http://127.0.0.1:8787/?key={KEY}"
    assert key_from(f"/?key={KEY}") == KEY
    assert key_from("/?key=a&key=b") == "a"
    assert key_from("/") is None


def test_the_key_is_made_once_and_kept_private(tmp_path: Path) -> None:
    state = tmp_path / "state"
    first = load_or_create_key(state)
    assert len(first) >= 24
    assert load_or_create_key(state) == first
    assert os.stat(state / "board.key").st_mode & 0o777 == 0o600
    assert [p.name for p in state.iterdir()] == ["board.key"]  # no temporary file left
