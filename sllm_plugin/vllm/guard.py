"""The lock on a replica's door: an ASGI middleware the node daemon puts in every vLLM replica.

A replica listens where its node daemon listens, so a router on another host can reach it;
nobody else may. The node starts each replica with `--middleware` naming `ReplicaGuard` and
two keys in its environment (never on the command line, which every user can read):

- `SLLM_REPLICA_KEY`: the serving key, handed to the router over the node's token-protected
  API. Needed (`Authorization: Bearer KEY`) for the serving endpoints in `SERVING`.
- `SLLM_REPLICA_CONTROL_KEY`: the control key, which never leaves the node. Needed for every
  other endpoint (sleep and wake-up, cache resets, `collective_rpc`, LoRA loading, scaling,
  and whatever a later vLLM adds: the list of what is open is closed, not the list of what is
  shut), and only from an address of the replica's own host (its node daemon).

`/health` stays open: it tells nothing but "up", and it is what probes ask.

The guard also knows which model the engine holds now (`SLLM_REPLICA_MODEL` at start, then
`POST /sllm/hold?model=NAME` from the node: a control call, answered by the guard itself). A
node gives a kept engine another model's weights (a swap, `sllm_plugin.vllm.swap`) without a
new process, so a router with a stale view could send a request for the old model to an
engine that now holds another: it would be answered, by the wrong weights. So a serving call
that names its model in `X-Sllm-Model` is refused with 409 (`model_moved`) when the engine
holds another one, and an engine that holds none (a standby, or mid-swap: hold set to "")
refuses every generating call. vLLM's own
`--api-key` is not used: it guards only `/v1`-prefixed paths, which leaves `/invocations`
(generation) and every control endpoint open, and it puts the key on argv.

Keys are compared in constant time (hmac.compare_digest of SHA-256 digests). The check is a
header lookup per request, never per token: a streamed completion pays it once.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import ipaddress
import json
import os
import socket
import urllib.parse

KEY_ENV = "SLLM_REPLICA_KEY"
CONTROL_KEY_ENV = "SLLM_REPLICA_CONTROL_KEY"
MODEL_ENV = "SLLM_REPLICA_MODEL"
MODEL_HEADER = "X-Sllm-Model"
HOLD_PATH = "/sllm/hold"
MAX_MODEL_NAME = 512
MIDDLEWARE = f"{__name__}.ReplicaGuard"
OPEN = frozenset({"/health"})
SERVING = frozenset({"/v1/completions", "/v1/chat/completions", "/v1/models", "/metrics",
                     "/tokenize", "/detokenize", "/version"})
#: Serving endpoints that run the model (or its tokenizer): refused while the engine holds none.
GENERATING = SERVING - {"/v1/models", "/metrics", "/version"}


class GuardConfigError(RuntimeError):
    pass


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode()).digest()


def _bearer(scope: dict) -> str | None:
    for name, value in scope.get("headers") or ():
        if name == b"authorization":
            scheme, _, credential = value.decode("latin-1").partition(" ")
            return credential.strip() if scheme.lower() == "bearer" else None
    return None


@functools.lru_cache(maxsize=256)
def is_own_address(host: str) -> bool:
    """Whether `host` (a peer's IP) is an address of this host: loopback, or one a socket can
    bind to here (only addresses assigned to one of this network namespace's interfaces)."""
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if address.is_loopback:
        return True
    if address.is_unspecified or address.is_multicast:
        return False
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.bind((str(address), 0))
        return True
    except OSError:
        return False


class ReplicaGuard:
    """Pure ASGI (a streamed response passes through untouched, chunk by chunk)."""

    def __init__(self, app) -> None:
        self.app = app
        key, control = os.environ.get(KEY_ENV), os.environ.get(CONTROL_KEY_ENV)
        if not key or not control:  # fail closed: a replica without keys does not start
            raise GuardConfigError(f"{KEY_ENV} and {CONTROL_KEY_ENV} must be set for "
                                   f"{MIDDLEWARE}")
        self._key, self._control = _digest(key), _digest(control)
        # None: not told (an older node); "": holds no model (a standby); else the model name.
        self.holds: str | None = os.environ.get(MODEL_ENV)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        if path in OPEN and scope["type"] == "http" and scope.get("method") in ("GET", "HEAD"):
            return await self.app(scope, receive, send)
        given = _bearer(scope)
        digest = _digest(given) if given else b""
        if path in SERVING and given and (hmac.compare_digest(digest, self._key)
                                          or hmac.compare_digest(digest, self._control)):
            moved = self._moved(scope, path)
            if moved:
                return await _refuse(scope, send, 409, moved, "model_moved")
            return await self.app(scope, receive, send)
        if path not in SERVING:
            peer = (scope.get("client") or ("", 0))[0]
            if given and hmac.compare_digest(digest, self._control):
                if is_own_address(peer):
                    if path == HOLD_PATH:
                        return await self._hold(scope, send)
                    return await self.app(scope, receive, send)
                return await _refuse(scope, send, 403, "control endpoints of a replica answer "
                                     "its own node daemon only")
        await _refuse(scope, send, 401, "this replica needs 'Authorization: Bearer <key>' "
                      "(the key its node daemon gave the router)")


    def _moved(self, scope: dict, path: str) -> str | None:
        """Why this call must not reach the engine: it names a model the engine no longer
        holds, or the engine holds none. None: let it through."""
        if self.holds is None:
            return None
        if self.holds == "" and path in GENERATING:
            return "this engine is a standby and holds no model now"
        named = _header(scope, MODEL_HEADER.lower().encode())
        if named is not None and named != self.holds:
            return (f"this engine holds {self.holds or 'no model'!r} now, not {named[:100]!r}; "
                    "ask its node for the model's replicas again")
        return None

    async def _hold(self, scope: dict, send) -> None:
        """`POST /sllm/hold?model=NAME` (control key, own host): the model the engine holds
        from now on ("" for none)."""
        if scope.get("method") != "POST":
            return await _refuse(scope, send, 405, "use POST", "method_not_allowed")
        query = urllib.parse.parse_qs(scope.get("query_string", b"").decode("latin-1"),
                                      keep_blank_values=True)
        models = query.get("model", [])
        if len(models) != 1 or len(models[0]) > MAX_MODEL_NAME:
            return await _refuse(scope, send, 400, "give exactly one 'model' (may be empty)",
                                 "invalid_request")
        self.holds = models[0]
        await _answer(send, 200, {"holds": self.holds})


def _header(scope: dict, name: bytes) -> str | None:
    for key, value in scope.get("headers") or ():
        if key == name:
            return value.decode("latin-1")
    return None


async def _refuse(scope, send, status: int, message: str, kind: str = "unauthorized") -> None:
    if scope["type"] == "websocket":
        await send({"type": "websocket.close", "code": 1008})
        return
    await _answer(send, status, {"error": {"message": message, "type": kind, "code": status}})


async def _answer(send, status: int, payload: dict) -> None:
    body = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
