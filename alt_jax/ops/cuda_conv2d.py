"""The 2-D convolution family for NVIDIA GPUs: the CPU family's Conv2dSpec (any strides,
padding, dilation and groups; NHWC, NCHW or channel-blocked NCHW[x]c input and output, any
linear weight layout) as an implicit GEMM on the shared tiled core, rendered from
codegen/cuda_conv2d.cu for nvcc and for the host emulation the tests check against lax.

Entry points: FAMILY (CudaConv2dFamily: default_knobs, validate, space, render, flops); the
knobs are cuda_common.CudaTileKnobs over the GEMM M = N*OH*OW pixels x KG output channels,
K = KH*KW*CG.
"""
from __future__ import annotations

import math


from alt_jax.codegen import render as rn
from alt_jax.ops import cuda_common as cc
from alt_jax.ops import conv2d as cpu_conv2d
from alt_jax.ops.base import KnobError, Space
from alt_jax.ops.conv2d import Conv2dSpec
from alt_jax.ops.cuda_common import CudaTileKnobs


class CudaConv2dFamily(cc.CudaConvFamily):
    name = "cuda_conv2d"
    knobs_type = CudaTileKnobs
    cpu_family = cpu_conv2d.FAMILY

    def channel_args(self, spec: Conv2dSpec) -> tuple:
        return (spec.c, spec.cg, spec.groups), (spec.k, spec.kg, spec.groups)

    def flops(self, spec: Conv2dSpec) -> int:
        return 2 * spec.n * spec.k * spec.oh * spec.ow * spec.cg * spec.kh * spec.kw

    @staticmethod
    def _gemm(spec: Conv2dSpec) -> tuple:
        """(M pixels, N output channels per group, K reduction) of the implicit GEMM."""
        return spec.n * spec.oh * spec.ow, spec.kg, spec.kh * spec.kw * spec.cg

    def default_knobs(self, spec: Conv2dSpec, target=None) -> CudaTileKnobs:
        """As the matmul's, on the implicit GEMM (loads along the channels)."""
        m, n, depth = self._gemm(spec)
        return cc.default_tile(m, n, depth, spec.groups, lambda k: self._vec_problem(spec, k))

    def _vec_problem(self, spec: Conv2dSpec, k: CudaTileKnobs):
        """Why vec-float loads cannot be used, or None: a vector runs along the input's
        channels (contiguous, in whole vectors of a group and of a channel block, other
        strides aligned) and along the weights' output channels (likewise)."""
        if k.vec == 1:
            return None
        v = k.vec
        lhs, _ = self.blocks(spec)
        cb, cbs, cs = lhs["C"]
        others = [lhs[d][2] for d in "NHW"] + ([cbs] if cb < spec.c else [])
        a_ok = (cs == 1 and spec.cg % v == 0 and cb % v == 0 and k.kc % v == 0
                and all(s % v == 0 for s in others))
        ro, ri, rh, rw = spec.rhs_strides
        b_ok = ro == 1 and spec.kg % v == 0 and k.nc % v == 0 and all(
            s % v == 0 for s in (ri, rh, rw))
        if not (a_ok and b_ok):
            return (f"vec={v}: the input's channels and the weights' output channels must be "
                    f"contiguous in whole vectors of {v} (input {spec.lhs_layout}, weights "
                    f"{spec.rhs_layout}, {spec.cg} / {spec.kg} channels a group)")
        return None

    def validate(self, spec: Conv2dSpec, knobs: CudaTileKnobs, target=None) -> None:
        if spec.prepacked:
            raise KnobError("cuda_conv2d reads the weights as the program has them: "
                            "prepacked specs are the CPU family's")
        spec.rhs_strides  # KnobError unless the weights have one stride per dim
        self.blocks(spec)
        m, _, depth = self._gemm(spec)
        cc.check_gemm(self.name, knobs, m, depth, spec.groups,
                      lambda k: self._vec_problem(spec, k))

    def space(self, spec: Conv2dSpec, target=None) -> Space:
        return Space(self.name, CudaTileKnobs, cc.tile_axes(self.default_knobs(spec)))

    def render(self, spec: Conv2dSpec, knobs: CudaTileKnobs, target=None):
        """runtime.KernelSource: the emulation for the host compiler, SYMBOL_launch for nvcc;
        inputs [lhs, rhs, *epilogue inputs], workspace the split-K partials."""
        self.validate(spec, knobs)
        lhs, out = self.blocks(spec)
        ro, ri, rh, rw = spec.rhs_strides
        (sh, sw), (dh, dw) = spec.stride, spec.dilation
        epi = spec.epilogue
        m, n, _ = self._gemm(spec)
        partials = spec.groups * m * n
        values = {
            "N": spec.n, "C": spec.c, "H": spec.h, "IW": spec.w, "K": spec.k,
            "KH": spec.kh, "KW": spec.kw, "OH": spec.oh, "OW": spec.ow, "G": spec.groups,
            "CG": spec.cg, "KG": spec.kg, "SH": sh, "SW": sw, "DH": dh, "DW": dw,
            "PT": spec.padding[0][0], "PL": spec.padding[1][0],
            "LHS_N": lhs["N"][2], "LHS_H": lhs["H"][2], "LHS_W": lhs["W"][2],
            "LHS_CB": lhs["C"][0], "LHS_CBS": lhs["C"][1], "LHS_C": lhs["C"][2],
            "RHS_O": ro, "RHS_I": ri, "RHS_H": rh, "RHS_W": rw,
            "OUT_N": out["N"][2], "OUT_H": out["H"][2], "OUT_W": out["W"][2],
            "OUT_KB": out["C"][0], "OUT_KBS": out["C"][1], "OUT_K": out["C"][2],
            "LHS_SIZE": math.prod(spec.lhs_shape), "RHS_SIZE": math.prod(spec.rhs_shape),
            "OUT_SIZE": math.prod(spec.out_shape),
            "ACT": epi.activation_code, "SCALE": epi.scale, "SHIFT": epi.shift,
            "RESIDUAL": epi.residual, **cc.tile_values(knobs),
            "WORKSPACE_BYTES": 4 * knobs.split_k * partials if knobs.split_k > 1 else 0,
        }
        return rn.kernel_source("cuda_conv2d.cu", "alt_cuda_conv2d", values)


FAMILY = CudaConv2dFamily()
