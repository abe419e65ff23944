"""The simulated fleet: servers, their devices and tiers, bandwidths, phase durations, the
autoscaler's settings and how fast a replica serves.

Every server of a fleet is alike (one `FleetConfig` describes one kind of server times
`servers`). The defaults are the ServerlessLLM testbed (`seed_testbed`); a YAML file
(`FleetConfig.from_yaml`) or keyword overrides describe others. Unknown keys are refused, with
the valid keys named.

Inference model (stated, simple on purpose; it is the same for every policy, so it moves the
policies' TTFT alike and their differences come from the starts):
- a checkpoint holds bf16 weights: `params = size_bytes / 2`;
- a replica needs `devices_for(size)` devices: the smallest power of two whose
  `gpu_memory_gb * weight_fraction` (the rest is KV cache and activations) holds the weights;
  a model needing more devices than a server has cannot be served;
- decode is memory bound: one token = reading every weight once, split over the devices:
  `decode_s_per_token = size_bytes / devices / (hbm_gbps * 1e9)`;
- prefill is compute bound: `2 * params` flops per token over the devices at the effective
  `tflops`: `prefill_s_per_token = size_bytes / devices / (tflops * 1e12)`;
- continuous batching, simplified: up to `max_running` requests run at once on a replica, each
  at its own prefill + decode pace (no slowdown from its neighbours); more wait in a FIFO there.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..configfile import read_mapping, validate
from ..router.config import Limits, ModelSpec
from ..router.policy import (
    DEFAULT_CLAIM_S,
    DEFAULT_ENGINE_INIT_S,
    DEFAULT_PROCESS_START_S,
    DEFAULT_SWAP_S,
    STANDBY_STOP_S,
)

GB = 10**9
_SPEC = ModelSpec()
_LIMITS = Limits()


class FleetConfig(BaseModel):
    """One simulated fleet. Defaults: the ServerlessLLM testbed's server x 8
    (`seed_testbed()`), the router's ModelSpec/Limits defaults where they fit a fleet."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # -- servers --
    servers: int = Field(8, ge=1, le=100_000, description="how many servers")
    name_prefix: str = Field("server-", min_length=1, max_length=40,
                             description="server names: PREFIX0, PREFIX1, ...")
    gpus: int = Field(8, ge=1, le=1024, description="devices per server (A5000 x 8)")
    gpu_memory_gb: float = Field(24.0, gt=0, description="memory per device (A5000: 24 GB)")
    weight_fraction: float = Field(0.8, gt=0, le=1, description="share of a device's memory "
                                   "the weights may take (the rest: KV cache, activations)")
    hbm_gbps: float = Field(768.0, gt=0, description="device memory bandwidth (A5000: 768 GB/s)"
                            ": sets the decode speed")
    tflops: float = Field(55.0, gt=0, description="effective dense bf16 TFLOPS per device "
                          "(about half the A5000's 111 tensor TFLOPS peak): sets prefill speed")
    # -- tiers and bandwidths --
    dram_cache_gb: float = Field(768.0, ge=0, description="DRAM the checkpoint cache may use "
                                 "(of 1 TB: 256 GB left to the OS, engines and pinned buffers)")
    dram_gbps: float = Field(25.0, gt=0, description="DRAM -> device load bandwidth (PCIe 4.0 "
                             "x16, ~25 GB/s host-to-device)")
    ssd_cache_gb: float = Field(7000.0, ge=0, description="NVMe the checkpoint cache may use "
                                "(of 2x 3.84 TB in RAID 0)")
    ssd_gbps: float = Field(12.0, gt=0, description="NVMe -> device load bandwidth (RAID 0 of "
                            "2 drives rated 6.5 GB/s each: ~12 GB/s)")
    remote_gbps: float = Field(1.25, gt=0, description="fetch bandwidth from the model store "
                               "(10 GbE: 1.25 GB/s)")
    safetensors_slowdown: float = Field(6.4, ge=1, description="how much slower a safetensors "
                                        "load reads the SSD than ServerlessLLM's loader (the "
                                        "locality-blind baselines load this way)")
    # -- replica phases (defaults: the router's seeds, which node daemons measured) --
    process_start_s: float = Field(DEFAULT_PROCESS_START_S, ge=0)
    engine_init_s: float = Field(DEFAULT_ENGINE_INIT_S, ge=0)
    swap_s: float = Field(DEFAULT_SWAP_S, ge=0)
    claim_s: float = Field(DEFAULT_CLAIM_S, ge=0)
    standby_stop_s: float = Field(STANDBY_STOP_S, ge=0, description="a standby of another "
                                  "shape giving way for a cold start")
    migration_fixed_s: float = Field(0.1, ge=0, description="a migration's fixed cost beside "
                                     "re-prefilling its tokens on the destination")
    # -- the autoscaler (per model, the same for every model) --
    keep_alive_s: float = Field(_SPEC.keep_alive_s, ge=0)
    min_replicas: int = Field(_SPEC.min_replicas, ge=0)
    max_replicas: int = Field(4, ge=1, description="per model (the router's ModelSpec default "
                              "is 1, for one model on one machine)")
    target_load: int = Field(_SPEC.target_load, ge=1)
    max_queue: int = Field(_LIMITS.max_queue, ge=0, description="requests waiting for a "
                           "replica, per model")
    start_timeout_s: float = Field(_LIMITS.start_timeout_s, gt=0, description="a request "
                                   "waiting longer than this for a replica is rejected")
    max_running: int = Field(16, ge=1, description="requests a replica runs at once")
    standby: bool = Field(True, description="policies with standby engines keep a replica "
                          "stopped by keep-alive as a standby")
    standby_max: int | None = Field(None, ge=0, description="standbys per server (None: as many "
                                    "as its devices hold)")

    @model_validator(mode="after")
    def _fits(self) -> FleetConfig:
        if self.gpu_memory_gb * self.weight_fraction <= 0:
            raise ValueError("gpu_memory_gb * weight_fraction must be positive")
        return self

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> FleetConfig:
        """The fleet a YAML mapping describes (keys: this class's fields), then `overrides`;
        a ConfigError naming the file and every bad key otherwise."""
        raw = read_mapping(path)
        raw.update({k: v for k, v in overrides.items() if v is not None})
        return validate(cls, raw, path, "fleet")

    # -- what follows from the fields --

    def server_names(self) -> list[str]:
        return [f"{self.name_prefix}{i}" for i in range(self.servers)]

    def devices_for(self, size_bytes: int) -> int | None:
        """Devices a replica of a checkpoint this big needs (a power of two), None if more
        than a server has."""
        per = self.gpu_memory_gb * self.weight_fraction * GB
        devices = 1
        while devices * per < size_bytes:
            devices *= 2
        return devices if devices <= self.gpus else None

    def decode_s_per_token(self, size_bytes: int, devices: int) -> float:
        return size_bytes / devices / (self.hbm_gbps * GB)

    def prefill_s_per_token(self, size_bytes: int, devices: int) -> float:
        return size_bytes / devices / (self.tflops * 1e12)

    def safetensors_gbps(self) -> float:
        return self.ssd_gbps / self.safetensors_slowdown

    def describe(self) -> dict:
        return self.model_dump()


def seed_testbed(servers: int = 8, **overrides: Any) -> FleetConfig:
    """ServerlessLLM's testbed (its repository's `benchmarks/server-specs.md`, see
    ../shared/REFERENCE.md): per server 8x A5000 24 GB (PCIe 4.0 x16, ~25 GB/s host to
    device), 1 TB DDR4 (768 GB for the cache), 2x 3.84 TB NVMe in RAID 0 (~12 GB/s; 7 TB for
    the cache); a 10 GbE link to the model store (1.25 GB/s: our choice, the paper does not
    state it). `servers=100` is the 100-server (800-GPU) fleet."""
    return FleetConfig(servers=servers, **overrides)


def load_time(size_bytes: int, gbps: float) -> float:
    """Seconds to move `size_bytes` at `gbps` (GB/s, 1e9 bytes): GB / (GB/s), computed in the
    same order as the router's estimate so a hand check can expect it exactly."""
    return size_bytes / 1e9 / gbps if gbps > 0 and math.isfinite(gbps) else math.inf
