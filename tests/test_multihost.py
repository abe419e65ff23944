"""The cluster across hosts: a router, two node daemons and an outsider, each on its own
network-namespace host (tests/netns.py: a bridge, 198.18.0.0/24, nothing routed off it),
with real vLLM CPU replicas. Root only (CI runs as root); skipped otherwise, with the reason,
unless SLLM_REQUIRE_NETNS=1 makes a missing prerequisite a failure.

One fleet for the module (each vLLM start costs about half a minute here); the tests run in
order: placement by locality, a stream from another host, the outsider refused, a live
migration between hosts, a partition, a node daemon killed, and a router restarted.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
import uuid
from pathlib import Path

import pytest
from netns import Network, require_netns
from node_daemon import NodeDaemon, RouterProcess, write_token_file
from test_router import stream_tokens, wait_for

MODEL = "org/llama"
REPLICA_ARGS = ["--enforce-eager", "--max-model-len", "2048", "--max-num-seqs", "8",
                "--dtype", "float32"]
PROMPT = "The quick brown fox jumps over the lazy dog. " * 3
LONG = 600  # tokens of a stream that is moved or failed over mid-way
NODE_PORT, ROUTER_PORT = 8073, 8080
# The router's health settings: a node silent for 2 s is lost; noticed within
# UNHEALTHY + NODE_TIMEOUT + POLL seconds of its last answer.
UNHEALTHY, NODE_TIMEOUT, POLL = 2.0, 1.0, 0.5
BOUND = UNHEALTHY + NODE_TIMEOUT + POLL
SLACK = 3.0  # for a loaded 2-core machine: the router's loop may be busy relaying tokens


def node_config(root: Path, name: str, host, core: str, dram: Path, token_file: Path) -> dict:
    return {"host": host.address, "port": NODE_PORT, "token_file": str(token_file),
            "state_dir": str(root / name / "state"),
            "dram": {"path": str(dram), "capacity": 10**9},
            "ssd": {"path": str(root / name / "ssd"), "capacity": 10**9},
            "devices": [core], "calibration_bytes": 32 * 1024 * 1024,
            "replica_args": REPLICA_ARGS,
            "replica_env": {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}}


def router_config(net: Network, token_file: Path, keep_alive_s: float = 3600) -> dict:
    return {"host": net.hosts["router"].address, "port": ROUTER_PORT,
            "nodes": [{"name": n, "url": f"http://{net.hosts[n].address}:{NODE_PORT}",
                       "token_file": str(token_file)} for n in ("a", "b")],
            "models": {MODEL: {"source": None, "max_replicas": 2,
                               "keep_alive_s": keep_alive_s, "target_load": 1000}},
            "poll_interval_s": POLL, "node_timeout_s": NODE_TIMEOUT,
            "unhealthy_after_s": UNHEALTHY,
            "limits": {"max_tokens": 1000, "start_timeout_s": 300, "migration_rounds": 1}}


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    from sllm_plugin.testing import make_random_model

    require_netns()
    root = tmp_path_factory.mktemp("multihost")
    source = make_random_model(root / "llama", "small-llama", seed=7)
    token_file = write_token_file(root / "fleet.token")
    cores = [f"cpu:{i}" for i in range(2)] if (os.cpu_count() or 1) >= 2 else ["cpu:0"] * 2
    shm = {n: Path(f"/dev/shm/sllm-mh-{uuid.uuid4().hex[:8]}") for n in "ab"}
    with Network("mhost") as net:
        for name in ("router", "a", "b", "outsider"):
            net.host(name)
        nodes = {}
        for name, core in zip("ab", cores, strict=True):
            (root / name).mkdir()
            config = node_config(root, name, net.hosts[name], core, shm[name], token_file)
            nodes[name] = NodeDaemon(root / name, config, name=f"node-{name}",
                                     prefix=net.hosts[name].exec_prefix())
        config = router_config(net, token_file)
        config["models"][MODEL]["source"] = str(source)
        router = RouterProcess(root, config, prefix=net.hosts["router"].exec_prefix())
        fleet = {"net": net, "root": root, "nodes": nodes, "router": router,
                 "source": source, "token_file": token_file}
        try:
            for daemon in nodes.values():
                daemon.start()
            router.start()
            yield fleet
        finally:
            fleet["router"].stop(signal.SIGKILL)
            for daemon in fleet["nodes"].values():
                daemon.stop()
            for path in shm.values():
                shutil.rmtree(path, ignore_errors=True)


def ready(router: RouterProcess) -> list[dict]:
    return [r for r in router.ok("GET", "/admin/replicas")
            if r["model"] == MODEL and r["state"] == "ready"]


def node_view(router: RouterProcess, name: str) -> dict:
    return next(n for n in router.ok("GET", "/admin/nodes") if n["name"] == name)


def body(max_tokens: int, **extra) -> dict:
    return {"model": MODEL, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "return_token_ids": True, **extra}


def expected_tokens(router: RouterProcess, max_tokens: int) -> list[int]:
    """The unmoved answer (not streamed, so nothing of a stream's path is in it)."""
    r = router.client.post("/v1/completions", timeout=600,
                           json={**body(max_tokens), "stream": False})
    assert r.status_code == 200, r.text
    (choice,) = r.json()["choices"]
    assert len(choice["token_ids"]) == max_tokens
    return choice["token_ids"]


def quiet(router: RouterProcess) -> None:
    wait_for(lambda: router.ok("GET", "/admin/streams") == [], what="no active streams")


def test_placement_across_hosts_picks_the_node_whose_dram_holds_the_checkpoint(fleet):
    net, nodes, router = fleet["net"], fleet["nodes"], fleet["router"]
    nodes["b"].ok("POST", "/prefetch", {"model": MODEL, "tier": "dram", "wait": True})
    assert nodes["b"].held("dram") == [MODEL] and nodes["a"].held("dram") == []
    r = router.client.post("/v1/completions", timeout=600,
                           json={**body(8), "stream": False})
    assert r.status_code == 200, r.text
    assert r.headers["x-sllm-replica"].startswith("b/")
    (replica,) = ready(router)
    # Reported by the address other hosts reach node b by, and reached there by the router.
    assert replica["url"].startswith(f"http://{net.hosts['b'].address}:")
    assert replica["tier"] == "dram"


def test_a_greedy_stream_from_another_host_is_token_exact(fleet):
    router = fleet["router"]
    expected = expected_tokens(router, 64)
    got, _, _ = stream_tokens(router, "/v1/completions", body(64))
    assert got == expected


def test_the_outsider_is_refused_by_replicas_nodes_and_the_router(fleet):
    net, nodes, router = fleet["net"], fleet["nodes"], fleet["router"]
    outsider = net.hosts["outsider"]
    (replica,) = ready(router)
    url = replica["url"]
    wrong = {"Authorization": "Bearer not-the-key-of-this-replica"}
    generate = {"model": MODEL, "prompt": "hi", "max_tokens": 1}
    # Replica ports: serving needs the router's key; control needs the node's, from its host.
    for method, path, payload in (("POST", "/v1/completions", generate),
                                  ("POST", "/v1/chat/completions", generate),
                                  ("GET", "/v1/models", None), ("GET", "/metrics", None),
                                  ("POST", "/invocations", generate),
                                  ("POST", "/reset_prefix_cache", None),
                                  ("POST", "/sleep", None), ("POST", "/collective_rpc", None)):
        for headers in (None, wrong):
            status, _ = outsider.http(method, url + path, headers=headers, json=payload)
            assert status == 401, (method, path, headers, status)
    # The router's key opens no control endpoint, not even from the router's host.
    key = nodes["b"].ok("GET", "/replica-keys")["keys"][replica["id"].split("/")[1]]
    status, _ = net.hosts["router"].http("POST", url + "/reset_prefix_cache",
                                         headers={"Authorization": f"Bearer {key}"})
    assert status == 401
    status, answer = outsider.http("GET", url + "/health")
    assert status == 200  # probes need nothing, and learn nothing
    # Every mutating node call, and the replica keys, need the node's token.
    node_url = f"http://{net.hosts['b'].address}:{NODE_PORT}"
    for method, path, payload in (
            ("POST", "/replicas", {"model": MODEL}), ("DELETE", "/replicas/1", None),
            ("POST", "/prefetch", {"model": MODEL}), ("POST", "/promote", {"model": MODEL}),
            ("POST", "/evict", {"model": MODEL, "tier": "dram"}),
            ("POST", "/pin", {"model": MODEL}),
            ("POST", "/models", {"name": "org/x", "source": "/etc"}),
            ("GET", "/replica-keys", None)):
        status, answer = outsider.http(method, node_url + path, json=payload)
        assert status == 401, (method, path, status, answer)
        assert key.encode() not in answer
    status, answer = outsider.http("GET", node_url + "/status")
    assert status == 200 and key.encode() not in answer  # reads are open, keys are not there
    # The router: every admin call needs its token; the OpenAI API is its public face.
    router_url = router.url
    for method, path, payload in (("GET", "/admin/nodes", None),
                                  ("GET", "/admin/replicas", None),
                                  ("POST", "/admin/migrate", {"stream": "x"}),
                                  ("POST", "/admin/nodes/a/drain", None),
                                  ("POST", "/admin/models", {"name": "org/x"})):
        status, _ = outsider.http(method, router_url + path, json=payload)
        assert status == 401, (method, path, status)
    status, answer = outsider.http("GET", router_url + "/v1/models")
    assert status == 200 and MODEL in answer.decode()


def two_replicas(fleet) -> list[dict]:
    router, nodes = fleet["router"], fleet["nodes"]
    have = {r["node"] for r in ready(router)}
    for name, daemon in nodes.items():
        if name not in have:
            daemon.ok("POST", "/replicas", {"model": MODEL, "wait": True})
    return wait_for(lambda: len(ready(router)) == 2 and ready(router), what="two replicas")


def test_a_live_migration_from_one_host_to_the_other_is_token_exact(fleet):
    router = fleet["router"]
    two_replicas(fleet)
    quiet(router)
    expected = expected_tokens(router, LONG)
    moved: dict = {}

    def migrate() -> None:
        (stream,) = router.ok("GET", "/admin/streams")
        moved["from"] = stream["replica"]
        moved["answer"] = router.ok("POST", "/admin/migrate", {"stream": stream["id"]})

    got, _, _ = stream_tokens(router, "/v1/completions", body(LONG), on_first=migrate)
    assert moved["answer"]["state"] == "switching", moved
    assert moved["answer"]["to"].split("/")[0] != moved["from"].split("/")[0]  # other host
    assert got == expected
    move = router.ok("GET", "/admin/migrations")[-1]
    assert (move["reason"], move["from"], move["to"]) == (
        "migration", moved["from"], moved["answer"]["to"])


def kill_mid_stream(fleet, fault) -> tuple[list[int], list[int], dict]:
    """Stream LONG tokens; after the first, `fault(node)` strikes the node serving it. Returns
    (expected, got, what happened)."""
    router = fleet["router"]
    two_replicas(fleet)
    quiet(router)
    expected = expected_tokens(router, LONG)
    struck: dict = {}

    def strike() -> None:
        (stream,) = router.ok("GET", "/admin/streams")
        struck["replica"] = stream["replica"]
        struck["node"] = stream["replica"].split("/")[0]
        struck["at"] = time.time()  # the router's lost_at is wall time too
        fault(struck["node"])

    got, _, _ = stream_tokens(router, "/v1/completions", body(LONG), on_first=strike)
    return expected, got, struck


def assert_failed_over(router: RouterProcess, struck: dict) -> None:
    moves = [m for m in router.ok("GET", "/admin/migrations")
             if m["reason"] == "failover" and m["from"] == struck["replica"]]
    assert moves and moves[-1]["to"].split("/")[0] != struck["node"], moves
    assert 0 < moves[-1]["at_token"] < LONG


def lost_within_bound(router: RouterProcess, struck: dict) -> float:
    """Seconds from the fault until the router marked the node lost (by its own record)."""
    view = node_view(router, struck["node"])
    assert not view["healthy"] and view["lost_at"] is not None, view
    return view["lost_at"] - struck["at"]


def test_a_partition_mid_stream_fails_over_token_exactly_and_the_node_comes_back(fleet):
    net, nodes, router = fleet["net"], fleet["nodes"], fleet["router"]
    expected, got, struck = kill_mid_stream(fleet, lambda n: net.hosts[n].link_down())
    try:
        assert got == expected
        assert_failed_over(router, struck)
        assert lost_within_bound(router, struck) <= BOUND + SLACK
        assert all(r["node"] != struck["node"] for r in ready(router))
    finally:
        net.hosts[struck["node"]].link_up()
        back = time.monotonic()
    wait_for(lambda: node_view(router, struck["node"])["healthy"], timeout=BOUND + SLACK,
             what="the node re-admitted")
    assert time.monotonic() - back <= BOUND + SLACK
    # Its replica, which ran on through the partition, is adopted again: one replica per
    # node, each known once, and the router's view is the nodes' own.
    replicas = wait_for(lambda: len(ready(router)) == 2 and ready(router), timeout=30,
                        what="the node's replica adopted again")
    assert sorted(r["node"] for r in replicas) == ["a", "b"]
    for name, daemon in nodes.items():
        running = {f"{name}/{r['id']}" for r in daemon.ok("GET", "/replicas")
                   if r["state"] in ("starting", "ready")}
        assert running == {r["id"] for r in replicas if r["node"] == name}
    got, _, _ = stream_tokens(router, "/v1/completions", body(64))
    assert got == expected[:64]


def test_a_node_daemon_killed_mid_stream_fails_over_and_its_restart_leaves_no_orphans(fleet):
    nodes, router = fleet["nodes"], fleet["router"]
    expected, got, struck = kill_mid_stream(
        fleet, lambda n: nodes[n].proc.send_signal(signal.SIGKILL))
    name = struck["node"]
    nodes[name].proc.wait()
    assert got == expected
    assert_failed_over(router, struck)
    assert lost_within_bound(router, struck) <= BOUND + SLACK
    # The daemon comes back on the same state: it stops the replica its predecessor left, and
    # the router re-admits it with nothing on it.
    orphan = int(struck["replica"].split("/")[1])
    nodes[name].start()
    assert any("left by a previous daemon" in note for note in nodes[name].status()["notes"])
    wait_for(lambda: node_view(router, name)["healthy"], timeout=BOUND + SLACK,
             what="the restarted node re-admitted")
    assert [r for r in nodes[name].ok("GET", "/replicas")
            if r["state"] in ("starting", "ready")] == []
    assert all(r["node"] != name for r in ready(router)), orphan


def test_a_restarted_router_rebuilds_its_view_and_keep_alive_applies(fleet):
    router, nodes = fleet["router"], fleet["nodes"]
    survivors = {r["id"] for r in ready(router)}
    assert survivors
    router.stop(signal.SIGKILL)
    # The same fleet, with a short keep-alive for what the new router finds.
    config = router_config(fleet["net"], fleet["token_file"], keep_alive_s=8)
    config["models"][MODEL]["source"] = str(fleet["source"])
    fresh = RouterProcess(fleet["root"], config, name="router2",
                          prefix=fleet["net"].hosts["router"].exec_prefix())
    fleet["router"] = fresh
    fresh.start()
    wait_for(lambda: {r["id"] for r in ready(fresh)} == survivors, timeout=30,
             what="the surviving replicas adopted")
    r = fresh.client.post("/v1/completions", timeout=600, json={**body(8), "stream": False})
    assert r.status_code == 200 and r.headers["x-sllm-replica"] in survivors
    started = sum(len(d.ok("GET", "/replicas")) for d in nodes.values())
    # Idle past the keep-alive: the new router stops what it adopted, on the nodes too (as
    # standby engines that serve nothing, the nodes' default); the router drops its replica
    # before the node has answered the stop, so the nodes are asked until they have.
    wait_for(lambda: ready(fresh) == [], timeout=120, what="keep-alive stopping the replicas")
    wait_for(lambda: all(x["state"] not in ("starting", "ready")
                         for d in nodes.values() for x in d.ok("GET", "/replicas")),
             timeout=60, what="the nodes done with the stops")
    assert {x["state"] for d in nodes.values() for x in d.ok("GET", "/replicas")} <= {
        "standby", "stopped", "failed", "exited"}
    assert sum(len(d.ok("GET", "/replicas")) for d in nodes.values()) == started
    assert all(n["healthy"] for n in fresh.ok("GET", "/admin/nodes"))
