"""Stream the items of a top-level JSON array or object without loading the whole file.

MPtrj (``MPtrj_2022.9_full.json``, about 11 GB) is one JSON object ``{mp_id: {frame_id: {...}}}``; the mlearn
files are one JSON array. :func:`iter_json_items` yields ``(key, value)`` for an object (``key`` is ``None`` for an
array), decoding one item at a time with :meth:`json.JSONDecoder.raw_decode`; memory is bounded by the largest
single item plus one read block.
"""
from __future__ import annotations

import json
from typing import Iterator, Optional

_WHITESPACE = " \t\r\n"


class _Buffer:
    def __init__(self, handle, block: int):
        self.handle = handle
        self.block = block
        self.text = ""
        self.pos = 0
        self.eof = False
        self.consumed = 0  # characters dropped from the front (for error positions)

    def fill(self) -> bool:
        if self.eof:
            return False
        chunk = self.handle.read(self.block)
        if not chunk:
            self.eof = True
            return False
        if self.pos > self.block:  # drop what has been parsed
            self.consumed += self.pos
            self.text = self.text[self.pos:]
            self.pos = 0
        self.text += chunk
        return True

    def skip_whitespace(self) -> None:
        while True:
            while self.pos < len(self.text) and self.text[self.pos] in _WHITESPACE:
                self.pos += 1
            if self.pos < len(self.text) or not self.fill():
                return

    def peek(self) -> str:
        self.skip_whitespace()
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def expect(self, chars: str, path: str) -> str:
        char = self.peek()
        if not char or char not in chars:
            found = repr(char) if char else "end of file"
            raise ValueError(f"{path}: invalid JSON at character {self.consumed + self.pos}: expected one of "
                             f"{chars!r}, found {found}")
        self.pos += 1
        return char

    def decode(self, decoder: json.JSONDecoder, path: str):
        self.skip_whitespace()
        while True:
            try:
                value, end = decoder.raw_decode(self.text, self.pos)
            except json.JSONDecodeError as err:
                if self.fill():  # maybe the value is just incomplete: read more and retry
                    continue
                raise ValueError(f"{path}: invalid or truncated JSON at character {self.consumed + err.pos}: "
                                 f"{err.msg}") from None
            # a number at the end of the buffer may continue in the next block
            if end == len(self.text) and not self.eof and self.fill():
                continue
            self.pos = end
            return value


def iter_json_items(path, block: int = 1 << 22) -> Iterator[tuple[Optional[str], object]]:
    """Yield ``(key, value)`` of a top-level JSON object, or ``(None, value)`` of a top-level array."""
    decoder = json.JSONDecoder()
    with open(path, encoding="utf-8") as handle:
        buf = _Buffer(handle, block)
        opening = buf.expect("[{", path)
        closing = "]" if opening == "[" else "}"
        if buf.peek() == closing:
            buf.pos += 1
            return
        while True:
            key = None
            if opening == "{":
                key = buf.decode(decoder, path)
                if not isinstance(key, str):
                    raise ValueError(f"{path}: invalid JSON object key {key!r}")
                buf.expect(":", path)
            yield key, buf.decode(decoder, path)
            if buf.expect("," + closing, path) == closing:
                return
