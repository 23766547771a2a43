"""The depthwise conv family for NVIDIA GPUs: the CPU family's DepthwiseSpec (strides,
padding, dilation, a channel multiplier; input and output in NHWC, NCHW or NCHW[x]c, linear
weights), rendered from codegen/cuda_depthwise.cu for nvcc and for the host emulation the
tests check against lax.

Entry points: FAMILY (CudaDepthwiseFamily: default_knobs, validate, space, render, flops),
CudaDepthwiseKnobs (c_block, ow_tile and oh_rows as the CPU depthwise names them).
"""
from __future__ import annotations

import dataclasses
import math


from alt_jax.codegen import render as rn
from alt_jax.ops import cuda_common as cc
from alt_jax.ops import depthwise as cpu_depthwise
from alt_jax.ops.base import Axis, KnobError, Space, axis_values
from alt_jax.ops.depthwise import DepthwiseSpec

_MAX_REGISTER_FLOATS = 160  # weights + accumulators a thread keeps


@dataclasses.dataclass(frozen=True)
class CudaDepthwiseKnobs:
    """c_block: output channels of a thread block (as the CPU's: channels a unit of work
    covers); ow_tile: output columns per thread (the CPU's register tile); oh_rows: output
    rows a block walks (the CPU's rows per task); ow_threads: threads of a block along the
    columns (c_block / vec along the channels); vec: channels per thread and per load (1, 2
    or 4); stage_input: stage each output row's input window in shared memory first."""

    c_block: int = 32
    ow_threads: int = 8
    ow_tile: int = 2
    oh_rows: int = 4
    vec: int = 1
    stage_input: bool = False

    @property
    def threads(self) -> int:
        return self.c_block // self.vec * self.ow_threads


class CudaDepthwiseFamily(cc.CudaConvFamily):
    name = "cuda_depthwise"
    knobs_type = CudaDepthwiseKnobs
    cpu_family = cpu_depthwise.FAMILY

    def channel_args(self, spec: DepthwiseSpec) -> tuple:
        return (spec.c, None, 1), (spec.k, None, 1)  # no group blocks to keep whole

    def flops(self, spec: DepthwiseSpec) -> int:
        return 2 * spec.n * spec.k * spec.oh * spec.ow * spec.kh * spec.kw

    @staticmethod
    def _window(spec: DepthwiseSpec, k: CudaDepthwiseKnobs) -> tuple:
        """(rows, columns) of one output row's input window for a block."""
        (sh, sw), (dh, dw) = spec.stride, spec.dilation
        span = k.ow_threads * k.ow_tile
        return (spec.kh - 1) * dh + 1, (span - 1) * sw + (spec.kw - 1) * dw + 1

    def _vec_problem(self, spec: DepthwiseSpec, k: CudaDepthwiseKnobs):
        if k.vec == 1:
            return None
        v = k.vec
        lhs, _ = self.blocks(spec)
        cb, cbs, cs = lhs["C"]
        ro, _, rh, rw = spec.rhs_strides
        others = [lhs[d][2] for d in "NHW"] + ([cbs] if cb < spec.c else [])
        if not (spec.mult == 1 and cs == 1 and spec.c % v == 0 and cb % v == 0
                and k.c_block % v == 0 and all(s % v == 0 for s in others)
                and ro == 1 and rh % v == 0 and rw % v == 0):
            return (f"vec={v}: needs multiplier 1 and the input's and the weights' channels "
                    f"contiguous in whole vectors of {v} (input {spec.lhs_layout}, weights "
                    f"{spec.rhs_layout}, {spec.c} channels)")
        return None

    def default_knobs(self, spec: DepthwiseSpec, target=None) -> CudaDepthwiseKnobs:
        """32 threads along the channels (vec of 4 where they are contiguous), 8 along the
        columns, 2 columns and 4 rows each; no staging (L1 catches the window's reuse)."""
        for vec in (4, 2):
            k = CudaDepthwiseKnobs(c_block=32 * vec, vec=vec)
            try:
                self.validate(spec, k)
                return k
            except KnobError:  # channels not contiguous, a multiplier, too many registers
                continue
        return CudaDepthwiseKnobs()

    def validate(self, spec: DepthwiseSpec, knobs: CudaDepthwiseKnobs, target=None) -> None:
        k = knobs
        if not isinstance(k, CudaDepthwiseKnobs):
            raise KnobError(f"cuda_depthwise knobs must be CudaDepthwiseKnobs, got {k!r}")
        if spec.prepacked:
            raise KnobError("cuda_depthwise reads the weights as the program has them")
        if min(k.c_block, k.ow_threads, k.ow_tile, k.oh_rows) < 1 or k.vec not in (1, 2, 4):
            raise KnobError(f"cuda_depthwise: sizes must be positive and vec 1, 2 or 4: {k}")
        if k.c_block % k.vec:
            raise KnobError(f"cuda_depthwise: c_block={k.c_block} is not whole vectors of "
                            f"{k.vec}")
        if k.threads > cc.MAX_THREADS:
            raise KnobError(f"cuda_depthwise: {k.threads} threads a block (limit "
                            f"{cc.MAX_THREADS})")
        regs = (spec.kh * spec.kw + k.ow_tile) * k.vec
        if regs > _MAX_REGISTER_FLOATS:
            raise KnobError(f"cuda_depthwise: {spec.kh}x{spec.kw} weights and {k.ow_tile} "
                            f"columns of {k.vec} channels are {regs} registers a thread "
                            f"(limit {_MAX_REGISTER_FLOATS})")
        spec.rhs_strides  # KnobError unless the weights have one stride per dim
        self.blocks(spec)
        if k.stage_input:
            if spec.mult != 1:
                raise KnobError("cuda_depthwise: stage_input needs a channel multiplier of 1")
            rows, cols = self._window(spec, k)
            shared = 4 * rows * cols * k.c_block
            if shared > cc.MAX_SHARED:
                raise KnobError(f"cuda_depthwise: an input window of {rows} x {cols} x "
                                f"{k.c_block} is {shared} bytes of shared memory (limit "
                                f"{cc.MAX_SHARED})")
        if spec.n * -(-spec.oh // k.oh_rows) > cc.MAX_GRID_YZ or -(
                -spec.ow // (k.ow_threads * k.ow_tile)) > cc.MAX_GRID_YZ:
            raise KnobError(f"cuda_depthwise: the grid exceeds {cc.MAX_GRID_YZ} blocks along "
                            f"y or z; raise oh_rows or ow_tile")
        problem = self._vec_problem(spec, k)
        if problem:
            raise KnobError(f"cuda_depthwise: {problem}")

    def space(self, spec: DepthwiseSpec, target=None) -> Space:
        d = self.default_knobs(spec)
        return Space(self.name, CudaDepthwiseKnobs, (
            Axis("c_block", axis_values((16, 32, 64, 128), d.c_block), "loop"),
            Axis("ow_threads", axis_values((1, 2, 4, 8, 16), d.ow_threads), "loop"),
            Axis("ow_tile", axis_values((1, 2, 4), d.ow_tile), "loop"),
            Axis("oh_rows", axis_values((1, 2, 4, 8), d.oh_rows), "loop"),
            Axis("vec", axis_values((1, 2, 4), d.vec), "layout"),
            Axis("stage_input", (False, True), "layout"),
        ))

    def render(self, spec: DepthwiseSpec, knobs: CudaDepthwiseKnobs, target=None):
        """runtime.KernelSource: the emulation for the host compiler, SYMBOL_launch for nvcc;
        inputs [lhs, rhs, *epilogue inputs]."""
        self.validate(spec, knobs)
        lhs, out = self.blocks(spec)
        ro, _, rh, rw = spec.rhs_strides
        (sh, sw), (dh, dw) = spec.stride, spec.dilation
        epi, k = spec.epilogue, knobs
        values = {
            "N": spec.n, "C": spec.c, "MULT": spec.mult, "H": spec.h, "IW": spec.w,
            "KH": spec.kh, "KW": spec.kw, "OH": spec.oh, "OW": spec.ow, "SH": sh, "SW": sw,
            "DH": dh, "DW": dw, "PT": spec.padding[0][0], "PL": spec.padding[1][0],
            "LHS_N": lhs["N"][2], "LHS_H": lhs["H"][2], "LHS_W": lhs["W"][2],
            "LHS_CB": lhs["C"][0], "LHS_CBS": lhs["C"][1], "LHS_C": lhs["C"][2],
            "RHS_O": ro, "RHS_H": rh, "RHS_W": rw,
            "OUT_N": out["N"][2], "OUT_H": out["H"][2], "OUT_W": out["W"][2],
            "OUT_KB": out["C"][0], "OUT_KBS": out["C"][1], "OUT_K": out["C"][2],
            "LHS_SIZE": math.prod(spec.lhs_shape), "RHS_SIZE": math.prod(spec.rhs_shape),
            "OUT_SIZE": math.prod(spec.out_shape),
            "ACT": epi.activation_code, "SCALE": epi.scale, "SHIFT": epi.shift,
            "RESIDUAL": epi.residual, "C_BLOCK": k.c_block, "OW_THREADS": k.ow_threads,
            "OW_TILE": k.ow_tile, "OH_ROWS": k.oh_rows, "VEC": k.vec,
            "STAGE_INPUT": k.stage_input, "WORKSPACE_BYTES": 0,
        }
        return rn.kernel_source("cuda_depthwise.cu", "alt_cuda_depthwise", values)


FAMILY = CudaDepthwiseFamily()
