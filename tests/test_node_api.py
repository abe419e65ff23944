"""The node daemon's API guards: tokens, the Host header, body limits, replica flags, what reads
show, a stuck fetch, and its private state directory held by one daemon.

Real daemons on loopback, real files and processes; replicas here need only their command line,
so their command is tests/argv_replica.py (real vLLM replicas are in test_node.py).
"""

from __future__ import annotations

import json
import os
import socket
import stat
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import yaml
from conftest import run_cli
from node_daemon import TOKEN, NodeDaemon, write_token_file
from vllm_server import free_port

from sllm_plugin.configfile import ConfigError
from sllm_plugin.store.config import load_config

HERE = Path(__file__).resolve().parent
ARGV_REPLICA = [sys.executable, str(HERE / "argv_replica.py")]
OPERATOR_SECRET = "operator-secret-api-key-42"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from sllm_plugin.testing import make_random_model

    return make_random_model(tmp_path_factory.mktemp("api-models") / "m0", "tiny-llama", seed=0)


def small_config(tmp_path: Path, **extra) -> dict:
    """A node with an ssd tier only, one CPU device, a tiny calibration."""
    return {"ssd": {"path": str(tmp_path / "ssd"), "capacity": 10**9}, "dram": None,
            "devices": ["cpu:0"], "calibration_bytes": 1024 * 1024, **extra}


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def node_cli(tmp_path: Path, *args: str, env: dict | None = None):
    """`sllm node` that must refuse to start: run with a port and a short timeout."""
    return run_cli("node", "--port", str(free_port()), "--no-calibrate",
                   "--ssd-dir", str(tmp_path / "ssd"), "--devices", "cpu:0", *args,
                   env=env, timeout=60)


# -- tokens ---------------------------------------------------------------------------------


def test_with_no_token_configured_the_node_makes_one_and_mutating_calls_need_it(
        tmp_path, monkeypatch):
    monkeypatch.delenv("SLLM_NODE_TOKEN", raising=False)
    config = small_config(tmp_path, token_file=None)
    state = tmp_path / "state"
    with NodeDaemon(tmp_path, config) as node:
        token_path = state / "token"
        assert mode(token_path) == 0o600 and mode(state) == 0o700
        assert mode(state / "logs") == 0o700
        body = {"name": "org/x", "source": str(tmp_path)}
        r = node.call("POST", "/models", body, token=None)
        assert r.status_code == 401 and "sllm node-token" in r.json()["error"]["message"]
        assert node.call("POST", "/models", body, token=TOKEN).status_code == 403
        printed = run_cli("node-token", "--state-dir", str(state), timeout=60)
        assert printed.returncode == 0, printed.stderr
        token = printed.stdout.strip()
        assert token == token_path.read_text().strip() and len(token) >= 32
        assert node.call("POST", "/models", body, token=token).status_code == 201
        assert mode(state / "models.json") == 0o600
    log = node.log_path.read_text()
    assert str(token_path) in log and token not in log
    with NodeDaemon(tmp_path, config) as node:  # the same token after a restart
        assert node.call("POST", "/pin", {"model": "org/x", "tier": "ssd"},
                         token=token).status_code == 404  # authorized; not in the tier
    missing = run_cli("node-token", "--state-dir", str(tmp_path / "none"), timeout=60)
    assert missing.returncode == 1 and "no token at" in missing.stderr


def test_a_token_comes_from_a_file_or_the_environment_never_argv_or_the_configuration(
        tmp_path, monkeypatch):
    secret = "never-on-the-command-line-123"
    r = node_cli(tmp_path, "--state-dir", str(tmp_path / "s1"), "--token", secret)
    assert r.returncode == 2 and "--token-file" in r.stderr and secret not in r.stderr

    config = tmp_path / "node.yaml"
    config.write_text(yaml.safe_dump({"token": secret}))
    r = node_cli(tmp_path, "--state-dir", str(tmp_path / "s2"), "--config", str(config))
    assert r.returncode == 2 and "token_file" in r.stderr and secret not in r.stderr

    loose = write_token_file(tmp_path / "loose.token")
    loose.chmod(0o644)
    r = node_cli(tmp_path, "--state-dir", str(tmp_path / "s3"), "--token-file", str(loose))
    assert r.returncode == 2 and "readable or writable by others" in r.stderr, r.stderr

    monkeypatch.setenv("SLLM_NODE_TOKEN", "from-the-environment-0123")
    with NodeDaemon(tmp_path, small_config(tmp_path, token_file=None)) as node:
        body = {"name": "org/x", "source": str(tmp_path)}
        assert node.call("POST", "/models", body, token=TOKEN).status_code == 403
        assert node.call("POST", "/models", body,
                         token="from-the-environment-0123").status_code == 201
        assert not (tmp_path / "state" / "token").exists()


# -- the Host header and the body limit ------------------------------------------------------


def test_a_request_naming_a_foreign_host_is_refused(tmp_path):
    config = small_config(tmp_path, allowed_hosts=["node.example", "*.lab.example"])
    with NodeDaemon(tmp_path, config) as node:
        port = node.config["port"]
        for host in ("evil.example", f"evil.example:{port}", "node.example.evil", "lab.example",
                     "a:b:c", "[not-an-ip]:80"):
            r = node.client.get("/status", headers={"Host": host})
            assert r.status_code == 400, (host, r.text)
            assert r.json()["error"]["type"] == "invalid_host", r.text
            assert "allowed_hosts" in r.json()["error"]["message"]
        r = node.call("POST", "/models", {"name": "org/x", "source": str(tmp_path)},
                      headers={"Host": "evil.example"})
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_host"
        for host in (f"localhost:{port}", f"127.0.0.1:{port}", "10.1.2.3", f"[::1]:{port}",
                     "node.example", "NODE.example.", "a.lab.example", socket.gethostname()):
            r = node.client.get("/status", headers={"Host": host})
            assert r.status_code == 200, (host, r.text)


def test_a_large_body_is_refused_before_it_is_parsed_or_the_token_checked(tmp_path):
    with NodeDaemon(tmp_path, small_config(tmp_path, max_body_bytes=4096)) as node:
        big = json.dumps({"model": "org/m0", "pad": "x" * 8000}).encode()
        for token in (None, TOKEN):
            headers = {"Content-Type": "application/json",
                       **({"Authorization": f"Bearer {token}"} if token else {})}
            r = node.client.post("/prefetch", content=big, headers=headers)
            assert r.status_code == 413, r.text
            assert r.json()["error"] == {"message": "request body larger than 4096 bytes",
                                         "type": "body_too_large"}

            def chunks():  # no Content-Length: the limit holds as the body streams
                for _ in range(16):
                    yield b"x" * 1024

            r = node.client.post("/prefetch", content=chunks(), headers=headers)
            assert r.status_code == 413, r.text
        # Under the limit, the body is parsed as before (and a bad one is a 400, not a 413).
        r = node.call("POST", "/prefetch", {"model": "org/unknown"})
        assert r.status_code == 404, r.text
        r = node.client.post("/prefetch", content=b"{", headers={
            "Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
        assert r.status_code == 400 and "malformed JSON" in r.text
        assert node.client.get("/health").status_code == 200


# -- replica flags ------------------------------------------------------------------------


def test_replica_flags_from_the_api_are_allowlisted_and_the_operators_flags_win(
        tmp_path, model_dir):
    argv_out = tmp_path / "argv.json"
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    # An entry an older daemon saved from POST /models before flags were checked.
    (state / "models.json").write_text(json.dumps({"org/planted": {
        "source": str(model_dir), "revision": None, "replica_args": ["--trust-remote-code"]}}))
    config = small_config(
        tmp_path, replica_command=ARGV_REPLICA, replica_env={"ARGV_OUT": str(argv_out)},
        replica_args=["--max-model-len", "256", "--hf-token", OPERATOR_SECRET],
        models={"org/m0": {"source": str(model_dir), "replica_args": ["--trust-remote-code"]}})
    refused = [
        (["--host", "0.0.0.0"], "--host"), (["--port=1"], "--port"),
        (["--model", "/etc"], "--model"), (["--trust-remote-code"], "--trust-remote-code"),
        (["--served-model-name", "x"], "--served-model-name"), (["--config", "x"], "--config"),
        (["--middleware", "os.system"], "--middleware"), (["--api-key", "k"], "--api-key"),
        (["--load-format", "dummy"], "--load-format"), (["--hos", "0.0.0.0"], "--hos"),
        (["--max_model_len", "8"], "--max_model_len"), (["/etc/passwd"], "'/etc/passwd'"),
        (["--max-model-len", "--host"], "is not a valid value"),
        (["--max-num-seqs"], "needs a value"), (["--enforce-eager=yes"], "takes no value"),
        (["--dtype", "float16; rm"], "is not a valid value"),
    ]
    with NodeDaemon(tmp_path, config) as node:
        for args, needle in refused:
            r = node.call("POST", "/replicas", {"model": "org/m0", "args": args})
            assert r.status_code == 400, (args, r.text)
            assert needle in r.json()["error"]["message"], (args, r.text)
        r = node.call("POST", "/models", {"name": "org/m1", "source": str(model_dir),
                                          "replica_args": ["--trust-remote-code"]})
        assert r.status_code == 400 and "--trust-remote-code" in r.text
        r = node.call("POST", "/replicas", {"model": "org/planted"})
        assert r.status_code == 400, r.text
        assert "org/planted's replica_args: --trust-remote-code" in r.json()["error"]["message"]
        assert node.ok("GET", "/replicas") == [] and not argv_out.exists()
        assert node.status()["devices"] == [{"name": "cpu:0", "replica": None}]

        node.ok("POST", "/models", {"name": "org/m1", "source": str(model_dir),
                                    "replica_args": ["--seed", "7"]})
        r = node.call("POST", "/replicas", {"model": "org/m1", "wait": True,
                                            "args": ["--max-model-len=512", "--enforce-eager"]})
        assert r.status_code == 422 and "exited with code 3" in r.text
        argv = json.loads(argv_out.read_text())
        # The caller's flags first (the model's, then the call's), then the operator's,
        # then the daemon's own: vLLM keeps the last value of a flag.
        assert argv[:6] == ["--seed", "7", "--max-model-len=512", "--enforce-eager",
                            "--max-model-len", "256"]
        assert argv.index("--port") > argv.index("--hf-token") and "--trust-remote-code" not in argv
        assert argv[argv.index("--host") + 1] == "127.0.0.1"
        # The replica guard is the daemon's own flag (its keys go in the environment).
        assert argv[argv.index("--middleware") + 1] == "sllm_plugin.vllm.guard.ReplicaGuard"

        r = node.call("POST", "/replicas", {"model": "org/m0", "wait": True})
        assert r.status_code == 422
        argv = json.loads(argv_out.read_text())  # the configuration's model flags are trusted
        assert argv.index("--hf-token") < argv.index("--trust-remote-code") < argv.index("--model")
        # No secret in what the daemon writes or shows: the log's command line and the
        # replica's own output (vLLM prints its arguments) have it masked.
        log = Path(node.ok("GET", "/replicas")[-1]["log"])
        text = log.read_text()
        assert OPERATOR_SECRET not in text and "--hf-token ***" in text.splitlines()[0]
        assert mode(log) == 0o600
        assert OPERATOR_SECRET not in r.text
        pids = (state / "logs" / "replica-pids.json").read_text()
        assert OPERATOR_SECRET not in pids
    assert OPERATOR_SECRET not in node.log_path.read_text()


def test_unauthenticated_reads_show_no_replica_flags_and_no_url_credentials(tmp_path):
    url = "https://models.example:8443/ckpt/m0?X-Amz-Signature=abc123#frag"
    config = small_config(tmp_path, models={
        "org/m0": {"source": url, "replica_args": ["--hf-token", OPERATOR_SECRET]}})
    with NodeDaemon(tmp_path, config) as node:
        for path in ("/models", "/status"):
            text = node.client.get(path).text
            for secret in (OPERATOR_SECRET, "replica_args", "abc123", "frag"):
                assert secret not in text, (path, secret)
        assert node.client.get("/models").json() == {
            "org/m0": {"source": "https://models.example:8443/ckpt/m0", "revision": None}}
    # Credentials in a URL would be named in jobs and errors: refused, and never echoed.
    config["models"]["org/m0"]["source"] = "https://user:pass-word-1@models.example/ckpt/m0"
    config_path = tmp_path / "creds.yaml"
    config_path.write_text(yaml.safe_dump(config))
    r = node_cli(tmp_path, "--state-dir", str(tmp_path / "creds-state"), "--config",
                 str(config_path))
    assert r.returncode == 2 and "may not carry credentials" in r.stderr, r.stderr
    assert "pass-word-1" not in r.stderr + r.stdout


def test_the_api_allowlist_takes_only_listed_flags_with_values_of_their_shape():
    from sllm_plugin.store.replicaargs import ReplicaArgsError, check_api_args, redact

    ok = ["--enforce-eager", "--no-enable-prefix-caching", "--max-model-len", "1k",
          "--max-num-seqs=8", "--dtype", "bfloat16", "--gpu-memory-utilization", "0.5",
          "--seed", "-1", "--kv-cache-dtype", "fp8_e5m2", "--quantization", "fp8"]
    assert check_api_args(ok, "args") == ok
    for bad in (["--trust-remote-code"], ["--tokenizer", "/x"], ["--hf-overrides", "{}"],
                ["--seed", "1e9"], ["--dtype", "int4"], ["--quantization", "../x"],
                ["--max-model-len", "\n"], ["-q", "fp8"], ["--no-trust-remote-code"]):
        with pytest.raises(ReplicaArgsError, match="args: "):
            check_api_args(bad, "args")
    shown, hidden = redact(["vllm", "--api-key", "k-12345", "--hf-token=t-12345",
                            "--max-num-batched-tokens", "64", "--ssl-keyfile", "/k"])
    assert shown == ["vllm", "--api-key", "***", "--hf-token=***",
                     "--max-num-batched-tokens", "64", "--ssl-keyfile", "/k"]
    assert hidden == ["k-12345", "t-12345"]


# -- a stuck fetch ---------------------------------------------------------------------------


class DrippingServer:
    """Accepts, answers 200 with a large Content-Length, then sends one byte every 0.2 s
    until closed: a download that never ends and never times out."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/m0"
        self.closed = threading.Event()
        self.connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._drip, args=(conn,), daemon=True).start()

    def _drip(self, conn: socket.socket) -> None:
        with conn:
            try:
                conn.recv(65536)
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n")
                while not self.closed.wait(0.2):  # the server's pace, not a synchronization
                    conn.sendall(b" ")
            except OSError:
                return

    def close(self) -> None:
        self.closed.set()
        self.sock.close()


def test_a_stuck_fetch_holds_up_neither_the_api_nor_a_wait_past_its_timeout(tmp_path):
    remote = DrippingServer()
    config = small_config(tmp_path, models={"org/stuck": {"source": remote.url}})
    try:
        with NodeDaemon(tmp_path, config) as node:
            client = httpx.Client(base_url=node.url, timeout=30,
                                  headers={"Authorization": f"Bearer {TOKEN}"})
            started = time.monotonic()
            r = client.post("/prefetch", json={"model": "org/stuck"})
            assert r.status_code == 202 and time.monotonic() - started < 10, r.text
            job = r.json()
            started = time.monotonic()
            r = client.post("/prefetch", json={"model": "org/stuck", "wait": True,
                                               "timeout_s": 1})
            assert r.status_code == 202 and r.json()["id"] == job["id"], r.text
            assert r.json()["state"] == "running" and time.monotonic() - started < 10

            # Many waiting calls at once (more than FastAPI's 40 worker threads): reads still
            # answer at once, and each wait ends at its timeout.
            with ThreadPoolExecutor(60) as pool:
                waits = [pool.submit(client.post, "/prefetch", json={
                    "model": "org/stuck", "wait": True, "timeout_s": 8}) for _ in range(60)]
                for path in ("/health", "/status", "/models", f"/jobs/{job['id']}"):
                    started = time.monotonic()
                    assert httpx.get(node.url + path, timeout=30).status_code == 200
                    assert time.monotonic() - started < 2, path
                assert [w.result().status_code for w in waits] == [202] * 60
            assert node.tier("ssd")["queue"][0]["state"] == "running"
            client.close()
    finally:
        remote.close()


# -- the state directory ---------------------------------------------------------------------


def test_the_state_directory_is_private_and_held_by_one_daemon(tmp_path):
    state = tmp_path / "state"
    state.mkdir(mode=0o755)
    state.chmod(0o755)  # as older versions left it
    config = small_config(tmp_path)
    with NodeDaemon(tmp_path, config) as first:
        assert mode(state) == 0o700
        second = NodeDaemon(tmp_path, {**config, "port": free_port()}, name="second")
        second.config_path.write_text(yaml.safe_dump({**second.config,
                                                      "state_dir": str(state)}))
        with pytest.raises(RuntimeError, match="exited with 2"):
            second.start()
        message = second.log_tail()
        assert f"the state directory {state} is in use by another node daemon (pid " \
               f"{first.proc.pid})" in message, message
        assert first.client.get("/health").status_code == 200

    shared = tmp_path / "shared"
    shared.mkdir(mode=0o770)
    shared.chmod(0o770)
    r = node_cli(tmp_path, "--state-dir", str(shared))
    assert r.returncode == 2 and "writable by group or others (mode 0770)" in r.stderr
    (tmp_path / "link").symlink_to(state)
    r = node_cli(tmp_path, "--state-dir", str(tmp_path / "link"))
    assert r.returncode == 2 and "is a symbolic link" in r.stderr
    if os.geteuid() == 0:  # only root can give a directory away
        foreign = tmp_path / "foreign"
        foreign.mkdir(mode=0o700)
        os.chown(foreign, 65534, 65534)
        r = node_cli(tmp_path, "--state-dir", str(foreign))
        assert r.returncode == 2 and "belongs to uid 65534" in r.stderr


def test_state_files_are_written_privately_and_never_through_links(tmp_path, model_dir):
    state = tmp_path / "state"
    (state / "logs").mkdir(parents=True, mode=0o700)
    state.chmod(0o700)
    victim = tmp_path / "victim"
    victim.write_text("not the daemon's")
    (state / "models.json").symlink_to(victim)
    (state / "logs" / "replica-1.log").symlink_to(victim)
    config = small_config(tmp_path, replica_command=[str(tmp_path / "no-such-vllm")],
                          models={"org/m0": {"source": str(model_dir)}})
    with NodeDaemon(tmp_path, config) as node:
        node.ok("POST", "/models", {"name": "org/m1", "source": str(model_dir)})
        r = node.call("POST", "/replicas", {"model": "org/m0", "wait": True})
        assert r.status_code == 422 and "cannot be started" in r.text
        log = Path(node.ok("GET", "/replicas")[0]["log"])
    assert victim.read_text() == "not the daemon's"
    for path in (state / "models.json", log):
        assert stat.S_ISREG(os.lstat(path).st_mode) and mode(path) == 0o600, path
    assert json.loads((state / "models.json").read_text()) == {
        "org/m1": {"source": str(model_dir), "revision": None, "replica_args": []}}
    assert [p.name for p in state.iterdir() if p.name.endswith(".tmp")] == []


# -- configuration errors --------------------------------------------------------------------


def test_a_bad_value_is_not_buried_under_the_list_of_valid_keys(tmp_path):
    with pytest.raises(ConfigError) as bad_device:
        load_config(None, devices=["gpu0"], **{"ssd.path": str(tmp_path)})
    assert "invalid device 'gpu0'" in str(bad_device.value)
    assert "valid keys" not in str(bad_device.value)
    with pytest.raises(ConfigError) as unknown:
        load_config(None, devices=["cpu:0"], bogus=1, **{"ssd.path": str(tmp_path)})
    assert "bogus: Extra inputs are not permitted (valid keys here: host, port" in str(
        unknown.value)
    with pytest.raises(ConfigError, match=r"models.org/m.nope: .* \(valid keys here: source, "
                                          r"revision, replica_args\)"):
        load_config(None, models={"org/m": {"source": "x", "nope": 1}},
                    **{"ssd.path": str(tmp_path)})


def test_a_cpu_replica_nobody_sized_gets_a_small_kv_cache_others_keep_theirs(tmp_path,
                                                                           monkeypatch):
    """vLLM's CPU default (0.92 of the NUMA node) fails where the node is smaller than the
    machine; the operator's or the caller's sizing always wins."""
    from sllm_plugin.store.replicas import CPU_KV_CACHE_GIB, Launcher, Replica, parse_device

    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    cpu = Replica(model="org/m", devices=[parse_device("cpu:0")])
    gpu = Replica(model="org/m", devices=[parse_device("cuda:0")])

    def env(replica, argv=(), configured=None):
        launcher = Launcher(["true"], [], configured or {}, tmp_path / "logs", 1, 1)
        return launcher.environment(replica, list(argv)).get("VLLM_CPU_KVCACHE_SPACE")

    assert env(cpu) == str(CPU_KV_CACHE_GIB)
    assert env(cpu, configured={"VLLM_CPU_KVCACHE_SPACE": "8"}) == "8"
    assert env(cpu, ["--gpu-memory-utilization", "0.5"]) is None
    assert env(cpu, ["--kv-cache-memory-bytes=2G"]) is None
    assert env(gpu) is None
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "3")
    assert env(cpu) == "3"


def test_a_replica_that_fails_reports_the_root_cause_from_its_whole_output(tmp_path, model_dir):
    """A replica command replaying a real vLLM 0.32 failed start (tests/data): the engine
    core's ValueError is printed 90 lines before the end, where only the API server's wrapper
    ("See root cause above") is; the node's error names the ValueError all the same."""
    replay = ("import sys; sys.stdout.write(open(sys.argv[1]).read()); sys.stdout.flush(); "
              "sys.exit(1)")
    config = small_config(
        tmp_path, models={"org/m0": {"source": str(model_dir)}},
        replica_command=[sys.executable, "-c", replay, str(HERE / "data" /
                                                            "vllm_engine_failure.log")])
    with NodeDaemon(tmp_path, config) as node:
        r = node.call("POST", "/replicas", {"model": "org/m0", "wait": True, "timeout_s": 120})
        assert r.status_code == 422, r.text
        message = r.json()["error"]["message"]
        first, cause = message.splitlines()[:2]
        assert first == "replica exited with code 1 before it was ready. Root cause:"
        assert cause.startswith("ValueError: To serve at least one request with the model's "
                                "max seq len (2048)"), message
        assert "Last output:" in message and "See root cause above" in message
