"""alt_jax/views.py: a value read as a strided view of the value it was sliced, split,
transposed or reshaped from. Each view is checked element by element: the view's offset
and strides over its base's buffer must give exactly the value the equations compute."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend import core as jcore

from alt_jax import jaxpr_pass, views
from alt_jax.row_program import Uses


def _evaluate(flat, args) -> dict:
    env = dict(zip(flat.invars, args))
    for e in flat.eqns:
        ins = [v.val if isinstance(v, jcore.Literal) else env[v] for v in e.invars]
        env.update(zip(e.outvars, jaxpr_pass.bind_eqn(e, ins)))
    return env


def _read(base_value, view) -> np.ndarray:
    """The elements the kernel would read: base's buffer at view.offset through strides."""
    flat = np.ascontiguousarray(np.asarray(base_value)).ravel()
    shape = view.var.aval.shape
    idx = view.offset + sum(np.arange(n).reshape([-1 if a == i else 1 for a in range(len(shape))])
                            * s for i, (n, s) in enumerate(zip(shape, view.strides)))
    return flat[np.broadcast_to(idx, shape)]


def _resolve_last(fn, x):
    """fn(x) ends in one sin of a view; resolve that view with the sin as the kernel."""
    flat = jaxpr_pass.open_jaxpr(jax.make_jaxpr(fn)(x))
    consumer = flat.eqns[-1]
    assert consumer.primitive.name == "sin"
    var = consumer.invars[0]
    seen, taken = views.resolve([var], Uses.of(flat), [consumer])
    return flat, var, seen[var], taken


def _random_chain(rng):
    """A random chain of slices, splits, transposes, reshapes and squeezes."""
    shape = tuple(int(n) for n in rng.choice([1, 2, 3, 4, 6], size=int(rng.integers(2, 5))))
    ops = []
    cur = list(shape)
    for _ in range(int(rng.integers(2, 7))):
        kind = rng.choice(["slice", "split", "transpose", "reshape", "squeeze"])
        if kind == "slice":
            start = [int(rng.integers(0, n)) for n in cur]
            limit = [int(rng.integers(s + 1, n + 1)) for s, n in zip(start, cur)]
            ops.append(("slice", start, limit))
            cur = [b - a for a, b in zip(start, limit)]
        elif kind == "split":
            axis = int(rng.integers(0, len(cur)))
            if cur[axis] < 2:
                continue
            cut = int(rng.integers(1, cur[axis]))
            pick = int(rng.integers(0, 2))
            ops.append(("split", axis, cut, pick))
            cur[axis] = cut if pick == 0 else cur[axis] - cut
        elif kind == "transpose":
            perm = [int(a) for a in rng.permutation(len(cur))]
            ops.append(("transpose", perm))
            cur = [cur[a] for a in perm]
        elif kind == "squeeze":
            ones = [a for a, n in enumerate(cur) if n == 1]
            if not ones or len(cur) == 1:
                continue
            ops.append(("squeeze", ones[:1]))
            cur = [n for a, n in enumerate(cur) if a != ones[0]]
        else:
            if rng.random() < 0.7 and len(cur) >= 2:  # merge two neighbours
                a = int(rng.integers(0, len(cur) - 1))
                new = cur[:a] + [cur[a] * cur[a + 1]] + cur[a + 2:]
            else:  # split one axis into two factors, or add a unit axis
                a = int(rng.integers(0, len(cur)))
                f = next((f for f in (2, 3) if cur[a] % f == 0), 1)
                new = cur[:a] + [f, cur[a] // f] + cur[a + 1:]
            ops.append(("reshape", tuple(new)))
            cur = new

    def fn(x):
        for op in ops:
            if op[0] == "slice":
                x = jax.lax.slice(x, op[1], op[2])
            elif op[0] == "split":
                _, axis, cut, pick = op
                x = jnp.split(x, [cut], axis=axis)[pick]
            elif op[0] == "transpose":
                x = jnp.transpose(x, op[1])
            elif op[0] == "squeeze":
                x = jnp.squeeze(x, op[1])
            else:
                x = x.reshape(op[1])
        return jnp.sin(x)

    return fn, shape, ops


@pytest.mark.parametrize("seed", range(100))
def test_random_chains_read_what_the_equations_compute(seed):
    rng = np.random.default_rng(seed)
    fn, shape, ops = _random_chain(rng)
    x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    flat, var, view, taken = _resolve_last(fn, x)
    env = _evaluate(flat, [x])
    base_value = x if view.base is flat.invars[0] else env[view.base]
    np.testing.assert_array_equal(_read(base_value, view), np.asarray(env[var]), err_msg=str(ops))
    # the equations taken are exactly those from the base to the value, nothing else
    assert {id(e) for e in taken} == {id(e) for e in view.eqns}
    produced = {v for e in view.eqns for v in e.outvars}
    assert view.base not in produced and (var in produced or view.base is var)


def test_a_split_reshaped_into_heads_is_read_from_the_projection():
    """GPT-2's q, k, v: a (1, 5, 3 * 8) projection split three ways and each reshaped to
    (1, 5, 2 heads, 4): all three read the projection at offsets 0, 8, 16."""
    x = jnp.arange(120, dtype=jnp.float32).reshape(1, 5, 24)

    def fn(x):
        q, k, v = jnp.split(x, 3, axis=-1)
        return [jnp.sin(t.reshape(1, 5, 2, 4)) for t in (q, k, v)]

    flat = jaxpr_pass.open_jaxpr(jax.make_jaxpr(fn)(x))
    sins = [e for e in flat.eqns if e.primitive.name == "sin"]
    vars_ = [e.invars[0] for e in sins]
    seen, taken = views.resolve(vars_, Uses.of(flat), sins)
    assert [seen[v].offset for v in vars_] == [0, 8, 16]
    assert all(seen[v].base is flat.invars[0] for v in vars_)
    assert all(seen[v].strides[1:] == (24, 4, 1) for v in vars_)  # axis 0 has size 1
    assert sorted(e.primitive.name for e in taken) == ["reshape"] * 3 + ["split"]


def test_a_piece_read_outside_keeps_its_split_in_xla():
    """When a split's piece is also a program output, the split cannot belong to the kernel:
    the views stop at the pieces (the reshapes alone are taken)."""
    x = jnp.ones((1, 5, 24), jnp.float32)

    def fn(x):
        q, k, v = jnp.split(x, 3, axis=-1)
        return jnp.sin(q.reshape(1, 5, 2, 4)), k

    flat = jaxpr_pass.open_jaxpr(jax.make_jaxpr(fn)(x))
    sin = next(e for e in flat.eqns if e.primitive.name == "sin")
    seen, taken = views.resolve([sin.invars[0]], Uses.of(flat), [sin])
    view = seen[sin.invars[0]]
    assert view.base.aval.shape == (1, 5, 8) and view.offset == 0
    assert [e.primitive.name for e in taken] == ["reshape"]


def test_a_reshape_that_would_copy_ends_the_view():
    """Merging a sliced axis with the next one is no stride: the view starts after it."""
    x = jnp.arange(48, dtype=jnp.float32).reshape(4, 12)

    def fn(x):
        return jnp.sin(x[:, :6].reshape(24).reshape(4, 6))

    flat, var, view, taken = _resolve_last(fn, x)
    assert view.base.aval.shape == (24,)
    env = _evaluate(flat, [x])
    np.testing.assert_array_equal(_read(env[view.base], view), np.asarray(env[var]))
    assert [e.primitive.name for e in taken] == ["reshape"]
