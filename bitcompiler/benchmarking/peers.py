"""The peers a benchmark times bitcompiler against, in the same process: each returns ``fn(x)``.

``torch_fp32`` runs the float model in eager PyTorch; ``onnxruntime`` exports it to ONNX and runs
it with ONNX Runtime's CPU provider, fp32 or with ONNX Runtime's dynamic int8 quantization (checked
to compute with integer ops, so the peer runs what its name says).
"""

from __future__ import annotations

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


INT8_ONNX_OPS = {"MatMulInteger", "ConvInteger", "DynamicQuantizeMatMul", "QLinearMatMul", "QLinearConv"}


def assert_onnx_int8(path: Path) -> None:
    """Raise unless the quantized ONNX file computes with integer ops (ORT's int8 peer is int8)."""
    import onnx

    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    if not ops & INT8_ONNX_OPS:
        raise RuntimeError(f"ONNX Runtime int8 peer is not int8: its ops are {sorted(ops)}")
