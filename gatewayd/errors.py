"""The exception tree (DESIGN.md, Errors): every error gatewayd raises on purpose."""

from __future__ import annotations

EX_CONFIG = 78  # sysexits.h: systemd's RestartPreventExitStatus keeps a bad config from looping


class GatewayError(Exception):
    """Base of every deliberate gatewayd error."""


class ConfigError(GatewayError):
    """A configuration value is wrong. `key` is the dotted path, e.g. `outputs.mqtt.port`."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}" if key else message)
        self.key = key
        self.message = message


class DecodeError(GatewayError):
    """Bytes that do not decode. Counted per device and profile and dropped, never fatal."""

    def __init__(self, profile: str, reason: str, payload: bytes) -> None:
        super().__init__(f"{profile}: {reason} (bytes {payload.hex() or '<empty>'})")
        self.profile = profile
        self.reason = reason
        self.payload = bytes(payload)


class SourceError(GatewayError):
    """A radio source cannot deliver; the source backs off and retries."""


class SourceUnavailable(SourceError):
    """No adapter, no stick, no permission: the hardware is not there (yet)."""


class SourceLost(SourceError):
    """A device or adapter that was there went away."""


class SinkError(GatewayError):
    """An output cannot deliver."""


class SinkClosed(SinkError):
    """We closed the sink ourselves (shutdown)."""


class SinkBroken(SinkError):
    """The network or the peer failed; the sink backs off and retries."""


class SpoolError(GatewayError):
    """The spool's disk is full or its file is corrupt; loud, but live outputs keep going."""
