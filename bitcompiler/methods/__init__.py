"""Training methods beyond plain straight-through quantization (docs/methods.md §1-§4).

Each module registers its scheme's weight quantizer
(:func:`bitcompiler.quant.modules.register_weight_quantizer`) when imported, here.
"""

from bitcompiler.methods import bitnet, bitwise, gwt, tiled

__all__ = ["bitnet", "bitwise", "gwt", "tiled"]
