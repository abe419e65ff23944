"""Placement, warm routing and the migration cost model: pure functions over plain data.

No I/O and no clock of its own, so the router and the simulator run the same decisions.

Placement (ServerlessLLM's estimator, with the bandwidths the node daemons measure):
    startup(node) = wait of the queue that must run first + bytes / bandwidth of the best
    tier holding the checkpoint (a remote fetch, then an SSD read, where no tier has it).
Among nodes with free devices, the lowest estimate wins. If a busy node would still be the
fastest once freed, freeing it is costed too: the running requests of a replica there are
migrated to other replicas of their model (re-prefill of their tokens, calibrated from observed
resumes) and, where their model has no other replica, a new one is loaded elsewhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

DEFAULT_FETCH_GBPS = 0.1  # until a node has measured a fetch: a pessimistic remote


@dataclass(frozen=True)
class TierView:
    name: str  # "dram" | "ssd"
    read_gbps: float | None
    queue_drain_s: float | None
    models: frozenset[str] = frozenset()


@dataclass(frozen=True)
class ReplicaView:
    id: str  # "<node>/<replica id>"
    node: str
    model: str
    ready: bool
    running: int = 0  # requests in flight (router's count or the replica's metrics)
    waiting: int = 0
    tokens_in_flight: int = 0  # prompt + generated tokens of its running requests

    @property
    def load(self) -> int:
        return self.running + self.waiting


@dataclass(frozen=True)
class NodeView:
    name: str
    free_devices: int
    tiers: tuple[TierView, ...]
    fetch_gbps: float | None = None
    replicas: tuple[ReplicaView, ...] = ()
    healthy: bool = True

    def tier(self, name: str) -> TierView | None:
        return next((t for t in self.tiers if t.name == name), None)


@dataclass(frozen=True)
class Estimate:
    node: str
    seconds: float
    tier: str  # where the load reads from ("remote" if no tier holds it)
    detail: str


@dataclass(frozen=True)
class Placement:
    node: str
    estimate: Estimate
    # Replicas to empty (their requests migrated) and stop before starting there.
    free_replicas: tuple[str, ...] = ()
    cost_s: float = 0.0  # estimate + migration/reload cost
    reason: str = ""


@dataclass
class MigrationModel:
    """Re-prefill cost per token, a moving average of observed resumes (seed: ServerlessLLM's
    0.01 s/token + 0.1 s)."""

    per_token_s: float = 0.01
    fixed_s: float = 0.1
    samples: int = 0
    alpha: float = 0.3

    def cost(self, tokens: int) -> float:
        return self.fixed_s + self.per_token_s * tokens

    def observe(self, tokens: int, seconds: float) -> None:
        if tokens <= 0 or seconds <= 0:
            return
        per = max(0.0, seconds - self.fixed_s) / tokens
        self.per_token_s = per if self.samples == 0 else (
            self.alpha * per + (1 - self.alpha) * self.per_token_s)
        self.samples += 1


def startup_estimate(node: NodeView, model: str, size_bytes: int) -> Estimate:
    """Seconds until `model` would be loaded on `node`, from its best tier (or remote)."""
    gb = size_bytes / 1e9
    for tier in node.tiers:  # fastest first, as the node reports them
        if model in tier.models and tier.read_gbps:
            wait = tier.queue_drain_s or 0.0
            return Estimate(node.name, wait + gb / tier.read_gbps, tier.name,
                            f"{tier.name}: wait {wait:.2f} s + {gb:.3f} GB / "
                            f"{tier.read_gbps:.2f} GB/s")
    ssd = node.tier("ssd")
    fetch = node.fetch_gbps or DEFAULT_FETCH_GBPS
    wait = (ssd.queue_drain_s or 0.0) if ssd else 0.0
    read = gb / ssd.read_gbps if ssd and ssd.read_gbps else 0.0
    return Estimate(node.name, wait + gb / fetch + read, "remote",
                    f"remote: wait {wait:.2f} s + {gb:.3f} GB / {fetch:.2f} GB/s fetch + "
                    f"{read:.2f} s read")


def place(model: str, size_bytes: int, nodes: Sequence[NodeView],
          migration: MigrationModel, sizes: dict[str, int] | None = None) -> Placement | None:
    """Where to start a replica of `model`; None if no node can take one now.

    `sizes` gives other models' checkpoint sizes (for reloading a displaced model elsewhere).
    """
    healthy = [n for n in nodes if n.healthy]
    free = [n for n in healthy if n.free_devices > 0]
    best: Placement | None = None
    for node in free:
        est = startup_estimate(node, model, size_bytes)
        if best is None or est.seconds < best.cost_s:
            best = Placement(node.name, est, cost_s=est.seconds,
                             reason=f"lowest estimated startup ({est.detail})")
    for node in healthy:
        if node.free_devices > 0:
            continue
        est = startup_estimate(node, model, size_bytes)
        if best is not None and est.seconds >= best.cost_s:
            continue  # even for free it would not beat a free node
        option = _freeing_option(node, model, nodes, migration, sizes or {})
        if option is None:
            continue
        victim, extra, why = option
        cost = est.seconds + extra
        if best is None or cost < best.cost_s:
            best = Placement(node.name, est, (victim,), cost,
                             f"freeing {victim} ({why}) then {est.detail}")
    return best


def _freeing_option(node: NodeView, model: str, nodes: Sequence[NodeView],
                    migration: MigrationModel, sizes: dict[str, int]
                    ) -> tuple[str, float, str] | None:
    """The cheapest replica on `node` to empty: (replica id, extra seconds, explanation)."""
    best: tuple[str, float, str] | None = None
    for victim in node.replicas:
        if victim.model == model or not victim.ready:
            continue
        targets = [r for n in nodes if n.healthy for r in n.replicas
                   if r.model == victim.model and r.ready and r.id != victim.id]
        cost = migration.cost(victim.tokens_in_flight) if victim.running else 0.0
        why = f"migrate {victim.running} request(s), {victim.tokens_in_flight} tokens"
        if not targets:
            if victim.running == 0:
                why = "idle"
            else:
                # Its requests need a new replica of their model somewhere else first.
                others = [n for n in nodes if n.healthy and n.free_devices > 0
                          and n.name != node.name]
                if not others:
                    continue
                reload = min(startup_estimate(n, victim.model, sizes.get(victim.model, 0))
                             .seconds for n in others)
                cost += reload
                why += f", reload {victim.model} elsewhere in {reload:.2f} s"
        if best is None or cost < best[1]:
            best = (victim.id, cost, why)
    return best


# -- warm routing ---------------------------------------------------------------------------

@dataclass
class RouteWeights:
    affinity: float = 1.0
    load: float = 0.25  # one queued request costs this much of a full prefix hit
    imbalance: int = 4  # beyond this gap in load, affinity is ignored (peers' override)


@dataclass(frozen=True)
class RouteChoice:
    replica: str
    reason: str
    scores: dict[str, float] = field(default_factory=dict)


def route(replicas: Sequence[ReplicaView], hit_fraction: dict[str, float],
          weights: RouteWeights | None = None) -> RouteChoice | None:
    """Pick a ready replica: prefix affinity (share of the prompt's leading blocks the replica
    has recently seen) against load, unless the loads are too far apart."""
    weights = weights or RouteWeights()
    ready = [r for r in replicas if r.ready]
    if not ready:
        return None
    least = min(ready, key=lambda r: (r.load, r.id))
    most = max(r.load for r in ready)
    if most - least.load > weights.imbalance:
        return RouteChoice(least.id, f"imbalance override (loads {least.load}..{most})")
    scores = {r.id: weights.affinity * hit_fraction.get(r.id, 0.0) - weights.load * r.load
              for r in ready}
    choice = max(ready, key=lambda r: (scores[r.id], -r.load, r.id))
    hit = hit_fraction.get(choice.id, 0.0)
    return RouteChoice(choice.id, f"prefix hit {hit:.2f}, load {choice.load}", scores)
