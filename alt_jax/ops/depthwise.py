"""Depthwise 2-D convolution (feature_group_count == input channels) as generated kernels.

Entry points: FAMILY (a DepthwiseFamily: match, default_knobs, validate, space, render,
lower, pack_weights, kernel_inputs), DepthwiseSpec, DepthwiseKnobs.
Template: alt_jax/codegen/depthwise.cc (vectorised over channels, see its header).
Kernel inputs: [lhs, rhs (or pack_weights(rhs) when spec.prepacked), scale?, shift?,
residual?] (the last three as spec.epilogue.inputs()); the epilogue channel is K = C * mult.
"""
from __future__ import annotations

import dataclasses
import hashlib
from typing import Sequence

from alt_jax import device as device_mod
from alt_jax.codegen import render as render_mod
from alt_jax.ops.base import Axis, KnobError, Space, Unsupported, axis_values
from alt_jax.ops.epilogue import Epilogue
from alt_jax.layout import Layout
from alt_jax.ops.conv_common import (ConvOperands, check_types, dimension_numbers, relayout,
                                     conv_kernel_inputs, finite_weights_if_padded_1x1,
                                     lower_conv, read_conv)

_TEMPLATE = "depthwise.cc"
_MAX_WORKSPACE = 1 << 30  # bytes; beyond this the tuner should pick pack=False or fewer rows


@dataclasses.dataclass(frozen=True)
class DepthwiseSpec(ConvOperands):
    """One depthwise conv, canonical: sizes, window, and each operand's dimension order.

    lhs_layout / out_layout: the arrangement of (batch, channel, row, column) (Layouts over
    N C H W); rhs_layout of (out channel, in channel [size 1], kernel row, kernel column).
    epilogue: fused into the store (match() gives the identity; the planner replaces it).
    prepacked: inputs[1] is FAMILY.pack_weights(spec, knobs, rhs), not rhs; no weight
    packing per call.
    """

    n: int
    c: int            # input channels (= feature groups)
    mult: int         # channel multiplier: output channel k reads input channel k // mult
    h: int
    w: int
    kh: int
    kw: int
    oh: int
    ow: int
    stride: tuple[int, int]
    dilation: tuple[int, int]                  # rhs_dilation
    padding: tuple[tuple[int, int], tuple[int, int]]  # ((top, bottom), (left, right))
    lhs_layout: Layout
    rhs_layout: Layout
    out_layout: Layout
    epilogue: Epilogue = Epilogue()
    prepacked: bool = False

    @property
    def k(self) -> int:
        return self.c * self.mult

    rhs_in_channels = 1  # one input channel per group
    # records keyed this spec's dimension numbers under these names before layouts
    LAYOUT_FIELDS = (("lhs_layout", "lhs_order"), ("rhs_layout", "rhs_order"),
                     ("out_layout", "out_order"))


@dataclasses.dataclass(frozen=True, order=True)
class DepthwiseKnobs:
    """How the kernel loops; every combination validate() accepts is correct.

    c_block: channels per vector block (multiple of the ISA's vector width).
    ow_tile: output columns per register tile (ow_tile * c_block/VW accumulators).
    oh_rows: output rows per parallel task.
    pack:    copy each task's input rows into a zero-padded channel-blocked slot first
             (required unless channels are unit-stride, multiplier 1 and c_block divides K).
    c_inner: one task covers all channel blocks of its rows (else tasks split channels too).
    """

    c_block: int
    ow_tile: int
    oh_rows: int
    pack: bool
    c_inner: bool


class DepthwiseFamily:
    name = "depthwise"
    knobs_type = DepthwiseKnobs
    # one pass per tile; every store path reads the residual element before writing the
    # output element at the same offset
    residual_in_place = True

    @property
    def primitive(self):
        import jax

        return jax.lax.conv_general_dilated_p

    # ---- matching ----
    def match(self, eqn) -> DepthwiseSpec:
        g = read_conv(eqn)
        if g.groups != g.c or g.ci != 1:
            raise Unsupported(f"feature_group_count={g.groups} with {g.c} input channels: "
                              "not depthwise, the conv2d family handles it")
        return DepthwiseSpec(n=g.n, c=g.c, mult=g.k // g.c, h=g.h, w=g.w, kh=g.kh, kw=g.kw,
                             oh=g.oh, ow=g.ow, stride=g.stride, dilation=g.dilation,
                             padding=g.padding, **g.layouts)

    def relayout(self, spec, lhs=None, out=None):
        """spec reading its lhs in `lhs` and writing `out` (Layouts over N C H W; None keeps
        the spec's): permutations of N C H W only (its template addresses each dim by one stride); Unsupported otherwise."""
        return relayout(spec, lhs, out, blocked=False)

    def safe_operands(self, spec: DepthwiseSpec, lhs, rhs):
        """A padded 1x1 conv with a non-finite weight runs in XLA (see
        conv_common.finite_weights_if_padded_1x1: XLA's own answer there is its rewrite's)."""
        return finite_weights_if_padded_1x1(spec, rhs)

    def flops(self, spec: DepthwiseSpec) -> int:
        return 2 * spec.n * spec.k * spec.oh * spec.ow * spec.kh * spec.kw

    def prefers(self, spec: DepthwiseSpec) -> bool:
        return True  # one filter per channel: the direct conv's tiles over oc do not apply

    # ---- knobs ----
    def default_knobs(self, spec: DepthwiseSpec, isa: device_mod.Isa) -> DepthwiseKnobs:
        # Measured with /tmp/dw/sweep.py (time_numpy, 2 threads, EPYC Zen3, MobileNetV2 NHWC
        # layers): the best of ~100 variants was c_block 16 x ow_tile 4 or 6 on 6 of 10
        # layers and within 10% on the rest (C32@112: 0.079 ms; C144@56 s1: 0.094 ms;
        # C576@14 s1: 0.027 ms); oh_rows only needs to give the 8 pool chunks enough tasks.
        # Reading channels-last input in place beat packing on every layer. For packed
        # (NCHW) input /tmp/dw/nchw.py found c_block 8 x ow_tile 8 (the width the 8x8
        # transposed store needs), 8 rows per task best: C32@112 0.17 ms (0.43 ms for the
        # in-place layer's choice of 16 x 4, which stores column by column).
        vw = isa.vector_floats
        if spec.lhs_strides[1] == 1 and spec.mult == 1 and spec.k % vw == 0:
            c_block = 2 * vw if spec.k % (2 * vw) == 0 else vw
            ow_tile = 8 if c_block == vw else 4
            oh_rows = round(spec.n * spec.oh / 16)
            pack, c_inner = False, True
        else:
            c_block, ow_tile, oh_rows, pack, c_inner = vw, 8, 8, True, False
        ow_tile = min(ow_tile, self._max_tile(c_block // vw, isa))
        # a tile wider than the in-place interior would fall back to single columns
        (_, _), (pl, pr) = spec.padding
        interior = spec.ow if pack else spec.ow - 2 * -(-max(pl, pr) // spec.stride[1])
        ow_tile = max(1, min(ow_tile, spec.ow, interior))
        oh_rows = max(1, min(8, spec.oh, oh_rows))
        knobs = DepthwiseKnobs(c_block=c_block, ow_tile=ow_tile, oh_rows=oh_rows,
                               pack=pack, c_inner=c_inner)
        self.validate(spec, knobs, isa)
        return knobs

    @staticmethod
    def _max_tile(vectors: int, isa: device_mod.Isa) -> int:
        # accumulators (ow_tile * vectors) plus one register per weight vector; the input
        # comes in as the FMA's memory operand
        return (isa.vector_registers - vectors) // vectors

    def space(self, spec: DepthwiseSpec, isa: device_mod.Isa) -> Space:
        """Layout: the channel block of the packed rows and weight panels (c_block), packed vs
        in-place input reads (in place only offered where it can be legal: channels-last,
        multiplier 1). Loop: columns per register tile, rows per task, whether a task covers
        every channel block. Other limits (registers per c_block, c_block dividing K in
        place, the workspace) are validate()'s."""
        d = self.default_knobs(spec, isa)
        vw = isa.vector_floats
        k_rounded = -(-spec.k // vw) * vw
        c_blocks = axis_values([m * vw for m in (1, 2, 3, 4) if m * vw <= k_rounded],
                               d.c_block)
        in_place = spec.lhs_strides[1] == 1 and spec.mult == 1
        pack = axis_values([True] + ([False] if in_place else []), d.pack)
        # powers of two and the tile that fills the registers for each c_block
        cap = min(spec.ow, self._max_tile(1, isa))
        ow_tiles = axis_values([min(cap, max(1, t)) for t in
                                [1, 2, 4, 8] + [self._max_tile(cb // vw, isa) for cb in c_blocks]],
                               d.ow_tile)
        oh_rows = axis_values([r for r in (1, 2, 4, 8, 16, 32) if r <= spec.oh] + [spec.oh],
                              d.oh_rows)
        return Space(self.name, DepthwiseKnobs, (
            Axis("c_block", c_blocks, "layout"),
            Axis("pack", pack, "layout"),
            Axis("ow_tile", ow_tiles, "loop"),
            Axis("oh_rows", oh_rows, "loop"),
            Axis("c_inner", (False, True), "loop"),
        ))

    def packed_weight_shape(self, spec: DepthwiseSpec, knobs: DepthwiseKnobs,
                            isa: device_mod.Isa) -> tuple:
        """(channel blocks, kh, kw, c_block): the panels the kernel's inner loop reads. (isa
        for the families' common signature: c_block counts floats, whatever the lanes.)"""
        return (-(-spec.k // knobs.c_block), spec.kh, spec.kw, knobs.c_block)

    def pack_weights(self, spec: DepthwiseSpec, knobs: DepthwiseKnobs, rhs,
                     isa: device_mod.Isa):
        """rhs (in spec.rhs_layout, a jax array or tracer) as the kernel's weight panels.

        [k][1][kh][kw] -> [k // c_block][kh][kw][k % c_block], channels past K zero: what a
        spec with prepacked=True reads as inputs[1] for these knobs (plain jnp, traceable).
        """
        import jax.numpy as jnp

        if tuple(rhs.shape) != tuple(spec.rhs_shape):
            raise ValueError(f"pack_weights: rhs shape {tuple(rhs.shape)} is not the spec's "
                             f"{tuple(spec.rhs_shape)} (rhs layout {spec.rhs_layout})")
        nblk, kh, kw, cb = self.packed_weight_shape(spec, knobs, isa)
        w = spec.rhs_layout.invert(jnp.asarray(rhs, jnp.float32))  # (k, 1, kh, kw)
        w = jnp.reshape(w, (spec.k, kh, kw))
        w = jnp.pad(w, ((0, nblk * cb - spec.k), (0, 0), (0, 0)))
        return jnp.transpose(jnp.reshape(w, (nblk, cb, kh, kw)), (0, 2, 3, 1))

    def workspace_bytes(self, spec: DepthwiseSpec, knobs: DepthwiseKnobs) -> int:
        cb = knobs.c_block
        nblk = -(-spec.k // cb)
        wpack = 0 if spec.prepacked else -(-(nblk * spec.kh * spec.kw * cb) // 16) * 16
        if not knobs.pack:
            return 4 * wpack
        blk_per_task = nblk if knobs.c_inner else 1
        tasks = spec.n * (nblk // blk_per_task) * -(-spec.oh // knobs.oh_rows)
        rows_in = (knobs.oh_rows - 1) * spec.stride[0] + (spec.kh - 1) * spec.dilation[0] + 1
        wp = (spec.ow - 1) * spec.stride[1] + (spec.kw - 1) * spec.dilation[1] + 1
        return 4 * (wpack + tasks * blk_per_task * rows_in * wp * cb)

    def validate(self, spec: DepthwiseSpec, knobs: DepthwiseKnobs, isa: device_mod.Isa) -> None:
        vw = isa.vector_floats
        cb = knobs.c_block
        check_types(spec, knobs, ints=("c_block", "ow_tile", "oh_rows"),
                    bools=("pack", "c_inner"))
        if cb < vw or cb % vw or cb > 4 * vw:
            raise KnobError(f"c_block={cb} must be a multiple of {isa.name}'s vector width {vw}, "
                            f"from {vw} to {4 * vw}")
        k_rounded = -(-spec.k // vw) * vw
        if cb > k_rounded:
            raise KnobError(f"c_block={cb} exceeds the {spec.k} output channels rounded up "
                            f"to a vector ({k_rounded})")
        vectors = cb // vw
        limit = self._max_tile(vectors, isa)
        if not 1 <= knobs.ow_tile <= limit:
            need = knobs.ow_tile * vectors + vectors
            raise KnobError(f"ow_tile={knobs.ow_tile} x c_block={cb} needs {need} vector "
                            f"registers, {isa.name} has {isa.vector_registers} "
                            f"(ow_tile must be 1..{limit})")
        if knobs.ow_tile > spec.ow:
            raise KnobError(f"ow_tile={knobs.ow_tile} exceeds the output width {spec.ow}")
        if not 1 <= knobs.oh_rows <= spec.oh:
            raise KnobError(f"oh_rows={knobs.oh_rows} must be 1..{spec.oh} (the output height)")
        if not knobs.pack:
            if spec.lhs_strides[1] != 1:
                raise KnobError("pack=False needs unit-stride input channels (channels-last "
                                f"lhs); this lhs has channel stride {spec.lhs_strides[1]}")
            if spec.mult != 1:
                raise KnobError(f"pack=False needs channel multiplier 1, got {spec.mult}")
            if spec.k % cb:
                raise KnobError(f"pack=False needs c_block={cb} to divide the {spec.k} channels")
        ws = self.workspace_bytes(spec, knobs)
        if ws > _MAX_WORKSPACE:
            raise KnobError(f"workspace of {ws} bytes exceeds the {_MAX_WORKSPACE} byte limit "
                            f"(oh_rows={knobs.oh_rows}, pack={knobs.pack})")

    # ---- code generation ----
    def render(self, spec: DepthwiseSpec, knobs: DepthwiseKnobs, isa: device_mod.Isa):
        from alt_jax import runtime

        self.validate(spec, knobs, isa)
        (pt, _), (pl, _) = spec.padding
        sh, sw = spec.stride
        dh, dw = spec.dilation
        # output columns whose window lies inside the unpadded input (the in-place fast path;
        # the kernel clips kernel rows at run time, so border rows need no such range)
        def interior(lo_pad, size, ksize, stride, dil, osize):
            lo = min(osize, -(-lo_pad // stride))
            hi = (size - 1 + lo_pad - (ksize - 1) * dil) // stride + 1
            return lo, max(lo, min(osize, hi))

        ow_lo, ow_hi = interior(pl, spec.w, spec.kw, sw, dw, spec.ow)
        ls, rs, os_ = spec.lhs_strides, spec.rhs_strides, spec.out_strides
        ws = self.workspace_bytes(spec, knobs)
        big = 2**40
        values = {
            "VEC": isa.vector_floats,
            "N": spec.n, "C": spec.c, "MULT": spec.mult, "H": spec.h, "W": spec.w,
            "KH": spec.kh, "KW": spec.kw, "OH": spec.oh, "OW": spec.ow,
            "SH": sh, "SW": sw, "DH": dh, "DW": dw, "PT": pt, "PL": pl,
            "LS_N": ls[0], "LS_C": ls[1], "LS_H": ls[2], "LS_W": ls[3],
            "RS_K": rs[0], "RS_KH": rs[2], "RS_KW": rs[3],
            "OS_N": os_[0], "OS_K": os_[1], "OS_H": os_[2], "OS_W": os_[3],
            "OW_LO": ow_lo, "OW_HI": ow_hi,
            "C_BLOCK": knobs.c_block, "OW_TILE": knobs.ow_tile, "OH_ROWS": knobs.oh_rows,
            "PACK": knobs.pack, "C_INNER": knobs.c_inner,
            # copy pixel by pixel when channels are closer in memory than columns
            "PACK_CHANNELS_INNER": ls[1] < ls[3],
            "TRANSPOSE_PACK": knobs.pack and isa.vector_floats == 8 and ls[3] == 1,
            "TRANSPOSE_STORE": isa.vector_floats == 8 and os_[3] == 1 and os_[1] != 1,
            "WS_BYTES": ws,
            "ACTIVATION": spec.epilogue.activation_code,
            "HAS_SCALE": spec.epilogue.scale, "HAS_SHIFT": spec.epilogue.shift,
            "HAS_RESIDUAL": spec.epilogue.residual, "PREPACKED": spec.prepacked,
        }
        for key, v in values.items():
            if not isinstance(v, bool):
                render_mod.check_int(key, v, 0, big)
        # spec includes the epilogue and prepacked, so each variant gets its own symbol
        digest = hashlib.sha256(repr((spec, knobs, isa.name)).encode()).hexdigest()[:16]
        symbol = f"alt_depthwise_{digest}"
        values["SYMBOL"] = symbol
        code = render_mod.render(render_mod.load_template(_TEMPLATE), values)
        return runtime.KernelSource(symbol=symbol, code=code, workspace_bytes=ws)

    def lower(self, spec: DepthwiseSpec, kernel, operands, reuse_residual: bool = False):
        """operands: [lhs, rhs or its packed panels, *epilogue inputs] (see the header);
        reuse_residual writes the result into the residual's buffer."""
        return lower_conv("depthwise", spec, kernel, operands, reuse_residual)

    def kernel_inputs(self, spec: DepthwiseSpec, knobs: DepthwiseKnobs, operands: Sequence,
                      isa: device_mod.Isa) -> list:
        """[lhs, rhs or pack_weights(rhs), *epilogue inputs] from the equation's operands."""
        return conv_kernel_inputs(self, spec, knobs, operands, isa)

    # ---- reference (tests, tuner checks) ----
    def reference(self, spec: DepthwiseSpec, lhs, rhs):
        """lax's result for spec on arrays in the spec's layouts."""
        import jax

        return jax.lax.conv_general_dilated(
            lhs, rhs, spec.stride, spec.padding, rhs_dilation=spec.dilation,
            dimension_numbers=dimension_numbers(spec),
            feature_group_count=spec.c)


FAMILY = DepthwiseFamily()
