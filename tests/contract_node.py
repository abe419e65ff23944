"""`ContractNode`: a real HTTP server on loopback that plays a node daemon and its replicas
by the node API contract of issue 12 (standby engines, swaps, served names).

It stands in for the node daemon (`sllm node`) whose standby support is being built on main
at the same time as the router side; the router under test is the real `sllm router`
process and talks to this server over HTTP exactly as it would to a node and to vLLM
replicas behind their guard. What it plays, per the contract:

- `GET /status`: `devices[]` (held by replica ids, standbys included), `tiers[].models[]`
  with their `shape`, `replicas[]` (standbys with state "standby"), `standby.engines[]`.
- `POST /replicas` with `standby` (default true): claims a standby still holding the model
  (`started_via` "standby"), else swaps into a standby of the model's shape ("swap", the
  engine keeps its `served_name`), else starts cold on a free device, a standby of another
  shape giving way if none is free ("cold").
- `DELETE /replicas/{id}?standby=true`: the engine becomes a standby if `keep_standbys`.
- The replicas (`/r/{id}/v1/...`): the guard's checks (serving key, `X-Sllm-Model` must name
  the model the engine holds, else 409 `model_moved`), vLLM's (the body's `model` must be the
  engine's served name, else 404), and greedy answers in vLLM's shapes naming the served
  name, streamed (with token ids) or not.
`legacy=True` plays a node from before issue 12: no `served_name`, `shape`, `started_via`
or `standby` in what it answers, and a start body with fields it does not know is refused
(422), as that node's API does.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from dataclasses import dataclass, field

from aiohttp import web

PROMPT_IDS = [1, 2, 3]
MOVED = "model_moved"


@dataclass
class Engine:
    id: int
    model: str
    served_name: str
    shape: str | None
    device: str
    state: str = "ready"  # ready | standby
    started_via: str = "cold"
    phases: dict = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"serving-key-of-replica-{self.id}"


@dataclass
class Call:
    """One call a replica received: what the router sent, and what it answered."""

    engine: int
    path: str
    header_model: str | None
    body: dict
    status: int


class ContractNode:
    """See the module docstring. `shapes`: model -> engine-shape key (None: unknown)."""

    def __init__(self, token: str, shapes: dict[str, str | None], devices: int = 2,
                 keep_standbys: bool = True, legacy: bool = False) -> None:
        self.token, self.shapes, self.legacy = token, shapes, legacy
        self.devices = [f"cpu:{i}" for i in range(devices)]
        self.keep_standbys = keep_standbys
        self.engines: dict[int, Engine] = {}
        self.next_id = 1
        self.calls: list[Call] = []
        self.starts: list[dict] = []  # POST /replicas bodies
        self.deletes: list[tuple[int, dict]] = []  # (id, query)
        self.deleted = threading.Event()
        self.status_polls = 0
        # While `park_status`, each status answer (what the node held when asked) waits in
        # `parked` until the test releases it: a slow answer, arriving after what followed.
        self.park_status = False
        self.parked: list[asyncio.Future] = []
        self.lock = threading.Lock()
        self.url = ""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None

    # -- what tests arrange -----------------------------------------------------------------

    def add_standby(self, model: str, shape: str | None = None) -> Engine:
        """An idle standby engine, cold-started for `model` earlier (served under its name)."""
        with self.lock:
            engine = self._new_engine(model, self._free_device())
            engine.state = "standby"
            engine.shape = shape if shape is not None else self.shapes.get(model)
            return engine

    def swap_behind_the_back(self, engine_id: int, model: str) -> None:
        """Another router had this engine given `model`'s weights: this router's view of it is
        stale now (its guard answers `model_moved` for the old model)."""
        with self.lock:
            self.engines[engine_id].model = model

    # -- node state -------------------------------------------------------------------------

    def _free_device(self) -> str | None:
        held = {e.device for e in self.engines.values()}
        return next((d for d in self.devices if d not in held), None)

    def _new_engine(self, model: str, device: str | None) -> Engine:
        assert device is not None, "no free device"
        engine = Engine(self.next_id, model, model, self.shapes.get(model), device)
        self.engines[engine.id] = engine
        self.next_id += 1
        return engine

    def _record(self, engine: Engine, api_key: bool = False) -> dict:
        record = {"id": engine.id, "model": engine.model, "state": engine.state,
                  "url": f"{self.url}/r/{engine.id}", "devices": [engine.device],
                  "tier": "dram", "phases": engine.phases, "error": None}
        if not self.legacy:
            record.update(served_name=engine.served_name, shape=engine.shape,
                          started_via=engine.started_via)
        if api_key:
            record["api_key"] = engine.key
        return record

    def _status(self) -> dict:
        models = [{"name": m, "bytes": 10**6, **({} if self.legacy else {"shape": s})}
                  for m, s in sorted(self.shapes.items())]
        held = {e.device: e.id for e in self.engines.values()}
        status = {
            "devices": [{"name": d, "replica": held.get(d)} for d in self.devices],
            "tiers": [{"name": "dram", "read_gbps": 10.0, "queue_drain_s": 0.0,
                       "models": models},
                      {"name": "ssd", "read_gbps": 1.0, "queue_drain_s": 0.0,
                       "models": models}],
            "transfer_gbps": {"fetch": 0.5},
            "replicas": [self._record(e) for e in self.engines.values()],
        }
        if not self.legacy:
            standbys = [e for e in self.engines.values() if e.state == "standby"]
            status["standby"] = {
                "engines": [{"id": e.id, "shape": e.shape, "model": e.model,
                             "devices": [e.device], "memory_bytes": 10**6, "since": 0.0}
                            for e in standbys],
                "memory_bytes": 10**6 * len(standbys), "max_engines": 4,
                "max_memory_bytes": None}
        return status

    def _authorized(self, request: web.Request) -> bool:
        return request.headers.get("Authorization") == f"Bearer {self.token}"

    # -- node API ---------------------------------------------------------------------------

    async def status(self, request: web.Request) -> web.Response:
        with self.lock:
            self.status_polls += 1
            snapshot = self._status()
            parked = None
            if self.park_status:
                parked = asyncio.get_running_loop().create_future()
                self.parked.append(parked)
        if parked is not None:
            await parked
        return web.json_response(snapshot)

    def release_status(self, index: int) -> None:
        """Let the `index`-th parked status answer go (with what the node held when asked)."""
        assert self._loop is not None
        with self.lock:
            future = self.parked[index]
        self._loop.call_soon_threadsafe(future.set_result, None)

    async def replica_keys(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return web.json_response({"error": {"message": "token"}}, status=401)
        with self.lock:
            return web.json_response({"keys": {str(e.id): e.key for e in self.engines.values()
                                               if e.state == "ready"}})

    async def start(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return web.json_response({"error": {"message": "token"}}, status=401)
        body = await request.json()
        model, use_standby = body["model"], body.get("standby", True)
        with self.lock:
            self.starts.append(body)
            unknown = set(body) - {"model", "devices", "count", "args", "tier", "wait",
                                   "timeout_s"}
            if self.legacy and unknown:
                return web.json_response({"detail": [{"type": "extra_forbidden",
                                                      "loc": ["body", sorted(unknown)[0]]}]},
                                         status=422)
            standbys = sorted((e for e in self.engines.values() if e.state == "standby"),
                              key=lambda e: e.id)
            shape = self.shapes.get(model)
            holding = next((e for e in standbys if e.model == model), None)
            same = next((e for e in standbys if shape is not None and e.shape == shape), None)
            if use_standby and holding is not None:
                engine = holding
                engine.started_via, engine.phases = "standby", {"swap": 0.001, "total": 0.002}
            elif use_standby and same is not None:
                engine = same
                engine.model, engine.started_via = model, "swap"
                engine.phases = {"queue": 0.0, "fetch": 0.0, "load": 0.01, "swap": 0.25,
                                 "total": 0.26}
            else:
                device = self._free_device()
                if device is None:  # a standby of another shape gives way
                    other = next((e for e in standbys if e.shape != shape), None)
                    if other is None:
                        return web.json_response({"error": {"message": "no free device",
                                                            "type": "no_device"}}, status=503)
                    del self.engines[other.id]
                    device = other.device
                engine = self._new_engine(model, device)
                engine.phases = {"queue": 0.0, "fetch": 0.0, "process_start": 12.0,
                                 "load": 0.01, "engine_init": 3.0, "total": 15.01}
            engine.state = "ready"
            return web.json_response(self._record(engine, api_key=True), status=201)

    async def delete(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return web.json_response({"error": {"message": "token"}}, status=401)
        engine_id = int(request.match_info["id"])
        with self.lock:
            self.deletes.append((engine_id, dict(request.query)))
            engine = self.engines[engine_id]
            if request.query.get("standby") == "true" and self.keep_standbys:
                engine.state = "standby"
                answer = self._record(engine)
            else:
                del self.engines[engine_id]
                answer = {**self._record(engine), "state": "stopped"}
        self.deleted.set()
        return web.json_response(answer)

    # -- the replicas -----------------------------------------------------------------------

    async def serve(self, request: web.Request) -> web.StreamResponse:
        engine_id, path = int(request.match_info["id"]), request.match_info["path"]
        body = await request.json()
        header = request.headers.get("X-Sllm-Model")
        with self.lock:
            engine = self.engines.get(engine_id)
            status, answer = 200, None
            if engine is None or engine.state != "ready":
                status, answer = 503, {"error": {"message": "not serving", "type": "gone"}}
            elif request.headers.get("Authorization") != f"Bearer {engine.key}":
                status, answer = 401, {"error": {"message": "serving key", "type": "auth"}}
            elif header is not None and header != engine.model:  # the replica guard
                status, answer = 409, {"error": {"message": f"replica {engine_id} holds "
                                                            f"{engine.model} now",
                                                 "type": MOVED}}
            elif body.get("model") != engine.served_name:  # vLLM's own check
                status, answer = 404, {"error": {
                    "message": f"The model `{body.get('model')}` does not exist.",
                    "type": "NotFoundError", "code": 404}}
            served = engine.served_name if engine is not None else ""
            self.calls.append(Call(engine_id, path, header, body, status))
        if answer is not None:
            return web.json_response(answer, status=status)
        chat = path == "chat/completions"
        count = min(int(body.get("max_tokens") or 16), 3)
        tokens = [(10 + i, chr(97 + i)) for i in range(count)]
        if body.get("stream"):
            return await self._stream(request, body, served, chat, tokens)
        text = "".join(t for _, t in tokens)
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}} if chat
                  else {"index": 0, "text": text})
        choice.update(finish_reason="length", logprobs=None)
        return web.json_response({
            "id": "cmpl-upstream", "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": served, "choices": [choice],
            "usage": {"prompt_tokens": 3, "completion_tokens": count, "total_tokens": 3 + count}})

    async def _stream(self, request: web.Request, body: dict, served: str, chat: bool,
                      tokens: list[tuple[int, str]]) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for i, (token, text) in enumerate(tokens):
            finish = "length" if i == len(tokens) - 1 else None
            choice: dict = {"index": 0, "logprobs": None, "finish_reason": finish}
            chunk: dict = {"id": "cmpl-upstream", "created": 1, "model": served}
            if chat:
                choice["delta"] = {"content": text}
                chunk["object"] = "chat.completion.chunk"
            else:
                choice["text"] = text
                chunk["object"] = "text_completion"
            if body.get("return_token_ids"):
                choice["token_ids"] = [token]
                if i == 0:
                    (chunk if chat else choice)["prompt_token_ids"] = PROMPT_IDS
            chunk["choices"] = [choice]
            await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(text="")

    # -- lifecycle ------------------------------------------------------------------------

    def __enter__(self) -> ContractNode:
        started = threading.Event()

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            app = web.Application()
            app.router.add_get("/status", self.status)
            app.router.add_get("/replica-keys", self.replica_keys)
            app.router.add_post("/replicas", self.start)
            app.router.add_delete("/replicas/{id}", self.delete)
            app.router.add_post("/r/{id}/v1/{path:.*}", self.serve)
            app.router.add_get("/r/{id}/metrics", self.metrics)
            self._runner = web.AppRunner(app)
            self._loop.run_until_complete(self._runner.setup())
            site = web.TCPSite(self._runner, "127.0.0.1", 0)
            self._loop.run_until_complete(site.start())
            port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            self.url = f"http://127.0.0.1:{port}"
            started.set()
            self._loop.run_forever()
            self._loop.run_until_complete(self._runner.cleanup())
            self._loop.close()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        assert started.wait(30), "the contract node did not start"
        return self

    def __exit__(self, *exc) -> None:
        assert self._loop is not None and self._thread is not None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(30)
