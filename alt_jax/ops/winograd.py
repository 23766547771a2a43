"""3x3 stride-1 convolutions by Winograd's minimal filtering: F(2x2, 3x3) does 16
multiply-adds per 2x2 outputs and channel pair instead of 36, F(4x4, 3x3) 36 per 4x4 outputs
instead of 144. The output tile (2 or 4) is a layout knob: it decides the transformed
filter's layout (4x4 or 6x6 panels) and the workspace's.

Entry points: FAMILY (WinogradFamily: match/flops/prefers/default_knobs/validate/space/
render/lower/pack_weights/kernel_inputs), WinogradSpec, WinogradKnobs. Template
codegen/winograd.cc; its inputs are [lhs, pack_weights(rhs) (the transformed filter U, the
filter and its max |g|) or the rhs itself, *Spec.epilogue.inputs()]. The kernel checks that
the values it reads are within the transforms' safe range (the bounds are in the template)
and computes the plain convolution when they are not, so it matches XLA for every input and
needs no check in the graph (no safe_operands). The lhs and the output may be
channel-blocked (N C/b H W bc, b a power of two dividing the channels; relayout says which).

Tried before the direct conv2d family. match() declines (Unsupported) only what the kernel
cannot compute; prefers() says False where the direct convolution measured faster (few
channels or outputs), so without a tuning record those convs go on to conv2d.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
from typing import Sequence

import numpy as np

from alt_jax import device
from alt_jax.codegen import render as R
from alt_jax.layout import Layout
from alt_jax.ops.base import Axis, KnobError, Space, Unsupported, axis_values
from alt_jax.ops.conv_common import (ConvOperands, channel_blocks, check_types,
                                     conv_kernel_inputs, lower_conv, read_conv, relayout)
from alt_jax.ops.epilogue import Epilogue

_TEMPLATE = "winograd.cc"
# G of F(m x m, 3x3) (Lavin & Gray): U = G g G^T turns a 3x3 filter into the (m+2)^2 one the
# tiles multiply by. The template writes the same matrices out as code.
_G = {
    2: np.array([[1, 0, 0], [1 / 2, 1 / 2, 1 / 2], [1 / 2, -1 / 2, 1 / 2], [0, 0, 1]]),
    4: np.array([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
                 [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]]),
}
OUT_TILES = tuple(_G)
# Where the transform pays (measured on the 2-core Zen3 dev VM, see docs/ARCHITECTURE.md):
# enough tiles per image to fill the GEMM rows and enough channels to amortise the
# transforms. A heuristic (prefers()), not a limit: the kernel computes smaller convs too.
MIN_CHANNELS = 64
MIN_OUTPUTS = 14 * 14
# F(4x4, 3x3) from this many 4x4 tiles in the batch: each U panel (36/16 the size of
# F(2x2)'s, read from memory on every call: a model's weights do not stay in cache) must
# serve enough tiles. Measured with cold weights on the dev VM (AVX-512, 2 cores), best knobs
# of each: 56x56x64 0.221 ms (F4) vs 0.286 (F2), 28x28x128 0.261 vs 0.278; 14x14x256 0.508
# vs 0.370 and 7x7x512 0.968 vs 0.845, where F(4x4) pads 14 to 16 and has 16 or 4 tiles.
MIN_F4_TILES = 49


def _layout_blocks(spec) -> tuple[dict, dict]:
    """(lhs, out) block_strides of the spec's layouts; Unsupported if the template cannot
    address one."""
    return (channel_blocks("Winograd", spec.lhs_layout, "lhs", spec.c),
            channel_blocks("Winograd", spec.out_layout, "output", spec.k))


def _balanced_block(tiles: int, block: int) -> int:
    """The smallest block that still splits `tiles` into as few blocks as `block` does."""
    return -(-tiles // -(-tiles // block))


@dataclasses.dataclass(frozen=True)
class WinogradSpec(ConvOperands):
    """A 3x3 stride-1, undilated, ungrouped convolution: logical sizes and the operands'
    layouts (permutations of N C H W / O I H W, as in Conv2dSpec).
    epilogue / prepacked as in Conv2dSpec; prepacked means the rhs input is already U."""

    n: int
    c: int
    h: int
    w: int
    k: int
    oh: int
    ow: int
    padding: tuple[tuple[int, int], tuple[int, int]]
    lhs_layout: Layout
    rhs_layout: Layout
    out_layout: Layout
    epilogue: Epilogue = Epilogue()
    prepacked: bool = False
    kh = 3
    kw = 3

    @property
    def rhs_in_channels(self) -> int:
        return self.c

    def tiles(self, out_tile: int = 2) -> int:
        """out_tile x out_tile output tiles in the whole batch."""
        return self.n * (-(-self.oh // out_tile)) * (-(-self.ow // out_tile))


@dataclasses.dataclass(frozen=True, order=True)
class WinogradKnobs:
    """tile_block: tiles per register tile (GEMM rows); oc_vecs: vectors of output channels
    per register tile; kb_outer: parallel items ordered oc block major (each oc block's U
    panels stay in L2 while the tile blocks go by) rather than tile block major; out_tile:
    outputs per tile side, 2 (F(2x2, 3x3)) or 4 (F(4x4, 3x3): 2.25x fewer multiply-adds than
    F(2x2) on full tiles, but 36/16 the transformed filter's size and more padded outputs
    when the image is not a multiple of 4)."""

    tile_block: int = 6
    oc_vecs: int = 2
    kb_outer: bool = True
    out_tile: int = 2


class WinogradFamily:
    name = "winograd"
    knobs_type = WinogradKnobs
    # the output transform reads each residual element right before writing the output
    # element at the same offset, and the input is transformed before any output is written
    residual_in_place = True

    @property
    def primitive(self):
        import jax

        return jax.lax.conv_general_dilated_p

    # ---- matching ----
    def match(self, eqn) -> WinogradSpec:
        g = read_conv(eqn)
        if (g.kh, g.kw) != (3, 3) or g.stride != (1, 1) or g.dilation != (1, 1):
            raise Unsupported(f"Winograd F(2x2,3x3) needs a 3x3 stride-1 undilated window, got "
                              f"{g.kh}x{g.kw} stride {g.stride} dilation {g.dilation}")
        if g.groups != 1:
            raise Unsupported(f"feature_group_count={g.groups}: Winograd here is ungrouped")
        if g.oh != g.h + sum(g.padding[0]) - 2 or g.ow != g.w + sum(g.padding[1]) - 2:
            raise Unsupported("output size disagrees with the 3x3 stride-1 window")
        return WinogradSpec(n=g.n, c=g.c, h=g.h, w=g.w, k=g.k, oh=g.oh, ow=g.ow,
                            padding=g.padding, **g.layouts)

    def relayout(self, spec, lhs=None, out=None):
        """spec reading its lhs in `lhs` and writing `out` (Layouts over N C H W; None keeps
        the spec's): permutations of N C H W, or those blocked on C alone (N C/b H W bc, b a
        power of two dividing the channels; an output's block innermost). Unsupported
        otherwise (pads, unfolds, other dims blocked)."""
        new = relayout(spec, lhs, out, blocked=True)
        _layout_blocks(new)
        return new

    def flops(self, spec: WinogradSpec) -> int:
        """The convolution's own flops (what it replaces), not the fewer the kernel runs."""
        return 2 * spec.n * spec.k * spec.oh * spec.ow * spec.c * 9

    def prefers(self, spec: WinogradSpec) -> bool:
        """False below MIN_CHANNELS channels (either side) or MIN_OUTPUTS output positions,
        where the direct convolution measured faster (no gain at 512@7: the 16 transformed
        filters outweigh 16 tiles)."""
        return min(spec.c, spec.k) >= MIN_CHANNELS and spec.oh * spec.ow >= MIN_OUTPUTS

    # ---- knobs ----
    def default_knobs(self, spec: WinogradSpec, isa: device.Isa) -> WinogradKnobs:
        """6 tiles x 2 vectors: 12 accumulators, as the direct conv's best tile; F(4x4) from
        MIN_F4_TILES tiles. Channel-blocked layouts take the same: every vector of VW
        output channels is stored on its own, whatever oc_vecs is."""
        _layout_blocks(spec)  # Unsupported for a layout the template cannot address
        oc_vecs = 2 if spec.k > isa.vector_floats else 1
        budget = isa.vector_registers - oc_vecs - 1
        knobs = WinogradKnobs(tile_block=max(1, min(6, budget // oc_vecs)), oc_vecs=oc_vecs,
                              out_tile=4 if spec.tiles(4) >= MIN_F4_TILES else 2)
        self.validate(spec, knobs, isa)
        return knobs

    def validate(self, spec: WinogradSpec, knobs: WinogradKnobs, isa: device.Isa) -> None:
        check_types(spec, knobs, ints=("tile_block", "oc_vecs", "out_tile"),
                    bools=("kb_outer",))
        # the spec's layouts too (records may hold any layout); no knob depends on them: the
        # input transform and the stores address one vector of VW channels at a time
        try:
            _layout_blocks(spec)
        except Unsupported as e:
            raise KnobError(str(e)) from e
        if knobs.out_tile not in OUT_TILES:
            raise KnobError(f"out_tile={knobs.out_tile}: Winograd here is F(m x m, 3x3) for m "
                            f"in {OUT_TILES}")
        if not 1 <= knobs.tile_block <= 16:
            raise KnobError(f"tile_block={knobs.tile_block} must be in [1, 16]")
        if not 1 <= knobs.oc_vecs <= 4:
            raise KnobError(f"oc_vecs={knobs.oc_vecs} must be in [1, 4]")
        regs = knobs.tile_block * knobs.oc_vecs + knobs.oc_vecs + 1
        if regs > isa.vector_registers:
            raise KnobError(f"tile_block={knobs.tile_block} x oc_vecs={knobs.oc_vecs} needs "
                            f"{regs} vector registers, {isa.name} has {isa.vector_registers}")

    def space(self, spec: WinogradSpec, isa: device.Isa) -> Space:
        """Layout: the output tile (F(2x2) or F(4x4): the transformed filter's and the
        workspace's panels) and the U panels' oc block (oc_vecs vectors; with prepacked
        weights they are the packed filter's layout). Loop: tiles per register tile, item
        order. The register budget of a (tile_block, oc_vecs) pair is validate()'s."""
        d = self.default_knobs(spec, isa)
        vw, regs = isa.vector_floats, isa.vector_registers
        oc_vecs = axis_values(range(1, min(4, -(-spec.k // vw)) + 1), d.oc_vecs)
        # small blocks, 8, and the block that fills the registers for each oc_vecs; no more
        # tiles than the batch has (at the smaller output tile); and each of those balanced
        # over each output tile's tile count (as many blocks, fewest padded rows: 49 tiles
        # in 7 blocks of 7 rather than 6 of 9, measured 5-9% faster at 14x14 and 28x28)
        cap = min(16, spec.tiles(min(OUT_TILES)))
        sizes = {min(cap, max(1, t)) for t in
                 [1, 2, 4, 8] + [(regs - v - 1) // v for v in oc_vecs]}
        balanced = {_balanced_block(spec.tiles(m), b) for m in OUT_TILES for b in sizes}
        blocks = axis_values(sizes | balanced, d.tile_block)
        return Space(self.name, WinogradKnobs, (
            Axis("out_tile", axis_values(OUT_TILES, d.out_tile), "layout"),
            Axis("oc_vecs", oc_vecs, "layout"),
            Axis("tile_block", blocks, "loop"),
            Axis("kb_outer", (False, True), "loop"),
        ))

    # ---- code generation ----
    def _sizes(self, spec: WinogradSpec, knobs: WinogradKnobs, isa: device.Isa):
        vw = isa.vector_floats
        ocb = knobs.oc_vecs * vw
        cp = -(-spec.c // vw) * vw
        kb = -(-spec.k // ocb)
        ntb = -(-spec.tiles(knobs.out_tile) // knobs.tile_block)
        return vw, ocb, cp, kb, ntb

    def render(self, spec: WinogradSpec, knobs: WinogradKnobs, isa: device.Isa):
        from alt_jax import runtime

        self.validate(spec, knobs, isa)
        vw, ocb, cp, kb, ntb = self._sizes(spec, knobs, isa)
        # (block, outer stride, inner stride) per dim; a linear layout's dims are one block
        lhs_blocks, out_blocks = _layout_blocks(spec)
        ln, lc, lh, lw = (lhs_blocks[d][2] for d in "NCHW")
        ro, ri, rh, rw = spec.rhs_strides
        on, ok, oh, ow = (out_blocks[d][2] for d in "NCHW")
        (lcb, lcbs, _), (okb, okbs, _) = lhs_blocks["C"], out_blocks["C"]
        (pt, pb), (pl, pr) = spec.padding
        values = dict(
            VW=vw, N=spec.n, C=spec.c, H=spec.h, IW=spec.w, K=spec.k, OH=spec.oh, OW=spec.ow,
            PT=pt, PB=pb, PL=pl, PR=pr, LHS_N=ln, LHS_C=lc, LHS_H=lh, LHS_W=lw,
            RHS_O=ro, RHS_I=ri, RHS_H=rh, RHS_W=rw, OUT_N=on, OUT_K=ok, OUT_H=oh, OUT_W=ow,
            LHS_CB=lcb, LHS_CBS=lcbs, OUT_KB=okb, OUT_KBS=okbs,
            PREPACKED=spec.prepacked, TILE_BLOCK=knobs.tile_block, OC_VECS=knobs.oc_vecs,
            KB_OUTER=knobs.kb_outer, OUT_TILE=knobs.out_tile,
            TH=-(-spec.oh // knobs.out_tile), TW=-(-spec.ow // knobs.out_tile), CP=cp, KB=kb,
            NTB=ntb,
            ACT=spec.epilogue.activation_code, HAS_SCALE=spec.epilogue.scale,
            HAS_SHIFT=spec.epilogue.shift, HAS_RESIDUAL=spec.epilogue.residual)
        for key, v in values.items():
            if not isinstance(v, bool):
                R.check_int(key, v, 0, 2**40)
        digest = hashlib.sha256(repr((spec, knobs, isa.name)).encode()).hexdigest()[:16]
        values["SYMBOL"] = f"alt_winograd_{digest}"
        code = R.render(R.load_template(_TEMPLATE), values)
        # the transformed input panels, then (not prepacked) the transformed filter
        u_shape = self._u_shape(spec, knobs, isa)
        ws_floats = u_shape[0] * ntb * knobs.tile_block * cp
        ws_bytes = 4 * (ws_floats + (0 if spec.prepacked else math.prod(u_shape)))
        return runtime.KernelSource(symbol=values["SYMBOL"], code=code, workspace_bytes=ws_bytes)

    def lower(self, spec: WinogradSpec, kernel, operands: Sequence,
              reuse_residual: bool = False) -> Sequence:
        """operands: [lhs, rhs (U if spec.prepacked), *spec.epilogue.inputs()]; a filter
        that is not prepacked is transformed by the kernel, on every call."""
        return lower_conv("winograd", spec, kernel, operands, reuse_residual)

    def kernel_inputs(self, spec: WinogradSpec, knobs: WinogradKnobs, operands: Sequence,
                      isa: device.Isa) -> list:
        """[lhs, rhs or U = pack_weights(rhs), *epilogue inputs] from the equation's
        operands."""
        return conv_kernel_inputs(self, spec, knobs, operands, isa)

    # ---- weights ----
    def _u_shape(self, spec: WinogradSpec, knobs: WinogradKnobs, isa: device.Isa) -> tuple:
        """The transformed filter's panels: ((out_tile + 2)^2, K/oc_block, C padded to the
        lanes, oc_block)."""
        vw, ocb, cp, kb, _ = self._sizes(spec, knobs, isa)
        return ((knobs.out_tile + 2) ** 2, kb, cp, ocb)

    def packed_weight_shape(self, spec: WinogradSpec, knobs: WinogradKnobs,
                            isa: device.Isa) -> tuple:
        """One flat buffer: U's panels, the filter itself [K][C][3][3] (the kernel's
        fallback for values outside the transforms' safe range) and its max |g|."""
        return (math.prod(self._u_shape(spec, knobs, isa)) + spec.k * spec.c * 9 + 1,)

    def pack_weights(self, spec: WinogradSpec, knobs: WinogradKnobs, rhs, isa: device.Isa):
        """U = G g G^T for every (output, input) channel pair, in the kernel's panels
        [xi = T a + b][oc block][c][oc in block] (T = out_tile + 2; oc block = oc_vecs x
        isa's lanes), zero-padded, then the filter [K][C][3][3] and max |g| (-1 if a tap is
        not finite), flat (packed_weight_shape); jnp, so it traces."""
        import jax.numpy as jnp

        xi, kb, cp, ocb = self._u_shape(spec, knobs, isa)
        g = spec.rhs_layout.invert(jnp.asarray(rhs, jnp.float32))  # O, I, 3, 3
        big_g = jnp.asarray(_G[knobs.out_tile], jnp.float32)
        u = jnp.einsum("ax,oixy,by->abio", big_g, g, big_g,
                       precision="highest")  # T, T, I, O
        u = jnp.pad(u.reshape(xi, spec.c, spec.k),
                    ((0, 0), (0, cp - spec.c), (0, kb * ocb - spec.k)))
        u = jnp.transpose(u.reshape(xi, cp, kb, ocb), (0, 2, 1, 3))
        # NaN-safe: XLA's max reduction may drop a NaN, isfinite does not
        max_g = jnp.where(jnp.all(jnp.isfinite(g)), jnp.max(jnp.abs(g)), -1.0)
        return jnp.concatenate([u.reshape(-1), g.reshape(-1),
                                max_g.reshape(1).astype(jnp.float32)])


FAMILY = WinogradFamily()
