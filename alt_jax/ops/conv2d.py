"""General 2-D convolution family: any dimension numbers, strides, padding, rhs dilation, groups.

Entry points: FAMILY (Conv2dFamily: match/flops/default_knobs/validate/space/render/lower/
pack_weights/kernel_inputs), Conv2dSpec, Conv2dKnobs. The kernel is the direct-convolution template
codegen/conv2d.cc; its inputs are [lhs, rhs (or the packed weights if Spec.prepacked),
*Spec.epilogue.inputs()], the epilogue's channel is the output channel K.
"""
from __future__ import annotations

import dataclasses
import hashlib
from typing import Sequence

from alt_jax import device
from alt_jax.codegen import render as R
from alt_jax.layout import Layout
from alt_jax.ops.base import Axis, KnobError, Space, Unsupported, axis_values
from alt_jax.ops.conv_common import (ConvOperands, channel_blocks, check_types,
                                     conv_kernel_inputs, finite_weights_if_padded_1x1,
                                     lower_conv, read_conv, relayout)
from alt_jax.ops.epilogue import Epilogue

_TEMPLATE = "conv2d.cc"
_WEIGHT_MODES = {"inplace": 0, "ahead": 1, "fused": 2}  # the template's W_* constants
_MAX_UNROLLED_FMAS = 512  # ic_block x ow_tile x oc_vecs per tile body: compile time


@dataclasses.dataclass(frozen=True)
class Conv2dSpec(ConvOperands):
    """One convolution, canonical: logical sizes plus where each logical dim lives.

    lhs_layout / rhs_layout / out_layout: how each operand is arranged (alt_jax.layout
    Layouts over the roles N C H W, O I H W, N C H W): permutations from the equation's
    dimension numbers, or what the graph pass chose between kernels (N C/8 H W 8c).
    epilogue: what the kernel applies to its output tile before the store (match() leaves the
      identity; the planner sets it): scale/shift are float32 vectors of K (all groups,
      k = g * K/G + j), residual has the result's shape and layout.
    prepacked: the kernel's rhs input is pack_weights(spec, knobs, rhs), not the rhs.
    """

    n: int
    c: int
    h: int
    w: int
    k: int
    kh: int
    kw: int
    oh: int
    ow: int
    stride: tuple[int, int]
    padding: tuple[tuple[int, int], tuple[int, int]]
    dilation: tuple[int, int]
    groups: int
    lhs_layout: Layout
    rhs_layout: Layout
    out_layout: Layout
    epilogue: Epilogue = Epilogue()
    prepacked: bool = False

    @property
    def cg(self) -> int:
        return self.c // self.groups

    @property
    def kg(self) -> int:
        return self.k // self.groups

    @property
    def rhs_in_channels(self) -> int:
        return self.cg


@dataclasses.dataclass(frozen=True, order=True)
class Conv2dKnobs:
    """How the direct convolution loops; every combination validate() accepts is correct.

    ic_block: input channels per reduction block (the packed layout's inner dim, unrolled).
    oc_vecs: vectors of output channels in the register tile (oc_block = oc_vecs x lanes).
    ow_tile: output positions in the register tile (consecutive in row-major OH x OW order,
      so a tile may wrap onto the next output row).
    chunk_tiles: register tiles per parallel work item (weights != "fused").
    ic_chunk: ic blocks per reduction pass over an item's tiles (cache blocking: that slice
      of the weight panel stays in L1 while the tiles go by; partial sums wait in a stack
      buffer between passes). The number of ic blocks means one pass, no partial sums.
    pack_input: copy the input to a padded blocked layout (else read it in place; needs zero
      padding and whole ic blocks).
    weights: "ahead" = pack (oc block, ic block) panels in a parallel pass before computing;
      "fused" = each (group, oc block) work item packs its own panels and then computes every
      position with them (hot in L2; needs chunk_tiles to cover all tiles); "inplace" = read
      the rhs directly (needs oc contiguous, e.g. HWIO, and whole blocks).
    oc_outer: parallel items ordered with position chunks fastest (a weight panel is reused
      by consecutive items) rather than oc blocks fastest (input rows reused).
    """

    ic_block: int
    oc_vecs: int
    ow_tile: int
    chunk_tiles: int
    ic_chunk: int
    pack_input: bool = True
    weights: str = "ahead"
    oc_outer: bool = True


def _layout_blocks(spec) -> tuple[dict, dict]:
    """(lhs, out) block_strides of the spec's layouts; Unsupported if the template cannot
    address one."""
    return (channel_blocks("conv2d", spec.lhs_layout, "lhs", spec.c, spec.cg, spec.groups),
            channel_blocks("conv2d", spec.out_layout, "output", spec.k, spec.kg, spec.groups))


def _tile_fits_blocks(block: int, ocb: int, vw: int) -> bool:
    """A register tile of ocb output channels (starting at a multiple of ocb within its
    group) addressed from its first channel in an output blocked by `block`: the tile lies in
    one block, or covers whole blocks whose vector runs (min(vw, block)) stay in a block."""
    return block % ocb == 0 or (ocb % block == 0 and (block % vw == 0 or vw % block == 0))


class Conv2dFamily:
    name = "conv2d"
    knobs_type = Conv2dKnobs
    # partial sums wait on the stack, and every store path reads the residual element just
    # before writing the output element at the same offset
    residual_in_place = True

    @property
    def primitive(self):
        import jax

        return jax.lax.conv_general_dilated_p

    # ---- matching ----
    def match(self, eqn) -> Conv2dSpec:
        g = read_conv(eqn)
        return Conv2dSpec(
            n=g.n, c=g.c, h=g.h, w=g.w, k=g.k, kh=g.kh, kw=g.kw, oh=g.oh, ow=g.ow,
            stride=g.stride, padding=g.padding, dilation=g.dilation, groups=g.groups,
            **g.layouts)

    def relayout(self, spec, lhs=None, out=None):
        """spec reading its lhs in `lhs` and writing `out` (Layouts over N C H W; None keeps
        the spec's): permutations of N C H W, or those blocked on C alone (N C/b H W bc, b
        a power of two; with groups, each group's channels whole blocks). Unsupported
        otherwise (pads, unfolds, other dims blocked)."""
        new = relayout(spec, lhs, out, blocked=True)
        _layout_blocks(new)
        return new

    def safe_operands(self, spec: Conv2dSpec, lhs, rhs):
        """A padded 1x1 conv with a non-finite weight runs in XLA (see
        conv_common.finite_weights_if_padded_1x1: XLA's own answer there is its rewrite's)."""
        return finite_weights_if_padded_1x1(spec, rhs)

    def flops(self, spec: Conv2dSpec) -> int:
        return 2 * spec.n * spec.k * spec.oh * spec.ow * spec.cg * spec.kh * spec.kw

    def prefers(self, spec: Conv2dSpec) -> bool:
        return True  # the general conv: the one the others defer to

    # ---- knobs ----
    def default_knobs(self, spec: Conv2dSpec, isa: device.Isa) -> Conv2dKnobs:
        """A heuristic measured on the 2-core EPYC (Zen3) dev VM, 2026-11-25, with run_numpy
        timings (/tmp/cw/cmp.py: variants interleaved, 1 and 2 threads; other jobs shared the
        cores, so the 1-thread numbers were the steady ones). This choice runs the 3x3 ResNet
        layers at 90-97 GFLOP/s on one core, ~180 on two when both are free (128@28 NHWC
        1.26 ms; 8 ic x 6 positions x 16 oc tiles, 15 of 16 ymm registers), the 1x1
        256->64@56 NHWC at 1.10 ms on one core with ic_block=32 (1.24 ms with 16).
        """
        vw = isa.vector_floats
        window = spec.kh * spec.kw
        lhs_blocks, out_blocks = _layout_blocks(spec)
        lhs_cb, out_kb = lhs_blocks["C"][0], out_blocks["C"][0]
        pad_free = spec.padding == ((0, 0), (0, 0))
        # a 1x1 has no kh/kw loops to amortise the cb loop over: unroll more channels
        if window == 1 and spec.cg % 32 == 0:
            ic_block = 32
        else:
            ic_block = min(spec.cg, 8 if window > 1 else 16)
        # A channel-blocked lhs: an ic block is one layout block, read in place unless
        # padded. Packed too, blocks that split a layout block read its cache lines once per
        # ic block (3x3 64->64@56 16c, AVX-512, 1 core: 0.93 ms with ic_block=8, 0.89 with 16
        # and NHWC's 0.90).
        blocked_lhs = lhs_cb < spec.c and lhs_cb <= min(64, spec.cg)
        blocked_in_place = blocked_lhs and pad_free
        if blocked_lhs:
            ic_block = lhs_cb
        # oc vectors: the fewest padded output channels, preferring 2 (6-position tiles);
        # for a channel-blocked output, tiles and blocks that divide one another
        candidates = [v for v in (2, 3, 1) if (v - 1) * vw < spec.kg]
        if out_kb < spec.k:
            candidates = [v for v in candidates if _tile_fits_blocks(out_kb, v * vw, vw)]
        oc_vecs = min(candidates, key=lambda v: (-(-spec.kg // (v * vw))) * v * vw)
        budget = isa.vector_registers - oc_vecs - 1
        positions = spec.oh * spec.ow
        ow_tile = max(1, min(budget // oc_vecs, positions, 32,
                             _MAX_UNROLLED_FMAS // (ic_block * oc_vecs)))
        # Output positions contiguous per channel (NCHW): an 8 x 8 tile stores through an
        # in-register transpose. It computes ~15% slower than 6 x 16 (1 core: 64@56 2.96 vs
        # 2.53 ms), so it pays only when the scattered stores weigh, i.e. short reductions
        # (7x7/2 3->64@224 NCHW, 147 FMAs per output, 1 core: 2.87-2.99 vs 3.05-3.21 ms in
        # two runs; the NHWC output of the same conv takes 2.42 ms, so its store pattern, not
        # the transposition, is what remains).
        ok, oh_stride, ow_stride = (out_blocks[d][2] for d in "CHW")
        channel_runs = (out_kb == spec.k and ok != 1 and ow_stride == 1
                        and oh_stride == spec.ow)
        if (channel_runs and vw == 8 and spec.cg * window < 256 and positions >= 8
                and spec.kg >= 8):
            oc_vecs, ow_tile = 1, 8
        n_tiles = -(-positions // ow_tile)
        kgb = -(-spec.kg // (oc_vecs * vw))
        # Weights: packing ahead costs a pass over the rhs and a barrier; fused packing keeps
        # each panel in the packing core's L2 but parallelises only over (group, oc block),
        # so use it when there are enough oc blocks and the weights are big (>= 1 MiB: the
        # 256@14 and 512@7 layers, ~3-5% faster there).
        # Prepacked weights leave nothing to fuse: chunked items spread the work better.
        weight_bytes = 4 * spec.k * spec.cg * window
        fused = spec.groups * kgb >= 8 and weight_bytes >= (1 << 20) and not spec.prepacked
        # about 64 items in the pool (dynamic chunks balance 2 cores), >= 2 tiles per item
        chunk = n_tiles if fused else max(2, -(-n_tiles * spec.n * spec.groups * kgb // 64))
        chunk = min(chunk, n_tiles)
        # One reduction pass while an oc block's weight panel sits comfortably in L2: split
        # passes (16 KiB slices, L1) measured no faster there (128@28 NHWC, 1 core: 2.48 ms
        # one pass vs 2.63 ms in passes); past 128 KiB (512@7: 295 KiB) they win ~3%.
        cgb = -(-spec.cg // ic_block)
        slice_bytes = 4 * ic_block * window * oc_vecs * vw
        ic_chunk = cgb
        if cgb * slice_bytes > (128 << 10):
            ic_chunk = max(1, min(cgb, (16 << 10) // slice_bytes))
        # Unpadded input is read where it is when channels are innermost (NHWC), or for a 1x1
        # over rows (NCHW: a tile's positions share a cache line per channel; 1x1 256->64@56
        # NCHW, 1 core: 1.31 ms in place vs 1.48 ms packing).
        lc, lw = lhs_blocks["C"][2], lhs_blocks["W"][2]
        if lhs_cb < spec.c:
            read_in_place = blocked_in_place
        else:
            read_in_place = lc == 1 or (window == 1 and lw == 1)
        knobs = Conv2dKnobs(
            ic_block=ic_block, oc_vecs=oc_vecs, ow_tile=ow_tile,
            chunk_tiles=chunk, ic_chunk=ic_chunk,
            pack_input=not (pad_free and spec.cg % ic_block == 0 and read_in_place),
            weights="fused" if fused else "ahead",
            oc_outer=True)
        self.validate(spec, knobs, isa)
        return knobs

    def validate(self, spec: Conv2dSpec, knobs: Conv2dKnobs, isa: device.Isa) -> None:
        vw = isa.vector_floats
        check_types(spec, knobs, ints=("ic_block", "oc_vecs", "ow_tile", "chunk_tiles",
                                       "ic_chunk"), bools=("pack_input", "oc_outer"))
        if knobs.weights not in _WEIGHT_MODES:
            raise KnobError(f"weights={knobs.weights!r} must be one of {sorted(_WEIGHT_MODES)}")
        try:
            lhs_blocks, out_blocks = _layout_blocks(spec)
        except Unsupported as e:
            raise KnobError(str(e)) from e
        if not 1 <= knobs.ic_block <= min(64, spec.cg):
            raise KnobError(f"ic_block={knobs.ic_block} must be in [1, {min(64, spec.cg)}] "
                            f"(channels per group {spec.cg}, limit 64)")
        if not 1 <= knobs.oc_vecs <= 8:
            raise KnobError(f"oc_vecs={knobs.oc_vecs} must be in [1, 8]")
        if (knobs.oc_vecs - 1) * vw >= spec.kg:
            raise KnobError(f"oc_vecs={knobs.oc_vecs} x {vw} lanes leaves a whole vector "
                            f"empty for {spec.kg} output channels per group")
        positions = spec.oh * spec.ow
        if not 1 <= knobs.ow_tile <= min(32, positions):
            raise KnobError(f"ow_tile={knobs.ow_tile} must be in [1, {min(32, positions)}] "
                            f"({positions} output positions, limit 32)")
        regs = knobs.ow_tile * knobs.oc_vecs + knobs.oc_vecs + 1
        if regs > isa.vector_registers:
            raise KnobError(f"ow_tile={knobs.ow_tile} x oc_vecs={knobs.oc_vecs} needs {regs} "
                            f"vector registers, {isa.name} has {isa.vector_registers}")
        fmas = knobs.ic_block * knobs.ow_tile * knobs.oc_vecs
        if fmas > _MAX_UNROLLED_FMAS:
            raise KnobError(f"ic_block={knobs.ic_block} x ow_tile={knobs.ow_tile} x oc_vecs="
                            f"{knobs.oc_vecs} unrolls {fmas} FMAs, limit {_MAX_UNROLLED_FMAS}")
        n_tiles = -(-positions // knobs.ow_tile)
        if not 1 <= knobs.chunk_tiles <= n_tiles:
            raise KnobError(f"chunk_tiles={knobs.chunk_tiles} must be in [1, {n_tiles}] "
                            f"(register tiles per image and oc block)")
        if knobs.weights == "fused" and knobs.chunk_tiles != n_tiles:
            raise KnobError(f"weights='fused' computes all {n_tiles} tiles of an oc block in "
                            f"one item: chunk_tiles={knobs.chunk_tiles} must be {n_tiles}")
        cgb = -(-spec.cg // knobs.ic_block)
        if not 1 <= knobs.ic_chunk <= cgb:
            raise KnobError(f"ic_chunk={knobs.ic_chunk} must be in [1, {cgb}] (ic blocks of "
                            f"{knobs.ic_block} in {spec.cg} channels per group)")
        whole_ic = spec.cg % knobs.ic_block == 0
        if not knobs.pack_input:
            if spec.padding != ((0, 0), (0, 0)):
                raise KnobError(f"pack_input=False needs zero padding, spec has {spec.padding}")
            if not whole_ic:
                raise KnobError(f"pack_input=False needs ic_block={knobs.ic_block} to divide "
                                f"{spec.cg} channels per group")
            lhs_cb = lhs_blocks["C"][0]
            if lhs_cb < spec.c and knobs.ic_block != lhs_cb:
                raise KnobError(f"pack_input=False on the channel-blocked lhs "
                                f"{spec.lhs_layout} needs ic_block={lhs_cb} (its block), "
                                f"not {knobs.ic_block}")
        out_kb = out_blocks["C"][0]
        if out_kb < spec.k and not _tile_fits_blocks(out_kb, knobs.oc_vecs * vw, vw):
            raise KnobError(f"oc_block={knobs.oc_vecs * vw} (oc_vecs={knobs.oc_vecs}) and the "
                            f"output's channel block {out_kb} ({spec.out_layout}) must divide "
                            f"one another (tiles are stored block-relative)")
        if knobs.weights == "inplace":
            if spec.rhs_strides[0] != 1:
                raise KnobError("weights='inplace' needs output channels contiguous in the "
                                f"rhs (rhs layout {spec.rhs_layout}, e.g. H W I O)")
            if spec.kg % (knobs.oc_vecs * vw) or not whole_ic:
                raise KnobError(f"weights='inplace' needs oc_block={knobs.oc_vecs * vw} to "
                                f"divide {spec.kg} and ic_block={knobs.ic_block} to divide "
                                f"{spec.cg} channels per group")

    def space(self, spec: Conv2dSpec, isa: device.Isa) -> Space:
        """Layout: the packed input's channel block (ic_block, NCHW[c]c-style), the weight
        panel's oc block (oc_vecs), packed vs in-place input reads, the weight panel layout.
        Loop: the register tile's positions, positions per work item, ic blocks per reduction
        pass, item order. Values that no other knob can make legal are left out (in-place
        input when padded, in-place weights when oc is not contiguous); the rest of the
        legality (register budget, chunk_tiles <= the tiles of that ow_tile, ...) is
        validate()'s, so the space holds illegal points too."""
        d = self.default_knobs(spec, isa)
        vw, regs = isa.vector_floats, isa.vector_registers
        positions = spec.oh * spec.ow
        # powers of two up to 64 channels (the five largest: blocks of 1-2 channels only
        # make sense for tiny convs) and a block of all the channels of a group
        top = min(64, spec.cg)
        ic_blocks = axis_values([p for p in (1, 2, 4, 8, 16, 32, 64) if p <= top][-5:] + [top],
                                d.ic_block)
        # a channel-blocked output takes the tiles that divide, or lie in, its blocks (no
        # other knob makes the others legal); a blocked lhs is read in place by its block
        lhs_cb, out_kb = (b["C"][0] for b in _layout_blocks(spec))
        oc_vecs = axis_values([v for v in range(1, min(4, -(-spec.kg // vw)) + 1)
                               if out_kb == spec.k or _tile_fits_blocks(out_kb, v * vw, vw)],
                              d.oc_vecs)
        if lhs_cb < spec.c and lhs_cb <= top:
            ic_blocks = axis_values(list(ic_blocks) + [lhs_cb], d.ic_block)
        pack_input = axis_values([True] + ([False] if spec.padding == ((0, 0), (0, 0)) else []),
                                 d.pack_input)
        weights = axis_values(["ahead", "fused"] + (["inplace"] if spec.rhs_strides[0] == 1
                                                    else []), d.weights)
        # the tile that fills the registers for each oc_vecs, single positions, and 8 (the
        # 8 x 8 transposed store of channel-major outputs)
        cap = min(32, positions)
        ow_tiles = axis_values([min(cap, max(1, t)) for t in
                                [1, 8] + [(regs - v - 1) // v for v in oc_vecs]], d.ow_tile)
        # items of about 16 or 256 (the default aims at 64), and one item per (image, oc
        # block) for each ow_tile (what weights="fused" needs)
        n_tiles = lambda ow: -(-positions // ow)
        units = spec.n * spec.groups * -(-spec.kg // (d.oc_vecs * vw))
        nt0 = n_tiles(d.ow_tile)
        chunks = axis_values([1] + [min(nt0, max(1, -(-nt0 * units // items)))
                                    for items in (16, 256)]
                             + [n_tiles(ow) for ow in ow_tiles], d.chunk_tiles)
        # one pass over the reduction for each ic_block, or passes of 1, 2, 4 blocks
        cgbs = [-(-spec.cg // icb) for icb in ic_blocks]
        ic_chunks = axis_values([c for c in (1, 2, 4) if c <= max(cgbs)] + cgbs, d.ic_chunk)
        return Space(self.name, Conv2dKnobs, (
            Axis("ic_block", ic_blocks, "layout"),
            Axis("oc_vecs", oc_vecs, "layout"),
            Axis("pack_input", pack_input, "layout"),
            Axis("weights", weights, "layout"),
            Axis("ow_tile", ow_tiles, "loop"),
            Axis("chunk_tiles", chunks, "loop"),
            Axis("ic_chunk", ic_chunks, "loop"),
            Axis("oc_outer", (False, True), "loop"),
        ))

    # ---- code generation ----
    def _values(self, spec: Conv2dSpec, knobs: Conv2dKnobs, isa: device.Isa):
        """Template values plus the workspace size (bytes)."""
        vw = isa.vector_floats
        icb, ocb = knobs.ic_block, knobs.oc_vecs * vw
        cgb, kgb = -(-spec.cg // icb), -(-spec.kg // ocb)
        (sh, sw), (dh, dw) = spec.stride, spec.dilation
        hp = (spec.oh - 1) * sh + (spec.kh - 1) * dh + 1
        wp = (spec.ow - 1) * sw + (spec.kw - 1) * dw + 1
        # (block, outer stride, inner stride) per dim; a linear layout's dims are one block
        lhs_blocks, out_blocks = _layout_blocks(spec)
        ln, lc, lh, lw = (lhs_blocks[d][2] for d in "NCHW")
        ro, ri, rh, rw = spec.rhs_strides
        on, ok, oh, ow = (out_blocks[d][2] for d in "NCHW")
        (lcb, lcbs, _), (okb, okbs, _) = lhs_blocks["C"], out_blocks["C"]
        g = spec.groups
        if knobs.pack_input:
            i_c, i_w, i_h = 1, icb, wp * icb
            i_cb = hp * wp * icb
            i_g = cgb * i_cb
            i_n = g * i_g
            in_floats = spec.n * i_n
        elif lcb < spec.c:
            # a channel-blocked lhs in place: an ic block is one layout block (icb == lcb)
            i_c, i_w, i_h, i_cb, i_g, i_n = lc, lw, lh, lcbs, (spec.cg // lcb) * lcbs, ln
            in_floats = 0
        else:
            i_c, i_w, i_h, i_cb, i_g, i_n = lc, lw, lh, icb * lc, spec.cg * lc, ln
            in_floats = 0
        if knobs.weights != "inplace":
            # the packed panels (pack_weights' layout): G, KGB, CGB, KH, KW, ICB, OCB
            w_ic, w_kw = ocb, icb * ocb
            w_kh = spec.kw * w_kw
            w_cb = spec.kh * w_kh
            w_kb = cgb * w_cb
            w_g = kgb * w_kb
            w_floats = 0 if spec.prepacked else g * w_g
        else:
            w_ic, w_kw, w_kh, w_cb, w_kb, w_g = ri, rw, rh, icb * ri, ocb, spec.kg
            w_floats = 0
        ws_in = 0
        ws_w = -(-in_floats // 16) * 16  # 64-byte aligned start of the weight panels
        ws_bytes = 4 * (ws_w + w_floats) if (in_floats or w_floats) else 0
        values = dict(
            VW=vw, N=spec.n, G=g, CG=spec.cg, KG=spec.kg, H=spec.h, IW=spec.w,
            OH=spec.oh, OW=spec.ow, KH=spec.kh, KW=spec.kw, SH=sh, SW=sw, DH=dh, DW=dw,
            PT=spec.padding[0][0], PL=spec.padding[1][0],
            LHS_N=ln, LHS_C=lc, LHS_H=lh, LHS_W=lw, RHS_O=ro, RHS_I=ri, RHS_H=rh, RHS_W=rw,
            OUT_N=on, OUT_K=ok, OUT_H=oh, OUT_W=ow,
            LHS_CB=lcb, LHS_CBS=lcbs, OUT_KB=okb, OUT_KBS=okbs,
            IC_BLOCK=icb, OC_VECS=knobs.oc_vecs, OW_TILE=knobs.ow_tile,
            CHUNK_TILES=knobs.chunk_tiles, IC_CHUNK=knobs.ic_chunk, PACK_INPUT=knobs.pack_input,
            WEIGHTS=_WEIGHT_MODES[knobs.weights], OC_OUTER=knobs.oc_outer,
            CGB=cgb, KGB=kgb, HP=hp, WP=wp, WS_IN=ws_in, WS_W=ws_w,
            I_C=i_c, I_W=i_w, I_H=i_h, I_CB=i_cb, I_G=i_g, I_N=i_n,
            W_IC=w_ic, W_KW=w_kw, W_KH=w_kh, W_CB=w_cb, W_KB=w_kb, W_G=w_g,
            PREPACKED=spec.prepacked, ACT=spec.epilogue.activation_code,
            HAS_SCALE=spec.epilogue.scale, HAS_SHIFT=spec.epilogue.shift,
            HAS_RESIDUAL=spec.epilogue.residual)
        for key, v in values.items():
            if not isinstance(v, bool):
                R.check_int(key, v, 0, 2**40)
        return values, ws_bytes

    def render(self, spec: Conv2dSpec, knobs: Conv2dKnobs, isa: device.Isa):
        from alt_jax import runtime

        self.validate(spec, knobs, isa)
        values, ws_bytes = self._values(spec, knobs, isa)
        # the spec's repr includes its epilogue and prepacked flag
        digest = hashlib.sha256(repr((spec, knobs, isa.name)).encode()).hexdigest()[:16]
        values["SYMBOL"] = f"alt_conv2d_{digest}"
        code = R.render(R.load_template(_TEMPLATE), values)
        return runtime.KernelSource(symbol=values["SYMBOL"], code=code, workspace_bytes=ws_bytes)

    def lower(self, spec: Conv2dSpec, kernel, operands: Sequence,
              reuse_residual: bool = False) -> Sequence:
        """operands: [lhs, rhs (packed if spec.prepacked), *spec.epilogue.inputs()];
        reuse_residual writes the result into the residual's buffer."""
        return lower_conv("conv2d", spec, kernel, operands, reuse_residual)

    def kernel_inputs(self, spec: Conv2dSpec, knobs: Conv2dKnobs, operands: Sequence,
                      isa: device.Isa) -> list:
        """[lhs, rhs or pack_weights(rhs), *epilogue inputs] from the equation's operands."""
        return conv_kernel_inputs(self, spec, knobs, operands, isa)

    # ---- constant weights ----
    def packed_weight_shape(self, spec: Conv2dSpec, knobs: Conv2dKnobs,
                            isa: device.Isa) -> tuple:
        """Shape of pack_weights' result: (G, KGB, CGB, KH, KW, ICB, OCB), or the rhs shape
        for weights="inplace" (read where it is)."""
        if knobs.weights == "inplace":
            return tuple(spec.rhs_shape)
        icb, ocb = knobs.ic_block, knobs.oc_vecs * isa.vector_floats
        return (spec.groups, -(-spec.kg // ocb), -(-spec.cg // icb), spec.kh, spec.kw, icb, ocb)

    def pack_weights(self, spec: Conv2dSpec, knobs: Conv2dKnobs, rhs, isa: device.Isa):
        """The rhs (original layout, array or tracer) rearranged with jnp into the panels the
        kernel reads when spec.prepacked: G, K/oc_block, C/ic_block, KH, KW, ic_block, oc_block
        with zero-padded channels (oc_block = oc_vecs x isa's lanes: the isa the kernel is
        rendered for). weights="inplace" reads the rhs in place, so it comes back unchanged."""
        import jax.numpy as jnp

        if knobs.weights == "inplace":
            return rhs
        g, kgb, cgb, kh, kw, icb, ocb = self.packed_weight_shape(spec, knobs, isa)
        w = spec.rhs_layout.invert(jnp.asarray(rhs, jnp.float32))  # O, I, KH, KW
        w = w.reshape(g, spec.kg, spec.cg, kh, kw)
        w = jnp.pad(w, ((0, 0), (0, kgb * ocb - spec.kg), (0, cgb * icb - spec.cg), (0, 0),
                        (0, 0)))
        w = w.reshape(g, kgb, ocb, cgb, icb, kh, kw)
        return jnp.transpose(w, (0, 1, 3, 5, 6, 4, 2))


FAMILY = Conv2dFamily()
