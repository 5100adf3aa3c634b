"""Larq Compute Engine side of ``bench/lce.py``: runs in the peers environment (``make peers``).

It imports no bitcompiler and no torch: only TensorFlow, Larq and LCE. Started as
``.peers/lce/bin/python bench/lce_worker.py``, it builds the benchmark's architectures in Larq,
converts each with ``convert_keras_model``, checks that the binary layers became ``LceBconv2d``
and ``LceQuantize`` ops, and then answers one request per stdin line:

* ``ops NAME`` -> the flatbuffer's operator names, comma-separated;
* ``time NAME PATH THREADS SECONDS`` -> the median ms of one ``Interpreter.predict`` call
  (``PATH`` = ``default`` or ``indirect``: ``use_indirect_bgemm=True``), timed for about SECONDS.

Every answer is one line on stdout, ``ok ...`` or ``error ...``.

The models (random weights; how they correspond to the torch models is in
``bench/lce.py``'s docstring):

* ``resnet18``: binary ResNet-18 for 32x32 inputs, full-precision 3x3 stem and classifier;
* ``bconv``: one binary 3x3 256->256 conv on 14x14;
* ``dense``: the 4096x4096 binary dense written as a 1x1 binary conv on a 1x1 map (LCE 0.16
  leaves a binary ``QuantDense`` a float ``FullyConnected``).
"""

from __future__ import annotations

import os
import statistics
import sys
import time

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # Larq 0.14 builds tf_keras (Keras 2) models
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import larq as lq
import larq_compute_engine as lce
import numpy as np
import tf_keras as keras
from larq_compute_engine.tflite.python.interpreter import Interpreter

BINARY = {
    "input_quantizer": "ste_sign",
    "kernel_quantizer": "ste_sign",
    "kernel_constraint": "weight_clip",
    "use_bias": False,
}


PAD = 1.0  # LCE's fast padding; with torch's zeros (0.0) ResNet-18 took 23-27 ms instead of 15 ms here


def bconv(x, filters: int, kernel: int, stride: int = 1):
    """A binary conv: sign of the input, sign of the weights, padded with ``PAD`` (+1)."""
    return lq.layers.QuantConv2D(filters, kernel, strides=stride, padding="same", pad_values=PAD, **BINARY)(x)


def hardtanh(x):
    return keras.layers.Activation(lambda t: keras.backend.clip(t, -1.0, 1.0))(x)


def bn(x):
    return keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5)(x)


def resnet18() -> keras.Model:
    """``bench.zoo.ResNet18`` in Larq: each block is ``hardtanh(bn2(bconv2(hardtanh(bn1(bconv1(x))))) +
    shortcut)``, the shortcut a binary 1x1 conv + BN where the shape changes."""
    inp = keras.Input((32, 32, 3))
    x = keras.layers.Conv2D(64, 3, padding="same", use_bias=False)(inp)  # full-precision stem
    x = hardtanh(bn(x))
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        for s in (stride, 1):
            y = hardtanh(bn(bconv(x, cout, 3, s)))
            y = bn(bconv(y, cout, 3))
            short = x if s == 1 and cin == cout else bn(bconv(x, cout, 1, s))
            x = hardtanh(keras.layers.Add()([y, short]))
            cin = cout
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inp, keras.layers.Dense(10)(x))  # full-precision classifier


def single_bconv() -> keras.Model:
    inp = keras.Input((14, 14, 256))
    return keras.Model(inp, bconv(inp, 256, 3))


def dense_as_bconv() -> keras.Model:
    inp = keras.Input((1, 1, 4096))
    return keras.Model(inp, bconv(inp, 4096, 1))


MODELS = {"resnet18": resnet18, "bconv": single_bconv, "dense": dense_as_bconv}


def randomize(model: keras.Model, seed: int = 0) -> None:
    """Random weights and BatchNorm statistics (so the converter cannot fold anything away)."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        ws = layer.get_weights()
        if ws:
            layer.set_weights([rng.standard_normal(w.shape).astype(w.dtype) * 0.1 + (1.0 if "variance" in v.name else 0.0)
                               for w, v in zip(ws, layer.weights, strict=True)])  # fmt: skip


def op_names(flatbuffer: bytes) -> list[str]:
    from tensorflow.lite.python import schema_py_generated as schema

    model = schema.Model.GetRootAsModel(flatbuffer, 0)
    names = []
    for i in range(model.OperatorCodesLength()):
        code = model.OperatorCodes(i)
        if code.CustomCode():
            names.append(code.CustomCode().decode())
        else:
            builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
            names.append(next(k for k, v in vars(schema.BuiltinOperator).items() if v == builtin))
    return names


def convert(name: str) -> bytes:
    model = MODELS[name]()
    randomize(model)
    flatbuffer = lce.convert_keras_model(model)
    ops = op_names(flatbuffer)
    if "LceBconv2d" not in ops or "LceQuantize" not in ops:
        raise RuntimeError(f"{name}: the converter left no LceBconv2d/LceQuantize ops: {ops}")
    return flatbuffer


def median_ms(interpreter: Interpreter, x: np.ndarray, seconds: float) -> float:
    interpreter.predict(x)
    times = []
    start = time.perf_counter()
    while len(times) < 3 or time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        interpreter.predict(x)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def main() -> None:
    flatbuffers = {name: convert(name) for name in sys.argv[1:] or MODELS}
    interpreters: dict[tuple, tuple[Interpreter, np.ndarray]] = {}
    print("ok ready", flush=True)
    for line in sys.stdin:
        words = line.split()
        try:
            if words[0] == "ops":
                answer = ",".join(op_names(flatbuffers[words[1]]))
            elif words[0] == "time":
                name, path, threads, seconds = words[1], words[2], int(words[3]), float(words[4])
                key = (name, path, threads)
                if key not in interpreters:
                    it = Interpreter(
                        flatbuffers[name], num_threads=threads, use_indirect_bgemm=path == "indirect"
                    )
                    shape = [int(d) for d in it.input_shapes[0]]
                    interpreters[key] = (
                        it,
                        np.random.default_rng(1).standard_normal(shape).astype(np.float32),
                    )
                answer = f"{median_ms(*interpreters[key], seconds):.6f}"
            else:
                raise ValueError(f"unknown request {words[0]!r}")
            print(f"ok {answer}", flush=True)
        except Exception as e:  # noqa: BLE001 - the request fails, the worker keeps serving
            print(f"error {type(e).__name__}: {e}".replace("\n", " "), flush=True)


if __name__ == "__main__":
    main()
