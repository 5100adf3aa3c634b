"""Rewritten graph -> a static ahead-of-time C program: ``model.c`` calls the kernels in order.

The graph is exported with a batch of one (every shape static) and walked node by node:

* ``bitc::bit_linear`` / ``bitc::bit_conv2d`` / ``bitc::tiled_linear`` become calls of TIR
  kernels (C from TVM, see :mod:`.kernel_c`), preceded by the activation quantizer kernel their
  ``act`` mode needs;
* float ops (relu, hardtanh, add/sub/mul, max/avg pooling, mean) are a few lines of plain C;
* views (flatten, reshape, ...) cost nothing: they alias their input's storage.

Every intermediate lives in one static arena at an offset from :mod:`.memory_plan`; weights are
``const`` arrays (flash). No malloc, no TVM runtime.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, cast

import numpy as np
import torch

from bitcompiler import ops
from bitcompiler.backends.cortex_m import float_ops
from bitcompiler.backends.cortex_m.kernel_c import Kernel, prepare_kernel
from bitcompiler.backends.cortex_m.program import (
    Program,
    Step,
    Tensor,
    Weight,
    plan_storage,
)
from bitcompiler.backends.cortex_m.sign_readers import binary_conv_groups, packed_readers, sign_clamps
from bitcompiler.errors import CortexMLoweringError

ALIASES = {
    "flatten.using_ints",
    "view.default",
    "reshape.default",
    "reshape_as.default",
    "_unsafe_view.default",
    "squeeze.dim",
    "squeeze.dims",
    "unsqueeze.default",
    "contiguous.default",
    "clone.default",
    "dropout.default",
    "alias.default",
    "detach.default",
}


def export_batch_one(gm: torch.fx.GraphModule, example_inputs: tuple) -> torch.export.ExportedProgram:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.export.export(gm, tuple(x[:1] for x in example_inputs), strict=False)


class _Builder:
    def __init__(self, ep: torch.export.ExportedProgram, target: Any) -> None:
        self.ep = ep
        self.target = target  # the TVM target the kernels are built for (C)
        sig = ep.graph_signature
        self.param_of = {**sig.inputs_to_parameters, **sig.inputs_to_buffers}
        self.param_of.update(getattr(sig, "inputs_to_lifted_tensor_constants", {}) or {})
        self.state = {**ep.state_dict, **ep.constants}
        self.user_inputs = list(sig.user_inputs)
        self.tensors: dict[str, Tensor] = {}
        self.steps: list[Step] = []
        self.weights: dict[str, Weight] = {}
        self.kernels: dict[Any, Kernel] = {}
        self.layer_bytes: dict[str, int] = {}
        # (float tensor, groups) -> the int32 sign bits a binary conv reads (computed without the float map)
        self.packed: dict[tuple[str, int], str] = {}
        self.skipped: set[str] = set()  # nodes whose value exists only as packed signs
        self.layer_kernels: dict[str, str] = {}  # layer label -> the kernel its step calls
        self.remat: dict[str, Any] = {}  # node -> the conv its fused readers recompute (.fusion)

    # ---------------------------------------------------------------- tensors
    def new_tensor(self, name: str, shape: tuple, dtype: str) -> Tensor:
        t = Tensor(name, tuple(int(d) for d in shape), dtype, name)
        self.tensors[name] = t
        return t

    def alias(self, name: str, src: Tensor, shape: tuple) -> Tensor:
        t = Tensor(name, tuple(int(d) for d in shape), src.dtype, src.storage, src.value)
        self.tensors[name] = t
        return t

    def weight(self, node: torch.fx.Node, dtype: str) -> str:
        qual = self.param_of[node.name]
        sym = "bitc_w_" + qual.replace(".", "_")
        if sym not in self.weights:
            arr = self.state[qual].detach().cpu().numpy().astype(dtype).reshape(-1)
            layer = qual.rpartition(".")[0] or qual
            self.weights[sym] = Weight(sym, arr, layer)
            self.layer_bytes[layer] = self.layer_bytes.get(layer, 0) + arr.nbytes
        return sym

    def drop_weight(self, symbol: str) -> None:
        """Forget a weight another form replaces (it is not stored in flash)."""
        w = self.weights.pop(symbol)
        self.layer_bytes[w.layer] -= w.array.nbytes

    def constant(self, symbol: str, array: np.ndarray, layer: str) -> str:
        """A ``const`` array the graph does not hold (unit scales of a tile's row kernel)."""
        if symbol not in self.weights:
            self.weights[symbol] = Weight(symbol, array.reshape(-1), layer)
            self.layer_bytes[layer] = self.layer_bytes.get(layer, 0) + array.nbytes
        return symbol

    def kernel(self, key: Any, build: Any, symbol: str, unroll: bool = False) -> Kernel:
        if key not in self.kernels:
            self.kernels[key] = prepare_kernel(build(), symbol, batch=key[-1], unroll=unroll)
        return self.kernels[key]

    def call(self, kernel: Kernel, args: list[str], reads: list[str], writes: list[str], label: str) -> None:
        refs = [f"@{a}@" if a in self.tensors else a for a in args]
        casts = [f"({p.c_type}*){a}" for p, a in zip(kernel.params, refs)]
        self.steps.append(Step([f"{kernel.symbol}({', '.join(casts)});"], reads, writes, label))
        self.layer_kernels.setdefault(label, kernel.symbol)

    # ---------------------------------------------------------------- bit ops
    def quantized_input(self, x: Tensor, act: str, rows: int, rest: tuple, nchw: tuple | None) -> list[str]:
        """Emit the activation quantizer ``act`` needs; return the kernel's activation args."""
        from bitcompiler import kernels

        target = self.target
        if act == "float":
            return [x.name]
        if act == "int8":
            k = self.kernel(
                ("q8", rest, rows),
                lambda: kernels.quantize_rows_int8(rest, target),
                f"bitc_quantize_int8_{len(self.kernels)}",
            )
            q = self.new_tensor(f"{x.name}_q8", (rows, *rest), "int8")
            s = self.new_tensor(f"{x.name}_s", (rows,), "float32")
            self.call(k, [x.name, q.name, s.name], [x.name], [q.name, s.name], "quantize_int8")
            return [q.name, s.name]
        if nchw is not None and (x.name, nchw[3]) in self.packed:
            return [self.packed[(x.name, nchw[3])]]
        if nchw is None:
            (kdim,) = rest
            k = self.kernel(
                ("pack", kdim, rows),
                lambda: kernels.pack_sign_rows(kdim, target),
                f"bitc_pack_sign_{len(self.kernels)}",
                unroll=True,
            )
            p = self.new_tensor(f"{x.name}_bits", (rows, (kdim + 31) // 32), "int32")
        else:
            c, h, w, g = nchw
            k = self.kernel(
                ("pack_nchw", nchw, rows),
                lambda: kernels.pack_sign_nchw(c, h, w, g, target),
                f"bitc_pack_sign_nchw_{len(self.kernels)}",
            )
            p = self.new_tensor(f"{x.name}_bits", (rows, h, w, g, (c // g + 31) // 32), "int32")
        self.call(k, [x.name, p.name], [x.name], [p.name], "pack_sign")
        return [p.name]

    def label(self, node: torch.fx.Node) -> str:
        """``layer (node)``: the module the bit op's weights came from, then the graph node."""
        names = [a.name for a in node.args if isinstance(a, torch.fx.Node)]
        qual = next((self.param_of[n] for n in names if n in self.param_of), "")
        layer = qual.rpartition(".")[0]
        return f"{layer} ({node.name})" if layer else node.name

    def epilogue_args(self, call: ops.BoundCall) -> list[str]:
        t = call.tensors
        if call.attrs.threshold:
            return [self.weight(t[n], "int32") for n in ("planes", "thr_sign", "thr")]
        return [self.weight(t["planes"], "int32")] + [
            self.weight(t[n], "float32") for n in ("scale", "offset", "bias")
        ]

    def bit_linear(self, node: torch.fx.Node, out_shape: tuple) -> None:
        from bitcompiler import kernels

        call = ops.bind(node)
        a: ops.BitLinearAttrs = call.attrs
        x = self.tensors[call.x.name]
        bits, n, _ = (int(d) for d in call.tensors["planes"].meta["val"].shape)
        rows = math.prod(x.shape[:-1])
        spec = kernels.DenseSpec.from_attrs(a, n, bits)
        act_args = self.quantized_input(x, a.act, rows, (a.k,), None)
        kern = self.kernel(
            ("dense", spec, rows),
            lambda: kernels.dense_kernel(spec, self.target),
            f"bitc_dense_{a.act}_{a.code}{bits}_{a.k}x{n}_{len(self.kernels)}",
            unroll=a.act == "binary",
        )
        y = self.new_tensor(node.name, out_shape, "float32")
        self.call(kern, [*act_args, *self.epilogue_args(call), y.name], act_args, [y.name], self.label(node))

    def tiled_linear(self, node: torch.fx.Node, out_shape: tuple) -> None:
        """Row-aligned tile: the two kernels of :class:`kernels.TiledStages`. Unaligned: one kernel
        reading the tile bit of every weight."""
        from bitcompiler import kernels

        call = ops.bind(node)
        a: ops.TiledLinearAttrs = call.attrs
        x = self.tensors[call.x.name]
        spec = kernels.TiledDenseSpec.from_attrs(a, int(call.tensors["scale"].meta["val"].shape[0]))
        rows = math.prod(x.shape[:-1])
        act_args = self.quantized_input(x, a.act, rows, (a.k,), None)
        dtypes = {"tile": "int32", "thr_sign": "int32", "thr": "int32", "scale": "float32", "bias": "float32"}
        t = {name: self.weight(v, dtypes[name]) for name, v in call.tensors.items()}
        y = self.new_tensor(node.name, out_shape, "float32")
        tag = f"{a.act}_{a.k}x{a.n}_p{a.p}"
        if not spec.aligned:
            kern = self.kernel(
                ("tiled", spec, rows),
                lambda: kernels.tiled_unaligned_kernel(spec, self.target),
                f"bitc_tiled_{tag}_{len(self.kernels)}",
            )
            epi = [t["thr_sign"], t["thr"]] if a.threshold else [t["scale"], t["bias"]]
            self.call(kern, [*act_args, t["tile"], *epi, y.name], act_args, [y.name], self.label(node))
            return
        plan = kernels.tiled_linear_stages(spec, self.target)
        layer, base = self.weights[t["tile"]].layer, t["tile"].removeprefix("bitc_w_")
        r = plan.rows
        values = {
            **{f"x{i}": v for i, v in enumerate(act_args)},
            **t,
            "one": self.constant(f"bitc_c_{base}_one", np.ones(r, np.float32), layer),
            "zero": self.constant(f"bitc_c_{base}_zero", np.zeros(r, np.float32), layer),
            "rows": self.new_tensor(f"{node.name}_rows", (rows, r), "float32").name,
            "y": y.name,
        }
        if "unit_xs" in plan.stage1.args:  # the row kernel's int8 scale is 1: A stays the integer accumulator
            values["unit_xs"] = self.constant(f"bitc_c_{base}_xs1", np.ones(rows, np.float32), layer)
        name = self.label(node)
        for stage, label in ((plan.stage1, name), (plan.stage2, f"{name} (expand)")):
            kern = self.kernel(
                (*stage.key, rows),
                stage.build,
                f"bitc_tiled{stage.suffix}_{tag}_{len(self.kernels)}",
                unroll=stage is plan.stage1 and a.act == "binary",
            )
            reads = [v for v in (values[n] for n in stage.args) if v in self.tensors]
            self.call(
                kern, [*(values[n] for n in stage.args), values[stage.out]], reads, [values[stage.out]], label
            )

    def bit_conv2d(self, node: torch.fx.Node, out_shape: tuple) -> None:
        from bitcompiler import kernels

        call = ops.bind(node)
        a: ops.BitConv2dAttrs = call.attrs
        x = self.tensors[call.x.name]
        bits, o = (int(d) for d in call.tensors["planes"].meta["val"].shape[:2])
        _, _, h, w = x.shape
        spec = kernels.ConvSpec.from_attrs(a, o, h, w, bits)
        c = a.in_channels
        act_args = self.quantized_input(x, a.act, 1, (c, h, w), (c, h, w, a.groups))
        tag = f"{a.act}_{a.code}{bits}_{c}x{o}_{a.kernel[0]}x{a.kernel[1]}"
        epilogue = self.epilogue_args(call)
        codes = kernels.codes_conv_fits(spec)  # int8/float activations: one byte per weight, not B planes
        if codes:
            qual = self.param_of[call.tensors["planes"].name]
            array = kernels.codes_from_planes(self.state[qual].detach().cpu().numpy(), spec.cg)
            self.drop_weight(epilogue[0])
            epilogue[0] = self.constant(
                f"bitc_q_{qual.replace('.', '_')}", array, qual.rpartition(".")[0] or qual
            )
        # read only as packed signs (groups-1 binary convs, max-pools of them, through hardtanh)
        packed = packed_readers(node)
        kind = ("_codes" if codes else "") + ("_packed" if packed else "")
        kern = self.kernel(
            ("conv" + kind, spec, 1),
            lambda: (
                kernels.conv2d_kernel(spec, self.target)
                if not kind
                else kernels.conv2d_c_kernel(spec, codes=codes, packed=packed)
            ),
            f"bitc_conv2d{kind}_{tag}_{len(self.kernels)}",
            unroll=a.act == "binary",
        )
        if packed:
            y = self.new_tensor(f"{node.name}_bits", (1, *out_shape[2:], 1, (o + 31) // 32), "int32")
            for n in (node, *sign_clamps(node)):  # the clamps' signs are the conv's
                self.packed[(n.name, 1)] = y.name
                self.new_tensor(n.name, out_shape, "float32")  # never written: readers take the bits
                self.skipped.add(n.name)
        else:
            y = self.new_tensor(node.name, out_shape, "float32")
        self.call(kern, [*act_args, *epilogue, y.name], act_args, [y.name], self.label(node))

    # ---------------------------------------------------------------- walk
    def run(self) -> tuple[Tensor, Tensor]:
        graph_input = output = None
        for node in self.ep.graph.nodes:
            if node.op == "placeholder":
                if node.name in self.user_inputs:
                    if graph_input is not None:
                        raise CortexMLoweringError("Cortex-M models take exactly one input tensor")
                    graph_input = self.new_tensor(node.name, tuple(node.meta["val"].shape), "float32")
                continue
            if node.op == "output":
                outs = node.args[0]
                if len(outs) != 1:
                    raise CortexMLoweringError("Cortex-M models return exactly one tensor")
                output = self.tensors[outs[0].name]
                continue
            self.lower_node(node)
        assert graph_input is not None and output is not None
        if graph_input.dtype != "float32":
            raise CortexMLoweringError("Cortex-M models take a float32 input")
        return graph_input, output

    def lower_node(self, node: torch.fx.Node) -> None:
        if node.name in self.skipped:
            return None
        target = node.target
        name = float_ops.qualified_name(node)
        ns = getattr(target, "namespace", "")
        val = node.meta.get("val")
        shape = tuple(val.shape) if isinstance(val, torch.Tensor) else ()
        if ns == "bitc" and name == "bit_linear.default":
            return self.bit_linear(node, shape)
        if ns == "bitc" and name == "bit_conv2d.default":
            return self.bit_conv2d(node, shape)
        if ns == "bitc" and name == "tiled_linear.default":
            return self.tiled_linear(node, shape)
        if ns == "aten" and name in ALIASES:
            src = self.tensors[cast(torch.fx.Node, node.args[0]).name]
            self.alias(node.name, src, shape)
            return None
        if ns == "aten" and name == "max_pool2d.default" and (groups := binary_conv_groups(node)):
            return self.max_pool_packed(node, shape, groups)
        emit = (float_ops.EMITTERS if ns == "aten" else float_ops.BITC_EMITTERS).get(name)
        if emit is None:
            raise CortexMLoweringError(
                f"op {ns}.{name} (node {node.name}) has no Cortex-M lowering yet; supported float ops: "
                f"{', '.join(sorted(float_ops.EMITTERS))}. Quantize the layer (bit layers always lower) "
                "or run it on target='cpu'."
            )
        args = [a for a in node.args if isinstance(a, torch.fx.Node)]
        if any(a.name in self.remat for a in args):
            raise CortexMLoweringError(f"node {node.name} reads a map that was never stored (internal)")
        # computed maps by their arena slot; constants (a leftover BatchNorm's factors) from flash
        ins, refs, shapes = [], [], []
        for a in args:
            if a.name in self.tensors:
                ins.append(self.tensors[a.name])
                refs.append(f"@{a.name}@")
                shapes.append(ins[-1].shape)
            elif a.name in self.param_of:
                refs.append(self.weight(a, "float32"))
                shapes.append(tuple(self.state[self.param_of[a.name]].shape))
            else:
                raise CortexMLoweringError(
                    f"node {node.name} reads {a.name}, which nothing computed (internal)"
                )
        y = self.new_tensor(node.name, shape, "float32")
        try:
            body = emit(node, shapes, y.shape)
        except float_ops.UnsupportedFloatOp as e:
            raise CortexMLoweringError(f"op aten.{name}: {e}") from e
        decls = [f"const float* x{i} = (const float*){r};" for i, r in enumerate(refs)]
        code = [*decls, f"float* y = (float*)@{y.name}@;", *body]
        inplace = tuple(t.name for t in ins if t.shape == y.shape) if name in float_ops.ELEMENTWISE else ()
        self.steps.append(Step(code, [t.name for t in ins], [y.name], f"{node.name} ({name})", inplace))
        return None

    def max_pool_packed(self, node: torch.fx.Node, out_shape: tuple, groups: int) -> None:
        """``max_pool2d`` read only by binary convs: pack the signs of its input, then pool the
        bits. ``sign(max(window)) = OR(sign bits of the window)`` (bit 1 is ``x >= 0``), so the
        pooled float map never exists: the convs read the pooled words."""

        x = self.tensors[cast(torch.fx.Node, node.args[0]).name]
        _, c, h, w = x.shape
        _, _, oh, ow = out_shape
        nchw = (c, h, w, groups)
        (bits_name,) = self.quantized_input(x, "binary", 1, (c, h, w), nchw)  # packs, or the conv did
        bits = self.tensors[bits_name]
        words = groups * ((c // groups + 31) // 32)
        pooled = self.new_tensor(f"{node.name}_bits", (1, oh, ow, groups, words // groups), "int32")
        body = float_ops.max_pool2d_bits(node, (h, w), (oh, ow), words)
        code = [
            f"const int32_t* x0 = (const int32_t*)@{bits.name}@;",
            f"int32_t* y = (int32_t*)@{pooled.name}@;",
            *body,
        ]
        self.steps.append(Step(code, [bits.name], [pooled.name], f"{node.name} (max_pool2d on sign bits)"))
        self.packed[(node.name, groups)] = pooled.name
        self.new_tensor(node.name, out_shape, "float32")  # never written: its readers take the bits


def build_program(
    gm: torch.fx.GraphModule, example_inputs: tuple, target: Any = None, builder: Any = None
) -> Program:
    """Walk the rewritten graph (batch 1) into kernels, C steps, weights and an arena plan; the
    kernels are built for ``target`` (a TVM target; default: C). ``builder``: a subclass of the
    walker that lowers some ops its own way (another C target's kernels)."""
    ep = export_batch_one(gm, example_inputs)
    b = (builder or _Builder)(ep, target if target is not None else {"kind": "c"})
    graph_input, output = b.run()
    plan = plan_storage(b.tensors, b.steps, graph_input, output)
    kernels, weights = list(b.kernels.values()), list(b.weights.values())
    return Program(
        graph_input, output, b.tensors, b.steps, weights, kernels, plan, b.layer_bytes, b.layer_kernels
    )
