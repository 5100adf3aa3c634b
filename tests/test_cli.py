import pytest

from bitcompiler.cli import main
from tests.conftest import write_factory_module


def test_compile_and_inspect_from_the_command_line(tmp_path, monkeypatch, capsys):
    write_factory_module(tmp_path, monkeypatch, "netdef")
    out = tmp_path / "out"
    assert (
        main(
            ["compile", "netdef:make", "--shape", "1,12", "--scheme", "binary:act=binary", "--out", str(out)]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "binary:act=binary" in text and "exported to" in text
    assert (out / "meta.json").exists()
    assert main(["inspect", str(out)]) == 0
    assert "CompiledModel(target=cpu" in capsys.readouterr().out


def test_bad_model_spec_is_a_clear_error():
    with pytest.raises(SystemExit, match="expected MODULE:ATTR"):
        main(["compile", "netdef", "--shape", "1,12"])
