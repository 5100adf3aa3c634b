"""Compile-and-run helpers for the kernel tests."""

from __future__ import annotations

import numpy as np
import torch
import tvm

from bitcompiler.quant import numerics as nu

_TARGET = None


def host_target() -> tvm.target.Target:
    global _TARGET
    if _TARGET is None:
        _TARGET = tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()})
    return _TARGET


def build(prim: tvm.tirx.PrimFunc, target: tvm.target.Target | None = None):
    """Compile one PrimFunc for ``target`` (default: the host); returns a callable
    ``f(*numpy_arrays, outs=[...])``."""
    lib = tvm.compile(tvm.IRModule({"main": prim}), target=target or host_target())

    def run(inputs: list, out_shapes: list) -> list[np.ndarray]:
        outs = [tvm.runtime.tensor(np.zeros(s, dtype=d)) for s, d in out_shapes]
        args = [tvm.runtime.tensor(np.ascontiguousarray(_np(a))) for a in inputs]
        lib["main"](*args, *outs)
        return [o.numpy() for o in outs]

    return run


def llvm_ir_beside_another(prim: tvm.tirx.PrimFunc, target=None) -> str:
    """The LLVM IR of ``prim`` built as the CPU backend builds it: beside another function in one
    module (the Relax VM's shape functions), where LLVM gets no ``noalias`` arguments and keeps a
    heap-allocated register block in memory."""
    from tvm.script import tirx as T

    @T.prim_func(private=True)
    def other(a: T.Buffer((4,), "float32")):
        a[0] = T.float32(0)

    mod = tvm.IRModule(
        {
            "kernel": prim.with_attr("global_symbol", "kernel"),
            "other": other.with_attr("global_symbol", "other"),
        }
    )
    return tvm.tirx.build(mod, target=target or host_target()).inspect_source("ll")


WORKSPACE = "load ptr, ptr @__TVMBackendAllocWorkspace"


def parallel_workspaces(ll: str) -> list[int]:
    """Heap workspaces allocated in each parallel task body (``__tvm_parallel_lambda``) of ``ll``."""
    bodies = ll.split("\ndefine ")[1:]
    return [b.count(WORKSPACE) for b in bodies if "@__tvm_parallel_lambda" in b.split("\n", 1)[0]]


def template_choices(template) -> dict:
    """The choices ``template``'s schedule makes, in order: ``name -> (candidates, default)``."""
    from tvm import s_tir

    found = {}
    template.apply(
        s_tir.Schedule(template.func), lambda n, cands, d: found.setdefault(n, (tuple(cands), d))[1]
    )
    return found


def with_choices(template, values: dict | None = None) -> tvm.tirx.PrimFunc:
    """The kernel of ``template`` scheduled with the given choices (``name -> value``, the others
    by hand), as a tuning record would schedule it."""
    from tvm import s_tir

    def choose(name, candidates, default):
        value = (values or {}).get(name, default)
        assert value in candidates, (name, value, candidates)
        return value

    sch = s_tir.Schedule(template.func)
    template.apply(sch, choose)
    return template.finish(sch.mod["main"])


def every_choice(template):
    """``(values, kernel)`` for the hand schedule, then for each combination of ``template``'s
    choices' candidates."""
    import itertools

    found = template_choices(template)
    yield {n: d for n, (_, d) in found.items()}, with_choices(template)
    for combo in itertools.product(*(cands for cands, _ in found.values())):
        values = dict(zip(found, combo))
        yield values, with_choices(template, values)


def _np(a) -> np.ndarray:
    return a.numpy() if isinstance(a, torch.Tensor) else np.asarray(a)


def assert_close(got, ref: torch.Tensor, rtol: float = 1e-5) -> None:
    got = torch.as_tensor(got)
    assert tuple(got.shape) == tuple(ref.shape), (got.shape, ref.shape)
    scale = max(ref.abs().max().item(), 1e-6)
    err = (got.float() - ref.float()).abs().max().item()
    assert err <= rtol * scale, f"max error {err:.3g} > {rtol} x {scale:.3g}"


def random_codes(shape: tuple, bits: int, code: str, g: torch.Generator) -> torch.Tensor:
    if code == "pm1":
        return torch.randint(0, 2, shape, generator=g) * 2 - 1
    return torch.randint(0, 2**bits, shape, generator=g)


def act_inputs(x: torch.Tensor, act: str, nchw_groups: int | None = None) -> list:
    """The kernel's activation buffers for ``x``, built with the numerics reference."""
    if act == "float":
        return [x]
    if act == "int8":
        q, s = nu.quantize_act_int8(x)
        return [q, s]
    bits = (x >= 0).to(torch.int64)
    if nchw_groups is None:
        return [nu.pack_bits(bits)]
    m, c, h, w = x.shape
    g = nchw_groups
    per = bits.reshape(m, g, c // g, h, w).permute(0, 3, 4, 1, 2)  # (M, H, W, G, cg)
    return [nu.pack_bits(per)]


def epilogue_params(n: int, threshold: bool, g: torch.Generator, has_offset: bool, span: int):
    if threshold:
        ts = torch.randint(-1, 2, (n,), generator=g).to(torch.int32)
        th = torch.randint(-span, span + 1, (n,), generator=g).to(torch.int32)
        return [ts, th], {"thr_sign": ts, "thr": th}
    sc = torch.rand(n, generator=g) + 0.5
    of = (torch.rand(n, generator=g) - 0.5) if has_offset else torch.zeros(n)
    bi = torch.rand(n, generator=g) - 0.5
    return [sc, of, bi], {"scale": sc, "offset": of, "bias": bi}


def check_w1a1_extremes(kernel, layout, k: int, n: int, batch: int, row: int, target=None) -> None:
    """A W1A1 dense ``kernel`` (weights in ``layout``'s order) with unit scales and zero bias gives
    ``K - 2*popcount`` exactly: ``K`` for weight row 0, which agrees with batch row ``row`` in every
    bit, and ``-K`` for row 1, which differs in every bit; every output equals the reference
    (built for ``target``, default the host)."""
    from bitcompiler.kernels import DenseSpec

    run = build(kernel(DenseSpec(k, n, 1, "pm1", "binary", False, False)), target)
    g = torch.Generator().manual_seed(5)
    codes = random_codes((n, k), 1, "pm1", g)
    x = torch.randn(batch, k, generator=g)
    codes[0] = torch.where(x[row] >= 0, 1, -1)
    codes[1] = -codes[0]
    planes = nu.code_to_planes(codes, 1, "pm1")
    ones, zeros = torch.ones(n), torch.zeros(n)
    w = torch.from_numpy(layout(planes.numpy()))
    (y,) = run([x, w, ones, zeros, zeros], [((batch, n), "float32")])
    ref = nu.bit_linear(x, planes, k, "pm1", "binary", scale=ones, offset=zeros, bias=zeros)
    assert np.array_equal(y, ref.numpy())
    assert y[row, 0] == k and y[row, 1] == -k
