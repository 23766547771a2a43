"""A tiny CNN + MLP head for smoke tests of the benchmark runner: seconds, not minutes.

Entry point: build(layout, batch) -> Model (16x16x3 input, conv-BN-ReLU x2, dense to 10).
"""
from __future__ import annotations

import jax

from benchmarks.models.common import Layout, Model, Params, batch_norm, conv, global_avg_pool


def build(layout_name: str = "nhwc", batch: int = 1) -> Model:
    layout = Layout(layout_name)
    p = Params(seed=0)
    params = {"c1": p.conv(layout, 3, 3, 3, 16), "bn1": p.batch_norm(16),
              "c2": p.conv(layout, 3, 3, 16, 32), "bn2": p.batch_norm(32),
              "fc": p.normal((32, 10), 0.2)}

    def apply(params, x):
        x = jax.nn.relu(batch_norm(conv(x, params["c1"], layout), params["bn1"], layout))
        x = jax.nn.relu(batch_norm(conv(x, params["c2"], layout, 2), params["bn2"], layout))
        return global_avg_pool(x, layout) @ params["fc"]

    x = Params(seed=1).normal(layout.input_shape(batch, 16, 3), 1.0)
    return Model(f"tiny_cnn-{layout_name}", apply, params, (x,))
