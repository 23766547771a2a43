"""What the CUDA GEMM-shaped families share (ops/cuda_matmul.py, ops/cuda_conv2d.py): the
knobs of the tiled GEMM core (csrc/include/alt_jax/cuda_gemm.h), their hardware limits, their
search axes and template values.

Entry points: CudaTileKnobs, check_tile(family, knobs), tile_axes(), tile_values(knobs),
split_for(blocks, depth, knobs), CudaConvFamily (what the CUDA conv families share).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from alt_jax.ops.base import Axis, KnobError, Unsupported, axis_values
from alt_jax.ops.conv_common import channel_blocks, lower_conv, relayout

MAX_SHARED = 48 * 1024     # bytes of static shared memory a block may use without opt-in
MAX_THREADS = 1024
MAX_GRID_YZ = 65535
MAX_ACCUMULATORS = 128     # mr x nr floats of registers per thread
SMS = 132                  # streaming multiprocessors of an H100 / H200: the split-K target


@dataclasses.dataclass(frozen=True)
class CudaTileKnobs:
    """The tiled GEMM of a CUDA kernel (names as the CPU matmul's where the meaning is the
    same): mc x nc: a thread block's tile of C (a task's, on the CPU); kc: the depth of A
    and B staged in shared memory at a time (packed panels, on the CPU); mr x nr: a thread's
    tile of accumulators in registers; wm x wn: a warp's tile (32 threads of mr x nr:
    (wm / mr) x (wn / nr) = 32); stages: shared-memory stages (2: the next kc slice loads
    while this one is used); vec: floats per global load along the operands' contiguous
    dims (1, 2 or 4); split_k: slices of K computed by separate blocks and summed by a
    second kernel (for few output tiles and a deep K)."""

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

    @property
    def shared_bytes(self) -> int:
        return 4 * self.stages * self.kc * (self.mc + self.nc)


THIN = dict(mc=16, nc=128, mr=2, nr=4, wm=16, wn=16)  # few rows (a decode step, 7x7 maps)


def check_tile(family: str, k: CudaTileKnobs) -> None:
    """KnobError naming the limit a tile breaks (threads, warps, registers, shared memory)."""
    if not isinstance(k, CudaTileKnobs):
        raise KnobError(f"{family} knobs must be CudaTileKnobs, got {k!r}")
    if min(k.mc, k.nc, k.kc, k.mr, k.nr, k.wm, k.wn) < 1:
        raise KnobError(f"{family}: every tile size must be positive: {k}")
    if k.mc % k.wm or k.nc % k.wn or k.wm % k.mr or k.wn % k.nr:
        raise KnobError(f"{family}: mc={k.mc} must be a multiple of wm={k.wm}, nc={k.nc} of "
                        f"wn={k.wn}, wm of mr={k.mr} and wn of nr={k.nr}")
    if (k.wm // k.mr) * (k.wn // k.nr) != 32:
        raise KnobError(f"{family}: a warp tile of {k.wm} x {k.wn} in {k.mr} x {k.nr} thread "
                        f"tiles is {(k.wm // k.mr) * (k.wn // k.nr)} threads, not 32")
    if k.threads > MAX_THREADS:
        raise KnobError(f"{family}: {k.threads} threads a block (limit {MAX_THREADS})")
    if k.mr * k.nr > MAX_ACCUMULATORS:
        raise KnobError(f"{family}: {k.mr} x {k.nr} accumulators a thread (limit "
                        f"{MAX_ACCUMULATORS})")
    if k.stages not in (1, 2) or k.vec not in (1, 2, 4):
        raise KnobError(f"{family}: stages={k.stages} must be 1 or 2, vec={k.vec} 1, 2 or 4")
    if k.shared_bytes > MAX_SHARED:
        raise KnobError(f"{family}: {k.shared_bytes} bytes of shared memory a block (limit "
                        f"{MAX_SHARED})")
    if k.split_k < 1:
        raise KnobError(f"{family}: split_k={k.split_k} must be at least 1")


def tile_axes(default: CudaTileKnobs) -> tuple:
    """The search axes, each holding the heuristic's value (so it is a point of the space)."""
    d = default
    return (
        Axis("mc", axis_values((16, 32, 64, 128), d.mc), "loop"),
        Axis("nc", axis_values((32, 64, 128), d.nc), "loop"),
        Axis("kc", axis_values((8, 16, 32), d.kc), "loop"),
        Axis("mr", axis_values((2, 4, 8), d.mr), "loop"),
        Axis("nr", axis_values((2, 4, 8), d.nr), "loop"),
        Axis("wm", axis_values((16, 32, 64), d.wm), "loop"),
        Axis("wn", axis_values((16, 32, 64), d.wn), "loop"),
        Axis("stages", axis_values((1, 2), d.stages), "loop"),
        Axis("vec", axis_values((1, 2, 4), d.vec), "layout"),
        Axis("split_k", axis_values((1, 2, 4, 8), d.split_k), "loop"),
    )


def tile_values(k: CudaTileKnobs) -> dict:
    return {"MC": k.mc, "NC": k.nc, "KC": k.kc, "MR": k.mr, "NR": k.nr, "WM": k.wm,
            "WN": k.wn, "STAGES": k.stages, "VEC": k.vec, "SPLIT_K": k.split_k}


def split_for(blocks: int, depth: int, knobs: CudaTileKnobs) -> int:
    """Split K in two until the grid fills the GPU's SMs or a slice would get thinner than
    four kc slices."""
    split = 1
    while blocks * split * 2 <= SMS and depth // (split * 2) >= 4 * knobs.kc:
        split *= 2
    return split


def default_tile(rows: int, cols: int, depth: int, batch: int, vec_problem) -> CudaTileKnobs:
    """The heuristic tile of a GEMM of batch x (rows x depth) @ (depth x cols): 64 x 64
    blocks of 4 x 4 per thread (256 threads), double-buffered; thin tiles for a few rows;
    the widest loads vec_problem(knobs) allows (None: allowed); split K when the grid has
    fewer blocks than the GPU has SMs and K is deep."""
    base = CudaTileKnobs(**(THIN if rows <= 16 else {}))
    base = next(k for k in (dataclasses.replace(base, vec=v) for v in (4, 2, 1))
                if vec_problem(k) is None)
    blocks = batch * -(-rows // base.mc) * -(-cols // base.nc)
    return dataclasses.replace(base, split_k=split_for(blocks, depth, base))


def check_gemm(family: str, k: CudaTileKnobs, rows: int, depth: int, batch: int,
               vec_problem) -> None:
    """check_tile, then what the GEMM's sizes allow: split_k within its depth, a grid within
    CUDA's y and z limits, the loads vec_problem(k) allows."""
    check_tile(family, k)
    if not 1 <= k.split_k <= max(1, depth):
        raise KnobError(f"{family}: split_k={k.split_k} must be in [1, {depth}] (the GEMM's "
                        f"K)")
    if -(-rows // k.mc) > MAX_GRID_YZ or batch * k.split_k > MAX_GRID_YZ:
        raise KnobError(f"{family}: grid of {-(-rows // k.mc)} row blocks x "
                        f"{batch * k.split_k} batch slices exceeds {MAX_GRID_YZ}")
    problem = vec_problem(k)
    if problem:
        raise KnobError(f"{family}: {problem}")


class CudaConvFamily:
    """What the CUDA conv families (ops/cuda_conv2d.py, ops/cuda_depthwise.py) share: the
    CPU family's spec, input and output addressed by (block, outer, inner) strides per dim
    (so any permutation or NCHW[x]c layout), the operands passed as they are."""

    name = ""
    cpu_family = None        # whose match() gives the spec
    residual_in_place = False

    def match(self, eqn):
        return self.cpu_family.match(eqn)

    def prefers(self, spec) -> bool:
        return True

    def channel_args(self, spec) -> tuple:
        """channel_blocks' (channels, per_group, groups) of the input and of the output."""
        raise NotImplementedError

    def blocks(self, spec) -> tuple:
        """(lhs, out) {dim: (block, outer, inner)}; KnobError when a layout is not
        addressable by a block and two strides."""
        (c, cg, g), (k, kg, gk) = self.channel_args(spec)
        try:
            return (channel_blocks(self.name, spec.lhs_layout, "lhs", c, cg, g),
                    channel_blocks(self.name, spec.out_layout, "output", k, kg, gk))
        except Unsupported as e:
            raise KnobError(str(e)) from None

    def relayout(self, spec, lhs=None, out=None):
        """spec reading `lhs` and writing `out` (Layouts over N C H W; None keeps the
        spec's): any the template addresses by block strides (permutations, NCHW[x]c)."""
        new = relayout(spec, lhs, out, blocked=True)
        try:
            self.blocks(new)
        except KnobError as e:
            raise Unsupported(str(e)) from None
        return new

    def kernel_inputs(self, spec, knobs, operands, target=None) -> list:
        """What the kernel reads: the equation's operands as they are (the spec's layouts)."""
        return list(operands)

    def lower(self, spec, kernel, operands, reuse_residual: bool = False) -> list:
        """operands [lhs, rhs, *epilogue inputs] in the spec's layouts, checked as the CPU
        families check them, then the kernel on the GPU."""
        import jax

        from alt_jax import runtime

        if reuse_residual:
            raise ValueError(f"{self.name} kernels write a fresh output")
        lower_conv(self.name, spec, None, operands, check_only=True)
        out = jax.ShapeDtypeStruct(spec.out_shape, np.float32)
        return runtime.cuda_ffi_call(kernel, list(operands), [out])
