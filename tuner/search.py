"""Search strategies over one workload's JointSpace: what to measure next.

Entry points: RandomSearch, ModelSearch (cost-model-guided evolution in ALT's two stages),
make_search(kind, space, model, rng, ...). A strategy is a small lifecycle:
propose(n) -> [(Choice, stage)] of valid, never-measured choices; observe(choice, time_s or
None) after each measurement (None: it failed). The driver measures, records and schedules.

ModelSearch, as ALT tunes: stage "explore" moves layouts and loops jointly (mutations of the
best choices so far, some of them switching family, plus fresh random draws), ranked by the
cost model with a share of unranked picks so the model never starves itself of data; after
`explore_trials` trials it prunes layouts to the `keep_layouts` best measured ones and
"refine"s loops with each layout fixed. Warm-start choices (the best knobs of similar
workloads) go first when they are valid here.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

from tuner.cost_model import CostModel
from tuner.space import Choice, JointSpace

SEARCHES = ("model", "random")


class _Base:
    def __init__(self, space: JointSpace, rng, seeds: Sequence[Choice] = ()):
        self.space = space
        self.rng = rng
        self.measured: dict = {}   # Choice -> time_s (None: failed)
        self.seeds = [c for c in seeds if space.is_valid(c)]

    @property
    def trials(self) -> int:
        return len(self.measured)

    def observe(self, choice: Choice, time_s: Optional[float]) -> None:
        self.measured[choice] = time_s

    def best(self, k: int = 1, layouts: Optional[set] = None) -> list:
        ok = [(t, c) for c, t in self.measured.items() if t is not None
              and (layouts is None or self.space.layout_of(c) in layouts)]
        return [c for _, c in sorted(ok, key=lambda tc: tc[0])[:k]]

    def _take_seeds(self, n: int, taken: set) -> list:
        out = []
        while self.seeds and len(out) < n:
            c = self.seeds.pop(0)
            if c not in self.measured and c not in taken:
                out.append((c, "warm_start"))
                taken.add(c)
        return out


class RandomSearch(_Base):
    """Uniform valid draws: the baseline the model-guided search must beat at equal budget."""

    def propose(self, n: int) -> list:
        out, taken = [], set()
        for _ in range(n * 20):
            if len(out) >= n:
                break
            c = self.space.sample(self.rng)
            if c is not None and c not in self.measured and c not in taken:
                out.append((c, "random"))
                taken.add(c)
        return out


class ModelSearch(_Base):
    def __init__(self, space: JointSpace, rng, model: CostModel, seeds: Sequence[Choice] = (),
                 explore_trials: int = 24, keep_layouts: int = 2, pool: int = 256,
                 epsilon: float = 0.25):
        super().__init__(space, rng, seeds)
        self.model = model
        self.explore_trials = explore_trials
        self.keep_layouts = keep_layouts
        self.pool = pool
        self.epsilon = epsilon

    @property
    def stage(self) -> str:
        return "explore" if self.trials < self.explore_trials else "refine"

    def kept_layouts(self) -> set:
        """The layouts of the best measured choices, at most keep_layouts of them."""
        layouts: list = []
        for c in self.best(k=len(self.measured)):
            lay = self.space.layout_of(c)
            if lay not in layouts:
                layouts.append(lay)
            if len(layouts) == self.keep_layouts:
                break
        return set(layouts)

    def _pool(self, refine: bool) -> list:
        layouts = self.kept_layouts() if refine else None
        parents = self.best(k=8, layouts=layouts) or [self.space.default]
        out = set()
        for i in range(self.pool):
            if refine:
                if i % 4 == 0:
                    c = self.space.sample(self.rng, fixed_layout=parents[i % len(parents)])
                else:
                    c = self.space.mutate(parents[self.rng.integers(len(parents))], self.rng,
                                          loop_only=True)
            elif i % 3 == 0:
                c = self.space.sample(self.rng)
            else:
                c = self.space.mutate(parents[self.rng.integers(len(parents))], self.rng)
            if c is not None and c not in self.measured:
                out.add(c)
        return sorted(out, key=lambda c: c.key)  # a deterministic order for a given seed

    def propose(self, n: int) -> list:
        taken: set = set()
        out = self._take_seeds(n, taken)
        stage = self.stage
        pool = [c for c in self._pool(refine=stage == "refine") if c not in taken]
        if not pool:
            return out
        n_left = n - len(out)
        n_random = max(1, math.ceil(self.epsilon * n_left)) if self.model.fitted else n_left
        scores = self.model.predict([self.space.features(c) for c in pool])
        ranked = [pool[i] for i in sorted(range(len(pool)), key=lambda i: scores[i])]
        for c in ranked[:max(0, n_left - n_random)]:
            out.append((c, stage))
            taken.add(c)
        rest = [c for c in pool if c not in taken]
        for i in self.rng.permutation(len(rest))[:n - len(out)]:
            out.append((rest[i], stage))
        return out


def make_search(kind: str, space: JointSpace, model: CostModel, rng,
                seeds: Sequence[Choice] = ()):
    if kind == "random":
        return RandomSearch(space, rng, seeds=())
    if kind == "model":
        return ModelSearch(space, rng, model, seeds=seeds)
    raise ValueError(f"search={kind!r}: choose one of {SEARCHES}")
