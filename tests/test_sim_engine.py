"""The fleet simulator (issue 13): it decides with the router's own policy, is deterministic
for a seed, conserves requests, devices and tier bytes, and gets hand-computed answers right."""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sllm_plugin.configfile import ConfigError
from sllm_plugin.router.policy import place
from sllm_plugin.sim.engine import POLICIES, simulate
from sllm_plugin.sim.fleet import FleetConfig, seed_testbed
from sllm_plugin.sim.types import SimModel, SimRequest

GB = 10**9


def workload(seed: int, n: int = 300, models: int = 12, rate: float = 0.5,
             sizes_gb: tuple[float, ...] = (1, 2, 7, 14, 26)) -> tuple[list, list]:
    """Models of a few size classes (so some share a shape), Zipf-ish popularity, Poisson
    arrivals, some prompts sharing prefix blocks."""
    rng = random.Random(seed)
    ms = [SimModel(f"m{i}", int(rng.choice(sizes_gb) * GB)) for i in range(models)]
    weights = [1 / (i + 1) for i in range(models)]
    t, reqs = 0.0, []
    for i in range(n):
        t += rng.expovariate(rate)
        m = rng.choices(ms, weights)[0]
        blocks = tuple(range(rng.randint(0, 4)))
        reqs.append(SimRequest(i, t, m.name, rng.randint(20, 3000), rng.randint(1, 400), blocks))
    return ms, reqs


SMALL = dict(servers=3, gpus=2, dram_cache_gb=40, ssd_cache_gb=80, keep_alive_s=30.0,
             max_replicas=2, target_load=2, max_running=2)


# -- (a) policy equivalence ------------------------------------------------------------------

@pytest.mark.parametrize("policy", ["sllm", "serverlessllm"])
def test_every_placement_is_what_the_routers_place_answers_on_the_same_views(policy):
    models, reqs = workload(1, n=400, rate=0.2)
    result = simulate(FleetConfig(**SMALL), models, reqs, policy, record_decisions=True,
                      check_invariants=True)
    executed = [d for d in result.decisions if d.placement is not None]
    assert len(executed) >= 20
    for d in result.decisions:
        again = place(d.model, d.size_bytes, d.nodes, d.migration, d.sizes, d.costs, d.devices)
        if d.placement is None:
            assert again is None
            continue
        # What the engine did is what the router's function answers on those views.
        assert (d.server, d.via, d.freed) == (again.node, again.via, again.free_replicas)
    vias = {d.via for d in executed}
    if policy == "sllm":
        assert "standby" in vias or "swap" in vias  # standby engines were used
    else:
        assert vias == {"cold"}
    assert any(d.freed for d in executed)  # freeing (migration or idle) happened too


# -- (b) determinism ---------------------------------------------------------------------------

@pytest.mark.parametrize("policy", list(POLICIES))
def test_a_seed_gives_the_same_run_record_for_record(policy):
    models, reqs = workload(2, n=200)
    one = simulate(FleetConfig(**SMALL), models, reqs, policy, seed=7)
    two = simulate(FleetConfig(**SMALL), models, reqs, policy, seed=7)
    assert one.records == two.records
    assert (one.device_seconds, one.starts, one.loads_by_tier, one.migrations) == \
        (two.device_seconds, two.starts, two.loads_by_tier, two.migrations)


def test_ray_serves_random_placement_follows_the_seed():
    models, reqs = workload(3, n=200)
    fleet = FleetConfig(**{**SMALL, "servers": 6})
    runs = [[r.server for r in simulate(fleet, models, reqs, "ray-serve", seed=s).records]
            for s in (0, 1)]
    assert runs[0] != runs[1]


# -- (c) conservation --------------------------------------------------------------------------

def check_conserved(requests: list[SimRequest], result) -> None:
    assert sorted(r.id for r in result.records) == sorted(r.id for r in requests)
    by_id = {r.id: r for r in requests}
    for rec in result.records:
        req = by_id[rec.id]
        assert rec.model == req.model and rec.arrival_s == req.arrival_s
        if rec.via == "rejected":
            assert rec.ttft_s is None and rec.finish_s is None and rec.server is None
            continue
        assert rec.ttft_s is not None and rec.ttft_s >= 0 and rec.server is not None
        assert rec.finish_s >= rec.arrival_s + rec.ttft_s >= rec.arrival_s
        assert 0 <= rec.startup_s <= rec.ttft_s
        assert rec.waited_for_start == (rec.via != "warm")
    assert result.device_seconds >= 0


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10**6), n=st.integers(1, 60), models=st.integers(1, 6),
       rate=st.floats(0.05, 5.0), servers=st.integers(1, 3), gpus=st.integers(1, 4),
       policy=st.sampled_from(list(POLICIES)), standby=st.booleans())
def test_every_request_is_served_or_rejected_once_and_nothing_is_overcommitted(
        seed, n, models, rate, servers, gpus, policy, standby):
    ms, reqs = workload(seed, n=n, models=models, rate=rate, sizes_gb=(1, 2, 14, 40))
    fleet = FleetConfig(**{**SMALL, "servers": servers, "gpus": gpus, "standby": standby,
                           "max_queue": 8, "start_timeout_s": 300.0})
    # check_invariants: devices held <= devices after every change, tier bytes <= capacity.
    result = simulate(fleet, ms, reqs, policy, seed=seed, check_invariants=True)
    check_conserved(reqs, result)


def test_a_model_too_big_for_a_server_is_rejected_not_lost():
    big = SimModel("huge", 500 * GB)  # needs 32 devices of 24 GB x 0.8; a server has 8
    result = simulate(seed_testbed(2), [big], [SimRequest(0, 0.0, "huge", 10, 10)], "sllm")
    assert [r.via for r in result.records] == ["rejected"]


# -- (d) a fleet whose answer is known by hand ------------------------------------------------

def hand_fleet(**extra) -> FleetConfig:
    return FleetConfig(servers=2, gpus=1, dram_cache_gb=100, ssd_cache_gb=1000,
                       keep_alive_s=10.0, **extra)


def test_the_start_goes_to_the_server_whose_dram_holds_the_model_in_the_hand_computed_time():
    fleet = hand_fleet()
    size = 10 * GB
    model, twin = SimModel("m", size), SimModel("twin", size)  # same size: same shape
    first = SimRequest(0, 0.0, "m", input_tokens=1000, output_tokens=50)
    # After m's replica expired (keep-alive 10 s) and became a standby: claimed.
    second = SimRequest(1, 200.0, "m", input_tokens=1000, output_tokens=50)
    # Later still, the twin (same shape, in server-0's DRAM): a swap into that standby.
    third = SimRequest(2, 400.0, "twin", input_tokens=1000, output_tokens=50)
    result = simulate(fleet, [model, twin], [first, second, third], "sllm",
                      cached={"server-0": {"dram": ["twin", "m"]}}, check_invariants=True)
    r0, r1, r2 = result.records
    # By hand: 10 GB / 25 GB/s + 16 s process start + 2 s engine init.
    cold = 10 / 25.0 + 16.0 + 2.0
    prefill = 1000 * (10e9 / 1 / 55e12)  # tokens * bytes / devices / flops
    decode = 49 * (10e9 / 1 / 768e9)
    assert (r0.server, r0.via, r0.tier) == ("server-0", "cold", "dram")
    assert r0.startup_s == pytest.approx(cold, abs=1e-9)
    assert r0.ttft_s == pytest.approx(cold + prefill, abs=1e-9)
    assert r0.finish_s == pytest.approx(cold + prefill + decode, abs=1e-9)
    assert (r1.server, r1.via, r1.tier) == ("server-0", "standby", "standby")
    assert r1.startup_s == pytest.approx(0.05, abs=1e-9)  # the claim
    assert (r2.server, r2.via, r2.tier) == ("server-0", "swap", "dram")
    assert r2.startup_s == pytest.approx(10 / 25.0 + 0.4, abs=1e-9)  # load + swap
    assert result.starts == {"cold": 1, "standby": 1, "swap": 1}
    assert result.loads_by_tier == {"dram": 2}


def test_without_standbys_the_second_start_is_cold_from_dram_again():
    fleet = hand_fleet(standby=False)
    result = simulate(fleet, [SimModel("m", 10 * GB)],
                      [SimRequest(0, 0.0, "m", 100, 5), SimRequest(1, 300.0, "m", 100, 5)],
                      "sllm", cached={"server-1": {"ssd": ["m"]}})
    r0, r1 = result.records
    # server-1's SSD (10/12 s) beats server-0's fetch (10/1.25 + 10/12 s).
    assert (r0.server, r0.tier) == ("server-1", "ssd")
    assert r0.startup_s == pytest.approx(10 / 12.0 + 18.0, abs=1e-9)
    # The start left it in server-1's DRAM (promote on start).
    assert (r1.server, r1.via, r1.tier) == ("server-1", "cold", "dram")
    assert r1.startup_s == pytest.approx(10 / 25.0 + 18.0, abs=1e-9)


def test_device_seconds_count_every_replica_held_with_its_devices():
    fleet = hand_fleet(standby=False)
    result = simulate(fleet, [SimModel("m", 10 * GB)], [SimRequest(0, 0.0, "m", 1000, 50)],
                      "sllm", cached={"server-0": {"dram": ["m"]}})
    (rec,) = result.records
    # One device from the start's beginning to keep-alive expiry after the last request.
    assert result.device_seconds == pytest.approx(rec.finish_s + 10.0, abs=1e-4)


# -- (e) the baselines --------------------------------------------------------------------------

def test_locality_blind_baselines_never_read_from_dram():
    models, reqs = workload(4, n=200)
    for policy in ("ray-serve", "kserve"):
        result = simulate(FleetConfig(**SMALL), models, reqs, policy,
                          cached={"server-0": {"dram": [m.name for m in models[:3]]}})
        assert "dram" not in result.loads_by_tier
        assert all(r.tier != "dram" for r in result.records)
    kserve = simulate(FleetConfig(**SMALL), models, reqs, "kserve")
    assert set(kserve.loads_by_tier) == {"remote"}


def test_every_oracle_start_reads_at_dram_speed():
    fleet = hand_fleet()
    sizes = {"a": 3 * GB, "b": 10 * GB, "c": 18 * GB}
    models = [SimModel(n, s) for n, s in sizes.items()]
    # Far apart: each request finds its model's replica expired and waits for its own start.
    reqs = [SimRequest(i, 100.0 * i, "abc"[i % 3], 100, 5) for i in range(9)]
    result = simulate(fleet, models, reqs, "oracle", check_invariants=True)
    for rec in result.records:
        assert rec.via == "cold" and rec.tier == "dram"
        assert rec.startup_s == pytest.approx(sizes[rec.model] / 1e9 / 25.0 + 18.0, abs=1e-9)


def test_a_safetensors_baseline_loads_from_remote_at_the_stated_slowdown():
    fleet = hand_fleet()
    result = simulate(fleet, [SimModel("m", 12 * GB)], [SimRequest(0, 0.0, "m", 100, 5)],
                      "kserve")
    (rec,) = result.records
    assert rec.tier == "remote"
    assert rec.startup_s == pytest.approx(12 / 1.25 + 12 / (12.0 / 6.4) + 18.0, abs=1e-9)


# -- the fleet's configuration ------------------------------------------------------------------

def test_fleet_yaml_refuses_unknown_keys_naming_them(tmp_path):
    good = tmp_path / "fleet.yaml"
    good.write_text("servers: 3\ngpus: 4\nremote_gbps: 2.5\n")
    fleet = FleetConfig.from_yaml(good)
    assert (fleet.servers, fleet.gpus, fleet.remote_gbps) == (3, 4, 2.5)
    bad = tmp_path / "bad.yaml"
    bad.write_text("servers: 3\ngpu: 4\n")
    with pytest.raises(ConfigError, match="gpu: Extra inputs.*valid keys here: servers"):
        FleetConfig.from_yaml(bad)
    with pytest.raises(ConfigError, match="servers"):
        FleetConfig.from_yaml(good, servers=0)


def test_the_seed_testbed_and_the_devices_a_model_needs():
    fleet = seed_testbed()
    assert (fleet.servers, fleet.gpus, fleet.gpu_memory_gb, fleet.dram_gbps,
            fleet.ssd_gbps) == (8, 8, 24.0, 25.0, 12.0)
    assert seed_testbed(servers=100).servers == 100
    assert [fleet.devices_for(int(g * GB)) for g in (1, 14, 26, 65, 140, 200)] == \
        [1, 1, 2, 4, 8, None]
