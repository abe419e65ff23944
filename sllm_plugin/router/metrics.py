"""The router's Prometheus metrics (prometheus_client), in a registry of their own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class RouterMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("sllm_router_requests", "Requests by model and HTTP status",
                                ["model", "status"], registry=r)
        self.ttft = Histogram("sllm_router_time_to_first_token_seconds",
                              "Request arrival to first token", ["model"],
                              buckets=LATENCY_BUCKETS, registry=r)
        self.latency = Histogram("sllm_router_request_seconds", "Request arrival to last byte",
                                 ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.cold_starts = Counter("sllm_router_cold_starts", "Replicas started by the router",
                                   ["model", "node", "tier"], registry=r)
        self.starts = Counter("sllm_router_starts", "Replicas started by the router, by how "
                              "the node started them (cold | swap | standby)",
                              ["model", "via"], registry=r)
        self.cold_start_phase = Histogram("sllm_router_cold_start_phase_seconds",
                                          "Cold start phases as the node daemon reports them",
                                          ["model", "phase"], buckets=LATENCY_BUCKETS,
                                          registry=r)
        self.migrations = Counter("sllm_router_migrations", "Streams moved between replicas",
                                  ["model", "reason"], registry=r)
        self.migration_pause = Histogram("sllm_router_migration_pause_seconds",
                                         "Gap in the client's stream during a move",
                                         ["model", "reason"], buckets=LATENCY_BUCKETS,
                                         registry=r)
        self.queue_depth = Gauge("sllm_router_queue_depth", "Requests waiting for a replica",
                                 ["model"], registry=r)
        self.replicas = Gauge("sllm_router_replicas", "Replicas by state", ["model", "state"],
                              registry=r)
