"""The matmul family for NVIDIA GPUs: the same MatmulSpec as the CPU family (a dot_general as
batch x (M x K) @ (K x N), operands read through strides, a fused epilogue over N), rendered
from codegen/cuda_matmul.cu, which compiles with nvcc for a GPU and with the host compiler as
an emulation (csrc/include/alt_jax/cuda_block.h) that the tests run against lax here.

Entry points: FAMILY (CudaMatmulFamily: default_knobs, validate, space, render, flops),
CudaMatmulKnobs. Knob names follow the CPU matmul where the meaning is the same: mc x nc is
the tile of C one unit of work computes (a thread block here, a task there), kc the depth of
A and B staged at a time (in shared memory here, in packed panels there), mr the rows of a
register tile (nr its columns: the CPU counts vectors, nv).
"""
from __future__ import annotations

import dataclasses
import math

from alt_jax.codegen import render as rn
from alt_jax.ops.base import Axis, KnobError, Space, axis_values
from alt_jax.ops.matmul import MatmulSpec

_MAX_SHARED = 48 * 1024     # bytes of static shared memory a block may use without opt-in
_MAX_THREADS = 1024
_MAX_GRID_YZ = 65535
_MAX_ACCUMULATORS = 128     # mr x nr floats of registers per thread


@dataclasses.dataclass(frozen=True)
class CudaMatmulKnobs:
    """mc x nc: a thread block's tile of C; kc: the depth of A and B staged in shared memory
    at a time; mr x nr: a thread's tile of accumulators (registers); wm x wn: a warp's tile
    (32 threads of mr x nr: (wm / mr) x (wn / nr) = 32); stages: shared-memory stages (2:
    the next kc slice loads while this one is used); vec: floats per global load along the
    operands' contiguous dims (1, 2 or 4); split_k: slices of K computed by separate blocks
    and summed by a second kernel (for few output tiles and a deep K)."""

    mc: int = 64
    nc: int = 64
    kc: int = 16
    mr: int = 4
    nr: int = 4
    wm: int = 32
    wn: int = 16
    stages: int = 2
    vec: int = 1
    split_k: int = 1

    @property
    def threads(self) -> int:
        return (self.mc // self.wm) * (self.nc // self.wn) * 32


def _buffer_elements(layout) -> int:
    return math.prod(layout.shape)


class CudaMatmulFamily:
    name = "cuda_matmul"
    knobs_type = CudaMatmulKnobs

    def flops(self, spec: MatmulSpec) -> int:
        return 2 * spec.batch * spec.m * spec.n * spec.k

    def default_knobs(self, spec: MatmulSpec) -> CudaMatmulKnobs:
        """64 x 64 block tiles of 4 x 4 per thread (256 threads), double-buffered; 4-float
        loads where the operands allow them; split K when the grid has fewer blocks than
        an H200 has SMs (132) and K is deep."""
        base = CudaMatmulKnobs()
        if spec.m <= 16:  # a decode step: thin tiles, more of them
            base = dataclasses.replace(base, mc=16, nc=128, mr=2, nr=4, wm=16, wn=16)
        for vec in (4, 2, 1):
            k = dataclasses.replace(base, vec=vec)
            if self._vec_problem(spec, k) is None:
                base = k
                break
        blocks = spec.batch * -(-spec.m // base.mc) * -(-spec.n // base.nc)
        split = 1
        while blocks * split * 2 <= 132 and spec.k // (split * 2) >= 4 * base.kc:
            split *= 2
        return dataclasses.replace(base, split_k=split)

    @staticmethod
    def _vec_problem(spec: MatmulSpec, k: CudaMatmulKnobs):
        """Why vec loads of this width cannot be used, or None: each vector must lie along a
        unit-stride dim, in whole vectors of that dim and of the block tile, and start
        aligned (every other stride a multiple of vec)."""
        if k.vec == 1:
            return None
        ab, am, ak = spec.a_strides
        bb, bk, bn = spec.b_strides
        v = k.vec
        if ak == 1:
            a_ok = spec.k % v == 0 and k.kc % v == 0 and all(s % v == 0 for s in (ab, am))
        elif am == 1:
            a_ok = spec.m % v == 0 and k.mc % v == 0 and all(s % v == 0 for s in (ab, ak))
        else:
            a_ok = False
        if bn == 1:
            b_ok = spec.n % v == 0 and k.nc % v == 0 and all(s % v == 0 for s in (bb, bk))
        elif bk == 1:
            b_ok = spec.k % v == 0 and k.kc % v == 0 and all(s % v == 0 for s in (bb, bn))
        else:
            b_ok = False
        if not (a_ok and b_ok):
            return (f"vec={v}: A and B must each have a unit-stride dim whose size, block "
                    f"tile and other strides are multiples of {v} (A strides "
                    f"{spec.a_strides}, B strides {spec.b_strides}, M={spec.m} N={spec.n} "
                    f"K={spec.k})")
        return None

    def validate(self, spec: MatmulSpec, knobs: CudaMatmulKnobs) -> None:
        k = knobs
        if not isinstance(k, CudaMatmulKnobs):
            raise KnobError(f"cuda_matmul knobs must be CudaMatmulKnobs, got {k!r}")
        if spec.prepacked:
            raise KnobError("cuda_matmul reads B as the program has it: prepacked specs are "
                            "the CPU family's")
        if min(k.mc, k.nc, k.kc, k.mr, k.nr, k.wm, k.wn) < 1:
            raise KnobError(f"cuda_matmul: every tile size must be positive: {k}")
        if k.mc % k.wm or k.nc % k.wn or k.wm % k.mr or k.wn % k.nr:
            raise KnobError(f"cuda_matmul: mc={k.mc} must be a multiple of wm={k.wm}, nc={k.nc} "
                            f"of wn={k.wn}, wm of mr={k.mr} and wn of nr={k.nr}")
        if (k.wm // k.mr) * (k.wn // k.nr) != 32:
            raise KnobError(f"cuda_matmul: a warp tile of {k.wm} x {k.wn} in {k.mr} x {k.nr} "
                            f"thread tiles is {(k.wm // k.mr) * (k.wn // k.nr)} threads, not 32")
        if k.threads > _MAX_THREADS:
            raise KnobError(f"cuda_matmul: {k.threads} threads a block (limit {_MAX_THREADS})")
        if k.mr * k.nr > _MAX_ACCUMULATORS:
            raise KnobError(f"cuda_matmul: {k.mr} x {k.nr} accumulators a thread (limit "
                            f"{_MAX_ACCUMULATORS})")
        if k.stages not in (1, 2) or k.vec not in (1, 2, 4):
            raise KnobError(f"cuda_matmul: stages={k.stages} must be 1 or 2, vec={k.vec} 1, 2 "
                            f"or 4")
        shared = 4 * k.stages * k.kc * (k.mc + k.nc)
        if shared > _MAX_SHARED:
            raise KnobError(f"cuda_matmul: {shared} bytes of shared memory a block (limit "
                            f"{_MAX_SHARED})")
        if not 1 <= k.split_k <= max(1, spec.k):
            raise KnobError(f"cuda_matmul: split_k={k.split_k} must be in [1, K={spec.k}]")
        if -(-spec.m // k.mc) > _MAX_GRID_YZ or spec.batch * k.split_k > _MAX_GRID_YZ:
            raise KnobError(f"cuda_matmul: grid of {-(-spec.m // k.mc)} row blocks x "
                            f"{spec.batch * k.split_k} batch slices exceeds {_MAX_GRID_YZ}")
        problem = self._vec_problem(spec, k)
        if problem:
            raise KnobError(f"cuda_matmul: {problem}")

    def space(self, spec: MatmulSpec) -> Space:
        return Space(self.name, CudaMatmulKnobs, (
            Axis("mc", axis_values(16, 32, 64, 128), "loop"),
            Axis("nc", axis_values(32, 64, 128), "loop"),
            Axis("kc", axis_values(8, 16, 32), "loop"),
            Axis("mr", axis_values(2, 4, 8), "loop"),
            Axis("nr", axis_values(2, 4, 8), "loop"),
            Axis("wm", axis_values(16, 32, 64), "loop"),
            Axis("wn", axis_values(16, 32, 64), "loop"),
            Axis("stages", (1, 2), "loop"),
            Axis("vec", (1, 2, 4), "layout"),
            Axis("split_k", axis_values(1, 2, 4, 8), "loop"),
        ))

    def render(self, spec: MatmulSpec, knobs: CudaMatmulKnobs):
        """The kernel's source (runtime.KernelSource): built by the host compiler it is the
        emulation, exporting the symbol with the alt_runtime ABI; built by nvcc it exports
        SYMBOL_launch(stream, inputs, outputs). Workspace: the split-K partials."""
        self.validate(spec, knobs)
        epi = spec.epilogue
        k = knobs
        values = {
            "BATCH": spec.batch, "M": spec.m, "N": spec.n, "K": spec.k,
            "A_STRIDES": tuple(spec.a_strides), "B_STRIDES": tuple(spec.b_strides),
            "A_SIZE": _buffer_elements(spec.a_layout), "B_SIZE": _buffer_elements(spec.b_layout),
            "ACT": epi.activation_code, "SCALE": epi.scale, "SHIFT": epi.shift,
            "RESIDUAL": epi.residual,
            "MC": k.mc, "NC": k.nc, "KC": k.kc, "MR": k.mr, "NR": k.nr, "WM": k.wm, "WN": k.wn,
            "STAGES": k.stages, "VEC": k.vec, "SPLIT_K": k.split_k,
            "WORKSPACE_BYTES": (4 * k.split_k * spec.batch * spec.m * spec.n
                                if k.split_k > 1 else 0),
        }
        return rn.kernel_source("cuda_matmul.cu", "alt_cuda_matmul", values)


FAMILY = CudaMatmulFamily()
