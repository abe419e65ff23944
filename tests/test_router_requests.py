"""Hostile requests against a real `sllm router` process: wrong types, deep JSON, no model,
bad admin model names, slow bodies and too many connections; every 4xx is counted.

The router runs alone: its one node is a loopback port nobody listens on, so nothing here
needs a replica (a request that passes validation meets a full queue: 429).
"""

from __future__ import annotations

import socket
import time

import httpx
import pytest
from node_daemon import RouterProcess
from vllm_server import free_port

MODEL = "org/m"
MAX_CONNECTIONS = 6
BODY_TIMEOUT_S = 1.0


@pytest.fixture(scope="module")
def router(tmp_path_factory):
    process = RouterProcess(tmp_path_factory.mktemp("router-requests"), {
        "nodes": [{"name": "gone", "url": f"http://127.0.0.1:{free_port()}"}],
        "models": {MODEL: {"max_queue": 0}},
        "limits": {"max_connections": MAX_CONNECTIONS, "body_timeout_s": BODY_TIMEOUT_S},
    })
    process.start()
    try:
        yield process
    finally:
        process.stop()


def requests_counted(router: RouterProcess, status: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    return sum(sample.value
               for family in text_string_to_metric_families(router.client.get("/metrics").text)
               for sample in family.samples
               if sample.name == "sllm_router_requests_total"
               and sample.labels["status"] == status)


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


BAD = [
    # (path, raw JSON body, the field named, words of the message)
    ("/v1/completions", '{"prompt": "x"}', "model", "'model' is required"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "x"}]}', "model",
     "'model' is required"),
    ("/v1/completions", '{"model": 7, "prompt": "x"}', "model", "valid string"),
    ("/v1/completions", '{"model": "org/m", "prompt": {"a": 1}}', "prompt", "list of token ids"),
    ("/v1/completions", '{"model": "org/m", "prompt": [["a"]]}', "prompt", "list of token ids"),
    ("/v1/completions", '{"model": "org/m", "prompt": [1, "x"]}', "prompt", "list of token ids"),
    ("/v1/completions", '{"model": "org/m", "prompt": "x", "stop": 5}', "stop", "stop"),
    ("/v1/completions", '{"model": "org/m", "prompt": "x", "stream_options": "yes"}',
     "stream_options", "stream_options"),
    ("/v1/completions", '{"model": "org/m", "prompt": "x", "min_tokens": "2"}', "min_tokens",
     "valid integer"),
    ("/v1/chat/completions", '{"model": "org/m", "messages": "hi"}', "messages", "valid list"),
    ("/v1/chat/completions", '{"model": "org/m", "messages": [1, 2]}', "messages",
     "messages[0]"),
    ("/v1/chat/completions", '{"model": "org/m", "messages": [{"content": "x"}]}', "messages",
     "messages[0].role"),
    ("/v1/chat/completions", '{"model": "org/m", "messages": [{"role": "user", "content": 5}]}',
     "messages", "messages[0].content"),
    ("/v1/completions", f'{{"model": "org/m", "prompt": {nested(100)}}}', None,
     "nested deeper than 64"),
    ("/v1/completions", f'{{"model": "org/m", "prompt": {nested(100_000)}}}', None,
     "nested deeper than 64"),
    ("/v1/chat/completions", nested(5000), None, "nested deeper than 64"),
]


@pytest.mark.parametrize(("path", "raw", "param", "words"), BAD,
                         ids=[f"{i}-{b[3][:20]}" for i, b in enumerate(BAD)])
def test_malformed_requests_get_a_400_in_openai_shape_and_are_counted(router, path, raw, param,
                                                                      words):
    before = requests_counted(router, "400")
    r = router.client.post(path, content=raw, headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert words in err["message"] and err["type"] == "invalid_request_error", err
    assert (err["param"], err["code"]) == (param, 400), err
    assert requests_counted(router, "400") == before + 1
    assert router.client.get("/health").status_code == 200


def test_a_valid_request_passes_and_other_4xx_answers_are_counted_too(router):
    before = {s: requests_counted(router, s) for s in ("404", "413", "429")}
    r = router.client.post("/v1/completions", json={"model": MODEL, "prompt": [[1, 2], [3]],
                                                    "stop": ["a", "b"], "max_tokens": 3})
    assert r.status_code == 429, r.text  # past validation: the queue of 0 is full
    r = router.client.post("/v1/completions", json={"model": "org/nope", "prompt": "x"})
    assert (r.status_code, r.json()["error"]["param"]) == (404, "model")
    r = router.client.post("/v1/completions", content=b"x" * (2 * 1024 * 1024))
    assert r.status_code == 413
    assert {s: requests_counted(router, s) - before[s] for s in before} == {
        "404": 1, "413": 1, "429": 1}


@pytest.mark.parametrize("name", ["../evil", "org/m/x", "org--m", ".hidden", "/abs", ""])
def test_admin_model_names_follow_the_node_daemons_rule(router, name):
    r = router.call("POST", "/admin/models", {"name": name, "spec": {}})
    assert r.status_code == 400, r.text
    assert "name" in r.json()["error"]["message"]
    assert [m["id"] for m in router.client.get("/v1/models").json()["data"]] == [MODEL]


def test_a_body_that_does_not_arrive_in_time_gets_a_408(router):
    port = int(router.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                  b"\r\nContent-Length: 100\r\n\r\n{\"model\": ")
        started = time.monotonic()
        answer = b""
        while b"within" not in answer:  # blocks until the router answers: the rest never comes
            part = s.recv(65536)
            assert part, answer
            answer += part
        waited = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert b"did not arrive within 1 s" in answer
    assert waited < 20


def test_connections_past_the_limit_get_a_503_until_some_close(router):
    port = int(router.url.rsplit(":", 1)[1])
    idle = [socket.create_connection(("127.0.0.1", port), timeout=30)
            for _ in range(MAX_CONNECTIONS)]
    try:
        with httpx.Client(base_url=router.url, timeout=30) as client:
            assert client.get("/health").status_code == 503
    finally:
        for s in idle:
            s.close()
    with httpx.Client(base_url=router.url, timeout=30) as client:
        deadline = time.monotonic() + 30
        while client.get("/health").status_code != 200:  # the closes reach the server
            assert time.monotonic() < deadline, "the router kept refusing connections"
            time.sleep(0.05)  # polling interval for a condition checked each round
