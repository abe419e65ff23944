"""Quickstart: make a model offline, convert it, verify, load and benchmark it, serve it with
vLLM (`--load-format sllm`) and query it; then start a node daemon and the router on this
machine and send a chat request that starts a replica from zero.

    python examples/quickstart.py [--preset small-llama|bench-2gb] [--workdir DIR] [--no-serve]

Everything runs on this machine with no network: the model has random weights from a config
and a tokenizer trained in a second. Each step prints what it did; the load is checked bit for
bit against the safetensors original.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

import sllm_plugin
from sllm_plugin.loader import LoadStats
from sllm_plugin.testing import PRESETS, make_random_model

# What the commands below need in their environment on a CPU server: vLLM's CPU backend
# otherwise reserves 0.92 of the NUMA node's memory at start and fails where it cannot (a
# 24 GiB VM whose node 0 reports 16 GiB), and the hub is unreachable here.
CPU_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}


def venv_bin(name: str) -> str:
    """`name` in this interpreter's bin directory, as a path a shell in the current directory
    can run (`.venv/bin/sllm`): the printed commands work when copied into a fresh shell."""
    path = Path(sys.executable).parent / name
    try:
        return os.path.relpath(path)
    except ValueError:
        return str(path)


def shown(argv: list[str], env: dict[str, str] | None = None) -> str:
    """The command line as a user would type it, environment first."""
    prefix = [f"{k}={shlex.quote(v)}" for k, v in (env or {}).items()]
    return " ".join([*prefix, shlex.join(argv)])


def sllm(*args: str) -> None:
    """Run the `sllm` CLI as a user would, printing the command that does it."""
    print(f"$ {shown([venv_bin('sllm'), *args])}", flush=True)
    subprocess.run([sys.executable, "-m", "sllm_plugin.cli", *args], check=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small-llama", choices=sorted(PRESETS))
    parser.add_argument("--workdir", type=Path, default=Path("work-data"))
    parser.add_argument("--no-serve", action="store_true", help="skip the vLLM step")
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
    if args.no_serve:
        return 0
    return serve_and_query(ckpt) or node_and_router(hf_dir, args.workdir)


def serve_and_query(ckpt: Path) -> int:
    """Step 6: vLLM OpenAI server on the checkpoint, one completion and one chat request."""
    import socket

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # `vllm serve CKPT --load-format sllm` with a GPU build of vLLM; the vllm-cpu package's
    # console script is broken, and this module entry point works with both.
    args = ["-m", "vllm.entrypoints.openai.api_server", "--model", str(ckpt),
            "--load-format", "sllm", "--port", str(port), "--host", "127.0.0.1",
            "--enforce-eager", "--max-model-len", "512", "--served-model-name", "demo"]
    cmd = [sys.executable, *args]
    print(f"== 6. serving it with vLLM:\n$ {shown([venv_bin('python'), *args], CPU_ENV)}",
          flush=True)
    env = {**CPU_ENV, **os.environ}
    log_path = ckpt.parent / "vllm-demo.log"
    with open(log_path, "w") as log:
        server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            url = f"http://127.0.0.1:{port}"
            started = time.monotonic()
            while True:
                if server.poll() is not None:
                    print(f"   vLLM exited ({server.returncode}); see {log_path}")
                    return 1
                try:
                    if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() - started > 600:
                    print(f"   vLLM not ready after 600 s; see {log_path}")
                    return 1
                time.sleep(1)
            print(f"   ready after {time.monotonic() - started:.0f} s")
            for line in log_path.read_text().splitlines():
                if "sllm: loaded" in line:
                    print("   " + line.split("] ", 1)[-1])
            r = httpx.post(f"{url}/v1/completions", timeout=120, json={
                "model": "demo", "prompt": "The quick brown fox", "max_tokens": 12,
                "temperature": 0, "ignore_eos": True})
            r.raise_for_status()
            print(f"   completion: {r.json()['choices'][0]['text']!r}")
            r = httpx.post(f"{url}/v1/chat/completions", timeout=120, json={
                "model": "demo", "max_tokens": 12, "temperature": 0, "ignore_eos": True,
                "messages": [{"role": "user", "content": "hello world"}]})
            r.raise_for_status()
            body = r.json()
            print(f"   chat: {body['choices'][0]['message']['content']!r} "
                  f"({body['usage']['completion_tokens']} tokens)")
            print("   (random weights: the words are noise, often special tokens the decoder "
                  "drops; the path is real)")
        finally:
            server.terminate()
            server.wait(timeout=60)
    return 0


def start_daemon(argv: list[str], port: int, log_path: Path) -> subprocess.Popen:
    import httpx

    print(f"$ {shown([venv_bin('sllm'), *argv])}", flush=True)
    proc = subprocess.Popen([sys.executable, "-m", "sllm_plugin.cli", *argv],
                            stdout=open(log_path, "w"), stderr=subprocess.STDOUT)  # noqa: SIM115
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"sllm {argv[0]} exited ({proc.returncode}); see {log_path}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)


def node_and_router(hf_dir: Path, workdir: Path) -> int:
    """Step 7: `sllm node` and `sllm router` on this machine; a chat request through the router
    starts a replica from zero (fetch, convert, promote to DRAM, load, serve)."""
    import shutil
    import socket

    import httpx
    import yaml

    def port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    node_port, router_port = port(), port()
    dram = Path(f"/dev/shm/sllm-quickstart-{os.getuid()}")
    config = workdir / "node.yaml"
    config.write_text(yaml.safe_dump({
        "port": node_port, "state_dir": str(workdir / "node-state"),
        "dram": {"path": str(dram), "capacity": "4GiB"},
        "ssd": {"path": str(workdir / "node-ssd"), "capacity": "8GiB"},
        # CPU replicas here; on a GPU server leave these out.
        "replica_args": ["--enforce-eager", "--max-model-len", "512"],
        "replica_env": CPU_ENV,
    }))
    print("== 7. a node daemon and the router; a chat request starts a replica from zero")
    node = start_daemon(["node", "--config", str(config)], node_port, workdir / "node.log")
    router = None
    try:
        status = httpx.get(f"http://127.0.0.1:{node_port}/status").json()
        print("   node tiers (read bandwidth measured at start): " + ", ".join(
            f"{t['name']} {t['read_gbps']:.2f} GB/s at {t['path']}" for t in status["tiers"]))
        # The node made its token in its state directory; a router on this host could find
        # it in the default one by itself, and is told where this one is.
        router = start_daemon(["router", "--port", str(router_port), "--node",
                               f"http://127.0.0.1:{node_port}", "--node-token-file",
                               str(workdir / "node-state" / "token"), "--model",
                               f"demo/model={hf_dir.resolve()}"], router_port,
                              workdir / "router.log")
        started = time.monotonic()
        r = httpx.post(f"http://127.0.0.1:{router_port}/v1/chat/completions", timeout=900,
                       json={"model": "demo/model", "max_tokens": 12, "temperature": 0,
                             "ignore_eos": True,
                             "messages": [{"role": "user", "content": "hello world"}]})
        r.raise_for_status()
        body = r.json()
        print(f"   chat through the router after {time.monotonic() - started:.0f} s (cold "
              f"start included), served by replica {r.headers.get('x-sllm-replica')}: "
              f"{body['usage']['completion_tokens']} tokens")
        replica = httpx.get(f"http://127.0.0.1:{node_port}/replicas").json()[0]
        phases = ", ".join(f"{k} {v:.2f} s" for k, v in replica["phases"].items())
        print(f"   replica from the {replica['tier']} tier; phases: {phases}")
    finally:
        for proc in (router, node):
            if proc is not None:
                proc.terminate()
                proc.wait(timeout=120)
        shutil.rmtree(dram, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
