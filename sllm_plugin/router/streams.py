"""Every proxied request as tokens, and token-based live migration and failover.

The router always talks to replicas in streaming mode with `return_token_ids`, whatever the
client asked, so it knows at every moment the prompt's token ids (vLLM's own tokenization,
chat template included: the first chunk carries them) and every generated token id. That is
all a request's state: to move it, another replica is given prompt + generated ids as a token
prompt with the remaining budget. With greedy decoding the client sees exactly the tokens it
would have seen without the move; nothing it received is repeated or lost.

Migration (ServerlessLLM's, completed for vLLM): warm the destination's prefix cache with
prompt + generated ids (`max_tokens=1`), repeat until fewer than a few tokens were generated
meanwhile, then stop reading the source (closing the connection aborts it in vLLM) and continue
on the destination, splicing its output into the client's stream. Failover is the same
continuation without the warm-up, after the source's stream broke.

Stop strings: a replica holds back the text that could begin a stop string, and a replica
asked to continue sees only the text it generates itself. So the router asks replicas for the
text unheld (`include_stop_str_in_output`), holds back what vLLM would (the longest stop string
less one character) and cuts the stop string off at the end itself; and a move only happens
where no stop string can span it: the text so far must not end with the beginning of one. The
replica still finds stop strings, so which one wins, where the search starts (`min_tokens`)
and which tokens the finishing chunk carries are vLLM's own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp

from .cluster import Replica, for_client, model_moved
from .policy import MigrationModel
from .upstream import OpenResponses, UpstreamErrors, loads, sse_batches, timeout

logger = logging.getLogger("sllm_plugin.router")

# Sampling parameters a continuation carries over (penalties would count the generated tokens
# as prompt on the destination, so requests using them are not tracked; see `trackable`).
CONTINUATION_KEYS = ("temperature", "top_p", "top_k", "min_p", "seed", "stop",
                     "stop_token_ids", "ignore_eos", "skip_special_tokens",
                     "spaces_between_special_tokens", "include_stop_str_in_output",
                     "repetition_penalty")
UNTRACKABLE_KEYS = ("tools", "functions", "response_format", "logprobs", "top_logprobs",
                    "echo", "best_of", "suffix", "guided_json", "guided_regex",
                    "guided_choice", "structured_outputs", "presence_penalty",
                    "frequency_penalty", "logit_bias", "prompt_logprobs", "n")


# Stop strings the router follows a request with (more or longer ones: proxied untracked, as
# checking for a stop string's beginning at every token costs their length squared).
MAX_STOP_STRINGS, MAX_STOP_CHARS = 16, 128

# How long the router waits for "[DONE]" after a finishing chunk before it gives up on reusing
# the connection (vLLM sends it at once).
DRAIN_TIMEOUT_S = 2.0


class UpstreamBroken(Exception):
    """The replica's stream ended without a finish (the replica died or was cut off)."""


class ReplayDiverged(Exception):
    """A greedy continuation regenerated other tokens than the client already has."""


class ReplicaMoved(UpstreamBroken):
    """The replica's guard answered `model_moved`: its engine holds another model now."""


class UpstreamRejected(Exception):
    """The replica refused the request (4xx): the client's error, passed through as is."""

    def __init__(self, status: int, body: dict) -> None:
        super().__init__(str(body))
        self.status, self.body = status, body


def greedy(body: dict) -> bool:
    """Whether the request decodes greedily, so a continuation regenerates the same tokens."""
    return body.get("temperature") == 0 or body.get("top_k") == 1


def stop_strings(body: dict) -> list[str]:
    stop = body.get("stop")
    return [stop] if isinstance(stop, str) else list(stop or [])


def trackable(kind: str, body: dict) -> str | None:
    """None if the request can be followed token by token, else why not."""
    for key in UNTRACKABLE_KEYS:
        value = body.get(key)
        if value not in (None, False, 0, 1, [], {}) or (key == "n" and value not in (None, 1)):
            return f"uses {key!r}"
    stops = stop_strings(body)
    if len(stops) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_CHARS for s in stops):
        return f"has more than {MAX_STOP_STRINGS} stop strings or one over {MAX_STOP_CHARS} chars"
    if stops and not body.get("include_stop_str_in_output") and (
            body.get("stop_token_ids") or body.get("skip_special_tokens") is False):
        # The router asks for stop strings in the text; vLLM would then also keep the text of
        # a stop token, which only it can tell apart.
        return "combines stop strings with stop tokens that have text"
    if kind == "completion":
        prompt = body.get("prompt")
        if not (isinstance(prompt, str) or (isinstance(prompt, list) and prompt
                                            and all(isinstance(t, int) for t in prompt))):
            return "the prompt is not one string or one list of token ids"
    return None


@dataclass
class Stream:
    kind: str  # "completion" | "chat"
    model: str
    body: dict
    max_tokens: int
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:16])
    created: int = field(default_factory=lambda: int(time.time()))
    prompt_ids: list[int] | None = None
    generated: list[int] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    replica: Replica | None = None
    switch_to: Replica | None = None
    started: asyncio.Event = field(default_factory=asyncio.Event)
    # Bounded: a client that stops reading stops the router reading the replica (its memory
    # stays bounded, and the request stays in flight, counted as the replica's load).
    events: asyncio.Queue = field(default_factory=lambda: asyncio.Queue(maxsize=256))
    pending: list[dict] = field(default_factory=list)  # chunks not yet handed to `events`
    # The text: `text` holds what the client was given, `held` what comes after it (vLLM's
    # stop-string hold-back), `tail` the last characters of both (to spot a stop string's
    # beginning), `text_len` their length.
    held: str = ""
    tail: str = ""
    text_len: int = 0
    # Whether the stream may move here: the text ends on a whole character and not with the
    # beginning of a stop string (see `_take`). A migration waits for such a point.
    safe_boundary: bool = False
    safe_at: int = 0  # tokens generated up to the last such point
    safe_len: int = 0  # and the length of the text there
    # After a failover where the stream could not move: tokens and text the client (or `held`)
    # has that the continuation, resumed from `safe_at`, regenerates (greedy only); they are
    # checked and not sent twice.
    replay: list[int] = field(default_factory=list)
    expect: str = ""
    moved_from: str | None = None  # the replica of the move under way
    migrations: list[dict] = field(default_factory=list)
    last_emit: float | None = None
    first_emit: float | None = None
    emitted: int = 0  # chunks with tokens delivered
    begun: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.stops = stop_strings(self.body)
        self.include_stop = bool(self.body.get("include_stop_str_in_output"))
        longest = max((len(s) for s in self.stops), default=0)
        self.tail_chars = max(0, longest - 1)
        # vLLM's hold-back: the text that could be the beginning of a stop string.
        self.holdback = 0 if self.include_stop else self.tail_chars

    @property
    def response_id(self) -> str:
        return ("chatcmpl-" if self.kind == "chat" else "cmpl-") + self.id

    @property
    def wants_token_ids(self) -> bool:
        return bool(self.body.get("return_token_ids"))

    def describe(self) -> dict:
        return {"id": self.id, "model": self.model, "kind": self.kind,
                "replica": self.replica.key if self.replica else None,
                "prompt_tokens": len(self.prompt_ids or []), "generated": len(self.generated),
                "max_tokens": self.max_tokens, "migrations": self.migrations,
                "moving_to": self.switch_to.key if self.switch_to else None}


class StreamRunner:
    """Runs streams against replicas: forwards, records tokens, migrates, fails over."""

    def __init__(self, http: aiohttp.ClientSession, pick: Callable[..., Awaitable[Replica]],
                 migration: MigrationModel, gap_tokens: int, rounds: int,
                 timeout_s: float, on_migrated: Callable[[Stream, dict], None] | None = None,
                 on_moved: Callable[[Replica], None] | None = None) -> None:
        self.http, self.pick, self.migration = http, pick, migration
        self.gap_tokens, self.rounds, self.timeout_s = gap_tokens, rounds, timeout_s
        self.on_migrated = on_migrated
        # Told when a replica's guard says it holds another model (the cluster drops it).
        self.on_moved = on_moved
        self.active: dict[str, Stream] = {}
        self.open = OpenResponses()  # closed by the cluster when a replica's node is lost

    # -- the producer -------------------------------------------------------------------

    async def run(self, stream: Stream, replica: Replica) -> None:
        """Produce the client's chunks into `stream.events`, in batches (lists of chunks);
        ends with None (or an exception object the consumer raises)."""
        self.active[stream.id] = stream
        self._attach(stream, replica)
        failed: set[str] = set()
        pause_from: float | None = None
        reason = ""
        try:
            while True:
                assert stream.replica is not None
                try:
                    outcome = await self._consume(stream, stream.replica, pause_from, reason)
                except UpstreamBroken as e:
                    failed.add(stream.replica.key)
                    logger.warning("stream %s: %s broke (%s); failing over", stream.id,
                                   stream.replica.key, e)
                    pause_from, reason = stream.last_emit or time.monotonic(), "failover"
                    stream.moved_from = stream.replica.key
                    # A failover cannot wait for a point where the stream may move (see
                    # `_take`): a greedy stream resumes from the last one and replays the rest.
                    if not stream.safe_boundary and greedy(stream.body):
                        stream.replay = stream.generated[stream.safe_at:]
                        stream.expect = ("".join(stream.text) + stream.held)[stream.safe_len:]
                    else:
                        stream.replay, stream.expect = [], ""
                    nxt = await self.pick(stream.model, exclude=failed)
                    self._attach(stream, nxt)
                    continue
                if outcome == "switch":
                    dest, stream.switch_to = stream.switch_to, None
                    assert dest is not None
                    pause_from, reason = stream.last_emit or time.monotonic(), "migration"
                    stream.moved_from = stream.replica.key if stream.replica else None
                    self._attach(stream, dest)
                    continue
                break
            if (stream.body.get("stream_options") or {}).get("include_usage"):
                await stream.events.put([self._usage_chunk(stream)])
            await stream.events.put(None)
        except Exception as e:  # handed to the consumer, which answers the client with it
            await stream.events.put(e)
        finally:
            logger.debug("stream %s ended: %d tokens, finish %s", stream.id,
                         len(stream.generated), stream.finish_reason)
            self._detach(stream)
            self.active.pop(stream.id, None)
            stream.started.set()

    def _attach(self, stream: Stream, replica: Replica) -> None:
        self._detach(stream)
        stream.replica = replica
        replica.in_flight += 1
        replica.tokens_in_flight += len(stream.prompt_ids or []) + len(stream.generated)
        replica.last_used = time.monotonic()

    def _detach(self, stream: Stream) -> None:
        old = stream.replica
        if old is not None:
            old.in_flight = max(0, old.in_flight - 1)
            old.tokens_in_flight = max(0, old.tokens_in_flight - len(stream.prompt_ids or [])
                                       - len(stream.generated))
            old.last_used = time.monotonic()
            stream.replica = None

    def _request(self, stream: Stream, replica: Replica) -> tuple[str, dict]:
        """The upstream request: the client's own the first time, then a token continuation;
        naming the engine's served name (the client's model travels in `replica.headers`)."""
        if stream.prompt_ids is None:
            path = "/v1/chat/completions" if stream.kind == "chat" else "/v1/completions"
            body = {**stream.body, "model": replica.served, "stream": True,
                    "return_token_ids": True, "max_tokens": stream.max_tokens}
            body.pop("max_completion_tokens", None)
            body.pop("stream_options", None)
            if stream.stops:  # the text unheld: the router holds back (see the module doc)
                body["include_stop_str_in_output"] = True
            return path, body
        done = len(stream.generated) - len(stream.replay)
        body = {k: stream.body[k] for k in CONTINUATION_KEYS if k in stream.body}
        if stream.body.get("min_tokens"):
            body["min_tokens"] = max(0, int(stream.body["min_tokens"]) - done)
        if stream.stops:
            body["include_stop_str_in_output"] = True
        body.update(model=replica.served, prompt=stream.prompt_ids + stream.generated[:done],
                    max_tokens=stream.max_tokens - done, stream=True, return_token_ids=True)
        return "/v1/completions", body

    async def _consume(self, stream: Stream, replica: Replica, pause_from: float | None,
                       reason: str) -> str:
        if stream.prompt_ids is not None and len(stream.generated) >= stream.max_tokens:
            stream.finish_reason = "length"
            self._emit(stream, self._release(stream, "length"), [], "length", None)
            await self._flush(stream)
            return "done"
        continuation = stream.prompt_ids is not None
        path, body = self._request(stream, replica)
        sent, had = time.monotonic(), len(stream.generated)
        try:
            async with self.http.post(f"{replica.url}{path}", json=body,
                                      headers=replica.headers,
                                      timeout=timeout(self.timeout_s)) as resp, \
                    self.open.track(replica.key, resp):
                answered = time.monotonic()
                if resp.status != 200:
                    raw = await resp.read()
                    try:
                        payload = json.loads(raw)
                    except ValueError:
                        payload = {"error": {"message": raw.decode(errors="replace")}}
                    if model_moved(resp.status, payload):
                        self._moved(replica)
                        raise ReplicaMoved(f"{replica.key} no longer holds {stream.model}")
                    if 400 <= resp.status < 500 and not continuation:
                        raise UpstreamRejected(resp.status, for_client(payload, replica))
                    raise UpstreamBroken(f"HTTP {resp.status}: {raw[:300]!r}")
                async for batch in sse_batches(resp):
                    outcome = self._take(stream, replica, batch, continuation)
                    if stream.pending:
                        if pause_from is not None:
                            self._record_move(stream, replica, pause_from, reason, had)
                            logger.debug("stream %s: continuation sent %.3f s into the pause, "
                                         "answered after %.3f s, first chunk after %.3f s",
                                         stream.id, sent - pause_from, answered - sent,
                                         time.monotonic() - sent)
                            pause_from = None
                        await self._flush(stream)
                    if outcome == "done":
                        await self._drain(resp)
                        return "done"
                    if outcome == "eof":
                        break
                    if (stream.switch_to is not None and stream.prompt_ids is not None
                            and stream.safe_boundary):
                        return "switch"
        except UpstreamErrors as e:
            raise UpstreamBroken(f"{type(e).__name__}: {e}") from None
        raise UpstreamBroken("the stream ended without a finish reason")

    @staticmethod
    async def _drain(resp: aiohttp.ClientResponse) -> None:
        """Read the rest of a finished stream ("[DONE]") so its connection goes back to the
        pool instead of being closed and opened again for the next request. The answer is
        complete already: a slow or broken end only costs the connection."""
        with contextlib.suppress(*UpstreamErrors):
            await asyncio.wait_for(resp.read(), DRAIN_TIMEOUT_S)

    def _take(self, stream: Stream, replica: Replica, lines: list[str],
              continuation: bool) -> str | None:
        """Record one batch of the replica's SSE lines and queue the client's chunks for them;
        "done" after the finishing chunk, "eof" at "[DONE]" without one."""
        for line in lines:
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                return "eof"
            chunk = loads(data)
            if "error" in chunk:
                raise UpstreamBroken(f"replica error: {chunk['error']}")
            choices = chunk.get("choices") or []
            if not choices:
                continue
            choice = choices[0]
            # Completions carry the prompt's ids in the choice, chat in the chunk.
            prompt_ids = choice.get("prompt_token_ids") or chunk.get("prompt_token_ids")
            if stream.prompt_ids is None and prompt_ids is not None:
                stream.prompt_ids = list(prompt_ids)
                replica.tokens_in_flight += len(stream.prompt_ids)
                stream.started.set()
            ids = list(choice.get("token_ids") or [])
            finish = choice.get("finish_reason")
            if continuation or stream.kind == "completion":
                delta = None
                text = choice.get("text") or ""
            else:
                delta = choice.get("delta") or {}
                text = delta.get("content") or ""
            replaying = bool(stream.replay or stream.expect)
            if stream.replay and ids:
                # Regenerated tokens the client already has, with text it already has.
                n = min(len(ids), len(stream.replay))
                if ids[:n] != stream.replay[:n]:
                    raise ReplayDiverged(
                        f"stream {stream.id}: after a failover the greedy continuation "
                        f"produced {ids[:n]} where the client already has {stream.replay[:n]}")
                del stream.replay[:n]
                ids = ids[n:]
            new_text = self._regenerated(stream, text)
            if replaying and not ids and not new_text and not finish:
                continue
            stream.generated.extend(ids)
            replica.tokens_in_flight += len(ids)
            self._add_text(stream, new_text)
            if ids and not stream.replay and not stream.expect:
                # A token prompt that ends inside a multi-byte character (its text held back,
                # or given up as U+FFFD) makes vLLM's detokenizer (tokenizers' DecodeStream
                # primed with the prompt) emit the whole prompt's text with the first new
                # token; and a replica given a continuation cannot see a stop string that
                # began before it. Tokens stay right, text would not: moves wait for points
                # after a whole character where no stop string has begun.
                whole = bool(text) and not text.endswith("\ufffd")
                stream.safe_boundary = whole and not self._stop_begun(stream)
                if stream.safe_boundary:
                    stream.safe_at, stream.safe_len = len(stream.generated), stream.text_len
            stop_reason = choice.get("stop_reason") if finish else None
            if finish:
                stream.finish_reason = finish
                stream.stop_reason = stop_reason
            out = self._release(stream, finish, stop_reason)
            if delta is not None and ("content" in delta or out):
                delta = {**delta, "content": out}
            self._emit(stream, out, ids, finish, delta)
            if finish:
                return "done"
        return None

    @staticmethod
    def _regenerated(stream: Stream, text: str) -> str:
        """The part of a continuation's `text` that is new: after a failover that resumed
        early, what it regenerates must be what the stream already has, and is not new."""
        if not stream.expect:
            return text
        n = min(len(text), len(stream.expect))
        if text[:n] != stream.expect[:n]:
            raise ReplayDiverged(f"stream {stream.id}: after a failover the greedy "
                                 f"continuation produced the text {text[:n]!r} where the "
                                 f"stream already has {stream.expect[:n]!r}")
        stream.expect = stream.expect[n:]
        return text[n:]

    @staticmethod
    def _add_text(stream: Stream, text: str) -> None:
        if text:
            stream.held += text
            stream.text_len += len(text)
            if stream.tail_chars:
                stream.tail = (stream.tail + text)[-stream.tail_chars:]

    @staticmethod
    def _stop_begun(stream: Stream) -> bool:
        """Whether the text ends with the beginning (not the whole) of a stop string."""
        tail = stream.tail
        for stop in stream.stops:
            for k in range(min(len(stop) - 1, len(tail)), 0, -1):
                if tail.endswith(stop[:k]):
                    return True
        return False

    @staticmethod
    def _release(stream: Stream, finish: str | None, stop_reason: object = None) -> str:
        """The held text the client gets now: all of it once finished (less the stop string
        that ended it, unless asked for), else all but vLLM's hold-back."""
        if finish:
            if (finish == "stop" and isinstance(stop_reason, str) and not stream.include_stop
                    and stop_reason in stream.stops):
                if stream.held.endswith(stop_reason):
                    stream.held = stream.held[: len(stream.held) - len(stop_reason)]
                else:  # cannot happen: the stop string began after the released text
                    logger.warning("stream %s: the text does not end with its stop string",
                                   stream.id)
            out, stream.held = stream.held, ""
        else:
            cut = len(stream.held) - stream.holdback
            if cut <= 0:
                return ""
            out, stream.held = stream.held[:cut], stream.held[cut:]
        if out:
            stream.text.append(out)
        return out

    def _record_move(self, stream: Stream, replica: Replica, pause_from: float,
                     reason: str, at_token: int) -> None:
        """Note a finished move; `at_token` is the index of the first token from `replica`."""
        pause = time.monotonic() - pause_from
        record = {"stream": stream.id, "model": stream.model, "from": stream.moved_from,
                  "to": replica.key, "reason": reason, "pause_s": pause, "at_token": at_token,
                  "time": time.time()}
        stream.migrations.append(record)
        logger.debug("stream %s moved to %s (%s) at token %d: pause %.3f s", stream.id,
                     replica.key, reason, record["at_token"], pause)
        if self.on_migrated:
            self.on_migrated(stream, record)

    def _emit(self, stream: Stream, text: str, ids: list[int], finish: str | None,
              delta: dict | None) -> None:
        """Add the client's chunk for these tokens to `stream.pending`."""
        now = time.monotonic()
        if ids or text or finish or delta:
            stream.last_emit = now
            if stream.first_emit is None and (ids or text):
                stream.first_emit = now
        choice: dict = {"index": 0, "logprobs": None, "finish_reason": finish}
        if stream.kind == "chat":
            choice["delta"] = delta if delta is not None else ({"content": text} if text else {})
            obj = "chat.completion.chunk"
        else:
            choice["text"] = text
            obj = "text_completion"
        if finish and stream.stop_reason is not None:
            choice["stop_reason"] = stream.stop_reason
        chunk = {"id": stream.response_id, "object": obj, "created": stream.created,
                 "model": stream.model, "choices": [choice]}
        if stream.wants_token_ids:
            choice["token_ids"] = ids
            if stream.emitted == 0:
                (chunk if stream.kind == "chat" else choice)["prompt_token_ids"] = \
                    stream.prompt_ids
        stream.emitted += 1
        stream.pending.append(chunk)

    async def _flush(self, stream: Stream) -> None:
        """Hand the pending chunks to the client's side as one batch (one write)."""
        batch, stream.pending = stream.pending, []
        await stream.events.put(batch)

    def _usage_chunk(self, stream: Stream) -> dict:
        obj = "chat.completion.chunk" if stream.kind == "chat" else "text_completion"
        return {"id": stream.response_id, "object": obj, "created": stream.created,
                "model": stream.model, "choices": [], "usage": usage(stream)}

    def _moved(self, replica: Replica) -> None:
        logger.warning("%s answered model_moved: it no longer holds %s", replica.key,
                       replica.model)
        if self.on_moved is not None:
            self.on_moved(replica)

    # -- migration ----------------------------------------------------------------------

    async def migrate(self, stream: Stream, dest: Replica) -> dict:
        """Warm `dest` with the stream's tokens, then hand the stream over to it."""
        if stream.replica is not None and dest.key == stream.replica.key:
            raise ValueError(f"stream {stream.id} already runs on {dest.key}")
        t_call = time.monotonic()
        await stream.started.wait()
        logger.debug("migrating %s: started after %.3f s, %d generated", stream.id,
                     time.monotonic() - t_call, len(stream.generated))
        rounds = 0
        warmed = 0
        while stream.finish_reason is None and stream.id in self.active:
            before = len(stream.generated)
            tokens = (stream.prompt_ids or []) + stream.generated
            t0 = time.monotonic()
            async with self.http.post(f"{dest.url}/v1/completions", headers=dest.headers,
                                      timeout=timeout(self.timeout_s), json={
                                          "model": dest.served, "prompt": tokens,
                                          "max_tokens": 1, "temperature": 0}) as r:
                if r.status == 409 and model_moved(409, await _json_or_none(r)):
                    self._moved(dest)
                r.raise_for_status()
                t_head = time.monotonic() - t0
                await r.read()
            # The first round prefills everything; later rounds only the new tokens.
            self.migration.observe(len(tokens) - warmed, time.monotonic() - t0)
            logger.debug("migrating %s to %s: warm round %d, %d tokens in %.3f s; %d generated "
                         "meanwhile (headers after %.3f s)", stream.id, dest.key, rounds + 1,
                         len(tokens) - warmed, time.monotonic() - t0,
                         len(stream.generated) - before, t_head)
            warmed = len(tokens)
            rounds += 1
            if len(stream.generated) - before < self.gap_tokens or rounds >= self.rounds:
                break
        if stream.finish_reason is not None or stream.id not in self.active:
            return {"stream": stream.id, "state": "finished before the move"}
        stream.switch_to = dest
        return {"stream": stream.id, "state": "switching", "to": dest.key,
                "warm_rounds": rounds, "at_token": len(stream.generated)}


async def _json_or_none(response: aiohttp.ClientResponse) -> object:
    try:
        return loads(await response.read())
    except ValueError:
        return None


def usage(stream: Stream) -> dict:
    prompt, completion = len(stream.prompt_ids or []), len(stream.generated)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def final_response(stream: Stream) -> dict:
    """The non-streaming response built from a finished stream."""
    text = "".join(stream.text)
    choice: dict = {"index": 0, "logprobs": None, "finish_reason": stream.finish_reason,
                    "stop_reason": stream.stop_reason}
    if stream.kind == "chat":
        choice["message"] = {"role": "assistant", "content": text}
        obj = "chat.completion"
    else:
        choice["text"] = text
        obj = "text_completion"
    if stream.wants_token_ids:
        choice["token_ids"] = stream.generated
        if stream.kind == "completion":
            choice["prompt_token_ids"] = stream.prompt_ids
    out = {"id": stream.response_id, "object": obj, "created": stream.created,
           "model": stream.model, "choices": [choice], "usage": usage(stream)}
    if stream.wants_token_ids and stream.kind == "chat":
        out["prompt_token_ids"] = stream.prompt_ids
    return out
