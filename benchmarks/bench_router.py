"""Router overhead against a fast real upstream, and the migration pause on real vLLM replicas.

    python benchmarks/bench_router.py [--workdir work-data/bench] [--levels 1,64,256]
        [--tokens 32] [--migration-repeats 5] [--out FILE.json]

Overhead: a real node daemon launches `benchmarks/fast_upstream.py` (an OpenAI-compatible
server that streams tokens as fast as it can) as its replica; a real `sllm router` scales it
from zero. At each concurrency level the same streamed requests go straight to the upstream and
through the router, side by side; each stream's token ids are checked (none lost, none
repeated). Reported: time to first token and to the last token, p50 and p99, the router's
added latency (router minus direct, same percentile), and throughput.

Migration pause: two node daemons with one real vLLM CPU replica each (the small random Llama,
float32), a greedy stream of 300 tokens migrated after its 20th chunk while the client keeps
reading; the largest client-side gap from then on against the median gap before it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx
import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from vllm_server import free_port, vllm_env  # noqa: E402

TOKEN = "bench"


class Service:
    def __init__(self, workdir: Path, name: str, kind: str, config: dict) -> None:
        self.port = config["port"]
        self.url = f"http://127.0.0.1:{self.port}"
        path = workdir / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sllm_plugin.cli", kind, "--config", str(path)],
            stdout=open(workdir / f"{name}.log", "w"), stderr=subprocess.STDOUT,  # noqa: SIM115
            env=vllm_env())
        deadline = time.monotonic() + 120
        while True:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not start; see {workdir / (name + '.log')}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)  # polling interval

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(120)


def node_config(workdir: Path, name: str, command: list[str] | None,
                extra_args: tuple[str, ...] = ()) -> dict:
    from sllm_plugin.store.replicas import detect_devices

    config = {"port": free_port(), "token": TOKEN, "state_dir": str(workdir / f"{name}-state"),
              "dram": {"path": f"/dev/shm/sllm-bench-{name}", "capacity": 10**9},
              "ssd": {"path": str(workdir / f"{name}-ssd"), "capacity": 10**9},
              "devices": [detect_devices()[0].name], "calibration_bytes": 32 * 1024 * 1024,
              "replica_args": ["--enforce-eager", "--max-model-len", "1024", *extra_args],
              "replica_env": {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}}
    if command:
        config["replica_command"] = command
    return config


async def one_stream(client: httpx.AsyncClient, url: str, model: str, tokens: int) -> dict:
    t0 = time.perf_counter()
    first = None
    ids: list[int] = []
    async with client.stream("POST", f"{url}/v1/completions", json={
            "model": model, "prompt": "hello", "max_tokens": tokens, "stream": True,
            "return_token_ids": True}) as r:
        async for line in r.aiter_lines():
            if line.startswith("data:") and line != "data: [DONE]":
                chunk = json.loads(line[5:])
                new = chunk["choices"][0].get("token_ids") or [] if chunk["choices"] else []
                if new and first is None:
                    first = time.perf_counter() - t0
                ids += new
    return {"ttft": first, "total": time.perf_counter() - t0, "ok": ids == list(range(tokens))}


async def level(url: str, model: str, concurrency: int, count: int, tokens: int) -> dict:
    limits = httpx.Limits(max_connections=concurrency + 8,
                          max_keepalive_connections=concurrency + 8)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        await one_stream(client, url, model, tokens)  # connections warm
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(count):
            queue.put_nowait(i)
        results: list[dict] = []

        async def worker() -> None:
            while not queue.empty():
                queue.get_nowait()
                results.append(await one_stream(client, url, model, tokens))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0

    def pct(key: str, q: float) -> float:
        values = sorted(r[key] for r in results)
        return values[min(len(values) - 1, int(q * len(values)))]

    return {"p50_ttft": pct("ttft", 0.5), "p99_ttft": pct("ttft", 0.99),
            "p50_total": pct("total", 0.5), "p99_total": pct("total", 0.99),
            "requests_per_s": count / wall, "tokens_per_s": count * tokens / wall,
            "all_tokens_exact": all(r["ok"] for r in results), "requests": count}


def overhead(workdir: Path, model_dir: Path, levels: list[int], tokens: int) -> dict:
    node = Service(workdir, "rb-node", "node", node_config(
        workdir, "rb-node", [sys.executable, str(HERE / "fast_upstream.py")]))
    router = Service(workdir, "rb-router", "router", {
        "port": free_port(), "admin_token": TOKEN,
        "nodes": [{"name": "n", "url": node.url, "token": TOKEN}],
        "models": {"bench/fast": {"source": str(model_dir), "keep_alive_s": 3600}},
        "limits": {"max_queue": 4096, "max_tokens": 4096}})
    try:
        r = httpx.post(f"{router.url}/v1/completions", timeout=300, json={
            "model": "bench/fast", "prompt": "hello", "max_tokens": 4})
        r.raise_for_status()
        (replica,) = httpx.get(f"{router.url}/admin/replicas", timeout=10,
                               headers={"Authorization": f"Bearer {TOKEN}"}).json()
        out = {}
        for c in levels:
            count = max(200, 4 * c)
            direct = asyncio.run(level(replica["url"], "bench/fast", c, count, tokens))
            routed = asyncio.run(level(router.url, "bench/fast", c, count, tokens))
            out[c] = {"direct": direct, "router": routed}
            print(f"concurrency {c}: direct {direct}\n  router {routed}", file=sys.stderr)
        return out
    finally:
        router.close()
        node.close()
        shutil.rmtree("/dev/shm/sllm-bench-rb-node", ignore_errors=True)


def migration_pause(workdir: Path, model_dir: Path, repeats: int) -> list[dict]:
    nodes = [Service(workdir, f"mb-{n}", "node", node_config(
        workdir, f"mb-{n}", None, ("--dtype", "float32"))) for n in ("a", "b")]
    router = Service(workdir, "mb-router", "router", {
        "port": free_port(), "admin_token": TOKEN,
        "nodes": [{"name": n, "url": s.url, "token": TOKEN} for n, s in zip("ab", nodes,
                                                                              strict=True)],
        "models": {"bench/llama": {"source": str(model_dir), "max_replicas": 2,
                                   "keep_alive_s": 3600, "target_load": 1000}}})
    admin = {"Authorization": f"Bearer {TOKEN}"}
    body = {"model": "bench/llama", "prompt": "The quick brown fox " * 4, "max_tokens": 300,
            "temperature": 0, "ignore_eos": True, "stream": True, "return_token_ids": True}
    try:
        httpx.post(f"{router.url}/v1/completions", timeout=600,
                   json={**body, "stream": False, "max_tokens": 2}).raise_for_status()
        httpx.post(f"{nodes[0].url}/replicas", headers=admin, timeout=600,
                   json={"model": "bench/llama", "wait": True}).raise_for_status()
        while len([r for r in httpx.get(f"{router.url}/admin/replicas", headers=admin)
                   .json() if r["state"] == "ready"]) < 2:
            time.sleep(0.2)  # polling interval until the router adopted the second replica
        results = []
        for _ in range(repeats):
            arrivals: list[float] = []
            migrated_at = None
            answer: dict = {}

            def migrate(answer: dict = answer) -> None:
                (stream,) = httpx.get(f"{router.url}/admin/streams", headers=admin).json()
                answer.update(httpx.post(f"{router.url}/admin/migrate", headers=admin,
                                         timeout=60, json={"stream": stream["id"]}).json())

            mover = threading.Thread(target=migrate)
            with httpx.stream("POST", f"{router.url}/v1/completions", json=body,
                              timeout=600) as r:
                for line in r.iter_lines():
                    if not line.startswith("data:") or line == "data: [DONE]":
                        continue
                    arrivals.append(time.perf_counter())
                    if len(arrivals) == 20:  # the client keeps reading while it moves
                        migrated_at = len(arrivals)
                        mover.start()
            mover.join()
            if answer.get("state") != "switching":
                print(f"migration not made: {answer}", file=sys.stderr)
                continue
            gaps = [b - a for a, b in zip(arrivals, arrivals[1:], strict=False)]
            normal = statistics.median(gaps[:migrated_at - 1])
            pause = max(gaps[migrated_at - 1:])
            results.append({"pause_s": pause, "median_gap_s": normal, "chunks": len(arrivals),
                            "at_token": answer.get("at_token"), "to": answer.get("to")})
            print(f"migration: {results[-1]}", file=sys.stderr)
        return results
    finally:
        router.close()
        for n in nodes:
            n.close()
        for n in ("a", "b"):
            shutil.rmtree(f"/dev/shm/sllm-bench-mb-{n}", ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("work-data/bench"))
    parser.add_argument("--levels", default="1,64,256")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--migration-repeats", type=int, default=5)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    from sllm_plugin.testing import make_random_model

    work = (args.workdir / "router-bench").resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    model_dir = make_random_model(work / "model", "tiny-llama", seed=3)
    levels = [int(x) for x in args.levels.split(",")]
    over = overhead(work, model_dir, levels, args.tokens)
    # small-llama: the tiny preset finishes a 300-token stream before a move can start.
    small = make_random_model(work / "small", "small-llama", seed=3)
    pauses = migration_pause(work, small, args.migration_repeats) \
        if args.migration_repeats else []

    lines = [f"Machine: {os.uname().nodename}, {os.cpu_count()} cores; "
             f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; {args.tokens} tokens per stream",
             "", "| streams | path | p50 TTFT ms | p99 TTFT ms | p50 total ms | p99 total ms "
             "| req/s | tokens exact |", "|---:|---|---:|---:|---:|---:|---:|---|"]
    for c, pair in over.items():
        for path in ("direct", "router"):
            m = pair[path]
            lines.append(f"| {c} | {path} | {m['p50_ttft'] * 1e3:.2f} | {m['p99_ttft'] * 1e3:.2f}"
                         f" | {m['p50_total'] * 1e3:.2f} | {m['p99_total'] * 1e3:.2f} | "
                         f"{m['requests_per_s']:.0f} | {m['all_tokens_exact']} |")
    lines.append("")
    for c, pair in over.items():
        d, r = pair["direct"], pair["router"]
        lines.append(f"{c} streams: added latency p50 {(r['p50_total'] - d['p50_total']) * 1e3:.2f}"
                     f" ms, p99 {(r['p99_total'] - d['p99_total']) * 1e3:.2f} ms; added TTFT "
                     f"p50 {(r['p50_ttft'] - d['p50_ttft']) * 1e3:.2f} ms, p99 "
                     f"{(r['p99_ttft'] - d['p99_ttft']) * 1e3:.2f} ms; throughput "
                     f"{r['requests_per_s'] / d['requests_per_s']:.2f}x direct")
    if pauses:
        lines.append("")
        lines.append(f"migration pause (median of {len(pauses)}): "
                     f"{statistics.median(p['pause_s'] for p in pauses) * 1e3:.1f} ms against a "
                     f"median gap between chunks of "
                     f"{statistics.median(p['median_gap_s'] for p in pauses) * 1e3:.1f} ms")
    report = "\n".join(lines)
    print(report)
    if args.out:
        args.out.write_text(json.dumps({"overhead": over, "migration": pauses,
                                        "report": report}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
