"""The node daemon's HTTP API (FastAPI; the OpenAPI schema is at /openapi.json, docs at /docs).

Reads are open; every call that changes something needs `Authorization: Bearer <token>` when
the node has a token. Every error is JSON `{"error": {"message": ..., "type": ...}}` with a 4xx
status that says what was wrong; the daemon keeps serving after any of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field

from ..httperrors import install_request_error_handlers
from .names import InvalidModelName
from .node import Node, NodeError

TierName = Literal["dram", "ssd"]
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
    wait: bool = Field(False, description="answer when the job has finished")
    timeout_s: float = Field(3600, description="for /promote with wait")


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
    wait: bool = Field(False, description="answer when the replica is ready (or failed)")
    timeout_s: float = 900


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
    def authorized(creds: Credentials) -> None:
        token = node.config.token
        if token is None:
            return
        if creds is None:
            raise NodeError("this call needs 'Authorization: Bearer <token>'", 401)
        if not secrets.compare_digest(creds.credentials.encode(), token.encode()):
            raise NodeError("wrong bearer token", 403)

    admin = [Depends(authorized)]

    @app.exception_handler(NodeError)
    async def _node_error(_: Request, e: NodeError) -> JSONResponse:
        return _error(e.status, str(e), "node_error")

    @app.exception_handler(InvalidModelName)
    async def _bad_name(_: Request, e: InvalidModelName) -> JSONResponse:
        return _error(400, str(e), "invalid_model_name")

    install_request_error_handlers(app, _error, "invalid_request", "http_error")

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/status")
    def status() -> dict[str, Any]:
        """Capacity, devices, tiers (holdings, bandwidths, queues), models and replicas."""
        return node.status()

    @app.get("/models")
    def models() -> dict[str, Any]:
        return {n: m.model_dump() for n, m in sorted(node.models.items())}

    @app.post("/models", dependencies=admin, status_code=201)
    def register(body: RegisterModel) -> dict[str, Any]:
        entry = node.register(body.name, body.source, body.revision, body.replica_args)
        return {"name": body.name, **entry.model_dump()}

    def _job_answer(job, wait: bool, timeout: float) -> JSONResponse:
        if job is None:
            return JSONResponse({"state": "present"}, status_code=200)
        if wait:
            job.done.wait(timeout)
            if job.state == "failed":
                return _error(job.error_status or 502, job.error or "failed", "job_failed")
            return JSONResponse(job.describe(), status_code=200 if job.state == "done" else 202)
        return JSONResponse(job.describe(), status_code=202)

    @app.post("/prefetch", dependencies=admin)
    def prefetch(body: Prefetch) -> JSONResponse:
        """Fetch into the ssd tier, or into the dram tier (through ssd, as a promotion)."""
        if body.wait:
            queued, running = node.ensure(body.model, body.tier)
            return JSONResponse({"state": "present", "model": body.model, "tier": body.tier,
                                 "queued_s": queued, "transfer_s": running})
        return _job_answer(node.prefetch(body.model, body.tier), False, 0)

    @app.post("/promote", dependencies=admin)
    def promote(body: Prefetch) -> JSONResponse:
        """Copy a model from the ssd tier into the dram tier."""
        if not node.tiers["ssd"].has(body.model) and not node.tiers["dram"].has(body.model):
            raise NodeError(f"{body.model} is not in the ssd tier; prefetch it first", 409)
        return _job_answer(node.prefetch(body.model, "dram"), body.wait, body.timeout_s)

    @app.get("/jobs/{job_id}")
    def job(job_id: int) -> dict[str, Any]:
        return node.job(job_id).describe()

    @app.post("/evict", dependencies=admin)
    def evict(body: Evict) -> dict[str, Any]:
        return {"model": body.model, "tier": body.tier,
                "freed_bytes": node.evict(body.model, body.tier, body.force)}

    @app.post("/pin", dependencies=admin)
    def pin(body: Pin) -> dict[str, Any]:
        node.pin(body.model, body.tier, body.pinned)
        return {"model": body.model, "tier": body.tier, "pinned": body.pinned}

    @app.get("/replicas")
    def replicas() -> list[dict[str, Any]]:
        return [r.describe() for r in node.replicas.values()]

    @app.get("/replicas/{replica_id}")
    def replica(replica_id: int) -> dict[str, Any]:
        return node.replica(replica_id).describe()

    @app.post("/replicas", dependencies=admin)
    def start_replica(body: StartReplica) -> JSONResponse:
        """Start a vLLM replica of a model (fetching and promoting it first if needed)."""
        replica = node.start_replica(body.model, body.devices, body.count, body.args,
                                     body.tier)
        if not body.wait:
            return JSONResponse(replica.describe(), status_code=202)
        replica.ready.wait(body.timeout_s)
        if replica.state == "failed":
            return _error(422, replica.error or "replica failed", "replica_failed")
        return JSONResponse(replica.describe(),
                            status_code=200 if replica.state == "ready" else 202)

    @app.delete("/replicas/{replica_id}", dependencies=admin)
    def stop_replica(replica_id: int) -> dict[str, Any]:
        return node.stop_replica(replica_id).describe()

    return app


def serve(node: Node, host: str, port: int, log_level: str = "info") -> None:
    import uvicorn

    uvicorn.run(create_app(node), host=host, port=port, log_level=log_level,
                # Open streams and waiting calls must not hold the shutdown (and the
                # replicas it stops) hostage.
                timeout_graceful_shutdown=5)
