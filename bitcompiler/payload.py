"""Store bytes in the frozen bits of ``bitwise`` layers (docs/methods.md §2: frozen bits hold any code).

Frozen bits are buffers, so training never changes them. Order (deterministic): quantizers in module
order; within one, frozen magnitude bits from most to least significant, then the sign if frozen; each
bit tensor row-major; each byte least significant bit first.

    >>> import torch, bitcompiler as bc
    >>> from bitcompiler import payload
    >>> layers = [torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10)]
    >>> net = bc.prepare(torch.nn.Sequential(*layers), scheme="bitwise:bits=6,train=top2")
    >>> payload.capacity(net)   # the middle layer: 64·32 weights × 4 frozen bits / 8 (first/last stay 8-bit)
    1024
    >>> payload.embed(net, b"hello")
    >>> payload.extract(net, 5)
    b'hello'
"""

from __future__ import annotations

import torch
from torch import nn

from bitcompiler.methods.bitwise import INIT_MAGNITUDE, quantizers
from bitcompiler.quant import numerics


def _slots(model: nn.Module) -> list[torch.Tensor]:
    return [getattr(q, name) for q in quantizers(model) for name in q.frozen_names()]


def capacity(model: nn.Module) -> int:
    """Bytes the frozen bits of ``model``'s bitwise layers can hold."""
    return sum(t.numel() for t in _slots(model)) // 8


@torch.no_grad()
def embed(model: nn.Module, data: bytes) -> None:
    """Write ``data`` into the frozen bits (the first ``8·len(data)`` of them, in the order above)."""
    cap = capacity(model)
    if len(data) > cap:
        raise ValueError(
            f"payload of {len(data)} bytes does not fit: the frozen bits of this model's bitwise layers hold "
            f"{cap} bytes; freeze more bits (train=sign or topK with a smaller K) or use more bits=..."
        )
    bits = numerics.bytes_to_bits(data)
    start = 0
    for t in _slots(model):
        if start >= len(bits):
            break
        chunk = bits[start : start + t.numel()]
        flat = t.view(-1)
        flat[: len(chunk)] = (chunk.float() * 2 - 1) * INIT_MAGNITUDE
        start += len(chunk)


@torch.no_grad()
def extract(model: nn.Module, n_bytes: int) -> bytes:
    """Read back ``n_bytes`` written by :func:`embed`."""
    cap = capacity(model)
    if n_bytes > cap:
        raise ValueError(f"cannot read {n_bytes} bytes: the frozen bits of this model hold {cap} bytes")
    need = 8 * n_bytes
    parts, got = [], 0
    for t in _slots(model):
        if got >= need:
            break
        parts.append((t.reshape(-1)[: need - got] > 0).to(torch.int64))
        got += parts[-1].numel()
    return numerics.bits_to_bytes(torch.cat(parts)) if parts else b""
