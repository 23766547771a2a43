"""MobileNetV2 (Sandler et al. 2018), width 1.0, inference, as an NHWC/HWIO or NCHW/OIHW program.

Entry point: build(layout, batch) -> Model. 224x224 RGB input, 1000 classes, ~0.6 GFLOP.
"""
from __future__ import annotations

import jax.numpy as jnp

from benchmarks.models.common import Layout, Model, Params, batch_norm, conv, global_avg_pool

# Inverted residual stages: (expansion t, output channels c, repeats n, first stride s).
_CONFIG = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
           (6, 160, 3, 2), (6, 320, 1, 1))
_STEM, _HEAD = 32, 1280


def _blocks():
    """Static structure, one (cin, hidden, cout, stride) per inverted residual block."""
    out, cin = [], _STEM
    for t, c, n, s in _CONFIG:
        for i in range(n):
            out.append((cin, cin * t, c, s if i == 0 else 1))
            cin = c
    return out


def _init(layout: Layout, seed: int = 0) -> dict:
    p = Params(seed)
    params = {"stem": {"w": p.conv(layout, 3, 3, 3, _STEM), "bn": p.batch_norm(_STEM)},
              "blocks": []}
    for cin, hidden, cout, _ in _blocks():
        block = {}
        if hidden != cin:
            block["expand"] = p.conv(layout, 1, 1, cin, hidden)
            block["expand_bn"] = p.batch_norm(hidden)
        # Depthwise: one input channel per group, `hidden` groups.
        block["dw"] = p.conv(layout, 3, 3, 1, hidden)
        block["dw_bn"] = p.batch_norm(hidden)
        block["project"] = p.conv(layout, 1, 1, hidden, cout)
        block["project_bn"] = p.batch_norm(cout)
        params["blocks"].append(block)
    cin = _CONFIG[-1][1]
    params["head"] = {"w": p.conv(layout, 1, 1, cin, _HEAD), "bn": p.batch_norm(_HEAD)}
    params["fc"] = {"w": p.normal((_HEAD, 1000), 1.0 / _HEAD ** 0.5),
                    "b": p.normal((1000,), 0.01)}
    return params


def relu6(x):
    return jnp.minimum(jnp.maximum(x, 0.0), 6.0)


def _block(x, bp, layout: Layout, hidden: int, stride: int, residual: bool):
    y = x
    if "expand" in bp:
        y = relu6(batch_norm(conv(y, bp["expand"], layout), bp["expand_bn"], layout))
    y = relu6(batch_norm(conv(y, bp["dw"], layout, stride, groups=hidden), bp["dw_bn"], layout))
    y = batch_norm(conv(y, bp["project"], layout), bp["project_bn"], layout)  # linear bottleneck
    return x + y if residual else y


def build(layout_name: str = "nhwc", batch: int = 1) -> Model:
    layout = Layout(layout_name)
    params = _init(layout)
    # Strides, widths and which blocks add their input are static structure, not weights.
    structure = [(hidden, stride, stride == 1 and cin == cout)
                 for cin, hidden, cout, stride in _blocks()]

    def apply(params, x):
        x = relu6(batch_norm(conv(x, params["stem"]["w"], layout, 2), params["stem"]["bn"],
                             layout))
        for bp, (hidden, stride, residual) in zip(params["blocks"], structure):
            x = _block(x, bp, layout, hidden, stride, residual)
        x = relu6(batch_norm(conv(x, params["head"]["w"], layout), params["head"]["bn"], layout))
        x = global_avg_pool(x, layout)
        return x @ params["fc"]["w"] + params["fc"]["b"]

    x = Params(seed=1).normal(layout.input_shape(batch, 224, 3), 1.0)
    return Model(f"mobilenet_v2-{layout_name}", apply, params, (x,))
