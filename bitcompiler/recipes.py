"""Each scheme's recommended training recipe, and the models a method is known to fail on.

:func:`bitcompiler.train.fit` uses the recipe of the scheme a model was ``prepare``d with when no
optimizer and no lr are given, and warns (:func:`warnings_for`) about a model the method is known
to train badly. The numbers behind each recipe: docs/guide.md, "Training recipes".

    >>> from bitcompiler.recipes import recipe
    >>> r = recipe("bitwise:bits=6")
    >>> r.optimizer, r.lr, r.schedule
    ('adam', 0.03, 'constant')
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from bitcompiler.quant.schemes import Scheme


@dataclass(frozen=True)
class Recipe:
    """``optimizer`` (``adam`` or ``sgd``, momentum 0.9), ``lr``, ``schedule`` (``constant`` or
    ``cosine``), ``weight_decay`` and ``needs``: what the model should have for the recipe to work."""

    optimizer: str = "adam"
    lr: float = 1e-3
    schedule: str = "constant"
    weight_decay: float = 0.0
    needs: str = ""

    def make_optimizer(self, params: object, lr: float | None = None) -> torch.optim.Optimizer:
        lr = self.lr if lr is None else lr
        if self.optimizer == "sgd":
            return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=self.weight_decay)  # type: ignore[arg-type]
        return torch.optim.Adam(params, lr=lr, weight_decay=self.weight_decay)  # type: ignore[arg-type]

    def describe(self) -> str:
        opt = "SGD momentum 0.9" if self.optimizer == "sgd" else "Adam"
        wd = f", weight decay {self.weight_decay:g}" if self.weight_decay else ""
        return f"{opt}, lr {self.lr:g}, {self.schedule} schedule{wd}"


_BN = "BatchNorm after every bit-wise Linear/Conv2d (BatchNorm1d/2d before the activation)"
_UNTILED = "a small classifier left untiled (first_last=keep, the default, or min_weights above its size)"

#: scheme name -> recipe, from short runs on the digits MLP (examples/recipes_digits.py; the
#: numbers: docs/guide.md "Training recipes"). A float model trains with ``none``'s.
RECIPES: dict[str, Recipe] = {
    "none": Recipe("adam", 1e-2, "cosine"),
    "binary": Recipe("adam", 1e-2, "cosine"),
    "uniform": Recipe("adam", 1e-2, "cosine"),
    "bitnet": Recipe("adam", 1e-2, "cosine"),
    "bitwise": Recipe("adam", 3e-2, "constant", needs=_BN),
    "gwt": Recipe("adam", 3e-2, "cosine"),
    "tiled": Recipe("adam", 1e-2, "cosine", needs=_UNTILED),
}


def recipe(scheme: str | Scheme) -> Recipe:
    """The recommended recipe of ``scheme`` (by its name)."""
    return RECIPES.get(Scheme.parse(scheme).name, Recipe())


def scheme_of(model: nn.Module) -> Scheme | None:
    """The scheme ``model`` was ``prepare``d with (None: a float model)."""
    spec = getattr(model, "bitc_scheme", None)
    return Scheme.parse(spec) if spec else None


def warnings_for(model: nn.Module, scheme: Scheme) -> list[str]:
    """What is known to go wrong training ``model`` under ``scheme``: one sentence per problem."""
    from bitcompiler.quant.modules import QUANT_LAYERS

    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, QUANT_LAYERS)]
    out = []
    if scheme.name == "tiled":
        tiled = [n for n, m in layers if getattr(m.wq, "tiles_for", lambda w: 1)(m.weight) > 1]
        small = [n for n, m in layers if n in tiled and m.weight.shape[0] <= 16]
        if small:
            out.append(
                f"tiled: layer(s) {', '.join(small)} with <= 16 outputs (a classifier) are tiled; such "
                "nets stay near chance at any lr. Leave the classifier untiled: first_last=keep (the "
                "default) or min_weights above its weight count"
            )
    if scheme.name == "bitwise":
        has_bn = any(isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) for m in model.modules())
        if not has_bn:
            out.append(
                f"bitwise: the model has no BatchNorm; bit-wise layers train poorly without it. Add {_BN}"
            )
    return out
