"""Shared fixtures: small models made offline, and bit-exact tensor comparison."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch


def tensor_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def assert_bit_equal(expected: dict[str, torch.Tensor], actual: dict[str, torch.Tensor]) -> None:
    """Same names, dtypes, shapes, and every byte."""
    assert sorted(actual) == sorted(expected)
    for name, want in expected.items():
        got = actual[name]
        assert got.dtype == want.dtype, name
        assert tuple(got.shape) == tuple(want.shape), name
        assert torch.equal(tensor_bytes(got), tensor_bytes(want)), f"bytes differ in {name}"


def edit_index(checkpoint: Path, edit) -> None:
    """Apply `edit(dict)` to a checkpoint's index JSON in place (for bad-input tests)."""
    path = checkpoint / "sllm-index.json"
    raw = json.loads(path.read_text())
    edit(raw)
    path.write_text(json.dumps(raw))


@contextlib.contextmanager
def deadline(seconds: float):
    """A hang (an open or read blocked on a FIFO) becomes a test failure, not a stuck suite."""

    def expired(*_):
        raise TimeoutError(f"still blocked after {seconds} s")

    old = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 300):
    """Run `python -m sllm_plugin.cli ARGS` and return the CompletedProcess."""
    return subprocess.run(
        [sys.executable, "-m", "sllm_plugin.cli", *args],
        capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})},
    )


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A sharded tiny Llama in Hugging Face layout with config and tokenizer (made offline)."""
    from sllm_plugin.testing import make_random_model

    return make_random_model(tmp_path_factory.mktemp("hf") / "tiny-llama", "tiny-llama",
                             max_shard_size="200KB")


@pytest.fixture(scope="session")
def tiny_model_state(tiny_model) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for f in sorted(tiny_model.glob("*.safetensors")):
        state.update(load_file(f))
    return state


def mount_or_skip(fs_type: str, where: Path, options: str = ""):
    """Mount a small real file system for a test (needs root; skips with the reason otherwise)."""
    import pytest

    where.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip(f"mounting a {fs_type} needs root")
    cmd = ["mount", "-t", fs_type, *(["-o", options] if options else []), fs_type, str(where)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a {fs_type} here: {r.stderr.strip()}")
    return where


def unmount(where: Path) -> None:
    subprocess.run(["umount", str(where)], check=False)
