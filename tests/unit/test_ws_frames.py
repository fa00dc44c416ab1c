"""The upstream's own client frames, read back by websockets' parser (an independent decoder)."""

from __future__ import annotations

from websockets.frames import Frame, Opcode
from websockets.streams import StreamReader

from gatewayd.sinks.ws_frames import masked_text_frames


def _parse(data: bytes) -> list[tuple[Frame, bytes]]:
    """Every frame in `data` as a server reads it (RFC 6455: client frames must be masked), with
    the masking key each one carried."""
    reader = StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    frames = []
    while reader.buffer:
        start = len(data) - len(reader.buffer)
        parser = Frame.parse(reader.read_exact, mask=True, max_size=None)
        try:
            next(parser)
        except StopIteration as done:
            frame = done.value
        else:
            raise AssertionError("a frame was cut short")
        length = len(frame.data)
        key_at = start + 2 + (2 if 126 <= length < 1 << 16 else 8 if length >= 1 << 16 else 0)
        frames.append((frame, data[key_at : key_at + 4]))
    return frames


def test_each_payload_is_one_masked_final_text_frame_of_every_length_encoding():
    payloads = [b"", b'{"op":6}', "é".encode() * 62, b"x" * 126, b"y" * 65535, b"z" * 65536]
    frames = _parse(masked_text_frames(payloads))
    assert [frame.data for frame, _ in frames] == payloads
    assert all(frame.opcode is Opcode.TEXT and frame.fin for frame, _ in frames)


def test_every_frame_has_its_own_key():
    frames = _parse(masked_text_frames([b'{"op":6,"d":{}}'] * 200))
    keys = [key for _, key in frames]
    assert len(keys) == 200 and len(set(keys)) >= 199  # 2^32 keys: a repeat is a 1 in 10^5 event
    assert masked_text_frames([]) == b""
