"""Run by tests/test_prefork.py as `python -m tests.prefork_probe ARGS` (forked by the prefork
helper, or Popen'd): prints what a replica inherits, as one JSON line, then exits with 3."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading

import torch


def main() -> int:
    print(json.dumps({
        "pid": os.getpid(), "sid": os.getsid(0), "pgid": os.getpgid(0),
        "cores": sorted(os.sched_getaffinity(0)), "cwd": os.getcwd(), "path0": sys.path[0], "argv": sys.argv[1:],
        "marker": os.environ.get("SLLM_PROBE_MARKER"), "stdin": sys.stdin.read(),
        "sigchld_default": signal.getsignal(signal.SIGCHLD) == signal.SIG_DFL,
        "sigint_python": signal.getsignal(signal.SIGINT) is signal.default_int_handler,
        "threads": threading.active_count(), "name": __name__,
        # an OpenMP parallel op in the child: hangs if a thread pool was lost in the fork
        "matmul": float(torch.ones(256, 256).matmul(torch.ones(256, 256)).sum()),
    }))
    print("to stderr", file=sys.stderr)
    return 3


if __name__ == "__main__":
    sys.exit(main())
