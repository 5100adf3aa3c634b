"""Schemes: which quantizer goes on which layer.

A scheme is written ``name:key=value,...`` (``"binary:act=binary"``,
``"uniform:bits=2,first_last=quantize"``) or built as ``Scheme(...)``::

    >>> from bitcompiler import Scheme
    >>> Scheme.parse("uniform:bits=2,act=8")
    Scheme('uniform:bits=2,act=8')
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

# name -> (keys of its own, defaults)
_SCHEMES: dict[str, dict[str, str]] = {
    "none": {},
    "binary": {},
    "uniform": {"bits": "4"},
}
_COMMON = {"act": "float", "first_last": "keep"}
_ACT = {"float": "float", "8": "int8", "int8": "int8", "binary": "binary"}
_FIRST_LAST = ("keep", "quantize")


def _valid() -> str:
    names = ", ".join(_SCHEMES)
    keys = "; ".join(f"{n}: {', '.join([*_SCHEMES[n], *_COMMON]) or '-'}" for n in _SCHEMES)
    return f"valid names: {names}. Keys per name: {keys} (act=float|8|binary, first_last=keep|quantize)"


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
            raise ValueError(f"unknown scheme {self.name!r}; {_valid()}")
        allowed = {**_SCHEMES[self.name], **_COMMON}
        for key, value in self.options:
            if key not in allowed:
                raise ValueError(f"scheme {self.name!r} has no key {key!r}; {_valid()}")
            self._check(key, value)

    @staticmethod
    def _check(key: str, value: str) -> None:
        if key == "act" and value not in _ACT:
            raise ValueError(f"act={value!r} is not valid; use act=float, act=8 or act=binary")
        if key == "first_last" and value not in _FIRST_LAST:
            raise ValueError(f"first_last={value!r} is not valid; use first_last=keep or first_last=quantize")
        if key == "bits" and (not value.isdigit() or not 1 <= int(value) <= 8):
            raise ValueError(f"bits={value!r} is not valid; use an integer 1..8")

    @classmethod
    def parse(cls, text: str | Scheme) -> Scheme:
        """Parse ``name:key=value,...``; a ``Scheme`` passes through."""
        if isinstance(text, Scheme):
            return text
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"a scheme is a string like 'binary:act=binary'; got {text!r}; {_valid()}")
        name, _, rest = text.strip().partition(":")
        options = []
        for item in filter(None, (p.strip() for p in rest.split(","))):
            key, eq, value = item.partition("=")
            if not eq:
                raise ValueError(f"malformed scheme option {item!r} in {text!r}: write key=value; {_valid()}")
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
        return 1 if self.name == "binary" else int(self.get("bits") or 32)

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
