"""The records the simulator's parts pass to each other: a trace's requests, the models they
are mapped onto, and what a simulated run reports per request and per policy."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class TraceRequest:
    """One request of a trace, before it is given a model."""

    arrival_s: float  # seconds since the trace's first request
    input_tokens: int
    output_tokens: int
    # Chained prefix-block ids (Mooncake's `hash_ids`, 512 tokens each); empty when unknown.
    blocks: tuple[int, ...] = ()


@dataclass(frozen=True)
class SimModel:
    name: str
    size_bytes: int  # checkpoint bytes (what a start loads)


@dataclass(frozen=True)
class SimRequest:
    id: int
    arrival_s: float
    model: str
    input_tokens: int
    output_tokens: int
    blocks: tuple[int, ...] = ()


@dataclass(frozen=True)
class RequestRecord:
    """What happened to one request in one simulated run."""

    id: int
    model: str
    arrival_s: float
    ttft_s: float | None  # arrival to first token; None if rejected
    startup_s: float  # of ttft, the wait for a replica to become ready (0 when one was ready)
    waited_for_start: bool  # it arrived when no ready replica of its model could take it
    server: str | None
    via: str  # "warm" | "cold" | "swap" | "standby" | "rejected"
    tier: str | None  # where the start it waited for read the weights: dram|ssd|remote|standby
    migrated: int = 0  # times its running generation was moved to another replica
    finish_s: float | None = None  # when its last token was produced


@dataclass
class PolicyResult:
    policy: str
    records: list[RequestRecord]
    device_seconds: float  # devices held by replicas (starting, ready, standby), summed
    starts: dict[str, int] = field(default_factory=dict)  # via -> count (cold/swap/standby)
    loads_by_tier: dict[str, int] = field(default_factory=dict)  # dram/ssd/remote -> starts
    migrations: int = 0
    duration_s: float = 0.0  # simulated time from the first arrival to the last finish
    wall_s: float = 0.0  # how long the simulation itself took
    notes: list[str] = field(default_factory=list)  # what the policy assumed, stated
    # Placement decisions with the views they were made on (only when the engine is asked to
    # record them, for the policy-equivalence test): sllm_plugin.sim.engine.Decision.
    decisions: list = field(default_factory=list)
