"""optimize(): trace -> plan -> rewrite -> jit, cached per input signature.

Entry points: optimize (decorator or wrapper), Optimized (.explain, .plan_for, .cache_info).
"""
from __future__ import annotations

import dataclasses
import functools
import threading
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np

from alt_jax import config, jaxpr_pass, planner, runtime
from alt_jax.records import RecordStore


@dataclasses.dataclass
class _Entry:
    plan: planner.Plan
    call: Callable          # jitted flat function
    out_tree: Any


def _leaf_signature(x) -> tuple:
    aval = jax.typeof(x)
    return (tuple(aval.shape), str(aval.dtype), bool(getattr(aval, "weak_type", False)))


class Optimized:
    """A drop-in replacement for fn whose convs and matmuls run on generated kernels."""

    def __init__(self, fn: Callable, *, records=None, fallback: str = "warn",
                 min_flops: Optional[int] = None, cache: Optional[runtime.KernelCache] = None,
                 static_argnums: Sequence[int] = (), verbose: bool = False,
                 families: Optional[dict] = None):
        self.fn = fn
        self.static_argnums = tuple(sorted(int(i) for i in static_argnums))
        records = records if records is not None else config.get("records")
        if min_flops is None:
            min_flops = config.get("min_flops")
        self.options = planner.PlanOptions(
            cache=cache or runtime.default_cache(),
            records=RecordStore(records) if isinstance(records, (str, bytes)) or
            hasattr(records, "__fspath__") else records,
            fallback=fallback,
            min_flops=planner.DEFAULT_MIN_FLOPS if min_flops is None else int(min_flops),
            families=families)
        self.verbose = verbose
        self._entries: dict = {}
        self._lock = threading.Lock()
        self.traces = 0  # how many signatures were traced and planned
        functools.update_wrapper(self, fn)

    # -- signature cache -------------------------------------------------------------------
    def _split(self, args, kwargs):
        statics = tuple(args[i] for i in self.static_argnums if i < len(args))
        dynamic = tuple(a for i, a in enumerate(args) if i not in self.static_argnums)
        return statics, dynamic

    def _key(self, args, kwargs):
        statics, dynamic = self._split(args, kwargs)
        leaves, tree = jax.tree_util.tree_flatten((dynamic, kwargs))
        return (statics, tree, tuple(_leaf_signature(x) for x in leaves)), leaves

    def _entry(self, args, kwargs) -> tuple[_Entry, list]:
        key, leaves = self._key(args, kwargs)
        entry = self._entries.get(key)
        if entry is None:
            with self._lock:
                entry = self._entries.get(key)
                if entry is None:
                    entry = self._build(args, kwargs)
                    self._entries[key] = entry
        return entry, leaves

    def _build(self, args, kwargs) -> _Entry:
        self.traces += 1
        statics, dynamic = self._split(args, kwargs)
        leaves, in_tree = jax.tree_util.tree_flatten((dynamic, kwargs))

        def flat_fn(*flat):
            dyn, kw = jax.tree_util.tree_unflatten(in_tree, flat)
            full, it = [], iter(dyn)
            for i in range(len(dyn) + len(statics)):
                full.append(statics[self.static_argnums.index(i)]
                            if i in self.static_argnums else next(it))
            return self.fn(*full, **kw)

        specs = [jax.ShapeDtypeStruct(np.shape(x), jax.typeof(x).dtype,
                                      weak_type=getattr(jax.typeof(x), "weak_type", False))
                 for x in leaves]
        closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(*specs)
        out_tree = jax.tree_util.tree_structure(out_shape)
        plan = planner.make_plan(closed, self.options)
        if self.verbose:
            print(plan)
        consts = jaxpr_pass._consts(closed)
        replacements = plan.replacements

        def rewritten(*flat):
            return jaxpr_pass.evaluate(closed, consts, flat, replacements)

        return _Entry(plan, jax.jit(rewritten), out_tree)

    # -- public ----------------------------------------------------------------------------
    def __call__(self, *args, **kwargs):
        entry, leaves = self._entry(args, kwargs)
        outs = entry.call(*leaves)
        return jax.tree_util.tree_unflatten(entry.out_tree, outs)

    def plan_for(self, *args, **kwargs) -> planner.Plan:
        """The plan for this input signature (traces and builds on first use)."""
        return self._entry(args, kwargs)[0].plan

    def explain(self, *args, **kwargs) -> planner.Plan:
        """Prints and returns the plan: each op, its kernel, layout and knobs, or why XLA."""
        plan = self.plan_for(*args, **kwargs)
        print(plan)
        return plan

    def cache_info(self) -> dict:
        return {"signatures": len(self._entries), "traces": self.traces}


def optimize(fn: Optional[Callable] = None, **options) -> Any:
    """Rewrites fn's conv_general_dilated and dot_general into generated-kernel calls.

    Use as @optimize, @optimize(records=..., fallback="silent"), or optimize(fn, ...).
    Options: records (path or RecordStore of tuning records; default $ALT_JAX_RECORDS),
    fallback ("warn" | "silent" | "error": what happens when an op cannot get a kernel),
    min_flops (ops below stay in XLA), cache (a runtime.KernelCache), static_argnums,
    verbose (print the plan when a signature is first planned).
    """
    if fn is None:
        return functools.partial(optimize, **options)
    return Optimized(fn, **options)
