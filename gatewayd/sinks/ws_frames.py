"""WebSocket text frames as a client writes them (RFC 6455, 5.2 and 5.3), many at a time.

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


def masked_text_frames(payloads: list[bytes]) -> bytes:
    """The frames of `payloads` (UTF-8 text, each one whole message), masked, back to back."""
    keys = os.urandom(4 * len(payloads))
    out = []
    for i, payload in enumerate(payloads):
        key = keys[4 * i : 4 * i + 4]
        n = len(payload)
        if n < 126:
            head = bytes((_TEXT_FIN, _MASKED | n))
        elif n < 1 << 16:
            head = struct.pack("!BBH", _TEXT_FIN, _MASKED | 126, n)
        else:
            head = struct.pack("!BBQ", _TEXT_FIN, _MASKED | 127, n)
        out.append(head + key + apply_mask(payload, key))
    return b"".join(out)
