"""Relax converters of ``bitc::tiled_linear`` and ``bitc::tiled_conv2d`` (docs/methods.md §4).

Part of the CPU lowering (:mod:`bitcompiler.backends.lower` lists the converters).
"""

from __future__ import annotations

from typing import Any

from torch import fx

from bitcompiler import ops
from bitcompiler.backends import relax_emit
from bitcompiler.backends.lower_bit import quantized_input
from bitcompiler.backends.relax_emit import as_int, constant_of, emit_kernel, kernel_target, shape_of


def convert_tiled_linear(node: fx.Node, importer: Any) -> Any:
    """Row-aligned: one fused kernel of the R distinct rows with the expand as its epilogue (rows in
    lanes, or byte lanes) or, where neither applies, the rows' dense kernel then the expand kernel;
    else the unaligned kernel."""
    from tvm import relax

    from bitcompiler import kernels

    bb, env = importer.block_builder, importer.env
    call = ops.bind(node)
    a: ops.TiledLinearAttrs = call.attrs
    x, t = env[call.x], {name: env[v] for name, v in call.tensors.items()}
    spec = kernels.TiledDenseSpec.from_attrs(a, as_int(shape_of(t["scale"])[0]))
    x2, lead, rows = relax_emit.as_rows(bb, x, a.k)
    epi = [t["thr_sign"], t["thr"]] if a.threshold else [t["scale"], t["bias"]]
    out_ty = relax.TensorType((rows, a.n), "float32")
    name = f"bitc_tiled_{a.act}_{a.k}x{a.n}_p{a.p}" + ("_thr" if a.threshold else "")
    weights = constant_of(call.tensors["tile"])
    relaid = (
        kernels.relaid_tiled_kernel(spec, weights.numpy(), kernel_target()) if weights is not None else None
    )
    if relaid is not None:  # both stages in one kernel reading the tile in its order (same bits)
        y = emit_kernel(
            bb, relaid.func, f"{name}_{relaid.suffix}", [x2, relax.const(relaid.weights), *epi], out_ty
        )
        return relax_emit.from_rows(bb, y, lead, a.n)
    inputs = quantized_input(bb, x2, a.act, None, (-(-a.k // 32),))
    if (fused := kernels.tiled_fused_kernel(spec, kernel_target())) is not None:
        y = emit_kernel(bb, fused, name, [*inputs, t["tile"], *epi], out_ty)
    elif spec.aligned:
        plan = kernels.tiled_linear_stages(spec, kernel_target())
        y = emit_stages(bb, plan, name, inputs, t, {"rows": (rows, spec.rows), "y": (rows, a.n)})
    else:
        prim = kernels.tiled_unaligned_kernel(spec, kernel_target())
        y = emit_kernel(bb, prim, name, [*inputs, t["tile"], *epi], out_ty)
    return relax_emit.from_rows(bb, y, lead, a.n)


def convert_tiled_conv2d(
    node: fx.Node,
    importer: Any,
    quantize: Any = quantized_input,
    target: Any = kernel_target,
    emit: Any = emit_kernel,
) -> Any:
    """Row-aligned tiled conv: the conv kernel of the R distinct filters (unit scales, so its output is
    the exact integer accumulator as float), then the expand kernel reuses each filter p times.

    Another backend passes its activation quantizer (``quantized_input``'s signature), the kernels'
    target (a callable) and its ``emit_kernel``."""
    from bitcompiler import kernels

    bb, env = importer.block_builder, importer.env
    call = ops.bind(node)
    a: ops.TiledConv2dAttrs = call.attrs
    x, t = env[call.x], {name: env[v] for name, v in call.tensors.items()}
    cw = as_int(shape_of(t["tile"])[-1])
    m, _, h, w = shape_of(x)
    rows = kernels.TiledConvSpec.rows_conv(a, as_int(h), as_int(w))
    spec = kernels.TiledConvSpec.from_attrs(a, rows, as_int(shape_of(t["scale"])[0]))
    inputs = quantize(bb, x, a.act, (a.in_channels, rows.in_h, rows.in_w, 1), (cw,))
    name = (
        f"bitc_tiled_conv2d_{a.act}_{a.in_channels}x{a.out_channels}_{a.kernel[0]}x{a.kernel[1]}_p{a.p}"
        + ("_thr" if a.threshold else "")
    )
    plan = kernels.tiled_conv_stages(rows, spec, target())
    shapes = {
        "rows": (m, rows.out_channels, rows.out_h, rows.out_w),
        "y": (m, a.out_channels, rows.out_h, rows.out_w),
    }
    return emit_stages(bb, plan, name, inputs, t, shapes, emit)


def emit_stages(
    bb: Any, plan: Any, name: str, inputs: list, tensors: dict, shapes: dict, emit: Any = emit_kernel
) -> Any:
    """The two kernels of a row-aligned tiled layer (:class:`kernels.TiledStages`), wired by name;
    ``emit(bb, prim, name, args, out_ty)`` adds each kernel (the GPU backend passes its own)."""
    import numpy as np
    from tvm import relax

    r = plan.rows
    values = {
        **{f"x{i}": v for i, v in enumerate(inputs)},
        **tensors,
        "one": relax.const(np.ones(r, "float32")),
        "zero": relax.const(np.zeros(r, "float32")),
    }
    if "unit_xs" in plan.stage1.args:
        values["unit_xs"] = bb.emit(relax.op.ones_like(inputs[1]))
    for stage in (plan.stage1, plan.stage2):
        out = relax.TensorType(shapes[stage.out], "float32")
        values[stage.out] = emit(bb, stage.build(), name + stage.suffix, [values[v] for v in stage.args], out)
    return values["y"]
