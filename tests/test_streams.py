"""Failover in the middle of a character or of a stop string, against scripted replicas.

`ScriptedReplica` stands in for a vLLM replica because the conditions under test cannot be
produced on demand with a real one: the replica must die right after a token that ends inside
a multi-byte character, or that begins a stop string. The real-vLLM tests (tests/test_router.py)
move streams at a chosen token with a proxy in front of real replicas. Everything else is
real: the router's `StreamRunner`, its aiohttp session, HTTP over loopback, an abrupt end of the
source's stream. The scripted chunks are what vLLM streams when the router asks it for the
text of stop strings (`include_stop_str_in_output`): all text at once, the stop string's too.
"""

from __future__ import annotations

import asyncio
import json

from aiohttp import web

from sllm_plugin.router import upstream
from sllm_plugin.router.cluster import Replica
from sllm_plugin.router.policy import MigrationModel
from sllm_plugin.router.streams import (
    ReplayDiverged,
    Stream,
    StreamRunner,
    UpstreamRejected,
)

PROMPT = [1, 2, 3]



async def events_until_done(stream, run) -> list:
    """Run the stream runner's coroutine `run` and collect what `stream` yields to its client
    until its end (or its first exception)."""
    task = asyncio.create_task(run)
    items = []
    while (item := await stream.events.get()) is not None:
        items.append(item)
        if isinstance(item, Exception):
            break
    await task
    return items

def chunk(token: int, text: str, finish: str | None = None, prompt: bool = False,
          stop_reason: str | None = None, model: str | None = None) -> bytes:
    choice = {"index": 0, "text": text, "token_ids": [token], "finish_reason": finish,
              "stop_reason": stop_reason}
    if prompt:
        choice["prompt_token_ids"] = PROMPT
    named = {"model": model} if model else {}  # vLLM names its --served-model-name here
    return f"data: {json.dumps({'id': 'x', **named, 'choices': [choice]})}\n\n".encode()


class ScriptedReplica:
    """An OpenAI streaming endpoint that writes fixed chunks, then ends cleanly or breaks off.

    Stands in for vLLM (see the module docstring); it records the bodies it was sent.
    """

    def __init__(self, chunks: list[bytes], breaks: bool,
                 refuse: tuple[int, dict] | None = None) -> None:
        self.chunks, self.breaks, self.bodies = chunks, breaks, []
        self.refuse = refuse  # (status, JSON body) to answer instead of a stream
        self.models: list[str | None] = []  # the X-Sllm-Model header of each call

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.bodies.append(await request.json())
        self.models.append(request.headers.get("X-Sllm-Model"))
        if self.refuse is not None:
            return web.json_response(self.refuse[1], status=self.refuse[0])
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
                    source_chunks: list[bytes] = SOURCE) -> tuple[list, ScriptedReplica,
                                                                  ScriptedReplica]:
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
            items = await events_until_done(stream, runner.run(stream, a))
            return items, source, dest
    finally:
        await a_runner.cleanup()
        await b_runner.cleanup()


def delivered(items: list) -> tuple[list[int], str]:
    chunks = [c for batch in items for c in batch]
    return ([t for c in chunks for t in c["choices"][0].get("token_ids", [])],
            "".join(c["choices"][0]["text"] for c in chunks))


def test_a_greedy_stream_resumes_from_the_last_whole_character_and_sends_nothing_twice():
    items, _, dest = asyncio.run(fail_over({"temperature": 0, "return_token_ids": True},
                                        DESTINATION))
    (body,) = dest.bodies
    assert body["prompt"] == PROMPT + [10, 11] and body["max_tokens"] == 3
    assert delivered(items) == ([10, 11, 12, 13, 14], "abéc")


def test_a_continuation_that_diverges_from_what_the_client_has_is_an_error_not_a_splice():
    other = [chunk(99, "z", prompt=True), chunk(13, "é"), chunk(14, "c", finish="length")]
    items, _, _ = asyncio.run(fail_over({"temperature": 0, "return_token_ids": True}, other))
    assert isinstance(items[-1], ReplayDiverged)
    assert "produced [99] where the client already has [12]" in str(items[-1])
    assert delivered(items[:-1]) == ([10, 11, 12], "ab")


def test_a_sampled_stream_continues_after_every_token_it_has():
    items, _, dest = asyncio.run(fail_over({"temperature": 0.7, "return_token_ids": True},
                                        DESTINATION[1:]))
    (body,) = dest.bodies
    assert body["prompt"] == PROMPT + [10, 11, 12] and body["max_tokens"] == 2
    assert delivered(items) == ([10, 11, 12, 13, 14], "abéc")


def test_a_connection_lost_after_the_finishing_chunk_is_no_failover():
    finished = [chunk(10, "a", prompt=True), chunk(11, "b", finish="stop")]
    items, _, dest = asyncio.run(fail_over({"temperature": 0, "return_token_ids": True}, None,
                                        finished))
    assert not any(isinstance(i, Exception) for i in items)
    assert delivered(items) == ([10, 11], "ab") and dest.bodies == []
    assert items[-1][-1]["choices"][0]["finish_reason"] == "stop"


def finish_of(items: list) -> tuple:
    choice = items[-1][-1]["choices"][0]
    return choice["finish_reason"], choice.get("stop_reason")


def test_a_stop_string_is_held_back_as_vllm_does_and_cut_off_at_the_end():
    # vLLM, asked for the text as it is, sends "ab", "cX", then "Y", ending the stop string.
    script = [chunk(10, "ab", prompt=True), chunk(11, "cX"),
              chunk(12, "Y", finish="stop", stop_reason="XY")]
    items, source, _ = asyncio.run(fail_over(
        {"temperature": 0, "return_token_ids": True, "stop": ["XY"]}, None,
        script))
    assert source.bodies[0]["include_stop_str_in_output"] is True
    texts = [c["choices"][0]["text"] for batch in items for c in batch]
    assert texts == ["a", "bc", ""]  # one character held back at every moment, as vLLM does
    assert delivered(items) == ([10, 11, 12], "abc")
    assert finish_of(items) == ("stop", "XY")


def test_a_failover_after_the_beginning_of_a_stop_string_resumes_before_it():
    # The source dies right after "X", which may begin the stop string "XY": the destination
    # resumes after "ab" (token 10), regenerates 11 ("cX"), and so sees the whole "XY".
    destination = [chunk(11, "cX", prompt=True), chunk(12, "Y", finish="stop",
                                                     stop_reason="XY")]
    items, _, dest = asyncio.run(fail_over(
        {"temperature": 0, "return_token_ids": True, "stop": ["XY"]}, destination,
        [chunk(10, "ab", prompt=True), chunk(11, "cX")]))
    (body,) = dest.bodies
    assert body["prompt"] == PROMPT + [10] and body["max_tokens"] == 4
    assert body["stop"] == ["XY"] and body["include_stop_str_in_output"] is True
    assert delivered(items) == ([10, 11, 12], "abc")
    assert finish_of(items) == ("stop", "XY")


def test_a_regenerated_text_that_differs_is_an_error_not_a_splice():
    destination = [chunk(11, "cZ", prompt=True), chunk(12, "Y", finish="length")]
    items, _, _ = asyncio.run(fail_over(
        {"temperature": 0, "return_token_ids": True, "stop": ["XY"]}, destination,
        [chunk(10, "ab", prompt=True), chunk(11, "cX")]))
    assert isinstance(items[-1], ReplayDiverged)
    assert "produced the text 'cZ' where the stream already has 'cX'" in str(items[-1])


# -- names: the engine's served name upstream, the client's model in every chunk (issue 12) --

SWAPPED = "org/a"  # the engine's --served-model-name: it was cold-started for org/a ...
CLIENT = "org/b"  # ... and given org/b's weights since


async def run_on(replicas: list[tuple[ScriptedReplica, str | None]], body: dict,
                 moved: list | None = None) -> list:
    """Run one stream of CLIENT's model on the first of `replicas` ((script, served name)),
    failing over to the next ones in order; `moved` collects the replicas reported moved."""
    started = [await r.start() for r, _ in replicas]
    handles = [Replica(chr(97 + i), 1, CLIENT, url, served_name=served)
               for i, ((_, url), (_, served)) in enumerate(zip(started, replicas, strict=True))]

    async def pick(model: str, exclude=()) -> Replica:
        assert model == CLIENT
        return next(r for r in handles if r.key not in exclude and r.state != "gone")

    def on_moved(replica: Replica) -> None:
        replica.state = "gone"
        (moved if moved is not None else []).append(replica.key)

    try:
        async with upstream.open_session() as session:
            runner = StreamRunner(session, pick, MigrationModel(), 2, 3, 30, on_moved=on_moved)
            stream = Stream("completion", CLIENT, {"model": CLIENT, "prompt": "x", **body}, 5)
            return await events_until_done(stream, runner.run(stream, handles[0]))
    finally:
        for runner, _ in started:
            await runner.cleanup()


def test_a_failover_from_a_swapped_engine_names_each_engine_upstream_and_the_client_model():
    source = ScriptedReplica([chunk(10, "a", prompt=True, model=SWAPPED), chunk(11, "b",
                                                                        model=SWAPPED)],
                             breaks=True)
    dest = ScriptedReplica([chunk(12, "c", prompt=True, model=CLIENT),
                            chunk(13, "d", finish="length", model=CLIENT)], breaks=False)
    items = asyncio.run(run_on([(source, SWAPPED), (dest, None)],
                               {"temperature": 0, "return_token_ids": True,
                                "stream_options": {"include_usage": True}}))
    # Upstream: each engine by its served name (a record without one: the model), and the
    # client's model in the header its guard checks.
    assert [b["model"] for b in source.bodies + dest.bodies] == [SWAPPED, CLIENT]
    assert source.models == dest.models == [CLIENT]
    assert dest.bodies[0]["prompt"] == PROMPT + [10, 11]
    chunks = [c for batch in items for c in batch]
    assert len(chunks) == 5 and [c["model"] for c in chunks] == [CLIENT] * 5
    assert delivered(items[:-1]) == ([10, 11, 12, 13], "abcd")


MOVED = {"error": {"message": "the engine holds org/c now", "type": "model_moved"}}


def test_a_replica_whose_engine_holds_another_model_now_is_dropped_and_the_stream_goes_on():
    stale = ScriptedReplica([], breaks=False, refuse=(409, MOVED))
    good = ScriptedReplica([chunk(10, "a", prompt=True, model=SWAPPED),
                            chunk(11, "b", finish="length", model=SWAPPED)], breaks=False)
    moved: list[str] = []
    items = asyncio.run(run_on([(stale, None), (good, SWAPPED)], {"return_token_ids": True},
                               moved))
    assert moved == ["a/1"] and len(stale.bodies) == 1 and stale.models == [CLIENT]
    (body,) = good.bodies
    assert body["model"] == SWAPPED and body["prompt"] == "x"  # the client's request, as sent
    assert not any(isinstance(i, Exception) for i in items)
    assert [c["model"] for batch in items for c in batch] == [CLIENT, CLIENT]
    assert delivered(items) == ([10, 11], "ab")


def test_a_replicas_refusal_names_the_clients_model_not_the_engines():
    refusal = {"error": {"message": f"This model's ({SWAPPED}) maximum context length is 64",
                         "type": "BadRequestError", "code": 400}}
    refusing = ScriptedReplica([], breaks=False, refuse=(400, refusal))
    items = asyncio.run(run_on([(refusing, SWAPPED)], {}))
    (error,) = items
    assert isinstance(error, UpstreamRejected) and error.status == 400
    assert error.body == {"error": {"message": f"This model's ({CLIENT}) maximum context "
                                    "length is 64", "type": "BadRequestError", "code": 400}}


async def warm(dest: ScriptedReplica, served: str | None, moved: list) -> dict | Exception:
    """Migrate a stream (its first tokens in hand) to `dest`: the destination's warm-up."""
    runner_, url = await dest.start()
    replica = Replica("d", 1, CLIENT, url, served_name=served)
    try:
        async with upstream.open_session() as session:
            runner = StreamRunner(session, None, MigrationModel(), 2, 3, 30,  # type: ignore[arg-type]
                                  on_moved=lambda r: moved.append(r.key))
            stream = Stream("completion", CLIENT, {"model": CLIENT, "prompt": "x"}, 5)
            stream.prompt_ids, stream.generated = list(PROMPT), [10, 11]
            stream.started.set()
            runner.active[stream.id] = stream
            try:
                return await runner.migrate(stream, replica)
            except Exception as e:  # what the admin API or `free` would be given
                return e
    finally:
        await runner_.cleanup()


def test_a_migration_warms_the_destination_under_its_served_name_and_a_moved_one_is_dropped():
    dest, moved = ScriptedReplica([], breaks=False), []
    outcome = asyncio.run(warm(dest, SWAPPED, moved))
    assert isinstance(outcome, dict) and outcome["state"] == "switching", outcome
    (body,) = dest.bodies
    assert (body["model"], body["prompt"], body["max_tokens"]) == (SWAPPED, PROMPT + [10, 11], 1)
    assert dest.models == [CLIENT] and moved == []
    stale = ScriptedReplica([], breaks=False, refuse=(409, MOVED))
    outcome = asyncio.run(warm(stale, None, moved))
    assert isinstance(outcome, Exception) and moved == ["d/1"]
