"""XLA (jax.jit) vs alt_jax on single convs and matmuls, interleaved in one process.

Run: python -m benchmarks.ops [--suite=conv,matmul] [--layouts=nhwc,nchw] [--repeat=15]
Each conv is written both as an NCHW/OIHW and as an NHWC/HWIO program; weights are jit
arguments (packed per call). Outputs are checked against jax.jit before anything is timed.
"""
from __future__ import annotations

import dataclasses
import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from jax import lax

import alt_jax
from benchmarks import timing

FLAGS = flags.FLAGS
flags.DEFINE_list("suite", ["conv", "matmul"], "which op lists to run: conv, matmul")
flags.DEFINE_list("layouts", ["nhwc", "nchw"], "conv program layouts: nhwc (NHWC/HWIO), nchw")
flags.DEFINE_list("only", [], "run only ops whose name contains one of these")
flags.DEFINE_integer("repeat", 15, "interleaved rounds per op")
flags.DEFINE_float("min_round_ms", 20.0, "minimum duration of one timed round")
flags.DEFINE_float("rtol", 1e-4, "max relative error vs jax.jit before timing")


@dataclasses.dataclass(frozen=True)
class ConvCase:
    name: str
    c: int
    k: int
    hw: int
    kernel: int
    stride: int = 1
    groups: int = 1

    @property
    def pad(self) -> int:
        return self.kernel // 2


@dataclasses.dataclass(frozen=True)
class MatmulCase:
    name: str
    m: int
    k: int
    n: int


# The conv layers of ResNet-50 named in issue 2 (batch 1), plus a MobileNet depthwise conv.
CONVS = (
    ConvCase("3x3 64->64 @56", 64, 64, 56, 3),
    ConvCase("3x3 128->128 @28", 128, 128, 28, 3),
    ConvCase("3x3 256->256 @14", 256, 256, 14, 3),
    ConvCase("3x3 512->512 @7", 512, 512, 7, 3),
    ConvCase("1x1 256->64 @56", 256, 64, 56, 1),
    ConvCase("7x7/2 3->64 @224", 3, 64, 224, 7, stride=2),
    ConvCase("dw 3x3 C32 @112", 32, 32, 112, 3, groups=32),
)
MATMULS = (
    MatmulCase("matmul 1x768x3072", 1, 768, 3072),
    MatmulCase("matmul 128x768x768", 128, 768, 768),
    MatmulCase("matmul 512x1024x1024", 512, 1024, 1024),
)


def conv_program(case: ConvCase, layout: str):
    """(fn, args, flops) for the conv written in `layout`."""
    rng = np.random.default_rng(0)
    cin = case.c // case.groups
    if layout == "nchw":
        x = rng.standard_normal((1, case.c, case.hw, case.hw), np.float32)
        w = rng.standard_normal((case.k, cin, case.kernel, case.kernel), np.float32)
        dn = ("NCHW", "OIHW", "NCHW")
    else:
        x = rng.standard_normal((1, case.hw, case.hw, case.c), np.float32)
        w = rng.standard_normal((case.kernel, case.kernel, cin, case.k), np.float32)
        dn = ("NHWC", "HWIO", "NHWC")
    w *= 1.0 / np.sqrt(cin * case.kernel ** 2)

    def fn(x, w):
        return lax.conv_general_dilated(
            x, w, (case.stride, case.stride), [(case.pad, case.pad)] * 2,
            dimension_numbers=dn, feature_group_count=case.groups)

    out_hw = (case.hw + 2 * case.pad - case.kernel) // case.stride + 1
    flops = 2 * case.k * out_hw * out_hw * cin * case.kernel ** 2
    return fn, (jnp.asarray(x), jnp.asarray(w)), flops


def matmul_program(case: MatmulCase):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((case.m, case.k), np.float32)
    b = rng.standard_normal((case.k, case.n), np.float32) / np.sqrt(case.k)
    return (lambda a, b: a @ b), (jnp.asarray(a), jnp.asarray(b)), 2 * case.m * case.k * case.n


def run_case(name, fn, args, flops, config):
    xla = jax.jit(fn)
    ours = alt_jax.optimize(jax.jit(fn), min_flops=0)
    timing.check_close(name, ours(*args), xla(*args), FLAGS.rtol)
    on_kernel = len(ours.plan_for(*args).rewritten)
    t = timing.interleaved({"xla": xla, "alt_jax": ours}, args, config)
    ratio = timing.median_ratio(t["xla"], t["alt_jax"])
    row = (f"{name:<34} {t['xla'].median * 1e3:9.3f} {t['alt_jax'].median * 1e3:9.3f} "
           f"{flops / t['alt_jax'].median / 1e9:9.1f} {ratio:7.2f}x"
           f"{'' if on_kernel else '  (left to XLA)'}")
    print(row, flush=True)
    return ratio


def main(argv):
    del argv
    config = timing.MeasureConfig(repeat=FLAGS.repeat, min_round_ms=FLAGS.min_round_ms)
    print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}; medians of {FLAGS.repeat} "
          f"interleaved rounds; speedup = median over rounds of t_xla / t_alt_jax")
    print(f"{'op':<34} {'xla ms':>9} {'alt ms':>9} {'GFLOP/s':>9} {'speedup':>8}")
    summary = {}
    selected = lambda n: not FLAGS.only or any(s in n for s in FLAGS.only)
    if "conv" in FLAGS.suite:
        ratios = []
        for case in CONVS:
            for layout in FLAGS.layouts:
                name = f"{case.name} {layout.upper()}"
                if selected(name):
                    ratios.append(run_case(name, *conv_program(case, layout), config))
        if ratios:
            summary["conv"] = (timing.geomean(ratios), min(ratios))
    if "matmul" in FLAGS.suite:
        ratios = [run_case(c.name, *matmul_program(c), config) for c in MATMULS if selected(c.name)]
        if ratios:
            summary["matmul"] = (timing.geomean(ratios), min(ratios))
    for suite, (gm, worst) in summary.items():
        print(f"{suite}: geomean speedup {gm:.2f}x, worst {worst:.2f}x")


if __name__ == "__main__":
    app.run(main)
