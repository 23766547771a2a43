"""Converts a traced JAX function into an ONNX model built with onnx.helper: same computation,
same weights (params become initializers, inputs become graph inputs x0, x1, ...).

Entry points: export(fn, params, *inputs) -> onnx.ModelProto; convert(...) -> Conversion (the
model plus input/output names and the output pytree); RULES (primitive object -> rule).
Shaped like jax.core.eval_jaxpr: an environment from jaxpr variables to ONNX value names, one
loop over equations, rules keyed by primitive object; nested jit / closed_call / remat /
custom_jvp / custom_vjp bodies are inlined. Broadcasts are kept lazy: a value may be stored
with size-1 dims where its aval is larger and is only Expand-ed when a consumer that does
not broadcast (Conv, MatMul, Reshape, ...) reads it, so BN-style affine chains stay small.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax import lax
from jax.extend import core as jcore
from jax.extend.core import primitives as P

from alt_jax import jaxpr_pass

OPSET = 17  # ReduceSum takes axes as an input, ReduceMax/Min/Prod as an attribute


def _onnx():
    import onnx  # imported lazily: benchmarks without the ONNX peer never need it
    from onnx import helper, numpy_helper
    return onnx, helper, numpy_helper


def _inverse(perm) -> tuple:
    return tuple(int(i) for i in np.argsort(perm))


class _Graph:
    """The ONNX graph under construction: nodes, initializers, and the actual shape and dtype
    of every value (which, for lazily broadcast values, may have size-1 dims)."""

    def __init__(self):
        self.nodes: list = []
        self.initializers: list = []
        self.shapes: dict = {}
        self.dtypes: dict = {}
        self._names: set = set()
        self._const_cache: dict = {}
        self._transposes: dict = {}   # (name, perm) -> name, including known inverses
        self._expands: dict = {}      # (name, shape) -> name

    def fresh(self, hint: str) -> str:
        base = "".join(c if c.isalnum() or c in "._" else "_" for c in hint) or "v"
        name, i = base, 0
        while name in self._names:
            i += 1
            name = f"{base}_{i}"
        self._names.add(name)
        return name

    def initializer(self, array, hint: str) -> str:
        _, _, numpy_helper = _onnx()
        array = np.asarray(array)
        name = self.fresh(hint)
        self.initializers.append(numpy_helper.from_array(array, name))
        self.shapes[name], self.dtypes[name] = tuple(array.shape), array.dtype
        return name

    def const(self, value, dtype=None) -> str:
        """An initializer holding value; small constants are shared."""
        array = np.asarray(value, dtype=dtype)
        if array.size > 64:
            return self.initializer(array, "const")
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._const_cache:
            self._const_cache[key] = self.initializer(array, "const")
        return self._const_cache[key]

    def ints(self, values) -> str:
        return self.const(np.asarray(values, np.int64).reshape(-1))

    def node(self, op: str, inputs: Sequence[str], shape, dtype, **attrs) -> str:
        _, helper, _ = _onnx()
        out = self.fresh(op.lower())
        self.nodes.append(helper.make_node(op, list(inputs), [out], name=out, **attrs))
        self.shapes[out], self.dtypes[out] = tuple(int(d) for d in shape), np.dtype(dtype)
        return out

    def like(self, op: str, inputs: Sequence[str], dtype=None, **attrs) -> str:
        """An elementwise node: output shape is the broadcast of the inputs' actual shapes."""
        shape = np.broadcast_shapes(*(self.shapes[n] for n in inputs))
        return self.node(op, inputs, shape, dtype or self.dtypes[inputs[0]], **attrs)

    # --- shape plumbing -------------------------------------------------------------------

    def expand(self, name: str, shape) -> str:
        """name broadcast to exactly shape (a no-op when it already has that shape)."""
        shape = tuple(int(d) for d in shape)
        if self.shapes[name] == shape:
            return name
        key = (name, shape)
        if key not in self._expands:
            self._expands[key] = self.node("Expand", [name, self.ints(shape)], shape,
                                           self.dtypes[name])
        return self._expands[key]

    def reshape(self, name: str, shape) -> str:
        shape = tuple(int(d) for d in shape)
        if self.shapes[name] == shape:
            return name
        return self.node("Reshape", [name, self.ints(shape)], shape, self.dtypes[name])

    def transpose(self, name: str, perm) -> str:
        perm = tuple(int(p) for p in perm)
        if perm == tuple(range(len(perm))):
            return name
        key = (name, perm)
        if key not in self._transposes:
            shape = tuple(self.shapes[name][p] for p in perm)
            out = self.node("Transpose", [name], shape, self.dtypes[name], perm=list(perm))
            self._transposes[key] = out
            self._transposes[(out, _inverse(perm))] = name  # transposing back is free
        return self._transposes[key]

    def cast(self, name: str, dtype) -> str:
        dtype = np.dtype(dtype)
        if self.dtypes[name] == dtype:
            return name
        _, helper, _ = _onnx()
        return self.node("Cast", [name], self.shapes[name], dtype,
                         to=helper.np_dtype_to_tensor_dtype(dtype))


# --- rules ----------------------------------------------------------------------------------
# A rule maps (graph, eqn, input names) to output names. Rules in _BROADCASTING accept inputs
# whose actual shape only broadcasts to their aval; every other rule gets exact shapes.

Rule = Callable[[_Graph, Any, list], list]
RULES: dict = {}
_BROADCASTING: set = set()


def _rule(*prims, broadcasting: bool = False):
    def register(fn):
        for p in prims:
            if p is not None:
                RULES[p] = fn
                if broadcasting:
                    _BROADCASTING.add(p)
        return fn
    return register


def _aval(eqn, i=0):
    return eqn.outvars[i].aval


def _unary(op):
    return lambda g, eqn, a: [g.like(op, a)]


def _binary(op, out_dtype=None):
    return lambda g, eqn, a: [g.like(op, a, dtype=out_dtype)]


for _p, _op in [(P.exp_p, "Exp"), (P.log_p, "Log"), (P.tanh_p, "Tanh"), (P.erf_p, "Erf"),
                (P.sqrt_p, "Sqrt"), (P.neg_p, "Neg"), (P.abs_p, "Abs"), (P.sign_p, "Sign"),
                (P.floor_p, "Floor"), (P.ceil_p, "Ceil"), (P.sin_p, "Sin"), (P.cos_p, "Cos"),
                (P.tan_p, "Tan"), (P.logistic_p, "Sigmoid"), (P.not_p, "Not"),
                (P.asin_p, "Asin"), (P.acos_p, "Acos"), (P.atan_p, "Atan"),
                (P.sinh_p, "Sinh"), (P.cosh_p, "Cosh")]:
    _rule(_p, broadcasting=True)(_unary(_op))

for _p, _op in [(P.add_p, "Add"), (P.sub_p, "Sub"), (P.mul_p, "Mul"), (P.div_p, "Div"),
                (P.max_p, "Max"), (P.min_p, "Min"), (P.pow_p, "Pow"), (P.and_p, "And"),
                (P.or_p, "Or"), (P.xor_p, "Xor")]:
    _rule(_p, broadcasting=True)(_binary(_op))

for _p, _op in [(P.eq_p, "Equal"), (P.lt_p, "Less"), (P.le_p, "LessOrEqual"),
                (P.gt_p, "Greater"), (P.ge_p, "GreaterOrEqual")]:
    _rule(_p, broadcasting=True)(_binary(_op, np.bool_))


@_rule(P.ne_p, broadcasting=True)
def _ne(g, eqn, a):
    return [g.like("Not", [g.like("Equal", a, dtype=np.bool_)])]


@_rule(P.rem_p, broadcasting=True)
def _rem(g, eqn, a):  # C fmod semantics (sign of the dividend), as lax.rem
    fmod = int(np.issubdtype(g.dtypes[a[0]], np.floating))
    return [g.like("Mod", a, fmod=fmod)]


@_rule(P.rsqrt_p, broadcasting=True)
def _rsqrt(g, eqn, a):
    return [g.like("Reciprocal", [g.like("Sqrt", a)])]


@_rule(P.square_p, broadcasting=True)
def _square(g, eqn, a):
    return [g.like("Mul", [a[0], a[0]])]


@_rule(P.erfc_p, broadcasting=True)
def _erfc(g, eqn, a):
    return [g.like("Sub", [g.const(1, g.dtypes[a[0]]), g.like("Erf", a)])]


@_rule(P.expm1_p, broadcasting=True)
def _expm1(g, eqn, a):
    return [g.like("Sub", [g.like("Exp", a), g.const(1, g.dtypes[a[0]])])]


@_rule(P.log1p_p, broadcasting=True)
def _log1p(g, eqn, a):
    return [g.like("Log", [g.like("Add", [a[0], g.const(1, g.dtypes[a[0]])])])]


@_rule(P.exp2_p, broadcasting=True)
def _exp2(g, eqn, a):
    return [g.like("Pow", [g.const(2, g.dtypes[a[0]]), a[0]], dtype=g.dtypes[a[0]])]


@_rule(P.is_finite_p, broadcasting=True)
def _is_finite(g, eqn, a):
    bad = g.like("Or", [g.like("IsInf", a, dtype=np.bool_), g.like("IsNaN", a, dtype=np.bool_)])
    return [g.like("Not", [bad])]


@_rule(P.integer_pow_p, broadcasting=True)
def _integer_pow(g, eqn, a):
    x, y = a[0], eqn.params["y"]
    n = abs(y)
    if n == 0:
        out = g.like("Add", [g.like("Mul", [x, g.const(0, g.dtypes[x])]),
                             g.const(1, g.dtypes[x])])
    elif n == 1:
        out = x
    elif n == 2:
        out = g.like("Mul", [x, x])
    elif n == 3:
        out = g.like("Mul", [g.like("Mul", [x, x]), x])
    else:
        out = g.like("Pow", [x, g.const(n, g.dtypes[x])])
    return [g.like("Reciprocal", [out]) if y < 0 else out]


@_rule(P.convert_element_type_p, broadcasting=True)
def _convert(g, eqn, a):
    return [g.cast(a[0], eqn.params["new_dtype"])]


@_rule(P.copy_p, P.stop_gradient_p, getattr(P, "sharding_constraint_p", None),
       getattr(lax, "copy_p", None), broadcasting=True)
def _identity(g, eqn, a):
    return [a[0]]


@_rule(P.reduce_precision_p, broadcasting=True)
def _reduce_precision(g, eqn, a):
    finfo = np.finfo(g.dtypes[a[0]])
    if eqn.params["exponent_bits"] < finfo.nexp or eqn.params["mantissa_bits"] < finfo.nmant:
        raise NotImplementedError(f"onnx_export: no rule for reduce_precision narrower than "
                                  f"{finfo.dtype} ({eqn.params})")
    return [a[0]]


@_rule(P.select_n_p, broadcasting=True)
def _select_n(g, eqn, a):
    pred, cases = a[0], a[1:]
    if len(cases) == 1:
        return [cases[0]]
    if g.dtypes[pred] == np.bool_:
        return [g.like("Where", [pred, cases[1], cases[0]], dtype=g.dtypes[cases[0]])]
    out = cases[0]
    for i, case in enumerate(cases[1:], start=1):
        hit = g.like("Equal", [pred, g.const(i, g.dtypes[pred])], dtype=np.bool_)
        out = g.like("Where", [hit, case, out], dtype=g.dtypes[case])
    return [out]


@_rule(P.clamp_p, broadcasting=True)
def _clamp(g, eqn, a):
    lo, x, hi = a
    if g.shapes[lo] == () and g.shapes[hi] == () and g.shapes[x] != ():
        return [g.node("Clip", [x, lo, hi], g.shapes[x], g.dtypes[x])]
    return [g.like("Min", [g.like("Max", [x, lo]), hi])]


@_rule(P.broadcast_in_dim_p, broadcasting=True)
def _broadcast_in_dim(g, eqn, a):
    # Only reshaped to the output rank (size-1 dims where it broadcasts); the Expand happens
    # when a non-broadcasting consumer needs the full shape.
    x = a[0]
    shape, dims = eqn.params["shape"], eqn.params["broadcast_dimensions"]
    if g.shapes[x] == ():
        return [x]
    target = [1] * len(shape)
    for i, d in enumerate(dims):
        target[d] = g.shapes[x][i]
    return [g.reshape(x, target)]


@_rule(P.reshape_p, P.squeeze_p, getattr(lax, "expand_dims_p", None))
def _reshape(g, eqn, a):
    if eqn.primitive is P.reshape_p and eqn.params.get("dimensions") not in (None, ()):
        raise NotImplementedError(f"onnx_export: no rule for {eqn.primitive} with dimensions="
                                  f"{eqn.params['dimensions']} (transpose first)")
    return [g.reshape(a[0], _aval(eqn).shape)]


@_rule(P.transpose_p)
def _transpose(g, eqn, a):
    return [g.transpose(a[0], eqn.params["permutation"])]


@_rule(P.concatenate_p)
def _concatenate(g, eqn, a):
    return [g.node("Concat", a, _aval(eqn).shape, _aval(eqn).dtype,
                   axis=int(eqn.params["dimension"]))]


@_rule(lax.split_p)
def _split(g, eqn, a):
    axis = int(eqn.params["axis"])
    _, helper, _ = _onnx()
    outs = [g.fresh("split") for _ in eqn.outvars]
    g.nodes.append(helper.make_node("Split", [a[0], g.ints(eqn.params["sizes"])], outs,
                                    name=outs[0], axis=axis))
    for name, v in zip(outs, eqn.outvars):
        g.shapes[name], g.dtypes[name] = tuple(v.aval.shape), np.dtype(v.aval.dtype)
    return outs


@_rule(P.slice_p)
def _slice(g, eqn, a):
    p = eqn.params
    n = len(p["start_indices"])
    steps = p["strides"] or (1,) * n
    return [g.node("Slice", [a[0], g.ints(p["start_indices"]), g.ints(p["limit_indices"]),
                             g.ints(range(n)), g.ints(steps)], _aval(eqn).shape,
                   _aval(eqn).dtype)]


@_rule(P.rev_p)
def _rev(g, eqn, a):
    dims = eqn.params["dimensions"]
    if not dims:
        return [a[0]]
    big = np.iinfo(np.int64).min
    return [g.node("Slice", [a[0], g.ints([-1] * len(dims)), g.ints([big] * len(dims)),
                             g.ints(dims), g.ints([-1] * len(dims))], _aval(eqn).shape,
                   _aval(eqn).dtype)]


@_rule(P.pad_p)
def _pad(g, eqn, a):
    config = eqn.params["padding_config"]
    if any(interior for _, _, interior in config):
        raise NotImplementedError(f"onnx_export: no rule for pad with interior padding "
                                  f"({config})")
    pads = [lo for lo, _, _ in config] + [hi for _, hi, _ in config]
    return [g.node("Pad", [a[0], g.ints(pads), a[1]], _aval(eqn).shape, _aval(eqn).dtype,
                   mode="constant")]


@_rule(P.iota_p)
def _iota(g, eqn, a):
    p = eqn.params
    shape, dim = tuple(p["shape"]), p["dimension"]
    ramp = np.arange(shape[dim], dtype=p["dtype"]).reshape(
        [-1 if i == dim else 1 for i in range(len(shape))])
    return [g.const(np.broadcast_to(ramp, shape).copy())]


def _reduce(op: str, axes_as_input: bool):
    def rule(g, eqn, a):
        axes = tuple(int(d) for d in eqn.params["axes"])
        if not axes:
            return [a[0]]
        out = _aval(eqn)
        if axes_as_input:
            return [g.node(op, [a[0], g.ints(axes)], out.shape, out.dtype, keepdims=0)]
        return [g.node(op, [a[0]], out.shape, out.dtype, axes=list(axes), keepdims=0)]
    return rule


_rule(P.reduce_sum_p)(_reduce("ReduceSum", axes_as_input=True))
_rule(P.reduce_max_p)(_reduce("ReduceMax", axes_as_input=OPSET >= 18))
_rule(P.reduce_min_p)(_reduce("ReduceMin", axes_as_input=OPSET >= 18))
_rule(P.reduce_prod_p)(_reduce("ReduceProd", axes_as_input=OPSET >= 18))


def _reduce_bool(op: str):
    inner = _reduce(op, axes_as_input=OPSET >= 18)

    def rule(g, eqn, a):
        as_int = g.cast(a[0], np.int32)
        out = inner(g, eqn, [as_int])[0]
        g.dtypes[out] = np.dtype(np.int32)
        return [g.cast(out, np.bool_)]
    return rule


_rule(P.reduce_and_p)(_reduce_bool("ReduceMin"))
_rule(P.reduce_or_p)(_reduce_bool("ReduceMax"))


def _arg(op: str):
    def rule(g, eqn, a):
        (axis,) = eqn.params["axes"]
        out = _aval(eqn)
        idx = g.node(op, a, out.shape, np.int64, axis=int(axis), keepdims=0)
        return [g.cast(idx, eqn.params["index_dtype"])]
    return rule


_rule(P.argmax_p)(_arg("ArgMax"))
_rule(P.argmin_p)(_arg("ArgMin"))


@_rule(P.cumsum_p)
def _cumsum(g, eqn, a):
    return [g.node("CumSum", [a[0], g.ints([eqn.params["axis"]])], _aval(eqn).shape,
                   _aval(eqn).dtype, reverse=int(bool(eqn.params["reverse"])))]


@_rule(P.conv_general_dilated_p)
def _conv(g, eqn, a):
    p = eqn.params
    if any(d != 1 for d in p["lhs_dilation"]):
        raise NotImplementedError(f"onnx_export: no rule for conv_general_dilated with "
                                  f"lhs_dilation={p['lhs_dilation']} (transposed conv)")
    if p["batch_group_count"] != 1:
        raise NotImplementedError(f"onnx_export: no rule for conv_general_dilated with "
                                  f"batch_group_count={p['batch_group_count']}")
    padding = [tuple(pair) for pair in p["padding"]]
    if any(lo < 0 or hi < 0 for lo, hi in padding):
        raise NotImplementedError(f"onnx_export: no rule for conv_general_dilated with "
                                  f"negative padding {padding}")
    lhs_spec, rhs_spec, out_spec = p["dimension_numbers"]
    x = g.transpose(a[0], lhs_spec)  # -> N, C, spatial...
    w = g.transpose(a[1], rhs_spec)  # -> O, I, spatial...
    out = _aval(eqn)
    nchw_shape = [out.shape[d] for d in out_spec]
    y = g.node("Conv", [x, w], nchw_shape, g.dtypes[x],
               kernel_shape=list(g.shapes[w][2:]),
               strides=[int(s) for s in p["window_strides"]],
               dilations=[int(d) for d in p["rhs_dilation"]],
               pads=[lo for lo, _ in padding] + [hi for _, hi in padding],
               group=int(p["feature_group_count"]))
    return [g.cast(g.transpose(y, _inverse(out_spec)), out.dtype)]


@_rule(P.dot_general_p)
def _dot_general(g, eqn, a):
    """Transpose to (batch, free, contract) x (batch, contract, free), Reshape to 3-D (or
    N-D x 2-D without batch dims, which MatMul takes as is), MatMul, Reshape to the output."""
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    lhs, rhs = a
    ls, rs = g.shapes[lhs], g.shapes[rhs]
    lf = [d for d in range(len(ls)) if d not in lc and d not in lb]
    rf = [d for d in range(len(rs)) if d not in rc and d not in rb]
    batch = [ls[d] for d in lb]
    k = int(np.prod([ls[d] for d in lc], dtype=np.int64))
    m = int(np.prod([ls[d] for d in lf], dtype=np.int64))
    n = int(np.prod([rs[d] for d in rf], dtype=np.int64))
    x = g.transpose(lhs, [*lb, *lf, *lc])
    w = g.transpose(rhs, [*rb, *rc, *rf])
    if batch:
        x = g.reshape(x, [*batch, m, k])
        w = g.reshape(w, [*batch, k, n])
        mm_shape = [*batch, m, n]
    else:
        lead = [ls[d] for d in lf] or [1]
        x = g.reshape(x, [*lead, k])
        w = g.reshape(w, [k, n])
        mm_shape = [*lead, n]
    dtype = np.result_type(g.dtypes[lhs], g.dtypes[rhs])
    x, w = g.cast(x, dtype), g.cast(w, dtype)
    out = _aval(eqn)
    y = g.node("MatMul", [x, w], mm_shape, dtype)
    return [g.cast(g.reshape(y, out.shape), out.dtype)]


def _window_params(eqn, x_shape):
    """(perm to put pooled dims last, NC shape, kernel, strides, pads, dilations)."""
    p = eqn.params
    if any(d != 1 for d in p["base_dilation"]):
        raise NotImplementedError(f"onnx_export: no rule for {eqn.primitive} with "
                                  f"base_dilation={p['base_dilation']}")
    rank = len(x_shape)
    pooled = [d for d in range(rank)
              if p["window_dimensions"][d] != 1 or p["window_strides"][d] != 1
              or tuple(p["padding"][d]) != (0, 0) or p["window_dilation"][d] != 1]
    if not pooled:
        pooled = [rank - 1]
    if len(pooled) > 3:
        raise NotImplementedError(f"onnx_export: no rule for {eqn.primitive} over "
                                  f"{len(pooled)} dims (ONNX pools up to 3)")
    rest = [d for d in range(rank) if d not in pooled]
    lead = [x_shape[d] for d in rest]
    # ONNX pools take (N, C, spatial...): merge the untouched dims into N and C.
    nc = [int(np.prod(lead[:-1], dtype=np.int64)), lead[-1]] if lead else [1, 1]
    pads = [tuple(p["padding"][d]) for d in pooled]
    if any(lo < 0 or hi < 0 for lo, hi in pads):
        raise NotImplementedError(f"onnx_export: no rule for {eqn.primitive} with negative "
                                  f"padding {pads}")
    return ([*rest, *pooled], nc, [int(p["window_dimensions"][d]) for d in pooled],
            [int(p["window_strides"][d]) for d in pooled],
            [lo for lo, _ in pads] + [hi for _, hi in pads],
            [int(p["window_dilation"][d]) for d in pooled], pooled)


def _pool(kind: str):
    def rule(g, eqn, a):
        x = a[0]
        xs = g.shapes[x]
        perm, nc, kernel, strides, pads, dilations, pooled = _window_params(eqn, xs)
        out = _aval(eqn)
        t = g.transpose(x, perm)
        t = g.reshape(t, [*nc, *(xs[d] for d in pooled)])
        pooled_out = [out.shape[d] for d in pooled]
        if kind == "min":
            t = g.like("Neg", [t])
        if kind in ("max", "min"):
            y = g.node("MaxPool", [t], [*nc, *pooled_out], g.dtypes[t], kernel_shape=kernel,
                       strides=strides, pads=pads, dilations=dilations)
        else:  # sum = average over the padded window x window size
            if any(d != 1 for d in dilations):
                raise NotImplementedError(f"onnx_export: no rule for {eqn.primitive} with "
                                          f"window_dilation={dilations}")
            y = g.node("AveragePool", [t], [*nc, *pooled_out], g.dtypes[t], kernel_shape=kernel,
                       strides=strides, pads=pads, count_include_pad=1)
            y = g.like("Mul", [y, g.const(int(np.prod(kernel)), g.dtypes[t])])
        if kind == "min":
            y = g.like("Neg", [y])
        y = g.reshape(y, [out.shape[d] for d in perm])
        return [g.transpose(y, _inverse(perm))]
    return rule


_rule(P.reduce_window_max_p)(_pool("max"))
_rule(P.reduce_window_min_p)(_pool("min"))
_rule(P.reduce_window_sum_p)(_pool("sum"))


@_rule(P.gather_p)
def _gather(g, eqn, a):
    """Only the jnp.take / embedding-lookup form: whole slices along one axis, ONNX Gather."""
    operand, indices = a
    dn, sizes = eqn.params["dimension_numbers"], eqn.params["slice_sizes"]
    os_, is_ = g.shapes[operand], g.shapes[indices]
    ok = (len(dn.start_index_map) == 1
          and tuple(dn.collapsed_slice_dims) == tuple(dn.start_index_map)
          and not tuple(getattr(dn, "operand_batching_dims", ()))
          and len(is_) > 0 and is_[-1] == 1)
    if ok:
        axis = dn.start_index_map[0]
        ok = all(s == (1 if d == axis else os_[d]) for d, s in enumerate(sizes))
        nb = len(is_) - 1
        want = tuple(range(axis)) + tuple(range(axis + nb, nb + len(os_) - 1))
        ok = ok and tuple(dn.offset_dims) == want
    if not ok:
        raise NotImplementedError(f"onnx_export: no rule for gather with {dn}, slice_sizes="
                                  f"{sizes} (only take-along-one-axis is supported)")
    idx = g.reshape(indices, is_[:-1])
    out = _aval(eqn)
    return [g.node("Gather", [operand, idx], out.shape, out.dtype, axis=int(axis))]


# Higher-order primitives whose body is inlined, and the param holding it.
_INLINE = {P.jit_p: "jaxpr", P.closed_call_p: "call_jaxpr", P.remat_p: "jaxpr",
           P.custom_jvp_call_p: "call_jaxpr", P.custom_vjp_call_p: "call_jaxpr"}


# --- driver ---------------------------------------------------------------------------------

def _evaluate(g: _Graph, jaxpr, consts: Sequence, args: Sequence[str]) -> list:
    jaxpr = jaxpr_pass.open_jaxpr(jaxpr)
    env: dict = {}

    def read(v) -> str:
        if isinstance(v, jcore.Literal):
            return g.const(v.val, v.aval.dtype)
        return env[v]

    for v, c in zip(jaxpr.constvars, consts):
        env[v] = g.initializer(np.asarray(c, v.aval.dtype), "const")
    for v, name in zip(jaxpr.invars, args):
        env[v] = name
    for eqn in jaxpr.eqns:
        names = [read(v) for v in eqn.invars]
        if eqn.primitive in _INLINE:
            body = eqn.params[_INLINE[eqn.primitive]]
            outs = _evaluate(g, body, jaxpr_pass.jaxpr_consts(body), names)
        else:
            rule = RULES.get(eqn.primitive)
            if rule is None:
                raise NotImplementedError(
                    f"onnx_export: no rule for {eqn.primitive} ({eqn}); add one to "
                    f"benchmarks/onnx_export.RULES")
            if eqn.primitive not in _BROADCASTING:
                names = [g.expand(n, v.aval.shape) for n, v in zip(names, eqn.invars)]
            outs = rule(g, eqn, names)
        for v, name in zip(eqn.outvars, outs):
            if not isinstance(v, jcore.DropVar):
                env[v] = name
    return [read(v) for v in jaxpr.outvars]


def _path_name(path) -> str:
    parts = []
    for key in path:
        for attr in ("key", "idx", "name"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return ".".join(["params", *parts])


@dataclasses.dataclass(frozen=True)
class Conversion:
    model: Any                 # onnx.ModelProto
    input_names: tuple         # one per leaf of the inputs (after params): x0, x1, ...
    output_names: tuple        # one per output leaf: y0, y1, ...
    out_tree: Any              # treedef of fn's output


def convert(fn: Callable, params, *inputs, opset: int = OPSET) -> Conversion:
    """Traces fn(params, *inputs) and builds the ONNX model; params become initializers."""
    _, helper, _ = _onnx()
    closed, out_shapes = jax.make_jaxpr(fn, return_shape=True)(params, *inputs)
    jaxpr = jaxpr_pass.open_jaxpr(closed)
    param_paths = jax.tree_util.tree_flatten_with_path(params)[0]
    input_leaves = jax.tree_util.tree_leaves(inputs)
    n_params = len(param_paths)
    assert len(jaxpr.invars) == n_params + len(input_leaves)

    g = _Graph()
    args, graph_inputs = [], []
    for (path, leaf), v in zip(param_paths, jaxpr.invars[:n_params]):
        args.append(g.initializer(np.asarray(leaf, v.aval.dtype), _path_name(path)))
    for i, v in enumerate(jaxpr.invars[n_params:]):
        name = g.fresh(f"x{i}")
        g.shapes[name], g.dtypes[name] = tuple(v.aval.shape), np.dtype(v.aval.dtype)
        args.append(name)
        graph_inputs.append(helper.make_tensor_value_info(
            name, helper.np_dtype_to_tensor_dtype(np.dtype(v.aval.dtype)), list(v.aval.shape)))

    results = _evaluate(g, closed, jaxpr_pass.jaxpr_consts(closed), args)
    graph_outputs, output_names = [], []
    for i, (name, v) in enumerate(zip(results, jaxpr.outvars)):
        full = g.expand(name, v.aval.shape)
        out = g.fresh(f"y{i}")
        g.nodes.append(helper.make_node("Identity", [full], [out], name=out))
        output_names.append(out)
        graph_outputs.append(helper.make_tensor_value_info(
            out, helper.np_dtype_to_tensor_dtype(np.dtype(v.aval.dtype)), list(v.aval.shape)))

    graph = helper.make_graph(g.nodes, getattr(fn, "__name__", "jax_fn"), graph_inputs,
                              graph_outputs, initializer=g.initializers)
    opsets = [helper.make_opsetid("", opset)]
    model = helper.make_model(graph, opset_imports=opsets, producer_name="alt_jax.onnx_export",
                              ir_version=helper.find_min_ir_version_for(opsets))
    return Conversion(model, tuple(args[n_params:]),
                      tuple(output_names), jax.tree_util.tree_structure(out_shapes))


def export(fn: Callable, params, *inputs, opset: int = OPSET):
    """onnx.ModelProto computing fn(params, *inputs) with params baked in as initializers."""
    return convert(fn, params, *inputs, opset=opset).model
