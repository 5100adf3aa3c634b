"""Cortex-M backend: C source bundle (TVM C kernels + static AOT ``model.c``), run under QEMU.

>>> import torch, bitcompiler as bc                                   # doctest: +SKIP
>>> net = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
>>> cm = bc.compile(net, (torch.randn(1, 64),), target="cortex-m4", scheme="binary:act=binary")
>>> cm(torch.randn(2, 64)).shape                                      # runs on mps2-an386 in QEMU
torch.Size([2, 10])
>>> cm.report().extra["instructions"] > 0
True
>>> cm.export("out/")  # model.c/h, kernels.c/h, weights.c/h + harness, Makefile, README

Options: ``Target("cortex-m4", board="mps2-an386", flash_kb=..., ram_kb=..., count_instructions=True)``;
``Target("cortex-m55", mve=False)`` builds without the Helium kernels (the scalar DSP ones).
``Target("cortex-m4", conv_tables=4)`` computes W1A1 convs by lookup tables of nibbles (``8``: bytes,
``"off"``: the popcount rows; default ``"auto"``: the widest that fits the board's flash, see
:mod:`.conv_tables`). ``Target("cortex-m4", recompute=False)`` stores a residual's float map instead of recomputing its
conv inside the kernel that adds it (more RAM, fewer instructions; see :mod:`.fusion`).
``Target("cortex-m4", act_tables=False)`` runs 1-bit dense layers with float activations without
their tables of partial sums in RAM (the portable kernel: less RAM, more instructions; default
``"auto"``: the tables where the board's RAM allows them, see :mod:`.dense_c`).
"""

from __future__ import annotations

from typing import Any

from bitcompiler.backends.base import BuildInput, Capabilities, Target, register_backend
from bitcompiler.backends.cortex_m import dense_c, qemu
from bitcompiler.backends.cortex_m.aot import CortexMLoweringError, Program, build_program
from bitcompiler.backends.cortex_m.boards import board_for
from bitcompiler.backends.cortex_m.bundle import HARNESS_FILES, STACK_BYTES, write_bundle
from bitcompiler.backends.cortex_m.runner import BundleBackend, BundleRunner, Toolchain
from bitcompiler.errors import FirmwareError, ModelTooLarge, TargetError

__all__ = ["CortexMBackend", "CortexMLoweringError", "ModelTooLarge"]


def _largest(sizes: dict[str, int], n: int = 3) -> str:
    top = sorted(sizes.items(), key=lambda kv: -kv[1])[:n]
    return ", ".join(f"{name} {size:,} B" for name, size in top)


def check_fits(program: Program, target: Target, flash: int, ram: int) -> None:
    """Raise :class:`ModelTooLarge` when ``flash`` / ``ram`` bytes exceed the target's memory
    limits (``target.capabilities``: the board's sizes, or ``flash_kb`` / ``ram_kb``)."""
    caps, board = target.capabilities, board_for(target)
    where = f"{board.name} ({board.cpu})"
    if caps.flash_bytes is not None and flash > caps.flash_bytes:
        raise ModelTooLarge(
            f"the model needs {flash:,} B of flash but {where} has {caps.flash_bytes:,} B; "
            f"largest layers (weights): {_largest(program.layer_bytes)}. "
            "Use fewer bits per weight (e.g. scheme='binary', 'tiled:p=4') or a smaller model."
        )
    if caps.ram_bytes is not None and ram > caps.ram_bytes:
        plan = program.plan  # tensors in the arena (not the caller's in/out, not the never-built float maps)
        acts = {n: t.nbytes for n, t in program.tensors.items() if t.storage in plan.offsets}
        raise ModelTooLarge(
            f"the model needs {ram:,} B of RAM (activation arena {plan.arena_bytes:,} B + "
            f"{STACK_BYTES:,} B stack + static data) but {where} has {caps.ram_bytes:,} B; the peak is at "
            f"layer {program.peak_layer}, with {plan.peak_bytes:,} B of activations live; largest "
            f"activations: {_largest(acts)}. Use binary activations (act=binary) between bit layers, "
            "fewer channels at full resolution, or pool earlier."
        )


def _choices(target: Target) -> list[tuple[object, bool]]:
    """The ``(conv_tables, act_tables)`` builds to try, in order (the target's options)."""
    act = target.get("act_tables", "auto")
    if act not in ("auto", True, False):
        raise TargetError(
            f"act_tables={act!r}: use 'auto' (the default: tables where the board's RAM allows), "
            "True (partial-sum tables in RAM, fewer instructions) or False (no tables)"
        )
    tables = target.get("conv_tables") or "auto"
    convs = [tables, 4, "off"] if tables == "auto" else [tables]
    return [(c, a) for a in ([True, False] if act == "auto" else [act]) for c in convs]


@register_backend
class CortexMBackend(BundleBackend):
    family = "cortex-m"
    targets = ("cortex-m3", "cortex-m4", "cortex-m7", "cortex-m55")
    tools = Toolchain("app.elf", tuple(HARNESS_FILES), qemu.build, qemu.run)

    def device(self, target: Target) -> Any:
        return board_for(target)

    def _built(
        self, inp: BuildInput, target: Target, tables: object, act_tables: bool
    ) -> tuple[Program, BundleRunner, Any]:
        """The program with ``tables`` (``conv_tables``) and ``act_tables``, its bundle built;
        ModelTooLarge when it does not fit the board."""
        board = board_for(target)
        features, recompute = self.capabilities(target).features, bool(target.get("recompute", True))
        builder = dense_c.builder_for(features, recompute, board.flash_bytes, tables, act_tables)
        program = build_program(inp.graph, inp.example_inputs, self.tvm_target(target), builder)
        check_fits(program, target, program.weight_bytes, program.plan.arena_bytes + STACK_BYTES)
        runner = self.runner_for(target, program)
        write_bundle(program, board, runner.bundle)
        try:
            size = qemu.sizes(self.tools.build(runner.bundle))
        except FirmwareError as e:
            if "region `FLASH' overflowed" not in str(e):
                raise
            raise ModelTooLarge(
                f"the model's code and weights overflow the {board.flash_bytes:,} B of flash of {board.name}; "
                f"largest layers (weights): {_largest(program.layer_bytes)}. Use fewer bits per weight "
                "or a smaller model."
            ) from e
        check_fits(program, target, size.flash_bytes, size.static_ram_bytes + STACK_BYTES)
        return program, runner, size

    def capabilities(self, target: Target) -> Capabilities:
        board = board_for(target)
        features = {
            "cortex-m3": (),
            "cortex-m4": ("dsp",),
            "cortex-m7": ("dsp",),
            "cortex-m55": ("dsp", "mve"),
        }
        isa = set(features[target.name]) - (set() if target.get("mve", True) else {"mve"})
        return Capabilities(
            frozenset(isa) | ({"fpu"} if board.has_fpu else set()),
            word_bits=32,
            vector_bits=128 if "mve" in isa else 0 if target.name == "cortex-m3" else 32,
            flash_bytes=board.flash_bytes,
            ram_bytes=board.ram_bytes,
            # the tiled conv is stored expanded (a binary conv) here: no two-stage conv in the AOT
            missing_kernels=frozenset({"tiled_conv2d"}),
        )

    def build(self, inp: BuildInput, target: Target) -> BundleRunner:
        """C from the rewritten graph (not Relax): the AOT program, built and run once under QEMU.
        With ``conv_tables="auto"`` a model whose W1A1 conv tables leave it too large for the
        board's flash is built again with nibble tables, then without (:mod:`.conv_tables`); with
        ``act_tables="auto"`` one whose dense partial-sum tables overflow the board's RAM is built
        again without them."""
        qemu.require_toolchain()
        todo = _choices(target)
        while True:
            (choice, act), todo = todo[0], todo[1:]
            try:
                program, runner, size = self._built(inp, target, choice, act)
                break
            except ModelTooLarge as e:
                flash = "of flash" in str(e)  # next: other conv tables (flash), no act tables (RAM)
                todo = [c for c in todo if (c[0] != choice if flash else c[1] != act)]
                if not todo:
                    raise
        board = board_for(target)
        count = bool(target.get("count_instructions", True))
        result = runner.run_example(inp.example_inputs, count)
        runner.report_extra.update(
            {
                "board": board.name,
                "instructions": result.instructions if count else "not measured (count_instructions=False)",
                "flash_bytes": size.flash_bytes,
                "ram_bytes": size.static_ram_bytes + result.stack_bytes,
                "arena_bytes": program.plan.arena_bytes,
                "arena_naive_bytes": program.plan.naive_bytes,
                "arena_peak_bytes": program.plan.peak_bytes,
                "arena_peak_layer": program.peak_layer,
                "stack_bytes": result.stack_bytes,
                "weights_flash_bytes": program.weight_bytes,
                "kernels": dict(program.layer_kernels),  # layer -> the C kernel it runs
                "conv_tables": choice,  # the conv_tables the program was built with
                "act_tables": act,  # whether its 1-bit float-activation dense layers use tables
            }
        )
        return runner
