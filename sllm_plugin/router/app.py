"""The router's HTTP API: OpenAI-compatible endpoints, /health, /metrics, and the admin API.

Errors follow OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`. Only the
request's JSON body travels upstream (never the client's headers), and responses are built
here, so no hop-by-hop header leaks either way.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import secrets
import time
from collections.abc import Callable
from typing import Annotated, Any

import aiohttp
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, field_validator

from ..httperrors import install_request_error_handlers
from .autoscaler import Autoscaler, RouterError
from .cluster import Cluster, Replica, for_client, model_moved
from .config import ModelSpec, RouterConfig, check_model_name
from .discovery import Discovery
from .metrics import RouterMetrics
from .policy import MigrationModel
from .prefix import PrefixIndex, prompt_blocks
from .requests import BadRequest, parse_body, validate_request
from .streams import Stream, StreamRunner, UpstreamRejected, final_response, trackable
from .upstream import UpstreamErrors, dumps, loads, open_session, sse_batches, timeout

logger = logging.getLogger("sllm_plugin.router")
Credentials = Annotated[HTTPAuthorizationCredentials | None,
                        Depends(HTTPBearer(auto_error=False))]


# Replicas tried for one untracked request that answer `model_moved` (their engines were given
# other models since the router last polled their nodes) before the client gets a 503.
MAX_MOVED_RETRIES = 4


def error(status: int, message: str, kind: str, param: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param,
                                   "code": status}}, status_code=status)


class ClosingStreamingResponse(StreamingResponse):
    """A StreamingResponse that always closes its body generator when the response ends.

    When the client disconnects, Starlette cancels the send but may leave the generator
    suspended until it is garbage-collected; closing it at once runs its `finally`, which
    cancels the upstream request, so the replica stops generating for nobody.
    """

    def __init__(self, content, *, on_close: Callable[[], None] | None = None, **kwargs) -> None:
        super().__init__(content, **kwargs)
        # Also run when the body never started (a generator's `finally` does not run then).
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()
            if self.on_close is not None:
                self.on_close()


class RegisterModel(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    spec: ModelSpec

    @field_validator("name")
    @classmethod
    def _name(cls, name: str) -> str:
        return check_model_name(name)  # the node daemon's rule: it names a directory there


class Migrate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    stream: str
    replica: str | None = None  # "<node>/<id>"; default: the best other replica


class Router:
    """The router's state, shared by the endpoints."""

    def __init__(self, config: RouterConfig) -> None:
        self.config = config
        self.metrics = RouterMetrics()
        self.migration = MigrationModel()
        self.prefix = PrefixIndex()
        # Opened in `start`, inside the server's event loop (aiohttp binds a session to it).
        self.http: aiohttp.ClientSession = None  # type: ignore[assignment]
        self.cluster = Cluster(config, self.http)
        self.autoscaler = Autoscaler(config, self.cluster, self.metrics, self.migration,
                                     self.prefix)
        self.runner = StreamRunner(self.http, self.autoscaler.pick, self.migration,
                                   config.limits.migration_gap_tokens,
                                   config.limits.migration_rounds,
                                   config.limits.upstream_timeout_s, self._migrated,
                                   self.cluster.replica_moved)
        self.autoscaler.runner = self.runner
        self.tasks: list[asyncio.Task] = []
        self.recent_moves: collections.deque[dict] = collections.deque(maxlen=256)
        self.discovery = Discovery(self.cluster, config) if config.discover else None

    def _migrated(self, stream: Stream, record: dict) -> None:
        self.recent_moves.append(record)
        self.metrics.migrations.labels(stream.model, record["reason"]).inc()
        self.metrics.migration_pause.labels(stream.model, record["reason"]).observe(
            record["pause_s"])

    def _replicas_lost(self, replicas: list) -> None:
        """A node was lost: its replicas' open responses are closed, so their streams fail
        over now (a partitioned replica would otherwise keep them waiting)."""
        closed = self.runner.open.close(r.key for r in replicas)
        if closed:
            logger.warning("closed %d upstream responses of %s", closed,
                           ", ".join(r.key for r in replicas))

    async def start(self) -> None:
        self.cluster.on_lost = self._replicas_lost
        self.http = self.cluster.http = self.runner.http = open_session()
        await self.cluster.register_models()
        if self.discovery is not None:  # registers the models on the nodes it finds
            await self.discovery.refresh()
        await self.cluster.poll_once()
        self.tasks = [asyncio.create_task(self.cluster.poll_forever()),
                      asyncio.create_task(self.autoscaler.keep_alive_forever())]
        if self.discovery is not None:
            self.tasks.append(asyncio.create_task(self.discovery.run_forever()))

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        await self.http.close()


def create_app(config: RouterConfig) -> FastAPI:
    router = Router(config)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        await router.start()
        yield
        await router.stop()

    app = FastAPI(title="sllm router", version="1", lifespan=lifespan,
                  description="OpenAI-compatible router with locality-aware cold starts.")
    app.state.router = router

    def admin(creds: Credentials) -> None:
        if config.admin_token is None:
            raise RouterError("the admin API is disabled: start the router with an admin "
                              "token (--admin-token-file or SLLM_ROUTER_TOKEN)", 403,
                              "permission_error")
        if creds is None:
            raise RouterError("this call needs 'Authorization: Bearer <admin token>'", 401,
                              "authentication_error")
        token = config.admin_token.get_secret_value()
        if not secrets.compare_digest(creds.credentials.encode(), token.encode()):
            raise RouterError("wrong admin token", 403, "permission_error")

    admin_only = [Depends(admin)]

    @app.exception_handler(RouterError)
    async def _router_error(_: Request, e: RouterError) -> JSONResponse:
        return error(e.status, str(e), e.kind, e.param)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, e: Exception) -> JSONResponse:
        logger.exception("unexpected error")
        return error(500, f"internal error: {type(e).__name__}: {e}", "internal_error")

    install_request_error_handlers(app, error, "invalid_request_error", "invalid_request_error")

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(router.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        return {"object": "list", "data": [
            {"id": name, "object": "model", "owned_by": "sllm",
             "ready_replicas": len(router.cluster.ready_replicas(name))}
            for name in sorted(config.models)]}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _serve(request, "completion")

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await _serve(request, "chat")

    async def _read_body(request: Request) -> dict:
        limit = config.limits.max_body_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise RouterError(f"request body of {declared} bytes exceeds the limit of {limit}",
                              413, "invalid_request_error")
        parts, size = [], 0
        try:
            async with asyncio.timeout(config.limits.body_timeout_s):
                async for part in request.stream():
                    parts.append(part)
                    size += len(part)
                    if size > limit:
                        raise RouterError(f"request body exceeds the limit of {limit} bytes",
                                          413, "invalid_request_error")
        except TimeoutError:
            raise RouterError(f"the request body did not arrive within "
                              f"{config.limits.body_timeout_s:g} s", 408,
                              "invalid_request_error") from None
        try:
            return parse_body(b"".join(parts))
        except BadRequest as e:
            raise RouterError(str(e), 400, "invalid_request_error", e.param) from None

    async def _serve(request: Request, kind: str) -> Response:
        """Serve one request. Every error the router raises is counted here, by status; the
        answers that come back from replicas are counted in `_observe`, `_failed` and
        `_passthrough`."""
        started = time.monotonic()
        label = ""  # the model label: only names this router serves (bounded cardinality)
        try:
            body = await _read_body(request)
            if isinstance(body.get("model"), str) and body["model"] in config.models:
                label = body["model"]
            return await _route(kind, body, started)
        except RouterError as e:
            router.metrics.requests.labels(label, str(e.status)).inc()
            raise

    async def _route(kind: str, body: dict, started: float) -> Response:
        try:
            req = validate_request(kind, body)
        except BadRequest as e:
            raise RouterError(str(e), 400, "invalid_request_error", e.param) from None
        model = req.model
        if model not in config.models:
            raise RouterError(f"the model {model!r} does not exist; this router serves "
                              f"{sorted(config.models)}", 404, "model_not_found", "model")
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None \
            else req.max_tokens
        limit = config.limits.max_tokens
        if max_tokens is None:
            max_tokens = limit
        if max_tokens < 1 or max_tokens > limit:
            raise RouterError(f"max_tokens must be an integer from 1 to {limit}, got "
                              f"{max_tokens!r}", 400, "invalid_request_error", "max_tokens")
        field = "messages" if kind == "chat" else "prompt"
        blocks = prompt_blocks(body[field])
        why_not = trackable(kind, body)
        waits: list[float] = []
        replica = await router.autoscaler.pick(model, blocks, waits=waits)
        # How long the request waited for a replica to start (0.000: one was ready), so a
        # client can tell a cold start from a slow model.
        waited = f"{sum(waits):.3f}"
        headers = {"x-sllm-replica": replica.key, "x-sllm-start-wait": waited}
        if why_not is not None:
            moved: set[str] = set()
            while (response := await _passthrough(kind, body, replica)) is None:
                # The engine holds another model now (dropped): the next replica of this one.
                moved.add(replica.key)
                if len(moved) >= MAX_MOVED_RETRIES:
                    router.metrics.requests.labels(model, "503").inc()
                    return error(503, f"{len(moved)} replicas of {model!r} in a row no longer "
                                 "held it (model_moved); try again", "service_unavailable")
                replica = await router.autoscaler.pick(model, blocks, exclude=moved)
            response.headers["x-sllm-replica"] = replica.key
            response.headers["x-sllm-start-wait"] = waited
            return response
        stream = Stream(kind, model, body, max_tokens)
        task = asyncio.create_task(router.runner.run(stream, replica))
        first = await stream.events.get()
        if isinstance(first, Exception):
            return _failed(model, first)
        if req.stream:
            return ClosingStreamingResponse(_sse(stream, first, task, started),
                                            media_type="text/event-stream", headers=headers,
                                            on_close=task.cancel)
        item = first
        while item is not None:
            if isinstance(item, Exception):
                return _failed(model, item)
            item = await stream.events.get()
        await task
        _observe(stream, started, 200)
        return JSONResponse(final_response(stream), headers=headers)

    def _failed(model: str, e: Exception) -> JSONResponse:
        if isinstance(e, UpstreamRejected):
            router.metrics.requests.labels(model, str(e.status)).inc()
            return JSONResponse(e.body, status_code=e.status)
        if isinstance(e, RouterError):
            router.metrics.requests.labels(model, str(e.status)).inc()
            return error(e.status, str(e), e.kind)
        router.metrics.requests.labels(model, "502").inc()
        return error(502, f"upstream failure: {type(e).__name__}: {e}", "upstream_error")

    def _observe(stream: Stream, started: float, status: int) -> None:
        router.metrics.requests.labels(stream.model, str(status)).inc()
        if stream.first_emit is not None:
            router.metrics.ttft.labels(stream.model).observe(stream.first_emit - started)
        router.metrics.latency.labels(stream.model).observe(time.monotonic() - started)

    async def _sse(stream: Stream, first: dict, task: asyncio.Task, started: float):
        item: Any = first
        try:
            while item is not None:
                if isinstance(item, Exception):
                    message = (item.body if isinstance(item, UpstreamRejected) else
                               {"error": {"message": f"{type(item).__name__}: {item}",
                                          "type": "upstream_error", "code": 502}})
                    yield f"data: {json.dumps(message)}\n\n"
                    break
                yield b"".join([b"data: " + dumps(chunk) + b"\n\n" for chunk in item])
                item = await stream.events.get()
            yield "data: [DONE]\n\n"
            _observe(stream, started, 200)
        finally:
            if not task.done():  # the client went away: stop the upstream request too
                task.cancel()

    async def _passthrough(kind: str, body: dict, replica: Replica) -> Response | None:
        """Requests the router cannot follow token by token: proxied as they are, but for the
        model's name (the engine's served name upstream, the client's in what comes back).
        The replica's status comes back as it is, for a stream too (its error is not a 200).
        None: the replica's guard said its engine holds another model now (`model_moved`);
        the replica is dropped and the caller tries the next one."""
        path = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
        model = body["model"]
        rename = replica.served != model
        replica.in_flight += 1
        relaying = False  # once the stream is handed on, `relay` releases the replica
        try:
            r = await router.http.post(f"{replica.url}{path}",
                                       json={**body, "model": replica.served},
                                       headers=replica.headers,
                                       timeout=timeout(config.limits.upstream_timeout_s))
            relaying = bool(body.get("stream")) and r.status == 200
            if relaying:  # closed, like a stream's, if the replica's node is lost
                router.runner.open.add(replica.key, r)
            if not relaying:
                try:
                    content = await r.read()
                finally:
                    r.release()
                if rename or r.status == 409:
                    try:
                        payload = loads(content)
                    except ValueError:
                        payload = None
                    if model_moved(r.status, payload):
                        router.cluster.replica_moved(replica)
                        return None
                    if rename and payload is not None:
                        content = dumps(for_client(payload, replica))
                router.metrics.requests.labels(model, str(r.status)).inc()
                return Response(content, status_code=r.status, media_type="application/json")
        except UpstreamErrors as e:
            relaying = False
            router.metrics.requests.labels(model, "502").inc()
            return error(502, f"upstream failure: {type(e).__name__}: {e}", "upstream_error")
        finally:
            if not relaying:
                replica.in_flight -= 1

        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                router.runner.open.discard(replica.key, r)
                r.close()
                replica.in_flight -= 1

        def renamed(line: str) -> str:
            """An SSE line naming the client's model (a `data:` line of JSON), else as is."""
            data = line[5:].strip() if line.startswith("data:") else ""
            if not data.startswith("{"):
                return line
            try:
                return "data: " + dumps(for_client(loads(data), replica)).decode()
            except ValueError:
                return line

        async def relay():
            try:
                async for batch in sse_batches(r):
                    yield "".join([(renamed(line) if rename else line) + "\n\n"
                                   for line in batch])
            finally:
                release()

        router.metrics.requests.labels(model, "200").inc()
        return ClosingStreamingResponse(relay(), media_type="text/event-stream",
                                        on_close=release)

    # -- admin ----------------------------------------------------------------------------

    @app.get("/admin/replicas", dependencies=admin_only)
    def replicas() -> list[dict]:
        return [r.describe() for r in router.cluster.replicas.values()]

    @app.get("/admin/streams", dependencies=admin_only)
    def streams() -> list[dict]:
        return [s.describe() for s in router.runner.active.values()]

    @app.get("/admin/migrations", dependencies=admin_only)
    def migrations() -> list[dict]:
        """The last 256 moves (migrations and failovers), oldest first."""
        return list(router.recent_moves)

    @app.get("/admin/placements", dependencies=admin_only)
    def placements() -> list[dict]:
        return router.autoscaler.decisions

    @app.post("/admin/models", dependencies=admin_only, status_code=201)
    async def register(body: RegisterModel) -> dict:
        config.models[body.name] = body.spec
        await router.cluster.register_models()
        return {"name": body.name, **body.spec.model_dump()}

    def known_node(node: str) -> str:
        if node not in router.cluster.nodes:
            raise RouterError(f"no node {node!r}; nodes: {sorted(router.cluster.nodes)}", 404,
                              "not_found_error")
        return node

    @app.get("/admin/nodes", dependencies=admin_only)
    def nodes() -> list[dict]:
        """Each node as the router sees it: reachable, draining, free devices, replicas."""
        views = {v.name: v for v in router.cluster.views()}
        return [{"name": name, "url": ref.url,
                 "reachable": router.cluster.status.get(name) is not None,
                 "healthy": name not in router.cluster.failed,
                 "lost_at": router.cluster.lost_at.get(name),  # wall time of its last loss
                 "draining": name in router.cluster.draining,
                 "free_devices": views[name].free_devices,
                 "replicas": [r.key for r in router.cluster.replicas.values()
                              if r.node == name]}
                for name, ref in router.cluster.nodes.items()]

    @app.post("/admin/nodes/{node}/drain", dependencies=admin_only)
    async def drain(node: str) -> dict:
        """Move every stream off the node's replicas, stop them, and place nothing there
        until the drain is lifted (DELETE)."""
        return await router.autoscaler.drain(known_node(node))

    @app.delete("/admin/nodes/{node}/drain", dependencies=admin_only)
    def undrain(node: str) -> dict:
        router.cluster.draining.discard(known_node(node))
        return {"node": node, "draining": False}

    @app.post("/admin/migrate", dependencies=admin_only)
    async def migrate(body: Migrate) -> dict:
        stream = router.runner.active.get(body.stream)
        if stream is None:
            raise RouterError(f"no active stream {body.stream!r}", 404, "not_found_error")
        current = stream.replica.key if stream.replica else None
        if body.replica is not None:
            dest = router.cluster.replicas.get(body.replica)
            if dest is None or not dest.ready or dest.model != stream.model:
                raise RouterError(f"{body.replica!r} is not a ready replica of "
                                  f"{stream.model!r}", 400, "invalid_request_error")
        else:
            dest = await router.autoscaler.pick(stream.model, exclude={current} if current
                                                else ())
        try:
            return await router.runner.migrate(stream, dest)
        except ValueError as e:
            raise RouterError(str(e), 400, "invalid_request_error") from None
        except UpstreamErrors as e:
            raise RouterError(f"warming {dest.key} failed, the stream stays where it was: "
                              f"{type(e).__name__}: {e}", 502, "upstream_error") from None

    return app


def serve(config: RouterConfig, log_level: str = "info") -> None:
    import uvicorn

    uvicorn.run(create_app(config), host=config.host, port=config.port, log_level=log_level,
                # Open streams and waiting calls must not hold the shutdown (and the
                # replicas it stops) hostage.
                timeout_graceful_shutdown=5,
                # Slow or idle clients cannot hold more than this many connections (uvicorn
                # answers 503 past it); a body that trickles in meets `body_timeout_s`.
                limit_concurrency=config.limits.max_connections)
