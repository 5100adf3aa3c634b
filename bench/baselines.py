"""Peers run in the same process as bitcompiler: each returns a ``fn(x) -> output`` to time.

torch fp32 and ONNX Runtime fp32/int8 live in the package (``bitc bench MODEL`` times them too).
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

from bitcompiler.benchmarking.peers import (  # noqa: F401 - the suite's modules import them from here
    INT8_ONNX_OPS,
    Runner,
    assert_onnx_int8,
    onnxruntime,
    torch_fp32,
)


def torch_int8_dynamic(model: nn.Module) -> Runner:
    """torch's dynamic int8 quantization (Linear layers; convolutions stay float).

    ``quantize_dynamic`` swaps only *child* modules: a bare ``nn.Linear`` handed over as the root
    comes back as fp32. The model goes in inside a container, and the result is checked to hold
    quantized Linear modules, so this peer really runs int8.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = torch.ao.quantization.quantize_dynamic(
            nn.Sequential(copy.deepcopy(model).eval()), {nn.Linear}, dtype=torch.qint8
        )
    assert_int8(q)
    return torch_fp32(q)


def assert_int8(model: nn.Module) -> None:
    """Raise unless every Linear of ``model`` is a dynamically quantized one."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    dynamic = [m for m in model.modules() if isinstance(m, DynamicLinear)]
    plain = [n for n, m in model.named_modules() if type(m) is nn.Linear]
    if not dynamic or plain:
        raise RuntimeError(
            f"torch int8 peer is not int8: {len(dynamic)} quantized Linear, float ones: {plain}"
        )


def tvm_fp32(model: nn.Module, example: torch.Tensor) -> Runner:
    """TVM fp32 through the same Relax path with its default (dlight) schedules: scheme 'none'."""
    import bitcompiler as bc

    return bc.compile(model, (example,), scheme="none")
