"""Compile one scheme for one target and measure it: a :class:`Row`, or a row with the reason."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from bitcompiler.benchmarking.rows import COMPILED_ONLY, FAILED, Row
from bitcompiler.errors import first_line

REL_TOL = 1e-5  # float outputs: compiled == reference within this relative error (integers: equal)


@dataclass
class Measured:
    """A row and, when the compiled model runs here, what to time it with (``fn(x)``)."""

    row: Row
    cm: Any = None
    fn: Callable[[torch.Tensor], object] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def reason(e: BaseException) -> str:
    return f"{type(e).__name__}: {first_line(e)}"


def compile_row(
    model: torch.nn.Module, scheme: str, target: str, example: torch.Tensor, prepared: bool
) -> Measured:
    """Compile ``model`` (``prepared``: it carries its own quantizers) for ``target``."""
    from bitcompiler.api import compile

    row = Row(target, scheme)
    start = time.perf_counter()
    try:
        cm = compile(model, (example,), target=target, scheme=None if prepared else scheme)
    except Exception as e:  # noqa: BLE001 - a target that cannot build here is a row with the reason
        row.status, row.reason = FAILED, reason(e)
        return Measured(row)
    row.compile_s = time.perf_counter() - start
    report = cm.report()
    row.bits_per_weight, row.weight_bytes = report.bits_per_weight, report.weight_bytes
    row.instructions, row.flash_bytes, row.ram_bytes = (
        report.instructions,
        report.flash_bytes,
        report.ram_bytes,
    )
    return Measured(row, cm)


def check_exact(m: Measured, inputs: torch.Tensor, run: Callable[[torch.Tensor], Any] | None = None) -> None:
    """Run the compiled model on ``inputs`` (one sample at a time on static-batch targets) and
    compare with the reference; a run that fails here marks the row ``compiled only``."""
    cm, row = m.cm, m.row
    # the whole batch at once where the compiled plan takes any batch (cpu, GPUs); not Cortex-M/aarch64
    whole = run is None and cm.dynamic_batch and cm.target.family in ("cpu", "gpu")
    run = run or cm
    try:
        if whole:
            got = torch.as_tensor(run(inputs))
        else:
            got = torch.cat([torch.as_tensor(run(inputs[i : i + 1])) for i in range(len(inputs))])
    except Exception as e:  # noqa: BLE001 - e.g. no GPU or no QEMU on this machine
        row.status, row.reason = COMPILED_ONLY, reason(e)
        return
    with torch.no_grad():
        ref = torch.as_tensor(cm.reference(inputs))
    row.exact, row.max_rel_error = compare(got, ref)
    m.fn = run


def compare(got: torch.Tensor, ref: torch.Tensor) -> tuple[bool, float]:
    """(equal under the project's rule, max relative error): integers bit-exact, floats <= 1e-5."""
    if got.shape != ref.shape:
        return False, float("inf")
    if not ref.is_floating_point():
        return bool(torch.equal(got, ref)), float((got != ref).any())
    scale = float(ref.abs().max()) or 1.0
    err = float((got.float() - ref.float()).abs().max()) / scale
    return err <= REL_TOL, err


def time_alternating(
    fns: dict[str, Callable[[], object]], rounds: int = 5, per_round: float = 0.1
) -> dict[Any, list[float]]:
    """Seconds per call of each ``fn``, timed in alternating rounds (each for ``per_round`` s, at
    least 3 calls) so that load from other processes falls on all of them alike."""
    times: dict[Any, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        fn()  # warm-up
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            n = 0
            while n < 3 or time.perf_counter() - start < per_round:
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
                n += 1
    return times
