"""What a simulation reports: per-policy figures from `PolicyResult`s, a JSON of every figure,
a markdown table, and two plots (CDF of TTFT per policy; TTFT against load).

Percentiles are nearest-rank (numpy's `inverted_cdf`): p99 of a list is the smallest value
that at least 99% of the list is at or below, always a value that occurred. With few requests
a tail percentile is the maximum, which is what a reader of a tail latency expects; linear
interpolation would report latencies no request saw.

Files are written atomically (a temporary file in the same directory, then a rename), so a
reader never sees half a report. matplotlib is imported only by the plotting functions, and
draws with its Agg backend on a Figure of its own (no pyplot, no global backend change).
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from sllm_plugin.sim.types import PolicyResult
from sllm_plugin.store.private import write_atomic

OURS = "sllm"  # the policy the table's ratios are relative to
PERCENTILES = (50, 90, 99)
TIERS = ("dram", "ssd", "remote")
START_VIAS = ("cold", "swap", "standby")
MIN_PLOT_TTFT_S = 1e-3  # a log axis has no zero: shorter TTFTs are drawn at 1 ms


def percentile(values: Sequence[float], q: float) -> float | None:
    """The nearest-rank q-th percentile of `values` (None for no values)."""
    if len(values) == 0:
        return None
    return float(np.percentile(np.asarray(values, dtype=np.float64), q, method="inverted_cdf"))


def _stats(values: Sequence[float]) -> dict[str, Any]:
    out: dict[str, Any] = {"count": len(values)}
    for q in PERCENTILES:
        out[f"p{q}"] = percentile(values, q)
    out["mean"] = float(np.mean(values)) if len(values) else None
    out["max"] = float(np.max(values)) if len(values) else None
    return out


def summarize(result: PolicyResult) -> dict[str, Any]:
    """Every figure of one policy's run, JSON-ready (seconds; None where there is nothing to
    measure, e.g. percentiles of no requests or hit rates with no starts).

    - requests, served (got a first token), rejected;
    - ttft_s: time to first token of served requests (count, p50/p90/p99, mean, max);
    - startup_s.waited: the start wait of served requests that waited for a replica start;
      startup_s.all: the same over every served request (0 for those a ready replica took);
    - waited_for_start: requests that arrived with no ready replica able to take them;
      waited_by_via: those requests by how the replica they waited for started (cold/swap/
      standby);
    - starts: replica starts by via, and their total; loads_by_tier: starts by the tier the
      weights were read from; cache_hit_rate: loads_by_tier[tier] / all starts, per tier;
    - device_seconds (cost), migrations, duration_s (simulated), wall_s (to simulate), notes.
    """
    recs = result.records
    served = [r for r in recs if r.ttft_s is not None]
    waited = [r for r in served if r.waited_for_start]
    starts = {via: int(result.starts.get(via, 0)) for via in START_VIAS}
    starts.update({k: int(v) for k, v in result.starts.items() if k not in starts})
    total_starts = sum(starts.values())
    tiers = list(TIERS) + sorted(k for k in result.loads_by_tier if k not in TIERS)
    loads = {t: int(result.loads_by_tier.get(t, 0)) for t in tiers}
    by_via: dict[str, int] = {via: 0 for via in START_VIAS}
    for r in recs:
        if r.waited_for_start and r.via in by_via:
            by_via[r.via] += 1
    return {
        "policy": result.policy,
        "requests": len(recs),
        "served": len(served),
        "rejected": len(recs) - len(served),
        "ttft_s": _stats([r.ttft_s for r in served if r.ttft_s is not None]),
        "startup_s": {"waited": _stats([r.startup_s for r in waited]),
                      "all": _stats([r.startup_s for r in served])},
        "waited_for_start": sum(1 for r in recs if r.waited_for_start),
        "waited_by_via": by_via,
        "starts": {**starts, "total": total_starts},
        "loads_by_tier": loads,
        "cache_hit_rate": {t: (n / total_starts if total_starts else None)
                           for t, n in loads.items()},
        "device_seconds": float(result.device_seconds),
        "migrations": int(result.migrations),
        "duration_s": float(result.duration_s),
        "wall_s": float(result.wall_s),
        "notes": list(result.notes),
    }


# --------------------------------------------------------------------------- files


def _atomic_write(path: str | Path, data: bytes) -> Path:
    """Write `path` through a private temporary file beside it, then rename it into place."""
    path = Path(path)
    write_atomic(path, data)
    return path


def _jsonable(x: Any) -> Any:
    """Non-finite floats become None: JSON has no NaN, and a reader must not guess."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def write_json(path: str | Path, summaries: Sequence[Mapping[str, Any]], *,
               results: Sequence[PolicyResult] | None = None,
               meta: Mapping[str, Any] | None = None) -> Path:
    """Write `{"meta": ..., "summaries": [...], "records": {policy: [record, ...]}}` to `path`
    atomically (the file is created 0600, as mkstemp makes it). `records` holds every
    request's RequestRecord as a dict when `results` is given, else it is omitted."""
    doc: dict[str, Any] = {"meta": dict(meta or {}), "summaries": [dict(s) for s in summaries]}
    if results is not None:
        doc["records"] = {r.policy: [asdict(rec) for rec in r.records] for r in results}
    data = json.dumps(_jsonable(doc), indent=1, allow_nan=False).encode() + b"\n"
    return _atomic_write(path, data)


def write_text(path: str | Path, text: str) -> Path:
    """Write `text` to `path` atomically (as `write_json`)."""
    data = text.encode()
    return _atomic_write(path, data)


def _fmt(x: float | None) -> str:
    if x is None or not math.isfinite(x):
        return "n/a"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    if abs(x) >= 1:
        return f"{x:.2f}"
    return f"{x:.3f}"


def _ratio(x: float) -> str:
    return f"{x:.1f}x" if x >= 0.1 else f"{x:.2g}x"


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.0f}%"


def markdown_table(summaries: Sequence[Mapping[str, Any]], ours: str = OURS) -> str:
    """One row per policy: requests, rejected, requests that waited for a start (of them,
    for a cold start), TTFT p50/p90/p99, p99 start wait of those that waited, starts loading
    from DRAM/SSD/remote as shares of all starts, device-seconds, migrations, and the policy's
    p99 TTFT over ours (`ours`, "sllm"; n/a when ours is absent or its p99 is 0)."""
    ours_p99 = next((s["ttft_s"]["p99"] for s in summaries if s["policy"] == ours), None)
    head = ["policy", "requests", "rejected", "waited for a start (cold)", "TTFT p50 (s)",
            "TTFT p90 (s)", "TTFT p99 (s)", "start wait p99 (s)", "starts from DRAM/SSD/remote",
            "device-s", "migrations", f"p99 TTFT / {ours}'s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1))
             + "|"]
    for s in summaries:
        p99 = s["ttft_s"]["p99"]
        ratio = _ratio(p99 / ours_p99) if p99 is not None and ours_p99 else "n/a"
        hits = "/".join(_pct(s["cache_hit_rate"].get(t)) for t in TIERS)
        row = [str(s["policy"]), str(s["requests"]), str(s["rejected"]),
               f"{s['waited_for_start']} ({s['waited_by_via'].get('cold', 0)})",
               _fmt(s["ttft_s"]["p50"]), _fmt(s["ttft_s"]["p90"]), _fmt(p99),
               _fmt(s["startup_s"]["waited"]["p99"]), hits, _fmt(s["device_seconds"]),
               str(s["migrations"]), ratio]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- plots


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: str | Path) -> Path:
    png = io.BytesIO()
    fig.savefig(png, format="png")
    return _atomic_write(path, png.getvalue())


def plot_ttft_cdf(results: Sequence[PolicyResult], path: str | Path, *,
                  title: str = "Time to first token, per policy") -> Path:
    """A PNG of the CDF of TTFT (served requests) per policy, log x axis (TTFTs under
    MIN_PLOT_TTFT_S are drawn at it), the p99 in each legend entry."""
    fig = _figure(8, 5)
    ax = fig.add_subplot()
    drawn = 0
    for r in results:
        ttft = np.sort([rec.ttft_s for rec in r.records if rec.ttft_s is not None])
        if ttft.size == 0:
            continue
        x = np.maximum(np.concatenate([ttft[:1], ttft]), MIN_PLOT_TTFT_S)
        y = np.arange(0, ttft.size + 1) / ttft.size  # from 0 at the shortest TTFT
        ax.step(x, y, where="post",
                label=f"{r.policy} (p99 {_fmt(percentile(ttft, 99))} s, n={ttft.size})")
        drawn += 1
    ax.set_xscale("log")
    ax.set_xlabel("time to first token (s, log scale)")
    ax.set_ylabel("fraction of served requests")
    ax.set_ylim(0, 1.01)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    if drawn:
        ax.legend(loc="best")
    else:
        ax.text(0.5, 0.5, "no served requests", ha="center", va="center",
                transform=ax.transAxes)
    return _save(fig, path)


def plot_latency_vs_load(by_load: Mapping[float, Sequence[Mapping[str, Any]]],
                         path: str | Path, *,
                         xlabel: str = "load (x the trace's request rate)",
                         title: str = "TTFT against load") -> Path:
    """A PNG of p50 and p99 TTFT (log y) against load, one line per policy, from summaries
    (`summarize`) keyed by the load factor (or request rate: say which with `xlabel`)."""
    policies: list[str] = []
    for sums in by_load.values():
        for s in sums:
            if s["policy"] not in policies:
                policies.append(s["policy"])
    fig = _figure(11, 4.8)
    axes = fig.subplots(1, 2, sharey=True)
    colors = [f"C{i % 10}" for i in range(len(policies))]
    for ax, q in zip(axes, ("p50", "p99"), strict=True):
        for policy, color in zip(policies, colors, strict=True):
            pts = sorted((float(load), s["ttft_s"][q]) for load, sums in by_load.items()
                         for s in sums if s["policy"] == policy and s["ttft_s"][q] is not None)
            if pts:
                xs, ys = zip(*pts, strict=True)
                ax.plot(xs, np.maximum(ys, MIN_PLOT_TTFT_S), marker="o", color=color,
                        label=policy)
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_title(f"{q} TTFT")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("time to first token (s, log scale)")
    if policies:
        axes[1].legend(loc="best")
    fig.suptitle(title)
    return _save(fig, path)
