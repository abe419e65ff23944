"""Node daemon: time to a ready replica and to its first token, per tier, beside plain vLLM.

    python benchmarks/bench_node.py [--workdir work-data/bench] [--repeats 2] [--out FILE.json]

A real `sllm node` daemon (DRAM tier in /dev/shm, SSD tier in the work directory) starts real
vLLM CPU replicas of the ~2 GB bf16 random Llama, through its HTTP API, from each tier:
- remote: in no tier; the daemon fetches it from a local "remote" path (the engine checkpoint is
  copied, the safetensors original converted) into SSD, promotes it into DRAM, then starts;
- ssd: held in the SSD tier only, page cache dropped, started from there;
- dram: held in the DRAM tier (shared memory), started from there.
Both the `engine` layout (saved once with `sllm save-vllm`) and the `hf` layout are measured.
Beside them, in the same run: a plain vLLM start on the safetensors original (default loader,
warm and cold page cache) and the machine's memory-copy bandwidth, against which the load phase
from DRAM is judged (target: at least 0.8 of it).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx
import yaml

from sllm_plugin.tokens import local_node_token

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

from bench_vllm import ensure_engine, measure  # noqa: E402
from vllm_server import free_port  # noqa: E402

REPLICA_ARGS = ["--enforce-eager", "--max-model-len", "512", "--max-num-seqs", "4"]


class Daemon:
    def __init__(self, workdir: Path, models: dict[str, Path], dram: Path,
                 huge_pages: bool) -> None:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        config = {
            "port": port, "state_dir": str(workdir / "node-state"),
            "dram": {"path": str(dram), "capacity": "8GiB", "huge_pages": huge_pages},
            "ssd": {"path": str(workdir / "node-ssd"), "capacity": "16GiB"},
            "calibration_bytes": "512MiB",
            "replica_args": REPLICA_ARGS,
            "replica_env": {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1",
                            "PYTHONPATH": str(HERE / "vllm_timing")},
            "models": {name: {"source": str(src)} for name, src in models.items()},
        }
        path = workdir / "node-bench.yaml"
        path.write_text(yaml.safe_dump(config))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sllm_plugin.cli", "node", "--config", str(path)],
            stdout=open(workdir / "node-bench.log", "w"), stderr=subprocess.STDOUT)  # noqa: SIM115
        self.client = httpx.Client(base_url=self.url, timeout=1800)
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sllm node exited; see {workdir / 'node-bench.log'}")
            try:
                if self.client.get("/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)  # polling interval
        # The daemon made its token in its state directory (none was configured).
        token = local_node_token(workdir / "node-state")
        self.client.headers["Authorization"] = f"Bearer {token}"

    def post(self, path: str, body: dict) -> dict:
        r = self.client.post(path, json=body)
        if r.status_code >= 300:
            raise RuntimeError(f"POST {path} {body}: {r.status_code} {r.text}")
        return r.json()

    def tier_models(self, tier: str) -> list[str]:
        status = self.client.get("/status").json()
        return [m["name"] for t in status["tiers"] if t["name"] == tier for m in t["models"]]

    def evict_everywhere(self, model: str) -> None:
        for tier in ("dram", "ssd"):
            if model in self.tier_models(tier):
                self.post("/evict", {"model": model, "tier": tier, "force": True})

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(120)


def start_replica(daemon: Daemon, model: str, tier: str | None) -> dict:
    t0 = time.perf_counter()
    body = {"model": model, "wait": True, **({"tier": tier} if tier else {})}
    replica = daemon.post("/replicas", body)
    ready = time.perf_counter() - t0
    first = None
    with httpx.stream("POST", f"{replica['url']}/v1/completions", timeout=120, json={
            "model": model, "prompt": "hello", "max_tokens": 1, "temperature": 0,
            "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data:") and first is None:
                first = time.perf_counter() - t0
    daemon.client.delete(f"/replicas/{replica['id']}")
    phases = replica["phases"]
    return {"ready_s": ready, "first_token_s": first, "loaded_gb": replica["loaded_gb"],
            "tier": replica["tier"], **{f"{k}_s": v for k, v in phases.items()}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("work-data/bench"))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--no-huge-pages", action="store_true",
                        help="keep the DRAM tier on plain /dev/shm (4 KiB pages)")
    args = parser.parse_args()

    from bench_load import prepare

    from sllm_plugin.loader.bench import evict_page_cache, memcpy_gbps, warm_page_cache

    hf, ckpt = (p.resolve() for p in prepare(args.workdir))
    engine = ensure_engine(ckpt, (args.workdir / "bench-2gb.engine").resolve())
    logs = args.workdir / "vllm-logs"
    logs.mkdir(parents=True, exist_ok=True)
    dram = Path("/dev/shm/sllm-bench-node")
    shutil.rmtree(dram, ignore_errors=True)
    shutil.rmtree(args.workdir / "node-ssd", ignore_errors=True)
    models = {"bench/engine": engine, "bench/hf": hf}
    hf_files = sorted(hf.glob("*.safetensors"))
    source_files = [p for p in [*engine.rglob("*.bin"), *hf_files]]

    results: dict[str, list[dict]] = {}
    memcpy: list[float] = []
    daemon = Daemon(args.workdir, models, dram, huge_pages=not args.no_huge_pages)
    try:
        for r in range(args.repeats):
            memcpy.append(memcpy_gbps())
            for mode in ("warm", "cold"):
                (warm_page_cache if mode == "warm" else evict_page_cache)(hf_files)
                m = measure(hf, logs / f"node-plain-{mode}-{r}.log", [])
                results.setdefault(f"plain vLLM, safetensors, {mode}", []).append(m)
                print(f"round {r + 1} plain {mode}: {m}", file=sys.stderr)
            for model in models:
                for where in ("remote", "ssd", "dram"):
                    if where == "remote":
                        daemon.evict_everywhere(model)
                        evict_page_cache(source_files)
                        tier = None
                    elif where == "ssd":
                        if model in daemon.tier_models("dram"):
                            daemon.post("/evict", {"model": model, "tier": "dram"})
                        daemon.post("/prefetch", {"model": model, "wait": True})
                        evict_page_cache(list((args.workdir / "node-ssd").rglob("*.bin")))
                        tier = "ssd"
                    else:
                        daemon.post("/prefetch", {"model": model, "tier": "dram", "wait": True})
                        tier = "dram"
                    m = start_replica(daemon, model, tier)
                    results.setdefault(f"{model} from {where}", []).append(m)
                    print(f"round {r + 1} {model} from {where}: {m}", file=sys.stderr)
        status = daemon.client.get("/status").json()
    finally:
        daemon.close()
        subprocess.run(["umount", str(dram)], capture_output=True)  # if the node mounted one
        shutil.rmtree(dram, ignore_errors=True)

    def med(name: str, key: str) -> float | None:
        vals = [m[key] for m in results[name] if m.get(key) is not None]
        return statistics.median(vals) if vals else None

    def fmt(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}"

    memcpy_med = statistics.median(memcpy)
    tiers = {t["name"]: t for t in status["tiers"]}
    lines = [
        f"Machine: {os.uname().nodename}, {os.cpu_count()} cores; "
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; vLLM CPU backend, --enforce-eager; "
        f"medians of {args.repeats}",
        "",
        f"DRAM tier on {'a huge-page tmpfs' if tiers['dram']['huge_pages'] else '/dev/shm'}"
        f" ({dram}); memory copy (pre-faulted, 256 MiB, same run): {memcpy_med:.2f} GB/s; "
        f"tier read bandwidth calibrated at daemon start: dram "
        f"{tiers['dram']['calibrated_gbps']:.2f} GB/s, ssd {tiers['ssd']['calibrated_gbps']:.2f}"
        f" GB/s (O_DIRECT)",
        "",
        "| start | fetch+promote s | process start s | load s | load GB/s | engine init s "
        "| ready s | first token s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in results:
        if name.startswith("plain"):
            lines.append(f"| {name} | - | - | {fmt(med(name, 'vllm_loading_weights_s'))} | - "
                         f"| - | {fmt(med(name, 'ready_s'))} | {fmt(med(name, 'first_token_s'))} |")
            continue
        load, gb = med(name, "load_s"), med(name, "loaded_gb")
        gbps = gb / load if load and gb else None
        lines.append(
            f"| {name} | {fmt(med(name, 'fetch_s'))} | {fmt(med(name, 'process_start_s'))} | "
            f"{fmt(load)} | {fmt(gbps)} | {fmt(med(name, 'engine_init_s'))} | "
            f"{fmt(med(name, 'ready_s'))} | {fmt(med(name, 'first_token_s'))} |")
    lines.append("")
    for model in models:
        name = f"{model} from dram"
        load, gb = med(name, "load_s"), med(name, "loaded_gb")
        if load and gb:
            lines.append(f"{name}: load phase {gb / load:.2f} GB/s = "
                         f"{gb / load / memcpy_med:.2f} of the memory-copy bandwidth "
                         f"(target >= 0.8)")
    report = "\n".join(lines)
    print(report)
    if args.out:
        args.out.write_text(json.dumps({"results": results, "memcpy_gbps": memcpy,
                                        "status": status, "report": report}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
