"""Layouts: random primitive chains round-trip, index expressions agree with apply, conversions
agree with invert-then-apply, printing, validation errors, JSON, and unfold's halo tiles."""
import itertools
import re

import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from alt_jax import layout as lay
from alt_jax.layout import Layout, LayoutError, convert

FAST = settings(max_examples=30, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def logical_array(layout: Layout) -> np.ndarray:
    # Distinct nonzero values, so a wrong index or a padding zero shows up.
    return np.arange(1, 1 + np.prod(layout.shape), dtype=np.int32).reshape(layout.shape)


@st.composite
def logical_layouts(draw, sizes=st.integers(1, 6)):
    rank = draw(st.integers(1, 3))
    names = "ABC"[:rank]
    return Layout(names, tuple(draw(sizes) for _ in names))


ALL_KINDS = ("split", "reorder", "fuse", "unfold", "pad")
RESHAPE_KINDS = ("split", "reorder", "fuse")


def add_primitive(draw, layout: Layout, kinds=ALL_KINDS) -> Layout:
    """One random primitive, with the pad that makes it legal where one is needed."""
    kind = draw(st.sampled_from(kinds))
    dims, sizes = layout.dims, layout.physical_shape
    i = draw(st.integers(0, len(dims) - 1))
    if kind == "split":
        if "pad" in kinds:
            factor = draw(st.integers(1, 4))
        else:
            factor = draw(st.sampled_from([f for f in range(1, 5) if sizes[i] % f == 0]))
        if sizes[i] % factor:
            layout = layout.pad(i, factor)
        return layout.split(i, factor)
    if kind == "reorder":
        return layout.reorder(draw(st.permutations(dims)))
    if kind == "fuse":
        return layout.fuse(i, i + 1) if i + 1 < len(dims) else layout
    if kind == "unfold":
        tile = draw(st.integers(1, 3))
        stride = draw(st.integers(1, tile))
        size = sizes[i]
        short = tile - size if size < tile else -(size - tile) % stride
        if short:
            layout = layout.pad(i, (0, short))
        return layout.unfold(i, tile, stride)
    if draw(st.booleans()):
        return layout.pad(i, draw(st.integers(1, 4)))
    return layout.pad(i, (draw(st.integers(0, 2)), draw(st.integers(0, 2))))


@st.composite
def chains(draw, base=None, min_len=0, max_len=4, kinds=ALL_KINDS):
    layout = draw(logical_layouts()) if base is None else base
    for _ in range(draw(st.integers(min_len, max_len))):
        layout = add_primitive(draw, layout, kinds)
    return layout


def c_expression_as_python(text: str) -> str:
    # Every / and % in the text is of nonnegative ints (or clamped by max(0, ...)), where C's
    # truncating division equals floor division.
    return text.replace("/", "//")


# ---------------------------------------------------------------------------------------
# Properties of random chains


@FAST
@given(chains())
def test_invert_undoes_apply_and_shapes_match(layout):
    x = logical_array(layout)
    # Under one jit: the chains must trace, and one compile is cheaper than eager op-by-op.
    y, back = jax.jit(lambda x: (lambda y: (y, layout.invert(y)))(layout.apply(x)))(x)
    assert y.shape == layout.physical_shape
    np.testing.assert_array_equal(np.asarray(back), x)


@FAST
@given(chains())
def test_index_expression_agrees_with_apply(layout):
    x = logical_array(layout)
    flat = np.asarray(jax.jit(layout.apply)(x)).reshape(-1)
    text, offset = layout.index_expr()
    code = compile(c_expression_as_python(text), "<index_expr>", "eval")
    variables = [n.lower() for n in layout.names]
    strides = layout.strides()
    for index in itertools.product(*map(range, layout.shape)):
        env = dict(zip(variables, index))
        off = offset(**env)
        assert flat[off] == x[index], (str(layout), text, index)
        assert eval(code, {"max": max}, env) == off, (text, index)
        assert layout.offset(index) == off
        if strides is not None:
            assert sum(strides[n] * i for n, i in zip(layout.names, index)) == off


@FAST
@given(st.data())
def test_convert_matches_invert_then_apply(data):
    base = data.draw(logical_layouts())
    src = data.draw(chains(base, min_len=1))
    dst = data.draw(chains(base, min_len=1))
    x = logical_array(base)
    conversion = convert(src, dst)
    got, want = jax.jit(lambda x: (conversion(src.apply(x)), dst.apply(x)))(x)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@FAST
@given(st.data())
def test_power_of_two_reshape_chains_convert_by_one_transpose(data):
    # Power-of-two blockings always nest, so no pair needs the general path (which only
    # blockings cutting a dim at incompatible points, like 4 vs 3 of 12, take).
    base = data.draw(logical_layouts(st.sampled_from([1, 2, 4, 8])))
    src = data.draw(chains(base, min_len=1, kinds=RESHAPE_KINDS))
    dst = data.draw(chains(base, min_len=1, kinds=RESHAPE_KINDS))
    conversion = convert(src, dst)
    assert conversion.kind in ("identity", "transpose")
    assert _ops(conversion, src) <= {"reshape", "transpose"}
    x = logical_array(base)
    got, want = jax.jit(lambda x: (conversion(src.apply(x)), dst.apply(x)))(x)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@FAST
@given(chains())
def test_json_round_trip_and_hash(layout):
    again = Layout.from_json(layout.to_json())
    assert again == layout and hash(again) == hash(layout)
    assert str(again) == str(layout)


# ---------------------------------------------------------------------------------------
# Printing, index expressions and strides of the common layouts

NCHW = Layout("NCHW", (1, 16, 56, 56))


def test_printing_of_each_primitive():
    assert str(NCHW) == "N C H W"
    assert str(NCHW.split("C", 8)) == "N C/8 8c H W"
    assert str(NCHW.split("C", 8).reorder("N", "C/8", "H", "W", "8c")) == "N C/8 H W 8c"
    assert str(NCHW.unfold("H", 4, 2)) == "N C H/t4s2 4h W"
    assert str(Layout("NCHW", (1, 12, 5, 5)).pad("C", 8)) == "N C+pad8 H W"
    assert str(NCHW.pad("H", (1, 1))) == "N C H+pad(1,1) W"
    assert str(NCHW.fuse("H", "W")) == "N C (H W)"


def test_nchw_c_index_expression_and_shape():
    blocked = lay.nchw_c(NCHW.shape, 8)
    assert str(blocked) == "N C/8 H W 8c"
    assert blocked.physical_shape == (1, 2, 56, 56, 8)
    text, offset = blocked.index_expr()
    assert text == "(((n*2 + c/8)*56 + h)*56 + w)*8 + c%8"
    assert offset(n=0, c=11, h=2, w=3) == (((0 * 2 + 1) * 56 + 2) * 56 + 3) * 8 + 3
    assert blocked.strides() is None  # c/8 and c%8 are not one stride
    assert blocked.index_expr({"N": "b"})[0].startswith("(((b*2")


def test_nchw_c_pads_channels_when_the_block_does_not_divide():
    blocked = lay.nchw_c((1, 12, 3, 3), 8)
    assert str(blocked) == "N C+pad8/8 H W 8c"
    y = np.asarray(blocked.apply(logical_array(blocked)))
    assert y.shape == (1, 2, 3, 3, 8) and (y[:, 1, :, :, 4:] == 0).all()


def test_nhwc_and_adjacent_split_have_strides():
    assert lay.nhwc(NCHW.shape).strides() == {"N": 56 * 56 * 16, "C": 1, "H": 56 * 16, "W": 16}
    # A split whose halves stay adjacent is a reshape: still one stride per dim.
    assert Layout("MK", (6, 8)).split("K", 4).strides() == {"M": 8, "K": 1}
    # High padding keeps strides (rows step over the pad); low padding adds a constant.
    assert Layout("MK", (6, 5)).pad("K", 8).strides() == {"M": 8, "K": 1}
    assert Layout("MK", (6, 5)).pad("K", (1, 0)).strides() is None


def test_oihw_io_weight_layout():
    weights = lay.oihw_io((16, 8, 3, 3), i_block=4, o_block=8)
    assert str(weights) == "O/8 I/4 H W 4i 8o"
    assert weights.physical_shape == (2, 2, 3, 3, 4, 8)
    w = logical_array(weights)
    y = np.asarray(weights.apply(w))
    assert y[1, 0, 2, 1, 3, 5] == w[8 + 5, 3, 2, 1]


def test_fuse_after_split_folds_back_to_the_index():
    text, _ = Layout("MK", (6, 8)).split("K", 4).fuse("K/4", "4k").index_expr()
    assert text == "m*8 + k"


# ---------------------------------------------------------------------------------------
# Conversions


def _ops(conversion, layout):
    jaxpr = jax.make_jaxpr(conversion)(np.zeros(layout.physical_shape, np.float32))
    return {eqn.primitive.name for eqn in jaxpr.eqns}


def test_reshape_chains_convert_with_one_transpose():
    shape = (2, 16, 5, 5)
    src, dst = lay.nchw_c(shape, 8), lay.nhwc(shape).split("C", 4)
    conversion = convert(src, dst)
    assert conversion.kind == "transpose"
    assert _ops(conversion, src) <= {"reshape", "transpose"}
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(conversion(src.apply(x))), np.asarray(dst.apply(x)))


def test_same_padding_still_converts_with_one_transpose():
    shape = (1, 12, 3, 3)
    conversion = convert(lay.nchw_c(shape, 8), Layout("NCHW", shape).pad("C", 8).reorder(
        "N", "H", "W", "C+pad8"))
    assert conversion.kind == "transpose"


def test_incompatible_blocks_and_unfold_take_the_general_path():
    base = Layout("MK", (4, 12))
    assert convert(base.split("K", 4), base.split("K", 3)).kind == "general"
    assert convert(base, base.unfold("K", 4, 2)).kind == "general"
    assert convert(base, base).kind == "identity"


def test_convert_refuses_different_logical_tensors():
    with pytest.raises(LayoutError, match="different logical tensors"):
        convert(Layout("MK", (4, 8)), Layout("MK", (4, 6)))


# ---------------------------------------------------------------------------------------
# Validation


@pytest.mark.parametrize("build, message", [
    (lambda: Layout("NCHW", (1, 12, 4, 4)).split("C", 8),
     "split(C, 8): C=12 is not a multiple of 8; pad(C, 8) first"),
    (lambda: Layout("NCHW", (1, 12, 4, 4)).split("C", 0), "factor=0 must be a positive int"),
    (lambda: Layout("NCHW", (1, 12, 4, 4)).fuse("C", "W"),
     "fuse(C, W): C and W are not adjacent"),
    (lambda: Layout("NCHW", (1, 12, 4, 4)).fuse("H", "X"), "fuse(H, X): no dim 'X'"),
    (lambda: Layout("NCHW", (1, 12, 4, 4)).reorder("N", "H", "C"), "not a permutation"),
    (lambda: Layout("NCH", (1, 2, 7)).unfold("H", 4, 2),
     "H=7 is not covered exactly by tiles of 4 every 2"),
    (lambda: Layout("NCH", (1, 2, 8)).unfold("H", 2, 3), "stride 3 > tile 2"),
    (lambda: Layout("NCH", (1, 2, 3)).unfold("H", 4, 1), "pad(H, (0, 1)) first"),
    (lambda: Layout("MK", (4, 8)).pad("K", (-1, 0)), "nonnegative"),
    (lambda: Layout("MK", (4, 8, 2)), "positive int for each"),
    (lambda: Layout("MM", (4, 8)), "distinct"),
])
def test_validation_errors_name_the_primitive_and_fix(build, message):
    with pytest.raises(LayoutError, match=re.escape(message)):
        build()


def test_json_rejects_unknown_primitives():
    with pytest.raises(LayoutError, match="unknown primitive"):
        Layout.from_dict({"names": ["M"], "shape": [4], "primitives": [{"op": "store_at"}]})


# ---------------------------------------------------------------------------------------
# Unfold on a 1-D convolution: each tile carries its halo


def test_unfold_tiles_carry_the_halo_of_a_1d_conv():
    # A 3-tap conv producing 2 outputs per tile needs 4 inputs per tile, tiles every 2.
    x = np.arange(10, dtype=np.float32)
    tiled = Layout("W", (10,)).unfold("W", 4, 2)
    assert str(tiled) == "W/t4s2 4w" and tiled.physical_shape == (4, 4)
    tiles = np.asarray(tiled.apply(x))
    np.testing.assert_array_equal(tiles, [[0, 1, 2, 3], [2, 3, 4, 5], [4, 5, 6, 7], [6, 7, 8, 9]])
    kernel = np.array([1.0, -2.0, 0.5], np.float32)
    per_tile = np.stack([np.convolve(t, kernel[::-1], "valid") for t in tiles]).reshape(-1)
    np.testing.assert_allclose(per_tile, np.convolve(x, kernel[::-1], "valid"))
    np.testing.assert_array_equal(np.asarray(tiled.invert(tiles)), x)


def test_unfold_index_expression_names_the_first_tile():
    tiled = Layout("W", (10,)).unfold("W", 4, 2)
    text, offset = tiled.index_expr()
    assert text == "max(0, (w - 2)/2)*4 + w - max(0, (w - 2)/2)*2"
    # Element 3 is in tiles 0 and 1; the offset is the one in tile 0.
    assert offset(w=3) == 3 and offset(w=4) == 1 * 4 + 2


def test_unfold_invert_reads_the_first_tile_and_works_under_jit():
    tiled = Layout("CW", (2, 7)).pad("W", (1, 0)).unfold("W+pad(1,0)", 4, 2)
    x = np.arange(14, dtype=np.int32).reshape(2, 7)
    y = jax.jit(tiled.apply)(x)
    # Corrupt every copy except the first tile's: invert must not read them.
    marked = np.asarray(y).copy()
    marked[:, 1:, :2] = -1
    np.testing.assert_array_equal(np.asarray(jax.jit(tiled.invert)(marked)), x)
