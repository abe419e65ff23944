"""The node daemons as the router sees them: polled status, replicas, start and stop.

Everything is plain HTTP (the `upstream` session) to the node daemons' API and the replicas'
own endpoints; the policy gets immutable views (`NodeView`, `ReplicaView`) built from the last poll.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp

from ..tokens import TokenError, local_node_token
from ..vllmlog import root_cause
from .config import NodeRef, RouterConfig, explicit_node_token, is_loopback
from .policy import NodeView, ReplicaView, StandbyView, TierView
from .upstream import UpstreamErrors, deadline, read_json

# The header that tells a replica's guard which model the router means (contract of issue 12):
# an engine that was given other weights since answers 409 `model_moved` instead of serving.
MODEL_HEADER = "X-Sllm-Model"
MODEL_MOVED = "model_moved"
# Node replica states that are not replicas for the router: never routed to, adopted, counted.
NOT_REPLICAS = ("standby", "swapping")

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
    # The replica's serving key from its node (see sllm_plugin.vllm.guard); never shown.
    api_key: str | None = field(default=None, repr=False)
    # The engine's --served-model-name: what the router names as `model` upstream (after a
    # swap it is not `model`, the client's name); None: a node that does not say (= model).
    served_name: str | None = None
    started_via: str | None = None  # "cold" | "swap" | "standby", as the node reports it

    @property
    def served(self) -> str:
        return self.served_name or self.model

    @property
    def headers(self) -> dict[str, str]:
        headers = {MODEL_HEADER: self.model}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

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
                "tier": self.tier, "phases": self.phases, "served_name": self.served,
                "started_via": self.started_via}


def served_name(info: dict) -> str | None:
    """The record's `served_name` when it is a usable one (a string that fits in a body)."""
    name = info.get("served_name")
    return name if isinstance(name, str) and 0 < len(name) <= 512 else None


def for_client(payload: object, replica: Replica) -> object:
    """A replica's JSON answer (a response, a chunk, an error) as the client should see it:
    naming the client's model where the engine named its served name (they differ after a
    swap). Changed in place and returned; anything else is returned as it is."""
    served, model = replica.served, replica.model
    if served == model or not isinstance(payload, dict):
        return payload
    if payload.get("model") == served:
        payload["model"] = model
    err = payload.get("error")
    if isinstance(err, dict) and isinstance(err.get("message"), str):
        err["message"] = err["message"].replace(served, model)
    return payload


def model_moved(status: int, payload: object) -> bool:
    """Whether a replica's answer is its guard's 409 `model_moved`: the engine holds another
    model now (the router's view is stale), so it is no replica of the requested one."""
    if status != 409 or not isinstance(payload, dict):
        return False
    err = payload.get("error")
    return isinstance(err, dict) and err.get("type") == MODEL_MOVED


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
        # Health: when each node last answered; the nodes lost (unanswered for
        # `unhealthy_after_s`) and not yet back; the nodes whose next good answer is their
        # first (at start, or after a loss), whose replicas are then adopted afresh.
        now = time.monotonic()
        self.last_answer: dict[str, float] = {n: now for n in self.nodes}
        self.failed: set[str] = set()
        self.lost_at: dict[str, float] = {}  # node -> wall time of its last loss
        self.fresh: set[str] = set(self.nodes)
        self.on_lost: Callable[[list[Replica]], None] | None = None
        self._background: set[asyncio.Task] = set()  # re-polls under way (kept referenced)

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
        self.last_answer[ref.name] = time.monotonic()
        self.fresh.add(ref.name)

    def remove_node(self, name: str, reason: str = "left DNS") -> None:
        """Forget a node (it left DNS): lost first (`lose_node`: its replicas are forgotten,
        their streams fail over), then no longer polled, placed on or shown."""
        self.lose_node(name, reason)
        for table in (self.nodes, self.status, self.tokens, self.last_answer):
            table.pop(name, None)
        for names in (self.failed, self.fresh, self.draining):
            names.discard(name)

    # -- polling ----------------------------------------------------------------------------

    async def poll_once(self) -> None:
        await asyncio.gather(*(self._poll_node(n) for n in self.nodes))
        await asyncio.gather(*(self._poll_metrics(r) for r in list(self.replicas.values())
                               if r.ready))

    async def _poll_node(self, name: str) -> None:
        asked = time.monotonic()
        try:
            async with self.http.get(f"{self.nodes[name].url}/status",
                                     timeout=deadline(self.config.node_timeout_s)) as r:
                r.raise_for_status()
                status = await read_json(r)
            if not isinstance(status, dict) or not isinstance(status.get("replicas"), list):
                raise ValueError("the status is not a node daemon's")
        except (*UpstreamErrors, ValueError) as e:
            # No new placements there; its replicas stay routable until the node has been
            # silent for `unhealthy_after_s` (a busy node answers slowly; a replica that really
            # died fails its streams over on its own).
            if name not in self.nodes:
                return  # removed while the call was under way
            if self.status.get(name) is not None:
                logger.warning("node %s unreachable: %s", name, e or type(e).__name__)
            self.status[name] = None
            silent = time.monotonic() - self.last_answer[name]
            if name not in self.failed and silent >= self.config.unhealthy_after_s:
                self.lose_node(name, f"no answer for {silent:.1f} s "
                                     f"({type(e).__name__}: {e})")
            return
        if name not in self.nodes:
            return
        self.last_answer[name] = time.monotonic()
        if name in self.failed:
            self.failed.discard(name)
            logger.warning("node %s answers again: re-admitted", name)
        self.status[name] = status
        alive = {r["id"]: r for r in status["replicas"]}
        for rep in list(self.replicas.values()):
            if rep.node != name or rep.state == "starting" or rep.started_at > asked:
                continue  # a status from before this replica started says nothing of it
            info = alive.get(rep.node_replica_id)
            # A standby or a swap target is no replica; nor an engine given another model.
            if info is None or info["state"] not in ("ready",) or info.get("model") != rep.model:
                if rep.state != "gone":
                    logger.info("replica %s of %s is gone (%s)", rep.key, rep.model,
                                "unknown to its node" if info is None else
                                f"{info['state']}, holding {info.get('model')}")
                rep.state = "gone"
                continue
            rep.served_name = served_name(info) or rep.served_name
        await self._adopt(name, status["replicas"])
        self._drop_gone()

    async def _adopt(self, name: str, infos: list[dict]) -> None:
        """Take in the node's ready replicas of known models that this router does not know:
        started by another router, by hand, or by this router before it restarted or before
        the node was lost. On a node's first answer (at start, or back after a loss), a
        replica beyond its model's `max_replicas` is stopped rather than adopted: whatever
        replaced it while the node was away keeps serving, and nothing runs twice."""
        fresh = name in self.fresh
        self.fresh.discard(name)
        new = [info for info in infos if info.get("state") == "ready"
               and f"{name}/{info.get('id')}" not in self.replicas
               and info.get("model") in self.config.models]
        if not new:
            return
        keys = await self._replica_keys(name)
        if name not in self.nodes:
            return  # removed (left DNS) while the keys were fetched
        for info in new:
            key, model = f"{name}/{info['id']}", info["model"]
            if str(info["id"]) not in keys:
                logger.warning("replica %s: its node gave no key; not adopted", key)
                continue
            replica = Replica(name, int(info["id"]), model, str(info["url"]),
                              tier=info.get("tier"), phases=dict(info.get("phases") or {}),
                              api_key=keys[str(info["id"])], served_name=served_name(info),
                              started_via=info.get("started_via"))
            alive = [r for r in self.replicas.values() if r.model == model
                     and r.state in ("starting", "ready")]
            if fresh and len(alive) >= self.config.models[model].max_replicas:
                logger.warning("replica %s: %s has %d replicas already (max_replicas); "
                               "stopping it", key, model, len(alive))
                self.replicas[key] = replica
                asyncio.get_running_loop().create_task(self.stop_replica(replica))
                continue
            logger.info("adopted replica %s of %s", key, model)
            self.replicas[key] = replica

    async def _replica_keys(self, name: str) -> dict[str, str]:
        try:
            async with self.http.get(f"{self.nodes[name].url}/replica-keys",
                                     headers=self._headers(name),
                                     timeout=deadline(self.config.node_timeout_s)) as r:
                r.raise_for_status()
                keys = (await read_json(r)).get("keys")
        except (*UpstreamErrors, ValueError, AttributeError) as e:
            logger.warning("node %s: replica keys unavailable: %s", name, type(e).__name__)
            return {}
        return {str(k): v for k, v in keys.items() if isinstance(v, str)} \
            if isinstance(keys, dict) else {}

    def lose_node(self, name: str, reason: str) -> list[Replica]:
        """The node is lost (silent too long, or gone from discovery): no placements there,
        its replicas are forgotten, and the streams on them fail over now (`on_lost`). When
        it answers again it is re-admitted, and its replicas are adopted afresh."""
        self.failed.add(name)
        self.fresh.add(name)
        self.lost_at[name] = time.time()
        self.status[name] = None
        lost = [r for r in self.replicas.values() if r.node == name and r.state != "gone"]
        logger.warning("node %s lost: %s; %d replicas forgotten", name, reason, len(lost))
        for replica in lost:
            replica.state = "gone"
        if self.on_lost is not None and lost:
            self.on_lost(lost)
        self._drop_gone()
        return lost

    def _drop_gone(self) -> None:
        for key in [k for k, r in self.replicas.items() if r.state == "gone" and not r.in_flight]:
            del self.replicas[key]

    async def _poll_metrics(self, replica: Replica) -> None:
        from prometheus_client.parser import text_string_to_metric_families

        try:
            async with self.http.get(f"{replica.url}/metrics", headers=replica.headers,
                                     timeout=deadline(self.config.node_timeout_s)) as r:
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
                                   frozenset(m["name"] for m in t["models"]),
                                   {m["name"]: m["shape"] for m in t["models"]
                                    if isinstance(m.get("shape"), str) and m["shape"]})
                          for t in status["tiers"])
            replicas = tuple(r.view() for r in self.replicas.values() if r.node == name)
            usable = name not in self.draining and name not in self.failed
            views.append(NodeView(name, free if usable else 0, tiers,
                                  status["transfer_gbps"].get("fetch"), replicas,
                                  healthy=usable, standbys=standby_views(name, status)))
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

    async def start_replica(self, node: str, model: str, timeout: float,
                            standby: bool = True) -> Replica:
        """Start `model` on `node`; `standby`: the node may claim or swap into an idle standby
        engine (the answer's `started_via` says what it did), else it starts cold. A node that
        reports no `standby` in its status predates standby engines (and refuses fields it does
        not know): it is not told."""
        self.starting[node] = self.starting.get(node, 0) + 1
        body: dict = {"model": model, "wait": True, "timeout_s": timeout}
        if isinstance((self.status.get(node) or {}).get("standby"), dict):
            body["standby"] = standby
        try:
            await self.register(node, model)
            async with self.http.post(f"{self.nodes[node].url}/replicas",
                                      headers=self._headers(node),
                                      timeout=deadline(timeout + 30), json=body) as r:
                status, info = r.status, await read_json(r)
        except (*UpstreamErrors, ValueError) as e:
            raise NodeUnavailable(f"node {node}: {type(e).__name__}: {e}") from None
        finally:
            self.starting[node] -= 1
        if status >= 300 or not isinstance(info, dict) or info.get("state") != "ready":
            raise NodeUnavailable(f"node {node} could not start {model}: "
                                  f"{replica_failure(status, info)}")
        if info.get("model", model) != model:
            raise NodeUnavailable(f"node {node} was asked for {model} and answered with a "
                                  f"replica of another model")
        via = info.get("started_via")
        try:
            replica = Replica(node, int(info["id"]), model, str(info["url"]),
                              tier=info.get("tier"), phases=dict(info.get("phases") or {}),
                              api_key=info.get("api_key"), served_name=served_name(info),
                              started_via=via if via in ("cold", "swap", "standby") else None)
        except (KeyError, TypeError, ValueError):
            raise NodeUnavailable(f"node {node} started {model} but described it without an "
                                  "id and url") from None
        self.replicas[replica.key] = replica
        return replica

    async def stop_replica(self, replica: Replica, standby: bool = False) -> None:
        """Stop `replica`; `standby`: the node may keep its engine as an idle standby of its
        shape instead (its policy decides), which is no replica for the router either way."""
        replica.state = "stopping"
        try:
            if replica.node not in self.nodes:  # the node left: nothing to ask it
                raise aiohttp.ClientError(f"node {replica.node} is no longer known")
            url = f"{self.nodes[replica.node].url}/replicas/{replica.node_replica_id}"
            async with self.http.delete(url, headers=self._headers(replica.node),
                                        params={"standby": "true"} if standby else None,
                                        timeout=deadline(120)):
                pass
        except UpstreamErrors as e:
            logger.warning("stopping %s: %s", replica.key, e)
        replica.state = "gone"
        self._drop_gone()

    def replica_moved(self, replica: Replica) -> None:
        """`replica`'s guard says its engine holds another model now: it is no replica of its
        model any more (nothing is routed there), and its node is asked again at once."""
        if replica.state == "gone":
            return
        logger.warning("replica %s no longer holds %s (model_moved); dropped", replica.key,
                       replica.model)
        replica.state = "gone"
        self._drop_gone()
        if replica.node in self.nodes:
            task = asyncio.get_running_loop().create_task(self._poll_node(replica.node))
            self._background.add(task)
            task.add_done_callback(self._background.discard)


def standby_views(node: str, status: dict) -> tuple[StandbyView, ...]:
    """The node's idle standby engines from its status (`standby.engines`; none from a node
    that does not report them). Malformed entries are skipped, never trusted."""
    standby = status.get("standby")
    engines = standby.get("engines") if isinstance(standby, dict) else None
    views = []
    for engine in engines if isinstance(engines, list) else ():
        if not isinstance(engine, dict) or not isinstance(engine.get("model"), str):
            continue
        shape, devices = engine.get("shape"), engine.get("devices")
        views.append(StandbyView(f"{node}/{engine.get('id')}",
                                 shape if isinstance(shape, str) and shape else None,
                                 engine["model"],
                                 len(devices) if isinstance(devices, list) else 1))
    return tuple(views)
