"""Builds every part from the Config, runs them as named tasks, and shuts down cleanly.

Only this module sees both sources and sinks. Shutdown (SIGTERM/SIGINT) stops the sources,
finishes the current second, lets every sink drain and close, and returns exit status 0.
SIGHUP re-reads the config file's roster without dropping a connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import signal
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

from gatewayd import __version__, mdns
from gatewayd import config as config_module
from gatewayd.athlete_store import AthleteStore
from gatewayd.athletes import AthleteRecord, base_records
from gatewayd.clock import Clock, SystemClock
from gatewayd.config import Config
from gatewayd.energy import EnergyMeter
from gatewayd.errors import GatewayError
from gatewayd.hub import Hub
from gatewayd.metrics import Metrics
from gatewayd.pipeline import FrameQueue, Pipeline
from gatewayd.roster import AthleteInfo, Roster
from gatewayd.service import Service
from gatewayd.sinks.local_broker import LocalBroker, tls_context
from gatewayd.sinks.mqtt import MqttSink
from gatewayd.sinks.stdout import StdoutSink
from gatewayd.sinks.upstream import UpstreamSink, forget_cursors
from gatewayd.sources.ant import AntSource
from gatewayd.sources.ble import BleSource
from gatewayd.sources.replay import ReplaySource, frame_to_json
from gatewayd.sources.simulator import SimulatorSource
from gatewayd.spool import Spool
from gatewayd.tokens import ADMIN, ADMIN_SETUP, TokenStore
from gatewayd.web import Board, board_url, new_token
from gatewayd.web.access import load_or_create_key
from gatewayd.web.admin import Admin, admin_link

log = logging.getLogger(__name__)

STARTUP_BUDGET_S = 10.0  # READY=1 goes out by then even if a listening output cannot bind yet
SHUTDOWN_BUDGET_S = 4.0  # the promise is "exit within 5 s"; the unit's TimeoutStopSec= is 10 s


def preflight(config: Config) -> None:
    """Everything `run` refuses at start, without starting anything (`check-config` runs this):
    every file a key names is there and readable, and the broker's certificate loads."""
    config_module.check_files(config)
    broker = config.outputs.local_broker
    if broker.enabled:
        tls_context(broker)


# The collector's young generation is collected after this many more allocations than frees
# (Python's default: 700). Frames, Readings and a second's Samples live for a fraction of a
# second; at 700 a collection came every few ms at 1,000 sensors, walked the ones still in
# flight and promoted them, so older generations filled and were walked too. At 10,000 most die
# first: the collector's CPU halved (bench/daemon.py), a young collection takes about 1 ms.
GC_YOUNG_THRESHOLD = 10_000


def settle_collector() -> None:
    """Once running: everything built so far (modules, config, sockets, tables) lives as long
    as the daemon, so it is moved out of the collector's sight and a full collection no longer
    walks it. One took 150-250 ms at 1,000 sensors (30-60 ms after), and a second's close that
    met one was that late. Garbage first, so none of it is kept for good."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)


class Source(Protocol):
    name: str

    async def run(self, frames: FrameQueue) -> None: ...


class Sink(Protocol):
    name: str

    async def run(self) -> None: ...

    async def close(self) -> None: ...


def build_sources(config: Config, clock: Clock) -> list[Source]:
    sources: list[Source] = []
    settings = config.sources
    if settings.simulator.enabled:
        sources.append(SimulatorSource(settings.simulator, clock))
    if settings.replay.file is not None:
        sources.append(ReplaySource(settings.replay, clock))
    if settings.ant.enabled:
        sources.append(AntSource(settings.ant, clock))
    if settings.ble.enabled:
        sources.append(BleSource.from_config(config, clock))
    return sources


class App:
    def __init__(
        self,
        config: Config,
        *,
        clock: Clock | None = None,
        config_path: Path | None = None,
        service: Service | None = None,
    ) -> None:
        preflight(config)  # what check-config refuses, run refuses the same way (exit 78)
        self.config = config
        self.config_path = config_path
        self.clock = clock or SystemClock()
        self.hub = Hub(config.pipeline.sink_queue)
        self.frames = FrameQueue(config.pipeline.frame_queue)
        self.sources: list[Source] = self._build_sources()
        self._roster_config = config  # SIGHUP replaces it
        # The running roster is the config's athletes overlaid by the admin page's store.
        self.athletes = AthleteStore(
            config.state_dir(),
            self._base_athletes,
            track_unknown=config.hub.unknown_devices == "track",
            apply=self.apply_roster,
        )
        self.pipeline = Pipeline(
            self.frames,
            self.hub,
            self.athletes.roster(),
            config.pipeline,
            self.clock,
            log_interval=config.logging.rate_limit_s,
            energy=self._build_energy(),
        )
        self.metrics = Metrics()
        self.spool: Spool | None = None
        self.tokens: TokenStore | None = None
        self.admin: Admin | None = None
        self.board: Board | None = None
        self.advertiser: mdns.Advertiser | None = None
        self.upstream: UpstreamSink | None = None
        self.sinks: list[Sink] = self._build_sinks()
        # systemd (Type=notify): READY=1 once everything is up, the watchdog from this loop.
        self.service = service if service is not None else Service.from_env(self.status_line)
        self.on_ready: list[Callable[[], None]] = [self.service.ready]
        self.on_stopping: list[Callable[[], None]] = [self.service.stopping]
        self._stop: asyncio.Event | None = None
        self._tasks: list[asyncio.Task[None]] = []

    # -- building -----------------------------------------------------------------------------

    def _build_sources(self) -> list[Source]:
        return build_sources(self.config, self.clock)

    def _build_sinks(self) -> list[Sink]:
        sinks: list[Sink] = []
        outputs = self.config.outputs
        # The local broker subscribes first: the hub wakes its outputs in subscription order,
        # so at a second's close the consumers get their DISPATCHes before MQTT and the
        # upstream, each tens of ms of work for a busy gym, take their turn on the loop.
        if outputs.local_broker.enabled:
            sinks.append(self._build_local_broker())
        if outputs.stdout.enabled:
            sinks.append(StdoutSink(self.hub.subscribe("stdout")))
        if outputs.mqtt.enabled:
            sinks.append(
                MqttSink(
                    self.hub.subscribe("mqtt"),
                    outputs.mqtt,
                    hub_id=self.config.hub.id,
                    roster=self.pipeline.roster,
                )
            )
        if outputs.upstream.enabled:
            # One spool for both: the broker appends (its seqs are the DISPATCH seqs) and the
            # upstream reads it by cursor; without a broker the upstream appends itself.
            self.upstream = UpstreamSink(
                self.hub.subscribe("upstream"),
                outputs.upstream,
                spool=self._spool(),
                append=not outputs.local_broker.enabled,
                clock=self.clock,
            )
            sinks.append(self.upstream)
        elif self.spool is not None:
            forget_cursors(self.spool, outputs.upstream.name)
        return sinks

    def _spool(self) -> Spool:
        if self.spool is None:
            self.spool = Spool(
                self.config.state_dir() / "spool.db",
                retention_s=self.config.outputs.local_broker.replay_retention_h * 3600.0,
                max_age_s=self.config.spool.max_age_days * 86400.0,
                max_bytes=self.config.spool.max_bytes,
                clock=self.clock,
            )
        return self.spool

    def _build_local_broker(self) -> LocalBroker:
        settings = self.config.outputs.local_broker
        state_dir = self.config.state_dir()
        spool = self._spool()
        self.board = self._build_board()
        # The board's token (configured, or generated for this run) is scoped to what the board
        # shows: live samples, and REPLAY of its last minutes only.
        board_tokens = [] if self.board is None else [self.board.token]
        if settings.board_token and settings.board_token not in board_tokens:
            board_tokens.append(settings.board_token)
        tokens = TokenStore(
            state_dir,
            consumer_tokens=settings.consumer_tokens,
            producer_tokens=[(t.token, t.athletes) for t in settings.producer_tokens],
            scoped_consumer_tokens=[(t, self.config.board.forget_after_s) for t in board_tokens],
            clock=self.clock,
        )
        self.tokens = tokens
        self.admin = Admin(tokens=tokens, roster=self.athletes, devices=self.pipeline.heard_devices)
        return LocalBroker(
            self.hub.subscribe("local_broker"),
            settings,
            spool=spool,
            tokens=tokens,
            publish=self.hub.publish,
            health=self.health,
            metrics=self.metrics,
            board=None if self.board is None else self.board.respond,
            admin=self.admin,
            board_key=None if self.board is None else self.board.key,
            clock=self.clock,
        )

    def _build_energy(self) -> EnergyMeter | None:
        settings = self.config.energy
        if not settings.enabled:
            return None
        return EnergyMeter(
            zone4_pct=self.config.board.zones[3],
            default_max_hr=self.config.board.default_max_hr,
            end_after_s=settings.workout_end_after_s,
            efficiency=settings.gross_efficiency,
        )

    def _build_board(self) -> Board | None:
        if not self.config.board.enabled:
            return None
        return Board(
            self.config.board,
            token=self.config.outputs.local_broker.board_token or new_token(),
            title=self.config.hub.name,
            lost_after_s=self.config.pipeline.lost_after_s,
            athletes=self._athletes,
            workouts=self._workouts,
            key=self.config.board.key or load_or_create_key(self.config.state_dir()),
        )

    def _workouts(self) -> dict[str, dict[str, object]]:
        energy = self.pipeline.energy
        return {} if energy is None else energy.workouts()

    def _athletes(self) -> list[AthleteInfo]:
        # Looked up per call: SIGHUP swaps the pipeline's roster.
        return self.pipeline.roster.athletes()

    def _base_athletes(self) -> list[AthleteRecord]:
        return base_records(self._build_roster(self._roster_config))

    def _build_roster(self, config: Config) -> Roster:
        roster = config.roster()
        athletes = roster.athletes()
        devices = roster.devices()
        for source in self.sources:
            if isinstance(source, SimulatorSource):
                for info, owned in source.roster_entries():
                    athletes.append(info)
                    devices.update({ident: info.uid for ident in owned})
        return Roster(athletes, devices, track_unknown=roster.track_unknown)

    # -- state for health checks and sd_notify -------------------------------------------------

    def health(self) -> dict[str, Any]:
        upstream = None if self.upstream is None else self.upstream.state()
        extra: dict[str, Any] = {}
        for source in self.sources:
            if isinstance(source, BleSource):
                extra["ble"] = source.status()
        return {
            **extra,
            "version": __version__,
            "hub": self.config.hub.id,
            "sources": [source.name for source in self.sources],
            "devices_live": self.pipeline.aggregator.live_devices(),
            "frames": self.pipeline.processed,
            "samples": self.pipeline.samples,
            "decode_errors": sum(self.pipeline.decode_errors.values()),
            "frames_dropped": self.frames.dropped,
            "late_values": self.pipeline.aggregator.late_values,
            "outputs": {
                sub.name: {"queued": len(sub), "dropped": sub.dropped}
                for sub in self.hub.subscriptions()
            },
            "upstream": upstream,
            **self._spool_health(upstream),
        }

    def _spool_health(self, upstream: dict[str, Any] | None) -> dict[str, Any]:
        """Flat numbers for /metrics (the collector reads top-level keys)."""
        out: dict[str, Any] = {}
        if self.spool is not None:
            out["spool_evicted"] = self.spool.evicted
            out["spool_error"] = self.spool.error
        if upstream is not None:
            out["upstream_backlog"] = upstream["backlog"]
            out["upstream_backlog_age_seconds"] = upstream["backlog_age_s"] or 0.0
            out["upstream_connected"] = int(upstream["state"] in ("connected", "idle"))
        return out

    def status_line(self) -> str:
        """systemd's STATUS= (shown by `systemctl status gatewayd`): one line, no newlines."""
        health = self.health()
        consumers = sum(
            int(sink.health_snapshot()["consumers"])
            for sink in self.sinks
            if isinstance(sink, LocalBroker)
        )
        backlog = sum(output["queued"] for output in health["outputs"].values())
        upstream = ""
        if health["upstream"] is not None:
            state = health["upstream"]
            upstream = f"upstream {state['state']} ({state['backlog']} behind), "
        return (
            f"{health['devices_live']} devices live, {consumers} consumers, "
            f"backlog {backlog}, {upstream}{health['samples']} samples, "
            f"{health['decode_errors']} bad frames"
        )

    # -- running ------------------------------------------------------------------------------

    def stop(self) -> None:
        if self._stop is not None:
            self._stop.set()

    def reload_roster(self) -> None:
        """SIGHUP: take the roster from the config file again; connections stay up."""
        try:
            fresh = config_module.load(self.config_path, defaults_run_simulator=False)
        except GatewayError as exc:
            log.error("SIGHUP: config not reloaded, keeping the running roster: %s", exc)
            return
        self._roster_config = fresh
        self.apply_roster(self.athletes.roster())
        log.info("SIGHUP: roster reloaded (%d athletes)", len(fresh.athletes))

    def apply_roster(self, roster: Roster) -> None:
        """A new roster (SIGHUP or the admin page) reaches every part at once; no connection
        drops. The board reads names per request, so it needs no call."""
        self.pipeline.set_roster(roster)
        for sink in self.sinks:
            if isinstance(sink, MqttSink):
                sink.set_roster(roster)
        self.service.refresh_status()

    def _advertise(self) -> None:
        """mDNS/DNS-SD: a tablet finds the hub by name (in the background: probing takes ~2 s)."""
        broker = next((s for s in self.sinks if isinstance(s, LocalBroker)), None)
        settings = self.config.mdns
        if broker is None or not broker.port:
            return
        if not mdns.should_advertise(settings.enabled, broker.config.host):
            return
        self.advertiser = mdns.Advertiser(
            settings,
            mdns.adverts(
                hub_id=self.config.hub.id,
                hub_name=self.config.hub.name,
                port=broker.port,
                addresses=mdns.local_addresses(broker.config.host, settings.interfaces),
                hostname=socket.gethostname(),
                board=self.board is not None,
                admin=self.admin is not None,
            ),
        )
        self._tasks.append(asyncio.create_task(self.advertiser.start(), name="mdns"))

    def _offer_admin_link(self) -> None:
        """A fresh install (no admin token yet) logs a one-time link for the staff's tablet."""
        if self.tokens is None or self.admin is None:
            return
        broker = next((s for s in self.sinks if isinstance(s, LocalBroker)), None)
        if broker is None or not broker.port:
            return
        try:
            if self.tokens.has_minted(ADMIN):
                return
            # Only the newest link works: one logged at an earlier start may be in old logs.
            self.tokens.forget_role(ADMIN_SETUP)
            setup = self.tokens.create(ADMIN_SETUP, single_use=True)
        except (OSError, GatewayError) as exc:
            log.warning("no admin link: cannot mint a setup token (%s)", exc)
            return
        url = admin_link(
            board_url(broker.config.host, broker.port, tls=broker.tls is not None), setup
        )
        log.warning(
            "admin: no admin token yet; open this one-time link on the staff tablet: %s "
            "(or run `gatewayd token create --role admin`)",
            url,
        )

    async def run(self, *, seconds: float | None = None) -> int:
        loop = asyncio.get_running_loop()
        self.frames.bind(loop)
        self._stop = asyncio.Event()
        for signum, handler in (
            (signal.SIGTERM, self.stop),
            (signal.SIGINT, self.stop),
            (signal.SIGHUP, self.reload_roster),
        ):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(signum, handler)
        await self._start_listeners()
        self._offer_admin_link()
        self._advertise()
        for sink in self.sinks:
            self._spawn(f"sink:{sink.name}", sink.run)
        pipeline_task = asyncio.create_task(self.pipeline.run(), name="pipeline")
        for source in self.sources:
            self._spawn(f"source:{source.name}", functools.partial(source.run, self.frames))
        log.info(
            "gatewayd %s running: hub %s, sources [%s], outputs [%s]",
            __version__,
            self.config.hub.id,
            ", ".join(source.name for source in self.sources) or "none",
            ", ".join(sink.name for sink in self.sinks) or "none",
        )
        self._tasks.append(asyncio.create_task(self.service.run(), name="service"))
        for callback in self.on_ready:
            callback()
        settle_collector()
        stop_wait = asyncio.create_task(self._stop.wait())
        waiters: set[asyncio.Future[Any]] = {stop_wait, pipeline_task}
        done, _ = await asyncio.wait(waiters, timeout=seconds, return_when="FIRST_COMPLETED")
        if pipeline_task in done:
            # The pipeline never returns on its own; if it did, it crashed: let systemd restart.
            stop_wait.cancel()
            log.critical("the pipeline stopped: %r", pipeline_task.exception())
            await self._shutdown(pipeline_task)
            return 1
        stop_wait.cancel()
        await self._shutdown(pipeline_task)
        return 0

    async def _start_listeners(self) -> None:
        """READY=1 promises clients can connect: bind the outputs that listen before saying it.

        One that cannot bind yet (port taken) is logged; its supervised run() keeps retrying.
        """
        for sink in self.sinks:
            if not isinstance(sink, LocalBroker):
                continue
            try:
                await asyncio.wait_for(sink.start(), STARTUP_BUDGET_S)
            except (OSError, TimeoutError) as exc:
                log.error("%s cannot listen yet (%s); retrying in the background", sink.name, exc)

    def _spawn(self, name: str, factory: Callable[[], Awaitable[None]]) -> None:
        self._tasks.append(asyncio.create_task(self._supervise(name, factory), name=name))

    async def _supervise(self, name: str, factory: Callable[[], Awaitable[None]]) -> None:
        """Restart a part that crashed, with backoff; its siblings keep running meanwhile."""
        delay = 1.0
        while True:
            try:
                await factory()
                return
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("%s crashed; restarting in %.0f s", name, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)

    async def _shutdown(self, pipeline_task: asyncio.Task[None]) -> None:
        log.info("stopping: finishing the current second and draining outputs")
        for callback in self.on_stopping:
            callback()
        if self.advertiser is not None:
            await self.advertiser.close()  # goodbye packets: browsers drop the hub at once
        sources = [t for t in self._tasks if (t.get_name() or "").startswith("source:")]
        for task in sources:
            task.cancel()
        await asyncio.gather(*sources, return_exceptions=True)
        pipeline_task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await pipeline_task
        self.pipeline.flush()
        closing = [asyncio.create_task(sink.close()) for sink in self.sinks]
        if closing:
            _, late = await asyncio.wait(closing, timeout=SHUTDOWN_BUDGET_S)
            for task in late:
                task.cancel()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.spool is not None:
            self.spool.close()
        self.service.close()
        log.info("stopped")


async def record(config: Config, out: Path, *, seconds: float | None = None) -> int:
    """Write every Frame from the configured sources to a capture file (JSON lines)."""
    # Only the sources: recording opens no output, spool or listening port.
    sources = build_sources(config, SystemClock())
    frames = FrameQueue(config.pipeline.frame_queue)
    frames.bind(asyncio.get_running_loop())
    if not sources:
        log.error("nothing to record: no source is enabled")
        return 1
    tasks = [asyncio.create_task(source.run(frames)) for source in sources]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signum, stop.set)
    written = 0
    deadline = None if seconds is None else loop.time() + seconds
    with out.open("w", encoding="utf-8") as stream:
        while not stop.is_set():
            remaining = 0.2 if deadline is None else min(0.2, deadline - loop.time())
            if remaining <= 0:
                break
            await frames.wait(remaining)
            for frame in frames.take_all():
                stream.write(frame_to_json(frame) + "\n")
                written += 1
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    log.info("recorded %d frames to %s", written, out)
    return 0
