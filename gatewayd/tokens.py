"""Who may connect to the hub's broker: tokens from the config, and tokens minted by the CLI.

Minted tokens live in `<state dir>/tokens.json` as SHA-256 hashes only (a minted token is 192
random bits, so a plain hash is enough: there is nothing to brute-force). The file is re-read when
it changes, so `gatewayd token create` works while the daemon runs. A token never reaches a log:
logs name a token by the first characters of its hash.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import json
import logging
import os
import secrets
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from gatewayd.clock import Clock
from gatewayd.errors import ConfigError

log = logging.getLogger(__name__)

TOKENS_FILE = "tokens.json"
CONSUMER = "consumer"
PRODUCER = "producer"
ADMIN = "admin"  # the admin page and /api: the roster, the devices heard
# The one-time link `gatewayd run` logs on a fresh install: single use, and good only for
# claiming an admin token (POST /api/claim), so the log never holds a lasting credential.
ADMIN_SETUP = "admin-setup"
ROLES = (CONSUMER, PRODUCER, ADMIN, ADMIN_SETUP)


@dataclass(frozen=True, slots=True)
class Grant:
    """What an accepted token allows. `athletes` empty for a producer means any athlete."""

    role: str
    athletes: frozenset[str]
    label: str  # safe to log
    # A consumer that may REPLAY only this far back (the board's token); None: as far as kept.
    replay_window_s: float | None = None

    def may_submit_for(self, uid: str) -> bool:
        return not self.athletes or uid in self.athletes


@dataclass(slots=True)
class _Minted:
    digest: str
    role: str
    athletes: list[str]
    single_use: bool
    expires: float | None
    used: bool
    created: float


def digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def label(token_digest: str) -> str:
    return f"token:{token_digest[:8]}"


class TokenStore:
    def __init__(
        self,
        state_dir: Path | None,
        *,
        consumer_tokens: Iterable[str] = (),
        producer_tokens: Iterable[tuple[str, Iterable[str]]] = (),
        scoped_consumer_tokens: Iterable[tuple[str, float]] = (),
        clock: Clock,
    ) -> None:
        self.path = None if state_dir is None else state_dir / TOKENS_FILE
        self.clock = clock
        self._static: dict[str, Grant] = {}
        for token in consumer_tokens:
            d = digest(token)
            self._static[d] = Grant(CONSUMER, frozenset(), label(d))
        for token, athletes in producer_tokens:
            d = digest(token)
            self._static[d] = Grant(PRODUCER, frozenset(athletes), label(d))
        for token, replay_window_s in scoped_consumer_tokens:
            d = digest(token)
            self._static[d] = Grant(CONSUMER, frozenset(), label(d), replay_window_s)
        self._minted: dict[str, _Minted] = {}
        # (inode, size, mtime, ctime) of the file as last read: every save replaces the file
        # (a new inode), so a token minted within the clock's granularity is still noticed,
        # and a miss costs a stat(), never a read.
        self._stamp: tuple[int, int, int, int] | None = None

    # -- checking (the broker) ------------------------------------------------------------------

    def check(self, token: str, role: str) -> Grant | None:
        """The grant for `token` in `role`, or None (unknown, wrong role, expired, used)."""
        d = digest(token)
        for known, grant in self._static.items():
            if hmac.compare_digest(known, d):
                return grant if grant.role == role else None
        self._reload()
        entry = self._minted.get(d)
        if entry is None or entry.role != role or entry.used:
            return None
        if entry.expires is not None and self.clock.wall() >= entry.expires:
            return None
        if entry.single_use:
            try:
                with self._locked():
                    # Another process (a second daemon, the CLI) may have used it meanwhile.
                    self._reload(force=True)
                    entry = self._minted.get(d)
                    if entry is None or entry.used:
                        return None
                    entry.used = True
                    self._save()
            except OSError as exc:
                # Refuse rather than let a single-use token be used twice after a restart.
                log.error("cannot record the use of %s in %s: %s", label(d), self.path, exc)
                self._stamp = None
                return None
        return Grant(entry.role, frozenset(entry.athletes), label(d))

    # -- minting (the CLI) ----------------------------------------------------------------------

    def create(
        self,
        role: str,
        *,
        athletes: Iterable[str] = (),
        single_use: bool = False,
        ttl_s: float | None = None,
        forget_dead: bool = False,
    ) -> str:
        """Mint a token, store its hash, and return the token itself (shown once, never kept).

        `forget_dead` drops used and expired tokens in the same write, so minting per connection
        (the HTTP token endpoints) does not grow the file without bound."""
        if role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
        if self.path is None:
            raise ConfigError("hub.state_dir", "no state directory to keep minted tokens in")
        token = "gwd_" + secrets.token_urlsafe(24)
        now = self.clock.wall()
        with self._locked():
            self._reload(force=True)
            if forget_dead:
                self._drop_dead(now)
            self._minted[digest(token)] = _Minted(
                digest(token),
                role,
                sorted(set(athletes)),
                single_use,
                None if ttl_s is None else now + ttl_s,
                False,
                now,
            )
            self._save()
        return token

    def has_minted(self, role: str) -> bool:
        """Whether a token of `role` was ever minted here (and not purged)."""
        self._reload(force=True)
        return any(e.role == role for e in self._minted.values())

    def forget_role(self, role: str) -> int:
        """Forget every minted token of `role` (superseded setup links); return how many."""
        with self._locked():
            self._reload(force=True)
            gone = [d for d, e in self._minted.items() if e.role == role]
            for d in gone:
                del self._minted[d]
            if gone:
                self._save()
        return len(gone)

    def purge(self) -> int:
        """Forget used and expired minted tokens; return how many."""
        now = self.clock.wall()
        with self._locked():
            self._reload(force=True)
            stale = self._drop_dead(now)
            if stale:
                self._save()
        return stale

    def _drop_dead(self, now: float) -> int:
        stale = [
            d
            for d, e in self._minted.items()
            if e.used or (e.expires is not None and now >= e.expires)
        ]
        for d in stale:
            del self._minted[d]
        return len(stale)

    def minted(self) -> list[dict[str, object]]:
        """The minted tokens, safe to print (labels, never tokens or full hashes)."""
        self._reload()
        return [
            {
                "label": label(e.digest),
                "role": e.role,
                "athletes": e.athletes,
                "single_use": e.single_use,
                "expires": e.expires,
                "used": e.used,
            }
            for e in self._minted.values()
        ]

    # -- the file -------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Serialise read-modify-write of the file between the daemon and the CLI."""
        assert self.path is not None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(f"{self.path}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _reload(self, *, force: bool = False) -> None:
        if self.path is None:
            return
        try:
            stamp = _stamp(self.path.stat())
        except FileNotFoundError:
            self._minted = {}
            self._stamp = None
            return
        if stamp == self._stamp and not force:
            return
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            entries = {
                str(item["digest"]): _Minted(
                    str(item["digest"]),
                    str(item["role"]),
                    [str(a) for a in item.get("athletes", [])],
                    bool(item.get("single_use", False)),
                    None if item.get("expires") is None else float(item["expires"]),
                    bool(item.get("used", False)),
                    float(item.get("created", 0.0)),
                )
                for item in data["tokens"]
            }
        except (OSError, ValueError, KeyError, TypeError) as exc:
            # Keep the tokens we knew: a half-written or hand-broken file must not lock people out.
            log.error("cannot read %s (%s); keeping the previously loaded tokens", self.path, exc)
            self._stamp = stamp  # read it again when it changes, not on every miss
            return
        self._minted = entries
        self._stamp = stamp

    def _save(self) -> None:
        assert self.path is not None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = {
            "tokens": [
                {
                    "digest": e.digest,
                    "role": e.role,
                    "athletes": e.athletes,
                    "single_use": e.single_use,
                    "expires": e.expires,
                    "used": e.used,
                    "created": e.created,
                }
                for e in self._minted.values()
            ]
        }
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".tokens-", suffix=".json")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as stream:
                json.dump(data, stream, indent=1)
                stream.flush()
                os.fsync(stream.fileno())
            os.chmod(tmp, 0o600)
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        self._stamp = _stamp(self.path.stat())


def _stamp(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str) -> float:
    """Seconds from `3600`, `90s`, `15m`, `12h` or `7d` (for `token create --ttl`)."""
    text = text.strip().lower()
    unit = _UNITS.get(text[-1:])
    number = text[:-1] if unit is not None else text
    try:
        value = float(number) * (unit or 1.0)
    except ValueError:
        raise ValueError(f"{text!r} is not a duration: use seconds, or a suffix s m h d") from None
    if not value > 0:
        raise ValueError(f"{text!r}: a duration must be positive")
    return value
