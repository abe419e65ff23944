"""A real HTTP hop in front of a real replica that stops or cuts its event stream on cue.

Not a stand-in: every event it passes on is the replica's own. It only chooses when they pass
(hold them after a given token, then let one through, then the rest) or where the replica's
stream ends (it asks the replica for exactly N tokens and breaks the connection after the
N-th, instead of passing on the finish): a move at an exact token, which a router driven from
outside cannot time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json

import aiohttp
from aiohttp import web


class FaultProxy:
    def __init__(self, upstream: str, *, cut_after: int | None = None,
                 hold_after: int | None = None) -> None:
        self.upstream, self.cut_after, self.hold_after = upstream, cut_after, hold_after
        self.bodies: list[dict] = []
        self.held = asyncio.Event()  # set while an event waits for `release`
        self._budget: int | None = None  # events that may pass (None: all)
        self._open = asyncio.Event()
        self._holding = False
        self.url = ""
        self._runner: web.AppRunner | None = None

    def release(self, events: int | None = None) -> None:
        """Let `events` more events through (None: all of them from now on)."""
        self._budget = events
        self._open.set()

    async def _gate(self) -> None:
        while self._budget == 0:
            self._open.clear()
            self.held.set()
            await self._open.wait()
        self.held.clear()
        if self._budget is not None:
            self._budget -= 1

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.bodies.append(body)
        if self.cut_after is not None:
            body = {**body, "max_tokens": self.cut_after}
        auth = {k: v for k, v in request.headers.items() if k.lower() == "authorization"}
        async with aiohttp.ClientSession() as session, session.post(
                self.upstream + request.path, json=body, headers=auth) as up:
            if up.status != 200:
                return web.Response(status=up.status, body=await up.read(),
                                    content_type="application/json")
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            count = 0
            with contextlib.suppress(ConnectionError, aiohttp.ClientConnectionError):
                async for raw in up.content:  # one line at a time
                    line = raw.decode().strip()
                    if not line:
                        continue
                    if line.startswith("data:") and line != "data: [DONE]":
                        chunk = json.loads(line[5:])
                        choice = (chunk.get("choices") or [{}])[0]
                        new = len(choice.get("token_ids") or [])
                        if new:
                            await self._gate()
                        count += new
                        if self.cut_after is not None and choice.get("finish_reason") == "length":
                            choice["finish_reason"] = choice["stop_reason"] = None
                            await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
                            assert request.transport is not None
                            request.transport.abort()  # the replica "dies" here
                            return response
                        await response.write(f"{line}\n\n".encode())
                        if (self.hold_after is not None and count >= self.hold_after
                                and not self._holding):
                            self._holding = True
                            self._budget = 0  # hold what follows until `release`
                        continue
                    await response.write(f"{line}\n\n".encode())
                await response.write_eof()
            return response

    async def __aenter__(self) -> FaultProxy:
        app = web.Application()
        app.router.add_post("/v1/completions", self.handle)
        app.router.add_post("/v1/chat/completions", self.handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc) -> None:
        self.release()
        assert self._runner is not None
        await self._runner.cleanup()
