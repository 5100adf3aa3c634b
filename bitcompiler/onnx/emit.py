"""ONNX nodes for one :class:`~bitcompiler.onnx.layers.QuantLayer`, as QDQ or as QONNX.

Both formats build the same computation (docs/onnx.md):

* the activation: as is (``float``), per-row symmetric int8 with a scale computed in the graph
  exactly as the numerics do (``s = max(max|x|, EPS) / 127`` over each sample's features, each
  token's for a dense layer on 3-D input), or its sign (``binary``, sign(0) = +1);
* the weight: its codes and per-channel scale (and offset), dequantized;
* ``Conv``/``MatMul`` and the bias, or for a threshold epilogue the integer accumulator
  (weights at scale 1) compared with the thresholds: ``sign(thr_sign·acc − thr)``.

QDQ writes the quantizers as ``QuantizeLinear``/``DequantizeLinear`` (int8 codes, per-axis scales;
an offset as an ``Add``; signs as ``Where``), QONNX as ``Quant`` (k-bit, float zero point for the
offset) and ``BipolarQuant`` (±1).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from bitcompiler.onnx.layers import QuantLayer
from bitcompiler.quant.numerics import EPS

QONNX_DOMAIN = "qonnx.custom_op.general"


class Builder:
    """Collects nodes and initializers under a unique name prefix."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._count = 0

    def _name(self, hint: str) -> str:
        self._count += 1
        return f"{self.prefix}/{hint}_{self._count}"

    def const(self, hint: str, value: Any, dtype: Any = np.float32) -> str:
        name = self._name(hint)
        self.initializers.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def op(
        self, op_type: str, inputs: list[str], out: str | None = None, domain: str = "", **attrs: Any
    ) -> str:
        out = out or self._name(op_type)
        self.nodes.append(
            helper.make_node(op_type, inputs, [out], name=self._name(op_type), domain=domain, **attrs)
        )
        return out


class Emitter:
    """The format-independent layer; subclasses supply the quantizers."""

    def __init__(self, b: Builder) -> None:
        self.b = b

    # quantizers, per format
    def sign(self, x: str) -> str:
        raise NotImplementedError

    def int8_rows(self, x2d: str, scale: str) -> str:
        raise NotImplementedError

    def weight(self, layer: QuantLayer, unit_scale: bool) -> str:
        raise NotImplementedError

    # shared
    def activation(self, x: str, layer: QuantLayer) -> str:
        if layer.act == "float":
            return x
        if layer.act == "binary":
            return self.sign(x)
        b = self.b
        rows = b.const("rows", [-1, layer.codes.shape[1]] if layer.kind == "linear" else [0, -1], np.int64)
        x2d = b.op("Reshape", [x, rows])
        amax = b.op("ReduceMax", [b.op("Abs", [x2d])], axes=[1], keepdims=0)
        s = b.op("Div", [b.op("Max", [amax, b.const("eps", EPS)]), b.const("q127", 127.0)])
        return b.op("Reshape", [self.int8_rows(x2d, s), b.op("Shape", [x])])

    def layer(self, x: str, y: str, layer: QuantLayer) -> None:
        b = self.b
        xq = self.activation(x, layer)
        w = self.weight(layer, unit_scale=layer.threshold)
        if layer.kind == "conv":
            c = layer.conv or {}
            (ph, pw), k = c["padding"], layer.codes.shape[2:]
            acc = b.op("Conv", [xq, w], strides=list(c["stride"]), pads=[ph, pw, ph, pw],
                       dilations=list(c["dilation"]), group=int(c["groups"]), kernel_shape=list(k))  # fmt: skip
            shape = [-1, 1, 1]
        else:
            acc = b.op("MatMul", [xq, w])
            shape = [-1]
        if layer.threshold:
            assert layer.thr_sign is not None and layer.thr is not None
            signed = b.op("Mul", [acc, b.const("thr_sign", layer.thr_sign.numpy().reshape(shape))])
            margin = b.op("Sub", [signed, b.const("thr", layer.thr.numpy().reshape(shape))])
            b.op("Identity", [self.sign(margin)], out=y)
        else:
            b.op("Add", [acc, b.const("bias", layer.bias.numpy().reshape(shape))], out=y)


def _channel_shape(layer: QuantLayer) -> list[int]:
    """How a per-output-channel vector broadcasts over the weight ONNX multiplies by."""
    return [1, -1] if layer.kind == "linear" else [-1, 1, 1, 1]


def _onnx_weight(layer: QuantLayer, w: np.ndarray) -> np.ndarray:
    """A weight in ONNX's layout: dense ``(K, N)`` for ``MatMul``, conv as torch's."""
    return w.T.copy() if layer.kind == "linear" else w


class QDQ(Emitter):
    """``QuantizeLinear``/``DequantizeLinear`` with int8 codes; what onnxruntime runs."""

    def sign(self, x: str) -> str:
        b = self.b
        ge = b.op("GreaterOrEqual", [x, b.const("zero", 0.0)])
        return b.op("Where", [ge, b.const("one", 1.0), b.const("minus_one", -1.0)])

    def int8_rows(self, x2d: str, scale: str) -> str:
        b = self.b
        zero = helper.make_tensor("zero", TensorProto.INT8, [1], [0])
        zp = b.op("ConstantOfShape", [b.op("Shape", [scale])], value=zero)
        q = b.op("QuantizeLinear", [x2d, scale, zp], axis=0)
        return b.op("DequantizeLinear", [q, scale, zp], axis=0)

    def weight(self, layer: QuantLayer, unit_scale: bool) -> str:
        b = self.b
        codes = layer.codes.numpy()
        dtype = np.uint8 if layer.bits == 8 else np.int8
        q = b.const("codes", _onnx_weight(layer, codes), dtype)
        scale = np.ones(codes.shape[0], np.float32) if unit_scale else layer.scale.numpy()
        zp = b.const("zero_point", np.zeros(codes.shape[0]), dtype)
        axis = 1 if layer.kind == "linear" else 0
        w = b.op("DequantizeLinear", [q, b.const("scale", scale), zp], axis=axis)
        if unit_scale or not bool((layer.offset != 0).any()):
            return w
        return b.op("Add", [w, b.const("offset", layer.offset.numpy().reshape(_channel_shape(layer)))])


class QONNX(Emitter):
    """``Quant`` (k-bit, float zero point) and ``BipolarQuant`` (±1) nodes, domain ``qonnx.custom_op.general``."""

    def sign(self, x: str) -> str:
        return self.b.op("BipolarQuant", [x, self.b.const("one", 1.0)], domain=QONNX_DOMAIN)

    def quant(self, x: str, scale: str, zero_point: str, bits: int, signed: bool, narrow: bool) -> str:
        b = self.b
        inputs = [x, scale, zero_point, b.const("bitwidth", float(bits))]
        return b.op("Quant", inputs, domain=QONNX_DOMAIN, signed=int(signed), narrow=int(narrow),
                    rounding_mode="ROUND")  # fmt: skip

    def int8_rows(self, x2d: str, scale: str) -> str:
        b = self.b
        s = b.op("Unsqueeze", [scale, b.const("axis", [1], np.int64)])
        return self.quant(x2d, s, b.const("zero", 0.0), 8, signed=True, narrow=True)

    def weight(self, layer: QuantLayer, unit_scale: bool) -> str:
        b = self.b
        codes, shape = layer.codes.double().numpy(), _channel_shape(layer)
        n, bshape = codes.shape[0], (-1,) + (1,) * (codes.ndim - 1)
        raw = np.ones(n) if unit_scale else layer.scale.double().numpy()
        offset = np.zeros(n) if unit_scale else layer.offset.double().numpy()
        if layer.code == "pm1":
            w = b.const("codes", _onnx_weight(layer, codes))
            w = b.op("BipolarQuant", [w, b.const("scale", raw.reshape(shape))], domain=QONNX_DOMAIN)
            return b.op("Add", [w, b.const("offset", offset.reshape(shape))]) if offset.any() else w
        # W = scale·Q + offset is Quant's (q − zp)·scale with zp = −offset/scale; a channel of
        # scale 0 is its offset: scale 1, code 0, zero point −offset
        scale = np.where(raw == 0, 1.0, raw)
        codes = np.where((raw == 0).reshape(bshape), 0.0, codes)
        zp = -offset / scale
        w = b.const("weight", _onnx_weight(layer, (codes - zp.reshape(bshape)) * scale.reshape(bshape)))
        zero_point = b.const("zero_point", zp.reshape(shape))
        return self.quant(w, b.const("scale", scale.reshape(shape)), zero_point, layer.bits, False, False)


FORMATS: dict[str, type[Emitter]] = {"qdq": QDQ, "qonnx": QONNX}
