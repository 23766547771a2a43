"""Fuzz suite: random convs, dot_generals, small programs around them, and the same with
inf / NaN / huge values, each run through alt_jax.optimize(min_flops=0, fallback="warn")
and compared with jax.jit on the same inputs.

A case passes when every output agrees with jax.jit: the same NaN, +inf and -inf positions,
and elsewhere |got - ref| <= RTOL * max|finite ref| + ATOL. Outcomes are tallied by kind:
ok on kernels, fallback (by reason, from the FallbackWarning messages), wrong, crash. A
wrong result or a crash fails the test with a standalone reproducer per case; a run that
sends too few ops to kernels fails too (the suite must not pass by leaving all to XLA).

Default run: a small sample per kind (~1 min with a warm kernel cache).
Slow run (pytest -m slow tests/test_fuzz.py -s): ALT_JAX_FUZZ_N cases in all (default 2000).
Environment: ALT_JAX_FUZZ_N (slow-run total), ALT_JAX_FUZZ_SEED (first seed, default 0),
ALT_JAX_FUZZ_POOL (structures per kind, default fuzz_programs.DEFAULT_POOL),
ALT_JAX_FUZZ_REPORT (write the tallies and failures there as JSON),
ALT_JAX_FUZZ_CACHE (a kernel cache directory kept across runs; default: the session's).
One case by hand: python tests/test_fuzz.py KIND SEED
"""
from __future__ import annotations

import collections
import dataclasses
import json
import os
import re
import sys
import traceback
import warnings

import jax
import numpy as np
import pytest

import alt_jax
from alt_jax import runtime
from alt_jax.planner import FallbackWarning

sys.path.insert(0, os.path.dirname(__file__))
import fuzz_programs  # noqa: E402

RTOL = 1e-4
ATOL = 1e-5
# Per kind in the default run: enough to cover each generator's branches, few kernels.
FAST_COUNTS = {"conv": 12, "dot": 12, "program": 16, "special": 10}
# Share of the slow run's total per kind.
SLOW_SHARES = {"conv": 0.3, "dot": 0.2, "program": 0.35, "special": 0.15}
# At least this share of conv/dot ops must run on kernels (fallbacks are allowed, but a
# suite that leaves everything to XLA tests nothing).
MIN_KERNEL_SHARE = 0.6


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


# ---------------------------------------------------------------------------------------
# Checking one case


@dataclasses.dataclass(frozen=True)
class Outcome:
    case: fuzz_programs.Case
    status: str                 # "ok-kernel" | "fallback" | "wrong" | "crash"
    fallbacks: tuple = ()       # normalised reasons, one per FallbackWarning
    ops: int = 0                # conv/dot ops the plan decided on
    on_kernel: int = 0          # of which on kernels
    detail: str = ""            # why wrong / the crash
    undetermined: int = 0       # output positions not compared (xla_undetermined)

    @property
    def failed(self) -> bool:
        return self.status in ("wrong", "crash")


def fallback_reason(message: str) -> str:
    """'conv_general_dilated: <reason>' from a FallbackWarning message, numbers and number
    tuples written as #, so that reasons group. Where every family declined, the last
    family's reason (the general one: conv2d, matmul) stands for all."""
    primitive = message.split()[1] if message.startswith("alt_jax:") else "?"
    reason = message.split("runs in XLA: ", 1)[-1].split("; ")[-1]
    reason = re.sub(r"(?<![A-Za-z_])-?[0-9][0-9.e+-]*", "#", reason)
    reason = re.sub(r"\([#, ()]*\)", "#", reason)
    return f"{primitive}: {reason[:120]}"


def _value_class(x):
    """0 finite, 1 NaN, 2 +inf, 3 -inf."""
    return np.select([np.isnan(x), np.isposinf(x), np.isneginf(x)], [1, 2, 3], 0)


def xla_undetermined(ref, ref_in_cond):
    """Positions where XLA's own answer depends on the context the same computation runs in.

    XLA rewrites some convs with non-IEEE algebra (a padded 1x1 conv becomes a multiply and
    a pad of the output: 0 where a conv forms 0 * inf = NaN) and whether it does depends on
    the surrounding program: the same conv gave 112 NaNs as a program and 52 inside a
    lax.cond branch (jax 0.10.2). Where the two disagree on NaN / inf / finite there is no
    answer of XLA's to compare with, and the position is not compared; where both are
    finite, both values stand (the tolerance covers them)."""
    ref, ref_in_cond = np.asarray(ref), np.asarray(ref_in_cond)
    return _value_class(ref) != _value_class(ref_in_cond)


def mismatch(got, ref, undetermined=None) -> str:
    """Empty when got agrees with ref (outside `undetermined`), else what differs."""
    got, ref = np.asarray(got), np.asarray(ref)
    if got.shape != ref.shape or got.dtype != ref.dtype:
        return f"shape/dtype {got.shape} {got.dtype} != {ref.shape} {ref.dtype}"
    if undetermined is not None and undetermined.any():
        got, ref = got[~undetermined], ref[~undetermined]
    for what, test in (("NaN", np.isnan), ("+inf", np.isposinf), ("-inf", np.isneginf)):
        differ = test(got) != test(ref)
        if differ.any():
            at = tuple(int(i) for i in np.argwhere(differ)[0])
            return (f"{what} positions differ at {int(differ.sum())} place(s), first {at}: "
                    f"got {got[at]!r} want {ref[at]!r}")
    finite = np.isfinite(ref)
    if not finite.any():
        return ""
    scale = float(np.abs(ref[finite]).max())
    with np.errstate(invalid="ignore", over="ignore"):
        err = np.where(finite, np.abs(got.astype(np.float64) - ref), 0.0)
    if err.max() > RTOL * scale + ATOL:
        at = tuple(int(i) for i in np.unravel_index(int(err.argmax()), err.shape))
        return (f"max |got - ref| = {err.max():.3g} at {at} (got {got[at]!r} want {ref[at]!r}), "
                f"tolerance {RTOL * scale + ATOL:.3g} (max|ref| {scale:.3g})")
    return ""


def check_case(case: fuzz_programs.Case, cache: runtime.KernelCache | None = None) -> Outcome:
    f, args = case.build()
    ref = jax.tree_util.tree_leaves(jax.jit(f)(*args))
    undetermined = [None] * len(ref)
    if case.kind == "special":  # XLA's answer for inf / NaN may depend on context: see above
        in_cond = jax.jit(lambda go, *a: jax.lax.cond(go, f, f, *a))(np.bool_(True), *args)
        undetermined = [xla_undetermined(r, c)
                        for r, c in zip(ref, jax.tree_util.tree_leaves(in_cond))]
    optimized = alt_jax.optimize(f, min_flops=0, fallback="warn",
                                 **({"cache": cache} if cache is not None else {}))
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = jax.tree_util.tree_leaves(jax.block_until_ready(optimized(*args)))
            plan = optimized.plan_for(*args)
    except Exception as e:  # a crash is an outcome to report, with its reproducer
        last = traceback.extract_tb(e.__traceback__)[-1]
        return Outcome(case, "crash", detail=f"{type(e).__name__}: {str(e)[:300]} "
                                             f"(at {os.path.basename(last.filename)}:{last.lineno})")
    fallbacks = tuple(fallback_reason(str(w.message)) for w in caught
                      if issubclass(w.category, FallbackWarning))
    counts = dict(ops=len(plan.decisions), on_kernel=len(plan.rewritten))
    if len(got) != len(ref):
        return Outcome(case, "wrong", fallbacks, **counts,
                       detail=f"{len(got)} outputs, want {len(ref)}")
    for i, (g, r, u) in enumerate(zip(got, ref, undetermined)):
        why = mismatch(g, r, u)
        if why:
            return Outcome(case, "wrong", fallbacks, **counts, detail=f"output {i}: {why}")
    skipped = sum(int(u.sum()) for u in undetermined if u is not None)
    return Outcome(case, "fallback" if fallbacks else "ok-kernel", fallbacks, **counts,
                   undetermined=skipped)


# ---------------------------------------------------------------------------------------
# Tallies


@dataclasses.dataclass
class Tally:
    outcomes: list = dataclasses.field(default_factory=list)

    def add(self, outcome: Outcome) -> None:
        self.outcomes.append(outcome)

    @property
    def failures(self) -> list:
        return [o for o in self.outcomes if o.failed]

    def summary(self) -> dict:
        by_kind: dict = collections.defaultdict(collections.Counter)
        reasons: collections.Counter = collections.Counter()
        for o in self.outcomes:
            by_kind[o.case.kind][o.status] += 1
            reasons.update(o.fallbacks)
        ops = sum(o.ops for o in self.outcomes if not o.failed)
        on_kernel = sum(o.on_kernel for o in self.outcomes if not o.failed)
        return {"cases": len(self.outcomes),
                "undetermined_positions": {
                    "cases": sum(1 for o in self.outcomes if o.undetermined),
                    "positions": sum(o.undetermined for o in self.outcomes)},
                "by_kind": {k: dict(v) for k, v in sorted(by_kind.items())},
                "fallback_reasons": dict(reasons.most_common()),
                "ops": ops, "ops_on_kernel": on_kernel,
                "failures": [{"case": f"{o.case.kind}:{o.case.seed}", "status": o.status,
                              "summary": o.case.summary, "detail": o.detail}
                             for o in self.failures]}

    def report(self) -> str:
        s = self.summary()
        lines = [f"fuzz: {s['cases']} cases, {s['ops_on_kernel']}/{s['ops']} conv/dot ops on "
                 f"kernels (in cases that did not fail)"]
        lines += [f"  {kind}: {counts}" for kind, counts in s["by_kind"].items()]
        u = s["undetermined_positions"]
        lines.append(f"  XLA-undetermined output positions not compared: {u['positions']} "
                     f"in {u['cases']} case(s)")
        lines += [f"  fallback x{n}: {reason}" for reason, n in s["fallback_reasons"].items()]
        return "\n".join(lines)

    def failure_text(self, limit: int = 8) -> str:
        parts = [f"{o.status.upper()} {o.case.kind}:{o.case.seed} {o.case.summary}\n"
                 f"  {o.detail}" for o in self.failures]
        repros = [o.case.repro() for o in self.failures[:limit]]
        return "\n".join(parts) + "\n\nreproducers:\n" + "\n".join(repros)


def run_cases(kind_counts: dict, cache, first_seed: int, pool: int) -> Tally:
    tally = Tally()
    for kind, count in kind_counts.items():
        for case in fuzz_programs.cases(kind, count, first_seed, pool):
            tally.add(check_case(case, cache))
    return tally


_REPORTS: dict = {}  # test name -> summary, for ALT_JAX_FUZZ_REPORT (all tests of the run)


def finish(tally: Tally, name: str) -> None:
    """Print and (if asked) write the tallies; fail on wrong results, crashes, or too few
    ops on kernels."""
    print("\n" + tally.report())
    path = os.environ.get("ALT_JAX_FUZZ_REPORT")
    if path:
        _REPORTS[name] = tally.summary()
        with open(path, "w") as out:
            json.dump(_REPORTS, out, indent=1)
    assert not tally.failures, (f"{len(tally.failures)} of {len(tally.outcomes)} fuzz cases "
                                f"failed:\n{tally.failure_text()}")
    s = tally.summary()
    assert s["ops_on_kernel"] >= MIN_KERNEL_SHARE * s["ops"], (
        f"only {s['ops_on_kernel']} of {s['ops']} conv/dot ops ran on kernels\n"
        f"{tally.report()}")


@pytest.fixture(scope="module")
def fuzz_cache(kernel_cache):
    kept = os.environ.get("ALT_JAX_FUZZ_CACHE")
    return runtime.KernelCache(kept) if kept else kernel_cache


def _first_seed() -> int:
    return _env_int("ALT_JAX_FUZZ_SEED", 0)


def _pool() -> int:
    return _env_int("ALT_JAX_FUZZ_POOL", fuzz_programs.DEFAULT_POOL)


# ---------------------------------------------------------------------------------------
# Tests


@pytest.mark.parametrize("kind", fuzz_programs.KINDS)
def test_random_cases_agree_with_jit(fuzz_cache, kind):
    finish(run_cases({kind: FAST_COUNTS[kind]}, fuzz_cache, _first_seed(), _pool()), kind)


@pytest.mark.slow
def test_many_random_cases_agree_with_jit(fuzz_cache):
    total = _env_int("ALT_JAX_FUZZ_N", 2000)
    counts = {kind: max(1, round(total * share)) for kind, share in SLOW_SHARES.items()}
    finish(run_cases(counts, fuzz_cache, _first_seed(), _pool()), "slow")


# The checker itself: it must see what it is there to see.

def test_mismatch_flags_wrong_values_and_special_value_positions():
    ref = np.array([1.0, np.nan, np.inf, -np.inf, 100.0], np.float32)
    assert mismatch(ref.copy(), ref) == ""
    for i, bad in ((0, 1.1), (1, 0.0), (2, np.nan), (3, np.inf), (4, np.inf), (0, np.nan)):
        got = ref.copy()
        got[i] = bad
        assert mismatch(got, ref), (i, bad)
    close = ref.copy()
    close[0] += 0.5 * RTOL * 100.0
    assert mismatch(close, ref) == ""
    assert mismatch(ref[:4], ref)


def test_cases_are_reproducible_from_kind_and_seed():
    for kind in fuzz_programs.KINDS:
        a, b = fuzz_programs.make_case(kind, 7), fuzz_programs.make_case(kind, 7)
        assert a == b
        (_, xa), (_, xb) = a.build(), b.build()
        for u, v in zip(xa, xb):
            np.testing.assert_array_equal(u, v)
        assert fuzz_programs.make_case(kind, 8).code != a.code


def test_check_case_reports_a_wrong_kernel_as_wrong(fuzz_cache, monkeypatch):
    """A kernel whose result is off must show up as "wrong", not pass: corrupt the
    lowering of the matmul family and check a dot case."""
    from alt_jax.ops import registry

    family = registry.families_for(jax.lax.dot_general_p)[0]
    lower = family.lower

    def off_by_one(spec, kernel, ops, **kw):
        return [y + 1.0 for y in lower(spec, kernel, ops, **kw)]
    monkeypatch.setattr(family, "lower", off_by_one)
    case = fuzz_programs.Case("dot", 0, "dot 8x16 @ 16x4", fuzz_programs.HEADER + (
        "rng = np.random.default_rng(0)\n"
        "x = rng.standard_normal((8, 16)).astype(np.float32)\n"
        "w = rng.standard_normal((16, 4)).astype(np.float32)\n"
        "def f(x, w):\n    return x @ w\nargs = (x, w)\n"))
    outcome = check_case(case, fuzz_cache)
    assert outcome.status == "wrong" and outcome.on_kernel == 1, outcome


if __name__ == "__main__":
    one = fuzz_programs.make_case(sys.argv[1], int(sys.argv[2]), _pool())
    print(one.repro())
    print(check_case(one))


def test_only_positions_where_xla_disagrees_with_itself_go_uncompared():
    ref = np.array([np.nan, 0.0, 1.0, np.inf, 2.0], np.float32)
    in_cond = np.array([0.0, 0.0, 1.0 + 1e-7, np.inf, np.nan], np.float32)
    undetermined = xla_undetermined(ref, in_cond)
    assert undetermined.tolist() == [True, False, False, False, True]
    got = np.array([0.0, 0.0, 1.0, np.inf, 7.0], np.float32)
    assert mismatch(got, ref, undetermined) == ""
    assert "NaN" in mismatch(got, ref)
    got[2] = 5.0  # a determined position still counts
    assert mismatch(got, ref, undetermined)
