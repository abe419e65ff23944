"""The router's configuration: node URLs, model names and tokens (from files or the
environment, never the command line), and a real router authenticating to a real node daemon
with a token it read from a file or found on this host."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import pytest
import yaml
from node_daemon import NodeDaemon, ServiceProcess
from vllm_server import free_port

from sllm_plugin.router.cluster import Cluster
from sllm_plugin.router.config import ConfigError, NodeRef, load_config
from sllm_plugin.store.replicas import detect_devices
from sllm_plugin.tokens import ensure_node_token, write_new_token

SECRET = "s3cret-never-on-argv-" + uuid.uuid4().hex  # what a token must never leak as


def token_file(path: Path, token: str = SECRET) -> Path:
    path.write_text(token + "\n")
    path.chmod(0o600)
    return path


@pytest.mark.parametrize(("url", "why"), [
    ("notaurl", "the scheme must be http or https"),
    ("ftp://host:21", "the scheme must be http or https"),
    ("http://", "names no host"),
    ("http://host:99999", "Port out of range"),
    ("http://host:port", "Port could not be cast"),
    ("http://host/v1", "may not have a path"),
    ("http://host:8073?x=1", "may not have a path, query or fragment"),
    ("http://user:pw@host", "may not carry credentials"),
])
def test_a_node_url_that_is_not_http_host_port_is_refused_naming_it(url, why):
    with pytest.raises(ValueError, match=why) as e:
        NodeRef(name="n", url=url)
    assert f"node URL {url!r} is not http(s)://host[:port]" in str(e.value)


def test_node_urls_are_normalised():
    from sllm_plugin.router.config import check_node_url

    assert check_node_url("http://127.0.0.1:8073/") == "http://127.0.0.1:8073"
    assert check_node_url("https://Node.Example") == "https://node.example"
    assert check_node_url("http://[::1]:80") == "http://[::1]:80"


def test_the_config_file_gets_the_same_checks_and_names_the_key(tmp_path):
    path = tmp_path / "router.yaml"
    path.write_text(yaml.safe_dump({"nodes": [{"name": "a", "url": "notaurl"}]}))
    with pytest.raises(ConfigError, match=r"router.yaml: .*nodes\.0\.url: .*'notaurl'"):
        load_config(path)
    path.write_text(yaml.safe_dump({"models": {"../evil": {}}}))
    with pytest.raises(ConfigError, match=r"models: .*invalid model name '\.\./evil'"):
        load_config(path)
    path.write_text(yaml.safe_dump({"nodes": [{"name": "a", "url": "http://h", "token": SECRET,
                                               "token_file": "/x"}]}))
    with pytest.raises(ConfigError, match="token or token_file, not both"):
        load_config(path)
    spaced = SECRET.replace("-", " ")  # it would not fit in a header; and is never echoed
    path.write_text(yaml.safe_dump({"admin_token": spaced,
                                    "nodes": [{"name": "a", "url": "http://h", "token": spaced}]}))
    with pytest.raises(ConfigError, match="printable ASCII characters only") as e:
        load_config(path)
    assert "nodes.0.token" in str(e.value) and "admin_token" in str(e.value)
    assert spaced not in str(e.value) and SECRET[-8:] not in str(e.value)


def test_tokens_come_from_files_or_the_environment_and_never_show(tmp_path, monkeypatch):
    monkeypatch.delenv("SLLM_ROUTER_TOKEN", raising=False)
    monkeypatch.delenv("SLLM_NODE_TOKEN", raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))  # no local node token
    admin = token_file(tmp_path / "admin")
    config = load_config(admin_token_file=str(admin), nodes=[
        {"name": "a", "url": "http://10.0.0.1:8073", "token_file": str(admin)},
        {"name": "b", "url": "http://10.0.0.2:8073"}])
    assert config.admin_token is not None and config.admin_token.get_secret_value() == SECRET
    assert SECRET not in repr(config) and SECRET not in str(config.model_dump())
    cluster = Cluster(config, None)  # type: ignore[arg-type]
    assert cluster._headers("a") == {"Authorization": f"Bearer {SECRET}"}
    assert cluster._headers("b") == {}
    # The environment: the admin token, and the token of nodes that have none of their own.
    other = "env-token-" + uuid.uuid4().hex
    monkeypatch.setenv("SLLM_ROUTER_TOKEN", other)
    monkeypatch.setenv("SLLM_NODE_TOKEN", other)
    config = load_config(nodes=[{"name": "b", "url": "http://10.0.0.2:8073"}])
    assert config.admin_token is not None and config.admin_token.get_secret_value() == other
    assert Cluster(config, None)._headers("b") == {  # type: ignore[arg-type]
        "Authorization": f"Bearer {other}"}
    # A file wins over the environment.
    config = load_config(admin_token_file=str(admin))
    assert config.admin_token is not None and config.admin_token.get_secret_value() == SECRET


def test_a_node_on_this_host_without_a_token_gets_the_one_it_made(tmp_path, monkeypatch):
    monkeypatch.delenv("SLLM_NODE_TOKEN", raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    config = load_config(nodes=[{"name": "here", "url": "http://127.0.0.1:8073"},
                                {"name": "there", "url": "http://10.0.0.2:8073"}])
    cluster = Cluster(config, None)  # type: ignore[arg-type]
    assert cluster._headers("here") == {}  # the node has not made one yet
    state = tmp_path / "sllm_plugin" / "node"
    state.mkdir(parents=True)
    token, _ = ensure_node_token(state)
    assert cluster._headers("here") == {"Authorization": f"Bearer {token}"}
    assert cluster._headers("there") == {}  # never sent to another host


@pytest.mark.parametrize(("flags", "words"), [
    (["--admin-token-file", "{loose}"], "{loose}: the token file is readable or writable by "
     "others"),
    (["--node", "http://127.0.0.1:1", "--node-token-file", "{tmp}/none"], "{tmp}/none: no such "
     "token file"),
    (["--node", "notaurl"], "node URL 'notaurl' is not http(s)://host[:port]"),
    (["--model", "../evil=/models/x"], "invalid model name '../evil'"),
])
def test_bad_router_flags_stop_it_at_once_saying_why(tmp_path, flags, words):
    from conftest import run_cli

    loose = token_file(tmp_path / "loose")
    loose.chmod(0o644)
    fill = {"loose": loose, "tmp": tmp_path}
    # A router that accepted them would serve: the timeout ends it, and the test fails.
    r = run_cli("router", "--port", str(free_port()), *[f.format(**fill) for f in flags],
                timeout=60)
    assert r.returncode == 2 and words.format(**fill) in r.stderr, r.stderr


def test_a_token_on_the_command_line_is_refused_without_echoing_it():
    from conftest import run_cli

    r = run_cli("router", "--port", str(free_port()), "--admin-token", SECRET, timeout=60)
    assert r.returncode == 2, r.stderr
    assert "--admin-token-file" in r.stderr and "SLLM_ROUTER_TOKEN" in r.stderr
    assert SECRET not in r.stderr + r.stdout


@pytest.fixture
def node(tmp_path):
    """A real node daemon with a token of its own (no replica is started)."""
    shm = Path(f"/dev/shm/sllm-test-{uuid.uuid4().hex[:8]}")
    daemon = NodeDaemon(tmp_path, {
        "token_file": str(token_file(tmp_path / "node-secret")),
        "dram": {"path": str(shm), "capacity": 10**8},
        "ssd": {"path": str(tmp_path / "ssd"), "capacity": 10**8},
        "devices": [detect_devices()[0].name], "calibration_bytes": 1024 * 1024})
    daemon.start()
    try:
        yield daemon
    finally:
        daemon.stop()
        shutil.rmtree(shm, ignore_errors=True)


def registered(node: NodeDaemon) -> list[str]:
    return sorted(node.ok("GET", "/models"))


def test_sllm_router_reaches_a_node_with_a_token_from_a_file_and_logs_no_token(node, tmp_path):
    node_token = token_file(tmp_path / "node-token")
    admin_token = tmp_path / "admin-token"
    admin = write_new_token(admin_token)
    port = free_port()
    router = ServiceProcess(tmp_path, "router-flags", [
        "router", "--port", str(port), "--node", node.url, "--node-token-file",
        str(node_token), "--admin-token-file", str(admin_token),
        "--model", f"org/flagged={tmp_path}"], port)
    with router:
        assert registered(node) == ["org/flagged"]  # registered at start: the token worked
        assert router.call("GET", "/admin/nodes", token=admin).status_code == 200
        assert router.call("GET", "/admin/nodes", token=SECRET).status_code == 403
    log = router.log_path.read_text()
    assert SECRET not in log and admin not in log


def test_sllm_router_finds_the_token_of_a_node_on_this_host(node, tmp_path, monkeypatch):
    monkeypatch.delenv("SLLM_NODE_TOKEN", raising=False)
    state = tmp_path / "xdg" / "sllm_plugin" / "node"
    state.mkdir(parents=True)
    token_file(state / "token")  # as that node would have made it
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    port = free_port()
    with ServiceProcess(tmp_path, "router-local", [
            "router", "--port", str(port), "--node", node.url,
            "--model", f"org/local={tmp_path}"], port):
        assert registered(node) == ["org/local"]
