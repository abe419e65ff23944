"""vLLM cold start per load format: load phase and process start to first token, warm and cold.

    python benchmarks/bench_vllm.py [--workdir work-data/bench] [--repeats 2] [--out FILE.json]

For each load format, a real `python -m vllm.entrypoints.openai.api_server` (CPU backend,
--enforce-eager) is started on the ~2 GB bf16 random Llama; we record
- vLLM's own "Loading weights took" line where the loader prints one (the default loader),
  and ours ("sllm: loaded ... in X s") for sllm,
- the model runner's whole load_model (model init + weights + post-processing), timed the same
  way for every format by benchmarks/vllm_timing/sitecustomize.py,
- seconds from process start to /health answering, and to the first streamed token of a
  one-token completion.
Warm: the format's files read into the page cache first; cold: drop_caches (root) or fadvise.
Formats: default (safetensors), sllm hf layout, sllm engine layout, runai_streamer, tensorizer
(serialized first with vLLM's own tensorize_vllm_model), fastsafetensors, instanttensor; those
that cannot run on CPU are reported with their error.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

from vllm_server import free_port  # noqa: E402


def start_server(model: Path, log: Path, *args: str) -> tuple[subprocess.Popen, str, float]:
    port = free_port()
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": f"{HERE / 'vllm_timing'}:{os.environ.get('PYTHONPATH', '')}"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
         "--host", "127.0.0.1", "--port", str(port), "--enforce-eager", "--max-model-len", "512",
         "--max-num-seqs", "4", "--served-model-name", "m", *args],
        stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env)  # noqa: SIM115
    return proc, f"http://127.0.0.1:{port}", t0


def measure(model: Path, log: Path, args: list[str], timeout: float = 600) -> dict:
    proc, url, t0 = start_server(model, log, *args)
    try:
        while True:
            if proc.poll() is not None:
                # The root cause: the last exception line a worker logged at ERROR level.
                causes = [line.split("] ", 1)[-1] for line in log.read_text(errors="replace")
                          .splitlines() if " ERROR " in line and "Error:" in line
                          and "Engine core initialization failed" not in line]
                return {"error": f"exited {proc.returncode}: "
                                 + (causes[-1] if causes else "see log")[-300:]}
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.perf_counter() - t0 > timeout:
                return {"error": "not ready in time"}
            time.sleep(0.05)  # polling interval
        ready = time.perf_counter() - t0
        first = None
        with httpx.stream("POST", f"{url}/v1/completions", timeout=120, json={
                "model": "m", "prompt": "hello", "max_tokens": 1, "temperature": 0,
                "stream": True}) as r:
            for line in r.iter_lines():
                if line.startswith("data:") and first is None:
                    first = time.perf_counter() - t0
        text = log.read_text(errors="replace")
        out = {"ready_s": ready, "first_token_s": first}
        if m := re.search(r"SLLM-BENCH load_model ([0-9.]+)", text):
            out["load_model_s"] = float(m.group(1))
        if m := re.search(r"Loading weights took ([0-9.]+) seconds", text):
            out["vllm_loading_weights_s"] = float(m.group(1))
        if m := re.search(r"sllm: loaded ([0-9.]+) GB in ([0-9.]+) s", text):
            out["sllm_loaded_s"] = float(m.group(2))
        return out
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def ensure_engine(ckpt: Path, engine: Path) -> Path:
    """The engine-layout checkpoint of `ckpt` for this vLLM (saved once, with save-vllm)."""
    if not (engine / "rank-00000" / "sllm-index.json").exists():
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}
        subprocess.run([sys.executable, "-m", "sllm_plugin.cli", "save-vllm", str(ckpt),
                        str(engine), "--max-model-len", "512"], check=True, env=env,
                       stdout=subprocess.DEVNULL)
    return engine


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("work-data/bench"))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--formats", default="all")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    from bench_load import prepare

    from sllm_plugin.format import open_checkpoint
    from sllm_plugin.loader.bench import evict_page_cache, warm_page_cache

    hf, ckpt = prepare(args.workdir)
    hf, ckpt = hf.resolve(), ckpt.resolve()
    engine = (args.workdir / "bench-2gb.engine").resolve()
    logs = args.workdir / "vllm-logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}
    ensure_engine(ckpt, engine)
    tensors = (args.workdir / "tensorizer" / "model.tensors").resolve()
    tensorizer_error = None
    if not tensors.exists():
        code = (
            "import sys; from vllm.engine.arg_utils import EngineArgs; "
            "from vllm.model_executor.model_loader.tensorizer import TensorizerConfig, "
            "tensorize_vllm_model; tensorize_vllm_model(EngineArgs(model=sys.argv[1], "
            "enforce_eager=True, max_model_len=512), TensorizerConfig(tensorizer_uri=sys.argv[2]))"
        )
        tensors.parent.mkdir(parents=True, exist_ok=True)
        done = subprocess.run([sys.executable, "-c", code, str(hf), str(tensors)], env=env,
                              capture_output=True, text=True)
        if done.returncode != 0 or not tensors.exists():
            tensorizer_error = done.stderr.strip().splitlines()[-1][-300:]

    hf_files = sorted(hf.glob("*.safetensors"))
    sllm_files = list(open_checkpoint(ckpt).file_paths.values())
    engine_files = list(open_checkpoint(engine / "rank-00000").file_paths.values())
    formats = {
        "default (safetensors)": (hf, [], hf_files),
        "sllm hf layout": (ckpt, ["--load-format", "sllm"], sllm_files),
        "sllm engine layout": (engine, ["--load-format", "sllm"], engine_files),
        "runai_streamer": (hf, ["--load-format", "runai_streamer"], hf_files),
        "tensorizer": (hf, ["--load-format", "tensorizer", "--model-loader-extra-config",
                            json.dumps({"tensorizer_uri": str(tensors)})], [tensors]),
        "fastsafetensors": (hf, ["--load-format", "fastsafetensors"], hf_files),
        "instanttensor": (hf, ["--load-format", "instanttensor"], hf_files),
    }
    if args.formats != "all":
        formats = {k: v for k, v in formats.items() if k in args.formats.split(",")}
    results: dict[str, dict[str, list[dict]]] = {k: {"warm": [], "cold": []} for k in formats}
    errors: dict[str, str] = {}
    if tensorizer_error and "tensorizer" in formats:
        errors["tensorizer"] = f"serialization failed: {tensorizer_error}"
    for r in range(args.repeats):
        for name, (model, extra, files) in formats.items():
            if name in errors:
                continue
            for mode in ("warm", "cold"):
                if mode == "warm":
                    warm_page_cache(files)
                else:
                    evict_page_cache(files)
                slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
                m = measure(model, logs / f"{slug}-{mode}-{r}.log", extra)
                if "error" in m:
                    errors[name] = m["error"]
                    print(f"{name}: {m['error'][-400:]}", file=sys.stderr)
                    break
                results[name][mode].append(m)
                print(f"round {r + 1} {name} {mode}: {m}", file=sys.stderr)

    def med(name: str, mode: str, key: str) -> str:
        vals = [m[key] for m in results[name][mode] if m.get(key) is not None]
        return f"{statistics.median(vals):.2f}" if vals else "-"

    base = {mode: results["default (safetensors)"][mode]
            for mode in ("warm", "cold")} if "default (safetensors)" in results else None
    lines = [
        f"Machine: {os.uname().nodename}, {os.cpu_count()} cores; "
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; vLLM CPU backend, --enforce-eager; "
        f"medians of {args.repeats}",
        "",
        "| load format | mode | weights s (own log) | load_model s | ready s | first token s |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for name in formats:
        if name in errors and not results[name]["warm"]:
            continue
        for mode in ("warm", "cold"):
            own = med(name, mode, "sllm_loaded_s")
            if own == "-":
                own = med(name, mode, "vllm_loading_weights_s")
            lines.append(f"| {name} | {mode} | {own} | {med(name, mode, 'load_model_s')} | "
                         f"{med(name, mode, 'ready_s')} | {med(name, mode, 'first_token_s')} |")
    for name, err in errors.items():
        lines.append(f"| {name} | - | not run: {err.splitlines()[-1][:200]} | | | |")
    if base:
        lines.append("")
        for name in formats:
            if name in errors or not results[name]["warm"]:
                continue
            ratios = []
            for mode in ("warm", "cold"):
                b = [m["load_model_s"] for m in base[mode] if "load_model_s" in m]
                o = [m["load_model_s"] for m in results[name][mode] if "load_model_s" in m]
                if b and o:
                    ratios.append(f"{mode} {statistics.median(b) / statistics.median(o):.2f}x")
            lines.append(f"load_model speed-up over default, {name}: {', '.join(ratios)}")
    print("\n".join(lines))
    if args.out:
        args.out.write_text(json.dumps({"results": results, "errors": errors}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
