"""What the tuner sees of a program (planner.list_workloads: no kernels built) and how a
tuning record then decides the family and knobs of an op (planner._choose_tuned).

Entry points: pytest tests/test_workloads.py.
"""
from __future__ import annotations

import dataclasses
import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import alt_jax
from alt_jax import device, records, runtime
from alt_jax.ops import conv2d, winograd


def _block(x, w3, w1):
    """Two identical 3x3 convs (64 channels at 8x8: Winograd can run them, its heuristic
    prefers the direct conv there) and a 1x1 conv, each with a relu."""
    dn = ("NHWC", "HWIO", "NHWC")
    conv = lambda x, w: lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=dn)
    y = jax.nn.relu(conv(x, w3))
    y = jax.nn.relu(conv(y, w3))
    return jax.nn.relu(conv(y, w1))


def _arrays():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 8, 8, 64)).astype(np.float32)
    w3 = (rng.standard_normal((3, 3, 64, 64)) / 24).astype(np.float32)
    w1 = (rng.standard_normal((1, 1, 64, 64)) / 8).astype(np.float32)
    return x, w3, w1


def _workloads(cache):
    from tuner.tune import workloads_of

    x, w3, w1 = _arrays()
    fn = functools.partial(_block, w3=jnp.asarray(w3), w1=jnp.asarray(w1))
    return workloads_of(fn, x, cache=cache, min_flops=0)


def test_list_workloads_dedupes_counts_and_builds_nothing(tmp_path):
    cache = runtime.KernelCache(tmp_path / "k")
    ws = _workloads(cache)
    assert cache.builds == 0
    assert [w.multiplicity for w in ws] == [2, 1]
    w3, w1 = ws
    # both families can compute the 3x3; the untuned planner's choice comes first
    assert [name for name, _ in w3.candidates] == ["conv2d", "winograd"]
    assert w3.preferred == "conv2d" and w3.epilogue == "relu"
    assert all(spec.prepacked for _, spec in w3.candidates)  # constant weights
    assert [name for name, _ in w1.candidates] == ["conv2d"]
    assert w3.op_key == records.workload_key("conv2d", w3.spec_of("conv2d"))
    # the reference is the equation and its epilogue
    x, wt, _ = _arrays()
    want = jax.nn.relu(lax.conv_general_dilated(x, wt, (1, 1), "SAME",
                                                dimension_numbers=("NHWC", "HWIO", "NHWC")))
    np.testing.assert_allclose(np.asarray(w3.reference([x, wt])), want, rtol=1e-6, atol=1e-6)


def _record(store, w, family, knobs, t, **kw):
    store.append(records.make_record(family, w.spec_of(family), knobs, device.fingerprint(),
                                     [t, t, t], op_key=w.op_key, **kw))


def test_the_fastest_record_of_any_family_decides(tmp_path, kernel_cache):
    ws = _workloads(kernel_cache)
    w3 = ws[0]
    store = records.RecordStore(tmp_path / "r.jsonl")
    isa = device.detect_isa()
    wk = winograd.FAMILY.default_knobs(w3.spec_of("winograd"), isa)
    ck = dataclasses.replace(conv2d.FAMILY.default_knobs(w3.spec_of("conv2d"), isa), ow_tile=4)
    _record(store, w3, "conv2d", ck, 2e-4)
    _record(store, w3, "winograd", wk, 1e-4)
    x, w3a, w1a = _arrays()
    fn = functools.partial(_block, w3=jnp.asarray(w3a), w1=jnp.asarray(w1a))
    opt = alt_jax.optimize(fn, cache=kernel_cache, min_flops=0, records=store)
    plan = opt.plan_for(x)
    d3 = [d for d in plan.rewritten if "3,3,64,64" in d.signature]
    assert [d.family for d in d3] == ["winograd", "winograd"]
    assert all(d.knobs_from == "tuned" and d.tuned_time_s == 1e-4 for d in d3)
    assert "tuned, measured 0.100 ms" in str(plan)
    (d1,) = [d for d in plan.rewritten if "1,1,64,64" in d.signature]
    assert d1.knobs_from == "heuristic"
    np.testing.assert_allclose(np.asarray(opt(x)), np.asarray(jax.jit(fn)(x)), rtol=1e-4,
                               atol=1e-4)
    # a selection sees only its runs: the conv2d record alone decides under mode=loop_only
    _record(store, w3, "conv2d", ck, 3e-4, mode="loop_only")
    loop_only = records.RecordStore(store.path, {"mode": "loop_only"})
    plan = alt_jax.optimize(fn, cache=kernel_cache, min_flops=0, records=loop_only).plan_for(x)
    assert {d.family for d in plan.rewritten if "3,3,64,64" in d.signature} == {"conv2d"}


def test_a_record_for_another_spec_is_not_used(tmp_path, kernel_cache):
    """A record under this op's key whose workload is not the spec the planner derives now
    (here: the unfused conv) is refused with a warning; the heuristic decides."""
    ws = _workloads(kernel_cache)
    w3 = ws[0]
    spec = dataclasses.replace(w3.spec_of("conv2d"), epilogue=type(w3.spec_of("conv2d").epilogue)())
    knobs = conv2d.FAMILY.default_knobs(spec, device.detect_isa())
    store = records.RecordStore(tmp_path / "r.jsonl")
    store.append(records.make_record("conv2d", spec, knobs, device.fingerprint(), [1e-4],
                                     op_key=w3.op_key))
    x, w3a, w1a = _arrays()
    fn = functools.partial(_block, w3=jnp.asarray(w3a), w1=jnp.asarray(w1a))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan = alt_jax.optimize(fn, cache=kernel_cache, min_flops=0, records=store).plan_for(x)
    assert all(d.knobs_from == "heuristic" for d in plan.rewritten)
    assert any("not this op's spec" in str(c.message) for c in caught)
