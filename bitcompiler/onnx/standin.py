"""A torchvision stand-in for importing onnx2torch where torchvision does not load.

onnx2torch imports ``torchvision`` at import time for two converters only (NonMaxSuppression
uses ``torchvision.ops.nms`` and ``box_convert``, RoiAlign ``torchvision.ops.roi_align``), and the
torchvision wheels on the package index are built against CUDA torch builds: beside the CPU torch
they fail to import. :func:`onnx2torch` imports onnx2torch with a stand-in ``torchvision`` module
(whose three functions raise) put in ``sys.modules`` for that import only, and removed right
after (any other stand-in found there is put back): nothing else in the process sees it, and a
working torchvision is always preferred.
bitcompiler refuses NonMaxSuppression and RoiAlign nodes before converting (see
``bitcompiler.onnx.importer``), so the stand-in's functions are never reached.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

STANDIN_FUNCTIONS = ("nms", "box_convert", "roi_align")


def _needs_torchvision(*args: Any, **kwargs: Any) -> Any:
    raise RuntimeError("this ONNX op needs the real torchvision package, which does not load here")


def _standin() -> dict[str, types.ModuleType]:
    tv, ops = types.ModuleType("torchvision"), types.ModuleType("torchvision.ops")
    for name in STANDIN_FUNCTIONS:
        setattr(ops, name, _needs_torchvision)
    tv.ops = ops  # type: ignore[attr-defined]
    return {"torchvision": tv, "torchvision.ops": ops}


def torchvision_loads() -> bool:
    """Whether the real torchvision imports in this process (a stand-in module, ours or another
    one such as the zoo's in bench/corpus.py, has no file)."""
    if "torchvision" in sys.modules:
        return getattr(sys.modules["torchvision"], "__file__", None) is not None
    try:
        importlib.import_module("torchvision")
        return True
    except Exception:  # noqa: BLE001 - absent, or a wheel built for another torch
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            sys.modules.pop(name)
        return False


def onnx2torch() -> types.ModuleType:
    """The ``onnx2torch`` module, imported with the stand-in if torchvision does not load."""
    if "onnx2torch" in sys.modules or torchvision_loads():
        return importlib.import_module("onnx2torch")
    saved = {name: sys.modules.get(name) for name in ("torchvision", "torchvision.ops")}
    sys.modules.update(_standin())
    try:
        return importlib.import_module("onnx2torch")
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
