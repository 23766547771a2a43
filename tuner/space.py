"""The joint space of one workload: every family that can compute it, each with its knobs'
Space (alt_jax/ops/base.py), and how the search moves in it.

Entry points: Choice (family + knobs, hashable), JointSpace(workload, isa, mode).sample /
.mutate / .is_valid / .layout_of / .features / .default, MODES.
In "joint" mode a choice may switch family (Winograd vs direct) and move any axis; in
"loop_only" mode (the ablation) only the heuristic's family is used, its layout axes pinned
to the heuristic's values, so only loop axes move.
"""
from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Optional

from alt_jax.ops import registry
from alt_jax.records import knobs_as_json
from alt_jax.ops.base import KnobError

MODES = ("joint", "loop_only")


@dataclasses.dataclass(frozen=True)
class Choice:
    """One candidate: a family and its knobs (layout and loop decisions together)."""

    family: str
    knobs: Any

    @property
    def key(self) -> str:
        """Identity across processes: what records and resumes compare."""
        return json.dumps({"family": self.family, "knobs": knobs_as_json(self.knobs)},
                          sort_keys=True)


@dataclasses.dataclass(frozen=True)
class _Part:
    family: Any
    spec: Any
    space: Any


class JointSpace:
    """Candidates for one workload. `families` maps names to family objects (default: the
    registry's); the workload's candidates say which families can compute it."""

    def __init__(self, workload, isa, mode: str = "joint", families: Optional[dict] = None):
        if mode not in MODES:
            raise ValueError(f"mode={mode!r}: choose one of {MODES}")
        families = families or registry.families_by_name()
        self.workload, self.isa, self.mode = workload, isa, mode
        names = [workload.preferred] if mode == "loop_only" else \
            [name for name, _ in workload.candidates]
        self.parts = {}
        for name in names:
            family, spec = families[name], workload.spec_of(name)
            self.parts[name] = _Part(family, spec, family.space(spec, isa))
        preferred = self.parts[workload.preferred]
        self.default = Choice(workload.preferred,
                              preferred.family.default_knobs(preferred.spec, isa))
        # loop_only: the heuristic's layout decisions stay fixed
        self.pinned = (preferred.space.layout_of(self.default.knobs)
                       if mode == "loop_only" else {})

    # ---- queries ----
    @property
    def size(self) -> int:
        """Points in the cross products (legal or not), summed over families."""
        if self.mode == "loop_only":
            part = self.parts[self.workload.preferred]
            return math.prod(len(part.space.axis(n).values) for n in part.space.names("loop"))
        return sum(p.space.size for p in self.parts.values())

    def spec(self, choice: Choice):
        return self.parts[choice.family].spec

    def family(self, choice: Choice):
        return self.parts[choice.family].family

    def is_valid(self, choice: Choice) -> bool:
        part = self.parts.get(choice.family)
        if part is None:
            return False
        if any(getattr(choice.knobs, k) != v for k, v in self.pinned.items()):
            return False
        try:
            part.family.validate(part.spec, choice.knobs, self.isa)
        except KnobError:
            return False
        return True

    def layout_of(self, choice: Choice) -> tuple:
        """The layout decisions: family plus its layout axes' values (hashable)."""
        layout = self.parts[choice.family].space.layout_of(choice.knobs)
        return (choice.family, tuple(sorted(layout.items())))

    def layout_dict(self, choice: Choice) -> dict:
        return dict(self.parts[choice.family].space.layout_of(choice.knobs))

    # ---- moves ----
    def _free_axes(self, family: str, loop_only: bool):
        space = self.parts[family].space
        return [a for a in space.axes
                if a.name not in self.pinned and not (loop_only and a.kind == "layout")]

    def sample(self, rng, family: Optional[str] = None, fixed_layout: Optional[Choice] = None,
               tries: int = 200) -> Optional[Choice]:
        """A uniformly drawn valid choice (None if none turned up in `tries` draws).
        fixed_layout: keep that choice's family and layout axes, draw loop axes only."""
        for _ in range(tries):
            if fixed_layout is not None:
                name = fixed_layout.family
                values = self.parts[name].space.values_of(fixed_layout.knobs)
                for axis in self._free_axes(name, loop_only=True):
                    values[axis.name] = axis.values[rng.integers(len(axis.values))]
            else:
                names = list(self.parts)
                name = family or names[rng.integers(len(names))]
                space = self.parts[name].space
                values = {a.name: a.values[rng.integers(len(a.values))] for a in space.axes}
                values.update(self.pinned)
            choice = Choice(name, self.parts[name].space.make(values))
            if self.is_valid(choice):
                return choice
        return None

    def mutate(self, choice: Choice, rng, loop_only: bool = False,
               tries: int = 50) -> Optional[Choice]:
        """A valid neighbour: one or two free axes moved (mostly to an adjacent value); in
        joint exploration, sometimes another family altogether."""
        if not loop_only and len(self.parts) > 1 and rng.random() < 0.1:
            others = [n for n in self.parts if n != choice.family]
            return self.sample(rng, family=others[rng.integers(len(others))])
        space = self.parts[choice.family].space
        axes = self._free_axes(choice.family, loop_only)
        if not axes:
            return None
        for _ in range(tries):
            values = space.values_of(choice.knobs)
            for axis in [axes[i] for i in rng.choice(len(axes), size=min(len(axes),
                                                                          1 + (rng.random() < 0.3)),
                                                     replace=False)]:
                current = values[axis.name]
                idx = axis.values.index(current) if current in axis.values else None
                if idx is not None and rng.random() < 0.7 and len(axis.values) > 1:
                    step = 1 if rng.random() < 0.5 else -1
                    values[axis.name] = axis.values[(idx + step) % len(axis.values)]
                else:
                    values[axis.name] = axis.values[rng.integers(len(axis.values))]
            new = Choice(choice.family, space.make(values))
            if new != choice and self.is_valid(new):
                return new
        return None

    # ---- the cost model's view ----
    def features(self, choice: Choice) -> dict:
        """Named numeric features of a choice and its workload (for a model shared by all
        workloads): the workload's size, the family, every knob value (strings as their
        index on the axis; trees only need an order)."""
        w = self.workload
        part = self.parts[choice.family]
        out = {"log_flops": math.log2(max(1, w.flops)),
               "log_out": math.log2(max(1, math.prod(w.operand_shapes[0]))),
               "log_rhs": math.log2(max(1, math.prod(w.operand_shapes[1]))),
               f"family={choice.family}": 1.0}
        for axis in part.space.axes:
            v = getattr(choice.knobs, axis.name)
            if isinstance(v, str):
                v = axis.values.index(v) if v in axis.values else -1
            out[f"{choice.family}.{axis.name}"] = float(v)
        return out
