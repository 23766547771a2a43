"""ResNet-50 and the BERT layer on a GPU: alt_jax's CUDA kernels against jax.jit (XLA:GPU),
batch 1 and 32, interleaved rounds in one process, outputs checked first.

  python -m benchmarks.gpu_bench --out=gpu_bench.json [--models=resnet50,bert_layer]
      [--batches=1,32] [--repeat=10]

Writes a JSON list of rows (model, batch, jit_ms, alt_jax_ms, speedup, rel_err, kernels,
left_to_xla) and prints a table. Without a GPU visible to jax it says so and writes
{"gpu": null}: scripts/gpu_check.sh then stops there.
"""
from __future__ import annotations

import json
import sys

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("out", "gpu_bench.json", "where the JSON rows go")
flags.DEFINE_list("models", ["resnet50", "bert_layer"], "zoo models (benchmarks/models)")
flags.DEFINE_list("batches", ["1", "32"], "batch sizes")
flags.DEFINE_integer("repeat", 10, "interleaved rounds")
# JAX's default f32 matmul precision on GPUs is TF32; the CUDA kernels compute in full
# float32, so the check allows TF32's error when the reference uses it.
flags.DEFINE_float("rtol", 2e-2, "relative tolerance of alt_jax's output against jax.jit's")


def run_one(name: str, batch: int, gpu, repeat: int, rtol: float) -> dict:
    import jax

    import alt_jax
    from benchmarks import models, timing

    m = models.build(name, batch=batch)
    params = jax.device_put(m.params, gpu)
    inputs = [jax.device_put(x, gpu) for x in m.inputs]
    ref_fn = jax.jit(m.apply)
    alt_fn = alt_jax.optimize(jax.jit(m.apply), fallback="silent")
    want = ref_fn(params, *inputs)
    got = alt_fn(params, *inputs)
    err = timing.check_close(f"{name} b{batch}", got, want, rtol)
    plan = alt_fn.plan_for(params, *inputs)
    t = timing.interleaved({"jit": ref_fn, "alt": alt_fn}, (params, *inputs),
                           timing.MeasureConfig(repeat=repeat))
    return {"model": name, "batch": batch, "jit_ms": t["jit"].median * 1e3,
            "alt_jax_ms": t["alt"].median * 1e3,
            "speedup": timing.median_ratio(t["jit"], t["alt"]), "rel_err": err,
            "kernels": sum(d.on_kernel for d in plan.decisions),
            "left_to_xla": len(plan.left_to_xla)}


def main(argv):
    del argv
    from alt_jax import device

    gpu = device.jax_gpu()
    if gpu is None:
        print("gpu_bench: no GPU visible to jax: nothing to measure", file=sys.stderr)
        with open(FLAGS.out, "w") as f:
            json.dump({"gpu": None}, f)
        return 0
    target = device.CudaTarget.of_jax_device(gpu)
    rows = []
    for name in FLAGS.models:
        for batch in (int(b) for b in FLAGS.batches):
            try:
                rows.append(run_one(name, batch, gpu, FLAGS.repeat, FLAGS.rtol))
            except Exception as e:  # noqa: BLE001 - a failing row is reported, not hidden
                rows.append({"model": name, "batch": batch, "error": f"{type(e).__name__}: {e}"})
            print(json.dumps(rows[-1]), flush=True)
    with open(FLAGS.out, "w") as f:
        json.dump({"gpu": device.fingerprint(target), "rows": rows}, f, indent=1)
    print(f"\n{device.fingerprint(target)}")
    print(f"{'model':12s} {'batch':>5s} {'jax.jit ms':>11s} {'alt_jax ms':>11s} {'speedup':>8s}")
    for r in rows:
        if "error" in r:
            print(f"{r['model']:12s} {r['batch']:5d}  error: {r['error'][:80]}")
        else:
            print(f"{r['model']:12s} {r['batch']:5d} {r['jit_ms']:11.3f} {r['alt_jax_ms']:11.3f} "
                  f"{r['speedup']:7.2f}x")
    return 0


if __name__ == "__main__":
    app.run(main)
