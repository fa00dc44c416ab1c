"""The upstream's own client frames, read back by websockets' parser (an independent decoder)."""

from __future__ import annotations

from websockets.frames import Frame, Opcode
from websockets.streams import StreamReader

from gatewayd.sinks.ws_frames import masked_text_frames, ws_text_frame, ws_text_frames


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
    texts = ["", '{"op":6}', "é" * 62, "x" * 126, "y" * 65535, "z" * 65536]
    frames = _parse(masked_text_frames(texts))
    assert [frame.data.decode() for frame, _ in frames] == texts
    assert all(frame.opcode is Opcode.TEXT and frame.fin for frame, _ in frames)


def test_every_frame_has_its_own_key():
    frames = _parse(masked_text_frames(['{"op":6,"d":{}}'] * 200))
    keys = [key for _, key in frames]
    assert len(keys) == 200 and len(set(keys)) >= 199  # 2^32 keys: a repeat is a 1 in 10^5 event
    assert masked_text_frames([]) == b""


def test_a_servers_frames_are_unmasked_final_text_frames_of_every_length_encoding():
    texts = ["", '{"op":5}', "é" * 62, "x" * 125, "x" * 126, "y" * 65535, "z" * 65536]
    frames = ws_text_frames(texts)
    assert frames == [ws_text_frame(text.encode()) for text in texts]
    reader = StreamReader()
    reader.feed_data(b"".join(frames))
    reader.feed_eof()
    parsed = []
    for _ in texts:
        parser = Frame.parse(reader.read_exact, mask=False, max_size=None)
        try:
            next(parser)
        except StopIteration as done:
            parsed.append(done.value)
    assert not reader.buffer
    assert [frame.data.decode() for frame in parsed] == texts
    assert all(frame.opcode is Opcode.TEXT and frame.fin for frame in parsed)
