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
        assert_onnx_int8(quantized)
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


INT8_ONNX_OPS = {"MatMulInteger", "ConvInteger", "DynamicQuantizeMatMul", "QLinearMatMul", "QLinearConv"}


def assert_onnx_int8(path: Path) -> None:
    """Raise unless the quantized ONNX file computes with integer ops (ORT's int8 peer is int8)."""
    import onnx

    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    if not ops & INT8_ONNX_OPS:
        raise RuntimeError(f"ONNX Runtime int8 peer is not int8: its ops are {sorted(ops)}")
