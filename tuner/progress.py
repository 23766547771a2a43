"""Tuning progress on a terminal: two tqdm bars driven by the driver's Listener hooks.

Entry points: ProgressBars(enabled, stream) (a tune.Listener), bars_wanted(force, stream).
Bar 1: trials of the whole run / the trial budget, with the whole model's untuned / best
speedup (then which op the confirmation pass has re-timed); bar 2: the workload being
tuned, its trials and best time so far.
"""
from __future__ import annotations

import sys
import warnings
from typing import Optional

from tuner.report import format_ms, short_label
from tuner.scheduler import whole_speedup
from tuner.tune import Listener


def bars_wanted(force: Optional[bool], stream=None) -> bool:
    """force True/False wins; otherwise bars only when the stream they draw on is a terminal
    (a log file or a pipe would get carriage-return garbage)."""
    if force is not None:
        return force
    stream = stream or sys.stderr
    return bool(getattr(stream, "isatty", lambda: False)())


class ProgressBars(Listener):
    """Does nothing when disabled (or when tqdm is missing: one warning)."""

    def __init__(self, enabled: bool, stream=None):
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tqdm = None
        if enabled:
            try:
                from tqdm import tqdm
                self.tqdm = tqdm
            except ImportError:
                warnings.warn("tqdm is not installed (pip install tqdm, or "
                              "pip install 'alt_jax[tune]'): no progress bars")
                self.enabled = False
        self.tasks: list = []
        self.overall = None
        self.current = None
        self.current_key = None

    def on_start(self, tasks, options) -> None:
        self.tasks = list(tasks)
        if not self.enabled:
            return
        done = sum(t.trials for t in self.tasks)
        self.overall = self.tqdm(total=options.trials, initial=min(done, options.trials),
                                 desc=f"{len(self.tasks)} ops", unit="trial", position=0,
                                 file=self.stream, dynamic_ncols=True, leave=True)
        self._overall_postfix()

    def _overall_postfix(self) -> None:
        s = whole_speedup(self.tasks)
        self.overall.set_postfix_str("whole model " + (f"{s:.2f}x" if s else "-")
                                     + " vs untuned", refresh=False)

    def on_trial(self, task, trial) -> None:
        if not self.enabled:
            return
        if task.workload.op_key != self.current_key:
            if self.current is not None:
                self.current.close()
            label = short_label(task.workload.label)
            label = label if len(label) <= 48 else label[:47] + "…"
            self.current = self.tqdm(total=None, initial=task.trials - 1,
                                     desc=f"op {self._number(task)} {label}",
                                     unit="trial", position=1, file=self.stream,
                                     dynamic_ncols=True, leave=False)
            self.current_key = task.workload.op_key
        self.current.update(1)
        self.current.set_postfix_str(f"best {format_ms(task.best_s)} ms", refresh=False)
        self.current.refresh()  # a trial takes ~0.1-1 s: every one is worth drawing
        if self.overall.n < self.overall.total:
            self.overall.update(1)
        self._overall_postfix()
        self.overall.refresh()

    def on_confirm(self, task) -> None:
        if not self.enabled:
            return
        if self.current is not None:  # the search's per-op bar is done
            self.current.close()
            self.current, self.current_key = None, None
        self.overall.set_description_str(f"confirmed op {self._number(task)}", refresh=False)
        self._overall_postfix()
        self.overall.refresh()

    def _number(self, task) -> str:
        """'i/n': task's place among the run's tasks."""
        index = next((i for i, t in enumerate(self.tasks, 1) if t is task), 0)
        return f"{index}/{len(self.tasks)}"

    def close(self) -> None:
        for bar in (self.current, self.overall):
            if bar is not None:
                bar.close()
        self.current = self.overall = None
        self.current_key = None

    def on_finish(self, summary) -> None:
        self.close()
