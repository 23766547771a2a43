"""The optimisation core of the graph-level layout tuner: choose one value per variable (each
tensor's layout) so that the sum of cost terms (kernel times + conversion times) is lowest.

Entry points: Factor, Problem, Solution, solve(problem, max_table, start), solve_chain,
is_chain, total_cost, brute_force.
It knows nothing about jax: a program becomes a discrete min-sum problem (ALT, EuroSys '23,
picks layouts for the whole graph, not op by op, because the fastest kernel for one op may
force an expensive conversion on its consumer). solve() is exact when it can be: a straight
chain of ops by Viterbi-style DP, a branchy graph (residual blocks, concatenations) by bucket
elimination while its tables stay small; past that, iterated conditional modes from a start
(today's fixed layout rule), which never returns anything worse than that start.
A table entry that is missing (or infinite) means the combination is forbidden.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Hashable, Iterable, Mapping, Optional

INF = math.inf
BRUTE_FORCE_LIMIT = 200_000
_MAX_SWEEPS = 1000   # ICM strictly improves each sweep, so this only guards float pathologies


class _FrozenMap(Mapping):
    """A read-only mapping that hashes, so the frozen dataclasses below stay hashable."""

    def __init__(self, items: Iterable = ()):
        self._items = dict(items)

    def __getitem__(self, key):
        return self._items[key]

    def __iter__(self):
        return iter(self._items)

    def __len__(self):
        return len(self._items)

    def __hash__(self):
        return hash(frozenset(self._items.items()))

    def __repr__(self):
        return repr(self._items)


@dataclasses.dataclass(frozen=True)
class Factor:
    """A cost term over some variables: table maps a tuple of values (one per var, in vars'
    order) to a cost in seconds. A combination missing from the table is forbidden (infinite
    cost): a kernel that cannot take that layout, or a conversion nobody implements."""
    vars: tuple[str, ...]
    table: Mapping[tuple, float]
    label: str = ""   # what the term is ("conv2d eqn 3", "convert x NHWC->NCHW8c"): for errors

    def __post_init__(self):
        object.__setattr__(self, "vars", tuple(self.vars))
        object.__setattr__(self, "table", _FrozenMap(self.table.items()))
        if len(set(self.vars)) != len(self.vars):
            raise ValueError(f"{self.name()}: a variable appears twice in {self.vars}")
        for key, cost in self.table.items():
            if not isinstance(key, tuple) or len(key) != len(self.vars):
                raise ValueError(f"{self.name()}: key {key!r} is not a tuple of "
                                 f"{len(self.vars)} values (one per var)")
            if not isinstance(cost, (int, float)) or math.isnan(cost) or cost == -INF:
                raise ValueError(f"{self.name()}: cost {cost!r} for {key!r} is not a number "
                                 "or +inf")

    def name(self) -> str:
        return f"factor {self.label or '(unlabelled)'!r} over {self.vars}"

    def cost(self, choice: Mapping[str, Hashable]) -> float:
        return self.table.get(tuple(choice[v] for v in self.vars), INF)


@dataclasses.dataclass(frozen=True)
class Problem:
    """Variables with candidate values (first = preferred on ties) and the cost terms over
    them. Checked on construction, so every solver may trust it."""
    domains: Mapping[str, tuple]
    factors: tuple[Factor, ...]

    def __post_init__(self):
        object.__setattr__(self, "domains",
                           _FrozenMap((v, tuple(d)) for v, d in self.domains.items()))
        object.__setattr__(self, "factors", tuple(self.factors))
        for var, domain in self.domains.items():
            if not domain:
                raise ValueError(f"variable {var!r} has an empty domain")
            if len(set(domain)) != len(domain):
                raise ValueError(f"variable {var!r} has a repeated value in {domain}")
        for factor in self.factors:
            if not isinstance(factor, Factor):
                raise ValueError(f"{factor!r} is not a Factor")
            for var in factor.vars:
                if var not in self.domains:
                    raise ValueError(f"{factor.name()}: unknown variable {var!r}")
            for key in factor.table:
                for var, value in zip(factor.vars, key):
                    if value not in self.domains[var]:
                        raise ValueError(f"{factor.name()}: value {value!r} is not in the "
                                         f"domain of {var!r} {self.domains[var]}")


@dataclasses.dataclass(frozen=True)
class Solution:
    """The chosen value of every variable, its total cost, and how it was found: exact says
    whether it is proven optimal (chain-dp, elimination, brute-force) or only a local optimum
    (local-search), so a caller can report which."""
    choice: Mapping[str, Hashable]
    cost: float
    method: str   # "chain-dp" | "elimination" | "local-search" | "brute-force"
    exact: bool

    def __post_init__(self):
        object.__setattr__(self, "choice", _FrozenMap(self.choice.items()))


def _check_assignment(problem: Problem, choice: Mapping, what: str) -> None:
    missing = [v for v in problem.domains if v not in choice]
    extra = [v for v in choice if v not in problem.domains]
    if missing or extra:
        raise ValueError(f"{what}: missing variables {missing}, unknown variables {extra}")
    for var, value in choice.items():
        if value not in problem.domains[var]:
            raise ValueError(f"{what}: {value!r} is not in the domain of {var!r}")


def total_cost(problem: Problem, choice: Mapping[str, Hashable]) -> float:
    """The sum of all factors' costs at choice; inf if any factor forbids it."""
    _check_assignment(problem, choice, "choice")
    return sum(f.cost(choice) for f in problem.factors)


def is_chain(problem: Problem) -> Optional[list[str]]:
    """The variables in path order when every factor has <= 2 vars and the interaction graph
    is a set of disjoint simple paths (isolated variables included), else None. Paths follow
    one another; consecutive variables of different paths simply share no factor."""
    if any(len(f.vars) > 2 for f in problem.factors):
        return None
    neighbours = {v: set() for v in problem.domains}
    for f in problem.factors:
        if len(f.vars) == 2:
            a, b = f.vars
            neighbours[a].add(b)
            neighbours[b].add(a)
    if any(len(n) > 2 for n in neighbours.values()):
        return None
    order, seen = [], set()
    for var in problem.domains:   # a path starts at an end: degree <= 1; a cycle has none
        if var in seen or len(neighbours[var]) == 2:
            continue
        previous, current = None, var
        while current is not None:
            order.append(current)
            seen.add(current)
            following = [n for n in neighbours[current] if n != previous]
            previous, current = current, (following[0] if following else None)
    return order if len(order) == len(neighbours) else None   # leftovers lie on cycles


def solve_chain(problem: Problem, order: list[str]) -> Solution:
    """Exact DP along the path(s) in order (as is_chain returns it): eliminating the variables
    front to back is Viterbi, each step a table of |domain|^2 entries."""
    if sorted(order) != sorted(problem.domains):
        raise ValueError(f"order {order} is not a permutation of the variables")
    position = {v: i for i, v in enumerate(order)}
    for f in problem.factors:
        if len(f.vars) > 2 or (len(f.vars) == 2
                               and abs(position[f.vars[0]] - position[f.vars[1]]) != 1):
            raise ValueError(f"{f.name()} does not join neighbours of order {order}")
    choice = _eliminate(problem, order)
    return Solution(choice, total_cost(problem, choice), "chain-dp", True)


def _elimination_order(problem: Problem, max_table: int) -> Optional[list[str]]:
    """Greedy min-fill order (ties: smaller table, then variable order), or None when some
    table it would enumerate (a variable with its neighbours) exceeds max_table entries."""
    neighbours = {v: set() for v in problem.domains}
    for f in problem.factors:
        for a, b in itertools.permutations(f.vars, 2):
            neighbours[a].add(b)
    index = {v: i for i, v in enumerate(problem.domains)}
    order = []
    while neighbours:
        def rank(var):
            near = neighbours[var]
            fill = sum(1 for a, b in itertools.combinations(near, 2) if b not in neighbours[a])
            size = math.prod(len(problem.domains[v]) for v in near | {var})
            return fill, size, index[var], var
        _, size, _, var = min(rank(v) for v in neighbours)
        if size > max_table:
            return None
        for a, b in itertools.permutations(neighbours[var], 2):
            neighbours[a].add(b)
        for n in neighbours.pop(var):
            neighbours[n].discard(var)
        order.append(var)
    return order


def _eliminate(problem: Problem, order: list[str]) -> dict:
    """Min-sum bucket elimination in order, then the argmin by back-substitution. Tables are
    sparse dicts: a missing key is a forbidden (infinite-cost) combination."""
    pool = [(f.vars, f.table) for f in problem.factors]
    steps = []   # (var, the scope of its message, scope values -> var's best value)
    for var in order:
        bucket = [t for t in pool if var in t[0]]
        pool = [t for t in pool if var not in t[0]]
        scope = tuple(v for v in problem.domains if v != var and any(v in s for s, _ in bucket))
        joint = scope + (var,)
        picks = [tuple(joint.index(v) for v in s) for s, _ in bucket]
        message, best = {}, {}
        for key in itertools.product(*(problem.domains[v] for v in scope)):
            best_cost, best_value = INF, None
            for value in problem.domains[var]:   # strict < keeps the first in domain order
                full = key + (value,)
                cost = sum(table.get(tuple(full[i] for i in pick), INF)
                           for pick, (_, table) in zip(picks, bucket))
                if cost < best_cost:
                    best_cost, best_value = cost, value
            if best_value is not None:
                message[key], best[key] = best_cost, best_value
        pool.append((scope, message))
        steps.append((var, scope, best))
    if sum(table.get((), INF) for _, table in pool) == INF:
        raise _infeasible(problem, "no assignment has finite cost")
    choice = {}
    for var, scope, best in reversed(steps):   # scope's variables were eliminated later
        choice[var] = best[tuple(choice[v] for v in scope)]
    return {v: choice[v] for v in problem.domains}


def _infeasible(problem: Problem, headline: str) -> ValueError:
    """A ValueError naming what forbids everything: a factor with no finite entry, or a
    variable none of whose values every factor on it allows; else the constraining factors."""
    empty = [f.name() for f in problem.factors if not any(c < INF for c in f.table.values())]
    if empty:
        return ValueError(f"{headline}: {'; '.join(empty)} allows no combination")
    for var, domain in problem.domains.items():
        allowed, blockers = set(domain), []
        for f in problem.factors:
            if var in f.vars:
                i = f.vars.index(var)
                values = {k[i] for k, c in f.table.items() if c < INF}
                if not allowed <= values:
                    blockers.append(f.name())
                allowed &= values
        if not allowed:
            return ValueError(f"{headline}: no value of variable {var!r} is allowed by all of "
                              f"{'; '.join(blockers)}")
    partial = [f.name() for f in problem.factors
               if len(f.table) < math.prod(len(problem.domains[v]) for v in f.vars)
               or any(c == INF for c in f.table.values())]
    return ValueError(f"{headline}: the forbidden combinations of {'; '.join(partial[:5])}"
                      f"{' ...' if len(partial) > 5 else ''} cannot all be avoided together")


def _unary_start(problem: Problem) -> dict:
    """Each variable's cheapest value by its single-variable terms alone (the greedy,
    op-by-op choice), ties to the first in domain order."""
    def unary(var, value):
        return sum(f.table.get((value,), INF) for f in problem.factors if f.vars == (var,))
    return {var: min(domain, key=lambda value: unary(var, value))
            for var, domain in problem.domains.items()}


def _score(factors: list[Factor], choice: Mapping) -> tuple[int, float]:
    """(forbidden terms, sum of the finite ones): lets local search climb out of an infeasible
    start, fewer forbidden terms first."""
    costs = [f.cost(choice) for f in factors]
    return sum(c == INF for c in costs), sum(c for c in costs if c < INF)


def _better(a: tuple[int, float], b: tuple[int, float]) -> bool:
    # a margin, so float rounding between local and total sums can never make moves cycle
    return a[0] < b[0] or (a[0] == b[0] and a[1] < b[1] - 1e-12 * max(1.0, abs(b[1])))


def _move(problem: Problem, choice: dict, variables: tuple, factors: list[Factor]) -> bool:
    """Set variables to their jointly best values given the rest; True if that improved."""
    current = tuple(choice[v] for v in variables)
    best, best_score = current, _score(factors, choice)
    for values in itertools.product(*(problem.domains[v] for v in variables)):
        choice.update(zip(variables, values))
        score = _score(factors, choice)
        if _better(score, best_score):
            best, best_score = values, score
    choice.update(zip(variables, best))
    return best != current


def _local_search(problem: Problem, start: Mapping) -> dict:
    """Iterated conditional modes: best single-variable moves, then best moves of pairs that
    share a factor (a layout change that pays only with its conversion), until none helps."""
    touching = {v: [f for f in problem.factors if v in f.vars] for v in problem.domains}
    pairs = list(dict.fromkeys(p for f in problem.factors
                               for p in itertools.combinations(f.vars, 2)))
    choice = dict(start)
    for _ in range(_MAX_SWEEPS):
        improved = False
        for var in problem.domains:
            improved |= _move(problem, choice, (var,), touching[var])
        for a, b in pairs:
            near = list(dict.fromkeys(touching[a] + touching[b]))
            improved |= _move(problem, choice, (a, b), near)
        if not improved:
            break
    return choice


def solve(problem: Problem, max_table: int = 1_000_000,
          start: Optional[Mapping[str, Hashable]] = None) -> Solution:
    """The cheapest choice: exact by chain DP or bucket elimination while no table exceeds
    max_table entries; else local search from start (default: the unary-greedy choice), whose
    result never costs more than start. Raises ValueError if no finite-cost choice is found."""
    if start is not None:
        _check_assignment(problem, start, "start")
    order = is_chain(problem)
    if order is not None:
        return solve_chain(problem, order)
    order = _elimination_order(problem, max_table)
    if order is not None:
        choice = _eliminate(problem, order)
        return Solution(choice, total_cost(problem, choice), "elimination", True)
    start = dict(start) if start is not None else _unary_start(problem)
    choice = _local_search(problem, start)
    cost, start_cost = total_cost(problem, choice), total_cost(problem, start)
    if cost > start_cost:   # only float rounding could do this; the promise is never worse
        choice, cost = start, start_cost
    if cost == INF:
        raise _infeasible(problem, "local search found no finite-cost assignment "
                                   "(the problem may be infeasible; try a feasible start)")
    return Solution(choice, cost, "local-search", False)


def brute_force(problem: Problem) -> Solution:
    """Every assignment, for tests and tiny problems; ties to the first in domain order."""
    count = math.prod(len(d) for d in problem.domains.values())
    if count > BRUTE_FORCE_LIMIT:
        raise ValueError(f"brute force over {count} assignments exceeds {BRUTE_FORCE_LIMIT}")
    names = list(problem.domains)
    best, best_cost = None, INF
    for values in itertools.product(*problem.domains.values()):
        choice = dict(zip(names, values))
        cost = sum(f.cost(choice) for f in problem.factors)
        if cost < best_cost:
            best, best_cost = choice, cost
    if best is None:
        raise _infeasible(problem, "no assignment has finite cost")
    return Solution(best, best_cost, "brute-force", True)
