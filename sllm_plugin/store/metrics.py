"""The node daemon's Prometheus metrics (`GET /metrics`), in a registry of the node's own.

Two kinds, so that nothing is counted twice:

* State (gauges) is read from the node at each scrape by `_StateCollector`: what the tiers
  hold, the job queues, the replicas, the bandwidths. It is what `/status` shows, read the
  same way (under the tiers' and queues' own locks, each briefly), never kept a second time.
* Events (counters, the histogram) are counted where they happen, through the hooks the node
  wires: `lookup` (a request looked for a model in a tier), `evicted` (a tier's `on_evict`),
  `job_finished` (a queue's `on_finish`), `replica_settled` (a replica start has settled).

Labels come from fixed vocabularies only (tier, job kind and outcome, replica state, phase,
eviction reason): no model names, no sources, no flags, nothing an unauthenticated reader
should not see, and a number of series that does not grow with what is served.

Cache hits and misses, precisely: a *lookup* is one request for a model in a tier, counted
once per request, whether or not its transfer then succeeds:

* `POST /prefetch` (or `/promote`) into tier T: a hit in T if T held the model when the
  request came, else a miss in T; a prefetch into dram of a model the ssd tier lacks also
  counts a miss in ssd (it is fetched there first).
* A replica start: a miss in each tier it had to fill first (fetched into ssd, promoted into
  dram); if it had to fill none, a hit in the tier it loads from.

A second request for a model whose transfer is still under way is a miss too (it waits for
the same job). Evictions count each copy a tier removed, with its bytes, by reason: `request`
(`POST /evict`) or `capacity` (least recently used copies removed to make room).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric

if TYPE_CHECKING:
    from .jobs import Job
    from .node import Node
    from .replicas import Replica

#: Replica states (replicas.Replica.state), all exported, zeros included.
REPLICA_STATES = ("queued", "fetching", "starting", "ready", "failed", "stopping", "stopped",
                  "exited", "standby", "swapping")
#: The states of a replica whose start has not settled yet.
STARTING_STATES = ("queued", "fetching", "starting")
#: Start-up phases a replica reports (Replica.phases): waiting in the tiers' queues, fetching
#: and promoting its checkpoint, its process until the loader began, the load, the engine's
#: set-up after the load until /health answered, and creation to ready.
#: A start on a standby engine has `swap` (the control calls around its load, or the claim of
#: a standby that still held the model) instead of process_start and engine_init.
PHASES = ("queue", "fetch", "process_start", "load", "engine_init", "swap", "total")
#: How a standby engine was used: claimed (it held the model), swapped, or a swap refused
#: before the model was touched / failed (both stop the engine).
SWAP_OUTCOMES = ("claim", "swap", "refused", "failed")
JOB_KINDS = ("fetch", "promote")
EVICTION_REASONS = ("request", "capacity")
#: 10 ms to 30 min: a start from a warm dram tier up to a fetch of a large model.
PHASE_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600,
                 1200, 1800)


class NodeMetrics:
    """The node's registry: event counters and histograms, plus a collector of its state."""

    def __init__(self, node: Node) -> None:
        self.node = node
        r = self.registry = CollectorRegistry()
        tiers = list(node.tiers)
        self.hits = Counter("sllm_node_cache_hits", "Requests (prefetch, replica start) that "
                            "found the model in the tier", ["tier"], registry=r)
        self.misses = Counter("sllm_node_cache_misses", "Requests (prefetch, replica start) "
                              "that had to fetch or promote the model into the tier", ["tier"],
                              registry=r)
        self.evictions = Counter("sllm_node_evictions", "Copies removed from the tier",
                                 ["tier", "reason"], registry=r)
        self.evicted_bytes = Counter("sllm_node_evicted_bytes", "Bytes of the copies removed "
                                     "from the tier", ["tier", "reason"], registry=r)
        self.jobs = Counter("sllm_node_jobs", "Transfer jobs finished, by kind and outcome",
                            ["kind", "outcome"], registry=r)
        self.transferred = Counter("sllm_node_transferred_bytes", "Bytes written by transfer "
                                   "jobs that succeeded (fetch: into ssd; promote: into dram)",
                                   ["kind"], registry=r)
        self.phases = Histogram("sllm_node_replica_phase_seconds", "Replica start-up phases, "
                                "observed once each when the start settles", ["phase"],
                                buckets=PHASE_BUCKETS, registry=r)
        self.swaps = Counter("sllm_node_standby_uses", "Starts on a standby engine, by "
                             "outcome", ["outcome"], registry=r)
        for outcome in SWAP_OUTCOMES:
            self.swaps.labels(outcome)
        for tier in tiers:  # every series from the start, at zero
            self.hits.labels(tier)
            self.misses.labels(tier)
            for reason in EVICTION_REASONS:
                self.evictions.labels(tier, reason)
                self.evicted_bytes.labels(tier, reason)
        for kind in JOB_KINDS:
            self.transferred.labels(kind)
            for outcome in ("done", "failed"):
                self.jobs.labels(kind, outcome)
        for phase in PHASES:
            self.phases.labels(phase)
        self._settled: set[int] = set()  # replicas whose phases were observed
        self._lock = threading.Lock()
        r.register(_StateCollector(node))

    # -- events -------------------------------------------------------------------------

    def lookup(self, tier: str, hit: bool) -> None:
        (self.hits if hit else self.misses).labels(tier).inc()

    def evicted(self, tier: str, nbytes: int, reason: str) -> None:
        self.evictions.labels(tier, reason).inc()
        self.evicted_bytes.labels(tier, reason).inc(nbytes)

    def job_finished(self, job: Job) -> None:
        self.jobs.labels(job.kind, job.state).inc()
        if job.state == "done":
            self.transferred.labels(job.kind).inc(job.nbytes)

    def swapped(self, outcome: str) -> None:
        self.swaps.labels(outcome).inc()

    def replica_settled(self, replica: Replica) -> None:
        """Observe the phases of a replica whose start has settled (ready, failed, stopped):
        once per start (a standby engine starts again with each claim), whoever calls first."""
        with self._lock:
            if (replica.id, replica.created) in self._settled:
                return
            self._settled.add((replica.id, replica.created))
        for phase, seconds in dict(replica.phases).items():
            self.phases.labels(phase).observe(seconds)

    # -- exposition ---------------------------------------------------------------------

    def exposition(self) -> bytes:
        """The text format (a few ms for a node; the API runs it on its reader threads).

        Replicas whose start has settled are observed first if their start-up thread has not
        yet done it: a scrape right after a start settled shows its phases."""
        for replica in list(self.node.replicas.values()):
            if replica.ready.is_set():
                self.replica_settled(replica)
        return generate_latest(self.registry)


class _StateCollector:
    """Gauges read from the node at each scrape."""

    def __init__(self, node: Node) -> None:
        self.node = node

    def describe(self) -> Iterable[Metric]:
        return []  # names are not checked for clashes: the registry is the node's alone

    def collect(self) -> Iterable[Metric]:
        node = self.node
        tier_gauges = {
            "capacity": GaugeMetricFamily("sllm_node_tier_capacity_bytes",
                                          "The tier's capacity", labels=["tier"]),
            "used": GaugeMetricFamily("sllm_node_tier_used_bytes", "Bytes the tier's copies "
                                      "hold, and room reserved for writes under way (as "
                                      "/status used_bytes)", labels=["tier"]),
            "models": GaugeMetricFamily("sllm_node_tier_models", "Models the tier holds",
                                        labels=["tier"]),
            "pinned": GaugeMetricFamily("sllm_node_tier_pinned_models", "Models pinned in "
                                        "the tier (never evicted to make room)",
                                        labels=["tier"]),
            "in_use": GaugeMetricFamily("sllm_node_tier_in_use_models", "Models the tier "
                                        "holds that replicas are loading from",
                                        labels=["tier"]),
        }
        read_gbps = GaugeMetricFamily("sllm_node_tier_read_gbps", "The tier's read bandwidth "
                                      "(GB/s) placement plans with: observed loads, else the "
                                      "start-up calibration (as /status read_gbps)",
                                      labels=["tier"])
        jobs = GaugeMetricFamily("sllm_node_jobs_active", "Transfer jobs queued or running",
                                 labels=["kind", "state"])
        active = {(kind, state): 0 for kind in JOB_KINDS for state in ("queued", "running")}
        for name, tier in node.tiers.items():
            entries = tier.entries()
            tier_gauges["capacity"].add_metric([name], tier.capacity)
            tier_gauges["used"].add_metric([name], tier.used())
            tier_gauges["models"].add_metric([name], len(entries))
            tier_gauges["pinned"].add_metric([name], sum(e.pinned for e in entries))
            tier_gauges["in_use"].add_metric([name], sum(e.in_use > 0 for e in entries))
            gbps = tier.bandwidth.report().gbps
            if gbps is not None:
                read_gbps.add_metric([name], gbps)
            for job in node.queues[name].active():
                if (job.kind, job.state) in active:  # not one just finishing
                    active[job.kind, job.state] += 1
        for (kind, state), count in active.items():
            jobs.add_metric([kind, state], count)
        yield from tier_gauges.values()
        yield read_gbps
        yield jobs

        transfer = GaugeMetricFamily("sllm_node_transfer_gbps", "Measured transfer bandwidth "
                                     "(GB/s) by kind (as /status transfer_gbps); absent until "
                                     "known", labels=["kind"])
        for kind, bandwidth in sorted(node.transfers.items()):
            gbps = bandwidth.report().gbps
            if gbps is not None:
                transfer.add_metric([kind], gbps)
        yield transfer

        replicas = list(node.replicas.values())
        states = dict.fromkeys(REPLICA_STATES, 0)
        for replica in replicas:
            states[replica.state] = states.get(replica.state, 0) + 1
        by_state = GaugeMetricFamily("sllm_node_replicas", "Replicas by state",
                                     labels=["state"])
        for state, count in states.items():
            by_state.add_metric([state], count)
        yield by_state
        yield GaugeMetricFamily("sllm_node_replicas_starting", "Replicas whose start has not "
                                "settled (queued, fetching or starting)",
                                value=sum(states[s] for s in STARTING_STATES))

        assigned = set(node.assigned)
        devices = GaugeMetricFamily("sllm_node_devices", "Devices, free or assigned to a "
                                    "replica", labels=["state"])
        devices.add_metric(["assigned"], sum(d.name in assigned for d in node.devices))
        devices.add_metric(["free"], sum(d.name not in assigned for d in node.devices))
        yield devices
        standby = node.standby_status()
        yield GaugeMetricFamily("sllm_node_standby_memory_bytes", "Host memory the standby "
                                "engines hold (proportional set size)",
                                value=standby["memory_bytes"])
