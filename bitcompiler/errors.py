"""Every error bitcompiler raises on purpose derives from :class:`BitcError`.

Each class also keeps the built-in type users already catch (``ValueError`` for a bad scheme or
input, ``FileNotFoundError`` for a missing bundle file, ``RuntimeError`` for a failed build), so
``except ValueError`` keeps working and ``except bc.BitcError`` catches all of them::

    >>> import bitcompiler as bc
    >>> issubclass(bc.errors.SchemeError, (bc.BitcError, ValueError))
    True

The table of bad inputs and what each raises is ``docs/errors.md``.
"""

from __future__ import annotations

__all__ = [
    "BitcError",
    "BundleFileMissing",
    "CaptureError",
    "CortexMLoweringError",
    "DatasetUnavailable",
    "ExportError",
    "FirmwareError",
    "InputError",
    "InputTypeError",
    "LoadError",
    "LoweringError",
    "ModelError",
    "ModelTooLarge",
    "ModelTypeError",
    "PassError",
    "PipelineError",
    "SchemeError",
    "TargetError",
    "ThreadsError",
    "ToolchainError",
    "ToolchainMissing",
    "UnsupportedExport",
    "UnsupportedFloatOp",
    "UnsupportedOnnxOp",
]


class BitcError(Exception):
    """Base of every error bitcompiler raises on purpose; the message says what to fix."""


# ----------------------------------------------------------------------------- what the user gave
class ModelError(BitcError, ValueError):
    """The model as given cannot be compiled (no parameters on the CPU, an unsupported kind of
    model such as an ONNX file that cannot be read, an output bitcompiler cannot return); says what to change."""


class UnsupportedOnnxOp(ModelError):
    """An ONNX file with a node bitcompiler cannot import; names the op type and the node."""


class ModelTypeError(ModelError, TypeError):
    """What was passed as the model is not a ``torch.nn.Module``."""


class CaptureError(BitcError, RuntimeError):
    """The model could not be turned into a graph; names the line of the model's code."""


class SchemeError(BitcError, ValueError):
    """A malformed scheme: unknown name or key, a value out of range, conflicting keys."""


class TargetError(BitcError, ValueError):
    """An unknown target or target option."""


class ThreadsError(BitcError, ValueError):
    """A thread count that cannot be applied (not a whole number >= 1, or more threads than the
    calling thread's TVM pool was started with); says when to set it."""


class InputError(BitcError, ValueError):
    """A call (or an example input) whose count, rank, shape, dtype or device differs from what the
    model was compiled for; says what was expected and what was given."""


class InputTypeError(InputError, TypeError):
    """An input that is not a tensor at all."""


# ----------------------------------------------------------------------------- compiling
class PassError(BitcError, RuntimeError):
    """A pass failed or left an invalid graph; names the pass, the node and the dump file."""

    def __init__(
        self, pass_name: str, message: str, node: str | None = None, dump: str | None = None
    ) -> None:
        where = f" at node {node!r}" if node else ""
        see = (
            f" (graph dumped to {dump})"
            if dump
            else " (set BITC_DUMP=dir to dump the graph after every pass)"
        )
        super().__init__(f"pass {pass_name!r} failed{where}: {message}{see}")
        self.pass_name, self.node, self.dump = pass_name, node, dump

    def __reduce__(self) -> tuple:  # picklable across processes despite the custom __init__
        return (type(self), (self.pass_name, str(self), self.node, self.dump))


class PipelineError(BitcError, ValueError):
    """The pass list is not in an order its requires/ensures allow."""


class LoweringError(BitcError, RuntimeError):
    """The graph could not be lowered to TVM (or to C); names the op."""


class CortexMLoweringError(LoweringError):
    """The graph has an op the Cortex-M code generator cannot emit; names the op."""


class UnsupportedFloatOp(LoweringError, ValueError):
    """A float op the Cortex-M C code generator has no emitter for."""


# ----------------------------------------------------------------------------- the environment
class ModelTooLarge(TargetError):
    """The model does not fit the board's flash or RAM; names the sizes and the largest layers."""


class ToolchainError(BitcError, RuntimeError):
    """A tool bitcompiler runs (gcc, make, QEMU) is missing or failed."""


class ToolchainMissing(ToolchainError):
    """A required tool is not on PATH; the message gives the install command."""


class FirmwareError(ToolchainError):
    """Building or running the firmware failed; the message holds the tool's output."""


class RemoteError(BitcError, ConnectionError):
    """A TVM RPC tracker or server (``rpc://host:port/key``) that cannot be reached or has no
    free machine; names the address."""


class DatasetUnavailable(BitcError, RuntimeError):
    """The package that provides a dataset is not installed; the message names the install command."""


# ----------------------------------------------------------------------------- files
class LoadError(BitcError, ValueError):
    """A bundle that cannot be loaded: another format version, an invalid ``meta.json``, a file
    whose sha256 differs from the one recorded at export; names the file."""


class BundleFileMissing(LoadError, FileNotFoundError):
    """A bundle directory (or a file it lists) that does not exist."""


class ExportError(BitcError, OSError):
    """``CompiledModel.export`` could not write the bundle; nothing half-written is left."""


class UnsupportedExport(BitcError, ValueError):
    """``cm.export_onnx`` asked for a format bitcompiler does not write, or a batch the model
    cannot take; names what was asked and what is possible."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none): what an error
    of ours quotes from a library's."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
