"""Decides, for every conv/matmul equation of a traced program, a kernel or XLA, and why.

Entry points: PlanOptions, make_plan(jaxpr, options) -> Plan, Plan (str() is the explain
table), OpDecision, list_workloads(jaxpr, options) -> [Workload] (what a program would put on
kernels, without building anything: the tuner's input), merge_workloads, op_key,
FallbackWarning, DEFAULT_MIN_FLOPS.
Family and knobs come from the fastest tuning record of the op on this device when there is
one (any family that computes the op competes: Winograd vs direct), else the first family
whose heuristic prefers the op, with its heuristic knobs; both pass the family's validate().
Kernels are built in parallel; a build failure, knobs that fail validate(), or any other
failure of a family while planning one op (match, knobs, render, packing weights) sends that
op to XLA with one FallbackWarning.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import re
import warnings
from typing import Any, Callable, Optional

import jax
from jax import lax
from jax.extend import core as jcore

from alt_jax import (attention as attention_mod, device, fusion, jaxpr_pass, layout_plans,
                     propagate, records as records_mod, rownorm as rownorm_mod, runtime)
from alt_jax.layout import LayoutError
from alt_jax.ops import attention as attention_family, registry, rownorm as rownorm_family
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
    # The ISA kernels are rendered for. One source of truth: the cache compiles with its
    # ISA's flags, so None means the cache's (itself this host's, device.detect_isa(), when
    # unset); naming one that disagrees with the cache's is refused.
    isa: Optional[device.Isa] = None
    # primitive -> families tried in order; None means alt_jax.ops.registry (tests inject)
    families: Optional[dict] = None
    fuse: bool = True          # absorb affine / residual / activation epilogues into kernels
    pack_weights: bool = True  # pack constant weights once, at plan time
    # softmax(Q K^T ...) V (any row-wise program between the two dot_generals: scales,
    # masks, softmax) as one kernel (alt_jax/attention.py, ops/attention.py)
    attention: bool = True
    # a layer norm (RMS norm, softmax: any row-wise region alt_jax/rownorm.py finds) as one
    # kernel, one pass over its input (ops/rownorm.py); like attention, only where the
    # families table has a dot_general family (a table without one keeps such work in XLA)
    rownorm: bool = True
    propagate: bool = True     # keep conv activations channels-last between kernels
    # The graph level: the layout each conv writes, by its position in the flat program
    # ("eqn 17" -> "NC8"), or one name for every conv (tests force each candidate); names
    # from propagate.LAYOUT_CHOICES. Unnamed convs follow the fixed rule (channels-last when
    # propagate). The graph tuner's choice for a program, replayed from its records.
    layout_plan: Any = None

    def families_for(self, primitive) -> tuple:
        if self.families is None:
            return registry.families_for(primitive)
        return tuple(self.families.get(primitive, ()))

    def __post_init__(self):
        cache_isa = getattr(self.cache, "isa", None)
        if self.isa is None:
            object.__setattr__(self, "isa", cache_isa or device.detect_isa())
        elif cache_isa is not None and cache_isa != self.isa:
            raise ValueError(f"PlanOptions isa={self.isa.name} disagrees with the kernel "
                             f"cache's isa={cache_isa.name}: kernels would be rendered for one "
                             f"and compiled for the other; pass one")
        if self.fallback not in FALLBACK_MODES:
            raise ValueError(f"fallback={self.fallback!r}: choose one of {FALLBACK_MODES}")
        if self.min_flops < 0:
            raise ValueError(f"min_flops={self.min_flops} must be >= 0")
        plan = self.layout_plan
        names = ([plan] if isinstance(plan, str) else
                 list(dict(plan).values()) if plan is not None else [])
        bad = sorted({n for n in names if n not in propagate.LAYOUT_CHOICES})
        if bad:
            raise ValueError(f"layout_plan names {bad}: choose from {propagate.LAYOUT_CHOICES}")

    def layout_choice(self, where: str) -> str:
        """The layout the conv at `where` writes: the plan's, else the fixed rule's."""
        plan = self.layout_plan
        if isinstance(plan, str):
            return plan
        if plan is not None and where in plan:
            return plan[where]
        return "NHWC" if self.propagate else "logical"


@dataclasses.dataclass(frozen=True)
class OpDecision:
    where: str                   # position in the program, e.g. "jit(block)/eqn 3"
    primitive: str
    signature: str               # operand and result types, e.g.
    #                              "f32[1,3,8,8], f32[4,3,3,3] -> f32[1,4,6,6]"
    family: Optional[str] = None
    spec: Any = None
    knobs: Any = None
    knobs_from: str = ""         # "tuned" (a tuning record) | "heuristic"
    tuned_time_s: Optional[float] = None  # the record's measured median, when tuned
    kernel: Optional[runtime.Kernel] = None
    flops: int = 0
    reason: str = ""             # why it stays in XLA (empty when on a kernel)
    layouts: str = ""            # physical layouts the kernel reads and writes

    @property
    def on_kernel(self) -> bool:
        return self.kernel is not None


@dataclasses.dataclass
class Plan:
    decisions: list
    replacements: dict  # id(eqn) -> jaxpr_pass.Replacement | Group | SKIP
    jaxpr: Any = None   # the (flattened) program the replacements refer to
    propagation: Any = None  # propagate.Propagation: layouts of values, conversions
    conversion_costs: dict = dataclasses.field(default_factory=dict)  # str(c) -> seconds

    @property
    def conversions(self) -> list:
        """Layout conversions of full-size values the plan inserted (program outputs too)."""
        return list(self.propagation.conversions) if self.propagation else []

    def finish(self, outs) -> list:
        return self.propagation.finish(outs) if self.propagation else list(outs)

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
                origin = d.knobs_from
                if d.tuned_time_s is not None:
                    origin += f", measured {d.tuned_time_s * 1e3:.3f} ms"
                lines.append(f"      kernel: {d.family} {d.kernel.symbol} "
                             f"knobs ({origin}): {d.knobs}")
                epi = getattr(d.spec, "epilogue", None)
                extras = ([f"fused epilogue {epi.describe()}"] if epi and not epi.is_identity
                          else []) + (["weights packed once"] if getattr(d.spec, "prepacked",
                                                                          False) else [])
                if extras:
                    lines.append(f"      {', '.join(extras)}")
                if d.layouts:
                    lines.append(f"      layouts: {d.layouts}")
            else:
                lines.append(f"      XLA: {d.reason}")
        if self.propagation is not None and self.propagation.layouts:
            kept: dict = {}
            for lay in self.propagation.layouts.values():
                if lay is not None:
                    name = propagate.describe(lay)
                    kept[name] = kept.get(name, 0) + 1
            lines.append("  values kept laid out: " + ", ".join(
                f"{n} x{k}" for n, k in sorted(kept.items(), key=lambda x: -x[1])))
        conversions = self.conversions
        lines.append(f"  layout conversions of full-size values: {len(conversions)}")
        for c in conversions:
            cost = self.conversion_costs.get(str(c))
            measured = f" (measured {cost * 1e3:.3f} ms)" if cost is not None else ""
            lines.append(f"    at {c.where}: {c}{measured}")
        return "\n".join(lines)


def _type(aval) -> str:
    dtype = aval.dtype.name.replace("float", "f").replace("int", "i")
    return f"{dtype}[{','.join(map(str, aval.shape))}]"


def _signature(eqn) -> str:
    ins = ", ".join(_type(v.aval) for v in eqn.invars)
    outs = ", ".join(_type(v.aval) for v in eqn.outvars)
    return f"{ins} -> {outs}"


def _walk_with_where(jaxpr, prefix: str = ""):
    for i, eqn in enumerate(jaxpr_pass.open_jaxpr(jaxpr).eqns):
        here = f"{prefix}eqn {i}"
        yield here, eqn
        for sub in jaxpr_pass.subjaxprs(eqn):
            name = eqn.params.get("name", eqn.primitive.name)
            yield from _walk_with_where(sub, f"{prefix}{name}/")


def _guarded(family, spec, lhs, rhs, on_kernel: Callable, in_xla: Callable):
    """on_kernel() where the family vouches for these operand values, else in_xla().

    A family whose kernel computes what XLA computes only for some values (a padded 1x1
    conv whose weight is not finite, where XLA's own answer depends on how it rewrote the
    conv) says so with safe_operands(spec, lhs, rhs):
    None (always), a Python bool (decided now, e.g. from constant weights) or a traced bool
    (decided per call: both branches are compiled, the kernel runs unless values need XLA)."""
    check = getattr(family, "safe_operands", None)
    ok = None if check is None else check(spec, lhs, rhs)
    if ok is None or ok is True:
        return on_kernel()
    if ok is False:
        return in_xla()
    return lax.cond(ok, on_kernel, in_xla)


def make_replacement(eqn, family, spec, kernel) -> jaxpr_pass.Replacement:
    """eqn's outputs from the family's kernel, differentiable through eqn's own (lax) JVP."""
    original = lambda *ops: tuple(jaxpr_pass.bind_eqn(eqn, ops))

    def primal(*ops):
        return _guarded(family, spec, ops[0], ops[1],
                        lambda: tuple(family.lower(spec, kernel, ops)), lambda: original(*ops))
    call = jaxpr_pass.differentiable_as(primal, original)
    return lambda invals: list(call(*invals))


def _choose(eqn, where: str, options: PlanOptions, refine=None):
    """An OpDecision without a kernel yet, plus the family/source to build (or None).

    refine(family, spec) -> spec may add what the graph around eqn allows (a fused
    epilogue, prepacked weights) before knobs are chosen and the kernel is rendered.
    A tuning record of this op on this device decides family and knobs when there is one
    (_choose_tuned). Otherwise families are tried in order; one that cannot take the op
    (Unsupported), whose heuristic prefers another family for it, whose heuristic knobs fail
    its own validate() (KnobError: e.g. a workspace over the limit), or that fails in any
    other way while planning (a bug must cost one op its kernel, never the program) passes
    the op to the next; the reasons of all of them explain the fallback."""
    base = dict(where=where, primitive=eqn.primitive.name, signature=_signature(eqn))
    if options.records is not None:
        tuned = _choose_tuned(eqn, base, options, refine)
        if tuned is not None:
            return tuned
    reasons = []
    for family in options.families_for(eqn.primitive):
        try:
            return _choose_with(family, eqn, base, options, refine)
        except Unsupported as e:
            reasons.append(f"{family.name}: {e}")
        except KnobError as e:
            reasons.append(f"{family.name}: no valid knobs ({e})")
        except Exception as e:  # noqa: BLE001 - any planning failure means XLA, said why
            reasons.append(f"{family.name}: planning failed: {type(e).__name__}: {e}")
    return OpDecision(**base, reason="; ".join(reasons) or "no template"), None


def _spec_for(family, eqn, options: PlanOptions, refine):
    """(spec, flops) of family for eqn with what the graph allows, or (spec, flops) of an op
    too small for a kernel (refine not applied); raises Unsupported like match()."""
    spec = family.match(eqn)
    flops = family.flops(spec)
    if flops >= options.min_flops and refine is not None:
        spec = refine(family, spec)
    return spec, flops


def _too_small(base, family, spec, flops, options) -> OpDecision:
    return OpDecision(**base, family=family.name, spec=spec, flops=flops,
                      reason=f"too small for a kernel to pay ({flops} flops < "
                             f"min_flops={options.min_flops})")


def _choose_with(family, eqn, base: dict, options: PlanOptions, refine):
    """_choose for one family with its heuristic knobs; raises Unsupported / KnobError /
    anything when it cannot."""
    spec, flops = _spec_for(family, eqn, options, refine)
    if flops < options.min_flops:
        return _too_small(base, family, spec, flops, options), None
    if not family.prefers(spec):
        raise Unsupported("its heuristic prefers another family here (tuning records can "
                          "choose it)")
    knobs = family.default_knobs(spec, options.isa)
    family.validate(spec, knobs, options.isa)
    src = family.render(spec, knobs, options.isa)
    return OpDecision(**base, family=family.name, spec=spec, knobs=knobs,
                      knobs_from="heuristic", flops=flops), (family, src)


def op_key(eqn, options: PlanOptions, refine=None) -> Optional[str]:
    """The key of eqn's operation, whatever family computes it: the workload key of the spec
    (with what the graph allows) of the last family in the order tried that matches, the
    general one (conv2d for convs), so that every family's records of this op meet under
    one key. None if no family matches."""
    for family in reversed(options.families_for(eqn.primitive)):
        try:
            spec, _ = _spec_for(family, eqn, options, refine)
        except Exception:  # noqa: BLE001 - no key from this family; the next may give one
            continue
        return records_mod.workload_key(family.name, spec)
    return None


def _choose_tuned(eqn, base: dict, options: PlanOptions, refine):
    """The decision the fastest tuning record of this op on this device makes, or None (no
    record, or one that no longer fits: its family gone or declining, its workload not this
    spec, knobs its template refuses; all but the first warned). Records are input: any
    failure here means the heuristic decides instead."""
    key = op_key(eqn, options, refine)
    rec = key and options.records.best_for_op(key, device.fingerprint(options.isa))
    if not rec:
        return None
    by_name = {f.name: f for f in options.families_for(eqn.primitive)}
    family = by_name.get(rec["family"])
    if family is None:
        return None  # a family this optimize() excludes: the heuristic's families decide
    try:
        spec, flops = _spec_for(family, eqn, options, refine)
        if flops < options.min_flops:
            return None
        if records_mod.workload_key(family.name, spec) != rec["workload_key"]:
            raise ValueError("the record's workload is not this op's spec")
        knobs = records_mod.knobs_from_record(rec, family.knobs_type, options.records.path)
        if knobs is None:
            return None
        family.validate(spec, knobs, options.isa)
        src = family.render(spec, knobs, options.isa)
    except Exception as e:  # noqa: BLE001 - records are input: any refusal means heuristic
        warnings.warn(f"alt_jax: tuning record for {eqn.primitive.name} {base['signature']} "
                      f"({rec['family']}) is not valid here ({type(e).__name__}: {e}); using "
                      f"the heuristic")
        return None
    return OpDecision(**base, family=family.name, spec=spec, knobs=knobs, knobs_from="tuned",
                      tuned_time_s=records_mod.record_time(rec),
                      flops=flops), (family, src)


_KERNEL_NAME = re.compile(r"kernel alt_\w+?_[0-9a-f]{16}\b")


def _op_text(decision: OpDecision) -> str:
    return f"{decision.primitive} {decision.signature} at [{decision.where}]"


def _fall_back(decisions: list, options: PlanOptions) -> None:
    """One FallbackWarning per reason: ops that fall back for the same reason (an unusable
    kernel cache, a missing compiler) are named in one warning, not one warning each."""
    by_reason: dict = {}
    for d in decisions:  # kernel names differ per op, the cause does not
        by_reason.setdefault(_KERNEL_NAME.sub("its kernel", d.reason), []).append(d)
    for reason, same in by_reason.items():
        if len(same) == 1:
            message = f"alt_jax: {_op_text(same[0])} runs in XLA: {reason}"
        else:
            named = "; ".join(_op_text(d) for d in same[:3])
            more = f" and {len(same) - 3} more" if len(same) > 3 else ""
            message = f"alt_jax: {len(same)} ops run in XLA ({named}{more}): {reason}"
        if options.fallback == "error":
            raise FallbackError(message)
        if options.fallback == "warn":
            warnings.warn(FallbackWarning(message), stacklevel=4)


def _layout_text(spec) -> str:
    """e.g. 'reads NCHW, writes N C/8 H W 8c': the layouts the kernel reads and writes."""
    if not hasattr(spec, "lhs_layout"):
        return ""
    return (f"reads {propagate.describe(spec.lhs_layout)}, "
            f"writes {propagate.describe(spec.out_layout)}")


def _channel_axis(eqn) -> Optional[int]:
    """The result axis a kernel's per-channel epilogue runs along, if there is one."""
    if eqn.primitive is lax.conv_general_dilated_p:
        return eqn.params["dimension_numbers"].out_spec[1]
    (_, rc), (_, rb) = eqn.params["dimension_numbers"]
    rhs_free = eqn.invars[1].aval.ndim - len(rc) - len(rb)
    return eqn.outvars[0].aval.ndim - 1 if rhs_free == 1 else None


def _fuses_epilogues(eqn, options: PlanOptions) -> bool:
    """Whether the family that will take eqn (the first whose match() accepts it) can fuse
    an epilogue: its spec carries one."""
    for family in options.families_for(eqn.primitive):
        try:
            spec = family.match(eqn)
        except Exception:  # noqa: BLE001 - Unsupported, or a failure _choose reports
            continue
        return "epilogue" in {f.name for f in dataclasses.fields(spec)}
    return False


def _find_groups(flat, options: PlanOptions, taken_by_attention=frozenset()) -> dict:
    """id(anchor) -> (anchor, EpilogueMatch) for every top-level conv/matmul candidate; a
    kernel without a fusable epilogue is a group of one (an empty match). Equations an
    attention kernel computes are neither anchors nor epilogues."""
    uses = fusion.uses_of(flat)
    taken: set = set(taken_by_attention)
    groups = {}
    for eqn in jaxpr_pass.open_jaxpr(flat).eqns:
        if not options.families_for(eqn.primitive) or id(eqn) in taken_by_attention:
            continue
        axis = _channel_axis(eqn)
        match = None
        if options.fuse and axis is not None and _fuses_epilogues(eqn, options):
            match = fusion.find_epilogue(flat, eqn, axis, uses, frozenset(taken))
        if match is None:
            match = fusion.EpilogueMatch([], [], None, "none", eqn.outvars[0])
        taken.update(id(e) for e in match.eqns)
        groups[id(eqn)] = (eqn, match)
    return groups


def _pack_now(family, spec, knobs, isa, rhs):
    """A constant rhs in the layout the kernel (spec.prepacked, knobs) reads: packed once,
    at plan time. The packed layout depends on the ISA the kernel was rendered for."""
    with jax.ensure_compile_time_eval():
        return family.pack_weights(spec, knobs, rhs, isa)


def _group(eqn, match, prop, family=None, spec=None, kernel=None, packed_rhs=None,
           reuse_residual=False):
    """One call computing eqn and its absorbed epilogue on physical (permuted) arrays: the
    kernel when there is one, else the original equations between layout conversions.
    Differentiable through the original equations (their JVP, user rules included).
    packed_rhs: the constant rhs packed for the kernel (spec.prepacked).
    reuse_residual: the kernel writes its result into the residual's buffer."""
    members = [eqn, *match.eqns]
    produced = {v for e in members for v in e.outvars}
    invars = []
    for e in members:
        for v in e.invars:
            if isinstance(v, jcore.Var) and v not in produced and v not in invars:
                invars.append(v)
    in_layouts = [prop.layout(v) for v in invars]
    out_layout = prop.layout(match.out_var)

    def original(*vals):  # laid out in and out, through the logical program
        return propagate.convert(_run_logically(members, invars, in_layouts, vals,
                                                match.out_var), None, out_layout)

    if kernel is None:
        return jaxpr_pass.Group(invars, [match.out_var], lambda vals: [original(*vals)])

    epi = getattr(spec, "epilogue", None)
    kernel_in = prop.kernel_in[id(eqn)]

    def kernel_call(*vals):
        env = dict(zip(invars, vals))
        layout_of = dict(zip(invars, in_layouts))
        read = lambda v: v.val if isinstance(v, jcore.Literal) else env[v]
        # a Literal (a scalar constant; unhashable on jax 0.10) has its logical layout
        lay = lambda v: layout_of[v] if isinstance(v, jcore.Var) else None
        lhs_var, rhs_var = eqn.invars[0], eqn.invars[1]
        lhs = propagate.convert(read(lhs_var), lay(lhs_var), kernel_in)
        if getattr(spec, "prepacked", False):
            rhs = packed_rhs
        else:
            rhs = propagate.convert(read(rhs_var), lay(rhs_var), None)
        ops = [lhs, rhs]
        if epi is not None and (epi.scale or epi.shift):
            # only matched when the result has a channel axis (fusion.find_epilogue)
            n_channels = eqn.outvars[0].aval.shape[_channel_axis(eqn)]
            # the per-channel operands flattened in their logical layout, as the chain reads them
            affine = [propagate.convert(read(v), lay(v), None) for _, v in match.affine]
            scale, shift = match.scale_shift(affine, n_channels)
            ops += ([scale] if epi.scale else []) + ([shift] if epi.shift else [])
        if epi is not None and epi.residual:
            r = match.residual
            ops.append(propagate.convert(read(r), layout_of[r], out_layout))
        return family.lower(spec, kernel, ops, reuse_residual=reuse_residual)[0]

    def guarded_call(*vals):
        env = dict(zip(invars, vals))
        read = lambda v: v.val if isinstance(v, jcore.Literal) else env[v]
        return _guarded(family, spec, read(eqn.invars[0]), read(eqn.invars[1]),
                        lambda: kernel_call(*vals), lambda: original(*vals))

    call = jaxpr_pass.differentiable_as(guarded_call, original)
    return jaxpr_pass.Group(invars, [match.out_var], lambda vals: [call(*vals)])


def _run_logically(eqns, invars, in_layouts, vals, out_var):
    """out_var computed by the equations themselves from invars' values (laid out as
    in_layouts say, converted to the program's own layouts first)."""
    env = {v: propagate.convert(x, lay, None) for v, x, lay in zip(invars, vals, in_layouts)}
    for e in eqns:
        ins = [v.val if isinstance(v, jcore.Literal) else env[v] for v in e.invars]
        env.update(zip(e.outvars, jaxpr_pass.bind_eqn(e, ins)))
    return env[out_var]


def _last_uses(jaxpr) -> dict:
    """var -> position of the last equation reading it (len(eqns) for program outputs)."""
    jaxpr = jaxpr_pass.open_jaxpr(jaxpr)
    last: dict = {}
    for i, eqn in enumerate(jaxpr.eqns):
        for v in eqn.invars:
            if isinstance(v, jcore.Var):
                last[v] = i
    for v in jaxpr.outvars:
        if isinstance(v, jcore.Var):
            last[v] = len(jaxpr.eqns)
    return last


def _reuses_residual(family, eqn, match, position, last_use, program_inputs) -> bool:
    """Write the kernel's result into the residual's buffer? When the group, which runs at
    `position`, is the residual's last reader (a ResNet block's input is read by its first
    conv and then by the add) and the residual is an intermediate of the program, XLA needs
    no copy and the output lines are in cache already (1x1 64->256@56 + residual + relu,
    2 threads: 0.92-1.20 ms in place vs 1.31-1.51 ms into a fresh buffer). Elsewhere XLA
    would copy the residual first; correct, but no gain. Never when the residual is also the
    kernel's input (y = conv(x) + x): tiles written early would clobber inputs still unread."""
    r = match.residual
    return (r is not None and getattr(family, "residual_in_place", False)
            and r not in program_inputs and r not in eqn.invars
            and last_use.get(r, -1) <= position)


def _refine_for(match, prepack: bool, layouts=None):
    def refine(family, spec):
        if layouts is not None:
            spec = family.relayout(spec, *layouts)
        fields = {f.name for f in dataclasses.fields(spec)}
        if "epilogue" in fields and match.eqns:
            spec = dataclasses.replace(spec, epilogue=match.epilogue)
        if prepack and "prepacked" in fields and hasattr(family, "pack_weights"):
            spec = dataclasses.replace(spec, prepacked=True)
        return spec
    return refine


def _build_all(chosen, options):
    sources = {build[1].symbol: build[1] for *_, build in chosen if build is not None}
    built: dict = {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        futures = {sym: pool.submit(options.cache.build, src) for sym, src in sources.items()}
        for sym, fut in futures.items():
            try:
                built[sym] = fut.result()
            except runtime.BuildError as e:
                built[sym] = e
    return built


@dataclasses.dataclass
class _Program:
    """A program laid out for planning: inlined, epilogue groups found, layouts decided and
    propagated."""

    flat: Any
    groups: dict      # id(anchor eqn) -> (anchor eqn, fusion.EpilogueMatch)
    prop: Any         # propagate.Propagation
    constvars: set
    conversion_costs: dict = dataclasses.field(default_factory=dict)  # the graph tuner's
    attention: list = dataclasses.field(default_factory=list)  # _RegionKernel
    rownorm: list = dataclasses.field(default_factory=list)    # _RegionKernel

    def ops(self, options: PlanOptions):
        """(where, eqn, refine) for every conv/matmul a family may take: refine gives a
        family's spec what the graph decided and allows: the layouts the kernel reads and
        writes (Unsupported when the family cannot address them), a fused epilogue, weights
        packed once when the rhs is a constant. Ops inside scan / cond / while bodies are
        seen one by one, in their logical layouts (refine None)."""
        in_attention = {id(e) for a in self.attention for e in a.match.eqns}
        for where, eqn in _walk_with_where(self.flat):
            if not options.families_for(eqn.primitive) or id(eqn) in in_attention:
                continue
            if id(eqn) not in self.groups:
                yield where, eqn, None
                continue
            _, match = self.groups[id(eqn)]
            rhs = eqn.invars[1]  # a Literal (a scalar constant) is never packed
            prepack = (options.pack_weights and isinstance(rhs, jcore.Var)
                       and rhs in self.constvars)
            layouts = _kernel_layouts(eqn, self.prop.kernel_in[id(eqn)],
                                      self.prop.kernel_out[id(eqn)])
            yield where, eqn, _refine_for(match, prepack, layouts)


def _kernel_layouts(eqn, read, write):
    """(lhs, out) spec layouts over N C H W of a 2-D conv reading `read` and writing
    `write` (value layouts, None = logical); None for other kernels."""
    if eqn.primitive is not lax.conv_general_dilated_p:
        return None
    dn = eqn.params["dimension_numbers"]
    if len(dn.lhs_spec) != 4:
        return None
    lhs_roles, out_roles = propagate.role_names(dn.lhs_spec), propagate.role_names(dn.out_spec)
    try:
        lhs = propagate.spec_layout(read, lhs_roles, "NCHW", eqn.invars[0].aval.shape)
        out = propagate.spec_layout(write, out_roles, "NCHW", eqn.outvars[0].aval.shape)
    except LayoutError:  # a zero-size operand has no layout; the families refuse the op
        return None
    return None if lhs is None or out is None else (lhs, out)


def _layouts_taken(eqn, layouts, options: PlanOptions) -> bool:
    """Whether some family computes eqn reading and writing these (lhs, out) layouts."""
    if layouts is None:
        return False
    for family in options.families_for(eqn.primitive):
        try:
            family.relayout(family.match(eqn), *layouts)
            return True
        except Exception:  # noqa: BLE001 - Unsupported (or a bug): this family does not
            continue
    return False


def _decider(options: PlanOptions, where_of: dict, memo: Optional[dict] = None):
    """Propagation's decide(): the layout each kernel writes (the layout plan's choice, or
    the fixed rule), and whether it reads its lhs as it is kept or converted to the logical
    layout: as kept when some family takes that pair, else logical; a written layout no
    family can produce with either input becomes channels-last, then logical."""
    def decide(eqn, have):
        try:
            if _kernel_layouts(eqn, None, None) is None:
                return None, None  # matmuls and other conv ranks: logical in and out
            wanted = propagate.choice_layout(eqn, options.layout_choice(where_of[id(eqn)]))
            writes = (wanted, propagate.channels_last(eqn), None)
        except Exception:  # noqa: BLE001 - e.g. a zero-size conv (no Layout): logical,
            return None, None  # and the families refuse it with their own reason
        for write in writes:
            for read in ((have, None) if have is not None else (None,)):
                key = (id(eqn), read, write)
                taken = memo.get(key) if memo is not None else None
                if taken is None:
                    taken = _layouts_taken(eqn, _kernel_layouts(eqn, read, write), options)
                    if memo is not None:
                        memo[key] = taken
                if taken:
                    return read, write
        return None, None
    return decide


def _stored_layout_plan(flat, options: PlanOptions) -> Optional[dict]:
    """The graph tuner's entry for this program on this device (layout_plans), when its
    records hold one and no plan was given."""
    if options.layout_plan is not None or options.records is None:
        return None
    return layout_plans.load(layout_plans.path_for(options.records.path),
                             layout_plans.program_key(flat), device.fingerprint(options.isa))


def _program(jaxpr, options: PlanOptions, flat=None, memo: Optional[dict] = None) -> _Program:
    """flat: jaxpr already inlined (the graph tuner plans one program many times; memo
    then keeps which layouts families take per equation across those plans)."""
    flat = jaxpr_pass.inline_calls(jaxpr) if flat is None else flat
    stored = _stored_layout_plan(flat, options)
    if stored is not None:
        options = dataclasses.replace(options, layout_plan=stored["plan"])
    where_of = {id(e): f"eqn {i}" for i, e in enumerate(jaxpr_pass.open_jaxpr(flat).eqns)}
    found = memo.get("found") if memo is not None else None
    if found is None:  # attention, the groups and row-wise regions do not depend on layouts
        attention = _find_attention(flat, options, where_of)
        taken = frozenset(id(e) for a in attention for e in a.match.eqns)
        groups = _find_groups(flat, options, taken)
        taken |= {id(e) for anchor, m in groups.values() for e in (anchor, *m.eqns)}
        found = attention, groups, _find_rownorm(flat, options, where_of, taken)
        if memo is not None:
            memo["found"] = found
    attention, groups, rownorm = found
    skipped = {id(e) for _, m in groups.values() for e in m.eqns}
    # a whole-region kernel runs where the region's last equation stood (an attention's D2);
    # the others are not evaluated alone
    skipped |= {id(e) for r in (*attention, *rownorm) for e in r.match.eqns[:-1]}
    prop = propagate.Propagation(flat, {k: m.out_var for k, (_, m) in groups.items()}, skipped,
                                 {k: m.residual for k, (_, m) in groups.items()
                                  if m.residual is not None})
    prop.run(_decider(options, where_of, memo))
    return _Program(flat, groups, prop, set(jaxpr_pass.open_jaxpr(flat).constvars),
                    dict((stored or {}).get("conversion_costs", {})), attention, rownorm)


@dataclasses.dataclass(frozen=True)
class _RegionKernel:
    """A region one kernel takes whole (an attention, a row-wise norm): where its first
    equation stands, the match (eqns, invars, out_var), its family, and the kernel's spec,
    heuristic knobs and rendered source (rendered while deciding, so never twice)."""

    where: str
    match: Any
    family: Any
    spec: Any
    knobs: Any
    source: Any


def _region_kernels(matches, family, spec_of, options: PlanOptions, where_of: dict) -> list:
    """A _RegionKernel for every match big enough and rendered with the family's knobs; any
    other (too small, or refused) stays as its equations."""
    taken = []
    for m in matches:
        try:
            spec = spec_of(m)
            if family.flops(spec) < options.min_flops:
                continue
            knobs = family.default_knobs(spec, options.isa)
            source = family.render(spec, knobs, options.isa)
        except Exception:  # noqa: BLE001 - refused: its equations are planned as they are
            continue
        taken.append(_RegionKernel(where_of[id(m.eqns[0])], m, family, spec, knobs, source))
    return taken


def _find_attention(flat, options: PlanOptions, where_of: dict) -> list:
    """Every attention the kernel takes (alt_jax/attention); one it does not leaves its
    dot_generals to the matmul family."""
    if not options.attention or not options.families_for(lax.dot_general_p):
        return []  # off, or no dot_general may leave XLA (a families table without one)
    return _region_kernels(attention_mod.find_attention(jaxpr_pass.open_jaxpr(flat)),
                           attention_family.FAMILY, attention_family.AttentionSpec.from_match,
                           options, where_of)


def _find_rownorm(flat, options: PlanOptions, where_of: dict, taken) -> list:
    """Every row-wise region the kernel takes (alt_jax/rownorm), outside other kernels'
    equations (taken: their ids)."""
    if not options.rownorm or not options.families_for(lax.dot_general_p):
        return []  # off, or a families table that keeps matmul work in XLA keeps this too
    return _region_kernels(rownorm_mod.find_rownorm(jaxpr_pass.open_jaxpr(flat), taken),
                           rownorm_family.FAMILY, rownorm_family.RowNormSpec.from_match,
                           options, where_of)


def _region_signature(m) -> str:
    ins = ", ".join(_type(v.aval) for v in m.operands)
    return f"{ins} -> {_type(m.out_var.aval)}"


def _choose_region(r: _RegionKernel):
    family, spec = r.family, r.spec
    layouts = (f"row program of {len(spec.instructions) // 5} steps, "
               f"{len(spec.ext_dtypes)} operands from outside read in place")
    return OpDecision(where=r.where, primitive=family.name,
                      signature=_region_signature(r.match), family=family.name,
                      spec=spec, knobs=r.knobs, knobs_from="heuristic",
                      flops=family.flops(spec), layouts=layouts), (family, r.source)


def _region_group(m, prop, family=None, spec=None, kernel=None):
    """One call computing a region's equations (m.eqns, reading m.invars): the kernel when
    there is one, else the equations themselves; differentiable through the equations."""
    # the kernel's operands (an external read through strides is the source a broadcast
    # spread), then whatever else the equations themselves read: the broadcasts, for the
    # original (XLA drops them where only the kernel runs)
    produced = {v for e in m.eqns for v in e.outvars}
    invars = list(m.invars)
    for e in m.eqns:
        for v in e.invars:
            if isinstance(v, jcore.Var) and v not in produced and v not in invars:
                invars.append(v)
    in_layouts = [prop.layout(v) for v in invars]

    def original(*vals):
        return _run_logically(m.eqns, invars, in_layouts, vals, m.out_var)

    if kernel is None:
        return jaxpr_pass.Group(invars, [m.out_var], lambda vals: [original(*vals)])

    def kernel_call(*vals):
        ops = [propagate.convert(x, lay, None)
               for x, lay in zip(vals[:len(m.invars)], in_layouts)]
        return family.lower(spec, kernel, ops)[0]

    call = jaxpr_pass.differentiable_as(kernel_call, original)
    return jaxpr_pass.Group(invars, [m.out_var], lambda vals: [call(*vals)])


@dataclasses.dataclass(frozen=True)
class Workload:
    """One unique conv/matmul of a program, as its kernel would see it: what the tuner tunes.

    candidates: (family name, spec) for every family that can compute it (the heuristic's
    choice first when it has one), each spec with the fused epilogue and packing the program
    allows; preferred: the family the untuned planner takes. multiplicity: how often the op
    occurs in the program (where: its positions). operand_shapes: the shapes of the op's
    operands [lhs, rhs (unpacked), *epilogue inputs], for example inputs. reference(operands)
    gives the lax result the kernels must match (the equation itself, then the epilogue)."""

    op_key: str
    primitive: str
    signature: str
    epilogue: str
    candidates: tuple
    preferred: str
    flops: int
    operand_shapes: tuple
    multiplicity: int = 1
    where: tuple = ()
    eqn: Any = dataclasses.field(default=None, compare=False, repr=False)
    channel_axis: Optional[int] = None
    # the layouts (alt_jax.layout) the kernel reads its lhs in and writes, over the
    # equation's own axes; None = as the equation has them. operand_shapes are physical.
    in_layout: Any = dataclasses.field(default=None, compare=False)
    out_layout: Any = dataclasses.field(default=None, compare=False)

    @property
    def label(self) -> str:
        epi = f" +{self.epilogue}" if self.epilogue != "none" else ""
        return f"{self.primitive} {self.signature}{epi}"

    def spec_of(self, family_name: str):
        return dict(self.candidates)[family_name]

    @property
    def operand_names(self) -> tuple:
        """Names of the op's operands, in operand_shapes' order."""
        return ("lhs", "rhs") + _epilogue_inputs(self.candidates[0][1])

    def reference(self, operands):
        """The op's result in jnp from its operands [lhs, rhs, *epilogue inputs]."""
        epi = getattr(self.candidates[0][1], "epilogue", None)
        lhs = propagate.convert(operands[0], self.in_layout, None)
        y = self.eqn.primitive.bind(lhs, operands[1], **self.eqn.params)
        if epi is not None and not epi.is_identity:
            extra = dict(zip(epi.inputs(), operands[2:]))
            if "residual" in extra:
                extra["residual"] = propagate.convert(extra["residual"], self.out_layout, None)
            y = epi.reference(y, self.channel_axis, **extra)
        return propagate.convert(y, None, self.out_layout)

    def merged_with(self, other: "Workload") -> "Workload":
        """This op counted together with `other` (the same op_key seen again)."""
        return dataclasses.replace(self, multiplicity=self.multiplicity + other.multiplicity,
                                   where=self.where + other.where)


def _epilogue_inputs(spec) -> tuple:
    """The extra kernel inputs a spec's fused epilogue reads (none for a spec without one)."""
    epi = getattr(spec, "epilogue", None)
    return epi.inputs() if epi is not None else ()


def merge_workloads(workloads) -> list:
    """One workload per op_key, in first-seen order, multiplicities summed."""
    merged: dict = {}
    for w in workloads:
        seen = merged.get(w.op_key)
        merged[w.op_key] = w if seen is None else seen.merged_with(w)
    return list(merged.values())


def _workload_of(where, eqn, refine, options: PlanOptions, layouts=(None, None)
                 ) -> Optional[Workload]:
    """The workload of one op, or None when no family takes it (or it is too small).
    layouts: the value layouts its kernel reads and writes (None = the equation's own)."""
    candidates, preferred, flops = [], "", 0
    for family in options.families_for(eqn.primitive):
        try:
            spec, flops = _spec_for(family, eqn, options, refine)
            if flops < options.min_flops:
                continue
            family.validate(spec, family.default_knobs(spec, options.isa), options.isa)
        except Exception:  # noqa: BLE001 - this family cannot run the op; others may
            continue
        if not preferred and family.prefers(spec):
            preferred = family.name
            candidates.insert(0, (family.name, spec))
        else:
            candidates.append((family.name, spec))
    if not candidates:
        return None
    spec = candidates[0][1]
    epi = getattr(spec, "epilogue", None)
    axis = _channel_axis(eqn) if epi is not None and not epi.is_identity else None
    in_layout, out_layout = layouts
    physical = lambda lay, aval: tuple(lay.physical_shape if lay is not None else aval.shape)
    out_shape = physical(out_layout, eqn.outvars[0].aval)
    extra_shapes = [out_shape if name == "residual" else
                    (eqn.outvars[0].aval.shape[axis],) for name in _epilogue_inputs(spec)]
    shapes = (physical(in_layout, eqn.invars[0].aval), tuple(eqn.invars[1].aval.shape),
              *extra_shapes)
    return Workload(op_key=op_key(eqn, options, refine), primitive=eqn.primitive.name,
                    signature=_signature(eqn), epilogue=epi.describe() if epi else "none",
                    candidates=tuple(candidates), preferred=preferred or candidates[0][0],
                    flops=flops, operand_shapes=shapes, where=(where,), eqn=eqn,
                    channel_axis=axis, in_layout=in_layout, out_layout=out_layout)


def _value_layouts(program, eqn) -> tuple:
    prop = program.prop
    return prop.kernel_in.get(id(eqn)), prop.kernel_out.get(id(eqn))


def list_workloads(jaxpr, options: PlanOptions) -> list:
    """The unique ops of a closed jaxpr that families would put on kernels, each once with
    its multiplicity, in program order. Compiles nothing."""
    program = _program(jaxpr, options)
    found = (_workload_of(where, eqn, refine, options, _value_layouts(program, eqn))
             for where, eqn, refine in program.ops(options))
    return merge_workloads(w for w in found if w is not None)


def make_plan(jaxpr, options: PlanOptions) -> Plan:
    """Plans jaxpr (closed; jit bodies are inlined first so that epilogues, constant weights
    and layouts are seen across them) and builds every chosen kernel.

    Top level: groups (kernel + absorbed epilogue) -> layout propagation -> each conv's spec
    is matched on the physical arrays it will see -> family and knobs, render, build. Ops
    inside scan / cond / while bodies are replaced one by one, in their logical layouts."""
    program = _program(jaxpr, options)
    flat, groups, prop, constvars = program.flat, program.groups, program.prop, program.constvars
    program_inputs = constvars | set(jaxpr_pass.open_jaxpr(flat).invars)
    last_use = _last_uses(flat)
    position = {id(e): i for i, e in enumerate(jaxpr_pass.open_jaxpr(flat).eqns)}

    chosen = []  # (eqn, decision, build)
    region_at = {}  # id(last eqn) -> _RegionKernel: a whole-region group placed there
    for r in (*program.attention, *program.rownorm):
        last = r.match.eqns[-1]
        chosen.append((last, *_choose_region(r)))
        region_at[id(last)] = r
    for where, eqn, refine in program.ops(options):
        decision, build = _choose(eqn, where, options, refine)
        if refine is not None and decision.spec is not None:
            decision = dataclasses.replace(decision, layouts=_layout_text(decision.spec))
        chosen.append((eqn, decision, build))

    built = _build_all(chosen, options)
    consts = dict(zip(jaxpr_pass.open_jaxpr(flat).constvars, jaxpr_pass.jaxpr_consts(flat)))
    decisions, replacements = [], {}
    for eqn, decision, build in chosen:
        kernel, packed_rhs = None, None
        if build is not None:
            family, src = build
            result = built[src.symbol]
            if isinstance(result, runtime.BuildError):
                first = str(result).strip().splitlines()[0] if str(result).strip() else "?"
                decision = dataclasses.replace(decision, reason=f"kernel build failed: {first}")
            else:
                kernel = result
                decision = dataclasses.replace(decision, kernel=result)
        if id(eqn) in region_at:
            r = region_at[id(eqn)]
            for member in r.match.eqns:
                replacements[id(member)] = jaxpr_pass.SKIP
            replacements[id(eqn)] = _region_group(r.match, prop, r.family, decision.spec,
                                                  kernel)
            decisions.append(decision)
            continue
        if kernel is not None and getattr(decision.spec, "prepacked", False):
            try:
                packed_rhs = _pack_now(family, decision.spec, decision.knobs, options.isa,
                                       consts[eqn.invars[1]])
            except Exception as e:  # noqa: BLE001 - the op runs in XLA, said why
                kernel = None
                decision = dataclasses.replace(
                    decision, kernel=None,
                    reason=f"{family.name}: packing its weights failed: {type(e).__name__}: {e}")
        if id(eqn) in groups:
            _, match = groups[id(eqn)]
            last = match.eqns[-1] if match.eqns else eqn
            if kernel is not None:
                reuse = _reuses_residual(family, eqn, match, position[id(last)], last_use,
                                         program_inputs)
                if reuse:
                    decision = dataclasses.replace(
                        decision, layouts=decision.layouts + ", over its residual's buffer")
                group = _group(eqn, match, prop, family, decision.spec, kernel, packed_rhs,
                               reuse)
            else:
                group = _group(eqn, match, prop)
            for member in [eqn, *match.eqns]:
                replacements[id(member)] = jaxpr_pass.SKIP
            replacements[id(last)] = group
        elif kernel is not None:
            replacements[id(eqn)] = make_replacement(eqn, family, decision.spec, kernel)
        decisions.append(decision)
    _fall_back([d for d in decisions if not d.on_kernel and not d.reason.startswith("too small")],
               options)
    for key, run in prop.replacements.items():
        replacements.setdefault(key, run)
    return Plan(decisions, replacements, flat, prop, program.conversion_costs)
