"""The CPU backend's fusions: Relax passes over the lowered module, first in its Relax pipeline
(:func:`bitcompiler.backends.cpu.pipeline.relax_pipeline`), so ``BITC_DUMP`` shows the module
after each. They are target matters: only the CPU's binary conv kernels
(:mod:`bitcompiler.kernels.conv_binary` and its faster forms) and its integer conv
(:mod:`bitcompiler.kernels.conv_int8`, the clamp) have these epilogues, and the results are the
same numbers as the calls they replace.

* :func:`fuse_packed_output`: ``pack_sign_nchw(conv(args))`` of a threshold binary conv
  (:func:`~bitcompiler.kernels.conv_pm1.packs_output`), packed for a groups-1 binary layer,
  becomes ``conv_packed(args)``: the conv writes the next layer's packed input itself.
  Where the same packed input feeds a ResNet block's 1x1 projection shortcut and that conv's
  kernel can compute it from its im2col's centre tap
  (:func:`~bitcompiler.kernels.conv.fuses_shortcut`), both become one call with two outputs:
  ``p, s = conv_packed_shortcut(args, shortcut_args)``. The shortcut's output is then written by
  the threads that write those pixels of the block (and read them in its second conv), in the
  same parallel loop; on its own it ran on the calling thread (too little work for a launch).
* :func:`fuse_packed_pool`: ``pack_sign_nchw(clip(max_pool2d(y)))`` (any chain of max pools and
  clips that keep the sign) becomes ``or_pool(pack_sign_nchw(y))``: the window's OR of the packed
  sign bits, the same bits; a threshold conv's ``y`` is then packed by the conv itself (next pass).
* :func:`fuse_residual_clip`: ``clip(conv(args) + res, lo, hi)`` of an affine binary conv
  (:func:`~bitcompiler.kernels.conv_pm1.fuses_residual`) whose output and sum nothing else
  reads (a ResNet block's end) becomes ``conv_res(args, res)``; where a groups-1
  ``pack_sign_nchw`` reads that output too (the next block's binary convs), the conv writes both
  (:func:`~bitcompiler.kernels.conv_pm1.packs_residual`): ``y, p = conv_res_packed(args, res)``.
* :func:`fuse_clamped_output`: ``relu(conv(args))`` or ``clip(conv(args), lo, hi)`` of an
  int8-activation conv (:func:`~bitcompiler.kernels.conv.clamps_output`: a stem's BN + ReLU or
  hardtanh) whose output nothing else reads becomes ``conv_clamped(args)``. An ImageNet stem's
  ReLU over 64x112x112 floats took 230 us as a pass of its own.

The converters mark the calls these passes may rewrite (``relax_emit.kernel_func``'s ``about``);
the replaced calls stay until ``DeadCodeElimination``, later in the pipeline, drops those nothing
reads (a threshold conv's float output may still feed a float layer).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from bitcompiler.backends.lower_pool import pool_window
from bitcompiler.backends.relax_emit import kernel_about, kernel_func

# (a binding's value, its function's scope) -> the value to bind instead, or None
Rewrite = Callable[[Any, "_Scope"], Any]


class _Scope:
    """What a rewrite reads about the function it is in, and how it adds a kernel to the module."""

    def __init__(self, mod: Any, bb: Any, func: Any, target: Any) -> None:
        from tvm import relax

        self.mod, self.bb, self.target = mod, bb, str(target)
        self.var2val = relax.analysis.get_var2val(func)
        self.pending: list = []  # bindings a rewrite added (:meth:`bind`), placed before its own
        self.var: Any = None  # the variable of the binding being rewritten
        self.uses: dict[Any, int] = {}
        self.packed: dict[Any, Any] = {}  # a variable a groups-1 pack reads -> the packed type
        self.signs: dict[Any, Any] = {}  # a residual conv's output -> the (output, signs) call
        self.func = func
        self._shortcuts: dict[Any, tuple] | None = None
        self.fused: dict[Any, tuple[Any, int]] = {}  # a replaced binding's var -> (call, its output)
        for block in func.body.blocks:
            if isinstance(block, relax.DataflowBlock):
                for var, users in relax.analysis.udchain(block).items():
                    self.uses[var] = len(users)
            for b in block.bindings:
                if _packs_groups_1(self, b.value):
                    self.packed[b.value.args[1].fields[0]] = b.value.ty

    def only_use(self, var: Any) -> bool:
        """``var`` is a dataflow variable read by exactly one binding."""
        from tvm import relax

        return isinstance(var, relax.DataflowVar) and self.uses.get(var, 0) == 1

    def marked(self, value: Any) -> tuple[dict, Any] | None:
        """``(about, value)`` when ``value`` is a ``call_tir`` of a marked kernel, else None."""
        call = _call_tir(value)
        if call is None or call.args[0] not in self.mod.functions:
            return None
        about = kernel_about(self.mod[call.args[0]])
        return None if about is None else (about, call)

    def shortcuts(self) -> dict[Any, tuple]:
        """``(pack, shortcut, spec, shortcut spec, fused call's arguments, its kernel's name)``
        keyed by each of the two variables: a ResNet block's first conv's packed output and the
        block's 1x1 projection shortcut on the same packed input (the same float map packed),
        where one kernel can compute both (:func:`~bitcompiler.kernels.conv.fuses_shortcut`)."""
        from tvm import relax

        from bitcompiler.kernels.conv import fuses_shortcut

        if self._shortcuts is not None:
            return self._shortcuts

        def source(xp: Any) -> Any:
            # the float map a groups-1 pack made xp from (each reader has its own pack call until
            # common subexpressions are eliminated, later), else xp
            value = self.var2val.get(xp) if _is_var(xp) else None
            return value.args[1].fields[0] if value is not None and _packs_groups_1(self, value) else xp

        def ready(call: Any) -> bool:  # its arguments but the input are constants or parameters
            return not any(isinstance(a, relax.DataflowVar) for a in call.args[1].fields[1:])

        packs: dict[Any, tuple] = {}  # source -> (pack var, its conv call, its conv's about)
        shorts: dict[Any, list] = {}  # source -> [(1x1 conv var, call, spec)]
        order: dict[Any, int] = {}
        for block in self.func.body.blocks:
            for b in block.bindings:
                order[b.var] = len(order)
                conv = _packed_conv(b.value, self)
                if conv is not None and ready(conv[1]):
                    packs.setdefault(source(conv[1].args[1].fields[0]), (b.var, conv[1], conv[0]))
                marked = self.marked(b.value)
                if marked is not None and marked[0]["op"] == "bit_conv2d" and ready(marked[1]):
                    spec = _conv_spec(marked[0])
                    if spec.kernel == (1, 1) and not spec.threshold:
                        shorts.setdefault(source(marked[1].args[1].fields[0]), []).append(
                            (b.var, marked[1], spec)
                        )
        self._shortcuts = {}
        for key, (pack, conv, about) in packs.items():
            spec = _conv_spec(about)
            for short, s_call, s_spec in shorts.get(key, []):
                if fuses_shortcut(spec, s_spec, self.target):
                    # the input of whichever comes first (the other's may be bound after it)
                    xp = (conv if order[pack] < order[short] else s_call).args[1].fields[0]
                    args = [xp, *conv.args[1].fields[1:], *s_call.args[1].fields[1:]]
                    name = f"{about['name']}_packed_shortcut"
                    self._shortcuts[pack] = self._shortcuts[short] = (pack, short, spec, s_spec, args, name)
                    break
        return self._shortcuts

    def producer(self, var: Any) -> tuple[dict, Any] | None:
        """:meth:`marked` of the value ``var`` is bound to."""
        return self.marked(self.var2val.get(var)) if _is_var(var) else None

    def emit(self, prim: Any, name: str, args: list, out_ty: Any, about: dict | None = None) -> Any:
        """A normalized ``call_tir`` of ``prim``, added to the module as ``name``."""
        from tvm import relax

        gv = self.bb.add_func(kernel_func(prim, about), name)
        return self.bb.normalize(relax.call_tir(gv, relax.Tuple(args), out_ty))

    def bind(self, value: Any, name: str) -> Any:
        """A new dataflow variable bound to ``value`` just before the binding being rewritten."""
        from tvm import relax

        var = relax.DataflowVar(name, value.ty)
        self.pending.append(relax.VarBinding(var, value))
        return var


def _packs_groups_1(scope: _Scope, value: Any) -> bool:
    pack = scope.marked(value)
    return pack is not None and pack[0] == {"op": "pack_sign_nchw", "groups": 1}


def _is_var(expr: Any) -> bool:
    from tvm import relax

    return isinstance(expr, relax.Var)


def _call_tir(expr: Any) -> Any | None:
    import tvm
    from tvm import relax

    if isinstance(expr, relax.Call) and expr.op.same_as(tvm.ir.Op.get("relax.call_tir")):
        return expr
    return None


def _conv_spec(about: dict) -> Any:
    from bitcompiler.kernels import ConvSpec

    fields: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in about["spec"].items()}
    return ConvSpec(**fields)


def _packed_conv(value: Any, scope: _Scope) -> tuple[dict, Any] | None:
    """``(about, conv)`` where ``value`` is ``pack_sign_nchw(y)`` (groups 1) of a packable
    threshold conv's ``y``."""
    from bitcompiler.kernels.conv_pm1 import packs_output

    if not _packs_groups_1(scope, value):
        return None
    producer = scope.producer(value.args[1].fields[0])
    if producer is None or producer[0]["op"] != "bit_conv2d" or not packs_output(_conv_spec(producer[0])):
        return None
    return producer


def _packed_output(value: Any, scope: _Scope) -> Any | None:
    """``pack_sign_nchw(y)`` (groups 1) of a packable threshold conv's ``y``: that conv, packed;
    with the block's 1x1 shortcut where one kernel computes both (:meth:`_Scope.shortcuts`), the
    two bindings become the two outputs of one call, placed at the first of them."""
    from tvm import relax

    from bitcompiler import kernels

    if scope.var in scope.fused:  # the second binding of a pair
        return relax.TupleGetItem(*scope.fused[scope.var])
    pair = scope.shortcuts().get(scope.var)
    if pair is not None:
        pack, short, spec, s_spec, args, name = pair
        prim = kernels.conv2d_kernel(spec, scope.target, packed_output=True, shortcut=s_spec)
        both = scope.bind(scope.emit(prim, name, args, [pack.ty, short.ty]), "packed_shortcut")
        scope.fused[pack], scope.fused[short] = (both, 0), (both, 1)
        return relax.TupleGetItem(*scope.fused[scope.var])
    producer = _packed_conv(value, scope)
    if producer is None:
        return None
    about, conv = producer
    prim = kernels.conv2d_kernel(_conv_spec(about), scope.target, packed_output=True)
    return scope.emit(prim, f"{about['name']}_packed", list(conv.args[1].fields), value.ty)


def _residual_clip(value: Any, scope: _Scope) -> Any | None:
    """``clip(conv(args) + res, lo, hi)`` whose conv output and sum have no other reader:
    the conv with the residual and clamp in its epilogue."""
    import tvm_ffi
    from tvm import relax

    from bitcompiler import kernels
    from bitcompiler.kernels.conv_pm1 import fuses_residual, packs_residual

    bounds = _clip_bounds(value)
    if bounds is None or not scope.only_use(value.args[0]):
        return None
    lo, hi = bounds
    total = scope.var2val.get(value.args[0])
    if not _is_op(total, "relax.add"):
        return None
    for conv_var, res in (total.args, total.args[::-1]):
        producer = scope.producer(conv_var)
        if producer is None or producer[0]["op"] != "bit_conv2d" or not scope.only_use(conv_var):
            continue
        about, conv = producer
        spec = _conv_spec(about)
        if not fuses_residual(spec) or not tvm_ffi.structural_equal(res.ty, conv_var.ty):
            continue
        args = [*conv.args[1].fields, res]
        packed_ty = scope.packed.get(scope.var)
        if packed_ty is not None and packs_residual(spec):  # the next block's input too
            prim = kernels.conv2d_kernel(spec, scope.target, packed_output=True, residual_clip=(lo, hi))
            both = scope.emit(prim, f"{about['name']}_res_packed", args, [value.ty, packed_ty])
            scope.signs[scope.var] = scope.bind(both, "res_packed")
            return relax.TupleGetItem(scope.signs[scope.var], 0)
        prim = kernels.conv2d_kernel(spec, scope.target, residual_clip=(lo, hi))
        return scope.emit(prim, f"{about['name']}_res", args, value.ty)
    return None


def _clamped(value: Any, scope: _Scope) -> Any | None:
    """``clip(conv(args), lo, hi)`` or ``relu(conv(args))`` of an int8-activation conv whose output
    nothing else reads (a stem's BN + ReLU or hardtanh): the conv with the clamp in its epilogue."""
    from bitcompiler import kernels
    from bitcompiler.kernels.conv import clamps_output

    bounds: tuple[float, float | None] | None = (
        (0.0, None) if _is_op(value, "relax.nn.relu") else _clip_bounds(value)
    )
    if bounds is None:
        return None
    producer = scope.producer(value.args[0])
    if producer is None or producer[0]["op"] != "bit_conv2d" or not scope.only_use(value.args[0]):
        return None
    (about, conv), spec = producer, _conv_spec(producer[0])
    if spec.threshold or not clamps_output(spec, scope.target):
        return None
    prim = kernels.conv2d_kernel(spec, scope.target, clip=bounds)
    return scope.emit(prim, f"{about['name']}_clamped", list(conv.args[1].fields), value.ty)


def _residual_signs(value: Any, scope: _Scope) -> Any | None:
    """``pack_sign_nchw(y)`` (groups 1) of a residual conv's ``y`` that writes them: its second output."""
    from tvm import relax

    if not _packs_groups_1(scope, value):
        return None
    both = scope.signs.get(value.args[1].fields[0])
    return None if both is None else relax.TupleGetItem(both, 1)


def _packed_pool(value: Any, scope: _Scope) -> Any | None:
    """``pack_sign_nchw(p(y))``, ``p`` a chain of max pools and clips ``[lo < 0 <= hi]`` that
    nothing else reads: ``or_pool(pack_sign_nchw(y))``. A clip keeps every sign ``y >= 0`` and a
    window's max has its sign bit set exactly when one tap's has: the same bits, pooled 32
    channels a word (and a threshold conv then writes them packed: :func:`fuse_packed_output`)."""
    from tvm import relax

    from bitcompiler import kernels

    pack = scope.marked(value)
    if pack is None or pack[0].get("op") != "pack_sign_nchw":
        return None
    windows: list = []
    y = value.args[1].fields[0]
    while scope.only_use(y):
        src = scope.var2val.get(y)
        if _is_op(src, "relax.clip"):
            bounds = _clip_bounds(src)
            if bounds is None or not bounds[0] < 0 <= bounds[1]:
                break
        elif _is_op(src, "relax.nn.max_pool2d"):
            window = pool_window(src)
            if window is None:
                break
            windows.insert(0, window)
        else:
            break
        y = src.args[0]
    if not windows:
        return None
    groups, (m, _, _, _, words) = pack[0]["groups"], value.ty.shape
    c = int(y.ty.shape[1])
    prim = kernels.pack_sign_nchw(c, windows[0].h, windows[0].w, groups, scope.target)
    ty = relax.TensorType((m, windows[0].h, windows[0].w, groups, words), "int32")
    out = scope.bind(scope.emit(prim, "bitc_pack_sign_nchw", [y], ty, pack[0]), "packed")
    for i, window in enumerate(windows):
        ty = relax.TensorType((m, window.oh, window.ow, groups, words), "int32")
        call = scope.emit(kernels.or_pool_packed_kernel(groups, int(words), window, scope.target),
                          "bitc_or_pool_packed", [out], ty)  # fmt: skip
        out = call if i == len(windows) - 1 else scope.bind(call, "pooled")
    return out


def _is_op(expr: Any, name: str) -> bool:
    import tvm
    from tvm import relax

    return isinstance(expr, relax.Call) and expr.op.same_as(tvm.ir.Op.get(name))


def _clip_bounds(expr: Any) -> tuple[float, float] | None:
    """``(lo, hi)`` of a ``relax.clip`` with finite constant bounds, else None."""
    if not _is_op(expr, "relax.clip"):
        return None
    lo, hi = (_float(v) for v in expr.args[1:])
    return None if lo is None or hi is None else (lo, hi)


def _float(expr: Any) -> float | None:
    """The finite float of a constant bound (a ``FloatImm``), or None."""
    import tvm

    value = expr.value if isinstance(expr, tvm.tirx.FloatImm) else None
    return float(value) if value is not None and math.isfinite(float(value)) else None


def _rewrite_function(func: Any, rewrite: Rewrite, scope: _Scope) -> Any | None:
    """``func`` with each binding's value replaced where ``rewrite`` gives one, or None if none is."""
    from tvm import relax

    changed, blocks = False, []
    for block in func.body.blocks:
        bindings = []
        for b in block.bindings:
            scope.var = b.var
            new = rewrite(b.value, scope) if isinstance(b, relax.VarBinding) else None
            changed |= new is not None
            bindings += scope.pending if new is not None else []  # what the rewrite bound first
            scope.pending = []
            bindings.append(b if new is None else relax.VarBinding(b.var, new))
        blocks.append(type(block)(bindings))
    if not changed:
        return None
    body = relax.SeqExpr(blocks, func.body.body)
    return scope.bb.normalize(relax.Function(func.params, body, func.ret_ty, func.is_pure, func.attrs))


def _module_pass(name: str, rewrite: Rewrite) -> Callable[[Any], Any]:
    def make(target: Any) -> Any:
        import tvm
        from tvm import relax

        @tvm.transform.module_pass(opt_level=0, name=name)
        def apply(mod: Any, _ctx: Any) -> Any:
            bb = relax.BlockBuilder(mod)
            for gv, func in list(mod.functions.items()):
                if isinstance(func, relax.Function) and isinstance(func.body, relax.SeqExpr):
                    new = _rewrite_function(func, rewrite, _Scope(mod, bb, func, target))
                    if new is not None:
                        bb.update_func(gv, new)
            return bb.get()

        return apply

    return make


fuse_packed_output = _module_pass("bitc.FusePackedOutput", _packed_output)
fuse_packed_output.__doc__ = "The pass writing a threshold conv's output packed for the next binary layer."
fuse_packed_pool = _module_pass("bitc.FusePackedPool", _packed_pool)
fuse_packed_pool.__doc__ = "The pass max-pooling packed sign bits (an OR) instead of the floats before them."


def _residual(value: Any, scope: _Scope) -> Any | None:
    new = _residual_clip(value, scope)
    return new if new is not None else _residual_signs(value, scope)


fuse_clamped_output = _module_pass("bitc.FuseClampedOutput", _clamped)
fuse_clamped_output.__doc__ = "The pass folding a ReLU or clip of an int8-activation conv into its epilogue."
fuse_residual_clip = _module_pass("bitc.FuseResidualClip", _residual)
fuse_residual_clip.__doc__ = (
    "The pass folding ``clip(conv + residual)`` (and the packing of its signs) into a binary conv's epilogue."
)


def build_deferred(target: Any) -> Any:
    """The pass building the kernels a deferred lowering left as stubs
    (:func:`bitcompiler.backends.relax_emit.deferred_kernel`), after the fusions and dead-code
    elimination: only those still called are built, as the converter would have built them."""
    import tvm
    from tvm import relax, tirx

    from bitcompiler import kernels

    @tvm.transform.module_pass(opt_level=0, name="bitc.BuildDeferredKernels")
    def apply(mod: Any, _ctx: Any) -> Any:
        bb = relax.BlockBuilder(mod)
        for gv, func in list(mod.functions.items()):
            about = kernel_about(func) if isinstance(func, tirx.PrimFunc) else None
            if about is not None and about.pop("deferred", False):
                bb.update_func(gv, kernel_func(kernels.conv2d_kernel(_conv_spec(about), str(target)), about))
        return bb.get()

    return apply


def fusion_passes(target: Any) -> list:
    """The CPU's fusion passes for the TVM target ``target`` (its kernels are built for it)."""
    from tvm import relax

    # first the frontend's (values, indices) tuple of a max pool folded away: ``pool[0]`` is then
    # the pool itself, read once
    tidy = [relax.transform.CanonicalizeBindings(), relax.transform.DeadCodeElimination()]
    return [
        *tidy,
        fuse_packed_pool(target),
        fuse_packed_output(target),
        fuse_residual_clip(target),
        fuse_clamped_output(target),
    ]
