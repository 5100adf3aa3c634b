"""Dense layers with int8 or float activations on Cortex-M, in hand-written C.

The portable TIR kernel of a ``bitc::bit_linear`` reads the weight bit-planes: with int8
activations it adds ``x[k] << b`` per set bit, plane by plane (about 30 instructions a weight at
8 bits), and with float activations it adds ``x[k]`` per set bit. These kernels replace both.

**int8 activations** (any code that fits a byte: ``uniform:bits<=8``, the default scheme's first
and last layers). The codes ``Q[n, k]`` are stored as int8 (``Q - 128`` when a code exceeds 127;
the kernel adds ``128 * sumx`` back, an exact integer identity), four rows at a time in the order
the kernel reads them, and ``acc = sum_k Q[n,k] x[k]`` is an exact int32 sum on every core:

* ``dsp`` (M4, M7, M33-class): the activations are unpacked once per sample into 16-bit pairs
  ``(x0, x2), (x1, x3)`` as CMSIS does (``SXTB16`` and ``SXTB16`` of the word rotated by 8);
  each weight word of four codes then costs one load, two ``SXTB16`` and two ``SMLAD`` (dual
  16-bit multiply-accumulates), with the activation pairs shared by four rows;
* ``mve`` (M55, Helium): 16 codes a step, ``VMLADAVA.S8`` per row, the activation vector shared
  by four rows, the tail predicated (``VCTP8``);
* ``scalar`` (M3): a plain ``MLA`` loop over the same stored order.

**float activations, 1-bit weights** (``pm1``, no offset): a table of partial sums over groups
of 8 inputs, shared by all output rows (T-MAC style). For each chunk of up to 8 groups the
kernel builds ``T[b][g]`` = the sum of the inputs of group ``g`` whose bit is set in ``b``
(256 entries a group: two 16-entry half tables added), then each row adds one table entry per
group: a byte load, an address, a float load and an add per 8 weights, no per-weight branch.
``y = scale * (2 acc - sumx) + bias``. Float sums in another order than the reference's: equal
within float32 rounding, like the portable kernel. The table lives in the activation arena (8 KiB
for K = 256): ``Target(..., act_tables=False)`` runs the portable kernel instead (no table, 14x
the instructions), and the default ``"auto"`` does so when the tables would not fit the board's
RAM.

**binary activations, 1-bit weights** (W1A1, ``pm1``) on the M3, M4 and M7: the two-row asm loop
of :mod:`.binary_c`, its weights stored in the order it reads them; on Helium cores the C kernel
of :mod:`.dense_sources`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from bitcompiler import ops
from bitcompiler.backends.cortex_m import binary_c
from bitcompiler.backends.cortex_m.aot import _Builder
from bitcompiler.backends.cortex_m.c_prelude import PRELUDE
from bitcompiler.backends.cortex_m.dense_sources import (
    ROWS,
    TABLE_GROUPS,
    binary_source,
    float_codes_source,
    float_pm1_source,
    int8_block,
    int8_source,
    packed_x,
    quantize_source,
    store_int8_codes,
    table_floats,
)
from bitcompiler.backends.cortex_m.kernel_c import Kernel, KernelParam
from bitcompiler.quant.numerics import code_center, planes_to_code

__all__ = ["PRELUDE", "Builder", "builder_for", "store_int8_codes"]

BINARY_C = ("mve", "dsp")  # the cores whose tiled row kernels (and Helium W1A1 dense) run in C


def store_sign_bytes(planes: np.ndarray, k: int) -> np.ndarray:
    """1-bit pm1 planes ``(1, N, KW)`` int32 -> bytes ``[chunk][N][groups of the chunk]``: byte
    ``g`` of a row holds the signs of inputs ``8g .. 8g+7`` (bit set: ``+1``)."""
    n = planes.shape[1]
    groups = -(-k // 8)
    data = np.ascontiguousarray(planes[0].astype("<i4")).view(np.uint8).reshape(n, -1)[:, :groups]
    chunks = [data[:, c : c + TABLE_GROUPS] for c in range(0, groups, TABLE_GROUPS)]
    return np.concatenate([c.reshape(-1) for c in chunks])


def store_half_codes(q: np.ndarray) -> np.ndarray:
    """``(N, K)`` integer codes -> int32 words ``[N/4][K/2][4 rows]``, each the row's two codes as
    IEEE half floats (low half: the even input), zero padded."""
    n, k = q.shape
    np_, kp = -(-n // ROWS) * ROWS, -(-k // 2) * 2
    padded = np.zeros((np_, kp), np.float16)
    padded[:n, :k] = q
    words = padded.view(np.uint32).astype(np.uint32)  # (np_, kp / 2): little endian, even input low
    return words.reshape(np_ // ROWS, ROWS, kp // 2).transpose(0, 2, 1).reshape(-1).view(np.int32)


class Builder(_Builder):
    """The AOT walker with C kernels for int8- and float-activation dense layers (``isa``: the
    core's ``scalar``, ``dsp`` or ``mve`` code path)."""

    isa = "scalar"
    recompute = True  # recompute a conv inside its readers' kernels instead of storing its map
    flash_bytes = 4 << 20  # the board's: W1A1 conv tables take at most 3/4 (.conv_tables)
    conv_tables: object = "auto"
    act_tables = True  # 1-bit float-activation dense layers by partial-sum tables in the arena
    table_bytes = 0  # the tables stored so far

    def _c_kernel(self, key: tuple, name: str, params: tuple[KernelParam, ...], source: Any) -> Kernel:
        if key not in self.kernels:
            symbol = f"{name}_{len(self.kernels)}"
            self.kernels[key] = Kernel(symbol, params, source(symbol))
        return self.kernels[key]

    def _stored(self, call: ops.BoundCall, suffix: str, array: np.ndarray) -> str:
        qual = self.param_of[call.tensors["planes"].name]
        base = qual.replace(".", "_").removesuffix("_planes")
        return self.constant(f"bitc_w_{base}_{suffix}", array, qual.rpartition(".")[0] or "weights")

    def float_pm1(self, node: torch.fx.Node, call: ops.BoundCall, out_shape: tuple) -> None:
        a: ops.BitLinearAttrs = call.attrs
        x = self.tensors[call.x.name]
        rows = math.prod(x.shape[:-1])
        planes = self.state[self.param_of[call.tensors["planes"].name]].detach().cpu().numpy()
        n = int(planes.shape[1])
        p = self._stored(call, "signs", store_sign_bytes(planes, a.k))
        params = (
            KernelParam("X", "float32", (rows, a.k)),
            KernelParam("P", "uint8", (self.weights[p].array.size,)),
            *(KernelParam(q, "float32", (n,)) for q in ("SC", "BI")),
            KernelParam("T", "float32", (table_floats(a.k, n, self.isa == "mve"),)),
            KernelParam("Y", "float32", (rows, n)),
        )
        kern = self._c_kernel(
            ("dense_float_table", a.k, n, rows, self.isa == "mve"),
            f"bitc_dense_float_table_{a.k}x{n}" + ("_mve" if self.isa == "mve" else ""),
            params,
            lambda s: float_pm1_source(s, rows, a.k, n, self.isa == "mve"),
        )
        t = call.tensors
        epi = [self.weight(t["scale"], "float32"), self.weight(t["bias"], "float32")]
        table = self.new_tensor(f"{node.name}_table", (table_floats(a.k, n, self.isa == "mve"),), "float32")
        y = self.new_tensor(node.name, out_shape, "float32")
        self.call(
            kern, [x.name, p, *epi, table.name, y.name], [x.name], [table.name, y.name], self.label(node)
        )

    def float_codes(
        self, node: torch.fx.Node, call: ops.BoundCall, out_shape: tuple, q: np.ndarray, center: int
    ) -> None:
        x = self.tensors[call.x.name]
        rows, (n, k) = math.prod(x.shape[:-1]), q.shape
        stored = store_half_codes(q - center)
        w = self._stored(call, "hcodes", stored)
        params = (
            KernelParam("X", "float32", (rows, k)),
            KernelParam("W", "int32", (stored.size,)),
            *(KernelParam(p, "float32", (n,)) for p in ("SC", "OF", "BI")),
            KernelParam("Y", "float32", (rows, n)),
        )
        kern = self._c_kernel(
            ("dense_float_codes", k, n, rows, center),
            f"bitc_dense_float_codes_{k}x{n}",
            params,
            lambda s: float_codes_source(s, rows, k, n, center),
        )
        epi = [self.weight(call.tensors[p], "float32") for p in ("scale", "offset", "bias")]
        y = self.new_tensor(node.name, out_shape, "float32")
        self.call(kern, [x.name, w, *epi, y.name], [x.name], [y.name], self.label(node))

    def int8_codes(self, node: torch.fx.Node, call: ops.BoundCall, out_shape: tuple, q: np.ndarray) -> None:
        x = self.tensors[call.x.name]
        rows, (n, k), isa = math.prod(x.shape[:-1]), q.shape, self.isa
        shift = bool(q.max() > 127)
        stored = store_int8_codes((q - 128 if shift else q).astype(np.int8), int8_block(isa))
        w = self._stored(call, "codes", stored)
        act_args = self.quantized_input(x, "int8", rows, (k,), None)
        epi = [self.weight(call.tensors[name], "float32") for name in ("scale", "offset", "bias")]
        words = {"scalar": 4 * -(-k // 4), "dsp": 2 * -(-k // 4)}.get(isa, 0) * (not packed_x(isa, k))
        params = (
            KernelParam("XQ", "int8", (rows, k)),
            KernelParam("XS", "float32", (rows,)),
            KernelParam("W", "int8", (stored.size,)),
            *(KernelParam(p, "float32", (n,)) for p in ("SC", "OF", "BI")),
            *((KernelParam("XU", "int32", (words,)),) if words else ()),
            KernelParam("Y", "float32", (rows, n)),
        )
        kern = self._c_kernel(
            ("dense_int8_codes", isa, k, n, rows, shift),
            f"bitc_dense_int8_{isa}_{k}x{n}",
            params,
            lambda s: int8_source(s, isa, rows, k, n, shift),
        )
        scratch = [self.new_tensor(f"{node.name}_xu", (words,), "int32").name] if words else []
        y = self.new_tensor(node.name, out_shape, "float32")
        args = [*act_args, w, *epi, *scratch, y.name]
        self.call(kern, args, act_args, [*scratch, y.name], self.label(node))

    def kernel(self, key: Any, build: Any, symbol: str, unroll: bool = False) -> Kernel:
        """The sign packing in asm; W1A1 kernels (pm1 layers on Helium, the row kernels of tiled
        layers) in C on the cores of ``BINARY_C`` (pm1 layers elsewhere: :meth:`w1a1`); every
        other kernel from TIR."""
        if key[0] == "q8" and self.isa != "scalar":  # FPU cores: VCVTR rounds
            return self._quantize_kernel(key)
        if key[0] == "pack":  # sign bits of float rows: CMP / ADC per input
            (kdim, rows) = key[1:]
            params = (
                KernelParam("X", "float32", (rows, kdim)),
                KernelParam("XP", "int32", (rows, -(-kdim // 32))),
            )
            return self._c_kernel(
                key, "bitc_pack_sign", params, lambda s: binary_c.pack_sign_source(s, rows, kdim)
            )
        spec = key[1] if key[0] == "dense" else None
        w1a1 = spec is not None and (spec.act, spec.code, spec.bits, spec.has_offset) == (
            "binary",
            "pm1",
            1,
            False,
        )
        if spec is None or not w1a1 or self.isa not in BINARY_C:
            return super().kernel(key, build, symbol, unroll)
        if key not in self.kernels:  # the TIR kernel's name, the code path after bitc_
            self.kernels[key] = self._binary_kernel(
                spec, key[-1], symbol.replace("bitc_", f"bitc_{self.isa}_", 1)
            )
        return self.kernels[key]

    def _quantize_kernel(self, key: tuple) -> Kernel:
        (rest, rows), n = key[1:], math.prod(key[1])
        params = (
            KernelParam("X", "float32", (rows, *rest)),
            KernelParam("XQ", "int8", (rows, *rest)),
            KernelParam("XS", "float32", (rows,)),
        )
        return self._c_kernel(key, f"bitc_quantize_int8_{n}", params, lambda s: quantize_source(s, rows, n))

    def _binary_kernel(self, spec: Any, rows: int, name: str) -> Kernel:
        """The W1A1 C kernel with the portable kernel's parameters (``OF``: its unused offset)."""
        k, n, kw = spec.in_features, spec.out_features, -(-spec.in_features // 32)
        names, dtype = (("TS", "TH"), "int32") if spec.threshold else (("SC", "OF", "BI"), "float32")
        params = (
            KernelParam("XP", "int32", (rows, kw)),
            KernelParam("P", "int32", (1, n, kw)),
            *(KernelParam(q, dtype, (n,)) for q in names),
            KernelParam("Y", "float32", (rows, n)),
        )
        return Kernel(name, params, binary_source(name, self.isa, rows, k, n, spec.threshold))

    def bit_conv2d(self, node: torch.fx.Node, out_shape: tuple) -> None:
        """Groups-1 int8 and W1A1 convs per pixel in C with the float ops after them fused
        (:mod:`.fusion`); the others keep the portable kernel."""
        from bitcompiler.backends.cortex_m import fusion

        if not fusion.lower_conv(self, node, out_shape):
            super().bit_conv2d(node, out_shape)

    def w1a1(self, node: torch.fx.Node, call: ops.BoundCall, out_shape: tuple) -> None:
        """W1A1 pm1 on a DSP core or the M3: the two-row kernel of :mod:`.binary_c`, its weights
        stored in the order it reads them."""
        a: ops.BitLinearAttrs = call.attrs
        x = self.tensors[call.x.name]
        rows = math.prod(x.shape[:-1])
        planes = self.state[self.param_of[call.tensors["planes"].name]].detach().cpu().numpy()
        n, kw = int(planes.shape[1]), int(planes.shape[2])
        act_args = self.quantized_input(x, "binary", rows, (a.k,), None)
        epi = self.epilogue_args(call)
        self.drop_weight(epi[0])
        stored = self._stored(call, "w1a1", binary_c.store_w1a1_words(planes))
        names, dtype = (("TS", "TH"), "int32") if a.threshold else (("SC", "OF", "BI"), "float32")
        params = (
            KernelParam("XP", "int32", (rows, kw)),
            KernelParam("P", "int32", (self.weights[stored].array.size,)),
            *(KernelParam(q, dtype, (n,)) for q in names),
            KernelParam("Y", "float32", (rows, n)),
        )
        kern = self._c_kernel(
            ("w1a1", self.isa, a.k, n, rows, a.threshold),
            f"bitc_{self.isa}_dense_binary_pm11_{a.k}x{n}",
            params,
            lambda s: binary_c.w1a1_source(s, self.isa, rows, a.k, n, a.threshold),
        )
        y = self.new_tensor(node.name, out_shape, "float32")
        self.call(kern, [*act_args, stored, *epi[1:], y.name], act_args, [y.name], self.label(node))

    def bit_linear(self, node: torch.fx.Node, out_shape: tuple) -> None:
        call = ops.bind(node)
        a: ops.BitLinearAttrs = call.attrs
        if self.isa != "mve" and (a.act, a.code, a.has_offset) == ("binary", "pm1", False):
            return self.w1a1(node, call, out_shape)  # pm1: one plane
        if a.float_signs:  # without act_tables: the portable kernel (no table in RAM)
            return (
                self.float_pm1(node, call, out_shape)
                if self.act_tables
                else super().bit_linear(node, out_shape)
            )
        # int8 or float activations with a float epilogue (the float codes need an FPU)
        if a.act in ("int8", "float") and not a.threshold and not (a.act == "float" and self.isa == "scalar"):
            planes = self.state[self.param_of[call.tensors["planes"].name]].detach().cpu()
            q = planes_to_code(planes, a.k, a.code).numpy()  # (N, K) int64
            if a.act == "float" and np.abs(q).max() <= 2048:  # FPU cores: codes as half floats, VFMA
                center = code_center(planes.shape[0], a.code, a.act, a.has_offset)
                return self.float_codes(node, call, out_shape, q, center)
            lo, hi = int(q.min()), int(q.max())
            if lo >= -128 and (hi <= 127 or (lo >= 0 and hi <= 255)):
                return self.int8_codes(node, call, out_shape, q)
        return super().bit_linear(node, out_shape)


def builder_for(
    features: frozenset[str],
    recompute: bool = True,
    flash_bytes: int = 4 << 20,
    conv_tables: object = "auto",
    act_tables: bool = True,
) -> type[Builder]:
    """The walker for a core with these capability features (``mve``, ``dsp``); ``recompute``:
    see :mod:`.fusion`; ``flash_bytes`` (the board's) and ``conv_tables``: see :mod:`.conv_tables`;
    ``act_tables``: 1-bit float-activation dense layers by tables of partial sums (in RAM), else
    by the portable kernel."""
    isa = "mve" if "mve" in features else "dsp" if "dsp" in features else "scalar"
    attrs = {"isa": isa, "recompute": recompute, "flash_bytes": flash_bytes, "conv_tables": conv_tables}
    attrs["act_tables"] = act_tables
    return type(f"Builder_{isa}", (Builder,), attrs)
