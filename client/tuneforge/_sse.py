"""Server-Sent Events decoding: raw byte chunks of a `text/event-stream` body in, each event's data out."""

from __future__ import annotations

import codecs
import re
from collections.abc import Iterable, Iterator

# The format allows all three line endings; a CR may arrive at the end of one chunk and its LF in the next.
_LINE_END = re.compile(r"\r\n?|\n")


class SSEDecoder:
    """Incremental decoder for the WHATWG event-stream format, keeping only `data` fields.

    Chunks may split a line, a CRLF pair or a multi-byte character anywhere. Comment lines
    (starting with `:`) are keep-alives and yield nothing; so does an event without data. Event
    names, ids and `retry` are ignored: the metrics stream sends none. An event not closed by a
    blank line when the body ends is dropped, as the format says.
    """

    def __init__(self) -> None:
        # utf-8-sig: the format allows (and strips) a byte-order mark at the very start.
        self._text = codecs.getincrementaldecoder("utf-8-sig")(errors="replace")
        self._buffer = ""
        self._data: list[str] = []
        # The previous chunk ended in CR: an LF opening the next one belongs to the same line end.
        self._skip_lf = False

    def feed(self, chunk: bytes) -> list[str]:
        """Decode one chunk; return the data of every event it completes, in order."""
        self._buffer += self._text.decode(chunk)
        events: list[str] = []
        start = 0
        while True:
            if self._skip_lf and start < len(self._buffer):
                if self._buffer[start] == "\n":
                    start += 1
                self._skip_lf = False
            end = _LINE_END.search(self._buffer, start)
            if end is None:
                break
            self._skip_lf = end.group() == "\r" and end.end() == len(self._buffer)
            event = self._line(self._buffer[start : end.start()])
            if event is not None:
                events.append(event)
            start = end.end()
        self._buffer = self._buffer[start:]
        return events

    def _line(self, line: str) -> str | None:
        """Take one line; return the event's data when the line (a blank one) completes an event."""
        if not line:
            data, self._data = self._data, []
            return "\n".join(data) if data else None
        if line.startswith(":"):
            return None
        field, _, value = line.partition(":")
        if field == "data":
            self._data.append(value.removeprefix(" "))
        return None


def iter_sse_data(chunks: Iterable[bytes]) -> Iterator[str]:
    """The data of each event in a stream of byte chunks (e.g. `httpx.Response.iter_bytes()`)."""
    decoder = SSEDecoder()
    for chunk in chunks:
        yield from decoder.feed(chunk)
