"""What the replica guard (sllm_plugin.vllm.guard) costs a request, in-process.

    python benchmarks/bench_guard.py [--calls 200000] [--repeats 5]

Calls `ReplicaGuard` in front of an ASGI app that does nothing, with a serving request's
scope (its key in the Authorization header), and the bare app, alternately; reports the
median difference per call. The guard runs once per request (a streamed response passes
through untouched), so a stream's cost per token is this over its token count.
`bench_multihost.py` measures the same end to end, against a real HTTP server.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import statistics
import time

from sllm_plugin.vllm import guard


async def _bare(scope, receive, send) -> None:
    return None


async def _per_call(app, scope: dict, calls: int) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        await app(scope, None, None)
    return (time.perf_counter() - t0) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    key = secrets.token_urlsafe(32)
    os.environ[guard.KEY_ENV], os.environ[guard.CONTROL_KEY_ENV] = key, secrets.token_urlsafe(32)
    guarded = guard.ReplicaGuard(_bare)
    scope = {"type": "http", "path": "/v1/completions", "method": "POST",
             "client": ("198.18.0.1", 40000),
             "headers": [(b"host", b"198.18.0.2:20000"), (b"content-type", b"application/json"),
                         (b"authorization", f"Bearer {key}".encode())]}

    async def run() -> list[float]:
        extra = []
        for _ in range(args.repeats):
            with_guard = await _per_call(guarded, scope, args.calls)
            without = await _per_call(_bare, scope, args.calls)
            extra.append((with_guard - without) * 1e6)
        return extra

    extra = asyncio.run(run())
    print(f"replica guard: {statistics.median(extra):.2f} µs per request (median of "
          f"{args.repeats} x {args.calls} calls; each: {', '.join(f'{x:.2f}' for x in extra)}); "
          f"a 32-token stream: {statistics.median(extra) / 32:.3f} µs per token")


if __name__ == "__main__":
    main()
