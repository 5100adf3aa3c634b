"""The CPU build's TIR lowering on a thread pool (bitcompiler/backends/cpu/parallel_tir.py): the
same lowered functions as TVM's default pipeline, whatever the chunks."""

from __future__ import annotations

import pytest
import torch

import bitcompiler as bc
from bitcompiler.backends.cpu import parallel_tir
from bitcompiler.kernels import pack_sign_nchw, pack_sign_rows, quantize_rows_int8
from tests.kernels._util import host_target


def _module():
    import tvm

    funcs = {
        "pack_rows": pack_sign_rows(70),
        "pack_rows_big": pack_sign_rows(70000),  # a parallel loop
        "pack_nchw": pack_sign_nchw(64, 14, 14, 1),
        "pack_checked": pack_sign_nchw(40, 3, 5, 2, check=True),  # an assert
        "quantize": quantize_rows_int8((3, 8, 8)),
        "quantize_checked": quantize_rows_int8((3, 8, 8), check=True),
    }
    mod = tvm.IRModule({name: f.with_attr("global_symbol", name) for name, f in funcs.items()})
    target = tvm.target.Target(host_target())
    return tvm.tirx.transform.BindTarget(target.with_host(target))(mod)  # as tvm.tirx.build binds it


def _lowered(name: str, mod):
    import tvm
    from tvm.tirx import compilation_pipeline

    lower, _, _ = compilation_pipeline.get_tir_pipeline(name)
    with tvm.transform.PassContext(opt_level=3):
        return lower(mod)


@pytest.mark.parametrize("workers", [1, 2, 3, 8])
def test_the_chunks_lower_to_what_the_default_pipeline_makes(monkeypatch, workers):
    import tvm_ffi

    monkeypatch.setattr(parallel_tir, "workers", lambda: workers)
    mod = _module()
    expected = _lowered("default", mod)
    got = _lowered(parallel_tir.register(), mod)
    assert sorted(gv.name_hint for gv in got.functions) == sorted(gv.name_hint for gv in expected.functions)
    for gv, func in expected.functions.items():
        assert tvm_ffi.structural_equal(got[gv.name_hint], func), gv.name_hint
        # no chunk's only function became an entry function (the whole module has none)
        assert "tirx.is_entry_func" not in (got[gv.name_hint].attrs or {})


def test_chunks_hold_two_functions_or_more():
    assert parallel_tir.chunks(list(range(7)), 2) == [[0, 2, 4, 6], [1, 3, 5]]
    assert parallel_tir.chunks(list(range(7)), 8) == [[0, 3, 6], [1, 4], [2, 5]]
    assert parallel_tir.chunks(list(range(3)), 4) == [[0, 1, 2]]
    assert parallel_tir.chunks([], 4) == [[]]
    assert 1 <= parallel_tir.workers() <= parallel_tir.MAX_WORKERS


def test_registering_twice_keeps_one_pipeline():
    from tvm.tirx import compilation_pipeline

    assert parallel_tir.register() == parallel_tir.register() == parallel_tir.NAME
    assert compilation_pipeline.PIPELINE_MAP[parallel_tir.NAME] is parallel_tir._factory


def test_a_model_lowered_in_chunks_equals_its_reference(monkeypatch):
    monkeypatch.setenv("BITC_CACHE", "off")
    monkeypatch.setattr(parallel_tir, "workers", lambda: 3)
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 32, 3, padding=1),
        torch.nn.BatchNorm2d(32),
        torch.nn.Hardtanh(),
        torch.nn.Conv2d(32, 32, 3, padding=1),
        torch.nn.BatchNorm2d(32),
        torch.nn.Hardtanh(),
        torch.nn.Flatten(),
        torch.nn.Linear(32 * 8 * 8, 10),
    ).eval()
    cm = bc.compile(model, (torch.randn(1, 3, 8, 8),), scheme="binary:act=binary")
    for batch in (1, 3):
        x = torch.randn(batch, 3, 8, 8)
        assert torch.equal(cm(x), cm.reference(x))
