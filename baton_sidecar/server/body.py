"""Reading request bodies: bounded in size, bounded in how long a client may pause.

A generation request's body is read whole (up to ``limit`` bytes) so it can be parsed; past the
limit the read stops and what was read plus the unread rest can still be streamed on to the
incumbent, so a large body the incumbent accepts is never refused by the sidecar. Every read waits
at most ``idle_timeout_s`` for the next bytes: a client that stops sending (or sends a body shorter
than its ``Content-Length``) gets 408 instead of holding the connection forever.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import AsyncIterator, Callable

from aiohttp import web

from baton_sidecar.server.errors import APIError

CHUNK = 1 << 16


class BodyTimeout(APIError):
    """The client paused longer than the body timeout; answered 408 and the connection closed."""

    closes_connection = True  # the rest of the body never came: the connection is unusable

    def __init__(self, timeout_s: float) -> None:
        super().__init__(408, f"body: no data received for {timeout_s:g} s", param="body",
                         code="request_timeout")


class BrokenBody(APIError):
    """Bad framing inside the body (a bad chunk size); answered 400 and the connection closed.
    Counted as ``bad_http`` by the connection handler (``connections``)."""

    closes_connection = True

    def __init__(self, detail: str) -> None:
        super().__init__(400, f"body: {detail}", param="body", code="bad_http")


@dataclass
class Body:
    """``data`` is the whole body when ``complete``; otherwise the first bytes of a body over the
    limit (possibly none), whose rest ``stream`` still yields."""

    data: bytes
    complete: bool
    request: web.Request
    idle_timeout_s: float
    on_timeout: Callable[[], None] | None = None

    def stream(self) -> AsyncIterator[bytes]:
        """The whole body, from the first byte, as it arrives (for the incumbent)."""
        return _chain(self.data, self.request, self.idle_timeout_s, self.on_timeout)


async def read_chunk(request: web.Request, idle_timeout_s: float,
                     on_timeout: Callable[[], None] | None = None) -> bytes:
    """The next bytes of the body; b"" at its end."""
    try:
        return await asyncio.wait_for(request.content.readany(), idle_timeout_s)
    except asyncio.TimeoutError:
        if on_timeout is not None:
            on_timeout()
        raise BodyTimeout(idle_timeout_s) from None
    except web.RequestPayloadError as exc:
        raise BrokenBody(str(exc)) from None


async def read_body(request: web.Request, limit: int, idle_timeout_s: float,
                    on_timeout: Callable[[], None] | None = None) -> Body:
    """Read up to ``limit`` bytes; a declared ``Content-Length`` over it is not read at all."""
    if request.content_length is not None and request.content_length > limit:
        return Body(b"", False, request, idle_timeout_s, on_timeout)
    parts: list[bytes] = []
    size = 0
    while chunk := await read_chunk(request, idle_timeout_s, on_timeout):
        parts.append(chunk)
        size += len(chunk)
        if size > limit:
            return Body(b"".join(parts), False, request, idle_timeout_s, on_timeout)
    return Body(b"".join(parts), True, request, idle_timeout_s, on_timeout)


async def _chain(head: bytes, request: web.Request, idle_timeout_s: float,
                 on_timeout: Callable[[], None] | None) -> AsyncIterator[bytes]:
    if head:
        yield head
    while chunk := await read_chunk(request, idle_timeout_s, on_timeout):
        yield chunk


def body_stream(request: web.Request, idle_timeout_s: float,
                on_timeout: Callable[[], None] | None = None) -> AsyncIterator[bytes] | None:
    """A pass-through request's body as it arrives, or None when it has none."""
    if not request.body_exists:
        return None
    return _chain(b"", request, idle_timeout_s, on_timeout)


async def read_whole_body(request: web.Request, limit: int, idle_timeout_s: float) -> bytes:
    """The whole body of a request the sidecar answers itself (nothing to relay): 413 past ``limit``."""
    body = await read_body(request, limit, idle_timeout_s)
    if not body.complete:
        raise too_large(limit)
    return body.data


def too_large(limit: int) -> APIError:
    return APIError(413, f"request body exceeds {limit} bytes", param="body",
                       code="request_too_large")
