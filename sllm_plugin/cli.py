"""The `sllm` command line: convert, inspect, verify, bench, save-vllm, node, node-token, router.

Exit status: 0 success, 1 a checkpoint or source is invalid or corrupt (the message names the
file and tensor), 2 bad usage (argparse), 3 the destination exists (convert without
--overwrite), 4 an I/O failure such as a full disk, 5 a package the command needs is not
installed (the message names the extra that brings it).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

EXIT_FORMAT, EXIT_EXISTS, EXIT_IO, EXIT_MISSING = 1, 3, 4, 5
# The extra that brings what each command imports beyond the core dependencies.
_EXTRA_FOR = {"node": "node", "router": "router", "save-vllm": "vllm", "simulate": "sim"}


def _size(text: str) -> int:
    """Parse a byte size such as 16777216, 16MiB, 4GiB or 500MB."""
    units = {"kib": 1024, "mib": 1024**2, "gib": 1024**3, "kb": 1000, "mb": 1000**2,
             "gb": 1000**3, "b": 1}
    t = text.strip().lower()
    suffix = next((s for s in units if t.endswith(s)), "")
    number, mult = t[: len(t) - len(suffix)].strip(), units.get(suffix, 1)
    try:
        value = int(float(number) * mult)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive: {text!r}")
    return value


def _count(minimum: int):
    """An argparse type: an integer of at least `minimum` (a repeat count, a thread count)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def _cmd_convert(args: argparse.Namespace) -> int:
    from .format.convert import convert
    from .format.spec import DEFAULT_CHUNK_BYTES, DEFAULT_PARTITION_BYTES

    out = convert(
        args.src,
        args.dst,
        overwrite=args.overwrite,
        revision=args.revision,
        quiet=args.quiet,
        chunk_bytes=args.chunk_size or DEFAULT_CHUNK_BYTES,
        partition_bytes=args.partition_size or DEFAULT_PARTITION_BYTES,
    )
    if not args.quiet:
        print(f"wrote {out}")
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from .format.reader import open_checkpoint

    ckpt = open_checkpoint(args.path)
    index = ckpt.index
    if args.json:
        print(index.to_json(), end="")
        return 0
    src = index.source
    print(f"{args.path}: sllm format v{index.version}, layout {index.layout}")
    print(f"  source: {src.model_id or '-'} (revision {src.revision or '-'}, from "
          f"{src.converted_from or '-'}, by {src.converter or '-'}, {src.created or '-'})")
    if index.engine:
        e = index.engine
        print(f"  engine: {e.engine} {e.engine_version}, TP {e.tensor_parallel_size} rank {e.rank}"
              f", dtype {e.dtype}, quantization {e.quantization or 'none'}")
    print(f"  {len(index.tensors)} tensors + {len(index.aliases)} aliases, "
          f"{index.tensor_bytes / 1e9:.3f} GB of tensor data in {len(index.files)} file(s), "
          f"{index.total_bytes / 1e9:.3f} GB on disk; checksum {index.checksum.algorithm} per "
          f"{index.checksum.chunk_bytes // 1024} KiB")
    dtypes: dict[str, int] = {}
    for t in index.tensors:
        dtypes[t.dtype] = dtypes.get(t.dtype, 0) + t.bytes
    print("  dtypes: " + ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in sorted(dtypes.items())))
    print(f"  engine shape: {_shape_line(args.path, index)}")
    for t in index.tensors[: args.limit]:
        print(f"    {t.name:<60} {t.dtype:<14} {str(t.shape):<20} {t.file}@{t.offset}")
    if len(index.tensors) > args.limit:
        print(f"    ... {len(index.tensors) - args.limit} more (--limit N, or --json)")
    for alias, target in index.aliases.items():
        print(f"    {alias} -> {target}")
    return 0


def _shape_line(path: str, index) -> str:
    """The engine shape, recomputed from the files (authoritative), and whether the index
    recorded the same value."""
    from .format.shape import checkpoint_shape, stored_shape

    stored = stored_shape(index, path)
    digest = checkpoint_shape(path).digest
    if stored is None:
        return f"{digest[:16]} (computed)"
    if stored == digest:
        return f"{digest[:16]} (stored)"
    return (f"{digest[:16]} (computed; the index records {stored[:16]}: the model files "
            "changed since conversion)")


def _cmd_verify(args: argparse.Namespace) -> int:
    from .loader.verify import verify_checkpoint

    report = verify_checkpoint(args.path, threads=args.threads, raise_on_error=False)
    for err in report.errors:
        print(err, file=sys.stderr)
    if not report.ok:
        what = []
        if report.bad_chunks:
            what.append(f"{report.bad_chunks} of {report.chunks} chunks failed")
        if report.bad_tensors:
            what.append(f"{len(report.bad_tensors)} tensor(s) whose chunks pass fail their own "
                        "checksum")
        print(f"{args.path}: CORRUPT: {'; '.join(what)}", file=sys.stderr)
        return EXIT_FORMAT
    print(f"{args.path}: OK: {report.chunks} chunks and every tensor's checksum, "
          f"{report.bytes / 1e9:.3f} GB verified in "
          f"{report.seconds:.2f} s ({report.bytes / 1e9 / max(report.seconds, 1e-9):.2f} GB/s)")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from .loader.bench import run_bench

    res = run_bench(args.path, threads=args.threads, repeats=args.repeats, cold=not args.warm_only,
                    log=None if args.json else lambda m: print(f"... {m}", file=sys.stderr))
    print(json.dumps(res.to_dict(), indent=1) if args.json else res.table())
    return 0


def _cmd_save_vllm(args: argparse.Namespace) -> int:
    from .vllm.save import save_vllm

    engine_args: dict = {"dtype": args.dtype}
    if args.max_model_len:
        engine_args["max_model_len"] = args.max_model_len
    if args.quantization:
        engine_args["quantization"] = args.quantization
    out = save_vllm(args.model, args.dst, tensor_parallel_size=args.tensor_parallel_size,
                    overwrite=args.overwrite, **engine_args)
    print(f"wrote {out} (engine layout, tensor parallel size {args.tensor_parallel_size})")
    return 0


def _cmd_node(args: argparse.Namespace) -> int:
    from .store.api import serve
    from .store.config import ConfigError, load_config
    from .store.node import Node

    try:
        config = load_config(
            args.config, host=args.host, port=args.port, advertise=args.advertise,
            token_file=args.token_file,
            state_dir=args.state_dir, allowed_hosts=args.allowed_host,
            devices=args.devices, **{"dram.path": args.dram_dir,
                                     "dram.capacity": args.dram_capacity,
                                     "ssd.path": args.ssd_dir, "ssd.capacity": args.ssd_capacity})
    except ConfigError as e:
        print(f"sllm node: error: {e}", file=sys.stderr)
        return 2
    if args.check_config:
        return _check_config("node", config)
    logging.getLogger("sllm_plugin").setLevel(logging.INFO)
    from .store.hugetmpfs import HugeTmpfsError
    from .store.node import NodeError
    from .store.statedir import StateDirError
    from .store.tiers import TierError
    from .tokens import TokenError

    try:
        node = Node(config)
    except (HugeTmpfsError, NodeError, StateDirError, TierError, TokenError) as e:
        print(f"sllm node: error: {e}", file=sys.stderr)
        return 2
    node.start(calibrate=not args.no_calibrate)
    serve(node, config.host, config.port)  # its shutdown stops the replicas (see store.api)
    return 0


def _cmd_node_token(args: argparse.Namespace) -> int:
    from .tokens import TokenError, local_node_token, node_token_path

    try:
        token = local_node_token(args.state_dir)
    except TokenError as e:
        print(f"sllm node-token: error: {e}", file=sys.stderr)
        return 1
    if token is None:
        print(f"sllm node-token: error: no token at {node_token_path(args.state_dir)}: a node "
              "makes one there when it starts with neither token_file nor $SLLM_NODE_TOKEN",
              file=sys.stderr)
        return 1
    print(token)
    return 0


def _rate(text: str) -> float:
    try:
        rate = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < rate <= 1e6:
        raise argparse.ArgumentTypeError(f"a rate must be in (0, 1e6] requests/s: {text!r}")
    return rate


def _loads(text: str) -> list[float]:
    try:
        loads = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of numbers: {text!r}") from None
    if not loads or any(not 0 < x <= 1e6 for x in loads):
        raise argparse.ArgumentTypeError(f"loads must be numbers in (0, 1e6]: {text!r}")
    return loads


# `sllm simulate --preset`: servers, and the mean request rate a trace is scaled to (our
# choice: a load the fleet can serve with room to scale models to zero; see README).
SIM_PRESETS = {"testbed": (8, 0.5), "fleet100": (100, 5.0)}


def _cmd_simulate(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from .configfile import ConfigError
    from .sim.fleet import FleetConfig, seed_testbed
    from .sim.run import compare, trace_rate
    from .sim.traces import TraceError
    from .sim.workload import preset

    servers, rps = SIM_PRESETS[args.preset]
    try:
        fleet = (FleetConfig.from_yaml(args.fleet, servers=args.servers) if args.fleet
                 else seed_testbed(args.servers or servers))
        native = trace_rate(args.trace, args.format, args.limit)
        rps = args.rps or rps
        workload = preset("testbed" if args.preset == "testbed" else "population",
                          time_scale=rps / native,
                          **{k: v for k, v in (("models", args.models), ("zipf_s", args.zipf),
                                                ("seed", args.seed)) if v is not None})
        print(f"trace: {native:.3f} requests/s, scaled to {rps:g}"
              f"{' x ' + ','.join(f'{x:g}' for x in args.loads) if args.loads != [1.0] else ''}",
              file=sys.stderr)
        result = compare(args.trace, fleet, workload, policies=args.policies.split(","),
                         loads=args.loads, trace_format=args.format, limit=args.limit,
                         seed=args.seed or 0, out=args.out, progress=not args.quiet,
                         load_label=f"load (x {rps:g} requests/s)")
    except (ConfigError, TraceError, ValidationError, ValueError) as e:
        print(f"sllm simulate: error: {e}", file=sys.stderr)
        return 2
    first = args.loads[0]
    print(f"{fleet.servers} servers x {fleet.gpus} GPUs, {workload.models} models, "
          f"load x{first} ({len(result.by_load[first][0].records)} requests):\n")
    print(result.table)
    for path in result.files:
        print(f"wrote {path}")
    return 0


def _cmd_router(args: argparse.Namespace) -> int:
    from .router.app import serve
    from .router.config import ConfigError, ModelSpec, check_model_name, load_config

    try:
        nodes = None
        if args.node:
            nodes = [{"name": f"node{i}", "url": url, "token_file": args.node_token_file}
                     for i, url in enumerate(args.node)]
        elif args.node_token_file and not args.discover:
            raise ValueError("--node-token-file applies to --node and --discover nodes; give "
                             "--node URL or --discover dns://NAME:PORT (or a token_file per "
                             "node in the --config file)")
        config = load_config(args.config, host=args.host, port=args.port,
                             admin_token_file=args.admin_token_file, nodes=nodes,
                             discover=args.discover,
                             discover_token_file=args.node_token_file if args.discover
                             else None)
        for entry in args.model or []:
            name, sep, source = entry.partition("=")
            if not sep or not name or not source:
                raise ValueError(f"--model {entry!r}: use NAME=SOURCE")
            config.models[check_model_name(name)] = ModelSpec(
                source=source, replica_args=args.replica_arg or [])
    except (ConfigError, ValueError) as e:
        print(f"sllm router: error: {e}", file=sys.stderr)
        return 2
    if args.check_config:
        return _check_config("router", config, args.node_token_file)
    logging.getLogger("sllm_plugin").setLevel(
        logging.DEBUG if os.environ.get("SLLM_DEBUG") else logging.INFO)
    serve(config)
    return 0


def _check_config(command: str, config, *extra) -> int:
    """--check-config: the checks a start makes that need no network and change nothing."""
    from .configcheck import CheckError, check_node, check_router

    try:
        summary = (check_node if command == "node" else check_router)(config, *extra)
    except CheckError as e:
        print(f"sllm {command}: error: {e}", file=sys.stderr)
        return 2
    print(f"configuration OK: {summary}")
    return 0


class _NoTokenOnArgv(argparse.Action):
    """A flag that would put a token on the command line: refused, saying what to use."""

    def __init__(self, option_strings, dest, instead: str = "", **kwargs) -> None:
        self.instead = instead
        super().__init__(option_strings, dest, nargs="?", help=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        parser.error(f"{option_string} is not accepted: a token on the command line is visible "
                     f"to every user (ps); use {self.instead}")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="sllm", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"sllm_plugin {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="convert a safetensors model into an sllm checkpoint")
    p.add_argument("src", help="a .safetensors file, a model directory, or a Hugging Face hub id")
    p.add_argument("dst", help="the checkpoint directory to create")
    p.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint")
    p.add_argument("--revision", help="hub revision (branch, tag or commit)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar or summary")
    p.add_argument("--chunk-size", type=_size, help="checksum chunk size (default 16MiB)")
    p.add_argument("--partition-size", type=_size, help="max data file size (default 4GiB)")
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser("inspect", help="show what a checkpoint holds")
    p.add_argument("path")
    p.add_argument("--json", action="store_true", help="print the whole index as JSON")
    p.add_argument("--limit", type=_count(0), default=20, help="tensors to list (default 20)")
    p.set_defaults(func=_cmd_inspect)

    p = sub.add_parser("verify", help="check every chunk's checksum; exit 1 if any is corrupt")
    p.add_argument("path")
    p.add_argument("--threads", type=_count(1))
    p.set_defaults(func=_cmd_verify)

    p = sub.add_parser(
        "save-vllm",
        help="save the engine layout (per-rank, post-load tensors) from a running vLLM",
    )
    p.add_argument("model", help="an sllm checkpoint, a safetensors model directory or a hub id")
    p.add_argument("dst", help="the engine checkpoint directory to create")
    p.add_argument("--tensor-parallel-size", "-tp", type=_count(1), default=1)
    p.add_argument("--dtype", default="auto", help="as vLLM's --dtype (default auto)")
    p.add_argument("--quantization", help="as vLLM's --quantization")
    p.add_argument("--max-model-len", type=_count(1), help="as vLLM's --max-model-len")
    p.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint")
    p.set_defaults(func=_cmd_save_vllm)

    p = sub.add_parser("bench", help="load throughput warm and cold beside the raw limits")
    p.add_argument("path")
    p.add_argument("--threads", type=_count(1))
    p.add_argument("--repeats", type=_count(1), default=3, help="loads per measurement "
                   "(default 3; the median is reported)")
    p.add_argument("--warm-only", action="store_true", help="skip the cold measurements")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_bench)

    # No abbreviations: "--tok SECRET" must not become "--token-file SECRET" (then echoed).
    p = sub.add_parser("node", help="run the node daemon: checkpoint tiers and vLLM replicas",
                       allow_abbrev=False)
    p.add_argument("--config", help="YAML configuration file (flags override it)")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--advertise", metavar="HOST",
                   help="the address other hosts reach this node and its replicas by (default: "
                        "--host, or with 0.0.0.0 the first non-loopback interface's)")
    p.add_argument("--token-file",
                   help="file (0600) holding the bearer token for mutating calls; default "
                        "$SLLM_NODE_TOKEN, else STATE_DIR/token, made at first start")
    p.add_argument("--token", action=_NoTokenOnArgv,
                   instead="--token-file FILE (0600) or $SLLM_NODE_TOKEN, or let the node make "
                           "one in its state directory")
    p.add_argument("--state-dir", help="the daemon's private state directory (default "
                                       "~/.local/state/sllm_plugin/node)")
    p.add_argument("--allowed-host", action="append", metavar="NAME",
                   help="a further name clients may use in the Host header (repeatable; "
                        "'*.example.com' for subdomains)")
    p.add_argument("--dram-dir", help="DRAM tier directory (default /dev/shm/sllm-node-UID)")
    p.add_argument("--dram-capacity", help="DRAM tier size, e.g. 8GiB (default 1/4 of memory)")
    p.add_argument("--ssd-dir", help="SSD tier directory")
    p.add_argument("--ssd-capacity", help="SSD tier size (default half the free space)")
    p.add_argument("--devices", nargs="+", help="'cuda:N' or 'cpu:A-B' (default: detected)")
    p.add_argument("--no-calibrate", action="store_true",
                   help="skip the start-up bandwidth measurement")
    p.add_argument("--check-config", action="store_true",
                   help="check the configuration and flags as a start would, start nothing; "
                        "exit 0 if it would start, 2 saying why not")
    p.set_defaults(func=_cmd_node)

    p = sub.add_parser("node-token", help="print the token of this host's node daemon "
                                          "(e.g. TOKEN=$(sllm node-token))")
    p.add_argument("--state-dir", help="the node's state directory (default "
                                       "~/.local/state/sllm_plugin/node)")
    p.set_defaults(func=_cmd_node_token)

    # No abbreviations: "--admin-token X" must not pass for "--admin-token-file X".
    p = sub.add_parser("router", help="run the OpenAI-compatible router in front of nodes",
                       allow_abbrev=False)
    p.add_argument("--config", help="YAML configuration file (flags override it)")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--admin-token-file", metavar="FILE",
                   help="a file (mode 0600) holding the bearer token for /admin (or "
                        "SLLM_ROUTER_TOKEN in the environment); without one, /admin is off")
    p.add_argument("--admin-token", action=_NoTokenOnArgv,
                   instead="--admin-token-file FILE or SLLM_ROUTER_TOKEN")
    p.add_argument("--node", action="append", metavar="URL",
                   help="a node daemon, http(s)://host[:port] (repeatable; default "
                        "http://127.0.0.1:8073)")
    p.add_argument("--discover", metavar="dns://NAME:PORT",
                   help="find node daemons in DNS: every A/AAAA record of NAME is a node at "
                        "http://ADDRESS:PORT, looked up again every discover_interval_s "
                        "(default 5 s); combines with --node")
    p.add_argument("--node-token-file", metavar="FILE",
                   help="a file (mode 0600) holding the --node and --discover daemons' token (else "
                        "SLLM_NODE_TOKEN; a node on this host with neither: the token it "
                        "made in its state directory)")
    p.add_argument("--model", action="append", metavar="NAME=SOURCE",
                   help="serve a model (hub id, path or URL; repeatable)")
    p.add_argument("--replica-arg", action="append", metavar="ARG",
                   help="an extra vLLM flag for --model replicas (repeatable), e.g. "
                        "--replica-arg=--enforce-eager")
    p.add_argument("--check-config", action="store_true",
                   help="check the configuration and flags as a start would, start nothing; "
                        "exit 0 if it would start, 2 saying why not")
    p.set_defaults(func=_cmd_router)

    p = sub.add_parser("simulate", aliases=["sim"], help="simulate a fleet on a request trace "
                       "and compare placement policies (ours, the seed's, Ray Serve's, "
                       "KServe's, an oracle)")
    p.add_argument("--trace", required=True, help="Azure LLM CSV, Mooncake JSONL, or a CSV / "
                   "JSONL of arrival, input and output tokens")
    p.add_argument("--format", choices=["azure", "mooncake", "csv", "jsonl"],
                   help="the trace's format (default: detected)")
    p.add_argument("--limit", type=_count(1), help="the trace's first N requests")
    p.add_argument("--preset", choices=["testbed", "fleet100"], default="testbed",
                   help="testbed: the seed's 8 servers x 8 A5000 and 40 models (default); "
                   "fleet100: 100 such servers and 1,000 models")
    p.add_argument("--fleet", type=Path, help="a YAML file of fleet settings (FleetConfig)")
    p.add_argument("--servers", type=_count(1), help="servers (default: the preset's)")
    p.add_argument("--models", type=_count(1), help="models (default: the preset's)")
    p.add_argument("--zipf", type=float, help="popularity exponent (default 1.0)")
    p.add_argument("--rps", type=_rate, help="mean requests per second the trace is scaled to "
                   "(default: testbed 0.5, fleet100 5)")
    p.add_argument("--loads", type=_loads, default=[1.0], help="load factors, comma separated "
                   "(each multiplies --rps; several draw TTFT against load)")
    p.add_argument("--policies", default="sllm,serverlessllm,ray-serve,kserve,oracle")
    p.add_argument("--seed", type=int, help="seed of the workload and random placements")
    p.add_argument("--out", type=Path, help="a directory for the JSON, markdown and PNGs")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_simulate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from .format.errors import CheckpointExistsError, CheckpointWriteError, FormatError

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except FormatError as e:
        print(f"sllm {args.command}: error: {e}", file=sys.stderr)
        return EXIT_FORMAT
    except CheckpointExistsError as e:
        print(f"sllm {args.command}: error: {e}", file=sys.stderr)
        return EXIT_EXISTS
    except (CheckpointWriteError, OSError) as e:
        print(f"sllm {args.command}: error: {e}", file=sys.stderr)
        return EXIT_IO
    except ModuleNotFoundError as e:
        extra = _EXTRA_FOR.get(args.command, "torch")
        print(f"sllm {args.command}: error: this command needs the Python package {e.name!r}, "
              f"which is not installed here; the '{extra}' extra brings it (pip install "
              f"'.[{extra}]' in the checkout)",
              file=sys.stderr)
        return EXIT_MISSING


if __name__ == "__main__":
    sys.exit(main())
