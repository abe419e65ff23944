"""A trace mapped onto a population of models: which model each request asks for, how big each
model's checkpoint is, and how fast the trace is played.

Popularity is Zipf: the model of popularity rank k (1-based, of N) is asked for with probability
k**-s / sum(j**-s for j in 1..N); s = 1.0 by default. Serverless popularity is heavy-tailed:
in the Azure Functions trace most functions are invoked very rarely while invocation
frequencies span 8 orders of magnitude (Shahrad et al., "Serverless in the Wild", USENIX ATC
2020); the ServerlessLLM paper drives its models with arrivals from that trace.

Sizes come from a catalog of real models, fp16/bf16 checkpoint bytes = 2 x parameter count
(parameter counts in millions, approximately as the models' Hugging Face cards and configs give
them; the sizes are within a few percent of the published checkpoints). The seed paper
(ServerlessLLM, OSDI'24) used OPT 2.7B-66B, LLaMA-2 7B-70B and Falcon 7B/40B; the catalog adds
BLOOM-560M and Llama-3.2-1B so that it spans 1 GB to 140 GB.

Each model's size is drawn independently of its popularity (a seeded shuffle), so the most
popular model is not always the smallest one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from sllm_plugin.sim.types import SimModel, SimRequest, TraceRequest

GB = 1_000_000_000


class CatalogModel(BaseModel):
    """A real model's checkpoint: its name and fp16/bf16 size in bytes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")
    params_b: float = Field(gt=0, le=1000)  # parameters, billions
    size_bytes: int = Field(gt=0, le=1000 * GB)


def _fp16(name: str, params_m: int) -> CatalogModel:
    return CatalogModel(name=name, params_b=params_m / 1000, size_bytes=params_m * 1_000_000 * 2)


# The seed paper's models (parameter counts in millions; checkpoint bytes = 2 x parameters).
SEED_MODELS: tuple[CatalogModel, ...] = (
    _fp16("opt-2.7b", 2_652),  # 5.30 GB
    _fp16("opt-6.7b", 6_658),  # 13.32 GB
    _fp16("llama-2-7b", 6_738),  # 13.48 GB
    _fp16("falcon-7b", 6_922),  # 13.84 GB
    _fp16("opt-13b", 12_853),  # 25.71 GB
    _fp16("llama-2-13b", 13_016),  # 26.03 GB
    _fp16("opt-30b", 29_975),  # 59.95 GB
    _fp16("falcon-40b", 41_838),  # 83.68 GB
    _fp16("opt-66b", 65_737),  # 131.47 GB
    _fp16("llama-2-70b", 68_977),  # 137.95 GB
)

# The seed's models plus two small ones, so that sizes span 1 GB to 140 GB.
CATALOG: tuple[CatalogModel, ...] = (
    _fp16("bloom-560m", 559),  # 1.12 GB
    _fp16("llama-3.2-1b", 1_236),  # 2.47 GB
    *SEED_MODELS,
)

MAX_MODELS = 100_000


class WorkloadConfig(BaseModel):
    """How a trace becomes a workload (every field has a stated default; see the presets)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    models: int = Field(default=64, ge=1, le=MAX_MODELS)  # distinct models (names)
    zipf_s: float = Field(default=1.0, ge=0.0, le=10.0)  # Zipf exponent; 0 = uniform
    catalog: tuple[CatalogModel, ...] = CATALOG
    # "cycle": the catalog's sizes repeated in turn (each size within one of the others'
    # counts), then shuffled over popularity ranks; "small_weighted": each model's size drawn
    # with probability proportional to 1/size (small checkpoints far more common, as on a
    # model hub).
    size_assignment: Literal["cycle", "small_weighted"] = "cycle"
    time_scale: float = Field(default=1.0, gt=0.0, le=1e6)  # arrivals divided by it
    seed: int = Field(default=0, ge=0, lt=2**63)

    @field_validator("catalog")
    @classmethod
    def _catalog(cls, v: tuple[CatalogModel, ...]) -> tuple[CatalogModel, ...]:
        if not v:
            raise ValueError("the catalog must hold at least one model")
        names = [m.name for m in v]
        if len(set(names)) != len(names):
            raise ValueError("catalog model names must be distinct")
        return v


# Presets matching issue 13's fleets.
# testbed: 40 models for the 8 servers x 8 GPUs fleet, each one of the seed paper's 10
# checkpoints (fine-tunes of it), drawn with weights 1/size: mostly 7-13B models, a few 30-70B.
# The count and the weights are ours, not the paper's: with 4 models of every checkpoint
# ("cycle") the models would hold 144 of the fleet's 64 GPUs, and starts of the 8-GPU models
# would wait for whole servers to empty (the simulator shows it; the comparison would measure
# the shortage, not start-up).
TESTBED_MODELS = 40
# population: 1,000 models over the whole catalog, mostly small ones, for the 100-server fleet.
POPULATION_MODELS = 1000

PRESETS: dict[str, WorkloadConfig] = {
    "testbed": WorkloadConfig(models=TESTBED_MODELS, catalog=SEED_MODELS,
                              size_assignment="small_weighted"),
    "population": WorkloadConfig(models=POPULATION_MODELS, catalog=CATALOG,
                                 size_assignment="small_weighted"),
}


def preset(name: str, **overrides: object) -> WorkloadConfig:
    """A preset of PRESETS with some fields changed (validated again)."""
    try:
        base = PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown workload preset {name!r} (one of: "
                         f"{', '.join(PRESETS)})") from None
    return WorkloadConfig.model_validate({**base.model_dump(), **overrides})


def zipf_pmf(n: int, s: float) -> np.ndarray:
    """P(rank k) for k = 1..n, proportional to k**-s."""
    w = np.arange(1, n + 1, dtype=np.float64) ** -float(s)
    return w / w.sum()


def make_models(config: WorkloadConfig) -> list[SimModel]:
    """The population, most popular first (`models[k]` has popularity rank k + 1). Names are
    `m{rank:0Nd}-{catalog name}`, zero-padded so they sort by rank."""
    rng = np.random.default_rng([config.seed, 1])  # a stream of its own: sizes
    cat = config.catalog
    if config.size_assignment == "cycle":
        order = np.arange(config.models) % len(cat)
        rng.shuffle(order)
    else:
        inv = np.array([1.0 / m.size_bytes for m in cat])
        order = rng.choice(len(cat), size=config.models, p=inv / inv.sum())
    width = max(4, len(str(config.models)))
    return [SimModel(name=f"m{k + 1:0{width}d}-{cat[int(i)].name}",
                     size_bytes=cat[int(i)].size_bytes)
            for k, i in enumerate(order)]


def make_workload(trace: Sequence[TraceRequest],
                  config: WorkloadConfig) -> tuple[list[SimModel], list[SimRequest]]:
    """The models (most popular first) and the trace's requests, each given a model by Zipf
    popularity, in arrival order, ids 0..n-1, arrivals divided by `time_scale`.

    Deterministic for a config (its seed included). Prefix blocks are scoped per model: a
    trace's block id b in a request for model m becomes an id unique to (m, b), numbered in
    order of first appearance, so requests for one model keep sharing their prefixes and two
    models never share a block.
    """
    models = make_models(config)
    ordered = sorted(trace, key=lambda r: r.arrival_s)
    rng = np.random.default_rng([config.seed, 2])  # a stream of its own: request -> model
    picks = rng.choice(config.models, size=len(ordered), p=zipf_pmf(config.models,
                                                                     config.zipf_s))
    scoped: dict[tuple[int, int], int] = {}
    requests: list[SimRequest] = []
    for i, (r, m) in enumerate(zip(ordered, picks.tolist(), strict=True)):
        if not math.isfinite(r.arrival_s) or r.arrival_s < 0:
            raise ValueError(f"trace request {i}: arrival {r.arrival_s!r} is not a finite, "
                             "non-negative number of seconds")
        blocks = tuple(scoped.setdefault((m, b), len(scoped)) for b in r.blocks)
        requests.append(SimRequest(id=i, arrival_s=r.arrival_s / config.time_scale,
                                   model=models[m].name, input_tokens=r.input_tokens,
                                   output_tokens=r.output_tokens, blocks=blocks))
    return models, requests
