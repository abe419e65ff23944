"""What checking every tensor's own checksum costs: loads with `verify=True` and `sllm verify`,
against the same without it, and against the limit (hashing bytes already in memory).

    python benchmarks/bench_verify.py CHECKPOINT [--repeats 3] [--baseline DIR] [--out FILE]

Every figure is one load in a fresh process, warm (the checkpoint in the page cache), medians
over `--repeats`. `--baseline DIR` is another checkout of the project (for example one made
with `git worktree add DIR fe17e3f`, its compiled `_fastio` copied in) run the same way in the
same rounds: the code before tensor checksums, side by side with this one. The limit is XXH3
over a buffer already in memory, measured in the same process as the loads.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent

# One measurement, run in a fresh interpreter (`python -c`) against whichever checkout is on
# PYTHONPATH: prints {"gbps": ...}.
PROBE = r"""
import json, sys, time
from pathlib import Path
import sllm_plugin
from sllm_plugin.format.reader import open_checkpoint
from sllm_plugin.loader import LoadStats
path, what = sys.argv[1], sys.argv[2]
nbytes = open_checkpoint(path).index.tensor_bytes
if what == "hash":
    import torch
    from sllm_plugin import _fastio
    buf = torch.empty(nbytes, dtype=torch.uint8)
    _fastio.fill_memory(buf.data_ptr(), nbytes)
    t = time.perf_counter()
    _fastio.xxh3_64(buf.data_ptr(), nbytes)
    print(json.dumps({"gbps": nbytes / 1e9 / (time.perf_counter() - t)}))
elif what == "sllm verify":
    report = sllm_plugin.verify_checkpoint(path)
    print(json.dumps({"gbps": report.bytes / 1e9 / report.seconds}))
else:
    stats = LoadStats()
    state = sllm_plugin.load_state_dict(path, verify=(what == "load, verify"), stats=stats)
    print(json.dumps({"gbps": stats.gbps}))
"""

MEASURES = ("hash", "load", "load, verify", "sllm verify")


def probe(checkout: Path, path: Path, what: str) -> float:
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    done = subprocess.run([sys.executable, "-c", PROBE, str(path.resolve()), what], env=env,
                          capture_output=True, text=True, cwd=checkout)
    if done.returncode:
        raise RuntimeError(f"{checkout}: {what} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["gbps"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--baseline", type=Path, help="another checkout to compare with")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    checkouts = {"this": HERE.parent}
    if args.baseline:
        checkouts["baseline"] = args.baseline.resolve()
    for f in args.checkpoint.glob("*.bin"):  # warm: every figure reads from the page cache
        f.read_bytes()
    runs: dict[str, dict[str, list[float]]] = {c: {m: [] for m in MEASURES} for c in checkouts}
    for _ in range(args.repeats):  # the checkouts alternate within each round
        for what in MEASURES:
            for name, checkout in checkouts.items():
                runs[name][what].append(probe(checkout, args.checkpoint, what))
    result = {
        "date": datetime.now(timezone.utc).isoformat(timespec="minutes"),
        "machine": f"{os.cpu_count()} cores, {os.uname().nodename}",
        "checkpoint": str(args.checkpoint), "repeats": args.repeats,
        "median_gbps": {c: {m: statistics.median(v) for m, v in r.items()}
                        for c, r in runs.items()},
        "runs": runs,
    }
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    print("| measurement | " + " | ".join(f"{c} GB/s" for c in checkouts) + " |")
    print("|---|" + "---:|" * len(checkouts))
    for what in MEASURES:
        print(f"| {what} | " + " | ".join(f"{result['median_gbps'][c][what]:.2f}"
                                          for c in checkouts) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
