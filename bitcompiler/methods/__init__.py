"""Training methods beyond plain straight-through quantization (docs/methods.md §3-§4)."""

from __future__ import annotations

from torch import nn


def weight_quantizer(scheme) -> nn.Module:
    """The weight quantizer of a method scheme (``gwt``, ``tiled``)."""
    if scheme.name == "gwt":
        from bitcompiler.methods import gwt

        return gwt.from_scheme(scheme)
    if scheme.name == "tiled":
        from bitcompiler.methods import tiled

        return tiled.from_scheme(scheme)
    raise ValueError(f"scheme {scheme} is not a method scheme")
