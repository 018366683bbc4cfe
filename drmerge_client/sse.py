"""Server-sent events, read line by line (the WHATWG ``text/event-stream`` rules that a
client needs: ``event``, ``data`` (joined by newlines), ``id``, comments; an event ends at
a blank line)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class SSEMessage:
    event: str
    data: str
    id: str | None  # the id this message set (None: it set none; the caller keeps the last one)


def parse(lines: Iterable[str]) -> Iterator[SSEMessage]:
    event, data, msg_id = "", [], None
    for raw in lines:
        line = raw.rstrip("\r\n")
        if not line:
            if data or event:
                yield SSEMessage(event or "message", "\n".join(data), msg_id)
            event, data, msg_id = "", [], None
            continue
        if line.startswith(":"):
            continue  # a comment: the server's keep-alive
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "event":
            event = value
        elif name == "data":
            data.append(value)
        elif name == "id" and "\0" not in value:
            msg_id = value
