"""The floor for any Python proxy hop: relays OpenAI requests to one upstream, bytes untouched.

    python benchmarks/bare_relay.py --port 8001 --upstream http://127.0.0.1:8000

`bench_router.py` measures it beside the router: it reads the client's body, posts it to the
upstream and writes each piece of the upstream's answer to the client as it arrives (aiohttp
server and client, no JSON, no tracking, no routing). What it adds over a direct connection is
what one Python HTTP hop costs on the machine, so the router's overhead above it is the part
its own work (token tracking, placement, metrics) costs. Not a product: it stands in for no
part of sllm_plugin.
"""

from __future__ import annotations

import argparse
import asyncio

import aiohttp
from aiohttp import web


def build(upstream: str) -> web.Application:
    async def start(app: web.Application):
        app["session"] = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, limit_per_host=0))
        yield
        await app["session"].close()

    async def relay(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        async with request.app["session"].post(
                upstream + request.path, data=body,
                headers={"Content-Type": "application/json",
                         **({"Authorization": request.headers["Authorization"]}
                            if "Authorization" in request.headers else {})}) as r:
            response = web.StreamResponse(status=r.status, headers={
                "Content-Type": r.headers.get("Content-Type", "application/json")})
            await response.prepare(request)
            async for data in r.content.iter_any():
                await response.write(data)
            await response.write_eof()
            return response

    async def health(_: web.Request) -> web.Response:
        return web.Response(text="")

    app = web.Application()
    app.cleanup_ctx.append(start)
    app.router.add_get("/health", health)
    app.router.add_post("/v1/completions", relay)
    app.router.add_post("/v1/chat/completions", relay)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True)
    args = parser.parse_args()
    try:  # the same event loop uvicorn gives the router
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass
    web.run_app(build(args.upstream.rstrip("/")), host=args.host, port=args.port,
                print=None, access_log=None)


if __name__ == "__main__":
    main()
