#!/usr/bin/env bash
# One call on a GPU machine (no network there): build the compiled core in place, run the CUDA
# tests, then time the CUDA path against the peers. Fits in 10 minutes on one H100.
#   device run:  bash benchmarks/gpu_check.sh      (results land in $OUT)
# pydantic is not in that image: carry it as wheels in .whl/ (see the device tool's README).
set -euo pipefail
OUT="${OUT:-/tmp/gpu-out}"; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 setup.py -q build_ext --inplace 2>&1 | tail -3
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_roundtrip.py 2>&1 \
    | tee "$OUT/tests.txt" | tail -5
python3 benchmarks/bench_cuda.py --workdir /tmp/sllm-gpu --repeats 3 2>&1 | tee "$OUT/bench.json"
