"""Measures the size rule: from how many flops does a kernel call beat XLA on this machine?

Run: python -m benchmarks.min_flops [--repeat=9]
Sweeps small square matmuls and small 3x3 convs, times jax.jit vs alt_jax (min_flops=0)
interleaved, and prints the smallest size from which alt_jax is never slower. The planner's
DEFAULT_MIN_FLOPS comes from this run.
"""
from __future__ import annotations

import jax
import numpy as np
from absl import app, flags
from jax import lax

import alt_jax
from benchmarks import timing

FLAGS = flags.FLAGS
flags.DEFINE_integer("repeat", 9, "interleaved rounds per size")


def _cases():
    rng = np.random.default_rng(0)
    for n in (4, 8, 16, 24, 32, 48, 64, 96, 128):
        a = rng.standard_normal((n, n), np.float32)
        yield f"matmul {n}^3", (lambda a, b: a @ b), (a, a), 2 * n ** 3
    for c, hw in ((4, 4), (8, 4), (8, 8), (16, 8), (16, 16), (32, 16), (32, 32)):
        x = rng.standard_normal((1, hw, hw, c), np.float32)
        w = rng.standard_normal((3, 3, c, c), np.float32)
        fn = lambda x, w: lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
        yield f"conv3x3 C{c} @{hw}", fn, (x, w), 2 * hw * hw * c * c * 9


def main(argv):
    del argv
    config = timing.MeasureConfig(repeat=FLAGS.repeat, min_round_ms=10)
    rows = []
    print(f"{'op':<20} {'flops':>10} {'xla us':>8} {'alt us':>8} {'speedup':>8}")
    for name, fn, args, flops in _cases():
        xla = jax.jit(fn)
        ours = alt_jax.optimize(jax.jit(fn), min_flops=0)
        t = timing.interleaved({"xla": xla, "alt_jax": ours}, args, config)
        ratio = timing.median_ratio(t["xla"], t["alt_jax"])
        rows.append((flops, ratio))
        print(f"{name:<20} {flops:>10} {t['xla'].median * 1e6:8.1f} "
              f"{t['alt_jax'].median * 1e6:8.1f} {ratio:7.2f}x", flush=True)
    rows.sort()
    threshold = next((f for i, (f, _) in enumerate(rows) if all(r >= 1.0 for _, r in rows[i:])),
                     None)
    print(f"smallest size from which alt_jax is never slower: {threshold} flops")


if __name__ == "__main__":
    app.run(main)
