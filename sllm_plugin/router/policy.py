"""Placement, warm routing and the migration cost model: pure functions over plain data.

No I/O and no clock of its own, so the router and the simulator run the same decisions.

Placement weighs three ways to get a ready replica on each node (issue 12) and takes the
cheapest over all nodes:
- `standby`: an idle standby engine there still holds the model's weights: it serves after a
  claim (the learned claim overhead).
- `swap`: an idle standby engine of the model's shape (the engine-shape key the node reports
  for the checkpoint in its tiers; no key, no swap: other shapes would give wrong tokens) is
  given the weights: load (below) + the learned swap overhead (pause, rpc, cache reset, resume).
- `cold`: a new engine on a free device (or one a standby of another shape gives way for, at
  `STANDBY_STOP_S`): load + the learned process start + engine init.
The load is ServerlessLLM's estimator, with the bandwidths the node daemons measure: wait of
the queue that must run first + bytes / bandwidth of the best tier holding the checkpoint (a
remote fetch, then an SSD read, where no tier has it). The overheads are moving averages of the
phases the nodes report for the replicas this router starts (`StartupCosts`), seeded with the
defaults below until observed. If a busy node would still be the fastest once freed, freeing
it is costed too: the running requests of a replica there are migrated to other replicas of
their model (re-prefill of their tokens, calibrated from observed resumes) and, where their
model has no other replica, a new one is loaded elsewhere.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

DEFAULT_FETCH_GBPS = 0.1  # until a node has measured a fetch: a pessimistic remote

# Seeds of the learned start overheads, until the nodes have reported the phase: a cold start of
# the demo model on the reference VM (issue 12: process_start 16.1 s, engine_init 2.1 s), and a
# swap's control calls on CPU (docs/FAST_START.md: 0.1-0.45 s beside the load).
DEFAULT_PROCESS_START_S = 16.0
DEFAULT_ENGINE_INIT_S = 2.0
DEFAULT_SWAP_S = 0.4
DEFAULT_CLAIM_S = 0.05  # a standby that holds the model: no load, a state change on the node
# A standby of another shape gives way for a cold start (stopping its process): a constant, as
# the nodes do not report it.
STANDBY_STOP_S = 1.0
# Reported phases beyond this are not believed (a clock jump, a hostile node).
MAX_PHASE_S = 3600.0


@dataclass(frozen=True)
class TierView:
    name: str  # "dram" | "ssd"
    read_gbps: float | None
    queue_drain_s: float | None
    models: frozenset[str] = frozenset()
    # model -> its engine-shape key on this node (models with no key known are absent)
    shapes: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class StandbyView:
    """An idle engine the node keeps: never a replica; a start may claim or swap into it."""

    id: str  # "<node>/<replica id>"
    shape: str | None
    model: str  # whose weights it holds now
    devices: int = 1


@dataclass(frozen=True)
class ReplicaView:
    id: str  # "<node>/<replica id>"
    node: str
    model: str
    ready: bool
    running: int = 0  # requests in flight (router's count or the replica's metrics)
    waiting: int = 0
    tokens_in_flight: int = 0  # prompt + generated tokens of its running requests
    devices: int = 1  # devices it holds (freeing it gives them back)

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
    standbys: tuple[StandbyView, ...] = ()

    def tier(self, name: str) -> TierView | None:
        return next((t for t in self.tiers if t.name == name), None)

    def shape_of(self, model: str) -> str | None:
        """The engine-shape key this node reports for `model`'s checkpoint, if any."""
        return next((t.shapes[model] for t in self.tiers if t.shapes.get(model)), None)


@dataclass(frozen=True)
class Estimate:
    node: str
    seconds: float
    tier: str  # where the load reads from ("remote" if no tier holds it)
    detail: str


@dataclass(frozen=True)
class Option:
    """One way to start the model on one node, with its estimate (seconds to ready)."""

    node: str
    via: str  # "cold" | "swap" | "standby"
    seconds: float
    detail: str
    tier: str = "remote"  # where its load reads from ("standby": no load)
    load_s: float = 0.0  # of `seconds`, the weights' read at the tier's bandwidth

    def describe(self) -> dict:
        return {"node": self.node, "via": self.via, "seconds": round(self.seconds, 4),
                "detail": self.detail}


@dataclass(frozen=True)
class Placement:
    node: str
    estimate: Estimate
    # Replicas to empty (their requests migrated) and stop before starting there.
    free_replicas: tuple[str, ...] = ()
    cost_s: float = 0.0  # estimate + migration/reload cost
    reason: str = ""
    via: str = "cold"  # "cold" | "swap" | "standby"
    options: tuple[Option, ...] = ()  # every estimate weighed, cheapest first


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and \
        math.isfinite(value)


class Learned:
    """A moving average of a reported phase, seeded with a stated default until observed."""

    def __init__(self, seed: float, alpha: float = 0.3) -> None:
        self.value, self.seed, self.alpha, self.samples = seed, seed, alpha, 0

    def observe(self, seconds: object) -> None:
        if (not isinstance(seconds, (int, float)) or isinstance(seconds, bool)
                or not math.isfinite(seconds) or not 0 <= seconds <= MAX_PHASE_S):
            return  # missing or not believable: the estimate stays as it was
        self.value = float(seconds) if self.samples == 0 else (
            self.alpha * seconds + (1 - self.alpha) * self.value)
        self.samples += 1

    def describe(self, name: str) -> str:
        how = (f"learned from {self.samples} start(s)" if self.samples
               else "default, not yet observed")
        return f"{name} {self.value:.2f} s ({how})"


class StartupCosts:
    """What a start costs beyond reading the weights, learned from the phases the nodes report
    for the replicas this router starts (`observe`), seeded with the defaults above."""

    def __init__(self, process_start_s: float = DEFAULT_PROCESS_START_S,
                 engine_init_s: float = DEFAULT_ENGINE_INIT_S, swap_s: float = DEFAULT_SWAP_S,
                 claim_s: float = DEFAULT_CLAIM_S, stop_s: float = STANDBY_STOP_S) -> None:
        self.process_start = Learned(process_start_s)
        self.engine_init = Learned(engine_init_s)
        self.swap = Learned(swap_s)
        self.claim = Learned(claim_s)
        self.stop_s = stop_s

    @classmethod
    def weights_only(cls) -> StartupCosts:
        """No overheads: the estimate counts reading the weights alone (placement before
        engine costs were weighed; what `place` uses when given no costs)."""
        return cls(0.0, 0.0, 0.0, 0.0, 0.0)

    def observe(self, via: str, phases: Mapping[str, object],
                expected_load_s: float | None = None) -> None:
        """Learn from one start's `phases` (as the node reports them); `via` is what the node
        says it did ("cold" | "swap" | "standby"). For a swap, `expected_load_s` is what the
        estimate counted for reading the weights: a load that took longer (on CPU, vLLM's
        reload repacks every linear weight, about two thirds of a 2 GB swap) is overhead too,
        so the next estimate of a swap is what swaps really cost."""
        if via == "cold":
            self.process_start.observe(phases.get("process_start"))
            self.engine_init.observe(phases.get("engine_init"))
        elif via == "swap":
            swap, load = phases.get("swap"), phases.get("load")
            if expected_load_s is not None and _number(swap) and _number(load):
                swap = swap + max(0.0, load - expected_load_s)
            self.swap.observe(swap)
        elif via == "standby":
            self.claim.observe(phases.get("total"))

    def describe(self) -> dict:
        return {name: {"seconds": part.value, "samples": part.samples}
                for name, part in (("process_start", self.process_start),
                                   ("engine_init", self.engine_init), ("swap", self.swap),
                                   ("claim", self.claim))} | {"standby_stop": {
                                       "seconds": self.stop_s, "samples": 0}}


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


def start_options(node: NodeView, model: str, size_bytes: int,
                  costs: StartupCosts, devices: int = 1) -> list[Option]:
    """Each way to start `model` on `node` without freeing a replica: claim a standby that
    holds it, swap into a standby of its shape, or start cold on `devices` free devices (or on
    devices that standbys of another shape give way for). Standby first, so a tie goes to the
    cheaper kind. A replica needing several devices (a large model, tensor-parallel) qualifies
    for a cold start only where that many are free or can be freed."""
    if not node.healthy:
        return []
    options = []
    load = startup_estimate(node, model, size_bytes)
    holding = next((s for s in node.standbys if s.model == model), None)
    if holding is not None:
        options.append(Option(node.name, "standby", costs.claim.value,
                              f"standby {holding.id} holds {model}: "
                              f"{costs.claim.describe('claim')}", "standby"))
    shape = node.shape_of(model)
    same = [s for s in node.standbys if shape is not None and s.shape == shape
            and s.model != model]
    if same:
        options.append(Option(node.name, "swap", load.seconds + costs.swap.value,
                              f"swap into standby {same[0].id} of shape {shape[:12]}: "
                              f"{load.detail} + {costs.swap.describe('swap')}", load.tier,
                              load.seconds))
    cold = load.seconds + costs.process_start.value + costs.engine_init.value
    detail = (f"cold: {load.detail} + {costs.process_start.describe('process_start')} + "
              f"{costs.engine_init.describe('engine_init')}")
    # Standbys of other shapes give way for a cold start (the node stops them); those of the
    # model's own shape do not (the router asks for a cold start with `standby: false`).
    # Every engine holds at least one device, whatever the node reports.
    giving_way = [s for s in node.standbys if shape is None or s.shape != shape]
    if node.free_devices >= devices:
        options.append(Option(node.name, "cold", cold, detail, load.tier))
    elif giving_way and node.free_devices + sum(max(1, s.devices)
                                                for s in giving_way) >= devices:
        options.append(Option(node.name, "cold", cold + costs.stop_s,
                              f"{detail} + standby {giving_way[0].id} gives way "
                              f"{costs.stop_s:.2f} s (constant)", load.tier))
    return options


def place(model: str, size_bytes: int, nodes: Sequence[NodeView],
          migration: MigrationModel, sizes: dict[str, int] | None = None,
          costs: StartupCosts | None = None, devices: int = 1) -> Placement | None:
    """Where and how to start a replica of `model`; None if no node can take one now.

    `sizes` gives other models' checkpoint sizes (for reloading a displaced model elsewhere);
    `costs` the start overheads (None: weights only, `StartupCosts.weights_only`); `devices`
    how many devices a replica of `model` needs (freeing a replica helps only where its devices
    and the free ones add up to that).
    """
    costs = costs or StartupCosts.weights_only()
    healthy = [n for n in nodes if n.healthy]
    options = [o for n in healthy for o in start_options(n, model, size_bytes, costs, devices)]
    best: Placement | None = None
    for option in sorted(options, key=lambda o: o.seconds)[:1]:
        best = Placement(option.node, Estimate(option.node, option.seconds, option.tier,
                                               option.detail),
                         cost_s=option.seconds, via=option.via,
                         reason=f"lowest estimated startup: {option.via} ({option.detail})")
    overhead = costs.process_start.value + costs.engine_init.value
    ready = Counter(r.model for n in healthy for r in n.replicas if r.ready)
    cold = {o.node for o in options if o.via == "cold"}
    for node in healthy:
        if node.name in cold:
            continue  # a device is free there (or a standby gives way): nothing to free
        est = startup_estimate(node, model, size_bytes)
        if best is not None and est.seconds + overhead >= best.cost_s:
            continue  # even for free it would not beat a free node
        option = _freeing_option(node, model, nodes, migration, sizes or {}, devices, ready)
        if option is None:
            continue
        victims, extra, why = option
        cost = est.seconds + overhead + extra
        detail = f"freeing {', '.join(victims)} ({why}) then {est.detail}"
        if overhead:
            detail += f" + {overhead:.2f} s process start and engine init"
        options.append(Option(node.name, "cold", cost, detail, est.tier))
        cold.add(node.name)
        if best is None or cost < best.cost_s:
            best = Placement(node.name, est, victims, cost, detail, "cold")
    if best is None:
        return None
    ranked = tuple(sorted(options, key=lambda o: o.seconds))
    return Placement(best.node, best.estimate, best.free_replicas, best.cost_s, best.reason,
                     best.via, ranked)


def _freeing_option(node: NodeView, model: str, nodes: Sequence[NodeView],
                    migration: MigrationModel, sizes: dict[str, int], devices: int = 1,
                    ready: Mapping[str, int] | None = None
                    ) -> tuple[tuple[str, ...], float, str] | None:
    """The cheapest replicas on `node` to empty so that their devices and the free ones are
    enough for `devices`: (replica ids, extra seconds, explanation). One replica for a
    one-device start (the cheapest); for a larger one, the cheapest first until enough.
    `ready` counts the ready replicas of each model on healthy nodes (computed if not given)."""
    if ready is None:
        ready = Counter(r.model for n in nodes if n.healthy for r in n.replicas if r.ready)
    candidates: list[tuple[float, str, str, int]] = []
    for victim in node.replicas:
        if victim.model == model or not victim.ready:
            continue
        # Other ready replicas of its model (it counts itself: it is ready, its node healthy).
        targets = ready.get(victim.model, 0) - 1
        cost = migration.cost(victim.tokens_in_flight) if victim.running else 0.0
        why = f"migrate {victim.running} request(s), {victim.tokens_in_flight} tokens"
        if targets <= 0:
            if victim.running == 0:
                why = "idle"
            else:
                # Its requests need a new replica of their model somewhere else first.
                others = [n for n in nodes if n.healthy
                          and n.free_devices >= max(1, victim.devices) and n.name != node.name]
                if not others:
                    continue
                reload = min(startup_estimate(n, victim.model, sizes.get(victim.model, 0))
                             .seconds for n in others)
                cost += reload
                why += f", reload {victim.model} elsewhere in {reload:.2f} s"
        candidates.append((cost, victim.id, why, victim.devices))
    if devices == 1:
        best = min(candidates, key=lambda c: c[0], default=None)  # the first of equal costs
        return None if best is None else ((best[1],), best[0], best[2])
    chosen, freed, total = [], node.free_devices, 0.0
    # Cheapest first; of equal costs the one holding more devices (fewer replicas stopped).
    for cost, victim_id, why, held in sorted(candidates, key=lambda c: (c[0], -c[3])):
        if freed >= devices:
            break
        chosen.append((victim_id, why))
        freed += held
        total += cost
    if freed < devices or not chosen:
        return None
    return (tuple(v for v, _ in chosen), total, "; ".join(f"{v}: {w}" for v, w in chosen))


# -- the autoscaler's rules -------------------------------------------------------------------
# The router's autoscaler (I/O: node calls, waiting) and the simulator both decide with these.


@dataclass(frozen=True)
class ReplicaUse:
    """What a keep-alive pass needs to know of a ready replica."""

    id: str
    in_flight: int  # requests it is serving now
    last_used: float  # when a request last started or ended there (the caller's clock)


def keep_alive_stops(ready: Sequence[ReplicaUse], now: float, keep_alive_s: float,
                     min_replicas: int) -> list[str]:
    """The ready replicas of one model a keep-alive pass stops: those idle (nothing in flight)
    for longer than `keep_alive_s`, least recently used first, never leaving fewer than
    `min_replicas` ready."""
    idle = sorted((r for r in ready if r.in_flight == 0 and now - r.last_used > keep_alive_s),
                  key=lambda r: r.last_used)
    return [r.id for r in idle[: max(0, len(ready) - min_replicas)]]


def should_scale_up(loads: Sequence[int], target_load: int, starting: bool,
                    max_replicas: int) -> bool:
    """Whether to start another replica of a model whose ready replicas carry `loads`: every
    one at `target_load` or more, no start of it in flight, fewer than `max_replicas` ready."""
    return (all(load >= target_load for load in loads) and not starting
            and len(loads) < max_replicas)


def at_replica_limit(replicas: int, max_replicas: int | None) -> bool:
    """Whether a new start is refused: the model already has `replicas` ready or starting, its
    limit is `max_replicas` (None: a model with no spec, no limit)."""
    return max_replicas is not None and replicas >= max_replicas


def queue_full(waiting: int, max_queue: int) -> bool:
    """Whether a request that must wait for a replica is refused: `waiting` requests of its
    model already wait, and at most `max_queue` may."""
    return waiting >= max_queue


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
