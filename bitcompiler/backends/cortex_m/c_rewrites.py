"""TIR rewrites that keep TVM's C output defined and correct C (applied before the C codegen).

TIR's semantics are LLVM's: a left shift wraps in two's complement, and an expression's value
does not depend on how the printer names temporaries. C differs on both counts; these rewrites
make the printed C mean what the TIR means, with the same instructions.
"""

from __future__ import annotations

from typing import Any


def unsigned_shifts(func: Any) -> Any:
    """Signed ``a << b`` -> ``(int32_t)((uint32_t)a << (uint32_t)b)``.

    In C, shifting a 1 into the sign bit (``1 << 31`` when packing the 32nd sign bit) or shifting a
    negative value (a plane's signed popcount difference) is undefined behaviour; TIR means the
    two's-complement result, which the unsigned shift gives with the same instruction.
    """
    import tvm_ffi
    from tvm import tirx

    shl = type(tirx.Var("v", "int32") << 1)  # the LShift node type

    def rewrite(node: Any) -> Any:
        dtype = str(node.ty)
        if not dtype.startswith("int") or dtype == "int64":
            return node
        unsigned = "u" + dtype
        return tirx.Cast(dtype, shl(tirx.Cast(unsigned, node.a), tirx.Cast(unsigned, node.b)))

    return tvm_ffi.structural_map(func, [(shl, rewrite)], order="post")


def select_min_max(func: Any) -> Any:
    """``max(a, b)`` / ``min(a, b)`` -> ``a > b ? a : b`` / ``a < b ? a : b`` (the same C).

    TVM's C codegen binds max/min operands to temporaries and reuses a temporary for the same
    text later in the block, even across a store to that buffer: the int8 quantizer of a
    one-value row (K=1) stored ``amax = max(amax, |x|)`` and then scaled by the stale ``amax``
    (-FLT_MAX). A Select prints its operands in place. Only operands that load from memory can
    go stale, so only those are rewritten (a computed operand keeps its single evaluation)."""
    import tvm
    import tvm_ffi
    from tvm import tirx

    def to_select(op: Any) -> Any:
        def rewrite(node: Any) -> Any:
            if not any(isinstance(x, tvm.ir.TensorLoad) for x in (node.a, node.b)):
                return node
            return tirx.Select(op(node.a, node.b), node.a, node.b)

        return rewrite

    pairs = [(tirx.Max, to_select(lambda a, b: a > b)), (tirx.Min, to_select(lambda a, b: a < b))]
    return tvm_ffi.structural_map(func, pairs, order="post")
