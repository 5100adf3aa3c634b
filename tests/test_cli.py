import sys

import pytest

from bitcompiler.cli import main


def test_compile_and_inspect_from_the_command_line(tmp_path, monkeypatch, capsys):
    (tmp_path / "netdef.py").write_text(
        "import torch\n"
        "def make():\n"
        "    return torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.ReLU(), torch.nn.Linear(16, 16),\n"
        "                               torch.nn.ReLU(), torch.nn.Linear(16, 3))\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [str(tmp_path), *sys.path])
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
