"""A model's kernels built on every core: TIR lowering, LLVM code generation and, when the model is
written to a library, LLVM's machine code.

``tvm.compile`` builds every PrimFunc of a Relax module into one LLVM module, on one thread: TVM's
TIR lowering, LLVM's IR generation and optimization, then (when the executable is exported or run)
LLVM's machine code. These were most of a cold ResNet-18 compile. The kernels are independent of
each other, and TVM releases Python's lock while it builds, so :func:`compile_relax` splits them
into :func:`chunks`, one per core (:func:`workers`):

* chunk 0 stays in the Relax module and ``tvm.compile`` builds it, as always;
* every other chunk is built in a thread of its own, into its own LLVM module, with TVM's default
  TIR pipeline, while ``tvm.compile`` runs. Its PrimFuncs leave the Relax module: each reference
  to one becomes an ``ExternFunc`` of the same symbol, which the VM looks up among the
  executable's imported modules, as it does for any library function.

:class:`Built` holds the result. :meth:`Built.executable` imports the other chunks' modules into
the VM executable (its machine code is then made by LLVM's JIT as the VM starts);
:meth:`Built.export` writes the shared library without importing them: LLVM makes their object
files on the pool while ``export_library`` makes chunk 0's, and its link step
(``fcompile``) links them all. A loaded library finds every kernel by its symbol.

Only TVM's public interfaces are used (``tvm.compile`` with ``relax_pipeline=None`` on a module the
pipeline already ran on, ``tvm.tirx.build``, ``Module.import_module``, ``export_library``'s
``fcompile``); nothing of TVM is patched. Each chunk holds two functions or more: TVM's
``AnnotateEntryFunc`` marks a module's only function as its entry.

Measured on a 2-core AMD EPYC (binary ResNet-18, CIFAR, 23 kernels): lowering and code generation
3.15 s in one module, 1.75 s in two on two threads; machine code 1.4-1.7 s against 0.72-0.84 s.
"""

from __future__ import annotations

import os
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

MAX_WORKERS = 8


def workers() -> int:
    """Threads for the build: the cores this process may run on, at most :data:`MAX_WORKERS`."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity on this platform
        cores = os.cpu_count() or 1
    return max(1, min(cores, MAX_WORKERS))


def chunks(functions: list, n: int) -> list[list]:
    """``functions`` dealt round-robin into at most ``n`` chunks of two or more (one chunk when
    there are fewer than four)."""
    n = max(1, min(n, len(functions) // 2))
    return [functions[i::n] for i in range(n)]


class Built:
    """A compiled Relax module: the VM executable (chunk 0's kernels built in) and the other
    chunks' LLVM modules."""

    def __init__(
        self,
        executable: Any,
        modules: list[Any],
        symbols: list[str] | None = None,
        tuning: dict | None = None,
    ) -> None:
        self._executable = executable
        self.tuning = tuning or {}  # each kernel's name -> "tuned", "no record" or "untunable"
        self.modules = modules  # the other chunks, each an LLVM runtime module
        self._symbols = symbols or []  # a kernel of each chunk, chunk 0's first
        self._imported = not modules

    def executable(self) -> Any:
        """The VM executable with every kernel: the other chunks' modules imported (once), each
        chunk's machine code made by LLVM's JIT on a thread of its own."""
        if not self._imported:
            own = [m for m in self._executable.mod.imports if m.kind == "llvm"]
            jobs = list(zip([*own[:1], *self.modules], self._symbols, strict=False))
            with ThreadPoolExecutor(len(jobs) or 1, thread_name_prefix="bitc-jit") as pool:
                # an LLVM module's first function lookup makes its machine code
                list(pool.map(lambda job: job[0].get_function(job[1]), jobs))
            for module in self.modules:
                self._executable.mod.import_module(module)
            self._imported = True
        return self._executable

    def export(self, path: str) -> None:
        """The shared library at ``path``: the chunks' object files made on a thread each."""
        from tvm.support import cc

        if self._imported:  # export_library writes every module of the executable itself
            self._executable.export_library(path)
            return
        with (
            tempfile.TemporaryDirectory(prefix="bitc-obj-") as tmp,
            ThreadPoolExecutor(len(self.modules), thread_name_prefix="bitc-obj") as pool,
        ):

            def write(i: int, module: Any) -> str:
                name = os.path.join(tmp, f"kernels{i}.o")
                module.write_to_file(name)
                return name

            objects = [pool.submit(write, i, m) for i, m in enumerate(self.modules)]

            def link(output: str, files: list[str], **kwargs: Any) -> Any:
                return cc.create_shared(output, [*files, *(f.result() for f in objects)], **kwargs)

            self._executable.export_library(path, fcompile=link)


def compile_relax(mod: Any, target: Any, pipeline: Any) -> Built:
    """``mod`` compiled for the ``tvm.target.Target`` ``target`` after the Relax ``pipeline``
    (a module pass), its kernels built on :func:`workers` threads."""
    import tvm
    from tvm import relax

    from bitcompiler.kernels.template import tuning_status

    with target:
        mod = pipeline(mod)
    kernels = [(gv, f) for gv, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc)]
    tuning = {gv.name_hint: tuning_status(f) for gv, f in sorted(kernels, key=lambda k: k[0].name_hint)}
    parts = chunks(kernels, workers())
    if len(parts) < 2:
        return Built(tvm.compile(mod, target=target, relax_pipeline=None), [], tuning=tuning)
    moved = {gv for part in parts[1:] for gv, _ in part}
    symbols = {gv: str((f.attrs or {}).get("global_symbol", gv.name_hint)) for gv, f in kernels}

    @relax.expr_functor.mutator
    class _External(relax.PyExprMutator):  # a moved kernel's references -> ExternFunc
        def visit_global_var_(self, op: Any) -> Any:
            return relax.ExternFunc(symbols[op], op.ty) if op in moved else op

    functions = {}
    for gv, f in mod.functions.items():
        if isinstance(f, relax.Function):
            functions[gv] = _External(mod).visit_expr(f)
        elif gv not in moved:
            functions[gv] = f
    rest = tvm.IRModule(functions, attrs=mod.attrs)
    ctx = tvm.transform.PassContext.current()

    def build(part: list) -> Any:
        with ctx:  # the caller's configuration, in this thread too
            return tvm.tirx.build(tvm.IRModule(dict(part), attrs=mod.attrs), target=target)

    with ThreadPoolExecutor(len(parts) - 1, thread_name_prefix="bitc-build") as pool:
        futures: list[Future] = [pool.submit(build, part) for part in parts[1:]]
        executable = tvm.compile(rest, target=target, relax_pipeline=None)
        modules = [f.result() for f in futures]
    return Built(executable, modules, [symbols[part[0][0]] for part in parts], tuning)
