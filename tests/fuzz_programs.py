"""Random programs for the fuzz suite (tests/test_fuzz.py): convs, dot_generals, small
programs around them, and the same with inf / NaN / huge values in data and weights.

Every case is Python source text that defines `f` and `args` on its own (numpy, jax, lax
only), so the text printed for a failure is a complete reproducer. make_case(kind, seed) is
deterministic. Shapes come from small fixed menus and each kind has a bounded pool of
structures (seed % pool picks one), so the kernel cache gets hits across cases; the seed
also draws the values.

Run one case by hand: python tests/test_fuzz.py KIND SEED   (prints it, then checks it)
"""
from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Optional

import numpy as np

KINDS = ("conv", "dot", "program", "special")
_KIND_ID = {kind: i for i, kind in enumerate(KINDS)}
DEFAULT_POOL = 96  # structures per kind; the seed picks one and draws the values

# Special values placed into data and weights (the "special" kind). Only values whose
# result does not depend on the order of summation or on FMA contraction: a product that
# overflows float32 when rounded on its own (3e38 * 2) can stay finite inside an FMA
# (fma(3e38, 2, -3e38) = 3e38), and XLA itself does both, depending on the op. So 1e30
# goes into data only (its products with weights stay finite), inf and NaN anywhere, and
# a near-max 3e38 alone: one value in a single conv or dot_general.
NONFINITE_VALUES = ("np.inf", "-np.inf", "np.nan")
DATA_HUGE_VALUES = ("1e30", "-1e30")
NEAR_MAX_VALUES = ("3e38", "-3e38", "3.4e38")
DATA_PREFIXES = ("x", "z")    # array name prefixes of data (not weights or per-channel)

HEADER = ("import numpy as np\nimport jax\nimport jax.numpy as jnp\nfrom jax import lax\n")


@dataclasses.dataclass(frozen=True)
class Case:
    kind: str      # one of KINDS
    seed: int
    summary: str   # one line: what the structure is
    code: str      # defines f and args

    def build(self):
        """(f, args) from the code."""
        namespace: dict = {}
        exec(compile(self.code, f"<fuzz {self.kind} {self.seed}>", "exec"), namespace)
        return namespace["f"], namespace["args"]

    def repro(self) -> str:
        """A standalone script: the case, then the comparison it failed."""
        return (f"# fuzz case {self.kind}:{self.seed}  {self.summary}\n{self.code}"
                "import alt_jax\n"
                "ref = jax.jit(f)(*args)\n"
                "got = alt_jax.optimize(f, min_flops=0)(*args)\n"
                "for r, g in zip(jax.tree_util.tree_leaves(ref), "
                "jax.tree_util.tree_leaves(got)):\n"
                "    print(np.nanmax(np.abs(np.asarray(r) - np.asarray(g))), "
                "np.nanmax(np.abs(r)))\n")


# ---------------------------------------------------------------------------------------
# Source text for arrays and the function


class _Source:
    """Collects array definitions and the body of f: `def f(x, p0, ...)`. Arrays are
    either arguments of f or constants closed over (alt_jax packs constant weights at
    plan time, so both paths get exercised)."""

    def __init__(self, seed: int):
        self.seed = seed
        self.defs: list = []
        self.body: list = []
        self.params: list = []
        self.arrays: list = []   # every defined array name (special values go into these)
        self._count = itertools.count()

    def name(self, prefix: str) -> str:
        return f"{prefix}{next(self._count)}"

    def array(self, shape, scale: float, as_arg: bool, prefix: str = "w") -> str:
        name = self.name(prefix)
        self.defs.append(f"{name} = (rng.standard_normal({tuple(shape)!r}) * {scale:.4g})"
                         f".astype(np.float32)")
        self.arrays.append((name, tuple(shape)))
        if as_arg:
            self.params.append(name)
        return name

    def let(self, expr: str, prefix: str = "y") -> str:
        name = self.name(prefix)
        self.body.append(f"{name} = {expr}")
        return name

    def code(self, outputs: list, specials: list = ()) -> str:
        lines = [HEADER, f"rng = np.random.default_rng({self.seed})", *self.defs, *specials]
        # Parameters have unique names (fresh per array), so closures see the constants and
        # f's arguments shadow nothing else.
        lines.append(f"def f({', '.join(self.params)}):")
        lines += [f"    {line}" for line in self.body]
        result = outputs[0] if len(outputs) == 1 else f"({', '.join(outputs)},)"
        lines.append(f"    return {result}")
        lines.append(f"args = ({''.join(p + ', ' for p in self.params)})")
        return "\n".join(lines) + "\n"


def _special_lines(rng: np.random.Generator, arrays: list) -> list:
    """Assignments putting 1-3 special values into each of some of the arrays."""
    lines = []
    chosen = [a for a in arrays if rng.random() < 0.7] or [arrays[0]]
    for name, shape in chosen:
        menu = NONFINITE_VALUES + (DATA_HUGE_VALUES if name.startswith(DATA_PREFIXES) else ())
        size = int(np.prod(shape))
        where = sorted({int(i) for i in rng.integers(0, size, int(rng.integers(1, 4)))})
        values = [_pick(rng, menu) for _ in where]
        lines.append(f"{name}.flat[{where!r}] = [{', '.join(values)}]")
    return lines


def _near_max_line(rng: np.random.Generator, arrays: list) -> list:
    name, shape = _pick(rng, arrays)
    where = int(rng.integers(0, int(np.prod(shape))))
    return [f"{name}.flat[{where}] = {_pick(rng, NEAR_MAX_VALUES)}"]


def _pick(rng: np.random.Generator, menu, weights=None):
    if weights is not None:
        weights = np.asarray(weights, dtype=float) / np.sum(weights)
    return menu[int(rng.choice(len(menu), p=weights))]


# ---------------------------------------------------------------------------------------
# Convolutions


@dataclasses.dataclass(frozen=True)
class ConvGeometry:
    n: int
    c: int
    h: int
    w: int
    o: int
    kh: int
    kw: int
    strides: tuple
    padding: object      # "SAME" | "VALID" | ((lo, hi), (lo, hi))
    dilation: tuple      # rhs dilation
    groups: int

    def out_hw(self) -> tuple:
        if self.padding == "SAME":
            return tuple(-(-n // s) for n, s in zip((self.h, self.w), self.strides))
        pads = ((0, 0), (0, 0)) if self.padding == "VALID" else self.padding
        return tuple((n + lo + hi - d * (k - 1) - 1) // s + 1 for n, (lo, hi), k, d, s in
                     zip((self.h, self.w), pads, (self.kh, self.kw), self.dilation,
                         self.strides))

    def flops(self) -> int:
        ho, wo = self.out_hw()
        return 2 * self.n * self.o * ho * wo * (self.c // self.groups) * self.kh * self.kw


CONV_N = (1, 2, 3)
CONV_C = (1, 2, 3, 4, 8, 16, 17, 32, 64, 70)
CONV_HW = (1, 3, 5, 7, 8, 14, 16, 23, 40)
CONV_K = (1, 2, 3, 5, 7)
CONV_K_WEIGHTS = (3, 1, 6, 1, 1)
CONV_O = (1, 4, 8, 16, 24, 32, 64, 70)
CONV_MAX_FLOPS = 40_000_000


def _conv_padding(rng, h: int, w: int):
    kind = _pick(rng, ("SAME", "VALID", "explicit"), (3, 2, 5))
    if kind != "explicit":
        return kind
    # Negative padding (cropping) in a minority of cases: the kernels leave it to XLA.
    menu = (-2, -1, 0, 1, 2, 3) if rng.random() < 0.25 else (0, 1, 2, 3)
    pads = []
    for n in (h, w):
        lo, hi = (int(_pick(rng, menu)) for _ in range(2))
        pads.append((max(lo, 1 - n), max(hi, 1 - n)))
    return tuple(pads)


def random_conv_geometry(rng: np.random.Generator) -> ConvGeometry:
    """A valid geometry (output >= 1x1) under CONV_MAX_FLOPS, from the menus."""
    while True:
        c = _pick(rng, CONV_C)
        h, w = _pick(rng, CONV_HW), _pick(rng, CONV_HW)
        square = rng.random() < 0.7
        kh = _pick(rng, CONV_K, CONV_K_WEIGHTS)
        kw = kh if square else _pick(rng, CONV_K, CONV_K_WEIGHTS)
        mode = _pick(rng, ("dense", "depthwise", "grouped"), (5, 3, 2))
        if mode == "depthwise":
            groups, o = c, c * int(_pick(rng, (1, 1, 2, 3)))
        elif mode == "grouped":
            divisors = [g for g in range(2, c + 1) if c % g == 0 and g < c]
            groups = _pick(rng, divisors) if divisors else 1
            o = groups * int(_pick(rng, (1, 2, 4)))
        else:
            groups, o = 1, _pick(rng, CONV_O)
        geometry = ConvGeometry(
            n=_pick(rng, CONV_N), c=c, h=h, w=w, o=o, kh=kh, kw=kw,
            strides=(_pick(rng, (1, 2, 3), (6, 3, 1)), _pick(rng, (1, 2, 3), (6, 3, 1))),
            padding=_conv_padding(rng, h, w),
            dilation=(_pick(rng, (1, 2), (4, 1)), _pick(rng, (1, 2), (4, 1))),
            groups=groups)
        if min(geometry.out_hw()) >= 1 and geometry.flops() <= CONV_MAX_FLOPS:
            return geometry


def random_dimension_numbers(rng: np.random.Generator) -> tuple:
    kind = _pick(rng, ("nchw", "nhwc", "random"), (3, 3, 4))
    if kind == "nchw":
        return ("NCHW", "OIHW", "NCHW")
    if kind == "nhwc":
        return ("NHWC", "HWIO", "NHWC")
    perm = lambda letters: "".join(rng.permutation(list(letters)))
    return (perm("NCHW"), perm("OIHW"), perm("NCHW"))


def _shape_for(spec: str, sizes: dict) -> tuple:
    return tuple(sizes[letter] for letter in spec)


def conv_expr(src: _Source, x: str, g: ConvGeometry, dn: tuple, as_arg: bool) -> str:
    """Defines the weights and returns the text of a lax.conv_general_dilated call."""
    fan_in = (g.c // g.groups) * g.kh * g.kw
    rhs_shape = _shape_for(dn[1], dict(O=g.o, I=g.c // g.groups, H=g.kh, W=g.kw))
    weights = src.array(rhs_shape, 1.0 / math.sqrt(fan_in), as_arg)
    padding = repr(g.padding) if isinstance(g.padding, str) else repr([tuple(p) for p in g.padding])
    groups = f", feature_group_count={g.groups}" if g.groups > 1 else ""
    dilation = f", rhs_dilation={g.dilation!r}" if g.dilation != (1, 1) else ""
    return (f"lax.conv_general_dilated({x}, {weights}, {g.strides!r}, {padding}"
            f"{dilation}, dimension_numbers={dn!r}{groups})")


def _conv_structure(structure_rng, seed: int) -> tuple:
    g = random_conv_geometry(structure_rng)
    dn = random_dimension_numbers(structure_rng)
    weights_as_arg = bool(structure_rng.random() < 0.7)
    src = _Source(seed)
    x = src.array(_shape_for(dn[0], dict(N=g.n, C=g.c, H=g.h, W=g.w)), 1.0, True, "x")
    out = src.let(conv_expr(src, x, g, dn, weights_as_arg))
    summary = (f"conv {dn} n{g.n} c{g.c} {g.h}x{g.w} o{g.o} k{g.kh}x{g.kw} s{g.strides} "
               f"pad {g.padding} dil{g.dilation} groups{g.groups}"
               f"{'' if weights_as_arg else ' const-w'}")
    return src, [out], summary


# ---------------------------------------------------------------------------------------
# dot_general

DOT_SIZES = (1, 2, 3, 5, 8, 16, 31, 64, 100, 128, 257, 300)
DOT_MAX_FLOPS = 30_000_000


def _dot_structure(structure_rng, seed: int) -> tuple:
    rng = structure_rng
    n_batch = int(_pick(rng, (0, 1, 2), (5, 4, 1)))
    n_contract = int(_pick(rng, (0, 1, 2), (1, 7, 2)))
    n_lfree, n_rfree = (int(_pick(rng, (0, 1, 2, 3), (2, 6, 2, 1))) for _ in range(2))
    dims = ([("b", i) for i in range(n_batch)] + [("k", i) for i in range(n_contract)]
            + [("l", i) for i in range(n_lfree)] + [("r", i) for i in range(n_rfree)])
    sizes = {d: int(_pick(rng, DOT_SIZES)) for d in dims}
    while 2 * int(np.prod(list(sizes.values()) or [1])) > DOT_MAX_FLOPS:
        largest = max(sizes, key=sizes.get)
        sizes[largest] = max(1, sizes[largest] // 3)
    lhs_dims = [d for d in dims if d[0] in "bkl"]
    rhs_dims = [d for d in dims if d[0] in "bkr"]
    lhs_dims = [lhs_dims[i] for i in rng.permutation(len(lhs_dims))]
    rhs_dims = [rhs_dims[i] for i in rng.permutation(len(rhs_dims))]
    # Batch and contracting pairs listed in a random order of correspondence.
    batch = [("b", i) for i in rng.permutation(n_batch)]
    contract = [("k", i) for i in rng.permutation(n_contract)]
    dn = ((tuple(lhs_dims.index(d) for d in contract), tuple(rhs_dims.index(d) for d in contract)),
          (tuple(lhs_dims.index(d) for d in batch), tuple(rhs_dims.index(d) for d in batch)))
    k_size = int(np.prod([sizes[d] for d in contract] or [1]))
    weights_as_arg = bool(rng.random() < 0.7)
    src = _Source(seed)
    lhs = src.array(tuple(sizes[d] for d in lhs_dims), 1.0, True, "x")
    rhs = src.array(tuple(sizes[d] for d in rhs_dims), 1.0 / math.sqrt(k_size), weights_as_arg)
    out = src.let(f"lax.dot_general({lhs}, {rhs}, {dn!r})")
    lshape = tuple(sizes[d] for d in lhs_dims)
    rshape = tuple(sizes[d] for d in rhs_dims)
    summary = (f"dot_general {lshape} x {rshape} dn={dn} free {n_lfree}/{n_rfree}"
               f"{'' if weights_as_arg else ' const-w'}")
    return src, [out], summary


# ---------------------------------------------------------------------------------------
# Small programs around convs and dots


@dataclasses.dataclass(frozen=True)
class Value:
    name: str
    shape: tuple
    layout: Optional[str]   # for 4-D activations: which letter of NCHW each axis is

    def axis(self, letter: str) -> int:
        return self.layout.index(letter)

    @property
    def channel_axis(self) -> int:
        return self.axis("C") if self.layout else len(self.shape) - 1


PROGRAM_C = (3, 4, 8, 16, 17, 32, 64)
PROGRAM_HW = (5, 8, 14, 16)
PROGRAM_O = (4, 8, 16, 17, 32, 64)
ELEMENTWISE = {"add": "{a} + {b}", "mul": "{a} * {b}", "sub": "{a} - {b}",
               "max": "jnp.maximum({a}, {b})", "min": "jnp.minimum({a}, {b})"}


class _ProgramBuilder:
    """Grows a program one op at a time on the current value; remembers earlier values
    for residual adds and concatenations."""

    def __init__(self, rng: np.random.Generator, src: _Source):
        self.rng = rng
        self.src = src
        self.values: list = []
        self.ops: list = []

    def arg_or_const(self) -> bool:
        return bool(self.rng.random() < 0.5)

    def emit(self, expr: str, shape, layout, op: str) -> Value:
        value = Value(self.src.let(expr), tuple(shape), layout)
        self.values.append(value)
        self.ops.append(op)
        return value

    # -- ops; each returns the new current value, or None when it does not apply --------
    def conv(self, v: Value) -> Optional[Value]:
        if not v.layout:
            return None
        c = v.shape[v.axis("C")]
        rng = self.rng
        depthwise = c > 1 and rng.random() < 0.3
        k = int(_pick(rng, (1, 3), (1, 2)))
        s = int(_pick(rng, (1, 2), (3, 1)))
        g = ConvGeometry(
            n=v.shape[v.axis("N")], c=c, h=v.shape[v.axis("H")], w=v.shape[v.axis("W")],
            o=c * int(_pick(rng, (1, 2))) if depthwise else _pick(rng, PROGRAM_O),
            kh=k, kw=k, strides=(s, s),
            padding=_pick(rng, ("SAME", "VALID", ((1, 1), (1, 1))), (4, 1, 1)),
            dilation=(1, 1), groups=c if depthwise else 1)
        if min(g.out_hw()) < 1:
            return None
        out_layout = v.layout if rng.random() < 0.8 else _pick(rng, ("NCHW", "NHWC"))
        dn = (v.layout, _pick(rng, ("OIHW", "HWIO")), out_layout)
        ho, wo = g.out_hw()
        shape = _shape_for(out_layout, dict(N=g.n, C=g.o, H=ho, W=wo))
        return self.emit(conv_expr(self.src, v.name, g, dn, self.arg_or_const()), shape,
                         out_layout, f"conv{'-dw' if depthwise else ''}{k}x{k}/{s} {dn[0]}")

    def dot(self, v: Value) -> Optional[Value]:
        """Contract the channel axis (the last axis for non-4-D values) with a weight of
        0, 1 or 2 free dims; 4-D inputs through einsum (a conv feeding a dot_general)."""
        rng = self.rng
        ax = v.channel_axis
        c = v.shape[ax]
        free = [int(_pick(rng, PROGRAM_O))
                for _ in range(int(_pick(rng, (0, 1, 2), (1, 6, 1))))]
        w = self.src.array((c, *free), 1.0 / math.sqrt(c), self.arg_or_const())
        rest = tuple(s for i, s in enumerate(v.shape) if i != ax)
        if v.layout and len(free) == 1 and rng.random() < 0.6:
            lhs = v.layout.lower()
            out = lhs.replace("c", "") + "d"
            return self.emit(f"jnp.einsum('{lhs},cd->{out}', {v.name}, {w})", rest + tuple(free),
                             v.layout.replace("C", "") + "C", f"einsum {lhs},cd")
        layout = v.layout.replace("C", "") + "C" if v.layout and len(free) == 1 else None
        return self.emit(f"lax.dot_general({v.name}, {w}, ((({ax},), (0,)), ((), ())))",
                         rest + tuple(free), layout, f"dot free{len(free)}")

    def per_channel(self, v: Value) -> Value:
        op = _pick(self.rng, tuple(ELEMENTWISE))
        c = v.shape[v.channel_axis]
        if v.channel_axis == len(v.shape) - 1 and self.rng.random() < 0.5:
            shape = (c,)
        else:
            shape = tuple(c if i == v.channel_axis else 1 for i in range(len(v.shape)))
        scale = 0.5 if op != "mul" else 1.0
        b = self.src.array(shape, scale, self.arg_or_const(), "b")
        return self.emit(ELEMENTWISE[op].format(a=v.name, b=b), v.shape, v.layout,
                         f"{op} per-channel")

    def full(self, v: Value) -> Value:
        op = _pick(self.rng, tuple(ELEMENTWISE))
        z = self.src.array(v.shape, 1.0, True, "z")
        return self.emit(ELEMENTWISE[op].format(a=v.name, b=z), v.shape, v.layout, f"{op} full")

    def unary(self, v: Value) -> Value:
        op = _pick(self.rng, ("jnp.exp", "jnp.tanh", "jnp.abs"))
        expr = f"jnp.exp(jnp.tanh({v.name}))" if op == "jnp.exp" else f"{op}({v.name})"
        return self.emit(expr, v.shape, v.layout, op.split(".")[1])

    def activation(self, v: Value) -> Value:
        rng = self.rng
        kind = _pick(rng, ("relu", "relu6", "clip", "min_relu", "gelu", "silu", "sigmoid"))
        if kind == "clip":
            lo, hi = _pick(rng, (-1.0, -0.5, 0.0, 0.25)), _pick(rng, (0.5, 1.0, 3.0))
            expr = f"jnp.clip({v.name}, {lo}, {hi})"
            kind = f"clip({lo},{hi})"
        elif kind == "min_relu":
            c = _pick(rng, (0.5, 1.0, 2.0, 6.0))
            expr = f"jnp.minimum(jax.nn.relu({v.name}), {c})"
            kind = f"min(relu,{c})"
        else:
            expr = f"jax.nn.{kind}({v.name})"
        return self.emit(expr, v.shape, v.layout, kind)

    def pool(self, v: Value) -> Optional[Value]:
        if not v.layout:
            return None
        rng = self.rng
        k, s = int(_pick(rng, (2, 3))), int(_pick(rng, (1, 2)))
        padding = _pick(rng, ("VALID", "SAME"))
        hw = [v.shape[v.axis(a)] for a in "HW"]
        if padding == "VALID" and min(hw) < k:
            padding = "SAME"
        window = tuple(k if a in "HW" else 1 for a in v.layout)
        strides = tuple(s if a in "HW" else 1 for a in v.layout)
        out_hw = [-(-n // s) if padding == "SAME" else (n - k) // s + 1 for n in hw]
        shape = tuple(out_hw["HW".index(a)] if a in "HW" else v.shape[i]
                      for i, a in enumerate(v.layout))
        if _pick(rng, ("max", "avg")) == "max":
            expr = (f"lax.reduce_window({v.name}, -jnp.inf, lax.max, {window}, {strides}, "
                    f"'{padding}')")
            return self.emit(expr, shape, v.layout, f"maxpool{k}/{s}")
        expr = (f"lax.reduce_window({v.name}, 0.0, lax.add, {window}, {strides}, "
                f"'{padding}') / {k * k}.0")
        return self.emit(expr, shape, v.layout, f"avgpool{k}/{s}")

    def reduce(self, v: Value) -> Value:
        rng = self.rng
        op = _pick(rng, ("sum", "mean", "max"))
        rank = len(v.shape)
        if v.layout and rng.random() < 0.6:
            axes = tuple(sorted(v.axis(a) for a in "HW"))
        else:
            count = int(rng.integers(1, max(1, rank - 1) + 1))
            axes = tuple(sorted(int(a) for a in rng.choice(rank, count, replace=False)))
        keep = bool(rng.random() < 0.4)
        shape = tuple(1 if i in axes else s for i, s in enumerate(v.shape)) if keep else \
            tuple(s for i, s in enumerate(v.shape) if i not in axes)
        layout = v.layout if keep else None
        return self.emit(f"jnp.{op}({v.name}, axis={axes}{', keepdims=True' if keep else ''})",
                         shape, layout, f"{op}{list(axes)}{'k' if keep else ''}")

    def transpose(self, v: Value) -> Value:
        perm = tuple(int(i) for i in self.rng.permutation(len(v.shape)))
        layout = "".join(v.layout[i] for i in perm) if v.layout else None
        return self.emit(f"jnp.transpose({v.name}, {perm})",
                         tuple(v.shape[i] for i in perm), layout, f"transpose{perm}")

    def reshape(self, v: Value) -> Value:
        if len(v.shape) < 2:
            return self.transpose(v)
        shape = (v.shape[0], int(np.prod(v.shape[1:])))
        return self.emit(f"jnp.reshape({v.name}, {shape})", shape, None, "flatten")

    def concat(self, v: Value) -> Value:
        ax = v.channel_axis
        partners = [p for p in self.values[:-1] if len(p.shape) == len(v.shape)
                    and p.layout == v.layout and all(a == b for i, (a, b) in
                                                     enumerate(zip(p.shape, v.shape)) if i != ax)]
        other = _pick(self.rng, partners).name if partners and self.rng.random() < 0.7 \
            else f"jnp.tanh({v.name})"
        shape = list(v.shape)
        if other.startswith("jnp.tanh"):
            shape[ax] *= 2
        else:
            shape[ax] += next(p.shape[ax] for p in partners if p.name == other)
        return self.emit(f"jnp.concatenate([{v.name}, {other}], axis={ax})", shape, v.layout,
                         "concat")

    def residual(self, v: Value) -> Value:
        same = [p for p in self.values[:-1] if p.shape == v.shape]
        if not same:
            return self.per_channel(v)
        return self.emit(f"{v.name} + {_pick(self.rng, same).name}", v.shape, v.layout,
                         "residual add")


PROGRAM_OPS = ("conv", "dot", "per_channel", "full", "unary", "activation", "pool",
               "reduce", "transpose", "reshape", "concat", "residual")
PROGRAM_OP_WEIGHTS = (6, 3, 4, 2, 2, 5, 2, 1, 1, 1, 1, 2)


def _program_structure(structure_rng, seed: int) -> tuple:
    rng = structure_rng
    src = _Source(seed)
    builder = _ProgramBuilder(rng, src)
    n_ops = int(rng.integers(1, 7))
    if rng.random() < 0.85:
        layout = _pick(rng, ("NCHW", "NHWC"))
        shape = _shape_for(layout, dict(N=int(_pick(rng, (1, 2))), C=_pick(rng, PROGRAM_C),
                                        H=_pick(rng, PROGRAM_HW), W=_pick(rng, PROGRAM_HW)))
        v = Value(src.array(shape, 1.0, True, "x"), shape, layout)
        builder.values.append(v)
        v = builder.conv(v) or builder.dot(v)
    else:
        shape = (int(_pick(rng, (1, 4, 16))), int(_pick(rng, (8, 32, 64))))
        v = Value(src.array(shape, 1.0, True, "x"), shape, None)
        builder.values.append(v)
        v = builder.dot(v)
    outputs = []
    while len(builder.ops) < n_ops:
        op = _pick(rng, PROGRAM_OPS, PROGRAM_OP_WEIGHTS)
        if len(v.shape) == 0 or (np.prod(v.shape) > 200_000 and op in ("concat", "dot")):
            break
        produced = getattr(builder, op)(v)
        if produced is None:
            continue
        if rng.random() < 0.15:
            outputs.append(v.name)   # an intermediate as an extra output
        v = produced
    outputs.append(v.name)
    summary = f"program {builder.values[0].layout or '2-D'}: " + " -> ".join(builder.ops)
    return src, outputs, summary


# ---------------------------------------------------------------------------------------

_STRUCTURES = {"conv": _conv_structure, "dot": _dot_structure, "program": _program_structure}


def make_case(kind: str, seed: int, pool: int = DEFAULT_POOL) -> Case:
    """Case `seed` of `kind`: structure number seed % pool of that kind, values from seed.
    "special" cases take a structure of a random other kind and put inf / NaN / huge
    values into its data and weights."""
    if kind not in _KIND_ID:
        raise ValueError(f"kind {kind!r}: choose one of {KINDS}")
    index = seed % max(1, pool)
    if kind == "special":
        values_rng = np.random.default_rng([_KIND_ID[kind], seed])
        near_max = index % 4 == 3
        base = ("conv", "dot")[index // 4 % 2] if near_max else ("conv", "dot", "program")[index % 3]
        src, outputs, summary = _STRUCTURES[base](
            np.random.default_rng([_KIND_ID[base], index]), seed)
        specials = (_near_max_line if near_max else _special_lines)(values_rng, src.arrays)
        return Case(kind, seed, f"special values in {summary}", src.code(outputs, specials))
    src, outputs, summary = _STRUCTURES[kind](np.random.default_rng([_KIND_ID[kind], index]),
                                              seed)
    return Case(kind, seed, summary, src.code(outputs))


def cases(kind: str, count: int, first_seed: int = 0, pool: int = DEFAULT_POOL) -> list:
    return [make_case(kind, first_seed + i, pool) for i in range(count)]

