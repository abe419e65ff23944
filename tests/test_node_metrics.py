"""The node daemon's Prometheus metrics (`GET /metrics`): exact values after real prefetches,
promotions, evictions and replica attempts, on real daemons on loopback.

Replicas here need only to start and fail, so their command is tests/argv_replica.py.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from node_daemon import TOKEN, GatedCheckpointServer, NodeDaemon
from prometheus_client.parser import text_string_to_metric_families

from sllm_plugin import convert
from sllm_plugin.store.metrics import PHASES, REPLICA_STATES
from sllm_plugin.store.tiers import directory_bytes

HERE = Path(__file__).resolve().parent
ARGV_REPLICA = [sys.executable, str(HERE / "argv_replica.py")]
OPERATOR_SECRET = "operator-secret-api-key-42"
MODEL_SECRET = "model-secret-api-key-77"


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    """Two tiny Llamas of equal size: org/m0 in Hugging Face layout (converted when fetched),
    org/m1 an sllm checkpoint already (copied when fetched)."""
    from sllm_plugin.testing import make_random_model

    root = tmp_path_factory.mktemp("metrics-models")
    hf = [make_random_model(root / f"hf{i}", "tiny-llama", seed=i) for i in range(2)]
    return {"org/m0": hf[0], "org/m1": convert(hf[1], root / "m1", quiet=True)}


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(node: NodeDaemon) -> tuple[str, Samples]:
    """GET /metrics without a token; its text and {(sample name, sorted labels): value}."""
    r = node.client.get("/metrics")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    samples: Samples = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            key = (s.name, tuple(sorted(s.labels.items())))
            assert key not in samples, key
            samples[key] = s.value
    return r.text, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def tier_models(node: NodeDaemon, tier: str) -> dict[str, int]:
    return {m["name"]: m["bytes"] for m in node.tier(tier)["models"]}


def test_metrics_count_hits_misses_evictions_transfers_and_failed_replicas(tmp_path, sources):
    size = directory_bytes(sources["org/m1"])  # both models take this much in a tier
    argv_out = tmp_path / "argv.json"
    config = {
        "ssd": {"path": str(tmp_path / "ssd"), "capacity": 10**9},
        "dram": {"path": str(tmp_path / "dram"), "capacity": size * 3 // 2},  # one model
        "devices": ["cpu:0"], "calibration_bytes": 1024 * 1024,
        "replica_command": ARGV_REPLICA, "replica_env": {"ARGV_OUT": str(argv_out)},
        "replica_args": ["--hf-token", OPERATOR_SECRET],
        "models": {"org/m0": {"source": str(sources["org/m0"]),
                              "replica_args": ["--hf-token", MODEL_SECRET]},
                   "org/m1": {"source": str(sources["org/m1"])}},
    }

    def counts(samples: Samples, name: str, tiers=("ssd", "dram")) -> dict[str, float]:
        return {t: value(samples, name, tier=t) for t in tiers}

    with NodeDaemon(tmp_path, config) as node:
        _, m = scrape(node)
        assert counts(m, "sllm_node_cache_hits_total") == {"ssd": 0, "dram": 0}
        assert counts(m, "sllm_node_cache_misses_total") == {"ssd": 0, "dram": 0}
        assert counts(m, "sllm_node_tier_used_bytes") == {"ssd": 0, "dram": 0}
        assert counts(m, "sllm_node_tier_capacity_bytes") == {"ssd": 10**9, "dram": size * 3 // 2}
        assert {s: value(m, "sllm_node_replicas", state=s) for s in REPLICA_STATES} == dict.fromkeys(
            REPLICA_STATES, 0)

        # A fetch into ssd (a conversion: its size is known only once written): a miss.
        node.ok("POST", "/prefetch", {"model": "org/m0", "wait": True})
        assert tier_models(node, "ssd") == {"org/m0": size}
        _, m = scrape(node)
        assert counts(m, "sllm_node_tier_used_bytes") == {"ssd": size, "dram": 0}
        assert counts(m, "sllm_node_tier_models") == {"ssd": 1, "dram": 0}
        assert counts(m, "sllm_node_cache_misses_total") == {"ssd": 1, "dram": 0}
        assert counts(m, "sllm_node_cache_hits_total") == {"ssd": 0, "dram": 0}
        assert value(m, "sllm_node_transferred_bytes_total", kind="fetch") == size
        assert value(m, "sllm_node_jobs_total", kind="fetch", outcome="done") == 1

        # Again: a hit. Then a promotion into dram: a miss there.
        assert node.ok("POST", "/prefetch", {"model": "org/m0"}) == {"state": "present"}
        node.ok("POST", "/prefetch", {"model": "org/m0", "tier": "dram", "wait": True})
        node.ok("POST", "/pin", {"model": "org/m0", "tier": "ssd"})
        _, m = scrape(node)
        assert counts(m, "sllm_node_cache_hits_total") == {"ssd": 1, "dram": 0}
        assert counts(m, "sllm_node_cache_misses_total") == {"ssd": 1, "dram": 1}
        assert counts(m, "sllm_node_tier_used_bytes") == {"ssd": size, "dram": size}
        assert counts(m, "sllm_node_tier_models") == {"ssd": 1, "dram": 1}
        assert counts(m, "sllm_node_tier_pinned_models") == {"ssd": 1, "dram": 0}
        assert value(m, "sllm_node_transferred_bytes_total", kind="promote") == size

        # org/m1 into dram: fetched into ssd first (a miss in both), and org/m0 evicted from
        # dram to make room.
        node.ok("POST", "/prefetch", {"model": "org/m1", "tier": "dram", "wait": True})
        assert tier_models(node, "dram") == {"org/m1": size}
        _, m = scrape(node)
        assert counts(m, "sllm_node_cache_misses_total") == {"ssd": 2, "dram": 2}
        assert counts(m, "sllm_node_tier_models") == {"ssd": 2, "dram": 1}
        assert value(m, "sllm_node_evictions_total", tier="dram", reason="capacity") == 1
        assert value(m, "sllm_node_evicted_bytes_total", tier="dram", reason="capacity") == size
        assert value(m, "sllm_node_evictions_total", tier="dram", reason="request") == 0
        assert value(m, "sllm_node_transferred_bytes_total", kind="fetch") == 2 * size
        assert value(m, "sllm_node_jobs_total", kind="promote", outcome="done") == 2

        node.ok("POST", "/evict", {"model": "org/m1", "tier": "dram"})
        _, m = scrape(node)
        assert value(m, "sllm_node_evictions_total", tier="dram", reason="request") == 1
        assert value(m, "sllm_node_evicted_bytes_total", tier="dram", reason="request") == size
        assert counts(m, "sllm_node_tier_used_bytes") == {"ssd": 2 * size, "dram": 0}
        assert counts(m, "sllm_node_tier_models") == {"ssd": 2, "dram": 0}

        # Two replica attempts, both failing (the stand-in exits 3): the first promotes
        # org/m0 into dram (a miss), the second loads from ssd as it is (a hit).
        for tier in (None, "ssd"):
            r = node.call("POST", "/replicas", {"model": "org/m0", "tier": tier, "wait": True})
            assert r.status_code == 422 and "exited with code 3" in r.text, r.text
        text, m = scrape(node)
        assert counts(m, "sllm_node_cache_hits_total") == {"ssd": 2, "dram": 0}
        assert counts(m, "sllm_node_cache_misses_total") == {"ssd": 2, "dram": 3}
        assert {s: value(m, "sllm_node_replicas", state=s) for s in REPLICA_STATES} == {
            **dict.fromkeys(REPLICA_STATES, 0), "failed": 2}
        assert value(m, "sllm_node_replicas_starting") == 0
        assert value(m, "sllm_node_devices", state="free") == 1
        replicas = node.ok("GET", "/replicas")
        for phase in PHASES:  # the phases a failed start reports, each observed once
            reported = [r["phases"][phase] for r in replicas if phase in r["phases"]]
            assert value(m, "sllm_node_replica_phase_seconds_count", phase=phase) == len(
                reported), phase
            assert value(m, "sllm_node_replica_phase_seconds_sum", phase=phase) == sum(reported)
        assert value(m, "sllm_node_replica_phase_seconds_count", phase="fetch") == 2
        assert value(m, "sllm_node_replica_phase_seconds_count", phase="total") == 0

        # The bandwidths are /status's.
        status = node.status()
        read = {t["name"]: t["read_gbps"] for t in status["tiers"]}
        assert read["ssd"] is not None
        assert {t: value(m, "sllm_node_tier_read_gbps", tier=t)
                for t in read if read[t] is not None} == {
                    t: g for t, g in read.items() if g is not None}
        assert status["transfer_gbps"]["fetch"] and status["transfer_gbps"]["promote"]
        assert {k: value(m, "sllm_node_transfer_gbps", kind=k)
                for k in status["transfer_gbps"]} == status["transfer_gbps"]

        # Open, like the other reads, and without secrets: no token, no replica flags, no
        # sources, no model names (labels are tiers, kinds, states and phases only).
        argv = json.loads(argv_out.read_text())
        assert OPERATOR_SECRET in argv  # what the replica was given, and /metrics must not show
        for secret in (TOKEN, OPERATOR_SECRET, MODEL_SECRET, "--hf-token", "org/m0",
                       str(sources["org/m0"]), str(tmp_path)):
            assert secret not in text, secret
        r = node.client.get("/metrics", headers={"Authorization": "Bearer wrong-token"})
        assert r.status_code == 200


def test_metrics_show_jobs_queued_and_running_and_replicas_starting(tmp_path, sources):
    """A download held half way (a real HTTP server): one fetch running, one queued behind
    it, a replica waiting for the second; then everything settles."""
    with GatedCheckpointServer(sources["org/m1"]) as remote:
        config = {
            "ssd": {"path": str(tmp_path / "ssd"), "capacity": 10**9}, "dram": None,
            "devices": ["cpu:0"], "calibration_bytes": 1024 * 1024,
            "replica_command": ARGV_REPLICA,
            "replica_env": {"ARGV_OUT": str(tmp_path / "argv.json")},
            "models": {"org/remote": {"source": remote.url},
                       "org/m0": {"source": str(sources["org/m0"])}},
        }
        remote.gate.clear()
        with NodeDaemon(tmp_path, config) as node:
            node.ok("POST", "/prefetch", {"model": "org/remote"})
            assert remote.half_sent.wait(60)
            node.ok("POST", "/prefetch", {"model": "org/m0"})
            node.ok("POST", "/replicas", {"model": "org/m0"})  # waits for org/m0
            _, m = scrape(node)
            assert {(k, s): value(m, "sllm_node_jobs_active", kind=k, state=s)
                    for k in ("fetch", "promote") for s in ("queued", "running")} == {
                        ("fetch", "queued"): 1, ("fetch", "running"): 1,
                        ("promote", "queued"): 0, ("promote", "running"): 0}
            assert value(m, "sllm_node_replicas_starting") == 1
            assert (value(m, "sllm_node_replicas", state="queued")
                    + value(m, "sllm_node_replicas", state="fetching")) == 1
            assert value(m, "sllm_node_devices", state="assigned") == 1
            assert value(m, "sllm_node_tier_used_bytes", tier="ssd") > 0  # reserved room
            assert value(m, "sllm_node_tier_models", tier="ssd") == 0

            remote.gate.set()
            for model in ("org/remote", "org/m0"):
                node.ok("POST", "/prefetch", {"model": model, "wait": True})
            _, m = scrape(node)
            assert value(m, "sllm_node_jobs_active", kind="fetch", state="queued") == 0
            assert value(m, "sllm_node_jobs_active", kind="fetch", state="running") == 0
            assert value(m, "sllm_node_jobs_total", kind="fetch", outcome="done") == 2
            assert value(m, "sllm_node_transferred_bytes_total", kind="fetch") == sum(
                tier_models(node, "ssd").values())
            assert value(m, "sllm_node_tier_models", tier="ssd") == 2


def test_each_node_has_its_own_registry_and_phases_are_observed_once(tmp_path):
    """In one process (as the tests and the benchmark run nodes): two nodes, two registries;
    a replica's phases are observed once, whoever observes first."""
    from sllm_plugin.store.config import NodeConfig
    from sllm_plugin.store.node import Node
    from sllm_plugin.store.replicas import Replica, parse_device

    token = tmp_path / "token"
    fd = os.open(token, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, TOKEN.encode() + b"\n")
    os.close(fd)
    nodes = [Node(NodeConfig(state_dir=tmp_path / f"state{i}", token_file=token, dram=None,
                             ssd={"path": tmp_path / f"ssd{i}", "capacity": 10**6 * (i + 1)},
                             devices=["cpu:0"]))
             for i in range(2)]
    try:
        replica, settled, starting = (Replica(model="org/m", devices=[parse_device("cpu:0")])
                                      for _ in range(3))
        replica.phases.update(queue=0.004, fetch=1.5, process_start=3.0, load=0.2,
                              engine_init=700.0, total=705.0)
        settled.phases.update(queue=2.0, fetch=0.5)
        starting.phases.update(queue=1.0, fetch=1.0)  # its start goes on: not observed yet
        for r in (replica, settled, starting):
            nodes[0].replicas[r.id] = r
        nodes[0].metrics.replica_settled(replica)
        nodes[0].metrics.replica_settled(replica)
        # A scrape observes the settled replicas its start-up thread has not observed yet.
        replica.ready.set()
        settled.ready.set()

        def scrape_in_process() -> list[Samples]:
            return [{(s.name, tuple(sorted(s.labels.items()))): s.value
                     for f in text_string_to_metric_families(n.metrics.exposition().decode())
                     for s in f.samples} for n in nodes]

        scrape_in_process()
        samples = scrape_in_process()
        for phase, seconds in replica.phases.items():
            count = 1 + (phase in settled.phases)
            assert value(samples[0], "sllm_node_replica_phase_seconds_count",
                         phase=phase) == count
            assert value(samples[0], "sllm_node_replica_phase_seconds_sum",
                         phase=phase) == seconds + settled.phases.get(phase, 0)
            assert value(samples[1], "sllm_node_replica_phase_seconds_count", phase=phase) == 0
        bucket = "sllm_node_replica_phase_seconds_bucket"
        assert value(samples[0], bucket, phase="queue", le="0.01") == 1
        assert value(samples[0], bucket, phase="engine_init", le="600.0") == 0
        assert value(samples[0], bucket, phase="engine_init", le="1800.0") == 1
        assert [value(s, "sllm_node_tier_capacity_bytes", tier="ssd") for s in samples] == [
            10**6, 2 * 10**6]
        assert value(samples[0], "sllm_node_replicas", state="queued") == 3
        assert value(samples[0], "sllm_node_replicas_starting") == 3
        assert value(samples[1], "sllm_node_replicas", state="queued") == 0
    finally:
        for node in nodes:
            node.close()
