"""The router's one HTTP client, for the node daemons and the replicas alike.

aiohttp rather than httpx: the router relays every token of every stream, and on the reference
VM aiohttp's client (a C HTTP parser, a connection pool that does not scan itself per request)
spent about a fifteenth of httpx's CPU time reading the same 512 streams of 32 chunks
(benchmarks/RESULTS.md, "Router overhead"). The session lives in the router's event loop, so it
is opened in the application's lifespan, not at import.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
from collections.abc import AsyncIterator, Iterable
from typing import Any

import aiohttp
import orjson

# What a call to a node or a replica can raise for reasons on the other side of the wire:
# refused or reset connections, timeouts, malformed HTTP, and `raise_for_status`.
UpstreamErrors = (aiohttp.ClientError, asyncio.TimeoutError)

# One SSE line may carry a long prompt's token ids (about 7 bytes each): allow far more than
# aiohttp's default of 128 KiB, but not unbounded memory for a misbehaving upstream.
MAX_LINE_BYTES = 64 * 1024 * 1024


def open_session() -> aiohttp.ClientSession:
    """A pooled session with no connection cap (the router's own queue limits concurrency)."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, limit_per_host=0),
                                 read_bufsize=1 << 20)


def timeout(read_s: float, connect_s: float = 10.0) -> aiohttp.ClientTimeout:
    """No limit on the whole call (a stream may run for minutes), `read_s` between reads."""
    return aiohttp.ClientTimeout(total=None, connect=connect_s, sock_read=read_s)


def deadline(total_s: float) -> aiohttp.ClientTimeout:
    """A limit on the whole call: for short control calls."""
    return aiohttp.ClientTimeout(total=total_s)


def loads(data: str | bytes) -> Any:
    """JSON in, with orjson (every relayed chunk goes through here); Python's json for what
    orjson refuses and json accepts (lone surrogate escapes), so nothing valid is rejected."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return json.loads(data)


def dumps(obj: Any) -> bytes:
    """JSON out as UTF-8 bytes, with orjson; Python's json for strings orjson refuses."""
    try:
        return orjson.dumps(obj)
    except TypeError:
        return json.dumps(obj).encode()


async def read_json(response: aiohttp.ClientResponse) -> Any:
    """The body as JSON whatever its content type; ValueError if it is not JSON."""
    return loads(await response.read())


async def sse_batches(response: aiohttp.ClientResponse) -> AsyncIterator[list[str]]:
    """The non-empty lines of a server-sent event stream, grouped as they arrived.

    Each batch holds the complete lines of one network read: when the replica writes faster
    than the router reads, several events travel on as one write to the client.
    """
    buffer = b""
    async for data in response.content.iter_any():
        buffer += data
        if len(buffer) > MAX_LINE_BYTES:  # what one read brings is far smaller than this
            raise aiohttp.ClientPayloadError(
                f"an event stream line longer than {MAX_LINE_BYTES} bytes")
        if b"\n" not in data:
            continue
        *lines, buffer = buffer.split(b"\n")
        batch = [line.rstrip(b"\r").decode() for line in lines if line.strip()]
        if batch:
            yield batch
    if buffer.strip():
        yield [buffer.rstrip(b"\r").decode()]


class OpenResponses:
    """The upstream responses being read, by replica: a replica whose node was lost (a
    partition, a crash) can no longer end them, so the router closes them, and every reader
    sees a broken connection at once (a stream then fails over) instead of waiting out
    `upstream_timeout_s` on a connection that will never speak again."""

    def __init__(self) -> None:
        self._by_replica: dict[str, set[aiohttp.ClientResponse]] = collections.defaultdict(set)

    def add(self, replica: str, response: aiohttp.ClientResponse) -> None:
        self._by_replica[replica].add(response)

    def discard(self, replica: str, response: aiohttp.ClientResponse) -> None:
        responses = self._by_replica.get(replica)
        if responses is not None:
            responses.discard(response)
            if not responses:
                del self._by_replica[replica]

    @contextlib.asynccontextmanager
    async def track(self, replica: str, response: aiohttp.ClientResponse
                    ) -> AsyncIterator[None]:
        self.add(replica, response)
        try:
            yield
        finally:
            self.discard(replica, response)

    def close(self, replicas: Iterable[str]) -> int:
        """Close every response of `replicas`; returns how many."""
        closed = 0
        for key in replicas:
            for response in list(self._by_replica.pop(key, ())):
                response.close()
                closed += 1
        return closed
