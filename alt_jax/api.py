"""optimize(): trace -> plan -> rewrite -> jit, cached per input signature.

Entry points: optimize (decorator or wrapper), Optimized (.explain, .plan_for, .cache_info).
"""
from __future__ import annotations

import functools
import threading
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np

from alt_jax import config, jaxpr_pass, planner, runtime
from alt_jax.records import RecordStore


def _leaf_signature(x) -> tuple:
    aval = jax.typeof(x)
    return (tuple(aval.shape), str(aval.dtype), bool(getattr(aval, "weak_type", False)))


class Optimized:
    """A drop-in replacement for fn whose convs and matmuls run on generated kernels.

    It is a jax.jit whose traced body plans and rewrites fn: jax's own per-signature cache
    (and its C++ dispatch path, ~10 us cheaper a call than any Python-side cache) decides
    when to retrace, and each trace records its plan here for explain().
    """

    def __init__(self, fn: Callable, *, records=None, fallback: str = "warn",
                 min_flops: Optional[int] = None, cache: Optional[runtime.KernelCache] = None,
                 static_argnums: Sequence[int] = (), verbose: bool = False,
                 families: Optional[dict] = None, fuse: bool = True, propagate: bool = True,
                 pack_weights: bool = True, layout_plan=None, attention: bool = True,
                 rownorm: bool = True):
        self.fn = fn
        self._init_options = dict(records=records, fallback=fallback, min_flops=min_flops,
                                  cache=cache, verbose=verbose, families=families, fuse=fuse,
                                  propagate=propagate, pack_weights=pack_weights,
                                  layout_plan=layout_plan, attention=attention,
                                  rownorm=rownorm)
        self.static_argnums = tuple(sorted(int(i) for i in static_argnums))
        if records is None:
            records = config.get("records")  # None, or the path in $ALT_JAX_RECORDS
        elif records is False:
            records = None                   # explicitly untuned, whatever the environment
        if min_flops is None:
            min_flops = config.get("min_flops")
        self.options = planner.PlanOptions(
            cache=cache or runtime.default_cache(),
            records=RecordStore(records) if isinstance(records, (str, bytes)) or
            hasattr(records, "__fspath__") else records,
            fallback=fallback,
            min_flops=planner.DEFAULT_MIN_FLOPS if min_flops is None else int(min_flops),
            families=families, fuse=fuse, propagate=propagate, pack_weights=pack_weights,
            layout_plan=layout_plan, attention=attention, rownorm=rownorm)
        self.verbose = verbose
        self._plans: dict = {}
        self._lock = threading.Lock()
        self.traces = 0  # how many signatures were traced and planned
        self._jitted = jax.jit(self._rewrite_and_run, static_argnums=self.static_argnums)
        functools.update_wrapper(self, fn)

    def _key(self, args, kwargs):
        statics = tuple(args[i] for i in self.static_argnums if i < len(args))
        dynamic = tuple(a for i, a in enumerate(args) if i not in self.static_argnums)
        leaves, tree = jax.tree_util.tree_flatten((dynamic, kwargs))
        return statics, tree, tuple(_leaf_signature(x) for x in leaves)

    def _rewrite_and_run(self, *args, **kwargs):
        """Runs while jax.jit traces a new signature: trace fn, plan, evaluate rewritten."""
        statics = {i: args[i] for i in self.static_argnums if i < len(args)}
        dynamic = tuple(a for i, a in enumerate(args) if i not in statics)
        leaves, in_tree = jax.tree_util.tree_flatten((dynamic, kwargs))

        def flat_fn(*flat):
            dyn, kw = jax.tree_util.tree_unflatten(in_tree, flat)
            it = iter(dyn)
            full = [statics[i] if i in statics else next(it)
                    for i in range(len(dyn) + len(statics))]
            return self.fn(*full, **kw)

        specs = [jax.ShapeDtypeStruct(np.shape(x), jax.typeof(x).dtype,
                                      weak_type=getattr(jax.typeof(x), "weak_type", False))
                 for x in leaves]
        closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(*specs)
        with self._lock:
            self.traces += 1
            plan = planner.make_plan(closed, self.options)
            self._plans[self._key(args, kwargs)] = plan
        if self.verbose:
            print(plan)
        outs = plan.finish(jaxpr_pass.evaluate(plan.jaxpr, jaxpr_pass.jaxpr_consts(plan.jaxpr),
                                               leaves, plan.replacements))
        return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(out_shape), outs)

    # -- public ----------------------------------------------------------------------------
    def __call__(self, *args, **kwargs):
        return self._jitted(*args, **kwargs)

    def prepare(self, *leading_args) -> "Optimized":
        """fn with its leading arguments (typically the params of an apply(params, x)) bound
        as constants: their weights are packed into the kernels' layouts once, when the
        returned function plans its first signature, and the packed buffers are reused by
        every later call. Call it again with new params to repack."""
        if self.static_argnums:
            raise ValueError("prepare() binds leading arguments; it does not combine with "
                             f"static_argnums={self.static_argnums}")
        return Optimized(functools.partial(self.fn, *leading_args), **self._init_options)

    def plan_for(self, *args, **kwargs) -> planner.Plan:
        """The plan for this input signature (traces and builds on first use)."""
        key = self._key(args, kwargs)
        if key not in self._plans:
            self._jitted.trace(*args, **kwargs)
        return self._plans[key]

    def explain(self, *args, **kwargs) -> planner.Plan:
        """Prints and returns the plan: each op, its kernel, layout and knobs, or why XLA."""
        plan = self.plan_for(*args, **kwargs)
        print(plan)
        return plan

    def cache_info(self) -> dict:
        return {"signatures": len(self._plans), "traces": self.traces}


def optimize(fn: Optional[Callable] = None, **options) -> Any:
    """Rewrites fn's conv_general_dilated and dot_general into generated-kernel calls.

    Use as @optimize, @optimize(records=..., fallback="silent"), or optimize(fn, ...).
    Options: records (path or RecordStore of tuning records; default $ALT_JAX_RECORDS;
    False: heuristic knobs only),
    fallback ("warn" | "silent" | "error": what happens when an op cannot get a kernel),
    min_flops (ops below stay in XLA), cache (a runtime.KernelCache), static_argnums,
    verbose (print the plan when a signature is first planned); layout_plan (the layout
    each conv writes, {"eqn 17": "NC8"} or one name for all, from propagate.LAYOUT_CHOICES;
    default: the graph tuner's plan for this program in the records, else channels-last);
    fuse, propagate, pack_weights, attention, rownorm (True by default: fused epilogues,
    channels-last layout propagation, constant weights packed once, softmax(Q K^T) V as one
    kernel, a layer norm / RMS norm / lone softmax as one kernel; switch one off to see what
    it is worth). For weights passed as
    arguments, `optimized.prepare(params)` packs them once (see Optimized.prepare).
    """
    if fn is None:
        return functools.partial(optimize, **options)
    return Optimized(fn, **options)
