"""What the conv families share: reading a conv_general_dilated equation into canonical
geometry, with the refusals every conv kernel makes, and placing logical dims in arrays.

Entry points: ConvGeometry (.layouts: the operands as alt_jax.layout Layouts), read_conv(eqn),
ConvOperands (operand shapes and strides for a conv spec, from its layouts), relayout (a
spec over other activation layouts), check_types (the type checks each conv family's
validate starts with), lower_conv (the checked FFI call of a conv kernel),
conv_kernel_inputs (what that call passes, from the equation's operands).
"""
from __future__ import annotations

import dataclasses

import numpy as np
from jax import lax

from alt_jax.layout import Layout, permuted
from alt_jax.ops.base import KnobError, Unsupported
from alt_jax.ops.epilogue import Epilogue


LHS_NAMES, RHS_NAMES, OUT_NAMES = "NCHW", "OIHW", "NCHW"  # canonical roles of the operands


class ConvOperands:
    """Shapes and addressing of a conv's dense operands, from the spec's layouts: a spec
    mixing this in has lhs_layout / rhs_layout / out_layout (alt_jax.layout.Layout over the
    canonical roles N C H W, O I H W, N C H W), each the arrangement its kernel reads or
    writes. Dimension numbers become these layouts once, in read_conv."""

    # the spec fields holding layouts, and the dimension-number field names records used
    # before layouts were the vocabulary: a permutation keeps its old record key
    LAYOUT_FIELDS = (("lhs_layout", "lhs_spec"), ("rhs_layout", "rhs_spec"),
                     ("out_layout", "out_spec"))

    @property
    def lhs_shape(self):
        return self.lhs_layout.physical_shape

    @property
    def rhs_shape(self):
        return self.rhs_layout.physical_shape

    @property
    def out_shape(self):
        return self.out_layout.physical_shape

    @staticmethod
    def _linear(layout, names):
        strides = layout.strides()
        if strides is None:
            raise KnobError(f"layout {layout} is not a permutation: this kernel addresses "
                            f"its operands by one stride per dim")
        return tuple(strides[n] for n in names)

    @property
    def lhs_strides(self):
        """Element strides of (N, C, H, W) in the lhs (a layout linear in them)."""
        return self._linear(self.lhs_layout, LHS_NAMES)

    @property
    def rhs_strides(self):
        """Element strides of (O, I, KH, KW) in the rhs."""
        return self._linear(self.rhs_layout, RHS_NAMES)

    @property
    def out_strides(self):
        """Element strides of (N, K, OH, OW) in the output."""
        return self._linear(self.out_layout, OUT_NAMES)

    @property
    def linear_layouts(self) -> bool:
        """Every operand addressed by one stride per dim (no channel blocks)."""
        return all(getattr(self, f).strides() is not None for f, _ in self.LAYOUT_FIELDS)

    def workload(self) -> dict:
        """The spec as records key it: a permutation layout as the dimension numbers it
        was keyed by before (so records tuned then still apply), any other as its chain."""
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            legacy = dict(self.LAYOUT_FIELDS).get(f.name)
            if legacy is not None:
                perm = v.permutation
                if perm is not None:
                    out[legacy] = [v.dims.index(n) for n in v.names]
                else:
                    out[f.name] = v.to_dict()
            elif dataclasses.is_dataclass(v):
                out[f.name] = dataclasses.asdict(v)
            else:
                out[f.name] = v
        return out


def _layouts(g: "ConvGeometry") -> dict:
    return dict(lhs_layout=permuted(LHS_NAMES, g.lhs_spec, (g.n, g.c, g.h, g.w)),
                rhs_layout=permuted(RHS_NAMES, g.rhs_spec, (g.k, g.ci, g.kh, g.kw)),
                out_layout=permuted(OUT_NAMES, g.out_spec, (g.n, g.k, g.oh, g.ow)))


@dataclasses.dataclass(frozen=True)
class ConvGeometry:
    """A 2-D conv as logical sizes plus jax's dimension-number positions: lhs_spec holds the
    axes of (N, C, H, W), rhs_spec of (O, I, KH, KW), out_spec of (N, K, OH, OW)."""

    n: int
    c: int
    h: int
    w: int
    k: int
    ci: int                      # input channels per group
    kh: int
    kw: int
    oh: int
    ow: int
    stride: tuple
    padding: tuple               # ((top, bottom), (left, right))
    dilation: tuple              # rhs_dilation
    groups: int
    lhs_spec: tuple
    rhs_spec: tuple
    out_spec: tuple

    @property
    def layouts(self) -> dict:
        """lhs_layout / rhs_layout / out_layout: the dimension numbers as Layouts."""
        return _layouts(self)


def _ints(values) -> tuple:
    return tuple(int(v) for v in values)


def read_conv(eqn) -> ConvGeometry:
    """The equation's geometry, or Unsupported naming what no conv kernel here handles."""
    if eqn.primitive is not lax.conv_general_dilated_p:
        raise Unsupported(f"primitive {eqn.primitive} is not conv_general_dilated")
    p = eqn.params
    lhs, rhs = (v.aval for v in eqn.invars)
    out = eqn.outvars[0].aval
    if len(lhs.shape) != 4:
        raise Unsupported(f"{len(lhs.shape) - 2}-D convolution (lhs shape {lhs.shape}): only "
                          "2 spatial dims are generated")
    for name, aval in (("lhs", lhs), ("rhs", rhs), ("result", out)):
        if np.dtype(aval.dtype) != np.float32:
            raise Unsupported(f"{name} dtype {aval.dtype}: only float32 is generated")
        if 0 in aval.shape:
            raise Unsupported(f"{name} shape {aval.shape} has a zero-size dim: nothing to compute")
    pet = p.get("preferred_element_type")
    if pet is not None and np.dtype(pet) != np.float32:
        raise Unsupported(f"preferred_element_type={pet}: only float32 dtype is generated")
    if _ints(p["lhs_dilation"]) != (1, 1):
        raise Unsupported(f"lhs_dilation={_ints(p['lhs_dilation'])}: transposed convolutions "
                          "are left to XLA")
    if int(p["batch_group_count"]) != 1:
        raise Unsupported(f"batch_group_count={p['batch_group_count']}: only 1 is supported")
    padding = tuple(_ints(pair) for pair in p["padding"])
    if min(min(pair) for pair in padding) < 0:
        raise Unsupported(f"padding={padding}: negative padding (cropping) is left to XLA")
    stride, dilation = _ints(p["window_strides"]), _ints(p["rhs_dilation"])
    if min(stride) < 1 or min(dilation) < 1:
        raise Unsupported(f"window_strides={stride}, rhs_dilation={dilation}: must be >= 1")
    dn = p["dimension_numbers"]
    ls, rs, os_ = (_ints(s) for s in (dn.lhs_spec, dn.rhs_spec, dn.out_spec))
    n, c, h, w = (int(lhs.shape[d]) for d in ls)
    k, ci, kh, kw = (int(rhs.shape[d]) for d in rs)
    on, ok, oh, ow = (int(out.shape[d]) for d in os_)
    groups = int(p["feature_group_count"])
    if c % groups or k % groups or ci != c // groups:
        raise Unsupported(f"feature_group_count={groups} does not divide C={c} / K={k}")
    for i, (size, ksize, o) in enumerate(((h, kh, oh), (w, kw, ow))):
        expect = (size + sum(padding[i]) - (ksize - 1) * dilation[i] - 1) // stride[i] + 1
        if expect != o:  # lax's shape rule: a mismatch means the params were misread
            raise Unsupported(f"output size {o} along spatial dim {i} disagrees with the "
                              f"window arithmetic ({expect})")
    if (on, ok) != (n, k):
        raise Unsupported(f"result shape {out.shape} does not match the conv's params")
    return ConvGeometry(n=n, c=c, h=h, w=w, k=k, ci=ci, kh=kh, kw=kw, oh=oh, ow=ow,
                        stride=stride, padding=padding, dilation=dilation, groups=groups,
                        lhs_spec=ls, rhs_spec=rs, out_spec=os_)


def _check_count(family: str, spec, operands) -> tuple:
    names = ("lhs", "rhs") + spec.epilogue.inputs()
    if len(operands) != len(names):
        raise ValueError(f"{family} kernel takes {len(names)} operands {names}, "
                         f"got {len(operands)}")
    return names


def conv_kernel_inputs(family, spec, knobs, operands, isa) -> list:
    """What a conv kernel rendered for (spec, knobs, isa) reads, from the equation's operands
    [lhs, rhs (its own layout), *spec.epilogue.inputs()]: the rhs packed by
    family.pack_weights when spec.prepacked; everything else goes to lower_conv as it is."""
    _check_count(family.name, spec, operands)
    lhs, rhs, *extra = operands
    if spec.prepacked:
        rhs = family.pack_weights(spec, knobs, rhs, isa)
    return [lhs, rhs, *extra]


def lower_conv(family: str, spec, kernel, operands, reuse_residual: bool = False,
               check_only: bool = False) -> list:
    """The kernel's FFI call on [lhs, rhs (whatever the kernel reads when spec.prepacked),
    *spec.epilogue.inputs()], each checked for the shape and dtype the kernel reads (a
    mismatch is a ValueError naming the family and operand); reuse_residual writes the result
    into the residual's buffer. check_only: the checks alone (a CUDA family calls its own
    kernel)."""
    import jax

    from alt_jax import runtime

    names = _check_count(family, spec, operands)
    for name, x in zip(names, operands):
        want = {"lhs": spec.lhs_shape, "scale": (spec.k,), "shift": (spec.k,),
                "residual": spec.out_shape,
                "rhs": None if spec.prepacked else spec.rhs_shape}.get(name)
        if want is not None and tuple(x.shape) != tuple(want):
            raise ValueError(f"{family} operand {name} has shape {tuple(x.shape)}, the kernel "
                             f"reads {tuple(want)}")
        if np.dtype(x.dtype) != np.float32:
            raise ValueError(f"{family} operand {name} has dtype {x.dtype}, needs float32")
    if check_only:
        return []
    out = jax.ShapeDtypeStruct(spec.out_shape, np.float32)
    return runtime.ffi_call(kernel, list(operands), [out],
                            spec.epilogue.output_aliases(reuse_residual))


def check_types(spec, knobs, ints=(), bools=()) -> None:
    """KnobError unless spec.epilogue is an Epilogue, spec.prepacked a bool, the knobs named
    in ints ints (a bool is not one) and those in bools bools: knobs come from records
    files too, so their types are checked before their values are."""
    if not isinstance(spec.epilogue, Epilogue):
        raise KnobError(f"spec.epilogue={spec.epilogue!r} must be an Epilogue")
    if not isinstance(spec.prepacked, bool):
        raise KnobError(f"spec.prepacked={spec.prepacked!r} must be a bool")
    for name in ints:
        v = getattr(knobs, name)
        if isinstance(v, bool) or not isinstance(v, int):
            raise KnobError(f"{name}={v!r} must be an int")
    for name in bools:
        if not isinstance(getattr(knobs, name), bool):
            raise KnobError(f"{name}={getattr(knobs, name)!r} must be a bool")


FLT_MAX = float(np.finfo(np.float32).max)


def all_within(x, limit: float):
    """all |x| <= limit (False if x holds a NaN): a bool for a concrete array, else a traced
    bool. Not max |x| <= limit: XLA's CPU max reduction drops NaNs (jax 0.10: a NaN in a
    16384-element array gives the max of the rest, or -inf when it is the last element)."""
    import jax
    import jax.numpy as jnp

    if isinstance(x, jax.core.Tracer):
        return jnp.all(jnp.abs(x) <= np.float32(limit))
    return bool(np.all(np.abs(np.asarray(x, np.float32)) <= np.float32(limit)))


def finite_weights_if_padded_1x1(spec, rhs):
    """safe_operands of the direct conv families. On padded taps a conv forms 0 * w (NaN
    for a non-finite weight), and so do the kernels. But XLA rewrites some 1x1 convs into
    a multiply and a pad of the output, which gives 0 on the padded rows instead: always
    for <= 2 input channels per group (jax 0.10.2), and for others depending on the
    program around the conv (the same grouped 1x1 conv gave 112 NaNs as a program and 52
    inside a lax.cond branch). So a padded 1x1 conv with a non-finite weight runs in XLA;
    larger windows keep the kernel (XLA forms the NaN there, as measured over 1-8 channels,
    groups and windows up to 3x3). Constant weights are decided now; weights passed as
    arguments cost one pass over them per call, and only for padded 1x1 convs."""
    if (spec.kh, spec.kw) != (1, 1) or not any(lo or hi for lo, hi in spec.padding):
        return None
    return all_within(rhs, FLT_MAX)


def relayout(spec, lhs: Layout | None = None, out: Layout | None = None, *, blocked=False):
    """spec reading its lhs in `lhs` and writing `out` (canonical N C H W names; None keeps
    the spec's). Unsupported when the logical tensor differs, or when a layout is not a
    permutation and the family's kernels address by one stride per dim (blocked=False)."""
    changes = {}
    for field, layout in (("lhs_layout", lhs), ("out_layout", out)):
        if layout is None:
            continue
        have = getattr(spec, field)
        if (layout.names, layout.shape) != (have.names, have.shape):
            raise Unsupported(f"{field} {layout} is over {layout.names} {layout.shape}, the "
                              f"conv's is {have.names} {have.shape}")
        if layout.permutation is None and not blocked:
            raise Unsupported(f"{field} {layout}: this family's kernels read and write "
                              f"permutations of N C H W only")
        changes[field] = layout
    return dataclasses.replace(spec, **changes) if changes else spec


def dimension_numbers(spec) -> lax.ConvDimensionNumbers:
    """jax's dimension numbers of a spec whose layouts are permutations (references)."""
    def positions(layout):
        if layout.permutation is None:
            raise ValueError(f"layout {layout} is not a permutation: no dimension numbers")
        return tuple(layout.dims.index(n) for n in layout.names)
    return lax.ConvDimensionNumbers(positions(spec.lhs_layout), positions(spec.rhs_layout),
                                    positions(spec.out_layout))


def channel_blocks(family: str, layout: Layout, role: str, channels: int,
                   per_group: int | None = None, groups: int = 1) -> dict:
    """{dim: (block, outer, inner)} (Layout.block_strides) of an lhs or output layout over
    N C H W that a conv template addresses: linear, or channel-blocked (N C/b H W bc: a
    power-of-two block of C dividing the channels, with groups each group's channels whole
    blocks, every other dim one stride, an output's block channels contiguous).
    Unsupported with the reason otherwise."""
    blocks = layout.block_strides
    if blocks is None:
        raise Unsupported(f"{role} layout {layout}: the {family} template addresses each dim "
                          f"by a block and two strides; this one (pads, unfolds) has none")
    for name, size in zip(layout.names, layout.shape):
        if blocks[name][0] < size and name != "C":
            raise Unsupported(f"{role} layout {layout} blocks {name} by {blocks[name][0]}: "
                              f"the {family} template blocks the channel dim C only")
    b = blocks["C"][0]
    if b < channels:
        if b & (b - 1):
            raise Unsupported(f"{role} layout {layout}: channel block {b} is not a power of "
                              f"two (channel vectors and blocks must divide one another)")
        if channels % b:
            raise Unsupported(f"{role} layout {layout}: channel block {b} does not divide "
                              f"{channels} channels")
        if groups > 1 and (per_group or channels) % b:
            raise Unsupported(f"{role} layout {layout}: groups of {per_group} channels "
                              f"straddle its channel blocks of {b}")
        if role == "output" and blocks["C"][2] != 1:
            raise Unsupported(f"output layout {layout}: a blocked output needs the channels "
                              f"of a block contiguous (the block innermost, N C/b H W bc)")
    return blocks
