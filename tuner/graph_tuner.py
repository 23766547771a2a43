"""The graph level of the joint tuner: the layout every conv writes, chosen over the whole
program so that kernel time plus conversion time is lowest (ALT, EuroSys '23: the layout
one kernel prefers can cost its consumer a conversion; op by op, nobody pays for it).

Entry points: tune_layouts(fn, *args, records, ...) -> LayoutTuneResult (stored beside the
records, replayed by alt_jax.optimize(records=...)); build_problem(closed, options, ...).

How a program becomes a min-sum problem (graph_tuner_solve):
  * a variable per 2-D conv: the layout it writes (propagate.LAYOUT_CHOICES: channels-last,
    N C/8 H W 8c, N C/16 H W 16c, and the program's own layout), distinct layouts only;
  * layout propagation (alt_jax.propagate) says which conv's layout each value carries
    (its source) and where a consumer needs a conversion (a site: an equation, a kernel's
    lhs or fused residual, a program output); a site's cost depends on the layouts of the
    sources of the values it reads, and, for a kernel, on the layout it writes itself;
  * a factor per site over those variables: for each combination, the plan is propagated
    with just those choices and the site's cost read off: the measured time of the kernel
    the planner would build there (its tuning record's median when it has one, else its
    heuristic knobs measured now, cold weights, like the op tuner measures) plus the
    measured time of each conversion the site needs (a jitted jnp conversion, timed).
The solver is exact on chains (DP) and on the small-width graphs of residual and
concatenation blocks (bucket elimination), and otherwise never worse than today's rule.

The model is a sum of kernels timed one by one; in the program a kernel meets the caches
its neighbours leave, and the sum can rank plans differently (MobileNetV2 here: modelled
7% under the fixed rule, measured 3% over it). So the plan is confirmed the way the op
tuner confirms a kernel: the program under the plan and under the fixed rule run in
interleaved rounds, and the plan is kept only if its median ratio beats the fixed rule by
CONFIRM_MARGIN; otherwise the fixed rule is what is stored.
"""
from __future__ import annotations

import dataclasses
import itertools
import statistics
import time
from typing import Callable

import numpy as np

from tuner import graph_tuner_solve as solve_mod

DEFAULT_CHOICES = ("NHWC", "NC8", "NC16", "logical")
FIXED_RULE = "NHWC"
CONFIRM_MARGIN = 0.02  # the measured gain a plan must show over the fixed rule to be kept
CONFIRM_ROUNDS = 21


@dataclasses.dataclass(frozen=True)
class LayoutTuneResult:
    plan: dict            # "eqn 17" -> layout choice, every 2-D conv
    cost_s: float         # the model's kernel + conversion time of plan
    fixed_cost_s: float   # the same for the fixed rule (every conv channels-last)
    method: str
    exact: bool
    layouts: dict         # "eqn 17" -> the layout written, e.g. "N C/8 H W 8c"
    conversion_costs: dict  # "shape src -> dst" -> measured seconds
    kernels_measured: int
    seconds: float
    # per kernel site, its cost with every variable it depends on at one choice (kernel +
    # the conversions there): the per-layer comparison of the layouts
    uniform: dict = dataclasses.field(default_factory=dict)
    # the confirmation in the program: median over rounds of t(fixed rule) / t(solved plan),
    # and whether that plan was kept (False: `plan` is the fixed rule); None when not run
    confirmed_ratio: float | None = None
    solved_plan: dict | None = None  # the solver's plan, when the fixed rule replaced it

    def entry(self) -> dict:
        return {"plan": self.plan, "cost_s": self.cost_s, "fixed_cost_s": self.fixed_cost_s,
                "method": self.method, "exact": self.exact, "layouts": self.layouts,
                "conversion_costs": self.conversion_costs, "timestamp": time.time(),
                "confirmed_ratio": self.confirmed_ratio, "solved_plan": self.solved_plan}


def time_conversion(c, rounds: int = 15) -> float:
    """Median seconds of one jitted conversion of a value of c's shape (src -> dst)."""
    import jax

    from alt_jax import propagate

    shape = c.src.physical_shape if c.src is not None else c.shape
    x = jax.device_put(np.random.default_rng(0).standard_normal(shape).astype(np.float32))
    f = jax.jit(lambda x: propagate.convert(x, c.src, c.dst))
    f(x).block_until_ready()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        f(x).block_until_ready()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


class _Costs:
    """Kernel and conversion times, each measured once."""

    def __init__(self, options, measurer, time_conv: Callable):
        self.options, self.measurer, self.time_conv = options, measurer, time_conv
        self.kernels: dict = {}
        self.conversions: dict = {}

    def conversion(self, c) -> float:
        key = str(c)  # what explain() prints, and looks the cost up by
        if key not in self.conversions:
            self.conversions[key] = self.time_conv(c)
        return self.conversions[key]

    def kernel(self, eqn, where, refine, layouts, options) -> float:
        from alt_jax import planner, records

        decision, build = planner._choose(eqn, where, options, refine)
        if build is None:  # stays in XLA under these layouts: priced at 1 GFLOP/s
            return max(decision.flops, 1) / 1e9
        family, _ = build
        key = (family.name, records.workload_key(family.name, decision.spec),
               repr(decision.knobs))
        if key not in self.kernels:
            if decision.tuned_time_s is not None:
                self.kernels[key] = decision.tuned_time_s
            else:
                w = planner._workload_of(where, eqn, refine, options, layouts)
                (result,) = self.measurer(w, [(family, decision.spec, decision.knobs)], None)
                if result.status != "ok":
                    raise RuntimeError(f"graph tuner: {family.name} kernel for {where} "
                                       f"{decision.signature} under layouts "
                                       f"{decision.layouts}: {result.status} {result.error}")
                self.kernels[key] = statistics.median(result.times_s)
        return self.kernels[key]


def build_problem(closed, options, costs: _Costs, choices=DEFAULT_CHOICES):
    """(Problem, anchors {where: eqn}, start choice) for a traced program (see the module
    docstring). options: planner.PlanOptions."""
    from alt_jax import jaxpr_pass, planner, propagate

    def program_for(plan: dict):
        key = frozenset(plan.items())
        if key not in programs:
            programs[key] = planner._program(closed, dataclasses.replace(
                options, layout_plan=dict(plan)), flat=flat, memo=memo)
        return programs[key]

    programs: dict = {}
    memo: dict = {}  # (id(eqn), read, write) -> whether a family takes it
    flat = jaxpr_pass.inline_calls(closed)  # one inlining: equations keep their identity
    base = program_for({})
    eqns = jaxpr_pass.open_jaxpr(base.flat).eqns
    where_of = {id(e): f"eqn {i}" for i, e in enumerate(eqns)}
    anchors = {where_of[k]: eqn for k, (eqn, _) in base.groups.items()
               if planner._kernel_layouts(eqn, None, None) is not None}
    domains = {}
    for where, eqn in anchors.items():
        seen, names = set(), []
        for c in choices:
            lay = propagate.describe(propagate.choice_layout(eqn, c))
            if lay not in seen:
                seen.add(lay)
                names.append(c)
        domains[where] = tuple(names)

    def site_vars(site) -> tuple:
        vs = {where_of[base.prop.source[v]] for v in base.prop.site_vars[site]
              if v in base.prop.source}
        if site in base.groups and where_of[site] in anchors:
            vs.add(where_of[site])
        return tuple(sorted(vs & set(anchors), key=lambda w: int(w.split()[1])))

    def refine_at(program, site):
        return next(refine for _, eqn, refine in program.ops(options) if id(eqn) == site)

    factors = []
    for site in base.prop.site_vars:
        variables = site_vars(site)
        is_kernel = site in base.groups and where_of[site] in anchors
        if not variables:
            continue
        table = {}
        for values in itertools.product(*(domains[v] for v in variables)):
            # every program shares `flat`: a site is the same equation (id) in each
            program = program_for(dict(zip(variables, values)))
            cost = sum(costs.conversion(c) for c in program.prop.conversions if c.site == site)
            if is_kernel:
                eqn, _ = base.groups[site]
                layouts = (program.prop.kernel_in[site], program.prop.kernel_out[site])
                cost += costs.kernel(eqn, where_of[site], refine_at(program, site), layouts,
                                     options)
            table[values] = cost
        label = where_of[site] if not isinstance(site, tuple) else f"output {site[1]}"
        factors.append(solve_mod.Factor(variables, table, label=label))
    start = {w: (FIXED_RULE if FIXED_RULE in domains[w] else domains[w][0]) for w in anchors}
    return solve_mod.Problem(domains, tuple(factors)), anchors, start


def uniform_costs(problem, anchors) -> dict:
    """{kernel site: {choice: cost}} where every variable of the site's factor takes that
    choice (kernel sites only)."""
    out = {}
    for f in problem.factors:
        if f.label in anchors:
            out[f.label] = {vals[0]: t for vals, t in f.table.items()
                            if len(set(vals)) == 1}
    return out


def confirm_in_program(opt, plan: dict, fixed: dict, args,
                       rounds: int = CONFIRM_ROUNDS) -> float:
    """Median over interleaved rounds of t(fixed) / t(plan): the program (opt's function
    and options) run on args under each layout plan, each round timing both, alternating
    which goes first; a round is enough calls to last >= 20 ms."""
    import jax

    import alt_jax

    kw = {k: v for k, v in opt._init_options.items() if k != "layout_plan"}
    variants = {name: alt_jax.optimize(opt.fn, layout_plan=p, **kw)
                for name, p in (("plan", plan), ("fixed", fixed))}
    call = lambda f: jax.block_until_ready(f(*args))
    for f in variants.values():
        call(f)
        call(f)
    t0 = time.perf_counter()
    call(variants["fixed"])
    calls = max(1, int(0.02 / max(time.perf_counter() - t0, 1e-6)))
    ratios = []
    for r in range(rounds):
        times = {}
        for name in (("plan", "fixed") if r % 2 else ("fixed", "plan")):
            t0 = time.perf_counter()
            for _ in range(calls):
                call(variants[name])
            times[name] = time.perf_counter() - t0
        ratios.append(times["fixed"] / times["plan"])
    return statistics.median(ratios)


def tune_layouts(fn, *args, records, cache=None, choices=DEFAULT_CHOICES, measure=None,
                 store: bool = True, time_conv: Callable = time_conversion,
                 measurer=None, confirm: bool = True) -> LayoutTuneResult:
    """Chooses the layout of every conv of fn(*args) on this device and stores the plan
    beside `records` (which supplies the op tuner's kernel times where it has them).
    fn: a function or an alt_jax.Optimized (its options are used). confirm: run the
    program under the solved plan and under the fixed rule (interleaved) and keep the plan
    only if it is CONFIRM_MARGIN faster (module docstring)."""
    import jax

    import alt_jax
    from alt_jax import device, jaxpr_pass, layout_plans, propagate
    from tuner import measure as measure_mod
    from tuner.tune import KernelMeasurer

    t0 = time.time()
    opt = fn if isinstance(fn, alt_jax.Optimized) else alt_jax.optimize(
        fn, records=records, cache=cache, fallback="silent")
    options = dataclasses.replace(opt.options, layout_plan={})
    specs = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(np.shape(x), jax.typeof(x).dtype), args)
    closed = jax.make_jaxpr(opt.fn)(*specs)
    own = measurer is None
    if own:
        measurer = KernelMeasurer(options.cache, options.isa,
                                  measure or measure_mod.MeasureConfig())
    try:
        costs = _Costs(options, measurer, time_conv)
        problem, anchors, start = build_problem(closed, options, costs, choices)
        solution = solve_mod.solve(problem, start=start)
    finally:
        if own:
            measurer.close()
    plan, ratio, solved = dict(solution.choice), None, None
    if confirm and plan != dict(start):
        ratio = confirm_in_program(opt, plan, dict(start), args)
        if ratio < 1.0 + CONFIRM_MARGIN:
            plan, solved = dict(start), plan
    layouts = {w: propagate.describe(propagate.choice_layout(anchors[w], c))
               for w, c in plan.items()}
    result = LayoutTuneResult(
        plan=plan, cost_s=solve_mod.total_cost(problem, plan),
        fixed_cost_s=solve_mod.total_cost(problem, start), method=solution.method,
        exact=solution.exact, layouts=layouts, conversion_costs=dict(costs.conversions),
        kernels_measured=len(costs.kernels), seconds=time.time() - t0,
        uniform=uniform_costs(problem, anchors), confirmed_ratio=ratio, solved_plan=solved)
    if store:
        flat = jaxpr_pass.inline_calls(closed)
        layout_plans.store(layout_plans.path_for(options.records.path),
                           layout_plans.program_key(flat), device.fingerprint(options.isa),
                           result.entry())
    return result


def format_result(r: LayoutTuneResult) -> str:
    """The chosen layout of every conv's result and the model's totals."""
    lines = [f"layout plan ({r.method}{', exact' if r.exact else ''}): modelled "
             f"{r.cost_s * 1e3:.3f} ms vs {r.fixed_cost_s * 1e3:.3f} ms with every conv "
             f"channels-last; {r.kernels_measured} kernels timed, {r.seconds:.0f} s"]
    if r.confirmed_ratio is not None:
        kept = ("kept" if r.solved_plan is None else
                f"not kept (under the {CONFIRM_MARGIN:.0%} margin): the fixed rule is stored")
        lines.append(f"  confirmed in the program: fixed rule / solved plan = "
                     f"{r.confirmed_ratio:.3f}x (median of {CONFIRM_ROUNDS} interleaved "
                     f"rounds); the solved plan is {kept}")
        if r.solved_plan is not None:
            lines.append("  the solved plan was: " + ", ".join(
                f"{w} {c}" for w, c in sorted(r.solved_plan.items(),
                                              key=lambda x: int(x[0].split()[1]))))
    for where in sorted(r.plan, key=lambda w: int(w.split()[1])):
        lines.append(f"  {where}: writes {r.layouts[where]}")
    if r.uniform:
        choices = sorted({c for row in r.uniform.values() for c in row})
        lines.append("  per kernel, every layout it touches the same (ms): "
                     + "  ".join(f"{c:>8}" for c in choices))
        for where in sorted(r.uniform, key=lambda w: int(w.split()[1])):
            row = r.uniform[where]
            lines.append(f"    {where:<10}" + "  ".join(
                f"{row[c] * 1e3:8.3f}" if c in row else f"{'-':>8}" for c in choices))
    for label, t in sorted(r.conversion_costs.items()):
        lines.append(f"  conversion {label}: {t * 1e3:.3f} ms")
    return "\n".join(lines)
