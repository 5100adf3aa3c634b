"""Relax module -> a launch plan: kernel source, kernel order, launch sizes, buffers, weights.

The Relax module (bitc kernels as plain TIR, see :mod:`.lower`) is legalized and fused by TVM, and
every TIR function still unscheduled gets a GPU schedule (:mod:`bitcompiler.kernels.gpu` for the
bit kernels, TVM's dlight rules for the rest). Then, instead of a Relax VM executable:

* ``main`` is walked: each binding is one ``call_tir`` (a TIR function and its buffers);
* the TIR functions are lowered once with TVM's pipeline; each splits into a host function and
  device kernels, and the host function's kernel calls give the launch order, the argument buffers
  (in the kernel's own order) and the launch sizes;
* the device source comes from TVM's CUDA or OpenCL code generator.

The result (:class:`bitcompiler.backends.gpu.runtime.Plan`) needs no TVM to run.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from bitcompiler.errors import LoweringError

ALIGN = 256  # bytes: every buffer of the static memory plan starts on this boundary


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
                # the batch is static: every TIR function gets the call's shapes (launch sizes are constants)
                relax.transform.SpecializePrimFuncBasedOnCallSite(),
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


def _dims(ty: Any, what: str) -> list[int]:
    dims = []
    for d in ty.shape:
        if not hasattr(d, "value"):
            raise LoweringError(
                f"{what} has a symbolic shape {list(ty.shape)}; GPU targets need a static batch"
            )
        dims.append(int(d.value))
    return dims


class _Buffers:
    """The plan's buffers: inputs, outputs, weights (constants) and temporaries."""

    def __init__(self) -> None:
        self.entries: list[dict] = []
        self.weights: dict[str, np.ndarray] = {}

    def add(self, kind: str, ty: Any, what: str, name: str | None = None) -> int:
        shape = _dims(ty, what)
        dtype = str(ty.dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        idx = len(self.entries)
        self.entries.append(
            {"name": name or f"t{idx}", "kind": kind, "dtype": dtype, "shape": shape, "nbytes": nbytes}
        )
        return idx

    def constant(self, const: Any) -> int:
        value = const.value.numpy()
        idx = len(self.entries)
        name = f"w{idx}"
        self.entries.append(
            {
                "name": name,
                "kind": "weight",
                "dtype": str(value.dtype),
                "shape": list(value.shape),
                "nbytes": int(value.nbytes),
            }
        )
        self.weights[name] = np.ascontiguousarray(value)
        return idx


def walk_main(mod: Any) -> tuple[_Buffers, list[tuple[str, list[int]]], list[int], list[int]]:
    """``main`` as (buffers, [(TIR function, its buffer arguments then outputs)], inputs, outputs)."""
    import tvm
    from tvm import relax

    main = mod["main"]
    bufs = _Buffers()
    env: dict[Any, Any] = {}  # relax var -> buffer index or list of indices (a tuple)
    inputs = [bufs.add("input", p.ty, f"input {i}", f"input{i}") for i, p in enumerate(main.params)]
    for p, b in zip(main.params, inputs):
        env[p] = b
    calls: list[tuple[str, list[int]]] = []

    def value(e: Any) -> Any:
        if isinstance(e, tvm.ir.expr.Constant):
            return bufs.constant(e)
        if isinstance(e, relax.Var):
            if e not in env:
                raise LoweringError(f"GPU plan: {e.name_hint} is used before it is defined")
            return env[e]
        if isinstance(e, relax.Tuple):
            return [value(f) for f in e.fields]
        raise LoweringError(f"GPU plan: unsupported argument {type(e).__name__} in the compiled graph")

    body = main.body
    for block in body.blocks:
        for binding in block.bindings:
            var, v = binding.var, binding.value
            if isinstance(v, relax.Call) and getattr(v.op, "name", "") == "relax.call_tir":
                gv, args = v.args[0], v.args[1]
                arg_bufs = value(args)
                sinfo = v.ty
                if hasattr(sinfo, "fields"):
                    outs = [bufs.add("temp", f, gv.name_hint) for f in sinfo.fields]
                    env[var] = outs
                else:
                    outs = [bufs.add("temp", sinfo, gv.name_hint)]
                    env[var] = outs[0]
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


def plan_memory(bufs: _Buffers, calls: list[tuple[str, list[int]]]) -> int:
    """Place the temporaries in one arena (a buffer's bytes are reused once its last reader ran);
    returns the arena's size. Offsets go into each entry's ``offset``."""
    first: dict[int, int] = {}
    last: dict[int, int] = {}
    for step, (_name, args) in enumerate(calls):
        for b in args:
            first.setdefault(b, step)
            last[b] = step
    temps = [b for b, e in enumerate(bufs.entries) if e["kind"] == "temp"]
    placed: list[tuple[int, int, int, int]] = []  # (offset, end, first, last)
    size = 0
    for b in sorted(temps, key=lambda b: -bufs.entries[b]["nbytes"]):
        nbytes = -(-max(bufs.entries[b]["nbytes"], 1) // ALIGN) * ALIGN
        live = (first[b], last[b])
        offset = 0
        for o, end, f, l in sorted(placed):
            if f <= live[1] and live[0] <= l and o < offset + nbytes and offset < end:
                offset = end
        # one pass may step onto a later overlap: repeat until no live neighbour overlaps
        moved = True
        while moved:
            moved = False
            for o, end, f, l in placed:
                if f <= live[1] and live[0] <= l and o < offset + nbytes and offset < end:
                    offset, moved = end, True
        placed.append((offset, offset + nbytes, *live))
        bufs.entries[b]["offset"] = offset
        size = max(size, offset + nbytes)
    return size


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
    tir = tvm.IRModule({tvm.ir.GlobalVar(n): f for n, f in funcs.items()})
    tir = tvm.tirx.transform.BindTarget(tvm_target.with_host(tvm_target.host))(tir)
    with tvm.transform.PassContext(config={"tirx.disable_cse_tir": True}):
        pipeline, _finalize_host, finalize_device = tvm.tirx.get_default_tir_pipeline(tvm_target)
        low = pipeline(tir)
        host, devices = split_host_device_mods(low)
        device = next(iter(devices.values()))
        device = finalize_device()(device)
    return host, device, params


def kernel_launches(
    host: Any, device: Any, params: dict, name: str, args: list[int], bufs: _Buffers
) -> tuple[list[dict], list[int]]:
    """The launches function ``name`` makes, in order, with buffer ``args`` bound to its params,
    and the global workspaces it allocates between its kernels (added to ``bufs`` as temporaries)."""
    import tvm
    from tvm import tirx

    by_name = dict(zip(params[name], args))
    func = next((f for gv, f in host.functions.items() if gv.name_hint in (name, f"__tvm_ffi_{name}")), None)
    if func is None:
        raise LoweringError(f"GPU plan: no host function for kernel {name}")
    found: list[Any] = []
    workspaces: list[int] = []

    def visit(node: Any) -> None:  # statements in order; kernel calls are evaluated statements
        if type(node).__name__ == "DeclBuffer":  # a view of a buffer's data (another shape or dtype)
            data = getattr(node, "data", None)
            if isinstance(data, tvm.ir.expr.Call) and str(data.op.name) == "tirx.buffer_data":
                data = data.args[0]
            if _name(data) in by_name:
                by_name[_name(node.buffer)] = by_name[_name(data)]
        if "Alloc" in type(node).__name__ and hasattr(node, "buffer"):
            buf = node.buffer
            ty = tvm.relax.TensorType([int(d) for d in buf.shape], str(buf.dtype))
            by_name[_name(buf)] = bufs.add("temp", ty, f"{name} workspace {_name(buf)}")
            workspaces.append(by_name[_name(buf)])
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
    launches = []
    kernels = {gv.name_hint: f for gv, f in device.functions.items()}
    for call in found:
        kname = str(call.args[0].value)
        kfunc = kernels[kname]
        nparams = len(kfunc.params)
        kargs, extents = list(call.args[1 : 1 + nparams]), list(call.args[1 + nparams :])
        tags = [str(t) for t in kfunc.attrs["tirx.kernel_launch_params"]]
        launch: dict[str, Any] = {"kernel": kname, **_launch_size(kname, tags, extents), "args": []}
        for a, p in zip(kargs, kfunc.params):
            if isinstance(a, tvm.ir.expr.Call) and str(a.op.name) == "tirx.buffer_data":
                a = a.args[0]
            if isinstance(a, tvm.ir.expr.Var) and _name(a) in by_name:
                launch["args"].append({"buffer": by_name[_name(a)]})
            elif isinstance(a, tirx.IntImm):
                launch["args"].append({"scalar": int(a.value), "dtype": str(p.dtype)})
            else:
                raise LoweringError(
                    f"GPU plan: kernel {kname}: argument {a} is neither a buffer nor a constant"
                )
        launches.append(launch)
    return launches, workspaces


def _launch_size(kname: str, tags: list[str], extents: list) -> dict[str, Any]:
    """The grid, block and dynamic shared memory of one launch of kernel ``kname``, from its
    launch parameters' tags and extents."""
    from tvm import tirx

    launch: dict[str, Any] = {"grid": [1, 1, 1], "block": [1, 1, 1], "shared": 0}
    for tag, ext in zip(tags, extents):
        if not isinstance(ext, tirx.IntImm):
            raise LoweringError(f"GPU plan: kernel {kname} has a launch size {ext} that is not a constant")
        if tag.startswith("blockIdx."):
            launch["grid"]["xyz".index(tag[-1])] = int(ext.value)
        elif tag.startswith("threadIdx."):
            launch["block"]["xyz".index(tag[-1])] = int(ext.value)
        elif tag == "tirx.use_dyn_shared_memory":
            launch["shared"] = int(ext.value)
        else:
            raise LoweringError(f"GPU plan: kernel {kname}: unknown launch parameter {tag}")
    return launch


def device_source(host: Any, device: Any, tvm_target: Any) -> str:
    """The CUDA or OpenCL source of every kernel in ``device``."""
    from tvm.tirx.build import codegen_build

    runtime = codegen_build(device, tvm_target)
    del host
    return str(runtime.inspect_source())
