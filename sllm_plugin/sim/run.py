"""`sllm simulate`: a trace, a fleet and a model population in; the policy comparison out.

One run simulates every policy on the same requests at each load factor (the trace's arrivals
compressed by it), then writes what a reader needs: a markdown table (also printed), a JSON
of every figure and request, a CDF of TTFT per policy and TTFT against load.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import report
from .engine import POLICIES, simulate
from .fleet import FleetConfig
from .traces import load_trace
from .types import PolicyResult
from .workload import WorkloadConfig, make_workload


@dataclass
class Comparison:
    """Every policy's result at every load, and the files written."""

    by_load: dict[float, list[PolicyResult]]
    summaries: dict[float, list[dict[str, Any]]]
    table: str  # at the first load
    files: list[Path] = field(default_factory=list)


def deployed(fleet: FleetConfig, models: Sequence[str]) -> dict[str, dict[str, list[str]]]:
    """Where the checkpoints are when the trace starts: each model's on the SSD of one
    server, round robin in order of popularity, as registering a model with the fleet leaves
    it (a node fetches a registered model into its SSD tier). Every policy starts from this
    (the blind baselines' local caches included; KServe keeps no cache, so it has none)."""
    names = fleet.server_names()
    cached: dict[str, dict[str, list[str]]] = {n: {"ssd": []} for n in names}
    for i, model in enumerate(models):
        cached[names[i % len(names)]]["ssd"].append(model)
    return cached


def trace_rate(trace_path: str | Path, trace_format: str | None = None,
               limit: int | None = None) -> float:
    """The trace's mean request rate (requests per second)."""
    trace = load_trace(trace_path, trace_format, limit=limit)
    span = trace[-1].arrival_s - trace[0].arrival_s
    return (len(trace) - 1) / span if span > 0 else float(len(trace))


def compare(trace_path: str | Path, fleet: FleetConfig, workload: WorkloadConfig, *,
            policies: Sequence[str] = tuple(POLICIES), loads: Sequence[float] = (1.0,),
            trace_format: str | None = None, limit: int | None = None, seed: int = 0,
            out: Path | None = None, progress: bool = False,
            load_label: str = "load (x the trace's request rate)") -> Comparison:
    unknown = [p for p in policies if p not in POLICIES]
    if unknown:
        raise ValueError(f"unknown policy {unknown[0]!r} (one of: {', '.join(POLICIES)})")
    trace = load_trace(trace_path, trace_format, limit=limit)
    by_load: dict[float, list[PolicyResult]] = {}
    summaries: dict[float, list[dict[str, Any]]] = {}
    for load in loads:
        scaled = workload.model_copy(update={"time_scale": workload.time_scale * load})
        models, requests = make_workload(trace, scaled)
        cached = deployed(fleet, [m.name for m in models])
        by_load[load] = [simulate(fleet, models, requests, policy, seed=seed,
                                  progress=progress, cached=cached) for policy in policies]
        summaries[load] = [report.summarize(r) for r in by_load[load]]
    first = loads[0]
    comparison = Comparison(by_load, summaries, report.markdown_table(summaries[first]))
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        meta = {"trace": str(trace_path), "requests": len(trace), "loads": list(loads),
                "seed": seed, "fleet": fleet.model_dump(mode="json"),
                "workload": workload.model_dump(mode="json"),
                "policies": {p: POLICIES[p] for p in policies},
                "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
        comparison.files.append(report.write_json(
            out / "simulation.json", summaries[first],
            meta=meta | {"by_load": {str(k): v for k, v in summaries.items()}}))
        # Every request of the first load, apart: megabytes for a whole trace.
        comparison.files.append(report.write_json(
            out / "requests.json", [], results=by_load[first], meta={"load": first}))
        comparison.files.append(report.write_text(out / "simulation.md", comparison.table))
        comparison.files.append(report.plot_ttft_cdf(by_load[first], out / "ttft_cdf.png"))
        if len(loads) > 1:
            comparison.files.append(report.plot_latency_vs_load(
                summaries, out / "ttft_vs_load.png", xlabel=load_label))
    return comparison
