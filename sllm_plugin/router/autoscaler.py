"""Replicas on demand: scale from zero, scale up under load, stop idle ones, free nodes.

A request for a model with no ready replica waits (in a bounded queue, with a timeout) for the
one start in flight for that model; a start asks the placement policy for a node and, when the
policy says freeing a busy node is faster, migrates the streams off the chosen victim first.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable

from .cluster import Cluster, NodeUnavailable, Replica
from .config import RouterConfig
from .metrics import RouterMetrics
from .policy import (
    MigrationModel,
    Placement,
    ReplicaUse,
    StartupCosts,
    at_replica_limit,
    keep_alive_stops,
    place,
    queue_full,
    route,
    should_scale_up,
)
from .prefix import PrefixIndex
from .streams import StreamRunner

logger = logging.getLogger("sllm_plugin.router")


class RouterError(Exception):
    """A request cannot be served now; `status` and `kind` follow OpenAI's error shapes."""

    def __init__(self, message: str, status: int, kind: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.kind, self.param = status, kind, param


class Autoscaler:
    def __init__(self, config: RouterConfig, cluster: Cluster, metrics: RouterMetrics,
                 migration: MigrationModel, prefix: PrefixIndex) -> None:
        self.config, self.cluster, self.metrics = config, cluster, metrics
        self.migration, self.prefix = migration, prefix
        self.runner: StreamRunner | None = None  # set by the app (the runner needs `pick`)
        self.waiting: dict[str, int] = {}
        self.starts: dict[str, asyncio.Task] = {}
        self.decisions: list[dict] = []  # recent placement decisions, for the admin API
        # Start overheads (process start, engine init, swap, claim), learned from the phases
        # the nodes report for the replicas this router starts.
        self.costs = StartupCosts()

    # -- choosing a replica -------------------------------------------------------------

    async def pick(self, model: str, blocks: list[bytes] | None = None,
                   exclude: Iterable[str] = (), waits: list[float] | None = None) -> Replica:
        """A ready replica of `model` for a request, waiting for a start if none is; each
        wait's seconds are appended to `waits` (none: a replica was ready)."""
        excluded = set(exclude)
        deadline = time.monotonic() + self.config.limits.start_timeout_s
        while True:
            ready = [r for r in self.cluster.ready_replicas(model) if r.key not in excluded]
            if ready:
                self._maybe_scale_up(model, ready)
                hits = {r.key: self.prefix.hit_fraction(r.key, blocks or []) for r in ready}
                choice = route([r.view() for r in ready], hits)
                assert choice is not None
                replica = next(r for r in ready if r.key == choice.replica)
                logger.debug("route %s -> %s: %s; scores %s; loads %s", model, replica.key,
                             choice.reason, choice.scores,
                             {r.key: (r.in_flight, r.reported_running, r.reported_waiting)
                              for r in ready})
                if blocks:
                    self.prefix.record(replica.key, blocks)
                return replica
            began = time.monotonic()
            await self._wait_for_start(model, deadline)
            if waits is not None:
                waits.append(time.monotonic() - began)

    async def _wait_for_start(self, model: str, deadline: float) -> None:
        spec = self.config.models.get(model)
        limit = self.config.limits.max_queue if spec is None or spec.max_queue is None \
            else spec.max_queue
        if queue_full(self.waiting.get(model, 0), limit):
            raise RouterError(f"too many requests waiting for a replica of {model!r} "
                              f"(queue of {limit} is full)", 429, "rate_limit_exceeded")
        self.waiting[model] = self.waiting.get(model, 0) + 1
        self.metrics.queue_depth.labels(model).set(self.waiting[model])
        try:
            task = self.start(model)
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            await asyncio.wait_for(asyncio.shield(task), left)
        except TimeoutError:
            raise RouterError(f"no replica of {model!r} became ready within "
                              f"{self.config.limits.start_timeout_s:.0f} s", 503,
                              "service_unavailable") from None
        except (NodeUnavailable, RouterError) as e:
            raise RouterError(f"cannot start a replica of {model!r}: {e}", 503,
                              "service_unavailable") from None
        except Exception as e:  # every waiter gets the reason, not a 500
            logger.exception("starting a replica of %s failed", model)
            raise RouterError(f"cannot start a replica of {model!r}: {type(e).__name__}: {e}",
                              503, "service_unavailable") from None
        finally:
            self.waiting[model] -= 1
            self.metrics.queue_depth.labels(model).set(self.waiting[model])

    def start(self, model: str) -> asyncio.Task:
        """The start in flight for `model`, or a new one."""
        task = self.starts.get(model)
        if task is None or task.done():
            task = asyncio.create_task(self._start(model))
            self.starts[model] = task
            task.add_done_callback(lambda t: t.cancelled() or t.exception())
        return task

    def _maybe_scale_up(self, model: str, ready: list[Replica]) -> None:
        spec = self.config.models.get(model)
        if spec is None:
            return
        starting = model in self.starts and not self.starts[model].done()
        if should_scale_up([r.view().load for r in ready], spec.target_load, starting,
                           spec.max_replicas):
            logger.info("scaling %s up: %d replica(s) at load >= %d", model, len(ready),
                        spec.target_load)
            self.start(model)

    async def _start(self, model: str) -> Replica:
        spec = self.config.models.get(model)
        count = len([r for r in self.cluster.replicas.values() if r.model == model
                     and r.state in ("ready", "starting")])
        if at_replica_limit(count, None if spec is None else spec.max_replicas):
            assert spec is not None
            raise RouterError(f"{model!r} is at its limit of {spec.max_replicas} replica(s)",
                              503, "service_unavailable")
        placement = self._place(model)
        if placement is None or placement.via != "standby":
            # A load is worth fresh tiers and queues; a claim of a standby holding the model
            # is not (no load, and the node swaps or starts cold itself if it has gone since).
            await self.cluster.poll_once()
            placement = self._place(model)
        if placement is None:
            raise RouterError(f"no node has a free device for {model!r}", 503,
                              "service_unavailable")
        decision = {"model": model, "node": placement.node, "via": placement.via,
                    "estimate_s": placement.estimate.seconds,
                    "cost_s": placement.cost_s, "reason": placement.reason,
                    "freed": list(placement.free_replicas),
                    "options": [o.describe() for o in placement.options],
                    "overheads": self.costs.describe()}
        self.decisions.append(decision)
        del self.decisions[:-50]
        logger.info("placing %s on %s (%s): %s; weighed: %s", model, placement.node,
                    placement.via, placement.reason,
                    "; ".join(f"{o.node} {o.via} {o.seconds:.3f} s" for o in placement.options))
        for key in placement.free_replicas:
            victim = self.cluster.replicas.get(key)
            if victim is not None:
                await self.free(victim)
        # A cold start asks for one (a standby of the model's shape would otherwise be used).
        replica = await self.cluster.start_replica(placement.node, model,
                                                   self.config.limits.start_timeout_s,
                                                   standby=placement.via != "cold")
        # What the node did (it may differ from the plan: a standby claimed meanwhile).
        via = replica.started_via or "cold"
        decision["started_via"] = via
        planned = next((o for o in placement.options
                        if o.node == placement.node and o.via == via), None)
        self.costs.observe(via, replica.phases, planned.load_s if planned else None)
        self.metrics.starts.labels(model, via).inc()
        self.metrics.cold_starts.labels(model, placement.node, replica.tier or "?").inc()
        for phase, seconds in replica.phases.items():
            if isinstance(seconds, (int, float)):
                self.metrics.cold_start_phase.labels(model, phase).observe(seconds)
        return replica

    def _place(self, model: str) -> Placement | None:
        return place(model, self.cluster.model_size(model), self.cluster.views(),
                     self.migration, self.cluster.sizes(), self.costs)

    # -- freeing replicas and nodes ---------------------------------------------------------

    async def free(self, victim: Replica, reason: str = "placement") -> list[dict]:
        """Move every stream off `victim` (to other replicas of its model), then stop it.
        Returns each stream's outcome: the move, or why it stayed."""
        victim.state = "draining"
        runner = self.runner
        assert runner is not None
        streams = [s for s in runner.active.values() if s.replica is victim]
        moves, outcomes = [], []
        for stream in streams:
            dest = await self.pick(stream.model, exclude={victim.key})
            moves.append(runner.migrate(stream, dest))
        for stream, outcome in zip(streams, await asyncio.gather(*moves, return_exceptions=True),
                                   strict=True):
            # A stream that could not move runs to its end here; the wait below covers it.
            if isinstance(outcome, BaseException):
                logger.warning("freeing %s (%s): stream %s stays: %r", victim.key, reason,
                               stream.id, outcome)
                outcome = {"stream": stream.id, "state": f"stays: {outcome!r}"}
            else:
                logger.info("freeing %s (%s): stream %s: %s", victim.key, reason, stream.id,
                            outcome["state"])
            outcomes.append(outcome)
        deadline = time.monotonic() + self.config.limits.upstream_timeout_s
        while victim.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.01)  # the switches happen at each stream's next chunk
        await self.cluster.stop_replica(victim)
        return outcomes

    async def drain(self, node: str) -> dict:
        """Take `node` out of placement, move its streams off and stop its replicas."""
        self.cluster.draining.add(node)
        victims = [r for r in self.cluster.replicas.values() if r.node == node
                   and r.state in ("ready", "draining")]
        outcomes = await asyncio.gather(*(self.free(v, "drain") for v in victims))
        return {"node": node, "stopped": [v.key for v in victims],
                "streams": [o for per_victim in outcomes for o in per_victim]}

    async def keep_alive_forever(self) -> None:
        while True:
            try:
                await self.keep_alive_once()
            except Exception:
                logger.exception("keep-alive pass failed")
            await asyncio.sleep(self.config.poll_interval_s)

    async def keep_alive_once(self) -> None:
        now = time.monotonic()
        for model, spec in self.config.models.items():
            mine = [r for r in self.cluster.replicas.values() if r.model == model]
            ready = [r for r in mine if r.ready]
            stops = keep_alive_stops([ReplicaUse(r.key, r.in_flight, r.last_used)
                                      for r in ready], now, spec.keep_alive_s,
                                     spec.min_replicas)
            by_key = {r.key: r for r in ready}
            for replica in (by_key[key] for key in stops):
                logger.info("stopping %s: idle for %.0f s (keep-alive %.0f s)", replica.key,
                            now - replica.last_used, spec.keep_alive_s)
                # The node may keep its engine as a standby (its standby policy decides).
                await self.cluster.stop_replica(replica, standby=True)
            if len(ready) < spec.min_replicas and not self.waiting.get(model):
                self.start(model)
            mine = [r for r in self.cluster.replicas.values() if r.model == model]
            for state in ("ready", "draining", "stopping"):
                self.metrics.replicas.labels(model, state).set(
                    sum(1 for r in mine if r.state == state))
            self.metrics.replicas.labels(model, "starting").set(
                int(model in self.starts and not self.starts[model].done()))
