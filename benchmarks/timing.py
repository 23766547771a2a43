"""The measurement protocol for benchmarks: warm up, then time implementations
interleaved round-robin in one process, and report medians and per-round ratios.

Entry points: MeasureConfig (frozen), check_close, interleaved(fns, config) -> {name: Timing},
median_ratio, geomean, OthersLoad (how much of the machine other processes took meanwhile).
"""
from __future__ import annotations

import dataclasses
import math
import os
import statistics
import time
from typing import Callable, Mapping

import jax
import numpy as np


@dataclasses.dataclass(frozen=True)
class MeasureConfig:
    warmup: int = 3            # calls per implementation before timing
    repeat: int = 15           # rounds; each round times every implementation once
    min_round_ms: float = 20.0 # calls per round are chosen so a round lasts at least this
    # Idle time before each implementation's round, so each starts on quiet cores.
    pause_ms: float = 5.0


@dataclasses.dataclass(frozen=True)
class Timing:
    seconds: tuple             # per-call seconds, one per round

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def low(self) -> float:
        return min(self.seconds)

    @property
    def high(self) -> float:
        return max(self.seconds)


class MismatchError(AssertionError):
    """An implementation's output differs from the reference: no time is reported for it."""


def check_close(name: str, got, want, rtol: float) -> float:
    """Max relative error of got vs want over all leaves; raises MismatchError above rtol."""
    err = 0.0
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
        err = max(err, float(np.abs(g - w).max(initial=0.0)) / max(1.0, float(np.abs(w).max(initial=0.0))))
    if not err <= rtol:
        raise MismatchError(f"{name}: output differs from the reference (rel err {err:.2e} > {rtol})")
    return err


def _call(fn: Callable, args) -> None:
    jax.block_until_ready(fn(*args))


def _calls_per_round(fn, args, min_round_ms: float) -> int:
    t0 = time.perf_counter()
    _call(fn, args)
    one = max(time.perf_counter() - t0, 1e-6)
    return max(1, int(math.ceil(min_round_ms / 1e3 / one)))


def interleaved(fns: Mapping[str, Callable], args, config: MeasureConfig = MeasureConfig()
                ) -> dict:
    """Times each fn(*args) round-robin; the host's noise hits all of them alike."""
    for fn in fns.values():
        for _ in range(config.warmup):
            _call(fn, args)
    number = {name: _calls_per_round(fn, args, config.min_round_ms) for name, fn in fns.items()}
    samples = {name: [] for name in fns}
    for r in range(config.repeat):
        order = list(fns.items())
        if r % 2:
            order.reverse()  # neither goes first every time
        for name, fn in order:
            time.sleep(config.pause_ms / 1e3)
            t0 = time.perf_counter()
            for _ in range(number[name]):
                _call(fn, args)
            samples[name].append((time.perf_counter() - t0) / number[name])
    return {name: Timing(tuple(s)) for name, s in samples.items()}


def median_ratio(base: Timing, other: Timing) -> float:
    """Median over rounds of base/other: > 1 means other is faster."""
    return statistics.median(b / o for b, o in zip(base.seconds, other.seconds))


def geomean(values) -> float:
    values = list(values)
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


def _machine_cpu_seconds() -> tuple:
    """(busy, steal) CPU seconds of the whole machine so far, from /proc/stat (Linux)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    hz = os.sysconf("SC_CLK_TCK")
    return (user + nice + system + irq + softirq) / hz, steal / hz


class OthersLoad:
    """How much of the machine others took while a block ran: CPU time of every other
    process plus the hypervisor's steal, as a share of (cores x wall time). A process
    that was timed while others held a core is told apart from one that was slow by
    itself."""

    def __enter__(self):
        self.t0 = time.perf_counter()
        self.own0 = sum(os.times()[:2])
        self.busy0, self.steal0 = _machine_cpu_seconds()
        return self

    def __exit__(self, *exc):
        wall = time.perf_counter() - self.t0
        own = sum(os.times()[:2]) - self.own0
        busy, steal = _machine_cpu_seconds()
        capacity = wall * (os.cpu_count() or 1)
        self.others_share = max(0.0, busy - self.busy0 - own) / capacity
        self.steal_share = (steal - self.steal0) / capacity
        return False
