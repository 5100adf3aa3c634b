"""Int8-activation convs on Cortex-M through the dense int8 kernels' inner loops (im2col rows).

For each output pixel the receptive field is gathered into one row of ``K = KH * KW * C`` int8
values (zeros where the window leaves the image), in the order the weights are stored:
``codes (O, KH, KW, C)`` as :func:`bitcompiler.kernels.codes_from_planes` gives them, four
output channels a block as :func:`.dense_c.store_int8_codes` stores a dense layer's rows. The row
is then a dense layer's input: the same unpacking (``SXTB16`` pairs on DSP cores) and the same
``SMLAD`` / ``VMLADAVA`` / ``MLA`` loop (:mod:`.dense_sources`), exact int32 sums, and the
numerics' epilogue with ``sumx`` the sum of the row (``F.conv2d(x, ones)``). Groups-1 convs
with unsigned codes of at most 8 bits; the others keep the portable kernel.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from bitcompiler import ops
from bitcompiler.backends.cortex_m.dense_sources import (
    ROWS,
    c_kernel,
    int8_block,
    row_accumulators,
    store_int8_codes,
    unpack,
)
from bitcompiler.backends.cortex_m.kernel_c import Kernel, KernelParam


def int8_conv_source(symbol: str, isa: str, spec: Any, shift: bool) -> str:
    """``XQ (1, C, H, W) int8, XS (1,), W (stored codes), SC, OF, BI, R (K,) row scratch,
    [XU scratch,] Y (1, O, OH, OW)``."""
    c, h, w, o = spec.in_channels, spec.in_h, spec.in_w, spec.out_channels
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = spec.kernel, spec.stride, spec.padding, spec.dilation
    oh, ow, k = spec.out_h, spec.out_w, spec.kernel[0] * spec.kernel[1] * c
    scratch = "" if isa == "mve" else "int32_t* XU, "
    fix = "acc += 128 * sumx; /* codes stored as Q - 128 */" if shift else ""
    body = [
        "const int32_t m = 0;",
        f"for (int32_t p = 0; p < {oh * ow}; ++p) {{",
        f"  int32_t oy = p / {ow}, ox = p % {ow};",
        f"  for (int32_t u = 0; u < {kh}; ++u) {{",
        f"    int32_t iy = oy * {sh} - {ph} + u * {dh};",
        f"    for (int32_t v = 0; v < {kw}; ++v) {{",
        f"      int32_t ix = ox * {sw} - {pw} + v * {dw};",
        f"      int8_t *r = R + (u * {kw} + v) * {c};",
        f"      if (iy < 0 || iy >= {h} || ix < 0 || ix >= {w}) {{ for (int32_t i = 0; i < {c}; ++i) r[i] = 0; }}",
        f"      else {{ const int8_t *xi = XQ + iy * {w} + ix; for (int32_t i = 0; i < {c}; ++i) r[i] = xi[i * {h * w}]; }}",
        "    }",
        "  }",
        "  const int8_t *x = R, *w = W;",
        "  int32_t sumx = 0;",
        *("  " + line for line in unpack(isa, k)),
        f"  for (int32_t j = 0; j < {o}; j += {ROWS}) {{",
        "    int32_t a0 = 0, a1 = 0, a2 = 0, a3 = 0;",
        *("    " + line for line in row_accumulators(isa, k)),
        "    int32_t accs[4] = {a0, a1, a2, a3};",
        f"    for (int32_t r = 0; r < {ROWS} && j + r < {o}; ++r) {{",
        "      int32_t n = j + r, acc = accs[r];",
        f"      {fix}",
        f"      Y[n * {oh * ow} + p] = (((SC[n] * XS[m]) * (float)acc) + ((OF[n] * XS[m]) * (float)sumx)) + BI[n];",
        "    }",
        "  }",
        "}",
    ]
    params = (
        f"int8_t* XQ, float* XS, int8_t* W, float* SC, float* OF, float* BI, int8_t* R, {scratch}float* Y"
    )
    return c_kernel(symbol, params, body)


def int8_conv(b: Any, node: torch.fx.Node, call: ops.BoundCall, spec: Any, out_shape: tuple) -> None:
    """Lower one groups-1 int8 conv on the builder ``b`` (a :class:`.dense_c.Builder`)."""
    from bitcompiler import kernels

    x = b.tensors[call.x.name]
    qual = b.param_of[call.tensors["planes"].name]
    q = kernels.codes_from_planes(b.state[qual].detach().cpu().numpy(), spec.in_channels).astype(np.int64)
    q = q.reshape(spec.out_channels, -1)  # (O, KH * KW * C), the row's order
    shift, isa, k = bool(q.max() > 127), b.isa, q.shape[1]
    stored = store_int8_codes((q - 128 if shift else q).astype(np.int8), int8_block(isa))
    w = b._stored(call, "codes", stored)
    act_args = b.quantized_input(x, "int8", 1, tuple(x.shape[1:]), None)
    epi = [b.weight(call.tensors[n], "float32") for n in ("scale", "offset", "bias")]
    words = {"scalar": 4 * -(-k // 4), "dsp": 2 * -(-k // 4)}.get(isa, 0)
    params = (
        KernelParam("XQ", "int8", tuple(x.shape)),
        KernelParam("XS", "float32", (1,)),
        KernelParam("W", "int8", (stored.size,)),
        *(KernelParam(p, "float32", (spec.out_channels,)) for p in ("SC", "OF", "BI")),
        KernelParam("R", "int8", (k,)),
        *((KernelParam("XU", "int32", (words,)),) if words else ()),
        KernelParam("Y", "float32", tuple(out_shape)),
    )
    key = ("conv_int8_codes", isa, spec, shift)
    if key not in b.kernels:
        name = f"bitc_conv2d_int8_{isa}_{spec.in_channels}x{spec.out_channels}_{len(b.kernels)}"
        b.kernels[key] = Kernel(name, params, int8_conv_source(name, isa, spec, shift))
    scratch = [b.new_tensor(f"{node.name}_row", (k,), "int8").name]
    scratch += [b.new_tensor(f"{node.name}_xu", (words,), "int32").name] if words else []
    y = b.new_tensor(node.name, out_shape, "float32")
    args = [*act_args, w, *epi, scratch[0], *scratch[1:], y.name]
    b.call(b.kernels[key], args, act_args, [*scratch, y.name], b.label(node))
