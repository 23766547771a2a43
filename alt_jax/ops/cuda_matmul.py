"""The matmul family for NVIDIA GPUs: the same MatmulSpec as the CPU family (a dot_general as
batch x (M x K) @ (K x N), operands read through strides, a fused epilogue over N), rendered
from codegen/cuda_matmul.cu, which compiles with nvcc for a GPU and with the host compiler as
an emulation (csrc/include/alt_jax/cuda_block.h) that the tests run against lax here.

Entry points: FAMILY (CudaMatmulFamily: default_knobs, validate, space, render, flops); the
knobs are cuda_common.CudaTileKnobs (named as the CPU matmul's where the meaning is the same).
"""
from __future__ import annotations

import math

from alt_jax.codegen import render as rn
from alt_jax.ops import cuda_common as cc
from alt_jax.ops.base import KnobError, Space
from alt_jax.ops.cuda_common import CudaTileKnobs
from alt_jax.ops import matmul as cpu_matmul
from alt_jax.ops.matmul import MatmulSpec


def _buffer_elements(layout) -> int:
    return math.prod(layout.shape)


class CudaMatmulFamily:
    name = "cuda_matmul"
    knobs_type = CudaTileKnobs
    residual_in_place = False

    def match(self, eqn) -> MatmulSpec:
        """The CPU family's spec of a dot_general (Unsupported for what neither takes)."""
        return cpu_matmul.FAMILY.match(eqn)

    def prefers(self, spec: MatmulSpec) -> bool:
        return True

    def kernel_inputs(self, spec: MatmulSpec, knobs, operands, target=None) -> list:
        """What the kernel reads, from the equation's operands [lhs, rhs, *epilogue inputs]
        (the tuner's example inputs): what lower() passes it."""
        return list(cpu_matmul.MatmulFamily._ffi_operands(spec, operands))

    def lower(self, spec: MatmulSpec, kernel, operands, reuse_residual: bool = False) -> list:
        """operands [lhs, rhs, *epilogue inputs] as the equation has them: A and B
        rearranged as the spec reads them (a transpose only where one stride per dim cannot
        address the operand), then the kernel on the GPU."""
        import jax
        import jax.numpy as jnp

        from alt_jax import runtime

        if reuse_residual:
            raise ValueError("cuda_matmul kernels write a fresh output (residual_in_place is "
                             "False)")
        out = jax.ShapeDtypeStruct(spec.out_shape, jnp.float32)
        return runtime.cuda_ffi_call(kernel, self.kernel_inputs(spec, None, operands), [out])

    def flops(self, spec: MatmulSpec) -> int:
        return 2 * spec.batch * spec.m * spec.n * spec.k

    def default_knobs(self, spec: MatmulSpec, target=None) -> CudaTileKnobs:
        return cc.default_tile(spec.m, spec.n, spec.k, spec.batch,
                               lambda k: self._vec_problem(spec, k))

    @staticmethod
    def _vec_problem(spec: MatmulSpec, k: CudaTileKnobs):
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

    def validate(self, spec: MatmulSpec, knobs: CudaTileKnobs, target=None) -> None:
        if spec.prepacked:
            raise KnobError("cuda_matmul reads B as the program has it: prepacked specs are "
                            "the CPU family's")
        cc.check_gemm(self.name, knobs, spec.m, spec.k, spec.batch,
                      lambda k: self._vec_problem(spec, k))

    def space(self, spec: MatmulSpec, target=None) -> Space:
        return Space(self.name, CudaTileKnobs, cc.tile_axes(self.default_knobs(spec)))

    def render(self, spec: MatmulSpec, knobs: CudaTileKnobs, target=None):
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
            "RESIDUAL": epi.residual, **cc.tile_values(k),
            "WORKSPACE_BYTES": (4 * k.split_k * spec.batch * spec.m * spec.n
                                if k.split_k > 1 else 0),
        }
        return rn.kernel_source("cuda_matmul.cu", "alt_cuda_matmul", values)


FAMILY = CudaMatmulFamily()
