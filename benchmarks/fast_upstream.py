"""A real but fast OpenAI-compatible upstream for the router benchmark (not vLLM).

    python benchmarks/fast_upstream.py --port 8000 [--served-model-name NAME] [vLLM's flags]

It accepts the flags the node daemon gives a vLLM replica (and ignores those it does not use),
so the node daemon can launch it as its replica command. /v1/completions and
/v1/chat/completions stream `max_tokens` tokens, one SSE chunk per token, either all at once
or one every `--token-interval-ms` (the pace of a decoding replica), with token
ids 0, 1, 2, ... after the prompt's (and `return_token_ids`, as vLLM sends them), so a client
can check that no token was lost or repeated. Each token's text carries the moment it was
written (`" t5@<time.monotonic()>"`, one clock for all processes of the machine), so a client
measures how long every token took to reach it. A token prompt (list of ids) continues the
sequence from its length minus the prompt's, as a migrated request does. /health and /metrics
answer as vLLM's do, and `--middleware` is applied as vLLM applies it (so a node daemon's
replica guard runs here as in vLLM). It exists to measure the router's own overhead; it
stands in for vLLM only in that benchmark.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import time

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Route

PROMPT_IDS = [1, 2, 3, 4]


def build(model: str, interval_s: float = 0.0) -> Starlette:
    async def health(_: Request):
        return PlainTextResponse("")

    async def metrics(_: Request):
        return PlainTextResponse("vllm:num_requests_running 0\nvllm:num_requests_waiting 0\n")

    async def generate(request: Request):
        body = await request.json()
        chat = request.url.path.endswith("chat/completions")
        prompt = body.get("prompt")
        start = len(prompt) - len(PROMPT_IDS) if isinstance(prompt, list) else 0
        n = int(body.get("max_tokens") or 16)
        ids = body.get("return_token_ids")

        def chunk(i: int, last: bool) -> str:
            choice = {"index": 0, "finish_reason": "length" if last else None}
            if chat and not isinstance(prompt, list):
                choice["delta"] = {"content": f" t{i}@{time.monotonic():.6f}"}
            else:
                choice["text"] = f" t{i}@{time.monotonic():.6f}"
            if ids:
                choice["token_ids"] = [i]
                if i == start:
                    choice["prompt_token_ids"] = PROMPT_IDS
            return "data: " + json.dumps({"id": "x", "object": "chunk", "created": 0,
                                          "model": model, "choices": [choice]}) + "\n\n"

        if not body.get("stream"):
            return JSONResponse({"id": "x", "object": "text_completion", "created": 0,
                                 "model": model, "choices": [
                                     {"index": 0, "text": "".join(f" t{i}" for i in range(n)),
                                      "finish_reason": "length"}]})

        async def events():
            for i in range(start, start + n):
                if interval_s and i > start:
                    await asyncio.sleep(interval_s)  # the replica's decoding pace
                yield chunk(i, i == start + n - 1)
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return Starlette(routes=[Route("/health", health), Route("/metrics", metrics),
                             Route("/v1/completions", generate, methods=["POST"]),
                             Route("/v1/chat/completions", generate, methods=["POST"])])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--served-model-name", default="fast")
    parser.add_argument("--model", default="fast")
    parser.add_argument("--token-interval-ms", type=float, default=0.0,
                        help="time between tokens of one stream (0: as fast as possible)")
    parser.add_argument("--middleware", action="append", default=[],
                        help="an ASGI middleware class to wrap the app in, as vLLM's flag")
    args, _ = parser.parse_known_args()
    app = build(args.served_model_name, args.token_interval_ms / 1e3)
    for middleware in args.middleware:  # as vllm/entrypoints/serve/middleware/register.py
        module, name = middleware.rsplit(".", 1)
        app.add_middleware(getattr(importlib.import_module(module), name))
    print(f"fast upstream serving {args.served_model_name} on port {args.port}", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
