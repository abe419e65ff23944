"""A trace mapped onto a population of models (sllm_plugin/sim/workload.py): determinism,
Zipf popularity, sizes from the catalog, time scaling, prefix blocks scoped per model."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pydantic
import pytest

from sllm_plugin.sim.traces import load_trace
from sllm_plugin.sim.types import TraceRequest
from sllm_plugin.sim.workload import (
    CATALOG,
    GB,
    POPULATION_MODELS,
    PRESETS,
    SEED_MODELS,
    TESTBED_MODELS,
    WorkloadConfig,
    make_models,
    make_workload,
    preset,
)

DATA = Path(__file__).parent / "data" / "traces"
MOONCAKE = DATA / "mooncake_conversation_head300.jsonl"
AZURE = DATA / "azure_llm_2023_code_head300.csv"


def _uniform_trace(n: int) -> list[TraceRequest]:
    return [TraceRequest(arrival_s=i * 0.1, input_tokens=10, output_tokens=5) for i in range(n)]


def test_deterministic_for_a_seed():
    trace = load_trace(MOONCAKE)
    cfg = WorkloadConfig(models=25, seed=7)
    a = make_workload(trace, cfg)
    assert a == make_workload(trace, WorkloadConfig(models=25, seed=7))
    b = make_workload(trace, WorkloadConfig(models=25, seed=8))
    assert [r.model for r in a[1]] != [r.model for r in b[1]]
    assert [m.size_bytes for m in a[0]] != [m.size_bytes for m in b[0]]


def test_requests_keep_the_trace():
    trace = load_trace(AZURE)
    models, reqs = make_workload(trace, WorkloadConfig(models=12))
    assert [r.id for r in reqs] == list(range(len(trace)))
    assert [(r.arrival_s, r.input_tokens, r.output_tokens) for r in reqs] == [
        (t.arrival_s, t.input_tokens, t.output_tokens) for t in trace]
    names = {m.name for m in models}
    assert len(names) == 12 and {r.model for r in reqs} <= names


def test_zipf_popularity():
    n_models, n_req, s = 10, 40_000, 1.0
    models, reqs = make_workload(_uniform_trace(n_req), WorkloadConfig(models=n_models,
                                                                         zipf_s=s, seed=3))
    counts = Counter(r.model for r in reqs)
    by_rank = [counts[m.name] for m in models]  # models are listed most popular first
    assert by_rank[0] == max(by_rank)
    harmonic = sum(1 / k**s for k in range(1, n_models + 1))
    for k, c in enumerate(by_rank, start=1):
        expected = (1 / k**s) / harmonic  # the Zipf pmf, written out here
        assert abs(c / n_req - expected) < 0.01, (k, c / n_req, expected)
    assert by_rank[0] / by_rank[1] == pytest.approx(2.0, rel=0.08)  # 1/1 over 1/2
    # s = 0 is uniform
    _, flat = make_workload(_uniform_trace(n_req), WorkloadConfig(models=n_models, zipf_s=0))
    assert max(Counter(r.model for r in flat).values()) / n_req < 0.1 + 0.01


def test_sizes_come_from_the_catalog_and_span_1_to_140_gb():
    sizes = {m.size_bytes for m in CATALOG}
    assert min(sizes) >= 1 * GB and max(sizes) <= 140 * GB
    assert min(sizes) < 2 * GB and max(sizes) > 130 * GB
    for name in PRESETS:
        for m in make_models(PRESETS[name]):
            assert m.size_bytes in sizes and 1 * GB <= m.size_bytes <= 140 * GB
            assert m.name.split("-", 1)[1] in {c.name for c in CATALOG}


def test_presets():
    testbed = make_models(PRESETS["testbed"])
    assert len(testbed) == TESTBED_MODELS == 40
    per_ckpt = Counter(m.name.split("-", 1)[1] for m in testbed)
    assert set(per_ckpt) <= {c.name for c in SEED_MODELS}  # the seed's checkpoints only
    small = min(SEED_MODELS, key=lambda c: c.size_bytes).name
    large = max(SEED_MODELS, key=lambda c: c.size_bytes).name
    assert per_ckpt[small] > per_ckpt[large]  # 1/size weights
    cycled = make_models(preset("testbed", size_assignment="cycle"))
    assert Counter(m.name.split("-", 1)[1] for m in cycled) == {c.name: 4 for c in SEED_MODELS}
    pop = make_models(PRESETS["population"])
    assert len(pop) == POPULATION_MODELS == 1000 and len({m.name for m in pop}) == 1000
    per_size = Counter(m.size_bytes for m in pop)
    smallest = min(CATALOG, key=lambda c: c.size_bytes)
    largest = max(CATALOG, key=lambda c: c.size_bytes)
    assert per_size[smallest.size_bytes] > 10 * per_size[largest.size_bytes]  # 1/size weights
    assert preset("population", seed=5, time_scale=2.0).models == 1000
    with pytest.raises(ValueError, match="unknown workload preset"):
        preset("nope")


def test_sizes_are_not_tied_to_popularity():
    # the most popular model's checkpoint changes with the seed (a shuffle, not catalog order)
    firsts = {make_models(WorkloadConfig(models=40, catalog=SEED_MODELS, seed=s))[0].size_bytes
              for s in range(10)}
    assert len(firsts) > 1


def test_time_scale_halves_inter_arrival_times():
    trace = load_trace(AZURE)
    _, base = make_workload(trace, WorkloadConfig(models=5))
    _, fast = make_workload(trace, WorkloadConfig(models=5, time_scale=2.0))
    assert [r.model for r in fast] == [r.model for r in base]
    gaps = [b.arrival_s - a.arrival_s for a, b in zip(base, base[1:], strict=False)]
    fast_gaps = [b.arrival_s - a.arrival_s for a, b in zip(fast, fast[1:], strict=False)]
    assert fast_gaps == pytest.approx([g / 2 for g in gaps], abs=1e-12)
    assert fast[-1].arrival_s == base[-1].arrival_s / 2


def test_blocks_are_scoped_per_model():
    trace = load_trace(MOONCAKE)
    assert sum(1 for r in trace if r.blocks and r.blocks[0] == 0) > 100  # a shared prefix
    models, reqs = make_workload(trace, WorkloadConfig(models=6, seed=1))
    blocks_of: dict[str, set[int]] = {}
    for r in reqs:
        blocks_of.setdefault(r.model, set()).update(r.blocks)
    names = list(blocks_of)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not blocks_of[a] & blocks_of[b], (a, b)
    # within a model the mapping is one-to-one: shared prefixes stay shared
    for name in names:
        pairs = {(t, s) for tr, r in zip(trace, reqs, strict=True) if r.model == name
                 for t, s in zip(tr.blocks, r.blocks, strict=True)}
        assert len({t for t, _ in pairs}) == len(pairs) == len({s for _, s in pairs})
    first = [r for r in reqs if r.model == names[0] and r.blocks]
    assert len({r.blocks[0] for r in first}) == 1  # Mooncake's block 0, one id per model


def test_config_is_validated():
    for bad in ({"models": 0}, {"time_scale": 0}, {"time_scale": float("nan")},
                {"zipf_s": -1}, {"seed": -1}, {"catalog": ()}, {"modles": 3},
                {"size_assignment": "largest"}):
        with pytest.raises(pydantic.ValidationError):
            WorkloadConfig(**bad)
    dup = (SEED_MODELS[0], SEED_MODELS[0])
    with pytest.raises(pydantic.ValidationError, match="distinct"):
        WorkloadConfig(catalog=dup)
