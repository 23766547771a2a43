"""Which workload gets the next batch of trials: where the expected end-to-end gain is largest.

Entry points: TaskState, Trial, TaskScheduler(tasks, ...).next() / .update(task).
A workload's weight is its best time x multiplicity (its share of the model's time); its
expected gain per trial is that weight x its recent relative improvement per trial (with an
optimistic prior until it has had min_trials). A workload stops early when its last
`patience` trials improved its best by less than `min_gain` (or its space is exhausted).
(Ansor's task scheduler, minus the similarity term.)
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional


@dataclasses.dataclass
class Trial:
    """One measured candidate, as the driver and its listeners see it."""

    family: str
    knobs: Any
    layout: dict
    status: str
    median_s: Optional[float]
    heuristic: bool
    stage: str
    index: int   # position among this workload's trials (resumed runs continue the count)


@dataclasses.dataclass
class TaskState:
    """A workload being tuned."""

    workload: Any
    untuned_s: Optional[float] = None
    best: Optional[Trial] = None
    trials: int = 0
    done: bool = False
    history: list = dataclasses.field(default_factory=list)
    best_after: list = dataclasses.field(default_factory=list)  # best time after each trial
    # (untuned, best) medians of the latest confirmation pass (tuner.tune: the heuristic
    # and the best candidates re-timed together), and the choice keys it covered
    confirmed: Optional[tuple] = None
    confirmed_keys: frozenset = frozenset()

    @property
    def best_s(self) -> Optional[float]:
        return self.best.median_s if self.best else None

    @property
    def result(self) -> tuple:
        """(untuned, tuned) seconds: the confirmation pass's if the task has one (what
        optimize() will use), else the heuristic's and the best search trial's."""
        return self.confirmed or (self.untuned_s, self.best_s)

    def add(self, trial: Trial) -> None:
        self.history.append(trial)
        self.trials += 1
        if trial.heuristic and trial.median_s is not None:
            self.untuned_s = trial.median_s
        if trial.median_s is not None and (self.best is None or trial.median_s < self.best_s):
            self.best = trial
        self.best_after.append(self.best_s)


def whole_speedup(tasks) -> Optional[float]:
    """sum(untuned x multiplicity) / sum(tuned x multiplicity) over the tasks with both
    (TaskState.result)."""
    both = [(t.result, t.workload.multiplicity) for t in tasks if all(t.result)]
    if not both:
        return None
    return sum(u * m for (u, _), m in both) / sum(b * m for (_, b), m in both)


class TaskScheduler:
    def __init__(self, tasks: list, min_trials: int = 16, patience: int = 32,
                 min_gain: float = 0.01, window: int = 16, prior_rate: float = 0.02):
        self.tasks = tasks
        self.min_trials = min_trials
        self.patience = patience
        self.min_gain = min_gain
        self.window = window
        self.prior_rate = prior_rate

    def _rate(self, task: TaskState) -> float:
        """Relative improvement per trial over the last `window` trials."""
        hist = [t for t in task.best_after if t is not None]
        if task.trials < self.min_trials or len(hist) < 2:
            return self.prior_rate
        then = hist[-min(self.window, len(hist))]
        return max(0.0, (then - hist[-1]) / then) / min(self.window, len(hist))

    def priority(self, task: TaskState) -> float:
        weight = (task.best_s or 1e-3) * task.workload.multiplicity
        return weight * max(self._rate(task), 1e-4)

    def update(self, task: TaskState) -> None:
        """Marks task done when its last `patience` trials gained less than min_gain."""
        hist = [t for t in task.best_after if t is not None]
        if task.trials >= max(self.min_trials, self.patience) and len(hist) > self.patience:
            then = hist[-self.patience - 1]
            if (then - hist[-1]) / then < self.min_gain:
                task.done = True

    def next(self) -> Optional[TaskState]:
        live = [t for t in self.tasks if not t.done]
        if not live:
            return None
        return max(live, key=self.priority)
