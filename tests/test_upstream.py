"""The router's HTTP client helpers against a real aiohttp server on loopback.

The server writes an event stream in pieces the test chooses (an event split across writes, a
line end split from its line, several events in one write), so the framing is checked the way
a replica's bytes really arrive: over a socket, in whatever pieces TCP delivers.
"""

from __future__ import annotations

import asyncio
import json

import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st

from sllm_plugin.router import upstream


async def serve_pieces(pieces: list[bytes], run) -> object:
    """Serve `pieces` as one streamed response (a write each), run `run(url)`."""

    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for piece in pieces:
            await response.write(piece)  # returns once the piece is handed to the socket
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/v1/completions", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        return await run(f"http://127.0.0.1:{port}/v1/completions")
    finally:
        await runner.cleanup()


async def read_lines(url: str) -> list[str]:
    async with upstream.open_session() as session, session.post(
            url, json={}, timeout=upstream.timeout(10)) as response:
        return [line async for batch in upstream.sse_batches(response) for line in batch]


EVENTS = [json.dumps({"choices": [{"text": t, "token_ids": [i]}]})
          for i, t in enumerate(["héllo", " wörld", "\n", " 🦊", ""])]
STREAM = "".join(f"data: {e}\n\n" for e in EVENTS).encode() + b"data: [DONE]\n\n"


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=len(STREAM) - 1), unique=True, max_size=12))
def test_events_come_out_whole_however_the_bytes_are_cut(cuts):
    bounds = [0, *sorted(cuts), len(STREAM)]
    pieces = [STREAM[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
    lines = asyncio.run(serve_pieces(pieces, read_lines))
    assert lines == [f"data: {e}" for e in EVENTS] + ["data: [DONE]"]


def test_crlf_line_ends_and_a_last_line_without_an_end():
    pieces = [b"data: {\"a\": 1}\r\n\r\n", b"data: [DONE]"]
    assert asyncio.run(serve_pieces(pieces, read_lines)) == ['data: {"a": 1}', "data: [DONE]"]


def test_a_line_past_the_limit_is_an_upstream_error(monkeypatch):
    monkeypatch.setattr(upstream, "MAX_LINE_BYTES", 1000)
    pieces = [b"data: " + b"x" * 600, b"y" * 600, b"\n\n"]
    with pytest.raises(upstream.UpstreamErrors, match="longer than 1000 bytes"):
        asyncio.run(serve_pieces(pieces, read_lines))


def test_json_round_trip_matches_the_standard_library_even_for_lone_surrogates():
    for obj in [{"text": "héllo 🦊", "ids": [1, 2**40]}, {"text": "\ud83d"}]:
        assert json.loads(upstream.dumps(obj)) == obj
    assert upstream.loads('{"text": "\\ud83d"}') == {"text": "\ud83d"}
    assert upstream.loads(b'{"a": [1, 2]}') == {"a": [1, 2]}
    with pytest.raises(ValueError):
        upstream.loads(b"{not json")
