"""Which template activation (ops/epilogue.py ACTIVATIONS) a pointwise jaxpr region computes.

Entry points: recognise(region, start_var) -> name | None, is_pointwise(eqn), and the two
checks on their own: spelling_of(structure_of(region, start_var)) and
probe_agrees(region, start_var, name).
A region fuses only when two independent checks agree. Its structure, normalised (calls
inlined, sums and products flattened, commutative operands sorted), must be a known spelling
of the activation, with max/min bounds exactly equal; and evaluated in float64 on a wide
probe (a dense grid near 0, magnitudes out to float32 max, +-0, +-inf, NaN, each constant of
the region and its float32 neighbours) it must give what the kernel computes: NaN and inf
where it does, equal values for relu/relu6, values within 1e-6 relative otherwise. A probe
alone on [-8, 8] took jnp.clip(y, 0, 10) for relu; structure alone cannot weigh constants.
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core as jcore
from jax.extend.core import primitives as P

from alt_jax import jaxpr_pass

_EXACT = ("relu", "relu6")      # piecewise linear: the kernel computes them exactly
_RTOL, _ATOL = 1e-6, 1e-12      # for the transcendental ones, in float64
_CALLS = {P.custom_jvp_call_p: "call_jaxpr", P.jit_p: "jaxpr"}


def _f32(c) -> float:
    return float(np.float32(c))


# --- the meaning of each template activation, as the kernel computes it (epilogue.h) -------

def _erfc(x):
    return np.vectorize(math.erfc, otypes=[np.float64])(x)


def _erf(x):
    return np.vectorize(math.erf, otypes=[np.float64])(x)


def _gelu_tanh(x):
    inner = _f32(math.sqrt(2 / math.pi)) * (x + _f32(0.044715) * x ** 3)
    return 0.5 * x * (1 + np.tanh(inner))


def _gelu_erf(x):
    # erfc, not 1 + erf: exact far out on the negative side (where 1 + erf cancels)
    return 0.5 * x * _erfc(-x * _f32(math.sqrt(0.5)))


REFERENCES = {
    "relu": lambda x: np.maximum(x, 0.0),
    "relu6": lambda x: np.minimum(np.maximum(x, 0.0), 6.0),
    "gelu_tanh": _gelu_tanh,
    "gelu_erf": _gelu_erf,
    "silu": lambda x: x / (1 + np.exp(-x)),   # -inf / inf = NaN, as XLA's x * logistic(x)
}

# The spellings each activation is fused from; jnp.clip and lax.clamp normalise to relu6's.
_SPELLINGS = {
    "relu": (lambda x: jnp.maximum(x, 0.0),),
    "relu6": (lambda x: jnp.minimum(jnp.maximum(x, 0.0), 6.0),),
    "gelu_tanh": (
        lambda x: jax.nn.gelu(x, approximate=True),
        lambda x: 0.5 * x * (1.0 + jnp.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3))),
    ),
    "gelu_erf": (
        lambda x: jax.nn.gelu(x, approximate=False),
        lambda x: 0.5 * x * (1.0 + lax.erf(x / math.sqrt(2.0))),
        lambda x: 0.5 * x * (1.0 + lax.erf(x * math.sqrt(0.5))),
    ),
    "silu": (jax.nn.silu, lambda x: x / (1.0 + jnp.exp(-x))),
}


# --- numeric evaluation (float64 numpy: planning runs while jax traces) -------------------

_NUMPY = {
    lax.add_p: np.add, lax.sub_p: np.subtract, lax.mul_p: np.multiply,
    lax.div_p: np.divide, lax.max_p: np.maximum, lax.min_p: np.minimum,
    lax.neg_p: np.negative, lax.exp_p: np.exp, lax.tanh_p: np.tanh,
    lax.logistic_p: lambda a: 1 / (1 + np.exp(-a)), lax.erf_p: _erf, lax.erfc_p: _erfc,
    lax.sqrt_p: np.sqrt, lax.rsqrt_p: lambda a: 1 / np.sqrt(a), lax.abs_p: np.abs,
    lax.square_p: np.square, lax.pow_p: np.power,
    lax.clamp_p: lambda lo, x, hi: np.minimum(np.maximum(x, lo), hi),
    lax.convert_element_type_p: lambda a: a, P.copy_p: lambda a: a,
}
_POINTWISE = set(_NUMPY) | {lax.integer_pow_p}  # integer_pow: its exponent is a parameter


def is_pointwise(eqn) -> bool:
    """A float32 -> float32 elementwise equation both checks can read (calls: their bodies)."""
    if len(eqn.outvars) != 1 or eqn.outvars[0].aval.dtype != jnp.float32:
        return False
    if eqn.primitive is lax.convert_element_type_p:  # only a no-op cast: bf16 would round
        return eqn.params["new_dtype"] == jnp.float32 and all(
            isinstance(v, jcore.Literal) or v.aval.dtype == jnp.float32 for v in eqn.invars)
    if eqn.primitive in _CALLS:
        body = jaxpr_pass.open_jaxpr(eqn.params[_CALLS[eqn.primitive]])
        return len(body.outvars) == 1 and all(is_pointwise(e) for e in body.eqns)
    return eqn.primitive in _POINTWISE


def _numpy_eval(eqns, env: dict) -> None:
    for eqn in eqns:
        ins = [_read(v, env) for v in eqn.invars]
        if eqn.primitive in _CALLS:
            body = jaxpr_pass.open_jaxpr(eqn.params[_CALLS[eqn.primitive]])
            inner = dict(zip(body.invars, ins))
            _numpy_eval(body.eqns, inner)
            out = _read(body.outvars[0], inner)
        elif eqn.primitive is lax.integer_pow_p:
            out = ins[0] ** eqn.params["y"]
        else:
            out = _NUMPY[eqn.primitive](*ins)
        env[eqn.outvars[0]] = np.asarray(out, np.float64)


def _read(v, env):
    return np.asarray(v.val, np.float64) if isinstance(v, jcore.Literal) else env[v]


def _probe_points(constants) -> np.ndarray:
    """float32 values as float64: near 0, every magnitude, the specials, around constants."""
    f32 = np.finfo(np.float32)
    mags = np.geomspace(float(f32.smallest_subnormal), float(f32.max), 3000)
    around = [np.nextafter(np.float32(c), np.float32(d), dtype=np.float32)
              for c in constants for d in (-np.inf, np.inf)]
    around += [c + d * max(1.0, abs(c)) for c in constants for d in (-1e-3, 0.0, 1e-3)]
    points = np.concatenate([np.linspace(-8.0, 8.0, 4001), mags, -mags, around,
                             [0.0, -0.0, np.inf, -np.inf, np.nan, f32.max, -f32.max]])
    return points.astype(np.float32).astype(np.float64)


def _agrees(got, want, exact: bool) -> bool:
    """Same NaNs, same infinities, equal (exact) or close finite values."""
    if not np.array_equal(np.isnan(got), np.isnan(want)):
        return False
    inf = np.isinf(want)
    if not np.array_equal(np.isinf(got), inf) or not np.array_equal(got[inf], want[inf]):
        return False
    finite = np.isfinite(want)
    g, w = got[finite], want[finite]
    if exact:
        return bool(np.array_equal(g, w))
    return bool(np.all(np.abs(g - w) <= _RTOL * np.abs(w) + _ATOL))


def _literals(eqns) -> list:
    """The finite constants a region uses (call bodies included): the probe looks around them."""
    out = []
    for eqn in eqns:
        out += [float(v.val) for v in eqn.invars
                if isinstance(v, jcore.Literal) and np.isfinite(float(v.val))]
        if eqn.primitive in _CALLS:
            out += _literals(jaxpr_pass.open_jaxpr(eqn.params[_CALLS[eqn.primitive]]).eqns)
    return out


def probe_agrees(region, start_var, name: str) -> bool:
    """Whether region, evaluated from start_var on the wide probe, gives the template
    activation `name` (see the module doc)."""
    if not all(is_pointwise(e) for e in region):
        return False
    x = _probe_points(_literals(region))
    env = {start_var: x}
    try:
        with np.errstate(all="ignore"):
            _numpy_eval(region, env)
            want = REFERENCES[name](x)
    except KeyError:  # an operand the probe cannot evaluate (a non-literal scalar)
        return False
    got = np.broadcast_to(env[region[-1].outvars[0]], x.shape)
    return _agrees(got, want, name in _EXACT)


# --- structure: a normal form of the region's expression ----------------------------------
# Expressions are tuples: ("x",) the region's input, ("c", float32 value), ("add", c, terms),
# ("mul", c, factors) with the constant part c folded and terms / factors sorted,
# ("max" | "min", a, b) sorted, ("pow", a, n), ("recip", a), (unary name, a).

X = ("x",)


def _const(c) -> tuple:
    return ("c", _f32(c))


def _shape_key(e) -> str:
    """Sort key that ignores constant values, so near-equal constants sort alike."""
    return repr(_strip(e))


def _strip(e):
    if isinstance(e, float):
        return "c"
    if isinstance(e, tuple):
        return ("c",) if e and e[0] == "c" else tuple(_strip(a) for a in e)
    return e


def _nary(op: str, unit: float, fold, a, b):
    c, items = unit, []
    for e in (a, b):
        if e[0] == "c":
            c = fold(c, e[1])
        elif e[0] == op:
            c, items = fold(c, e[1]), items + list(e[2])
        else:
            items.append(e)
    c = _f32(c)
    if not items:
        return ("c", c)
    if c == unit and len(items) == 1:
        return items[0]
    return (op, c, tuple(sorted(items, key=_shape_key)))


def _add(a, b):
    return _nary("add", 0.0, lambda p, q: p + q, a, b)


def _mul(a, b):
    return _nary("mul", 1.0, lambda p, q: p * q, a, b)


def _minmax(op: str, a, b):
    return (op, *sorted((a, b), key=_shape_key))


def _pow(a, n):
    if n == 1:
        return a
    return ("pow", a, int(n))


def _div(a, b):
    if b[0] == "c":
        return _mul(a, _const(1.0 / b[1]) if b[1] != 0 else ("c", math.copysign(math.inf, b[1])))
    return _mul(a, ("recip", b))


_UNARY = {lax.exp_p: "exp", lax.tanh_p: "tanh", lax.logistic_p: "logistic", lax.erf_p: "erf",
          lax.erfc_p: "erfc", lax.sqrt_p: "sqrt", lax.rsqrt_p: "rsqrt", lax.abs_p: "abs"}


def _expr_of(eqn, ins):
    p = eqn.primitive
    if p is lax.add_p:
        return _add(*ins)
    if p is lax.sub_p:
        return _add(ins[0], _mul(_const(-1.0), ins[1]))
    if p is lax.mul_p:
        return _mul(*ins)
    if p is lax.div_p:
        return _div(*ins)
    if p is lax.neg_p:
        return _mul(_const(-1.0), ins[0])
    if p in (lax.max_p, lax.min_p):
        return _minmax("max" if p is lax.max_p else "min", *ins)
    if p is lax.clamp_p:                      # clamp(lo, x, hi) == min(max(x, lo), hi)
        return _minmax("min", _minmax("max", ins[1], ins[0]), ins[2])
    if p is lax.integer_pow_p:
        return _pow(ins[0], eqn.params["y"])
    if p is lax.square_p:
        return _pow(ins[0], 2)
    if p is lax.pow_p and ins[1][0] == "c" and float(ins[1][1]).is_integer():
        return _pow(ins[0], ins[1][1])
    if p in (lax.convert_element_type_p, P.copy_p):
        return ins[0]
    if p in _UNARY:
        return (_UNARY[p], ins[0])
    return None


def _value(v, env: dict):
    return _const(v.val) if isinstance(v, jcore.Literal) else env.get(v)


def _structure(eqns, env: dict) -> bool:
    """Fills env with each value's normal form; False at anything unreadable (a primitive
    with no rule, a non-literal operand from outside the region)."""
    for eqn in eqns:
        ins = [_value(v, env) for v in eqn.invars]
        if any(e is None for e in ins):
            return False
        if eqn.primitive in _CALLS:
            body = jaxpr_pass.open_jaxpr(eqn.params[_CALLS[eqn.primitive]])
            inner = dict(zip(body.invars, ins))
            out = _value(body.outvars[0], inner) if _structure(body.eqns, inner) else None
        else:
            out = _expr_of(eqn, ins)
        if out is None:
            return False
        env[eqn.outvars[0]] = out
    return True


def _close(a: float, b: float, exact: bool) -> bool:
    if exact or a == 0 or b == 0 or not (math.isfinite(a) and math.isfinite(b)):
        return a == b
    return abs(a - b) <= 1e-6 * abs(b)


def _same(a, b, bound: bool = False) -> bool:
    """Equal normal forms; constants equal exactly as max/min bounds, else to 1e-6."""
    if isinstance(a, float) and isinstance(b, float):
        return _close(a, b, bound)
    if not (isinstance(a, tuple) and isinstance(b, tuple) and len(a) == len(b)):
        return a == b
    if a and a[0] == "c":
        return b[0] == "c" and _close(a[1], b[1], bound)
    operands_bound = bool(a) and a[0] in ("max", "min")
    return all(_same(p, q, operands_bound) for p, q in zip(a, b))


def structure_of(region, start_var):
    """The region's normal form (see above), or None."""
    if not all(is_pointwise(e) for e in region):
        return None
    env = {start_var: X}
    return env[region[-1].outvars[0]] if region and _structure(region, env) else None


@functools.lru_cache(maxsize=None)
def _known_forms() -> dict:
    """name -> normal forms of its spellings, traced once on a float32 scalar."""
    x = jax.ShapeDtypeStruct((), jnp.float32)
    forms = {}
    for name, spellings in _SPELLINGS.items():
        forms[name] = []
        for fn in spellings:
            jaxpr = jax.make_jaxpr(fn)(x).jaxpr
            form = structure_of(jaxpr.eqns, jaxpr.invars[0])
            if form is not None:  # a spelling another jax version writes with other primitives
                forms[name].append(form)
    return forms


def spelling_of(form) -> Optional[str]:
    """The activation whose known spellings have this normal form, or None."""
    for name, forms in _known_forms().items():
        if form is not None and any(_same(form, known) for known in forms):
            return name
    return None


def recognise(region, start_var) -> Optional[str]:
    """The template activation region computes from start_var, or None (then it stays in
    XLA): its structure is a known spelling and the wide probe agrees."""
    name = spelling_of(structure_of(region, start_var))
    return name if name is not None and probe_agrees(region, start_var, name) else None
