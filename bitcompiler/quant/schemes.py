"""Schemes: which quantizer goes on which layer.

A scheme is written ``name:key=value,...`` (``"binary:act=binary"``,
``"uniform:bits=2,first_last=quantize"``) or built as ``Scheme(...)``::

    >>> from bitcompiler import Scheme
    >>> Scheme.parse("uniform:bits=2,act=8")
    Scheme('uniform:bits=2,act=8')
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from bitcompiler.errors import SchemeError

# name -> (keys of its own, defaults)
_SCHEMES: dict[str, dict[str, str]] = {
    "none": {},
    "binary": {},
    "uniform": {"bits": "4"},
    # docs/methods.md §3: group weight transform; τ stays at tau_start for the first tau_hold fraction of
    # tau_steps optimizer steps, then grows geometrically to tau_end (an early rise saturates tanh)
    "gwt": {"group": "channel", "tau_start": "1", "tau_end": "100", "tau_steps": "1000", "tau_hold": "0.5"},
    # docs/methods.md §4: one tile per layer of >= min_weights weights, α per chunk
    "tiled": {"p": "4", "min_weights": "65536", "alpha": "chunk"},
    # docs/methods.md §1: per-layer bit depth B learned by a sign step; eps is sign_ε's dead zone (ours)
    "bitnet": {
        "init_bits": "8",
        "min_bits": "2",
        "max_bits": "8",
        "lambda1": "1e-3",
        "lambda2": "1e-6",
        "mu": "1e-3",
        "mu_halve_every": "200",
        "eps": "1e-9",
        "mode": "quantized",
    },
    # docs/methods.md §2: n magnitude bits + sign per weight, each bit a parameter; train picks which learn
    "bitwise": {"bits": "6", "train": "all"},
}
_COMMON = {"act": "float", "first_last": "keep"}
_ACT = {"float": "float", "8": "int8", "int8": "int8", "binary": "binary"}
_FIRST_LAST = ("keep", "quantize")


def _valid() -> str:
    names = ", ".join(_SCHEMES)
    keys = "; ".join(f"{n}: {', '.join([*_SCHEMES[n], *_COMMON]) or '-'}" for n in _SCHEMES)
    return f"valid names: {names}. Keys per name: {keys} (act=float|8|binary, first_last=keep|quantize)"


def bitwise_trained(spec: str, n: int) -> tuple[frozenset[int], bool]:
    """Which bits a ``bitwise`` layer trains: ``(magnitude bit indices, sign)``; the rest are frozen.

    ``all``; ``sign``; ``topK`` = sign + the K most significant of the n magnitude bits; or a
    ``.``-separated list of bit indices (0 = least significant) and ``sign``, e.g. ``5.4.sign``.

        >>> bitwise_trained("top2", 6)
        (frozenset({4, 5}), True)
    """
    usage = f"use train=all, train=sign, train=top1..top{n} or a list like {n - 1}.{max(n - 2, 0)}.sign"
    if spec == "all":
        return frozenset(range(n)), True
    if spec == "sign":
        return frozenset(), True
    if spec.startswith("top"):
        k = spec[3:]
        if not k.isdigit() or not 1 <= int(k) <= n:
            raise SchemeError(f"train={spec!r} is not valid for bits={n}; {usage}")
        return frozenset(range(n - int(k), n)), True
    parts = spec.split(".")
    if not all(p == "sign" or (p.isdigit() and int(p) < n) for p in parts):
        raise SchemeError(f"train={spec!r} is not valid for bits={n}; {usage}")
    return frozenset(int(p) for p in parts if p != "sign"), "sign" in parts


@dataclass(frozen=True)
class Scheme:
    """A weight/activation quantization scheme.

    ``act`` is the activation precision entering quantized layers ("float",
    "8" or "binary"); ``first_last="keep"`` keeps the first and last layer at
    8-bit weights (and int8 activations unless ``act=float``).
    """

    name: str = "binary"
    options: tuple[tuple[str, str], ...] = field(default=())

    def __post_init__(self) -> None:
        if self.name not in _SCHEMES:
            raise SchemeError(f"unknown scheme {self.name!r}; {_valid()}")
        allowed = {**_SCHEMES[self.name], **_COMMON}
        keys = [key for key, _ in self.options]
        repeated = sorted({k for k in keys if keys.count(k) > 1})
        if repeated:
            values = "; ".join(f"{k}={', '.join(v for kk, v in self.options if kk == k)}" for k in repeated)
            raise SchemeError(f"scheme {self.name!r} gives {values}: give each key once")
        for key, value in self.options:
            if key not in allowed:
                raise SchemeError(f"scheme {self.name!r} has no key {key!r}; {_valid()}")
            self._check(key, value)
        if self.name == "bitnet":
            lo, init, hi = (int(self.get(k)) for k in ("min_bits", "init_bits", "max_bits"))
            if not lo <= init <= hi:
                raise SchemeError(f"bitnet needs min_bits <= init_bits <= max_bits, got {lo}, {init}, {hi}")
        if self.name == "bitwise":
            if int(self.get("bits")) > 7:
                raise SchemeError(
                    f"bitwise bits={self.get('bits')} is not valid; use 1..7 (n magnitude bits + sign "
                    "compile to n + 1 <= 8 bit-planes)"
                )
            bitwise_trained(self.get("train"), int(self.get("bits")))

    @staticmethod
    def _check(key: str, value: str) -> None:
        if key == "act" and value not in _ACT:
            raise SchemeError(f"act={value!r} is not valid; use act=float, act=8 or act=binary")
        if key == "first_last" and value not in _FIRST_LAST:
            raise SchemeError(
                f"first_last={value!r} is not valid; use first_last=keep or first_last=quantize"
            )
        if key in ("p", "min_weights", "tau_steps") and (not value.isdigit() or int(value) < 1):
            raise SchemeError(f"{key}={value!r} is not valid; use a positive integer")
        if key == "group" and value != "channel" and (not value.isdigit() or int(value) < 1):
            raise SchemeError(f"group={value!r} is not valid; use group=channel or a positive group size")
        if key == "alpha" and value not in ("chunk", "learned"):
            raise SchemeError(f"alpha={value!r} is not valid; use alpha=chunk or alpha=learned")
        if key in ("tau_start", "tau_end"):
            try:
                ok = float(value) > 0
            except ValueError:
                ok = False
            if not ok:
                raise SchemeError(f"{key}={value!r} is not valid; use a positive number")
        if key == "tau_hold":
            try:
                ok = 0 <= float(value) < 1
            except ValueError:
                ok = False
            if not ok:
                raise SchemeError(f"tau_hold={value!r} is not valid; use a fraction 0 <= tau_hold < 1")
        if key in ("init_bits", "min_bits", "max_bits") and (not value.isdigit() or not 1 <= int(value) <= 8):
            raise SchemeError(f"{key}={value!r} is not valid; use an integer 1..8")
        if key == "mu_halve_every" and (not value.isdigit() or int(value) < 1):
            raise SchemeError(f"{key}={value!r} is not valid; use a positive integer")
        if key in ("lambda1", "lambda2", "mu", "eps"):
            try:
                ok = float(value) >= 0
            except ValueError:
                ok = False
            if not ok:
                raise SchemeError(f"{key}={value!r} is not valid; use a number >= 0")
        if key == "mode" and value not in ("quantized", "float"):
            raise SchemeError(f"mode={value!r} is not valid; use mode=quantized or mode=float")
        if key == "bits" and (not value.isdigit() or not 1 <= int(value) <= 8):
            raise SchemeError(f"bits={value!r} is not valid; use an integer 1..8")

    @classmethod
    def parse(cls, text: str | Scheme) -> Scheme:
        """Parse ``name:key=value,...``; a ``Scheme`` passes through."""
        if isinstance(text, Scheme):
            return text
        if not isinstance(text, str) or not text.strip():
            raise SchemeError(f"a scheme is a string like 'binary:act=binary'; got {text!r}; {_valid()}")
        name, _, rest = text.strip().partition(":")
        options = []
        for item in filter(None, (p.strip() for p in rest.split(","))):
            key, eq, value = item.partition("=")
            if not eq:
                raise SchemeError(
                    f"malformed scheme option {item!r} in {text!r}: write key=value; {_valid()}"
                )
            options.append((key.strip(), value.strip()))
        return cls(name.strip(), tuple(options))

    def get(self, key: str) -> str:
        return dict(self.options).get(key, {**_SCHEMES[self.name], **_COMMON}.get(key, ""))

    @property
    def act(self) -> str:
        """Activation mode as numerics names it: float, int8 or binary."""
        return _ACT[self.get("act")]

    @property
    def bits(self) -> int:
        if self.name == "bitnet":
            return int(self.get("init_bits"))  # where B starts; each layer then learns its own
        if self.name == "bitwise":
            return int(self.get("bits")) + 1  # magnitude planes + sign
        return 1 if self.name in ("binary", "gwt", "tiled") else int(self.get("bits") or 32)

    @property
    def keep_first_last(self) -> bool:
        return self.get("first_last") == "keep"

    @property
    def quantizes(self) -> bool:
        return self.name != "none"

    def with_options(self, **options: str) -> Scheme:
        merged = dict(self.options)
        merged.update({k: str(v) for k, v in options.items()})
        return replace(self, options=tuple(merged.items()))

    def __str__(self) -> str:
        if not self.options:
            return self.name
        return self.name + ":" + ",".join(f"{k}={v}" for k, v in self.options)

    def __repr__(self) -> str:
        return f"Scheme({str(self)!r})"
