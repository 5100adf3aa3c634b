"""``bitcompiler.benchmark``: every target x scheme of one model, its peers, optionally trained."""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bitcompiler.benchmarking import data as bdata
from bitcompiler.benchmarking import peers as bpeers
from bitcompiler.benchmarking.measure import Measured, check_exact, compile_row, reason, time_alternating
from bitcompiler.benchmarking.progress import Progress
from bitcompiler.benchmarking.rows import FAILED, OK, Row
from bitcompiler.errors import InputError, ModelError
from bitcompiler.quant.schemes import Scheme
from bitcompiler.target import Target

PEERS = ("torch fp32", "onnxruntime fp32", "onnxruntime int8")


def load_model(
    spec: str | os.PathLike[str] | nn.Module, input_shape: Sequence[int] | None = None
) -> nn.Module:
    """``spec``: an nn.Module, an ``.onnx`` file (:func:`bitcompiler.from_onnx`, its inputs fixed to
    ``input_shape`` when given) or ``package.module:factory`` (an nn.Module or a callable returning
    one)."""
    if isinstance(spec, nn.Module):
        return spec
    text = str(spec)
    if text.endswith(".onnx"):
        from bitcompiler.onnx import from_onnx

        return from_onnx(text, [tuple(input_shape)] if input_shape else None)
    module_name, _, attr = text.partition(":")
    if not attr:
        raise InputError(
            f"model {text!r}: expected an .onnx file or package.module:factory (e.g. mypkg.models:make_net)"
        )
    sys.path.insert(0, str(Path.cwd()))
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise InputError(f"model {text!r}: {e}") from None
    obj = obj() if callable(obj) and not isinstance(obj, nn.Module) else obj
    if not isinstance(obj, nn.Module):
        raise ModelError(f"model {text!r} gave a {type(obj).__name__}, not a torch.nn.Module")
    return obj


def benchmark(
    model: str | os.PathLike[str] | nn.Module,
    input_shape: Sequence[int] | None = None,
    targets: Sequence[str] = ("cpu",),
    schemes: Sequence[str] = ("none", "binary"),
    data: str | os.PathLike[str] | None = None,
    epochs: int = 1,
    peers: bool = True,
    rpc: str | None = None,
    check_samples: int = 4,
    out: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> list[Row]:
    """Compile ``model`` for every target x scheme and measure each (:class:`Row`); the peers
    (torch fp32, ONNX Runtime fp32/int8) are rows of the cpu target. With ``data`` (a dataset name
    or a folder), each scheme is first trained for ``epochs`` with ``train.fit`` and every row gets
    its test accuracy. ``rpc`` (``host:port/key``): cpu rows run on a machine of a TVM RPC
    tracker. ``out``: write results.json, results.csv and the PNG plots there."""
    for t in targets:
        Target.parse(t)  # unknown names fail before any work
    schemes = [str(Scheme.parse(s)) for s in schemes]
    model = load_model(model, input_shape).eval()
    train, test = bdata.load(data) if data is not None else (None, None)
    example = _example(input_shape, test)
    inputs = (
        test.tensors[0][:check_samples].contiguous()
        if test is not None
        else torch.randn(check_samples, *example.shape[1:])
    )
    bar = Progress(progress)
    nets, float_acc = _train_all(model, schemes, train, test, epochs, bar)
    remote = _remote(rpc)
    measured: list[Measured] = []
    for scheme in schemes:
        for target in targets:
            bar.step("compiling", f"{scheme} for {target}", len(schemes) * len(targets))
            trained_bits = train is not None and Scheme.parse(scheme).quantizes  # carries its quantizers
            m = compile_row(nets[scheme], scheme, target, example, prepared=trained_bits)
            if m.cm is not None:
                bar.step("measuring", f"{scheme} on {target}", len(schemes) * len(targets))
                check_exact(m, inputs, remote.runner(m.cm) if remote and target == "cpu" else None)
            measured.append(m)
    if peers and "cpu" in targets:
        measured += _peers(nets.get("none", model), example)
    _time_rows(measured, example, remote, bar)
    if test is not None:
        _accuracies(measured, test, float_acc, bar)
    bar.close()
    rows = [m.row for m in measured]
    if out is not None:
        from bitcompiler.benchmarking import output

        output.write_all(
            rows, Path(out), {"model": str(model.__class__.__name__), "data": str(data), "epochs": epochs}
        )
    return rows


def _example(input_shape: Sequence[int] | None, test: Any) -> torch.Tensor:
    if input_shape is not None:
        return torch.randn(*input_shape)
    if test is None:
        raise InputError(
            "give the input shape (input_shape=(1, 3, 32, 32), --input-shape 1,3,32,32) or --data"
        )
    return test.tensors[0][:1].contiguous()


def _train_all(
    model: nn.Module, schemes: list[str], train: Any, test: Any, epochs: int, bar: Progress
) -> tuple[dict[str, nn.Module], float | None]:
    """Each scheme's model: trained on ``train`` (the float one for ``none``), else ``model`` itself."""
    if train is None:
        return {s: model for s in schemes}, None
    names = ["none", *[s for s in schemes if s != "none"]]
    workers = torch.get_num_threads()  # --threads: that many processes of one thread each
    bar.step(
        "training",
        f"{len(names)} models, {epochs} epoch(s), {min(workers, len(names))} at a time",
        len(names),
    )
    finished: list[str] = []

    def done(scheme: str) -> None:  # the bar counts a step done when the next is announced
        finished.append(scheme)
        if len(finished) < len(names):
            bar.step("training", f"{scheme} trained", len(names))

    nets = bdata.train_all(model, names, train, epochs, workers, done)
    return nets, bdata.test_accuracy(nets["none"], test)


def _peers(model: nn.Module, example: torch.Tensor) -> list[Measured]:
    makers: dict[str, Callable[[], Callable[[torch.Tensor], object]]] = {
        "torch fp32": lambda: bpeers.torch_fp32(model),
        "onnxruntime fp32": lambda: bpeers.onnxruntime(model, example, torch.get_num_threads()),
        "onnxruntime int8": lambda: bpeers.onnxruntime(model, example, torch.get_num_threads(), int8=True),
    }
    out = []
    for name, make in makers.items():
        row = Row("cpu", name, kind="peer")
        try:
            fn = make()
        except Exception as e:  # noqa: BLE001 - a peer that is not installed is a row with the reason
            row.status, row.reason = FAILED, reason(e)
            out.append(Measured(row))
            continue
        out.append(Measured(row, fn=_first_output(fn)))
    return out


def _first_output(fn: Callable[[torch.Tensor], object]) -> Callable[[torch.Tensor], torch.Tensor]:
    def run(x: torch.Tensor) -> torch.Tensor:
        y = fn(x)
        return torch.as_tensor(y[0] if isinstance(y, (list, tuple)) else y)  # type: ignore[arg-type]

    return run


def _time_rows(measured: list[Measured], example: torch.Tensor, remote: Any, bar: Progress) -> None:
    """Latency of every row that ran: the host's rows (cpu and peers) alternating in one group,
    each GPU target's in its own; remote rows on their machine. QEMU targets report instructions."""
    groups: dict[str, dict[Any, Callable[[], object]]] = {}
    for i, m in enumerate(measured):
        if m.fn is None or m.row.status != OK or m.row.instructions is not None:
            continue
        if remote is not None and m.row.target == "cpu" and m.row.kind == "bitcompiler":
            bar.step("timing", f"{m.row.scheme} on {remote.address}", None)
            m.row.set_times(remote.time(m.fn))
            continue
        fn = m.fn
        groups.setdefault(m.row.target, {})[i] = lambda fn=fn: fn(example)  # type: ignore[misc]
    for target, fns in groups.items():
        bar.step("timing", f"{len(fns)} rows on {target}, alternating", None)
        for i, secs in time_alternating(fns).items():
            measured[i].row.set_times(secs)


def _accuracies(measured: list[Measured], test: Any, float_acc: float | None, bar: Progress) -> None:
    by_program: dict[str, float] = {}  # a reference program's fingerprint -> its accuracy
    for m in measured:
        m.row.float_accuracy = float_acc
        if m.row.status == FAILED:
            continue
        bar.step("accuracy", f"{m.row.scheme} on {m.row.target}", None)
        # the compiled code on the host (and the peers); elsewhere the reference it matched
        on_host = m.fn is not None and m.row.target == "cpu" and m.row.status == OK
        try:
            if on_host:
                on = "peer" if m.row.kind == "peer" else "compiled"
                m.row.accuracy, m.row.accuracy_on = bdata.test_accuracy(m.fn, test), on
            elif m.cm is not None:
                key = bdata.program_key(m.cm.graph)  # targets often share one reference program
                acc = by_program.get(key) if key else None
                if acc is None:
                    acc = bdata.test_accuracy(m.cm.reference, test)
                if key:
                    by_program[key] = acc
                m.row.accuracy, m.row.accuracy_on = acc, "reference"
        except Exception as e:  # noqa: BLE001
            m.row.reason = (m.row.reason + "; " if m.row.reason else "") + f"accuracy: {reason(e)}"


def _remote(rpc: str | None) -> Any:
    if rpc is None:
        return None
    from bitcompiler.rpc import RemoteCPU

    return RemoteCPU(rpc)
