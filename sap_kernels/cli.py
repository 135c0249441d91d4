"""The `sap-kernels` command line.

    sap-kernels bench [--params 1e9] [--dtype bfloat16] [--masked] [--out DIR]
    sap-kernels pqi CHECKPOINT [--p 0.5 --q 1.0 --scope layer --filter REGEX --json]
    sap-kernels demo ...

Exit status: 0 on success, 1 when the input cannot be used (missing or
unreadable file, not a checkpoint, nothing selected), 2 for a usage error,
130 when interrupted. Errors are one line on stderr; set SAP_KERNELS_DEBUG=1
to see the traceback of an unexpected error.
"""

from __future__ import annotations

import argparse
import inspect
import math
import os
import sys

EXIT_OK = 0
EXIT_INPUT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, as a shell reports a process killed by it

PROG = "sap-kernels"


class InputError(Exception):
    """Input the command cannot use; printed as one line, exit status 1."""


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


# --- pqi -------------------------------------------------------------------


def _add_pqi_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "path",
        help="a .safetensors file, a sharded checkpoint's index (*.safetensors.index.json or "
        "pytorch_model.bin.index.json), a directory holding one, or a torch.save state dict",
    )
    parser.add_argument("--p", type=_float, default=0.5, help="exponent p (default 0.5)")
    parser.add_argument("--q", type=_float, default=1.0, help="exponent q > p (default 1.0)")
    parser.add_argument(
        "--scope",
        choices=["global", "layer", "neuron"],
        default="layer",
        help="global: the global PQI only; layer (default): also a table with one row per "
        "tensor; neuron: also per-row PQI statistics (all rows in --json)",
    )
    which = parser.add_mutually_exclusive_group()
    which.add_argument(
        "--filter",
        metavar="REGEX",
        help="measure the tensors whose name matches REGEX (re.search) instead of the default "
        "rule: names ending in 'weight' with more than one dimension (as sap_kernels.pqi "
        "does for a module)",
    )
    which.add_argument("--all", action="store_true", help="measure every floating tensor")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument(
        "--backend",
        default="auto",
        choices=["auto", "cpu", "cuda", "triton", "reference"],
        help="kernel backend (default auto)",
    )
    parser.add_argument(
        "--block-mb",
        type=_float,
        default=64,
        help="largest block of one tensor read at once, in MiB (default 64)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _format_pqi(value: float) -> str:
    return "nan" if value is None or math.isnan(value) else f"{value:.9f}"


def _pqi_report_text(result) -> str:
    from .checkpoint import DEFAULT_FILTER_DESCRIPTION

    rule = DEFAULT_FILTER_DESCRIPTION if result.filter is None else f"/{result.filter}/"
    lines = [
        f"checkpoint: {result.path} ({result.format})",
        f"p={result.p:g} q={result.q:g} scope={result.scope} tensors: {rule}",
        f"global PQI: {_format_pqi(result.global_pqi)} over {result.total_weights:,} weights "
        f"in {len(result.layers)} tensors",
    ]
    if result.scope != "global":
        header = ["name", "shape", "dtype", "PQI", "zeros"]
        if result.scope == "neuron":
            header += ["row PQI min", "median", "max"]
        rows = []
        for layer in result.layers:
            row = [
                layer.name,
                "x".join(str(s) for s in layer.shape) or "scalar",
                layer.dtype,
                _format_pqi(layer.pqi),
                f"{layer.zero_fraction:.2%}",
            ]
            if result.scope == "neuron":
                row += _row_statistics(layer.row_pqi)
            rows.append(row)
        lines += ["", *_aligned_table(header, rows)]
    if result.skipped:
        lines += ["", f"skipped {len(result.skipped)} tensors:"]
        lines += [f"  {s.name} {list(s.shape)} {s.dtype}: {s.reason}" for s in result.skipped]
    if result.not_selected:
        lines += [f"{len(result.not_selected)} tensors not selected by the filter"]
    return "\n".join(lines)


def _row_statistics(values) -> list[str]:
    finite = sorted(v for v in values if v is not None and not math.isnan(v))
    if not finite:
        return ["nan", "nan", "nan"]
    return [_format_pqi(finite[0]), _format_pqi(finite[len(finite) // 2]), _format_pqi(finite[-1])]


def _aligned_table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    numeric = [i > 0 and all(_looks_numeric(r[i]) for r in rows) for i in range(len(header))]

    def line(cells):
        return "  ".join(
            str(c).rjust(w) if num else str(c).ljust(w) for c, w, num in zip(cells, widths, numeric)
        ).rstrip()

    return [line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)]


def _looks_numeric(text: str) -> bool:
    return text.rstrip("%x").replace(".", "", 1).replace("-", "", 1).isdigit() or text == "nan"


def run_pqi(args: argparse.Namespace) -> int:
    from .checkpoint import ALL_TENSORS, CheckpointError, pqi_of_checkpoint

    if args.block_mb <= 0:
        raise InputError("--block-mb must be positive")
    try:
        result = pqi_of_checkpoint(
            args.path,
            p=args.p,
            q=args.q,
            scope=args.scope,
            filter=ALL_TENSORS if args.all else args.filter,
            backend=args.backend,
            block_bytes=int(args.block_mb * (1 << 20)),
            progress=not args.quiet and not args.json,
        )
    except CheckpointError as error:
        raise InputError(str(error)) from None
    if args.json:
        print(result.to_json())
    else:
        print(_pqi_report_text(result))
    return EXIT_OK


# --- bench -----------------------------------------------------------------


def _add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    ops = "pqi_global,pqi_layer,pqi_neuron,threshold,prune,sap_iteration"
    parser.add_argument(
        "--params",
        type=_float,
        default=None,
        help="parameters of the synthetic model, e.g. 1e9 (default: about 1 GB of weights, "
        "fewer if free memory is short)",
    )
    parser.add_argument(
        "--model-shape",
        metavar="V,H,I,L",
        help="vocab,hidden,intermediate,layers of a Llama-like model (overrides --params), "
        "e.g. 32000,4096,11008,32",
    )
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default=None,
        help="default: cuda if available, else cpu",
    )
    parser.add_argument("--masked", action="store_true", help="time with random masks")
    parser.add_argument(
        "--density",
        type=_float,
        default=0.5,
        help="fraction retained by the --masked masks (default 0.5)",
    )
    parser.add_argument(
        "--backend",
        default="all",
        help="comma-separated kernel backends to time: cpu,cuda,triton (default: all "
        "available); pure PyTorch eager and compiled always run",
    )
    parser.add_argument("--ops", default=None, help=f"comma-separated subset of {ops}")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per op (median)")
    parser.add_argument("--p", type=_float, default=0.5)
    parser.add_argument("--q", type=_float, default=1.0)
    parser.add_argument(
        "--no-compile",
        action="store_true",
        help="skip the torch.compile baseline (saves its compile time)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out", metavar="DIR", help="write bench.json, bench.md and bench.png into DIR"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run_bench(args: argparse.Namespace) -> int:
    from .bench import BenchConfigError, config_from_args, run_benchmark
    from .bench_report import format_table, write_outputs

    try:
        config = config_from_args(args)
    except BenchConfigError as error:
        raise InputError(str(error)) from None
    result = run_benchmark(config, progress=not args.quiet)
    print(format_table(result))
    if args.out:
        paths = write_outputs(result, args.out)
        print("wrote " + ", ".join(paths))
        if not any(path.endswith(".png") for path in paths):
            print("note: no plot (matplotlib is not installed)", file=sys.stderr)
    return EXIT_OK


# --- demo ------------------------------------------------------------------


def _load_demo():
    """(run_demo, add_demo_arguments), or the reason the demo is unavailable."""
    try:
        from . import demo
    except ImportError as error:
        if error.name in ("sap_kernels", "sap_kernels.demo"):
            return None, "the demo is not available: sap_kernels.demo is not in this installation"
        return None, (
            f"the demo is not available: it needs {error.name or error}; "
            "install its extras with `pip install 'sap_kernels[demo]'`"
        )
    missing = [n for n in ("run_demo", "add_demo_arguments") if not hasattr(demo, n)]
    if missing:
        return None, f"sap_kernels.demo lacks {', '.join(missing)}"
    return demo, None


def _call_demo(run_demo, args: argparse.Namespace):
    """run_demo(args) if it takes one positional argument, else run_demo(**options)."""
    options = {k: v for k, v in vars(args).items() if k not in ("command", "handler")}
    parameters = inspect.signature(run_demo).parameters.values()
    positional = [
        p
        for p in parameters
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
    ]
    if len(positional) == 1 and positional[0].name not in options:
        return run_demo(args)
    if any(p.kind == p.VAR_KEYWORD for p in parameters):
        return run_demo(**options)
    names = {p.name for p in parameters}
    return run_demo(**{k: v for k, v in options.items() if k in names})


# --- parser and entry point --------------------------------------------------


def build_parser(load_demo: bool = False) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Exact PQ Index and magnitude pruning kernels for PyTorch.",
        epilog="exit status: 0 success, 1 input that cannot be used (one line on stderr), "
        "2 usage error, 130 interrupted. SAP_KERNELS_DEBUG=1 shows tracebacks.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    bench = commands.add_parser(
        "bench",
        help="time every op on every backend against pure PyTorch and the bandwidth probe",
        description="Times PQI (global/layer/neuron), magnitude threshold, prune and one SAP "
        "iteration on synthetic LLM-shaped weights, on every available backend, against pure "
        "PyTorch (eager float64 reference and torch.compile) and a bandwidth probe.",
    )
    _add_bench_arguments(bench)
    bench.set_defaults(handler=run_bench)

    pqi = commands.add_parser(
        "pqi",
        help="PQ Index of a checkpoint, streamed tensor by tensor",
        description="Global and per-tensor PQ Index of a checkpoint, read in blocks with "
        "bounded memory.",
    )
    _add_pqi_arguments(pqi)
    pqi.set_defaults(handler=run_pqi)

    # sap_kernels.demo (and what it imports) loads only when the demo is asked for
    demo = commands.add_parser("demo", help="run the SAP demo (sap_kernels.demo)")
    if load_demo:
        module, reason = _load_demo()
        if module is None:  # any arguments are accepted, to reach the clear message
            demo.set_defaults(handler=lambda args, reason=reason: _demo_missing(reason))
            demo.set_defaults(demo_missing=True)
        else:
            module.add_demo_arguments(demo)
            if hasattr(module, "run_demo_from_args"):  # its own runner prints its table
                demo.set_defaults(handler=module.run_demo_from_args)
            else:
                demo.set_defaults(
                    handler=lambda args, module=module: _call_demo(module.run_demo, args)
                )
    return parser


def _demo_missing(reason: str) -> int:
    raise InputError(reason)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(load_demo=bool(argv) and argv[0] == "demo")
    args, unknown = parser.parse_known_args(argv)  # exits 2 on a usage error
    if unknown and not getattr(args, "demo_missing", False):
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    debug = os.environ.get("SAP_KERNELS_DEBUG") == "1"
    try:
        status = args.handler(args)
        return EXIT_OK if status is None else int(status)
    except InputError as error:
        print(f"{PROG} {args.command}: error: {error}", file=sys.stderr)
        return EXIT_INPUT_ERROR
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # e.g. `sap-kernels pqi ... | head`: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except Exception as error:  # never a raw traceback for the user
        if debug:
            raise
        message = (str(error).strip().splitlines() or [""])[0]
        print(
            f"{PROG} {args.command}: error: {type(error).__name__}: {message} "
            "(set SAP_KERNELS_DEBUG=1 for the traceback)",
            file=sys.stderr,
        )
        return EXIT_INPUT_ERROR


if __name__ == "__main__":
    sys.exit(main())
