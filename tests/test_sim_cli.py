"""`sllm simulate` as a user runs it: a real process on the trace excerpts the tests own, the
table it prints, the files it writes, and the clear errors for bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sllm_plugin.sim.engine import POLICIES
from sllm_plugin.sim.fleet import seed_testbed
from sllm_plugin.sim.run import deployed

TRACES = Path(__file__).resolve().parent / "data" / "traces"
AZURE = TRACES / "azure_llm_2023_code_head300.csv"
MOONCAKE = TRACES / "mooncake_conversation_head300.jsonl"


def sllm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sllm_plugin.cli", "simulate", *args],
                          capture_output=True, text=True, timeout=600)


def table_rows(stdout: str) -> dict[str, list[str]]:
    rows = [line.strip("|").split("|") for line in stdout.splitlines()
            if line.startswith("| ") and not line.startswith("| policy")]
    return {cells[0].strip(): [c.strip() for c in cells[1:]] for cells in rows}


def test_a_trace_alone_prints_every_policy_on_the_default_fleet():
    done = sllm("--trace", str(AZURE), "-q")
    assert done.returncode == 0, done.stderr
    assert "8 servers x 8 GPUs, 40 models" in done.stdout
    rows = table_rows(done.stdout)
    assert list(rows) == list(POLICIES)
    for policy, cells in rows.items():
        assert cells[0] == "300", (policy, cells)  # every request of the excerpt
    assert rows["sllm"][-1] == "1.0x"


def test_out_writes_the_json_table_and_plots(tmp_path):
    out = tmp_path / "sim"
    done = sllm("--trace", str(MOONCAKE), "--loads", "0.5,1", "--policies", "sllm,kserve",
                "--out", str(out), "-q")
    assert done.returncode == 0, done.stderr
    doc = json.loads((out / "simulation.json").read_text())
    assert [s["policy"] for s in doc["summaries"]] == ["sllm", "kserve"]
    assert set(doc["meta"]["by_load"]) == {"0.5", "1.0"}
    assert doc["meta"]["fleet"]["servers"] == 8
    records = json.loads((out / "requests.json").read_text())["records"]
    assert sorted(r["id"] for r in records["sllm"]) == list(range(300))
    assert (out / "simulation.md").read_text().splitlines()[0].startswith("| policy")
    for png in ("ttft_cdf.png", "ttft_vs_load.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_fleet_file_describes_another_fleet_and_unknown_keys_are_named(tmp_path):
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text("servers: 3\ngpus: 4\nremote_gbps: 0.5\n")
    done = sllm("--trace", str(AZURE), "--fleet", str(fleet), "--policies", "oracle", "-q")
    assert done.returncode == 0, done.stderr
    assert "3 servers x 4 GPUs" in done.stdout
    fleet.write_text("servers: 3\ngpu_count: 4\n")
    done = sllm("--trace", str(AZURE), "--fleet", str(fleet), "-q")
    assert done.returncode == 2 and "gpu_count" in done.stderr, done.stderr


@pytest.mark.parametrize("args, says", [
    (["--policies", "sllm,nope"], "unknown policy 'nope'"),
    (["--rps", "0"], "rps"),
    (["--loads", "1,-2"], "loads"),
])
def test_bad_arguments_say_what_is_wrong(args, says):
    done = sllm("--trace", str(AZURE), *args, "-q")
    assert done.returncode == 2 and says in done.stderr, (done.returncode, done.stderr)


def test_a_bad_trace_row_is_named_by_file_and_line(tmp_path):
    trace = tmp_path / "t.csv"
    trace.write_text("arrival_s,input_tokens,output_tokens\n0,10,5\n1,-3,5\n")
    done = sllm("--trace", str(trace), "-q")
    assert done.returncode == 2, done.stderr
    assert f"{trace}:3" in done.stderr and "input_tokens" in done.stderr


def test_checkpoints_start_on_one_ssd_each_round_robin():
    fleet = seed_testbed(3)
    cached = deployed(fleet, [f"m{i}" for i in range(7)])
    assert cached == {"server-0": {"ssd": ["m0", "m3", "m6"]},
                      "server-1": {"ssd": ["m1", "m4"]}, "server-2": {"ssd": ["m2", "m5"]}}
