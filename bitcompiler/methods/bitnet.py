"""BitNet (docs/methods.md §1): each layer learns its own bit depth B by a sign step.

The layer keeps real weights W; the forward uses the affine quantization ``α + δ·Q`` at B bits with a
straight-through gradient (``mode=quantized``) or W itself (``mode=float``, quantized in eval mode,
which is what compiles). The loss adds :meth:`BitNetWeight.regularization`,
``λ1·½‖W_q − W‖² + λ2·2^B``, and after each optimizer step :meth:`BitNetWeight.step` moves B by
``−sign_ε(μ·λ1·∂Q/∂B + μ·λ2·2^B)`` with ∂Q/∂B the finite difference of the quantization error at
B − 1 vs B, μ halved every ``mu_halve_every`` steps, B clamped to ``[min_bits, max_bits]``.
``bitcompiler.train.fit`` does both; in your own loop call ``bitcompiler.regularization_loss`` and
``bitcompiler.step``:

    >>> import torch, bitcompiler as bc
    >>> net = bc.prepare(torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2)),
    ...                  scheme="bitnet:first_last=quantize,lambda2=1")
    >>> loss = net(torch.randn(4, 8)).sum() + bc.regularization_loss(net)
    >>> loss.backward(); bc.step(net)
    >>> [q.bits for q in quantizers(net)]   # a huge bit cost: B goes down
    [7, 7]
"""

from __future__ import annotations

import torch
from torch import nn

from bitcompiler.quant import numerics
from bitcompiler.quant.modules import WeightCodes, affine_codes, register_weight_quantizer, straight_through

MODES = ("quantized", "float")


class BitNetWeight(nn.Module):
    """Weight quantizer of the ``bitnet`` scheme: affine at a learned per-layer bit depth B."""

    b: torch.Tensor
    steps: torch.Tensor

    def __init__(
        self,
        init_bits: int = 8,
        min_bits: int = 2,
        max_bits: int = 8,
        lambda1: float = 1e-3,
        lambda2: float = 1e-6,
        mu: float = 1e-3,
        mu_halve_every: int = 200,
        eps: float = 1e-9,
        mode: str = "quantized",
    ) -> None:
        super().__init__()
        if not 1 <= min_bits <= init_bits <= max_bits <= 8:
            raise ValueError(
                f"bitnet needs 1 <= min_bits <= init_bits <= max_bits <= 8, got "
                f"{min_bits}, {init_bits}, {max_bits}"
            )
        if mode not in MODES:
            raise ValueError(f"mode={mode!r} is not valid; use mode=quantized or mode=float")
        self.min_bits, self.max_bits, self.mode = min_bits, max_bits, mode
        self.lambda1, self.lambda2, self.mu, self.mu_halve_every, self.eps = (
            lambda1,
            lambda2,
            mu,
            mu_halve_every,
            eps,
        )
        self.register_buffer("b", torch.tensor(init_bits))
        self.register_buffer("steps", torch.tensor(0))
        # quantization errors at B − 1 and B of the last training forward (plain floats: step() needs no graph)
        self._errors: tuple[float, float] | None = None

    @property
    def bits(self) -> int:
        return int(self.b)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if self.training:
            with torch.no_grad():
                self._errors = (
                    float(numerics.quantization_error(w, max(self.bits - 1, 1))),
                    float(numerics.quantization_error(w, self.bits)),
                )
            if self.mode == "float":
                return w
        c = self.codes(w)
        return straight_through(w, numerics.dequantize(c.q, c.scale, c.offset))

    def regularization(self, w: torch.Tensor) -> torch.Tensor:
        """``λ1·½‖W_q − W‖² + λ2·2^B`` (the gradient pulls W towards its quantized value)."""
        return self.lambda1 * numerics.quantization_error(w, self.bits) + self.lambda2 * 2.0**self.bits

    def step(self) -> None:
        """One optimizer step done: move B by the sign step on the last training forward's errors."""
        if self._errors is not None:
            mu = numerics.halved(self.mu, int(self.steps), self.mu_halve_every)
            delta = numerics.bit_update(*self._errors, self.bits, self.lambda1, self.lambda2, mu, self.eps)
            self.b.fill_(min(max(self.bits + delta, self.min_bits), self.max_bits))
            self._errors = None
        self.steps += 1

    def codes(self, w: torch.Tensor) -> WeightCodes:
        return affine_codes(w, self.bits)

    def extra_repr(self) -> str:
        return f"bits={self.bits} in [{self.min_bits}, {self.max_bits}], mode={self.mode}"


def quantizers(model: nn.Module) -> list[BitNetWeight]:
    return [m for m in model.modules() if isinstance(m, BitNetWeight)]


def bits_per_layer(model: nn.Module) -> dict[str, int]:
    """The current B of every ``bitnet`` layer, by layer name."""
    return {
        name.removesuffix(".wq"): m.bits for name, m in model.named_modules() if isinstance(m, BitNetWeight)
    }


@register_weight_quantizer("bitnet")
def from_scheme(scheme) -> BitNetWeight:
    g = scheme.get
    return BitNetWeight(
        int(g("init_bits")),
        int(g("min_bits")),
        int(g("max_bits")),
        float(g("lambda1")),
        float(g("lambda2")),
        float(g("mu")),
        int(g("mu_halve_every")),
        float(g("eps")),
        g("mode"),
    )
