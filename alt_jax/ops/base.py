"""What every operator family provides, and the two failure kinds the planner understands.

Entry points: OpFamily (the protocol a family module implements), Unsupported, KnobError.
"""
from __future__ import annotations

from typing import Any, Protocol, Sequence


class Unsupported(Exception):
    """The equation is outside what this family's kernels handle; it stays in XLA.

    The message is shown by `explain` as the reason, so it names what is unsupported
    (e.g. "lhs_dilation=(2, 1): transposed convolutions are left to XLA").
    """


class KnobError(ValueError):
    """A knob choice is illegal for this spec on this ISA; says what is wrong and the limit."""


class OpFamily(Protocol):
    """One operator family (conv2d, depthwise, matmul). Modules in alt_jax/ops implement it.

    Specs and knobs are frozen, hashable dataclasses; everything that reaches generated
    source is validated (records files are input).
    """

    name: str
    primitive: Any  # the jax primitive object this family rewrites (matched by identity)
    # True when the kernels read each residual element before writing the output element at
    # the same offset, and nothing else there: the output may then be written into the
    # residual's buffer (lower(..., reuse_residual=True)). Families without it say False.
    residual_in_place: bool

    def match(self, eqn) -> Any:
        """Spec for a jaxpr equation, or raise Unsupported(reason)."""

    def flops(self, spec) -> int:
        """Multiply-adds counted as 2 flops."""

    def default_knobs(self, spec, isa) -> Any:
        """A good untuned configuration; passes validate()."""

    def validate(self, spec, knobs, isa) -> None:
        """Raise KnobError if knobs are illegal for spec on isa."""

    def render(self, spec, knobs, isa):
        """runtime.KernelSource for spec with knobs."""

    def lower(self, spec, kernel, operands: Sequence[Any],
              reuse_residual: bool = False) -> Sequence[Any]:
        """jax values of the equation's outputs, computed by the built kernel.

        operands are the equation's input values (jax arrays or tracers). Most families
        call runtime.ffi_call(kernel, operands, out_avals) directly; a family may reshape
        or transpose with jnp around it. reuse_residual (residual_in_place families only):
        the output is written into the residual operand's buffer.
        """

    # Optional. A family whose kernel matches XLA only for some operand values defines
    #   safe_operands(spec, lhs, rhs) -> None | bool | traced bool scalar
    # (lhs as the kernel reads it, rhs unpacked; reductions over them do not depend on the
    # layout): None = always safe; a Python bool = decided at trace time (concrete operands,
    # e.g. constant weights, are checked with numpy); a traced bool = decided per call, the
    # planner then runs the op in XLA (lax.cond) on the calls where it is False.
