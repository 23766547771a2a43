"""Tensor layouts as chains of ALT's layout primitives over named logical dims.

Entry points: Layout (split / reorder / fuse / unfold / pad, apply / invert, index_expr,
strides, to_json), convert(src, dst), nchw_c, nhwc, oihw_io, LayoutError.

A Layout is the logical tensor (dim names + sizes, e.g. "NCHW", (1, 16, 56, 56)) and a
tuple of primitives that rewrite its physical arrangement, applied in order:

    split(dim, f)            dim of size S -> "dim/f" (S/f) and "fdim" (f); S % f == 0
    reorder(order)           permute the current dims (given by name or position)
    fuse(a, b)               adjacent dims a (outer), b (inner) -> "(a b)" of size |a|*|b|
    unfold(dim, tile, s)     sliding-window dim -> "dim/t{tile}s{s}" (T tiles) and
                             "{tile}dim" (tile length); tile t holds logical [t*s, t*s+tile),
                             so each tile carries its halo and is contiguous (T*tile >= S)
    pad(dim, m | (lo, hi))   zeros up to a multiple of m, or lo before and hi after;
                             the dim is renamed "dim+pad{m}" or "dim+pad(lo,hi)"

Later primitives refer to dims by these derived names (or by position); an inner dim of a
compound name is parenthesised ("C/8" split by 2 -> "C/8/2", "2(c/8)"), and an inner dim
drops its pad suffix ("C+pad8" split by 8 -> "C+pad8/8", "8c").

    >>> lay = Layout("NCHW", (1, 16, 56, 56)).split("C", 8).reorder("N", "C/8", "H", "W", "8c")
    >>> str(lay), lay.physical_shape
    ('N C/8 H W 8c', (1, 2, 56, 56, 8))
    >>> lay.index_expr()[0]
    '(((n*2 + c/8)*56 + h)*56 + w)*8 + c%8'

Layouts and primitives are frozen, hashable dataclasses, validated when built (a
LayoutError names the primitive, the dim, the size and the fix) and round-trip through
JSON (to_json / from_json, or to_dict / from_dict inside records).

What a Layout gives its users:
  * apply(x) / invert(y): logical <-> physical arrays in plain jnp (reshape, transpose, pad,
    one gather per unfold), traceable under jit so XLA fuses them; invert reads each
    unfolded element from the first tile that holds it.
  * convert(src, dst): one callable from src's physical array to dst's. When both chains
    are reshapes/transposes over the same padded logical tensor it is a single
    reshape -> transpose -> reshape; otherwise dst.apply(src.invert(y)) (still one function).
  * index_expr(names): a C expression of the logical indices (lowercase dim names by
    default) giving the element offset in the dense row-major physical array, plus a Python
    callable computing it. Divisions are of nonnegative ints (C's / equals floor) except
    inside max(0, ...), which unfold uses and where both roundings agree; code generators
    provide max (std::max).
  * strides(): dim -> element stride when the offset is linear in the logical indices
    (reorders, fuses, splits that stay adjacent, hi padding), else None.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import re
from typing import Callable, Mapping, Sequence, Union

import jax.numpy as jnp
import numpy as np
from jax import lax


class LayoutError(ValueError):
    """A primitive does not fit the dims it is applied to; the message names the fix."""


# ---------------------------------------------------------------------------------------
# Index expressions: a tiny integer AST with bounds, so that offsets print compactly
# (fuse after split folds back to the index) and strides can be read off linear forms.

_PREC = {"+": 1, "-": 1, "*": 2, "/": 2, "%": 2}


@dataclasses.dataclass(frozen=True)
class _Var:
    name: str  # logical dim name; printed through the caller's variable names
    extent: int

    @property
    def bounds(self):
        return (0, self.extent - 1)


@dataclasses.dataclass(frozen=True)
class _Const:
    value: int

    @property
    def bounds(self):
        return (self.value, self.value)


@dataclasses.dataclass(frozen=True)
class _Bin:
    op: str  # one of + - * / % ; / and % are floor division of ints
    a: "_Expr"
    b: "_Expr"

    @functools.cached_property
    def bounds(self):
        (alo, ahi), (blo, bhi) = self.a.bounds, self.b.bounds
        if self.op == "+":
            return (alo + blo, ahi + bhi)
        if self.op == "-":
            return (alo - bhi, ahi - blo)
        if self.op == "*":
            products = (alo * blo, alo * bhi, ahi * blo, ahi * bhi)
            return (min(products), max(products))
        k = self.b.value  # / and % always have a positive constant divisor here
        if self.op == "/":
            return (alo // k, ahi // k)
        return (0, k - 1) if alo < 0 or ahi >= k else (alo, ahi)


@dataclasses.dataclass(frozen=True)
class _Max0:
    """max(0, a): the first unfold tile holding an index is clamped at tile 0."""

    a: "_Expr"

    @property
    def bounds(self):
        lo, hi = self.a.bounds
        return (max(0, lo), max(0, hi))


_Expr = Union[_Var, _Const, _Bin, _Max0]


def _const(e, value=None) -> bool:
    return isinstance(e, _Const) and (value is None or e.value == value)


def _is(e, op) -> bool:
    return isinstance(e, _Bin) and e.op == op


def _nonneg(e) -> bool:
    return e.bounds[0] >= 0


def _add(a, b):
    if _const(a) and _const(b):
        return _Const(a.value + b.value)
    if _const(b, 0):
        return a
    if _const(a, 0):
        return b
    if _const(b) and b.value < 0:
        return _Bin("-", a, _Const(-b.value))
    # (x/k)*k + x%k == x: a fuse that undoes a split.
    if (_is(a, "*") and _is(a.a, "/") and _is(b, "%") and a.a.a == b.a
            and a.b == a.a.b == b.b):
        return b.a
    return _Bin("+", a, b)


def _sub(a, b):
    if _const(b, 0):
        return a
    if _const(a) and _const(b):
        return _Const(a.value - b.value)
    return _Bin("-", a, b)


def _mul(a, k: int):
    if k == 1:
        return a
    if k == 0 or _const(a, 0):
        return _Const(0)
    if _const(a):
        return _Const(a.value * k)
    if _is(a, "*") and _const(a.b):
        return _mul(a.a, a.b.value * k)
    return _Bin("*", a, _Const(k))


def _div(a, k: int):
    if k == 1:
        return a
    if _nonneg(a):
        if a.bounds[1] < k:
            return _Const(0)
        if _is(a, "/"):
            return _div(a.a, a.b.value * k)
        if _is(a, "+") and _is(a.a, "*") and _const(a.a.b) and _nonneg(a.a.a) and _nonneg(a.b):
            x, m, r = a.a.a, a.a.b.value, a.b  # (x*m + r) / k
            if m % k == 0:
                return _add(_mul(x, m // k), _div(r, k))
            if k % m == 0 and r.bounds[1] < m:
                return _div(x, k // m)
    return _Bin("/", a, _Const(k))


def _mod(a, k: int):
    if k == 1:
        return _Const(0)
    if _nonneg(a):
        if a.bounds[1] < k:
            return a
        if _is(a, "%") and a.b.value % k == 0:
            return _mod(a.a, k)
        if _is(a, "+") and _is(a.a, "*") and _const(a.a.b) and _nonneg(a.a.a) and _nonneg(a.b):
            if a.a.b.value % k == 0:  # (x*m + r) % k with k | m
                return _mod(a.b, k)
    return _Bin("%", a, _Const(k))


def _max0(a):
    lo, hi = a.bounds
    if lo >= 0:
        return a
    if hi <= 0:
        return _Const(0)
    return _Max0(a)


def _text(e, var_names: Mapping[str, str]) -> str:
    if isinstance(e, _Var):
        return var_names[e.name]
    if isinstance(e, _Const):
        return str(e.value)
    if isinstance(e, _Max0):
        return f"max(0, {_text(e.a, var_names)})"
    p = _PREC[e.op]

    def side(child, right):
        s = _text(child, var_names)
        q = _PREC[child.op] if isinstance(child, _Bin) else 3
        # Integer * / % do not reassociate (a*(b/c) != a*b/c), so a right operand of equal
        # precedence keeps its parentheses; only a + (b - c) may drop them.
        need = q < p or (right and q == p and e.op != "+")
        return f"({s})" if need else s

    sep = f" {e.op} " if p == 1 else e.op
    return side(e.a, False) + sep + side(e.b, True)


def _eval(e, env: Mapping[str, int]) -> int:
    if isinstance(e, _Var):
        return env[e.name]
    if isinstance(e, _Const):
        return e.value
    if isinstance(e, _Max0):
        return max(0, _eval(e.a, env))
    a, b = _eval(e.a, env), _eval(e.b, env)
    if e.op == "+":
        return a + b
    if e.op == "-":
        return a - b
    if e.op == "*":
        return a * b
    return a // b if e.op == "/" else a % b


def _terms(e, scale: int, out: dict) -> None:
    """Adds scale * e to out as {term: coefficient}: sums and constant products opened,
    anything else (a var, x/k, x%k, max) kept as one term; the constant is under key None."""
    if isinstance(e, _Const):
        out[None] = out.get(None, 0) + scale * e.value
    elif _is(e, "+") or _is(e, "-"):
        _terms(e.a, scale, out)
        _terms(e.b, scale if e.op == "+" else -scale, out)
    elif _is(e, "*"):  # the right operand of * is always a constant here
        _terms(e.a, scale * e.b.value, out)
    else:
        out[e] = out.get(e, 0) + scale


def _linear(e):
    """(coefficient per logical dim, constant) if e is linear in the indices, else None.

    Horner form hides reshapes: (m*2 + k/4)*4 + k%4 is m*8 + k, since (x/k)*k*a + (x%k)*a
    = x*a. Such pairs are merged until only vars remain, or nothing more merges.
    """
    terms = {}
    _terms(e, 1, terms)
    merged = True
    while merged:
        merged = False
        for t, a in list(terms.items()):
            # the partner as a chain writes it: (x/4)/4 is written x/16, so m/4%4 pairs
            # with m/16 (a dim cut into three or more pieces, kept in order)
            whole = _div(t.a, t.b.value) if _is(t, "%") else None
            if whole is not None and a and terms.get(whole, 0) == a * t.b.value:
                del terms[t], terms[whole]
                _terms(t.a, a, terms)
                merged = True
                break
    const = terms.pop(None, 0)
    terms = {t: a for t, a in terms.items() if a}
    if not all(isinstance(t, _Var) for t in terms):
        return None
    return {t.name: a for t, a in terms.items()}, const


# ---------------------------------------------------------------------------------------
# Primitives. Each one maps the current dims (name, size, index expression) to new dims,
# and moves an array forward (apply) or back (invert) given the dims it was applied to.


@dataclasses.dataclass(frozen=True)
class _Dim:
    name: str
    size: int
    expr: _Expr  # this dim's physical coordinate as a function of the logical indices


def _find(dims, name: str, prim) -> int:
    for i, d in enumerate(dims):
        if d.name == name:
            return i
    raise LayoutError(f"{prim}: no dim {name!r}; dims are {' '.join(d.name for d in dims)}")


def _check_names_distinct(dims, prim):
    names = [d.name for d in dims]
    if len(set(names)) != len(names):
        raise LayoutError(f"{prim}: it makes two dims named alike ({' '.join(names)}); "
                          f"primitives refer to dims by name, so names must stay distinct")


_PAD_SUFFIX = re.compile(r"\+pad(\d+|\(\d+,\d+\))$")


def _inner_name(length: int, name: str) -> str:
    """Name of an inner dim: "8c" for C or C+pad8 (the outer dim already shows the pad);
    "2(c/8)" for a compound name, so that no two derivations print alike."""
    base = _PAD_SUFFIX.sub("", name).lower()
    return f"{length}{base}" if base.isalnum() or _wrapped(base) else f"{length}({base})"


def _wrapped(name: str) -> bool:
    """True for "(a b)": the first parenthesis closes at the last character."""
    depth = 0
    for i, ch in enumerate(name):
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if depth == 0:
            return ch == ")" and i == len(name) - 1
    return False


def _plain_ints(prim, *fields):
    """numpy ints -> int in a primitive's fields, so that it compares, hashes and serialises
    like one built from Python ints (validation itself happens in step)."""
    for f in fields:
        value = getattr(prim, f)
        if isinstance(value, np.integer):
            object.__setattr__(prim, f, int(value))


def _positive_int(value, what, prim):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise LayoutError(f"{prim}: {what}={value!r} must be a positive int")
    return int(value)


@dataclasses.dataclass(frozen=True)
class Split:
    """dim (size S) -> outer "dim/factor" (S/factor) and inner "{factor}{dim}" (factor)."""

    dim: str
    factor: int

    def __post_init__(self):
        _plain_ints(self, "factor")

    def __str__(self):
        return f"split({self.dim}, {self.factor})"

    def step(self, dims):
        f = _positive_int(self.factor, "factor", self)
        i = _find(dims, self.dim, self)
        d = dims[i]
        if d.size % f:
            raise LayoutError(f"{self}: {d.name}={d.size} is not a multiple of {f}; "
                              f"pad({d.name}, {f}) first")
        outer = _Dim(f"{d.name}/{f}", d.size // f, _div(d.expr, f))
        inner = _Dim(_inner_name(f, d.name), f, _mod(d.expr, f))
        new = dims[:i] + (outer, inner) + dims[i + 1:]
        _check_names_distinct(new, self)
        return new

    def apply(self, x, dims):
        i = _find(dims, self.dim, self)
        return x.reshape(x.shape[:i] + (dims[i].size // self.factor, self.factor) + x.shape[i + 1:])

    def invert(self, y, dims):
        i = _find(dims, self.dim, self)
        return y.reshape(y.shape[:i] + (dims[i].size,) + y.shape[i + 2:])


@dataclasses.dataclass(frozen=True)
class Reorder:
    """Permute the current dims: order lists every current dim name once, outermost first."""

    order: tuple[str, ...]

    def __post_init__(self):
        object.__setattr__(self, "order", tuple(self.order))

    def __str__(self):
        return f"reorder({' '.join(self.order)})"

    def _perm(self, dims):
        names = [d.name for d in dims]
        if sorted(self.order) != sorted(names):
            raise LayoutError(f"{self}: not a permutation of the dims {' '.join(names)}")
        return [names.index(n) for n in self.order]

    def step(self, dims):
        return tuple(dims[p] for p in self._perm(dims))

    def apply(self, x, dims):
        perm = self._perm(dims)
        return x if perm == sorted(perm) else jnp.transpose(x, perm)

    def invert(self, y, dims):
        perm = self._perm(dims)
        return y if perm == sorted(perm) else jnp.transpose(y, np.argsort(perm).tolist())


@dataclasses.dataclass(frozen=True)
class Fuse:
    """Adjacent dims outer, inner -> "(outer inner)" of size |outer| * |inner|."""

    outer: str
    inner: str

    def __str__(self):
        return f"fuse({self.outer}, {self.inner})"

    def _index(self, dims):
        i, j = _find(dims, self.outer, self), _find(dims, self.inner, self)
        if j != i + 1:
            raise LayoutError(f"{self}: {self.outer} and {self.inner} are not adjacent with "
                              f"{self.outer} outer (dims are {' '.join(d.name for d in dims)}); "
                              f"reorder first")
        return i

    def step(self, dims):
        i = self._index(dims)
        a, b = dims[i], dims[i + 1]
        fused = _Dim(f"({a.name} {b.name})", a.size * b.size, _add(_mul(a.expr, b.size), b.expr))
        new = dims[:i] + (fused,) + dims[i + 2:]
        _check_names_distinct(new, self)
        return new

    def apply(self, x, dims):
        i = self._index(dims)
        return x.reshape(x.shape[:i] + (x.shape[i] * x.shape[i + 1],) + x.shape[i + 2:])

    def invert(self, y, dims):
        i = self._index(dims)
        return y.reshape(y.shape[:i] + (dims[i].size, dims[i + 1].size) + y.shape[i + 1:])


@dataclasses.dataclass(frozen=True)
class Unfold:
    """Sliding-window dim (size S) -> tiles "dim/t{tile}s{stride}" (T) x "{tile}dim" (tile).

    Tile t holds indices [t*stride, t*stride + tile): a conv's input tile with its halo,
    contiguous. The tiles must cover the dim exactly: S = (T-1)*stride + tile.
    """

    dim: str
    tile: int
    stride: int

    def __post_init__(self):
        _plain_ints(self, "tile", "stride")

    def __str__(self):
        return f"unfold({self.dim}, {self.tile}, {self.stride})"

    def _geometry(self, dims):
        tile = _positive_int(self.tile, "tile", self)
        stride = _positive_int(self.stride, "stride", self)
        i = _find(dims, self.dim, self)
        d = dims[i]
        if stride > tile:
            raise LayoutError(f"{self}: stride {stride} > tile {tile} would skip elements of "
                              f"{d.name}")
        if d.size < tile:
            raise LayoutError(f"{self}: {d.name}={d.size} is shorter than one tile of {tile}; "
                              f"pad({d.name}, (0, {tile - d.size})) first")
        short = -(d.size - tile) % stride
        if short:
            raise LayoutError(
                f"{self}: {d.name}={d.size} is not covered exactly by tiles of {tile} every "
                f"{stride} (the last tile would end at {d.size + short}); "
                f"pad({d.name}, (0, {short})) first")
        return i, d, (d.size - tile) // stride + 1

    def step(self, dims):
        i, d, count = self._geometry(dims)
        if self.tile == self.stride:  # no overlap: a split
            t, r = _div(d.expr, self.stride), _mod(d.expr, self.stride)
        else:  # first tile holding p: smallest t with t*stride + tile > p
            t = _max0(_div(_add(d.expr, _Const(self.stride - self.tile)), self.stride))
            r = _sub(d.expr, _mul(t, self.stride))
        tiles = _Dim(f"{d.name}/t{self.tile}s{self.stride}", count, t)
        inner = _Dim(_inner_name(self.tile, d.name), self.tile, r)
        new = dims[:i] + (tiles, inner) + dims[i + 1:]
        _check_names_distinct(new, self)
        return new

    def apply(self, x, dims):
        i, _, count = self._geometry(dims)
        index = np.arange(count)[:, None] * self.stride + np.arange(self.tile)[None, :]
        # One gather with a constant index; XLA fuses it into its consumer.
        tiles = jnp.take(x, jnp.asarray(index.reshape(-1), jnp.int32), axis=i, mode="clip")
        return tiles.reshape(x.shape[:i] + (count, self.tile) + x.shape[i + 1:])

    def invert(self, y, dims):
        i, _, count = self._geometry(dims)
        # Element p comes from the first tile holding it: all of tile 0, then the last
        # `stride` elements of each following tile. Two slices, no gather.
        first = lax.index_in_dim(y, 0, axis=i, keepdims=False)
        rest = lax.slice_in_dim(lax.slice_in_dim(y, 1, count, axis=i),
                                self.tile - self.stride, self.tile, axis=i + 1)
        rest = rest.reshape(y.shape[:i] + ((count - 1) * self.stride,) + y.shape[i + 2:])
        return jnp.concatenate([first, rest], axis=i)


@dataclasses.dataclass(frozen=True)
class Pad:
    """Zero-pad dim up to a multiple of `multiple`, or by `amounts` = (lo, hi). Exactly one."""

    dim: str
    multiple: int | None = None
    amounts: tuple[int, int] | None = None

    def __post_init__(self):
        _plain_ints(self, "multiple")
        if self.amounts is not None:
            object.__setattr__(self, "amounts", tuple(
                int(a) if isinstance(a, np.integer) else a for a in self.amounts))

    def __str__(self):
        how = self.multiple if self.amounts is None else self.amounts
        return f"pad({self.dim}, {how})"

    def lo_hi(self, size: int) -> tuple[int, int]:
        if (self.multiple is None) == (self.amounts is None):
            raise LayoutError(f"{self}: give exactly one of a multiple or (lo, hi) amounts")
        if self.amounts is None:
            m = _positive_int(self.multiple, "multiple", self)
            return 0, -size % m
        if len(self.amounts) != 2 or any(
                isinstance(a, bool) or not isinstance(a, (int, np.integer)) or a < 0
                for a in self.amounts):
            raise LayoutError(f"{self}: amounts must be two nonnegative ints (lo, hi)")
        return int(self.amounts[0]), int(self.amounts[1])

    def step(self, dims):
        i = _find(dims, self.dim, self)
        d = dims[i]
        lo, hi = self.lo_hi(d.size)
        how = self.multiple if self.amounts is None else f"({lo},{hi})"
        padded = _Dim(f"{d.name}+pad{how}", d.size + lo + hi, _add(d.expr, _Const(lo)))
        new = dims[:i] + (padded,) + dims[i + 1:]
        _check_names_distinct(new, self)
        return new

    def apply(self, x, dims):
        i = _find(dims, self.dim, self)
        lo, hi = self.lo_hi(dims[i].size)
        if lo == hi == 0:
            return x
        widths = [(0, 0)] * x.ndim
        widths[i] = (lo, hi)
        return jnp.pad(x, widths)

    def invert(self, y, dims):
        i = _find(dims, self.dim, self)
        lo, _ = self.lo_hi(dims[i].size)
        return lax.slice_in_dim(y, lo, lo + dims[i].size, axis=i)


Primitive = Union[Split, Reorder, Fuse, Unfold, Pad]
_PRIMITIVES = {"split": Split, "reorder": Reorder, "fuse": Fuse, "unfold": Unfold, "pad": Pad}
_OP_NAME = {cls: name for name, cls in _PRIMITIVES.items()}


def _primitive_to_dict(p: Primitive) -> dict:
    fields = {k: (list(v) if isinstance(v, tuple) else v)
              for k, v in dataclasses.asdict(p).items() if v is not None}
    return {"op": _OP_NAME[type(p)], **fields}


def _primitive_from_dict(data: Mapping) -> Primitive:
    data = dict(data)
    cls = _PRIMITIVES.get(data.pop("op", None))
    if cls is None:
        raise LayoutError(f"unknown primitive in {data!r}; known: {sorted(_PRIMITIVES)}")
    try:
        return cls(**data)
    except TypeError as e:
        raise LayoutError(f"bad fields for {cls.__name__}: {data!r} ({e})") from None


# ---------------------------------------------------------------------------------------
# Layout


@dataclasses.dataclass(frozen=True)
class Layout:
    """A logical tensor (dim names, sizes) and the chain of primitives giving its layout.

    names: "NCHW" (one letter per dim) or a sequence of names. Methods that add a primitive
    return a new Layout and accept a dim by name or by current position.
    """

    names: tuple[str, ...]
    shape: tuple[int, ...]
    primitives: tuple[Primitive, ...] = ()

    def __post_init__(self):
        names = tuple(self.names)  # "NCHW" -> ("N", "C", "H", "W")
        object.__setattr__(self, "names", names)
        object.__setattr__(self, "shape", tuple(
            int(s) if isinstance(s, (int, np.integer)) and not isinstance(s, bool) else s
            for s in self.shape))
        object.__setattr__(self, "primitives", tuple(self.primitives))
        if len(set(names)) != len(names) or not all(isinstance(n, str) and n for n in names):
            raise LayoutError(f"logical dim names {names!r} must be distinct non-empty strings")
        if len(self.shape) != len(names) or not all(
                isinstance(s, int) and s >= 1 for s in self.shape):
            raise LayoutError(f"logical shape {self.shape!r} must give a positive int for "
                              f"each of the dims {' '.join(names)}")
        self._states  # validate the chain now, so a bad layout never gets built

    @classmethod
    def identity(cls, names, shape) -> "Layout":
        return cls(names, shape)

    # -- derived facts ------------------------------------------------------------------
    @functools.cached_property
    def _states(self) -> tuple[tuple[_Dim, ...], ...]:
        """The dims before each primitive, and after the last one."""
        dims = tuple(_Dim(n, s, _Var(n, s)) for n, s in zip(self.names, self.shape))
        states = [dims]
        for p in self.primitives:
            if not isinstance(p, tuple(_PRIMITIVES.values())):
                raise LayoutError(f"{p!r} is not a layout primitive ({', '.join(_PRIMITIVES)})")
            dims = p.step(dims)
            states.append(dims)
        return tuple(states)

    @property
    def dims(self) -> tuple[str, ...]:
        """Physical dim names, outermost first."""
        return tuple(d.name for d in self._states[-1])

    @property
    def physical_shape(self) -> tuple[int, ...]:
        return tuple(d.size for d in self._states[-1])

    @property
    def is_identity(self) -> bool:
        return self.dims == self.names and self.physical_shape == self.shape

    def __str__(self):
        return " ".join(self.dims)

    # -- building -----------------------------------------------------------------------
    def _name(self, dim) -> str:
        if isinstance(dim, (int, np.integer)) and not isinstance(dim, bool):
            dims = self.dims
            if not -len(dims) <= dim < len(dims):
                raise LayoutError(f"dim position {dim} is out of range for {self}")
            return dims[dim]
        return dim

    def then(self, primitives: Primitive | Sequence[Primitive]) -> "Layout":
        """This layout followed by more primitives."""
        if isinstance(primitives, tuple(_PRIMITIVES.values())):
            primitives = (primitives,)
        return Layout(self.names, self.shape, self.primitives + tuple(primitives))

    def split(self, dim, factor: int) -> "Layout":
        return self.then(Split(self._name(dim), factor))

    def reorder(self, *order) -> "Layout":
        """reorder("N", "H", "W", "C"), or one sequence of names / positions."""
        if len(order) == 1 and not isinstance(order[0], (str, int, np.integer)):
            order = tuple(order[0])
        return self.then(Reorder(tuple(self._name(d) for d in order)))

    def fuse(self, outer, inner) -> "Layout":
        return self.then(Fuse(self._name(outer), self._name(inner)))

    def unfold(self, dim, tile: int, stride: int) -> "Layout":
        return self.then(Unfold(self._name(dim), tile, stride))

    def pad(self, dim, multiple_or_amounts) -> "Layout":
        """pad(dim, m) to a multiple of m, or pad(dim, (lo, hi))."""
        if isinstance(multiple_or_amounts, (int, np.integer)):
            return self.then(Pad(self._name(dim), multiple=multiple_or_amounts))
        return self.then(Pad(self._name(dim), amounts=tuple(multiple_or_amounts)))

    # -- arrays -------------------------------------------------------------------------
    def apply(self, x):
        """Logical array -> physical array."""
        x = jnp.asarray(x)
        if x.shape != self.shape:
            raise LayoutError(f"apply: array shape {x.shape} is not the logical shape "
                              f"{self.shape} of {' '.join(self.names)}")
        for p, dims in zip(self.primitives, self._states):
            x = p.apply(x, dims)
        return x

    def invert(self, y):
        """Physical array -> logical array (pads cropped, unfolded dims read from one tile)."""
        y = jnp.asarray(y)
        if y.shape != self.physical_shape:
            raise LayoutError(f"invert: array shape {y.shape} is not the physical shape "
                              f"{self.physical_shape} of {self}")
        for p, dims in reversed(tuple(zip(self.primitives, self._states))):
            y = p.invert(y, dims)
        return y

    # -- index expressions --------------------------------------------------------------
    def _variables(self, names) -> dict[str, str]:
        if names is None:
            var = {n: n.lower() for n in self.names}
        elif isinstance(names, Mapping):
            var = {n: names.get(n, n.lower()) for n in self.names}
        else:
            var = dict(zip(self.names, names))
        if (len(var) != len(self.names) or len(set(var.values())) != len(var)
                or not all(v.isidentifier() for v in var.values())):
            raise LayoutError(f"index variable names {var} must be distinct identifiers, one "
                              f"per logical dim of {' '.join(self.names)}")
        return var

    @functools.cached_property
    def _offset_expr(self) -> _Expr:
        acc = None  # Horner form over the physical dims: ((d0*|d1| + d1)*|d2| + d2)...
        for d in self._states[-1]:
            acc = d.expr if acc is None else _add(_mul(acc, d.size), d.expr)
        return acc if acc is not None else _Const(0)

    def index_expr(self, names=None) -> tuple[str, Callable[..., int]]:
        """(C expression, offset function) from logical indices to the physical offset.

        names: variable name per logical dim (mapping or sequence; default lowercase dim
        names). The function takes those variables as keywords: offset(n=0, c=3, h=1, w=2).
        For an unfolded dim the offset is that of the first tile holding the element.
        """
        var = self._variables(names)
        expr = self._offset_expr
        by_var = {v: n for n, v in var.items()}

        def offset(**index: int) -> int:
            if set(index) != set(by_var):
                raise LayoutError(f"offset needs exactly the indices {sorted(by_var)}, "
                                  f"got {sorted(index)}")
            return _eval(expr, {by_var[v]: i for v, i in index.items()})

        return _text(expr, var), offset

    def offset(self, index: Sequence[int]) -> int:
        """Physical offset of one logical index given positionally."""
        return _eval(self._offset_expr, dict(zip(self.names, index)))

    def strides(self) -> dict[str, int] | None:
        """Element stride per logical dim if offset = sum(stride * index), else None."""
        linear = _linear(self._offset_expr)
        if linear is None or linear[1] != 0:
            return None
        return {n: linear[0].get(n, 0) for n in self.names}

    # -- what kernels and the graph pass ask of a layout -----------------------------------
    @functools.cached_property
    def permutation(self) -> tuple[int, ...] | None:
        """The logical dim at each physical position when the layout only reorders
        (physical = transpose(logical, permutation)), else None."""
        if sorted(self.dims) != sorted(self.names) or self.physical_shape != tuple(
                self.shape[self.names.index(d)] for d in self.dims):
            return None
        return tuple(self.names.index(d) for d in self.dims)

    def origins(self) -> tuple[frozenset, ...]:
        """The logical dims each physical dim's coordinate depends on, outermost first."""
        def names(e):
            if isinstance(e, _Var):
                return {e.name}
            if isinstance(e, _Bin):
                return names(e.a) | names(e.b)
            if isinstance(e, _Max0):
                return names(e.a)
            return set()
        return tuple(frozenset(names(d.expr)) for d in self._states[-1])

    @functools.cached_property
    def block_strides(self) -> dict[str, tuple[int, int, int]] | None:
        """dim -> (block, outer, inner) when offset = sum over dims of
        (i // block) * outer + (i % block) * inner: what a template needs to address a
        channel-blocked layout (N C/8 H W 8c: C -> (8, H*W*8, 1)) with two strides per dim.
        A dim that is not blocked has block = its size (and outer 0). None when the offset is
        not of this form (pads, unfolds, splits inside fused dims that do not separate)."""
        if any(isinstance(p, (Pad, Unfold)) for p in self.primitives):
            return None
        linear = self.strides()
        if linear is not None:  # (keeps the dense stride of a size-1 dim, as strides() does)
            return {n: (s, 0, linear[n]) for n, s in zip(self.names, self.shape)}
        out = {}
        for name, size in zip(self.names, self.shape):
            f = [self.offset([i if n == name else 0 for n in self.names]) for i in range(size)]
            inner = f[1] if size > 1 else 0
            block = next((i for i in range(1, size) if f[i] != i * inner), size)
            outer = f[block] if block < size else 0
            if any(f[i] != (i // block) * outer + (i % block) * inner for i in range(size)):
                return None
            out[name] = (block, outer, inner)
        # separable: a corner index adds up from the dims alone
        corner = [s - 1 for s in self.shape]
        if self.offset(corner) != sum(
                ((s - 1) // b) * o + ((s - 1) % b) * i
                for s, (b, o, i) in zip(self.shape, out.values())):
            return None
        return out

    def with_logical_order(self, names) -> "Layout":
        """The same physical arrangement over the same dims listed in another logical order
        (an operand's canonical roles, e.g. NCHW, for a value whose axes are N H W C)."""
        names = tuple(names)
        if sorted(names) != sorted(self.names):
            raise LayoutError(f"with_logical_order: {names} are not the dims of {self.names}")
        shape = tuple(self.shape[self.names.index(n)] for n in names)
        out = Layout(names, shape, self.primitives)
        return out if out.dims == self.dims else out.reorder(*self.dims)

    def logical(self) -> "Layout":
        """The identity layout of the same logical tensor."""
        return Layout(self.names, self.shape)

    # -- serialisation ------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"names": list(self.names), "shape": list(self.shape),
                "primitives": [_primitive_to_dict(p) for p in self.primitives]}

    @classmethod
    def from_dict(cls, data: Mapping) -> "Layout":
        return cls(data["names"], data["shape"],
                   tuple(_primitive_from_dict(p) for p in data.get("primitives", ())))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Layout":
        return cls.from_dict(json.loads(text))


# ---------------------------------------------------------------------------------------
# Conversion between two layouts of one logical tensor.


def _reshape_program(layout: Layout):
    """(logical padding, physical dims as atom lists) when the chain is pads on whole
    logical dims plus split / fuse / reorder; None otherwise (unfold, pad of a split dim,
    a split that cuts across mixed-radix digits).

    An atom (logical dim, step, count) is the digit (i // step) % count of a logical index
    in the padded logical tensor; each physical dim is a list of atoms, outermost first.
    """
    padding = {n: (0, 0) for n in layout.names}
    entries = [[n, [(n, 1, s)] if s > 1 else []] for n, s in zip(layout.names, layout.shape)]
    whole = {n: n for n in layout.names}  # current name -> logical dim it still is, whole
    for p, dims in zip(layout.primitives, layout._states):
        names = [e[0] for e in entries]
        if isinstance(p, Pad):
            if p.dim not in whole:
                return None
            i, logical = names.index(p.dim), whole.pop(p.dim)
            lo, hi = p.lo_hi(dims[i].size)
            padding[logical] = (padding[logical][0] + lo, padding[logical][1] + hi)
            size = dims[i].size + lo + hi
            new_name = p.step(dims)[i].name
            entries[i] = [new_name, [(logical, 1, size)] if size > 1 else []]
            whole[new_name] = logical
        elif isinstance(p, Split):
            i = names.index(p.dim)
            outer, rest = list(entries[i][1]), p.factor
            inner = []
            while rest > 1:
                logical, step, count = outer.pop()
                if rest % count == 0:
                    inner.insert(0, (logical, step, count))
                    rest //= count
                elif count % rest == 0:
                    outer.append((logical, step * rest, count // rest))
                    inner.insert(0, (logical, step, rest))
                    rest = 1
                else:
                    return None
            new = p.step(dims)
            entries[i:i + 1] = [[new[i].name, outer], [new[i + 1].name, inner]]
            whole.pop(p.dim, None)
        elif isinstance(p, Fuse):
            i = names.index(p.outer)
            fused = p.step(dims)[i].name
            entries[i:i + 2] = [[fused, entries[i][1] + entries[i + 1][1]]]
            whole.pop(p.outer, None)
            whole.pop(p.inner, None)
        elif isinstance(p, Reorder):
            entries = [entries[names.index(n)] for n in p.order]
        else:
            return None
    return padding, [atoms for _, atoms in entries]


def _fine_atoms(padded_sizes: Mapping[str, int], *programs):
    """Per logical dim, the common refinement of both programs' atoms (None if none)."""
    fine = {}
    for n, size in padded_sizes.items():
        bounds = {1, size}
        for atoms in programs:
            for phys in atoms:
                for logical, step, count in phys:
                    if logical == n:
                        bounds |= {step, step * count}
        bounds = sorted(bounds)
        if any(b % a for a, b in zip(bounds, bounds[1:])):
            return None  # e.g. C=12 split by 4 on one side and by 3 on the other
        fine[n] = bounds
    return fine


def _expand(atoms, fine):
    """Fine atoms (logical, step) of a physical dim's atoms, outermost first."""
    out = []
    for logical, step, count in atoms:
        out += [(logical, b) for b in reversed(fine[logical]) if step <= b < step * count]
    return out


@dataclasses.dataclass(frozen=True)
class Conversion:
    """src's physical array -> dst's physical array, as one jnp function.

    kind: "identity"; "transpose" (one reshape -> transpose -> reshape, both chains being
    reshapes over the same padded logical tensor); or "general" (dst.apply(src.invert(y))).
    """

    src: Layout
    dst: Layout

    @functools.cached_property
    def _plan(self):
        if self.src == self.dst:
            return "identity", None
        a, b = _reshape_program(self.src), _reshape_program(self.dst)
        if a is None or b is None or a[0] != b[0]:
            return "general", None
        padded = {n: s + sum(a[0][n]) for n, s in zip(self.src.names, self.src.shape)}
        fine = _fine_atoms(padded, a[1], b[1])
        if fine is None:
            return "general", None
        src_atoms = [atom for phys in a[1] for atom in _expand(phys, fine)]
        dst_atoms = [atom for phys in b[1] for atom in _expand(phys, fine)]
        sizes = {atom: nxt // atom[1] for n, bs in fine.items()
                 for atom, nxt in zip(((n, s) for s in bs), bs[1:])}
        perm = [src_atoms.index(atom) for atom in dst_atoms]
        return "transpose", (tuple(sizes[t] for t in src_atoms), tuple(perm))

    @property
    def kind(self) -> str:
        return self._plan[0]

    def __call__(self, y):
        kind, plan = self._plan
        if kind == "identity":
            return jnp.asarray(y)
        if kind == "general":
            return self.dst.apply(self.src.invert(y))
        y = jnp.asarray(y)
        if y.shape != self.src.physical_shape:
            raise LayoutError(f"convert: array shape {y.shape} is not the physical shape "
                              f"{self.src.physical_shape} of {self.src}")
        fine_shape, perm = plan
        if perm != tuple(sorted(perm)):
            y = jnp.transpose(y.reshape(fine_shape), perm)
        return y.reshape(self.dst.physical_shape)


def convert(src: Layout, dst: Layout) -> Conversion:
    """One transform from src's physical array to dst's; both describe one logical tensor."""
    if (src.names, src.shape) != (dst.names, dst.shape):
        raise LayoutError(f"convert: {' '.join(src.names)} {src.shape} and "
                          f"{' '.join(dst.names)} {dst.shape} are different logical tensors")
    return Conversion(src, dst)


# ---------------------------------------------------------------------------------------
# Common layouts (NCHW activations, OIHW weights), padding only where a block needs it.


def _blocked(layout: Layout, dim: str, block: int) -> tuple[Layout, str, str]:
    """layout with `dim` split by block (padded first if needed): (layout, outer, inner)."""
    if layout.shape[layout.names.index(dim)] % block:
        layout = layout.pad(dim, block)
        dim = f"{dim}+pad{block}"
    layout = layout.split(dim, block)
    i = layout.dims.index(f"{dim}/{block}")
    return layout, layout.dims[i], layout.dims[i + 1]


def nchw_c(shape, block: int) -> Layout:
    """NCHW[x]c: logical NCHW -> N C/x H W xc (C padded to a multiple of x if needed)."""
    layout, outer, inner = _blocked(Layout("NCHW", shape), "C", block)
    return layout.reorder("N", outer, "H", "W", inner)


def permuted(names, order_of_axes, shape) -> Layout:
    """names[i] (size shape[i]) held at array axis order_of_axes[i]: jax's dimension
    numbers as a Layout (the one place they become one)."""
    names, order_of_axes = tuple(names), tuple(order_of_axes)
    physical = [names[order_of_axes.index(a)] for a in range(len(names))]
    layout = Layout(names, shape)
    return layout if tuple(physical) == names else layout.reorder(*physical)


def channel_blocked(layout: Layout, channel: str, block: int) -> Layout:
    """layout with `channel` split by block, its inner part moved innermost:
    N H W C -> N C/8 H W 8c. The channel count must be a multiple of block (no padding:
    padded channels would have to be kept zero between kernels)."""
    size = layout.shape[layout.names.index(channel)]
    if size % block:
        raise LayoutError(f"channel_blocked: {channel}={size} is not a multiple of {block}")
    split = layout.split(channel, block)
    outer, inner = f"{channel}/{block}", split.dims[split.dims.index(f"{channel}/{block}") + 1]
    rest = [d for d in layout.dims if d != channel]
    return split.reorder(rest[0], outer, *rest[1:], inner)


def nhwc(shape) -> Layout:
    """Logical NCHW stored channels-last."""
    return Layout("NCHW", shape).reorder("N", "H", "W", "C")


def oihw_io(shape, i_block: int, o_block: int) -> Layout:
    """OIHW[i]i[o]o weights: logical OIHW -> O/o I/i H W i o (padding O, I if needed)."""
    layout, o_outer, o_inner = _blocked(Layout("OIHW", shape), "O", o_block)
    layout, i_outer, i_inner = _blocked(layout, "I", i_block)
    return layout.reorder(o_outer, i_outer, "H", "W", i_inner, o_inner)
