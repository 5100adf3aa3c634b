"""Backends, one package each (``cpu/``, ``cortex_m/``), found and registered by :mod:`bitcompiler.target`."""

from bitcompiler.backends.base import Backend, BuildInput, Runner, Target, backend_for

__all__ = ["Backend", "BuildInput", "Runner", "Target", "backend_for"]
