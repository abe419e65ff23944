"""The simulator's report (sllm_plugin/sim/report.py) from hand-made PolicyResults: figures
checked against values worked out here by hand, the markdown table, the JSON file, the PNGs."""

from __future__ import annotations

import json
import math
import os
import stat
import struct
from pathlib import Path

import numpy as np
import pytest

from sllm_plugin.sim.report import (
    markdown_table,
    percentile,
    plot_latency_vs_load,
    plot_ttft_cdf,
    summarize,
    write_json,
)
from sllm_plugin.sim.types import PolicyResult, RequestRecord

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# TTFTs of 10 served requests (seconds) and the start waits of the 3 that waited for one.
TTFT = [5.0, 1.0, 4.0, 2.0, 3.0, 9.0, 7.0, 6.0, 8.0, 10.0]
WAITS = {0: (2.0, "cold", "ssd"), 3: (0.5, "swap", "dram"), 6: (1.0, "cold", "remote")}


def _result(policy: str, scale: float = 1.0, **kw) -> PolicyResult:
    recs = []
    for i, t in enumerate(TTFT):
        startup, via, tier = WAITS.get(i, (0.0, "warm", None))
        recs.append(RequestRecord(id=i, model=f"m{i % 3}", arrival_s=float(i),
                                  ttft_s=t * scale, startup_s=startup * scale,
                                  waited_for_start=i in WAITS, server="s0", via=via, tier=tier,
                                  finish_s=i + t * scale + 1))
    recs.append(RequestRecord(id=10, model="m0", arrival_s=10.0, ttft_s=None, startup_s=0.0,
                              waited_for_start=False, server=None, via="rejected", tier=None))
    base = dict(device_seconds=1234.5, starts={"cold": 3, "swap": 1},
                loads_by_tier={"dram": 2, "ssd": 1, "remote": 1}, migrations=2,
                duration_s=42.0, wall_s=0.25, notes=["hand-made"])
    base.update(kw)
    return PolicyResult(policy=policy, records=recs, **base)


def test_percentiles_are_nearest_rank():
    # nearest rank: the ceil(q/100 * n)-th smallest value
    assert percentile([1, 2, 3, 4], 50) == 2  # linear interpolation would say 2.5
    assert percentile([3, 1, 2], 90) == 3
    assert percentile([], 50) is None


def test_summary_figures():
    s = summarize(_result("sllm"))
    assert (s["policy"], s["requests"], s["served"], s["rejected"]) == ("sllm", 11, 10, 1)
    # sorted TTFTs 1..10: p50 is the 5th, p90 the 9th, p99 the 10th
    assert (s["ttft_s"]["p50"], s["ttft_s"]["p90"], s["ttft_s"]["p99"]) == (5.0, 9.0, 10.0)
    assert s["ttft_s"]["mean"] == 5.5 and s["ttft_s"]["max"] == 10.0
    # waits of those that waited, sorted 0.5, 1, 2: p50 the 2nd, p90 and p99 the 3rd
    w = s["startup_s"]["waited"]
    assert (w["count"], w["p50"], w["p90"], w["p99"]) == (3, 1.0, 2.0, 2.0)
    # over all served: seven zeros then 0.5, 1, 2: p50 the 5th (0), p90 the 9th, p99 the 10th
    a = s["startup_s"]["all"]
    assert (a["count"], a["p50"], a["p90"], a["p99"]) == (10, 0.0, 1.0, 2.0)
    assert s["waited_for_start"] == 3
    assert s["waited_by_via"] == {"cold": 2, "swap": 1, "standby": 0}
    assert s["starts"] == {"cold": 3, "swap": 1, "standby": 0, "total": 4}
    assert s["loads_by_tier"] == {"dram": 2, "ssd": 1, "remote": 1}
    assert s["cache_hit_rate"] == {"dram": 0.5, "ssd": 0.25, "remote": 0.25}
    assert (s["device_seconds"], s["migrations"], s["duration_s"], s["wall_s"]) == (
        1234.5, 2, 42.0, 0.25)
    assert s["notes"] == ["hand-made"]


def test_summary_of_nothing():
    s = summarize(PolicyResult(policy="idle", records=[], device_seconds=0.0))
    assert s["requests"] == 0 and s["ttft_s"]["p99"] is None
    assert s["startup_s"]["waited"]["p50"] is None
    assert s["cache_hit_rate"] == {"dram": None, "ssd": None, "remote": None}


def _three() -> list[PolicyResult]:
    return [_result("sllm"), _result("random", scale=20.0),
            _result("idle", starts={}, loads_by_tier={}, migrations=0)]


def test_markdown_table_rows():
    table = markdown_table([summarize(r) for r in _three()])
    lines = table.splitlines()
    assert len(lines) == 2 + 3
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    assert head[0] == "policy" and head[-1] == "p99 TTFT / sllm's"
    rows = {cells[0]: cells for cells in
            ([c.strip() for c in ln.strip("|").split("|")] for ln in lines[2:])}
    assert set(rows) == {"sllm", "random", "idle"}
    col = {name: i for i, name in enumerate(head)}
    assert rows["sllm"][col["TTFT p50 (s)"]] == "5.00"
    assert rows["sllm"][col["TTFT p99 (s)"]] == "10.00"
    assert rows["random"][col["TTFT p99 (s)"]] == "200"
    assert rows["sllm"][col["p99 TTFT / sllm's"]] == "1.0x"
    assert rows["random"][col["p99 TTFT / sllm's"]] == "20.0x"
    assert rows["sllm"][col["waited for a start (cold)"]] == "3 (2)"
    assert rows["sllm"][col["starts from DRAM/SSD/remote"]] == "50%/25%/25%"
    assert rows["idle"][col["starts from DRAM/SSD/remote"]] == "n/a/n/a/n/a"
    assert rows["sllm"][col["rejected"]] == "1"
    assert rows["sllm"][col["device-s"]] == "1,234"
    # without our policy there is nothing to compare with
    alone = markdown_table([summarize(_result("random"))])
    assert alone.splitlines()[2].rstrip(" |").endswith("n/a")


def test_json_round_trip(tmp_path):
    results = _three()
    sums = [summarize(r) for r in results]
    path = write_json(tmp_path / "sim.json", sums, results=results,
                      meta={"trace": "azure", "seed": 0, "bad": math.inf})
    doc = json.loads(path.read_text())
    assert doc["summaries"] == sums
    assert doc["meta"] == {"trace": "azure", "seed": 0, "bad": None}  # JSON has no infinity
    assert len(doc["records"]["random"]) == 11
    assert doc["records"]["random"][0]["ttft_s"] == 100.0
    assert doc["records"]["sllm"][10]["ttft_s"] is None
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sim.json"]  # no temp file left
    # rewriting replaces the file whole
    write_json(path, sums[:1])
    assert len(json.loads(path.read_text())["summaries"]) == 1


def test_failed_write_leaves_the_old_file(tmp_path):
    path = tmp_path / "sim.json"
    write_json(path, [summarize(_result("sllm"))])
    before = path.read_bytes()
    with pytest.raises(TypeError):
        write_json(path, [{"policy": object()}])  # not JSON: fails before the rename
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sim.json"]


def _png_checks(path: Path, width: int, height: int) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > 15_000  # lines, text and a legend, not a blank canvas
    w, h = struct.unpack(">II", data[16:24])  # the IHDR chunk
    assert (w, h) == (width, height)
    from matplotlib.image import imread

    pixels = imread(path)[..., :3].reshape(-1, 3)
    assert len(np.unique(pixels, axis=0)) > 50  # several colored curves, anti-aliased


def test_ttft_cdf_png(tmp_path):
    path = plot_ttft_cdf(_three(), tmp_path / "ttft_cdf.png")
    _png_checks(path, 960, 600)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ttft_cdf.png"]


def test_latency_vs_load_png(tmp_path):
    by_load = {load: [summarize(_result("sllm", scale=load)),
                      summarize(_result("random", scale=10 * load ** 2))]
               for load in (0.5, 1.0, 2.0, 4.0)}
    path = plot_latency_vs_load(by_load, tmp_path / "load.png")
    _png_checks(path, 1320, 576)
