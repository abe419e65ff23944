"""CUDA path check and timing, for a machine with a GPU (run by benchmarks/gpu_check.sh).

    python benchmarks/bench_cuda.py --workdir DIR [--repeats 3]

1. Makes a ~2 GB bf16 random Llama as safetensors (no transformers needed: shapes listed here),
   converts it with `sllm convert`.
2. Correctness: `load_state_dict(..., "cuda")` (with and without verify) equals the CPU load
   bit for bit, tensors are 256-byte aligned on the device, tied names share storage.
3. Timing, warm (page cache) and cold (drop_caches as root, else fadvise), medians, side by
   side: sllm to cuda; safetensors `load_file(device="cuda")`; vLLM's default iteration
   (`safe_open` + `get_tensor` + `.to("cuda")`); and the raw limits measured in the same run:
   pinned host-to-device copy bandwidth and O_DIRECT read.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch


def make_safetensors(directory: Path, layers: int = 20) -> Path:
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    out = directory / "model.safetensors"
    if out.exists():
        return directory
    h, inter, vocab, kv = 2048, 5632, 32000, 256
    g = torch.Generator().manual_seed(0)
    shapes = {"model.embed_tokens.weight": (vocab, h), "lm_head.weight": (vocab, h),
              "model.norm.weight": (h,)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
                   p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
                   p + "mlp.gate_proj.weight": (inter, h), p + "mlp.up_proj.weight": (inter, h),
                   p + "mlp.down_proj.weight": (h, inter), p + "input_layernorm.weight": (h,),
                   p + "post_attention_layernorm.weight": (h,)}
    save_file({k: torch.randn(s, generator=g).to(torch.bfloat16) for k, s in shapes.items()}, out)
    return directory


def timed(fn) -> float:
    torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t
    del out
    torch.cuda.empty_cache()
    return seconds


def main() -> int:
    from safetensors import safe_open
    from safetensors.torch import load_file

    from sllm_plugin import convert, load_state_dict
    from sllm_plugin.format import open_checkpoint
    from sllm_plugin.loader.bench import evict_page_cache, raw_read_gbps, warm_page_cache

    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    hf = make_safetensors(args.workdir / "hf")
    ckpt = args.workdir / "model.sllm"
    if not ckpt.exists():
        convert(hf, ckpt, quiet=True)
    st_file = hf / "model.safetensors"
    nbytes = open_checkpoint(ckpt).index.tensor_bytes
    report: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                    "bytes": nbytes}

    # Correctness first.
    cpu = load_state_dict(ckpt)
    for verify in (False, True):
        gpu = load_state_dict(ckpt, "cuda", verify=verify)
        bad = [n for n, t in cpu.items()
               if not torch.equal(t.view(-1).view(torch.uint8),
                                  gpu[n].cpu().view(-1).view(torch.uint8))]
        misaligned = [n for n, t in gpu.items() if t.numel() and t.data_ptr() % 256]
        assert not bad and not misaligned, (bad[:3], misaligned[:3])
        del gpu
    report["correct"] = True
    print("correctness: CUDA load equals CPU load bit for bit", file=sys.stderr, flush=True)

    # Raw limits.
    pinned = torch.empty(256 << 20, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    h2d = [(256 << 20) / 1e9 / timed(lambda: dev.copy_(pinned, non_blocking=True))
           for _ in range(5)]
    report["raw_h2d_pinned_gbps"] = statistics.median(h2d)
    files = list(open_checkpoint(ckpt).file_paths.values())
    direct = []
    for _ in range(args.repeats):
        evict_page_cache(files)
        direct.append(raw_read_gbps(ckpt, threads=8, direct=True))
    report["raw_direct_read_gbps"] = statistics.median(direct)

    def vllm_iter():
        out = {}
        with safe_open(st_file, framework="pt") as f:
            for k in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                out[k] = f.get_tensor(k).to("cuda")
        return out

    loaders = {
        "sllm": (lambda: load_state_dict(ckpt, "cuda"), files),
        "safetensors load_file(cuda)": (lambda: load_file(st_file, device="cuda"), [st_file]),
        "vllm safe_open + .to(cuda)": (vllm_iter, [st_file]),
    }
    for name, (fn, paths) in loaders.items():
        for mode in ("warm", "cold"):
            runs = []
            for _ in range(args.repeats):
                if mode == "warm":
                    warm_page_cache(paths)
                else:
                    evict_page_cache(paths)
                runs.append(nbytes / 1e9 / timed(fn))
            report[f"{name} {mode} GB/s"] = statistics.median(runs)
            print(f"{name} {mode}: {statistics.median(runs):.2f} GB/s", file=sys.stderr,
                  flush=True)
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
