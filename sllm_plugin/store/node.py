"""The node service: tiers, their queues, the model registry and the replicas, in one object.

The HTTP API (`api.py`) is a thin layer over this class; tests and the benchmark can drive it
through HTTP like any client. Errors raised here carry the HTTP status that fits them.

Models come from two places that are trusted differently: the configuration file's `models`
(the operator's: their `replica_args` go to vLLM as written) and `POST /models` (a caller's,
kept in `<state_dir>/models.json`: their `replica_args` must pass `replicaargs`' allowlist,
when registered and again whenever a replica starts, also after a restart).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import urllib.parse
from pathlib import Path

from .addresses import AddressError, advertised_host, url_host
from .bandwidth import Bandwidth, calibrate_read
from .config import ModelEntry, NodeConfig, memory_bytes, resolve_token
from .hugetmpfs import ensure_huge_tmpfs, has_huge_pages
from .jobs import Job, TierQueue
from .metrics import NodeMetrics
from .names import check_model_name
from .replicaargs import ReplicaArgsError, check_api_args
from .replicas import Device, Launcher, Replica, ReplicaError, detect_devices, parse_device
from .sources import (
    FetchLimits,
    SourceError,
    check_url_source,
    copy_checkpoint,
    resolve_fetch,
)
from .standby import SwapFailed, engine_key, group_memory_bytes, takes_swaps
from .statedir import StateLock, private_dir, read_private, remove_stale_temporaries, write_atomic
from .tiers import NotInTier, Tier, TierError

logger = logging.getLogger("sllm_plugin.store")
TIER_ORDER = ("dram", "ssd")  # fastest first


class NodeError(Exception):
    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class Node:
    def __init__(self, config: NodeConfig) -> None:
        """Raises StateDirError (state directory unsafe, or held by another daemon) and
        TokenError (a configured token that cannot be used) before touching anything else."""
        self.config = config
        self.started = time.time()
        self.state_dir = private_dir(config.state_dir, "the node's state directory")
        self._state_lock = StateLock(self.state_dir)  # before anything reads or writes state
        try:
            self._setup(config)
        except BaseException:
            self._state_lock.release()
            raise

    def _setup(self, config: NodeConfig) -> None:
        remove_stale_temporaries(self.state_dir)
        self.token, where = resolve_token(config, self.state_dir)
        logger.info("mutating calls need 'Authorization: Bearer <token>'; the token is in %s%s",
                    where, " (`sllm node-token` prints it)" if where.startswith("/") and
                    Path(where).parent == self.state_dir else "")
        try:
            self.advertise = advertised_host(config.host, config.advertise)
        except AddressError as e:
            raise NodeError(str(e), 400) from None
        logger.info("replicas listen on %s and are reported as http://%s:PORT", config.host,
                    url_host(self.advertise))
        self.tiers: dict[str, Tier] = {}
        for name in TIER_ORDER:
            tier_cfg = getattr(config, name)
            if tier_cfg is not None and tier_cfg.huge_pages:
                if name != "dram":
                    raise NodeError(f"{name}.huge_pages: only the dram tier can use it", 400)
                if ensure_huge_tmpfs(tier_cfg.path.expanduser(), int(tier_cfg.capacity)):
                    logger.info("mounted a huge-page tmpfs for the dram tier at %s",
                                tier_cfg.path)
            if tier_cfg is not None:
                self.tiers[name] = Tier(name, tier_cfg.path.expanduser(), tier_cfg.capacity,
                                        Bandwidth())
        self.metrics = NodeMetrics(self)  # state read at each scrape; events counted here
        for tier in self.tiers.values():
            tier.on_evict = self.metrics.evicted
        self.queues = {name: TierQueue(name, on_finish=self.metrics.job_finished)
                       for name in self.tiers}
        self.transfers = {"fetch": Bandwidth(config.remote_bandwidth_gbps), "promote": Bandwidth()}
        self.devices: list[Device] = ([parse_device(d) for d in config.devices]
                                      if config.devices else detect_devices())
        self.assigned: dict[str, int] = {}  # device name -> replica id
        self.replicas: dict[int, Replica] = {}
        self.models: dict[str, ModelEntry] = dict(config.models)
        self._trusted: set[str] = set(config.models)  # entries as the operator wrote them
        self._lock = threading.RLock()
        self._load_registry()
        self.launcher = Launcher(config.replica_command, config.replica_args, config.replica_env,
                                 self.state_dir / "logs", config.ready_timeout_s,
                                 config.stop_timeout_s, on_load=self._on_load,
                                 on_end=self._on_end, bind_host=config.host,
                                 advertise_host=self.advertise,
                                 port_range=config.replica_port_range,
                                 prefork=config.prefork)
        self.notes: list[str] = []

    # -- start-up -----------------------------------------------------------------------

    def start(self, calibrate: bool = True) -> None:
        """Rediscover what the tiers hold, then measure their read bandwidths."""
        self.notes += self.launcher.reap_orphans()
        for tier in self.tiers.values():
            self.notes += tier.rediscover()
        if calibrate:
            for tier in self.tiers.values():
                try:
                    gbps = calibrate_read(tier.path, int(self.config.calibration_bytes),
                                          direct=tier.name != "dram")
                except OSError as e:  # a tier too full to measure still serves what it holds
                    self.notes.append(f"{tier.name}: bandwidth not calibrated: {e}")
                    logger.warning("%s", self.notes[-1])
                    continue
                tier.bandwidth = Bandwidth(gbps)
                logger.info("%s tier at %s: read %.2f GB/s (calibration)", tier.name,
                            tier.path, gbps)
            if "ssd" in self.tiers:
                self.transfers["promote"] = Bandwidth(self.tiers["ssd"].bandwidth.report().gbps)
        if self.config.standby:
            threading.Thread(target=self._start_configured_standbys, daemon=True,
                             name="sllm-standby-start").start()

    def close(self) -> None:
        """Stop every replica (in parallel: each may take seconds) and the queues."""
        stoppers = [threading.Thread(target=self.launcher.stop, args=(r,))
                    for r in list(self.replicas.values())]
        for t in stoppers:
            t.start()
        for t in stoppers:
            t.join()
        for q in self.queues.values():
            q.close()
        self.launcher.close()
        self._state_lock.release()

    # -- models ---------------------------------------------------------------------------

    def register(self, name: str, source: str, revision: str | None = None,
                 replica_args: list[str] | None = None) -> ModelEntry:
        """Register (or replace) a model through the API: its flags must pass the allowlist."""
        check_model_name(name)
        _check_args(replica_args or [], "replica_args")
        try:
            check_url_source(source)
        except SourceError as e:
            raise NodeError(str(e), 400) from None
        entry = ModelEntry(source=source, revision=revision, replica_args=replica_args or [])
        with self._lock:
            self.models[name] = entry
            self._trusted.discard(name)
            self._save_registry()
        return entry

    def public_models(self) -> dict[str, dict]:
        """The models as unauthenticated callers see them: no flags, no URL credentials."""
        return {n: {"source": public_source(m.source), "revision": m.revision}
                for n, m in sorted(self.models.items())}

    def _known(self, name: str) -> None:
        check_model_name(name)
        if name not in self.models and not any(t.has(name) for t in self.tiers.values()):
            raise NodeError(f"unknown model {name!r}: register it (POST /models or the config's "
                            f"'models') before fetching it; known: {sorted(self.models)}", 404)

    def _tier(self, name: str) -> Tier:
        tier = self.tiers.get(name)
        if tier is None:
            raise NodeError(f"unknown tier {name!r}; this node has {sorted(self.tiers)}", 404)
        return tier

    # -- fetch and promote ------------------------------------------------------------------

    def prefetch(self, name: str, tier: str = "ssd", lookup: bool = True) -> Job | None:
        """Queue a fetch (into ssd) or a promotion (into dram); None if it is there already.
        `lookup`: count the request's cache hit or miss(es) (see metrics)."""
        self._known(name)
        target = self._tier(tier)
        if target.has(name):
            if lookup:
                self.metrics.lookup(tier, hit=True)
            return None
        if lookup:
            self.metrics.lookup(tier, hit=False)
        if tier == "dram":
            if "dram" in self.tiers and not self.tiers["ssd"].has(name):
                if lookup:
                    self.metrics.lookup("ssd", hit=False)
                fetch = self._fetch(name)  # remote -> ssd, then ssd -> dram when it is done
                threading.Thread(target=self._promote_after, args=(fetch,), daemon=True).start()
                return fetch
            return self._promote(name)
        return self._fetch(name)

    def _promote_after(self, fetch: Job) -> None:
        fetch.done.wait()
        if fetch.state == "done":
            try:
                self._promote(fetch.model)
            except NodeError as e:
                logger.warning("promotion of %s after its fetch: %s", fetch.model, e)

    def ensure(self, name: str, tier: str,
               deadline: float | None = None) -> tuple[float, float, Job | None]:
        """Block until `tier` holds the model, or until `deadline` (time.monotonic()) passes.

        Returns (seconds queued, seconds transferring, None), or the job still under way at
        the deadline in place of None. A fetch into dram is a fetch into ssd, then a promotion.
        """
        queued = running = 0.0
        for attempt in range(4):  # fetch, promote; again if the copy was evicted meanwhile
            job = self.prefetch(name, tier, lookup=attempt == 0)
            if job is None:
                return queued, running, None
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not job.done.wait(left):
                return queued, running, job
            if job.state == "failed":
                raise NodeError(f"{job.kind} of {name} into {job.tier} failed: {job.error}",
                                job.error_status or 502)
            queued += (job.started or job.created) - job.created
            running += (job.finished or time.time()) - (job.started or job.created)
        raise NodeError(f"{name} was evicted from the {tier} tier as fast as it was fetched; "
                        "the tier is too small for what is asked of it", 507)

    def _fetch(self, name: str) -> Job:
        entry = self.models.get(name)
        if entry is None:
            raise NodeError(f"{name} is in no tier this fetch could use, and has no source", 404)
        ssd = self.tiers["ssd"]
        fetch = None
        # A local source is resolved here (cheap: a bad source or a model too large fails at
        # once); a URL or a hub id in the job: resolving them talks to a server, and a server
        # that never answers held the request, and with 40 such requests every thread that
        # serves the API.
        if _is_local(entry.source):
            fetch = self._resolve(name, entry)
            if fetch.nbytes > ssd.capacity:
                raise NodeError(f"{name} needs {fetch.nbytes / 1e9:.3f} GB; the largest tier "
                                f"(ssd) holds {ssd.capacity / 1e9:.3f} GB", 413)
        job = Job("fetch", name, "ssd", fetch.nbytes if fetch else 0, run=lambda: None,
                  bandwidth=self.transfers["fetch"])

        def run() -> None:
            resolved = fetch or self._resolve(name, entry)
            job.nbytes = resolved.nbytes
            # What landed (a conversion's size is an estimate until then): the job's bytes,
            # its bandwidth sample and the metrics' fetched bytes count that.
            job.nbytes = ssd.store(name, resolved.nbytes, resolved.write).bytes

        job.run = run
        return self.queues["ssd"].submit(job)

    def _resolve(self, name: str, entry: ModelEntry):
        try:
            f = self.config.fetch
            return resolve_fetch(entry.source, entry.revision, FetchLimits(
                deadline_s=f.deadline_s, index_deadline_s=f.index_deadline_s,
                index_bytes=int(f.index_bytes), side_file_bytes=int(f.side_file_bytes)))
        except SourceError as e:
            raise NodeError(f"{name}: source {public_source(entry.source)!r} cannot be used: {e}",
                            getattr(e, "status", 422)) from None

    def _promote(self, name: str) -> Job:
        ssd, dram = self.tiers["ssd"], self.tiers["dram"]
        if not ssd.has(name):
            raise NodeError(f"{name} is not in the ssd tier; prefetch it first", 409)
        nbytes = ssd.size_of(name)
        if nbytes > dram.capacity:
            raise NodeError(f"{name} needs {nbytes / 1e9:.3f} GB; the dram tier holds "
                            f"{dram.capacity / 1e9:.3f} GB", 413)

        def run() -> None:
            source = ssd.acquire(name)
            try:
                dram.store(name, nbytes, lambda dst: copy_checkpoint(source, dst))
            finally:
                ssd.release(name)

        return self.queues["dram"].submit(
            Job("promote", name, "dram", nbytes, run=run, bandwidth=self.transfers["promote"]))

    def job(self, job_id: int) -> Job:
        for q in self.queues.values():
            job = q.get(job_id)
            if job is not None:
                return job
        raise NodeError(f"no job {job_id}", 404)

    def evict(self, name: str, tier: str, force: bool = False) -> int:
        check_model_name(name)
        try:
            return self._tier(tier).evict(name, force=force)
        except TierError as e:
            raise NodeError(str(e), e.status) from None

    def pin(self, name: str, tier: str, pinned: bool) -> None:
        check_model_name(name)
        try:
            self._tier(tier).pin(name, pinned)
        except TierError as e:
            raise NodeError(str(e), e.status) from None

    # -- replicas ---------------------------------------------------------------------------

    def start_replica(self, name: str, devices: list[str] | None = None, count: int = 1,
                      args: list[str] | None = None, tier: str | None = None,
                      standby: bool = True) -> Replica:
        """Start a replica; it loads from `tier` (default: the fastest that holds the model,
        after promoting it into DRAM when `promote_on_start` and it fits).

        With `standby` (and no `devices` named), an idle standby engine is used first: one that
        still holds the model (served at once), else the least recently used one of the
        model's engine key (given the model's weights by a swap). Otherwise a new process
        starts, on free devices or on those of standbys that give way (least recently used
        first)."""
        self._known(name)
        if tier is not None:
            self._tier(tier)
        untrusted = _check_args(list(args or []), "args")
        entry = self.models.get(name)
        trusted: list[str] = []
        if entry is not None and name in self._trusted:
            trusted = list(entry.replica_args)
        elif entry is not None:  # registered through the API (maybe by an older version)
            untrusted = [*_check_args(entry.replica_args, f"model {name}'s replica_args"),
                         *untrusted]
        with self._lock:
            note = ""
            if standby and not devices:
                kept, note = self._standby_for(name, untrusted, trusted, count)
                if kept is not None:
                    self._claim(kept, name)
                    threading.Thread(target=self._take_over_and_count, args=(kept, name, tier),
                                     daemon=True, name=f"sllm-replica-{kept.id}-swap").start()
                    return kept
            chosen, victims = self._assign(devices, count)
            replica = Replica(model=name, devices=chosen)
            replica.note = note
            for d in chosen:
                self.assigned[d.name] = replica.id
            self.replicas[replica.id] = replica
        if note:
            logger.info("replica %d of %s: %s", replica.id, name, note)
        threading.Thread(target=self._bring_up_and_count,
                         args=(replica, untrusted, trusted, tier, victims),
                         daemon=True,
                         name=f"sllm-replica-{replica.id}-start").start()
        return replica

    def _assign(self, wanted: list[str] | None,
                count: int) -> tuple[list[Device], list[Replica]]:
        """Devices for a new replica, and the standbys that give way for it (least recently
        used first; the caller stops them before the replica starts)."""
        standbys = self.standbys()
        held = {d.name: r for r in standbys for d in r.devices}
        free = [d for d in self.devices if d.name not in self.assigned]
        if wanted:
            chosen = []
            for text in wanted:
                try:
                    device = parse_device(text)
                except ValueError as e:
                    raise NodeError(str(e), 400) from None
                if device not in self.devices:
                    raise NodeError(f"device {text} is not on this node; it has "
                                    f"{[d.name for d in self.devices]}", 400)
                if device.name in self.assigned and device.name not in held:
                    raise NodeError(f"device {text} is in use by replica "
                                    f"{self.assigned[device.name]}", 409)
                chosen.append(device)
        else:
            if count < 1 or count > len(self.devices):
                raise NodeError(f"a replica needs 1 to {len(self.devices)} devices here, "
                                f"not {count}", 400)
            givable = [d for r in standbys for d in r.devices]
            if len(free) + len(givable) < count:
                raise NodeError(f"{count} free device(s) needed, {len(free)} free: in use "
                                f"{sorted(self.assigned)}", 409)
            chosen = (free + givable)[:count]
        victims = list({id(r): r for d in chosen if (r := held.get(d.name))}.values())
        for victim in victims:
            victim.state = "stopping"  # no longer a standby anyone may claim
            logger.info("standby engine %d (%s) gives way for a new replica", victim.id,
                        victim.model)
        return chosen, victims

    def _bring_up_and_count(self, replica: Replica, untrusted: list[str], trusted: list[str],
                            tier: str | None, victims: list[Replica]) -> None:
        """Stop the standbys giving way, `_bring_up`, then observe the start's phases once it
        has settled."""
        for victim in victims:
            self.launcher.stop(victim)
        self._bring_up(replica, untrusted, trusted, tier)
        replica.ready.wait()  # set when ready, and when it failed or stopped before
        self.metrics.replica_settled(replica)

    def _stage(self, replica: Replica, name: str, tier: str | None) -> str:
        """Get `name` into `tier` (default: the fastest that can take it, promoting into DRAM
        when `promote_on_start` and it fits); returns the tier it loads from."""
        filled = False
        queued = running = 0.0
        if tier is not None:
            if not self.tiers[tier].has(name):
                replica.state, filled = "fetching", True
                queued, running, _ = self.ensure(name, tier)
        elif not self.tiers.get("dram") or not self.tiers["dram"].has(name):
            if not self.tiers["ssd"].has(name):
                replica.state, filled = "fetching", True
                queued, running, _ = self.ensure(name, "ssd")
            if self._can_promote(name):
                replica.state, filled = "fetching", True
                q, r, _ = self.ensure(name, "dram")
                queued, running = queued + q, running + r
        replica.phases.update(queue=queued, fetch=running)
        tier = tier or next(t for t in TIER_ORDER if t in self.tiers and self.tiers[t].has(name))
        if not filled:  # no tier to fill (misses: counted by `ensure`)
            self.metrics.lookup(tier, hit=True)
        return tier

    def _bring_up(self, replica: Replica, untrusted: list[str], trusted: list[str],
                  tier: str | None) -> None:
        """Get the model into the fastest tier that can take it, then launch the replica."""
        name = replica.model
        try:
            tier = self._stage(replica, name, tier)
            if replica.state == "stopped":  # stopped while its model was being fetched
                self._release(replica)
                replica.finished.set()
                replica.ready.set()
                return
            replica.tier = tier
            replica.path = str(self.tiers[tier].acquire(name))
            replica.holds_tier = True
            self.launcher.launch(replica, untrusted, trusted)
            replica.shape = engine_key(replica.path, self.launcher.argv(replica, untrusted,
                                                                        trusted))
        except Exception as e:  # reported on the replica; the daemon goes on
            replica.state, replica.error = "failed", str(e)
            self._release(replica)
            replica.finished.set()
            replica.ready.set()

    def _can_promote(self, name: str) -> bool:
        dram = self.tiers.get("dram")
        return (dram is not None and self.config.promote_on_start
                and self.tiers["ssd"].size_of(name) <= dram.capacity)

    def wait_replica(self, replica_id: int, timeout: float | None) -> Replica:
        replica = self.replica(replica_id)
        replica.ready.wait(timeout)
        return replica

    def replica(self, replica_id: int) -> Replica:
        replica = self.replicas.get(replica_id)
        if replica is None:
            raise NodeError(f"no replica {replica_id}", 404)
        return replica

    def stop_replica(self, replica_id: int, standby: bool = False) -> Replica:
        """Stop a replica; with `standby`, keep its engine as a standby instead where the
        node's standby policy allows (`standby_on_expiry`, the bounds)."""
        replica = self.replica(replica_id)
        if standby and self.config.standby_on_expiry and self._keep(replica):
            return replica
        self.launcher.stop(replica)
        if replica.process is None:  # never launched (still fetching, or failed)
            replica.state = "stopped" if replica.state != "failed" else replica.state
            self._release(replica)
        return replica

    def _release(self, replica: Replica) -> None:
        with self._lock:
            for d in replica.devices:
                if self.assigned.get(d.name) == replica.id:
                    del self.assigned[d.name]
            self._release_tier(replica)

    def _release_tier(self, replica: Replica) -> None:
        """The replica no longer needs its tier copy to stay (it has loaded, or ended)."""
        with self._lock:
            if replica.holds_tier and replica.tier in self.tiers:
                replica.holds_tier = False
                self.tiers[replica.tier].release(replica.model)

    def _on_load(self, replica: Replica, gb: float, seconds: float, tier: str) -> None:
        if tier in self.tiers:
            self.tiers[tier].bandwidth.observe(int(gb * 1e9), seconds)
        self._release_tier(replica)

    def _on_end(self, replica: Replica) -> None:
        self._release(replica)

    # -- standby engines (standby.py) -----------------------------------------------------

    def standby_limits(self) -> tuple[int, int]:
        """(engines, bytes of host memory) standbys may hold together."""
        engines = self.config.standby_max
        memory = self.config.standby_memory
        return (len(self.devices) if engines is None else engines,
                memory_bytes() // 2 if memory is None else int(memory))

    def standbys(self) -> list[Replica]:
        """Idle standby engines, least recently used first."""
        return sorted((r for r in self.replicas.values() if r.state == "standby"),
                      key=lambda r: r.standby_since or 0.0)

    def _request_key(self, name: str, untrusted: list[str], trusted: list[str],
                     devices: list[Device]) -> str | None:
        """The engine key a replica of `name` with these flags on `devices` would have; None
        when no tier holds a swappable (hf-layout) copy of it now."""
        tier = next((self.tiers[t] for t in TIER_ORDER if t in self.tiers
                     and self.tiers[t].has(name)), None)
        if tier is None:
            return None
        path = str(tier.path_of(name))
        if not takes_swaps(path):
            return None
        probe = Replica(model=name, devices=devices, id=0, api_key="", control_key="")
        probe.path, probe.port = path, 0
        return engine_key(path, self.launcher.argv(probe, untrusted, trusted))

    def _standby_for(self, name: str, untrusted: list[str], trusted: list[str],
                     count: int) -> tuple[Replica | None, str]:
        """A standby to serve `name`: one still holding it with the same flags (most recently
        kept first), else the least recently used of its engine key. Else (None, why not)."""
        fits = [r for r in self.standbys() if len(r.devices) == count]
        args = (tuple(untrusted), tuple(trusted))
        for kept in reversed(fits):
            if kept.model == name and kept.launch_args == args:
                return kept, ""
        others = []
        for kept in fits:
            key = self._request_key(name, untrusted, trusted, kept.devices) \
                if kept.swappable and kept.shape else None
            if key is not None and key == kept.shape:
                return kept, ""
            others.append(f"{kept.id} ({kept.model})")
        if not others:
            return None, ""
        return None, (f"cold start: no standby engine of its engine shape (standby "
                      f"{', '.join(others)} cannot take it: another shape, flags or layout)")

    def _claim(self, replica: Replica, name: str) -> None:
        """Take `replica` out of the standbys for `name` (under the node's lock)."""
        replica.state = "swapping"
        replica.ready = threading.Event()
        replica.created = time.time()
        replica.phases, replica.error, replica.note = {}, None, ""
        replica.started_via = "standby" if replica.model == name else "swap"
        replica.mark("claimed")

    def _take_over_and_count(self, replica: Replica, name: str, tier: str | None) -> None:
        self._take_over(replica, name, tier)
        self.metrics.replica_settled(replica)

    def _take_over(self, replica: Replica, name: str, tier: str | None) -> None:
        """Make a claimed standby serve `name`: at once if it holds it, else by a swap. A swap
        that fails stops the engine (it may hold partial weights): it never serves."""
        control = replica.controller()
        try:
            if replica.started_via == "swap":
                tier = self._stage(replica, name, tier)
                replica.state = "swapping"
                path = self.tiers[tier].acquire(name)
                try:
                    control.hold("")
                    report = control.swap(str(path), tier, self.config.swap_timeout_s,
                                          asleep=replica.asleep)
                    replica.asleep = False
                finally:
                    self.tiers[tier].release(name)
                replica.model, replica.path, replica.tier = name, str(path), tier
                replica.loaded_gb = report.bytes / 1e9
                replica.phases.update(load=report.load_s, swap=report.control_s)
                self.metrics.swapped("swap")
            elif replica.asleep:
                control.wake()
                replica.asleep = False
            control.hold(name)
        except (SwapFailed, NodeError, TierError, OSError) as e:
            kind = "refused" if isinstance(e, SwapFailed) and e.intact else "failed"
            self.metrics.swapped(kind)
            replica.failing = True
            replica.error = (f"swapping {name} into standby engine {replica.id} "
                             f"({replica.model}) failed: {e}; the engine was stopped")
            logger.warning("%s", replica.error)
            self.launcher.stop(replica)
            return
        replica.mark("ready")
        replica.phases.setdefault("swap", replica.marks["ready"] - replica.created)
        replica.phases["total"] = replica.marks["ready"] - replica.created
        if replica.started_via == "standby":
            self.metrics.swapped("claim")
        replica.standby_since = None
        replica.state = "ready"
        replica.ready.set()
        logger.info("replica %d serves %s by %s in %.3f s", replica.id, name,
                    replica.started_via, replica.phases["total"])

    def _keep(self, replica: Replica) -> bool:
        """Turn a ready replica into a standby (its guard then serves nothing); False where it
        cannot be kept (not ready, no room under the bounds, its guard unreachable)."""
        engines, _ = self.standby_limits()
        if replica.state != "ready" or engines < 1 or replica.process is None \
                or replica.process.poll() is not None:
            return False
        try:
            replica.controller().hold("")
            if replica.sleeps:
                replica.controller().sleep()
                replica.asleep = True
        except SwapFailed as e:
            logger.warning("replica %d cannot become a standby (%s); stopped", replica.id, e)
            return False
        replica.state, replica.standby_since = "standby", time.time()
        logger.info("replica %d (%s) is a standby engine now", replica.id, replica.model)
        self._trim_standbys()
        return True

    def _trim_standbys(self) -> None:
        """Stop the least recently used standbys beyond `standby_max` engines or
        `standby_memory` bytes."""
        engines, memory = self.standby_limits()
        with self._lock:
            kept = self.standbys()
            held = {r.id: group_memory_bytes(r.pid) if r.pid else 0 for r in kept}
            over = []
            while kept and (len(kept) > engines or sum(held[r.id] for r in kept) > memory):
                victim = kept.pop(0)
                victim.state = "stopping"
                over.append(victim)
        for victim in over:
            logger.info("standby engine %d (%s) stopped: over the standby bounds (%d engines, "
                        "%.1f GB)", victim.id, victim.model, engines, memory / 1e9)
            self.launcher.stop(victim)

    def _start_configured_standbys(self) -> None:
        """The `standby:` engines of the configuration: started like replicas, then kept."""
        for entry in self.config.standby:
            for _ in range(entry.count):
                try:
                    replica = self.start_replica(entry.like, standby=False)
                except NodeError as e:
                    self.notes.append(f"standby engine like {entry.like}: {e}")
                    logger.warning("%s", self.notes[-1])
                    return
                replica.ready.wait()
                if not self._keep(replica):
                    self.notes.append(f"standby engine like {entry.like} did not start: "
                                      f"{(replica.error or replica.state).splitlines()[0]}")
                    logger.warning("%s", self.notes[-1])
                    if replica.state == "ready":
                        self.launcher.stop(replica)

    def standby_status(self) -> dict:
        engines, memory = self.standby_limits()
        kept = [{"id": r.id, "shape": r.shape, "model": r.model,
                 "devices": [d.name for d in r.devices],
                 "memory_bytes": group_memory_bytes(r.pid) if r.pid else 0,
                 "since": r.standby_since} for r in self.standbys()]
        return {"engines": kept, "memory_bytes": sum(k["memory_bytes"] for k in kept),
                "max_engines": engines, "max_memory_bytes": memory,
                "on_expiry": self.config.standby_on_expiry}

    def model_shape(self, name: str) -> str | None:
        """The engine key of a replica of `name` with its configured flags on one device."""
        entry = self.models.get(name)
        trusted = list(entry.replica_args) if entry is not None and name in self._trusted else []
        untrusted = [] if name in self._trusted or entry is None else list(entry.replica_args)
        return self._request_key(name, untrusted, trusted, self.devices[:1])

    # -- status ---------------------------------------------------------------------------

    def status(self) -> dict:
        tiers = []
        # One engine key per model, though it may be in two tiers (each costs a command line).
        shapes = {e.name: None for tier in self.tiers.values() for e in tier.entries()}
        shapes = {name: self.model_shape(name) for name in shapes}
        for name, tier in self.tiers.items():
            bw = tier.bandwidth.report()
            q = self.queues[name]
            tiers.append({
                "name": name, "path": str(tier.path), "capacity_bytes": tier.capacity,
                "huge_pages": has_huge_pages(tier.path),
                "used_bytes": tier.used(),
                "read_gbps": bw.gbps, "calibrated_gbps": bw.calibrated_gbps,
                "observed_gbps": bw.observed_gbps, "observed_loads": bw.samples,
                "queue": [j.describe() for j in q.active()], "queue_drain_s": q.drain_s(),
                "models": [{"name": e.name, "bytes": e.bytes, "last_used": e.last_used,
                            "pinned": e.pinned, "in_use": e.in_use,
                            "shape": shapes.get(e.name)}
                           for e in sorted(tier.entries(), key=lambda e: e.name)],
            })
        transfers = {k: v.report().gbps for k, v in self.transfers.items()}
        return {
            "node": os.uname().nodename, "started": self.started, "advertise": self.advertise,
            "devices": [{"name": d.name, "replica": self.assigned.get(d.name)}
                        for d in self.devices],
            "tiers": tiers, "transfer_gbps": transfers,
            "models": self.public_models(),
            "replicas": [r.describe() for r in self.replicas.values()],
            "standby": self.standby_status(),
            "notes": self.notes,
        }

    # -- registry persistence --------------------------------------------------------------

    def _registry_path(self) -> Path:
        return self.state_dir / "models.json"

    def _load_registry(self) -> None:
        """The models registered through the API before a restart: never trusted (a model the
        configuration names keeps the configuration's entry)."""
        try:
            saved = json.loads(read_private(self._registry_path()) or b"{}")
            if not isinstance(saved, dict):
                raise ValueError("not a mapping")
        except (OSError, ValueError) as e:
            logger.warning("%s: ignored (%s)", self._registry_path(), e)
            return
        for name, raw in saved.items():
            if name in self.config.models:
                continue
            try:
                check_model_name(name)
                self.models[name] = ModelEntry.model_validate(raw)
            except ValueError as e:
                logger.warning("%s: entry %r ignored (%s)", self._registry_path(), name[:100],
                               str(e).splitlines()[0])

    def _save_registry(self) -> None:
        """Keep the API's registrations (only those: the configuration keeps its own)."""
        api = {n: m.model_dump() for n, m in self.models.items() if n not in self._trusted}
        write_atomic(self._registry_path(), json.dumps(api, indent=1).encode())


def _check_args(args: list[str], where: str) -> list[str]:
    try:
        return check_api_args(args, where)
    except ReplicaArgsError as e:
        raise NodeError(str(e), 400) from None


def public_source(source: str) -> str:
    """A source as it may be shown without authentication: a URL without its credentials,
    query or fragment (a signed URL carries its key there)."""
    if not source.startswith(("http://", "https://")):
        return source
    parts = urllib.parse.urlsplit(source)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    try:
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        port = ""
    return urllib.parse.urlunsplit((parts.scheme, host + port, parts.path, "", ""))


def _is_local(source: str) -> bool:
    """A local path (resolved at once) rather than a URL or a hub id (resolved in the job)."""
    if source.startswith(("http://", "https://")):
        return False
    return source.startswith(("/", ".", "~")) or Path(source).exists()


__all__ = ["Node", "NodeError", "NotInTier", "ReplicaError"]
