"""Router overhead against a fast real upstream, and the migration pause on real vLLM replicas.

    python benchmarks/bench_router.py [--workdir work-data/bench] [--levels 1,64,256]
        [--tokens 32] [--paces 20,0] [--rounds 3] [--migration-repeats 5] [--out FILE.json]

Overhead: a real node daemon launches `benchmarks/fast_upstream.py` (an OpenAI-compatible
server that streams tokens without a model) as its replica; a real `sllm router` scales it
from zero. Two paces: one token every 20 ms per stream, a decoding replica's pace (the router's
cost as a serving fleet sees it), and unpaced, every token at once (the CPU-bound ceiling: on
2 vCPUs shared by client, router and upstream, a proxy hop's CPU shows up as latency). At each
concurrency level the same streamed requests go straight to the upstream and through the
router (and through `bare_relay.py`, the floor for any Python proxy hop), alternating for
`--rounds` rounds; each stream's token ids are checked (none lost, none repeated). Reported,
as medians over the rounds: time to first token p50 and p99; each token's delivery latency
p50 and p99 (from the moment the upstream wrote it, stamped in its text, to the client reading
it); the added latency (path minus direct, same percentile); throughput; and the router's own
CPU time per relayed token. The load generator is aiohttp's client (little CPU per chunk).

Migration pause: two node daemons with one real vLLM CPU replica each (the small random Llama,
float32, one core each), a greedy stream of 300 tokens migrated after its 20th token while the
client keeps reading. The pause is the client-side gap between the last token from the source
and the first from the destination (`GET /admin/migrations` says which token that was),
against the median gap between the first 20 tokens; the router's own record of the pause
beside it.
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

import aiohttp
import httpx
import psutil
import yaml

from sllm_plugin.tokens import read_token_file

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from vllm_server import free_port, vllm_env, wait_healthy  # noqa: E402

TOKEN = "bench-admin-token-of-the-router"  # the router's admin token


class Service:
    """`sllm node` or `sllm router` with this configuration (or any `argv` with /health)."""

    def __init__(self, workdir: Path, name: str, kind: str, config: dict,
                 argv: list[str] | None = None, host=None) -> None:
        """`host`: a namespace host (tests/netns.py) to run on, reached at its address."""
        self.port = config["port"]
        self.url = f"http://{host.address if host else '127.0.0.1'}:{self.port}"
        path = workdir / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config))
        self.proc = subprocess.Popen(
            [*(host.exec_prefix() if host else []),
             *(argv or [sys.executable, "-m", "sllm_plugin.cli", kind, "--config", str(path)])],
            stdout=open(workdir / f"{name}.log", "w"), stderr=subprocess.STDOUT,  # noqa: SIM115
            env=vllm_env())
        wait_healthy(self.url, self.proc, 120, name, lambda: f"see {workdir / name}.log")

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(120)


def node_config(workdir: Path, name: str, command: list[str] | None,
                extra_args: tuple[str, ...] = (), device: str | None = None,
                host=None) -> dict:
    from sllm_plugin.store.replicas import detect_devices

    # No token configured: the node makes its own in its state directory (node_token_file).
    config = {"port": free_port(), "state_dir": str(workdir / f"{name}-state"),
              **({"host": host.address, "port": 8073} if host else {}),
              "dram": {"path": f"/dev/shm/sllm-bench-{name}", "capacity": 10**9},
              "ssd": {"path": str(workdir / f"{name}-ssd"), "capacity": 10**9},
              "devices": [device or detect_devices()[0].name],
              "calibration_bytes": 32 * 1024 * 1024,
              "replica_args": ["--enforce-eager", "--max-model-len", "1024", *extra_args],
              "replica_env": {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}}
    if command:
        config["replica_command"] = command
    return config


def node_token_file(workdir: Path, name: str) -> str:
    """Where the node `name` (node_config) made its token."""
    return str(workdir / f"{name}-state" / "token")


async def one_stream(session: aiohttp.ClientSession, url: str, model: str,
                     tokens: int, headers: dict | None = None) -> dict:
    t0 = time.perf_counter()
    first = None
    ids: list[int] = []
    delays: list[float] = []  # each token: written by the upstream -> read here
    async with session.post(f"{url}/v1/completions", headers=headers, json={
            "model": model, "prompt": "hello", "max_tokens": tokens, "stream": True,
            "return_token_ids": True}) as r:
        r.raise_for_status()
        async for raw in r.content:  # one line at a time
            line = raw.strip()
            if line.startswith(b"data:") and line != b"data: [DONE]":
                now = time.monotonic()
                chunk = json.loads(line[5:])
                new = chunk["choices"][0].get("token_ids") or [] if chunk["choices"] else []
                if new:
                    delays.append(now - float(chunk["choices"][0]["text"].split("@")[1]))
                if new and first is None:
                    first = time.perf_counter() - t0
                ids += new
    return {"ttft": first, "total": time.perf_counter() - t0, "delays": delays,
            "ok": ids == list(range(tokens))}


async def level(url: str, model: str, concurrency: int, count: int, tokens: int,
                stagger_s: float = 0.0, headers: dict | None = None) -> dict:
    """`count` streams through `concurrency` workers. Worker i starts i x `stagger_s` late, so
    paced streams spread over the token interval as independent clients' do, instead of all
    `concurrency` of them arriving, ticking and finishing in the same millisecond."""
    # aiohttp, not httpx, as the load generator: on this 2-vCPU VM httpx's client spends ~15x
    # the CPU per streamed chunk, and that CPU is taken from the router and the upstream.
    connector = aiohttp.TCPConnector(limit=concurrency + 8)
    async with aiohttp.ClientSession(connector=connector) as session:
        await one_stream(session, url, model, tokens, headers)  # connections warm
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(count):
            queue.put_nowait(i)
        results: list[dict] = []

        async def worker(i: int) -> None:
            await asyncio.sleep(i * stagger_s)  # arrival spacing (load shape, not a wait)
            while not queue.empty():
                queue.get_nowait()
                results.append(await one_stream(session, url, model, tokens, headers))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(i) for i in range(concurrency)))
        wall = time.perf_counter() - t0

    def pct(values: list[float], q: float) -> float:
        values = sorted(values)
        return values[min(len(values) - 1, int(q * len(values)))]

    ttfts = [r["ttft"] for r in results]
    delays = [d for r in results for d in r["delays"]]
    return {"p50_ttft": pct(ttfts, 0.5), "p99_ttft": pct(ttfts, 0.99),
            "p50_token": pct(delays, 0.5), "p99_token": pct(delays, 0.99),
            "requests_per_s": count / wall, "tokens_per_s": count * tokens / wall,
            "all_tokens_exact": all(r["ok"] for r in results), "requests": count}


def median_of(rounds: list[dict]) -> dict:
    """Each figure's median over the rounds; tokens exact only if exact in every round."""
    out = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]
           if k not in ("all_tokens_exact", "router_cpu_us_per_token")}
    out["router_cpu_us_per_token"] = statistics.median(r["router_cpu_us_per_token"]
                                                       for r in rounds)
    out["all_tokens_exact"] = all(r["all_tokens_exact"] for r in rounds)
    return out


def overhead(workdir: Path, model_dir: Path, levels: list[int], tokens: int,
             interval_ms: float, repeats: int, net=None) -> dict:
    """`net`: a tests/netns.py Network with hosts "node" and "router" to put them on (the
    client stays in the root namespace, across the bridge from both); else all on loopback."""
    node_host, router_host = (net.hosts["node"], net.hosts["router"]) if net else (None, None)
    node = Service(workdir, "rb-node", "node", node_config(
        workdir, "rb-node", [sys.executable, str(HERE / "fast_upstream.py")],
        ("--token-interval-ms", str(interval_ms)), host=node_host), host=node_host)
    router = Service(workdir, "rb-router", "router", {
        **({"host": router_host.address, "port": 8080} if router_host else {}),
        "port": 8080 if router_host else free_port(), "admin_token": TOKEN,
        "nodes": [{"name": "n", "url": node.url,
                   "token_file": node_token_file(workdir, "rb-node")}],
        "models": {"bench/fast": {"source": str(model_dir), "keep_alive_s": 3600}},
        "limits": {"max_queue": 4096, "max_tokens": 4096}}, host=router_host)
    try:
        r = httpx.post(f"{router.url}/v1/completions", timeout=300, json={
            "model": "bench/fast", "prompt": "hello", "max_tokens": 4})
        r.raise_for_status()
        (replica,) = httpx.get(f"{router.url}/admin/replicas", timeout=10,
                               headers={"Authorization": f"Bearer {TOKEN}"}).json()
        relay_port = free_port()
        relay = Service(workdir, "rb-relay", "relay", {"port": relay_port}, [
            sys.executable, str(HERE / "bare_relay.py"), "--port", str(relay_port),
            "--upstream", replica["url"],
            *(["--host", router_host.address] if router_host else [])], host=router_host)
        router_cpu = psutil.Process(router.proc.pid)
        paths = {"direct": replica["url"], "bare relay": relay.url, "router": router.url}
        # The direct and relayed paths carry the replica's key, as the router does.
        key = httpx.get(f"{node.url}/replica-keys", timeout=10, headers={
            "Authorization": "Bearer " + read_token_file(node_token_file(workdir, "rb-node"))
        }).json()["keys"][replica["id"].split("/")[1]]
        auth = {p: {"Authorization": f"Bearer {key}"} if p != "router" else None
                for p in paths}
        out = {}
        for c in levels:
            # Paced streams take tokens x pace each: fewer requests at low concurrency.
            count = max(4 * c, 20 if interval_ms else 200)
            stagger = tokens * interval_ms / 1e3 / c
            rounds: dict[str, list[dict]] = {p: [] for p in paths}
            for _ in range(repeats):
                for path, url in paths.items():
                    before = sum(router_cpu.cpu_times()[:2])
                    result = asyncio.run(level(url, "bench/fast", c, count, tokens, stagger,
                                               auth[path]))
                    result["router_cpu_us_per_token"] = (
                        (sum(router_cpu.cpu_times()[:2]) - before) / (count * tokens) * 1e6)
                    rounds[path].append(result)
            out[c] = {p: median_of(rounds[p]) for p in paths}
            print(f"{interval_ms} ms/token, concurrency {c}: {out[c]}", file=sys.stderr)
        relay.close()
        return out
    finally:
        router.close()
        node.close()
        shutil.rmtree("/dev/shm/sllm-bench-rb-node", ignore_errors=True)


def migration_pause(workdir: Path, model_dir: Path, repeats: int, net=None) -> list[dict]:
    """`net`: a Network with hosts "a", "b" and "router" to put the nodes and router on."""
    # One core each where there are two, as replicas own their devices in a fleet: replicas
    # sharing cores stall each other for hundreds of ms whenever both compute (a warm-up
    # beside a decode). The node confines each replica's whole process tree to its core.
    cores = [f"cpu:{i}" for i in range(2)] if (os.cpu_count() or 1) >= 2 else [None, None]
    hosts = {n: net.hosts[n] if net else None for n in ("a", "b", "router")}
    nodes = [Service(workdir, f"mb-{n}", "node", node_config(
        workdir, f"mb-{n}", None, ("--dtype", "float32"), core, hosts[n]), host=hosts[n])
        for n, core in zip(("a", "b"), cores, strict=True)]
    router = Service(workdir, "mb-router", "router", {
        **({"host": hosts["router"].address} if net else {}),
        "port": 8080 if net else free_port(), "admin_token": TOKEN,
        "nodes": [{"name": n, "url": s.url, "token_file": node_token_file(workdir, f"mb-{n}")}
                  for n, s in zip("ab", nodes, strict=True)],
        "models": {"bench/llama": {"source": str(model_dir), "max_replicas": 2,
                                   "keep_alive_s": 3600, "target_load": 1000}}},
        host=hosts["router"])
    admin = {"Authorization": f"Bearer {TOKEN}"}
    body = {"model": "bench/llama", "prompt": "The quick brown fox " * 4, "max_tokens": 300,
            "temperature": 0, "ignore_eos": True, "stream": True, "return_token_ids": True}
    try:
        httpx.post(f"{router.url}/v1/completions", timeout=600,
                   json={**body, "stream": False, "max_tokens": 2}).raise_for_status()
        (first,) = httpx.get(f"{router.url}/admin/replicas", headers=admin).json()
        other = "b" if first["node"] == "a" else "a"  # the node with a free device
        token = read_token_file(node_token_file(workdir, f"mb-{other}"))
        httpx.post(f"{nodes['ab'.index(other)].url}/replicas", timeout=600,
                   headers={"Authorization": f"Bearer {token}"},
                   json={"model": "bench/llama", "wait": True}).raise_for_status()
        while len([r for r in httpx.get(f"{router.url}/admin/replicas", headers=admin)
                   .json() if r["state"] == "ready"]) < 2:
            time.sleep(0.2)  # polling interval until the router adopted the second replica
        results = []
        # Made before the stream: a client made in the mover thread loads its TLS context
        # while holding the GIL, which stalled the reading thread for a few hundred ms.
        control = httpx.Client(base_url=router.url, headers=admin, timeout=60)
        # A stream can finish before its move starts (a stalled warm-up): such attempts are
        # reported and made again, up to three times the repeats.
        for _ in range(3 * repeats):
            if len(results) == repeats:
                break
            arrivals: list[float] = []  # per token
            answer: dict = {}

            def migrate(answer: dict = answer) -> None:
                streams = control.get("/admin/streams").json()
                if not streams:
                    answer["state"] = "finished before the move"
                    return
                answer.update(control.post("/admin/migrate",
                                           json={"stream": streams[0]["id"]}).json())

            mover = threading.Thread(target=migrate)
            with httpx.stream("POST", f"{router.url}/v1/completions", json=body,
                              timeout=600) as r:
                for line in r.iter_lines():
                    if not line.startswith("data:") or line == "data: [DONE]":
                        continue
                    now = time.perf_counter()
                    ids = json.loads(line[5:])["choices"][0].get("token_ids") or []
                    arrivals += [now] * len(ids)
                    if len(arrivals) >= 20 and not mover.is_alive() and not answer:
                        mover.start()  # the client keeps reading while it moves
            mover.join()
            if answer.get("state") != "switching":
                print(f"migration not made: {answer}", file=sys.stderr)
                continue
            (move,) = [m for m in control.get("/admin/migrations").json()
                       if m["stream"] == answer["stream"]]
            at = move["at_token"]  # the first token from the destination
            gaps = [b - a for a, b in zip(arrivals, arrivals[1:], strict=False)]
            results.append({"pause_s": arrivals[at] - arrivals[at - 1],
                            "router_pause_s": move["pause_s"],
                            "median_gap_s": statistics.median(gaps[:19]),
                            "at_token": at, "tokens": len(arrivals), "to": move["to"]})
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
    parser.add_argument("--paces", default="20,0",
                        help="the upstream's ms between tokens, one run each (0: unpaced)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="direct and router alternate this many times per level")
    parser.add_argument("--migration-repeats", type=int, default=5)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    from sllm_plugin.testing import make_random_model

    work = (args.workdir / "router-bench").resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    model_dir = make_random_model(work / "model", "tiny-llama", seed=3)
    levels = [int(x) for x in args.levels.split(",")]
    over = {pace: overhead(work, model_dir, levels, args.tokens, pace, args.rounds)
            for pace in (float(x) for x in args.paces.split(","))}
    # small-llama: the tiny preset finishes a 300-token stream before a move can start.
    small = make_random_model(work / "small", "small-llama", seed=3)
    pauses = migration_pause(work, small, args.migration_repeats) \
        if args.migration_repeats else []

    lines = [f"Machine: {os.uname().nodename}, {os.cpu_count()} cores; "
             f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; {args.tokens} tokens per stream; "
             f"medians over {args.rounds} alternating rounds",
             "", "| ms/token | streams | path | p50 TTFT ms | p99 TTFT ms | p50 token ms "
             "| p99 token ms | req/s | router CPU µs/token | tokens exact |",
             "|---:|---:|---|---:|---:|---:|---:|---:|---:|---|"]
    for pace, runs in over.items():
        for c, by_path in runs.items():
            for path, m in by_path.items():
                cpu = f"{m['router_cpu_us_per_token']:.0f}" if path == "router" else ""
                lines.append(f"| {pace:g} | {c} | {path} | {m['p50_ttft'] * 1e3:.2f} | "
                             f"{m['p99_ttft'] * 1e3:.2f} | {m['p50_token'] * 1e3:.2f} | "
                             f"{m['p99_token'] * 1e3:.2f} | {m['requests_per_s']:.0f} | {cpu} | "
                             f"{m['all_tokens_exact']} |")
    lines.append("")
    for pace, runs in over.items():
        for c, by_path in runs.items():
            d = by_path["direct"]
            for path in ("bare relay", "router"):
                r = by_path[path]
                lines.append(
                    f"{pace:g} ms/token, {c} streams, {path}: added latency per token p50 "
                    f"{(r['p50_token'] - d['p50_token']) * 1e3:.2f} ms, p99 "
                    f"{(r['p99_token'] - d['p99_token']) * 1e3:.2f} ms; added TTFT p50 "
                    f"{(r['p50_ttft'] - d['p50_ttft']) * 1e3:.2f} ms, p99 "
                    f"{(r['p99_ttft'] - d['p99_ttft']) * 1e3:.2f} ms; throughput "
                    f"{r['requests_per_s'] / d['requests_per_s']:.2f}x direct")
    if pauses:
        lines.append("")
        lines.append(f"migration pause (median of {len(pauses)}): "
                     f"{statistics.median(p['pause_s'] for p in pauses) * 1e3:.1f} ms as the "
                     f"client saw it, "
                     f"{statistics.median(p['router_pause_s'] for p in pauses) * 1e3:.1f} ms as "
                     f"the router recorded it (last source token to first destination token), "
                     f"against a "
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
