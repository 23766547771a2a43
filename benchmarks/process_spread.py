"""How much does one model's speed vary between processes? Runs it in N fresh subprocesses,
each timing alt_jax and jax.jit (the control) interleaved, and reports per-process medians
and the spread across processes, with diagnostics that tell the suspected causes apart.

Run: python -m benchmarks.process_spread [--model=mobilenet_v2] [--layout=nchw] [--processes=10]
         [--repeat=15] [--trace] [--json_out=F]
Entry points: main (absl), child_measure(...) -> dict (what one process reports).

--trace sets ALT_JAX_TRACE_DISPATCH=1 in the children: the FFI handler then records, per
kernel, its calls and seconds, and at its first call each buffer's address mod 4096 (4K
aliasing), the calling thread's CPU and MXCSR (FTZ/DAZ) and those of XLA's pool threads.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "mobilenet_v2", "model from benchmarks.models")
flags.DEFINE_string("layout", "nchw", "program layout: nchw or nhwc")
flags.DEFINE_integer("processes", 10, "fresh processes, run one after another")
flags.DEFINE_integer("repeat", 15, "interleaved rounds per process")
flags.DEFINE_float("min_round_ms", 50.0, "minimum duration of one round per implementation")
flags.DEFINE_bool("control", True, "time jax.jit too, interleaved (the per-process control)")
flags.DEFINE_bool("trace", False, "per-kernel times and buffer offsets from the FFI handler")
flags.DEFINE_string("json_out", None, "write every process's report here")
flags.DEFINE_bool("child", False, "internal: measure in this process and print one report")

REPORT = "PROCESS_SPREAD_REPORT "


def _thread_cpus() -> dict:
    """{thread name: [allowed CPUs, last CPU]} of this process's threads (Linux)."""
    out = {}
    for tid in sorted(os.listdir("/proc/self/task"), key=int):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                name = f.read().strip()
            with open(f"/proc/self/task/{tid}/stat") as f:
                last_cpu = int(f.read().rsplit(")", 1)[1].split()[36])
            allowed = sorted(os.sched_getaffinity(int(tid)))
        except (OSError, ValueError, IndexError):
            continue
        out[f"{tid}:{name}"] = [allowed, last_cpu]
    return out


def child_measure(model_name: str, layout: str, repeat: int, min_round_ms: float,
                  control: bool) -> dict:
    import jax

    import alt_jax
    from alt_jax import _core
    from benchmarks import models, peers, timing

    model = models.build(model_name, layout=layout)
    args = (model.params, *model.inputs)
    prepared = alt_jax.optimize(jax.jit(model.apply), fallback="silent").prepare(model.params)
    impls = {"alt_jax": lambda params, *x: prepared(*x)}
    if control:
        impls["jax.jit"] = peers.xla_peer(model.apply)
    want = jax.jit(model.apply)(*args)
    timing.check_close("alt_jax", impls["alt_jax"](*args), want, 1e-4)
    config = timing.MeasureConfig(warmup=3, repeat=repeat, min_round_ms=min_round_ms)
    with timing.OthersLoad() as load:
        t = timing.interleaved(impls, args, config)
    report = {"pid": os.getpid(), "medians_ms": {k: v.median * 1e3 for k, v in t.items()},
              "others_cpu_share": load.others_share, "steal_share": load.steal_share,
              "mxcsr_main": hex(_core.mxcsr()), "threads": _thread_cpus()}
    if control:
        report["xla_over_alt"] = timing.median_ratio(t["jax.jit"], t["alt_jax"])
    trace = json.loads(_core.dispatch_trace()) if hasattr(_core, "dispatch_trace") else {}
    if trace:
        report["kernels"] = trace
    if hasattr(_core, "workspace_stats"):
        report["workspace"] = _core.workspace_stats()
    return report


def run_child() -> dict:
    env = dict(os.environ)
    if FLAGS.trace:
        env["ALT_JAX_TRACE_DISPATCH"] = "1"
    cmd = [sys.executable, "-m", "benchmarks.process_spread", "--child",
           f"--model={FLAGS.model}", f"--layout={FLAGS.layout}", f"--repeat={FLAGS.repeat}",
           f"--min_round_ms={FLAGS.min_round_ms}", f"--control={FLAGS.control}"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    for line in proc.stdout.splitlines():
        if line.startswith(REPORT):
            return json.loads(line[len(REPORT):])
    raise RuntimeError(f"child failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")


def spread(values) -> dict:
    values = list(values)
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "max_over_min": max(values) / min(values)}


def summarize(reports) -> str:
    lines = [f"{'process':>8} {'alt_jax ms':>11} {'jax.jit ms':>11} {'xla/alt':>8} "
             f"{'others %':>9} {'steal %':>8} {'main mxcsr':>10}"]
    for r in reports:
        m = r["medians_ms"]
        lines.append(f"{r['pid']:>8} {m['alt_jax']:11.3f} {m.get('jax.jit', float('nan')):11.3f} "
                     f"{r.get('xla_over_alt', float('nan')):8.2f} "
                     f"{100 * r.get('others_cpu_share', float('nan')):9.1f} "
                     f"{100 * r.get('steal_share', float('nan')):8.1f} {r['mxcsr_main']:>10}")
    s = spread(r["medians_ms"]["alt_jax"] for r in reports)
    lines.append(f"alt_jax across {len(reports)} processes: median {s['median']:.3f} ms, "
                 f"min {s['min']:.3f}, max {s['max']:.3f}, max/min {s['max_over_min']:.2f}")
    if all("xla_over_alt" in r for r in reports):
        s = spread(r["xla_over_alt"] for r in reports)
        lines.append(f"jax.jit/alt_jax per process: median {s['median']:.2f}x, min "
                     f"{s['min']:.2f}x, max {s['max']:.2f}x")
        s = spread(r["medians_ms"]["jax.jit"] for r in reports)
        lines.append(f"jax.jit across processes (control): median {s['median']:.2f} ms, "
                     f"max/min {s['max_over_min']:.2f}")
    return "\n".join(lines)


def main(argv):
    del argv
    if FLAGS.child:
        report = child_measure(FLAGS.model, FLAGS.layout, FLAGS.repeat, FLAGS.min_round_ms,
                               FLAGS.control)
        print(REPORT + json.dumps(report), flush=True)
        return
    reports = []
    for i in range(FLAGS.processes):
        reports.append(run_child())
        m = reports[-1]["medians_ms"]
        print(f"process {i + 1}/{FLAGS.processes}: " +
              ", ".join(f"{k} {v:.3f} ms" for k, v in m.items()), flush=True)
    print(summarize(reports))
    if FLAGS.json_out:
        with open(FLAGS.json_out, "w") as f:
            json.dump({"argv": sys.argv, "reports": reports}, f, indent=1)
        print(f"wrote {FLAGS.json_out}")


if __name__ == "__main__":
    app.run(main)
