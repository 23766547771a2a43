"""A deliberately simple matmul family for testing the pass, planner and runtime on their
own, without the real kernel templates: 2-D row-major f32 dot only, one scalar loop nest.
Entry points: NAIVE_MATMUL (an OpFamily), child_build_script (a fresh process that builds
and runs its kernels: for cache tests across processes)."""
from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np
from jax import lax

from alt_jax import runtime
from alt_jax.ops.base import Axis, KnobError, Space, Unsupported


@dataclasses.dataclass(frozen=True)
class NaiveSpec:
    m: int
    k: int
    n: int


@dataclasses.dataclass(frozen=True, order=True)
class NaiveKnobs:
    rows_per_task: int = 1


_SOURCE = r'''
#include "alt_jax/kernel_abi.h"
extern "C" __attribute__((visibility("default")))
int32_t %(sym)s(const alt_runtime* rt, const void* const* in, void* const* out) {
  const float* a = (const float*)in[0];
  const float* b = (const float*)in[1];
  float* c = (float*)out[0];
  alt_parallel_for(rt, %(m)d, %(rows)d, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i)
      for (int64_t j = 0; j < %(n)d; ++j) {
        float s = 0;
        for (int64_t p = 0; p < %(k)d; ++p) s += a[i * %(k)d + p] * b[p * %(n)d + j];
        c[i * %(n)d + j] = s;
      }
  });
  return 0;
}
'''


class NaiveMatmul:
    name = "naive_matmul"
    primitive = lax.dot_general_p
    knobs_type = NaiveKnobs

    def match(self, eqn):
        (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
        a, b = (v.aval for v in eqn.invars)
        if a.dtype != np.float32 or b.dtype != np.float32:
            raise Unsupported(f"dtype {a.dtype}: only float32")
        if a.ndim != 2 or b.ndim != 2 or tuple(lc) != (1,) or tuple(rc) != (0,) or lb or rb:
            raise Unsupported("only plain 2-D row-major matmul")
        return NaiveSpec(a.shape[0], a.shape[1], b.shape[1])

    def flops(self, spec):
        return 2 * spec.m * spec.k * spec.n

    def prefers(self, spec):
        return True

    def default_knobs(self, spec, isa):
        return NaiveKnobs()

    def space(self, spec, isa):
        rows = {r for r in (1, 2, 4, 8, 16) if r <= spec.m} | {spec.m, NaiveKnobs().rows_per_task}
        return Space(self.name, NaiveKnobs, (Axis("rows_per_task", tuple(sorted(rows)), "loop"),))

    def validate(self, spec, knobs, isa):
        if not 1 <= knobs.rows_per_task <= spec.m:
            raise KnobError(f"rows_per_task={knobs.rows_per_task} outside [1, {spec.m}]")

    def render(self, spec, knobs, isa):
        sym = f"naive_mm_{spec.m}_{spec.k}_{spec.n}_{knobs.rows_per_task}"
        code = _SOURCE % dict(sym=sym, m=spec.m, k=spec.k, n=spec.n, rows=knobs.rows_per_task)
        return runtime.KernelSource(sym, code)

    residual_in_place = False  # no epilogue, so never a residual

    def pack_weights(self, spec, knobs, rhs, isa):
        return rhs  # the kernel reads the rhs as it is (the spec has no prepacked field)

    def kernel_inputs(self, spec, knobs, operands, isa):
        if len(operands) != 2:
            raise ValueError(f"naive matmul takes lhs, rhs, got {len(operands)} operands")
        return list(operands)

    def lower(self, spec, kernel, operands, reuse_residual=False):
        out = jax.ShapeDtypeStruct((spec.m, spec.n), np.float32)
        return runtime.ffi_call(kernel, operands, [out])


NAIVE_MATMUL = NaiveMatmul()
FAMILIES = {lax.dot_general_p: (NAIVE_MATMUL,)}


def child_build_script(cache_dir, spec: NaiveSpec = NaiveSpec(4, 8, 8), rows=(1,),
                       then: str = "print(cache.builds)") -> str:
    """Python source for a fresh process: builds the naive kernel for spec with each
    rows_per_task in `rows` into a KernelCache at cache_dir (its paths in `libs`), runs each
    on ones and checks the result, then runs the statement `then` (e.g. printing counters).
    A library only the child loaded is one the test process can damage without harm."""
    return "\n".join([
        "import sys",
        f"sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})",
        "import numpy as np",
        "from alt_jax import runtime",
        "from naive_family import NAIVE_MATMUL, NaiveKnobs, NaiveSpec",
        f"cache = runtime.KernelCache({str(cache_dir)!r})",
        f"spec = NaiveSpec({spec.m}, {spec.k}, {spec.n})",
        "libs = []",
        f"for rows in {tuple(rows)!r}:",
        "    k = cache.build(NAIVE_MATMUL.render(spec, NaiveKnobs(rows), None))",
        "    libs.append(k.lib)",
        "    c = np.zeros((spec.m, spec.n), np.float32)",
        "    runtime.run_numpy(k, [np.ones((spec.m, spec.k), np.float32),",
        "                          np.ones((spec.k, spec.n), np.float32)], [c])",
        "    assert (c == spec.k).all()",
        then, ""])
