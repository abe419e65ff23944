"""The router across hosts: overhead per token and migration pause with the node daemons and
their replicas on other (network-namespace) hosts, beside the same on loopback; and what the
replica guard (sllm_plugin.vllm.guard) costs.

    sudo python benchmarks/bench_multihost.py [--workdir work-data/bench] [--streams 64]
        [--tokens 32] [--pace 20] [--rounds 3] [--migration-repeats 3] [--out FILE.json]

Root only (it makes hosts out of network namespaces with tests/netns.py: a bridge, one
namespace per host, 198.18.0.0/24, nothing routed off it). The measurements are
`bench_router.py`'s, run twice: everything on loopback, then the node (with its replicas)
and the router each on a host of its own, the client in the root namespace across the
bridge. Overhead: `--streams` concurrent streams of `--tokens` tokens at one token every
`--pace` ms from `fast_upstream.py` replicas, direct (with the replica's key) and through
the router, alternating `--rounds` times; medians. Migration pause: real vLLM CPU replicas
on two nodes (hosts "a" and "b"), a greedy stream moved from one to the other.

Guard: two `fast_upstream.py` servers on loopback, one wrapped in the replica guard as a
node wraps vLLM (`--middleware`, keys in the environment), one bare; the same unpaced and
paced streams against each, alternating; the upstream's own CPU time per token and the
token latency, side by side.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

from bench_router import level, median_of, migration_pause, overhead  # noqa: E402
from netns import Network, netns_available  # noqa: E402
from vllm_server import free_port, vllm_env, wait_healthy  # noqa: E402

from sllm_plugin.vllm import guard  # noqa: E402


def guard_cost(workdir: Path, streams: int, tokens: int, paces: list[float],
               rounds: int) -> dict:
    key, control = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    servers = {}
    for name, extra in (("bare", []), ("guarded", ["--middleware", guard.MIDDLEWARE])):
        port = free_port()
        env = {**vllm_env(), guard.KEY_ENV: key, guard.CONTROL_KEY_ENV: control}
        servers[name] = {"port": port, "url": f"http://127.0.0.1:{port}", "procs": [], "env": env,
                         "argv": [sys.executable, str(HERE / "fast_upstream.py"), "--port",
                                  str(port), "--served-model-name", "bench/fast", *extra]}
    headers = {"Authorization": f"Bearer {key}"}
    out: dict = {}
    for pace in paces:
        rounds_by: dict[str, list[dict]] = {n: [] for n in servers}
        procs = {}
        try:
            for name, s in servers.items():
                procs[name] = subprocess.Popen(
                    [*s["argv"], "--token-interval-ms", str(pace)], env=s["env"],
                    stdout=open(workdir / f"guard-{name}.log", "w"),  # noqa: SIM115
                    stderr=subprocess.STDOUT)
                wait_healthy(s["url"], procs[name], 60, name, lambda: "")
            count = max(4 * streams, 20 if pace else 200)
            stagger = tokens * pace / 1e3 / streams
            for _ in range(rounds):
                for name, s in servers.items():
                    cpu = psutil.Process(procs[name].pid)
                    before = sum(cpu.cpu_times()[:2])
                    result = asyncio.run(level(s["url"], "bench/fast", streams, count, tokens,
                                               stagger, headers))
                    result["router_cpu_us_per_token"] = (  # here: the upstream's own CPU
                        (sum(cpu.cpu_times()[:2]) - before) / (count * tokens) * 1e6)
                    rounds_by[name].append(result)
        finally:
            for p in procs.values():
                p.terminate()
                p.wait(30)
        out[pace] = {n: median_of(r) for n, r in rounds_by.items()}
        print(f"guard, {pace} ms/token: {out[pace]}", file=sys.stderr)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("work-data/bench"))
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--pace", type=float, default=20.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--migration-repeats", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    reason = netns_available()
    if reason:
        print(f"bench_multihost: {reason}", file=sys.stderr)
        return 2
    from sllm_plugin.testing import make_random_model

    work = (args.workdir / "multihost-bench").resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    tiny = make_random_model(work / "model", "tiny-llama", seed=3)
    small = make_random_model(work / "small", "small-llama", seed=3)
    results: dict = {"overhead": {}, "migration": {}}
    for placement in ("loopback", "namespace hosts"):
        where = work / placement.replace(" ", "-")
        where.mkdir()
        if placement == "loopback":
            results["overhead"][placement] = overhead(where, tiny, [args.streams], args.tokens,
                                                      args.pace, args.rounds)[args.streams]
            results["migration"][placement] = migration_pause(where, small,
                                                              args.migration_repeats)
            continue
        with Network("bench") as net:
            for name in ("router", "node", "a", "b"):
                net.host(name)
            results["overhead"][placement] = overhead(
                where, tiny, [args.streams], args.tokens, args.pace, args.rounds,
                net)[args.streams]
            results["migration"][placement] = migration_pause(
                where, small, args.migration_repeats, net)
    results["guard"] = guard_cost(work, args.streams, args.tokens, [args.pace, 0.0],
                                  args.rounds)

    lines = [f"Machine: {os.uname().nodename}, {os.cpu_count()} cores; "
             f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; {args.streams} streams of "
             f"{args.tokens} tokens at {args.pace:g} ms/token; medians over {args.rounds} "
             "alternating rounds", "",
             "| placement | path | p50 token ms | p99 token ms | p50 TTFT ms | req/s "
             "| router CPU µs/token | tokens exact |", "|---|---|---:|---:|---:|---:|---:|---|"]
    for placement, by_path in results["overhead"].items():
        for path, m in by_path.items():
            cpu = f"{m['router_cpu_us_per_token']:.0f}" if path == "router" else ""
            lines.append(f"| {placement} | {path} | {m['p50_token'] * 1e3:.2f} | "
                         f"{m['p99_token'] * 1e3:.2f} | {m['p50_ttft'] * 1e3:.2f} | "
                         f"{m['requests_per_s']:.0f} | {cpu} | {m['all_tokens_exact']} |")
    lines.append("")
    for placement, by_path in results["overhead"].items():
        d, r = by_path["direct"], by_path["router"]
        lines.append(f"{placement}: the router adds p50 "
                     f"{(r['p50_token'] - d['p50_token']) * 1e3:.2f} ms, p99 "
                     f"{(r['p99_token'] - d['p99_token']) * 1e3:.2f} ms per token; "
                     f"{r['router_cpu_us_per_token']:.0f} µs of router CPU per token")
    for placement, pauses in results["migration"].items():
        if pauses:
            lines.append(f"{placement}: migration pause median "
                         f"{statistics.median(p['pause_s'] for p in pauses) * 1e3:.1f} ms "
                         f"({len(pauses)} moves; median gap between tokens "
                         f"{statistics.median(p['median_gap_s'] for p in pauses) * 1e3:.1f} ms)")
    lines += ["", "| guard | ms/token | p50 token ms | p99 token ms | upstream CPU µs/token |",
              "|---|---:|---:|---:|---:|"]
    for pace, by_name in results["guard"].items():
        for name, m in by_name.items():
            lines.append(f"| {name} | {pace:g} | {m['p50_token'] * 1e3:.2f} | "
                         f"{m['p99_token'] * 1e3:.2f} | {m['router_cpu_us_per_token']:.1f} |")
    report = "\n".join(lines)
    print(report)
    if args.out:
        args.out.write_text(json.dumps({**results, "report": report}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
