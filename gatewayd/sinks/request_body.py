"""Small request bodies for the broker's JSON API, which websockets alone refuses.

websockets parses only a request's head and rejects any Content-Length but 0 (a WebSocket
handshake has no body). `BodyConnection` reads the head itself first: for a path under `/api/`
with a body of at most MAX_BODY bytes, it waits for the whole body, keeps it (`request_body`),
and hands websockets the head without its Content-Length. Everything else is passed on
untouched, and once the head is through, the connection's data_received is websockets' own:
a WebSocket session (the broker's hot path) never runs this code after its first packet.

What a client can make the hub hold before authenticating is bounded: a body is read only when
`may_send_body` accepts the Authorization header from the peer's address (a wrong token gets 401,
an address locked for guessing 429, before any body byte is kept), and never more than MAX_BODY
bytes (larger: 413).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from websockets.asyncio.server import ServerConnection

MAX_BODY = 64 * 1024
MAX_HEAD = 16 * 1024  # websockets' own limits refuse longer heads anyway
API_PREFIX = b"/api/"

_REASONS = {
    400: "Bad Request",
    401: "Unauthorized",
    413: "Content Too Large",
    429: "Too Many Requests",
}
_GATE_ANSWERS = {
    401: '{"error": "missing or wrong admin token"}\n',
    429: '{"error": "too many refused credentials from this address: try again later"}\n',
}
# may_send_body(Authorization header, peer host) -> 0 to read the body, else 401 or 429
Gate = Callable[[str, str], int]


def _header(lines: list[bytes], name: bytes) -> list[bytes]:
    prefix = name.lower() + b":"
    return [line[len(prefix) :].strip() for line in lines if line.lower().startswith(prefix)]


class BodyConnection(ServerConnection):
    """A ServerConnection that takes a bounded body off `/api/` requests (see the module)."""

    may_send_body: Gate = staticmethod(lambda authorization, host: 401)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.request_body = b""
        self._head = bytearray()
        self._body_needed = -1  # bytes of body still to come; -1 while the head is incomplete
        self._clean_head = b""

    def data_received(self, data: bytes) -> None:
        if self._body_needed >= 0:
            self._take_body(data)
            return
        self._head += data
        end = self._head.find(b"\r\n\r\n")
        if end < 0:
            if len(self._head) > MAX_HEAD:
                self._pass_on(bytes(self._head))
            return
        head, rest = bytes(self._head[: end + 4]), bytes(self._head[end + 4 :])
        self._head = bytearray()
        lines = head.split(b"\r\n")
        request_line = lines[0].split(b" ")
        lengths = _header(lines[1:], b"content-length")
        path = request_line[1] if len(request_line) == 3 else b""
        if not path.startswith(API_PREFIX) or not lengths or set(lengths) == {b"0"}:
            self._pass_on(head + rest)
            return
        if len(set(lengths)) != 1 or not lengths[0].isdigit():
            self._refuse(400, "bad Content-Length\n")
            return
        authorization = b"".join(_header(lines[1:], b"authorization")).decode("latin-1")
        peer = self.transport.get_extra_info("peername")
        host = str(peer[0]) if isinstance(peer, tuple) and peer else "?"
        refusal = type(self).may_send_body(authorization, host)
        if refusal:
            self._refuse(refusal, _GATE_ANSWERS[refusal])
            return
        length = int(lengths[0])
        if length > MAX_BODY:
            self._refuse(413, f"a request body may be at most {MAX_BODY} bytes\n")
            return
        expect = _header(lines[1:], b"expect")
        kept = [
            line
            for line in lines[1:]
            if not line.lower().startswith((b"content-length:", b"expect:"))
        ]
        self._clean_head = b"\r\n".join([lines[0], *kept])
        self._body_needed = length
        if expect and expect[0].lower() == b"100-continue":
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        self._take_body(rest)

    def _take_body(self, data: bytes) -> None:
        take = data[: self._body_needed]
        self.request_body += take
        self._body_needed -= len(take)
        if self._body_needed == 0:
            self._body_needed = -2  # done: anything after the body goes to websockets
            self._pass_on(self._clean_head + data[len(take) :])

    def _pass_on(self, data: bytes) -> None:
        # From here on the transport calls websockets' own method: no per-packet cost remains.
        self.data_received = super().data_received  # type: ignore[method-assign]
        if data:
            super().data_received(data)

    def _refuse(self, status: int, text: str) -> None:
        body = text.encode("utf-8")
        content_type = b"application/json" if text.startswith("{") else b"text/plain"
        head = (
            f"HTTP/1.1 {status} {_REASONS[status]}\r\n".encode()
            + b"Content-Type: "
            + content_type
            + b"; charset=utf-8\r\n"
            + f"Content-Length: {len(body)}\r\nConnection: close\r\n".encode()
            + b"Cache-Control: no-store\r\n\r\n"
        )
        self.data_received = lambda data: None  # type: ignore[method-assign]
        self.transport.write(head + body)
        self.transport.close()


def body_connection(may_send_body: Gate) -> type[BodyConnection]:
    """A BodyConnection class whose body gate is `may_send_body(Authorization header, host)`."""
    return type(
        "GatedBodyConnection", (BodyConnection,), {"may_send_body": staticmethod(may_send_body)}
    )
