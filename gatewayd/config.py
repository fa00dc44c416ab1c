"""Configuration: a YAML file, overridden by GATEWAYD_<SECTION>__<KEY> environment variables.

Where the file comes from: `--config FILE`, else $GATEWAYD_CONFIG, else /etc/gatewayd/gatewayd.yaml,
else built-in defaults (which run the simulator). Every error names the key path, the bad value
and what was expected, as a ConfigError; the CLI turns that into exit status 78.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from gatewayd.errors import ConfigError
from gatewayd.roster import AthleteInfo, Roster

DEFAULT_CONFIG_PATH = Path("/etc/gatewayd/gatewayd.yaml")
ENV_CONFIG = "GATEWAYD_CONFIG"


# No setting needs a number this large, and beyond it floats lose integer precision; NaN and
# infinities are refused outright (allow_inf_nan), so `lost_after_s: .inf` is an error.
MAX_NUMBER = 2**53


class Section(BaseModel):
    """Every section refuses unknown keys, so a typo is an error rather than a silent default."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @field_validator("*", mode="after")
    @classmethod
    def _finite_and_bounded(cls, value: object) -> object:
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if number and abs(value) > MAX_NUMBER:  # type: ignore[arg-type]
            raise ValueError(f"must be between -2**53 and 2**53, not {value:g}")
        return value


class HubConfig(Section):
    id: str = Field("hub", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    name: str = "gatewayd hub"
    unknown_devices: Literal["track", "ignore"] = "track"
    state_dir: Path | None = None  # default: $STATE_DIRECTORY, else /var/lib/gatewayd if writable


class DeviceRef(Section):
    source: Literal["ble", "ant"]
    id: str = Field(min_length=1)  # BLE address, or ANT+ "<device type>:<device number>"
    connect: bool = False  # BLE: connect even when the advert carries HR (e.g. for RR intervals)

    @field_validator("id")
    @classmethod
    def _normalise(cls, value: str) -> str:
        return value.strip().upper()


class Athlete(Section):
    id: str = Field(pattern=r"^[A-Za-z0-9_.:@-]{1,64}$")
    name: str = ""
    max_hr: int | None = Field(None, ge=100, le=250)
    age: int | None = Field(None, ge=5, le=110)
    # With age and sex: CALORIES from heart rate (docs/board.md, Calories).
    weight_kg: float | None = Field(None, ge=20.0, le=350.0)
    sex: Literal["male", "female"] | None = None
    wheel_circumference_m: float = Field(2.105, gt=0.5, lt=4.0)
    devices: list[DeviceRef] = []


class PipelineConfig(Section):
    frame_queue: int = Field(10_000, ge=100)
    sink_queue: int = Field(10_000, ge=10)
    grace_s: float = Field(0.1, ge=0.0, lt=1.0)
    lost_after_s: float = Field(5.0, gt=0.5)
    hold_s: float = Field(3.0, gt=0.0)
    max_gap_s: float = Field(60.0, gt=1.0)


class SimulatorConfig(Section):
    enabled: bool = False
    athletes: int = Field(8, ge=0, le=1000)
    # Every athlete wears one HR strap: all BLE, all ANT+, or alternating.
    hr_straps: Literal["ble", "ant", "mixed"] = "mixed"
    # The share of athletes on a bike, with an ANT+ power meter and speed/cadence sensor.
    bike_fraction: float = Field(0.5, ge=0.0, le=1.0)
    seed: int = 1
    # Demos and tests: athletes whose devices go silent after so many seconds, e.g. {sim-03: 20}.
    drop_after_s: dict[str, float] = {}


class ReplayConfig(Section):
    file: Path | None = None
    speed: float = Field(1.0, gt=0.0)
    loop: bool = False


class BleConfig(Section):
    enabled: bool = False
    auto: bool = True  # take any fitness device, not only the roster's
    slots_per_adapter: int = Field(5, ge=1, le=20)
    adapters: dict[str, int] = {}  # per-adapter slot count override, e.g. {hci1: 7}
    stale_adapter_s: float = Field(90.0, gt=5.0)
    battery_interval_s: float = Field(600.0, gt=10.0)
    connect_timeout_s: float = Field(20.0, gt=1.0, le=120.0)
    adapter_fail_limit: int = Field(5, ge=1, le=100)  # failed connects in a row -> power-cycle
    device_timeout_s: float = Field(15.0, gt=1.0)  # unheard this long: out of range, not tried
    reconnect_max_s: float = Field(60.0, gt=0.0)  # cap of the per-device connect backoff
    min_rssi: int = Field(-100, ge=-127, le=0)  # ignore fitness devices heard weaker than this
    # Notifications over a socket (AcquireNotify) rather than D-Bus signals: ~3x cheaper. A device
    # that fails it falls back by itself; false forces StartNotify for every device.
    acquire_notify: bool = True
    # Busy acquired sockets are read when the pipeline wakes anyway (twice a second at least), by a
    # wake-up of their own only when they have waited this long or the second ends; 0 reads each
    # notification as it arrives. Above the pipeline's 0.5 s, so its wake-ups read them first.
    notify_window_s: float = Field(0.6, ge=0.0, le=1.0)

    @field_validator("adapters")
    @classmethod
    def _slots(cls, value: dict[str, int]) -> dict[str, int]:
        for name, slots in value.items():
            if not name.startswith("hci") or not name[3:].isdigit():
                raise ValueError(f"adapter name {name!r} must look like hci0, hci1 ...")
            if not 1 <= slots <= 20:
                raise ValueError(f"{name}: slot count {slots} must be between 1 and 20")
        return value


class AntConfig(Section):
    enabled: bool = False
    # Continuous scan mode hears every device in range on one channel; false forces the
    # fallback of one wildcard channel per profile (one device of each type per stick).
    scan_mode: bool = True
    network_key: str = Field("B9A521FBBD72C345", pattern=r"^[0-9A-Fa-f]{16}$")  # ANT+ public key
    rf_channel: int = Field(57, ge=0, le=124)  # 2400 + n MHz; ANT+ uses 57
    rescan_s: float = Field(5.0, gt=0.0)  # how often to look for sticks plugged in later
    retry_initial_s: float = Field(1.0, gt=0.0)  # first reopen delay after a failure
    retry_max_s: float = Field(30.0, gt=0.0)  # the reopen delay doubles up to this
    health_check_s: float = Field(10.0, gt=0.0)  # a stick that ignores a request this long is reset
    # A stick with event buffering (ANTUSB-m) holds broadcasts back this long and sends them in one
    # USB transfer: fewer wake-ups, frames stamped up to this much late. 0 turns it off.
    event_buffer_s: float = Field(0.02, ge=0.0, le=0.1)


class SourcesConfig(Section):
    simulator: SimulatorConfig = SimulatorConfig()
    replay: ReplayConfig = ReplayConfig()
    ble: BleConfig = BleConfig()
    ant: AntConfig = AntConfig()


class StdoutConfig(Section):
    enabled: bool = False


class ProducerToken(Section):
    token: str = Field(min_length=8)
    athletes: list[str] = []


class BrokerLimitsConfig(Section):
    """What one client may cost the broker (docs/broker.md, Limits)."""

    # Refused IDENTIFYs from one address within the window before its attempts are refused
    # unchecked, for lock_s, doubling per episode up to max_lock_s.
    guess_attempts: int = Field(10, ge=1, le=100_000)
    guess_window_s: float = Field(60.0, gt=0.0, le=86_400.0)
    guess_lock_s: float = Field(60.0, gt=0.0, le=86_400.0)
    guess_max_lock_s: float = Field(3600.0, gt=0.0, le=7 * 86_400.0)
    # REPLAYs queued behind a consumer's running one; one more closes it with 1008.
    replay_waiting: int = Field(4, ge=0, le=1000)
    # The share of the broker's time all REPLAYs together may take (live DISPATCH keeps the rest).
    replay_share: float = Field(0.25, gt=0.0, le=1.0)
    # SUBMITs per athlete and data type per second of sample time; more are dropped and counted.
    submit_per_s: int = Field(10, ge=1, le=10_000)
    submit_future_s: float = Field(60.0, ge=0.0, le=86_400.0)  # later stamps are dropped
    # This many dropped SUBMITs within the window is sustained abuse: close with 1008.
    submit_abuse_drops: int = Field(1000, ge=1, le=10_000_000)
    submit_abuse_window_s: float = Field(10.0, gt=0.0, le=3600.0)
    # A consumer whose send queue has been dropping this long without catching up is stuck:
    # closed with 1013, which frees its queue and its socket's buffers.
    slow_consumer_close_s: float = Field(60.0, gt=0.0, le=86_400.0)

    @model_validator(mode="after")
    def _lock_order(self) -> BrokerLimitsConfig:
        if self.guess_max_lock_s < self.guess_lock_s:
            raise ValueError("guess_max_lock_s must be at least guess_lock_s")
        return self


class Developer(Section):
    """Credentials Terra's token endpoints accept (`POST /auth/developer`, `/auth/user`)."""

    dev_id: str = Field(pattern=r"^[A-Za-z0-9_.:@-]{1,128}$")
    api_key: SecretStr | None = None
    api_key_file: Path | None = None

    @model_validator(mode="after")
    def _one_key(self) -> Developer:
        if (self.api_key is None) == (self.api_key_file is None):
            raise ValueError("give `api_key` or `api_key_file` (one of them)")
        if self.api_key is not None and len(self.api_key.get_secret_value()) < 16:
            raise ValueError("`api_key` must be at least 16 characters (it guards token minting)")
        return self


class BrokerTlsConfig(Section):
    """wss:// and https:// on the broker's one port (the board then loads over https)."""

    cert_file: Path | None = None  # PEM certificate chain
    key_file: Path | None = None  # its PEM private key

    @property
    def enabled(self) -> bool:
        return self.cert_file is not None

    @model_validator(mode="after")
    def _pair(self) -> BrokerTlsConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together: set both or neither")
        return self


class LocalBrokerConfig(Section):
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(8787, ge=0, le=65535)
    consumer_tokens: list[str] = []
    producer_tokens: list[ProducerToken] = []
    board_token: str | None = None
    # Who may mint single-use tokens over HTTP, as with Terra's REST API (docs/broker.md).
    developers: list[Developer] = []
    minted_token_ttl_s: float = Field(300.0, gt=0.0, le=86400.0)
    max_consumers: int = Field(200, ge=1)
    heartbeat_interval_s: float = Field(40.0, ge=1.0, le=600.0)  # sent in HELLO
    identify_timeout_s: float = Field(15.0, gt=0.0, le=300.0)
    send_queue: int = Field(10_000, ge=10)  # DISPATCHes held per slow consumer before dropping
    replay_retention_h: float = Field(24.0, gt=0.0)  # REPLAY serves this far back (spool caps win)
    limits: BrokerLimitsConfig = BrokerLimitsConfig()
    tls: BrokerTlsConfig = BrokerTlsConfig()


class UpstreamConfig(Section):
    """The forwarder (sinks/upstream.py). Secrets are SecretStr so no repr or log shows them."""

    enabled: bool = False
    # The spool cursor's name: renaming it makes a fresh start from the oldest spooled sample.
    name: str = Field("upstream", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    mode: Literal["terra", "gatewayd"] = "gatewayd"
    url: str = "wss://ws.tryterra.co/connect"
    # gatewayd mode: the other hub's producer token (one connection, SUBMITs carry uid).
    token: SecretStr | None = None
    token_file: Path | None = None
    # terra mode: one connection per athlete, with a static token per athlete ...
    tokens: dict[str, SecretStr] = {}
    # ... or a token minted for each connection: athlete id -> Terra user id.
    terra_user_ids: dict[str, str] = {}
    dev_id: str | None = None
    api_key_file: Path | None = None
    api_key_env: str = "TERRA_API_KEY"
    api_base_url: str = "https://ws.tryterra.co"
    # TLS (wss): the system CA store, or this CA file; optional client certificate.
    tls_ca_file: Path | None = None
    tls_client_cert: Path | None = None
    tls_client_key: Path | None = None
    backoff_min_s: float = Field(1.0, gt=0.0, le=60.0)
    backoff_max_s: float = Field(30.0, gt=0.0, le=3600.0)
    # After a close code that retrying will not fix (4000, 4003, 4004, 1003, 1007, refused keys).
    fatal_backoff_s: float = Field(300.0, gt=0.0, le=86400.0)
    # Extra HEARTBEATs while sending, so the cursor follows within seconds rather than once per
    # HELLO interval. None: 2 s to a gatewayd, none to Terra (it asks for no more than one per
    # interval).
    ack_interval_s: float | None = Field(None, gt=0.0)
    connect_timeout_s: float = Field(15.0, gt=0.0, le=300.0)

    @field_validator("url", "api_base_url")
    @classmethod
    def _scheme(cls, value: str, info: ValidationInfo) -> str:
        schemes = ("ws://", "wss://") if info.field_name == "url" else ("http://", "https://")
        if not value.startswith(schemes):
            raise ValueError(f"must start with {' or '.join(schemes)}")
        return value

    @model_validator(mode="after")
    def _credentials(self) -> UpstreamConfig:
        if self.backoff_max_s < self.backoff_min_s:
            raise ValueError("backoff_max_s must not be below backoff_min_s")
        if (self.tls_client_key is not None) and self.tls_client_cert is None:
            raise ValueError("tls_client_key needs tls_client_cert")
        if not self.enabled:
            return self
        if self.mode == "gatewayd" and self.token is None and self.token_file is None:
            raise ValueError(
                "mode gatewayd needs `token` (or `token_file`): a producer token of the other hub"
            )
        if self.mode == "terra":
            if not self.tokens and not self.terra_user_ids:
                raise ValueError(
                    "mode terra needs `tokens` (athlete id -> token) or `terra_user_ids` "
                    "(athlete id -> Terra user id, tokens minted with dev_id and the API key)"
                )
            if self.terra_user_ids and not self.dev_id:
                raise ValueError("`terra_user_ids` needs `dev_id` (and an API key) to mint tokens")
        return self


class MqttTlsConfig(Section):
    enabled: bool = False
    ca_file: Path | None = None  # default: the system's trusted CAs
    cert_file: Path | None = None  # client certificate, with key_file
    key_file: Path | None = None
    insecure: bool = False  # skip the host name check (self-signed test brokers only)

    @model_validator(mode="after")
    def _pair(self) -> MqttTlsConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together: set both or neither")
        return self


class MqttConfig(Section):
    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = Field(1883, ge=1, le=65535)
    # Topic levels go below this; no wildcards, no leading or trailing slash.
    prefix: str = Field("gatewayd", pattern=r"^[^+#/\x00]+(/[^+#/\x00]+)*$")
    qos: Literal[0, 1, 2] = 1
    protocol: Literal["5", "3.1.1"] = "5"
    client_id: str | None = Field(None, min_length=1, max_length=128)  # default gatewayd-<hub id>
    # A persistent session (clean_session false) keeps the broker's state for this client id
    # across reconnects; session_expiry_s bounds how long the broker keeps it (MQTT 5 only).
    clean_session: bool = False
    session_expiry_s: int = Field(7 * 24 * 3600, ge=0, le=0xFFFFFFFF)
    keepalive_s: int = Field(30, ge=5, le=65535)
    tls: MqttTlsConfig = MqttTlsConfig()
    username: str | None = None
    # The password is never in this file: read from password_file or from the environment
    # variable named by password_env, again before every connection attempt.
    password_file: Path | None = None
    password_env: str | None = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    # Messages held while the broker is unreachable; the oldest go first and are counted.
    offline_queue: int = Field(50_000, ge=10, le=10_000_000)
    reconnect_min_s: float = Field(1.0, gt=0.0)
    reconnect_max_s: float = Field(30.0, gt=0.0)
    # One message per athlete per second on <prefix>/<hub>/athletes/<uid> instead of one per
    # data type: about a quarter of the messages, for dashboards that take the whole second.
    per_athlete: bool = False
    discovery: bool = False  # Home Assistant MQTT discovery
    discovery_prefix: str = Field("homeassistant", pattern=r"^[^+#/\x00]+(/[^+#/\x00]+)*$")
    # Home Assistant shows a sensor as unavailable after this long without a value (0: never).
    discovery_expire_after_s: int = Field(60, ge=0)

    @field_validator("protocol", mode="before")
    @classmethod
    def _protocol_text(cls, value: object) -> object:
        # YAML reads `protocol: 5` as a number and `3.1.1` as text; accept both spellings.
        return str(value) if isinstance(value, int | float) else value

    @model_validator(mode="after")
    def _consistent(self) -> MqttConfig:
        if self.password_file is not None and self.password_env is not None:
            raise ValueError("set password_file or password_env, not both")
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError("reconnect_max_s must be at least reconnect_min_s")
        if self.per_athlete and self.discovery:
            raise ValueError(
                "discovery needs one topic per data type: set per_athlete false, or discovery false"
            )
        return self


class OutputsConfig(Section):
    stdout: StdoutConfig = StdoutConfig()
    local_broker: LocalBrokerConfig = LocalBrokerConfig()
    upstream: UpstreamConfig = UpstreamConfig()
    mqtt: MqttConfig = MqttConfig()


class BoardConfig(Section):
    """The gym board served at `/` on the local broker's port (a TV or tablet shows it)."""

    enabled: bool = True
    title: str = ""  # default: hub.name
    # Lower bounds of zones 1-5 in percent of max HR (below the first: no zone).
    zones: list[float] = [50.0, 60.0, 70.0, 80.0, 90.0]
    # For athletes with neither max_hr nor age, e.g. an unknown strap; unset shows bpm only.
    default_max_hr: int | None = Field(None, ge=100, le=250)
    low_battery_pct: float = Field(20.0, ge=0.0, le=100.0)
    # A lost athlete's tile stays (marked "signal lost") this long, then leaves the board. The
    # board's token may REPLAY only this far back.
    forget_after_s: float = Field(600.0, ge=10.0, le=86_400.0)
    # The key in the board's URL; unset: a random one kept in <state dir>/board.key.
    key: str | None = Field(None, min_length=16, pattern=r"^[A-Za-z0-9_-]+$")

    @field_validator("zones")
    @classmethod
    def _five_ascending(cls, zones: list[float]) -> list[float]:
        if len(zones) != 5:
            raise ValueError("give exactly five lower bounds, e.g. [50, 60, 70, 80, 90]")
        if any(b <= a for a, b in itertools.pairwise(zones)):
            raise ValueError("zone lower bounds must strictly increase, e.g. [50, 60, 70, 80, 90]")
        if zones[0] <= 0 or zones[-1] > 150:
            raise ValueError("zone lower bounds are percent of max HR, between 0 and 150")
        return zones


class EnergyConfig(Section):
    """CALORIES and zone minutes per workout (gatewayd/energy.py, docs/board.md)."""

    enabled: bool = True
    # A workout ends when the athlete has been gone this long; CALORIES then starts from 0.
    workout_end_after_s: float = Field(900.0, ge=30.0, le=86400.0)
    # Cycling's gross efficiency, for energy from power (Ettema & Loras 2009: about 0.18-0.23).
    gross_efficiency: float = Field(0.22, ge=0.1, le=0.35)


class MdnsConfig(Section):
    """DNS-SD over mDNS, so a tablet finds the hub by name (gatewayd/mdns.py, docs/board.md)."""

    # auto: only when the broker listens beyond loopback; true: always; false: never.
    enabled: bool | Literal["auto"] = "auto"
    # IPv4 addresses of the interfaces to announce on (and the addresses announced); empty:
    # every interface's.
    interfaces: list[str] = []

    @field_validator("interfaces")
    @classmethod
    def _ipv4(cls, value: list[str]) -> list[str]:
        for address in value:
            parts = address.split(".")
            if len(parts) != 4 or not all(p.isdigit() and int(p) < 256 for p in parts):
                raise ValueError(f"{address!r} is not an IPv4 address, e.g. 192.168.1.20")
        return value


class SpoolConfig(Section):
    max_bytes: int = Field(1 << 30, ge=1 << 20)
    max_age_days: float = Field(7.0, gt=0.0)


class LoggingConfig(Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    rate_limit_s: float = Field(60.0, ge=0.0)


class _YamlSource(PydanticBaseSettingsSource):
    def __init__(self, settings_cls: type[BaseSettings], data: dict[str, Any]) -> None:
        super().__init__(settings_cls)
        self._data = data

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return self._data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return self._data


class Config(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="GATEWAYD_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    hub: HubConfig = HubConfig()
    athletes: list[Athlete] = []
    pipeline: PipelineConfig = PipelineConfig()
    sources: SourcesConfig = SourcesConfig()
    outputs: OutputsConfig = OutputsConfig()
    board: BoardConfig = BoardConfig()
    energy: EnergyConfig = EnergyConfig()
    mdns: MdnsConfig = MdnsConfig()
    spool: SpoolConfig = SpoolConfig()
    logging: LoggingConfig = LoggingConfig()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _YamlSource(settings_cls, _PENDING_YAML))

    @field_validator("athletes")
    @classmethod
    def _unique(cls, athletes: list[Athlete]) -> list[Athlete]:
        seen_ids: set[str] = set()
        seen_devices: dict[tuple[str, str], str] = {}
        for athlete in athletes:
            if athlete.id in seen_ids:
                raise ValueError(f"athlete id {athlete.id!r} appears twice; ids must be unique")
            seen_ids.add(athlete.id)
            for device in athlete.devices:
                key = (device.source, device.id)
                if key in seen_devices:
                    raise ValueError(
                        f"device {device.source}:{device.id} is listed for both "
                        f"{seen_devices[key]!r} and {athlete.id!r}; a device belongs to one athlete"
                    )
                seen_devices[key] = athlete.id
        return athletes

    def roster(self) -> Roster:
        athletes = [
            AthleteInfo(
                a.id,
                a.name or a.id,
                a.max_hr or _max_hr_from_age(a.age),
                a.wheel_circumference_m,
                age=a.age,
                weight_kg=a.weight_kg,
                sex=a.sex,
            )
            for a in self.athletes
        ]
        devices: dict[tuple[str, str], str] = {
            (d.source, d.id): a.id for a in self.athletes for d in a.devices
        }
        return Roster(athletes, devices, track_unknown=self.hub.unknown_devices == "track")

    def state_dir(self) -> Path:
        if self.hub.state_dir is not None:
            return self.hub.state_dir
        from_systemd = os.environ.get("STATE_DIRECTORY")
        if from_systemd:
            return Path(from_systemd.split(":")[0])
        system = Path("/var/lib/gatewayd")
        if system.is_dir() and os.access(system, os.W_OK):
            return system
        return Path(os.environ.get("XDG_STATE_HOME", Path.home() / ".local" / "state")) / "gatewayd"


# Path keys that name a directory gatewayd creates, not a file it reads.
DIRECTORY_KEYS = frozenset({"hub.state_dir"})


def file_keys(config: BaseModel, prefix: str = "") -> list[tuple[str, Path]]:
    """Every (dotted key, path) naming a file that `run` will read: set, and not in a section
    that is switched off (`enabled: false`)."""
    if getattr(config, "enabled", True) is False:
        return []
    found: list[tuple[str, Path]] = []
    for name in type(config).model_fields:
        value = getattr(config, name)
        key = f"{prefix}{name}"
        if isinstance(value, Path) and key not in DIRECTORY_KEYS:
            found.append((key, value))
        elif isinstance(value, BaseModel):
            found.extend(file_keys(value, f"{key}."))
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if isinstance(item, BaseModel):
                    found.extend(file_keys(item, f"{key}.{i}."))
    return found


def check_files(config: Config) -> None:
    """Refuse (ConfigError naming the key) any file a key names that is missing or unreadable."""
    for key, path in file_keys(config):
        if not path.exists():
            raise ConfigError(key, f"{path} does not exist (fix the path, or unset {key})")
        if not path.is_file():
            raise ConfigError(key, f"{path} is not a file")
        if not os.access(path, os.R_OK):
            raise ConfigError(key, f"{path} is not readable by this user (check its mode)")


def _max_hr_from_age(age: int | None) -> int | None:
    return 220 - age if age is not None else None


# pydantic-settings builds its sources from the class, so the parsed YAML is handed over here;
# load() is the only writer and holds it only for the duration of one construction.
_PENDING_YAML: dict[str, Any] = {}


def resolve_path(explicit: str | Path | None) -> Path | None:
    """Which config file to read, or None for the built-in defaults."""
    if explicit is not None:
        return Path(explicit)
    from_env = os.environ.get(ENV_CONFIG)
    if from_env:
        return Path(from_env)
    if DEFAULT_CONFIG_PATH.exists():
        return DEFAULT_CONFIG_PATH
    return None


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (plain YAML keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[object, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if isinstance(key, str | int | float | bool) and key in seen:
                raise ConfigError(
                    str(key),
                    f"the key {key!r} appears twice in one mapping (lines {seen[key]} and {line}); "
                    "YAML would silently keep the last: remove one",
                )
            if isinstance(key, str | int | float | bool):
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


# Deeper than any real config; far below what would exhaust the parser's recursion.
MAX_YAML_DEPTH = 64


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError("", f"config file {path} does not exist") from None
    except OSError as exc:
        raise ConfigError("", f"cannot read config file {path}: {exc.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            "",
            f"{path} is not UTF-8 text (byte {exc.start}: {raw[exc.start : exc.start + 1]!r}); "
            "is it the right file? Save it as UTF-8",
        ) from None
    depth = _nesting(text)
    if depth > MAX_YAML_DEPTH:
        raise ConfigError(
            "", f"{path} is nested {depth} levels deep (at most {MAX_YAML_DEPTH}): not a config"
        )
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # a SafeLoader subclass
    except RecursionError:
        raise ConfigError("", f"{path} is nested too deep to be a config") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError("", f"{path} is not valid YAML{where}: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("", f"{path} must hold a mapping of sections, not {type(data).__name__}")
    return data


def _nesting(text: str) -> int:
    """An upper bound of the flow-style nesting ([ and {), cheap enough to run before parsing.

    Counts brackets outside quotes only roughly (a bracket inside a quoted string counts too),
    which can only over-estimate: a real config stays far below the limit either way."""
    deepest = depth = 0
    for char in text:
        if char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth = max(depth - 1, 0)
    return deepest


def load(path: str | Path | None = None, *, defaults_run_simulator: bool = True) -> Config:
    """Load and validate the configuration; raise ConfigError naming the first bad key."""
    resolved = resolve_path(path)
    data = read_yaml(resolved) if resolved is not None else {}
    if resolved is None and defaults_run_simulator:
        data = {"sources": {"simulator": {"enabled": True}}}
    _PENDING_YAML.clear()
    _PENDING_YAML.update(data)
    try:
        return Config()
    except ValidationError as exc:
        raise _config_error(exc, resolved) from None
    finally:
        _PENDING_YAML.clear()


def _config_error(exc: ValidationError, path: Path | None) -> ConfigError:
    lines = []
    first_key = ""
    for error in exc.errors():
        key = ".".join(str(part) for part in error["loc"])
        first_key = first_key or key
        value = error.get("input")
        if error["type"] == "extra_forbidden":
            fix = "remove it or check its spelling against config/gatewayd.yaml"
            lines.append(f"{key}: unknown key ({fix})")
        elif error["type"] == "missing":
            lines.append(f"{key}: required but missing")
        else:
            lines.append(f"{key}: {error['msg']} (got {value!r})")
    where = f" in {path}" if path else ""
    return ConfigError(first_key, f"invalid configuration{where}:\n  " + "\n  ".join(lines))


def override(config: Config, changes: dict[str, Any]) -> Config:
    """A copy of `config` with dotted keys replaced (`{"sources.simulator.athletes": 20}`),
    validated like the file itself."""
    data = config.model_dump(mode="python")
    for dotted, value in changes.items():
        node = data
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    try:
        return Config(**data)
    except ValidationError as exc:
        raise _config_error(exc, None) from None
