"""The graph tuner on real programs, with made-up kernel and conversion costs: the problem
it builds is priced as propagation prices it, its answer is the exact optimum, the plan is
stored beside the records and optimize() replays it (explain shows the measured costs)."""
import functools

import jax
import numpy as np
import pytest

import alt_jax
from benchmarks import models
from tuner import graph_tuner, graph_tuner_solve
from tuner.measure import MeasureResult

BLOCKED_S, PLAIN_S, CONVERSION_S = 0.5e-3, 1.0e-3, 0.3e-3


def fake_measurer(calls):
    """Kernels writing channel blocks cost half of the others; counts calls."""
    def measure(workload, candidates, best_so_far_s):
        calls.append(workload.op_key)
        out = []
        for _, spec, _ in candidates:
            blocked = getattr(spec, "out_layout", None) is not None and \
                spec.out_layout.permutation is None
            out.append(MeasureResult("ok", (BLOCKED_S if blocked else PLAIN_S,)))
        return out
    return measure


def _tiny(kernel_cache, records):
    model = models.build("tiny_cnn", layout="nhwc")
    fn = functools.partial(jax.jit(model.apply), model.params)
    opt = alt_jax.optimize(fn, records=str(records), cache=kernel_cache, fallback="error")
    return model, fn, opt


def test_plan_is_the_exact_optimum_stored_and_replayed(kernel_cache, tmp_path):
    records = tmp_path / "r.jsonl"
    records.write_text("")
    model, fn, opt = _tiny(kernel_cache, records)
    calls = []
    result = graph_tuner.tune_layouts(opt, *model.inputs, records=str(records),
                                      measurer=fake_measurer(calls),
                                      time_conv=lambda c: CONVERSION_S,
                                      choices=("NHWC", "NC8", "NC16"), confirm=False)
    # two convs: blocked kernels are cheaper and the pooled features pay one conversion
    # before the classifier whichever block is chosen, so every conv writes blocks
    assert set(result.plan.values()) <= {"NC8", "NC16"} and len(result.plan) == 2
    assert result.exact
    assert result.fixed_cost_s == pytest.approx(2 * PLAIN_S)
    assert result.cost_s == pytest.approx(2 * BLOCKED_S + CONVERSION_S)
    assert len(set(calls)) == len(calls)  # each kernel measured once
    # the stored plan is replayed: the same layouts, the conversion's measured cost shown
    plan = alt_jax.optimize(fn, records=str(records), cache=kernel_cache,
                            fallback="error").plan_for(*model.inputs)
    writes = {d.where: d.layouts.split("writes ")[1] for d in plan.rewritten
              if d.primitive == "conv_general_dilated"}
    assert writes == result.layouts
    assert "(measured 0.300 ms)" in str(plan)
    np.testing.assert_allclose(
        np.asarray(alt_jax.optimize(fn, records=str(records), cache=kernel_cache)(
            *model.inputs)), np.asarray(fn(*model.inputs)), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("measured", [1.01, 1.10])
def test_a_plan_is_kept_only_if_the_program_confirms_it(kernel_cache, tmp_path, monkeypatch,
                                                       measured):
    """The solver's plan (blocked: cheaper by the fake costs) is stored only when the
    program under it beats the fixed rule by the margin in interleaved runs; otherwise the
    fixed rule is stored, and the solved plan is reported beside it."""
    records = tmp_path / "r.jsonl"
    records.write_text("")
    model, fn, opt = _tiny(kernel_cache, records)
    seen = []

    def confirm(opt_, plan, fixed, args, rounds=graph_tuner.CONFIRM_ROUNDS):
        seen.append((dict(plan), dict(fixed)))
        return measured
    monkeypatch.setattr(graph_tuner, "confirm_in_program", confirm)
    result = graph_tuner.tune_layouts(opt, *model.inputs, records=str(records),
                                      measurer=fake_measurer([]),
                                      time_conv=lambda c: CONVERSION_S,
                                      choices=("NHWC", "NC8", "NC16"))
    (solved, fixed), = seen
    assert set(solved.values()) <= {"NC8", "NC16"} and set(fixed.values()) == {"NHWC"}
    assert result.confirmed_ratio == measured
    stored = alt_jax.optimize(fn, records=str(records), cache=kernel_cache,
                              fallback="error").plan_for(*model.inputs)
    writes = {d.layouts.split("writes ")[1] for d in stored.rewritten
              if d.primitive == "conv_general_dilated"}
    text = graph_tuner.format_result(result)
    if measured >= 1 + graph_tuner.CONFIRM_MARGIN:
        assert result.plan == solved and result.solved_plan is None
        assert all(w.startswith("N C/") for w in writes) and "is kept" in text
    else:
        assert result.plan == fixed and result.solved_plan == solved
        assert writes == {"NHWC"} and "not kept" in text
        assert result.cost_s == pytest.approx(result.fixed_cost_s)


def test_confirmation_times_the_program_both_ways(kernel_cache, tmp_path):
    records = tmp_path / "r.jsonl"
    records.write_text("")
    model, fn, opt = _tiny(kernel_cache, records)
    ratio = graph_tuner.confirm_in_program(opt, {"eqn 0": "NC8", "eqn 3": "NC8"},
                                           {"eqn 0": "NHWC", "eqn 3": "NHWC"}, model.inputs,
                                           rounds=3)
    assert 0.2 < ratio < 5.0


def test_built_problem_prices_what_propagation_does(kernel_cache, tmp_path):
    """Every assignment's modelled cost = the kernels it builds + the conversions the plan
    for it inserts (both priced as the fakes say), checked by brute force."""
    records = tmp_path / "r.jsonl"
    records.write_text("")
    model, fn, opt = _tiny(kernel_cache, records)
    closed = jax.make_jaxpr(fn)(*model.inputs)
    costs = graph_tuner._Costs(opt.options, fake_measurer([]), lambda c: CONVERSION_S)
    import dataclasses
    options = dataclasses.replace(opt.options, layout_plan={})
    problem, anchors, start = graph_tuner.build_problem(closed, options, costs,
                                                        ("NHWC", "NC8", "logical"))
    assert graph_tuner_solve.solve(problem).cost == pytest.approx(
        graph_tuner_solve.brute_force(problem).cost)
    import itertools
    names = list(problem.domains)
    for values in itertools.product(*(problem.domains[n] for n in names)):
        choice = dict(zip(names, values))
        plan = alt_jax.optimize(fn, records=False, cache=kernel_cache, fallback="error",
                                layout_plan=choice).plan_for(*model.inputs)
        kernels = sum(BLOCKED_S if "writes N C/" in d.layouts else PLAIN_S
                      for d in plan.rewritten if d.primitive == "conv_general_dilated")
        want = kernels + CONVERSION_S * len(plan.conversions)
        assert graph_tuner_solve.total_cost(problem, choice) == pytest.approx(want), choice


def test_layouts_command_needs_a_model():
    from tuner import cli

    assert cli.main(["alt-tune", "layouts"]) == 2


def test_tune_layouts_flag_is_checked():
    from tuner import cli

    assert cli.main(["alt-tune", "tune", "--model=tiny_cnn", "--layouts=NC7"]) == 2
    assert cli.main(["alt-tune", "tune", "pkg:fn", "--inputs=1x2", "--layouts=NC8"]) == 2
