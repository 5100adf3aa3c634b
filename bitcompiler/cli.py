"""The ``bitc`` command: compile, inspect, bench, demo.

bitc compile mypkg.models:make_net --shape 1,1,28,28 --scheme binary:act=binary --out out/net
bitc inspect out/net
bitc bench mypkg.models:make_net --targets cpu,cortex-m4 --schemes none,binary --data digits --epochs 1
bitc bench --suite      (the project's own benchmark suite, as python -m bench)
"""

from __future__ import annotations

import argparse
import importlib
import runpy
import sys
from pathlib import Path


def _load_factory(spec: str):
    module_name, _, attr = spec.partition(":")
    if not attr:
        raise SystemExit(f"bitc: expected MODULE:ATTR (e.g. mypkg.models:make_net), got {spec!r}")
    sys.path.insert(0, str(Path.cwd()))
    obj = getattr(importlib.import_module(module_name), attr)
    return obj() if callable(obj) and not hasattr(obj, "forward") else obj


def _compile(args: argparse.Namespace) -> int:
    import torch

    import bitcompiler as bc

    model = _load_factory(args.model)
    shape = tuple(int(s) for s in args.shape.split(","))
    cm = bc.compile(model, (torch.randn(*shape),), target=args.target, scheme=args.scheme, strict=args.strict)
    print(cm.report())
    if args.out:
        print(f"exported to {cm.export(args.out)}")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    import bitcompiler as bc

    cm = bc.load(args.directory)
    print(cm)
    print(cm.report())
    return 0


def _demo(args: argparse.Namespace) -> int:
    script = Path(__file__).resolve().parent.parent / "examples" / "demo.py"
    if not script.exists():
        raise SystemExit(f"bitc: {script} not found; the demo ships with the source checkout")
    runpy.run_path(str(script), run_name="__main__")
    return 0


def _bench(args: argparse.Namespace) -> int:
    if args.suite or args.model is None:
        if args.model is None and not args.suite:
            raise SystemExit("bitc bench: give a MODEL (an .onnx file or package.module:factory) or --suite")
        runpy.run_module("bench", run_name="__main__")
        return 0
    import os

    if args.threads:  # TVM reads its thread count once, when it is first imported
        os.environ["TVM_NUM_THREADS"] = os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch

    import bitcompiler as bc
    from bitcompiler.benchmarking import output

    if args.threads:
        torch.set_num_threads(args.threads)
    shape = tuple(int(s) for s in args.input_shape.split(",")) if args.input_shape else None
    try:
        rows = bc.benchmark(
            args.model, shape, _names(args.targets), _names(args.schemes), args.data, args.epochs,
            peers=not args.no_peers, rpc=args.rpc, out=args.out,
        )  # fmt: skip
    except bc.BitcError as e:
        raise SystemExit(f"bitc bench: {e}") from None
    output.print_table(rows, f"bitc bench {args.model}")
    print(f"results: {Path(args.out).resolve()} (results.json, results.csv, *.png)")
    return 0


def _names(text: str) -> list[str]:
    """Comma-separated names; a scheme's own keys (``uniform:bits=2,act=8``) stay with it."""
    parts: list[str] = []
    for item in text.split(","):
        if "=" in item and ":" not in item and parts:
            parts[-1] += "," + item
        elif item:
            parts.append(item)
    return parts


def _bench_parser(sub: argparse._SubParsersAction) -> None:
    b = sub.add_parser(
        "bench",
        help="benchmark MODEL on every target x scheme (or --suite: the project's suite, BENCHMARKS.md)",
    )
    b.add_argument("model", nargs="?", help="an .onnx file or package.module:factory")
    b.add_argument("--suite", action="store_true", help="run the project's benchmark suite (python -m bench)")
    b.add_argument("--targets", default="cpu", help="comma-separated target names (default cpu)")
    b.add_argument("--schemes", default="none,binary", help="comma-separated schemes (default none,binary)")
    b.add_argument("--input-shape", default=None, help="example input shape, batch first, e.g. 1,3,32,32")
    b.add_argument(
        "--data", default=None, help="fashion-mnist, mnist-5k, digits or a folder: train and evaluate"
    )
    b.add_argument("--epochs", type=int, default=1, help="training epochs per scheme with --data")
    b.add_argument("--threads", type=int, default=None, help="threads for TVM, torch and ONNX Runtime")
    b.add_argument("--rpc", default=None, help="host:port/key of a TVM RPC tracker: run the cpu rows there")
    b.add_argument("--no-peers", action="store_true", help="leave out torch and ONNX Runtime")
    b.add_argument("--out", default="bench-out", help="folder for results.json, results.csv and plots")
    b.set_defaults(fn=_bench)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bitc", description="bitcompiler: compile few-bit networks")
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("compile", help="compile a model given as MODULE:ATTR (an nn.Module or a factory)")
    c.add_argument("model")
    c.add_argument("--shape", required=True, help="example input shape, batch first, e.g. 1,3,32,32")
    c.add_argument("--target", default="cpu")
    c.add_argument("--scheme", default=None)
    c.add_argument("--strict", action="store_true")
    c.add_argument("--out", default=None, help="directory to export the compiled model to")
    c.set_defaults(fn=_compile)
    i = sub.add_parser("inspect", help="print the report of an exported model")
    i.add_argument("directory")
    i.set_defaults(fn=_inspect)
    sub.add_parser("demo", help="train, compile and compare a binary CNN").set_defaults(fn=_demo)
    _bench_parser(sub)
    args = parser.parse_args(argv)
    return int(args.fn(args))


if __name__ == "__main__":
    raise SystemExit(main())
