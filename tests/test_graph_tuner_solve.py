"""tuner/graph_tuner_solve.py: the exact solvers agree with brute force, local search never
loses to its start, and bad or infeasible problems fail with a message naming the culprit."""
import itertools
import math
import random

import pytest

from tuner.graph_tuner_solve import (Factor, Problem, Solution, brute_force, is_chain, solve,
                                     solve_chain, total_cost)

LAYOUTS = ("NHWC", "NCHW", "NCHW8c", "NCHW16c")


def random_table(rng, domains, variables, forbid=0.15):
    """Costs for every combination of variables' values, a share of them forbidden."""
    combos = itertools.product(*(domains[v] for v in variables))
    return {k: round(rng.uniform(0.0, 2.0), 3) for k in combos if rng.random() >= forbid}


def random_domains(rng, names, most=4):
    return {v: LAYOUTS[:rng.randint(1, most)] for v in names}


def random_chain(rng):
    names = [f"v{i}" for i in range(rng.randint(2, 7))]
    domains = random_domains(rng, names)
    factors = [Factor((v,), random_table(rng, domains, (v,)), f"unary {v}")
               for v in names if rng.random() < 0.8]
    for a, b in zip(names, names[1:]):
        if rng.random() < 0.15:
            continue   # disjoint paths
        pair = (a, b) if rng.random() < 0.5 else (b, a)
        factors.append(Factor(pair, random_table(rng, domains, pair), f"edge {pair}"))
    rng.shuffle(names)   # path order need not be the declaration order
    return Problem({v: domains[v] for v in names}, tuple(factors))


def residual(rng):
    """x -> a -> b, y = add(x, b): kernel terms on the chain, the add joins x, b and y."""
    domains = random_domains(rng, "xaby")
    scopes = [("x",), ("x", "a"), ("a", "b"), ("x", "b", "y"), ("x", "y")]
    return domains, scopes


def diamond(rng):
    """x feeds two branches a and b that meet in y."""
    domains = random_domains(rng, "xaby")
    return domains, [("x",), ("x", "a"), ("x", "b"), ("a", "y"), ("b", "y"), ("y",)]


def concat(rng):
    """Three producers a, b, c concatenated into y, then y -> z."""
    domains = random_domains(rng, "abcyz", most=3)
    return domains, [("a",), ("b",), ("a", "b", "c"), ("c", "y"), ("a", "y"), ("y", "z")]


def build(rng, shape, forbid=0.15):
    domains, scopes = shape(rng)
    factors = tuple(Factor(s, random_table(rng, domains, s, forbid), f"term {s}") for s in scopes)
    return Problem(domains, factors)


def check_exact(problem, method):
    try:
        expected = brute_force(problem)
    except ValueError:
        with pytest.raises(ValueError, match="finite cost"):
            solve(problem)
        return False
    got = solve(problem)
    assert (got.method, got.exact) == (method, True)
    assert got.cost == pytest.approx(expected.cost, abs=1e-12)
    assert total_cost(problem, got.choice) == pytest.approx(got.cost, abs=1e-12)
    return True


def test_chain_dp_matches_brute_force():
    rng = random.Random(1)
    feasible = sum(check_exact(random_chain(rng), "chain-dp") for _ in range(250))
    assert feasible > 100   # the sample must mostly exercise the DP, not the error path


@pytest.mark.parametrize("shape, seed", [(residual, 2), (diamond, 3), (concat, 4)])
def test_elimination_matches_brute_force(shape, seed):
    rng = random.Random(seed)
    feasible = 0
    for _ in range(80):
        problem = build(rng, shape)
        assert is_chain(problem) is None
        feasible += check_exact(problem, "elimination")
    assert feasible > 30


def test_is_chain():
    d = {v: ("A", "B") for v in "abcde"}
    t2 = {k: 0.0 for k in itertools.product("AB", repeat=2)}
    path = [Factor(("c", "b"), t2), Factor(("b", "a"), t2), Factor(("d", "e"), t2)]
    assert is_chain(Problem(d, tuple(path))) == ["a", "b", "c", "d", "e"]
    cycle = Problem({v: ("A", "B") for v in "abc"}, (Factor(("a", "b"), t2),
                    Factor(("b", "c"), t2), Factor(("c", "a"), t2)))
    assert is_chain(cycle) is None
    star = Problem(d, (Factor(("a", "b"), t2), Factor(("a", "c"), t2), Factor(("a", "d"), t2)))
    assert is_chain(star) is None
    with pytest.raises(ValueError, match="does not join neighbours"):
        solve_chain(Problem(d, tuple(path)), ["a", "c", "b", "d", "e"])


def test_local_search_never_worse_than_start():
    rng = random.Random(7)
    for shape in (residual, diamond, concat):
        for _ in range(30):
            problem = build(rng, shape, forbid=0.0)
            start = {v: rng.choice(d) for v, d in problem.domains.items()}
            got = solve(problem, max_table=1, start=start)
            assert (got.method, got.exact) == ("local-search", False)
            assert got.cost <= total_cost(problem, start)
            assert total_cost(problem, got.choice) == pytest.approx(got.cost, abs=1e-12)
            assert got.cost >= brute_force(problem).cost - 1e-12
            unary = solve(problem, max_table=1)   # default start: the greedy per-op choice
            assert unary.method == "local-search" and math.isfinite(unary.cost)


def test_local_search_pair_moves_and_infeasible_start():
    # a and b must agree (anything else is forbidden); "B" is cheaper for both together, but
    # no single-variable move from (A, A) is allowed: only the pair move finds it.
    same = {("A", "A"): 0.0, ("B", "B"): 0.0}
    unit = {("A",): 1.0, ("B",): 0.5}
    free = {k: 0.0 for k in itertools.product("AB", repeat=3)}
    problem = Problem({v: ("A", "B") for v in "abc"},
                      (Factor(("a", "b"), same), Factor(("a",), unit), Factor(("b",), unit),
                       Factor(("a", "b", "c"), free)))
    got = solve(problem, max_table=1, start={"a": "A", "b": "A", "c": "A"})
    assert dict(got.choice) == {"a": "B", "b": "B", "c": "A"} and got.cost == 1.0
    # from a forbidden start, search still climbs to a finite (here optimal) choice
    got = solve(problem, max_table=1, start={"a": "A", "b": "B", "c": "B"})
    assert got.cost == 1.0


def test_ties_go_to_first_in_domain_order():
    d = {v: ("P", "Q", "R") for v in "xyz"}
    zero2 = {k: 0.0 for k in itertools.product("PQR", repeat=2)}
    chain = Problem(d, (Factor(("x", "y"), zero2), Factor(("y", "z"), zero2)))
    loop = Problem(d, chain.factors + (Factor(("z", "x"), zero2),))
    for problem, kwargs in ((chain, {}), (loop, {}), (loop, {"max_table": 1})):
        assert dict(solve(problem, **kwargs).choice) == {"x": "P", "y": "P", "z": "P"}


def test_infeasible_problems_name_the_culprit():
    d = {v: ("A", "B") for v in "xy"}
    with pytest.raises(ValueError, match="'conv 1'.*allows no combination"):
        solve(Problem(d, (Factor(("x",), {}, "conv 1"),)))
    with pytest.raises(ValueError, match="variable 'x'.*'only A'.*'only B'"):
        solve(Problem(d, (Factor(("x",), {("A",): 1.0}, "only A"),
                          Factor(("x",), {("B",): 1.0}, "only B"))))
    # each pair is satisfiable but the odd cycle x != y != z != x is not
    differ = {("A", "B"): 0.0, ("B", "A"): 0.0}
    triangle = Problem({v: ("A", "B") for v in "xyz"}, (
        Factor(("x", "y"), differ, "xy"), Factor(("y", "z"), differ, "yz"),
        Factor(("z", "x"), differ, "zx")))
    for kwargs in ({}, {"max_table": 1}):
        with pytest.raises(ValueError, match="finite.cost.*cannot all be avoided"):
            solve(triangle, **kwargs)


@pytest.mark.parametrize("make, message", [
    (lambda: Problem({"x": ()}, ()), "'x' has an empty domain"),
    (lambda: Problem({"x": ("A", "A")}, ()), "'x' has a repeated value"),
    (lambda: Problem({"x": ("A",)}, (Factor(("y",), {("A",): 1.0}, "f"),)),
     "'f'.*unknown variable 'y'"),
    (lambda: Problem({"x": ("A",)}, (Factor(("x",), {("B",): 1.0}, "f"),)),
     "'f'.*'B' is not in the domain of 'x'"),
    (lambda: Factor(("x",), {"A": 1.0}, "f"), "'f'.*not a tuple of 1"),
    (lambda: Factor(("x",), {("A",): math.nan}, "f"), "'f'.*not a number"),
    (lambda: Factor(("x", "x"), {}, "f"), "'f'.*appears twice"),
    (lambda: solve(Problem({"x": ("A",)}, ()), start={}), "start: missing variables \\['x'\\]"),
    (lambda: total_cost(Problem({"x": ("A",)}, ()), {"x": "Z"}), "'Z' is not in the domain"),
    (lambda: brute_force(Problem({f"v{i}": LAYOUTS for i in range(10)}, ())), "exceeds"),
])
def test_malformed_problems_raise(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_joint_optimum_beats_greedy_per_op_choice():
    """conv1's fastest output layout is NCHW8c, but conv2 is fast only on NHWC input, and
    converting between them costs more than conv1 gains: the joint optimum keeps NHWC."""
    d = {"conv1_out": ("NCHW8c", "NHWC"), "conv2_in": ("NCHW8c", "NHWC")}
    convert = {(a, b): (0.0 if a == b else 0.5) for a in d["conv1_out"] for b in d["conv2_in"]}
    problem = Problem(d, (
        Factor(("conv1_out",), {("NCHW8c",): 1.0, ("NHWC",): 1.2}, "conv1"),
        Factor(("conv2_in",), {("NCHW8c",): 1.6, ("NHWC",): 1.0}, "conv2"),
        Factor(("conv1_out", "conv2_in"), convert, "convert conv1_out->conv2_in")))
    greedy = {"conv1_out": "NCHW8c", "conv2_in": "NHWC"}
    assert total_cost(problem, greedy) == pytest.approx(2.5)
    for kwargs in ({}, {"max_table": 1, "start": greedy}):
        got = solve(problem, **kwargs)
        assert dict(got.choice) == {"conv1_out": "NHWC", "conv2_in": "NHWC"}
        assert got.cost == pytest.approx(2.2, abs=1e-12)
    # the same with a residual shortcut, so elimination (not the chain DP) solves it
    with_shortcut = Problem({**d, "sum": ("NHWC",)}, problem.factors + (
        Factor(("conv1_out", "conv2_in", "sum"), {k + ("NHWC",): 0.0 for k in convert}, "add"),
        Factor(("conv1_out", "sum"), {(a, "NHWC"): 0.0 for a in d["conv1_out"]}, "skip")))
    got = solve(with_shortcut)
    assert got.method == "elimination" and got.cost == pytest.approx(2.2, abs=1e-12)
    assert dict(got.choice) == {"conv1_out": "NHWC", "conv2_in": "NHWC", "sum": "NHWC"}
    assert hash(problem) == hash(Problem(d, problem.factors))   # frozen and hashable
    assert isinstance(got, Solution) and got == Solution(got.choice, got.cost, got.method, True)
