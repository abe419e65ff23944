"""The node daemon's HTTP API (FastAPI; the OpenAPI schema is at /openapi.json, docs at /docs).

Reads are open (and show no replica flags and no URL credentials); every call that changes
something needs `Authorization: Bearer <token>` (the node always has one). Every request first
passes `httpguard`: its Host header must name this node, its body must fit `max_body_bytes`.
Every error is JSON `{"error": {"message": ..., "type": ...}}` with a 4xx status that says
what was wrong; the daemon keeps serving after any of them.

No request can hold up the others: reads run on their own few threads, calls that wait for a
job or a replica wait on threads of their own for at most their `timeout_s` (then answer 202
with what is under way), and nothing that talks to a remote server runs in a request.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from typing import Annotated, Any, Literal

import anyio
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict, Field

from ..httperrors import install_request_error_handlers
from .httpguard import BodyLimit, HostCheck, served_names
from .names import InvalidModelName
from .node import Node, NodeError

TierName = Literal["dram", "ssd"]
MAX_WAIT_S = 24 * 3600.0
WAITING_CALLS = 64  # calls that may wait for a job or a replica at once (each on a thread)
READERS = 8  # threads that serve the reads (status, models, replicas, jobs, metrics)
# Module level: FastAPI resolves these annotations from the module's globals.
Credentials = Annotated[HTTPAuthorizationCredentials | None,
                        Depends(HTTPBearer(auto_error=False))]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RegisterModel(_Body):
    name: str
    source: str = Field(description="hub id, local path, or http(s) URL of an sllm checkpoint")
    revision: str | None = None
    replica_args: list[str] = Field(default_factory=list)


class Prefetch(_Body):
    model: str
    tier: TierName = "ssd"
    wait: bool = Field(False, description="answer when the job has finished (or, after "
                       "timeout_s, 202 with the job under way)")
    timeout_s: float = Field(3600, gt=0, le=MAX_WAIT_S, description="longest wait, seconds")


class Evict(_Body):
    model: str
    tier: TierName
    force: bool = Field(False, description="evict even if pinned")


class Pin(_Body):
    model: str
    tier: TierName = "ssd"
    pinned: bool = True


class StartReplica(_Body):
    model: str
    devices: list[str] | None = Field(None, description="e.g. ['cuda:0'] or ['cpu:0-7']")
    count: int = Field(1, description="number of devices, when `devices` is not given")
    args: list[str] = Field(default_factory=list, description="extra vLLM flags")
    tier: TierName | None = Field(None, description="load from this tier (default: the "
                                  "fastest holding it, promoting into dram when configured)")
    wait: bool = Field(False, description="answer when the replica is ready (or failed; "
                       "after timeout_s, 202 with the replica as it is)")
    timeout_s: float = Field(900, gt=0, le=MAX_WAIT_S, description="longest wait, seconds")
    standby: bool = Field(True, description="may use an idle standby engine (one holding the "
                          "model, or one of its engine shape given its weights by a swap)")


def _error(status: int, message: str, kind: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind}}, status_code=status)


def create_app(node: Node) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        # Here, not after uvicorn.run returns: uvicorn re-raises the SIGTERM it caught once
        # it has shut down, so code after it never runs, and replicas would outlive us.
        await asyncio.to_thread(node.close)

    app = FastAPI(title="sllm node", version="1", lifespan=lifespan,
                  description="Checkpoint tiers and vLLM replicas of one server.")
    # Added last runs first: the Host check, then the body limit, then FastAPI.
    app.add_middleware(BodyLimit, max_bytes=int(node.config.max_body_bytes), error=_error)
    app.add_middleware(HostCheck, allowed=served_names(node.config.host,
                                                       node.config.allowed_hosts), error=_error)
    waiters = anyio.CapacityLimiter(WAITING_CALLS)
    readers = anyio.CapacityLimiter(READERS)

    def authorized(creds: Credentials) -> None:
        if creds is None:
            raise NodeError("this call needs 'Authorization: Bearer <token>' (the node's "
                            "token: `sllm node-token` prints it on the node's host)", 401)
        if not secrets.compare_digest(creds.credentials.encode(), node.token.encode()):
            raise NodeError("wrong bearer token", 403)

    admin = [Depends(authorized)]

    async def read(fn, *args):
        return await anyio.to_thread.run_sync(fn, *args, limiter=readers)

    async def waited(timeout: float, fn, *args):
        """`fn(*args)` on a waiting thread; None if no thread was free within `timeout`."""
        with anyio.move_on_after(timeout):
            return await anyio.to_thread.run_sync(fn, *args, limiter=waiters,
                                                  abandon_on_cancel=True)
        return None

    @app.exception_handler(NodeError)
    async def _node_error(_: Request, e: NodeError) -> JSONResponse:
        return _error(e.status, str(e), "node_error")

    @app.exception_handler(InvalidModelName)
    async def _bad_name(_: Request, e: InvalidModelName) -> JSONResponse:
        return _error(400, str(e), "invalid_model_name")

    install_request_error_handlers(app, _error, "invalid_request", "http_error")

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/status")
    async def status() -> dict[str, Any]:
        """Capacity, devices, tiers (holdings, bandwidths, queues), models and replicas."""
        return await read(node.status)

    @app.get("/metrics")
    async def metrics() -> Response:
        """Prometheus metrics: tiers, queues, replicas, hits and misses, start-up phases."""
        return Response(await read(node.metrics.exposition), media_type=CONTENT_TYPE_LATEST)

    @app.get("/models")
    async def models() -> dict[str, Any]:
        return await read(node.public_models)

    @app.post("/models", dependencies=admin, status_code=201)
    def register(body: RegisterModel) -> dict[str, Any]:
        entry = node.register(body.name, body.source, body.revision, body.replica_args)
        return {"name": body.name, **entry.model_dump()}

    def _job_answer(job) -> JSONResponse:
        if job is None:
            return JSONResponse({"state": "present"}, status_code=200)
        if job.state == "failed":
            return _error(job.error_status or 502, job.error or "failed", "job_failed")
        return JSONResponse(job.describe(), status_code=200 if job.state == "done" else 202)

    @app.post("/prefetch", dependencies=admin)
    async def prefetch(body: Prefetch) -> JSONResponse:
        """Fetch into the ssd tier, or into the dram tier (through ssd, as a promotion)."""
        if body.wait:
            deadline = time.monotonic() + body.timeout_s
            done = await waited(body.timeout_s, node.ensure, body.model, body.tier, deadline)
            if done is not None:
                queued, running, pending = done
                if pending is None:
                    return JSONResponse({"state": "present", "model": body.model,
                                         "tier": body.tier, "queued_s": queued,
                                         "transfer_s": running})
                return _job_answer(pending)
        job = await anyio.to_thread.run_sync(node.prefetch, body.model, body.tier)
        return JSONResponse(job.describe(), status_code=202) if job else _job_answer(None)

    @app.post("/promote", dependencies=admin)
    async def promote(body: Prefetch) -> JSONResponse:
        """Copy a model from the ssd tier into the dram tier."""
        if not any(t.has(body.model) for t in node.tiers.values()):
            raise NodeError(f"{body.model} is not in the ssd tier; prefetch it first", 409)
        job = await anyio.to_thread.run_sync(node.prefetch, body.model, "dram")
        if job is not None and body.wait:
            await waited(body.timeout_s, job.done.wait, body.timeout_s)
        if job is not None and not body.wait:
            return JSONResponse(job.describe(), status_code=202)
        return _job_answer(job)

    @app.get("/jobs/{job_id}")
    async def job(job_id: int) -> dict[str, Any]:
        return (await read(node.job, job_id)).describe()

    @app.post("/evict", dependencies=admin)
    def evict(body: Evict) -> dict[str, Any]:
        return {"model": body.model, "tier": body.tier,
                "freed_bytes": node.evict(body.model, body.tier, body.force)}

    @app.post("/pin", dependencies=admin)
    def pin(body: Pin) -> dict[str, Any]:
        node.pin(body.model, body.tier, body.pinned)
        return {"model": body.model, "tier": body.tier, "pinned": body.pinned}

    @app.get("/replica-keys", dependencies=admin)
    async def replica_keys() -> dict[str, Any]:
        """The serving key of every live replica, for the router (which sends it as
        `Authorization: Bearer KEY` to the replica). Behind the node's token, like the start
        call's answer, the only other place a key appears."""
        return {"keys": {str(r.id): r.api_key for r in list(node.replicas.values())
                         if r.state in ("starting", "ready")}}

    @app.get("/replicas")
    async def replicas() -> list[dict[str, Any]]:
        return [r.describe() for r in list(node.replicas.values())]

    @app.get("/replicas/{replica_id}")
    async def replica(replica_id: int) -> dict[str, Any]:
        return node.replica(replica_id).describe()

    @app.post("/replicas", dependencies=admin)
    async def start_replica(body: StartReplica) -> JSONResponse:
        """Start a vLLM replica of a model (fetching and promoting it first if needed)."""
        replica = await anyio.to_thread.run_sync(node.start_replica, body.model, body.devices,
                                                 body.count, body.args, body.tier,
                                                 body.standby)
        if not body.wait:
            return JSONResponse({**replica.describe(), "api_key": replica.api_key},
                                status_code=202)
        await waited(body.timeout_s, replica.ready.wait, body.timeout_s)
        if replica.state == "failed":
            return _error(422, replica.error or "replica failed", "replica_failed")
        # The caller holds the node's token: it gets the replica's serving key.
        return JSONResponse({**replica.describe(), "api_key": replica.api_key},
                            status_code=200 if replica.state == "ready" else 202)

    @app.delete("/replicas/{replica_id}", dependencies=admin)
    def stop_replica(replica_id: int, standby: bool = False) -> dict[str, Any]:
        """Stop a replica; `?standby=true` (a keep-alive expiry) keeps its engine as a standby
        where the node's standby policy allows (the answer's state says which)."""
        return node.stop_replica(replica_id, standby).describe()

    return app


def serve(node: Node, host: str, port: int, log_level: str = "info") -> None:
    import uvicorn

    uvicorn.run(create_app(node), host=host, port=port, log_level=log_level,
                # Open streams and waiting calls must not hold the shutdown (and the
                # replicas it stops) hostage.
                timeout_graceful_shutdown=5)
