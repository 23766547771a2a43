"""Per-op ablation of tuning: each conv/matmul of a model on its untuned (heuristic) kernel
and on the best kernel of each tuning run kind in a records file (joint / loop-only, model /
random search), timed interleaved in one process on the same inputs.

Run: python -m benchmarks.tuned_ops --model=resnet50 --records=r50.jsonl [--rounds=15]
Entry points: main (absl), op_rows(model, records_path, rounds) -> rows.
Each round times every variant of an op once (runtime.time_numpy: C++ loop, a repeat long
enough to be >= --min_repeat_ms); the table reports medians over rounds and the median over
rounds of t_untuned / t_tuned. Kernels are those the planner would build from the records.
Weights are read cold, as in a model and as the tuner measures them (--cold; see
tuner.measure.MeasureConfig).
"""
from __future__ import annotations

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
        row = {"op": w.label, "multiplicity": w.multiplicity,
               "ms": {k: 1e3 * statistics.median(v) for k, v in times.items()},
               "vs_untuned": {k: statistics.median(u / t for u, t in zip(times["untuned"], v))
                              for k, v in times.items() if k != "untuned"},
               "choice": {k: p[4] for k, p in prepared.items()}}
        rows.append(row)
        print(f"  {w.label[:100]}: " + ", ".join(f"{k} {ms:.3f} ms" for k, ms in row["ms"].items()),
              flush=True)
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
    print(f"{device.fingerprint()}: {model.name}, {FLAGS.rounds} interleaved rounds per op")
    rows = op_rows(model, FLAGS.records, FLAGS.rounds, FLAGS.min_repeat_ms / 1e3, FLAGS.cold)
    print()
    print(format_rows(rows))


if __name__ == "__main__":
    define_flags()
    app.run(main)
