"""Backends: cpu (LLVM) today; cuda and cortex-m share the same interface (``base.py``)."""

from bitcompiler.backends.base import Backend, Runner, Target, backend_for

__all__ = ["Backend", "Runner", "Target", "backend_for"]
