"""WebSocket text frames written straight to a transport (RFC 6455, 5.2 and 5.3).

The broker writes each DISPATCH once, unmasked, to every consumer (ws_text_frame); the upstream
writes its SUBMITs masked, as a client must, many at a time (masked_text_frames).

The upstream SUBMITs one frame per sample. websockets' own path builds a Frame object, serializes
it through a BytesIO and reads a fresh 4-byte key from the kernel for every frame; for thousands
of samples a second that cost more than the sample itself. Here one os.urandom() call gives the
keys of a whole batch: each frame still has its own key from the kernel's CSPRNG, so no key can be
predicted from another (5.3: "derived from a strong source of entropy").
"""

from __future__ import annotations

import os
import struct

try:
    from websockets.speedups import apply_mask
except ImportError:  # pragma: no cover (a websockets build without its C extension)
    from websockets.utils import apply_mask

_TEXT_FIN = 0x81  # FIN + opcode 1 (text)
_MASKED = 0x80


def _text_header(n: int, mask_bit: int) -> bytes:
    """A final text frame's first bytes for an `n`-byte payload (5.2: 7, 16 or 64-bit length)."""
    if n < 126:
        return bytes((_TEXT_FIN, mask_bit | n))
    if n < 1 << 16:
        return struct.pack("!BBH", _TEXT_FIN, mask_bit | 126, n)
    return struct.pack("!BBQ", _TEXT_FIN, mask_bit | 127, n)


# The headers of payloads under 126 bytes (a sample's frame is 70-110), made once.
_SHORT = tuple(_text_header(n, 0) for n in range(126))
_SHORT_MASKED = tuple(_text_header(n, _MASKED) for n in range(126))


def ws_text_frame(payload: bytes) -> bytes:
    """An unmasked, unfragmented, uncompressed text frame, as a server writes it."""
    n = len(payload)
    return (_SHORT[n] if n < 126 else _text_header(n, 0)) + payload


def ws_text_frames(texts: list[str]) -> list[bytes]:
    """ws_text_frame() of each text, UTF-8 encoded: the broker's DISPATCHes of a batch."""
    out = []
    short = _SHORT
    for text in texts:
        payload = text.encode()
        n = len(payload)
        out.append((short[n] if n < 126 else _text_header(n, 0)) + payload)
    return out


def masked_text_frames(texts: list[str]) -> bytes:
    """The frames of `texts` (each one whole message), UTF-8 encoded and masked, back to back."""
    keys = os.urandom(4 * len(texts))
    out: list[bytes] = []
    short = _SHORT_MASKED
    at = 0
    for text in texts:
        payload = text.encode()
        n = len(payload)
        key = keys[at : at + 4]
        at += 4
        out += (short[n] if n < 126 else _text_header(n, _MASKED), key, apply_mask(payload, key))
    return b"".join(out)
