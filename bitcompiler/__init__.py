"""bitcompiler: few-bit, binary and sub-bit neural networks, compiled to fast code.

>>> import torch, bitcompiler as bc
>>> model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
>>> cm = bc.compile(model, (torch.randn(1, 64),), target="cpu", scheme="binary:act=binary")
>>> print(cm.report())  # doctest: +SKIP
"""

from bitcompiler import errors, methods, ops, train  # noqa: F401 - ops registers the bitc custom ops, methods their schemes' quantizers
from bitcompiler.api import compile, prepare, tune
from bitcompiler.benchmarking import benchmark
from bitcompiler.compiled import CompiledModel, load
from bitcompiler.errors import (
    BitcError,
    CaptureError,
    ExportError,
    InputError,
    LoadError,
    LoweringError,
    ModelError,
    ModelTooLarge,
    RemoteError,
    SchemeError,
    TargetError,
    ThreadsError,
    ToolchainError,
)
from bitcompiler.passes import Pass, PassError, Pipeline, PipelineError, fact_check, graph_pass
from bitcompiler.quant.schemes import Scheme
from bitcompiler.report import Report
from bitcompiler.target import Target
from bitcompiler.threads import get_num_threads, set_num_threads
from bitcompiler.train import regularization_loss, step
from bitcompiler.tuning import TuneOptions

__version__ = "0.1.0"

# public submodules reachable as attributes (``bc.datasets``), imported on first use: the data
# loaders and payload code are not needed to compile
_SUBMODULES = (
    "api",
    "backends",
    "benchmarking",
    "cache",
    "capture",
    "cli",
    "datasets",
    "kernels",
    "methods",
    "onnx",
    "ops",
    "passes",
    "payload",
    "quant",
    "recipes",
    "report",
    "rpc",
    "train",
    "tuning",
)


def __getattr__(name: str) -> object:
    if name == "from_onnx":  # imports onnx on first use, not with bitcompiler
        from bitcompiler.onnx import from_onnx

        return from_onnx
    if name in _SUBMODULES:
        import importlib

        return importlib.import_module(f"bitcompiler.{name}")
    raise AttributeError(f"module 'bitcompiler' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_SUBMODULES, "from_onnx"})


__all__ = [
    "BitcError",
    "CaptureError",
    "CompiledModel",
    "ExportError",
    "InputError",
    "LoadError",
    "LoweringError",
    "ModelError",
    "ModelTooLarge",
    "Pass",
    "PassError",
    "Pipeline",
    "PipelineError",
    "RemoteError",
    "Report",
    "Scheme",
    "SchemeError",
    "Target",
    "TargetError",
    "ThreadsError",
    "ToolchainError",
    "TuneOptions",
    "benchmark",
    "compile",
    "errors",
    "fact_check",
    "from_onnx",
    "get_num_threads",
    "graph_pass",
    "load",
    "prepare",
    "regularization_loss",
    "set_num_threads",
    "step",
    "tune",
]
