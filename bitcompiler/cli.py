"""The ``bitc`` command: compile, inspect, bench, demo.

bitc compile mypkg.models:make_net --shape 1,1,28,28 --scheme binary:act=binary --out out/net
bitc inspect out/net
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
    runpy.run_module("bench", run_name="__main__")
    return 0


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
    sub.add_parser("bench", help="run the benchmarks and write BENCHMARKS.md").set_defaults(fn=_bench)
    args = parser.parse_args(argv)
    return int(args.fn(args))


if __name__ == "__main__":
    raise SystemExit(main())
