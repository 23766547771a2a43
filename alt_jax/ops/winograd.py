"""3x3 stride-1 convolutions by Winograd's F(2x2, 3x3): 16 multiply-adds per 2x2 outputs and
channel pair instead of 36.

Entry points: FAMILY (WinogradFamily: match/flops/prefers/default_knobs/validate/space/
render/lower/pack_weights/kernel_inputs), WinogradSpec, WinogradKnobs. Template
codegen/winograd.cc; its inputs are [lhs, U = pack_weights(rhs) (the transformed filter),
*Spec.epilogue.inputs()].

Tried before the direct conv2d family. match() declines (Unsupported) only what the kernel
cannot compute; prefers() says False where the direct convolution measured faster (few
channels or outputs), so without a tuning record those convs go on to conv2d.
"""
from __future__ import annotations

import dataclasses
import hashlib
from typing import Sequence

import numpy as np

from alt_jax import device
from alt_jax.codegen import render as R
from alt_jax.ops.base import Axis, KnobError, Space, Unsupported, axis_values
from alt_jax.ops.conv_common import (FLT_MAX, ConvOperands, all_within,
                                     check_types, conv_kernel_inputs, lower_conv, read_conv)
from alt_jax.ops.epilogue import Epilogue

_TEMPLATE = "winograd.cc"
# G of F(2x2, 3x3): U = G g G^T turns a 3x3 filter into the 4x4 one the tiles multiply by.
_G = np.array([[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.0, 0.0, 1.0]],
              np.float32)
# Values the transforms can take without overflowing. With |input| <= X and |filter| <= W:
#   input transform B^T d B: every entry sums 4 inputs with signs ............. <= 4 X
#   filter transform G g G^T: partial sums (g0 + g1 + g2, then the same over rows of G g)
#     <= 4.5 W before the halvings, entries <= 2.25 W
#   the 16 GEMMs over C channels, every partial sum ............... <= C 4X 2.25W = 9 C X W
#   output transform A^T M A: 3 then 3 terms of M ............................. <= 81 C X W
# so with 81 C X W, 4 X and 4.5 W below FLT_MAX / 2 (a factor 2 for the rounding of all of
# the above and of the bounds) nothing overflows, XLA's own sums (<= 9 C X W) are finite as
# well, and the two agree up to rounding. Outside the bounds they need not: an inf or a value
# near 3e38 turns into inf - inf over a whole tile, and a NaN fails every <= test.
_INPUT_LIMIT = FLT_MAX / (2 * 4)
_FILTER_LIMIT = FLT_MAX / (2 * 4.5)


def _product_limit(c: int) -> float:
    """The largest max|input| * max|filter| whose transforms cannot overflow over c channels."""
    return FLT_MAX / (2 * 81 * c)


def _concrete_max_abs(x):
    """max |x| of a concrete array (NaN if it holds one), None for a tracer."""
    import jax

    if isinstance(x, jax.core.Tracer):
        return None
    return float(np.max(np.abs(np.asarray(x, np.float32))))


# Where the transform pays (measured on the 2-core Zen3 dev VM, see docs/ARCHITECTURE.md):
# enough tiles per image to fill the GEMM rows and enough channels to amortise the
# transforms. A heuristic (prefers()), not a limit: the kernel computes smaller convs too.
MIN_CHANNELS = 64
MIN_OUTPUTS = 14 * 14


@dataclasses.dataclass(frozen=True)
class WinogradSpec(ConvOperands):
    """A 3x3 stride-1, undilated, ungrouped convolution: logical sizes and the positions of
    the logical dims in the operands (jax's dimension numbers, as in Conv2dSpec).
    epilogue / prepacked as in Conv2dSpec; prepacked means the rhs input is already U."""

    n: int
    c: int
    h: int
    w: int
    k: int
    oh: int
    ow: int
    padding: tuple[tuple[int, int], tuple[int, int]]
    lhs_spec: tuple[int, int, int, int]
    rhs_spec: tuple[int, int, int, int]
    out_spec: tuple[int, int, int, int]
    epilogue: Epilogue = Epilogue()
    prepacked: bool = False
    kh = 3
    kw = 3

    @property
    def dim_orders(self):
        return self.lhs_spec, self.rhs_spec, self.out_spec

    @property
    def rhs_in_channels(self) -> int:
        return self.c

    @property
    def tiles(self) -> int:
        """2x2 output tiles in the whole batch."""
        return self.n * (-(-self.oh // 2)) * (-(-self.ow // 2))


@dataclasses.dataclass(frozen=True, order=True)
class WinogradKnobs:
    """tile_block: tiles per register tile (GEMM rows); oc_vecs: vectors of output channels
    per register tile; kb_outer: parallel items ordered oc block major (each oc block's U
    panels stay in L2 while the tile blocks go by) rather than tile block major."""

    tile_block: int = 6
    oc_vecs: int = 2
    kb_outer: bool = True


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
                            padding=g.padding, lhs_spec=g.lhs_spec, rhs_spec=g.rhs_spec,
                            out_spec=g.out_spec)

    def flops(self, spec: WinogradSpec) -> int:
        """The convolution's own flops (what it replaces), not the fewer the kernel runs."""
        return 2 * spec.n * spec.k * spec.oh * spec.ow * spec.c * 9

    def prefers(self, spec: WinogradSpec) -> bool:
        """False below MIN_CHANNELS channels (either side) or MIN_OUTPUTS output positions,
        where the direct convolution measured faster (no gain at 512@7: the 16 transformed
        filters outweigh 16 tiles)."""
        return min(spec.c, spec.k) >= MIN_CHANNELS and spec.oh * spec.ow >= MIN_OUTPUTS

    # ---- operand values ----
    def safe_operands(self, spec: WinogradSpec, lhs, rhs):
        """Whether the transforms stay within float range for these values (see _INPUT_LIMIT):
        a bool when the operands are concrete or a constant filter already decides, else a
        traced bool (the planner then runs XLA on the calls where it is False). A constant
        filter is checked once, here, and bounds the input by its own max |w|; a traced one
        is bounded like the input, by sqrt of the product limit (6e16 at C = 512)."""
        limit = _product_limit(spec.c)
        w = _concrete_max_abs(rhs)
        if w is None:
            both = min(_INPUT_LIMIT, _FILTER_LIMIT, float(np.sqrt(limit)))
            return all_within(lhs, both) & all_within(rhs, both)
        if not w <= _FILTER_LIMIT:  # NaN fails too
            return False
        return all_within(lhs, min(_INPUT_LIMIT, limit / w) if w > 0 else _INPUT_LIMIT)

    # ---- knobs ----
    def default_knobs(self, spec: WinogradSpec, isa: device.Isa) -> WinogradKnobs:
        """6 tiles x 2 vectors: 12 accumulators, as the direct conv's best tile."""
        oc_vecs = 2 if spec.k > isa.vector_floats else 1
        budget = isa.vector_registers - oc_vecs - 1
        knobs = WinogradKnobs(tile_block=max(1, min(6, budget // oc_vecs)), oc_vecs=oc_vecs)
        self.validate(spec, knobs, isa)
        return knobs

    def validate(self, spec: WinogradSpec, knobs: WinogradKnobs, isa: device.Isa) -> None:
        check_types(spec, knobs, ints=("tile_block", "oc_vecs"), bools=("kb_outer",))
        if not 1 <= knobs.tile_block <= 16:
            raise KnobError(f"tile_block={knobs.tile_block} must be in [1, 16]")
        if not 1 <= knobs.oc_vecs <= 4:
            raise KnobError(f"oc_vecs={knobs.oc_vecs} must be in [1, 4]")
        regs = knobs.tile_block * knobs.oc_vecs + knobs.oc_vecs + 1
        if regs > isa.vector_registers:
            raise KnobError(f"tile_block={knobs.tile_block} x oc_vecs={knobs.oc_vecs} needs "
                            f"{regs} vector registers, {isa.name} has {isa.vector_registers}")

    def space(self, spec: WinogradSpec, isa: device.Isa) -> Space:
        """Layout: the U panels' oc block (oc_vecs vectors; with prepacked weights it is the
        packed filter's layout). Loop: tiles per register tile, item order. The register
        budget of a (tile_block, oc_vecs) pair is validate()'s."""
        d = self.default_knobs(spec, isa)
        vw, regs = isa.vector_floats, isa.vector_registers
        oc_vecs = axis_values(range(1, min(4, -(-spec.k // vw)) + 1), d.oc_vecs)
        # small blocks, 8, and the block that fills the registers for each oc_vecs; no more
        # tiles than the batch has
        cap = min(16, spec.tiles)
        blocks = axis_values([min(cap, max(1, t)) for t in
                              [1, 2, 4, 8] + [(regs - v - 1) // v for v in oc_vecs]],
                             d.tile_block)
        return Space(self.name, WinogradKnobs, (
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
        ntb = -(-spec.tiles // knobs.tile_block)
        return vw, ocb, cp, kb, ntb

    def render(self, spec: WinogradSpec, knobs: WinogradKnobs, isa: device.Isa):
        from alt_jax import runtime

        self.validate(spec, knobs, isa)
        vw, ocb, cp, kb, ntb = self._sizes(spec, knobs, isa)
        ln, lc, lh, lw = spec.lhs_strides
        ro, ri, rh, rw = spec.rhs_strides
        on, ok, oh, ow = spec.out_strides
        (pt, pb), (pl, pr) = spec.padding
        values = dict(
            VW=vw, N=spec.n, C=spec.c, H=spec.h, IW=spec.w, K=spec.k, OH=spec.oh, OW=spec.ow,
            PT=pt, PB=pb, PL=pl, PR=pr, LHS_N=ln, LHS_C=lc, LHS_H=lh, LHS_W=lw,
            RHS_O=ro, RHS_I=ri, RHS_H=rh, RHS_W=rw, OUT_N=on, OUT_K=ok, OUT_H=oh, OUT_W=ow,
            PREPACKED=spec.prepacked, TILE_BLOCK=knobs.tile_block, OC_VECS=knobs.oc_vecs,
            KB_OUTER=knobs.kb_outer,
            TH=-(-spec.oh // 2), TW=-(-spec.ow // 2), CP=cp, KB=kb, NTB=ntb,
            ACT=spec.epilogue.activation_code, HAS_SCALE=spec.epilogue.scale,
            HAS_SHIFT=spec.epilogue.shift, HAS_RESIDUAL=spec.epilogue.residual)
        for key, v in values.items():
            if not isinstance(v, bool):
                R.check_int(key, v, 0, 2**40)
        digest = hashlib.sha256(repr((spec, knobs, isa.name)).encode()).hexdigest()[:16]
        values["SYMBOL"] = f"alt_winograd_{digest}"
        code = R.render(R.load_template(_TEMPLATE), values)
        # the transformed input panels, then (not prepacked) the transformed filter
        ws_floats = 16 * ntb * knobs.tile_block * cp
        ws_bytes = 4 * (ws_floats + (0 if spec.prepacked else 16 * kb * cp * ocb))
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
    def packed_weight_shape(self, spec: WinogradSpec, knobs: WinogradKnobs,
                            isa: device.Isa) -> tuple:
        """(16, K/oc_block, C padded to the lanes, oc_block)."""
        vw, ocb, cp, kb, _ = self._sizes(spec, knobs, isa)
        return (16, kb, cp, ocb)

    def pack_weights(self, spec: WinogradSpec, knobs: WinogradKnobs, rhs, isa: device.Isa):
        """U = G g G^T for every (output, input) channel pair, in the kernel's panels
        [xi = 4a + b][oc block][c][oc in block] (oc block = oc_vecs x isa's lanes),
        zero-padded; jnp, so it traces."""
        import jax.numpy as jnp

        _, kb, cp, ocb = self.packed_weight_shape(spec, knobs, isa)
        g = jnp.transpose(jnp.asarray(rhs, jnp.float32), spec.rhs_spec)  # O, I, 3, 3
        u = jnp.einsum("ax,oixy,by->abio", _G, g, _G)  # 4, 4, I, O
        u = jnp.pad(u.reshape(16, spec.c, spec.k),
                    ((0, 0), (0, cp - spec.c), (0, kb * ocb - spec.k)))
        return jnp.transpose(u.reshape(16, cp, kb, ocb), (0, 2, 1, 3))


FAMILY = WinogradFamily()
