"""Failover in the middle of a character, against scripted replicas on loopback.

`ScriptedReplica` stands in for a vLLM replica because the condition under test cannot be
produced on demand with a real one: the replica must die right after a token that ends inside
a multi-byte character. The real-vLLM failover test (tests/test_router.py) kills a replica at
whatever token it is on. Everything else is real: the router's `StreamRunner`, its aiohttp
session, HTTP over loopback, an abrupt end of the source's stream.
"""

from __future__ import annotations

import asyncio
import json

from aiohttp import web

from sllm_plugin.router import upstream
from sllm_plugin.router.cluster import Replica
from sllm_plugin.router.policy import MigrationModel
from sllm_plugin.router.streams import ReplayDiverged, Stream, StreamRunner

PROMPT = [1, 2, 3]


def chunk(token: int, text: str, finish: str | None = None, prompt: bool = False) -> bytes:
    choice = {"index": 0, "text": text, "token_ids": [token], "finish_reason": finish}
    if prompt:
        choice["prompt_token_ids"] = PROMPT
    return f"data: {json.dumps({'id': 'x', 'choices': [choice]})}\n\n".encode()


class ScriptedReplica:
    """An OpenAI streaming endpoint that writes fixed chunks, then ends cleanly or breaks off.

    Stands in for vLLM (see the module docstring); it records the bodies it was sent.
    """

    def __init__(self, chunks: list[bytes], breaks: bool) -> None:
        self.chunks, self.breaks, self.bodies = chunks, breaks, []

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.bodies.append(await request.json())
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for piece in self.chunks:
            await response.write(piece)
        if self.breaks:  # dies mid-stream: the connection goes without an end of body
            assert request.transport is not None
            request.transport.abort()
            return response
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async def start(self) -> tuple[web.AppRunner, str]:
        app = web.Application()
        app.router.add_post("/v1/completions", self.handle)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        return runner, f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]


# The source sends 10 "a", 11 "b", then 12, the first byte of "é": held back, no text. Then it
# dies. Greedy decoding regenerates 12 on the destination, which then completes the character.
SOURCE = [chunk(10, "a", prompt=True), chunk(11, "b"), chunk(12, "")]
DESTINATION = [chunk(12, "", prompt=True), chunk(13, "é"), chunk(14, "c", finish="length")]


async def fail_over(body: dict, destination: list[bytes] | None,
                    source_chunks: list[bytes] = SOURCE) -> tuple[list, ScriptedReplica]:
    """Run one stream on a source that breaks off after `source_chunks`; `destination` (None:
    there is none to fail over to) is what the next replica sends."""
    source = ScriptedReplica(source_chunks, breaks=True)
    dest = ScriptedReplica(destination or [], breaks=False)
    (a_runner, a_url), (b_runner, b_url) = await source.start(), await dest.start()
    a, b = Replica("a", 1, "m", a_url), Replica("b", 1, "m", b_url)

    async def pick(model: str, exclude=()) -> Replica:
        assert destination is not None, "no failover was expected"
        assert "a/1" in exclude
        return b

    try:
        async with upstream.open_session() as session:
            runner = StreamRunner(session, pick, MigrationModel(), 2, 3, 30)
            stream = Stream("completion", "m", {"model": "m", "prompt": "x", **body}, 5)
            task = asyncio.create_task(runner.run(stream, a))
            items = []
            while (item := await stream.events.get()) is not None:
                items.append(item)
                if isinstance(item, Exception):
                    break
            await task
            return items, dest
    finally:
        await a_runner.cleanup()
        await b_runner.cleanup()


def delivered(items: list) -> tuple[list[int], str]:
    chunks = [c for batch in items for c in batch]
    return ([t for c in chunks for t in c["choices"][0].get("token_ids", [])],
            "".join(c["choices"][0]["text"] for c in chunks))


def test_a_greedy_stream_resumes_from_the_last_whole_character_and_sends_nothing_twice():
    items, dest = asyncio.run(fail_over({"temperature": 0, "return_token_ids": True},
                                        DESTINATION))
    (body,) = dest.bodies
    assert body["prompt"] == PROMPT + [10, 11] and body["max_tokens"] == 3
    assert delivered(items) == ([10, 11, 12, 13, 14], "abéc")


def test_a_continuation_that_diverges_from_what_the_client_has_is_an_error_not_a_splice():
    other = [chunk(99, "z", prompt=True), chunk(13, "é"), chunk(14, "c", finish="length")]
    items, _ = asyncio.run(fail_over({"temperature": 0, "return_token_ids": True}, other))
    assert isinstance(items[-1], ReplayDiverged)
    assert "produced [99] where the client already has [12]" in str(items[-1])
    assert delivered(items[:-1]) == ([10, 11, 12], "ab")


def test_a_sampled_stream_continues_after_every_token_it_has():
    items, dest = asyncio.run(fail_over({"temperature": 0.7, "return_token_ids": True},
                                        DESTINATION[1:]))
    (body,) = dest.bodies
    assert body["prompt"] == PROMPT + [10, 11, 12] and body["max_tokens"] == 2
    assert delivered(items) == ([10, 11, 12, 13, 14], "abéc")


def test_a_connection_lost_after_the_finishing_chunk_is_no_failover():
    finished = [chunk(10, "a", prompt=True), chunk(11, "b", finish="stop")]
    items, dest = asyncio.run(fail_over({"temperature": 0, "return_token_ids": True}, None,
                                        finished))
    assert not any(isinstance(i, Exception) for i in items)
    assert delivered(items) == ([10, 11], "ab") and dest.bodies == []
    assert items[-1][-1]["choices"][0]["finish_reason"] == "stop"
