"""Run a real `sllm node` daemon process on loopback for the tests, and a gated HTTP source."""

from __future__ import annotations

import collections
import contextlib
import http.server
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import yaml
from vllm_server import free_port, vllm_env, wait_healthy

TOKEN = "test-token-of-the-tests"  # tokens are 16 characters at least (sllm_plugin.tokens)


def write_token_file(path: Path, token: str = TOKEN) -> Path:
    """A token file as the daemons want it: 0600, this user's."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return path


class ServiceProcess:
    """A daemon started as `python -m sllm_plugin.cli ARGS`, ready once /health answers.

    `prefix` runs it through another command (`ip netns exec NS`: on a namespace host, see
    tests/netns.py), where it is reached at `address`."""

    def __init__(self, workdir: Path, name: str, argv: list[str], port: int,
                 address: str = "127.0.0.1", prefix: list[str] | None = None) -> None:
        self.workdir, self.argv, self.prefix = workdir, argv, list(prefix or [])
        self.log_path = workdir / f"{name}.log"
        self.url = f"http://{address}:{port}"
        self.proc: subprocess.Popen | None = None
        self.client = httpx.Client(base_url=self.url, timeout=600)

    def start(self, timeout: float = 120):
        log = open(self.log_path, "a")  # noqa: SIM115 - the child holds it
        self.proc = subprocess.Popen([*self.prefix, sys.executable, "-m", "sllm_plugin.cli",
                                      *self.argv],
                                     stdout=log, stderr=subprocess.STDOUT, env=vllm_env())
        log.close()
        wait_healthy(self.url, self.proc, timeout, self.argv[0], self.log_tail)
        return self

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def call(self, method: str, path: str, body: dict | None = None,
             token: str | None = TOKEN, headers: dict | None = None,
             **kwargs) -> httpx.Response:
        headers = {**({"Authorization": f"Bearer {token}"} if token else {}), **(headers or {})}
        return self.client.request(method, path, json=body, headers=headers, **kwargs)

    def ok(self, method: str, path: str, body: dict | None = None) -> dict:
        r = self.call(method, path, body)
        assert r.status_code < 300, f"{method} {path} -> {r.status_code}: {r.text}"
        return r.json()

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
        self.client.close()


class NodeDaemon(ServiceProcess):
    """`sllm node --config CONFIG` with its log in the test's directory; its token is TOKEN,
    from a token file (`token_file: None` in `config`: the daemon makes its own)."""

    def __init__(self, workdir: Path, config: dict, name: str = "node",
                 prefix: list[str] | None = None) -> None:
        token_file = write_token_file(workdir / f"{name}.token")
        self.config = {"host": "127.0.0.1", "port": free_port(), "token_file": str(token_file),
                       "state_dir": str(workdir / f"{name}-state" if name != "node"
                                        else workdir / "state"), **config}
        self.config_path = workdir / f"{name}.yaml"
        self.config_path.write_text(yaml.safe_dump(self.config))
        super().__init__(workdir, name, ["node", "--config", str(self.config_path)],
                         self.config["port"], self.config["host"], prefix)

    def status(self) -> dict:
        return self.ok("GET", "/status")

    def tier(self, name: str) -> dict:
        return next(t for t in self.status()["tiers"] if t["name"] == name)

    def held(self, tier: str) -> list[str]:
        return [m["name"] for m in self.tier(tier)["models"]]

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop the daemon; then make sure none of its replicas outlived it (a failed test
        must not leave vLLM processes behind for the next one)."""
        pids = []
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(httpx.HTTPError, AssertionError):
                pids = [r["pid"] for r in self.ok("GET", "/replicas") if r["pid"]]
        super().stop(sig)
        survivors = [pid for pid in pids if pid_alive(pid)]
        for pid in survivors:
            os.killpg(pid, signal.SIGKILL)
        assert sig == signal.SIGKILL or not survivors, (
            f"replica process(es) {survivors} outlived the node daemon's shutdown")


class RouterProcess(ServiceProcess):
    """`sllm router --config CONFIG`."""

    def __init__(self, workdir: Path, config: dict, name: str = "router",
                 prefix: list[str] | None = None, argv: list[str] | None = None) -> None:
        self.config = {"host": "127.0.0.1", "port": free_port(), "admin_token": TOKEN,
                       "poll_interval_s": 0.5, **config}
        self.config_path = workdir / f"{name}.yaml"
        self.config_path.write_text(yaml.safe_dump(self.config))
        super().__init__(workdir, name, ["router", "--config", str(self.config_path),
                                         *(argv or [])],
                         self.config["port"], self.config["host"], prefix)


class GatedCheckpointServer:
    """A real HTTP server (loopback) serving a directory, counting requests per file.

    While `gate` is closed, each data file's download stops half way (after setting
    `half_sent`) until the gate opens: a download that is reliably in progress, without sleeps.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.requests: collections.Counter[str] = collections.Counter()
        self.half_sent = threading.Event()
        self.gate = threading.Event()
        self.gate.set()
        outer = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, directory=str(directory), **kwargs)

            def log_message(self, *args):
                pass

            def copyfile(self, source, outputfile):
                name = self.path.lstrip("/")
                outer.requests[name] += 1
                if not name.endswith(".bin") or outer.gate.is_set():
                    return super().copyfile(source, outputfile)
                data = source.read()
                outputfile.write(data[: len(data) // 2])
                outputfile.flush()
                outer.half_sent.set()
                outer.gate.wait(120)
                outputfile.write(data[len(data) // 2 :])

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> GatedCheckpointServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.gate.set()
        self.server.shutdown()
        self.server.server_close()


def poll_until(what: str, check, timeout: float = 600, interval: float = 0.5):
    """Call `check()` until it returns something true, and return that; TimeoutError naming
    `what` after `timeout`. For a daemon's state read over HTTP: the check decides, the
    interval only paces the polls."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out waiting for {what}")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
