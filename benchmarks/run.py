"""Whole models: jax.jit vs alt_jax side by side, interleaved in one process.

Run: python -m benchmarks.run [--models=resnet18,resnet50] [--layouts=nhwc,nchw] [--repeat=10]
Parameters are jit arguments (apply(params, x)); alt_jax's output is checked against
jax.jit's before anything is timed, and a mismatch is an error, not a row.
"""
from __future__ import annotations

import time

import jax
from absl import app, flags

import alt_jax
from benchmarks import models, timing

FLAGS = flags.FLAGS
flags.DEFINE_list("models", ["resnet18", "resnet50"], f"models to run: {sorted(models.MODELS)}")
flags.DEFINE_list("layouts", ["nhwc", "nchw"], "program layouts: nhwc, nchw")
flags.DEFINE_integer("batch", 1, "batch size")
flags.DEFINE_integer("repeat", 10, "interleaved rounds per model")
flags.DEFINE_float("min_round_ms", 100.0, "minimum duration of one timed round")
flags.DEFINE_float("rtol", 1e-4, "max relative error vs jax.jit before timing")
flags.DEFINE_bool("explain", False, "print alt_jax's plan for each model")


def main(argv):
    del argv
    config = timing.MeasureConfig(warmup=2, repeat=FLAGS.repeat, min_round_ms=FLAGS.min_round_ms)
    print(f"jax {jax.__version__}, batch {FLAGS.batch}; medians of {FLAGS.repeat} interleaved "
          f"rounds; speedup = median over rounds of t_xla / t_alt_jax")
    rows = []
    for name in FLAGS.models:
        for layout in FLAGS.layouts:
            model = models.build(name, layout=layout, batch=FLAGS.batch)
            args = (model.params, *model.inputs)
            xla = jax.jit(model.apply)
            ours = alt_jax.optimize(jax.jit(model.apply))
            t0 = time.perf_counter()
            plan = ours.plan_for(*args)
            plan_s = time.perf_counter() - t0
            if FLAGS.explain:
                print(plan)
            timing.check_close(model.name, ours(*args), xla(*args), FLAGS.rtol)
            t = timing.interleaved({"xla": xla, "alt_jax": ours}, args, config)
            ratio = timing.median_ratio(t["xla"], t["alt_jax"])
            rows.append((model.name, model.flops, t, ratio, len(plan.rewritten),
                         len(plan.decisions), plan_s))
            print(f"  done {model.name}", flush=True)
    print(f"\n{'model':<16} {'GFLOP':>6} {'jax.jit ms':>11} {'alt_jax ms':>11} {'GFLOP/s':>8} "
          f"{'speedup':>8}  ops on kernels  plan+build s")
    for name, flops, t, ratio, on, total, plan_s in rows:
        print(f"{name:<16} {flops / 1e9:6.2f} {t['xla'].median * 1e3:11.2f} "
              f"{t['alt_jax'].median * 1e3:11.2f} {flops / t['alt_jax'].median / 1e9:8.1f} "
              f"{ratio:7.2f}x  {on:>3}/{total:<3}          {plan_s:6.1f}")


if __name__ == "__main__":
    app.run(main)
