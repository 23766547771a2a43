"""The tuning driver, search and scheduler with a fake family and a fake measurer: times are
a known function of the knobs, so what the search finds and where the scheduler spends its
trials can be checked exactly, without building anything.

Entry points: pytest tests/test_tuner.py.
"""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from alt_jax import device, records, runtime
from alt_jax.ops.base import Axis, KnobError, Space
from alt_jax.planner import Workload
from tuner import measure, tune as tune_mod
from tuner.cost_model import CostModel
from tuner.search import ModelSearch, RandomSearch
from tuner.space import Choice, JointSpace

pytest.importorskip("lightgbm")


@dataclasses.dataclass(frozen=True)
class FakeSpec:
    size: int


@dataclasses.dataclass(frozen=True, order=True)
class FakeKnobs:
    a: int = 1
    b: int = 1
    layout: str = "x"


class FakeFamily:
    """a, b in 1..12 (a * b <= 60 is legal), layout x | y. Time is lowest at a=7, b=4,
    layout y; layout x costs 30% more everywhere."""

    knobs_type = FakeKnobs
    residual_in_place = False

    def __init__(self, name="fake", best=(7, 4)):
        self.name = name
        self.best = best

    def space(self, spec, isa):
        return Space(self.name, FakeKnobs, (Axis("a", tuple(range(1, 13)), "loop"),
                                            Axis("b", tuple(range(1, 13)), "loop"),
                                            Axis("layout", ("x", "y"), "layout")))

    def default_knobs(self, spec, isa):
        return FakeKnobs()

    def prefers(self, spec):
        return True

    def validate(self, spec, knobs, isa):
        if knobs.a * knobs.b > 60:
            raise KnobError(f"a*b={knobs.a * knobs.b} > 60")

    def time_s(self, spec, knobs) -> float:
        a0, b0 = self.best
        base = 1e-3 * spec.size * (1 + 0.05 * (knobs.a - a0) ** 2 + 0.05 * (knobs.b - b0) ** 2)
        return base * (1.3 if knobs.layout == "x" else 1.0)


class FakeMeasurer:
    """Times from FakeFamily.time_s; knobs listed in `broken` report that status instead."""

    def __init__(self, broken=None):
        self.calls = []
        self.broken = broken or {}

    def __call__(self, workload, candidates, best_so_far_s):
        out = []
        for family, spec, knobs in candidates:
            self.calls.append((workload.op_key, knobs))
            status = self.broken.get(knobs)
            if status:
                out.append(measure.MeasureResult(status, (), f"fake {status}"))
            else:
                t = family.time_s(spec, knobs)
                out.append(measure.MeasureResult("ok", (t, t, t)))
        return out


def _workload(op_key, size=1, multiplicity=1, families=("fake",)):
    spec = FakeSpec(size)
    return Workload(op_key=op_key, primitive="fake", signature=f"fake[{size}]",
                    epilogue="none", candidates=tuple((f, spec) for f in families),
                    preferred=families[0], flops=10**6 * size, operand_shapes=((4,), (4,)),
                    multiplicity=multiplicity)


@pytest.fixture
def cache(tmp_path):
    return runtime.KernelCache(tmp_path / "kcache")


FAMILIES = {"fake": FakeFamily()}
OPTIMUM = FakeKnobs(7, 4, "y")


def _tune(tmp_path, cache, workloads, families=FAMILIES, measurer=None, **kw):
    store = records.RecordStore(tmp_path / "rec.jsonl")
    measurer = measurer or FakeMeasurer()
    summary = tune_mod.tune(workloads, store, tune_mod.TuneOptions(**kw), cache=cache,
                            families=families, measurer=measurer)
    return store, summary, measurer


def test_model_search_finds_the_optimum_within_budget(tmp_path, cache):
    store, summary, _ = _tune(tmp_path, cache, [_workload("op")], trials=80, batch=8,
                              patience=200)
    (task,) = summary.tasks
    assert task.best.knobs == OPTIMUM
    assert task.untuned_s == pytest.approx(FakeFamily().time_s(FakeSpec(1), FakeKnobs()))
    assert task.trials == 80
    # heuristic first, then the search
    first = store.records()[0]
    assert first["heuristic"] and first["knobs"] == {"a": 1, "b": 1, "layout": "x"}


def test_random_search_is_the_baseline_at_equal_budget(tmp_path, cache):
    """Over 5 seeds, the model-guided search ends at least as close to the optimum as random
    search with the same number of trials (the comparison the benchmark note reports)."""
    model_best, random_best = [], []
    for seed in range(5):
        _, s, _ = _tune(tmp_path / f"m{seed}", cache, [_workload("op")], trials=40,
                        patience=200, seed=seed)
        _, r, _ = _tune(tmp_path / f"r{seed}", cache, [_workload("op")], trials=40,
                        patience=200, seed=seed, search="random")
        model_best.append(s.tasks[0].best_s)
        random_best.append(r.tasks[0].best_s)
    assert np.mean(model_best) <= np.mean(random_best)


def test_scheduler_spends_trials_where_the_gain_is(tmp_path, cache):
    heavy, light = _workload("heavy", multiplicity=20), _workload("light", size=1)
    _, summary, _ = _tune(tmp_path, cache, [light, heavy], trials=60, patience=200)
    by = {t.workload.op_key: t for t in summary.tasks}
    assert by["heavy"].trials > 2 * by["light"].trials
    assert by["heavy"].trials + by["light"].trials == 60


def test_early_stop_frees_the_budget(tmp_path, cache):
    """A workload stops once `patience` trials gain < 1%; the run ends before the budget."""
    _, summary, _ = _tune(tmp_path, cache, [_workload("op")], trials=500, patience=16,
                          min_trials=16)
    (task,) = summary.tasks
    assert task.done and task.trials < 500


def test_failed_and_wrong_candidates_are_recorded_and_never_chosen(tmp_path, cache):
    """A wrong result, a crash and a timeout are each recorded with their status and cost one
    trial; the best record stays an ok one, so the planner never picks them."""
    broken = {OPTIMUM: "wrong_result", FakeKnobs(7, 5, "y"): "crash",
              FakeKnobs(6, 4, "y"): "timeout"}
    store, summary, measurer = _tune(tmp_path, cache, [_workload("op")], trials=120,
                                     patience=500, measurer=FakeMeasurer(broken))
    statuses = {json.dumps(r["knobs"], sort_keys=True): r["status"] for r in store.records()}
    measured_broken = {k: s for k, s in statuses.items() if s != "ok"}
    assert measured_broken  # the search did step on them
    best = store.best_for_op("op", device.fingerprint(cache.isa or device.detect_isa()))
    assert best["status"] == "ok" and FakeKnobs(**best["knobs"]) not in broken
    assert summary.tasks[0].best.knobs not in broken


def test_resume_continues_without_duplicates(tmp_path, cache):
    """A second tune() on the same records measures nothing twice and counts earlier trials."""
    w = [_workload("a"), _workload("b", multiplicity=3)]
    store, _, m1 = _tune(tmp_path, cache, w, trials=30, patience=500, confirm=0)
    store, summary, m2 = _tune(tmp_path, cache, w, trials=60, patience=500, confirm=0)
    assert len(m1.calls) == 30 and len(m2.calls) == 30
    keys = [(r["op_key"], json.dumps(r["knobs"], sort_keys=True)) for r in store.records()]
    assert len(keys) == len(set(keys)) == 60
    assert sum(t.trials for t in summary.tasks) == 60


class LuckyMeasurer(FakeMeasurer):
    """FakeMeasurer, except that the first measurement of any knobs but the heuristic's reads
    `factor` x its true time (a quiet moment of a noisy machine); later ones read true."""

    def __init__(self, factor=0.2):
        super().__init__()
        self.factor, self.seen = factor, set()

    def __call__(self, workload, candidates, best_so_far_s):
        out = super().__call__(workload, candidates, best_so_far_s)
        for i, (_, _, knobs) in enumerate(candidates):
            if knobs != FakeKnobs() and knobs not in self.seen:
                self.seen.add(knobs)
                t = out[i].times_s[0] * self.factor
                out[i] = measure.MeasureResult("ok", (t, t, t))
        return out


def test_confirmation_pass_decides_over_lucky_measurements(tmp_path, cache):
    """The search keeps the fastest of many noisy times, so its best is a lucky one; the
    confirmation pass re-times the best candidates with the heuristic, and the op's best
    record (what optimize() uses) and the summary carry true times from that pass."""
    true = FakeFamily().time_s
    store, summary, _ = _tune(tmp_path, cache, [_workload("op")], trials=60, patience=500,
                              measurer=LuckyMeasurer(), confirm=2, confirm_rounds=2)
    (task,) = summary.tasks
    assert task.best_s < 0.5 * true(FakeSpec(1), task.best.knobs)  # the search was fooled
    here = device.fingerprint(cache.isa or device.detect_isa())
    best = store.best_for_op("op", here)
    assert best["stage"] == "confirm"
    chosen_true = true(FakeSpec(1), FakeKnobs(**best["knobs"]))
    assert records.record_time(best) == pytest.approx(chosen_true)
    passed = [r for r in store.records() if r.get("stage") == "confirm"]
    assert len(passed) == 3 and sum(r["heuristic"] for r in passed) == 1
    assert {r["confirm_pass"] for r in passed} == {best["confirm_pass"]}
    assert all(len(r["times_s"]) == 2 * 3 for r in passed)  # 2 rounds x 3 repeats
    assert min(true(FakeSpec(1), FakeKnobs(**r["knobs"])) for r in passed) == \
        pytest.approx(chosen_true)
    untuned, tuned = task.result
    assert untuned == pytest.approx(true(FakeSpec(1), FakeKnobs()))
    assert tuned == pytest.approx(chosen_true)
    assert summary.speedup == pytest.approx(untuned / tuned)
    # Compaction keeps the pass, so the choice survives it.
    store.compact()
    assert store.best_for_op("op", here)["knobs"] == best["knobs"]


class FlatFamily(FakeFamily):
    """Every candidate but the heuristic takes `factor` x the heuristic's time."""

    def __init__(self, factor):
        super().__init__()
        self.factor = factor

    def time_s(self, spec, knobs):
        return 1e-3 * (1.0 if knobs == FakeKnobs() else self.factor)


@pytest.mark.parametrize("factor, heuristic_kept", [(0.99, True), (0.9, False)])
def test_confirmation_keeps_the_heuristic_unless_beaten_by_the_margin(tmp_path, cache, factor,
                                                                       heuristic_kept):
    """A candidate 1% faster than the heuristic is a tie (margin 3%): the heuristic stays;
    one 10% faster is chosen. The records mark the choice, and optimize() follows it."""
    store, summary, _ = _tune(tmp_path, cache, [_workload("op")], trials=20, patience=500,
                              families={"fake": FlatFamily(factor)}, confirm_margin=0.03)
    best = store.best_for_op("op", device.fingerprint(cache.isa or device.detect_isa()))
    assert best["stage"] == "confirm" and best["chosen"]
    assert best["heuristic"] is heuristic_kept
    chosen = [r for r in store.records() if r.get("chosen")]
    assert chosen == [best]
    untuned, tuned = summary.tasks[0].result
    assert untuned / tuned == pytest.approx(1.0 if heuristic_kept else 1 / factor)


def test_confirmation_is_not_repeated_on_resume(tmp_path, cache):
    """Resuming a finished run measures nothing: no new trials, and the latest pass already
    covers the same candidates."""
    _, _, m1 = _tune(tmp_path, cache, [_workload("op")], trials=30, patience=500)
    store, summary, m2 = _tune(tmp_path, cache, [_workload("op")], trials=30, patience=500)
    assert m1.calls and not m2.calls
    assert summary.tasks[0].confirmed is not None


def test_joint_space_switches_family_and_loop_only_keeps_the_heuristics_layout(tmp_path, cache):
    """Two families compute the op; the other one is faster at its best. Joint tuning finds
    it; loop-only tuning keeps the preferred family and its layout x."""
    families = {"fake": FakeFamily(), "other": FakeFamily("other", best=(3, 3))}

    def faster_other(spec, knobs, f=families["other"], base=FakeFamily.time_s):
        return 0.5 * base(f, spec, knobs)
    families["other"].time_s = faster_other
    w = _workload("op", families=("fake", "other"))
    _, joint, _ = _tune(tmp_path / "j", cache, [w], families=families, trials=80,
                        patience=500)
    _, loop, _ = _tune(tmp_path / "l", cache, [w], families=families, trials=80,
                       patience=500, mode="loop_only")
    assert joint.tasks[0].best.family == "other"
    assert loop.tasks[0].best.family == "fake" and loop.tasks[0].best.knobs.layout == "x"
    assert all(t.family == "fake" and t.knobs.layout == "x" for t in loop.tasks[0].history)
    assert joint.tasks[0].best_s < loop.tasks[0].best_s


def test_warm_start_seeds_from_similar_workloads(tmp_path, cache):
    store, _, _ = _tune(tmp_path, cache, [_workload("a")], trials=60, patience=500)
    # b has the same optimum: its first proposals after the heuristic include a's best
    _, summary, m = _tune(tmp_path, cache, [_workload("a"), _workload("b")], trials=62,
                          patience=500)
    b_calls = [k for op, k in m.calls if op == "b"]
    assert b_calls[0] == FakeKnobs() and OPTIMUM in b_calls[1:3]


def test_joint_space_sampling_is_valid_and_mutation_moves(cache):
    space = JointSpace(_workload("op"), device.detect_isa(), families=FAMILIES)
    rng = np.random.default_rng(0)
    samples = [space.sample(rng) for _ in range(50)]
    assert all(s is not None and space.is_valid(s) for s in samples)
    assert space.size == 12 * 12 * 2
    c = Choice("fake", FakeKnobs(3, 3, "x"))
    moved = [space.mutate(c, rng, loop_only=True) for _ in range(30)]
    assert all(m != c and m.knobs.layout == "x" for m in moved)


def test_cost_model_ranks_by_what_it_learned():
    space = JointSpace(_workload("op"), device.detect_isa(), families=FAMILIES)
    fam = FAMILIES["fake"]
    rng = np.random.default_rng(1)
    rows = []
    for _ in range(60):
        c = space.sample(rng)
        rows.append((space.features(c), np.log(fam.time_s(FakeSpec(1), c.knobs) / 1e-3)))
    model = CostModel()
    model.fit(rows)
    good, bad = Choice("fake", FakeKnobs(7, 4, "y")), Choice("fake", FakeKnobs(1, 12, "x"))
    pg, pb = model.predict([space.features(good), space.features(bad)])
    assert pg < pb


def test_search_strategies_propose_only_unmeasured_valid_choices():
    space = JointSpace(_workload("op"), device.detect_isa(), families=FAMILIES)
    for search in (RandomSearch(space, np.random.default_rng(0)),
                   ModelSearch(space, np.random.default_rng(0), CostModel())):
        seen = set()
        for _ in range(5):
            props = search.propose(8)
            for c, _stage in props:
                assert space.is_valid(c) and c not in seen
                seen.add(c)
                search.observe(c, FAMILIES["fake"].time_s(FakeSpec(1), c.knobs))


def test_latest_pass_of_each_run_kind_and_the_fastest_winner_decide(tmp_path, cache):
    """A loop-only run after a joint one on the same file adds its own pass; the file's
    choice (no selection) is the faster of the two kinds' winners, and each selection
    (the benchmarks' ablation columns) still sees its own kind's winner."""
    families = {"fake": FakeFamily(), "other": FakeFamily("other", best=(3, 3))}

    def faster_other(spec, knobs, f=families["other"], base=FakeFamily.time_s):
        return 0.5 * base(f, spec, knobs)
    families["other"].time_s = faster_other
    w = _workload("op", families=("fake", "other"))
    store, joint, _ = _tune(tmp_path, cache, [w], families=families, trials=60, patience=500)
    store, loop, _ = _tune(tmp_path, cache, [w], families=families, trials=60, patience=500,
                           mode="loop_only")
    here = device.fingerprint(cache.isa or device.detect_isa())
    chosen = store.best_for_op("op", here)
    assert chosen["mode"] == "joint" and chosen["family"] == "other"
    assert records.record_time(chosen) == pytest.approx(joint.tasks[0].result[1])
    only_loop = records.RecordStore(store.path, {"mode": "loop_only"}).best_for_op("op", here)
    assert only_loop["family"] == "fake" and only_loop["stage"] == "confirm"
    assert records.record_time(only_loop) == pytest.approx(loop.tasks[0].result[1])
