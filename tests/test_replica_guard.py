"""The replica guard (sllm_plugin.vllm.guard) and the node's advertised address, in-process.

The guard wraps a small Starlette app here, as vLLM's `--middleware` wraps vLLM's (the real
vLLM replica behind it is checked in test_node.py and across hosts in test_multihost.py).
"""

from __future__ import annotations

import asyncio

import httpx
import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse, StreamingResponse
from starlette.routing import Route

from sllm_plugin.store.addresses import (
    AddressError,
    advertised_host,
    check_advertise,
    interface_addresses,
    url_host,
)
from sllm_plugin.store.config import NodeConfig
from sllm_plugin.vllm import guard

KEY, CONTROL = "serving-key-of-the-test-0123456789", "control-key-of-the-test-0123456789"


def guarded(monkeypatch) -> Starlette:
    monkeypatch.setenv(guard.KEY_ENV, KEY)
    monkeypatch.setenv(guard.CONTROL_KEY_ENV, CONTROL)

    async def ok(_):
        return PlainTextResponse("ok")

    async def stream(_):
        async def tokens():
            for i in range(5):
                yield f"data: {i}\n\n"
        return StreamingResponse(tokens(), media_type="text/event-stream")

    app = Starlette(routes=[Route(p, ok, methods=["GET", "POST"]) for p in
                            ("/health", "/v1/models", "/metrics", "/reset_prefix_cache",
                             "/collective_rpc", "/invocations", "/v1/load_lora_adapter",
                             "/not-yet-invented")]
                    + [Route("/v1/completions", stream, methods=["POST"])])
    app.add_middleware(guard.ReplicaGuard)
    return app


def call(app, method: str, path: str, key: str | None = None,
         peer: str = "198.51.100.7", model: str | None = None) -> httpx.Response:
    """A request as if from `peer` (198.51.100.0/24: TEST-NET-2, never an address here)."""
    transport = httpx.ASGITransport(app=app, client=(peer, 40000))
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if model is not None:
        headers[guard.MODEL_HEADER] = model

    async def go():
        async with httpx.AsyncClient(transport=transport, base_url="http://replica") as c:
            return await c.request(method, path, headers=headers)
    return asyncio.run(go())


def test_serving_endpoints_need_the_key_and_stream_through(monkeypatch):
    app = guarded(monkeypatch)
    assert call(app, "GET", "/health").status_code == 200  # probes need no key
    for path in ("/v1/models", "/metrics"):
        assert call(app, "GET", path).status_code == 401, path
        assert call(app, "GET", path, key="wrong").status_code == 401, path
        assert call(app, "GET", path, key=KEY).status_code == 200, path
    r = call(app, "POST", "/v1/completions", key=KEY)
    assert r.status_code == 200 and r.text == "".join(f"data: {i}\n\n" for i in range(5))
    r = call(app, "POST", "/v1/completions")
    assert r.status_code == 401 and "Bearer" in r.json()["error"]["message"]
    assert KEY not in r.text and CONTROL not in r.text


@pytest.mark.parametrize("path", ["/reset_prefix_cache", "/collective_rpc", "/invocations",
                                  "/v1/load_lora_adapter", "/not-yet-invented"])
def test_everything_else_is_control_only_from_the_replicas_own_host(monkeypatch, path):
    app = guarded(monkeypatch)
    # The router's key opens no control endpoint, from anywhere.
    assert call(app, "POST", path, key=KEY, peer="127.0.0.1").status_code == 401
    assert call(app, "POST", path).status_code == 401
    # The control key from another host: refused; from this host (its node daemon): served.
    assert call(app, "POST", path, key=CONTROL).status_code == 403
    assert call(app, "POST", path, key=CONTROL, peer="127.0.0.1").status_code == 200
    assert call(app, "POST", path, key=CONTROL, peer="::1").status_code == 200
    own = [a for _, a in interface_addresses()]
    if own:  # an address of one of this host's interfaces is this host, too
        assert call(app, "POST", path, key=CONTROL, peer=own[0]).status_code == 200


def test_a_call_for_a_model_the_engine_no_longer_holds_is_refused(monkeypatch):
    """After a swap, a router with a stale view must get a refusal, never the other model's
    tokens; a standby (holding none) runs nothing."""
    monkeypatch.setenv(guard.MODEL_ENV, "alpha")
    app = guarded(monkeypatch)
    assert call(app, "POST", "/v1/completions", key=KEY, model="alpha").status_code == 200
    assert call(app, "POST", "/v1/completions", key=KEY).status_code == 200  # names none
    r = call(app, "POST", "/v1/completions", key=KEY, model="beta")
    assert r.status_code == 409 and r.json()["error"]["type"] == "model_moved"
    assert "'alpha'" in r.json()["error"]["message"]
    # Only the node (control key, own host) may say what the engine holds.
    assert call(app, "POST", "/sllm/hold?model=beta", key=KEY, peer="127.0.0.1"
                ).status_code == 401
    assert call(app, "POST", "/sllm/hold?model=beta", key=CONTROL).status_code == 403
    assert call(app, "POST", "/sllm/hold?model=", key=CONTROL, peer="127.0.0.1"
                ).json() == {"holds": ""}
    for model in ("alpha", None):  # a standby: nothing generates, whatever is named
        r = call(app, "POST", "/v1/completions", key=KEY, model=model)
        assert r.status_code == 409 and "standby" in r.json()["error"]["message"]
    assert call(app, "GET", "/v1/models", key=KEY).status_code == 200
    assert call(app, "POST", "/sllm/hold", key=CONTROL, peer="127.0.0.1").status_code == 400
    assert call(app, "POST", "/sllm/hold?model=beta", key=CONTROL, peer="127.0.0.1"
                ).status_code == 200
    assert call(app, "POST", "/v1/completions", key=KEY, model="beta").status_code == 200
    assert call(app, "POST", "/v1/completions", key=KEY, model="alpha").status_code == 409


def test_a_replica_without_keys_does_not_start(monkeypatch):
    monkeypatch.delenv(guard.KEY_ENV, raising=False)
    monkeypatch.setenv(guard.CONTROL_KEY_ENV, CONTROL)
    app = Starlette()
    app.add_middleware(guard.ReplicaGuard)
    with pytest.raises(guard.GuardConfigError, match=guard.KEY_ENV):
        call(app, "GET", "/health")


def test_the_advertised_address():
    assert advertised_host("198.18.0.7", None) == "198.18.0.7"
    assert advertised_host("127.0.0.1", None) == "127.0.0.1"
    assert advertised_host("0.0.0.0", "node-a.example.com") == "node-a.example.com"
    own = interface_addresses()
    if own:
        assert advertised_host("0.0.0.0", None) == own[0][1]
        assert not advertised_host("::", None).startswith("127.")
    with pytest.raises(AddressError, match="loopback"):
        advertised_host("0.0.0.0", "127.0.0.1")
    for bad in ("http://x", "x:80", "a b", "0.0.0.0", "-x"):
        with pytest.raises(AddressError):
            check_advertise(bad)
    assert url_host("fd00::1") == "[fd00::1]" and url_host("10.1.2.3") == "10.1.2.3"


def test_node_configuration_refuses_what_would_lock_the_router_out():
    with pytest.raises(ValueError, match="--api-key is not accepted"):
        NodeConfig(replica_args=["--api-key=x"])
    with pytest.raises(ValueError, match="--api-key is not accepted"):
        NodeConfig(models={"org/m": {"source": "/x", "replica_args": ["--api-key", "x"]}})
    with pytest.raises(ValueError, match="--api-key is not accepted"):
        NodeConfig(replica_env={"VLLM_API_KEY": "x"})
    with pytest.raises(ValueError, match="replica_port_range"):
        NodeConfig(replica_port_range=(2000, 1999))
    with pytest.raises(ValueError, match="advertise"):
        NodeConfig(advertise="http://10.0.0.1:80")
    assert NodeConfig(replica_port_range=(20000, 20999)).replica_port_range == (20000, 20999)
