"""The row-wise family: a layer norm (RMS norm, a softmax alone: any region rownorm.py
matches) as one kernel, one pass over its input (codegen/rownorm.cc).

Entry points: FAMILY (RowNormFamily: flops, default_knobs, validate, render, lower),
RowNormSpec (from_match), RowNormKnobs.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from alt_jax import row_program
from alt_jax.codegen import render as rn
from alt_jax.ops.base import KnobError

_MAX_WORKSPACE = 2**31
_MAX_ROW = 1 << 20       # floats in a row: a worker's slots hold a few rows
_MAX_INSTRUCTIONS = 256  # a row program longer than this is not a norm we know


@dataclasses.dataclass(frozen=True)
class RowNormSpec:
    """A row-wise region as the kernel sees it: the row roles' sizes, the row's length,
    element strides (row roles..., absent, row) of X and of the result, each external's
    dtype and strides, and the row program (row_program.RowProgram fields)."""

    batch: tuple
    n: int
    x_strides: tuple
    out_strides: tuple
    ext_dtypes: tuple
    ext_strides: tuple
    slot_full: tuple
    constants: tuple
    instructions: tuple
    result: int
    out_shape: tuple

    @classmethod
    def from_match(cls, m) -> "RowNormSpec":
        batch = m.batch or (1,)  # the template indexes at least one row role
        pad = () if m.batch else (0,)
        return cls(batch=tuple(batch), n=m.n, x_strides=pad + m.x_strides,
                   out_strides=pad + m.out_strides,
                   ext_dtypes=tuple(e.dtype for e in m.externals),
                   ext_strides=tuple(pad + e.strides for e in m.externals),
                   slot_full=m.program.full, constants=m.program.constants,
                   instructions=m.program.instructions, result=m.program.result,
                   out_shape=tuple(m.out_var.aval.shape))

    @property
    def rows(self) -> int:
        return int(np.prod(self.batch, dtype=np.int64))


@dataclasses.dataclass(frozen=True)
class RowNormKnobs:
    rows: int = 16        # rows per task
    serial: bool = False  # every task on the calling thread


class RowNormFamily:
    name = "rownorm"
    knobs_type = RowNormKnobs

    def flops(self, spec: RowNormSpec) -> int:
        """Elements times instructions: what the size rule (min_flops) compares."""
        return spec.rows * spec.n * (len(spec.instructions) // 5)

    def default_knobs(self, spec: RowNormSpec, isa) -> RowNormKnobs:
        """About 8 tasks (dynamic balance on 2 threads); on the calling thread alone below
        ~64K elements, where waking the pool costs more than the second core gives (a
        128 x 768 layer norm is a few microseconds of work)."""
        rows = max(1, -(-spec.rows // 8))
        return RowNormKnobs(rows=rows, serial=spec.rows * spec.n < 65536)

    def _workspace_bytes(self, spec, knobs, isa) -> int:
        w = isa.vector_floats
        skp = -(-spec.n // w) * w
        ntasks = -(-spec.rows // knobs.rows)
        slots = 1 if knobs.serial else min(ntasks, 16)
        return 4 * slots * len(spec.slot_full) * skp

    def validate(self, spec: RowNormSpec, knobs: RowNormKnobs, isa) -> None:
        if not isinstance(knobs, RowNormKnobs):
            raise KnobError(f"rownorm knobs must be RowNormKnobs, got {knobs!r}")
        if (isinstance(knobs.rows, bool) or not isinstance(knobs.rows, int)
                or not 1 <= knobs.rows <= max(1, spec.rows)
                or not isinstance(knobs.serial, bool)):
            raise KnobError(f"rownorm: rows={knobs.rows!r} must be an int in "
                            f"[1, {spec.rows}], serial a bool")
        if spec.n > _MAX_ROW:
            raise KnobError(f"rownorm: rows of {spec.n} floats; at most {_MAX_ROW}")
        if len(spec.instructions) // 5 > _MAX_INSTRUCTIONS:
            raise KnobError("rownorm: row program too long")
        ws = self._workspace_bytes(spec, knobs, isa)
        if ws > _MAX_WORKSPACE:
            raise KnobError(f"rownorm workspace of {ws} bytes exceeds {_MAX_WORKSPACE}")

    def render(self, spec: RowNormSpec, knobs: RowNormKnobs, isa):
        self.validate(spec, knobs, isa)
        nb = len(spec.batch)
        for name, strides in (("x", spec.x_strides), ("out", spec.out_strides)):
            if len(strides) != nb + 2:
                raise rn.RenderError(f"rownorm {name} strides {strides}: need {nb + 2}")
        values = {
            "W": isa.vector_floats, "NB": nb, "BATCH": tuple(spec.batch), "N": spec.n,
            "X_STRIDES": spec.x_strides, "OUT_STRIDES": spec.out_strides,
            **row_program.template_values("rownorm", spec),
            "ROWS": knobs.rows, "SERIAL": knobs.serial,
            "WORKSPACE_BYTES": self._workspace_bytes(spec, knobs, isa),
        }
        return rn.kernel_source("rownorm.cc", "alt_rownorm", values)

    def lower(self, spec: RowNormSpec, kernel, operands: Sequence) -> list:
        """operands: X and the externals, as the match reads them."""
        import jax
        import jax.numpy as jnp

        from alt_jax import runtime

        if len(operands) != 1 + len(spec.ext_dtypes):
            raise ValueError(f"rownorm kernel: expected X and {len(spec.ext_dtypes)} "
                             f"externals, got {len(operands)} operands")
        out = jax.ShapeDtypeStruct(spec.out_shape, jnp.float32)
        return runtime.ffi_call(kernel, operands, [out])


FAMILY = RowNormFamily()
