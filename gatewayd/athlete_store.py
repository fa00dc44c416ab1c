"""The roster store: athletes enrolled from the admin page, in `<state dir>/athletes.json`.

The state directory (not /etc) because a .deb upgrade must never ask about, or overwrite, what
staff entered; the config file stays the administrator's. Writes are atomic (a temporary file,
fsync, rename, fsync of the directory), so a power cut leaves the old roster or the new one,
never half of one. The merge with the config's `athletes:` is gatewayd/athletes.py's.

A file that cannot be read is moved aside (`athletes.json.bad-<n>`) before the next write, so a
hand-broken file is never silently lost either.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from gatewayd import athletes as core
from gatewayd.athletes import AthleteRecord, ConfigAthlete, FieldError, Merged, UnknownAthlete
from gatewayd.roster import Roster

log = logging.getLogger(__name__)

STORE_FILE = "athletes.json"
FORMAT_VERSION = 1


class AthleteStore:
    """Loads, edits and saves the stored athletes, and hands every new roster to `apply`."""

    def __init__(
        self,
        state_dir: Path | None,
        base: Callable[[], list[AthleteRecord]],
        *,
        track_unknown: bool,
        apply: Callable[[Roster], None] = lambda roster: None,
    ) -> None:
        self.path = None if state_dir is None else state_dir / STORE_FILE
        self.base = base  # the config's (and simulator's) athletes, asked again on every merge
        self.track_unknown = track_unknown
        self.apply = apply
        self._stored: list[AthleteRecord] = []
        self._unreadable = False
        self.load()

    # -- reading ------------------------------------------------------------------------------

    def load(self) -> None:
        if self.path is None:
            return
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return
        except OSError as exc:
            log.error(
                "cannot read %s (%s): running with the config's athletes only", self.path, exc
            )
            self._unreadable = True
            return
        try:
            data = json.loads(text)
            if data.get("version") != FORMAT_VERSION:
                raise ValueError(f"unknown format version {data.get('version')!r}")
            stored = [
                core.parse_athlete(str(item.get("id", "")), item) for item in data["athletes"]
            ]
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            log.error(
                "%s is not a roster this version understands (%s): running with the config's "
                "athletes only; the file is kept aside at the next edit",
                self.path,
                exc,
            )
            self._unreadable = True
            return
        for record in stored:
            self._stored = core.put(self._stored, record)

    def merged(self) -> Merged:
        return core.merge(self.base(), self._stored)

    def roster(self) -> Roster:
        return self.merged().roster(track_unknown=self.track_unknown)

    def athletes(self) -> list[AthleteRecord]:
        return self.merged().athletes

    # -- editing ------------------------------------------------------------------------------

    def put(self, athlete_id: str, body: object) -> tuple[AthleteRecord, bool]:
        """Create or replace one athlete from a JSON body; (the record, whether it is new)."""
        record = core.parse_athlete(athlete_id, body)
        created = self.merged().by_id(athlete_id) is None
        self._commit(core.put(self._stored, record))
        return record, created

    def delete(self, athlete_id: str) -> None:
        core.check_id(athlete_id)
        if not any(r.id == athlete_id for r in self._stored):
            if self.merged().by_id(athlete_id) is not None:
                raise ConfigAthlete(athlete_id)
            raise UnknownAthlete(athlete_id)
        self._commit(core.delete(self._stored, athlete_id))

    def _commit(self, stored: list[AthleteRecord]) -> None:
        if self.path is None:
            raise FieldError("hub.state_dir", "no state directory to keep the roster in")
        self._save(stored)
        self._stored = stored
        self.apply(self.roster())

    def _save(self, stored: list[AthleteRecord]) -> None:
        assert self.path is not None
        directory = self.path.parent
        directory.mkdir(parents=True, exist_ok=True)
        if self._unreadable and self.path.exists():
            aside = _free_name(self.path)
            os.replace(self.path, aside)
            log.warning("moved the unreadable roster %s aside to %s", self.path, aside)
        self._unreadable = False
        data = {
            "version": FORMAT_VERSION,
            "athletes": [
                {k: v for k, v in record.to_json().items() if k != "origin"} for record in stored
            ],
        }
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".athletes-", suffix=".json")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as stream:
                json.dump(data, stream, indent=1)
                stream.write("\n")
                stream.flush()
                os.fsync(stream.fileno())
            os.chmod(tmp, 0o600)  # ages and weights are personal data
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        # The rename itself is durable only once the directory is on disk.
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _free_name(path: Path) -> Path:
    n = 1
    while (candidate := path.with_name(f"{path.name}.bad-{n}")).exists():
        n += 1
    return candidate
