"""The attention family: out = f(Q K^T) V in one kernel (codegen/attention.cc), f the row
program alt_jax/attention.py read off the jaxpr (a softmax with its scale and masks).

Entry points: FAMILY (AttentionFamily: from_match, flops, default_knobs, validate, render,
lower), AttentionSpec, AttentionKnobs.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from alt_jax import row_program
from alt_jax.codegen import render as rn
from alt_jax.ops.base import KnobError

_MAX_WORKSPACE = 2**31
_MAX_ROW = 1 << 16       # keys per row: the score block of a task must stay in L2
_MAX_INSTRUCTIONS = 256  # a row program longer than this is not an attention we know


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
    """An attention as the kernel sees it: sizes, element strides of Q (batch..., q, d),
    K (batch..., k, d), V (batch..., k, dv) and the result (batch..., q, dv), each
    external's dtype and strides (batch..., q, k), and the row program (attention.RowProgram
    fields: slot kinds, constants, instructions, result). out_shape: the result's shape.
    offsets: where Q, K and V start in the buffers the kernel is given, in_sizes: those
    buffers' elements (Q, K and V may be views of one value, as GPT-2's split QKV)."""

    batch: tuple
    sq: int
    sk: int
    d: int
    dv: int
    q_strides: tuple
    k_strides: tuple
    v_strides: tuple
    out_strides: tuple
    ext_dtypes: tuple
    ext_strides: tuple
    slot_full: tuple
    constants: tuple
    instructions: tuple
    result: int
    out_shape: tuple
    offsets: tuple = (0, 0, 0)
    in_sizes: tuple = ()

    @classmethod
    def from_match(cls, m) -> "AttentionSpec":
        batch = m.batch or (1,)  # the template indexes at least one batch role
        pad = () if m.batch else (0,)
        return cls(batch=tuple(batch), sq=m.sq, sk=m.sk, d=m.d, dv=m.dv,
                   q_strides=pad + m.q_strides, k_strides=pad + m.k_strides,
                   v_strides=pad + m.v_strides, out_strides=pad + m.out_strides,
                   ext_dtypes=tuple(e.dtype for e in m.externals),
                   ext_strides=tuple(pad + e.strides for e in m.externals),
                   slot_full=m.program.full, constants=m.program.constants,
                   instructions=m.program.instructions, result=m.program.result,
                   out_shape=tuple(m.out_var.aval.shape), offsets=tuple(m.offsets),
                   in_sizes=tuple(int(np.prod(v.aval.shape, dtype=np.int64))
                                  for v in m.operands))

    @property
    def n_batch(self) -> int:
        return int(np.prod(self.batch, dtype=np.int64))


@dataclasses.dataclass(frozen=True)
class AttentionKnobs:
    tq: int = 32          # query rows per task (its score block: tq x sk floats)
    serial: bool = False  # every task on the calling thread
    pack_k: bool = True   # K^T packed per batch item; False: dots along d, K read in place


class AttentionFamily:
    name = "attention"
    knobs_type = AttentionKnobs

    def flops(self, spec: AttentionSpec) -> int:
        return 2 * spec.n_batch * spec.sq * spec.sk * (spec.d + spec.dv)

    def default_knobs(self, spec: AttentionSpec, isa) -> AttentionKnobs:
        """32 query rows a task (a 32 x sk score block: 16 KB at 128 keys, in L1/L2), fewer
        when that leaves a thread idle; serial below ~1 MFLOP."""
        tq = max(1, min(32, spec.sq))
        while tq > 4 and spec.n_batch * -(-spec.sq // tq) < 4:
            tq //= 2
        # A few query rows (a decode step) would pay a packing of K per row: dots in place.
        pack_k = spec.sq > 4 or not self._dots_in_place(spec, isa)
        return AttentionKnobs(tq=tq, serial=self.flops(spec) < 1_000_000, pack_k=pack_k)

    @staticmethod
    def _dots_in_place(spec, isa) -> bool:
        """Whether Q and K rows are contiguous along d in whole vectors (scores as dots)."""
        n = len(spec.batch)
        return (spec.q_strides[n + 1] == 1 and spec.k_strides[n + 1] == 1
                and spec.d % isa.vector_floats == 0)

    @staticmethod
    def _packs_v(spec, isa) -> bool:
        """V is packed unless its rows are contiguous along dv in whole vectors (the
        template's PACK_V)."""
        return not (spec.v_strides[len(spec.batch) + 1] == 1
                    and spec.dv % isa.vector_floats == 0)

    def _slot_floats(self, spec, knobs, isa) -> int:
        w = isa.vector_floats
        skp, dvp = -(-spec.sk // w) * w, -(-spec.dv // w) * w
        kt = spec.d * skp if knobs.pack_k else 0
        vp = spec.sk * dvp if self._packs_v(spec, isa) else 0
        return kt + vp + knobs.tq * skp + len(spec.slot_full) * skp

    def _slots(self, spec, knobs) -> int:
        ntasks = spec.n_batch * -(-spec.sq // knobs.tq)
        return 1 if knobs.serial else min(ntasks, 16)

    def _workspace_bytes(self, spec, knobs, isa) -> int:
        return 4 * self._slots(spec, knobs) * self._slot_floats(spec, knobs, isa)

    def validate(self, spec: AttentionSpec, knobs: AttentionKnobs, isa) -> None:
        if not isinstance(knobs, AttentionKnobs):
            raise KnobError(f"attention knobs must be AttentionKnobs, got {knobs!r}")
        if not 1 <= knobs.tq <= max(1, spec.sq) or not isinstance(knobs.serial, bool):
            raise KnobError(f"attention: tq={knobs.tq} must be in [1, {spec.sq}]")
        if not isinstance(knobs.pack_k, bool) or not (knobs.pack_k
                                                      or self._dots_in_place(spec, isa)):
            raise KnobError("attention: pack_k=False needs Q and K contiguous along d in "
                            "whole vectors")
        if spec.sk > _MAX_ROW:
            raise KnobError(f"attention over {spec.sk} keys: more than {_MAX_ROW} per row "
                            f"does not fit a task's score block")
        if len(spec.instructions) // 5 > _MAX_INSTRUCTIONS:
            raise KnobError("attention: row program too long")
        self._check_reach(spec)
        ws = self._workspace_bytes(spec, knobs, isa)
        if ws > _MAX_WORKSPACE:
            raise KnobError(f"attention workspace of {ws} bytes exceeds {_MAX_WORKSPACE}")

    @staticmethod
    def _check_reach(spec) -> None:
        """Every element the kernel reads of Q, K and V lies in the buffer it is given."""
        if not spec.in_sizes:
            return
        sizes = (*spec.batch, spec.sq, spec.d), (*spec.batch, spec.sk, spec.d), (
            *spec.batch, spec.sk, spec.dv)
        for name, off, strides, dims, size in zip("QKV", spec.offsets, (
                spec.q_strides, spec.k_strides, spec.v_strides), sizes, spec.in_sizes):
            last = off + sum((n - 1) * abs(s) for n, s in zip(dims, strides))
            if off < 0 or last >= size:
                raise KnobError(f"attention: {name} read at offset {off} with strides "
                                f"{strides} reaches element {last} of a buffer of {size}")

    def render(self, spec: AttentionSpec, knobs: AttentionKnobs, isa):
        self.validate(spec, knobs, isa)
        n = len(spec.batch)
        for name, strides in (("q", spec.q_strides), ("k", spec.k_strides),
                              ("v", spec.v_strides), ("out", spec.out_strides)):
            if len(strides) != n + 2:
                raise rn.RenderError(f"attention {name} strides {strides}: need {n + 2}")
        values = {
            "W": isa.vector_floats, "NB": n, "BATCH": tuple(spec.batch),
            "SQ": spec.sq, "SK": spec.sk, "D": spec.d, "DV": spec.dv,
            "Q_STRIDES": spec.q_strides, "K_STRIDES": spec.k_strides,
            "V_STRIDES": spec.v_strides, "OUT_STRIDES": spec.out_strides,
            "OFFSETS": tuple(spec.offsets),
            **row_program.template_values("attention", spec),
            "TQ": knobs.tq, "SERIAL": knobs.serial, "PACK_K": knobs.pack_k,
            "WORKSPACE_BYTES": self._workspace_bytes(spec, knobs, isa),
        }
        return rn.kernel_source("attention.cc", "alt_attention", values)

    def lower(self, spec: AttentionSpec, kernel, operands: Sequence) -> list:
        """operands: Q, K, V (or what they are views of) and the externals, as the match
        reads them."""
        import jax
        import jax.numpy as jnp

        from alt_jax import runtime

        if len(operands) != 3 + len(spec.ext_dtypes):
            raise ValueError(f"attention kernel: expected Q, K, V and "
                             f"{len(spec.ext_dtypes)} externals, got {len(operands)} operands")
        out = jax.ShapeDtypeStruct(spec.out_shape, jnp.float32)
        return runtime.ffi_call(kernel, operands, [out])


FAMILY = AttentionFamily()
