"""Third-party architectures for the zoo: the ``pytorchcv`` package's model definitions, random weights.

Nobody here wrote these models; they are the test of whether bitcompiler holds on the
architectures users bring. ``pretrained=False`` always: nothing is downloaded.

* CIFAR models (``*_cifar10``) run at 32x32.
* ImageNet models run at 64x64. Their ``final_pool`` is a fixed 7x7 average pool sized for
  224x224 inputs; it is replaced by global average pooling (what the model computes at 224),
  the one change made to a model.
* ``pytorchcv.model_provider`` imports ``torchvision.ops.DeformConv2d`` at import time for one
  model none of these use; :func:`install_torchvision_stub` provides a stand-in module when
  torchvision is not installed (its wheels do not load beside the CPU build of torch).

>>> from bench.corpus import build
>>> model, x = build("resnet20_cifar10")  # doctest: +SKIP
"""

from __future__ import annotations

import sys
import types

import torch
from torch import nn

# 45 architectures: residual, pre-activation, bottleneck, grouped, squeeze-excitation, dense,
# shake-shake, wide, fractal-free deep nets at CIFAR size, and mobile nets (depthwise, channel
# shuffle, h-swish, mixed kernels, learned group convs) at 64x64.
CIFAR = (
    "resnet20_cifar10",
    "preresnet20_cifar10",
    "resnext20_16x4d_cifar10",
    "seresnet20_cifar10",
    "sepreresnet20_cifar10",
    "densenet40_k12_cifar10",
    "densenet40_k12_bc_cifar10",
    "xdensenet40_2_k24_bc_cifar10",
    "wrn16_10_cifar10",
    "ror3_56_cifar10",
    "shakeshakeresnet20_2x16d_cifar10",
    "diaresnet20_cifar10",
    "diapreresnet20_cifar10",
    "nin_cifar10",
)
IMAGENET = (
    "resnet10",
    "resnet18_wd4",
    "preresnet18_wd4",
    "sepreresnet10",
    "bam_resnet18",
    "cbam_resnet18",
    "diracnet18v2",
    "dla34",
    "regnetx002",
    "regnety002",
    "vovnet27s",
    "mobilenet_wd4",
    "mobilenetv2_wd4",
    "mobilenetv3_small_w7d20",
    "mobilenetv3_large_w7d20",
    "mnasnet_b1",
    "proxylessnas_mobile",
    "fbnet_cb",
    "igcv3_wd4",
    "shufflenet_g1_wd4",
    "shufflenetv2_wd2",
    "menet108_8x1_g3",
    "squeezenet_v1_1",
    "squeezeresnet_v1_1",
    "sqnxt23_w1",
    "ghostnet",
    "mixnet_s",
    "darts",
    "condensenet74_c4_g4",
    "peleenet",
    "hardnet39ds",
)
MODELS = CIFAR + IMAGENET


def install_torchvision_stub() -> None:
    """A ``torchvision.ops`` module with a ``DeformConv2d`` that raises, unless torchvision imports."""
    if "torchvision" in sys.modules:
        return
    try:
        import torchvision  # noqa: F401

        return
    except Exception:  # noqa: BLE001 - absent, or a wheel built for another torch
        sys.modules.pop("torchvision", None)
    tv, ops = types.ModuleType("torchvision"), types.ModuleType("torchvision.ops")

    class DeformConv2d(nn.Module):
        def __init__(self, *args: object, **kwargs: object) -> None:
            raise RuntimeError("DeformConv2d needs the real torchvision package")

    ops.DeformConv2d = DeformConv2d  # type: ignore[attr-defined]
    tv.ops = ops  # type: ignore[attr-defined]
    sys.modules["torchvision"], sys.modules["torchvision.ops"] = tv, ops


def input_size(name: str) -> int:
    return 32 if name.endswith("_cifar10") else 64


def build(name: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """``(model in eval mode, one example input of batch 1)``; BatchNorm statistics randomized."""
    install_torchvision_stub()
    from pytorchcv.model_provider import get_model

    size = input_size(name)
    torch.manual_seed(seed)
    try:
        model = get_model(name, pretrained=False, in_size=(size, size))
    except TypeError:
        model = get_model(name, pretrained=False)
    for path, module in list(model.named_modules()):
        if path.endswith("final_pool") and isinstance(module, nn.AvgPool2d):
            parent_path, _, leaf = path.rpartition(".")
            setattr(model.get_submodule(parent_path) if parent_path else model, leaf, nn.AdaptiveAvgPool2d(1))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d) and m.running_mean is not None:
                m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
    return model.eval(), torch.randn(1, 3, size, size, generator=g)
