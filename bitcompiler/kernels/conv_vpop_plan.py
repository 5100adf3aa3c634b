"""Planning the flat-im2col W1A1 conv of :mod:`bitcompiler.kernels.conv_vpop`: which convs it
fits, the border classes of their output pixels, how its tasks may split the work (the tuning
template's choices) and when it can also compute a ResNet block's projection shortcut.

Everything here is plain Python over a :class:`~bitcompiler.kernels.spec.ConvSpec`; the kernel
itself (TVMScript) is in :mod:`bitcompiler.kernels.conv_vpop`.

>>> from bitcompiler.kernels.spec import ConvSpec
>>> spec = ConvSpec(256, 256, 14, 14, (3, 3), (1, 1), (1, 1), (1, 1), 1, 1, "pm1", "binary", False, True)
>>> fits(spec), len(classes(spec)[0]), default_split(spec)
(True, 9, 'pixels')
"""

from __future__ import annotations

from bitcompiler.kernels._common import PARALLEL_MIN
from bitcompiler.kernels.spec import ConvSpec

VL = 8  # pixels per vector: int64 lanes of a 512-bit vector
OB = 8  # output channels per register block
NCLS = 16  # border classes a vpermi2q table holds
PIXEL_SPLIT_MIN = 16  # pixel vectors a map needs for its tasks to split it by pixels
CHUNKS = 16  # about how many chunks of pixel vectors a batch row is cut into then


def patterns(n_out: int, stride: int, pad: int, dil: int, k: int, n_in: int) -> tuple[list, list[int]]:
    """The distinct sets of valid kernel offsets along one axis, the most frequent first, and each
    output position's index into them."""
    sets = [tuple(a for a in range(k) if 0 <= i * stride - pad + a * dil < n_in) for i in range(n_out)]
    distinct = sorted(set(sets), key=lambda p: (-sets.count(p), p))
    return distinct, [distinct.index(p) for p in sets]


def classes(spec: ConvSpec) -> tuple[list, list[int], list[int], int]:
    """Border classes of the output pixels: ``(valid taps per class, row index, column index,
    columns)``; pixel ``(oh, ow)`` has class ``rows[oh] * columns + cols[ow]``."""
    (KH, KW), (SH, SW), (PH, PW), (DH, DW) = spec.kernel, spec.stride, spec.padding, spec.dilation
    rp, rows = patterns(spec.out_h, SH, PH, DH, KH, spec.in_h)
    cp, cols = patterns(spec.out_w, SW, PW, DW, KW, spec.in_w)
    valid = [[a * KW + b for a in r for b in c] for r in rp for c in cp]
    return valid, rows, cols, len(cp)


def pixel_vectors(spec: ConvSpec) -> int:
    """Vectors of ``VL`` output pixels that cover a batch row's map (the last may overlap)."""
    return -(-spec.out_h * spec.out_w // VL)


def fits(spec: ConvSpec) -> bool:
    """Binary pm1 weights and activations, groups 1, whole 64-bit words per tap, at least one
    vector of output pixels, whole blocks of 8 output channels and at most 16 border classes."""
    return (
        spec.act == "binary"
        and spec.code == "pm1"
        and spec.groups == 1
        and spec.words_per_group % 2 == 0
        and spec.out_h * spec.out_w >= VL
        and spec.out_channels % OB == 0
        and len(classes(spec)[0]) <= NCLS
    )


SPLITS = ("serial", "channels", "pixels")  # the template's ``split`` knob: an index into these
CHUNK_CHOICES = (4, 8, 16, 32, 64)  # its ``chunks`` knob (pixel split only)


def default_split(spec: ConvSpec) -> str:
    """The hand schedule's split: serial below ``PARALLEL_MIN`` 64-bit word popcounts a sample,
    else pixels on maps of at least ``PIXEL_SPLIT_MIN`` pixel vectors, else channels."""
    work = (
        spec.out_channels
        * spec.out_h
        * spec.out_w
        * spec.kernel[0]
        * spec.kernel[1]
        * spec.words_per_group
        // 2
    )
    return (
        "serial"
        if work < PARALLEL_MIN
        else "pixels"
        if pixel_vectors(spec) >= PIXEL_SPLIT_MIN
        else "channels"
    )


def centre_tap(spec: ConvSpec) -> int | None:
    """The tap of ``spec``'s kernel that reads input pixel ``(oh * SH, ow * SW)`` for output pixel
    ``(oh, ow)``: a 1x1 conv's input with the same stride and no padding, or None."""
    (KH, KW), (PH, PW), (DH, DW) = spec.kernel, spec.padding, spec.dilation
    if PH % DH or PW % DW or PH // DH >= KH or PW // DW >= KW:
        return None
    return PH // DH * KW + PW // DW


def fuses_shortcut(spec: ConvSpec, shortcut: ConvSpec) -> bool:
    """Whether the packed-output kernel of ``spec`` (:func:`fits`, a threshold conv: a ResNet
    block's first conv) can also compute ``shortcut``, a 1x1 binary affine conv of the same input
    with the same stride, no padding and the same output map and channels (the block's projection
    shortcut): its input is ``spec``'s centre tap, already in the im2col. The shortcut's output is
    then written by the task that computes those pixels (or channels) of ``spec``, as the block's
    second conv reads it."""
    same = ("in_channels", "in_h", "in_w", "stride", "out_channels", "groups", "act", "code", "bits")
    return (
        fits(spec)
        and spec.threshold
        and centre_tap(spec) is not None
        and all(getattr(spec, f) == getattr(shortcut, f) for f in same)
        and shortcut.kernel == (1, 1)
        and shortcut.padding == (0, 0)
        and not shortcut.threshold
        and not shortcut.has_offset
        and (shortcut.out_h, shortcut.out_w) == (spec.out_h, spec.out_w)
    )
