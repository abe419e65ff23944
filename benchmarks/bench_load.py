"""Load throughput into owned CPU memory: sllm against the peers and the raw limits, in one run.

    python benchmarks/bench_load.py [--workdir work-data/bench] [--repeats 3] [--out FILE.json]

What it does:
1. Makes the ~2 GB bf16 random Llama offline (`bench-2gb` preset) unless it exists, converts it
   to the sllm format, and lets each peer prepare its own format (tensorizer serializes).
2. Measures the raw limits in a fresh process: memcpy, warm pread into a pre-faulted buffer,
   warm pread into fresh memory, O_DIRECT pread with the page cache dropped.
3. For every round and every loader (sllm and each runnable peer, order rotated each round),
   one warm load (files read into the page cache first) and one cold load (page cache dropped:
   drop_caches as root, else posix_fadvise), each in a fresh Python process, timed inside it
   from the load call until every tensor is resident in memory the caller owns.
4. Checks that every loader produced the same bytes (a digest of every tensor), then prints the
   table of medians, ratios to each peer and to the raw limits, as Markdown.

Every load runs in a fresh process because a serving replica is a fresh process: reusing one
process would let later loads recycle memory earlier ones already faulted in.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

SLLM = "sllm"


# -- child side: one measurement per process -------------------------------------------------


def _digest(tensors: dict) -> str:
    """A digest over names, dtypes, shapes and bytes, to prove all loaders agree."""
    import xxhash

    from sllm_plugin import _fastio

    h = xxhash.xxh3_64()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        nbytes = t.numel() * t.element_size()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(_fastio.xxh3_64(t.data_ptr(), nbytes).to_bytes(8, "little") if nbytes else b"")
    return h.hexdigest()


def child_load(name: str, path: str, threads: int | None) -> dict:
    if name == SLLM:
        from sllm_plugin import load_state_dict

        def load(p: str) -> dict:
            return load_state_dict(p, threads=threads)
    else:
        import peers

        load = peers.get_peer(name).load
    t0 = time.perf_counter()
    tensors = load(path)
    seconds = time.perf_counter() - t0
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    return {"seconds": seconds, "bytes": nbytes, "digest": _digest(tensors)}


def child_raw(path: str, threads: int | None, repeats: int) -> dict:
    import torch

    from sllm_plugin import _fastio
    from sllm_plugin.format import open_checkpoint
    from sllm_plugin.loader import default_threads
    from sllm_plugin.loader.bench import (
        evict_page_cache,
        first_touch_gbps,
        memcpy_gbps,
        raw_read_gbps,
        warm_page_cache,
    )

    threads = threads or default_threads()
    ckpt = open_checkpoint(path)
    files = list(ckpt.file_paths.values())
    # First, before this process has touched (and freed) any large memory.
    touch = first_touch_gbps(ckpt.total_bytes, threads)
    prefaulted = torch.empty(ckpt.total_bytes, dtype=torch.uint8)
    _fastio.fill_memory(prefaulted.data_ptr(), ckpt.total_bytes)
    warm_page_cache(files)
    warm = [raw_read_gbps(Path(path), threads=threads, direct=False, buffer=prefaulted)
            for _ in range(repeats)]
    fresh = [raw_read_gbps(Path(path), threads=threads, direct=False) for _ in range(repeats)]
    direct = []
    for _ in range(repeats):
        evict_page_cache(files)
        direct.append(raw_read_gbps(Path(path), threads=threads, direct=True, buffer=prefaulted))
    return {
        "threads": threads,
        "memcpy": memcpy_gbps(),
        "first_touch": touch,
        "warm_read_prefaulted": statistics.median(warm),
        "warm_read_fresh": statistics.median(fresh),
        "direct_read_cold": statistics.median(direct),
    }


# -- parent side -----------------------------------------------------------------------------


def run_child(*args: str) -> dict:
    done = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"child {args} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def prepare(workdir: Path) -> tuple[Path, Path]:
    from sllm_plugin import convert
    from sllm_plugin.format import is_checkpoint
    from sllm_plugin.testing import make_random_model

    hf = workdir / "bench-2gb-hf"
    ckpt = workdir / "bench-2gb.sllm"
    if not (hf / "config.json").exists():
        print(f"making the ~2 GB random Llama in {hf}", file=sys.stderr)
        make_random_model(hf, "bench-2gb")
    if not is_checkpoint(ckpt):
        convert(hf, ckpt, quiet=True)
    return hf, ckpt


def files_of(name: str, path: str) -> list[str]:
    if name == SLLM:
        from sllm_plugin.format import open_checkpoint

        return [str(p) for p in open_checkpoint(path).file_paths.values()]
    import peers

    return peers.get_peer(name).files(path)


def set_cache(paths: list[str], warm: bool) -> str:
    from sllm_plugin.loader.bench import evict_page_cache, warm_page_cache

    if warm:
        warm_page_cache([Path(p) for p in paths])
        return "warm"
    return evict_page_cache([Path(p) for p in paths])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("work-data/bench"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--peers", default="all", help="comma-separated peer names, or all")
    parser.add_argument("--out", type=Path, help="write all raw measurements as JSON here")
    parser.add_argument(
        "--settle", type=float, default=5.0,
        help="seconds between loads, so memory the previous process freed has gone back to the "
             "host (on a VM) and every loader starts from the same state (default 5)",
    )
    parser.add_argument("--child", nargs=2, metavar=("LOADER", "PATH"), help=argparse.SUPPRESS)
    parser.add_argument("--child-raw", metavar="PATH", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child_load(args.child[0], args.child[1], args.threads)))
        return 0
    if args.child_raw:
        print(json.dumps(child_raw(args.child_raw, args.threads, args.repeats)))
        return 0

    import peers

    args.workdir.mkdir(parents=True, exist_ok=True)
    hf, ckpt = prepare(args.workdir)
    chosen = [p for p in peers.get_peers() if args.peers == "all" or p.name in args.peers]
    runnable = [p for p in chosen if p.available]
    paths = {SLLM: str(ckpt)}
    for p in runnable:
        paths[p.name] = p.prepare(str(hf), str(args.workdir / "peers"))
    loaders = [SLLM, *(p.name for p in runnable)]

    print("measuring raw limits", file=sys.stderr)
    raw_args = ["--child-raw", str(ckpt), "--repeats", str(args.repeats)]
    raw = run_child(*raw_args, *(["--threads", str(args.threads)] if args.threads else []))
    results: dict[str, dict[str, list[dict]]] = {n: {"warm": [], "cold": []} for n in loaders}
    cold_method = ""
    for r in range(args.repeats):
        order = loaders[r % len(loaders):] + loaders[: r % len(loaders)]
        for name in order:
            for mode in ("warm", "cold"):
                method = set_cache(files_of(name, paths[name]), warm=mode == "warm")
                time.sleep(args.settle)  # a measurement condition, not synchronization
                cold_method = method if mode == "cold" else cold_method
                extra = ["--threads", str(args.threads)] if args.threads else []
                m = run_child("--child", name, paths[name], *extra)
                m["gbps"] = m["bytes"] / 1e9 / m["seconds"]
                results[name][mode].append(m)
                print(f"round {r + 1} {name:<24} {mode}: {m['gbps']:.2f} GB/s", file=sys.stderr)

    digests = {n: {m["digest"] for mode in v.values() for m in mode} for n, v in results.items()}
    reference = digests[SLLM]
    wrong = [n for n, d in digests.items() if d != reference or len(d) != 1]
    table = render(raw, results, chosen, cold_method, args, wrong)
    print(table)
    if args.out:
        args.out.write_text(json.dumps({"raw": raw, "results": results, "cold": cold_method,
                                        "wrong": wrong}, indent=1))
    return 1 if wrong else 0


def render(raw: dict, results: dict, chosen: list, cold_method: str, args, wrong: list) -> str:
    med = {n: {mode: statistics.median(m["gbps"] for m in v[mode]) for mode in v}
           for n, v in results.items()}
    ours = med[SLLM]
    nbytes = results[SLLM]["warm"][0]["bytes"]
    lines = [
        f"Machine: {platform.node()}, {os.cpu_count()} cores, {platform.machine()}, "
        f"Python {platform.python_version()}; {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"Checkpoint: {nbytes / 1e9:.3f} GB bf16 random Llama (bench-2gb); "
        f"{args.repeats} rounds, medians; cold = {cold_method}; I/O threads "
        f"{raw['threads']}; {args.settle:g} s settle before each load; every load in a fresh "
        "process",
        "",
        "| raw limit (same run) | GB/s |",
        "|---|---:|",
        f"| memcpy, pre-faulted 256 MiB | {raw['memcpy']:.2f} |",
        f"| first touch of fresh memory (page faults, no copy) | {raw['first_touch']:.2f} |",
        f"| warm pread into pre-faulted memory | {raw['warm_read_prefaulted']:.2f} |",
        f"| warm pread into fresh memory | {raw['warm_read_fresh']:.2f} |",
        f"| cold O_DIRECT pread | {raw['direct_read_cold']:.2f} |",
        "",
        "| loader | warm GB/s | cold GB/s | sllm/peer warm | sllm/peer cold |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, m in med.items():
        ratio_w = ours["warm"] / m["warm"] if name != SLLM else 1.0
        ratio_c = ours["cold"] / m["cold"] if name != SLLM else 1.0
        lines.append(f"| {name} | {m['warm']:.2f} | {m['cold']:.2f} | {ratio_w:.2f}x | "
                     f"{ratio_c:.2f}x |")
    for p in chosen:
        if not p.available:
            lines.append(f"| {p.name} | - | - | not run: {p.unavailable_reason} | |")
    peers_med = [m for n, m in med.items() if n != SLLM]
    best_w = max((m["warm"] for m in peers_med), default=0)
    slowest_peer_cold_ok = all(ours["cold"] >= m["cold"] for m in peers_med)
    lines += [
        "",
        f"sllm warm = {ours['warm'] / raw['warm_read_prefaulted']:.2f} of the warm pre-faulted "
        f"read limit, {ours['warm'] / raw['warm_read_fresh']:.2f} of the fresh-memory read, "
        f"{ours['warm'] / raw['first_touch']:.2f} of the first-touch limit, "
        f"{ours['warm'] / best_w:.2f}x the fastest peer warm" if best_w else "",
        f"sllm cold = {ours['cold'] / raw['direct_read_cold']:.2f} of the O_DIRECT read limit; "
        f"no slower than every peer cold: {slowest_peer_cold_ok}",
        "All loaders produced identical tensors." if not wrong
        else f"MISMATCHED OUTPUT: {wrong}",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
