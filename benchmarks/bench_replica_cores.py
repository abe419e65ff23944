"""Two vLLM CPU replicas on one machine: does a short prefill on one stall beside a decode on
the other? With only the compute threads bound, and with whole process trees confined.

    python benchmarks/bench_replica_cores.py [--workdir work-data/bench] [--trials 8]
        [--decode-tokens 1000] [--out FILE.json]

Each replica is a real `vllm.entrypoints.openai.api_server` (small random Llama, float32,
--enforce-eager) in its own session, as the node daemon starts them, with
VLLM_CPU_OMP_THREADS_BIND naming one core each (cores 0 and 1). Two layouts, one after the
other in the same run:
- `threads bound`: only the OpenMP compute threads are bound; the API server and engine-core
  processes may run on any core (the node's behaviour before it confined replicas);
- `confined`: the whole process tree is confined to its core (`children_confined_to`, what
  the node does now).
Per trial: a greedy stream of `--decode-tokens` tokens on replica B; half a second in, a
34-token prompt with max_tokens=1 on the idle replica A (a migration warm-up's shape). Reported:
the prefill's latency beside the decode (median, max, and how many trials took over 1 s),
the same prefill alone, and the decode's duration. The stall is a matter of where the
scheduler puts the floating processes, so it comes in some trials and not others.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from vllm_server import free_port, vllm_env, wait_healthy  # noqa: E402

from sllm_plugin.store.replicas import children_confined_to  # noqa: E402

ARGS = ["--enforce-eager", "--max-model-len", "2048", "--max-num-seqs", "8", "--dtype", "float32"]
PROMPT = "The quick brown fox jumps over the lazy dog. " * 3


def start(model: Path, core: int, confined: bool, log: Path) -> tuple[subprocess.Popen, str]:
    env = {**vllm_env(), "VLLM_CPU_OMP_THREADS_BIND": str(core)}
    port = free_port()
    spawn = children_confined_to({core}) if confined else contextlib.nullcontext()
    with spawn, open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
             "--host", "127.0.0.1", "--port", str(port), *ARGS],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    return proc, f"http://127.0.0.1:{port}"


def complete(url: str, model: Path, prompt, max_tokens: int) -> float:
    t = time.perf_counter()
    httpx.post(f"{url}/v1/completions", timeout=600, json={
        "model": str(model), "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
        "ignore_eos": True}).raise_for_status()
    return time.perf_counter() - t


def layout(model: Path, work: Path, confined: bool, trials: int, decode_tokens: int) -> dict:
    name = "confined" if confined else "threads bound"
    procs = [start(model, core, confined, work / f"{name.replace(' ', '-')}-{core}.log")
             for core in (0, 1)]
    try:
        for proc, url in procs:
            wait_healthy(url, proc, 300, "vLLM", lambda: "see the logs in " + str(work))
            complete(url, model, PROMPT, 2)  # first request: warm
        (_, a), (_, b) = procs
        beside, alone, decode = [], [], []
        for trial in range(trials):
            done: dict = {}

            def stream(done: dict = done) -> None:
                t = time.perf_counter()
                with httpx.stream("POST", f"{b}/v1/completions", timeout=600, json={
                        "model": str(model), "prompt": PROMPT, "max_tokens": decode_tokens,
                        "temperature": 0, "ignore_eos": True, "stream": True}) as r:
                    for _ in r.iter_lines():
                        pass
                done["s"] = time.perf_counter() - t

            decoder = threading.Thread(target=stream)
            decoder.start()
            time.sleep(0.5)  # let the decode run before the prefill (not synchronization)
            ids = [100 + trial * 40 + i for i in range(34)]  # new ids: no prefix-cache hit
            beside.append(complete(a, model, ids, 1))
            decoder.join()
            decode.append(done["s"])
            alone.append(complete(a, model, [i + 1000 for i in ids], 1))
            print(f"{name} trial {trial}: prefill beside decode {beside[-1]:.3f} s, alone "
                  f"{alone[-1]:.3f} s; decode {decode[-1]:.2f} s", file=sys.stderr)
        return {"layout": name, "prefill_beside_decode_s": beside, "prefill_alone_s": alone,
                "decode_s": decode}
    finally:
        for proc, _ in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            proc.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("work-data/bench"))
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--decode-tokens", type=int, default=1000)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if len(os.sched_getaffinity(0)) < 2 or not {0, 1} <= os.sched_getaffinity(0):
        print("needs cores 0 and 1", file=sys.stderr)
        return 2
    from sllm_plugin.testing import make_random_model

    work = (args.workdir / "replica-cores").resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    model = make_random_model(work / "small", "small-llama", seed=7)
    runs = [layout(model, work, confined, args.trials, args.decode_tokens)
            for confined in (False, True)]
    lines = [f"Machine: {os.uname().nodename}, {os.cpu_count()} cores; "
             f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; {args.trials} trials, "
             f"{args.decode_tokens}-token decode", "",
             "| layout | prefill beside decode, median (max) s | trials over 1 s "
             "| prefill alone, median s | decode, median s |", "|---|---:|---:|---:|---:|"]
    for run in runs:
        lines.append(f"| {run['layout']} | {statistics.median(run['prefill_beside_decode_s']):.3f}"
                     f" ({max(run['prefill_beside_decode_s']):.3f}) | "
                     f"{sum(s > 1 for s in run['prefill_beside_decode_s'])} of {args.trials} | "
                     f"{statistics.median(run['prefill_alone_s']):.3f} | "
                     f"{statistics.median(run['decode_s']):.2f} |")
    report = "\n".join(lines)
    print(report)
    if args.out:
        args.out.write_text(json.dumps({"runs": runs, "report": report}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
