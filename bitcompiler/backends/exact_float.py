"""Float arithmetic the LLVM target rounds exactly as PyTorch does: no fused multiply-add.

TVM's LLVM target builds every module with ``AllowFPOpFusion = Fast`` (hard-wired, no target
option turns it off), so on a CPU with FMA ``a * b + c`` compiles to one ``vfmadd`` that rounds
once where PyTorch rounds twice. In a bit layer's epilogue that moves an output by one ulp, which
can move the next layer's int8 code across a rounding boundary and then grows with depth.

:func:`no_contraction` wraps the product in every float ``x * y ± z`` of a PrimFunc in
``llvm.arithmetic.fence`` (the intrinsic behind clang's ``__arithmetic_fence``): it compiles to no
instruction, but the backend cannot fuse across it, so the product is rounded to float32 before the
add, as in PyTorch. Accumulations (``acc = acc + x * w``: float matmuls, weight-only layers) keep
their FMA; their sums are outside the exactness contract (docs/guide.md, "Exactness") anyway.
The Cortex-M C bundle needs none of this: it compiles with ``-ffp-contract=off``.

:func:`convert_exact_unary` lowers ``bitc::exact_unary`` (sigmoid, tanh): the formulation the
reference evaluates (``numerics.sigmoid32``/``tanh32``), written once, here evaluated on TIR
expressions by :class:`TirFloat32`; with the products fenced it rounds exactly as the reference.
"""

from __future__ import annotations

from typing import Any

FENCE = "llvm.arithmetic.fence"


def _is_float(e: Any) -> bool:
    ty = getattr(e, "ty", None)
    return ty is not None and str(getattr(ty, "dtype", "")).startswith("float")


def _fenced(e: Any) -> Any:
    from tvm import tirx

    return tirx.call_llvm_pure_intrin(str(e.ty.dtype), FENCE, e)


def _fence_operands(node: Any) -> Any:
    """``Add``/``Sub`` of float operands: each operand that is a product, fenced."""
    from tvm import tirx

    if not _is_float(node):
        return node
    a = _fenced(node.a) if isinstance(node.a, tirx.Mul) else node.a
    b = _fenced(node.b) if isinstance(node.b, tirx.Mul) else node.b
    if a.same_as(node.a) and b.same_as(node.b):
        return node
    return type(node)(a, b)


def _is_accumulation(store: Any) -> bool:
    """``buf[i] = buf[i] + ...`` (either side): a reduction update."""
    import tvm
    import tvm_ffi
    from tvm import tirx

    value = store.value
    if not isinstance(value, tirx.Add):
        return False
    for side in (value.a, value.b):
        if (
            isinstance(side, tvm.ir.TensorLoad)
            and side.source.same_as(store.buffer)
            and tvm_ffi.structural_equal(list(side.indices), list(store.indices))
        ):
            return True
    return False


def fence_products(func: Any) -> Any:
    """``func`` with the float products that feed an add or subtract fenced (accumulations kept)."""
    import tvm_ffi
    from tvm import tirx

    def store(s: Any) -> Any:
        if _is_accumulation(s) or not _is_float(s.value):
            return s
        value = tvm_ffi.structural_map(s.value, [((tirx.Add, tirx.Sub), _fence_operands)], order="post")
        return s if value.same_as(s.value) else tirx.BufferStore(s.buffer, value, s.indices)

    return tvm_ffi.structural_map(func, [(tirx.BufferStore, store)], order="post")


def no_contraction() -> Any:
    """A module pass: :func:`fence_products` on every PrimFunc (LLVM targets only)."""
    import tvm
    from tvm import tirx

    @tvm.transform.module_pass(opt_level=0, name="BitcNoContraction")
    def _pass(mod: Any, _ctx: Any) -> Any:
        updates = {gv: fence_products(f) for gv, f in mod.functions.items() if isinstance(f, tirx.PrimFunc)}
        for gv, f in updates.items():
            mod[gv] = f
        return mod

    return _pass


class TirFloat32:
    """The operations of ``numerics.exp32``/``sigmoid32``/``tanh32`` on float32 TIR expressions
    (the methods of ``numerics.TorchFloat32``, one for one)."""

    def const(self, v: float) -> Any:
        from tvm import tirx

        from bitcompiler.quant.numerics import f32

        return tirx.const(f32(v), "float32")

    def floor(self, x: Any) -> Any:
        from tvm import tirx

        return tirx.floor(x)

    def abs(self, x: Any) -> Any:
        from tvm import tirx

        return tirx.abs(x)

    def clamp(self, x: Any, lo: float, hi: float) -> Any:
        from tvm import tirx

        return tirx.min(tirx.max(x, self.const(lo)), self.const(hi))

    def select_gt(self, a: Any, t: float, yes: Any, no: Any) -> Any:
        from tvm import tirx

        return tirx.Select(a > self.const(t), yes, no)

    def pow2(self, n: Any) -> Any:
        from tvm import tirx

        bits = tirx.shift_left(tirx.Cast("int32", n) + tirx.const(127, "int32"), tirx.const(23, "int32"))
        return tirx.reinterpret("float32", bits)


def convert_exact_unary(node: Any, importer: Any) -> Any:
    """``bitc::exact_unary(x, fn)``: an element-wise TE compute of the reference's formulation, kept
    out of operator fusion: inlined into a consumer that reads it several times (``sigmoid(cy)``
    of a tanh in an LSTM) the formula's expression tree would be copied per read, and a chain of
    them grows multiplicatively (DIA-Net's cell compiled for minutes)."""
    from tvm import te

    from bitcompiler.quant import numerics

    bb = importer.block_builder
    x, fn = importer.env[node.args[0]], str(node.args[1])
    formula, ops = numerics.EXACT_UNARY[fn], TirFloat32()

    def compute(t: Any) -> Any:
        return te.compute(t.shape, lambda *i: formula(t(*i), ops), name=f"exact_{fn}")

    call = bb.call_te(compute, x, primfunc_name_hint=f"bitc_{fn}")
    gv = call.args[0]
    bb.update_func(gv, bb.get()[gv].with_attr("op_pattern", 8))  # opaque: never fused
    return bb.emit(call)
