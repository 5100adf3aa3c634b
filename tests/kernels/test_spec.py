import pytest

from bitcompiler.kernels import ConvSpec, DenseSpec


def test_dense_derived_sizes():
    s = DenseSpec(100, 7, 2, "uint", "int8", True, False)
    assert (s.words, s.kw, s.full_words, s.tail_bits) == (4, 4, 3, 4)


def test_conv_derived_sizes():
    s = ConvSpec(40, 6, 9, 8, (3, 2), (2, 1), (1, 0), (1, 2), 2, 1, "pm1", "binary", False, False)
    assert (s.cg, s.og, s.words_per_group, s.kw_words) == (20, 3, 1, 6)
    assert (s.out_h, s.out_w) == (5, 6)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"code": "pm1", "bits": 2}, "one bit-plane"),
        ({"code": "ternary"}, "unknown code"),
        ({"act": "int4"}, "unknown activation"),
        ({"code": "pm1", "has_offset": True}, "offset"),
        ({"act": "float", "threshold": True}, "threshold"),
        ({"bits": 9, "code": "uint"}, "bits"),
        ({"in_features": 0}, "in_features"),
    ],
)
def test_dense_validation(kwargs, match):
    base = {
        "in_features": 8,
        "out_features": 4,
        "bits": 1,
        "code": "pm1",
        "act": "binary",
        "has_offset": False,
        "threshold": False,
    }
    base.update(kwargs)
    with pytest.raises(ValueError, match=match):
        DenseSpec(**base)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"groups": 3}, "groups"),
        ({"kernel": (3,)}, "kernel"),
        ({"stride": (0, 1)}, "stride"),
        ({"padding": (-1, 0)}, "padding"),
        ({"in_h": 1, "kernel": (3, 3)}, "empty output"),
    ],
)
def test_conv_validation(kwargs, match):
    base = {
        "in_channels": 4,
        "out_channels": 4,
        "in_h": 5,
        "in_w": 5,
        "kernel": (3, 3),
        "stride": (1, 1),
        "padding": (0, 0),
        "dilation": (1, 1),
        "groups": 1,
        "bits": 1,
        "code": "pm1",
        "act": "binary",
        "has_offset": False,
        "threshold": False,
    }
    base.update(kwargs)
    with pytest.raises(ValueError, match=match):
        ConvSpec(**base)


def test_specs_are_frozen_and_hashable():
    s = DenseSpec(8, 4, 1, "pm1", "binary", False, False)
    with pytest.raises(AttributeError):
        s.bits = 2  # type: ignore[misc]
    assert hash(s) == hash(DenseSpec(8, 4, 1, "pm1", "binary", False, False))
