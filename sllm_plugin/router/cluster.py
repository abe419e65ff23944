"""The node daemons as the router sees them: polled status, replicas, start and stop.

Everything is plain HTTP (the `upstream` session) to the node daemons' API and the replicas'
own endpoints; the policy gets immutable views (`NodeView`, `ReplicaView`) built from the last poll.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import aiohttp

from ..tokens import TokenError, local_node_token
from ..vllmlog import root_cause
from .config import NodeRef, RouterConfig, explicit_node_token, is_loopback
from .policy import NodeView, ReplicaView, TierView
from .upstream import UpstreamErrors, deadline, read_json

logger = logging.getLogger("sllm_plugin.router")


class NodeUnavailable(Exception):
    pass


MAX_REASON_CHARS = 1000


def replica_failure(status: int, info: object) -> str:
    """Why a node's answer to a replica start is not a ready replica, in one short line: the
    node's own summary and the replica's root cause, never a whole log tail. The node answers
    `{"error": {"message"}}` (its error shape) or the replica's record, whose `error` is a
    string; anything else is described, not trusted."""
    if not isinstance(info, dict):
        return f"HTTP {status} with an unexpected answer ({type(info).__name__})"
    err = info.get("error")
    if isinstance(err, dict):
        err = err.get("message")
    state = info.get("state")
    if not isinstance(err, str) or not err.strip():
        if state in ("queued", "fetching", "starting"):
            return f"the replica was not ready in time (still {state})"
        return f"HTTP {status}, replica state {state!r}" if isinstance(state, str) else \
            f"HTTP {status}"
    summary = (err.strip().splitlines()[0].removesuffix("Last output:")
               .removesuffix("Root cause:").strip())
    cause = root_cause(err)
    reason = summary if cause is None or cause in summary else f"{summary} Cause: {cause}"
    return reason if len(reason) <= MAX_REASON_CHARS else reason[: MAX_REASON_CHARS - 3] + "..."


@dataclass
class Replica:
    node: str
    node_replica_id: int
    model: str
    url: str
    state: str = "ready"  # starting | ready | draining | stopping | gone
    in_flight: int = 0  # requests this router is proxying to it
    tokens_in_flight: int = 0
    reported_running: int = 0  # from the replica's own /metrics
    reported_waiting: int = 0
    last_used: float = field(default_factory=time.monotonic)
    started_at: float = field(default_factory=time.monotonic)
    phases: dict = field(default_factory=dict)
    tier: str | None = None

    @property
    def key(self) -> str:
        return f"{self.node}/{self.node_replica_id}"

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    def view(self) -> ReplicaView:
        return ReplicaView(self.key, self.node, self.model, self.ready,
                           max(self.in_flight, self.reported_running), self.reported_waiting,
                           self.tokens_in_flight)

    def describe(self) -> dict:
        return {"id": self.key, "node": self.node, "model": self.model, "url": self.url,
                "state": self.state, "in_flight": self.in_flight,
                "running": self.reported_running, "waiting": self.reported_waiting,
                "tier": self.tier, "phases": self.phases}


class Cluster:
    def __init__(self, config: RouterConfig, http: aiohttp.ClientSession) -> None:
        self.config = config
        self.http = http
        self.nodes: dict[str, NodeRef] = {n.name: n for n in config.nodes}
        self.status: dict[str, dict | None] = {n: None for n in self.nodes}
        self.draining: set[str] = set()
        self.replicas: dict[str, Replica] = {}
        self.starting: dict[str, int] = {}  # node -> replicas being started by this router
        self.tokens: dict[str, str | None] = {n.name: explicit_node_token(n)
                                              for n in config.nodes}

    def _headers(self, node: str) -> dict[str, str]:
        token = self.tokens.get(node)
        if token is None and is_loopback(self.nodes[node].url):
            # A node on this host with no token configured: the one it made in its state
            # directory. Looked up when needed, so a node started after the router is found.
            try:
                token = self.tokens[node] = local_node_token()
            except TokenError as e:
                logger.warning("node %s: the local node token is unusable: %s", node, e)
        return {"Authorization": f"Bearer {token}"} if token else {}

    # -- membership (discovery adds and removes nodes while the router runs) --------------------

    def add_node(self, ref: NodeRef) -> None:
        """Start polling `ref` and placing replicas there. Its token is read now (TokenError
        before anything changes); the next poll fills its status."""
        if ref.name in self.nodes:
            raise ValueError(f"there is a node {ref.name!r} already")
        self.tokens[ref.name] = explicit_node_token(ref)
        self.nodes[ref.name] = ref
        self.status[ref.name] = None

    def remove_node(self, name: str, reason: str = "left DNS") -> None:
        """Forget a node (it left DNS): treated as failed first, so its replicas are lost and
        their streams fail over; then it is polled, placed on and shown no more."""
        self.lose_node(name, reason)
        self.nodes.pop(name, None)
        self.status.pop(name, None)
        self.tokens.pop(name, None)
        self.draining.discard(name)

    def lose_node(self, name: str, reason: str) -> None:
        # A minimal stand-in, replaced by the lead's lose_node (which also fails the node's
        # streams over): mark the node's replicas gone and drop those serving nothing.
        for rep in self.replicas.values():
            if rep.node == name and rep.state != "gone":
                logger.warning("replica %s is gone (node %s: %s)", rep.key, name, reason)
                rep.state = "gone"
        self._drop_gone()

    # -- polling ----------------------------------------------------------------------------

    async def poll_once(self) -> None:
        await asyncio.gather(*(self._poll_node(n) for n in self.nodes))
        await asyncio.gather(*(self._poll_metrics(r) for r in list(self.replicas.values())
                               if r.ready))

    async def _poll_node(self, name: str) -> None:
        try:
            async with self.http.get(f"{self.nodes[name].url}/status",
                                     timeout=deadline(10)) as r:
                r.raise_for_status()
                status = await read_json(r)
        except (*UpstreamErrors, ValueError) as e:
            if name not in self.nodes:
                return  # removed while this poll ran
            # No new placements there; its replicas stay routable (a busy node answers slowly,
            # and a replica that really died fails its streams over on its own).
            if self.status.get(name) is not None:
                logger.warning("node %s unreachable: %s", name, e)
            self.status[name] = None
            return
        if name not in self.nodes:
            return  # removed while this poll ran: no status, no adopted replicas
        self.status[name] = status
        alive = {r["id"]: r for r in status["replicas"]}
        for rep in list(self.replicas.values()):
            if rep.node != name or rep.state == "starting":
                continue
            info = alive.get(rep.node_replica_id)
            if info is None or info["state"] not in ("ready",):
                if rep.state != "gone":
                    logger.info("replica %s is gone (%s)", rep.key,
                                info["state"] if info else "unknown to its node")
                rep.state = "gone"
        for info in status["replicas"]:  # adopt ready replicas of known models
            key = f"{name}/{info['id']}"
            if (info["state"] == "ready" and key not in self.replicas
                    and info["model"] in self.config.models):
                self.replicas[key] = Replica(name, info["id"], info["model"], info["url"],
                                             tier=info.get("tier"), phases=info["phases"])
        self._drop_gone()

    def _drop_gone(self) -> None:
        for key in [k for k, r in self.replicas.items() if r.state == "gone" and not r.in_flight]:
            del self.replicas[key]

    async def _poll_metrics(self, replica: Replica) -> None:
        from prometheus_client.parser import text_string_to_metric_families

        try:
            async with self.http.get(f"{replica.url}/metrics", timeout=deadline(5)) as r:
                r.raise_for_status()
                text = await r.text()
        except UpstreamErrors:
            return
        running = waiting = 0.0
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "vllm:num_requests_running":
                    running += sample.value
                elif sample.name == "vllm:num_requests_waiting":
                    waiting += sample.value
        replica.reported_running, replica.reported_waiting = int(running), int(waiting)

    async def poll_forever(self) -> None:
        while True:
            try:
                await self.poll_once()
            except Exception:  # a poll must never end the loop
                logger.exception("poll failed")
            await asyncio.sleep(self.config.poll_interval_s)

    # -- views for the policy ---------------------------------------------------------------

    def views(self) -> list[NodeView]:
        views = []
        for name, status in self.status.items():
            if status is None:
                views.append(NodeView(name, 0, (), healthy=False))
                continue
            free = sum(1 for d in status["devices"] if d["replica"] is None)
            free = max(0, free - self.starting.get(name, 0))
            tiers = tuple(TierView(t["name"], t["read_gbps"], t["queue_drain_s"],
                                   frozenset(m["name"] for m in t["models"]))
                          for t in status["tiers"])
            replicas = tuple(r.view() for r in self.replicas.values() if r.node == name)
            views.append(NodeView(name, free if name not in self.draining else 0, tiers,
                                  status["transfer_gbps"].get("fetch"), replicas,
                                  healthy=name not in self.draining))
        return views

    def model_size(self, model: str) -> int:
        for status in self.status.values():
            for tier in (status or {}).get("tiers", []):
                for m in tier["models"]:
                    if m["name"] == model:
                        return int(m["bytes"])
        spec = self.config.models.get(model)
        return spec.size_bytes if spec and spec.size_bytes else 2 * 10**9

    def sizes(self) -> dict[str, int]:
        return {m: self.model_size(m) for m in self.config.models}

    def ready_replicas(self, model: str) -> list[Replica]:
        return [r for r in self.replicas.values() if r.model == model and r.ready]

    # -- node calls ---------------------------------------------------------------------------

    async def register_models(self) -> None:
        for model, spec in self.config.models.items():
            if spec.source:
                await asyncio.gather(*(self.register(n, model) for n in self.nodes),
                                     return_exceptions=True)

    async def register(self, node: str, model: str) -> None:
        spec = self.config.models[model]
        if not spec.source:
            return
        async with self.http.post(f"{self.nodes[node].url}/models",
                                  headers=self._headers(node), timeout=deadline(30),
                                  json={"name": model, "source": spec.source,
                                        "replica_args": spec.replica_args}) as r:
            if r.status >= 300:
                logger.warning("registering %s on %s: %s %s", model, node, r.status,
                               await r.text())

    async def start_replica(self, node: str, model: str, timeout: float) -> Replica:
        self.starting[node] = self.starting.get(node, 0) + 1
        try:
            await self.register(node, model)
            async with self.http.post(f"{self.nodes[node].url}/replicas",
                                      headers=self._headers(node),
                                      timeout=deadline(timeout + 30),
                                      json={"model": model, "wait": True,
                                            "timeout_s": timeout}) as r:
                status, info = r.status, await read_json(r)
        except (*UpstreamErrors, ValueError) as e:
            raise NodeUnavailable(f"node {node}: {type(e).__name__}: {e}") from None
        finally:
            self.starting[node] -= 1
        if status >= 300 or not isinstance(info, dict) or info.get("state") != "ready":
            raise NodeUnavailable(f"node {node} could not start {model}: "
                                  f"{replica_failure(status, info)}")
        try:
            replica = Replica(node, int(info["id"]), model, str(info["url"]),
                              tier=info.get("tier"), phases=dict(info.get("phases") or {}))
        except (KeyError, TypeError, ValueError):
            raise NodeUnavailable(f"node {node} started {model} but described it without an "
                                  "id and url") from None
        self.replicas[replica.key] = replica
        return replica

    async def stop_replica(self, replica: Replica) -> None:
        replica.state = "stopping"
        try:
            if replica.node not in self.nodes:  # the node left: nothing to ask it
                raise aiohttp.ClientError(f"node {replica.node} is no longer known")
            url = f"{self.nodes[replica.node].url}/replicas/{replica.node_replica_id}"
            async with self.http.delete(url, headers=self._headers(replica.node),
                                        timeout=deadline(120)):
                pass
        except UpstreamErrors as e:
            logger.warning("stopping %s: %s", replica.key, e)
        replica.state = "gone"
        self._drop_gone()
