"""ONNX in and out (docs/onnx.md).

:func:`from_onnx` reads an ``.onnx`` file into an ``nn.Module`` (``bc.compile("model.onnx", ...)``
calls it); :func:`export_onnx` (``cm.export_onnx(path, format=...)``) writes a compiled model as
QDQ ONNX or QONNX.
"""

from bitcompiler.onnx.importer import from_onnx

__all__ = ["from_onnx"]
