"""Relax module -> a launch plan: kernel source, kernel order, launch sizes, buffers, weights.

The Relax module (bitc kernels as plain TIR, see :mod:`.lower`) is legalized and fused by TVM, and
every TIR function still unscheduled gets a GPU schedule (:mod:`bitcompiler.kernels.gpu` for the
bit kernels, TVM's dlight rules for the rest). The batch stays symbolic throughout (a shape
variable of ``main``, ``M`` in each TIR function). Then, instead of a Relax VM executable:

* ``main`` is walked: each binding is one ``call_tir`` (a TIR function and its buffers); every
  buffer's shape is an expression of ``main``'s shape variables, named ``B`` (``B1``, ... if the
  inputs' batches differ) in the plan and read from the inputs' dimensions at run time;
* the TIR functions are lowered once with TVM's pipeline; each splits into a host function and
  device kernels, and the host function's kernel calls give the launch order, the argument buffers
  (in the kernel's own order) and the launch sizes (``thread_extent``), which are expressions of
  the function's own shape variables: each call site binds those to the shapes of its buffers;
* the device source comes from TVM's CUDA or OpenCL code generator.

Sizes go into the plan as integers or expression text (:mod:`.plan` evaluates them, per batch,
without TVM). The result needs no TVM to run (:mod:`.runtime`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from bitcompiler.backends.gpu import plan as planning
from bitcompiler.errors import LoweringError

INDEX_BITS = 32  # kernels index with 32-bit integers (see _narrow); the plan says so


def relax_to_scheduled(mod: Any, tvm_target: Any) -> Any:
    """Legalize, fuse and schedule: a module whose ``main`` calls only scheduled TIR functions."""
    import tvm
    from tvm import relax
    from tvm.s_tir import dlight as dl

    from bitcompiler.backends.fast_math import legalize_map
    from bitcompiler.kernels.gpu import BitKernelRule

    with tvm_target:
        seq = tvm.transform.Sequential(
            [
                relax.transform.EliminateCommonSubexpr(),
                relax.transform.DeadCodeElimination(),
                relax.transform.LegalizeOps(customize_legalize_map=legalize_map()),
                relax.transform.AnnotateTIROpPattern(),
                relax.transform.FoldConstant(),
                relax.transform.FuseOps(),
                relax.transform.FuseTIR(),
                relax.transform.DeadCodeElimination(),
                dl.ApplyDefaultSchedule(
                    BitKernelRule(),
                    dl.gpu.Matmul(),
                    dl.gpu.GEMV(),
                    dl.gpu.Reduction(),
                    dl.gpu.GeneralReduction(),
                    dl.gpu.Fallback(),
                ),
            ]
        )
        return seq(mod)


class _Buffers:
    """The plan's buffers (inputs, outputs, weights, temporaries) and its variables.

    ``dims[i]``: buffer ``i``'s shape as PrimExprs of ``main``'s shape variables; ``names``: those
    variables' plan names (``B``, ``B1``, ...), ``vars``: where each is read from."""

    def __init__(self) -> None:
        self.entries: list[dict] = []
        self.dims: list[list[Any]] = []
        self.weights: dict[str, np.ndarray] = {}
        self.names: dict[str, str] = {}
        self.vars: dict[str, dict[str, int]] = {}

    @staticmethod
    def bound(e: Any, binding: dict[str, Any]) -> Any:
        """PrimExpr ``e`` of a TIR function's variables as one of ``main``'s (``binding``: by name)."""
        from tvm import tirx
        from tvm.sym import Analyzer

        analyzer = Analyzer()
        for v in tirx.analysis.undefined_vars(e):
            if v.name in binding:
                analyzer.bind(v, tirx.Cast(str(v.ty.dtype), binding[v.name]))
        return analyzer.simplify(e)

    def expr(self, e: Any, binding: dict[str, Any] | None = None) -> int | str:
        """PrimExpr ``e`` (of ``main``'s variables, or of a TIR function's variables bound to
        them by ``binding``) as an integer or plan expression text."""
        if isinstance(e, int):
            return e
        e = self.bound(e, binding or {})
        return int(e.value) if type(e).__name__ == "IntImm" else planning.write(e, self.names)

    def name_vars(self, params: list[Any]) -> None:
        """Name the shape variables of ``main``'s inputs ``params`` (a bare variable dimension)."""
        for i, p in enumerate(params):
            for axis, d in enumerate(p.ty.shape):
                if type(d).__name__ in ("Var", "SizeVar") and d.name not in self.names:
                    name = "B" if not self.names else f"B{len(self.names)}"
                    self.names[d.name] = name
                    self.vars[name] = {"input": i, "axis": axis}

    def add(self, kind: str, shape: list[Any], dtype: str, name: str | None = None) -> int:
        from tvm import tirx

        dims = [tirx.IntImm("int64", d) if isinstance(d, int) else d for d in shape]
        nbytes = tirx.IntImm("int64", np.dtype(dtype).itemsize)
        for d in dims:
            nbytes = nbytes * d
        idx = len(self.entries)
        self.dims.append(dims)
        self.entries.append(
            {
                "name": name or f"t{idx}",
                "kind": kind,
                "dtype": dtype,
                "shape": [self.expr(d) for d in dims],
                "nbytes": self.expr(nbytes),
            }
        )
        return idx

    def add_typed(self, kind: str, ty: Any, name: str | None = None) -> int:
        return self.add(kind, list(ty.shape), str(ty.dtype), name)

    def constant(self, const: Any) -> int:
        value = np.ascontiguousarray(const.value.numpy())
        idx = self.add("weight", list(value.shape), str(value.dtype), f"w{len(self.entries)}")
        self.weights[self.entries[idx]["name"]] = value
        return idx


Call = tuple[str, list[Any]]  # a TIR function and its arguments: buffer indices, or PrimExpr scalars


def walk_main(mod: Any) -> tuple[_Buffers, list[Call], list[int], list[int]]:
    """``main`` as (buffers, [(TIR function, its buffer arguments then outputs)], inputs, outputs)."""
    import tvm
    from tvm import relax

    main = mod["main"]
    bufs = _Buffers()
    bufs.name_vars(list(main.params))
    inputs = [bufs.add_typed("input", p.ty, f"input{i}") for i, p in enumerate(main.params)]
    env: dict[Any, Any] = dict(zip(main.params, inputs))  # relax var -> buffer index or list (a tuple)
    calls: list[Call] = []

    def value(e: Any) -> Any:
        if isinstance(e, tvm.ir.expr.Constant):
            return bufs.constant(e)
        if _int_type(e):  # a size passed to a TIR function, e.g. the batch
            return e
        if isinstance(e, relax.Var):
            if e not in env:
                raise LoweringError(f"GPU plan: {e.name_hint} is used before it is defined")
            return env[e]
        if isinstance(e, relax.Tuple):
            return [value(f) for f in e.fields]
        if isinstance(e, relax.PrimValue):
            return e.value
        raise LoweringError(f"GPU plan: unsupported argument {type(e).__name__} in the compiled graph")

    body = main.body
    for block in body.blocks:
        for binding in block.bindings:
            var, v = binding.var, binding.value
            if isinstance(v, relax.Call) and getattr(v.op, "name", "") == "relax.call_tir":
                gv, args = v.args[0], v.args[1]
                arg_bufs = value(args)
                fields = list(v.ty.fields) if hasattr(v.ty, "fields") else [v.ty]
                outs = [bufs.add_typed("temp", f) for f in fields]
                env[var] = outs if hasattr(v.ty, "fields") else outs[0]
                calls.append((gv.name_hint, [*arg_bufs, *outs]))
            elif isinstance(v, relax.TupleGetItem):
                env[var] = value(v.tuple_value)[v.index]
            elif isinstance(v, (relax.Var, relax.Tuple, tvm.ir.expr.Constant)):
                env[var] = value(v)
            else:
                op = getattr(getattr(v, "op", None), "name", type(v).__name__)
                raise LoweringError(
                    f"GPU plan: op {op} ({var.name_hint}) has no GPU kernel; compile for target='cpu' or report it"
                )
    result = value(body.body)
    outputs = result if isinstance(result, list) else [result]
    for o in outputs:
        if bufs.entries[o]["kind"] != "temp":
            raise LoweringError(
                "GPU plan: the model returns an input or a weight unchanged; return a computed tensor"
            )
        bufs.entries[o]["kind"] = "output"
    return bufs, calls, inputs, outputs


def call_binding(name: str, func: Any, args: list[Any], bufs: _Buffers) -> dict[str, Any]:
    """TIR function ``func``'s shape variables (by name) bound to the shapes at this call: each
    buffer parameter's variable dimensions to its argument's, each scalar parameter to its value.
    Every buffer's shape must then equal its argument's (else :class:`LoweringError`)."""
    from tvm.sym import Analyzer

    binding: dict[str, Any] = {}
    buffers = [(p, a) for p, a in zip(func.params, args) if type(p.ty).__name__ == "BufferType"]
    for p, a in zip(func.params, args):
        if type(p.ty).__name__ != "BufferType":
            binding.setdefault(p.name, a)
    for p, a in buffers:
        for d, v in zip(p.shape, bufs.dims[a]):
            if type(d).__name__ in ("Var", "SizeVar"):
                binding.setdefault(d.name, v)
    analyzer = Analyzer()
    for p, a in buffers:
        shape = [bufs.bound(d, binding) for d in p.shape]
        if len(shape) != len(bufs.dims[a]) or not all(
            analyzer.can_prove_equal(d, v) for d, v in zip(shape, bufs.dims[a])
        ):
            raise LoweringError(
                f"GPU plan: {name}: parameter {p.name} of shape {list(p.shape)} gets a buffer of shape "
                f"{list(bufs.dims[a])}; report it (compile for target='cpu' meanwhile)"
            )
    return binding


_POPCOUNT_REGISTERED = False


def _register_cuda_popcount() -> None:
    """CUDA lowering of ``popcount`` for signed words (TVM's own rule takes unsigned ones only):
    ``__popc`` / ``__popcll`` of the same bits read as unsigned."""
    global _POPCOUNT_REGISTERED
    if _POPCOUNT_REGISTERED:
        return
    from tvm import tirx

    def lower(call: Any) -> Any:
        x = call.args[0]
        dtype = str(x.ty.dtype)
        bits = 64 if dtype.endswith("64") else 32
        word = x if dtype == f"uint{bits}" else tirx.Cast(f"uint{bits}", x)
        name = "__popcll" if bits == 64 else "__popc"
        return tirx.Cast(str(call.ty.dtype), tirx.call_pure_extern("int32", name, word))

    tirx.op.register_intrin_lowering("tirx.popcount", "cuda", f=lower, level=99)
    _POPCOUNT_REGISTERED = True


def _name(v: Any) -> str:
    return str(getattr(v, "name_hint", None) or getattr(v, "name", ""))


def _narrow(name: str, func: Any) -> Any:
    """``func`` with 32-bit index arithmetic, as the static plans had: TVM's own narrowing needs
    the extents' ranges, and the batch has none, so the indices are narrowed by force (the runner
    refuses a batch whose buffers would pass 2**31 elements, :data:`INDEX_BITS`). This also
    narrows the threshold epilogue's int64 product ``thr_sign * acc``, exact in int32 because
    ``thr_sign`` is -1, 0 or 1. A function TVM cannot narrow (an int64 tensor) keeps 64-bit
    indices."""
    import tvm

    try:
        return tvm.tirx.transform.ForceNarrowIndexToInt32()(tvm.IRModule({name: func}))[name]
    except Exception:  # noqa: BLE001 - TVM refuses int64 buffers: keep the 64-bit indices
        return func


def lower_kernels(mod: Any, tvm_target: Any, names: set[str]) -> tuple[Any, Any, dict]:
    """Lower the TIR functions ``names``: (host module, device module, {function: its params' names})."""
    import tvm
    from tvm.tirx.build import split_host_device_mods

    _register_cuda_popcount()
    funcs = {}
    params: dict[str, list[str]] = {}
    for gv, f in mod.functions.items():
        if gv.name_hint in names:
            funcs[gv.name_hint] = f.with_attr("global_symbol", gv.name_hint)
            params[gv.name_hint] = [_name(p) for p in f.params]
    tir = tvm.IRModule({tvm.ir.GlobalVar(n): _narrow(n, f) for n, f in funcs.items()})
    tir = tvm.tirx.transform.BindTarget(tvm_target.with_host(tvm_target.host))(tir)
    with tvm.transform.PassContext(config={"tirx.disable_cse_tir": True}):
        pipeline, _finalize_host, finalize_device = tvm.tirx.get_default_tir_pipeline(tvm_target)
        low = pipeline(tir)
        host, devices = split_host_device_mods(low)
        device = next(iter(devices.values()))
        device = finalize_device()(device)
    return host, device, params


def kernel_launches(
    host: Any, device: Any, params: dict, call: Call, bufs: _Buffers, binding: dict[str, Any]
) -> list[dict]:
    """The launches TIR function ``call[0]`` makes, in order, with the call's buffers bound to its
    params and its shape variables to ``binding`` (:func:`call_binding`). The global workspaces it
    allocates between its kernels are added to ``bufs`` as temporaries."""
    import tvm

    name, args = call
    by_name = {p: a for p, a in zip(params[name], args) if isinstance(a, int)}
    func = next((f for gv, f in host.functions.items() if gv.name_hint in (name, f"__tvm_ffi_{name}")), None)
    if func is None:
        raise LoweringError(f"GPU plan: no host function for kernel {name}")
    found: list[Any] = []

    def visit(node: Any) -> None:  # statements in order; kernel calls are evaluated statements
        if type(node).__name__ == "DeclBuffer":  # a view of a buffer's data (another shape or dtype)
            data = getattr(node, "data", None)
            if isinstance(data, tvm.ir.expr.Call) and str(data.op.name) == "tirx.buffer_data":
                data = data.args[0]
            if _name(data) in by_name:
                by_name[_name(node.buffer)] = by_name[_name(data)]
        if "Alloc" in type(node).__name__ and hasattr(node, "buffer"):
            buf = node.buffer
            shape = [bufs.bound(d, binding) for d in buf.shape]
            by_name[_name(buf)] = bufs.add("temp", shape, str(buf.dtype), f"{name}_{_name(buf)}")
        if isinstance(node, tvm.ir.expr.Call):
            if "call_ffi_kernel" in str(getattr(node.op, "name", "")):
                found.append(node)
            return
        for field in ("seq", "body", "then_case", "else_case", "value"):
            child = getattr(node, field, None)
            if child is None:
                continue
            for c in (
                child if isinstance(child, (list, tuple)) or type(child).__name__ == "Array" else [child]
            ):
                visit(c)

    visit(func.body)
    kernels = {gv.name_hint: f for gv, f in device.functions.items()}
    return [_launch(kernels, c, by_name, bufs, binding) for c in found]


def _int_type(e: Any) -> bool:
    ty: Any = getattr(e, "ty", None)
    return type(ty).__name__ == "PrimType" and str(ty.dtype).startswith(("int", "uint"))


def _launch(kernels: dict, call: Any, by_name: dict, bufs: _Buffers, binding: dict) -> dict[str, Any]:
    """One kernel call of a host function as a plan launch: kernel, sizes, arguments."""
    import tvm

    kname = str(call.args[0].value)
    kfunc = kernels[kname]
    nparams = len(kfunc.params)
    kargs, extents = list(call.args[1 : 1 + nparams]), list(call.args[1 + nparams :])
    tags = [str(t) for t in kfunc.attrs["tirx.kernel_launch_params"]]
    launch: dict[str, Any] = {
        "kernel": kname,
        **_launch_size(kname, tags, extents, bufs, binding),
        "args": [],
    }
    for a, p in zip(kargs, kfunc.params):
        if isinstance(a, tvm.ir.expr.Call) and str(a.op.name) == "tirx.buffer_data":
            a = a.args[0]
        if isinstance(a, tvm.ir.expr.Var) and _name(a) in by_name:
            launch["args"].append({"buffer": by_name[_name(a)]})
        elif _int_type(p) and _int_type(a):  # a size, e.g. the batch
            launch["args"].append({"scalar": bufs.expr(a, binding), "dtype": str(p.ty.dtype)})
        else:
            raise LoweringError(f"GPU plan: kernel {kname}: argument {a} is neither a buffer nor an integer")
    return launch


def _launch_size(kname: str, tags: list[str], extents: list, bufs: _Buffers, binding: dict) -> dict[str, Any]:
    """The grid, block and dynamic shared memory of one launch of kernel ``kname``, from its
    launch parameters' tags and extents (integers or expressions of the batch)."""
    launch: dict[str, Any] = {"grid": [1, 1, 1], "block": [1, 1, 1], "shared": 0}
    for tag, ext in zip(tags, extents):
        size = bufs.expr(ext, binding)
        if tag.startswith("blockIdx."):
            launch["grid"]["xyz".index(tag[-1])] = size
        elif tag.startswith("threadIdx."):
            launch["block"]["xyz".index(tag[-1])] = size
        elif tag == "tirx.use_dyn_shared_memory":
            launch["shared"] = size
        else:
            raise LoweringError(f"GPU plan: kernel {kname}: unknown launch parameter {tag}")
    return launch


def device_source(host: Any, device: Any, tvm_target: Any) -> str:
    """The CUDA or OpenCL source of every kernel in ``device``."""
    from tvm.tirx.build import codegen_build

    runtime = codegen_build(device, tvm_target)
    del host
    return str(runtime.inspect_source())
