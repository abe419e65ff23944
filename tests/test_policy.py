"""The router's placement, routing and migration cost decisions on constructed cluster states."""

from __future__ import annotations

import pytest

from sllm_plugin.router.policy import (
    STANDBY_STOP_S,
    MigrationModel,
    NodeView,
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
    start_options,
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


# -- standby engines and swaps (issue 12) ----------------------------------------------------

SHAPE, OTHER_SHAPE = "a1" * 32, "b2" * 32


def shaped(name: str, free: int = 1, dram: dict[str, str | None] | None = None,
           standbys: tuple[StandbyView, ...] = (), dram_gbps: float = 10.0) -> NodeView:
    """A node whose DRAM tier holds `dram` (model -> its engine-shape key, None: unknown)."""
    dram = dram or {}
    tier = TierView("dram", dram_gbps, 0.0, frozenset(dram),
                    {m: s for m, s in dram.items() if s is not None})
    return NodeView(name, free, (tier, TierView("ssd", 1.0, 0.0)), 0.5, standbys=standbys)


def standby(node: str, model: str, shape: str | None = SHAPE, id: int = 7) -> StandbyView:
    return StandbyView(f"{node}/{id}", shape, model)


def costs(**learned: float) -> StartupCosts:
    """Seeded costs with round numbers: process start 10 s, engine init 2 s, swap 0.5 s,
    claim 0.05 s (overridden by `learned`)."""
    return StartupCosts(**{"process_start_s": 10.0, "engine_init_s": 2.0, "swap_s": 0.5,
                           "claim_s": 0.05, **learned})


def test_a_standby_still_holding_the_model_is_claimed_before_any_swap_or_cold_start():
    nodes = [shaped("a", dram={"m": SHAPE}, standbys=(standby("a", "m"),)),
             shaped("b", dram={"m": SHAPE}, standbys=(standby("b", "other"),))]
    chosen = place("m", 2 * GB, nodes, MigrationModel(), costs=costs())
    assert (chosen.node, chosen.via, chosen.cost_s) == ("a", "standby", 0.05)
    assert "a/7 holds m" in chosen.reason and "default, not yet observed" in chosen.reason
    # Every option weighed is recorded, cheapest first, with its own estimate.
    assert [(o.node, o.via, round(o.seconds, 6)) for o in chosen.options] == [
        ("a", "standby", 0.05), ("b", "swap", 0.7), ("a", "cold", 12.2), ("b", "cold", 12.2)]


def test_a_swap_into_a_standby_of_the_models_shape_beats_a_cold_start():
    nodes = [shaped("cold", dram={"m": SHAPE}, dram_gbps=20.0),
             shaped("warm", dram={"m": SHAPE}, standbys=(standby("warm", "other"),))]
    chosen = place("m", 4 * GB, nodes, MigrationModel(), costs=costs())
    # swap: 4 GB / 10 GB/s + 0.5 s swap overhead; cold: 4 GB / 20 GB/s + 10 s + 2 s.
    assert (chosen.node, chosen.via) == ("warm", "swap")
    assert chosen.cost_s == pytest.approx(0.4 + 0.5)
    assert chosen.estimate.tier == "dram" and "swap into standby warm/7" in chosen.reason
    cold = next(o for o in chosen.options if o.node == "cold")
    assert cold.via == "cold" and cold.seconds == pytest.approx(0.2 + 12.0)


def test_shapes_that_differ_never_swap_and_an_unknown_shape_never_swaps():
    for model_shape, standby_shape in ((SHAPE, OTHER_SHAPE), (None, SHAPE), (SHAPE, None)):
        node = shaped("a", free=0, dram={"m": model_shape},
                      standbys=(standby("a", "other", standby_shape),))
        chosen = place("m", GB, [node], MigrationModel(), costs=costs())
        assert chosen.via == "cold", (model_shape, standby_shape)
        assert {o.via for o in chosen.options} == {"cold"}
        # No free device: the standby of another shape gives way, at a stated constant.
        assert chosen.cost_s == pytest.approx(0.1 + 12.0 + STANDBY_STOP_S)
        assert "a/7 gives way" in chosen.reason


def test_a_standby_of_the_models_own_shape_does_not_give_way_for_a_cold_start():
    node = shaped("a", free=0, dram={"m": SHAPE}, standbys=(standby("a", "other"),))
    chosen = place("m", GB, [node], MigrationModel(), costs=costs(swap_s=1000.0))
    # The only way on this node is the swap, however slow (a cold start asks for no standby).
    assert chosen.via == "swap" and [o.via for o in chosen.options] == ["swap"]


def test_devices_held_by_standbys_count_as_free_for_a_cold_start():
    full = shaped("a", free=0, dram={"m": SHAPE})
    assert place("m", GB, [full], MigrationModel(), costs=costs()) is None
    held = shaped("a", free=0, dram={"m": SHAPE},
                  standbys=(standby("a", "x", OTHER_SHAPE),))
    chosen = place("m", GB, [held], MigrationModel(), costs=costs())
    assert (chosen.node, chosen.via, chosen.free_replicas) == ("a", "cold", ())


def test_learned_overheads_replace_the_defaults_and_change_the_choice():
    learned = costs()
    nodes = [shaped("cold", dram={"m": SHAPE}),
             shaped("warm", dram={"m": SHAPE}, standbys=(standby("warm", "other"),))]
    assert place("m", GB, nodes, MigrationModel(), costs=learned).via == "swap"
    # Swaps turn out slow on these nodes (say, engine layout repacking): 30 s observed.
    learned.observe("swap", {"queue": 0.0, "load": 0.1, "swap": 30.0, "total": 30.1})
    assert learned.swap.value == 30.0 and learned.swap.samples == 1
    chosen = place("m", GB, nodes, MigrationModel(), costs=learned)
    assert (chosen.node, chosen.via) == ("cold", "cold")
    assert "swap 30.00 s (learned from 1 start(s))" in next(
        o.detail for o in chosen.options if o.via == "swap")
    # Cold starts turn out slower still: the moving average follows (alpha 0.3).
    learned.observe("cold", {"process_start": 100.0, "engine_init": 10.0, "load": 0.1})
    learned.observe("cold", {"process_start": 50.0, "engine_init": 10.0})
    assert learned.process_start.value == pytest.approx(0.3 * 50 + 0.7 * 100)
    assert learned.engine_init.value == 10.0 and learned.process_start.samples == 2
    assert place("m", GB, nodes, MigrationModel(), costs=learned).via == "swap"
    learned.observe("standby", {"swap": 0.001, "total": 0.2})
    assert learned.claim.value == 0.2


def test_a_swap_whose_load_outlasts_the_tier_read_learns_the_difference_as_overhead():
    """On CPU a swap's load phase includes vLLM's repacking of every linear weight (a 2 GB
    swap: 3.9 s where the DRAM tier reads it in 1.2 s): the estimate must learn that."""
    learned = costs()
    node = shaped("warm", dram={"m": SHAPE}, standbys=(standby("warm", "other"),))
    option = next(o for o in place("m", GB, [node], MigrationModel(), costs=learned).options
                  if o.via == "swap")
    assert option.load_s == pytest.approx(0.1)  # 1 GB at the view's 10 GB/s
    learned.observe("swap", {"load": 3.9, "swap": 0.1}, expected_load_s=option.load_s)
    assert learned.swap.value == pytest.approx(0.1 + 3.9 - 0.1)
    later = next(o for o in place("m", GB, [node], MigrationModel(), costs=learned).options
                 if o.via == "swap")
    assert later.seconds == pytest.approx(0.1 + 3.9)  # what the swap really took
    learned.observe("swap", {"load": 0.05, "swap": 0.1}, expected_load_s=0.1)  # faster: no credit
    assert learned.swap.value == pytest.approx(0.3 * 0.1 + 0.7 * 3.9)


def test_phases_that_are_not_believable_are_not_learned():
    learned = costs()
    for bad in (-1.0, float("nan"), float("inf"), True, "3", None, 1e9):
        learned.observe("cold", {"process_start": bad, "engine_init": bad})
        learned.observe("swap", {"swap": bad})
    assert (learned.process_start.value, learned.process_start.samples) == (10.0, 0)
    assert (learned.swap.value, learned.swap.samples) == (0.5, 0)


def test_without_costs_placement_weighs_the_weights_alone():
    nodes = [shaped("a", dram={"m": SHAPE}), shaped("b", dram={"m": SHAPE},
                                                     standbys=(standby("b", "other"),))]
    chosen = place("m", GB, nodes, MigrationModel())
    # Equal loads: the cold start on the first node (seen first) wins the tie.
    assert chosen.cost_s == pytest.approx(0.1) and chosen.node == "a"


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


# -- the autoscaler's rules, as pure functions (issue 13: the simulator shares them) ----------

def test_keep_alive_stops_idle_replicas_least_recently_used_first_down_to_the_minimum():
    ready = [ReplicaUse("a", 0, last_used=50.0), ReplicaUse("b", 0, last_used=10.0),
             ReplicaUse("busy", 2, last_used=0.0), ReplicaUse("fresh", 0, last_used=95.0),
             ReplicaUse("c", 0, last_used=30.0)]
    # At t=100 with keep-alive 20 s: a, b and c are idle long enough (busy is not idle).
    assert keep_alive_stops(ready, 100.0, 20.0, min_replicas=0) == ["b", "c", "a"]
    # Five ready, at least three must stay: the two least recently used go.
    assert keep_alive_stops(ready, 100.0, 20.0, min_replicas=3) == ["b", "c"]
    assert keep_alive_stops(ready, 100.0, 20.0, min_replicas=5) == []
    # Idle exactly keep_alive_s is not longer than it.
    assert keep_alive_stops([ReplicaUse("x", 0, 80.0)], 100.0, 20.0, 0) == []
    assert keep_alive_stops([ReplicaUse("x", 0, 80.0)], 100.001, 20.0, 0) == ["x"]


def test_scale_up_when_every_ready_replica_is_at_the_target_and_nothing_is_starting():
    assert should_scale_up([4, 5], target_load=4, starting=False, max_replicas=3)
    assert not should_scale_up([4, 3], target_load=4, starting=False, max_replicas=3)
    assert not should_scale_up([4, 5], target_load=4, starting=True, max_replicas=3)
    assert not should_scale_up([4, 5, 9], target_load=4, starting=False, max_replicas=3)


def test_a_start_is_refused_at_the_replica_limit_and_a_full_queue_refuses_waiting():
    assert at_replica_limit(2, 2) and at_replica_limit(3, 2) and not at_replica_limit(1, 2)
    assert not at_replica_limit(100, None)  # a model with no spec has no limit
    assert queue_full(64, 64) and not queue_full(63, 64) and queue_full(0, 0)


def test_a_replica_needing_several_devices_starts_only_where_that_many_are_free():
    two_free = node("two", free=2, dram={"m"})
    eight_free = node("eight", free=8, ssd={"m"})
    chosen = place("m", 40 * GB, [two_free, eight_free], MigrationModel(), devices=4)
    assert chosen.node == "eight"  # the DRAM node is faster but has 2 devices of the 4
    assert place("m", 40 * GB, [two_free], MigrationModel(), devices=4) is None
    assert place("m", 40 * GB, [two_free], MigrationModel(), devices=2).node == "two"


def test_standbys_give_way_for_a_multi_device_start_only_if_their_devices_suffice():
    one = StandbyView("a/1", OTHER_SHAPE, "x", devices=1)
    two = StandbyView("a/2", OTHER_SHAPE, "y", devices=2)
    n = shaped("a", free=1, dram={"m": SHAPE}, standbys=(one,))
    assert start_options(n, "m", GB, costs(), devices=4) == []  # 1 free + 1 held: not 4
    n = shaped("a", free=1, dram={"m": SHAPE}, standbys=(one, two))
    (option,) = start_options(n, "m", GB, costs(), devices=4)
    assert option.via == "cold" and "gives way" in option.detail


def test_freeing_a_replica_counts_only_if_its_devices_are_enough():
    small = ReplicaView("busy/1", "busy", "other", True, devices=1)
    big = ReplicaView("busy/2", "busy", "other2", True, devices=4)
    busy = NodeView("busy", 0, (TierView("dram", 10.0, 0.0, frozenset({"m"})),), 0.5,
                    (small,))
    assert place("m", GB, [busy], MigrationModel(), devices=4) is None
    busy = NodeView("busy", 0, (TierView("dram", 10.0, 0.0, frozenset({"m"})),), 0.5,
                    (small, big))
    chosen = place("m", GB, [busy], MigrationModel(), devices=4)
    assert chosen.node == "busy" and chosen.free_replicas == ("busy/2",)


def test_a_multi_device_start_frees_several_replicas_cheapest_first():
    idle = [ReplicaView(f"busy/{i}", "busy", f"other{i}", True) for i in range(3)]
    serving = ReplicaView("busy/9", "busy", "hot", True, running=1, tokens_in_flight=100)
    spare = NodeView("spare", 0, (), 0.5, (ReplicaView("spare/1", "spare", "hot", True),))
    busy = NodeView("busy", 1, (TierView("dram", 10.0, 0.0, frozenset({"m"})),), 0.5,
                    (serving, *idle))
    migration = MigrationModel(per_token_s=0.001, fixed_s=0.1)
    chosen = place("m", GB, [busy, spare], migration, devices=4)
    # 1 free + the three idle replicas (free to stop) = 4: the serving one stays.
    assert chosen.free_replicas == ("busy/0", "busy/1", "busy/2")
    assert chosen.cost_s == pytest.approx(0.1)
    chosen = place("m", GB, [busy, spare], migration, devices=5)  # its migration too
    assert set(chosen.free_replicas) == {"busy/0", "busy/1", "busy/2", "busy/9"}
    assert chosen.cost_s == pytest.approx(0.1 + 0.1 + 0.001 * 100)
    assert place("m", GB, [busy, spare], migration, devices=6) is None
