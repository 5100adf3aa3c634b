"""Which readers of a tensor take only its signs (the AOT program then writes packed sign words
instead of the float map): groups-1 binary convs, max-pools read only by them, and
sign-preserving hardtanhs of those."""

from __future__ import annotations

import torch

from bitcompiler import ops


def is_sign_clamp(node: torch.fx.Node, src: torch.fx.Node) -> bool:
    """``node`` is ``hardtanh(src, lo, hi)`` with ``lo < 0 <= hi``: ``sign`` of it is ``sign(src)``."""
    if getattr(node.target, "namespace", "") != "aten" or "hardtanh" not in str(node.target):
        return False
    lo, hi = (list(node.args[1:3]) + [-1.0, 1.0][len(node.args) - 1 :])[:2]
    return node.args[0] is src and not node.kwargs and float(lo) < 0 <= float(hi)  # type: ignore[arg-type]


def sign_clamps(node: torch.fx.Node) -> list[torch.fx.Node]:
    """The sign-preserving hardtanh readers of ``node``, transitively."""
    found = []
    for user in node.users:
        if is_sign_clamp(user, node):
            found += [user, *sign_clamps(user)]
    return found


def packed_readers(node: torch.fx.Node) -> bool:
    """Every reader of ``node`` takes only its packed signs: groups-1 binary convs reading it as
    their input, max-pools whose readers are such convs, sign-preserving hardtanhs of those."""
    for user in node.users:
        if getattr(user.target, "namespace", "") == "aten" and "max_pool2d.default" in str(user.target):
            if user.args[0] is not node or binary_conv_groups(user) != 1:
                return False
        elif is_sign_clamp(user, node):
            if not packed_readers(user):
                return False
        elif getattr(user.target, "namespace", "") != "bitc" or "bit_conv2d" not in str(user.target):
            return False
        else:
            call = ops.bind(user)
            if call.x is not node or call.attrs.act != "binary" or call.attrs.groups != 1:
                return False
    return bool(node.users)


def binary_conv_groups(node: torch.fx.Node) -> int:
    """The groups of the binary convs that are ``node``'s only readers (as their input), else 0."""
    groups = set()
    for user in node.users:
        if getattr(user.target, "namespace", "") != "bitc" or "bit_conv2d" not in str(user.target):
            return 0
        call = ops.bind(user)
        if call.x is not node or call.attrs.act != "binary":
            return 0
        groups.add(call.attrs.groups)
    return groups.pop() if len(groups) == 1 else 0
