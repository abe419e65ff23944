"""Start and stop real vLLM OpenAI servers (CPU backend) on loopback for the tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx

START_TIMEOUT = 300.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vllm_env(cache_dir: Path | None = None) -> dict[str, str]:
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "VLLM_LOGGING_LEVEL": "INFO"}
    if cache_dir is not None:
        env["SLLM_CACHE_DIR"] = str(cache_dir)
    return env



def wait_healthy(url: str, proc: subprocess.Popen, timeout: float, name: str,
                 describe: Callable[[], str], interval: float = 0.2) -> None:
    """Poll `url`/health until it answers 200. RuntimeError at once if `proc` exits,
    TimeoutError after `timeout`; both end with `describe()` (a log tail, a log path)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}:\n{describe()}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(interval)  # polling interval for a condition checked each round
    raise TimeoutError(f"{name} not ready after {timeout} s:\n{describe()}")

class VllmServer:
    """One `python -m vllm.entrypoints.openai.api_server` process (the command that works with
    the vllm-cpu package, whose `vllm` console script is broken)."""

    def __init__(self, model: str | Path, log: Path, *args: str,
                 cache_dir: Path | None = None) -> None:
        self.model = str(model)
        self.port = free_port()
        self.log_path = log
        self._log = open(log, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", self.model,
             "--host", "127.0.0.1", "--port", str(self.port), "--enforce-eager",
             "--max-model-len", "256", "--max-num-seqs", "4", *args],
            stdout=self._log, stderr=subprocess.STDOUT, env=vllm_env(cache_dir),
        )
        self.url = f"http://127.0.0.1:{self.port}"

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        """Poll /health until it answers; fail at once if the process exits."""
        wait_healthy(self.url, self.proc, timeout, "vLLM", self.log_tail, interval=0.5)

    def wait_exit(self, timeout: float = START_TIMEOUT) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self.stop()

    def complete(self, prompt: str, max_tokens: int = 16) -> tuple[list[int], list[int]]:
        """Greedy completion: (prompt token ids, generated token ids)."""
        r = httpx.post(f"{self.url}/v1/completions", timeout=120, json={
            "model": self.model, "prompt": prompt, "max_tokens": max_tokens,
            "temperature": 0, "return_token_ids": True, "ignore_eos": True,
        })
        r.raise_for_status()
        choice = r.json()["choices"][0]
        return choice["prompt_token_ids"], choice["token_ids"]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()

    def __enter__(self) -> VllmServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
