"""Checks every request to the node's API passes before FastAPI sees it (pure ASGI middleware).

- The Host header must name this node (DNS rebinding): a web page a browser loads from
  `evil.example`, whose name the attacker then points at 127.0.0.1, could otherwise call the
  daemon from the browser as a same-origin page. IP literals, localhost, the bind address,
  this machine's names and the configured `allowed_hosts` are accepted. (Starlette's
  TrustedHostMiddleware does the same check but answers in plain text, and knows no IPs.)
- The body is read, up to `max_body_bytes`, before anything parses it or checks the token:
  a larger one (by Content-Length, or as it streams) is answered 413 at once.

Both answer in the API's JSON error shape.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable
from typing import Any

from starlette.datastructures import Headers

ErrorResponse = Callable[[int, str, str], Any]


def served_names(bind_host: str, extra: list[str]) -> list[str]:
    """The host names a client may use for this node: localhost, the bind address if it is a
    name, this machine's names, then `extra` (the configuration's `allowed_hosts`)."""
    names = ["localhost", socket.gethostname(), socket.getfqdn()]
    if bind_host and not _is_ip(bind_host):
        names.append(bind_host)
    names += extra
    return list(dict.fromkeys(n.lower().rstrip(".") for n in names if n))


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def host_name(header: str) -> str | None:
    """The name in a Host header ("[::1]:8073" -> "::1", "Node:80" -> "node"); None if the
    header is malformed."""
    header = header.strip().lower()
    if header.startswith("["):
        name, sep, rest = header[1:].partition("]")
        if not sep or (rest and not (rest.startswith(":") and rest[1:].isdigit())):
            return None
        return name if _is_ip(name) else None
    name, sep, port = header.partition(":")
    if sep and not port.isdigit():
        return None
    return name.rstrip(".") or None


class HostCheck:
    """Answers 400 to a request whose Host header names no address of this node."""

    def __init__(self, app: Any, allowed: list[str], error: ErrorResponse) -> None:
        self.app, self.error = app, error
        self.any = "*" in allowed
        self.exact = {a for a in allowed if not a.startswith("*")}
        self.suffixes = tuple(a[1:] for a in allowed if a.startswith("*."))
        self.allowed = allowed

    def accepts(self, header: str | None) -> bool:
        if self.any:
            return True
        name = host_name(header or "")
        if name is None:
            return False
        return _is_ip(name) or name in self.exact or name.endswith(self.suffixes)

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        header = Headers(scope=scope).get("host")
        if self.accepts(header):
            return await self.app(scope, receive, send)
        shown = repr(header[:100]) if header is not None else "(none)"
        response = self.error(
            400, f"Host header {shown} names no address of this node (it answers to IP "
            f"addresses and {', '.join(self.allowed)}; add names to the configuration's "
            "allowed_hosts)", "invalid_host")
        await response(scope, receive, send)


class BodyLimit:
    """Reads the whole request body (at most `max_bytes`) before the app runs; 413 beyond."""

    def __init__(self, app: Any, max_bytes: int, error: ErrorResponse) -> None:
        self.app, self.max_bytes, self.error = app, max_bytes, error

    def _too_large(self) -> Any:
        return self.error(413, f"request body larger than {self.max_bytes} bytes",
                          "body_too_large")

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = Headers(scope=scope).get("content-length")
        if length is not None and length.strip().isdigit() and int(length) > self.max_bytes:
            return await self._too_large()(scope, receive, send)
        body = bytearray()
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client went away: nobody to answer
            body += message.get("body", b"")
            if len(body) > self.max_bytes:
                return await self._too_large()(scope, receive, send)
            more = message.get("more_body", False)
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()  # after the body: disconnects

        await self.app(scope, replay, send)
