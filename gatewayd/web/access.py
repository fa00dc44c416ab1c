"""The board key: who may load the gym board (and so receive its token).

The board's URL carries a random key (`/?key=...`). `gatewayd run` logs the full URL at start and
`gatewayd board-url` prints it; staff put it on the TV. Without the key, `/` answers 401 with a
page that says to ask staff for the board link, and `/board/config.json` (which holds the board's
token) answers 401. The key lives in `<state dir>/board.key` (created on first use, mode 0600), or
in the config as `board.key`.
"""

from __future__ import annotations

import contextlib
import hmac
import os
import secrets
import tempfile
import urllib.parse
from pathlib import Path

KEY_FILE = "board.key"
KEY_PARAM = "key"

LOCKED_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Board link needed</title>
<meta name="viewport" content="width=device-width, initial-scale=1"></head>
<body><h1>This board needs its link</h1>
<p>The gym board opens only from its full link, which ends in <code>?key=&hellip;</code>.
Ask the staff for the board link.</p>
<p><small>Staff: <code>gatewayd board-url</code> prints it; <code>gatewayd run</code> logs it at
start.</small></p></body></html>
"""


def load_or_create_key(state_dir: Path) -> str:
    """The hub's board key, made (and kept) on first use."""
    path = state_dir / KEY_FILE
    with contextlib.suppress(FileNotFoundError):
        key = path.read_text(encoding="utf-8").strip()
        if key:
            return key
    state_dir.mkdir(parents=True, exist_ok=True)
    key = secrets.token_urlsafe(18)
    fd, tmp = tempfile.mkstemp(dir=state_dir, prefix=".board-", suffix=".key")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as stream:
            stream.write(key + "\n")
        os.chmod(tmp, 0o600)
        # Two first starts at once (daemon and CLI): the first link wins, the other reads it.
        try:
            os.link(tmp, path)
        except FileExistsError:
            return path.read_text(encoding="utf-8").strip() or key
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
    return key


def key_from(target: str) -> str | None:
    """The key in a request target such as `/board/config.json?key=abc`, if any."""
    try:
        query = urllib.parse.urlsplit(target).query
        values = urllib.parse.parse_qs(query, max_num_fields=8).get(KEY_PARAM)
    except ValueError:  # a malformed or oversized query: no key
        return None
    return values[0] if values else None


def key_ok(given: str | None, key: str) -> bool:
    return given is not None and hmac.compare_digest(given.encode(), key.encode())
