"""Quickstart: make a model offline, convert it, verify it, load it, and benchmark the load.

    python examples/quickstart.py [--preset small-llama|bench-2gb] [--workdir DIR]

Everything runs on this machine with no network: the model has random weights from a config
and a tokenizer trained in a second. Each step prints what it did; the load is checked bit for
bit against the safetensors original.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

import sllm_plugin
from sllm_plugin.loader import LoadStats
from sllm_plugin.testing import PRESETS, make_random_model


def sllm(*args: str) -> None:
    """Run the `sllm` CLI as a user would."""
    print(f"$ sllm {' '.join(args)}", flush=True)
    subprocess.run([sys.executable, "-m", "sllm_plugin.cli", *args], check=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small-llama", choices=sorted(PRESETS))
    parser.add_argument("--workdir", type=Path, default=Path("work-data"))
    args = parser.parse_args()

    hf_dir = args.workdir / f"{args.preset}-hf"
    ckpt = args.workdir / f"{args.preset}.sllm"
    if not (hf_dir / "config.json").exists():
        print(f"== 1. making a random {args.preset} model offline in {hf_dir}")
        make_random_model(hf_dir, args.preset)
    else:
        print(f"== 1. reusing the model in {hf_dir}")

    print("== 2. converting it to the sllm format")
    sllm("convert", str(hf_dir), str(ckpt), "--overwrite")
    sllm("inspect", str(ckpt), "--limit", "5")

    print("== 3. verifying every checksum")
    sllm("verify", str(ckpt))

    print("== 4. loading it, and comparing with the safetensors original bit for bit")
    stats = LoadStats()
    loaded = sllm_plugin.load_state_dict(ckpt, stats=stats)
    print(f"   {stats.summary()}")
    original: dict[str, torch.Tensor] = {}
    for f in sorted(hf_dir.glob("*.safetensors")):
        original.update(load_file(f))
    mismatched = [
        name for name, t in original.items()
        if not torch.equal(t.reshape(-1).view(torch.uint8),
                           loaded[name].reshape(-1).view(torch.uint8))
    ]
    if mismatched or set(original) != set(loaded):
        print(f"   MISMATCH: {mismatched[:5]} / {set(original) ^ set(loaded)}")
        return 1
    print(f"   all {len(original)} tensors identical")

    print("== 5. benchmarking loads beside this machine's raw limits")
    sllm("bench", str(ckpt), "--repeats", "3")
    return 0


if __name__ == "__main__":
    sys.exit(main())
