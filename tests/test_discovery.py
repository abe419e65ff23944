"""`sllm router --discover dns://NAME:PORT`: node daemons found in DNS.

The parsing, the naming and the keep-the-last-set rule are tested in process; the rest on a
fleet made of network namespaces (tests/netns.py): real `sllm node` daemons on hosts of their
own, a router on another, and a dnsmasq whose records the test changes.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from conftest import run_cli
from netns import Network, require_netns
from node_daemon import TOKEN, write_token_file

from sllm_plugin.router.cluster import Cluster, Replica
from sllm_plugin.router.config import RouterConfig, check_node_url, load_config
from sllm_plugin.router.discovery import (
    DiscoverTarget,
    Discovery,
    lookup,
    node_name,
    parse_discover_url,
)

NODE_PORT = 8073
ROUTER_PORT = 8080
ZONE_NAME = "nodes.sllm.test"

# -- parsing ------------------------------------------------------------------------------------


def test_a_discover_url_is_parsed():
    assert parse_discover_url("dns://Nodes.Example.:8073") == DiscoverTarget("nodes.example",
                                                                              8073)
    assert parse_discover_url("dns://sllm-node.ns.svc.cluster.local:8073/").port == 8073


@pytest.mark.parametrize(("url", "why"), [
    ("http://nodes.example:8073", "the scheme must be dns"),
    ("nodes.example:8073", "the scheme must be dns"),
    ("dns://nodes.example", "it names no port"),
    ("dns://nodes.example:0", "the port must be 1 to 65535"),
    ("dns://nodes.example:99999", "Port out of range"),
    ("dns://nodes.example:http", "Port could not be cast"),
    ("dns://:8073", "it names no host name"),
    ("dns://user:secret@nodes.example:8073", "it may not carry credentials"),
    ("dns://nodes.example:8073/path", "it may not have a path"),
    ("dns://nodes.example:8073?x=1", "it may not have a path"),
    ("dns://nodes..example:8073", "is not a DNS name"),
    ("dns://no des.example:8073", "is not a DNS name"),
])
def test_a_bad_discover_url_is_refused_saying_why(url, why):
    with pytest.raises(ValueError, match="is not dns://NAME:PORT") as e:
        parse_discover_url(url)
    assert why in str(e.value)
    assert "secret" not in str(e.value) or "user:secret" in url  # the URL is the user's own


def test_a_bad_discover_flag_exits_2_with_the_reason():
    r = run_cli("router", "--discover", "http://nodes.example:8073", timeout=60)
    assert r.returncode == 2
    assert "sllm router: error:" in r.stderr
    assert "discover" in r.stderr and "the scheme must be dns" in r.stderr


def test_node_token_file_is_accepted_with_discover_only(tmp_path):
    token = write_token_file(tmp_path / "node.token")
    alone = run_cli("router", "--node-token-file", str(token), timeout=60)
    assert alone.returncode == 2 and "applies to --node and --discover nodes" in alone.stderr
    bad = run_cli("router", "--node-token-file", str(token), "--discover", "dns://x", timeout=60)
    assert bad.returncode == 2 and "it names no port" in bad.stderr  # past the token check
    config = load_config(None, discover="dns://nodes.example:8073", discover_token_file=token)
    assert config.nodes == []  # discovering: no default local node
    assert config.discover_token_file == token
    both = load_config(None, discover="dns://nodes.example:8073",
                       nodes=[{"name": "n", "url": "http://10.0.0.1:8073"}])
    assert [n.name for n in both.nodes] == ["n"]  # static nodes stay


def test_node_names_and_urls_bracket_ipv6():
    assert node_name("198.18.0.1", 8073) == "198.18.0.1:8073"
    assert node_name("2001:db8::1", 8073) == "[2001:db8::1]:8073"
    assert check_node_url(f"http://{node_name('2001:db8::1', 8073)}") == \
        "http://[2001:db8::1]:8073"


def test_dns_names_are_node_urls():
    assert check_node_url("http://node-a.sllm.test:8073/") == "http://node-a.sllm.test:8073"


def test_lookup_uses_the_system_resolver():
    """`localhost` comes from /etc/hosts through getaddrinfo, like any name would."""
    found = asyncio.run(lookup(DiscoverTarget("localhost", NODE_PORT)))
    assert "127.0.0.1" in found or "::1" in found
    assert found == sorted(set(found), key=lambda a: (":" in a, a))


# -- keeping the set ----------------------------------------------------------------------------

class ScriptedDns:
    """Answers lookups from a list: addresses, or an exception to raise (a failed lookup)."""

    def __init__(self, *answers) -> None:
        self.answers = list(answers)

    async def __call__(self, target: DiscoverTarget) -> list[str]:
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


def discovery(tmp_path: Path, *answers, nodes=()) -> Discovery:
    config = RouterConfig(discover=f"dns://{ZONE_NAME}:{NODE_PORT}", nodes=list(nodes),
                          discover_token_file=write_token_file(tmp_path / "token"))
    return Discovery(Cluster(config, None), config, ScriptedDns(*answers))  # type: ignore[arg-type]


def test_a_failed_lookup_keeps_the_nodes_and_is_logged_once(tmp_path, caplog):
    nxdomain = socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    d = discovery(tmp_path, ["198.18.0.1", "198.18.0.2"], nxdomain, TimeoutError(), [],
                  ["198.18.0.2"])
    cluster = d.cluster
    asyncio.run(d.refresh())
    assert sorted(cluster.nodes) == ["198.18.0.1:8073", "198.18.0.2:8073"]
    assert cluster.nodes["198.18.0.1:8073"].url == "http://198.18.0.1:8073"
    assert cluster.tokens["198.18.0.1:8073"] == TOKEN
    with caplog.at_level(logging.INFO, "sllm_plugin.router"):
        for _ in range(3):  # NXDOMAIN, a timeout, an empty answer: all kept
            asyncio.run(d.refresh())
            assert sorted(cluster.nodes) == ["198.18.0.1:8073", "198.18.0.2:8073"]
        failures = [r for r in caplog.records if "failed" in r.getMessage()]
        assert len(failures) == 1 and "keeping the 2 node(s)" in failures[0].getMessage()
        asyncio.run(d.refresh())  # an answer again: it is the truth
    assert sorted(cluster.nodes) == ["198.18.0.2:8073"]
    assert sorted(cluster.status) == sorted(cluster.tokens) == ["198.18.0.2:8073"]
    assert any("answers again" in r.getMessage() for r in caplog.records)


def test_a_node_that_left_dns_loses_its_replicas(tmp_path):
    d = discovery(tmp_path, ["198.18.0.1", "198.18.0.2"], ["198.18.0.2"])
    asyncio.run(d.refresh())
    cluster = d.cluster
    idle = Replica("198.18.0.1:8073", 1, "m", "http://198.18.0.1:9000")
    kept = Replica("198.18.0.2:8073", 1, "m", "http://198.18.0.2:9000")
    cluster.replicas = {idle.key: idle, kept.key: kept}
    cluster.draining.add("198.18.0.1:8073")
    asyncio.run(d.refresh())
    assert idle.state == "gone" and list(cluster.replicas) == [kept.key]
    assert kept.state == "ready" and cluster.draining == set()


def test_a_static_node_with_the_same_url_wins(tmp_path):
    static = {"name": "fixed", "url": "http://198.18.0.1:8073"}
    d = discovery(tmp_path, ["198.18.0.1", "198.18.0.2"], ["198.18.0.2"], nodes=[static])
    asyncio.run(d.refresh())
    assert sorted(d.cluster.nodes) == ["198.18.0.2:8073", "fixed"]
    asyncio.run(d.refresh())  # an address that is a static node: never removed by DNS
    assert sorted(d.cluster.nodes) == ["198.18.0.2:8073", "fixed"]


# -- a fleet of namespaces ----------------------------------------------------------------------

def wait_for(condition, timeout: float, what: str, describe=lambda: ""):
    """Poll `condition()` until it returns something true; AssertionError after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s\n{describe()}")
        time.sleep(0.1)  # polling interval for the condition above


class Daemon:
    """`sllm ARGS` inside a host's namespace, ready once /health answers from the test."""

    def __init__(self, host, workdir: Path, name: str, argv: list[str], port: int) -> None:
        self.log_path = workdir / f"{name}.log"
        self.url = f"http://{host.address}:{port}"
        self.client = httpx.Client(base_url=self.url, timeout=30, trust_env=False)
        with open(self.log_path, "w") as log:
            self.proc = host.popen([sys.executable, "-m", "sllm_plugin.cli", *argv],
                                   stdout=log, stderr=subprocess.STDOUT)
        wait_for(self._healthy, 120, f"{name} at {self.url}", self.log)

    def _healthy(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"exited with {self.proc.returncode}:\n{self.log()}")
        try:
            return self.client.get("/health").status_code == 200
        except httpx.HTTPError:
            return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        self.client.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    """Hosts router, node-a, node-b and dns; a node daemon on each node host (no replicas:
    the router only has to see them), node-a answering to the name node-a.sllm.test."""
    require_netns(dns=True)
    work = tmp_path_factory.mktemp("fleet")
    token = write_token_file(work / "node.token")
    with Network() as net:
        router, a, b = net.host("router"), net.host("node-a"), net.host("node-b")
        dns = net.dns()
        router.use_dns(dns)
        daemons = []
        try:
            for host, names in ((a, ["node-a.sllm.test"]), (b, [])):
                config = {"host": host.address, "port": NODE_PORT, "token_file": str(token),
                          "state_dir": str(work / host.name / "state"), "dram": None,
                          "ssd": {"path": str(work / host.name / "ssd"), "capacity": 10**8},
                          "allowed_hosts": names}
                path = work / f"{host.name}.yaml"
                path.write_text(yaml.safe_dump(config))
                daemons.append(Daemon(host, work, host.name,
                                      ["node", "--config", str(path), "--no-calibrate"],
                                      NODE_PORT))
            yield net, dns, router, a, b, token, work
        finally:
            for daemon in daemons:
                daemon.stop()


def start_router(fleet, name: str, *argv: str) -> Daemon:
    net, dns, router, a, b, token, work = fleet
    admin = write_token_file(work / f"{name}-admin.token")
    config = work / f"{name}.yaml"
    config.write_text(yaml.safe_dump({"poll_interval_s": 0.3, "discover_interval_s": 0.3}))
    return Daemon(router, work, name,
                  ["router", "--config", str(config), "--host", router.address,
                   "--port", str(ROUTER_PORT), "--admin-token-file", str(admin),
                   "--node-token-file", str(token), *argv], ROUTER_PORT)


def admin_nodes(router: Daemon) -> dict[str, dict]:
    r = router.client.get("/admin/nodes", headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 200, r.text
    return {n["name"]: n for n in r.json()}


def test_the_router_follows_the_nodes_in_dns(fleet):
    net, dns, router_host, a, b, token, work = fleet
    name_a, name_b = f"{a.address}:{NODE_PORT}", f"{b.address}:{NODE_PORT}"
    dns.set_records(ZONE_NAME, [a.address])
    router = start_router(fleet, "router-discover", "--discover",
                          f"dns://{ZONE_NAME}:{NODE_PORT}")
    try:
        def listed(*names: str):
            nodes = admin_nodes(router)
            return set(nodes) == set(names) and all(n["reachable"] for n in nodes.values())

        wait_for(lambda: listed(name_a), 30, "only node-a listed", router.log)
        assert admin_nodes(router)[name_a]["url"] == f"http://{name_a}"

        dns.set_records(ZONE_NAME, [a.address, b.address])
        wait_for(lambda: listed(name_a, name_b), 30, "node-b added", router.log)

        dns.set_records(ZONE_NAME, [b.address])
        wait_for(lambda: listed(name_b), 30, "node-a removed", router.log)
        assert f"node {name_a} left DNS" in router.log()

        # NXDOMAIN: the nodes found before stay, and the failure is logged (once).
        dns.set_records(ZONE_NAME, [])
        wait_for(lambda: "keeping the 1 node(s)" in router.log(), 30, "the failure logged",
                 router.log)
        assert listed(name_b)
        dns.set_records(ZONE_NAME, [a.address])
        wait_for(lambda: listed(name_a), 30, "the answer followed again", router.log)
        assert router.log().count("keeping the 1 node(s)") == 1
    finally:
        router.stop()


def test_a_node_is_reached_by_its_dns_name(fleet):
    """DNS names work everywhere a node URL does: the router resolves them, and a node answers
    to the names in its allowed_hosts (node-b has none, so it refuses its name)."""
    net, dns, router_host, a, b, token, work = fleet
    dns.set_records("node-a.sllm.test", [a.address])
    dns.set_records("node-b.sllm.test", [b.address])
    auth = {"Authorization": f"Bearer {TOKEN}"}
    status, body = router_host.http("GET", f"http://node-a.sllm.test:{NODE_PORT}/status",
                                    headers=auth)
    assert status == 200, body
    status, body = router_host.http("GET", f"http://node-b.sllm.test:{NODE_PORT}/status",
                                    headers=auth)
    assert status == 400 and b"invalid_host" in body

    router = start_router(fleet, "router-names", "--node", f"http://node-a.sllm.test:{NODE_PORT}",
                          "--node", f"http://node-b.sllm.test:{NODE_PORT}")
    try:
        wait_for(lambda: admin_nodes(router)["node0"]["reachable"], 30, "node-a by name",
                 router.log)
        nodes = admin_nodes(router)
        assert nodes["node0"]["url"] == f"http://node-a.sllm.test:{NODE_PORT}"
        # Polled in the same round as node0 (a poll asks every node), and refused: its name is
        # not one node-b answers to.
        assert nodes["node1"]["reachable"] is False
    finally:
        router.stop()

