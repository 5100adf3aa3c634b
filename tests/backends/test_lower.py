"""CPU lowering rewrites: one packing per tensor, threshold convs writing the next layer's packed
input, and a ResNet block's add + hardtanh folded into its last conv; outputs == reference."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bitcompiler as bc
from tests.conftest import assert_close, randomize_bn


class Block(nn.Module):
    """A binary basic block (conv-BN-hardtanh, conv-BN, + shortcut, hardtanh) between 8-bit ends."""

    def __init__(self, use_sum_twice: bool = False):
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, padding=1, bias=False)
        self.c1, self.b1 = nn.Conv2d(32, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32)
        self.c2, self.b2 = nn.Conv2d(32, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32)
        self.fc = nn.Linear(32, 5)
        self.use_sum_twice = use_sum_twice

    def forward(self, x):
        x = F.hardtanh(self.stem(x))
        s = self.b2(self.c2(F.hardtanh(self.b1(self.c1(x))))) + x
        out = F.hardtanh(s)
        if self.use_sum_twice:  # the sum is needed on its own: no fusion
            out = out + s
        return self.fc(out.mean((2, 3)))


def kernels_called(cm, prefix: str = "bitc_") -> list[str]:
    """The kernels named ``prefix...`` that the VM's ``main`` calls, in order (its batch-1 entry
    ``main_b1`` calls the same ones)."""
    lines = cm._runner.executable.as_text().split("@main:\n", 1)[1].splitlines()
    body = lines[: next((i for i, line in enumerate(lines) if line.startswith("@")), len(lines))]
    return [line.split()[1] for line in body if line.split()[:1] == ["call"] and prefix in line]


@pytest.mark.parametrize("use_sum_twice", [False, True])
def test_block_rewrites(use_sum_twice):
    torch.manual_seed(0)
    model = randomize_bn(Block(use_sum_twice)).eval()
    x = torch.randn(2, 3, 12, 12)
    cm = bc.compile(model, (x,), scheme="binary:act=binary")
    calls = kernels_called(cm)
    convs = [c for c in calls if c.startswith("bitc_conv2d_binary")]
    # c1 (threshold: it only feeds c2's sign) writes c2's packed input; no packing in between
    assert convs[0].endswith("_thr_packed") and calls[calls.index(convs[0]) + 1] == convs[1]
    if use_sum_twice:
        assert not convs[1].endswith("_res")
    else:
        assert convs[1].endswith("_res")  # hardtanh(b2(c2) + x) in c2's epilogue
    assert sum(c.startswith("bitc_pack_sign_nchw") for c in calls) == 1  # the stem's output only
    assert_close(cm(x), cm.reference(x))


class TwoBlocks(nn.Module):
    """Two binary basic blocks: the first one's output is the second one's residual and, packed,
    its convs' input."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, padding=1, bias=False)
        self.c = nn.ModuleList(nn.Conv2d(32, 32, 3, padding=1, bias=False) for _ in range(4))
        self.b = nn.ModuleList(nn.BatchNorm2d(32) for _ in range(4))
        self.fc = nn.Linear(32, 5)

    def forward(self, x):
        x = F.hardtanh(self.stem(x))
        for i in (0, 2):
            x = F.hardtanh(self.b[i + 1](self.c[i + 1](F.hardtanh(self.b[i](self.c[i](x))))) + x)
        return self.fc(x.mean((2, 3)))


def test_a_block_output_read_packed_is_packed_by_its_conv():
    torch.manual_seed(0)
    model = randomize_bn(TwoBlocks()).eval()
    x = torch.randn(2, 3, 12, 12)
    cm = bc.compile(model, (x,), scheme="binary:act=binary")
    calls = kernels_called(cm)
    convs = [c for c in calls if c.startswith("bitc_conv2d_binary")]
    # the first block's last conv writes its float output (the next residual) and its signs packed
    assert [c.rsplit("_", 2)[-2:] for c in convs] == [
        ["thr", "packed"],
        ["res", "packed"],
        ["thr", "packed"],
        ["3x3", "res"],
    ]
    assert sum(c.startswith("bitc_pack_sign_nchw") for c in calls) == 1  # the stem's output only
    assert_close(cm(x), cm.reference(x))


@pytest.mark.parametrize("size", [1, 2, 3, (2, 5)])
def test_adaptive_max_pool2d_lowers_exactly(size):
    # TVM's frontend has no adaptive_max_pool2d (CBAM's channel attention uses it)
    class Pool(torch.nn.Module):
        def forward(self, x):
            return F.adaptive_max_pool2d(x, size) * 2

    model = Pool().eval()
    cm = bc.compile(model, (torch.randn(1, 4, 10, 10),), scheme="none")
    x = torch.randn(3, 4, 10, 10)
    assert torch.equal(cm(x), model(x))


def test_max_pool_with_the_default_stride_and_ceil_mode():
    # ATen writes the default stride as []: TVM's frontend took it for no stride and failed
    class Pool(torch.nn.Module):
        def forward(self, x):
            return F.max_pool2d(x, 2, ceil_mode=True) + F.max_pool2d(x, 3, 2, 1)[..., :5, :5].mean()

    model = Pool().eval()
    cm = bc.compile(model, (torch.randn(1, 4, 9, 9),), scheme="none")
    x = torch.randn(3, 4, 9, 9)
    assert torch.allclose(cm(x), model(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("scheme", ["binary", "uniform:bits=2,act=8", "uniform:bits=8,act=8"])
@pytest.mark.parametrize("stride", [1, 2])
def test_pointwise_convs_run_on_the_dense_kernels(scheme, stride):
    # a 1x1 conv is a dense layer over pixels: the weight-order dense kernels, with the sample's
    # int8 scale on every pixel's row, give exactly the conv's numbers (2-bit codes: K % 256 == 0)
    from bitcompiler.backends.lower import to_relax

    out = -(-9 // stride)
    model = nn.Sequential(
        nn.Conv2d(16, 256, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(256, 64, 1, stride=stride),
        nn.ReLU(),
        nn.Conv2d(64, 48, 1),
        nn.Flatten(),
        nn.Linear(48 * out * out, 10),
    ).eval()
    x = torch.randn(1, 16, 9, 9)
    cm = bc.compile(model, (x,), scheme=scheme)
    names = [gv.name_hint for gv in to_relax(cm._exported).functions]
    assert not any("conv2d" in n and "256x64_1x1" in n for n in names), names
    assert any("bitc_dense" in n and "256x64" in n for n in names), names
    xb = torch.randn(5, 16, 9, 9)
    if "act=8" in scheme:
        assert torch.equal(cm(xb), cm.reference(xb))
    else:  # float32 sums of 256 products, in another order than the reference's float64 ones
        assert_close(cm(xb), cm.reference(xb), rtol=3e-5)


@pytest.mark.parametrize("scheme", ["binary:act=binary", "uniform:bits=2,act=8", "uniform:bits=8,act=8"])
@pytest.mark.parametrize(("kernel", "size"), [((4, 4), 16), ((3, 2), 11)])
def test_patch_embeddings_run_on_the_dense_kernels(scheme, kernel, size):
    """A conv whose windows tile its input (kernel = stride: a ViT's or MLP-Mixer's patch
    embedding) is a dense layer over patches, each patch's inputs in the weights' (KH, KW, C) order;
    the rows and columns no window covers (11 is not a multiple of 3 or 2) are dropped. The same
    numbers as the conv: bit for bit with int8 activations, then a binary and an 8-bit layer."""
    from bitcompiler.backends.lower import to_relax

    torch.manual_seed(0)
    oh, ow = size // kernel[0], size // kernel[1]
    model = nn.Sequential(
        nn.Conv2d(5, 64, kernel, stride=kernel),
        nn.Hardtanh(),  # signs of both kinds for a binary layer
        nn.Conv2d(64, 64, 1),
        nn.Flatten(),
        nn.Linear(64 * oh * ow, 10),
    ).eval()
    x = 2 * torch.randn(6, 5, size, size)
    cm = bc.compile(model, (x[:1],), scheme=scheme)
    names = [gv.name_hint for gv in to_relax(cm._exported).functions]
    k = 5 * kernel[0] * kernel[1]
    assert any(n.startswith(f"bitc_dense_int8_uint8_{k}x64") for n in names), names
    assert not any(n.startswith("bitc_conv2d") and "_5x64_" in n for n in names), names
    assert torch.equal(cm(x), cm.reference(x))


@pytest.mark.parametrize("shape", [(3, 24), (3, 5, 24)])
def test_in_place_relu_after_a_bit_linear(shape):
    # DIA-PreResNet's attention LSTM: nn.ReLU(inplace=True) on a Linear's output whose input needs
    # grad (a float parameter upstream). The bitc op's output was a view, which autograd forbids
    # modifying in place: shape propagation failed
    torch.manual_seed(0)
    model = nn.Sequential(nn.LayerNorm(24), nn.Linear(24, 16), nn.ReLU(inplace=True), nn.Linear(16, 4)).eval()
    x = torch.randn(*shape)
    cm = bc.compile(model, (x,), scheme="binary:act=binary")
    assert_close(cm(x), cm.reference(x))  # the LayerNorm is float: 1e-5


def test_exact_floats_takes_shapes_from_fake_tensors(monkeypatch):
    # the pass reads shapes only: fake tensors give the same ones as running the bit layers' numerics
    from torch.fx.passes.shape_prop import ShapeProp

    from bitcompiler.passes.rewrites import exact_floats

    def shapes(gm):
        metas = {n.name: n.meta.get("tensor_meta") for n in gm.graph.nodes}
        return {k: tuple(m.shape) for k, m in metas.items() if hasattr(m, "shape")}

    seen = {}

    def spy(gm, inputs):
        exact_floats._FakeShapes(gm).propagate(*inputs)  # raises where an op needs real values
        seen["fake"] = shapes(gm)
        ShapeProp(gm).propagate(*inputs)
        seen["real"] = shapes(gm)

    monkeypatch.setattr(exact_floats, "_propagate_shapes", spy)
    monkeypatch.setenv("BITC_CACHE", "off")
    bc.compile(randomize_bn(Block()).eval(), (torch.randn(2, 3, 12, 12),), scheme="binary:act=binary")
    assert len(seen["fake"]) > 5 and seen["fake"] == seen["real"]
