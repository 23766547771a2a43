"""What every operator family provides, and the two failure kinds the planner understands.

Entry points: OpFamily (the protocol a family module implements), Axis and Space (a family's
search space: what the tuner may vary; axis_values builds an axis), Unsupported, KnobError.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Protocol, Sequence

AXIS_KINDS = ("layout", "loop")


class Unsupported(Exception):
    """The equation is outside what this family's kernels handle; it stays in XLA.

    The message is shown by `explain` as the reason, so it names what is unsupported
    (e.g. "lhs_dilation=(2, 1): transposed convolutions are left to XLA").
    """


class KnobError(ValueError):
    """A knob choice is illegal for this spec on this ISA; says what is wrong and the limit."""


@dataclasses.dataclass(frozen=True)
class Axis:
    """One knob's candidate values. kind says which of ALT's two levels it belongs to:
    "layout" = how data is laid out for the kernel (packed input layout and its block size,
    weight panel layout, in-place vs packed reads); "loop" = how the kernel loops over it
    (register tile, cache tiles, loop order, parallel chunking, unroll). Loop-only tuning
    keeps every layout axis at the heuristic's value."""

    name: str
    values: tuple
    kind: str

    def __post_init__(self):
        if self.kind not in AXIS_KINDS:
            raise ValueError(f"Axis {self.name!r}: kind={self.kind!r}, choose one of {AXIS_KINDS}")
        if not self.values:
            raise ValueError(f"Axis {self.name!r} has no values")
        if len(set(self.values)) != len(self.values):
            raise ValueError(f"Axis {self.name!r} repeats a value: {self.values}")


@dataclasses.dataclass(frozen=True)
class Space:
    """The joint (layout x loop) space of one family for one spec: the cross product of its
    axes, one axis per field of knobs_type. Not every point is legal: legality is the
    family's validate(), the same check the heuristic's choice passes."""

    family: str
    knobs_type: type
    axes: tuple

    def __post_init__(self):
        names = [a.name for a in self.axes]
        fields = [f.name for f in dataclasses.fields(self.knobs_type)]
        if sorted(names) != sorted(fields):
            raise ValueError(f"{self.family} space axes {names} must name each field of "
                             f"{self.knobs_type.__name__} once: {fields}")

    @property
    def size(self) -> int:
        """Points in the cross product (legal or not)."""
        return math.prod(len(a.values) for a in self.axes)

    def axis(self, name: str) -> Axis:
        for a in self.axes:
            if a.name == name:
                return a
        raise KeyError(f"{self.family} space has no axis {name!r}")

    def names(self, kind: str | None = None) -> tuple:
        return tuple(a.name for a in self.axes if kind is None or a.kind == kind)

    def make(self, values: Mapping[str, Any]):
        """knobs_type from a full {axis name: value} mapping."""
        return self.knobs_type(**{name: values[name] for name in self.names()})

    def values_of(self, knobs) -> dict:
        return {name: getattr(knobs, name) for name in self.names()}

    def layout_of(self, knobs) -> dict:
        """The layout decisions of knobs (the values of the layout axes)."""
        return {name: getattr(knobs, name) for name in self.names("layout")}

    def contains(self, knobs) -> bool:
        return all(getattr(knobs, a.name) in a.values for a in self.axes)


def axis_values(candidates, default) -> tuple:
    """A search-space axis: the distinct candidates, sorted, plus the heuristic's choice
    (so that default_knobs is always a point of the space)."""
    return tuple(sorted(set(candidates) | {default}))


class OpFamily(Protocol):
    """One operator family (conv2d, depthwise, matmul). Modules in alt_jax/ops implement it.

    Specs and knobs are frozen, hashable dataclasses; everything that reaches generated
    source is validated (records files are input).
    """

    name: str
    primitive: Any  # the jax primitive object this family rewrites (matched by identity)
    knobs_type: type  # the frozen dataclass of this family's knobs
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

    def space(self, spec, isa) -> Space:
        """The tuner's search space for spec on isa; contains default_knobs(spec, isa)."""

    def prefers(self, spec) -> bool:
        """Whether the untuned planner takes this family for spec (a match the heuristic
        thinks another family does better, e.g. Winograd on few channels, says False; the
        tuner measures it either way and records decide)."""

    def pack_weights(self, spec, knobs, rhs, isa) -> Any:
        """The rhs (the equation's, its own layout) as the kernel rendered for (spec with
        prepacked=True, knobs, isa) reads it; jnp only, so it traces."""

    def kernel_inputs(self, spec, knobs, operands: Sequence[Any], isa) -> list:
        """The arrays the kernel rendered for (spec, knobs, isa) reads, from the equation's
        operands [lhs, rhs (unpacked), *epilogue inputs]: the rhs packed when
        spec.prepacked, and whatever lower() does before its ffi_call (jnp). The tuner
        measures kernels on these."""

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
    # planner then runs the op in XLA (lax.cond) on the calls where it is False. A check
    # inside the kernel, with an exact fallback there, costs less where it can be had
    # (Winograd: a lax.cond and a pass over the input cost 2% of ResNet-50).
