"""Byte dot-product tensor intrinsics of the int8 convolution (:mod:`~bitcompiler.kernels.conv_int8`).

Each multiplies four signed activation bytes (``A``, int8) by four unsigned code bytes (``B``,
uint8) per int32 lane and adds the four products into the lane's sum ``C``. Two lane layouts:

* ``"channels"``: one activation word (four input channels of a pixel) broadcast to every lane,
  times ``n`` output channels' codes: ``C[i] += sum_k A[k] * B[i, k]``;
* ``"pixels"``: ``n`` neighbouring pixels' words times one output channel's four codes broadcast:
  ``C[i] += sum_k A[i, k] * B[k]``.

Implementations: ``vpdpbusd`` (AVX-512 VNNI, 256- or 512-bit; its unsigned operand is the codes,
which takes no embedded broadcast, so the pixel lanes pay a ``vpbroadcastd``), or on AVX2 without
VNNI ``vpmaddubsw`` (u8 x s8 pairs summed in int16, exact for codes below 2^7) then ``vpmaddwd``
by ones (channel lanes only).
"""

from __future__ import annotations

import functools

from tvm import s_tir, tirx
from tvm.script import tirx as T

LANES = 8  # int32 sums per 256-bit register
PIXELS = 16  # pixels (int32 lanes) of one 512-bit vpdpbusd in the pixel-lanes kernel

DOT_AVX2 = "bitc_dot_8x4_u8s8_avx2"
DOT_VNNI = "bitc_dot_8x4_u8s8_vnni"
DOT_VNNI512 = "bitc_dot_16x4_u8s8_vnni512"
DOT_PIXELS = "bitc_dot_16px_s8u8_vnni512"


def _dot(kind: str, n: int = LANES, lanes: str = "channels") -> tirx.PrimFunc:
    """The ``n``-lane dot product with ``lanes`` (``"channels"`` or ``"pixels"``, see the module):
    its description (``kind="desc"``) or its ``"avx2"`` (8 channel lanes) / ``"vnni"`` implementation."""
    pixels = lanes == "pixels"
    a_shape, b_shape = ((n, 4), (4,)) if pixels else ((4,), (n, 4))
    word = f"int8x{4 * n}"  # one operand's n words

    @T.prim_func(s_tir=True)
    def dot(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, a_shape, "int8", offset_factor=1)
        B = T.match_buffer(b, b_shape, "uint8", offset_factor=1)
        C = T.match_buffer(c, (n,), "int32", offset_factor=1)  # global: see conv_int8._schedule
        with T.sblock("root"):
            T.reads(C[0:n], A[0:n, 0:4] if pixels else A[0:4], B[0:4] if pixels else B[0:n, 0:4])
            T.writes(C[0:n])
            # (no named values below: a name bound here is a buffer, a heap workspace inside a
            # parallel loop)
            if kind == "desc":
                for i in T.serial(0, n):
                    for k in T.serial(0, 4):
                        with T.sblock("update"):
                            vi, vk = T.axis.remap("SR", [i, k])
                            if pixels:
                                C[vi] = C[vi] + T.cast(A[vi, vk], "int32") * T.cast(B[vk], "int32")
                            else:
                                C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")
            elif kind == "avx2":  # u8 x s8 pairs summed in int16, then pairs of those in int32
                C[T.ramp(T.int32(0), 1, 8)] += T.call_llvm_pure_intrin(
                    T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"),
                    T.call_llvm_pure_intrin(
                        T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.ub.sw"),
                        B.vload([0, 0], dtype="uint8x32"),
                        T.reinterpret(
                            T.broadcast(T.reinterpret(A.vload([0], "int8x4"), dtype="int32"), 8),
                            dtype="int8x32",
                        ),
                        dtype="int16x16",
                    ),
                    T.int16x16(1),
                    dtype="int32x8",
                )
            elif pixels:  # the channel's four codes broadcast to the n pixels' lanes
                C[T.ramp(T.int32(0), 1, n)] = T.call_llvm_pure_intrin(
                    T.llvm_lookup_intrinsic_id(f"llvm.x86.avx512.vpdpbusd.{32 * n}"),
                    C.vload([0], dtype=f"int32x{n}"),
                    T.reinterpret(
                        T.broadcast(T.reinterpret(B.vload([0], "uint8x4"), dtype="int32"), n),
                        dtype=f"u{word}",
                    ),
                    A.vload([0, 0], dtype=word),
                    dtype=f"int32x{n}",
                )
            else:  # the pixel's word broadcast to the n channels' lanes
                C[T.ramp(T.int32(0), 1, n)] = T.call_llvm_pure_intrin(
                    T.llvm_lookup_intrinsic_id(f"llvm.x86.avx512.vpdpbusd.{32 * n}"),
                    C.vload([0], dtype=f"int32x{n}"),
                    B.vload([0, 0], dtype=f"u{word}"),
                    T.reinterpret(
                        T.broadcast(T.reinterpret(A.vload([0], "int8x4"), dtype="int32"), n), dtype=word
                    ),
                    dtype=f"int32x{n}",
                )

    return dot


@functools.cache
def register() -> None:
    """Register the four intrinsics with TVM (once a process)."""
    s_tir.TensorIntrin.register(DOT_AVX2, _dot("desc"), _dot("avx2"))
    s_tir.TensorIntrin.register(DOT_VNNI, _dot("desc"), _dot("vnni"))
    s_tir.TensorIntrin.register(DOT_VNNI512, _dot("desc", 16), _dot("vnni", 16))
    s_tir.TensorIntrin.register(DOT_PIXELS, _dot("desc", PIXELS, "pixels"), _dot("vnni", PIXELS, "pixels"))
