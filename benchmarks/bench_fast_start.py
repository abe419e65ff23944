"""Fast start: time from a request to its first token, from zero, through the router.

    python benchmarks/bench_fast_start.py [--workdir work-data/bench]
        [--presets small-llama,bench-2gb] [--repeats 3] [--out FILE.json]

For each preset (small-llama: the demo model, 32 MB; bench-2gb: the ~2 GB bf16 Llama), two
"fine-tunes" A and B (one config, other random weights) are made offline. A real `sllm node`
(one CPU device: every core) and a real `sllm router` (keep-alive 2 s, scale to zero) serve
them from the DRAM tier (promoted before timing). Each figure is a streamed completion sent to
the router with no replica of its model running, timed to its first token:

- cold: the node keeps no standby (`standby_on_expiry: false`): a new vLLM process each time;
- swap: the node keeps a standby engine (`standby: [{like: A}]`, and expired replicas stay as
  standbys); the request is for the model the standby does NOT hold: its weights are swapped
  in (A and B alternate);
- standby holding: the request is for the model the standby still holds (after its keep-alive
  expired): no load at all.

Beside them, in the same run: plain `vllm serve` of the safetensors original: cold (process
start to first token) and warm (a request to the running server). The node's own phases of each
start and the router's placement reason are kept in the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

from bench_vllm import start_server  # noqa: E402
from node_daemon import TOKEN, NodeDaemon, RouterProcess  # noqa: E402
from node_daemon import poll_until as wait_for  # noqa: E402

REPLICA_ARGS = ["--enforce-eager", "--max-model-len", "512", "--max-num-seqs", "4"]
PROMPT = "The quick brown fox jumps over the lazy dog."
KEEP_ALIVE_S = 2


def first_token(url: str, model: str, headers: dict | None = None,
                timeout: float = 900) -> float:
    """Seconds from sending a streamed completion to its first token chunk."""
    started = time.perf_counter()
    with httpx.stream("POST", f"{url}/v1/completions", timeout=timeout, headers=headers or {},
                      json={"model": model, "prompt": PROMPT, "max_tokens": 4,
                            "temperature": 0, "stream": True}) as r:
        if r.status_code != 200:
            r.read()
            raise RuntimeError(f"{model}: HTTP {r.status_code}: {r.text[:500]}")
        for line in r.iter_lines():
            if line.startswith("data:") and line != "data: [DONE]":
                return time.perf_counter() - started
    raise RuntimeError(f"{model}: no token")


def idle(node: NodeDaemon) -> bool:
    """No replica serves or is starting or stopping (standbys may be kept)."""
    return all(r["state"] in ("standby", "stopped", "failed", "exited")
               for r in node.ok("GET", "/replicas"))


def standby_holding(node: NodeDaemon, model: str) -> bool:
    return idle(node) and any(e["model"] == model
                              for e in node.status()["standby"]["engines"])


def last_start(node: NodeDaemon, model: str) -> dict:
    """The node's record of the latest start of `model` (phases, how it started)."""
    mine = [r for r in node.ok("GET", "/replicas") if r["model"] == model]
    latest = max(mine, key=lambda r: r["created"])
    return {k: latest[k] for k in ("id", "started_via", "phases", "state")}


def make_models(workdir: Path, preset: str) -> dict[str, Path]:
    from sllm_plugin.testing import make_random_model

    models = {}
    for name, seed in (("a", 1), ("b", 2)):
        path = workdir / f"fast-{preset}-{name}"
        if not (path / "config.json").exists():
            make_random_model(path, preset, seed=seed)
        models[f"bench/{preset}-{name}"] = path
    return models


def fleet(workdir: Path, preset: str, models: dict[str, Path], standby: bool,
          prefork: bool = True):
    root = workdir / f"fast-{preset}-{'standby' if standby else 'cold'}-{int(prefork)}"
    root.mkdir(parents=True, exist_ok=True)
    names = list(models)
    config = {
        "dram": {"path": f"/dev/shm/sllm-bench-fast-{os.getpid()}", "capacity": "8GiB"},
        "ssd": {"path": str(root / "ssd"), "capacity": "16GiB"},
        "calibration_bytes": "256MiB",
        "replica_args": REPLICA_ARGS,
        "replica_env": {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"},
        "models": {n: {"source": str(p)} for n, p in models.items()},
        "standby_on_expiry": standby,
        "prefork": prefork,
        "standby": [{"like": names[0], "count": 1}] if standby else [],
    }
    node = NodeDaemon(root, config).start()
    for name in names:
        node.ok("POST", "/prefetch", {"model": name, "tier": "dram", "wait": True})
    router = RouterProcess(root, {
        "nodes": [{"name": "node", "url": node.url, "token": TOKEN}],
        "models": {n: {"source": str(p), "keep_alive_s": KEEP_ALIVE_S} for n, p in models.items()},
        "limits": {"start_timeout_s": 900},
    }).start()
    return node, router


def run_cold(workdir: Path, preset: str, models: dict[str, Path], repeats: int,
             prefork: bool) -> list[dict]:
    node, router = fleet(workdir, preset, models, standby=False, prefork=prefork)
    out = []
    try:
        name = next(iter(models))
        for _ in range(repeats):
            wait_for("scale to zero", lambda: idle(node))
            seconds = first_token(router.url, name)
            out.append({"first_token_s": seconds, **last_start(node, name)})
            print(f"  cold{' (prefork)' if prefork else ''} {name}: {seconds:.2f} s "
                  f"{out[-1]['phases']}", flush=True)
    finally:
        router.stop()
        node.stop()
    return out


def run_standby(workdir: Path, preset: str, models: dict[str, Path],
                repeats: int) -> tuple[list[dict], list[dict], list[dict], dict]:
    node, router = fleet(workdir, preset, models, standby=True)
    swaps, holding = [], []
    a, b = list(models)
    try:
        wait_for("the configured standby", lambda: standby_holding(node, a))
        standby = node.status()["standby"]
        print(f"  a standby engine holds {standby['memory_bytes'] / 2**30:.2f} GiB (PSS)",
              flush=True)
        for i in range(repeats):
            other = b if i % 2 == 0 else a  # the model the standby does not hold
            seconds = first_token(router.url, other)
            swaps.append({"first_token_s": seconds, **last_start(node, other)})
            print(f"  swap {other}: {seconds:.2f} s {swaps[-1]['phases']}", flush=True)
            wait_for("the replica kept as a standby", lambda m=other: standby_holding(node, m))
            seconds = first_token(router.url, other)
            holding.append({"first_token_s": seconds, **last_start(node, other)})
            print(f"  standby holding {other}: {seconds:.2f} s {holding[-1]['phases']}",
                  flush=True)
            wait_for("the replica kept as a standby", lambda m=other: standby_holding(node, m))
        placements = router.call("GET", "/admin/placements").json()
    finally:
        router.stop()
        node.stop()
    return swaps, holding, placements, standby


def run_plain(workdir: Path, preset: str, model: Path, repeats: int) -> dict:
    log = workdir / f"fast-{preset}-plain.log"
    proc, url, t0 = start_server(model, log)
    try:
        wait_for("plain vLLM", lambda: proc.poll() is not None or _healthy(url))
        if proc.poll() is not None:
            raise RuntimeError(f"plain vLLM exited {proc.returncode}; see {log}")
        first_token(url, "m")
        cold = time.perf_counter() - t0  # process start to the first token
        warm = [first_token(url, "m") for _ in range(repeats)]
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
    return {"cold_first_token_s": cold, "warm_first_token_s": warm}


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("work-data/bench"))
    parser.add_argument("--presets", default="small-llama,bench-2gb")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    results = {"date": datetime.now(timezone.utc).isoformat(timespec="minutes"),
               "machine": f"{platform.node()}, {os.cpu_count()} cores", "presets": {}}
    for preset in args.presets.split(","):
        print(f"== {preset}", flush=True)
        models = make_models(args.workdir, preset)
        plain = run_plain(args.workdir, preset, next(iter(models.values())), args.repeats)
        print(f"  plain vLLM cold {plain['cold_first_token_s']:.2f} s, warm "
              f"{statistics.median(plain['warm_first_token_s']):.3f} s", flush=True)
        cold = run_cold(args.workdir, preset, models, args.repeats, prefork=False)
        # The first start of a node with prefork waits for the helper's imports: one more
        # start than the others, reported apart.
        forked = run_cold(args.workdir, preset, models, args.repeats + 1, prefork=True)
        swaps, holding, placements, standby = run_standby(args.workdir, preset, models,
                                                          args.repeats)
        results["presets"][preset] = {"plain": plain, "cold": cold, "cold_prefork": forked,
                                      "swap": swaps,
                                      "standby_holding": holding, "placements": placements,
                                      "standby": standby}
    print("\n| model | plain vLLM cold | plain vLLM warm | cold (node+router) | cold, prefork "
          "(first start) | cold, prefork (later starts) | swap into a standby | standby holding "
          "the model |\n|---|---:|---:|---:|---:|---:|---:|---:|")
    for preset, r in results["presets"].items():
        def med(runs: list[dict]) -> str:
            return f"{statistics.median(x['first_token_s'] for x in runs):.3f}"
        print(f"| {preset} | {r['plain']['cold_first_token_s']:.2f} | "
              f"{statistics.median(r['plain']['warm_first_token_s']):.3f} | {med(r['cold'])} | "
              f"{r['cold_prefork'][0]['first_token_s']:.3f} | {med(r['cold_prefork'][1:])} | "
              f"{med(r['swap'])} | {med(r['standby_holding'])} |")
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
    shutil.rmtree(f"/dev/shm/sllm-bench-fast-{os.getpid()}", ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
