"""The CPU call's short path: kernels that reject NaN/Inf themselves, and the batch-1 entry.

``cm(x)`` must refuse a non-finite input with the usual :class:`~bitcompiler.InputError`
whether Python or a kernel finds it (bitcompiler/kernels/finite.py), and the VM's ``main_b1``
(the batch bound to 1) must compute what ``main`` does.
"""

from __future__ import annotations

import contextlib
import re

import pytest
import torch

import bitcompiler as bc
from bitcompiler import errors
from bitcompiler.kernels import dense_avx2, dense_vnni

W1A1 = "binary:act=binary,first_last=quantize"
W2A8 = "uniform:bits=2,act=8,first_last=quantize"
VPOP = dense_avx2.popcnt512_target(bc.Target("cpu").tvm_target())
VNNI = dense_vnni.vnni_target(bc.Target("cpu").tvm_target())


def agrees(cm, x) -> None:
    """Compiled == reference: bit for bit for W1A1 (integer accumulators), within 1e-5 for floats."""
    got, ref = cm(x), cm.reference(x)
    if cm.report().bits_per_weight < 32:
        assert torch.equal(got, ref)
    else:
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def vm_function(cm, name: str) -> str:
    """The VM's instructions of the executable's function ``name``."""
    text = cm._runner.executable.as_text()
    return text[text.index(f"@{name}:") :].split("\n\n")[0]


@pytest.fixture(scope="module")
def flat():
    """A reshape (``Flatten``) first: the VM reads the input's shape."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 32)).eval()
    return bc.compile(model, (torch.randn(1, 3, 4, 4),), scheme=W1A1)


@pytest.fixture(scope="module")
def w1a1():
    torch.manual_seed(0)
    return bc.compile(torch.nn.Linear(256, 64).eval(), (torch.randn(1, 256),), scheme=W1A1)


@pytest.fixture(scope="module")
def w2a8():
    torch.manual_seed(0)
    return bc.compile(torch.nn.Linear(256, 64).eval(), (torch.randn(1, 256),), scheme=W2A8)


@pytest.fixture(scope="module")
def floats():
    torch.manual_seed(0)
    return bc.compile(torch.nn.Linear(256, 64).eval(), (torch.randn(1, 256),), scheme="none")


@pytest.mark.skipif(not VPOP, reason="the host has no AVX-512 vector popcounts (the checking kernel)")
def test_a_w1a1_layer_checks_its_input_in_the_kernel(w1a1):
    assert w1a1._runner.checks_finite


@pytest.mark.skipif(not VNNI, reason="the host has no AVX-512 VNNI (the W2A8 kernel that quantizes its rows)")
def test_a_w2a8_layer_checks_its_input_in_the_kernel(w2a8):
    """The VNNI kernel quantizes the float rows itself and checks them on the way (about 2 us of
    Python's check saved a call)."""
    assert w2a8._runner.checks_finite


def test_the_runner_asks_for_the_function_the_pipeline_adds():
    from bitcompiler.backends.cpu.runner import CHECKS_FINITE
    from bitcompiler.kernels import finite

    assert CHECKS_FINITE == finite.SYMBOL


def test_float_layers_leave_the_check_to_python(floats):
    assert not floats._runner.checks_finite


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "neg-inf"])
@pytest.mark.parametrize("where", [(0, 0), (0, 255), (2, 131)], ids=["first", "last", "middle"])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("model", ["w1a1", "w2a8", "floats"])
def test_non_finite_inputs_are_refused_naming_the_sample(request, model, bad, where, batch):
    cm = request.getfixturevalue(model)
    x = torch.randn(batch, 256)
    sample = min(where[0], batch - 1)
    x[sample, where[1]] = bad
    with pytest.raises(bc.InputError, match=f"holds NaN or Inf \\(first in sample {sample}\\)"):
        cm(x)
    x[sample, where[1]] = 0.0
    agrees(cm, x)  # the same model, once the input is finite again


@pytest.mark.parametrize("model", ["w1a1", "w2a8"])
def test_extreme_finite_inputs_pass_the_kernel_check(request, model):
    cm = request.getfixturevalue(model)
    x = torch.tensor([[3.4028235e38, -3.4028235e38, 1e-45, -0.0] * 64])
    assert torch.equal(cm(x), cm.reference(x))


@pytest.mark.parametrize("model", ["w1a1", "w2a8", "floats"])
def test_the_batch_one_entry_computes_what_main_does(request, model):
    cm = request.getfixturevalue(model)
    main, main_b1 = cm._runner.entries
    assert main_b1 is not main  # a dynamic batch gets a batch-1 entry
    x = torch.randn(1, 256)
    assert torch.equal(main_b1(x), main(x))
    agrees(cm, x)
    agrees(cm, torch.randn(5, 256))


def test_the_fastest_path_is_where_the_compiled_code_checks_every_value(w1a1, floats):
    """Only a model whose kernels refuse NaN/Inf themselves skips Python's checks; a float model
    keeps Python's pass over its input."""
    assert (w1a1._fast is not None) == w1a1._runner.checks_finite
    assert floats._fast is None


@pytest.mark.parametrize(
    "inputs, kind, needle",
    [
        ((torch.randn(1, 255),), bc.InputError, "expected float32 tensor of shape (batch, 256)"),
        ((torch.randn(256),), bc.InputError, "got float32 tensor of shape (256,)"),
        ((torch.randn(2, 128),), bc.InputError, "got float32 tensor of shape (2, 128)"),
        ((torch.randn(1, 256, dtype=torch.float64),), bc.InputError, "convert with .to(torch.float32)"),
        ((torch.randn(1, 256).numpy(),), errors.InputTypeError, "expected a torch.Tensor"),
        ((torch.randn(1, 256, device="meta"),), bc.InputError, "on the meta device"),
        ((torch.randn(1, 256), torch.randn(1, 256)), bc.InputError, "expected 1 input(s)"),
    ],
    ids=["shape", "rank", "one-sample-of-values", "dtype", "numpy", "meta", "two"],
)
def test_a_bad_call_on_the_fastest_path_names_what_is_wrong(w1a1, inputs, kind, needle):
    with pytest.raises(kind, match=re.escape(needle)):
        w1a1(*inputs)


def test_the_batch_one_entry_leaves_an_input_only_kernels_read_to_their_checks(w1a1):
    """``main_b1`` of a layer whose kernel takes the input has no VM checks of it; the kernel's
    own checks refuse each wrong input (nothing computes on it), and ``cm(x)`` names the fault."""
    from bitcompiler.backends.cpu.pipeline import PARAM_CHECKS

    entry, main = vm_function(w1a1, "main_b1"), vm_function(w1a1, "main")
    assert "bitc_dense" in entry and not any(check in entry for check in PARAM_CHECKS)
    assert all(check in main for check in PARAM_CHECKS)  # any batch: the VM reads the shape
    main_b1 = w1a1._runner.entries[1]
    bad = [
        torch.randn(2, 128),
        torch.randn(256),
        torch.randn(1, 256, dtype=torch.float64),
        torch.randn(1, 1, 256),
        torch.randn(1, 256).to(torch.int32),
        torch.randn(256, 2).t()[:1],
    ]
    for x in bad:
        with pytest.raises((TypeError, ValueError), match="Mismatched X"):
            main_b1(x)
        with pytest.raises(bc.InputError) if x.is_contiguous() else contextlib.nullcontext():
            w1a1(x)  # a strided batch-1 row is copied and computed


def test_an_input_a_reshape_reads_keeps_the_checks(flat):
    """A reshape would take any tensor of as many values: the VM checks that input's shape."""
    from bitcompiler.backends.cpu.pipeline import PARAM_CHECKS

    assert all(check in vm_function(flat, "main_b1") for check in PARAM_CHECKS)
    with pytest.raises(bc.InputError, match=re.escape("got float32 tensor of shape (1, 4, 4, 3)")):
        flat(torch.randn(1, 4, 4, 3))


def test_an_input_that_needs_gradients_gives_the_plain_result(w1a1):
    for batch in (1, 3):
        x = torch.randn(batch, 256, requires_grad=True)
        got = w1a1(x)
        assert not got.requires_grad
        assert torch.equal(got, w1a1.reference(x.detach()))


def test_unaligned_or_strided_inputs_take_the_copying_path(w1a1):
    base = torch.randn(4, 257)
    for x in (base[:1, 1:], base[:, 1:], torch.randn(256, 3).t()):
        assert torch.equal(w1a1(x), w1a1.reference(x.contiguous()))


def test_a_strided_or_unaligned_input_to_a_reshape_is_copied_first(flat):
    """The fastest path leaves layouts to TVM's checks: a reshape of the input (the first op
    here) refuses a strided tensor, and the path that copies it computes the same."""
    cm = flat
    assert cm._fast is not None
    base = torch.randn(2 * 48 + 1)
    for x in (
        torch.randn(1, 4, 4, 3).permute(0, 3, 1, 2),
        torch.randn(3, 4, 4, 3).permute(0, 3, 1, 2),
        base[1:49].view(1, 3, 4, 4),
        base[1:97].view(2, 3, 4, 4),
    ):
        assert torch.equal(cm(x), cm.reference(x.contiguous()))


def test_an_exported_model_keeps_both(w1a1, tmp_path):
    loaded = bc.load(w1a1.export(tmp_path / "m"))
    assert loaded._runner.checks_finite == w1a1._runner.checks_finite
    assert loaded._runner.entries[1] is not loaded._runner.entries[0]
    x = torch.randn(1, 256)
    assert torch.equal(loaded(x), w1a1(x))
    x[0, 7] = float("nan")
    with pytest.raises(bc.InputError, match="first in sample 0"):
        loaded(x)


def test_a_fixed_batch_has_one_entry():
    class FixedBatch(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(8, 4)

        def forward(self, x):
            return self.fc(x.view(1, -1))

    with pytest.warns(UserWarning, match="fixed batch of 1"):
        cm = bc.compile(FixedBatch().eval(), (torch.randn(1, 8),), scheme="none")
    assert cm._runner.entries[1] is cm._runner.entries[0]
    x = torch.randn(1, 8)
    torch.testing.assert_close(cm(x), cm.reference(x))
    with pytest.raises(bc.InputError, match="fixed batch of 1"):
        cm(torch.randn(2, 8))


class Stem(torch.nn.Module):
    """An 8-bit first conv reading the input (``bitc_quantize_int8``), then a binary one."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn = torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.BatchNorm2d(32)
        self.conv2 = torch.nn.Conv2d(32, 32, 3, padding=1)

    def forward(self, x):
        return self.conv2(torch.relu(self.bn(self.conv1(x))))


@pytest.fixture(scope="module")
def convs():
    """Models whose first kernel reads the input in full and checks it: the int8 quantizer
    (``stem``), the sign packer of a binary first conv (``binary``)."""
    torch.manual_seed(0)
    stem = bc.compile(Stem().eval(), (torch.randn(1, 3, 12, 12),), scheme="binary:act=binary")
    conv = torch.nn.Sequential(torch.nn.Conv2d(64, 32, 3, padding=1)).eval()
    binary = bc.compile(conv, (torch.randn(1, 64, 6, 7),), scheme="binary:act=binary")
    return {"stem": (stem, (3, 12, 12)), "binary": (binary, (64, 6, 7))}


@pytest.mark.parametrize("name", ["stem", "binary"])
def test_a_first_quantizer_or_packer_checks_the_input_in_the_kernel(convs, name):
    cm, shape = convs[name]
    assert cm._runner.checks_finite
    for bad in (float("nan"), float("inf"), -float("inf")):
        for batch, sample, at in ((1, 0, 0), (3, 2, -1), (3, 1, 100)):
            x = torch.randn(batch, *shape)
            x[sample].view(-1)[at] = bad
            with pytest.raises(bc.InputError, match=f"holds NaN or Inf \\(first in sample {sample}\\)"):
                cm(x)
            x[sample].view(-1)[at] = 3.4e38  # the largest finite magnitudes pass the check
            assert torch.equal(cm(x), cm.reference(x))


class Patches(torch.nn.Module):
    """An MLP-Mixer's patch embedding: the input reshaped and transposed into 16 patches of 12
    values, then an 8-bit linear layer (its quantizer reads the moved input)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.head = torch.nn.Linear(12, 16), torch.nn.Linear(16, 4)

    def forward(self, x):
        b = x.shape[0]
        x = x.reshape(b, 3, 4, 2, 4, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, 16, 12)
        return self.head(torch.relu(self.embed(x)))


@pytest.mark.parametrize("name", ["patches", "flatten"])
def test_an_input_moved_by_reshapes_and_transposes_is_checked_in_the_kernel(name):
    torch.manual_seed(0)
    if name == "patches":
        model, shape, scheme = Patches().eval(), (3, 8, 8), "binary:act=binary"
    else:
        flat = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 32), torch.nn.Linear(32, 4))
        model, shape, scheme = flat.eval(), (3, 4, 4), "uniform:bits=2,act=8"
    cm = bc.compile(model, (torch.randn(1, *shape),), scheme=scheme)
    assert cm._runner.checks_finite
    for batch, sample, at in ((1, 0, 0), (3, 2, -1), (3, 1, 17)):
        x = torch.randn(batch, *shape)
        agrees(cm, x)
        x[sample].view(-1)[at] = float("nan")
        with pytest.raises(bc.InputError, match=f"first in sample {sample}"):
            cm(x)


def test_a_float_op_before_the_first_quantizer_leaves_the_check_to_python():
    """Only a kernel reading the input itself checks it: after ``x * 2`` the quantizer reads an
    activation, takes no check, and Python still refuses a NaN input."""

    class Scaled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(64, 32, 3, padding=1)

        def forward(self, x):
            return self.conv(x * 2)

    torch.manual_seed(0)
    cm = bc.compile(Scaled().eval(), (torch.randn(1, 64, 6, 7),), scheme="binary:act=binary")
    assert not cm._runner.checks_finite
    x = torch.randn(2, 64, 6, 7)
    assert torch.equal(cm(x), cm.reference(x))
    x[1, 3, 2, 2] = float("nan")
    with pytest.raises(bc.InputError, match="first in sample 1"):
        cm(x)


@pytest.mark.parametrize("use", ["kernel", "alias", "reshape", "result"])
def test_only_an_input_kernels_alone_take_loses_its_checks(use):
    """The pass on a hand-written entry: the input passed straight to a kernel loses the VM's
    check; read through an alias, a reshape or returned as the result, it keeps it."""
    from tvm import relax
    from tvm.script import tirx as T

    from bitcompiler.backends.cpu.pipeline import BATCH_ONE, kernel_checked_entry

    @T.prim_func(s_tir=True)
    def copy(a: T.Buffer((1, 4), "float32"), b: T.Buffer((1, 4), "float32")):
        for i in range(4):
            with T.sblock("copy"):
                vi = T.axis.spatial(4, i)
                b[0, vi] = a[0, vi]

    bb = relax.BlockBuilder()
    ty = relax.TensorType((1, 4), "float32")
    x = relax.Var("x", ty)
    kernel = bb.add_func(copy, "copy")
    with bb.function(BATCH_ONE, [x], pure=False):
        bb.emit(relax.Call(relax.ExternFunc("vm.builtin.check_tensor_info"), [x]))
        src = x
        if use == "alias":
            src = bb.emit(x)
        elif use == "reshape":
            src = bb.emit(relax.Call(relax.ExternFunc("vm.builtin.reshape"), [x], ty_args=[ty]))
        out = bb.emit(relax.Call(relax.ExternFunc("vm.builtin.alloc_tensor"), [], ty_args=[ty]))
        bb.emit(relax.Call(kernel, [src, out]))
        bb.emit_func_output(relax.Tuple([out, x]) if use == "result" else out)
    after = kernel_checked_entry()(bb.get())[BATCH_ONE].script()
    assert ("check_tensor_info" in after) == (use != "kernel")
