"""The fleet simulation: a SimPy discrete-event model of servers, tiers, replicas and requests,
whose decisions are the router's own (`sllm_plugin.router.policy`): `place` with learned
`StartupCosts` and a `MigrationModel`, `route` with a `PrefixIndex`, and the autoscaler's rules
(`keep_alive_stops`, `should_scale_up`, `at_replica_limit`, `queue_full`) on views
(`NodeView`, `ReplicaView`, `TierView`, `StandbyView`) built from the simulated state.

The simulated world (what the policies decide about, not how):
- each server has `gpus` devices, a DRAM and an SSD checkpoint tier (capacity, LRU; a
  checkpoint larger than a tier is never cached there) and a link to the remote store;
- loads that touch a server's SSD (an SSD read, a remote fetch, which lands on the SSD and is
  read from it) run one at a time: the queue whose drain time the SSD `TierView` reports;
  DRAM reads do not queue (one PCIe link per device);
- a start that read from SSD or remote leaves the checkpoint in DRAM too (the node's
  `promote_on_start`), a fetch leaves it on the SSD;
- a replica's phases: cold = load + process start + engine init (+ the stop of standbys that
  give way); swap into a standby of the model's shape = load + swap; claim of a standby that
  holds the model = claim. Two models share a shape when their checkpoints have the same
  size in bytes (in the simulator, a size class stands for an architecture);
- keep-alive: a replica idle longer than `keep_alive_s` is stopped (the check runs the moment
  it could first expire, as a keep-alive pass with no poll interval would), or kept as a
  standby where the policy has standbys (holding its devices; the least recently kept go
  beyond `standby_max` on a server);
- requests: up to `max_running` at once per replica, each at its own prefill + decode pace,
  the rest in a FIFO there. A prompt's leading blocks that the replica served recently are
  not prefilled again (the prefix cache; `PrefixIndex` says how many);
- migration (when `place` frees a replica): its requests move at once to another replica of
  their model (or wait for a new one) and re-prefill their prompt and generated tokens there
  (`migration_fixed_s` + the prefill time of those tokens); the `MigrationModel` learns from
  what each resume took, as the router's stream runner does;
- a start that finds no room (no placement) waits for devices to be freed, until
  `start_timeout_s`: the live router answers 503 at once; here the start is retried when
  capacity changes, as a client retrying would see. Requests waiting longer than
  `start_timeout_s` or finding `max_queue` requests waiting are rejected;
- device-seconds: every replica (starting, ready) and standby, times its devices, times how
  long it is held, until the last event (a replica's keep-alive expiry included).
"""

from __future__ import annotations

import copy
import random
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import simpy

from ..router.policy import (
    MigrationModel,
    NodeView,
    Placement,
    ReplicaUse,
    ReplicaView,
    RouteWeights,
    StandbyView,
    StartupCosts,
    TierView,
    at_replica_limit,
    keep_alive_stops,
    place,
    queue_full,
    route,
    should_scale_up,
)
from ..router.prefix import PrefixIndex
from .fleet import FleetConfig, load_time
from .types import PolicyResult, RequestRecord, SimModel, SimRequest

TRACE_BLOCK_TOKENS = 512  # tokens per prefix block of a trace (Mooncake's hash_ids)
KEEP_ALIVE_EPS_S = 1e-6  # a keep-alive check runs just after the idle time passes keep_alive_s

POLICIES: dict[str, str] = {
    "sllm": "ours: locality placement with learned start costs (router's place), migration, "
            "standby engines on keep-alive expiry (claim/swap), prefix-affinity routing",
    "serverlessllm": "the seed as published: locality placement (place with the weights-only "
                     "estimator), migration, no standby engines, least-loaded routing",
    "ray-serve": "locality-blind: a random server with free devices, checkpoint from the local "
                 "SSD cache (LRU) else fetched, loaded at safetensors speed; no DRAM tier, no "
                 "migration, no standby",
    "kserve": "locality-blind: the least-loaded server, every start downloads from the store "
              "then loads at safetensors speed; no cache, no migration, no standby",
    "oracle": "lower bound of a cold start: every start reads at DRAM speed on the "
              "least-loaded server with free devices; no queues, no migration, no standby",
}

_LOCALITY = ("sllm", "serverlessllm")
_BLIND = ("ray-serve", "kserve", "oracle")


@dataclass
class Decision:
    """One placement decision: what `place` was given and what it answered, and what the
    engine then did (for the policy-equivalence test)."""

    model: str
    size_bytes: int
    devices: int
    nodes: list[NodeView]
    sizes: dict[str, int]
    costs: StartupCosts
    migration: MigrationModel
    placement: Placement | None
    server: str | None = None  # where the engine started the replica
    via: str | None = None
    freed: tuple[str, ...] = ()


class _Tier:
    """A checkpoint cache on one server: capacity, LRU order (oldest first)."""

    def __init__(self, name: str, capacity_bytes: int, gbps: float) -> None:
        self.name, self.capacity, self.gbps = name, capacity_bytes, gbps
        self.models: OrderedDict[str, int] = OrderedDict()
        self.used = 0
        self.version = 0
        self._cached: tuple[int, frozenset[str], dict[str, str]] | None = None

    def holds(self, model: str) -> bool:
        return model in self.models

    def touch(self, model: str) -> None:
        if model in self.models:
            self.models.move_to_end(model)

    def insert(self, model: str, size: int) -> None:
        """Cache `model` (most recently used), evicting the least recently used to fit; a
        checkpoint larger than the whole tier is never cached."""
        if model in self.models:
            self.models.move_to_end(model)
            return
        if size > self.capacity:
            return
        while self.used + size > self.capacity:
            _, evicted = self.models.popitem(last=False)
            self.used -= evicted
        self.models[model] = size
        self.used += size
        self.version += 1

    def contents(self, shape_of: Callable[[str], str]) -> tuple[frozenset[str], dict[str, str]]:
        if self._cached is None or self._cached[0] != self.version:
            names = frozenset(self.models)
            self._cached = (self.version, names, {m: shape_of(m) for m in self.models})
        return self._cached[1], self._cached[2]


class _Server:
    def __init__(self, name: str, fleet: FleetConfig) -> None:
        self.name, self.gpus = name, fleet.gpus
        self.used = 0  # devices held by replicas (starting or ready) and standbys
        self.dram = _Tier("dram", int(fleet.dram_cache_gb * 1e9), fleet.dram_gbps)
        self.ssd = _Tier("ssd", int(fleet.ssd_cache_gb * 1e9), fleet.ssd_gbps)
        self.ssd_busy_until = 0.0
        self.replicas: dict[str, _Replica] = {}
        self.standbys: list[_Standby] = []  # least recently kept first
        self.version = 0  # bumped by every change its NodeView shows
        self.decoding = 0  # requests decoding here (their token counts grow with time)
        self.cached_view: tuple[tuple, NodeView] | None = None

    @property
    def free(self) -> int:
        return self.gpus - self.used

    def load(self) -> int:
        return sum(len(r.assigned) for r in self.replicas.values())


@dataclass(eq=False)
class _Replica:
    id: str
    server: _Server
    model: str
    devices: int
    since: float  # when it took its devices
    via: str = "cold"
    tier: str | None = None
    ready: bool = False
    last_used: float = 0.0
    running: int = 0
    assigned: dict[int, _Req] = field(default_factory=dict)  # running + queued here
    fifo: deque = field(default_factory=deque)


@dataclass(eq=False)
class _Standby:
    id: str
    server: _Server
    model: str
    shape: str
    devices: int
    since: float  # when it took its devices (as a replica, then a standby)
    kept_at: float


@dataclass(eq=False)
class _Req:
    req: SimRequest
    devices: int | None
    proc: Any = None
    phase: str | None = None  # None | "queued" | "prefill" | "decode"
    replica: _Replica | None = None
    slot: Any = None
    generated: int = 0
    decode_start: float = 0.0
    first_token: float | None = None
    waited: bool = False
    assigned_at: float | None = None
    via: str = "warm"
    tier: str | None = None
    migrated: int = 0
    hit_blocks: int = 0  # leading prompt blocks the replica's prefix cache holds


class _Start:
    def __init__(self, model: str) -> None:
        self.model = model
        self.proc: Any = None
        self.wake: Any = None  # succeeds with a plan when a retry finds room


class InvariantError(AssertionError):
    """The simulated state broke a conservation rule (only checked when asked)."""


class _Sim:
    def __init__(self, fleet: FleetConfig, models: Sequence[SimModel],
                 requests: Sequence[SimRequest], policy: str, seed: int, progress: bool,
                 check_invariants: bool, record_decisions: bool,
                 cached: Mapping[str, Mapping[str, Sequence[str]]] | None = None) -> None:
        if policy not in POLICIES:
            raise ValueError(f"unknown policy {policy!r}; known: {', '.join(POLICIES)}")
        self.fleet, self.policy = fleet, policy
        self.env = simpy.Environment()
        self.rng = random.Random(seed)
        self.check, self.record_decisions = check_invariants, record_decisions
        self.progress = progress
        self.sizes: dict[str, int] = {}
        for m in models:
            if m.name in self.sizes:
                raise ValueError(f"model {m.name!r} is listed twice")
            if m.size_bytes <= 0:
                raise ValueError(f"model {m.name!r}: size_bytes must be positive")
            self.sizes[m.name] = m.size_bytes
        for r in requests:
            if r.model not in self.sizes:
                raise ValueError(f"request {r.id} names model {r.model!r}, which is not among "
                                 "the models")
        self.requests = sorted(requests, key=lambda r: (r.arrival_s, r.id))
        self.devices = {m: fleet.devices_for(s) for m, s in self.sizes.items()}
        self.decode = {m: fleet.decode_s_per_token(s, d) for m, s in self.sizes.items()
                       if (d := self.devices[m])}
        self.prefill = {m: fleet.prefill_s_per_token(s, d) for m, s in self.sizes.items()
                        if (d := self.devices[m])}
        self.servers = [_Server(n, fleet) for n in fleet.server_names()]
        self.by_name = {s.name: s for s in self.servers}
        self._preload(cached or {})
        self.standby_on = policy == "sllm" and fleet.standby
        self.costs = StartupCosts() if policy == "sllm" else StartupCosts.weights_only()
        self.migration = MigrationModel(fixed_s=fleet.migration_fixed_s)
        self.weights = RouteWeights() if policy in ("sllm", "oracle") \
            else RouteWeights(affinity=0.0)
        self.prefix = PrefixIndex()
        self.ready: dict[str, dict[str, _Replica]] = {m: {} for m in self.sizes}
        self.count: dict[str, int] = dict.fromkeys(self.sizes, 0)  # starting + ready
        self.starting: dict[str, _Start] = {}
        self.waiting: dict[str, int] = dict.fromkeys(self.sizes, 0)
        self.signals: dict[str, simpy.Event] = {}
        self.pending: deque[_Start] = deque()  # starts waiting for room, oldest first
        self.retry_scheduled = False
        self.next_id = 0
        self.device_seconds = 0.0
        self.starts: dict[str, int] = {}
        self.loads_by_tier: dict[str, int] = {}
        self.migrations = 0
        self.decisions: list[Decision] = []
        self.records: list[RequestRecord] = []
        self.bar: Any = None

    def _preload(self, cached: Mapping[str, Mapping[str, Sequence[str]]]) -> None:
        """Checkpoints in the servers' tiers before the first request (server -> tier ->
        models, the first listed the least recently used). Tiers a policy does not have
        (DRAM for the blind baselines, SSD for kserve) stay empty."""
        for name, tiers in cached.items():
            server = self.by_name.get(name)
            if server is None:
                raise ValueError(f"cached: no server {name!r} in the fleet")
            for tier_name, names in tiers.items():
                if tier_name not in ("dram", "ssd"):
                    raise ValueError(f"cached: {name}: tier {tier_name!r} is not dram or ssd")
                tier = server.dram if tier_name == "dram" else server.ssd
                if (tier_name == "dram" and self.policy in ("ray-serve", "kserve")) or (
                        tier_name == "ssd" and self.policy == "kserve"):
                    continue
                for model in names:
                    if model not in self.sizes:
                        raise ValueError(f"cached: {name}/{tier_name}: no model {model!r}")
                    tier.insert(model, self.sizes[model])

    # -- small helpers --------------------------------------------------------------------

    def shape(self, model: str) -> str:
        return f"bytes-{self.sizes[model]}"

    def _new_id(self, server: _Server) -> str:
        self.next_id += 1
        return f"{server.name}/{self.next_id}"

    def _hold(self, server: _Server, devices: int) -> None:
        server.used += devices
        server.version += 1
        if self.check and server.used > server.gpus:
            raise InvariantError(f"{server.name}: {server.used} devices held of {server.gpus}")

    def _release(self, server: _Server, devices: int, since: float) -> None:
        server.used -= devices
        server.version += 1
        self.device_seconds += devices * (self.env.now - since)
        self._capacity_changed()

    def _capacity_changed(self) -> None:
        """Devices were freed or a replica became freeable: retry the waiting starts once
        this instant's changes are done."""
        if self.pending and not self.retry_scheduled:
            self.retry_scheduled = True
            self.env.timeout(0).callbacks.append(self._retry_pending)

    def _retry_pending(self, _event: Any = None) -> None:
        """Place the waiting starts, oldest first. One that still finds no room stays in line;
        later ones needing as many devices or more are not tried again in this pass (they
        would mostly find none either: a shortcut of the simulator's queue, not the policy's;
        one that could claim a standby waits for the next change)."""
        self.retry_scheduled = False
        failed_at: int | None = None
        for start in list(self.pending):
            devices = self.devices[start.model] or 0
            if failed_at is not None and devices >= failed_at:
                continue
            plan = None if at_replica_limit(self.count[start.model], self.fleet.max_replicas) \
                else self._plan(start.model)
            if plan is None:
                failed_at = devices if failed_at is None else min(failed_at, devices)
                continue
            self.pending.remove(start)
            start.wake.succeed(plan)

    def _signal(self, model: str, value: str) -> None:
        event = self.signals.pop(model, None)
        if event is not None:
            event.succeed(value)

    def _check_all(self) -> None:
        if not self.check:
            return
        for s in self.servers:
            held = sum(r.devices for r in s.replicas.values()) + sum(
                b.devices for b in s.standbys)
            if held != s.used or s.used > s.gpus or s.used < 0:
                raise InvariantError(f"{s.name}: {held} devices held ({s.used} counted) of "
                                     f"{s.gpus}")
            for tier in (s.dram, s.ssd):
                if tier.used != sum(tier.models.values()) or tier.used > tier.capacity:
                    raise InvariantError(f"{s.name} {tier.name}: {tier.used} bytes cached of "
                                         f"{tier.capacity}")
            for r in s.replicas.values():
                if r.running > self.fleet.max_running or r.running < 0:
                    raise InvariantError(f"{r.id}: {r.running} running")
            decoding = sum(1 for r in s.replicas.values() for q in r.assigned.values()
                           if q.phase == "decode")
            if decoding > s.decoding or s.decoding < 0:
                raise InvariantError(f"{s.name}: {s.decoding} decoding counted, {decoding} seen")

    # -- views for the policy -------------------------------------------------------------

    def _tokens_in_flight(self, replica: _Replica) -> int:
        now, tokens = self.env.now, 0
        for r in replica.assigned.values():
            if r.phase in ("prefill", "decode"):
                tokens += r.req.input_tokens + self._generated(r, now)
        return tokens

    def _generated(self, r: _Req, now: float) -> int:
        if r.phase != "decode":
            return r.generated
        per = self.decode[r.req.model]
        return r.generated + (int((now - r.decode_start) / per) if per > 0 else 0)

    def _view(self, s: _Server) -> NodeView:
        """The server as the router would see it; rebuilt only when something it shows
        changed (its version, its tiers, or the clock while it decodes or its SSD is busy)."""
        now = self.env.now
        timed = s.decoding > 0 or s.ssd_busy_until > now
        key = (s.version, s.dram.version, s.ssd.version, now if timed else None)
        if s.cached_view is not None and s.cached_view[0] == key:
            return s.cached_view[1]
        view = self._build_view(s)
        s.cached_view = (key, view)
        return view

    def _build_view(self, s: _Server) -> NodeView:
        now = self.env.now
        dram_models, dram_shapes = s.dram.contents(self.shape)
        ssd_models, ssd_shapes = s.ssd.contents(self.shape)
        tiers = (TierView("dram", s.dram.gbps, 0.0, dram_models, dram_shapes),
                 TierView("ssd", s.ssd.gbps, max(0.0, s.ssd_busy_until - now), ssd_models,
                          ssd_shapes))
        replicas = tuple(ReplicaView(r.id, s.name, r.model, r.ready,
                                     running=len(r.assigned),
                                     tokens_in_flight=self._tokens_in_flight(r),
                                     devices=r.devices)
                         for r in s.replicas.values())
        standbys = tuple(StandbyView(b.id, b.shape, b.model, b.devices) for b in s.standbys)
        return NodeView(s.name, s.free, tiers, self.fleet.remote_gbps, replicas,
                        standbys=standbys)

    # -- requests -------------------------------------------------------------------------

    def _arrivals(self):
        env = self.env
        for req in self.requests:
            if req.arrival_s > env.now:
                yield env.timeout(req.arrival_s - env.now)
            r = _Req(req, self.devices[req.model])
            r.proc = env.process(self._request(r))
            if self.bar is not None:
                self.bar.update(1)

    def _request(self, r: _Req):
        env, fleet, model = self.env, self.fleet, r.req.model
        deadline = r.req.arrival_s + fleet.start_timeout_s
        first = True
        while True:
            replica = self._pick(r) if r.devices is not None else None
            if replica is None:
                if first:
                    r.waited = True
                if r.devices is None or queue_full(self.waiting[model], fleet.max_queue) \
                        or env.now >= deadline:
                    self._reject(r)
                    return
                self.waiting[model] += 1
                self._ensure_start(model)
                signal = self.signals.get(model)
                if signal is None:
                    signal = self.signals[model] = env.event()
                timeout = env.timeout(deadline - env.now)
                result = yield signal | timeout
                self.waiting[model] -= 1
                first = False
                if signal not in result or signal.value == "failed":
                    self._reject(r)
                    return
                continue
            first = False
            if r.assigned_at is None:
                r.assigned_at = env.now
                if r.waited:
                    r.via, r.tier = replica.via, replica.tier
            done = yield from self._run(r, replica)
            if done:
                return
            deadline = env.now + fleet.start_timeout_s  # moved: it may wait for a new replica

    def _pick(self, r: _Req) -> _Replica | None:
        model = r.req.model
        ready = list(self.ready[model].values())
        if not ready:
            return None
        if should_scale_up([len(x.assigned) for x in ready], self.fleet.target_load,
                           model in self.starting, self.fleet.max_replicas):
            self._ensure_start(model)
        blocks = [(b & 0xFFFFFFFFFFFFFFFF).to_bytes(8, "little") for b in r.req.blocks]
        views = [ReplicaView(x.id, x.server.name, model, True, running=len(x.assigned))
                 for x in ready]
        hits = {x.id: self.prefix.hit_fraction(x.id, blocks) for x in ready} \
            if blocks and self.weights.affinity else {}
        choice = route(views, hits, self.weights)
        assert choice is not None
        replica = self.ready[model][choice.replica]
        r.hit_blocks = 0
        if blocks:
            hit = hits.get(replica.id) if hits else self.prefix.hit_fraction(replica.id, blocks)
            r.hit_blocks = round((hit or 0.0) * len(blocks))
            self.prefix.record(replica.id, blocks)
        replica.assigned[r.req.id] = r
        replica.server.version += 1
        replica.last_used = self.env.now
        r.replica = replica
        return replica

    def _run(self, r: _Req, replica: _Replica):
        """Serve `r` on `replica`; True when done, False when it was moved off (migration)."""
        env, model = self.env, r.req.model
        try:
            if replica.running >= self.fleet.max_running:
                r.phase, r.slot = "queued", env.event()
                replica.fifo.append(r)
                yield r.slot
            else:
                replica.running += 1
            r.phase = "prefill"
            replica.server.version += 1
            per = self.prefill[model]
            if r.first_token is None:
                cached = min(r.req.input_tokens, r.hit_blocks * TRACE_BLOCK_TOKENS)
                yield env.timeout((r.req.input_tokens - cached) * per)
                r.first_token = env.now
                r.generated = max(r.generated, 1)
            else:  # a moved request re-prefills its prompt and what it generated
                tokens = r.req.input_tokens + r.generated
                seconds = self.fleet.migration_fixed_s + tokens * per
                yield env.timeout(seconds)
                self.migration.observe(tokens, seconds)
            r.phase, r.decode_start = "decode", env.now
            replica.server.version += 1
            replica.server.decoding += 1
            remaining = max(0, r.req.output_tokens - r.generated)
            yield env.timeout(remaining * self.decode[model])
        except simpy.Interrupt:
            replica.server.version += 1
            if r.phase == "decode":
                replica.server.decoding -= 1
            if r.phase in ("prefill", "decode"):
                r.generated = self._generated(r, env.now)
                r.migrated += 1
                self.migrations += 1
            r.phase, r.replica, r.slot = None, None, None
            return False
        r.generated, r.phase = max(r.req.output_tokens, 1), None
        self._finish(r, replica)
        return True

    def _finish(self, r: _Req, replica: _Replica) -> None:
        now = self.env.now
        del replica.assigned[r.req.id]
        replica.server.version += 1
        replica.server.decoding -= 1  # it finished decoding
        replica.running -= 1
        replica.last_used = now
        while replica.fifo:
            nxt = replica.fifo.popleft()
            if nxt.slot is not None and nxt.replica is replica:
                replica.running += 1
                nxt.slot.succeed()
                break
        if not replica.assigned:
            self._schedule_keep_alive(replica.model)
            self._capacity_changed()  # an idle replica may be freed now
        req = r.req
        self.records.append(RequestRecord(
            req.id, req.model, req.arrival_s, r.first_token - req.arrival_s,
            (r.assigned_at - req.arrival_s) if r.waited else 0.0, r.waited,
            replica.server.name, r.via if r.waited else "warm", r.tier if r.waited else None,
            r.migrated, now))
        self._check_all()

    def _reject(self, r: _Req) -> None:
        req = r.req
        self.records.append(RequestRecord(req.id, req.model, req.arrival_s, None,
                                          self.env.now - req.arrival_s, r.waited, None,
                                          "rejected", None, r.migrated, None))

    # -- keep-alive ------------------------------------------------------------------------

    def _schedule_keep_alive(self, model: str) -> None:
        event = self.env.timeout(self.fleet.keep_alive_s + KEEP_ALIVE_EPS_S)
        event.callbacks.append(lambda _e, m=model: self._keep_alive(m))

    def _keep_alive(self, model: str) -> None:
        ready = list(self.ready[model].values())
        stops = keep_alive_stops([ReplicaUse(x.id, len(x.assigned), x.last_used)
                                  for x in ready], self.env.now, self.fleet.keep_alive_s,
                                 self.fleet.min_replicas)
        for key in stops:
            replica = self.ready[model][key]
            if self.standby_on:
                self._keep_as_standby(replica)
            else:
                self._stop(replica)
        self._check_all()

    def _remove(self, replica: _Replica) -> None:
        server = replica.server
        del server.replicas[replica.id]
        server.version += 1
        self.ready[replica.model].pop(replica.id, None)
        self.count[replica.model] -= 1
        self.prefix.forget(replica.id)

    def _stop(self, replica: _Replica) -> None:
        self._remove(replica)
        self._release(replica.server, replica.devices, replica.since)

    def _keep_as_standby(self, replica: _Replica) -> None:
        self._remove(replica)
        server = replica.server
        server.version += 1
        server.standbys.append(_Standby(replica.id, server, replica.model,
                                        self.shape(replica.model), replica.devices,
                                        replica.since, self.env.now))
        limit = self.fleet.standby_max
        while limit is not None and len(server.standbys) > limit:
            self._stop_standby(server.standbys[0])
        self._capacity_changed()

    def _stop_standby(self, standby: _Standby) -> None:
        standby.server.standbys.remove(standby)
        standby.server.version += 1
        self._release(standby.server, standby.devices, standby.since)

    # -- starts -----------------------------------------------------------------------------

    def _ensure_start(self, model: str) -> None:
        if model not in self.starting:
            start = self.starting[model] = _Start(model)
            start.proc = self.env.process(self._start(start))

    def _start(self, start: _Start):
        env, model = self.env, start.model
        deadline = env.now + self.fleet.start_timeout_s
        try:
            if at_replica_limit(self.count[model], self.fleet.max_replicas):
                self._signal(model, "failed")
                return
            plan = self._plan(model)
            if plan is None:  # no room now: wait (in line) for devices to be freed
                start.wake = env.event()
                self.pending.append(start)
                timeout = env.timeout(deadline - env.now)
                result = yield start.wake | timeout
                if start.wake not in result:
                    self.pending.remove(start)
                    self._signal(model, "failed")
                    return
                plan = start.wake.value
            replica, seconds, phases, planned_load = plan
            self.starts[replica.via] = self.starts.get(replica.via, 0) + 1
            if replica.tier in ("dram", "ssd", "remote"):
                self.loads_by_tier[replica.tier] = self.loads_by_tier.get(replica.tier, 0) + 1
            self._check_all()
            yield env.timeout(seconds)
            if self.policy == "sllm":  # what the nodes report, learned as the router does
                self.costs.observe(replica.via, phases, planned_load)
            replica.ready, replica.last_used = True, env.now
            replica.server.version += 1
            self.ready[model][replica.id] = replica
            self._after_load(replica)
        finally:
            self.starting.pop(model, None)
        self._signal(model, "ready")
        self._schedule_keep_alive(model)  # a start nobody uses expires too
        self._capacity_changed()
        self._check_all()

    def _after_load(self, replica: _Replica) -> None:
        """What a finished load leaves in the server's tiers."""
        server, model, size = replica.server, replica.model, self.sizes[replica.model]
        if self.policy in _LOCALITY:
            if replica.tier == "remote":
                server.ssd.insert(model, size)
            if replica.tier in ("remote", "ssd"):
                server.dram.insert(model, size)
            server.ssd.touch(model)
            server.dram.touch(model)
        elif self.policy == "ray-serve":
            if replica.tier == "remote":
                server.ssd.insert(model, size)
            server.ssd.touch(model)

    def _new_replica(self, server: _Server, model: str, via: str, tier: str | None,
                     since: float | None = None) -> _Replica:
        devices = self.devices[model]
        assert devices is not None
        replica = _Replica(self._new_id(server), server, model, devices,
                           self.env.now if since is None else since, via, tier)
        server.replicas[replica.id] = replica
        server.version += 1
        self.count[model] += 1
        return replica

    def _ssd_job(self, server: _Server, seconds: float) -> float:
        """Queue a job of `seconds` on the server's SSD; the time until it is done."""
        now = self.env.now
        begin = max(now, server.ssd_busy_until)
        server.ssd_busy_until = begin + seconds
        server.version += 1
        return server.ssd_busy_until - now

    def _plan(self, model: str):
        if self.policy in _LOCALITY:
            return self._plan_locality(model)
        return self._plan_blind(model)

    def _plan_locality(self, model: str):
        size, devices = self.sizes[model], self.devices[model]
        assert devices is not None
        views = [self._view(s) for s in self.servers]
        placement = place(model, size, views, self.migration, self.sizes, self.costs, devices)
        decision = None
        if self.record_decisions:
            decision = Decision(model, size, devices, views, self.sizes,
                                copy.deepcopy(self.costs), copy.deepcopy(self.migration),
                                placement)
            self.decisions.append(decision)
        if placement is None:
            return None
        server = self.by_name[placement.node]
        for key in placement.free_replicas:
            self._free(server.replicas[key])
        fleet = self.fleet
        phases: dict[str, float] = {}
        planned = next((o for o in placement.options
                        if o.node == placement.node and o.via == placement.via), None)
        if placement.via == "standby":
            # The node claims the most recently kept standby holding the model.
            standby = max((b for b in server.standbys if b.model == model),
                          key=lambda b: b.kept_at)
            server.standbys.remove(standby)
            server.version += 1
            replica = self._new_replica(server, model, "standby", "standby", standby.since)
            seconds = fleet.claim_s
            phases = {"total": seconds}
        elif placement.via == "swap":
            # The least recently kept standby of the model's shape takes the weights.
            shape = self.shape(model)
            standby = min((b for b in server.standbys if b.shape == shape
                           and b.model != model), key=lambda b: b.kept_at)
            server.standbys.remove(standby)
            server.version += 1
            tier, load = self._locality_load(server, model)
            replica = self._new_replica(server, model, "swap", tier, standby.since)
            seconds = load + fleet.swap_s
            phases = {"load": load, "swap": fleet.swap_s, "total": seconds}
        else:
            stop = 0.0
            if server.free < devices:  # standbys of other shapes give way, oldest first
                # (the node knows a model's shape from its tier copy: none, every one gives way)
                known = server.dram.holds(model) or server.ssd.holds(model)
                shape = self.shape(model) if known else None
                for standby in [b for b in server.standbys if b.shape != shape]:
                    if server.free >= devices:
                        break
                    self._stop_standby(standby)
                    stop = fleet.standby_stop_s
            if server.free < devices:
                raise InvariantError(f"{placement.node} has {server.free} free devices for "
                                     f"{model} ({devices} needed) after {placement}")
            tier, load = self._locality_load(server, model)
            replica = self._new_replica(server, model, "cold", tier)
            self._hold(server, devices)
            seconds = stop + load + fleet.process_start_s + fleet.engine_init_s
            phases = {"load": load, "process_start": fleet.process_start_s,
                      "engine_init": fleet.engine_init_s, "total": seconds}
        if decision is not None:
            decision.server, decision.via = server.name, replica.via
            decision.freed = placement.free_replicas
        return replica, seconds, phases, planned.load_s if planned else None

    def _locality_load(self, server: _Server, model: str) -> tuple[str, float]:
        """Read `model`'s checkpoint on `server` with ServerlessLLM's loader: from DRAM, else
        the SSD (queued), else fetched onto the SSD (queued) and read from it."""
        size, fleet = self.sizes[model], self.fleet
        if server.dram.holds(model):
            return "dram", load_time(size, fleet.dram_gbps)
        if server.ssd.holds(model):
            return "ssd", self._ssd_job(server, load_time(size, fleet.ssd_gbps))
        job = load_time(size, fleet.remote_gbps) + load_time(size, fleet.ssd_gbps)
        return "remote", self._ssd_job(server, job)

    def _plan_blind(self, model: str):
        devices = self.devices[model]
        assert devices is not None
        fleet = self.fleet
        free = [s for s in self.servers if s.free >= devices]
        if not free:  # idle replicas of other models are stopped to make room
            free = [s for s in self.servers if s.free + sum(
                r.devices for r in s.replicas.values()
                if r.ready and not r.assigned and r.model != model) >= devices]
        if not free:
            return None
        if self.policy == "ray-serve":
            server = self.rng.choice(free)
        else:
            server = min(free, key=lambda s: (s.load(), -s.free))
        idle = sorted((r for r in server.replicas.values()
                       if r.ready and not r.assigned and r.model != model),
                      key=lambda r: r.last_used)
        for victim in idle:
            if server.free >= devices:
                break
            self._stop(victim)
        size = self.sizes[model]
        slow = fleet.safetensors_gbps()
        if self.policy == "oracle":
            tier, load = "dram", load_time(size, fleet.dram_gbps)
        elif self.policy == "ray-serve" and server.ssd.holds(model):
            tier, load = "ssd", self._ssd_job(server, load_time(size, slow))
        else:
            tier = "remote"
            load = self._ssd_job(server, load_time(size, fleet.remote_gbps)
                                 + load_time(size, slow))
        replica = self._new_replica(server, model, "cold", tier)
        self._hold(server, devices)
        seconds = load + fleet.process_start_s + fleet.engine_init_s
        return replica, seconds, {}, None

    def _free(self, victim: _Replica) -> None:
        """Empty `victim` (its requests move to other replicas of its model) and stop it."""
        moving = list(victim.assigned.values())
        victim.assigned.clear()
        victim.fifo.clear()
        victim.running = 0
        self._stop(victim)
        for r in moving:
            r.proc.interrupt("migrate")

    # -- the run ----------------------------------------------------------------------------

    def run(self) -> PolicyResult:
        t0 = time.perf_counter()
        if self.progress:
            from tqdm import tqdm

            self.bar = tqdm(total=len(self.requests), desc=self.policy, unit="req")
        try:
            self.env.process(self._arrivals())
            self.env.run()
        finally:
            if self.bar is not None:
                self.bar.close()
        end = self.env.now
        for s in self.servers:
            for r in s.replicas.values():
                self.device_seconds += r.devices * (end - r.since)
            for b in s.standbys:
                self.device_seconds += b.devices * (end - b.since)
        self.records.sort(key=lambda rec: rec.id)
        first = self.requests[0].arrival_s if self.requests else 0.0
        last = max((rec.finish_s for rec in self.records if rec.finish_s is not None),
                   default=first)
        return PolicyResult(self.policy, self.records, self.device_seconds, dict(self.starts),
                            dict(self.loads_by_tier), self.migrations, last - first,
                            time.perf_counter() - t0, self._notes(), self.decisions)

    def _notes(self) -> list[str]:
        f = self.fleet
        notes = [POLICIES[self.policy],
                 f"servers {f.servers} x {f.gpus} devices; tiers DRAM {f.dram_cache_gb:g} GB at "
                 f"{f.dram_gbps:g} GB/s, SSD {f.ssd_cache_gb:g} GB at {f.ssd_gbps:g} GB/s, "
                 f"remote {f.remote_gbps:g} GB/s",
                 "two models share an engine shape (swap) when their checkpoints have the same "
                 "size in bytes",
                 "a start that finds no room waits for capacity until start_timeout_s (the "
                 "live router answers 503 at once)"]
        if self.policy == "sllm":
            notes.append("start costs learned from the simulated phases (StartupCosts."
                         "observe, seeded with the router's defaults); standbys "
                         + ("on" if self.standby_on else "off"))
        if self.policy == "serverlessllm":
            notes.append("estimator: place() with StartupCosts.weights_only() (the seed's "
                         "q + n/b): with no standbys every option is a cold start, so the "
                         "process start and engine init add equally to every option and "
                         "the choice equals the one with overheads counted")
        if self.policy in _BLIND:
            notes.append("when no server has free devices, idle replicas of other models are "
                         "stopped (least recently used first) to make room; busy ones never")
        if self.policy in ("ray-serve", "kserve"):
            notes.append(f"safetensors loads read at ssd_gbps / {f.safetensors_slowdown:g} = "
                         f"{f.safetensors_gbps():.2f} GB/s (ServerlessLLM's claim: 3.6-8.2x "
                         "faster; upstream H100: 4.44 -> 0.68 s, 20.6 -> 3.2 s, ~6.4x)")
        if self.policy == "oracle":
            notes.append("every start reads at DRAM speed without queueing and pays the "
                         "process start and engine init; a standby claim (sllm) can beat it")
        return notes


def simulate(fleet: FleetConfig, models: Sequence[SimModel], requests: Sequence[SimRequest],
             policy: str, *, seed: int = 0, progress: bool = False,
             check_invariants: bool = False, record_decisions: bool = False,
             cached: Mapping[str, Mapping[str, Sequence[str]]] | None = None) -> PolicyResult:
    """Run `requests` (on `models`) through `fleet` under `policy` (a key of POLICIES).

    Deterministic for a `seed` (the only randomness, ray-serve's server choice, draws from
    `random.Random(seed)`). `check_invariants` checks device and tier accounting after every
    change (for tests: slower); `record_decisions` keeps every placement decision with the
    views it was made on in `PolicyResult.decisions`; `cached` fills tiers before the first
    request ({server: {"dram"|"ssd": [model, ...]}}, least recently used first)."""
    return _Sim(fleet, models, requests, policy, seed, progress, check_invariants,
                record_decisions, cached).run()
