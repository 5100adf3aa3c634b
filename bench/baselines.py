"""Peers run in the same process as bitcompiler: each returns a ``fn(x) -> output`` to time."""

from __future__ import annotations

import copy
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

Runner = Callable[[torch.Tensor], object]


def torch_fp32(model: nn.Module) -> Runner:
    model = model.eval()

    def run(x: torch.Tensor) -> object:
        with torch.no_grad():
            return model(x)

    return run


def torch_int8_dynamic(model: nn.Module) -> Runner:
    """torch's dynamic int8 quantization (Linear layers; convolutions stay float)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = torch.ao.quantization.quantize_dynamic(
            copy.deepcopy(model).eval(), {nn.Linear}, dtype=torch.qint8
        )
    return torch_fp32(q)


def _onnx_file(model: nn.Module, example: torch.Tensor, directory: Path) -> Path:
    path = directory / "model.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model.eval(),
            (example,),
            str(path),
            dynamo=False,
            input_names=["x"],
            output_names=["y"],
            dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}},
        )
    return path


def onnxruntime(model: nn.Module, example: torch.Tensor, threads: int, int8: bool = False) -> Runner:
    """ONNX Runtime, fp32 or with its dynamic int8 quantization (MatMul/Conv weights int8)."""
    import onnxruntime as ort

    directory = Path(tempfile.mkdtemp(prefix="bitc-bench-"))
    path = _onnx_file(model, example, directory)
    if int8:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantized = directory / "model.int8.onnx"
        quantize_dynamic(str(path), str(quantized), weight_type=QuantType.QInt8)
        path = quantized
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

    def run(x: torch.Tensor) -> object:
        return session.run(None, {"x": x.numpy()})

    return run


def tvm_fp32(model: nn.Module, example: torch.Tensor) -> Runner:
    """TVM fp32 through the same Relax path with its default (dlight) schedules: scheme 'none'."""
    import bitcompiler as bc

    return bc.compile(model, (example,), scheme="none")
