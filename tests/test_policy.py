"""The router's placement, routing and migration cost decisions on constructed cluster states."""

from __future__ import annotations

import pytest

from sllm_plugin.router.policy import (
    MigrationModel,
    NodeView,
    ReplicaView,
    RouteWeights,
    TierView,
    place,
    route,
    startup_estimate,
)
from sllm_plugin.router.prefix import PrefixIndex, prompt_blocks

GB = 10**9


def node(name: str, free: int = 1, dram: set[str] = frozenset(), ssd: set[str] = frozenset(),
         dram_gbps: float = 10.0, ssd_gbps: float = 1.0, dram_wait: float = 0.0,
         ssd_wait: float = 0.0, fetch_gbps: float | None = 0.5,
         replicas: tuple[ReplicaView, ...] = ()) -> NodeView:
    return NodeView(name, free, (TierView("dram", dram_gbps, dram_wait, frozenset(dram)),
                                 TierView("ssd", ssd_gbps, ssd_wait, frozenset(ssd))),
                    fetch_gbps, replicas)


def test_estimate_reads_from_the_best_tier_holding_the_model():
    n = node("a", dram={"m"}, ssd={"m", "other"}, dram_wait=0.5)
    est = startup_estimate(n, "m", 4 * GB)
    assert est.tier == "dram" and est.seconds == pytest.approx(0.5 + 4 / 10)
    est = startup_estimate(n, "other", 4 * GB)
    assert est.tier == "ssd" and est.seconds == pytest.approx(4 / 1.0)
    est = startup_estimate(n, "new", 4 * GB)  # fetched, then read from ssd
    assert est.tier == "remote" and est.seconds == pytest.approx(4 / 0.5 + 4 / 1.0)


def test_placement_prefers_the_node_whose_dram_holds_the_model():
    nodes = [node("ssd-node", ssd={"m"}), node("dram-node", dram={"m"}), node("empty")]
    chosen = place("m", 2 * GB, nodes, MigrationModel())
    assert chosen is not None and chosen.node == "dram-node" and not chosen.free_replicas
    assert "dram" in chosen.reason


def test_a_long_load_queue_makes_dram_lose_to_an_idle_ssd():
    nodes = [node("busy-dram", dram={"m"}, dram_wait=30.0), node("idle-ssd", ssd={"m"})]
    assert place("m", 2 * GB, nodes, MigrationModel()).node == "idle-ssd"


def test_bandwidths_come_from_the_nodes_not_constants():
    slow = node("slow-ssd", ssd={"m"}, ssd_gbps=0.2)
    fast = node("fast-ssd", ssd={"m"}, ssd_gbps=3.0)
    assert place("m", GB, [slow, fast], MigrationModel()).node == "fast-ssd"
    assert place("m", GB, [node("slow-ssd", ssd={"m"}, ssd_gbps=5.0), fast],
                 MigrationModel()).node == "slow-ssd"


def test_unhealthy_and_full_nodes_are_skipped_and_none_means_no_capacity():
    down = NodeView("down", 1, (TierView("dram", 10.0, 0.0, frozenset({"m"})),), healthy=False)
    full = node("full", free=0, dram={"m"})
    assert place("m", GB, [down, full], MigrationModel()) is None
    assert place("m", GB, [down, full, node("far")], MigrationModel()).node == "far"


def test_freeing_a_busy_node_wins_when_migration_is_cheaper_than_loading_elsewhere():
    victim = ReplicaView("busy/1", "busy", "other", True, running=2, tokens_in_flight=500)
    elsewhere = ReplicaView("spare/1", "spare", "other", True, running=3, tokens_in_flight=3000)
    busy = node("busy", free=0, dram={"m"}, replicas=(victim,))
    far = node("far", ssd=set(), fetch_gbps=0.1)  # would have to fetch 4 GB at 0.1 GB/s
    spare = node("spare", free=0, replicas=(elsewhere,))
    migration = MigrationModel(per_token_s=0.001, fixed_s=0.1)
    chosen = place("m", 4 * GB, [busy, far, spare], migration)
    assert chosen.node == "busy" and chosen.free_replicas == ("busy/1",)
    assert chosen.cost_s == pytest.approx(4 / 10 + 0.1 + 0.001 * 500)
    # With expensive re-prefill (calibrated from slow resumes), loading elsewhere wins.
    slow = MigrationModel(per_token_s=1.0, fixed_s=0.1)
    assert place("m", 4 * GB, [busy, far, spare], slow).node == "far"


def test_freeing_counts_reloading_the_displaced_model_when_it_has_no_other_replica():
    victim = ReplicaView("busy/1", "busy", "other", True, running=1, tokens_in_flight=100)
    busy = node("busy", free=0, dram={"m"}, replicas=(victim,))
    host = node("host", ssd={"other"}, ssd_gbps=1.0)  # free; holds the displaced model
    chosen = place("m", 4 * GB, [busy, host], MigrationModel(per_token_s=0.0, fixed_s=0.0),
                   sizes={"other": 2 * GB})
    # busy: 0.4 s load + 2.0 s reload of "other" on host = 2.4 s; host: fetch 8 s + read 4 s.
    assert chosen.node == "busy" and chosen.cost_s == pytest.approx(0.4 + 2.0)
    assert "reload other elsewhere" in chosen.reason


def test_an_idle_replica_is_freed_at_no_migration_cost():
    idle = ReplicaView("busy/1", "busy", "other", True)
    chosen = place("m", GB, [node("busy", free=0, dram={"m"}, replicas=(idle,)),
                             node("far")], MigrationModel())
    assert chosen.node == "busy" and chosen.cost_s == pytest.approx(0.1)


def test_migration_model_calibrates_from_observed_resumes():
    model = MigrationModel(per_token_s=0.01, fixed_s=0.1)
    model.observe(1000, 0.6)  # 0.5 s for 1000 tokens beyond the fixed cost
    assert model.per_token_s == pytest.approx(0.0005)
    model.observe(1000, 1.1)
    assert model.per_token_s == pytest.approx(0.3 * 0.001 + 0.7 * 0.0005)
    assert model.cost(100) == pytest.approx(0.1 + 100 * model.per_token_s)


def _replica(key: str, load: int = 0) -> ReplicaView:
    return ReplicaView(key, key.split("/")[0], "m", True, running=load)


def test_routing_follows_prefix_affinity_until_the_load_outweighs_it():
    a, b = _replica("a/1"), _replica("b/1")
    assert route([a, b], {"b/1": 1.0}).replica == "b/1"
    # Each request in flight costs a quarter of a full hit: 4 more on b make it a tie.
    assert route([a, _replica("b/1", 3)], {"b/1": 1.0}).replica == "b/1"
    assert route([a, _replica("b/1", 5)], {"b/1": 1.0}).replica == "a/1"


def test_imbalance_override_ignores_affinity():
    weights = RouteWeights(load=0.0, imbalance=4)
    choice = route([_replica("a/1", 0), _replica("b/1", 5)], {"b/1": 1.0}, weights)
    assert choice.replica == "a/1" and "imbalance" in choice.reason
    assert route([_replica("a/1", 0), _replica("b/1", 4)], {"b/1": 1.0},
                 weights).replica == "b/1"


def test_routing_skips_replicas_that_are_not_ready():
    starting = ReplicaView("a/1", "a", "m", False)
    assert route([starting], {}) is None
    assert route([starting, _replica("b/1", 9)], {"a/1": 1.0}).replica == "b/1"


def test_prefix_blocks_chain_and_the_hit_fraction_is_the_leading_run():
    text = "".join(chr(65 + i % 26) for i in range(256 * 4))
    blocks = prompt_blocks(text)
    assert len(blocks) == 4 and len(set(blocks)) == 4
    assert prompt_blocks(text + "tail")[:4] == blocks  # same prefix, same hashes
    changed = prompt_blocks("x" + text[1:])
    assert not set(changed) & set(blocks)  # a change early changes every later block
    index = PrefixIndex()
    index.record("r", blocks[:2])
    assert index.hit_fraction("r", blocks) == 0.5
    assert index.hit_fraction("r", changed) == 0.0
    assert index.hit_fraction("other", blocks) == 0.0
    ids = list(range(64 * 3))
    assert len(prompt_blocks(ids)) == 3
    assert prompt_blocks([{"role": "user", "content": text}])


def test_prefix_index_is_bounded():
    index = PrefixIndex(capacity_blocks=3)
    blocks = prompt_blocks("y" * 256 * 5)
    index.record("r", blocks)
    assert index.hit_fraction("r", blocks) == 0.0  # the oldest (leading) blocks were dropped
    index.record("r", blocks[:1])
    assert index.hit_fraction("r", blocks) == 0.2
