"""The node daemon (`sllm node`): a real daemon process on loopback, real files, real vLLM.

Tier fill and LRU eviction, pinning, promotion, restart rediscovery, a download killed half
way, two concurrent prefetches of one model, every bad input, and a real vLLM replica started
from the DRAM tier answering a completion.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import uuid
from pathlib import Path

import httpx
import pytest
from conftest import assert_bit_equal, mount_or_skip, unmount
from node_daemon import TOKEN, GatedCheckpointServer, NodeDaemon
from vllm_server import free_port

from sllm_plugin import convert, load_state_dict
from sllm_plugin.store.config import ConfigError, load_config
from sllm_plugin.store.replicas import cpu_cores, detect_devices, parse_device
from sllm_plugin.store.tiers import directory_bytes

REPLICA_ARGS = ["--enforce-eager", "--max-model-len", "256", "--max-num-seqs", "4"]


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    """Three tiny Llamas of equal size (safetensors, made offline), different weights."""
    from sllm_plugin.testing import make_random_model

    root = tmp_path_factory.mktemp("node-models")
    return {f"org/m{i}": make_random_model(root / f"m{i}", "tiny-llama", seed=i)
            for i in range(3)}


@pytest.fixture(scope="module")
def checkpoint_bytes(sources, tmp_path_factory) -> int:
    """What one model takes in a tier (measured on a real conversion)."""
    out = convert(sources["org/m0"], tmp_path_factory.mktemp("size") / "m0", quiet=True)
    return directory_bytes(out)


@pytest.fixture
def dram_dir():
    """A DRAM tier in real shared memory, removed afterwards."""
    shm = Path("/dev/shm")
    if not shm.is_dir():
        pytest.skip("no /dev/shm on this machine")
    path = shm / f"sllm-test-{uuid.uuid4().hex[:8]}"
    yield path
    shutil.rmtree(path, ignore_errors=True)


def node_config(tmp_path: Path, dram_dir: Path, sources: dict[str, Path], ssd_bytes: int,
                dram_bytes: int, **extra) -> dict:
    return {
        "dram": {"path": str(dram_dir), "capacity": dram_bytes},
        "ssd": {"path": str(tmp_path / "ssd"), "capacity": ssd_bytes},
        "devices": [detect_devices()[0].name],
        "calibration_bytes": 32 * 1024 * 1024,
        "models": {name: {"source": str(src)} for name, src in sources.items()},
        "replica_args": REPLICA_ARGS,
        **extra,
    }


def assert_same_model(tier_copy: Path, source: Path) -> None:
    from safetensors.torch import load_file

    expected = {}
    for f in sorted(source.glob("*.safetensors")):
        expected.update(load_file(f))
    assert_bit_equal(expected, load_state_dict(tier_copy))
    assert (tier_copy / "config.json").read_bytes() == (source / "config.json").read_bytes()


def test_status_shows_tiers_devices_bandwidths_and_the_openapi_schema(
        tmp_path, dram_dir, sources, checkpoint_bytes):
    config = node_config(tmp_path, dram_dir, sources, 10 * checkpoint_bytes, 10 * checkpoint_bytes)
    with NodeDaemon(tmp_path, config) as node:
        status = node.status()
        assert [d["name"] for d in status["devices"]] == config["devices"]
        tiers = {t["name"]: t for t in status["tiers"]}
        assert tiers["dram"]["path"] == str(dram_dir)
        assert tiers["ssd"]["capacity_bytes"] == 10 * checkpoint_bytes
        for tier in tiers.values():
            assert tier["calibrated_gbps"] > 0 and tier["read_gbps"] == tier["calibrated_gbps"]
            assert tier["models"] == [] and tier["queue"] == [] and tier["queue_drain_s"] == 0
        assert sorted(status["models"]) == sorted(sources)
        schema = node.client.get("/openapi.json").json()
        for path in ("/status", "/prefetch", "/promote", "/evict", "/pin", "/replicas",
                     "/replicas/{replica_id}", "/models"):
            assert path in schema["paths"], path


def test_a_dram_tier_on_huge_pages_is_mounted_by_the_node_and_kept_across_restarts(
        tmp_path, sources, checkpoint_bytes):
    unmount(mount_or_skip("tmpfs", tmp_path / "probe"))  # skips where mounting is not allowed
    dram = tmp_path / "huge-dram"
    config = node_config(tmp_path, dram, sources, 10 * checkpoint_bytes, 10 * checkpoint_bytes)
    config["dram"]["huge_pages"] = True
    try:
        with NodeDaemon(tmp_path, config) as node:
            tiers = {t["name"]: t for t in node.status()["tiers"]}
            assert tiers["dram"]["huge_pages"] is True and tiers["ssd"]["huge_pages"] is False
            node.ok("POST", "/prefetch", {"model": "org/m0", "tier": "dram", "wait": True})
            assert_same_model(dram / "org--m0", sources["org/m0"])
        with NodeDaemon(tmp_path, config) as node:  # the mount, and what it holds, stay
            assert node.held("dram") == ["org/m0"]
            assert node.tier("dram")["huge_pages"] is True
    finally:
        unmount(dram)


def test_fill_lru_eviction_pinning_promotion_and_restart(
        tmp_path, dram_dir, sources, checkpoint_bytes):
    # Room for two models in the ssd tier and one in the dram tier.
    config = node_config(tmp_path, dram_dir, sources, int(2.5 * checkpoint_bytes),
                         int(1.5 * checkpoint_bytes))
    ssd = tmp_path / "ssd"
    with NodeDaemon(tmp_path, config) as node:
        done = node.ok("POST", "/prefetch", {"model": "org/m0", "wait": True})
        assert done["state"] == "present" and done["transfer_s"] > 0
        assert_same_model(ssd / "org--m0", sources["org/m0"])
        node.ok("POST", "/prefetch", {"model": "org/m1", "wait": True})
        assert sorted(node.held("ssd")) == ["org/m0", "org/m1"]
        # Present already: nothing is queued.
        assert node.ok("POST", "/prefetch", {"model": "org/m1"}) == {"state": "present"}
        # A third model evicts the least recently used one (m0: fetched first, unused since).
        node.ok("POST", "/prefetch", {"model": "org/m2", "wait": True})
        assert sorted(node.held("ssd")) == ["org/m1", "org/m2"]
        assert not (ssd / "org--m0").exists()
        assert node.status()["transfer_gbps"]["fetch"] > 0  # measured from the real fetches

        # Pinned m1 survives; m2 (the unpinned one) goes when m0 comes back.
        node.ok("POST", "/pin", {"model": "org/m1", "tier": "ssd"})
        node.ok("POST", "/prefetch", {"model": "org/m0", "wait": True})
        assert sorted(node.held("ssd")) == ["org/m0", "org/m1"]
        node.ok("POST", "/pin", {"model": "org/m0", "tier": "ssd"})
        r = node.call("POST", "/prefetch", {"model": "org/m2", "wait": True})
        assert r.status_code == 507, r.text
        assert "only" in r.json()["error"]["message"] and "pinned" in r.json()["error"]["message"]
        r = node.call("POST", "/evict", {"model": "org/m0", "tier": "ssd"})
        assert r.status_code == 409 and "pinned" in r.json()["error"]["message"]

        # Promotion copies the ssd copy into shared memory, byte for byte.
        job = node.ok("POST", "/promote", {"model": "org/m1", "wait": True})
        assert job["state"] == "done" and job["kind"] == "promote"
        assert node.held("dram") == ["org/m1"]
        assert_same_model(dram_dir / "org--m1", sources["org/m1"])
        assert node.status()["transfer_gbps"]["promote"] > 0

        # Unpinned and evicted explicitly.
        node.ok("POST", "/pin", {"model": "org/m0", "tier": "ssd", "pinned": False})
        assert node.ok("POST", "/evict", {"model": "org/m0", "tier": "ssd"})["freed_bytes"] > 0
        assert node.held("ssd") == ["org/m1"]
        before = {t["name"]: t["models"] for t in node.status()["tiers"]}

    # What a dead writer left, and a checkpoint that was damaged while the daemon was down.
    (ssd / ".org--m2.sllm-tmp-999999-deadbeef").mkdir()
    (ssd / ".org--m2.sllm-tmp-999999-deadbeef" / "model-00000.bin").write_bytes(b"x" * 4096)
    broken = shutil.copytree(ssd / "org--m1", ssd / "org--m2")
    data = next(broken.glob("*.bin"))
    with open(data, "r+b") as f:
        f.truncate(data.stat().st_size - 4096)

    with NodeDaemon(tmp_path, config) as node:
        status = {t["name"]: t for t in node.status()["tiers"]}
        assert status["ssd"]["models"] == before["ssd"]  # pins and last use kept
        assert status["dram"]["models"] == before["dram"]
        assert sorted(p.name for p in ssd.iterdir()) == [".sllm-node-state.json", "org--m1"]
        notes = node.status()["notes"]
        assert any("org--m2" in n and "truncated" in n for n in notes), notes
        assert_same_model(dram_dir / "org--m1", sources["org/m1"])


def test_a_download_killed_half_way_leaves_nothing_and_two_prefetches_are_one_download(
        tmp_path, dram_dir, sources, checkpoint_bytes):
    checkpoint = convert(sources["org/m0"], tmp_path / "remote" / "m0", quiet=True)
    config = node_config(tmp_path, dram_dir, {}, 10 * checkpoint_bytes, 10 * checkpoint_bytes)
    ssd = tmp_path / "ssd"
    with GatedCheckpointServer(checkpoint) as remote:
        config["models"] = {"org/remote": {"source": remote.url}}
        remote.gate.clear()
        node = NodeDaemon(tmp_path, config).start()
        try:
            first = node.ok("POST", "/prefetch", {"model": "org/remote"})
            assert remote.half_sent.wait(60)
            second = node.ok("POST", "/prefetch", {"model": "org/remote"})
            assert second["id"] == first["id"] and second["state"] == "running"
            assert [j["id"] for j in node.tier("ssd")["queue"]] == [first["id"]]
            staging = [p.name for p in ssd.iterdir() if ".sllm-tmp-" in p.name]
            assert len(staging) == 1
        finally:
            node.stop(signal.SIGKILL)
        remote.gate.set()

        with NodeDaemon(tmp_path, config) as node:
            assert node.held("ssd") == []
            assert [p.name for p in ssd.iterdir()] == [".sllm-node-state.json"]
            remote.requests.clear()
            remote.gate.clear()  # hold the download until both prefetches are in
            remote.half_sent.clear()
            jobs = [node.ok("POST", "/prefetch", {"model": "org/remote"})]
            assert remote.half_sent.wait(60)
            jobs.append(node.ok("POST", "/prefetch", {"model": "org/remote"}))
            assert jobs[0]["id"] == jobs[1]["id"]
            remote.gate.set()
            node.ok("POST", "/prefetch", {"model": "org/remote", "wait": True})
            assert node.ok("GET", f"/jobs/{jobs[0]['id']}")["state"] == "done"
            assert node.held("ssd") == ["org/remote"]
            data_files = [n for n in remote.requests if n.endswith(".bin")]
            assert data_files and all(remote.requests[n] == 1 for n in data_files)
            assert_same_model(ssd / "org--remote", sources["org/m0"])


def test_a_full_disk_is_a_clear_error_and_leaves_nothing(
        tmp_path, dram_dir, sources, checkpoint_bytes):
    ssd = mount_or_skip("tmpfs", tmp_path / "small-ssd", f"size={checkpoint_bytes // 2},mode=0700")
    try:
        config = node_config(tmp_path, dram_dir, sources, 10 * checkpoint_bytes,
                             10 * checkpoint_bytes)
        config["ssd"]["path"] = str(ssd)  # the tier believes it has room; the disk has not
        with NodeDaemon(tmp_path, config) as node:
            assert any("ssd: bandwidth not calibrated" in n for n in node.status()["notes"])
            r = node.call("POST", "/prefetch", {"model": "org/m0", "wait": True})
            assert r.status_code == 507, r.text
            assert "free on that file system" in r.json()["error"]["message"]
            assert [p.name for p in ssd.iterdir()] == [".sllm-node-state.json"]
            assert node.held("ssd") == [] and node.client.get("/health").status_code == 200
    finally:
        unmount(ssd)


def test_bad_input_gets_a_clear_4xx_and_the_daemon_keeps_serving(
        tmp_path, dram_dir, sources, checkpoint_bytes):
    import torch
    from safetensors.torch import save_file

    big = shutil.copytree(sources["org/m0"], tmp_path / "big")
    save_file({"extra": torch.zeros(checkpoint_bytes, dtype=torch.uint8)},
              big / "extra.safetensors")
    # The ssd tier holds one model; the dram tier none (no promotion); the replica command
    # does not exist.
    config = node_config(tmp_path, dram_dir, {"org/m0": sources["org/m0"], "org/big": big},
                         int(1.5 * checkpoint_bytes), checkpoint_bytes // 2,
                         replica_command=[str(tmp_path / "no-such-vllm")])
    device = config["devices"][0]
    cases = [
        ("POST", "/prefetch", {"model": "org/unknown"}, TOKEN, 404, "unknown model 'org/unknown'"),
        ("POST", "/prefetch", {"model": "../../etc"}, TOKEN, 400, "invalid model name"),
        ("POST", "/prefetch", {"model": "/etc/passwd"}, TOKEN, 400, "invalid model name"),
        ("POST", "/prefetch", {"model": "a/b/c"}, TOKEN, 400, "invalid model name"),
        ("POST", "/evict", {"model": "org/..", "tier": "ssd"}, TOKEN, 400, "invalid model name"),
        ("POST", "/prefetch", {"model": "org/big"}, TOKEN, 413, "the largest tier (ssd) holds"),
        ("POST", "/prefetch", {"model": "org/m0", "tier": "tape"}, TOKEN, 400, "tier"),
        ("POST", "/evict", {"model": "org/m0", "tier": "ssd"}, TOKEN, 404, "not in the ssd tier"),
        ("POST", "/promote", {"model": "org/m0"}, TOKEN, 409, "prefetch it first"),
        ("POST", "/prefetch", {"model": "org/m0"}, None, 401, "Bearer"),
        ("POST", "/prefetch", {"model": "org/m0"}, "wrong", 403, "wrong bearer token"),
        ("POST", "/models", {"name": "x/../y", "source": "/tmp"}, TOKEN, 400, "invalid model"),
        ("POST", "/replicas", {"model": "org/m0", "devices": ["cuda:7"]}, TOKEN, 400,
         "not on this node"),
        ("POST", "/replicas", {"model": "org/m0", "devices": ["gpu0"]}, TOKEN, 400,
         "invalid device"),
        ("POST", "/replicas", {"model": "org/m0", "count": 5}, TOKEN, 400, "1 to 1 devices"),
        ("GET", "/replicas/12345", None, TOKEN, 404, "no replica 12345"),
        ("GET", "/jobs/12345", None, TOKEN, 404, "no job 12345"),
        ("POST", "/prefetch", {"model": "org/m0", "unknown": 1}, TOKEN, 400, "unknown"),
        ("POST", "/prefetch", {}, TOKEN, 400, "model: Field required"),
    ]
    with NodeDaemon(tmp_path, config) as node:
        for method, path, body, token, status, needle in cases:
            r = node.call(method, path, body, token=token)
            assert r.status_code == status, (path, body, r.text)
            assert needle in r.json()["error"]["message"], (needle, r.text)
            assert node.client.get("/health").status_code == 200
        r = node.client.post("/prefetch", content=b'{"model": ', headers={
            "Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
        assert r.status_code == 400 and "malformed JSON" in r.json()["error"]["message"]
        assert [p.name for p in (tmp_path / "ssd").iterdir()] == [".sllm-node-state.json"]
        # A replica command that cannot run: the replica fails with the reason, the device
        # is given back, and the model it fetched on the way stays.
        r = node.call("POST", "/replicas", {"model": "org/m0", "wait": True})
        assert r.status_code == 422, r.text
        assert "no-such-vllm" in r.json()["error"]["message"]
        assert "cannot be started" in r.json()["error"]["message"]
        status = node.status()
        assert status["devices"] == [{"name": device, "replica": None}]
        assert node.held("ssd") == ["org/m0"] and node.held("dram") == []
        assert [r["state"] for r in status["replicas"]] == ["failed"]


def test_cpu_devices_name_their_cores_and_cores_this_machine_lacks_are_refused(tmp_path):
    assert cpu_cores([parse_device("cpu:0-2,5"), parse_device("cuda:1"),
                      parse_device("cpu:7")]) == {0, 1, 2, 5, 7}
    missing = max(os.sched_getaffinity(0)) + 1
    with pytest.raises(ConfigError, match=rf"device 'cpu:{missing}': cores \[{missing}\] are "
                                          "not available"):
        load_config(None, devices=[f"cpu:{missing}"], **{"ssd.path": str(tmp_path)})


def threads_cores(session: int) -> dict[str, set[int]]:
    """The cores each thread of each process in a session may run on ("pid/tid" -> cores)."""
    out = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[3]) != session:  # the session id, after state, ppid and pgrp
                continue
            for task in (stat.parent / "task").iterdir():
                allowed = next(line for line in (task / "status").read_text().splitlines()
                               if line.startswith("Cpus_allowed_list:")).split()[1]
                out[f"{stat.parent.name}/{task.name}"] = cpu_cores(
                    [parse_device(f"cpu:{allowed}")])
        except (OSError, StopIteration):
            continue  # ended meanwhile
    return out


def session_shared_memory(session: int) -> set[str]:
    """The /dev/shm/psm_* segments (Python's multiprocessing shared memory, which vLLM's
    engine and workers use) mapped by the processes of a session: those of one replica, told
    apart from what other tests' processes create meanwhile."""
    names = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[3]) != session:
                continue
            maps = (stat.parent / "maps").read_text()
        except (OSError, IndexError):
            continue  # ended meanwhile
        names.update(line.split("/dev/shm/", 1)[1].split()[0] for line in maps.splitlines()
                     if "/dev/shm/psm_" in line)
    return names


def live_processes(session: int) -> list[int]:
    """The processes of a session that have not ended (zombies have: their parent, here the
    init of the machine for a replica whose daemon was killed, has yet to collect them)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[3]) == session and fields[0] != "Z":
            pids.append(int(stat.parent.name))
    return pids


def assert_replica_gone(session: int, segments: set[str]) -> None:
    """No process of the replica's session is left, nor any of its shared memory segments."""
    assert segments, "the replica mapped no shared memory: nothing to check"
    assert live_processes(session) == []
    assert sorted(n for n in segments if (Path("/dev/shm") / n).exists()) == []


def test_a_real_replica_starts_from_the_dram_tier_and_answers(
        tmp_path, dram_dir, sources, checkpoint_bytes):
    # The replica gets one core (the last), so that confining it to its device is visible.
    core = max(os.sched_getaffinity(0))
    hf_token = "operator-hf-token-of-the-test"  # an operator's secret flag, for the logs
    config = node_config(tmp_path, dram_dir, sources, 10 * checkpoint_bytes,
                         10 * checkpoint_bytes, devices=[f"cpu:{core}"],
                         replica_env={"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"},
                         # Forked from a pre-imported vLLM: the confinement to its core, its
                         # session, its shared memory and the reaping below hold the same.
                         prefork=True)
    config["models"]["org/m1"]["replica_args"] = ["--hf-token", hf_token]
    node = NodeDaemon(tmp_path, config).start()
    try:
        # A flag the API may not pass: refused at once, naming it; nothing starts.
        r = node.call("POST", "/replicas", {"model": "org/m1", "args": ["--no-such-flag"],
                                            "wait": True})
        assert r.status_code == 400, r.text
        assert "--no-such-flag" in r.json()["error"]["message"]
        assert node.ok("GET", "/replicas") == []

        # The caller asks for a 128-token context; the operator's 256 wins.
        replica = node.ok("POST", "/replicas", {"model": "org/m1", "wait": True,
                                                "args": ["--max-model-len", "128"]})
        assert replica["state"] == "ready" and replica["tier"] == "dram"
        assert node.held("dram") == ["org/m1"]  # fetched and promoted on the way
        assert replica["path"] == str(dram_dir / "org--m1")
        for phase in ("queue", "fetch", "process_start", "load", "engine_init", "total"):
            assert replica["phases"][phase] >= 0, phase
        # The device is taken until the replica stops.
        r = node.call("POST", "/replicas", {"model": "org/m1",
                                            "devices": config["devices"]})
        assert r.status_code == 409 and "in use by replica" in r.json()["error"]["message"]
        # The replica answers its key only (the router's, from the node's protected API);
        # its control endpoints not even that, and only from the node itself.
        auth = {"Authorization": f"Bearer {replica['api_key']}"}
        assert replica["api_key"] not in json.dumps(node.status())
        assert httpx.get(f"{replica['url']}/v1/models", timeout=30).status_code == 401
        assert httpx.post(f"{replica['url']}/reset_prefix_cache", headers=auth,
                          timeout=30).status_code == 401
        assert httpx.post(f"{replica['url']}/invocations", timeout=30, json={
            "model": "org/m1", "prompt": "hi", "max_tokens": 1}).status_code == 401
        assert node.ok("GET", "/replica-keys")["keys"] == {str(replica["id"]):
                                                           replica["api_key"]}
        assert node.call("GET", "/replica-keys", token=None).status_code == 401
        served = httpx.get(f"{replica['url']}/v1/models", headers=auth, timeout=30).json()
        assert served["data"][0]["id"] == "org/m1" and served["data"][0]["max_model_len"] == 256

        answer = httpx.post(f"{replica['url']}/v1/completions", timeout=120, headers=auth, json={
            "model": "org/m1", "prompt": "hello world", "max_tokens": 8, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True}).json()
        assert len(answer["choices"][0]["token_ids"]) == 8
        # Every thread of the replica's processes (API server, engine core, worker) stays on
        # the replica's core, not only the worker's compute threads.
        threads = threads_cores(replica["pid"])
        assert len({t.split("/")[0] for t in threads}) >= 2, threads  # server and engine
        assert {t: c for t, c in threads.items() if c != {core}} == {}
        log = Path(replica["log"]).read_text()
        assert "tier dram" in log and "page-cache mapped" in log, log[-3000:]
        assert "replicas fork from a pre-imported" in node.log_tail(400)
        # The operator's secret is in neither the command line the log shows nor vLLM's own
        # log of its arguments, nor in the daemon's files.
        assert "--hf-token ***" in log.splitlines()[0] and hf_token not in log
        assert replica["api_key"] not in log
        assert hf_token not in (tmp_path / "state" / "logs" / "replica-pids.json").read_text()
        dram = node.tier("dram")
        assert dram["observed_loads"] == 1 and dram["read_gbps"] == dram["observed_gbps"]

        # A second daemon on the same state directory is refused, and the replica lives on.
        second = NodeDaemon(tmp_path, {**config, "port": free_port(),
                                       "state_dir": str(tmp_path / "state")}, name="second")
        with pytest.raises(RuntimeError, match="exited with 2"):
            second.start()
        assert "is in use by another node daemon" in second.log_tail()
        assert httpx.get(f"{replica['url']}/health", timeout=30).status_code == 200

        # The daemon is killed; the next one stops the replica it left behind, and the
        # replica's shared memory goes with it (a SIGKILL to its process group left two
        # segments in /dev/shm: the resource tracker that removes them was killed too).
        segments = session_shared_memory(replica["pid"])
        assert all((Path("/dev/shm") / n).exists() for n in segments), segments
        node.proc.kill()
        node.proc.wait()
        node = NodeDaemon(tmp_path, config).start()
        assert f"stopped replica process {replica['pid']} left by a previous daemon" in \
            node.status()["notes"]
        assert_replica_gone(replica["pid"], segments)

        # Started again (from the dram tier the new daemon found), and stopped through the
        # API: nothing is left either.
        replica = node.ok("POST", "/replicas", {"model": "org/m1", "wait": True})
        assert replica["state"] == "ready" and replica["tier"] == "dram"
        segments = session_shared_memory(replica["pid"])
        stopped = node.ok("DELETE", f"/replicas/{replica['id']}")
        assert stopped["state"] == "stopped"
        assert node.status()["devices"][0]["replica"] is None
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"{replica['url']}/health", timeout=5)
        assert_replica_gone(replica["pid"], segments)
        assert json.loads(json.dumps(node.status()))  # the whole status is plain JSON
    finally:
        node.stop()
