"""The tuning driver: workloads in, one record per measured candidate out.

Entry points: tune(workloads, store, options) -> TuneSummary, workloads_of(fn, *args),
TuneOptions, Listener, TuneSummary.
Per workload: its heuristic choice is measured first (so a tuned op is never slower than
the untuned one it replaces), then a search strategy proposes batches; each batch is built
in parallel, measured one candidate at a time in the worker process against the lax
reference on inputs of the real shapes, and every result is appended to the records at
once. A task scheduler spends the trials where the expected end-to-end gain is largest.
A run resumes from the records by default: candidates already measured on this device (same
mode and search) are not measured again and count toward the budget.
"""
from __future__ import annotations

import dataclasses
import math
import time
import uuid
from typing import Optional, Sequence

import numpy as np

from alt_jax import device, planner, records as records_mod
from alt_jax.ops import registry
from alt_jax.records import RecordStore
from tuner import measure as measure_mod
from tuner.cost_model import CostModel, relative_log_time
from tuner.scheduler import TaskScheduler, TaskState, Trial, whole_speedup
from tuner.search import SEARCHES, make_search
from tuner.space import MODES, Choice, JointSpace


@dataclasses.dataclass(frozen=True)
class TuneOptions:
    trials: int = 1000                 # measured candidates in all, resumed ones included
    time_budget_s: Optional[float] = None  # wall seconds for this call
    batch: int = 8                     # candidates built together, then measured in turn
    mode: str = "joint"                # "joint" | "loop_only" (layouts fixed: the ablation)
    search: str = "model"              # "model" (cost-model-guided) | "random" (baseline)
    seed: int = 0
    min_trials: int = 16               # per workload before early stopping may stop it
    patience: int = 32                 # trials without a 1% gain that stop a workload
    warm_start: bool = True            # seed from the best knobs of similar workloads
    measure: measure_mod.MeasureConfig = dataclasses.field(
        default_factory=measure_mod.MeasureConfig)
    model: str = ""                    # label written into each record
    # After the search, each op's heuristic and its `confirm` best candidates are re-timed
    # together, `confirm_rounds` interleaved rounds; the pass chooses what optimize() uses
    # (records.confirm_pass): the fastest candidate if it beats the heuristic by at least
    # confirm_margin, else the heuristic (a tie is noise, and the heuristic is the known
    # quantity: the in-model timing of MobileNetV2 found a 0.2% "win" 12% slower there).
    # confirm=0 skips the pass.
    confirm: int = 3
    confirm_rounds: int = 3
    confirm_margin: float = 0.03

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r}: choose one of {MODES}")
        if self.search not in SEARCHES:
            raise ValueError(f"search={self.search!r}: choose one of {SEARCHES}")
        if self.confirm < 0 or self.confirm_rounds < 1 or not 0 <= self.confirm_margin < 1:
            raise ValueError(f"confirm={self.confirm} must be >= 0, confirm_rounds="
                             f"{self.confirm_rounds} >= 1 and confirm_margin="
                             f"{self.confirm_margin} in [0, 1)")
        if self.trials < 0 or self.batch < 1:
            raise ValueError(f"trials={self.trials} must be >= 0 and batch={self.batch} >= 1")


class Listener:
    """Progress hooks (the CLI's progress bars, benchmarks). Every method is optional."""

    def on_start(self, tasks: list, options: TuneOptions) -> None:
        pass

    def on_trial(self, task: TaskState, trial: Trial) -> None:
        pass

    def on_confirm(self, task: TaskState) -> None:
        """task's confirmation pass was recorded (task.confirmed is set)."""

    def on_finish(self, summary: "TuneSummary") -> None:
        pass


@dataclasses.dataclass
class TuneSummary:
    tasks: list
    wall_s: float
    interrupted: bool
    records_path: str

    @property
    def speedup(self) -> Optional[float]:
        """Whole-program untuned / tuned time (time x multiplicity, ops with both), from the
        confirmation pass where an op has one."""
        return whole_speedup(self.tasks)


def workloads_of(fn, *args, **optimize_options) -> list:
    """The workloads alt_jax.optimize(fn, **optimize_options) would put on kernels for these
    arguments (arrays or ShapeDtypeStructs), traced as it traces them; builds nothing.
    fn may be an Optimized (its own options are used then); platform="cuda" gives the
    workloads of its GPU plan (CUDA families)."""
    import jax

    import alt_jax
    from alt_jax import planner

    opt = fn if isinstance(fn, alt_jax.Optimized) else alt_jax.optimize(fn, **optimize_options)
    # args may be pytrees (a params dict): their leaves become shaped placeholders
    specs = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(np.shape(x), jax.typeof(x).dtype), args)
    closed = jax.make_jaxpr(opt.fn)(*specs)
    return planner.list_workloads(closed, opt.plan_options(*specs))


@dataclasses.dataclass(frozen=True)
class SearchState:
    """What a search needs to propose where it runs (a cluster node rebuilds it around its
    own JointSpace): its kind, the choices measured so far with their times, the warm-start
    choices not yet tried, and the seed of its random draws for this batch."""

    kind: str
    measured: dict
    seeds: list
    rng_seed: list

    def search(self, space: JointSpace, model: CostModel):
        s = make_search(self.kind, space, model, np.random.default_rng(self.rng_seed),
                        self.seeds)
        s.measured = dict(self.measured)
        return s


PARAMETER_OPERANDS = ("rhs", "scale", "shift")


class Harness:
    """A workload's example operands (real shapes, seeded) and the lax reference result."""

    def __init__(self, workload, seed: int):
        import jax

        rng = np.random.default_rng(seed)
        out_shape = tuple(workload.eqn.outvars[0].aval.shape)
        reduction = max(1, workload.flops // (2 * max(1, math.prod(out_shape))))
        ops = []
        for name, shape in zip(workload.operand_names, workload.operand_shapes):
            if name == "rhs":
                x = rng.standard_normal(shape) / math.sqrt(reduction)
            elif name == "scale":
                x = rng.uniform(0.5, 1.5, shape)
            elif name == "shift":
                x = 0.5 * rng.standard_normal(shape)
            else:
                x = rng.standard_normal(shape)
            ops.append(np.ascontiguousarray(x, np.float32))
        self.operands = ops
        # The kernel reads its operands in this order (OpFamily.kernel_inputs); the rhs and
        # the epilogue's scale and shift are a conv's or dense layer's parameters, timed cold.
        self.cold = tuple(i for i, name in enumerate(workload.operand_names)
                          if name in PARAMETER_OPERANDS)
        reference = jax.jit(lambda *xs: workload.reference(xs))
        self.expected = np.ascontiguousarray(np.asarray(reference(*ops)), np.float32)

    def inputs_for(self, family, spec, knobs, isa) -> tuple:
        import jax

        with jax.default_device(jax.devices("cpu")[0]):
            arrays = family.kernel_inputs(spec, knobs, list(self.operands), isa)
        return tuple(np.ascontiguousarray(np.asarray(a), np.float32) for a in arrays)


class Harnesses:
    """Each workload's Harness, built on first use (its example operands and lax reference
    cost a trace and a run): what a measurer keeps across its batches."""

    def __init__(self, seed: int):
        self.seed = seed
        self._by_op: dict = {}

    def of(self, workload) -> Harness:
        h = self._by_op.get(workload.op_key)
        if h is None:
            h = self._by_op[workload.op_key] = Harness(workload, self.seed)
        return h


class KernelMeasurer:
    """Measures candidates of a workload for real: render, build the batch in parallel, then
    run each in the worker process against the workload's lax reference. Callable as
    measurer(workload, [(family, spec, knobs)], best_so_far_s) -> [MeasureResult]; tests
    pass tune() a fake with the same call."""

    def __init__(self, cache, isa, config: measure_mod.MeasureConfig, seed: int = 0):
        self.cache, self.isa, self.seed = cache, isa, seed
        self.builder = measure_mod.Builder(cache)
        self.runner = measure_mod.Runner(config)
        self.harnesses = Harnesses(seed)

    def __call__(self, workload, candidates: list, best_so_far_s) -> list:
        harness = self.harnesses.of(workload)
        results: list = [None] * len(candidates)
        inputs, where = [], []
        for i, (family, spec, knobs) in enumerate(candidates):
            try:
                src = family.render(spec, knobs, self.isa)
                kernel_inputs = harness.inputs_for(family, spec, knobs, self.isa)
            except Exception as e:  # noqa: BLE001 - a refusal costs this candidate only
                results[i] = measure_mod.MeasureResult("invalid", (), f"{type(e).__name__}: {e}")
                continue
            inputs.append(measure_mod.MeasureInput(src, kernel_inputs, harness.expected,
                                                   best_so_far_s, workload=workload.op_key,
                                                   cold=harness.cold))
            where.append(i)
        if inputs:
            for i, result in zip(where, measure_mod.measure(self.builder, self.runner, inputs)):
                results[i] = result
        return results

    def close(self) -> None:
        self.runner.close()


class _Run:
    """One tune() call's state: tasks, strategies, the shared cost model, the records."""

    def __init__(self, workloads, store: RecordStore, options: TuneOptions, cache, families,
                 listener: Listener, device_kind=None):
        from alt_jax import runtime

        self.store, self.options, self.listener = store, options, listener
        self.cache = cache or runtime.default_cache()
        if device_kind is None:
            self.isa = self.cache.isa or device.detect_isa()
            self.device = device.fingerprint(self.isa)
        else:  # another machine's (a cluster node's), or a GPU's (measure_cuda.GpuKind)
            self.isa, self.device = device_kind.target, device_kind.fingerprint
        self.families = families or registry.families_by_name()
        self.run_id = uuid.uuid4().hex[:12]
        self.model = CostModel(seed=options.seed)
        self.model_version = 0  # fits so far: a remote measurer ships each version once
        self.tasks, self.spaces, self.searches = [], {}, {}
        self.measured: set = set()
        prior = self._prior_records()
        for w in planner.merge_workloads(workloads):  # an op suite may repeat an op
            space = JointSpace(w, self.isa, options.mode, self.families)
            task = TaskState(w)
            self.tasks.append(task)
            self.spaces[w.op_key] = space
            seeds = self._warm_start(w, space, prior) if options.warm_start else []
            self.searches[w.op_key] = make_search(options.search, space, self.model,
                                                  np.random.default_rng([options.seed,
                                                                         len(self.tasks)]),
                                                  seeds)
            self._resume(task, space, prior.get(w.op_key, []))
        self.scheduler = TaskScheduler(self.tasks, min_trials=options.min_trials,
                                       patience=options.patience)

    # ---- records in ----
    def _prior_records(self) -> dict:
        """op_key -> this device's records of the same mode and search, in trial order."""
        by_op: dict = {}
        for rec in self.store.records():
            if (rec["device"] == self.device and rec.get("mode", "joint") == self.options.mode
                    and rec.get("search", "model") == self.options.search):
                by_op.setdefault(rec["op_key"], []).append(rec)
        for recs in by_op.values():
            recs.sort(key=lambda r: (r.get("trial", 0), r.get("timestamp", 0)))
        return by_op

    def _choice_of(self, rec, space: JointSpace) -> Optional[Choice]:
        family = space.parts.get(rec["family"])
        if family is None:
            return None
        knobs = records_mod.knobs_from_record(rec, family.family.knobs_type, self.store.path)
        return None if knobs is None else Choice(rec["family"], knobs)

    def _resume(self, task: TaskState, space: JointSpace, recs: list) -> None:
        choices = {id(rec): self._choice_of(rec, space) for rec in recs}
        known = [rec for rec in recs if choices[id(rec)] is not None]
        for rec in known:
            if records_mod.confirm_pass(rec) is None:  # a trial; a pass only re-times
                self._account(task, choices[id(rec)], rec, bool(rec.get("heuristic")),
                              rec.get("stage", ""))
        latest = records_mod.latest_passes(known, lambda rec: task.workload.op_key)
        for members in latest.values():
            self._take_confirmation(task, [(choices[id(r)], r) for r in members])

    def _take_confirmation(self, task: TaskState, measured: list) -> None:
        """task's confirmed (untuned, chosen) times from one pass [(Choice, record)]."""
        chosen = records_mod.pass_choice([r for _, r in measured])
        untuned = next((records_mod.record_time(r) for c, r in measured if r.get("heuristic")),
                       None)
        task.confirmed = (untuned, records_mod.record_time(chosen)) if chosen else None
        # A pass that marks no choice (written before the margin rule) is done again.
        marked = any("chosen" in r for _, r in measured)
        task.confirmed_keys = frozenset(c.key for c, _ in measured) if marked else frozenset()

    def _warm_start(self, workload, space: JointSpace, prior: dict) -> list:
        """The best choice of each other workload of the records, when valid here: similar
        ops (same families) often share their best knobs."""
        seeds = []
        for op, recs in prior.items():
            if op == workload.op_key:
                continue
            ok = [r for r in recs if records_mod.record_time(r) is not None
                  and not r.get("heuristic")]
            if not ok:
                continue
            best = min(ok, key=records_mod.record_time)
            choice = self._choice_of(best, space)
            if choice is not None and space.is_valid(choice) and choice not in seeds:
                seeds.append(choice)
        return seeds[:4]

    # ---- measuring ----
    def measure(self, measurer, task: TaskState, proposals: list) -> None:
        """Measures proposals [(Choice, stage, heuristic)] of task, recording each."""
        space = self.spaces[task.workload.op_key]
        cands = [(space.family(c), space.spec(c), c.knobs) for c, _, _ in proposals]
        results = measurer(task.workload, cands, task.best_s)
        for (choice, stage, heuristic), result in zip(proposals, results):
            self._record(task, choice, stage, heuristic, result)

    def search_and_measure(self, measurer, task: TaskState, n: int) -> bool:
        """Up to n new candidates of task proposed and measured, each recorded; False when
        the search has none left. A measurer that searches where it measures (a cluster
        node: tuner.cluster) gets the search's state and the current cost model instead."""
        search = self.searches[task.workload.op_key]
        remote = getattr(measurer, "search_and_measure", None)
        if remote is not None:
            done = remote(task.workload, self.spaces[task.workload.op_key].mode, SearchState(
                self.options.search, dict(search.measured), list(search.seeds),
                [self.options.seed, self.tasks.index(task), task.trials]), n, task.best_s,
                self.model, self.model_version)
            proposed = {c for c, _, _ in done}
            search.seeds = [c for c in search.seeds if c not in proposed]
            for choice, stage, result in done:
                self._record(task, choice, stage, False, result)
            return bool(done)
        proposals = [(c, stage, False) for c, stage in search.propose(n)
                     if (task.workload.op_key, c.key) not in self.measured]
        if proposals:
            self.measure(measurer, task, proposals)
        return bool(proposals)

    # ---- records out ----
    def _record(self, task: TaskState, choice: Choice, stage: str, heuristic: bool,
                result) -> None:
        w, space = task.workload, self.spaces[task.workload.op_key]
        ok = result.status == "ok"
        extra = dict(op=w.label, multiplicity=w.multiplicity, model=self.options.model,
                     mode=self.options.mode, search=self.options.search, heuristic=heuristic,
                     stage=stage, trial=task.trials, run_id=self.run_id,
                     cut=bool(getattr(result, "cut", False)))
        if not ok:
            extra["error"] = str(result.error)[:500]
        rec = records_mod.make_record(choice.family, space.spec(choice), choice.knobs,
                                      self.device, result.times_s if ok else (), result.status,
                                      op_key=w.op_key, layout=space.layout_dict(choice), **extra)
        self.store.append(rec)
        self.listener.on_trial(task, self._account(task, choice, rec, heuristic, stage))

    def _account(self, task: TaskState, choice: Choice, rec: dict, heuristic: bool,
                 stage: str) -> Trial:
        """One measured candidate (just recorded, or read back on resume) counted: in the
        task's history, the search's observations and the set never measured again."""
        median = records_mod.record_time(rec)
        trial = Trial(choice.family, choice.knobs, rec.get("layout", {}), rec["status"],
                      median, heuristic, stage, task.trials)
        task.add(trial)
        self.searches[task.workload.op_key].observe(choice, median)
        self.measured.add((task.workload.op_key, choice.key))
        return trial

    # ---- confirmation ----
    def confirm(self, measurer, task: TaskState) -> None:
        """Re-times the heuristic and the best `options.confirm` other candidates of task
        together, options.confirm_rounds interleaved rounds (each candidate once per round,
        its repeats as the protocol says), and records them as one pass: a search keeps the
        fastest of many noisy measurements, so its best is biased low; timed side by side,
        the heuristic and the candidates that looked best face the same machine. The pass
        marks its choice (_pass_winner), which optimize() uses. Skipped when the latest pass
        already covered the same candidates, or when the heuristic is the only one."""
        space = self.spaces[task.workload.op_key]
        default = space.default
        ranked = sorted((t for t in task.history if t.median_s is not None and not t.heuristic
                         and t.status == "ok"), key=lambda t: t.median_s)
        picks, keys = [default], {default.key}
        for t in ranked:
            c = Choice(t.family, t.knobs)
            if c.key not in keys and len(picks) <= self.options.confirm:
                picks.append(c)
                keys.add(c.key)
        if len(picks) < 2 or frozenset(keys) == task.confirmed_keys:
            return
        times: dict = {c.key: [] for c in picks}
        failed: dict = {}
        cands = [(space.family(c), space.spec(c), c.knobs) for c in picks]
        for _ in range(self.options.confirm_rounds):
            for c, result in zip(picks, measurer(task.workload, cands, None)):
                if result.status == "ok":
                    times[c.key].extend(result.times_s)
                else:
                    failed.setdefault(c.key, result)
        start, pass_id = time.time(), f"{self.run_id}:{len(task.history)}"
        w = task.workload
        measured = []
        for c in picks:
            bad = failed.get(c.key)
            measured.append((c, records_mod.make_record(
                c.family, space.spec(c), c.knobs, self.device,
                () if bad else times[c.key], bad.status if bad else "ok", op_key=w.op_key,
                layout=space.layout_dict(c), op=w.label, multiplicity=w.multiplicity,
                model=self.options.model, mode=self.options.mode, search=self.options.search,
                heuristic=c.key == default.key, stage=records_mod.CONFIRM_STAGE,
                trial=task.trials, run_id=self.run_id, confirm_pass=pass_id,
                confirm_start=start, **({"error": str(bad.error)[:500]} if bad else {}))))
        chosen = self._pass_winner([r for _, r in measured])
        for _, rec in measured:
            rec["chosen"] = rec is chosen
            self.store.append(rec)
        self._take_confirmation(task, measured)
        self.listener.on_confirm(task)

    def _pass_winner(self, recs: list) -> Optional[dict]:
        """The record a pass chooses: its fastest when that beats the heuristic's by
        options.confirm_margin, else the heuristic's (the fastest if the heuristic failed);
        None when none is ok."""
        ok = [r for r in recs if records_mod.record_time(r) is not None]
        if not ok:
            return None
        fastest = min(ok, key=records_mod.record_time)
        heuristic = next((r for r in ok if r["heuristic"]), None)
        if heuristic is None or (records_mod.record_time(fastest) <= (
                1 - self.options.confirm_margin) * records_mod.record_time(heuristic)):
            return fastest
        return heuristic

    def train(self) -> None:
        if self.options.search != "model":
            return
        rows = []
        for task in self.tasks:
            if not task.untuned_s:
                continue
            space = self.spaces[task.workload.op_key]
            for t in task.history:
                if t.median_s is not None:
                    rows.append((space.features(Choice(t.family, t.knobs)),
                                 relative_log_time(t.median_s, task.untuned_s)))
        self.model.fit(rows)
        if self.model.fitted:  # a new fit (fit() keeps the old one below min_samples)
            self.model_version += 1


def tune(workloads: Sequence, store: RecordStore, options: TuneOptions = TuneOptions(), *,
         cache=None, listener: Optional[Listener] = None, families: Optional[dict] = None,
         measurer=None, device_kind=None) -> TuneSummary:
    """Tunes workloads (planner.Workload, e.g. from workloads_of) into store; see the module
    docstring. cache: the KernelCache kernels are built into (its ISA is the one tuned
    for); families: name -> family (default: the registry's); measurer: what measures
    (default KernelMeasurer); device_kind: the device tuned for when it is not this
    machine (its .target, what kernels are generated for, and .fingerprint:
    tuner.cluster.DeviceKind, tuner.measure_cuda.GpuKind; a measurer must then be given, one
    that measures there). Ctrl-C: the worker is stopped, KeyboardInterrupt propagates,
    and every record already written is complete (one atomic append per trial)."""
    listener = listener or Listener()
    start = time.monotonic()
    if device_kind is not None and measurer is None:
        raise ValueError("tune(device_kind=...) measures on that device: pass its measurer")
    run = _Run(workloads, store, options, cache, families, listener, device_kind)
    listener.on_start(run.tasks, options)
    own = measurer is None
    if own:
        measurer = KernelMeasurer(run.cache, run.isa, options.measure, options.seed)
    interrupted = False
    try:
        _loop(run, measurer, start)
        if options.confirm:
            for task in run.tasks:
                run.confirm(measurer, task)
    except KeyboardInterrupt:
        interrupted = True
        raise
    finally:
        if own:
            measurer.close()
        summary = TuneSummary(run.tasks, time.monotonic() - start, interrupted, store.path)
        if not interrupted:
            listener.on_finish(summary)
    return summary


def _loop(run: _Run, measurer, start: float) -> None:
    options = run.options
    over_time = lambda: (options.time_budget_s is not None
                         and time.monotonic() - start >= options.time_budget_s)
    total = lambda: sum(t.trials for t in run.tasks)
    # The heuristic's choice of every workload first, built together.
    for task in run.tasks:
        if task.untuned_s is None and not any(t.heuristic for t in task.history):
            if total() >= options.trials or over_time():
                return
            default = run.spaces[task.workload.op_key].default
            if (task.workload.op_key, default.key) not in run.measured:
                run.measure(measurer, task, [(default, "heuristic", True)])
    run.train()
    while total() < options.trials and not over_time():
        task = run.scheduler.next()
        if task is None:
            return
        n = min(options.batch, options.trials - total())
        if not run.search_and_measure(measurer, task, n):
            task.done = True  # the space (as the search sees it) is exhausted
            continue
        run.scheduler.update(task)
        run.train()
