"""optimize(): trace -> plan -> rewrite -> jit, cached per input signature.

Entry points: optimize (decorator or wrapper), Optimized (.explain, .plan_for, .cache_info).
"""
from __future__ import annotations

import functools
import threading
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np

from alt_jax import config, device, jaxpr_pass, planner, runtime
from alt_jax.records import RecordStore


PLATFORMS = (None, "cpu", "cuda")  # None: where the arguments live


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
                 rownorm: bool = True, platform: Optional[str] = None):
        if platform not in PLATFORMS:
            raise ValueError(f"platform={platform!r}: choose one of {PLATFORMS}")
        self.fn = fn
        self.platform = platform
        self._init_options = dict(records=records, fallback=fallback, min_flops=min_flops,
                                  cache=cache, verbose=verbose, families=families, fuse=fuse,
                                  propagate=propagate, pack_weights=pack_weights,
                                  layout_plan=layout_plan, attention=attention,
                                  rownorm=rownorm, platform=platform)
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
        self._jitted = jax.jit(functools.partial(self._rewrite_and_run, self.options, "cpu"),
                               static_argnums=self.static_argnums)
        self._on_gpu: dict = {}  # device.CudaTarget -> (PlanOptions, jitted)
        functools.update_wrapper(self, fn)

    # -- where the kernels run -------------------------------------------------------------
    def _gpu(self, target):
        """(options, jitted) planning with the CUDA families for target: kernels built by
        nvcc into the CUDA cache; no CPU-only passes (weight packing, layout propagation,
        the attention and row-wise kernels); tuning records of that GPU."""
        with self._lock:
            if target not in self._on_gpu:
                from alt_jax import cuda_build
                from alt_jax.ops import registry

                o = self.options
                options = planner.PlanOptions(
                    cache=cuda_build.cache_for(target, o.cache.cache_dir), records=o.records,
                    fallback=o.fallback, min_flops=o.min_flops,
                    families=registry.cuda_family_table(), fuse=o.fuse, propagate=False,
                    pack_weights=False, layout_plan=None, attention=False, rownorm=False)
                jitted = jax.jit(functools.partial(self._rewrite_and_run, options, target),
                                 static_argnums=self.static_argnums)
                self._on_gpu[target] = (options, jitted)
            return self._on_gpu[target]

    def _target(self, args, kwargs):
        """"cpu", or the device.CudaTarget of the GPU the arguments live on (the default
        device's when none is committed to one; optimize(platform="cuda") forces a GPU
        plan, for $ALT_JAX_CUDA_ARCH, default sm_90, when no GPU is here)."""
        if self.platform == "cpu" or (self.platform is None and device.jax_gpu() is None):
            return "cpu"  # (no per-call look at the arguments where no GPU exists)
        dev = None
        for x in jax.tree_util.tree_leaves((args, kwargs)):
            if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer):
                dev = next(iter(x.devices()))
                break
        dev = dev or jax.devices()[0]  # traced inside another jit: the default device's
        if dev.platform == "gpu":
            return device.CudaTarget.of_jax_device(dev)
        if self.platform == "cuda":
            return device.CudaTarget.for_arch(config.get("cuda_arch") or "sm_90")
        return "cpu"

    def plan_options(self, *args, **kwargs) -> planner.PlanOptions:
        """The PlanOptions a call with these arguments plans with (the CPU's, or a GPU's)."""
        target = self._target(args, kwargs)
        return self.options if target == "cpu" else self._gpu(target)[0]

    def _jitted_for(self, args, kwargs):
        target = self._target(args, kwargs)
        return target, self._jitted if target == "cpu" else self._gpu(target)[1]

    def _key(self, args, kwargs):
        statics = tuple(args[i] for i in self.static_argnums if i < len(args))
        dynamic = tuple(a for i, a in enumerate(args) if i not in self.static_argnums)
        leaves, tree = jax.tree_util.tree_flatten((dynamic, kwargs))
        return statics, tree, tuple(_leaf_signature(x) for x in leaves)

    def _rewrite_and_run(self, options, target, *args, **kwargs):
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
            plan = planner.make_plan(closed, options)
            self._plans[(target, self._key(args, kwargs))] = plan
        if self.verbose:
            print(plan)
        outs = plan.finish(jaxpr_pass.evaluate(plan.jaxpr, jaxpr_pass.jaxpr_consts(plan.jaxpr),
                                               leaves, plan.replacements))
        return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(out_shape), outs)

    # -- public ----------------------------------------------------------------------------
    def __call__(self, *args, **kwargs):
        return self._jitted_for(args, kwargs)[1](*args, **kwargs)

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
        target, jitted = self._jitted_for(args, kwargs)
        key = (target, self._key(args, kwargs))
        if key not in self._plans:
            jitted.trace(*args, **kwargs)
        return self._plans[key]

    def lower(self, *args, **kwargs):
        """The jitted program lowered for these arguments (jax's Lowered); on the platform
        they call for, or the GPU's with optimize(platform="cuda") on a machine without
        one (StableHLO to inspect: the kernels are custom calls to alt_jax_cuda_kernel)."""
        target, jitted = self._jitted_for(args, kwargs)
        traced = jitted.trace(*args, **kwargs)
        return traced.lower(lowering_platforms=("cuda",)) if target != "cpu" else traced.lower()

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
    it is worth); platform (None: CUDA kernels when the arguments live on a GPU, CPU kernels
    otherwise; "cpu" or "cuda" to force one). For weights passed as arguments,
    `optimized.prepare(params)` packs them once (see Optimized.prepare).
    """
    if fn is None:
        return functools.partial(optimize, **options)
    return Optimized(fn, **options)
