"""Which float ops run inside a conv's kernel on Cortex-M, so their maps never exist in RAM.

A groups-1 conv that :mod:`.conv_c` computes per pixel (int8 activations with byte codes, or
packed signs with 1-bit weights) takes along the chain of elementwise ops that follow it while each
op is the only reader of the value before it: relu, hardtanh, and add / sub / mul with a constant,
with a tensor already in memory, or with a conv's chain that is recomputed (below). The chain's
last value goes to one sink:

* ``packed``: every reader takes only its signs (binary convs, max-pools of them, sign-preserving
  hardtanhs, :func:`.sign_readers.packed_readers`): the packed sign words, 1 bit a value;
* ``mean``: its one reader is a global average pool: ``O`` channel sums, the map never stored;
* ``float``: the map.

**Recomputing** (rematerialization): when the float readers of a chain's value are all operands of
ops that a later conv's chain takes along (a residual ``x + f(conv(x))``), the value is not
stored: that later kernel recomputes the conv at each of its pixels from the conv's own inputs,
which stay live instead (a 28x28 int8 image instead of a 28x28x32 float map). It costs the conv's
instructions once more; ``Target(..., recompute=False)`` stores the map instead.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from bitcompiler import ops
from bitcompiler.backends.cortex_m.binary_c import store_w1a1_words
from bitcompiler.backends.cortex_m.conv_c import Param, Producer, Sink, fused_kernel
from bitcompiler.backends.cortex_m.conv_tables import choose_bits, store_tables
from bitcompiler.backends.cortex_m.dense_sources import int8_block, store_int8_codes
from bitcompiler.backends.cortex_m.float_ops import _f, _pair, hardtanh_bounds, qualified_name
from bitcompiler.backends.cortex_m.sign_readers import (
    binary_conv_groups,
    is_sign_clamp,
    packed_readers,
    sign_clamps,
)

UNARY = {"relu.default", "relu_.default", "hardtanh.default", "hardtanh_.default"}
BINOPS = {"add.Tensor": "+", "sub.Tensor": "-", "mul.Tensor": "*"}


def op_name(node: torch.fx.Node) -> str:
    """An aten node's :func:`.float_ops.qualified_name`; empty for any other node."""
    return qualified_name(node) if getattr(node.target, "namespace", "") == "aten" else ""


def _shape(node: Any) -> tuple:
    val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return tuple(int(d) for d in val.shape) if isinstance(val, torch.Tensor) else ()


def conv_kind(node: torch.fx.Node) -> tuple[str, Any] | None:
    """``("int8" | "binary", spec)`` when :mod:`.conv_c` computes this node per pixel, else None."""
    from bitcompiler import kernels

    if getattr(node.target, "namespace", "") != "bitc" or "bit_conv2d" not in str(node.target):
        return None
    call = ops.bind(node)
    a: ops.BitConv2dAttrs = call.attrs
    bits, o = (int(d) for d in call.tensors["planes"].meta["val"].shape[:2])
    _, _, h, w = _shape(call.x)
    spec = kernels.ConvSpec.from_attrs(a, o, h, w, bits)
    if a.groups != 1:
        return None
    if a.act == "int8" and not a.threshold and kernels.codes_conv_fits(spec):
        return "int8", spec
    if a.act == "binary" and a.code == "pm1" and bits == 1:
        return "binary", spec
    return None


def _unary(node: torch.fx.Node) -> tuple:
    if op_name(node).startswith("relu"):
        return ("relu",)
    lo, hi = hardtanh_bounds(node)
    return ("hardtanh", _f(lo), _f(hi))


def _only_user(node: torch.fx.Node) -> torch.fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def chain_of(b: Any, conv: torch.fx.Node) -> tuple[list[tuple], list[torch.fx.Node]]:
    """The elementwise ops after ``conv`` that its kernel takes along, and their nodes."""
    shape, chain, nodes, cur = _shape(conv), [], [], conv
    while (u := _only_user(cur)) is not None and _shape(u) == shape:
        name = op_name(u)
        if name in UNARY and u.args[0] is cur:
            chain.append(_unary(u))
        elif (
            name in BINOPS
            and len(u.args) == 2
            and u.kwargs.get("alpha", 1) == 1
            and u.args[0] is not u.args[1]
        ):
            first = u.args[0] is cur
            other = u.args[1] if first else u.args[0]
            if not first and not isinstance(other, torch.fx.Node):
                break
            if not isinstance(other, torch.fx.Node):
                chain.append(("binop", BINOPS[name], "scalar", _f(float(other)), first))  # type: ignore[arg-type]
            elif other.name in b.remat:
                chain.append(("binop", BINOPS[name], "remat", other.name, first))
            elif _in_memory(b, other) and _shape(other) == shape:
                chain.append(("binop", BINOPS[name], "tensor", other.name, first))
            else:
                break
        else:
            break
        nodes.append(u)
        cur = u
    return chain, nodes


def _in_memory(b: Any, node: torch.fx.Node) -> bool:
    """A float tensor some step wrote already (or the graph's input)."""
    t = b.tensors.get(node.name)
    if t is None or t.dtype != "float32":
        return False
    return node.op == "placeholder" or any(t.value in s.writes for s in b.steps)


def _full_mean(node: torch.fx.Node, src: torch.fx.Node) -> bool:
    """``node`` averages ``src`` (N, C, H, W) over all of H and W."""
    if node.args[0] is not src:
        return False
    name, rank = op_name(node), len(_shape(src))
    if getattr(node.target, "namespace", "") == "bitc" and "window_mean" in str(node.target):
        kernel, _, padding = (_pair(v) for v in node.args[1:4])
        return kernel == tuple(_shape(src)[2:]) and padding == (0, 0)
    if name == "mean.dim" and rank == 4:
        return sorted(int(d) % 4 for d in node.args[1]) == [2, 3]  # type: ignore[union-attr, arg-type]
    return name == "adaptive_avg_pool2d.default" and _pair(node.args[1]) == (1, 1)


def _sign_reader(node: torch.fx.Node, src: torch.fx.Node) -> bool:
    if op_name(node) == "max_pool2d.default":
        return node.args[0] is src and binary_conv_groups(node) == 1
    if is_sign_clamp(node, src):
        return packed_readers(node)
    if getattr(node.target, "namespace", "") == "bitc" and "bit_conv2d" in str(node.target):
        call = ops.bind(node)
        return call.x is src and call.attrs.act == "binary" and call.attrs.groups == 1
    return False


def _fused_later(user: torch.fx.Node, value: torch.fx.Node) -> bool:
    """``user`` (an op reading ``value``) lies on the chain of a later conv's kernel, through its
    other operand."""
    if op_name(user) not in BINOPS or user.kwargs.get("alpha", 1) != 1 or len(user.args) != 2:
        return False
    other = user.args[1] if user.args[0] is value else user.args[0]
    if not isinstance(other, torch.fx.Node) or other is value:
        return False
    cur = other
    while op_name(cur) in UNARY and cur.args[0] is not None and isinstance(cur.args[0], torch.fx.Node):
        if _only_user(cur.args[0]) is not cur:
            return False
        cur = cur.args[0]
    return conv_kind(cur) is not None and _only_user(other) is user and _shape(other) == _shape(value)


def lower_conv(b: Any, node: torch.fx.Node, out_shape: tuple) -> bool:
    """Lower ``node`` with its fused chain on the builder ``b``; False when it is not a conv
    :mod:`.conv_c` computes (the caller lowers it)."""
    kind = conv_kind(node)
    if kind is None:
        return False
    producer = make_producer(b, node, *kind, prefix="c_")
    producer.chain, nodes = chain_of(b, node)
    end = nodes[-1] if nodes else node
    for n in nodes:
        b.skipped.add(n.name)
        b.new_tensor(n.name, out_shape, "float32")  # never written unless the float sink
    users = list(end.users)
    signs = [u for u in users if _sign_reader(u, end)]
    floats = [u for u in users if u not in signs]
    o, oh, ow = out_shape[1], out_shape[2], out_shape[3]
    in_bytes = sum(b.tensors[p.arg].nbytes for p in producer.params if p.arg in b.tensors and not p.scratch)
    plain = all(op[0] != "binop" or op[2] == "scalar" for op in producer.chain)
    small = in_bytes * 4 <= o * oh * ow * 4  # its inputs take a quarter of the map at most
    if floats and plain and small and b.recompute and all(_fused_later(u, end) for u in floats):
        b.remat[end.name] = producer
        if end.name not in b.tensors:
            b.new_tensor(end.name, out_shape, "float32")  # never written: its readers recompute it
        if signs:
            emit(b, node, producer, _packed_sink(b, end, out_shape))
        return True
    if users and packed_readers(end):
        emit(b, node, producer, _packed_sink(b, end, out_shape))
    elif len(users) == 1 and _full_mean(users[0], end):
        mean = users[0]
        b.skipped.add(mean.name)
        emit(b, node, producer, Sink("mean", b.new_tensor(mean.name, _shape(mean), "float32").name))
    else:
        emit(b, node, producer, Sink("float", b.new_tensor(end.name, out_shape, "float32").name))
    return True


def _packed_sink(b: Any, end: torch.fx.Node, out_shape: tuple) -> Sink:
    _, o, oh, ow = out_shape
    bits = b.new_tensor(f"{end.name}_bits", (1, oh, ow, 1, -(-o // 32)), "int32")
    for n in (end, *sign_clamps(end)):
        b.packed[(n.name, 1)] = bits.name
        if n.name not in b.tensors:
            b.new_tensor(n.name, out_shape, "float32")  # never written: readers take the bits
        b.skipped.add(n.name)
    return Sink("packed", bits.name)


def emit(b: Any, node: torch.fx.Node, producer: Producer, sink: Sink) -> None:
    """One step: the kernel with its remat producers and tensor operands, reads and writes."""
    remats: list[Producer] = []
    tensors: list[Param] = []
    chain = []
    for op in producer.chain:
        if op[0] == "binop" and op[2] == "remat":
            src = b.remat[op[3]]
            copy = rescratch(b, src, f"r{len(remats)}_", node.name)
            op = (*op[:3], str(len(remats)), op[4])
            remats.append(copy)
        elif op[0] == "binop" and op[2] == "tensor":
            t = b.tensors[op[3]]
            if all(p.arg != t.name for p in tensors):
                tensors.append(Param(f"T{len(tensors)}", t.dtype, t.shape, t.name))
        chain.append(op)
    producer.chain = chain
    s = producer.spec
    symbol = f"bitc_conv2d_{producer.kind}_{b.isa}_{s.in_channels}x{s.out_channels}_{len(b.kernels)}"
    kern, args = fused_kernel(symbol, producer, remats, tensors, sink)
    b.kernels[("fused", node.name)] = kern
    params = [*producer.params, *(p for r in remats for p in r.params)]
    reads = [p.arg for p in params if p.arg in b.tensors and not p.scratch] + [t.arg for t in tensors]
    writes = [p.arg for p in params if p.scratch] + [sink.out]
    b.call(kern, args, reads, writes, b.label(node))


def rescratch(b: Any, producer: Producer, prefix: str, at: str) -> Producer:
    """``producer`` under another prefix with its own scratch buffers (a recomputing kernel's)."""
    params = []
    for p in producer.params:
        name = prefix + p.name.removeprefix(producer.prefix)
        arg = b.new_tensor(f"{at}_{prefix}{p.name}", p.shape, p.dtype).name if p.scratch else p.arg
        params.append(Param(name, p.dtype, p.shape, arg, p.scratch))
    return Producer(
        producer.kind,
        producer.spec,
        prefix,
        params,
        producer.isa,
        producer.shift,
        producer.chain,
        producer.tables,
        producer.pairs,
    )


def binary_conv_weights(b: Any, call: Any, spec: Any, tables: int) -> tuple[str, list[str]]:
    """A W1A1 conv's planes ``(1, O, KH, KW, CW)`` stored as the W1A1 dense kernel's rows
    (:func:`.binary_c.store_w1a1_words`) or as lookup tables of ``tables`` bits
    (:func:`.conv_tables.store_tables`), and with padding its ``WT (taps, O)``: what a tap's
    zero words count, ``C - 2 popcount(w_tap)`` (int8 when ``C`` fits)."""
    planes = b.state[b.param_of[call.tensors["planes"].name]].detach().cpu().numpy()
    o, taps = spec.out_channels, spec.kernel[0] * spec.kernel[1]
    rows = planes.reshape(1, o, taps * spec.words_per_group)
    if tables:
        words = store_tables(rows[0], taps, spec.words_per_group, spec.cg, tables)
        stored = b._stored(call, f"tab{tables}", words)
        b.table_bytes += words.nbytes
    else:
        stored = b._stored(call, "w1a1", store_w1a1_words(rows))
    if not any(spec.padding):
        return stored, []
    bits = np.unpackbits(planes.reshape(o, taps, -1).view(np.uint8), axis=-1).sum(-1)
    wt = (spec.cg - 2 * bits.astype(np.int64)).T  # (taps, O)
    dtype = np.int8 if spec.cg <= 127 else np.int32
    return stored, [b._stored(call, "wt", np.ascontiguousarray(wt).astype(dtype))]


PAIRS_MAX_FIELD = 16  # an int8 conv's KH * KW * C up to which each channel's codes sit in registers


def code_pairs(q: np.ndarray) -> np.ndarray:
    """``(O, K)`` codes (0..255) -> ``(O, ceil(K / 2))`` int32 words, code ``2i`` in the low and
    ``2i + 1`` in the high signed 16-bit half (zero past ``K``): SMLAD's operands."""
    o, k = q.shape
    padded = np.zeros((o, k + k % 2), np.int64)
    padded[:, :k] = q
    words = (padded[:, 0::2] & 0xFFFF) | (padded[:, 1::2] << 16)
    return np.ascontiguousarray(words.astype(np.uint32).view(np.int32))


def make_producer(b: Any, node: torch.fx.Node, kind: str, spec: Any, prefix: str) -> Producer:
    """The conv's :class:`Producer` on ``b`` (emits its activation quantizer, stores its weights)."""
    from bitcompiler import kernels

    call = ops.bind(node)
    x = b.tensors[call.x.name]
    n = lambda s: prefix + s
    if kind == "binary":
        c, h, w = spec.in_channels, spec.in_h, spec.in_w
        (xp,) = b.quantized_input(x, "binary", 1, (c, h, w), (c, h, w, 1))
        epi = b.epilogue_args(call)
        b.drop_weight(epi[0])
        tables = choose_bits(spec, b.flash_bytes * 3 // 4 - b.table_bytes, b.conv_tables)
        epi[0], wt = binary_conv_weights(b, call, spec, tables)
        names = ["P", "TS", "TH"] if spec.threshold else ["P", "SC", "OF", "BI"]
        params = [Param(n("XP"), "int32", b.tensors[xp].shape, xp)]
        params += [
            Param(n(k), str(b.weights[s].array.dtype), (b.weights[s].array.size,), s)
            for k, s in zip([*names, "WT"], [*epi, *wt])
        ]
        return Producer("binary", spec, prefix, params, b.isa, tables=tables)
    qual = b.param_of[call.tensors["planes"].name]
    q = kernels.codes_from_planes(b.state[qual].detach().cpu().numpy(), spec.in_channels).astype(np.int64)
    q = q.reshape(spec.out_channels, -1)  # (O, KH * KW * C), the row's order
    shift, k = bool(q.max() > 127), q.shape[1]
    xq, xs = b.quantized_input(x, "int8", 1, tuple(x.shape[1:]), None)
    params = [Param(n("XQ"), "int8", x.shape, xq), Param(n("XS"), "float32", (1,), xs)]
    o = spec.out_channels
    epilogue = [
        Param(n(p), "float32", (o,), b.weight(call.tensors[t], "float32"))
        for p, t in zip(("SC", "OF", "BI"), ("scale", "offset", "bias"))
    ]
    if b.isa != "scalar" and k <= PAIRS_MAX_FIELD:  # a small field (a stem): SMLAD on code pairs
        pairs = code_pairs(q)
        params.append(Param(n("W"), "int32", (pairs.size,), b._stored(call, "pairs", pairs)))
        return Producer("int8", spec, prefix, params + epilogue, b.isa, pairs=pairs.shape[1])
    stored = store_int8_codes((q - 128 if shift else q).astype(np.int8), int8_block(b.isa))
    params.append(Param(n("W"), "int8", (stored.size,), b._stored(call, "codes", stored)))
    params += epilogue
    params.append(Param(n("R"), "int8", (k,), b.new_tensor(f"{node.name}_row", (k,), "int8").name, True))
    words = {"scalar": 4 * -(-k // 4), "dsp": 2 * -(-k // 4)}.get(b.isa, 0)
    if words:
        params.append(
            Param(n("XU"), "int32", (words,), b.new_tensor(f"{node.name}_xu", (words,), "int32").name, True)
        )
    return Producer("int8", spec, prefix, params, b.isa, shift)
