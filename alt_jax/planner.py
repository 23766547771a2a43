"""Decides, for every conv/matmul equation of a traced program, a kernel or XLA, and why.

Entry points: PlanOptions, make_plan(jaxpr, options) -> Plan, Plan (str() is the explain
table), OpDecision, FallbackWarning, DEFAULT_MIN_FLOPS.
Knobs come from tuning records when one matches this device, else the family's heuristic;
both pass the family's validate(). Kernels are built in parallel; a build failure sends the
op to XLA with one FallbackWarning.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import os
import warnings
from typing import Any, Callable, Optional

import jax
from jax import lax
from jax.extend import core as jcore

from alt_jax import device, fusion, jaxpr_pass, runtime
from alt_jax.ops import registry
from alt_jax.ops.base import KnobError, Unsupported
from alt_jax.records import RecordStore

# Ops under this many flops stay in XLA: below it the custom call's fixed cost (FFI call,
# waking the second thread, packing) outweighs any kernel gain. Measured with
# `python -m benchmarks.min_flops` on the 2-core EPYC Zen3, 2026-11-25: alt_jax is never
# slower from 221,184 flops up (matmul 48^3 1.13x, conv3x3 C16@8 2.13x); below, ties and
# losses (conv3x3 C8@8 73,728 flops 0.95x, matmul 32^3 0.97x, matmul 16^3 0.89x).
DEFAULT_MIN_FLOPS = 200_000

FALLBACK_MODES = ("warn", "silent", "error")


class FallbackWarning(UserWarning):
    """An op alt_jax meant to take over runs in XLA instead; the message says why."""


class FallbackError(RuntimeError):
    """fallback="error": an op could not be put on a kernel."""


@dataclasses.dataclass(frozen=True)
class PlanOptions:
    cache: runtime.KernelCache
    records: Optional[RecordStore] = None
    fallback: str = "warn"
    min_flops: int = DEFAULT_MIN_FLOPS
    isa: device.Isa = dataclasses.field(default_factory=device.detect_isa)
    # primitive -> families tried in order; None means alt_jax.ops.registry (tests inject)
    families: Optional[dict] = None
    fuse: bool = True          # absorb affine / residual / activation epilogues into kernels
    pack_weights: bool = True  # pack constant weights once, at plan time

    def families_for(self, primitive) -> tuple:
        if self.families is None:
            return registry.families_for(primitive)
        return tuple(self.families.get(primitive, ()))

    def __post_init__(self):
        if self.fallback not in FALLBACK_MODES:
            raise ValueError(f"fallback={self.fallback!r}: choose one of {FALLBACK_MODES}")
        if self.min_flops < 0:
            raise ValueError(f"min_flops={self.min_flops} must be >= 0")


@dataclasses.dataclass(frozen=True)
class OpDecision:
    where: str                   # position in the program, e.g. "jit(block)/eqn 3"
    primitive: str
    signature: str               # operand and result types, e.g. "f32[1,3,8,8], f32[4,3,3,3] -> f32[1,4,6,6]"
    family: Optional[str] = None
    spec: Any = None
    knobs: Any = None
    knobs_from: str = ""         # "records" | "heuristic"
    kernel: Optional[runtime.Kernel] = None
    flops: int = 0
    reason: str = ""             # why it stays in XLA (empty when on a kernel)

    @property
    def on_kernel(self) -> bool:
        return self.kernel is not None


@dataclasses.dataclass
class Plan:
    decisions: list
    replacements: dict  # id(eqn) -> jaxpr_pass.Replacement | Group | SKIP
    jaxpr: Any = None   # the (flattened) program the replacements refer to

    @property
    def rewritten(self) -> list:
        return [d for d in self.decisions if d.on_kernel]

    @property
    def left_to_xla(self) -> list:
        return [d for d in self.decisions if not d.on_kernel]

    def __str__(self) -> str:
        lines = [f"alt_jax plan: {len(self.rewritten)} op(s) on generated kernels, "
                 f"{len(self.left_to_xla)} left to XLA"]
        for d in self.decisions:
            lines.append(f"  [{d.where}] {d.primitive} {d.signature}  ({d.flops / 1e6:.2f} MFLOP)")
            if d.on_kernel:
                lines.append(f"      kernel: {d.family} {d.kernel.symbol} knobs ({d.knobs_from}): {d.knobs}")
                epi = getattr(d.spec, "epilogue", None)
                extras = ([f"fused epilogue {epi.describe()}"] if epi and not epi.is_identity
                          else []) + (["weights packed once"] if getattr(d.spec, "prepacked",
                                                                          False) else [])
                if extras:
                    lines.append(f"      {', '.join(extras)}")
                layout = getattr(d.spec, "layout_summary", None)
                if callable(layout):
                    lines.append(f"      layout: {layout()}")
            else:
                lines.append(f"      XLA: {d.reason}")
        return "\n".join(lines)


def _type(aval) -> str:
    return f"{aval.dtype.name.replace('float', 'f').replace('int', 'i')}[{','.join(map(str, aval.shape))}]"


def _signature(eqn) -> str:
    ins = ", ".join(_type(v.aval) for v in eqn.invars)
    outs = ", ".join(_type(v.aval) for v in eqn.outvars)
    return f"{ins} -> {outs}"


def _walk_with_where(jaxpr, prefix: str = ""):
    for i, eqn in enumerate(jaxpr_pass._open(jaxpr).eqns):
        here = f"{prefix}eqn {i}"
        yield here, eqn
        for sub in jaxpr_pass.subjaxprs(eqn):
            name = eqn.params.get("name", eqn.primitive.name)
            yield from _walk_with_where(sub, f"{prefix}{name}/")


def make_replacement(eqn, lower: Callable) -> jaxpr_pass.Replacement:
    """eqn's outputs from lower(operands), differentiable: the tangent is the original
    equation's (lax) JVP, so jvp, grad and vmap keep working through the kernel call."""
    def original(*ops):
        return tuple(jaxpr_pass._bind(eqn, ops))

    @jax.custom_jvp
    def call(*ops):
        return tuple(lower(ops))

    @call.defjvp
    def call_jvp(primals, tangents):
        return call(*primals), jax.jvp(original, primals, tangents)[1]

    return lambda invals: list(call(*invals))


def _choose(eqn, where: str, options: PlanOptions, refine=None):
    """An OpDecision without a kernel yet, plus the family/source to build (or None).

    refine(family, spec) -> spec may add what the graph around eqn allows (a fused
    epilogue, prepacked weights) before knobs are chosen and the kernel is rendered."""
    base = dict(where=where, primitive=eqn.primitive.name, signature=_signature(eqn))
    reasons = []
    for family in options.families_for(eqn.primitive):
        try:
            spec = family.match(eqn)
        except Unsupported as e:
            reasons.append(f"{family.name}: {e}")
            continue
        flops = family.flops(spec)
        if flops < options.min_flops:
            return OpDecision(**base, family=family.name, spec=spec, flops=flops,
                              reason=f"too small for a kernel to pay ({flops} flops < "
                                     f"min_flops={options.min_flops})"), None
        if refine is not None:
            spec = refine(family, spec)
        knobs, knobs_from = None, "heuristic"
        if options.records is not None:
            knobs = options.records.best_knobs(family.name, spec, device.fingerprint(),
                                               type(family.default_knobs(spec, options.isa)))
            knobs_from = "records"
        try:
            if knobs is not None:
                family.validate(spec, knobs, options.isa)
        except KnobError as e:
            warnings.warn(f"alt_jax: tuning record for {eqn.primitive.name} {base['signature']} "
                          f"is not valid here ({e}); using the heuristic")
            knobs = None
        if knobs is None:
            knobs, knobs_from = family.default_knobs(spec, options.isa), "heuristic"
            family.validate(spec, knobs, options.isa)
        src = family.render(spec, knobs, options.isa)
        return OpDecision(**base, family=family.name, spec=spec, knobs=knobs,
                          knobs_from=knobs_from, flops=flops), (family, src)
    return OpDecision(**base, reason="; ".join(reasons) or "no template"), None


def _fall_back(decision: OpDecision, options: PlanOptions) -> None:
    message = (f"alt_jax: {decision.primitive} {decision.signature} at [{decision.where}] "
               f"runs in XLA: {decision.reason}")
    if options.fallback == "error":
        raise FallbackError(message)
    if options.fallback == "warn":
        warnings.warn(FallbackWarning(message), stacklevel=4)


def _channel_axis(eqn) -> Optional[int]:
    """The result axis a kernel's per-channel epilogue runs along, if there is one."""
    if eqn.primitive is lax.conv_general_dilated_p:
        return eqn.params["dimension_numbers"].out_spec[1]
    (_, rc), (_, rb) = eqn.params["dimension_numbers"]
    rhs_free = eqn.invars[1].aval.ndim - len(rc) - len(rb)
    return eqn.outvars[0].aval.ndim - 1 if rhs_free == 1 else None


class _Refiner:
    """Adds to each top-level kernel spec what its neighbourhood allows: a fused epilogue
    (each equation is absorbed by one group only, the first in program order) and
    prepacked weights when the rhs is a constant of the program."""

    def __init__(self, flat, options: PlanOptions):
        self.flat, self.options = flat, options
        self.uses = fusion.uses_of(flat)
        self.constvars = set(jaxpr_pass._open(flat).constvars)
        self.taken: set = set()
        self.matches: dict = {}  # id(anchor) -> EpilogueMatch

    def __call__(self, eqn):
        def refine(family, spec):
            fields = {f.name for f in dataclasses.fields(spec)}
            axis = _channel_axis(eqn)
            if self.options.fuse and "epilogue" in fields and axis is not None:
                match = fusion.find_epilogue(self.flat, eqn, axis, self.uses,
                                             frozenset(self.taken))
                if match is not None:
                    self.matches[id(eqn)] = match
                    self.taken.update(id(e) for e in match.eqns)
                    spec = dataclasses.replace(spec, epilogue=match.epilogue)
            if (self.options.pack_weights and "prepacked" in fields and
                    hasattr(family, "pack_weights") and eqn.invars[1] in self.constvars):
                spec = dataclasses.replace(spec, prepacked=True)
            return spec
        return refine


def _group(eqn, match, family, spec, knobs, kernel) -> jaxpr_pass.Group:
    """One kernel call computing eqn and its absorbed epilogue; differentiable through the
    original equations (their JVP, the user's custom rules included)."""
    members = [eqn, *match.eqns]
    produced = {v for e in members for v in e.outvars}
    invars = []
    for e in members:
        for v in e.invars:
            if isinstance(v, jcore.Var) and v not in produced and v not in invars:
                invars.append(v)
    epi = spec.epilogue
    n_channels = eqn.outvars[0].aval.shape[_channel_axis(eqn)]

    def original(*vals):
        env = dict(zip(invars, vals))
        for e in members:
            ins = [v.val if isinstance(v, jcore.Literal) else env[v] for v in e.invars]
            env.update(zip(e.outvars, jaxpr_pass._bind(e, ins)))
        return env[match.out_var]

    def kernel_call(*vals):
        env = dict(zip(invars, vals))
        read = lambda v: v.val if isinstance(v, jcore.Literal) else env[v]
        lhs, rhs = read(eqn.invars[0]), read(eqn.invars[1])
        if spec.prepacked:
            with jax.ensure_compile_time_eval():  # a constant: pack it now, once
                rhs = family.pack_weights(spec, knobs, rhs)
        ops = [lhs, rhs]
        if epi.scale or epi.shift:
            scale, shift = match.scale_shift([read(v) for _, v in match.affine], n_channels)
            ops += ([scale] if epi.scale else []) + ([shift] if epi.shift else [])
        if epi.residual:
            ops.append(read(match.residual))
        return family.lower(spec, kernel, ops)[0]

    call = jax.custom_jvp(kernel_call)
    call.defjvp(lambda primals, tangents: (call(*primals),
                                           jax.jvp(original, primals, tangents)[1]))
    return jaxpr_pass.Group(invars, [match.out_var], lambda vals: [call(*vals)])


def _prepacked_replacement(eqn, family, spec, knobs, kernel):
    def lower(ops):
        lhs, rhs = ops
        with jax.ensure_compile_time_eval():
            rhs = family.pack_weights(spec, knobs, rhs)
        return family.lower(spec, kernel, [lhs, rhs])
    return make_replacement(eqn, lower)


def make_plan(jaxpr, options: PlanOptions) -> Plan:
    """Plans jaxpr (closed; jit bodies are inlined first so that epilogues and constant
    weights are visible across them) and builds every chosen kernel."""
    flat = jaxpr_pass.inline_calls(jaxpr)
    top = {id(e) for e in jaxpr_pass._open(flat).eqns}
    refiner = _Refiner(flat, options)
    chosen = []
    for where, eqn in _walk_with_where(flat):
        if options.families_for(eqn.primitive):
            refine = refiner(eqn) if id(eqn) in top else None
            chosen.append((eqn, *_choose(eqn, where, options, refine)))

    sources = {build[1].symbol: build[1] for _, _, build in chosen if build is not None}
    built: dict = {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        futures = {sym: pool.submit(options.cache.build, src) for sym, src in sources.items()}
        for sym, fut in futures.items():
            try:
                built[sym] = fut.result()
            except runtime.BuildError as e:
                built[sym] = e

    decisions, replacements = [], {}
    for eqn, decision, build in chosen:
        if build is not None:
            family, src = build
            result = built[src.symbol]
            if isinstance(result, runtime.BuildError):
                first = str(result).strip().splitlines()[0] if str(result).strip() else "?"
                decision = dataclasses.replace(decision, reason=f"kernel build failed: {first}")
            else:
                decision = dataclasses.replace(decision, kernel=result)
                spec, knobs = decision.spec, decision.knobs
                match = refiner.matches.get(id(eqn))
                if match is not None:
                    group = _group(eqn, match, family, spec, knobs, result)
                    for member in [eqn, *match.eqns[:-1]]:
                        replacements[id(member)] = jaxpr_pass.SKIP
                    replacements[id(match.eqns[-1])] = group
                elif getattr(spec, "prepacked", False):
                    replacements[id(eqn)] = _prepacked_replacement(eqn, family, spec, knobs,
                                                                   result)
                else:
                    lower = functools.partial(family.lower, spec, result)
                    replacements[id(eqn)] = make_replacement(eqn, lower)
        if not decision.on_kernel and not decision.reason.startswith("too small"):
            _fall_back(decision, options)
        decisions.append(decision)
    return Plan(decisions, replacements, flat)
