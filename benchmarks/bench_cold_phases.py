"""Where the seconds of a replica's cold start go (issue 12, "what is left of a cold start").

Starts `python -m vllm.entrypoints.openai.api_server --load-format sllm` on a small converted
model (made offline, `sllm_plugin.testing`) the way the node daemon does on the CPU backend
(VLLM_CPU_KVCACHE_SPACE=1, VLLM_CPU_OMP_THREADS_BIND, its own session), stamps every output line
as it arrives (PYTHONUNBUFFERED=1; vLLM's own stamps have whole seconds only), and splits the
time from spawn to the first /health 200 into phases by the lines each process prints:

    api_imports    spawn -> the API server's first log line (interpreter + imports)
    api_config     -> its last line before the engine core speaks (args, model config)
    core_start     -> the engine core's first line (a spawned interpreter + its imports)
    worker_start   -> the worker's first line (spawned again: the CPU backend always runs the
                      model in a worker process, and forces `spawn` for both)
    worker_setup   -> "Starting to load model" (torch/NUMA/gloo setup)
    model_load     -> the loader's "sllm: loaded" line (model init + weights)
    kv_warmup      -> "init engine (profile, create kv cache, warmup model) took"
    api_up         -> the first /health 200 (engine handshake, routes, uvicorn)

then sends one greedy completion (its latency is `first_completion`, and its token ids are
kept so two launch methods can be compared token for token).

    python benchmarks/bench_cold_phases.py --runs 3                   # Popen, --enforce-eager
    python benchmarks/bench_cold_phases.py --runs 3 --variant popen --variant prefork-light
    python benchmarks/bench_cold_phases.py --runs 1 --compile --cache-root /tmp/vc  # twice
    python benchmarks/bench_cold_phases.py --importtime                # per-process imports
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

API_MODULE = "vllm.entrypoints.openai.api_server"
LIGHT_MODULE = "sllm_plugin.vllm.serve"
VARIANTS = ["popen", "prefork", "popen-light", "prefork-light"]
PHASES = ["api_imports", "api_config", "core_start", "worker_start", "worker_setup",
          "model_load", "kv_warmup", "api_up", "total"]
_API = re.compile(r"\(APIServer pid=\d+\)")
_CORE = re.compile(r"\(EngineCore[^)]* pid=\d+\)")
_WORKER = re.compile(r"\((?:VllmWorker|Worker)[^)]* pid=\d+\)")
_START_LOAD = "Starting to load model"
_LOADED = re.compile(r"sllm: loaded [\d.]+ GB in (?P<s>[\d.]+) s")
_INIT_ENGINE = re.compile(r"init engine \(profile, create kv cache, warmup model\) took "
                          r"(?P<s>[\d.]+)")
_COMPILE = re.compile(r"torch\.compile took (?P<s>[\d.]+) s|Compiling a graph .* takes "
                      r"(?P<g>[\d.]+) s")


def make_model(where: Path, preset: str) -> Path:
    """A random `preset` model converted to an sllm checkpoint under `where` (made once)."""
    from sllm_plugin import convert
    from sllm_plugin.testing import make_random_model

    ckpt = where / f"{preset}.sllm"
    if not (ckpt / "sllm-index.json").exists():
        hf = make_random_model(where / f"{preset}-hf", preset)
        convert(hf, ckpt, quiet=True)
    return ckpt


def replica_env(cores: str, cache_root: str | None) -> dict[str, str]:
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": cores,
           "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if cache_root:
        env["VLLM_CACHE_ROOT"] = cache_root
        env["TORCHINDUCTOR_CACHE_DIR"] = str(Path(cache_root) / "inductor")
    return env


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_start(ckpt: Path, args: argparse.Namespace, module: str, prefork=None) -> dict:
    """One cold start: phases (s), the first completion's latency and token ids."""
    port = free_port()
    argv = [sys.executable, "-m", module, "--model", str(ckpt), "--load-format", "sllm",
            "--host", "127.0.0.1", "--port", str(port), "--max-model-len", "256",
            "--max-num-seqs", "4", *([] if args.compile else ["--enforce-eager"])]
    env = replica_env(args.cores, args.cache_root)
    lines: list[tuple[float, str]] = []
    t0 = time.monotonic()
    if prefork is None:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env, start_new_session=True,
                                text=True, bufsize=1, errors="replace")
    else:
        proc = prefork.launch(argv, env=env)
    stdout = proc.stdout

    def read() -> None:
        for line in stdout:
            lines.append((time.monotonic() - t0, line.rstrip("\n")))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    url = f"http://127.0.0.1:{port}"
    ready = None
    with httpx.Client(timeout=2.0) as client:
        while proc.poll() is None and time.monotonic() - t0 < 600:
            try:
                if client.get(f"{url}/health").status_code == 200:
                    ready = time.monotonic() - t0
                    break
            except httpx.HTTPError:
                pass
            threading.Event().wait(0.05)  # poll interval while the server comes up
        cpu = session_cpu_seconds(proc.pid) if ready is not None else None
        if ready is None:
            proc.kill()
            raise RuntimeError("no /health 200:\n" + "\n".join(t for _, t in lines[-40:]))
        t1 = time.monotonic()
        body = client.post(f"{url}/v1/completions", timeout=120, json={
            "model": str(ckpt), "prompt": "The quick brown fox", "max_tokens": 16,
            "temperature": 0, "return_token_ids": True}).json()
        first = time.monotonic() - t1
    proc.terminate()
    proc.wait(60)
    reader.join(10)
    result = split(lines, ready)
    if args.logs:
        args.logs.mkdir(parents=True, exist_ok=True)
        name = f"{'prefork' if prefork else 'popen'}-{module.rsplit('.', 1)[-1]}-{port}.log"
        (args.logs / name).write_text("".join(f"{t:8.2f} {text}\n" for t, text in lines))
    result["first_completion"] = first
    result["cpu_s"] = cpu
    choice = body["choices"][0]
    result["token_ids"] = choice.get("token_ids") or choice["text"]
    return result


def session_cpu_seconds(sid: int) -> float:
    """CPU seconds (user + system) the processes of session `sid` have used so far, with
    their ended children's: less sensitive than wall time to what else the machine runs."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid:  # fields after the name: state ppid pgrp session ...
            total += sum(int(f) for f in fields[11:15])  # utime stime cutime cstime
    return total / tick


def split(lines: list[tuple[float, str]], ready: float) -> dict:
    """Phase durations from the stamped lines (see the module docstring)."""
    def first(pred) -> float | None:
        return next((t for t, text in lines if pred(text)), None)

    core0 = first(_CORE.search)
    marks = collections.OrderedDict()
    marks["api_imports"] = first(_API.search)
    marks["api_config"] = max((t for t, text in lines if _API.search(text)
                               and core0 is not None and t < core0), default=None)
    marks["core_start"] = core0
    marks["worker_start"] = first(_WORKER.search)
    marks["worker_setup"] = first(lambda s: _START_LOAD in s)
    marks["model_load"] = first(_LOADED.search)
    marks["kv_warmup"] = first(_INIT_ENGINE.search)
    marks["api_up"] = ready
    out, last = {}, 0.0
    for name, t in marks.items():
        if t is None:
            out[name] = None
            continue
        out[name], last = t - last, t
    out["total"] = ready
    text = "\n".join(t for _, t in lines)
    init = _INIT_ENGINE.search(text)
    out["vllm_init_engine_s"] = float(init["s"]) if init else None
    loaded = _LOADED.search(text)
    out["sllm_load_s"] = float(loaded["s"]) if loaded else None
    compiled = [float(m["s"] or m["g"]) for m in _COMPILE.finditer(text)]
    out["compile_log_s"] = compiled or None
    return out


def importtime(module: str) -> dict:
    """`python -X importtime -c 'import MODULE'`: total and the ten heaviest packages (s)."""
    err = subprocess.run([sys.executable, "-X", "importtime", "-c", f"import {module}"],
                         capture_output=True, text=True, check=True).stderr
    per: collections.Counter = collections.Counter()
    for line in err.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        self_us, _, name = line.split(":", 1)[1].split("|")
        parts = name.strip().split(".")
        per[".".join(parts[:2]) if parts[0] == "vllm" else parts[0]] += int(self_us)
    return {"total_s": round(sum(per.values()) / 1e6, 2),
            "top": {k: round(v / 1e6, 2) for k, v in per.most_common(10)}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--preset", default="tiny-llama")
    parser.add_argument("--cores", default=",".join(map(str, sorted(os.sched_getaffinity(0)))))
    parser.add_argument("--variant", action="append", choices=VARIANTS,
                        help="how to start (repeat to interleave several; default popen): "
                             "popen / prefork (sllm_plugin.store.prefork) with vLLM's module, "
                             "*-light with sllm_plugin.vllm.serve")
    parser.add_argument("--compile", action="store_true", help="no --enforce-eager")
    parser.add_argument("--cache-root", help="VLLM_CACHE_ROOT (+ TORCHINDUCTOR_CACHE_DIR)")
    parser.add_argument("--importtime", action="store_true",
                        help="only measure each process's imports, one process at a time")
    parser.add_argument("--json", type=Path, help="write the results here too")
    parser.add_argument("--logs", type=Path, help="keep each start's stamped output here")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "sllm-cold")
    args = parser.parse_args()

    if args.importtime:
        result = {m: importtime(m) for m in (API_MODULE, "vllm.v1.engine.core",
                                             "vllm.v1.worker.cpu_worker")}
        print(json.dumps(result, indent=1))
        return
    args.work.mkdir(parents=True, exist_ok=True)
    ckpt = make_model(args.work, args.preset)
    variants = args.variant or ["popen"]
    prefork = None
    if any(v.startswith("prefork") for v in variants):
        from sllm_plugin.store.prefork import Prefork

        t = time.monotonic()
        prefork = Prefork.start(env=replica_env(args.cores, args.cache_root))
        print(f"prefork helper ready in {time.monotonic() - t:.2f} s", flush=True)
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    try:
        for i in range(args.runs):  # interleaved, so that load from elsewhere hits all alike
            for variant in variants:
                module = LIGHT_MODULE if variant.endswith("-light") else API_MODULE
                result = one_start(ckpt, args, module,
                                   prefork if variant.startswith("prefork") else None)
                runs[variant].append(result)
                shown = {k: round(v, 2) if isinstance(v, float) else v
                         for k, v in result.items() if k != "token_ids"}
                print(f"{variant} run {i + 1}: {json.dumps(shown)}", flush=True)
    finally:
        if prefork is not None:
            prefork.close()
    summary = {}
    for variant, results in runs.items():
        summary[variant] = {k: round(statistics.median(r[k] for r in results), 2)
                            for k in [*PHASES, "first_completion", "cpu_s"]
                            if all(r[k] is not None for r in results)}
        print(f"median {variant}: {json.dumps(summary[variant])}")
    tokens = {json.dumps(r["token_ids"]) for results in runs.values() for r in results}
    print(f"token ids the same in every run: {len(tokens) == 1}: {sorted(tokens)}")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                         "runs": runs, "median": summary}, indent=1) + "\n")


if __name__ == "__main__":
    main()
