"""What memory bandwidth this machine gives, to judge a memory-bound row (a decode step)
against: XLA reading a large array (jax.jit(jnp.sum)) and alt_jax's M = 1 GEMV streaming a
large weight, interleaved in one process (benchmarks.timing).

Usage: python -m benchmarks.bandwidth [--megabytes=256] [--repeat=15]
"""
from __future__ import annotations

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_integer("megabytes", 256, "size of the array read and of the GEMV's weight")
flags.DEFINE_integer("repeat", 15, "interleaved rounds")


def main(argv):
    del argv
    import jax
    import jax.numpy as jnp
    import numpy as np

    import alt_jax
    from benchmarks import timing

    k = 4096
    n = FLAGS.megabytes * 2**20 // 4 // k
    w = jnp.asarray(np.random.default_rng(0).standard_normal((k, n), dtype=np.float32))
    v = jnp.ones((1, k), jnp.float32)
    gemv = alt_jax.optimize(jax.jit(lambda w, v: v @ w), fallback="error").prepare(w)
    total = jax.jit(jnp.sum)
    fns = {"XLA sum": lambda: total(w), "alt_jax GEMV": lambda: gemv(v)}
    times = timing.interleaved(fns, (), timing.MeasureConfig(repeat=FLAGS.repeat))
    for name, t in times.items():
        print(f"{name:14s} {w.nbytes / 2**20:.0f} MB in {t.median * 1e3:7.3f} ms: "
              f"{w.nbytes / t.median / 1e9:5.1f} GB/s read")


if __name__ == "__main__":
    app.run(main)
