"""Benchmark-only instrumentation, put on PYTHONPATH by benchmarks/bench_vllm.py.

Times the CPU model runner's whole `load_model` (model init + weights + post-processing) the same
way for every load format, since vLLM's own "Loading weights took" line is printed by some
loaders only. Never installed with the package.
"""

import sys
import time

try:
    import wrapt
except ImportError:  # not in this environment: no timing, nothing else changes
    wrapt = None


def _hook(module) -> None:
    runner = module.CPUModelRunner
    original = runner.load_model

    def timed_load_model(self, *args, **kwargs):
        t = time.perf_counter()
        result = original(self, *args, **kwargs)
        print(f"SLLM-BENCH load_model {time.perf_counter() - t:.3f}", file=sys.stderr,
              flush=True)
        return result

    runner.load_model = timed_load_model


if wrapt is not None:
    wrapt.register_post_import_hook(_hook, "vllm.v1.worker.cpu_model_runner")
