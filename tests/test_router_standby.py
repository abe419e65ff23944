"""The router against standby engines and swaps (issue 12): a real `sllm router` process and
`ContractNode` (tests/contract_node.py), a real HTTP server on loopback standing in for the
node daemon and its replicas by the node API contract, whose standby support is being built on
main at the same time. Nothing of the router is mocked: it polls, places, starts, routes and
relays over HTTP as it does with real nodes and vLLM replicas.

What must hold: the engine's served name goes upstream (in the body's `model`) with the
client's model in `X-Sllm-Model`, and everything the client gets names its own model, on every
path (streams, non-streaming, chat, requests proxied untracked); a replica whose engine holds
another model now (409 `model_moved`) is dropped and the request served elsewhere; standbys are
never replicas; keep-alive expiry hands the engine back as a standby, which a later start
claims; placements say how (`via`), why, and what else was weighed.
"""

from __future__ import annotations

import json
import threading
import time

import pytest
from contract_node import PROMPT_IDS, ContractNode
from node_daemon import TOKEN, RouterProcess

SHAPE = "5a" * 32  # org/a and org/b: two fine-tunes of one shape
OTHER_SHAPE = "7f" * 32
SHAPES = {"org/a": SHAPE, "org/b": SHAPE, "org/x": OTHER_SHAPE}


def wait_for(condition, timeout: float, what: str):
    """Poll `condition()` until it returns something true; AssertionError after `timeout`."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.05)  # polling interval for the condition above
    return value


def router_for(tmp_path, node: ContractNode, models: dict, poll_s: float = 0.5
               ) -> RouterProcess:
    return RouterProcess(tmp_path, {
        "nodes": [{"name": "n1", "url": node.url, "token": TOKEN}],
        "models": models, "poll_interval_s": poll_s})


def polled_twice_more(node: ContractNode) -> None:
    """Wait until the router has read the node's status twice more (a whole poll after now)."""
    seen = node.status_polls
    wait_for(lambda: node.status_polls >= seen + 2, 30, "two more polls of the node")


def events(raw: bytes) -> list[dict]:
    """The JSON events of an SSE body; it must end with [DONE]."""
    lines = [line for line in raw.decode().split("\n\n") if line]
    assert lines[-1] == "data: [DONE]", raw
    return [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]


def starts(router: RouterProcess) -> dict[tuple[str, str], float]:
    from prometheus_client.parser import text_string_to_metric_families

    return {(s.labels["model"], s.labels["via"]): s.value
            for family in text_string_to_metric_families(router.client.get("/metrics").text)
            for s in family.samples if s.name == "sllm_router_starts_total"}


def test_a_swapped_engine_is_named_by_its_served_name_upstream_and_the_clients_model_back(
        tmp_path):
    with ContractNode(TOKEN, SHAPES) as node:
        standby = node.add_standby("org/a")  # cold-started for org/a: served as "org/a"
        with router_for(tmp_path, node, {"org/a": {}, "org/b": {}}) as router:
            polled_twice_more(node)
            assert router.ok("GET", "/admin/replicas") == []  # a standby is no replica

            # A stream, followed token by token (the router asks for token ids upstream).
            r = router.client.post("/v1/completions", json={
                "model": "org/b", "prompt": "hi", "stream": True, "temperature": 0,
                "max_tokens": 3, "return_token_ids": True})
            assert r.status_code == 200, r.text
            assert r.headers["x-sllm-replica"] == f"n1/{standby.id}"
            chunks = events(r.content)
            assert [c["model"] for c in chunks] == ["org/b"] * 3
            assert [c["choices"][0]["text"] for c in chunks] == ["a", "b", "c"]
            assert [c["choices"][0]["token_ids"] for c in chunks] == [[10], [11], [12]]
            assert chunks[0]["choices"][0]["prompt_token_ids"] == PROMPT_IDS
            assert b"org/a" not in r.content

            # The placement: a swap into the standby of org/b's shape, against a cold start.
            (decision,) = router.ok("GET", "/admin/placements")
            assert (decision["node"], decision["via"], decision["started_via"]) == \
                ("n1", "swap", "swap")
            assert node.starts[-1]["model"] == "org/b" and node.starts[-1]["standby"] is True
            assert sorted(o["via"] for o in decision["options"]) == ["cold", "swap"]
            swap, cold = decision["options"]  # cheapest first
            assert swap["via"] == "swap" and swap["seconds"] == decision["cost_s"]
            assert "default, not yet observed" in decision["reason"]
            assert "process_start 16.00 s (default, not yet observed)" in cold["detail"]
            assert starts(router) == {("org/b", "swap"): 1.0}

            # Not streamed: the response built by the router.
            r = router.client.post("/v1/completions", json={
                "model": "org/b", "prompt": "hi", "temperature": 0, "max_tokens": 3})
            assert r.status_code == 200 and r.json()["model"] == "org/b"
            assert r.json()["choices"][0]["text"] == "abc"
            # Chat, streamed and not.
            chat = {"model": "org/b", "messages": [{"role": "user", "content": "hi"}],
                    "temperature": 0, "max_tokens": 3}
            r = router.client.post("/v1/chat/completions", json={**chat, "stream": True})
            chunks = events(r.content)
            assert [c["model"] for c in chunks] == ["org/b"] * 3
            assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == \
                "abc"
            r = router.client.post("/v1/chat/completions", json=chat)
            assert r.json()["model"] == "org/b"
            assert r.json()["choices"][0]["message"]["content"] == "abc"

            # Proxied untracked (logprobs): the replica's own answer, renamed, field exact.
            untracked = {"model": "org/b", "prompt": "hi", "max_tokens": 3, "logprobs": 2}
            r = router.client.post("/v1/completions", json=untracked)
            assert r.status_code == 200, r.text
            answer = r.json()
            assert answer == {
                "id": "cmpl-upstream", "object": "text_completion",
                "created": answer["created"], "model": "org/b",
                "choices": [{"index": 0, "text": "abc", "finish_reason": "length",
                             "logprobs": None}],
                "usage": {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}}
            r = router.client.post("/v1/completions", json={**untracked, "stream": True})
            chunks = events(r.content)
            assert [c["model"] for c in chunks] == ["org/b"] * 3
            assert chunks[0] == {"id": "cmpl-upstream", "created": 1, "model": "org/b",
                                 "object": "text_completion",
                                 "choices": [{"index": 0, "logprobs": None,
                                              "finish_reason": None, "text": "a"}]}
            assert b"org/a" not in r.content

            # Upstream, every call named the engine's served name, and the client's model in
            # the header the replica's guard checks.
            assert [(c.engine, c.body["model"], c.header_model, c.status)
                    for c in node.calls] == [(standby.id, "org/a", "org/b", 200)] * 6
            (replica,) = router.ok("GET", "/admin/replicas")
            assert (replica["model"], replica["served_name"], replica["started_via"]) == \
                ("org/b", "org/a", "swap")


def test_a_replica_whose_engine_was_given_another_model_is_dropped_and_the_request_served(
        tmp_path):
    # A node from before issue 12 (no served names, shapes or standbys in its records): the
    # router names the model itself upstream. Polls are rare here, so the router's view of
    # the node goes stale when another router has an engine given another model.
    with ContractNode(TOKEN, SHAPES, devices=3, legacy=True) as node, \
            router_for(tmp_path, node, {"org/b": {}}, poll_s=3600) as router:
        r = router.client.post("/v1/completions", json={
            "model": "org/b", "prompt": "hi", "temperature": 0, "max_tokens": 3})
        assert r.status_code == 200 and r.json()["model"] == "org/b", r.text
        node.swap_behind_the_back(1, "org/x")

        # A tracked stream: the guard's 409 is no answer; the stream starts on a new replica.
        r = router.client.post("/v1/completions", json={
            "model": "org/b", "prompt": "hi", "temperature": 0, "max_tokens": 3,
            "stream": True})
        assert r.status_code == 200, r.text
        chunks = events(r.content)
        assert [c["model"] for c in chunks] == ["org/b"] * 3
        assert "".join(c["choices"][0]["text"] for c in chunks) == "abc"
        node.swap_behind_the_back(2, "org/x")

        # A request proxied untracked: the same.
        r = router.client.post("/v1/completions", json={
            "model": "org/b", "prompt": "hi", "max_tokens": 3, "logprobs": 2})
        assert r.status_code == 200, r.text
        assert r.json()["model"] == "org/b" and r.headers["x-sllm-replica"] == "n1/3"

        assert [(c.engine, c.body["model"], c.header_model, c.status) for c in node.calls] == [
            (1, "org/b", "org/b", 200), (1, "org/b", "org/b", 409),
            (2, "org/b", "org/b", 200), (2, "org/b", "org/b", 409),
            (3, "org/b", "org/b", 200)]
        assert [r["id"] for r in router.ok("GET", "/admin/replicas")] == ["n1/3"]
        placements = router.ok("GET", "/admin/placements")
        assert [p["via"] for p in placements] == ["cold"] * 3
        # A node from before standby engines is not told about them (it refuses the field).
        assert ["standby" in s for s in node.starts] == [False] * 3
        assert starts(router) == {("org/b", "cold"): 3.0}  # an old node: started cold


def test_keep_alive_expiry_hands_the_engine_back_as_a_standby_and_the_next_start_claims_it(
        tmp_path):
    with ContractNode(TOKEN, SHAPES, devices=1) as node, \
            router_for(tmp_path, node, {"org/b": {"keep_alive_s": 0.5}}, poll_s=0.2) as router:
        r = router.client.post("/v1/completions", json={
            "model": "org/b", "prompt": "hi", "temperature": 0, "max_tokens": 3})
        assert r.status_code == 200 and r.json()["model"] == "org/b", r.text
        # It waited for the start (a status poll and the node's answer at least).
        assert float(r.headers["x-sllm-start-wait"]) > 0, r.headers
        r = router.client.post("/v1/completions", json={
            "model": "org/b", "prompt": "hi", "temperature": 0, "max_tokens": 3})
        assert r.headers["x-sllm-start-wait"] == "0.000", r.headers  # the replica was ready
        assert node.deleted.wait(60), "the idle replica was not stopped"
        assert node.deletes[0] == (1, {"standby": "true"})
        assert node.engines[1].state == "standby"
        polled_twice_more(node)
        assert router.ok("GET", "/admin/replicas") == []  # the standby is not adopted back

        r = router.client.post("/v1/completions", json={
            "model": "org/b", "prompt": "hi", "temperature": 0, "max_tokens": 3})
        assert r.status_code == 200 and r.json()["model"] == "org/b", r.text
        first, *_, last = router.ok("GET", "/admin/placements")
        assert (first["via"], first["started_via"]) == ("cold", "cold")
        assert (last["via"], last["started_via"]) == ("standby", "standby")
        assert "n1/1 holds org/b" in last["reason"]
        assert node.starts[-1]["standby"] is True
        # Its one device is held by a standby of org/b's own shape: no cold start there.
        assert [o["via"] for o in last["options"]] == ["standby"]
        # The cold start's reported phases replaced the defaults.
        assert last["overheads"]["process_start"] == {"seconds": 12.0, "samples": 1}
        assert last["overheads"]["engine_init"] == {"seconds": 3.0, "samples": 1}
        counted = starts(router)
        assert counted[("org/b", "cold")] == 1.0 and counted[("org/b", "standby")] >= 1.0


def test_a_status_asked_before_a_claim_does_not_drop_the_claimed_replica(tmp_path):
    """A background poll asked while the node still listed the standby, answered after the
    router claimed it: that answer says nothing of the new replica (it once dropped it for a
    poll interval, seen in bench_fast_start)."""
    with ContractNode(TOKEN, SHAPES, devices=1) as node, \
            router_for(tmp_path, node, {"org/b": {"keep_alive_s": 3600}}, poll_s=0.1) as router:
        node.add_standby("org/b")
        polled_twice_more(node)
        node.park_status = True
        wait_for(lambda: len(node.parked) == 1, 30, "a background poll waiting")  # saw standby
        answers: list = []
        client = threading.Thread(target=lambda: answers.append(router.client.post(
            "/v1/completions", json={"model": "org/b", "prompt": "hi", "temperature": 0,
                                     "max_tokens": 3})))
        client.start()
        wait_for(lambda: len(node.parked) == 2, 30, "the start's own poll")
        node.release_status(1)  # the start goes on: it claims the standby
        client.join(60)
        assert answers and answers[0].status_code == 200, answers
        assert node.starts[-1]["standby"] is True and node.engines[1].state == "ready"
        node.release_status(0)  # the stale answer: engine 1 still a standby
        # The poll loop asks again only once it has dealt with that answer.
        wait_for(lambda: len(node.parked) == 3, 30, "the next background poll")
        assert [(r["id"], r["state"]) for r in router.ok("GET", "/admin/replicas")] == [
            ("n1/1", "ready")]
        node.park_status = False
        node.release_status(2)
        assert "is gone" not in router.log_tail(200)


@pytest.mark.parametrize("shape", [OTHER_SHAPE, None])
def test_a_standby_of_another_or_unknown_shape_gives_way_to_a_cold_start_never_a_swap(
        tmp_path, shape):
    with ContractNode(TOKEN, {**SHAPES, "org/b": shape}, devices=1) as node:
        node.add_standby("org/a", SHAPE)
        with router_for(tmp_path, node, {"org/a": {}, "org/b": {}}) as router:
            r = router.client.post("/v1/completions", json={
                "model": "org/b", "prompt": "hi", "temperature": 0, "max_tokens": 3})
            assert r.status_code == 200 and r.json()["model"] == "org/b", r.text
            (decision,) = router.ok("GET", "/admin/placements")
            assert decision["via"] == "cold" and "n1/1 gives way" in decision["reason"]
            assert [o["via"] for o in decision["options"]] == ["cold"]
            assert node.starts[-1]["standby"] is False  # a cold start asks for one
            assert [(c.engine, c.body["model"]) for c in node.calls] == [(2, "org/b")]
