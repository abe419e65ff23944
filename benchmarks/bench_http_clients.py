"""Why the router relays with aiohttp: client CPU to read streamed chunks, httpx against aiohttp.

    python benchmarks/bench_http_clients.py [--streams 512] [--concurrency 64] [--tokens 32]

Starts `fast_upstream.py` (unpaced) and reads the same streams with each client in turn, in
one process, twice each, alternating; prints wall time and this process's CPU time per run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from vllm_server import free_port, wait_healthy  # noqa: E402


async def with_httpx(url: str, body: dict, streams: int, concurrency: int) -> None:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=60) as client:
        gate = asyncio.Semaphore(concurrency)

        async def one() -> None:
            async with gate, client.stream("POST", url, json=body) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data:") and line != "data: [DONE]":
                        json.loads(line[5:])

        await asyncio.gather(*(one() for _ in range(streams)))


async def with_aiohttp(url: str, body: dict, streams: int, concurrency: int) -> None:
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        gate = asyncio.Semaphore(concurrency)

        async def one() -> None:
            async with gate, session.post(url, json=body) as r:
                async for raw in r.content:
                    line = raw.strip()
                    if line.startswith(b"data:") and line != b"data: [DONE]":
                        json.loads(line[5:])

        await asyncio.gather(*(one() for _ in range(streams)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=512)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=32)
    args = parser.parse_args()
    port = free_port()
    upstream = subprocess.Popen([sys.executable, str(HERE / "fast_upstream.py"), "--port",
                                 str(port)], stdout=subprocess.DEVNULL)
    try:
        wait_healthy(f"http://127.0.0.1:{port}", upstream, 60, "fast_upstream", lambda: "")
        url = f"http://127.0.0.1:{port}/v1/completions"
        body = {"model": "fast", "prompt": "hello", "max_tokens": args.tokens, "stream": True,
                "return_token_ids": True}
        print(f"{args.streams} streams of {args.tokens} chunks, {args.concurrency} at a time")
        for name, run in [("httpx", with_httpx), ("aiohttp", with_aiohttp)] * 2:
            before, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            asyncio.run(run(url, body, args.streams, args.concurrency))
            after = resource.getrusage(resource.RUSAGE_SELF)
            cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
            print(f"{name:8s} wall {time.perf_counter() - t0:.2f} s, client CPU {cpu:.2f} s")
    finally:
        upstream.terminate()
        upstream.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
