import pytest

from bitcompiler import Scheme


def test_parse_and_str_round_trip():
    s = Scheme.parse("uniform:bits=2,act=8,first_last=quantize")
    assert (s.name, s.bits, s.act, s.keep_first_last) == ("uniform", 2, "int8", False)
    assert Scheme.parse(str(s)) == s
    assert Scheme.parse("binary").act == "float" and Scheme.parse("binary").keep_first_last


def test_object_and_string_are_equivalent():
    assert Scheme("binary", (("act", "binary"),)) == Scheme.parse("binary:act=binary")
    assert Scheme.parse(Scheme("none")) == Scheme("none")


@pytest.mark.parametrize(
    "text, needle",
    [
        ("ternary", "unknown scheme 'ternary'"),
        ("binary:bits=2", "no key 'bits'"),
        ("uniform:bits=9", "integer 1..8"),
        ("binary:act=4", "act=float, act=8 or act=binary"),
        ("binary:act", "key=value"),
        ("", "valid names"),
    ],
)
def test_malformed_scheme_lists_valid_names_and_keys(text, needle):
    with pytest.raises(ValueError) as e:
        Scheme.parse(text)
    assert needle in str(e.value)
    if "valid names" in str(e.value):
        assert "none, binary, uniform" in str(e.value)
