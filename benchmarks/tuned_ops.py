"""Per-op ablation of tuning: each conv/matmul of a model on its untuned (heuristic) kernel
and on the best kernel of each tuning run kind in a records file (joint / loop-only, model /
random search), timed interleaved in one process on the same inputs.

Run: python -m benchmarks.tuned_ops --model=resnet50 --records=r50.jsonl [--rounds=15]
         [--in_model]
Entry points: main (absl), op_rows(model, records_path, rounds) -> rows,
in_model_rows(model, records_path, rounds) -> rows, format_rows(rows).
Each round times every variant of an op once (runtime.time_numpy: C++ loop, a repeat long
enough to be >= --min_repeat_ms); the table reports medians over rounds and the median over
rounds of t_untuned / t_tuned. Kernels are those the planner would build from the records.
Weights are read cold, as in a model and as the tuner measures them (--cold; see
tuner.measure.MeasureConfig).

--in_model times each op where it finally runs: the whole model, optimized once per variant
(untuned, and each run kind's records), runs in interleaved rounds with the FFI handler's
dispatch trace on (ALT_JAX_TRACE_DISPATCH), and each op's time is its kernel's seconds per
call in that round. Isolated timings (the default) see one kernel alone in a process of its
own making; in the model an op also meets the cache state its neighbours leave and the
buffers XLA assigns, and an op can rank differently there.
"""
from __future__ import annotations

import os
import statistics

import numpy as np
from absl import app, flags

from alt_jax import device, records as records_mod, runtime
from alt_jax.ops import registry
from benchmarks import models
from benchmarks.tuning_runs import tuning_runs

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Flags of the command line only (benchmarks.run, imported beside this module by the
    tests, defines some of the same names)."""
    flags.DEFINE_string("model", "resnet50", f"a model of benchmarks/models: "
                        f"{sorted(models.MODELS)}")
    flags.DEFINE_string("layout", "nhwc", "the model's program layout")
    flags.DEFINE_string("records", None, "tuning records (alt-tune)")
    flags.DEFINE_integer("rounds", 15, "interleaved rounds per op")
    flags.DEFINE_float("min_repeat_ms", 20.0, "minimum duration of one timed repeat")
    flags.DEFINE_bool("cold", True, "weights read cold (rotated copies), as the tuner times "
                      "them; --nocold: warm")
    flags.DEFINE_bool("in_model", False, "time each op inside the whole model (dispatch "
                      "trace) instead of alone")
    flags.DEFINE_integer("calls", 5, "--in_model: model calls per variant per round")


def _variants(workload, space_isa, records_path: str) -> dict:
    """label -> (family, spec, knobs): 'untuned' and one per tuning run kind with a record."""
    families = registry.families_by_name()
    name = workload.preferred
    family, spec = families[name], workload.spec_of(name)
    out = {"untuned": (family, spec, family.default_knobs(spec, space_isa))}
    runs = tuning_runs(records_path) or [("tuned", {})]
    here = device.fingerprint(space_isa)
    for label, select in runs:
        rec = records_mod.RecordStore(records_path, select).best_for_op(workload.op_key, here)
        if rec is None or rec["family"] not in dict(workload.candidates):
            continue
        family = families[rec["family"]]
        knobs = records_mod.knobs_from_record(rec, family.knobs_type, records_path)
        if knobs is not None:
            out[label] = (family, workload.spec_of(rec["family"]), knobs)
    return out


def _row(op: str, multiplicity: int, times: dict, choice: dict) -> dict:
    """A table row from per-round seconds per variant ('untuned' among them): medians, and
    the median over rounds of untuned / variant."""
    return {"op": op, "multiplicity": multiplicity,
            "ms": {k: 1e3 * statistics.median(v) for k, v in times.items()},
            "vs_untuned": {k: statistics.median(u / t for u, t in zip(times["untuned"], v))
                           for k, v in times.items() if k != "untuned"},
            "choice": choice}


def op_rows(model, records_path: str, rounds: int, min_repeat_s: float,
            cold: bool = True) -> list:
    from tuner.cli import bound_workloads
    from tuner.measure import MeasureConfig
    from tuner.tune import Harness
    from tuner.worker import check_output, cold_copies

    protocol = MeasureConfig()
    isa = device.detect_isa()
    cache = runtime.default_cache()
    rows = []
    for w in bound_workloads(model):
        variants = _variants(w, isa, records_path)
        harness = Harness(w, seed=0)
        prepared = {}
        for label, (family, spec, knobs) in variants.items():
            kernel = cache.build(family.render(spec, knobs, isa))
            inputs = harness.inputs_for(family, spec, knobs, isa)
            out = np.empty(harness.expected.shape, np.float32)
            runtime.run_numpy(kernel, inputs, [out])
            wrong = check_output(out, harness.expected, 1e-4)  # the tuner's own check
            if wrong:
                raise AssertionError(f"{w.label} [{label}]: {wrong}")
            rotate = (cold_copies(list(inputs), harness.cold, protocol.cold_bytes,
                                  protocol.max_cold_copies) if cold else [])
            probe = min(runtime.time_numpy(kernel, inputs, [out], number=1, repeat=3,
                                           rotate=rotate))
            number = max(1, int(min_repeat_s / max(probe, 1e-7)))
            prepared[label] = (kernel, inputs, out, number, f"{family.name} {knobs}", rotate)
        times = {label: [] for label in prepared}
        for _ in range(rounds):
            for label, (kernel, inputs, out, number, _, rotate) in prepared.items():
                times[label].append(runtime.time_numpy(kernel, inputs, [out], number=number,
                                                       repeat=1, rotate=rotate)[0])
        row = _row(w.label, w.multiplicity, times, {k: p[4] for k, p in prepared.items()})
        rows.append(row)
        print(f"  {w.label[:100]}: " + ", ".join(f"{k} {ms:.3f} ms" for k, ms in row["ms"].items()),
              flush=True)
    return rows


def _model_variants(model, records_path: str) -> dict:
    """label -> the model optimized with that variant's records, weights bound (prepare)."""
    import jax

    import alt_jax

    runs = tuning_runs(records_path) or [("tuned", {})]
    out = {"untuned": False}
    out.update({label: records_mod.RecordStore(records_path, select) for label, select in runs})
    return {label: alt_jax.optimize(jax.jit(model.apply), fallback="silent",
                                    records=records).prepare(model.params)
            for label, records in out.items()}


def _op_keys(plan) -> list:
    """(op label, kernel symbol) per op of a plan on a kernel, in program order."""
    out = []
    for d in plan.rewritten:
        epi = getattr(d.spec, "epilogue", None)
        label = f"{d.primitive} {d.signature}" + (
            f" +{epi.describe()}" if epi is not None and not epi.is_identity else "")
        out.append((label, d.kernel.symbol))
    return out


def in_model_rows(model, records_path: str, rounds: int, calls: int = 5) -> list:
    """Per op, its kernel's seconds per call inside the whole model, for the untuned model
    and each run kind's tuned one, in interleaved rounds (see the module docstring)."""
    import json

    import jax

    from alt_jax import _core

    if os.environ.get("ALT_JAX_TRACE_DISPATCH", "")[:1] in ("", "0"):
        raise RuntimeError("in_model_rows needs ALT_JAX_TRACE_DISPATCH=1 in the environment "
                           "before the first kernel runs (python -m benchmarks.tuned_ops "
                           "--in_model sets it)")
    variants = _model_variants(model, records_path)
    ops = {label: _op_keys(fn.plan_for(*model.inputs)) for label, fn in variants.items()}
    order = [label for label, _ in ops["untuned"]]
    for label, pairs in ops.items():
        if [l for l, _ in pairs] != order:
            raise AssertionError(f"{label}: its plan puts other ops on kernels than the "
                                 f"untuned one; per-op rows would not line up")
    for fn in variants.values():
        for _ in range(2):
            jax.block_until_ready(fn(*model.inputs))
    per_call = {label: {} for label in variants}  # label -> symbol -> [seconds per call]
    for r in range(rounds):
        names = list(variants) if r % 2 == 0 else list(reversed(variants))
        for label in names:
            before = json.loads(_core.dispatch_trace())
            for _ in range(calls):
                jax.block_until_ready(variants[label](*model.inputs))
            after = json.loads(_core.dispatch_trace())
            for sym, t in after.items():
                n = t["calls"] - before.get(sym, {}).get("calls", 0)
                if n:
                    s = t["seconds"] - before.get(sym, {}).get("seconds", 0.0)
                    per_call[label].setdefault(sym, []).append(s / n)
    rows = []
    seen: dict = {}
    for i, op in enumerate(order):
        if op in seen:
            seen[op]["multiplicity"] += 1
            continue
        times = {label: per_call[label][ops[label][i][1]] for label in variants}
        row = _row(op, 1, times, {label: ops[label][i][1] for label in variants})
        seen[op] = row
        rows.append(row)
    return rows


def format_rows(rows) -> str:
    labels = list(dict.fromkeys(k for r in rows for k in r["ms"]))
    lines = [f"{'op':<96} {'x':>2} " + " ".join(f"{k + ' ms':>22}" for k in labels)
             + "  " + " ".join(f"{k + ' gain':>24}" for k in labels if k != "untuned")]
    for r in rows:
        cells = " ".join(f"{r['ms'][k]:22.3f}" if k in r["ms"] else f"{'-':>22}" for k in labels)
        gains = " ".join(f"{r['vs_untuned'][k]:23.3f}x" if k in r["vs_untuned"] else f"{'-':>24}"
                         for k in labels if k != "untuned")
        lines.append(f"{r['op'][:96]:<96} {r['multiplicity']:>2} {cells}  {gains}")
    total = {k: sum(r["ms"].get(k, r["ms"]["untuned"]) * r["multiplicity"] for r in rows)
             for k in labels}
    lines.append(f"{'whole model: sum of op time x multiplicity':<96} {'':>2} "
                 + " ".join(f"{total[k]:22.3f}" for k in labels) + "  "
                 + " ".join(f"{total['untuned'] / total[k]:23.3f}x" for k in labels
                            if k != "untuned"))
    worst = {k: min(r["vs_untuned"][k] for r in rows if k in r["vs_untuned"])
             for k in labels if k != "untuned"}
    lines.append("slowest op against its untuned self: "
                 + ", ".join(f"{k} {v:.3f}x" for k, v in worst.items()))
    return "\n".join(lines)


def main(argv):
    del argv
    if not FLAGS.records:
        raise app.UsageError("--records is required")
    model = models.build(FLAGS.model, layout=FLAGS.layout)
    if FLAGS.in_model:
        print(f"{device.fingerprint()}: {model.name}, ops timed inside the model, "
              f"{FLAGS.rounds} interleaved rounds of {FLAGS.calls} calls per variant")
        rows = in_model_rows(model, FLAGS.records, FLAGS.rounds, FLAGS.calls)
    else:
        print(f"{device.fingerprint()}: {model.name}, {FLAGS.rounds} interleaved rounds per op")
        rows = op_rows(model, FLAGS.records, FLAGS.rounds, FLAGS.min_repeat_ms / 1e3,
                       FLAGS.cold)
    print()
    print(format_rows(rows))


if __name__ == "__main__":
    # For --in_model; the handler reads it once, at its first call, and the isolated timings
    # do not go through the handler.
    os.environ.setdefault("ALT_JAX_TRACE_DISPATCH", "1")
    define_flags()
    app.run(main)
