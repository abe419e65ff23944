"""The node's control calls to a replica (`store.standby.ReplicaControl`) and the engine key, in
process against a real HTTP server on loopback.

`GpuReplicaStandIn` stands in for a vLLM replica on a GPU, which this machine has not: vLLM's
CPU worker ignores sleep mode (and refuses `--enable-sleep-mode`), so the sleeping-standby
sequence can only be checked call by call here. It answers the routes the node uses as vLLM
0.32 does and records every call. The real CPU sequence (no sleep) runs against real vLLM in
test_standby.py and test_swap.py.
"""

from __future__ import annotations

import json
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from sllm_plugin import convert
from sllm_plugin.store.standby import (
    ReplicaControl,
    SwapFailed,
    engine_key,
    sleeps,
    split_flags,
    takes_swaps,
)

CONTROL = "control-key-of-the-stand-in-0123"


class GpuReplicaStandIn:
    """A stand-in for a vLLM GPU replica's control routes (see the module docstring)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict]] = []
        self.rpc_answer: dict = {"results": [{"ok": True, "total_s": 0.5, "bytes": 10}]}
        self.rpc_status = 200
        self.reset_answer: dict = {"success": True}
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
                url = urllib.parse.urlsplit(self.path)
                length = int(self.headers.get("content-length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                query = urllib.parse.parse_qs(url.query)
                stand_in.calls.append((url.path, {**query, **body}))
                if self.headers.get("authorization") != f"Bearer {CONTROL}":
                    return self._answer(401, {"error": "key"})
                if url.path == "/collective_rpc":
                    return self._answer(stand_in.rpc_status, stand_in.rpc_answer)
                if url.path == "/reset_prefix_cache":
                    return self._answer(200, stand_in.reset_answer)
                return self._answer(200, {})

            def _answer(self, status: int, payload: dict) -> None:
                raw = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def paths(self) -> list[str]:
        return [path for path, _ in self.calls]


@pytest.fixture
def replica():
    stand_in = GpuReplicaStandIn()
    control = ReplicaControl(stand_in.url, CONTROL)
    yield stand_in, control
    control.close()
    stand_in.server.shutdown()


def test_a_sleeping_standby_wakes_its_weights_before_a_swap_and_its_cache_after(replica):
    stand_in, control = replica
    control.sleep()
    assert stand_in.calls == [("/sleep", {"level": ["1"], "mode": ["abort"]})]
    stand_in.calls.clear()
    report = control.swap("/tier/b", "dram", 60, asleep=True)
    assert stand_in.paths() == ["/wake_up", "/pause", "/collective_rpc", "/wake_up",
                                "/reset_prefix_cache", "/resume"]
    assert stand_in.calls[0][1] == {"tags": ["weights"]}
    assert stand_in.calls[3][1] == {"tags": ["kv_cache"]}
    assert stand_in.calls[2][1] == {"method": "sllm_swap", "args": ["/tier/b"],
                                    "kwargs": {"tier": "dram"}, "timeout": 60}
    assert report.load_s == 0.5 and report.bytes == 10
    stand_in.calls.clear()
    control.wake()  # a claim of a sleeping standby that holds the model
    assert stand_in.calls == [("/wake_up", {})]


def test_awake_swaps_are_the_cpu_sequence(replica):
    stand_in, control = replica
    control.swap("/tier/b", None, 60)
    assert stand_in.paths() == ["/pause", "/collective_rpc", "/reset_prefix_cache", "/resume"]
    assert stand_in.calls[1][1]["kwargs"] == {"tier": "disk"}


@pytest.mark.parametrize("answer, status, intact", [
    ({"results": [{"ok": False, "error": "refused", "broken": None}]}, 200, True),
    ({"results": [{"ok": False, "error": "half way", "broken": "b: IOError"}]}, 200, False),
    # One worker swapped, the other refused: the engine is inconsistent, not intact.
    ({"results": [{"ok": True}, {"ok": False, "error": "x", "broken": None}]}, 200, False),
    ({"results": []}, 200, False),
    ({"detail": "boom"}, 500, False),
])
def test_failed_swaps_say_whether_the_old_weights_are_intact(replica, answer, status, intact):
    stand_in, control = replica
    stand_in.rpc_answer, stand_in.rpc_status = answer, status
    with pytest.raises(SwapFailed) as failed:
        control.swap("/tier/b", "dram", 60)
    assert failed.value.intact is intact
    assert "/resume" not in stand_in.paths()  # a failed swap is never resumed here


def test_a_prefix_cache_that_will_not_clear_fails_the_swap(replica):
    stand_in, control = replica
    stand_in.reset_answer = {"success": False}
    with pytest.raises(SwapFailed, match="prefix cache") as failed:
        control.swap("/tier/b", "dram", 60)
    assert failed.value.intact is False and "/resume" not in stand_in.paths()


def test_a_replica_that_is_gone_fails_the_call_not_the_node():
    control = ReplicaControl("http://127.0.0.1:9", CONTROL, timeout_s=2)
    with pytest.raises(SwapFailed, match="setting the model") as failed:
        control.hold("m")
    assert failed.value.intact is False


def test_sleep_mode_is_for_gpu_replicas_that_asked_for_it():
    assert sleeps(["--enable-sleep-mode"], cuda=True)
    assert not sleeps(["--enable-sleep-mode"], cuda=False)
    assert not sleeps(["--enforce-eager"], cuda=True)


def test_the_engine_key_ignores_placement_flags_and_keeps_every_other(tmp_path: Path):
    from sllm_plugin.testing import make_random_model

    a = convert(make_random_model(tmp_path / "a", "tiny-llama", seed=1), tmp_path / "a.s",
                quiet=True)
    b = convert(make_random_model(tmp_path / "b", "tiny-llama", seed=2), tmp_path / "b.s",
                quiet=True)
    c = convert(make_random_model(tmp_path / "c", "tiny-llama", seed=3, rope_theta=5000.0),
                tmp_path / "c.s", quiet=True)
    base = ["python", "-m", "vllm", "--enforce-eager", "--max-model-len", "256"]
    key = engine_key(a, [*base, "--port", "1", "--model", str(a), "--served-model-name", "a",
                         "--model-loader-extra-config", '{"tier": "dram"}'])
    assert key is not None
    assert engine_key(b, [*base, "--port", "2", "--model", str(b), "--served-model-name=b",
                          "--model-loader-extra-config", '{"tier": "ssd"}']) == key
    assert engine_key(c, base) != engine_key(a, base)  # another shape (one config field)
    for other in (["--max-model-len", "512"], ["--chat-template", "/x.jinja"],
                  ["--seed", "1"], ["--enable-lora"]):
        assert engine_key(a, [*base, *other]) != engine_key(a, base), other
    assert engine_key(tmp_path / "nothing", base) is None
    assert takes_swaps(a) and not takes_swaps(tmp_path / "nothing")
    assert split_flags(["cmd", "--a", "1", "--b=2", "--c", "--d", "x"]) == [
        ("", "cmd"), ("--a", "1"), ("--b", "2"), ("--c", None), ("--d", "x")]
