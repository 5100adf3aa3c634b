"""What a compiled model costs: bits per weight and bytes per layer, and what stayed float."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import fx

from bitcompiler.quant import numerics
from bitcompiler.quant.bitlayers import BIT_LAYERS
from bitcompiler.quant.tiled_layers import TILED_LAYERS, TiledBitConv2d, TiledBitLinear
from bitcompiler.target import Target


@dataclass(frozen=True)
class LayerRow:
    name: str
    op: str
    scheme: str
    bits_per_weight: float
    weight_bytes: int
    weights: int
    note: str = ""


@dataclass
class Report:
    """Per-layer rows plus totals; ``str()`` is a table, ``to_dict()`` is JSON-ready."""

    layers: list[LayerRow]
    target: str
    scheme: str
    float_ops: dict[str, int] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # figures and notes: numbers or text

    @property
    def weight_bytes(self) -> int:
        return sum(r.weight_bytes for r in self.layers)

    @property
    def float_weight_bytes(self) -> int:
        return 4 * sum(r.weights for r in self.layers)

    @property
    def bits_per_weight(self) -> float:
        return numerics.bits_per_weight(sum(r.weights for r in self.layers), self.weight_bytes)

    def to_dict(self) -> dict:
        return {
            "target": self.target,
            "scheme": self.scheme,
            "layers": [asdict(r) for r in self.layers],
            "bits_per_weight": self.bits_per_weight,
            "weight_bytes": self.weight_bytes,
            "float_weight_bytes": self.float_weight_bytes,
            "float_ops": dict(self.float_ops),
            **self.extra,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Report:
        known = {
            "target",
            "scheme",
            "layers",
            "bits_per_weight",
            "weight_bytes",
            "float_weight_bytes",
            "float_ops",
        }
        return cls(
            [LayerRow(**r) for r in d["layers"]],
            d["target"],
            d["scheme"],
            d.get("float_ops", {}),
            {k: v for k, v in d.items() if k not in known},
        )

    def __str__(self) -> str:
        head = ("layer", "op", "scheme", "bits/w", "bytes", "note")
        rows = [
            (r.name, r.op, r.scheme, f"{r.bits_per_weight:.3f}", f"{r.weight_bytes:,}", r.note)
            for r in self.layers
        ]
        total = (
            "total",
            "",
            self.scheme,
            f"{self.bits_per_weight:.3f}",
            f"{self.weight_bytes:,}",
            f"float32: {self.float_weight_bytes:,} B ({self.compression:.1f}x smaller)",
        )
        widths = [max(len(str(x)) for x in col) for col in zip(head, *rows, total)]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths)
        lines = [
            f"bitcompiler report — target {self.target}",
            fmt.format(*head),
            fmt.format(*("-" * w for w in widths)),
        ]
        lines += [fmt.format(*r) for r in rows] + [fmt.format(*total)]
        if self.float_ops:
            lines.append(
                "ops run in float: " + ", ".join(f"{k} x{v}" for k, v in sorted(self.float_ops.items()))
            )
        for k, v in self.extra.items():
            if isinstance(v, dict):  # e.g. "kernel tuning": a line per kernel
                lines.append(f"{k}:")
                lines += [f"  {name}: {value}" for name, value in v.items()]
            else:
                lines.append(f"{k}: {v}")
        return "\n".join(line.rstrip() for line in lines)

    # Cortex-M figures (None on other targets): measured under QEMU for one inference
    @property
    def instructions(self) -> int | None:
        """Instructions executed for one sample (Cortex-M, QEMU's exact count)."""
        v = self.extra.get("instructions")
        return int(v) if isinstance(v, (int, float)) else None

    @property
    def flash_bytes(self) -> int | None:
        """Flash the firmware takes: code, weights and constants (Cortex-M)."""
        v = self.extra.get("flash_bytes")
        return int(v) if v is not None else None

    @property
    def ram_bytes(self) -> int | None:
        """RAM at run time: static data, the activation arena and the measured stack (Cortex-M)."""
        v = self.extra.get("ram_bytes")
        return int(v) if v is not None else None

    @property
    def arena_bytes(self) -> int | None:
        """The planned activation arena (Cortex-M)."""
        v = self.extra.get("arena_bytes")
        return int(v) if v is not None else None

    @property
    def compression(self) -> float:
        return self.float_weight_bytes / self.weight_bytes if self.weight_bytes else 1.0


def _stored_codes_bytes(m: Any) -> int:
    """Bytes of a conv whose weights the CPU lowering stores in its kernel's order, else 0 (the
    same rule: :func:`bitcompiler.kernels.stored_weights`, which reads no image size)."""
    from bitcompiler.kernels import ConvSpec, stored_weights

    (kh, kw), (dh, dw) = m.kernel_size, m.dilation
    h, w = (kh - 1) * dh + 1, (kw - 1) * dw + 1
    args = (m.in_channels, m.out_channels, h, w, tuple(m.kernel_size), (1, 1), (0, 0), tuple(m.dilation))
    spec = ConvSpec(*args, m.groups, m.bits, m.code, m.act, bool(m.has_offset), bool(m.threshold))
    stored = stored_weights(spec)
    return stored[1] if stored is not None else 0


def _stored_words(m: Any, target: str) -> int:
    """Words the compiled layer stores: its planes, or, where the target's backend stores weights
    compactly (``Capabilities.compact_weights``: the CPU), the kernel-order codes or the compact
    stream the lowering keeps instead when the planes' padding would waste more."""
    if not m.packed:
        return m.bits * m.codes.numel() // 32
    compact = Target.parse(target).capabilities.compact_weights
    if compact and m.op == "conv2d":
        stored = _stored_codes_bytes(m)
        if stored:
            return -(-stored // 4)
    words = m.planes.numel()
    cg = m.in_features if m.op == "linear" else m.in_channels // m.groups
    rows = math.prod(m.planes.shape[1:-1])
    if compact and numerics.stores_compact(m.bits, rows, cg, words):
        return numerics.stream_words(m.bits * rows * cg)
    return words


def _bit_row(name: str, m: Any, target: str = "cpu") -> LayerRow:
    numel = (
        m.out_features * m.in_features
        if m.op == "linear"
        else (m.out_channels * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1])
    )
    words = _stored_words(m, target)
    n_bytes = numerics.packed_weight_bytes(words, m.n_floats)
    note = f"act={m.act}" + (", integer threshold" if m.threshold else "")
    return LayerRow(name, m.op, m.label, numerics.bits_per_weight(numel, n_bytes), n_bytes, numel, note)


def _tiled_row(name: str, m: TiledBitLinear | TiledBitConv2d) -> LayerRow:
    """A tiled layer stores its packed tile words and its p (or N) float scales, nothing else."""
    numel = m.out_features * m.in_features
    n_bytes = numerics.packed_weight_bytes(m.tile.numel(), m.n_floats)
    kind = f"row-aligned R={m.out_features // m.p}" if m.row_aligned else "unaligned"
    note = f"act={m.act}, tile {m.tile_bits} bits ({kind}) + {m.n_floats} scales" + (
        ", integer threshold" if m.threshold else ""
    )
    op = "linear" if isinstance(m, TiledBitLinear) else "conv2d"
    return LayerRow(name, op, m.label, numerics.bits_per_weight(numel, n_bytes), n_bytes, numel, note)


def _op_name(gm: fx.GraphModule, node: fx.Node) -> str:
    if node.op == "call_module":
        return type(gm.get_submodule(str(node.target))).__name__
    target = node.target
    if "exact_unary" in str(target):  # sigmoid / tanh in the exact formulation: still float ops
        return str(node.args[1])
    name = getattr(target, "__name__", str(target))
    return name.split(".")[0]


def build_report(gm: fx.GraphModule, target: str, scheme: str, notes: list) -> Report:
    """Rows for every weighted layer of the rewritten graph, bit layers and float ones."""
    noted = dict(notes)
    rows = []
    for name, m in gm.named_modules():
        if isinstance(m, TILED_LAYERS):
            rows.append(_tiled_row(name, m))
            continue
        if isinstance(m, BIT_LAYERS):
            row = _bit_row(name, m, target)
            rows.append(replace(row, note=f"{row.note}; {noted[name]}") if name in noted else row)
        elif (
            name
            and isinstance(getattr(m, "weight", None), torch.Tensor)
            and m.weight.dim() >= 2
            and not any(isinstance(c, BIT_LAYERS) for c in m.modules())
        ):
            numel = m.weight.numel()
            rows.append(
                LayerRow(name, type(m).__name__, "float", 32.0, 4 * numel, numel, noted.get(name, ""))
            )
    shown = {r.name for r in rows}
    unplaced = [f"{name}: {message}" for name, message in notes if name not in shown]
    float_ops: Counter[str] = Counter()
    for node in gm.graph.nodes:
        if node.op in ("call_function", "call_module", "call_method") and (
            "bitc" not in str(node.target) or "exact_unary" in str(node.target)
        ):
            float_ops[_op_name(gm, node)] += 1
    report = Report(rows, target, scheme, dict(float_ops))
    if unplaced:  # notes on graph nodes that are not layers (e.g. a functional conv kept float)
        report.extra["notes"] = "; ".join(unplaced)
    return report
