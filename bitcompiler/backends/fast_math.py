"""Float ops whose TVM default lowering is scalar library calls, lowered to vectorizable math.

TVM legalizes ``relax.nn.gelu`` with ``topi.erf``, which LLVM emits as one ``erff`` call per
element: GELU then dominated the MLP-Mixer's run time (8 calls, 5.5 ms of ~13 ms). ``topi.fast_erf``
is a rational polynomial LLVM vectorizes; its error is at most 3.4e-7 (absolute and relative,
measured over [-6, 6]), well inside the 1e-5 relative tolerance against the PyTorch reference.
"""

from __future__ import annotations

from typing import Any


def legalize_gelu(bb: Any, call: Any) -> Any:
    """``x * (0.5 + 0.5 * erf(x / sqrt(2)))`` with ``fast_erf`` (float32; other dtypes: TVM's default)."""
    from tvm import tirx, topi
    from tvm.relax.transform.legalize_ops.nn import _nn_gelu

    if call.args[0].ty.dtype != "float32":
        return _nn_gelu(bb, call)

    def te_gelu(x: Any) -> Any:
        erf = topi.fast_erf(x * tirx.const(0.5**0.5, "float32"))
        return x * (tirx.const(0.5, "float32") + erf * tirx.const(0.5, "float32"))

    return bb.call_te(te_gelu, call.args[0], primfunc_name_hint="gelu")


def legalize_map() -> dict[str, Any]:
    """Overrides for ``relax.transform.LegalizeOps(customize_legalize_map=...)``."""
    from bitcompiler.backends.lower_pool import legalize_max_pool2d

    return {"relax.nn.gelu": legalize_gelu, "relax.nn.max_pool2d": legalize_max_pool2d}
