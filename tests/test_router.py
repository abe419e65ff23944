"""The router (`sllm router`): a real router, two real node daemons and real vLLM CPU replicas.

One cluster for the module (each vLLM start costs about half a minute here): node "a" holds
nothing at first (it fetches the model when a replica is placed there), node "b" holds it in
its DRAM tier. The tests run in order: scale from zero (placed
on "b"), bad input, prefix affinity, live migration (completions and chat), failover after a
replica is killed mid-stream, draining a node, and keep-alive scale-down.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest
from node_daemon import TOKEN, NodeDaemon, RouterProcess

from sllm_plugin.router import upstream
from sllm_plugin.store.replicas import detect_devices

MODEL = "org/llama"
# float32: a moved stream's KV is recomputed by a prefill instead of step by step; in bf16 the
# rounding differs enough to flip a near-tie of the random model after a few hundred tokens.
REPLICA_ARGS = ["--enforce-eager", "--max-model-len", "2048", "--max-num-seqs", "8",
                "--dtype", "float32"]
PROMPT = "The quick brown fox jumps over the lazy dog. " * 3
LONG = 500  # tokens a migrated stream generates: long enough to move it half way
TOKEN_LIMIT = 1000  # the router's max_tokens limit; streams kept open use all of it


def wait_for(condition, timeout: float = 300, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)  # polling interval for a condition checked each round
    raise TimeoutError(f"{what} not reached in {timeout} s")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from sllm_plugin.testing import make_random_model

    root = tmp_path_factory.mktemp("router")
    # small-llama: the tiny preset decodes hundreds of tokens before a client reads its first.
    source = make_random_model(root / "llama", "small-llama", seed=7)
    shm = [Path(f"/dev/shm/sllm-test-{uuid.uuid4().hex[:8]}") for _ in range(2)]
    # Each node's replica on its own core where there are two, as replicas own their devices
    # in a fleet: replicas sharing cores stall each other for seconds whenever both compute,
    # and a warm-up beside a decoding replica then outlasts the stream it moves.
    cores = ([f"cpu:{i}" for i in range(2)] if (os.cpu_count() or 1) >= 2
             else [detect_devices()[0].name] * 2)
    nodes = {}
    for name, dram, core in zip("ab", shm, cores, strict=True):
        (root / name).mkdir()
        nodes[name] = NodeDaemon(root / name, {
            "dram": {"path": str(dram), "capacity": 10**9},
            "ssd": {"path": str(root / name / "ssd"), "capacity": 10**9},
            "devices": [core], "calibration_bytes": 32 * 1024 * 1024,
            "replica_args": REPLICA_ARGS,
            "replica_env": {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"},
        }, name=f"node-{name}").start()
    router = RouterProcess(root, {
        "nodes": [{"name": n, "url": d.url, "token": TOKEN} for n, d in nodes.items()],
        "models": {MODEL: {"source": str(source), "max_replicas": 2, "keep_alive_s": 3600,
                           "target_load": 1000},
                   "org/never": {"source": str(source), "max_queue": 0},
                   # Its engine cannot start: two KV blocks hold no sequence of 2048 tokens.
                   "org/broken": {"source": str(source),
                                  "replica_args": ["--num-gpu-blocks-override", "2"]}},
        # One warm-up round: the tiny model decodes faster than a warm-up re-prefills.
        "limits": {"max_body_bytes": 64 * 1024, "max_tokens": TOKEN_LIMIT,
                   "start_timeout_s": 300, "migration_rounds": 1},
    })
    router.start()
    try:
        yield {"router": router, "nodes": nodes, "source": source}
    finally:
        router.stop()
        for daemon in nodes.values():
            daemon.stop()
        for path in shm:
            shutil.rmtree(path, ignore_errors=True)


def completion(router: RouterProcess, **extra) -> httpx.Response:
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 16, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True, **extra}
    return router.client.post("/v1/completions", json=body, timeout=600)


def stream_tokens(router: RouterProcess, path: str, body: dict, on_first=None
                  ) -> tuple[list[int], str, list[dict]]:
    """Stream a request; returns (token ids, text, chunks). `on_first()` runs after the first
    chunk that carries tokens, while the stream is open."""
    ids: list[int] = []
    text: list[str] = []
    chunks: list[dict] = []
    with router.client.stream("POST", path, json=body, timeout=600) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            assert "error" not in chunk, chunk
            chunks.append(chunk)
            for choice in chunk["choices"]:
                new = choice.get("token_ids") or []
                ids += new
                text.append(choice.get("text") or (choice.get("delta") or {}).get("content")
                            or "")
                if new and on_first is not None:
                    on_first()
                    on_first = None
    return ids, "".join(text), chunks


def metric(router: RouterProcess, name: str, **labels) -> float:
    """Sum of the samples called `name` whose labels include `labels`."""
    from prometheus_client.parser import text_string_to_metric_families

    return sum(sample.value
               for family in text_string_to_metric_families(router.client.get("/metrics").text)
               for sample in family.samples
               if sample.name == name and labels.items() <= sample.labels.items())


def quiet(router: RouterProcess) -> None:
    """Wait until streams abandoned by earlier tests have ended, in the router and in the
    replicas (their own running/waiting metrics, which the router polls)."""
    wait_for(lambda: router.ok("GET", "/admin/streams") == [], what="no active streams")
    wait_for(lambda: all(r["running"] == 0 and r["waiting"] == 0
                         for r in ready_replicas(router)), timeout=120, what="idle replicas")


def ready_replicas(router: RouterProcess) -> list[dict]:
    return [r for r in router.ok("GET", "/admin/replicas")
            if r["model"] == MODEL and r["state"] == "ready"]


def test_scale_from_zero_places_the_replica_where_dram_holds_the_model(cluster):
    router, nodes = cluster["router"], cluster["nodes"]
    # a holds nothing (a fetch first); b holds it in DRAM. Not "a in SSD": on a busy machine a
    # node's DRAM calibration can come out below the other's SSD (0.82 against 1.00 GB/s in
    # one run), and the router then rightly prefers the SSD copy.
    nodes["b"].ok("POST", "/prefetch", {"model": MODEL, "tier": "dram", "wait": True})
    assert router.ok("GET", "/admin/replicas") == []
    r = completion(router)
    assert r.status_code == 200, r.text
    assert r.headers["x-sllm-replica"].startswith("b/")
    choice = r.json()["choices"][0]
    assert len(choice["token_ids"]) == 16 and choice["finish_reason"] == "length"
    (replica,) = ready_replicas(router)
    assert replica["node"] == "b" and replica["tier"] == "dram"
    (decision,) = router.ok("GET", "/admin/placements")
    assert decision["node"] == "b" and "dram" in decision["reason"]
    assert metric(router, "sllm_router_cold_starts_total", model=MODEL, node="b") == 1
    # Same request again: same tokens (greedy), served warm.
    again = completion(router).json()["choices"][0]
    assert again["token_ids"] == choice["token_ids"] and again["text"] == choice["text"]
    models = router.client.get("/v1/models").json()["data"]
    assert [m["id"] for m in models] == ["org/broken", MODEL, "org/never"]


def test_bad_input_and_limits_get_openai_errors_and_the_router_keeps_serving(cluster):
    router = cluster["router"]
    headers = {"Content-Type": "application/json"}
    cases = [
        (router.client.post("/v1/completions", content=b"x" * (65 * 1024), headers=headers),
         413, "exceeds the limit"),
        (router.client.post("/v1/completions", content=b'{"model": ', headers=headers),
         400, "malformed JSON"),
        (router.client.post("/v1/completions", json={"model": "nope", "prompt": "x"}),
         404, "does not exist"),
        (router.client.post("/v1/completions", json={"model": MODEL, "prompt": "x",
                                                     "max_tokens": TOKEN_LIMIT + 1}),
         400, f"max_tokens must be an integer from 1 to {TOKEN_LIMIT}"),
        (router.client.post("/v1/chat/completions", json={"model": MODEL}),
         400, "'messages' is required"),
        (router.client.post("/v1/completions", json={"model": "org/never", "prompt": "x"}),
         429, "queue of 0 is full"),
        (router.call("GET", "/admin/replicas", token=None), 401, "Bearer"),
        (router.call("GET", "/admin/replicas", token="wrong"), 403, "wrong admin token"),
        (router.call("POST", "/admin/migrate", {"stream": "nope"}), 404, "no active stream"),
        (router.call("POST", "/admin/nodes/zz/drain"), 404, "no node 'zz'"),
        (router.call("DELETE", "/admin/nodes/zz/drain"), 404, "no node 'zz'"),
        (router.call("GET", "/admin/nodes", token=None), 401, "Bearer"),
    ]
    for response, status, needle in cases:
        assert response.status_code == status, response.text
        err = response.json()["error"]
        assert needle in err["message"] and err["type"], err
        assert router.client.get("/health").status_code == 200
    # The replica's own validation errors come back as they are.
    r = completion(router, temperature=-1)
    assert r.status_code == 400 and "temperature" in r.text
    assert completion(router).status_code == 200


def test_clients_waiting_for_a_replica_that_fails_get_a_503_with_its_root_cause(cluster):
    """The replica's engine fails to start: every waiting client gets a 503 that says why in
    a line (the node's summary and the replica's own root cause), not a log tail or a 500."""
    from sllm_plugin.router.cluster import root_cause

    router, nodes = cluster["router"], cluster["nodes"]
    body = {"model": "org/broken", "prompt": "x", "max_tokens": 2}
    answers: list[httpx.Response] = []
    waiters = [threading.Thread(target=lambda: answers.append(
        httpx.post(f"{router.url}/v1/completions", json=body, timeout=600)))
        for _ in range(2)]
    for waiter in waiters:
        waiter.start()
    for waiter in waiters:
        waiter.join()
    failed = [r for daemon in nodes.values() for r in daemon.ok("GET", "/replicas")
              if r["model"] == "org/broken"]
    assert [r["state"] for r in failed] == ["failed"], failed
    cause = root_cause(failed[0]["error"])
    assert cause, failed[0]["error"]
    for r in answers:
        assert r.status_code == 503, r.text
        err = r.json()["error"]
        assert err["type"] == "service_unavailable"
        message = err["message"]
        assert message.startswith("cannot start a replica of 'org/broken': node ")
        assert "exited with code" in message and cause in message, message
        assert "Traceback" not in message and 'File "' not in message, message
        assert "\n" not in message
    assert metric(router, "sllm_router_requests_total", model="org/broken", status="503") == 2


def test_a_second_replica_is_adopted_and_prefix_affinity_holds_until_overload(cluster):
    router, nodes = cluster["router"], cluster["nodes"]
    # One replica per node, started behind the router's back: it adopts them. (Usually b has
    # one from the first test; a placement before this one may have freed it for a model
    # whose checkpoint b was faster to fetch, which the policy may do with an idle replica.)
    have = {r["node"] for r in ready_replicas(router)}
    for name in sorted(set(nodes) - have):
        nodes[name].ok("POST", "/replicas", {"model": MODEL, "wait": True})
    wait_for(lambda: len(ready_replicas(router)) == 2, what="two ready replicas")
    long_prompt = "".join(f"{i} alpha beta gamma delta. " for i in range(60))  # > 4 blocks
    r = completion(router, prompt=long_prompt, max_tokens=4)
    assert r.status_code == 200, r.text
    first = r.headers["x-sllm-replica"]
    for _ in range(3):
        assert completion(router, prompt=long_prompt, max_tokens=4).headers[
            "x-sllm-replica"] == first
    # Keep 5 long streams open on that replica: affinity no longer outweighs its load.
    streams = []
    with httpx.Client(base_url=router.url, timeout=600) as client:
        for _ in range(5):
            s = client.stream("POST", "/v1/completions", json={
                "model": MODEL, "prompt": long_prompt + " more", "max_tokens": 400,
                "temperature": 0, "ignore_eos": True, "stream": True})
            response = s.__enter__()
            streams.append((s, response))
        placed = [resp.headers["x-sllm-replica"] for _, resp in streams]
        # Each request in flight costs a quarter of a full prefix hit: four fit on the replica
        # that has the prefix; the fifth goes to the idle one.
        assert placed[:4] == [first] * 4 and placed[4] != first, placed
        for s, _ in streams:
            s.__exit__(None, None, None)


@pytest.mark.parametrize("kind", ["completion", "chat"])
def test_live_migration_yields_exactly_the_unmigrated_tokens(cluster, kind):
    router = cluster["router"]
    two_ready_replicas(cluster)
    quiet(router)
    # A stop string that never comes: vLLM holds back its length less one character of text
    # at every moment, which a move must not lose.
    if kind == "chat":
        path = "/v1/chat/completions"
        body = {"model": MODEL, "messages": [{"role": "user", "content": PROMPT}],
                "max_tokens": LONG, "temperature": 0, "ignore_eos": True, "stream": True,
                "return_token_ids": True, "stop": ["\u2603" * 4]}
    else:
        path = "/v1/completions"
        body = {"model": MODEL, "prompt": PROMPT, "max_tokens": LONG, "temperature": 0,
                "ignore_eos": True, "stream": True, "return_token_ids": True,
                "stop": "\u2603" * 4}
    expected, expected_text, _ = stream_tokens(router, path, body)
    assert len(expected) == LONG
    moved: dict = {}

    def migrate() -> None:
        (stream,) = router.ok("GET", "/admin/streams")
        moved["from"] = stream["replica"]
        moved["generated"] = stream["generated"]
        moved["answer"] = router.ok("POST", "/admin/migrate", {"stream": stream["id"]})

    before = metric(router, "sllm_router_migrations_total", reason="migration")
    quiet(router)
    got, text, chunks = stream_tokens(router, path, body, on_first=migrate)
    assert moved["answer"]["state"] == "switching", moved
    assert moved["answer"]["to"] != moved["from"]
    assert got == expected  # token for token
    assert text == expected_text
    assert len({c["id"] for c in chunks}) == 1  # one response, as the client sees it
    assert metric(router, "sllm_router_migrations_total", reason="migration") == before + 1
    assert metric(router, "sllm_router_migration_pause_seconds_count", reason="migration") >= 1
    move = router.ok("GET", "/admin/migrations")[-1]
    assert (move["stream"], move["reason"], move["from"], move["to"]) == (
        moved["answer"]["stream"], "migration", moved["from"], moved["answer"]["to"])
    # The move happens at a token the client had not yet been sent when it was asked for.
    assert moved["generated"] <= move["at_token"] < LONG


# Tokens of the stop-string requests: the random model's tokens beyond the tokenizer's 512
# have no text, so this many give a few dozen characters.
STOP_TOKENS = 128


def two_ready_replicas(cluster) -> list[dict]:
    """The two replicas of MODEL, one per node; started where one is missing (when the tests
    before did not run)."""
    router, nodes = cluster["router"], cluster["nodes"]
    have = {r["node"] for r in ready_replicas(router)}
    for name, daemon in nodes.items():
        if name not in have:
            daemon.ok("POST", "/replicas", {"model": MODEL, "wait": True})
    return wait_for(lambda: len(ready_replicas(router)) == 2 and ready_replicas(router),
                    what="two ready replicas")


def replica_key(cluster, replica: dict) -> str:
    """The replica's serving key, from its node (as the router gets it)."""
    node, replica_id = replica["id"].split("/")
    return cluster["nodes"][node].ok("GET", "/replica-keys")["keys"][replica_id]


async def vllm_itself(session, replica: tuple[str, str], body: dict) -> dict:
    """What the replica (url, key) itself streams for `body`: the truth a moved request must
    equal, and the text length after each event (where it ends on a whole character)."""
    ids, text, boundaries, last = [], "", {}, {}
    url, key = replica
    async with session.post(f"{url}/v1/completions", json={**body, "stream": True},
                            headers={"Authorization": f"Bearer {key}"}) as r:
        assert r.status == 200, await r.text()
        async for raw in r.content:
            line = raw.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            (last,) = json.loads(line[5:])["choices"]
            ids += last.get("token_ids") or []
            text += last["text"]
            if last["text"] and not last["text"].endswith("\ufffd"):
                boundaries[len(ids)] = len(text)
    return {"ids": ids, "text": text, "finish": last["finish_reason"],
            "stop_reason": last.get("stop_reason"), "boundaries": boundaries}


async def through_router(session, source: tuple[str, str], dest: tuple[str, str], body: dict,
                         move: str | None, at: int) -> dict:
    """`body` run by the router's StreamRunner on the source, moved to the destination right
    after token `at` (move "migration" or "failover"), or not moved (None). Returns what the
    client gets, streamed and not, and the moves."""
    from fault_proxy import FaultProxy

    from sllm_plugin.router.cluster import Replica
    from sllm_plugin.router.policy import MigrationModel
    from sllm_plugin.router.streams import Stream, StreamRunner, final_response

    (source_url, source_key), (dest_url, dest_key) = source, dest
    dest = Replica("dest", 1, MODEL, dest_url, api_key=dest_key)

    async def pick(model: str, exclude=()) -> Replica:
        return dest

    async with FaultProxy(source_url, cut_after=at if move == "failover" else None,
                          hold_after=at - 1 if move == "migration" else None) as proxy:
        source = Replica("source", 1, MODEL, proxy.url, api_key=source_key)
        runner = StreamRunner(session, pick, MigrationModel(), 8, 1, 300)
        stream = Stream("completion", MODEL, body, body["max_tokens"])
        task = asyncio.create_task(runner.run(stream, source))
        chunks, step, answer = [], "before", None
        while (item := await stream.events.get()) is not None:
            assert not isinstance(item, Exception), item
            chunks += item
            if move == "migration" and step == "before" and len(stream.generated) >= at - 1:
                # The proxy holds the source's next events: warm the destination, then let
                # one more event through; the move comes right after it, where allowed.
                answer = await runner.migrate(stream, dest)
                step = "moving"
                proxy.release(1)
            elif step == "moving":
                step = "after"
                proxy.release()
        await task
    choices = [c["choices"][0] for c in chunks]
    final = final_response(stream)["choices"][0]
    return {
        "streamed": ([t for c in choices for t in c.get("token_ids") or []],
                     "".join(c["text"] for c in choices), choices[-1]["finish_reason"],
                     choices[-1].get("stop_reason")),
        "whole": (final["token_ids"], final["text"], final["finish_reason"],
                  final["stop_reason"]),
        "moves": [m["reason"] for m in stream.migrations], "answer": answer}


def stop_cases(ref: str, at: int) -> list[dict]:
    """Stop strings from the unmoved text `ref`, the move coming after its first `at` chars:
    1, 2 and 4 characters found only after the move point, one spanning it, one never found,
    several at once, and one kept in the output."""

    def found_after(length: int) -> str | None:
        return next((ref[i:i + length] for i in range(at + 1, len(ref) - length + 1)
                     if ref.find(ref[i:i + length]) == i), None)

    span = next(ref[at - b:at + a] for b, a in ((2, 2), (1, 2), (2, 1), (3, 3), (1, 1))
                if ref.find(ref[at - b:at + a]) == at - b)
    never = next(s for s in ("\u2603" * 4, "@#@#", "~^~^") if s not in ref)
    one, two, four = found_after(1), found_after(2), found_after(4)
    cases = [{"stop": [span]}, {"stop": never}, {"stop": [never, span], "min_tokens": 2},
             {"stop": [span], "include_stop_str_in_output": True}]
    cases += [{"stop": s} for s in (one, two, four) if s is not None]
    if two and four:
        cases.append({"stop": [four, two]})
    return cases


def test_stop_strings_end_a_moved_request_exactly_where_they_end_an_unmoved_one(cluster):
    """Stop strings with a migration and a failover at an exact token (a proxy holds or cuts
    the source's stream there), compared with what the replica itself streams unmoved: text,
    token ids, finish reason and stop reason, streamed and not."""
    router = cluster["router"]
    source, dest = ((r["url"], replica_key(cluster, r)) for r in two_ready_replicas(cluster))
    quiet(router)
    base = {"model": MODEL, "prompt": PROMPT + " Stop.", "max_tokens": STOP_TOKENS,
            "temperature": 0, "ignore_eos": True, "return_token_ids": True}

    async def run() -> list:
        async with upstream.open_session() as session:
            ref = await vllm_itself(session, source, base)
            # Move after a token where the text ends on a whole character, a third in.
            third = len(ref["text"]) // 3
            at = next(n for n, chars in sorted(ref["boundaries"].items()) if chars >= third)
            assert third >= 8, ref
            outcomes = []
            for case in stop_cases(ref["text"], ref["boundaries"][at]):
                body = {**base, **case}
                truth = await vllm_itself(session, source, body)
                want = (truth["ids"], truth["text"], truth["finish"], truth["stop_reason"])
                for move in (None, "migration", "failover"):
                    got = await through_router(session, source, dest, body, move, at)
                    outcomes.append((case, move, want, got))
            return outcomes

    outcomes = asyncio.run(run())
    assert len(outcomes) >= 3 * 6, [case for case, *_ in outcomes]
    for case, move, want, got in outcomes:
        assert got["streamed"] == want, (case, move, got, want)
        assert got["whole"] == want, (case, move, got, want)
        # Every failover happens (the source breaks). A migration waits for a point where no
        # stop string has begun, so it may find the stream finished by one, not otherwise.
        if move == "failover" or (move == "migration" and want[2] == "length"):
            assert got["moves"] == [move], (case, got)


def test_a_replica_killed_mid_stream_is_survived_without_losing_a_token(cluster):
    router, nodes = cluster["router"], cluster["nodes"]
    wait_for(lambda: len(ready_replicas(router)) == 2, what="two ready replicas")
    quiet(router)
    body = {"model": MODEL, "prompt": PROMPT + " again", "max_tokens": LONG, "temperature": 0,
            "ignore_eos": True, "stream": True, "return_token_ids": True}
    expected, _, _ = stream_tokens(router, "/v1/completions", body)
    killed: dict = {}

    def kill() -> None:
        (stream,) = router.ok("GET", "/admin/streams")
        node, replica_id = stream["replica"].split("/")
        info = nodes[node].ok("GET", f"/replicas/{replica_id}")
        # The API server dies as in a crash; its node ends the rest of the replica, whose
        # resource tracker then removes vLLM's shared memory (a SIGKILL to the whole group
        # would leave 400 MB of it in /dev/shm).
        os.kill(info["pid"], signal.SIGKILL)
        killed.update(node=node, id=replica_id)

    before = metric(router, "sllm_router_migrations_total", reason="failover")
    got, _, _ = stream_tokens(router, "/v1/completions", body, on_first=kill)
    assert got == expected
    assert metric(router, "sllm_router_migrations_total", reason="failover") == before + 1
    move = router.ok("GET", "/admin/migrations")[-1]
    assert (move["reason"], move["from"]) == ("failover", f"{killed['node']}/{killed['id']}")
    assert move["to"] != move["from"] and 0 < move["at_token"] < LONG
    state = wait_for(lambda: nodes[killed["node"]].ok(
        "GET", f"/replicas/{killed['id']}")["state"] in ("exited", "failed") or None,
        what="the node reaping the killed replica")
    assert state
    wait_for(lambda: all(r["id"] != f"{killed['node']}/{killed['id']}"
                         for r in router.ok("GET", "/admin/replicas")),
             what="the router forgetting the dead replica")


def test_draining_a_node_moves_its_streams_off_token_exactly_and_stops_its_replicas(cluster):
    router, nodes = cluster["router"], cluster["nodes"]
    # The failover left one replica: start one on the other node, as an operator would.
    (kept,) = wait_for(lambda: ready_replicas(router) or None, what="a ready replica")
    (spare,) = [n for n in nodes if n != kept["node"]]
    started = nodes[spare].ok("POST", "/replicas", {"model": MODEL, "wait": True})
    httpx.post(f"{started['url']}/v1/completions", timeout=300,
               headers={"Authorization": f"Bearer {started['api_key']}"}, json={
        "model": MODEL, "prompt": PROMPT, "max_tokens": 2}).raise_for_status()  # warm
    wait_for(lambda: len(ready_replicas(router)) == 2, what="the router adopting it")
    quiet(router)
    body = {"model": MODEL, "prompt": PROMPT + " drained", "max_tokens": TOKEN_LIMIT,
            "temperature": 0, "ignore_eos": True, "stream": True, "return_token_ids": True}
    expected, expected_text, _ = stream_tokens(router, "/v1/completions", body)
    quiet(router)
    drained: dict = {}

    def drain() -> None:
        (stream,) = router.ok("GET", "/admin/streams")
        drained.update(stream=stream["id"], replica=stream["replica"],
                       node=stream["replica"].split("/")[0])
        drained["answer"] = router.ok("POST", f"/admin/nodes/{drained['node']}/drain")

    # The drain returns once the stream has moved and the replica stopped, so it runs beside
    # the client, which keeps reading.
    mover = threading.Thread(target=drain)
    got, text, _ = stream_tokens(router, "/v1/completions", body, on_first=mover.start)
    mover.join()
    assert (got, text) == (expected, expected_text)
    node = drained["node"]
    answer = drained["answer"]
    assert (answer["node"], answer["stopped"]) == (node, [drained["replica"]])
    (outcome,) = answer["streams"]
    assert (outcome["stream"], outcome["state"]) == (drained["stream"], "switching"), answer
    move = router.ok("GET", "/admin/migrations")[-1]
    assert (move["stream"], move["from"]) == (drained["stream"], drained["replica"])
    assert not move["to"].startswith(node + "/")
    assert all(r["state"] != "ready" for r in nodes[node].ok("GET", "/replicas"))
    (view,) = [n for n in router.ok("GET", "/admin/nodes") if n["name"] == node]
    assert view["draining"] and view["free_devices"] == 0
    # New requests go elsewhere while the node is drained; lifting the drain frees it again.
    assert not completion(router).headers["x-sllm-replica"].startswith(node + "/")
    assert router.ok("DELETE", f"/admin/nodes/{node}/drain") == {"node": node,
                                                                   "draining": False}
    wait_for(lambda: [n for n in router.ok("GET", "/admin/nodes") if n["name"] == node
                      and not n["draining"] and n["free_devices"] == 1],
             timeout=30, what="the drained node free again in the router's view")


def test_idle_replicas_are_stopped_after_the_keep_alive(cluster):
    router, nodes = cluster["router"], cluster["nodes"]
    assert ready_replicas(router)
    router.ok("POST", "/admin/models", {"name": MODEL, "spec": {
        "source": str(cluster["source"]), "max_replicas": 2, "keep_alive_s": 0.5}})
    wait_for(lambda: not [r for r in router.ok("GET", "/admin/replicas")
                          if r["model"] == MODEL], what="scale to zero")
    for daemon in nodes.values():
        assert all(r["state"] != "ready" for r in daemon.ok("GET", "/replicas"))
    wait_for(lambda: metric(router, "sllm_router_replicas", model=MODEL, state="ready") == 0
             and metric(router, "sllm_router_requests_total", model=MODEL, status="200") > 0,
             timeout=30, what="the replica gauge at zero")
